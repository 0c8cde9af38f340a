"""Masked and zero-probability slots carry no weight, whatever they hold (issue #15, item 6).

NaN / +inf / -inf are planted in masked-out slots and -inf in logits (banned tokens) across the
public functions of ``losses``, the sampler's log-prob / entropy helpers and scorer, and
``causal``; values are compared with plain NumPy written here (float64, masked slots dropped by
boolean indexing) and gradients must be finite (and exactly 0 at masked slots). Property style:
plain loops over numpy seeds (no hypothesis).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax import losses, sampling
from coso_jax.causal import causal_weights, counterfactual_effects
from coso_jax.causal.classifier import (
    CausalClassifier,
    ClassifierConfig,
    cross_entropy_loss,
    logits_fn,
    make_optimizer,
    make_train_step,
)

NAN, INF = np.nan, np.inf
GARBAGE = np.array([NAN, INF, -INF], np.float32)
SEEDS = range(8)
B, T, V = 4, 6, 7


def plant(rng, x, mask):
    """``x`` with NaN/+inf/-inf drawn at random into every slot where ``mask`` is False."""
    x = np.array(x, np.float32, copy=True)
    x[~mask] = rng.choice(GARBAGE, size=int((~mask).sum()))
    return x


def random_mask(rng, shape, p=0.7):
    mask = rng.random(shape) < p
    if len(shape) > 1:
        mask[-1] = False  # an all-masked row
    mask.flat[0] = True  # and at least one kept slot
    return mask


def assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


# ---------------------------------------------------------------------------------------------
# NumPy references (written here; never our own code path).
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def np_entropy_floor(logits_row):
    """The reference's -sum p log max(p, 1e-10) of one distribution; p = 0 terms dropped."""
    p = np.exp(np_log_softmax(logits_row))
    p = p[p > 0]
    return float(-(p * np.log(np.maximum(p, 1e-10))).sum())


def np_entropy(logits_row):
    """-sum p log p over the tokens with p > 0 (a -inf logit contributes nothing)."""
    logp = np_log_softmax(logits_row)
    keep = np.isfinite(logp)
    return float(-(np.exp(logp[keep]) * logp[keep]).sum())


def np_masked_mean(values, mask):
    return float(np.asarray(values, np.float64)[mask].sum() / max(mask.sum(), 1))


def np_gae(rewards, values, dones, next_value, gamma, lam):
    adv = np.zeros(rewards.shape)
    last = np.zeros(next_value.shape)
    for t in reversed(range(len(rewards))):
        nv = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = ~dones[t]
        nv = np.where(nonterminal, nv, 0.0)  # a done's bootstrap value is never read
        delta = rewards[t] + gamma * nv - values[t]
        last = delta + gamma * lam * np.where(nonterminal, last, 0.0)
        adv[t] = last
    return adv, adv + values


