"""Sampler and scorer: greedy == transformers generate, sampler log-probs == scorer log-probs,
no recompilation, EOS handling, differentiability inside a caller's jit/grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax import sampling
from coso_jax.models import ValueHead, from_pretrained
from coso_jax.models.llama import random_init

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS = 256, 0, 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, our model, value head) for one tiny random Llama."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD, attn_implementation="eager")
    torch_model = transformers.LlamaForCausalLM(cfg).eval()
    torch_model.save_pretrained(path)
    head = random_init(lambda: ValueHead.tiny(64, rngs=nnx.Rngs(0)), seed=1, scale=0.1)
    return torch_model, from_pretrained(path), head


def prompts(batch=4, length=8, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int32)
    for row, pad in enumerate([3, 0, 5, 1][:batch]):
        mask[row, :pad] = 0
    return ids * mask, mask


def hf_greedy(torch_model, ids, mask, max_new_tokens, eos_id):
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                                   pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers_generate_with_eos(models):
    torch_model, model, head = models
    ids, mask = prompts()
    n = 10
    # Use a token that row 1 emits at step 3 as EOS, so some rows stop early and others do not.
    eos = int(hf_greedy(torch_model, ids, mask, n, eos_id=VOCAB + 7)[1, 3])
    ref = hf_greedy(torch_model, ids, mask, n, eos_id=eos)
    out = sampling.sample(model, head, ids, mask, jax.random.key(0), max_new_tokens=n, temperature=1.0,
                          eos_id=eos, pad_id=PAD, greedy=True)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    assert np.all(tokens[:, ref.shape[1]:] == PAD)
    lengths, tok_mask = np.asarray(out.lengths), np.asarray(out.mask)
    assert lengths[1] <= 4 and lengths.max() > lengths.min()  # row 1 stops early, others run on
    for row in range(len(ids)):
        hit = np.flatnonzero(tokens[row] == eos)
        assert lengths[row] == (hit[0] + 1 if hit.size else n)
        np.testing.assert_array_equal(tok_mask[row], np.arange(n) < lengths[row])
    assert np.all(np.asarray(out.logprobs)[~tok_mask] == 0) and np.all(np.asarray(out.logprobs)[tok_mask] < 0)


def test_sampler_logprobs_equal_scorer(models):
    _, model, head = models
    ids, mask = prompts(seed=1)
    out = sampling.sample(model, head, ids, mask, jax.random.key(3), max_new_tokens=12, temperature=0.7,
                          top_p=0.9, eos_id=5, pad_id=PAD)
    scored = sampling.score(model, head, ids, mask, out.tokens, out.mask, temperature=0.7)
    m = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(out.logprobs), atol=1e-4)
    np.testing.assert_allclose(np.asarray(scored.values), np.asarray(out.values), atol=1e-5)
    ent = np.asarray(scored.entropies)
    assert np.all(ent[m] > 0) and np.all(ent[~m] == 0)
    assert np.all(ent[m] <= np.log(VOCAB) + 1e-5)


@pytest.mark.parametrize("top_p, temperature", [(1.0, 1.0), (0.8, 0.6)])
def test_sampled_entropies_equal_scorer_entropies(models, top_p, temperature):
    """`SampleOutput.entropies` are the teacher-forced entropies of the sampled tokens (before top-p),
    so the trainer needs no second forward pass for them; 0 past each row's end."""
    _, model, head = models
    ids, mask = prompts(seed=7)
    # EOS = a frequent-enough token so some rows stop early and leave padded positions.
    out = sampling.sample(model, head, ids, mask, jax.random.key(11), max_new_tokens=10, temperature=temperature,
                          top_p=top_p, eos_id=7, pad_id=PAD)
    scored = sampling.score(model, head, ids, mask, out.tokens, out.mask, temperature=temperature)
    m = np.asarray(out.mask)
    ent = np.asarray(out.entropies)
    assert ent.shape == m.shape and ent.dtype == np.float32
    np.testing.assert_allclose(ent[m], np.asarray(scored.entropies)[m], atol=1e-5, rtol=0)
    assert np.all(ent[~m] == 0) and np.all(ent[m] > 0)
    # Same for the pure function under a caller's jit, greedy, with an EOS that row 1 emits at step 2
    # (so some rows stop early and leave padded positions).
    greedy = nnx.jit(lambda mdl, i, k, r, eos: sampling.sample_fn(mdl, None, i, k, r, max_new_tokens=6,
                                                                  temperature=temperature, eos_id=eos,
                                                                  pad_id=PAD, greedy=True))
    args = (model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    eos = int(greedy(*args, VOCAB + 1).tokens[1, 2])
    g = greedy(*args, eos)
    scored = sampling.score(model, None, ids, mask, g.tokens, g.mask, temperature=temperature)
    gm = np.asarray(g.mask)
    assert (~gm).any()
    np.testing.assert_allclose(np.asarray(g.entropies)[gm], np.asarray(scored.entropies)[gm], atol=1e-5, rtol=0)
    assert np.all(np.asarray(g.entropies)[~gm] == 0)


def test_generate_fn_returns_named_fields(models):
    _, model, _ = models
    ids, mask = prompts(batch=2, seed=8)
    cache, last_logits, _, next_positions = sampling.prefill_fn(model, None, jnp.asarray(ids), jnp.asarray(mask),
                                                                max_new_tokens=3)
    out = sampling.generate_fn(model, cache, last_logits, next_positions, jax.random.key(0), max_new_tokens=3,
                               temperature=1.0, eos_id=-1, pad_id=PAD)
    assert isinstance(out, sampling.GenerateOutput)
    # The first five fields keep the order of the tuple generate_fn returned before.
    tokens, logprobs, tok_mask, lengths, _ = out[:5]
    assert tokens.shape == logprobs.shape == tok_mask.shape == out.entropies.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(lengths), [3, 3])


