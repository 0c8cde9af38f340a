"""The DigiRL trainer in a real browser (marked `browser`): an off2on smoke run with each policy family
(the tiny LLaVA and the T5/AutoUI port), metrics, checkpoints, a resume that continues the run and
compiles nothing, a second run of the process that compiles nothing, and the offline stage's
reference behaviour (no soft-RL bonus offline). Plumbing only: no BC epochs (each compile costs tens
of seconds on a small CPU), so the policies are random and their answers mostly invalid."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from test_ppo_trainer import CompileCounter

from coso_jax import metrics as metrics_lib
from coso_jax.envs.web import browser_unavailable_reason
from coso_jax.rl.config import digirl_preset
from coso_jax.rl.run import RunError

_REASON = browser_unavailable_reason()
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(_REASON is not None, reason=f"web env browser unavailable: {_REASON}")]

SMOKE = dict(
    tasks=("click-button", "focus-text"), num_envs=2, trajectories_per_iteration=2, horizon=2,
    sft_episodes_per_task=3, sft_epochs=0, sft_batch_size=4, causal_pretrain_steps=0, causal_batch=16,
    causal_minibatch=16, offline_episodes_per_task=2, offline_actor_iterations=1, offline_critic_iterations=1,
    online_iterations=1, actor_epochs=2, actor_batch=4, critic_epochs=2, critic_batch=4,
    trajectory_critic_epochs=1, checkpoint_every=1, heatmap_every=1, eval_episodes=2, max_browsers=4,
    progress=False,
)


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory):
    from coso_jax.rl.digirl.trainer import DigiRLTrainer

    root = tmp_path_factory.mktemp("digirl")
    cfg = digirl_preset("tiny_cpu", algo="coso", sft_dir=str(root / "sft"), **SMOKE)
    out = {"root": root, "cfg": cfg}
    tr = DigiRLTrainer(cfg, root / "run")
    try:
        out["start_summary"] = tr.start_summary
        out["replay"] = (tr.replay.size, tr.replay.first_steps().size)
        out["history"] = tr.train()
        out["eval"] = tr.evaluate()
        out["params"] = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
        out["env_steps"] = tr.env_steps
    finally:
        tr.close()
    with CompileCounter() as compiles:
        again = DigiRLTrainer(cfg, root / "again")  # a second run of the process: jax's cache serves it
        try:
            again.train()
        finally:
            again.close()
        tr2 = DigiRLTrainer(cfg.replace(online_iterations=2), root / "run", resume=True)
        try:
            out["resumed_at"] = (tr2.iteration, tr2.env_steps, tr2.replay.size)
            out["resumed_params"] = [np.asarray(x) for x in jax.tree.leaves(tr2.params)]
            out["history2"] = tr2.train()
        finally:
            tr2.close()
    out["compiles"] = compiles.count
    return out


def test_off2on_smoke(llava_runs):
    assert llava_runs["start_summary"]["demo_success_rate"] == 1.0  # the scripted solvers solve these tasks
    assert llava_runs["replay"][1] == 4  # the four offline trajectories start in the replay
    history = llava_runs["history"]
    assert [r["stage"] for r in history] == ["offline", "online"]
    offline, online = history
    for key in ("critic/loss", "trajectory_critic/loss", "actor/loss", "actor/pg_loss", "causal/loss",
                "iteration_success_rate", "invalid_action_rate", "filter/kept_trajectories"):
        assert key in online and online[key] is not None and np.isfinite(online[key]), key
    # Offline: no soft-RL bonus (the reference's is_online=False), so the actor loss is the PG alone.
    assert offline["actor/loss"] == pytest.approx(offline["actor/pg_loss"], rel=1e-6)
    assert online["actor/loss"] != pytest.approx(online["actor/pg_loss"], rel=1e-6)
    assert online["filter/kept_trajectories"] >= 1 and llava_runs["env_steps"] >= 2
    result = llava_runs["eval"]
    assert result["episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0
    work = llava_runs["root"] / "run"
    assert list(work.glob("heatmap_*.png"))


def test_resume_continues_the_run_and_nothing_recompiles(llava_runs):
    assert llava_runs["resumed_at"][:2] == (2, llava_runs["env_steps"])
    for a, b in zip(llava_runs["resumed_params"], llava_runs["params"]):
        np.testing.assert_array_equal(a, b)
    assert len(llava_runs["history2"]) == 1 and llava_runs["history2"][0]["stage"] == "online"
    records = metrics_lib.read_jsonl(llava_runs["root"] / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert llava_runs["compiles"] == 0  # neither the second run nor the resumed one compiled anything


def test_existing_run_without_resume_is_refused(llava_runs):
    from coso_jax.rl.digirl.trainer import DigiRLTrainer

    with pytest.raises(RunError, match="--resume"):
        DigiRLTrainer(llava_runs["cfg"], llava_runs["root"] / "run")


def test_t5_autoui_policy_runs_an_iteration(tmp_path):
    from coso_jax.envs.web.browser import live_browsers
    from coso_jax.models.t5 import T5EncoderDecoder
    from coso_jax.rl.digirl.trainer import DigiRLTrainer

    cfg = digirl_preset("tiny_cpu", algo="entropy", policy_family="t5", sft_dir=str(tmp_path / "sft"), soft_backup=True,
                        **dict(SMOKE, offline_actor_iterations=0, offline_critic_iterations=0,
                               offline_episodes_per_task=0))
    tr = DigiRLTrainer(cfg, tmp_path / "run")
    try:
        from flax import nnx

        assert isinstance(nnx.merge(tr.policy_gd, tr.params), T5EncoderDecoder)
        before = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
        history = tr.train()
    finally:
        tr.close()
    (record,) = history
    assert record["stage"] == "online" and np.isfinite(record["actor/loss"])
    assert record["actor/entropy_bonus"] > 0  # the entropy algo's bonus, from the T5 scorer
    assert record["soft/entropy_bonus"] > 0  # the soft backup's H_B, from the T5 sampler's entropies
    rows = np.arange(tr.replay.size)
    np.testing.assert_allclose(tr.replay.data["traj_soft_return"][rows] - tr.replay.data["traj_return"][rows] > 0, True)
    moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(before, jax.tree.leaves(tr.params)))
    assert moved > 0
    assert live_browsers() == []
