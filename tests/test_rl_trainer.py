"""The online trainer end to end (tiny settings): artifacts, GAE wiring, resume equality, checkpoint
errors, non-finite updates, and the launcher's flag validation.

One SFT start is built per session (`rl_sft_dir`) and three runs share it:
  A: coso for 4 iterations (checkpoints at 2 and 4);
  B: the same config for 2 iterations, closed, then
  C: a new Trainer on B's workdir with resume=True for 2 more.
A must equal C (params, optimizer, classifier, RNG, counters and metrics records).
B and C reuse A's compiled step functions through one `StepCache` (same config and graph structure,
so the same programs): each Trainer would otherwise recompile its sampler, update and classifier step
(~1 min on 2 cores). The test checks that B and C built no step of their own.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from coso_jax import metrics as metrics_lib
from coso_jax.checkpoint import CheckpointError
from coso_jax.rl.config import preset
from coso_jax.rl.train_state import put
from coso_jax.rl.trainer import StepCache, Trainer
from test_rl_units import _python_gae  # the plain-loop GAE reference, shared

REPO = Path(__file__).resolve().parents[1]

# Tiny but real: 72 demonstrations, 54 SFT steps (enough for mostly-valid JSON answers, so the causal
# path and the heatmap see valid actions), 4 envs x 4 steps per iteration, 2 minibatches of 8.
TINY = dict(
    sft_episodes=16, sft_epochs=6, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2,
    causal_batch=64, causal_minibatch=64, num_envs=4, steps_per_update=16, minibatch_size=8,
    max_new_tokens=48, ppo_epochs=2, checkpoint_every=2, heatmap_every=2, progress=False,
)


@pytest.fixture(scope="session")
def rl_sft_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rl_sft") / "sft"


def tiny_config(sft_dir, **overrides):
    return preset("tiny_cpu", **{**TINY, "sft_dir": str(sft_dir), **overrides})


def instrument_gae(trainer: Trainer, log: list) -> None:
    """Records, per iteration, the rollout arrays, the bootstrap value and the advantages/returns fed
    to the update (the trainer's own values, captured around its real code)."""
    value_fn, run_iteration = trainer._value, trainer.run_iteration
    bootstraps = []

    def value(params, inputs):
        out = value_fn(params, inputs)
        bootstraps.append(np.asarray(out))
        return out

    def instrumented():
        record = run_iteration()
        flat = trainer._last_texts[1]
        arrays = trainer.buffer.arrays
        log.append({
            "rewards": arrays["rewards"].copy(), "values": arrays["old_values"].copy(),
            "dones": arrays["dones"].copy(), "bootstrap": bootstraps[-1].copy(),
            "advantages": flat["advantages"].copy(), "returns": flat["returns"].copy(),
        })
        return record

    trainer._value = value
    trainer.run_iteration = instrumented


def snapshot(trainer: Trainer) -> dict:
    return {
        "params": [np.asarray(x) for x in jax.tree.leaves(trainer.params)],
        "opt_state": [np.asarray(x) for x in jax.tree.leaves(trainer.opt_state)],
        "classifier": [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.classifier))],
        "key": np.asarray(jax.random.key_data(trainer.key)),
        "iteration": trainer.iteration,
        "env_steps": trainer.rollout.total_env_steps,
        "replay": {k: v.copy() for k, v in trainer.replay.arrays().items()},
        "tracker": json.loads(json.dumps(trainer.tracker.state_dict())),
    }


@pytest.fixture(scope="module")
def runs(rl_sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_runs")
    out = {"root": root, "gae": []}

    cfg4 = tiny_config(rl_sft_dir, total_env_steps=64)
    cache = StepCache()
    a = Trainer(cfg4, root / "a", step_cache=cache)
    instrument_gae(a, out["gae"])
    out["a_history"] = a.train()
    out["a"] = snapshot(a)
    out["a_trainer"] = a
    out["sft_summary"] = a.sft_summary
    out["builds_after_a"] = dict(cache.builds)

    b = Trainer(tiny_config(rl_sft_dir, total_env_steps=32), root / "b", step_cache=cache)
    out["b_history"] = b.train()
    b.close()

    c = Trainer(cfg4, root / "b", resume=True, step_cache=cache)
    out["c_resumed_at"] = c.iteration
    out["c_history"] = c.train()
    out["builds_after_c"] = dict(cache.builds)
    out["c"] = snapshot(c)
    out["c_trainer"] = c
    out["cfg4"] = cfg4
    yield out
    a.close()
    c.close()


def _scalars(record):
    return {k: v for k, v in record.items() if k != "time" and not k.startswith("time/")}


def _same_scalars(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], float) and math.isnan(x[k]):
            assert isinstance(y[k], float) and math.isnan(y[k]), k
        else:
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), k