# ---------------------------------------------------------------------------------------------
# The table, one assertion per row.
def test_table_normalise_advantages():
    got = losses.normalise_advantages(jnp.array([1.0, 2.0, NAN]), mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(got, [-1.0, 1.0, 0.0], rtol=1e-6)


def test_table_weighted_entropy():
    got = losses.weighted_entropy(jnp.array([[0.3, 0.7, NAN]]), None, jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(got, [0.5], rtol=1e-6)


def test_table_sequence_logprob():
    got = losses.sequence_logprob(jnp.array([[-0.5, -0.25, -INF]]), jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(got, [-0.75], rtol=1e-6)


def test_table_ppo_policy_loss():
    got = losses.ppo_policy_loss(jnp.array([-1.0, -2.0, -3.0]), jnp.array([-1.1, -1.9, -INF]),
                                 jnp.array([1.0, -1.0, 0.0]), 0.2, mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(got, -0.100167, atol=1e-6)
    expected = -(np.exp(0.1) - np.exp(-0.1)) / 2  # both ratios inside the clip range
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_table_value_loss():
    got = losses.value_loss(jnp.array([0.5, 0.1, 0.0]), jnp.array([0.4, 0.2, 0.0]),
                            jnp.array([1.0, 0.0, NAN]), 0.2, mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(got, 0.065, rtol=1e-5)


def test_table_filtered_pg_loss():
    got = losses.filtered_pg_loss(jnp.array([-1.0, -2.0, NAN]), jnp.array([1.0, 1.0, 1.0]),
                                  mask=jnp.array([1, 1, 0]))
    np.testing.assert_allclose(got, 1.5, rtol=1e-6)


def test_table_top_p_zero_keeps_the_top_token():
    filtered = np.asarray(sampling._top_p_filter(jnp.array([[0.0, 2.0, 0.0]]), 0.0))
    np.testing.assert_array_equal(filtered, [[-INF, 2.0, -INF]])
    for seed in range(20):
        assert int(sampling._categorical(jax.random.key(seed), jnp.asarray(filtered))[0]) == 1


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5, NAN])
def test_sample_rejects_top_p_outside_unit_interval(top_p):
    # Checked before the model is touched, so no model is needed.
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sampling.sample(None, None, np.ones((1, 2)), np.ones((1, 2)), jax.random.key(0),
                        max_new_tokens=1, temperature=1.0, top_p=top_p, eos_id=2, pad_id=0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.sample_fn(None, None, np.ones((1, 2)), np.ones((1, 2)), jax.random.key(0),
                           max_new_tokens=1, temperature=1.0, top_p=top_p, eos_id=2, pad_id=0)


# ---------------------------------------------------------------------------------------------
# losses: garbage in masked slots, -inf logits, values vs NumPy, finite gradients.
def test_losses_entropies_with_garbage_and_banned_logits():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
        banned = rng.random((B, T, V)) < 0.3
        banned[..., 0] = False  # every row keeps a finite logit
        logits[banned] = -INF
        mask = random_mask(rng, (B, T))
        # Masked positions hold garbage logits: NaN, inf, or all -inf.
        for b, t in zip(*np.nonzero(~mask)):
            logits[b, t] = rng.choice(GARBAGE)
        weights = plant(rng, rng.random((B, T)), mask)
        expected_h = np.zeros((B, T))
        for b, t in zip(*np.nonzero(mask)):
            expected_h[b, t] = np_entropy_floor(logits[b, t])
        h = losses.token_entropy(logits, mask)
        np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(h)[~mask] == 0)
        clean_w = np.where(mask, weights, 0.0)
        expected_causal = [np_masked_mean(expected_h[b] * clean_w[b], mask[b]) for b in range(B)]
        expected_naive = [np_masked_mean(expected_h[b], mask[b]) for b in range(B)]
        np.testing.assert_allclose(losses.causal_entropy(logits, weights, mask), expected_causal,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses.naive_entropy(logits, mask), expected_naive,
                                   rtol=1e-5, atol=1e-6)
        garbage_h = plant(rng, expected_h, mask)  # precomputed entropies with garbage at pads
        np.testing.assert_allclose(losses.weighted_entropy(garbage_h, weights, mask),
                                   expected_causal, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses.weighted_entropy(garbage_h, None, mask),
                                   expected_naive, rtol=1e-5, atol=1e-6)

        grad = np.asarray(jax.grad(lambda lg: losses.causal_entropy(lg, weights, mask).sum())(
            jnp.asarray(logits)))
        assert np.all(np.isfinite(grad)), seed
        assert np.all(grad[~mask] == 0) and np.all(grad[banned & mask[..., None]] == 0)
        grad_h = np.asarray(jax.grad(lambda h: losses.weighted_entropy(h, weights, mask).sum())(
            jnp.asarray(garbage_h)))
        assert np.all(np.isfinite(grad_h)) and np.all(grad_h[~mask] == 0)


def test_losses_sequence_logprob_and_advantages_with_garbage():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, (B, T))
        thought = rng.random((B, T)) < 0.5
        lp = plant(rng, -rng.random((B, T)) * 3, mask)
        lam = float(rng.random())
        clean = np.where(mask, lp, 0.0).astype(np.float64)
        expected = (clean * np.where(thought, lam, 1.0)).sum(-1)
        np.testing.assert_allclose(losses.sequence_logprob(lp, mask, thought, lam), expected,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses.sequence_logprob(lp, mask), clean.sum(-1), rtol=1e-5,
                                   atol=1e-6)
        g = np.asarray(jax.grad(lambda x: losses.sequence_logprob(x, mask, thought, lam).sum())(
            jnp.asarray(lp)))
        assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)

        flat_mask = mask.reshape(-1)
        adv = plant(rng, rng.normal(size=B * T) * 2 + 1, flat_mask)
        sel = adv[flat_mask].astype(np.float64)
        want = np.zeros(B * T)
        want[flat_mask] = (sel - sel.mean()) / (sel.std() + 1e-8)
        np.testing.assert_allclose(losses.normalise_advantages(adv, flat_mask), want, rtol=1e-4,
                                   atol=1e-5)
        g = np.asarray(jax.grad(lambda a: losses.normalise_advantages(a, flat_mask)[0])(
            jnp.asarray(adv)))
        assert np.all(np.isfinite(g)) and np.all(g[~flat_mask] == 0)


def test_losses_ppo_value_digirl_with_garbage():
    n = 12
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, (n,))
        lp = plant(rng, rng.normal(size=n) * 0.3 - 1, mask)
        old = plant(rng, rng.normal(size=n) * 0.3 - 1, mask)
        adv = plant(rng, rng.normal(size=n), mask)
        m = mask
        ratio = np.exp(lp[m].astype(np.float64) - old[m])
        want = -np.minimum(ratio * adv[m], np.clip(ratio, 0.8, 1.2) * adv[m]).sum() / max(m.sum(), 1)
        np.testing.assert_allclose(losses.ppo_policy_loss(lp, old, adv, 0.2, mask), want,
                                   rtol=1e-5, atol=1e-6)
        g = np.asarray(jax.grad(losses.ppo_policy_loss)(jnp.asarray(lp), old, adv, 0.2, mask))
        assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)

        v, v_old, ret = (plant(rng, rng.normal(size=n), mask) for _ in range(3))
        v64, old64, ret64 = (x[m].astype(np.float64) for x in (v, v_old, ret))
        clipped = old64 + np.clip(v64 - old64, -0.1, 0.1)
        want_v = 0.5 * np.maximum((v64 - ret64) ** 2, (clipped - ret64) ** 2).sum() / max(m.sum(), 1)
        np.testing.assert_allclose(losses.value_loss(v, v_old, ret, 0.1, mask), want_v,
                                   rtol=1e-5, atol=1e-6)
        want_plain = 0.5 * ((v64 - ret64) ** 2).sum() / max(m.sum(), 1)
        np.testing.assert_allclose(losses.value_loss(v, v_old, ret, None, mask), want_plain,
                                   rtol=1e-5, atol=1e-6)
        g = np.asarray(jax.grad(losses.value_loss)(jnp.asarray(v), v_old, ret, 0.1, mask))
        assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)

        # filtered PG: garbage log-probs at masked rows and at filtered (A <= 0) rows.
        keep = mask & (adv > 0)
        lp_f = plant(rng, lp, keep)
        want_f = -np.where(keep, lp_f, 0.0).astype(np.float64).sum() / max(m.sum(), 1)
        np.testing.assert_allclose(losses.filtered_pg_loss(lp_f, adv, mask), want_f, rtol=1e-5,
                                   atol=1e-6)
        g = np.asarray(jax.grad(losses.filtered_pg_loss)(jnp.asarray(lp_f), adv, mask))
        assert np.all(np.isfinite(g)) and np.all(g[~keep] == 0)

        logits = rng.normal(size=(n, 2)).astype(np.float32)
        logits[~mask] = rng.choice(GARBAGE, size=(int((~mask).sum()), 2))
        targets = rng.random(n) < 0.5
        logp = np_log_softmax(logits[m])
        want_c = -logp[np.arange(m.sum()), targets[m].astype(int)].sum() / max(m.sum(), 1)
        np.testing.assert_allclose(losses.binary_critic_loss(logits, targets, mask), want_c,
                                   rtol=1e-5, atol=1e-6)
        g = np.asarray(jax.grad(losses.binary_critic_loss)(jnp.asarray(logits), targets, mask))
        assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)


