"""ALFWorld through the online PPO trainer (tiny settings): rewards and valid flags of real rollouts,
the causal (coso) path, metrics, and a resume that restores the running episodes and compiles nothing.

The game pool (one game per task type) is generated into a temporary cache via $COSO_ALFWORLD_CACHE.
One coso run A makes 2 iterations (checkpoints at 1 and 2); a trainer B resumes A's workdir and makes a
third, reusing A's compiled steps (jax's cache of the module-level steps).
(Config defaults for ALFWorld are tested in test_rl_config.py.)
"""
from __future__ import annotations

import math

import alfworld  # noqa: F401  (a test dependency: fail loudly when missing)
import jax
import numpy as np
import pytest
from test_ppo_trainer import CompileCounter

from coso_jax import metrics as metrics_lib
from coso_jax.envs.alfworld.env import INADMISSIBLE_PENALTY, WIN_REWARD
from coso_jax.envs.alfworld.text import VERBS
from coso_jax.metrics import SuccessTracker
from coso_jax.rl.config import ppo_preset
from coso_jax.rl.ppo.trainer import PPOTrainer

# 12 expert episodes (~70 demonstrations, 27 SFT steps: enough for mostly admissible commands),
# 2 envs x 4 steps per iteration, 2 minibatches of 4.
TINY = dict(
    env="ALFWorld", algo="coso", alfworld_pool_size=1, prompt_margin=160,
    sft_episodes=12, sft_epochs=3, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2,
    causal_batch=64, causal_minibatch=64, num_envs=2, steps_per_update=8, minibatch_size=4,
    ppo_epochs=1, checkpoint_every=1, heatmap_every=1, progress=False,
)


def test_success_tracker_uses_the_success_flag():
    t = SuccessTracker(window=3)
    for ret, won in [(1.0, True), (5.0, False), (-2.0, False), (3.0, None)]:
        t.add_episode(ret, 10, won)
    assert t.success_rate == pytest.approx(1 / 3)  # the last 3: False, False, (3.0 > 0); returns alone: 2/3
    u = SuccessTracker(window=3)
    u.load_state_dict(t.state_dict())
    assert u.success_rate == t.success_rate and u.state_dict() == t.state_dict()
    legacy = {"window": 3, "episodes": [[1.0, 4], [-1.0, 4]], "total_episodes": 2,  # from before the flags
              "running_return": None, "running_length": None}  # (running fields of old checkpoints are ignored)
    u.load_state_dict(legacy)
    assert u.success_rate == 0.5


