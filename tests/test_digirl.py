"""The DigiRL backbone: its losses, advantage and filtering against plain NumPy versions written
here, the replay, the launcher's flag checks, and one off2on smoke run in a real browser (marked
`browser`) that checks metrics, checkpoints and a resume."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax.rl import digirl


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


def test_images_to_pixels_matches_clip_normalisation(rng):
    from coso_jax.models.image_processing import normalize

    imgs = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(digirl.images_to_pixels(imgs)), np.stack([normalize(i) for i in imgs]),
                               rtol=1e-5, atol=1e-5)


def _trajectory(t_len, success, p=4, n=3, s=8, fill=0):
    reward = np.zeros(t_len, np.float32)
    reward[-1] = float(success)
    return {"prompt_ids": np.full((t_len, p), fill, np.int32), "prompt_mask": np.ones((t_len, p), bool),
            "image": np.zeros((t_len, s, s, 3), np.uint8), "next_prompt_ids": np.zeros((t_len, p), np.int32),
            "next_prompt_mask": np.ones((t_len, p), bool), "next_image": np.zeros((t_len, s, s, 3), np.uint8),
            "response_ids": np.zeros((t_len, n), np.int32), "response_mask": np.ones((t_len, n), bool),
            "reward": reward, "done": np.arange(t_len) == t_len - 1, "valid": np.ones(t_len, bool),
            "label": np.ones(t_len, np.int32)}


def test_transition_replay_ring_and_trajectory_fields():
    replay = digirl.TransitionReplay(5, prompt_len=4, max_new_tokens=3, image_size=8)
    replay.add_trajectory(_trajectory(3, True, fill=1), gamma=0.5)
    np.testing.assert_allclose(replay.data["mc_return"][:3], [0.25, 0.5, 1.0])
    np.testing.assert_array_equal(replay.first_steps(), [0])
    replay.add_trajectory(_trajectory(4, False, fill=2), gamma=0.5)  # wraps: overwrites rows 0, 1
    assert replay.size == 5 and replay.cursor == 2
    np.testing.assert_array_equal(replay.data["traj_id"], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(replay.data["step"], [2, 3, 2, 0, 1])
    np.testing.assert_array_equal(replay.first_steps(), [3])  # trajectory 0 lost its first step
    np.testing.assert_array_equal(replay.data["traj_return"], [0, 0, 1, 0, 0])
    again = digirl.TransitionReplay(5, prompt_len=4, max_new_tokens=3, image_size=8)
    again.load(replay.arrays(), json.loads(json.dumps(replay.meta())))
    np.testing.assert_array_equal(again.sample(7), replay.sample(7))
    with pytest.raises(ValueError, match="shape"):
        digirl.TransitionReplay(6, 4, 3, 8).load(replay.arrays(), replay.meta())


def test_critics_shapes_and_init():
    from flax import nnx

    cfg = digirl.digirl_preset("tiny_cpu", image_size=16, critic_hidden=8)
    critics = digirl.build_critics(cfg, vocab_size=50, hidden_size=12, seed=0)
    out = nnx.jit(lambda m, *a: m(*a))(critics.step, jnp.zeros((3, 16, 16, 3), jnp.uint8),
                                       jnp.ones((3, 5), jnp.int32), jnp.ones((3, 5), bool))
    assert out.shape == (3, 2, 2) and np.all(np.isfinite(np.asarray(out)))
    assert float(jnp.abs(critics.step.patch_embed.kernel.get_value()).sum()) > 0
    assert float(jnp.abs(critics.step.patch_embed.bias.get_value()).sum()) == 0
    shared = digirl.build_critics(cfg.replace(critic_trunk="shared"), vocab_size=50, hidden_size=12, seed=0)
    assert shared.trajectory(None, None, None, features=jnp.zeros((3, 12))).shape == (3, 1, 2)
    assert not hasattr(shared.step, "patch_embed")


def test_config_presets_and_errors():
    paper = digirl.digirl_preset("paper")
    assert (paper.gamma, paper.lr, paper.trajectories_per_iteration, paper.actor_epochs, paper.max_grad_norm,
            paper.temperature, paper.replay_capacity) == (0.5, 1e-4, 16, 20, 0.01, 1.0, 2000)
    assert paper.offline_iterations == 30 and paper.num_iterations == 430
    tiny = digirl.digirl_preset("tiny_cpu", algo="none", tasks=["click-button"])
    assert tiny.tasks == ("click-button",) and tiny.task_names == ("click-button",)
    for bad, match in [(dict(env="NumberLine"), "web/general"), (dict(algo="ppo"), "algo"),
                       (dict(critic_trunk="big"), "critic_trunk"), (dict(tasks=["login-user"]), "subset"),
                       (dict(filter_quantile=1.5), "filter_quantile"), (dict(actor_batch=0), "actor_batch")]:
        with pytest.raises(ValueError, match=match):
            digirl.digirl_preset("tiny_cpu", **bad)
    with pytest.raises(ValueError, match="preset"):
        digirl.digirl_preset("huge")


def test_cached_start_with_other_settings_is_refused(tmp_path):
    cfg = digirl.digirl_preset("tiny_cpu", sft_dir=str(tmp_path))
    (tmp_path / "summary.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="other settings"):
        digirl.load_or_build_start(cfg, tmp_path)
    assert digirl.start_fingerprint(cfg) != digirl.start_fingerprint(cfg.replace(sft_epochs=cfg.sft_epochs + 1))
    assert digirl.start_fingerprint(cfg) == digirl.start_fingerprint(cfg.replace(algo="none", seed=3, alpha=0.5))


def test_launcher_flags(tmp_path):
    from absl import app, flags

    from experiments import train

    f = train.FLAGS
    try:
        for argv, match in [(["--env=web/general"], "needs --backbone=digirl"),
                            (["--backbone=digirl", "--env=NumberLine"], "web suites"),
                            (["--backbone=digirl", "--env=web/general", "--total_env_steps=10"], "PPO setting")]:
            with pytest.raises(flags.IllegalFlagValueError, match=match):
                f(["train", f"--workdir={tmp_path}", *argv])
            f.unparse_flags()
        f(["train", f"--workdir={tmp_path}", "--backbone=digirl", "--env=web/shopping", "--algo=entropy",
           "--preset=tiny_cpu", "--alpha=0.2", "--set=actor_epochs=3", '--set=tasks=["login-user"]'])
        cfg = train.digirl_config_from_flags()
        assert (cfg.env, cfg.algo, cfg.alpha, cfg.actor_epochs, cfg.tasks) == (
            "web/shopping", "entropy", 0.2, 3, ("login-user",))
        f.unparse_flags()
        f(["train", f"--workdir={tmp_path}", "--backbone=digirl", "--env=web/general", "--set=ppo_epochs=3"])
        with pytest.raises(app.UsageError, match="ppo_epochs"):
            train.digirl_config_from_flags()
    finally:
        f.unparse_flags()


# ---------------------------------------------------------------------------------------------
# Off2on smoke run in a real browser. Plumbing only: no BC epochs (each compile costs tens of
# seconds on a small CPU), so the policy is random and its answers mostly invalid.
from coso_jax.envs.web import browser_unavailable_reason  # noqa: E402

_REASON = browser_unavailable_reason()

SMOKE = dict(
    tasks=("click-button", "focus-text"), num_envs=2, trajectories_per_iteration=2, horizon=2,
    sft_episodes_per_task=3, sft_epochs=0, sft_batch_size=4, causal_pretrain_steps=0, causal_batch=16,
    causal_minibatch=16, offline_episodes_per_task=2, offline_actor_iterations=1, offline_critic_iterations=1,
    online_iterations=1, actor_epochs=2, actor_batch=4, critic_epochs=2, critic_batch=4,
    trajectory_critic_epochs=1, checkpoint_every=1, heatmap_every=1, eval_episodes=2, max_browsers=4,
    progress=False,
)


@pytest.mark.browser
@pytest.mark.skipif(_REASON is not None, reason=f"web env browser unavailable: {_REASON}")
def test_off2on_smoke_and_resume(tmp_path):
    from coso_jax import metrics as metrics_lib
    from coso_jax.envs.web.browser import live_browsers

    cfg = digirl.digirl_preset("tiny_cpu", algo="coso", sft_dir=str(tmp_path / "sft"), **SMOKE)
    work = tmp_path / "run"
    tr = digirl.DigiRLTrainer(cfg, work)
    try:
        assert tr.start_summary["demo_success_rate"] == 1.0  # the scripted solvers solve these tasks
        assert tr.replay.size > 0 and tr.replay.first_steps().size == 4  # offline trajectories
        history = tr.train()
        result = tr.evaluate()
    finally:
        tr.close()
    assert [r["stage"] for r in history] == ["offline", "online"]
    online = history[-1]
    for key in ("critic/loss", "trajectory_critic/loss", "actor/loss", "actor/pg_loss", "causal/loss",
                "iteration_success_rate", "invalid_action_rate", "filter/kept_trajectories"):
        assert key in online and online[key] is not None and np.isfinite(online[key]), key
    assert online["filter/kept_trajectories"] >= 1 and tr.env_steps >= 2
    assert result["episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0
    records = metrics_lib.read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["env_steps"] == tr.env_steps
    assert list((work).glob("heatmap_*.png"))

    with pytest.raises(FileExistsError, match="--resume"):
        digirl.DigiRLTrainer(cfg, work)
    more = cfg.replace(online_iterations=2)
    tr2 = digirl.DigiRLTrainer(more, work, resume=True)
    try:
        assert tr2.iteration == 2 and tr2.env_steps == tr.env_steps and tr2.replay.size == tr.replay.size
        for a, b in zip(jax.tree.leaves(tr2.params), jax.tree.leaves(tr.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # The constructor precompiled every response-length bucket: the resumed run compiles none.
        from coso_jax.causal import trace_count
        traces = trace_count()
        history2 = tr2.train()
        assert trace_count() == traces
    finally:
        tr2.close()
    assert len(history2) == 1 and history2[0]["stage"] == "online"
    records = metrics_lib.read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert live_browsers() == []