def test_losses_done_slots_carry_no_weight():
    t_len, n, gamma, lam = 5, 4, 0.9, 0.95
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        rewards = rng.normal(size=(t_len, n)).astype(np.float32)
        values = rng.normal(size=(t_len, n)).astype(np.float32)
        dones = rng.random((t_len, n)) < 0.3
        dones[-1, 0] = True
        # The value after a final done is never read: garbage there changes nothing.
        next_value = plant(rng, rng.normal(size=n), ~dones[-1])
        adv, ret = losses.gae(rewards, values, dones, next_value, gamma, lam)
        want_adv, want_ret = np_gae(rewards.astype(np.float64), values.astype(np.float64), dones,
                                    next_value.astype(np.float64), gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)

        d = rng.random(n) < 0.5
        nv = plant(rng, rng.normal(size=n), ~d)
        want_q = rewards[0] + gamma * np.where(d, 0.0, nv)
        np.testing.assert_allclose(losses.soft_q_target(rewards[0], d, nv, gamma), want_q,
                                   rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# sampling: -inf logits in the log-prob / entropy helper, the nucleus filter and the draw.
def test_sampling_logprobs_and_entropies_with_banned_logits():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
        banned = rng.random((B, T, V)) < 0.4
        banned[..., rng.integers(V)] = False
        logits[banned] = -INF
        logp, ent = sampling._logprobs_and_entropies(jnp.asarray(logits))
        want_logp = np_log_softmax(logits)
        np.testing.assert_allclose(np.asarray(logp)[~banned], want_logp[~banned], rtol=1e-5,
                                   atol=1e-5)
        assert np.all(np.asarray(logp)[banned] == -INF)
        want_ent = np.array([[np_entropy(logits[b, t]) for t in range(T)] for b in range(B)])
        np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
        g = np.asarray(jax.grad(lambda x: sampling._logprobs_and_entropies(x)[1].sum())(
            jnp.asarray(logits)))
        assert np.all(np.isfinite(g)) and np.all(g[banned] == 0)


def test_sampling_top_p_filter_never_empties_a_row():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(B, 20)).astype(np.float32) * 3
        banned = rng.random((B, 20)) < 0.3
        banned[:, 0] = False
        logits[banned] = -INF
        for top_p in (0.0, -1.0, 1e-7, 0.3 + 0.4 * float(rng.random())):
            got = np.isfinite(np.asarray(sampling._top_p_filter(jnp.asarray(logits),
                                                                jnp.float32(top_p))))
            probs = np.exp(np_log_softmax(logits))
            for row in range(B):
                order = np.argsort(-probs[row], kind="stable")
                mass_before = np.cumsum(probs[row][order]) - probs[row][order]
                want = np.zeros(20, bool)
                want[order[(mass_before < top_p) & (probs[row][order] > 0)]] = True
                want[probs[row] == probs[row].max()] = True  # the top token always stays
                np.testing.assert_array_equal(got[row], want, err_msg=f"{seed} {top_p}")
            draws = np.asarray(sampling._categorical(jax.random.key(seed),
                                                     jnp.where(got, logits, -INF)))
            assert np.all(got[np.arange(B), draws]), (seed, top_p)