# ---------------------------------------------------------------------------------------------
def test_end_to_end_run_writes_artifacts(runs):
    wd = runs["root"] / "a"
    records = metrics_lib.read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["env_steps"] for r in records] == [16, 32, 48, 64]
    for r in records:
        for key in ("success_rate", "invalid_action_rate", "ppo/loss", "ppo/policy_loss", "ppo/value_loss",
                    "ppo/token_entropy", "ppo/causal_entropy", "ppo/skipped_minibatches", "causal/loss",
                    "time/rollout", "time/update", "time/causal"):
            assert key in r, key
        assert r["ppo/skipped_minibatches"] == 0
        assert np.isfinite(r["ppo/loss"])
    assert any("causal/weight_mean" in r for r in records)  # some valid actions were weighted
    assert (wd / "success_rate.png").stat().st_size > 1000
    heatmaps = sorted(wd.glob("heatmap_*.png"))
    assert heatmaps and heatmaps[0].name == "heatmap_00001.png"
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert json.loads((wd / "config.json").read_text())["algo"] == "coso"
    assert (wd / "tb").is_dir()
    assert runs["sft_summary"]["sft_final_loss"] < runs["sft_summary"]["sft_first_loss"]


def test_trainer_gae_wiring_matches_python_loop(runs):
    cfg = runs["cfg4"]
    assert len(runs["gae"]) == 4
    for it in runs["gae"]:
        assert it["rewards"].shape == (cfg.steps_per_env, cfg.num_envs)
        adv, ret = _python_gae(it["rewards"].astype(np.float64), it["values"].astype(np.float64), it["dones"],
                               it["bootstrap"].astype(np.float64), cfg.gamma, cfg.gae_lambda)
        np.testing.assert_allclose(it["returns"], ret.reshape(-1), rtol=1e-5, atol=1e-5)
        norm = (adv - adv.mean()) / (adv.std() + 1e-8)
        np.testing.assert_allclose(it["advantages"], norm.reshape(-1), rtol=1e-4, atol=1e-4)
    # Episodes ended inside the rollouts, so the done resets were exercised.
    assert sum(int(it["dones"][:-1].sum()) for it in runs["gae"]) > 0


def test_resume_equals_uninterrupted_run(runs):
    assert runs["c_resumed_at"] == 2
    assert len(runs["b_history"]) == 2 and len(runs["c_history"]) == 2
    a, c = runs["a"], runs["c"]
    assert (c["iteration"], c["env_steps"]) == (a["iteration"], a["env_steps"]) == (4, 64)
    assert len(a["params"]) == len(c["params"]) > 10
    for group in ("params", "opt_state", "classifier"):
        for x, y in zip(a[group], c[group]):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=group)
    np.testing.assert_array_equal(a["key"], c["key"])
    for name in a["replay"]:
        np.testing.assert_array_equal(a["replay"][name], c["replay"][name])
    assert a["tracker"] == c["tracker"]
    # Same metrics: in memory, and in B's metrics.jsonl (iterations 1-2 by B, 3-4 by the resumed C).
    for x, y in zip(runs["a_history"][2:], runs["c_history"]):
        _same_scalars(_scalars(x), _scalars(y))
    a_records = metrics_lib.read_jsonl(runs["root"] / "a" / "metrics.jsonl")
    bc_records = metrics_lib.read_jsonl(runs["root"] / "b" / "metrics.jsonl")
    assert [r["step"] for r in bc_records] == [1, 2, 3, 4]
    for x, y in zip(a_records, bc_records):
        _same_scalars(_scalars(x), _scalars(y))
    # The run is not trivially constant: params moved away from the SFT start.
    assert any(r["ppo/approx_kl"] > 0 for r in a_records)


def test_step_cache_shares_compiled_steps(runs):
    # A built each step once; B (other total_env_steps) and the resumed C reused every one of them.
    assert runs["builds_after_a"] == {"classifier_step": 1, "sample": 1, "value": 1, "update": 1}
    assert runs["builds_after_c"] == runs["builds_after_a"]


def test_step_cache_keys_on_the_program():
    cache = StepCache()
    built = []
    for key in [("sample", 0.5), ("sample", 0.5), ("sample", 1.0)]:
        cache.get("sample", key, lambda: built.append(key) or object())
    assert built == [("sample", 0.5), ("sample", 1.0)] and cache.builds == {"sample": 2}


def test_resume_with_other_config_is_a_clear_error(runs, rl_sft_dir):
    wd = runs["root"] / "b"
    with pytest.raises(CheckpointError, match="fingerprint"):
        Trainer(tiny_config(rl_sft_dir, total_env_steps=64, alpha=0.5), wd, resume=True)