def test_no_recompilation_across_calls(models):
    _, model, head = models
    ids, mask = prompts(seed=2)
    kw = dict(max_new_tokens=6, eos_id=2, pad_id=PAD)
    sampling.sample(model, head, ids, mask, jax.random.key(0), temperature=1.0, **kw)
    sampling.score(model, head, ids, mask, np.zeros((4, 6), np.int32), np.ones((4, 6), bool), temperature=1.0)
    before = sampling.compile_counts()
    # New rng, temperature, top-p and EOS id: all traced values, so nothing recompiles.
    out = sampling.sample(model, head, ids + 1, mask, jax.random.key(1), temperature=0.3, top_p=0.5,
                          max_new_tokens=6, eos_id=7, pad_id=PAD)
    sampling.score(model, head, ids, mask, out.tokens, out.mask, temperature=0.3)
    assert sampling.compile_counts() == before
    # A new shape does trace again (and is counted).
    sampling.score(model, head, ids[:2], mask[:2], np.zeros((2, 6), np.int32), np.ones((2, 6), bool),
                   temperature=1.0)
    assert sampling.compile_counts()["score"] == before["score"] + 1


def test_tiny_top_p_is_greedy_and_all_rows_stop(models):
    _, model, _ = models
    ids, mask = prompts(seed=3)
    greedy = sampling.sample(model, None, ids, mask, jax.random.key(0), max_new_tokens=8, temperature=1.0,
                             eos_id=VOCAB + 1, pad_id=PAD, greedy=True)
    nucleus = sampling.sample(model, None, ids, mask, jax.random.key(5), max_new_tokens=8, temperature=1.0,
                              top_p=1e-6, eos_id=VOCAB + 1, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))
    assert np.all(np.asarray(greedy.values) == 0)  # no value head
    # Identical rows with EOS = their 2nd token: every row stops after 2 tokens (the loop exits early).
    same_ids, same_mask = np.repeat(ids[1:2], 3, 0), np.repeat(mask[1:2], 3, 0)
    first = sampling.sample(model, None, same_ids, same_mask, jax.random.key(0), max_new_tokens=8,
                            temperature=1.0, eos_id=VOCAB + 1, pad_id=PAD, greedy=True)
    eos = int(first.tokens[0, 1])
    if eos in np.asarray(first.tokens[0, :1]):
        pytest.skip("degenerate random model: EOS candidate repeats")
    out = sampling.sample(model, None, same_ids, same_mask, jax.random.key(0), max_new_tokens=8, temperature=1.0,
                          eos_id=eos, pad_id=PAD, greedy=True)
    assert np.all(np.asarray(out.lengths) == 2) and np.all(np.asarray(out.tokens)[:, 2:] == PAD)


class _Policy(nnx.Module):
    def __init__(self, policy, value_head):
        self.policy, self.value_head = policy, value_head


def test_score_fn_differentiable_inside_callers_jit(models):
    _, model, head = models
    ids, mask = prompts(seed=4)
    resp = np.random.RandomState(0).randint(3, VOCAB, (4, 5))
    resp_mask = np.arange(5)[None] < np.array([[5], [2], [4], [1]])
    graphdef, params = nnx.split(_Policy(model, head), nnx.Param)

    def loss(params, remat):
        m = nnx.merge(graphdef, params)
        out = sampling.score_fn(m.policy, m.value_head, ids, mask, resp, resp_mask, temperature=0.5, remat=remat)
        return -jnp.sum(out.logprobs) + jnp.sum(out.values ** 2) - 0.1 * jnp.sum(out.entropies)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g, g_remat = grad(params, False), grad(params, True)
    leaves = jax.tree.leaves(g)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert np.abs(np.asarray(g["value_head"]["layers"][0]["kernel"])).max() > 0
    assert np.abs(np.asarray(g["policy"]["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"])).max() > 0
    for a, b in zip(leaves, jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_pure_functions_under_nnx_jit_match_wrappers(models):
    _, model, head = models
    ids, mask = prompts(seed=5)
    sample = nnx.jit(lambda m, v, i, k, r: sampling.sample_fn(m, v, i, k, r, max_new_tokens=5, temperature=1.0,
                                                              eos_id=2, pad_id=PAD, greedy=True))
    a = sample(model, head, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    b = sampling.sample(model, head, ids, mask, jax.random.key(0), max_new_tokens=5, temperature=1.0, eos_id=2,
                        pad_id=PAD, greedy=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    # Teacher-forced log-probs by hand, from the HF-equivalent forward.
    scored = sampling.score(model, head, ids, mask, b.tokens, b.mask, temperature=2.0)
    full_ids = jnp.concatenate([jnp.asarray(ids), b.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), b.mask.astype(jnp.int32)], 1)
    logits = nnx.jit(lambda m, x, y: m(x, y))(model, full_ids, full_mask)[:, ids.shape[1] - 1:-1] / 2.0
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits), b.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(jnp.where(b.mask, ref, 0)), atol=1e-5)


