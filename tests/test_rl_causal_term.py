"""The soft-RL term (coso_jax/rl/causal_term.py): each algo's entropy weights against a plain
computation, the classifier's online step, its replay and checkpoint state, and one compile for every
classifier of the same structure. The fused online update against today's computation: its dropout
masks are jax's, bit for bit; its length-bucketed gradient is the padded batch's; its epochs equal a
sequence of `classifier_step` calls on the same rows; `update_classifier` equals the plain loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from coso_jax.causal import classifier as clf
from coso_jax.causal import skip_token_mask
from coso_jax.envs.gym_cards import demos as gym_cards_demos
from coso_jax.rl import causal_term as causal_term_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.causal_term import (
    CausalTerm,
    classifier_step,
    classifier_update,
    dropout_keep,
    epoch_gradients,
    plan_update,
    update_buckets,
    weight_statistics,
)
from coso_jax.rl.config import CausalConfig
from coso_jax.tokenizer import build_bpe

N = 56


@pytest.fixture(scope="module")
def answers():
    records = list(gym_cards_demos.generate("NumberLine", 8, 0, 0.0))
    tokenizer = build_bpe([r["prompt"] for r in records] + [r["answer"] for r in records], 400)
    texts = [r["answer"] for r in records][:12]
    tokens, mask = sft_lib.encode_answers(tokenizer, texts, N)
    labels = np.array([0 if '"-"' in t else 1 for t in texts], np.int32)
    return tokenizer, tokens, mask, labels


def _term(algo, tokenizer, answers_, seed=0, **causal):
    _, tokens, mask, labels = answers_
    classifier = clf.CausalClassifier(clf.ClassifierConfig.tiny(len(tokenizer), 2, max_positions=64),
                                      rngs=nnx.Rngs(seed))
    config = CausalConfig(**{"alpha": 0.2, "batch": 16, "epochs": 2, "lr": 1e-3, **causal})
    return CausalTerm(algo, config, classifier, tokenizer, N, seed=0, demonstrations=(tokens, mask, labels))


def _loop_weights(term, tokens, mask, labels, valid):
    """CoSo's weights literally (paper Sec. 4.1; docs/design.md steps 3-4): per valid row, p0 = P(label), each
    non-skip position's window of `window` tokens replaced by the mask token, |p0 - p|, then
    sqrt((e - min) / (max - min + 1e-10)) over the row's scored positions."""
    logits = jax.jit(term.logits_fn())
    skip = skip_token_mask(term.tokenizer, vocab_size=term.classifier.config.vocab_size)
    out = np.zeros(tokens.shape, np.float32)
    for b in range(len(tokens)):
        if not valid[b] or labels[b] < 0:
            continue
        row, row_mask = tokens[b:b + 1], mask[b:b + 1]
        p0 = float(jax.nn.softmax(logits(row, row_mask)[0])[labels[b]])
        scored = mask[b] & ~skip[tokens[b]]
        effects = np.zeros(tokens.shape[1])
        for i in np.flatnonzero(scored):
            ablated = row.copy()
            for o in range(term.config.window):
                ablated[0, min(i + o, tokens.shape[1] - 1)] = term.mask_token_id
            effects[i] = abs(p0 - float(jax.nn.softmax(logits(ablated, row_mask)[0])[labels[b]]))
        e = np.where(scored, effects, 0.0)
        out[b] = np.where(scored, np.sqrt((e - e.min()) / (e.max() - e.min() + 1e-10)), 0.0)
    return out


