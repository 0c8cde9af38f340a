"""counterfactual_effects / causal_weights against a plain per-position Python loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.causal import (
    bucket_length,
    bucket_lengths,
    causal_weights,
    counterfactual_effects,
    precompile,
    trace_count,
)
from coso_jax.causal import effects as effects_lib
from coso_jax.causal.classifier import CausalClassifier, ClassifierConfig, logits_fn

VOCAB, NUM_LABELS, UNK, PAD = 23, 3, 1, 0
SKIP_IDS = (0, 2, 5, 6)  # pad, a "special" and two "punctuation" ids
MAX_LEN = 64


def make_model(masked_pooling: bool, seed: int = 0):
    """A small random nonlinear classifier (tokens [N, L], mask [N, L]) -> logits [N, C].

    With masked pooling a row's logits ignore its padded positions (pad invariant); without it
    (the reference's plain mean) they do not, and the kernel must still match the loop.
    """
    keys = jax.random.split(jax.random.key(seed), 4)
    embed = jax.random.normal(keys[0], (VOCAB, 8))
    positions = jax.random.normal(keys[1], (MAX_LEN, 8))
    mix = jax.random.normal(keys[2], (8, 8))
    head = 2.0 * jax.random.normal(keys[3], (8, NUM_LABELS))

    def pool(h, weights):
        return (h * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)

    def logits_fn(tokens, mask):
        h = jnp.tanh(embed[tokens] + positions[:tokens.shape[1]])
        weights = (mask[..., None].astype(jnp.float32) if masked_pooling
                   else jnp.ones(h.shape[:2] + (1,)))
        context = pool(h, weights)
        h = jnp.tanh(h @ mix + context[:, None])
        return pool(h, weights) @ head

    return logits_fn


MASKED_MODEL = make_model(masked_pooling=True)
UNMASKED_MODEL = make_model(masked_pooling=False, seed=1)
_jitted = {}


def loop_effects(logits_fn, tokens, mask, labels, window, skip_positions):
    """docs/design.md step 3 literally: one ablated sequence at a time at the full padded length."""
    fn = _jitted.setdefault(id(logits_fn), jax.jit(logits_fn))
    batch, length = tokens.shape
    effects = np.zeros((batch, length), np.float32)
    for b in range(batch):
        row, row_mask = tokens[b:b + 1], mask[b:b + 1].astype(np.int32)
        p0 = float(jax.nn.softmax(fn(row, row_mask)[0])[labels[b]])
        for i in range(length):
            if not mask[b, i] or skip_positions[b, i]:
                continue
            ablated = row.copy()
            for offset in range(window):
                ablated[0, min(i + offset, length - 1)] = UNK
            p = float(jax.nn.softmax(fn(ablated, row_mask)[0])[labels[b]])
            effects[b, i] = abs(p0 - p)
    return effects


def make_batch(batch, length, seed, left_padding=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (batch, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, batch)
    lengths[0] = length  # one full row: its windows are clamped at L - 1 on real tokens
    mask = np.arange(length)[None] < lengths[:, None]
    if left_padding:
        mask = mask[:, ::-1].copy()
    tokens[~mask] = PAD
    labels = rng.integers(0, NUM_LABELS, batch).astype(np.int32)
    skip_vocab = np.zeros(VOCAB, bool)
    skip_vocab[list(SKIP_IDS)] = True
    return tokens, mask, labels, skip_vocab


@pytest.mark.parametrize("length", [1, 2, 7, 64])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 5, 6])
def test_matches_plain_loop(length, window):
    batch = 4 if length == 64 else 5
    tokens, mask, labels, skip_vocab = make_batch(batch, length, seed=10 * length + window)
    skip_positions = skip_vocab[tokens]
    for model, pad_invariant in ((MASKED_MODEL, True), (MASKED_MODEL, False),
                                 (UNMASKED_MODEL, False)):
        expected = loop_effects(model, tokens, mask, labels, window, skip_positions)
        got = counterfactual_effects(model, tokens, mask, labels, window=window, mask_token_id=UNK,
                                     skip_mask=skip_vocab, pad_invariant=pad_invariant)
        assert got.shape == (batch, length) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0,
                                   err_msg=f"pad_invariant={pad_invariant}")
        assert np.all(np.asarray(got)[~mask | skip_positions] == 0)
    if length == 64:
        assert expected.max() > 1e-3  # the test model really reacts to ablations


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_chunk_sizes_and_position_skip_mask(chunk_size):
    tokens, mask, labels, skip_vocab = make_batch(6, 20, seed=chunk_size)
    skip_positions = skip_vocab[tokens]
    expected = loop_effects(MASKED_MODEL, tokens, mask, labels, 4, skip_positions)
    for skip in (skip_vocab, skip_positions):  # per-vocabulary and per-position forms
        got = counterfactual_effects(MASKED_MODEL, tokens, mask, labels, window=4,
                                     mask_token_id=UNK, skip_mask=skip, chunk_size=chunk_size,
                                     pad_invariant=True)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_left_padding_and_no_skip_mask():
    tokens, mask, labels, _ = make_batch(5, 12, seed=3, left_padding=True)
    no_skip = np.zeros_like(mask)
    expected = loop_effects(MASKED_MODEL, tokens, mask, labels, 3, no_skip)
    got = counterfactual_effects(MASKED_MODEL, tokens, mask, labels, window=3, mask_token_id=UNK,
                                 pad_invariant=True)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_rows_without_scored_positions_are_zero():
    tokens, mask, labels, skip_vocab = make_batch(3, 8, seed=4)
    mask[1] = False
    tokens[2] = SKIP_IDS[1]
    got = np.asarray(counterfactual_effects(MASKED_MODEL, tokens, mask, labels, mask_token_id=UNK,
                                            skip_mask=skip_vocab, pad_invariant=True))
    assert np.all(got[1:] == 0)
    all_skip = np.ones_like(mask)
    assert np.all(np.asarray(counterfactual_effects(
        MASKED_MODEL, tokens, mask, labels, mask_token_id=UNK, skip_mask=all_skip)) == 0)


def test_new_batch_of_same_shape_does_not_recompile():
    def fresh_model(tokens, mask):  # a new function object: compiles its own shapes once
        return MASKED_MODEL(tokens, mask)

    kwargs = dict(window=4, mask_token_id=UNK, pad_invariant=False, chunk_size=32)
    tokens, mask, labels, skip_vocab = make_batch(8, 16, seed=5)
    counterfactual_effects(fresh_model, tokens, mask, labels, skip_mask=skip_vocab, **kwargs)
    before = trace_count()
    for seed in range(6, 9):
        tokens, mask, labels, _ = make_batch(8, 16, seed=seed)
        counterfactual_effects(fresh_model, tokens, mask, labels, skip_mask=skip_vocab,
                               window=seed - 4, mask_token_id=UNK + seed % 2, chunk_size=32)
    assert trace_count() == before, "a new batch of the same shape recompiled the kernel"


def test_precompile_covers_every_bucket_of_pad_invariant_batches():
    def fresh_model(tokens, mask):  # a new function object: nothing compiled for it yet
        return MASKED_MODEL(tokens, mask)

    compiled = precompile(fresh_model, 40)
    assert compiled == len(bucket_lengths(40)) == len({bucket_length(n, 40) for n in range(1, 41)})
    before = trace_count()
    rng = np.random.default_rng(11)
    for seed in range(12, 18):  # rows of random lengths touch random subsets of the buckets
        tokens, mask, labels, skip_vocab = make_batch(6, 40, seed=seed)
        mask &= np.arange(40)[None] < rng.integers(1, 41, (6, 1))
        counterfactual_effects(fresh_model, tokens, mask, labels, mask_token_id=UNK,
                               skip_mask=skip_vocab, pad_invariant=True)
    assert trace_count() == before, "a batch met a bucket precompile did not compile"
    assert precompile(fresh_model, 40) == 0  # a second call only hits the cache


def test_bucket_lengths():
    assert [bucket_length(n, 1000) for n in (1, 8, 9, 64, 65, 100, 129)] == [
        8, 8, 16, 64, 80, 112, 160]
    assert bucket_length(60, 50) == 50
    for n in range(1, 300):
        b = bucket_length(n, 10_000)
        assert n <= b < n + max(8, n / 4)  # at most ~25% padding past the first buckets


def test_input_errors_name_the_problem():
    tokens, mask, labels, skip_vocab = make_batch(2, 5, seed=0)
    with pytest.raises(ValueError, match="window"):
        counterfactual_effects(MASKED_MODEL, tokens, mask, labels, window=0, mask_token_id=UNK)
    with pytest.raises(ValueError, match="attention_mask"):
        counterfactual_effects(MASKED_MODEL, tokens, mask[:, :3], labels, mask_token_id=UNK)
    with pytest.raises(ValueError, match="labels"):
        counterfactual_effects(MASKED_MODEL, tokens, mask, labels[:1], mask_token_id=UNK)
    with pytest.raises(ValueError, match="skip_mask"):
        counterfactual_effects(MASKED_MODEL, tokens, mask, labels, mask_token_id=UNK,
                               skip_mask=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="tokens"):
        counterfactual_effects(MASKED_MODEL, tokens[0], mask[0], labels, mask_token_id=UNK)


# ---------------------------------------------------------------------------------------------
# The classifier fast path (per-row first-layer tables) against the generic path and the loop.
def _classifier(seed=0):
    # A large initializer so that single tokens move the probabilities visibly.
    config = ClassifierConfig.tiny(VOCAB, NUM_LABELS, initializer_range=0.3, dropout_rate=0.0)
    return logits_fn(CausalClassifier(config, rngs=nnx.Rngs(seed)))


CLASSIFIER_FN = _classifier()


def _opaque_classifier(tokens, mask):
    """The same classifier behind a plain function: the kernel's generic path."""
    return CLASSIFIER_FN(tokens, mask)


def classifier_batch(batch, length, seed, left_padding=False):
    """make_batch plus the cases the fast path packs differently: a row that is mostly skip
    tokens (few items: chunks close early on their row limit), the mask token inside a row, and
    a duplicate of row 0 with other ids in its padding."""
    tokens, mask, labels, skip_vocab = make_batch(batch, length, seed, left_padding)
    tokens[1] = np.where(np.arange(length) % 5 == 0, 3, SKIP_IDS[2])
    mask[1] = True
    tokens[2, 1] = UNK
    tokens[3], mask[3], labels[3] = tokens[0], mask[0], labels[0]
    mask[4] = mask[0]
    tokens[4] = np.where(mask[4], tokens[0], 7)
    labels[4] = labels[0]
    return tokens, mask, labels, skip_vocab


@pytest.mark.parametrize("window, left_padding", [(1, False), (4, False), (3, True)])
def test_classifier_fast_path_matches_generic_path_and_loop(window, left_padding):
    assert effects_lib._uses_fast_path(CLASSIFIER_FN)
    assert not effects_lib._uses_fast_path(_opaque_classifier)
    tokens, mask, labels, skip_vocab = classifier_batch(7, 40, seed=window, left_padding=left_padding)
    skip_positions = skip_vocab[tokens]
    expected = loop_effects(CLASSIFIER_FN, tokens, mask, labels, window, skip_positions)
    assert expected.max() > 1e-3
    for pad_invariant in (True, False):
        for chunk_size in (None, 3):
            kwargs = dict(window=window, mask_token_id=UNK, skip_mask=skip_vocab, chunk_size=chunk_size,
                          pad_invariant=pad_invariant)
            fast = np.asarray(counterfactual_effects(CLASSIFIER_FN, tokens, mask, labels, **kwargs))
            generic = np.asarray(counterfactual_effects(_opaque_classifier, tokens, mask, labels, **kwargs))
            msg = f"pad_invariant={pad_invariant} chunk_size={chunk_size}"
            np.testing.assert_allclose(fast, generic, atol=1e-5, rtol=0, err_msg=msg)
            np.testing.assert_allclose(fast, expected, atol=1e-5, rtol=0, err_msg=msg)
            np.testing.assert_array_equal(fast[3], fast[0])  # the duplicate row, scored once
            if pad_invariant:
                np.testing.assert_array_equal(fast[4], fast[0])  # other padding, same row


def test_classifier_fast_path_precompile_is_batch_size_independent():
    # A structure no other test uses (1 layer): nothing compiled for it yet.
    model = CausalClassifier(ClassifierConfig.tiny(VOCAB, NUM_LABELS, num_layers=1), rngs=nnx.Rngs(4))
    compiled = precompile(logits_fn(model), 24)
    assert compiled == len(bucket_lengths(24))
    before = trace_count()
    for batch, seed in ((3, 20), (9, 21), (16, 22)):
        tokens, mask, labels, skip_vocab = make_batch(batch, 24, seed=seed)
        counterfactual_effects(logits_fn(model), tokens, mask, labels, mask_token_id=UNK,
                               skip_mask=skip_vocab, pad_invariant=True)
    # New weights of the same structure reuse the compiled scorers too.
    other = CausalClassifier(ClassifierConfig.tiny(VOCAB, NUM_LABELS, num_layers=1), rngs=nnx.Rngs(5))
    counterfactual_effects(logits_fn(other), tokens, mask, labels, mask_token_id=UNK, pad_invariant=True)
    assert trace_count() == before, "a batch of another size or new weights recompiled"


def test_row_limited_chunks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        runs = rng.integers(1, 12, rng.integers(1, 10))
        rows = np.repeat(np.arange(runs.size) * 3, runs)
        chunk, max_rows = int(rng.integers(1, 10)), int(rng.integers(1, 4))
        bounds = effects_lib._row_limited_chunks(rows, chunk, max_rows)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows.size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for begin, end in bounds:
            assert 0 < end - begin <= chunk and np.unique(rows[begin:end]).size <= max_rows
        # Greedy: a chunk only closes when full or when the next item's row would exceed the limit.
        for (begin, end), _ in zip(bounds, bounds[1:]):
            assert end - begin == chunk or (np.unique(rows[begin:end]).size == max_rows
                                            and rows[end] != rows[end - 1])
    assert effects_lib._row_limited_chunks(np.zeros(0, np.int64), 4, 2) == []


def np_weights(effects, valid):
    out = np.zeros_like(effects)
    for b in range(len(effects)):
        e = np.where(valid[b], effects[b], 0.0)
        out[b] = np.sqrt((e - e.min()) / (e.max() - e.min() + 1e-10))
    return np.where(valid, out, 0.0)


def test_causal_weights_properties():
    rng = np.random.default_rng(0)
    effects = rng.random((5, 9)).astype(np.float32) * 0.3
    valid = rng.random((5, 9)) < 0.8
    valid[0] = True
    effects[3] = 0.0  # an all-zero row
    effects[4] = np.where(valid[4], 0.25, 0.0)  # constant over the valid positions
    weights = np.asarray(causal_weights(effects, valid))
    np.testing.assert_allclose(weights, np_weights(effects, valid), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(weights)) and weights.min() >= 0 and weights.max() <= 1
    assert np.all(weights[~valid] == 0)
    assert np.all(weights[3] == 0)
    for b in (0, 1, 2, 4):
        assert weights[b].max() == pytest.approx(1.0, abs=1e-6)
    jitted = jax.jit(causal_weights)(effects, valid)
    np.testing.assert_allclose(jitted, weights, rtol=1e-6)
    grad = jax.grad(lambda e: causal_weights(e, valid).sum())(jnp.asarray(effects))
    assert np.all(np.asarray(grad) == 0)


def test_effects_to_weights_end_to_end():
    tokens, mask, labels, skip_vocab = make_batch(4, 10, seed=7)
    skip_positions = skip_vocab[tokens]
    effects = counterfactual_effects(MASKED_MODEL, tokens, mask, labels, mask_token_id=UNK,
                                     skip_mask=skip_vocab, pad_invariant=True)
    valid = mask & ~skip_positions
    weights = np.asarray(causal_weights(effects, valid))
    for b in range(4):
        if np.asarray(effects)[b].max() > 0:
            assert weights[b].max() == pytest.approx(1.0, abs=1e-6)


def test_skip_token_mask_on_a_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from coso_jax.causal import skip_token_mask

    corpus = ['{"thoughts": "the target is 3, go right!", "action": "+"}',
              "{'a': [1, 2], 'b': ()} ok? yes; no_way. x - y + z",
              '", "', '"", [] {} ... ?! ;'] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
    mask = skip_token_mask(hf)
    assert mask.shape == (len(hf),) and mask.dtype == bool
    vocab = hf.get_vocab()
    for special in ("<pad>", "<s>", "</s>", "<unk>"):
        assert mask[vocab[special]], special
    # Byte-level spellings of punctuation: 'Ġ,' is " ,", '",' a quote plus a comma.
    for piece in ("Ġ,", ",", ".", '"', ":", "Ġ(", "?"):
        if piece in vocab:
            assert mask[vocab[piece]], piece
    assert mask[vocab['",']] if '",' in vocab else True
    # Action symbols and words are not skip tokens.
    for text in ("+", "-", "thoughts", "action", "3", "right"):
        for i in hf.encode(text, add_special_tokens=False):
            assert not mask[i], (text, hf.convert_ids_to_tokens(i))
    # Encoding the reference's list yields only skip ids.
    for text in ('[]', '()', '{', '}', '{}', ':', '""', "'", ',', '!', '?', ';', '_', '.'):
        ids = hf.encode(text, add_special_tokens=False)
        assert ids and all(mask[i] for i in ids), text
    padded = skip_token_mask(hf, vocab_size=len(hf) + 5)
    assert padded.shape == (len(hf) + 5,) and not padded[-5:].any()
    np.testing.assert_array_equal(padded[:len(hf)], mask)