def _rollout_state(tr: PPOTrainer) -> dict:
    envs = [e.unwrapped for e in tr.rollout.envs]
    return {
        "snapshots": [e.snapshot() for e in envs],
        "facts": [sorted(map(str, e.engine.facts)) for e in envs],
        "admissible": [list(e.engine.admissible) for e in envs],
        "elapsed": [e._elapsed_steps for e in tr.rollout.envs],
        "infos": [{k: v for k, v in info.items()} for info in tr.rollout.infos],
        "obs": tr.rollout.observations().copy(),
        "episode_return": tr.rollout.episode_return.copy(),
        "params": [np.asarray(x) for x in jax.tree.leaves(tr.params)],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("alfworld_train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COSO_ALFWORLD_CACHE", str(root / "pool"))
        cfg = ppo_preset("tiny_cpu", **TINY, total_env_steps=16, sft_dir=str(root / "sft"))
        a = PPOTrainer(cfg, root / "run")
        out = {"root": root, "cfg": cfg, "a_history": a.train(), "sft": a.start_summary}
        fields = ("valid", "labels", "rewards")
        flats = [{k: a.last_batch[k].copy() for k in fields}]
        out["buffer_rewards"] = [a.buffer.arrays["rewards"].copy()]
        out["a_state"] = _rollout_state(a)
        a.close()
        with CompileCounter() as compiles:
            b = PPOTrainer(cfg.replace(total_env_steps=24), root / "run", resume=True)
            out["b_resumed_at"] = b.iteration
            out["b_state"] = _rollout_state(b)
            out["b_history"] = b.train()
        out["compiles"] = compiles.count
        flats.append({k: b.last_batch[k].copy() for k in fields})
        out["buffer_rewards"].append(b.buffer.arrays["rewards"].copy())
        out["last"] = {k: np.concatenate([f[k] for f in flats]) for k in fields}
        b.close()
    yield out


def test_alfworld_run_writes_metrics(runs):
    records = metrics_lib.read_jsonl(runs["root"] / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["env_steps"] for r in records] == [8, 16, 24]
    for r in records:
        for key in ("success_rate", "invalid_action_rate", "ppo/loss", "ppo/entropy_bonus", "causal/loss",
                    "time/causal"):
            assert key in r, key
        assert np.isfinite(r["ppo/loss"]) and r["ppo/skipped_minibatches"] == 0
        assert 0.0 <= r["invalid_action_rate"] <= 1.0
    # The SFT'd policy names admissible commands, so the causal path weighted some tokens.
    assert min(r["invalid_action_rate"] for r in records) < 1.0
    assert any("causal/weight_mean" in r for r in records)
    assert runs["sft"]["env"] == "ALFWorld" and runs["sft"]["sft_final_loss"] < runs["sft"]["sft_first_loss"]
    assert sorted((runs["root"] / "run").glob("heatmap_*.png"))


def test_alfworld_rewards_and_valid_flags_agree(runs):
    last = runs["last"]
    valid, labels, rewards = last["valid"], last["labels"], last["rewards"]
    np.testing.assert_array_equal(rewards, np.concatenate([r.reshape(-1) for r in runs["buffer_rewards"]]))
    assert valid.any()
    # A valid answer names an admissible command: no penalty, reward = progress level (+50 when won).
    # An invalid one does nothing and costs the env's -1, once (the interface adds no penalty of its own).
    for v, lab, r in zip(valid, labels, rewards):
        if v:
            assert 0 <= lab < len(VERBS)
            assert 0.0 <= r <= 1.0 or r == pytest.approx(WIN_REWARD + 1.0)
        else:
            assert lab == -1
            assert INADMISSIBLE_PENALTY <= r <= INADMISSIBLE_PENALTY + 1.0


def test_alfworld_resume_restores_the_running_episodes(runs):
    a, b = runs["a_state"], runs["b_state"]
    assert runs["b_resumed_at"] == 2 and len(runs["b_history"]) == 1
    for key in ("snapshots", "facts", "admissible", "elapsed", "infos"):
        assert a[key] == b[key], key
    assert a["admissible"] == [info["admissible_commands"] for info in a["infos"]]
    np.testing.assert_array_equal(a["obs"], b["obs"])
    np.testing.assert_array_equal(a["episode_return"], b["episode_return"])
    for x, y in zip(a["params"], b["params"]):
        np.testing.assert_array_equal(x, y)
    assert runs["compiles"] == 0
    assert not math.isnan(runs["b_history"][0]["ppo/loss"])


def test_env_snapshot_restores_the_episode_exactly(tmp_path):
    import gymnasium as gym

    kw = dict(task_type="pick", pool_size=1, cache_dir=str(tmp_path), render_images=True)
    a, b = gym.make("coso_jax/ALFWorld-v0", **kw), gym.make("coso_jax/ALFWorld-v0", **kw)
    rng = np.random.default_rng(0)
    _, info = a.reset(seed=3)
    for step in range(6):  # admissible commands and inadmissible ones (-1)
        _, _, _, _, info = a.step(-1 if step % 3 == 2 else int(rng.integers(len(info["admissible_commands"]))))
    assert info["observation"] == "Nothing happens."
    b.reset(seed=99)
    b.unwrapped.restore_snapshot(a.unwrapped.snapshot())
    assert b.unwrapped.snapshot() == a.unwrapped.snapshot()
    np.testing.assert_array_equal(a.unwrapped.render(), b.unwrapped.render())
    for _ in range(6):
        action = int(rng.integers(len(info["admissible_commands"])))
        out_a, out_b = a.step(action), b.step(action)
        np.testing.assert_array_equal(out_a[0], out_b[0])
        assert out_a[1:] == out_b[1:]
        info = out_a[4]
        if out_a[2] or out_a[3]:
            break
    a.close(), b.close()