def test_weights_of_each_algo(answers):
    tokenizer, tokens, mask, labels = answers
    valid = np.ones(len(tokens), bool)
    valid[2] = False  # an unparseable answer: no bonus, whatever the algo
    labels = labels.copy()
    labels[5] = -1  # a valid text without an action type
    none = _term("none", tokenizer, answers)
    np.testing.assert_array_equal(none.weights(tokens, mask, labels, valid), 0.0)
    assert none.alpha == 0.0 and none.checkpoint_items() == {} and none.update_classifier(jax.random.key(0)) == {}
    entropy = _term("entropy", tokenizer, answers)
    np.testing.assert_array_equal(entropy.weights(tokens, mask, labels, valid), mask.astype(np.float32))
    assert entropy.alpha == 0.2
    coso = _term("coso", tokenizer, answers)
    got = coso.weights(tokens, mask, labels, valid)
    np.testing.assert_allclose(got, _loop_weights(coso, tokens, mask, labels, valid), atol=2e-5)
    assert not got[2].any() and not got[5].any()
    assert got[0].max() == pytest.approx(1.0, abs=1e-5)  # min-max normalised per row
    with pytest.raises(ValueError, match="algo must be one of"):
        _term("sac", tokenizer, answers)


def test_classifier_update_replay_and_checkpoint_state(answers):
    tokenizer, tokens, mask, labels = answers
    coso = _term("coso", tokenizer, answers)
    assert coso.replay.size == len(tokens)  # seeded with the demonstrations
    coso.observe(tokens[:4], mask[:4], np.array([0, -1, 1, 1]), np.array([True, True, False, True]))
    assert coso.replay.size == len(tokens) + 2  # only valid, labelled rows
    before = [np.asarray(x) for x in jax.tree.leaves(coso.params)]
    record = coso.update_classifier(jax.random.key(0))
    assert set(record) == {"causal/loss", "causal/accuracy"} and np.isfinite(record["causal/loss"])
    assert any(np.abs(a - np.asarray(b)).max() > 0 for a, b in zip(before, jax.tree.leaves(coso.params)))
    items, meta = coso.checkpoint_items(), coso.checkpoint_metadata()
    other = _term("coso", tokenizer, answers, seed=5)
    other.restore(jax.tree.map(np.asarray, items), meta)
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(coso.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(other.replay.sample(5), coso.replay.sample(5)):
        np.testing.assert_array_equal(a, b)
    weights, record = coso.step(jax.random.key(1), tokens, mask, labels, np.ones(len(tokens), bool))
    assert {"causal/weight_mean", "causal/frac_above_0.8", "causal/frac_below_0.2"} <= set(record)
    rows = coso.heatmap(tokens, mask, np.ones(len(tokens), bool), weights, rows=3)
    assert len(rows.tokens) == 3 and len(rows.tokens[0]) == int(mask[0].sum()) == len(rows.weights[0])


def test_weight_statistics():
    w = np.array([[0.9, 0.1, 0.5, 0.0], [1.0, 0.05, 0.0, 0.0]])
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    stats = weight_statistics(w, m)
    assert stats["causal/weight_mean"] == pytest.approx(np.mean([0.9, 0.1, 0.5, 1.0, 0.05]))
    assert stats["causal/frac_above_0.8"] == pytest.approx(2 / 5) and stats["causal/frac_below_0.2"] == pytest.approx(2 / 5)
    assert weight_statistics(w, np.zeros_like(m)) == {}


def test_one_classifier_update_program_serves_every_classifier(answers):
    tokenizer, tokens, mask, labels = answers
    first = _term("coso", tokenizer, answers, seed=1)
    first.update_classifier(jax.random.key(0))
    size = classifier_update._cache_size()
    first.update_classifier(jax.random.key(1))  # the next iteration: other rows, same program
    for seed in (2, 3):  # new classifiers, same structure: no new program
        _term("coso", tokenizer, answers, seed=seed).update_classifier(jax.random.key(seed))
    assert classifier_update._cache_size() == size
    tokens_, mask_, labels_ = first.replay.sample(4)
    first.params, first.opt_state, _, _ = classifier_step(first.graphdef, first.params, first.opt_state, tokens_,
                                                          mask_, labels_, jax.random.key(0), learning_rate=1e-3)
    size = classifier_step._cache_size()
    other = _term("coso", tokenizer, answers, seed=4)
    classifier_step(other.graphdef, other.params, other.opt_state, tokens_, mask_, labels_, jax.random.key(1),
                    learning_rate=1e-3)
    assert classifier_step._cache_size() == size


# ----------------------------------------------------------------------------------------------
# The fused update against today's computation
# ----------------------------------------------------------------------------------------------
def _rows(seed, epochs, batch, length, vocab, min_len=1):
    """Padded batches [E, B, L] of rows of every length (prefix masks, garbage past the mask)."""
    rs = np.random.RandomState(seed)
    lengths = rs.randint(min_len, length + 1, (epochs, batch))
    mask = np.arange(length) < lengths[..., None]
    tokens = rs.randint(0, vocab, (epochs, batch, length)).astype(np.int32)
    return tokens, mask, rs.randint(0, 3, (epochs, batch)).astype(np.int32)


def _classifier(vocab=60, length=24, seed=0, **overrides):
    cfg = clf.ClassifierConfig.tiny(vocab, 3, max_positions=length, **overrides)
    return nnx.split(clf.CausalClassifier(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def test_dropout_masks_are_jax_bernoulli_bit_for_bit():
    key = jax.random.fold_in(jax.random.key(7), 3)
    full = (9, 2, 12, 12)
    expected = np.asarray(jax.random.bernoulli(key, 0.9, full))
    rows = jnp.array([4, 0, 8], jnp.int32)
    counts = causal_term_lib._flat_counts(rows, full, (2, 7, 7))
    got = np.asarray(jax.jit(dropout_keep, static_argnums=2)(key, counts, 0.1))
    np.testing.assert_array_equal(got, expected[np.asarray(rows)][:, :, :7, :7])
    bits = causal_term_lib.threefry_bits(key, jnp.arange(1000, dtype=jnp.uint32))
    np.testing.assert_array_equal(np.asarray(bits), np.asarray(jax.random.bits(key, (1000,), jnp.uint32)))


def test_update_buckets():
    assert update_buckets(48) == (8, 16, 24, 32, 40, 48)
    assert update_buckets(56) == (16, 32, 48, 56)
    assert update_buckets(256) == (48, 96, 144, 192, 240, 256)
    assert update_buckets(5) == (5,)


def test_plan_update_sorts_rows_into_length_buckets():
    tokens, mask, labels = _rows(0, 2, 21, 40, 60)
    buckets = update_buckets(40)
    plan = plan_update(tokens, mask, labels, chunk=8, buckets=buckets)
    assert plan["tokens"].shape == (2, 24, 40) and plan["branches"].shape == (2, 3)
    for e in range(2):
        rows = plan["rows"][e]
        assert sorted(rows[rows >= 0]) == list(range(21)) and (rows[21:] == -1).all()
        np.testing.assert_array_equal(plan["mask"][e, :21], mask[e, rows[:21]])
        np.testing.assert_array_equal(plan["labels"][e, :21], labels[e, rows[:21]])
        assert not plan["mask"][e, 21:].any()
        extent = plan["mask"][e].sum(-1).reshape(3, 8)
        lengths = np.asarray(buckets)[plan["branches"][e]]
        assert (extent.max(1) <= lengths).all()  # every chunk fits its bucket ...
        smaller = np.asarray([buckets[max(b - 1, 0)] for b in plan["branches"][e]])
        assert ((extent.max(1) > smaller) | (plan["branches"][e] == 0)).all()  # ... the smallest that does


def test_bucketed_gradient_equals_the_padded_batch():
    """Pad invariance: the gradient over length-bucketed chunks is the padded batch's (same dropout)."""
    graphdef, params = _classifier()
    batch, chunk = 37, 8  # 5 chunks, the last with 3 empty slots
    tokens, mask, labels = _rows(1, 1, batch, 24, 60)
    key = jax.random.key(11)
    buckets = update_buckets(24)

    def padded(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(tokens[0]), jnp.asarray(mask[0]), dropout_key=key)
        loss = clf.cross_entropy_loss(logits, jnp.asarray(labels[0]))
        return loss, jnp.mean((logits.argmax(-1) == labels[0]).astype(jnp.float32))

    (loss, acc), expected = jax.jit(jax.value_and_grad(padded, has_aux=True))(params)
    plan = plan_update(tokens, mask, labels, chunk=chunk, buckets=buckets)
    fn = jax.jit(lambda p, *a: epoch_gradients(graphdef, p, *a, key, batch=batch, buckets=buckets, chunk=chunk))
    grads, got_loss, got_acc = fn(params, *(plan[k][0] for k in ("tokens", "mask", "labels", "rows", "branches")))
    assert float(got_loss) == pytest.approx(float(loss), rel=1e-5) and float(got_acc) == pytest.approx(float(acc))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(grads)):
        scale = float(jnp.abs(a).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


def test_fused_update_equals_a_sequence_of_classifier_steps():
    """Two epochs of `classifier_update` = two `classifier_step` calls on the same rows and keys."""
    graphdef, params = _classifier(seed=3)
    lr, batch = 3e-3, 45
    opt_state = optax.adam(lr).init(params)
    tokens, mask, labels = _rows(2, 2, batch, 24, 60, min_len=1)
    key = jax.random.key(5)
    p, o, expected = params, opt_state, []
    for e in range(2):
        p, o, loss, acc = classifier_step(graphdef, p, o, tokens[e], mask[e], labels[e], jax.random.fold_in(key, e),
                                          learning_rate=lr)
        expected.append((float(loss), float(acc)))
    buckets = update_buckets(24)
    plan = plan_update(tokens, mask, labels, chunk=16, buckets=buckets)
    got_p, got_o, losses, accs = classifier_update(graphdef, params, opt_state, plan["tokens"], plan["mask"],
                                                   plan["labels"], plan["rows"], plan["branches"], key,
                                                   learning_rate=lr, batch=batch, buckets=buckets, chunk=16)
    np.testing.assert_allclose(np.asarray(losses), [loss for loss, _ in expected], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(accs), [a for _, a in expected], rtol=1e-6)
    # Adam's first steps are ~lr * sign(g): a gradient that the float order moves by 1e-7 near 0 moves its
    # parameter by a small fraction of lr.
    for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((got_p, got_o))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=lr * 1e-2)


def test_update_classifier_equals_the_plain_loop(answers, monkeypatch):
    """The trainer's entry point: the fused update and today's loop give the same classifier, record and
    replay state from the same replay."""
    tokenizer, tokens, mask, labels = answers
    fused, plain = _term("coso", tokenizer, answers), _term("coso", tokenizer, answers)
    for term in (fused, plain):
        term.observe(tokens[:5], mask[:5], labels[:5], np.ones(5, bool))
    records = [fused.update_classifier(jax.random.key(9))]
    monkeypatch.setattr(causal_term_lib, "fused_update_applies", lambda *a: False)
    records.append(plain.update_classifier(jax.random.key(9)))
    assert records[0]["causal/loss"] == pytest.approx(records[1]["causal/loss"], rel=1e-5)
    assert records[0]["causal/accuracy"] == pytest.approx(records[1]["causal/accuracy"])
    for a, b in zip(jax.tree.leaves((plain.params, plain.opt_state)), jax.tree.leaves((fused.params, fused.opt_state))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)
    assert fused.replay.rng.bit_generator.state == plain.replay.rng.bit_generator.state


def test_fused_update_falls_back_where_it_cannot_reproduce_dropout(answers):
    tokenizer, *_ = answers
    coso = _term("coso", tokenizer, answers)
    assert causal_term_lib.fused_update_applies(coso.classifier, jax.random.key(0), 1024, N)
    assert not causal_term_lib.fused_update_applies(coso.classifier, jax.random.key(0, impl="rbg"), 1024, N)
    assert not causal_term_lib.fused_update_applies(coso.classifier, jax.random.key(0), 2 ** 22, N)