def test_input_errors(models):
    _, model, head = models
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.sample(model, head, np.ones((1, 3)), np.ones((1, 3)), jax.random.key(0), max_new_tokens=0,
                        temperature=1.0, eos_id=2, pad_id=0)
    with pytest.raises(ValueError, match="response_ids"):
        sampling.score(model, head, np.ones((2, 3)), np.ones((2, 3)), np.ones((1, 3)), np.ones((1, 3)),
                       temperature=1.0)


def test_top_p_filter_matches_sorted_definition():
    rs = np.random.RandomState(0)
    logits = rs.standard_normal((6, 50)).astype(np.float32) * 3
    for top_p in (0.05, 0.5, 0.9, 0.999):
        got = np.isfinite(np.asarray(jax.jit(sampling._top_p_filter)(jnp.asarray(logits), jnp.float32(top_p))))
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        for row in range(len(logits)):
            order = np.argsort(-probs[row])
            mass_before = np.cumsum(probs[row][order]) - probs[row][order]
            want = np.zeros(50, bool)
            want[order[mass_before < top_p]] = True
            np.testing.assert_array_equal(got[row], want)


def test_inverse_cdf_categorical_frequencies():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05, 0.0]]))  # last token: -inf, never drawn
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling._categorical(k, logits)[0]))(keys))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05, 0.0], atol=0.015)


def test_models_without_logits_slice_are_supported():
    """A policy model whose `decode` lacks the optional `logits_slice` keyword still works."""
    from coso_jax.models import CausalLM, DecoderConfig

    class PlainDecode(CausalLM):
        def decode(self, inputs_embeds, attention_mask, positions, cache=None, *, remat=False):
            return super().decode(inputs_embeds, attention_mask, positions, cache, remat=remat)

    cfg = DecoderConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1)
    plain = random_init(lambda: PlainDecode(cfg, rngs=nnx.Rngs(0)))
    sliced = random_init(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))  # same structure -> same weights
    ids, mask = prompts(batch=2, length=5, seed=6)
    ids = ids % 64
    kw = dict(max_new_tokens=3, temperature=1.0, eos_id=-1, pad_id=PAD, greedy=True)
    a = sampling.sample(plain, None, ids, mask, jax.random.key(0), **kw)
    b = sampling.sample(sliced, None, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-6)


def test_fused_vocabulary_pass_matches_numpy_and_its_finite_differences():
    """The scorer's one-pass log-prob/entropy (custom VJP) against float64 NumPy: values, and gradients
    from central differences; banned (-inf) logits get probability 0 and exactly zero gradient."""
    rs = np.random.RandomState(0)
    logits = rs.normal(size=(3, 4, 11)) * 2.0
    logits[..., 7] = -np.inf  # a banned token
    logits[1, 2, :5] = -np.inf  # a row filtered down to a few tokens
    tokens = rs.randint(0, 5, (3, 4))
    tokens[1, 2] = 6
    g_logp, g_ent = rs.normal(size=(3, 4)), rs.normal(size=(3, 4))

    def objective(s):
        z = s - s.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        p = np.exp(logp)
        ent = -np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0).sum(-1)
        tok = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        return tok, ent, float((g_logp * tok).sum() + (g_ent * ent).sum())

    want_logp, want_ent, _ = objective(logits)
    fn = jax.jit(sampling._token_logprobs_and_entropies)
    got_logp, got_ent = fn(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got_logp), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_ent), want_ent, rtol=1e-5, atol=1e-5)

    grad = jax.jit(jax.grad(lambda s: jnp.sum(jnp.asarray(g_logp, jnp.float32) * fn(s, jnp.asarray(tokens))[0])
                            + jnp.sum(jnp.asarray(g_ent, jnp.float32) * fn(s, jnp.asarray(tokens))[1])))
    got = np.asarray(grad(jnp.asarray(logits, jnp.float32)))
    assert np.isfinite(got).all() and (got[np.isinf(logits)] == 0.0).all()
    eps, want = 1e-6, np.zeros_like(logits)
    for idx in zip(*np.nonzero(np.isfinite(logits))):
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        want[idx] = (objective(up)[2] - objective(down)[2]) / (2 * eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