# The scorer on a tiny model whose logits ban some tokens (-inf), with garbage ids in masked slots.
BANNED = (3, 11, 40)
VOCAB = 64


def _banned_lm():
    from coso_jax.models import CausalLM, DecoderConfig
    from coso_jax.models.llama import random_init

    class BannedLM(CausalLM):
        def logits(self, hidden):
            return super().logits(hidden).at[..., jnp.array(BANNED)].set(-jnp.inf)

    cfg = DecoderConfig.tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1)
    return random_init(lambda: BannedLM(cfg, rngs=nnx.Rngs(0)), scale=0.5)


class _Policy(nnx.Module):
    def __init__(self, policy):
        self.policy = policy


def test_scorer_with_banned_logits_and_garbage_in_masked_slots():
    model = _banned_lm()
    rng = np.random.default_rng(0)
    b, p, n = 3, 5, 4
    allowed = np.setdiff1d(np.arange(VOCAB), BANNED)
    prompt = rng.choice(allowed, (b, p)).astype(np.int32)
    prompt_mask = np.ones((b, p), np.int32)
    prompt_mask[0, :2] = 0  # left padding
    resp = rng.choice(allowed, (b, n)).astype(np.int32)
    resp_mask = np.arange(n)[None] < np.array([[4], [2], [0]])
    clean_prompt = np.where(prompt_mask > 0, prompt, 0)
    clean_resp = np.where(resp_mask, resp, 0)
    # Garbage ids in masked slots: out of range, negative, and banned (-inf logit) tokens.
    junk = np.array([-7, VOCAB + 9, 10 ** 6, BANNED[0]], np.int32)
    garbage_prompt = np.where(prompt_mask > 0, prompt, rng.choice(junk, (b, p)))
    garbage_resp = np.where(resp_mask, resp, rng.choice(junk, (b, n)))

    # Reference: the plain forward on clean ids, then log-softmax / entropy in NumPy.
    full_ids = jnp.asarray(np.concatenate([clean_prompt, clean_resp], 1))
    full_mask = jnp.asarray(np.concatenate([prompt_mask, resp_mask.astype(np.int32)], 1))
    logits = np.asarray(model(full_ids, full_mask))[:, p - 1:-1].astype(np.float64) / 0.7
    want_lp = np.zeros((b, n))
    want_h = np.zeros((b, n))
    for i, j in zip(*np.nonzero(resp_mask)):
        want_lp[i, j] = np_log_softmax(logits[i, j])[resp[i, j]]
        want_h[i, j] = np_entropy(logits[i, j])
    out = sampling.score(model, None, garbage_prompt, prompt_mask, garbage_resp, resp_mask,
                         temperature=0.7)
    np.testing.assert_allclose(out.logprobs, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.entropies, want_h, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out.entropies)[~resp_mask] == 0)

    graphdef, params = nnx.split(_Policy(model), nnx.Param)

    def loss(params):
        m = nnx.merge(graphdef, params)
        o = sampling.score_fn(m.policy, None, garbage_prompt, prompt_mask, garbage_resp, resp_mask,
                              temperature=0.7)
        return -o.logprobs.sum() - o.entropies.sum()

    assert_finite(jax.jit(jax.grad(loss))(params))

    # The sampler never draws a banned token and its log-probs stay finite.
    sample = sampling.sample(model, None, garbage_prompt, prompt_mask, jax.random.key(1),
                             max_new_tokens=4, temperature=1.0, top_p=0.8, eos_id=-1, pad_id=-3)
    tokens, mask = np.asarray(sample.tokens), np.asarray(sample.mask)
    assert not np.isin(tokens[mask], BANNED).any()
    assert_finite(sample.logprobs)
    # Its entropies (banned tokens add exactly 0) are finite and equal the scorer's on its tokens.
    assert_finite(sample.entropies)
    assert np.all(np.asarray(sample.entropies)[~mask] == 0)
    rescored = sampling.score(model, None, garbage_prompt, prompt_mask, sample.tokens, sample.mask,
                              temperature=1.0)
    np.testing.assert_allclose(np.asarray(sample.entropies)[mask], np.asarray(rescored.entropies)[mask],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# causal: counterfactual effects / causal weights / the classifier with garbage in padding.
UNK, NUM_LABELS, CVOCAB = 1, 3, 12


def _bag_params():
    rs = np.random.default_rng(42)
    return rs.normal(size=(CVOCAB, 5)).astype(np.float32), rs.normal(size=(5, NUM_LABELS)).astype(
        np.float32) * 2


def _bag_logits_fn(tokens, mask):
    """A pad-invariant toy classifier: tanh(masked mean of embeddings) @ head, selecting pads."""
    embed, head = _bag_params()
    valid = mask > 0
    h = jnp.asarray(embed)[jnp.where(valid, tokens, 0)]
    pooled = jnp.where(valid[..., None], h, 0.0).sum(1) / jnp.maximum(valid.sum(1), 1)[:, None]
    return jnp.tanh(pooled) @ jnp.asarray(head)


def np_bag_effects(tokens, valid, labels, window, skip):
    embed, head = _bag_params()

    def prob(row, row_valid, label):
        pooled = embed[row[row_valid]].astype(np.float64).mean(0)
        logits = np.tanh(pooled) @ head
        return np.exp(np_log_softmax(logits))[label]

    batch, length = tokens.shape
    effects = np.zeros((batch, length))
    for r in range(batch):
        if not (valid[r] & ~skip[r]).any():
            continue
        p0 = prob(tokens[r], valid[r], labels[r])
        for i in range(length):
            if valid[r, i] and not skip[r, i]:
                ablated = tokens[r].copy()
                ablated[i:min(i + window, length)] = UNK
                effects[r, i] = abs(p0 - prob(ablated, valid[r], labels[r]))
    return effects


def test_counterfactual_effects_ignore_garbage_padding():
    skip_vocab = np.zeros(CVOCAB, bool)
    skip_vocab[[2, 5]] = True
    b, length = 5, 9
    for seed in range(4):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(2, CVOCAB, (b, length)).astype(np.int32)
        valid = np.arange(length)[None] < rng.integers(1, length + 1, (b, 1))
        valid[-1] = False  # an all-padding row: its label is never read
        labels = rng.integers(0, NUM_LABELS, b)
        labels[-1] = -1
        # Padding holds ids outside the vocabulary (and outside the skip mask's range).
        garbage = np.where(valid, tokens, rng.choice([-5, CVOCAB + 3, 10 ** 6], (b, length)))
        want = np_bag_effects(tokens, valid, labels, 3, skip_vocab[np.where(valid, tokens, 0)])
        assert want.max() > 1e-3
        for pad_invariant in (True, False):
            got = counterfactual_effects(_bag_logits_fn, garbage, valid, labels, window=3,
                                         mask_token_id=UNK, skip_mask=skip_vocab,
                                         pad_invariant=pad_invariant)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_causal_weights_with_garbage_at_invalid_positions():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        effects = rng.random((B, 9)) * 0.3
        valid = random_mask(rng, (B, 9))
        garbage = plant(rng, effects, valid)
        want = np.zeros((B, 9))
        for r in range(B):
            e = np.where(valid[r], effects[r], 0.0)
            want[r] = np.where(valid[r], np.sqrt((e - e.min()) / (e.max() - e.min() + 1e-10)), 0.0)
        got = causal_weights(garbage, valid)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda e: causal_weights(e, valid).sum())(jnp.asarray(garbage))
        assert np.all(np.asarray(g) == 0)