def test_existing_checkpoints_without_resume_raise(runs, rl_sft_dir):
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_config(rl_sft_dir, total_env_steps=64), runs["root"] / "a")


def test_corrupt_checkpoint_is_a_clear_error(runs, rl_sft_dir, tmp_path):
    wd = tmp_path / "corrupt"
    shutil.copytree(runs["root"] / "b" / "checkpoints", wd / "checkpoints")
    params_dir = wd / "checkpoints" / "4" / "params"
    files = sorted((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert files
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 3])
    with pytest.raises(CheckpointError):
        Trainer(tiny_config(rl_sft_dir, total_env_steps=64), wd, resume=True)


def test_non_finite_loss_skips_the_update(runs):
    tr = runs["c_trainer"]
    flat = dict(tr._last_texts[1])
    batch = {k: flat[k] for k in tr._batch_shardings}
    batch["advantages"] = np.full_like(batch["advantages"], np.nan)
    host_params = jax.tree.map(np.asarray, tr.params)
    host_opt = jax.tree.map(np.asarray, tr.opt_state)
    params, opt_state, metrics = tr._update(put(host_params, tr.param_shardings), put(host_opt, tr.opt_shardings),
                                            put(batch, tr._batch_shardings), jax.random.key(0))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(host_params)):
        np.testing.assert_array_equal(np.asarray(x), y)
    for x, y in zip(jax.tree.leaves(opt_state), jax.tree.leaves(host_opt)):
        np.testing.assert_array_equal(np.asarray(x), y)
    cfg = tr.config
    assert int(metrics["skipped_minibatches"]) == cfg.ppo_epochs * cfg.steps_per_update // cfg.minibatch_size


# ---------------------------------------------------------------------------------------------
# Launcher
def _launch(*flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag, message", [
    ("--env=Nope", "--env"),
    ("--alpha=-0.5", "--alpha must be >= 0"),
    ("--mesh=data:2,gpu:4", "bad mesh spec"),
])
def test_launcher_rejects_bad_flags(tmp_path, flag, message):
    result = _launch(flag, f"--workdir={tmp_path / 'x'}")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    if flag.startswith("--env"):
        assert "NumberLine" in result.stderr  # names the valid choices
    assert not (tmp_path / "x").exists()


def test_launcher_config_from_flags(tmp_path):
    from absl import app

    from experiments import train

    flags_ = train.FLAGS
    try:
        flags_(["train", f"--workdir={tmp_path}", "--env=Blackjack", "--algo=entropy", "--alpha=0.2",
                "--mesh=data:2,fsdp:4", "--set=ppo_epochs=3", "--set=temperature=0.5"])
        cfg = train.config_from_flags()
        assert (cfg.env, cfg.algo, cfg.alpha, cfg.mesh, cfg.ppo_epochs, cfg.temperature) == (
            "Blackjack", "entropy", 0.2, "data:2,fsdp:4", 3, 0.5)
        flags_.unparse_flags()
        flags_(["train", f"--workdir={tmp_path}", "--set=alpha=-1"])
        with pytest.raises(app.UsageError, match="alpha must be >= 0"):
            train.config_from_flags()
        flags_.unparse_flags()
        flags_(["train", f"--workdir={tmp_path}", "--set=bogus=1"])
        with pytest.raises(app.UsageError, match="bogus"):
            train.config_from_flags()
    finally:
        flags_.unparse_flags()


def test_cached_sft_start_reads_its_demo_texts_instead_of_replaying(runs, rl_sft_dir, monkeypatch):
    from coso_jax.rl import policy as policy_lib
    from coso_jax.rl import sft as sft_lib

    cfg = runs["cfg4"]
    expected = sft_lib.collect_demos(cfg.env, cfg.sft_episodes, policy_lib._DEMO_SEED, cfg.sft_imperfect_frac,
                                     cot=cfg.cot, brief=cfg.brief_prompt, env_kwargs=cfg.env_kwargs)
    assert (rl_sft_dir / policy_lib.DEMO_TEXTS).exists()

    def no_replay(*args, **kwargs):
        raise AssertionError("a cached SFT start replayed its demonstrations")

    monkeypatch.setattr(sft_lib, "collect_demos", no_replay)
    start = policy_lib.load_or_build_sft_start(cfg, rl_sft_dir)
    tokens, mask = sft_lib.encode_answers(start.tokenizer, expected.answers, cfg.max_new_tokens)
    np.testing.assert_array_equal(start.demo_tokens, tokens)
    np.testing.assert_array_equal(start.demo_mask, mask)
    np.testing.assert_array_equal(start.demo_labels, expected.labels)
    assert start.encoder.prompt_len == runs["a_trainer"].encoder.prompt_len
