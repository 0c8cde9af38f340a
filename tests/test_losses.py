"""coso_jax.losses against plain NumPy written here, plus jit / vmap / grad checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax import losses

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def np_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_token_entropy(logits, mask):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                p = np_softmax(logits[i, j].astype(np.float64))
                out[i, j] = -sum(pv * np.log(max(pv, 1e-10)) for pv in p)
    return out


def np_causal_entropy(logits, weights, mask):
    h = np_token_entropy(logits, mask)
    return np.array([(h[i] * weights[i] * mask[i]).sum() / max(mask[i].sum(), 1)
                     for i in range(len(h))])


def make_token_batch(rng, b=3, t=5, v=7):
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    logits[0, 0, 0] = 40.0  # a near-one-hot distribution exercises the 1e-10 clamp
    mask = rng.random((b, t)) < 0.7
    mask[2] = False  # an empty row must give 0, not NaN
    weights = rng.random((b, t)).astype(np.float32)
    return logits, mask, weights


def test_token_entropy_matches_numpy(rng):
    logits, mask, _ = make_token_batch(rng)
    got = losses.token_entropy(jnp.asarray(logits), jnp.asarray(mask))
    assert got.shape == mask.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_token_entropy(logits, mask), rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(got)[~mask] == 0)


def test_causal_and_naive_entropy_match_numpy(rng):
    logits, mask, weights = make_token_batch(rng)
    got = losses.causal_entropy(logits, weights, mask)
    np.testing.assert_allclose(got, np_causal_entropy(logits, weights, mask), rtol=RTOL, atol=ATOL)
    naive = losses.naive_entropy(logits, mask)
    np.testing.assert_allclose(naive, np_causal_entropy(logits, np.ones_like(weights), mask),
                               rtol=RTOL, atol=ATOL)
    assert got[2] == 0 and naive[2] == 0  # empty mask
    # weighted_entropy on precomputed entropies (the scorer's output) agrees.
    h = losses.token_entropy(logits, mask)
    np.testing.assert_allclose(losses.weighted_entropy(h, weights, mask), got, rtol=1e-6)


def test_causal_entropy_weights_get_no_gradient_but_logits_do(rng):
    logits, mask, weights = make_token_batch(rng)
    grad_logits, grad_weights = jax.grad(
        lambda lg, w: losses.causal_entropy(lg, w, mask).sum(), argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(weights))
    assert np.all(np.asarray(grad_weights) == 0)
    assert np.abs(np.asarray(grad_logits)).sum() > 0
    assert np.all(np.isfinite(grad_logits))
    # Masked positions get no gradient either.
    assert np.all(np.asarray(grad_logits)[~mask] == 0)


def test_entropy_jit_and_vmap(rng):
    logits, mask, weights = make_token_batch(rng)
    direct = losses.causal_entropy(logits, weights, mask)
    jitted = jax.jit(losses.causal_entropy)(logits, weights, mask)
    # vmap over rows of [T, V] (unbatched use) gives the same numbers.
    per_row = jax.vmap(losses.causal_entropy)(logits[:, None], weights[:, None], mask[:, None])
    np.testing.assert_allclose(jitted, direct, rtol=1e-6)
    np.testing.assert_allclose(per_row[:, 0], direct, rtol=1e-6)


def test_entropy_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="logits"):
        losses.token_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="weights"):
        losses.weighted_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 3)))


def test_sequence_logprob_with_cot_scale(rng):
    lp = -rng.random((4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.8
    thought = rng.random((4, 6)) < 0.5
    lam = 0.3
    expected = np.zeros(4)
    for i in range(4):
        for j in range(6):
            if mask[i, j]:
                expected[i] += lp[i, j] * (lam if thought[i, j] else 1.0)
    np.testing.assert_allclose(losses.sequence_logprob(lp, mask, thought, lam), expected,
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(losses.sequence_logprob(lp, mask), (lp * mask).sum(1), rtol=RTOL)


def np_gae(rewards, values, dones, next_value, gamma, lam):
    t_len = len(rewards)
    adv = np.zeros_like(rewards, dtype=np.float64)
    last = np.zeros_like(next_value, dtype=np.float64)
    for t in reversed(range(t_len)):
        nv = next_value if t == t_len - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


def test_gae_matches_numpy_loop(rng):
    t_len, n = 9, 4
    rewards = rng.normal(size=(t_len, n)).astype(np.float32)
    values = rng.normal(size=(t_len, n)).astype(np.float32)
    dones = rng.random((t_len, n)) < 0.25
    next_value = rng.normal(size=(n,)).astype(np.float32)
    adv, ret = losses.gae(rewards, values, dones, next_value, 0.9, 0.95)
    exp_adv, exp_ret = np_gae(rewards, values, dones.astype(np.float64), next_value, 0.9, 0.95)
    np.testing.assert_allclose(adv, exp_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, exp_ret, rtol=RTOL, atol=ATOL)
    # A done (termination or time-limit truncation) cuts the bootstrap.
    cut = np.asarray(losses.gae(np.ones((2, 1)), np.zeros((2, 1)), np.array([[1], [0]]),
                                np.array([5.0]), 1.0, 1.0)[0])
    np.testing.assert_allclose(cut[:, 0], [1.0, 6.0])
    jitted = jax.jit(losses.gae, static_argnums=(4, 5))(rewards, values, dones, next_value, 0.9, 0.95)
    np.testing.assert_allclose(jitted[0], adv, rtol=1e-5, atol=1e-6)


def test_normalise_advantages(rng):
    adv = rng.normal(size=(10,)).astype(np.float32) * 3 + 1
    mask = np.arange(10) < 7
    got = np.asarray(losses.normalise_advantages(adv, mask))
    sel = adv[mask]
    np.testing.assert_allclose(got[mask], (sel - sel.mean()) / (sel.std() + 1e-8), rtol=1e-5)
    assert np.all(got[~mask] == 0)


def test_ppo_policy_and_value_loss_match_numpy(rng):
    b = 16
    lp = rng.normal(size=b).astype(np.float32) * 0.3
    old = rng.normal(size=b).astype(np.float32) * 0.3
    adv = rng.normal(size=b).astype(np.float32)
    ratio = np.exp(lp - old)
    expected = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    np.testing.assert_allclose(losses.ppo_policy_loss(lp, old, adv, 0.2), expected, rtol=1e-5)

    v, v_old, ret = (rng.normal(size=b).astype(np.float32) for _ in range(3))
    v_clip = v_old + np.clip(v - v_old, -0.1, 0.1)
    expected_v = 0.5 * np.mean(np.maximum((v - ret) ** 2, (v_clip - ret) ** 2))
    np.testing.assert_allclose(losses.value_loss(v, v_old, ret, 0.1), expected_v, rtol=1e-5)
    np.testing.assert_allclose(losses.value_loss(v, v_old, ret, None),
                               0.5 * np.mean((v - ret) ** 2), rtol=1e-5)
    mask = np.arange(b) < 5
    expected_masked = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)[mask])
    np.testing.assert_allclose(losses.ppo_policy_loss(lp, old, adv, 0.2, mask), expected_masked,
                               rtol=1e-5)


def test_ppo_gradient_flows_only_through_new_logprobs(rng):
    lp, old, adv = (jnp.asarray(rng.normal(size=8).astype(np.float32)) for _ in range(3))
    g_lp, g_old, g_adv = jax.grad(losses.ppo_policy_loss, argnums=(0, 1, 2))(lp, old, adv, 0.2)
    assert np.abs(np.asarray(g_lp)).sum() > 0
    assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_adv) == 0)


def test_soft_targets(rng):
    r, nv = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    d = np.array([0, 1, 0, 0, 1], bool)
    np.testing.assert_allclose(losses.soft_q_target(r, d, nv, 0.9), r + 0.9 * (1 - d) * nv,
                               rtol=1e-6)
    q, h = rng.normal(size=(3, 4)).astype(np.float32), rng.random((3, 4)).astype(np.float32)
    np.testing.assert_allclose(losses.soft_value_target(q, h, 0.5), q + 0.5 * h, rtol=1e-6)
    np.testing.assert_allclose(losses.soft_value_target(q, h, 0.5, axis=1),
                               (q + 0.5 * h).mean(1), rtol=1e-6)
    g = jax.grad(lambda h: losses.soft_value_target(jnp.asarray(q), h, 0.5).sum())(jnp.asarray(h))
    assert np.all(np.asarray(g) == 0)


def test_digirl_losses(rng):
    lp = -rng.random(6).astype(np.float32)
    adv = np.array([0.5, 0.0, -0.2, 1.0, 0.0, 0.1], np.float32)
    np.testing.assert_allclose(losses.filtered_pg_loss(lp, adv),
                               -np.mean(lp * (adv > 0)), rtol=1e-6)
    v, nv, r, mc = (rng.random(6).astype(np.float32) for _ in range(4))
    np.testing.assert_allclose(losses.digirl_advantage(v, nv, r - 1, mc - 1),
                               np.clip(nv - v - 0.05 + (r - 1) + (mc - 1), 0, 1), rtol=1e-6)
    logits = rng.normal(size=(6, 2)).astype(np.float32)
    targets = np.array([1, 0, 1, 1, 0, 0], bool)
    p = np_softmax(logits.astype(np.float64))
    expected = -np.mean(np.log(p[np.arange(6), targets.astype(int)]))
    np.testing.assert_allclose(losses.binary_critic_loss(logits, targets), expected, rtol=1e-5)
    # vmap over a leading axis of minibatches and grad work.
    stacked = jax.vmap(losses.filtered_pg_loss)(jnp.stack([lp, lp]), jnp.stack([adv, -adv]))
    np.testing.assert_allclose(stacked[0], -np.mean(lp * (adv > 0)), rtol=1e-6)
    g = jax.grad(losses.filtered_pg_loss)(jnp.asarray(lp), jnp.asarray(adv))
    np.testing.assert_allclose(g, -(adv > 0).astype(np.float32) / 6.0, rtol=1e-6)


def test_soft_rewards_then_gae_match_a_plain_soft_return_loop():
    """GAE with lambda = 1 on the soft rewards r + alpha * H_B is the discounted soft return
    sum_k gamma^k (r_{t+k} + alpha * H_{t+k}) (cut at dones, bootstrapped at the end), minus V."""
    rng = np.random.default_rng(0)
    t_len, envs, gamma, alpha = 7, 3, 0.9, 0.3
    rewards, bonus = rng.normal(size=(t_len, envs)), rng.random((t_len, envs)) * 2
    values, bootstrap = rng.normal(size=(t_len, envs)), rng.normal(size=envs)
    dones = rng.random((t_len, envs)) < 0.25
    soft = losses.soft_rewards(jnp.asarray(rewards), jnp.asarray(bonus), alpha)
    np.testing.assert_allclose(np.asarray(soft), rewards + alpha * bonus, rtol=1e-6, atol=1e-6)  # float32
    _, returns = losses.gae(soft, jnp.asarray(values), jnp.asarray(dones), jnp.asarray(bootstrap), gamma, 1.0)
    expected = np.zeros((t_len, envs))
    for e in range(envs):
        running = bootstrap[e]
        for t in reversed(range(t_len)):
            running = rewards[t, e] + alpha * bonus[t, e] + (0.0 if dones[t, e] else gamma * running)
            expected[t, e] = running
    np.testing.assert_allclose(np.asarray(returns), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(losses.soft_rewards(rewards, bonus, 0.0)), rewards.astype(np.float32))
    with pytest.raises(ValueError, match="entropy_bonus"):
        losses.soft_rewards(rewards, bonus[:, :2], alpha)