def test_classifier_ignores_garbage_padding_and_dropped_rows():
    vocab, length = 20, 10
    model = CausalClassifier(ClassifierConfig.tiny(vocab, 2, dropout_rate=0.0), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, vocab, (4, length)).astype(np.int32)
    mask = np.arange(length)[None] < np.array([[10], [6], [3], [0]])
    clean = np.where(mask, tokens, 0)
    garbage = np.where(mask, tokens, rng.choice([-4, vocab, 10 ** 6], (4, length)))
    forward = nnx.jit(lambda m, t, k: m(t, k))
    base = np.asarray(forward(model, clean, mask))
    got = np.asarray(forward(model, garbage, mask))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, base, atol=1e-6)
    np.testing.assert_allclose(counterfactual_effects(logits_fn(model), garbage, mask,
                                                      [0, 1, 1, -1], mask_token_id=UNK),
                               counterfactual_effects(logits_fn(model), clean, mask,
                                                      [0, 1, 1, 0], mask_token_id=UNK),
                               atol=1e-6)

    # cross_entropy_loss: NaN/inf logits and label -1 at weight-0 rows carry no weight.
    for seed in SEEDS:
        rs = np.random.default_rng(seed)
        weights = (rs.random(6) < 0.6).astype(np.float32)
        weights[0] = 1.0
        logits = plant(rs, rs.normal(size=(6, 3)), np.repeat(weights[:, None] > 0, 3, 1))
        labels = np.where(weights > 0, rs.integers(0, 3, 6), -1).astype(np.int32)
        keep = weights > 0
        logp = np_log_softmax(logits[keep])
        want = -logp[np.arange(keep.sum()), labels[keep]].sum() / max(weights.sum(), 1)
        np.testing.assert_allclose(cross_entropy_loss(logits, labels, weights), want, rtol=1e-5)
        g = np.asarray(jax.grad(cross_entropy_loss)(jnp.asarray(logits), labels, weights))
        assert np.all(np.isfinite(g)) and np.all(g[~keep] == 0)

    # A train step on garbage padding and a dropped row with label -1 keeps every weight finite.
    optimizer = make_optimizer(model, learning_rate=1e-3)
    loss, accuracy = make_train_step()(model, optimizer, garbage, mask, np.array([0, 1, 1, -1]),
                                       jax.random.key(0), np.array([1, 1, 1, 0], np.float32))
    assert np.isfinite(float(loss)) and np.isfinite(float(accuracy))
    assert_finite(nnx.state(model, nnx.Param))
