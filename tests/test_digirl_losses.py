"""DigiRL's pure pieces (coso_jax/rl/digirl/losses.py) against NumPy written here, and the parity
switches against transcriptions of the CoSo reference (github.com/langfengQ/CoSo at eb4f205, cited by
file and line): its offline filter, its entropy averaging, unparseable rows, the log-prob floor."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax.rl.digirl import losses as digirl

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------------------------------
# NumPy references (independent formulations, not calls into the code under test)
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_mc(rewards, gamma):
    n = len(rewards)
    return np.array([sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)])


def np_quantile_linear(x, q):
    s = np.sort(x)
    pos = q * (len(s) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def np_ce(logits, targets):
    p = np_softmax(logits)
    return -np.log(p[np.arange(len(targets)), targets.astype(int)]).mean()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_mc_returns(rng):
    for gamma in (0.5, 0.9, 1.0):
        r = rng.normal(size=7)
        np.testing.assert_allclose(digirl.mc_returns(r, gamma), np_mc(r, gamma), rtol=1e-5, atol=1e-6)
    # Sparse terminal success: every step's return is positive, discounted by 0.5 per step to go.
    np.testing.assert_allclose(digirl.mc_returns(np.array([0, 0, 1.0]), 0.5), [0.25, 0.5, 1.0])
    assert digirl.mc_returns(np.zeros(0), 0.5).shape == (0,)


def test_trajectory_filter_top_ten_percent(rng):
    returns = (rng.random(20) < 0.5).astype(np.float64)
    values = rng.random(20)
    keep = digirl.trajectory_filter(returns, values, 0.9)
    scores = returns - np.clip(values, 1e-4, 1 - 1e-4)
    np.testing.assert_array_equal(keep, scores >= np_quantile_linear(scores, 0.9))
    assert keep.sum() == 2  # 20 distinct scores: the top 10% is two trajectories
    assert set(np.flatnonzero(keep)) == set(np.argsort(scores)[-2:])
    # Values are clipped to [1e-4, 1 - 1e-4] before scoring: scores [1e-4, 0.5, -1e-4].
    keep = digirl.trajectory_filter(np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.5, 0.0]), 0.5)
    np.testing.assert_array_equal(keep, [True, True, False])  # the median is the clipped 1e-4
    keep = digirl.trajectory_filter(np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.5, 0.0]), 0.6)
    np.testing.assert_array_equal(keep, [False, True, False])
    assert digirl.trajectory_filter(np.zeros(0), np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="equal 1-D"):
        digirl.trajectory_filter(np.zeros(3), np.zeros(2))


def test_double_critic_advantage(rng):
    b = 32
    ls, ln = rng.normal(size=(b, 2, 2)) * 2, rng.normal(size=(b, 2, 2)) * 2
    r = (rng.random(b) < 0.3).astype(np.float32)
    mc = r * 0.5 + (rng.random(b) < 0.2) * 0.25
    v = np_softmax(ls)[..., 1].min(-1)
    nv = np_softmax(ln)[..., 1].min(-1)
    expected = np.clip(nv - v - 0.05 + r + mc, 0.0, 1.0)
    got = digirl.double_critic_advantage(jnp.asarray(ls), jnp.asarray(ln), jnp.asarray(r), jnp.asarray(mc))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    # A failed trajectory (r = MC = 0) passes the filter only where V rises by more than 0.05.
    zeros = jnp.zeros(b)
    got = np.asarray(digirl.double_critic_advantage(jnp.asarray(ls), jnp.asarray(ln), zeros, zeros))
    np.testing.assert_array_equal(got > 0, nv - v > 0.05)
    # Success: r + MC >= 1 saturates the clamp.
    got = digirl.double_critic_advantage(jnp.asarray(ls), jnp.asarray(ln), jnp.ones(b), jnp.ones(b))
    np.testing.assert_allclose(np.asarray(got), 1.0)


def test_double_critic_loss(rng):
    b = 16
    ls, ln = rng.normal(size=(b, 2, 2)), rng.normal(size=(b, 2, 2))
    t = rng.random(b) < 0.4
    expected = sum(np_ce(x[:, h], t) for x in (ls, ln) for h in range(2))
    got = digirl.double_critic_loss(jnp.asarray(ls), jnp.asarray(ln), jnp.asarray(t))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_actor_loss_and_gradient(rng, alpha):
    b, n = 8, 6
    logp = rng.normal(size=b) - 5
    adv = rng.random(b) * (rng.random(b) < 0.5)
    ent = rng.random((b, n)) * 3
    w = rng.random((b, n))
    m = rng.random((b, n)) < 0.7
    m[0] = False  # an empty row contributes 0 entropy, not NaN
    bonus = np.array([(m[i] * w[i] * ent[i]).sum() / max(m[i].sum(), 1) for i in range(b)])
    expected = -np.mean(logp * (adv > 0)) - alpha * bonus.mean()
    loss, aux = digirl.actor_loss(jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(ent), jnp.asarray(w),
                                  jnp.asarray(m), alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kept_fraction"]), np.mean(adv > 0))
    g_logp, g_ent, g_w = jax.grad(lambda a, e, ww: digirl.actor_loss(a, jnp.asarray(adv), e, ww, jnp.asarray(m),
                                                                      alpha)[0], argnums=(0, 1, 2))(
        jnp.asarray(logp), jnp.asarray(ent), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(g_logp), -(adv > 0).astype(np.float64) / b, rtol=1e-5, atol=1e-7)
    denom = np.maximum(m.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(g_ent), -alpha * m * w / denom / b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g_w), 0.0)  # causal weights are constants




def test_offline_filter_by_reward_is_the_reference_filterbc():
    """digirl/algorithms/offpolicy_train_loop.py:41-58 (`filterbc_buffer`): cutoff = the 0.9 quantile of
    the trajectory rewards, keep reward >= cutoff; :67-86 (`filter_buffer`, online): the same on reward -
    clip(V_traj, 1e-4, 1 - 1e-4)."""
    returns, values = np.array([0.0, 1.0, 1.0]), np.array([0.9, 0.9, 0.1])
    reference_offline = returns >= np.quantile(returns, 1 - 0.1)
    baselines = returns - np.clip(values, 1e-4, 1 - 1e-4)
    reference_online = baselines >= np.quantile(baselines, 1 - 0.1)
    np.testing.assert_array_equal(reference_offline, [False, True, True])
    np.testing.assert_array_equal(reference_online, [False, False, True])
    np.testing.assert_array_equal(digirl.trajectory_filter(returns, None, 0.9), reference_offline)
    np.testing.assert_array_equal(digirl.trajectory_filter(returns, values, 0.9), reference_online)


def _torch_reference_entropies(entropy, weights, mask):
    """digirl/models/autoui_agent.py:163-168 then causal_digirl/trainer.py:199/201: per-row sums divided
    by a [B, 1] token count (broadcast to [B, B]), then `.mean()`; returns (entropy, causal_entropy)."""
    entropy, weights, mask = (torch.tensor(x, dtype=torch.float64) for x in (entropy, weights, mask))
    causal = torch.sum(weights * entropy * mask, dim=-1) / torch.sum(mask, dim=-1, keepdim=True)
    naive = torch.sum(entropy * mask, dim=-1) / torch.sum(mask, dim=-1, keepdim=True)
    return float(naive.mean()), float(causal.mean())


def test_reference_entropy_averaging():
    # Entropy 1 on every token, answers of 1 and 2 tokens: the reference 1.125, the stated intent 1.0.
    ent, mask = np.ones((2, 2), np.float32), np.array([[1, 0], [1, 1]], bool)
    ref_naive, _ = _torch_reference_entropies(ent, np.ones_like(ent), mask)
    assert ref_naive == pytest.approx(1.125)
    assert float(digirl.reference_entropy_mean(ent, np.ones_like(ent), mask)) == pytest.approx(1.125)
    ours = digirl.actor_loss(jnp.zeros(2), jnp.zeros(2), jnp.asarray(ent), jnp.ones((2, 2)), jnp.asarray(mask), 1.0)
    assert float(ours[1]["entropy_bonus"]) == pytest.approx(1.0)
    # Causal weights and unequal lengths: both switch settings against the transcription.
    rng = np.random.default_rng(3)
    ent = rng.random((4, 6)).astype(np.float32) * 2
    w = rng.random((4, 6)).astype(np.float32)
    mask = np.arange(6)[None] < np.array([2, 6, 3, 5])[:, None]
    _, ref_causal = _torch_reference_entropies(ent, w, mask)
    _, aux = digirl.actor_loss(jnp.zeros(4), jnp.zeros(4), jnp.asarray(ent), jnp.asarray(w), jnp.asarray(mask), 0.5,
                               reference_averaging=True)
    assert float(aux["entropy_bonus"]) == pytest.approx(ref_causal, rel=1e-6)
    intent = np.mean([(ent[b] * w[b])[mask[b]].sum() / mask[b].sum() for b in range(4)])
    _, aux = digirl.actor_loss(jnp.zeros(4), jnp.zeros(4), jnp.asarray(ent), jnp.asarray(w), jnp.asarray(mask), 0.5)
    assert float(aux["entropy_bonus"]) == pytest.approx(intent, rel=1e-6)
    assert abs(intent - ref_causal) > 1e-3  # the two settings really differ here


def test_reference_offline_actor_loss_has_no_entropy_term():
    """causal_digirl/trainer.py:197-203: with `is_online=False` the loss is the filtered PG alone,
    -mean(log pi * 1[A > 0]); the trainer passes alpha = 0 offline unless `offline_entropy`."""
    rng = np.random.default_rng(0)
    logp, adv = rng.normal(size=4) - 3, np.array([0.2, 0.0, 0.7, 1.0])
    ent, w, mask = rng.random((4, 5)) * 2, np.ones((4, 5)), np.ones((4, 5), bool)
    reference = float(-(torch.tensor(logp) * (torch.tensor(adv) > 0).double()).mean())
    offline, _ = digirl.actor_loss(jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(ent), jnp.asarray(w),
                                   jnp.asarray(mask), 0.0)
    assert float(offline) == pytest.approx(reference, rel=1e-6)
    with_bonus, _ = digirl.actor_loss(jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(ent), jnp.asarray(w),
                                      jnp.asarray(mask), 0.05)
    assert float(with_bonus) == pytest.approx(reference - 0.05 * ent.mean(), rel=1e-5)


def test_unparseable_rows_default_and_drop_switch():
    """Default (ours): an unparseable row keeps its policy-gradient term; its causal weights are 0, so
    it adds 0 to the entropy sum, and both means divide by B. drop_unparseable: both means run over the
    valid rows only (what the reference's `get_log_prob`, autoui_agent.py:113-120, intends)."""
    rng = np.random.default_rng(1)
    b, n = 6, 4
    logp, adv = rng.normal(size=b) - 2, rng.random(b)
    ent, mask = rng.random((b, n)), np.ones((b, n), bool)
    valid = np.array([True, False, True, True, False, True])
    w = rng.random((b, n)) * valid[:, None]
    per_row = (ent * w).sum(1) / n
    default = -np.mean(logp * (adv > 0)) - 0.3 * per_row.mean()
    dropped = -np.mean((logp * (adv > 0))[valid]) - 0.3 * per_row[valid].mean()
    got, _ = digirl.actor_loss(jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(ent), jnp.asarray(w), jnp.asarray(mask),
                               0.3)
    assert float(got) == pytest.approx(default, rel=1e-5)
    got, _ = digirl.actor_loss(jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(ent), jnp.asarray(w), jnp.asarray(mask),
                               0.3, rows=jnp.asarray(valid))
    assert float(got) == pytest.approx(dropped, rel=1e-5)


def test_logprob_floor():
    """digirl/models/autoui_agent.py:145-147: probabilities clamped at 1e-10 before the log."""
    p = np.array([4e-18, 0.5])
    reference = np.log(np.clip(p, 1e-10, 1.0 + 1e-10))
    np.testing.assert_allclose(reference, [-23.02585, np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(digirl.floor_logprobs(jnp.log(jnp.asarray(p, jnp.float32)), 1e-10)),
                               reference, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(digirl.floor_logprobs(jnp.log(jnp.asarray(p, jnp.float32)), None)),
                               np.log(p), rtol=1e-5)  # ours: -40.06 for p = 4e-18
