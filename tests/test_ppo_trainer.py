"""The PPO trainer end to end (tiny settings): artifacts, GAE wiring, resume equality, compile counts,
checkpoint and start errors that name the problem, and the cached start.

One SFT start is built per session (`rl_sft_dir`) and three runs share it:
  A: coso for 4 iterations (checkpoints at 2 and 4);
  B: the same config for 2 iterations, closed, then
  C: a new PPOTrainer on B's workdir with resume=True for 2 more.
A must equal C (params, optimizer, classifier, counters and metrics records). B and C compile nothing:
every jitted step is defined once at module level and keyed on static structure, so jax's own cache
serves the later runs of the process.
"""
from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest
from test_rl_buffers import python_gae

from coso_jax import metrics as metrics_lib
from coso_jax.checkpoint import CheckpointError
from coso_jax.rl.config import ConfigError, ppo_preset
from coso_jax.rl.ppo import start as start_lib
from coso_jax.rl.ppo.trainer import PPOTrainer
from coso_jax.rl.ppo.update import update_step
from coso_jax.rl.sharding import batch_shardings, put

# Tiny but real: 72 demonstrations, 54 SFT steps (enough for mostly-valid JSON answers, so the causal
# path and the heatmap see valid actions), 4 envs x 4 steps per iteration, 2 minibatches of 8.
TINY = dict(
    sft_episodes=16, sft_epochs=6, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2,
    causal_batch=64, causal_minibatch=64, num_envs=4, steps_per_update=16, minibatch_size=8,
    max_new_tokens=48, ppo_epochs=2, checkpoint_every=2, heatmap_every=2, progress=False,
)


def tiny_config(sft_dir, **overrides):
    return ppo_preset("tiny_cpu", **{**TINY, "sft_dir": str(sft_dir), **overrides})


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def instrument_gae(trainer: PPOTrainer, log: list) -> None:
    """Records, per iteration, the rollout arrays, the bootstrap value and the advantages/returns fed
    to the update (the trainer's own values, captured around its real code)."""
    run_iteration, value_fn = trainer.run_iteration, trainer.steps.value
    bootstraps = []

    def value(*args):
        out = value_fn(*args)
        bootstraps.append(np.asarray(out))
        return out

    trainer.steps.value = value

    def instrumented(key):
        out = run_iteration(key)
        flat, arrays = trainer.last_batch, trainer.buffer.arrays
        log.append({
            "rewards": arrays["rewards"].copy(), "values": arrays["old_values"].copy(),
            "dones": arrays["dones"].copy(), "bootstrap": bootstraps[-1].copy(),
            "advantages": flat["advantages"].copy(), "returns": flat["returns"].copy(),
        })
        return out

    trainer.run_iteration = instrumented


def snapshot(trainer: PPOTrainer) -> dict:
    return {
        "params": [np.asarray(x) for x in jax.tree.leaves(trainer.params)],
        "opt_state": [np.asarray(x) for x in jax.tree.leaves(trainer.opt_state)],
        "classifier": [np.asarray(x) for x in jax.tree.leaves(trainer.causal.params)],
        "iteration": trainer.iteration,
        "env_steps": trainer.rollout.total_env_steps,
        "replay": {k: v.copy() for k, v in trainer.causal.replay.arrays().items()},
        "tracker": json.loads(json.dumps(trainer.tracker.state_dict())),
    }


@pytest.fixture(scope="module")
def runs(rl_sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_runs")
    out = {"root": root, "gae": []}

    cfg4 = tiny_config(rl_sft_dir, total_env_steps=64)
    a = PPOTrainer(cfg4, root / "a")
    instrument_gae(a, out["gae"])
    out["a_history"] = a.train()
    out["a"] = snapshot(a)
    out["a_trainer"] = a
    out["start_summary"] = a.start_summary

    with CompileCounter() as compiles:
        b = PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=32), root / "b")
        out["b_history"] = b.train()
        b.close()
        c = PPOTrainer(cfg4, root / "b", resume=True)
        out["c_resumed_at"] = c.iteration
        out["c_history"] = c.train()
    out["compiles_b_and_c"] = compiles.count
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
        if x[k] is None or (isinstance(x[k], float) and math.isnan(x[k])):
            assert y[k] is None or (isinstance(y[k], float) and math.isnan(y[k])), k
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
                    "ppo/token_entropy", "ppo/entropy_bonus", "ppo/skipped_minibatches", "causal/loss",
                    "time/rollout", "time/update", "time/causal"):
            assert key in r, key
        assert r["ppo/skipped_minibatches"] == 0
        assert np.isfinite(r["ppo/loss"])
    assert any("causal/weight_mean" in r for r in records)  # some valid actions were weighted
    assert (wd / "success_rate.png").stat().st_size > 1000
    heatmaps = sorted(wd.glob("heatmap_*.png"))
    assert heatmaps and heatmaps[0].name == "heatmap_00001.png"
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    config = json.loads((wd / "config.json").read_text())
    assert config["algo"] == "coso" and config["causal_lr"] == runs["cfg4"].causal.lr
    assert (wd / "tb").is_dir()
    assert runs["start_summary"]["sft_final_loss"] < runs["start_summary"]["sft_first_loss"]
    assert runs["start_summary"]["fields"]["env"] == "NumberLine"  # the start records its settings


def test_trainer_gae_wiring_matches_python_loop(runs):
    cfg = runs["cfg4"]
    assert len(runs["gae"]) == 4
    for it in runs["gae"]:
        assert it["rewards"].shape == (cfg.steps_per_env, cfg.num_envs)
        adv, ret = python_gae(it["rewards"].astype(np.float64), it["values"].astype(np.float64), it["dones"],
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


def test_second_and_resumed_runs_compile_nothing(runs):
    assert runs["compiles_b_and_c"] == 0


def _copy_of_b(runs, tmp_path):
    """B's checkpoints in a work directory of their own (B's is held, locked, by the open trainer C)."""
    wd = tmp_path / "copy"
    shutil.copytree(runs["root"] / "b" / "checkpoints", wd / "checkpoints")
    return wd


def test_resume_with_other_config_names_the_differing_fields(runs, rl_sft_dir, tmp_path):
    wd = _copy_of_b(runs, tmp_path)
    with pytest.raises(CheckpointError, match=r"other settings \(its metadata: alpha: 0.01 -> 0.5\)"):
        PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64, alpha=0.5), wd, resume=True)
    with pytest.raises(CheckpointError, match="algo: 'coso' -> 'entropy'"):
        PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64, algo="entropy"), wd, resume=True)


def test_resume_with_another_game_fails_before_building_its_start(runs, rl_sft_dir, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a start was built before the checkpoint's settings were checked")

    monkeypatch.setattr(start_lib, "load_or_build", no_build)
    with pytest.raises(CheckpointError, match="env: 'NumberLine' -> 'Blackjack'"):
        PPOTrainer(tiny_config(tmp_path / "other_sft", total_env_steps=64, env="Blackjack"), _copy_of_b(runs, tmp_path),
                   resume=True)
    assert not (tmp_path / "other_sft").exists()


def test_start_of_another_game_is_refused_naming_the_fields(rl_sft_dir, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("set-up went past the start check")

    monkeypatch.setattr(start_lib, "prepare_env", no_build)
    with pytest.raises(ConfigError, match="env: 'NumberLine' -> 'EZPoints'"):
        PPOTrainer(tiny_config(rl_sft_dir, env="EZPoints"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_existing_checkpoints_without_resume_raise(runs, rl_sft_dir, tmp_path):
    from coso_jax.rl.run import RunError

    with pytest.raises(RunError, match="--resume"):
        PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64), _copy_of_b(runs, tmp_path))


def test_a_second_process_on_a_work_directory_is_refused(runs, rl_sft_dir):
    import os

    from coso_jax.rl.run import RunError

    # Trainer C holds B's work directory (an exclusive flock: any other open of it conflicts).
    with pytest.raises(RunError, match=f"in use by process {os.getpid()}"):
        PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64), runs["root"] / "b", resume=True)


def test_corrupt_checkpoint_names_the_newest_intact_one(runs, rl_sft_dir, tmp_path):
    wd = tmp_path / "corrupt"
    shutil.copytree(runs["root"] / "b" / "checkpoints", wd / "checkpoints")
    params_dir = wd / "checkpoints" / "4" / "params"
    files = sorted((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 3])
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"newest intact checkpoint is step 2: resume from it with "
                                              r"--resume --resume_step=2"):
        PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64), wd, resume=True)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before  # nothing deleted
    # Resuming from step 2 branches there: step 4 is moved aside, never deleted.
    tr = PPOTrainer(tiny_config(rl_sft_dir, total_env_steps=64), wd, resume=True, resume_step=2)
    try:
        assert tr.iteration == 2
    finally:
        tr.close()
    assert [p.name for p in (wd / "checkpoints_discarded").iterdir()][0]
    assert (next((wd / "checkpoints_discarded").iterdir()) / "4").is_dir()


def test_non_finite_loss_skips_the_update(runs):
    tr = runs["c_trainer"]
    batch = {k: v for k, v in tr.last_batch.items() if k in ("prompt_ids", "prompt_mask", "pixel_values",
                                                             "response_ids", "response_mask", "thought_mask",
                                                             "action_mask", "old_logprobs", "old_values",
                                                             "advantages", "returns", "entropy_weights")}
    batch["advantages"] = np.full_like(batch["advantages"], np.nan)
    host_params = jax.tree.map(np.asarray, tr.params)
    host_opt = jax.tree.map(np.asarray, tr.opt_state)
    params, opt_state, metrics = update_step(tr.graphdef, tr.hp, tr.opt, tr.mesh, put(host_params, tr.param_shardings),
                                             put(host_opt, tr.opt_shardings), put(batch, batch_shardings(tr.mesh, batch)),
                                             jax.random.key(0), np.float32(tr.causal.alpha), tr.frozen)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(host_params)):
        np.testing.assert_array_equal(np.asarray(x), y)
    for x, y in zip(jax.tree.leaves(opt_state), jax.tree.leaves(host_opt)):
        np.testing.assert_array_equal(np.asarray(x), y)
    cfg = tr.config
    assert int(metrics["skipped_minibatches"]) == cfg.ppo_epochs * cfg.steps_per_update // cfg.minibatch_size


def test_updates_that_only_skip_stop_the_run_keeping_its_checkpoint(rl_sft_dir, tmp_path, monkeypatch):
    from coso_jax.rl.run import RunError

    cfg = tiny_config(rl_sft_dir, total_env_steps=96, checkpoint_every=1, max_skipped_updates=2)
    tr = PPOTrainer(cfg, tmp_path / "nan")
    real = tr.run_iteration

    def poisoned(key):
        if tr.iteration >= 1:  # from the second update on, every minibatch's loss is non-finite
            tr.causal.alpha = float("nan")
        return real(key)

    tr.run_iteration = poisoned
    try:
        with pytest.raises(RunError, match=r"2 updates in a row had every optimizer step skipped .* Lower the "
                                           r"learning rate or check the inputs; the last checkpoint \(step 1\) is kept"):
            tr.train()
    finally:
        tr.close()
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_cached_start_reads_its_demo_texts_instead_of_replaying(runs, rl_sft_dir, monkeypatch):
    from coso_jax.rl import sft as sft_lib

    cfg = runs["cfg4"]
    expected = sft_lib.collect_demos(cfg.env, cfg.sft.episodes, start_lib.DEMO_SEED, cfg.sft.imperfect_frac,
                                     cot=cfg.model.cot, brief=cfg.model.brief_prompt, env_kwargs=cfg.env_kwargs)
    assert (rl_sft_dir / start_lib.DEMO_TEXTS).exists()

    def no_replay(*args, **kwargs):
        raise AssertionError("a cached SFT start replayed its demonstrations")

    monkeypatch.setattr(sft_lib, "collect_demos", no_replay)
    start = start_lib.load_or_build(cfg, start_lib.start_cache(cfg, rl_sft_dir.parent / "w"))
    tokens, mask = sft_lib.encode_answers(start.tokenizer, expected.answers, cfg.model.max_new_tokens)
    np.testing.assert_array_equal(start.demo_tokens, tokens)
    np.testing.assert_array_equal(start.demo_mask, mask)
    np.testing.assert_array_equal(start.demo_labels, expected.labels)
    assert start.encoder.prompt_len == runs["a_trainer"].encoder.prompt_len


def test_evaluation_leaves_training_untouched(runs):
    tr = runs["a_trainer"]
    before = snapshot(tr)
    first = tr.evaluate(32)
    again = tr.evaluate(32)
    assert first == again  # its own key stream, the same for the same seed
    after = snapshot(tr)
    for group in ("params", "classifier"):
        for x, y in zip(before[group], after[group]):
            np.testing.assert_array_equal(x, y)
    assert before["env_steps"] == after["env_steps"]


# ---------------------------------------------------------------------------------------------
# Soft policy evaluation (soft_backup): GAE on r + alpha * H_B of the behaviour policy.
def _two_iterations(cfg, workdir, weights_one=False):
    """Params after 2 iterations, and per iteration the rollout arrays, weights and returns."""
    tr = PPOTrainer(cfg, workdir)
    seen = []
    real_weights = tr.causal.weights

    def weights_of(ids, mask, labels, valid):
        weights = real_weights(ids, mask, labels, valid)
        if weights_one:  # coso with every causal weight 1
            weights = np.asarray(mask, np.float32)
        seen.append(weights)
        return weights

    tr.causal.weights = weights_of
    bootstraps = []
    value_fn = tr.steps.value
    tr.steps.value = lambda *a: bootstraps.append(np.asarray(value_fn(*a))) or bootstraps[-1]
    log = []
    try:
        for _ in range(2):
            tr.run_iteration(jax.random.fold_in(tr.run_key, tr.iteration))
            arrays, flat = tr.buffer.arrays, tr.last_batch
            log.append({"rewards": arrays["rewards"].copy(), "values": arrays["old_values"].copy(),
                        "bootstrap": bootstraps[-1].copy(),
                        "dones": arrays["dones"].copy(), "entropies": flat["old_entropies"].copy(),
                        "mask": flat["response_mask"].copy(), "weights": seen[-1].copy(),
                        "returns": flat["returns"].copy()})
        params = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
    finally:
        tr.close()
    return params, log


@pytest.fixture(scope="module")
def soft_runs(rl_sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    base = dict(total_env_steps=32, checkpoint_every=8, heatmap_every=8)
    out = {}
    out["coso_soft"] = _two_iterations(tiny_config(rl_sft_dir, soft_backup=True, alpha=0.5, **base), root / "cs")
    out["plain_a0"] = _two_iterations(tiny_config(rl_sft_dir, alpha=0.0, **base), root / "p0")
    out["soft_a0"] = _two_iterations(tiny_config(rl_sft_dir, soft_backup=True, alpha=0.0, **base), root / "s0")
    out["coso_w1"] = _two_iterations(tiny_config(rl_sft_dir, soft_backup=True, alpha=0.5, **base), root / "w1",
                                     weights_one=True)
    out["entropy"] = _two_iterations(tiny_config(rl_sft_dir, soft_backup=True, alpha=0.5, algo="entropy", **base),
                                     root / "en")
    return out


def test_soft_returns_match_a_plain_loop(soft_runs):
    cfg = tiny_config("x", soft_backup=True, alpha=0.5)
    _, log = soft_runs["coso_soft"]
    for it in log:
        t_len, envs = it["rewards"].shape
        mask = it["mask"]
        # H_B of each step's answer: sum_t m w H / sum_t m, in a plain loop.
        bonus = np.array([(it["entropies"][i] * it["weights"][i])[mask[i]].sum() / max(mask[i].sum(), 1)
                          for i in range(len(mask))]).reshape(t_len, envs)
        assert bonus.max() > 0
        soft_r = it["rewards"].astype(np.float64) + 0.5 * bonus
        _, expected = python_gae(soft_r, it["values"].astype(np.float64), it["dones"],
                                 it["bootstrap"].astype(np.float64), cfg.gamma, cfg.gae_lambda)
        np.testing.assert_allclose(it["returns"], expected.reshape(-1), rtol=1e-4, atol=1e-4)


def test_soft_backup_with_alpha_zero_equals_the_plain_run(soft_runs):
    for a, b in zip(soft_runs["plain_a0"][0], soft_runs["soft_a0"][0]):
        np.testing.assert_array_equal(a, b)


def test_soft_coso_with_unit_weights_equals_soft_entropy(soft_runs):
    for a, b in zip(soft_runs["coso_w1"][0], soft_runs["entropy"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # ...and the soft backup really changes the run (the check can fail).
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(soft_runs["coso_soft"][0], soft_runs["coso_w1"][0]))


# ---------------------------------------------------------------------------------------------
# Real-scale options on a tiny model: LLaVA-NeXT inputs, LoRA, a bf16 base, remat.
def test_lora_bf16_remat_llava_next_run_trains_adapters_only_and_resumes(tmp_path):
    from flax import nnx

    from coso_jax.models import lora

    cfg = ppo_preset("tiny_cpu", **{**TINY, "sft_episodes": 8, "sft_epochs": 2, "sft_batch_size": 8,
                                    "model_preset": "tiny_next", "image_size": 32, "patch_size": 8,
                                    "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
                                    "param_dtype": "bfloat16", "compute_dtype": "bfloat16", "remat": True,
                                    "total_env_steps": 32, "checkpoint_every": 1,
                                    "sft_dir": str(tmp_path / "sft")})
    a = PPOTrainer(cfg, tmp_path / "a")
    try:
        model = nnx.merge(a.graphdef, a.params, a.frozen)
        assert lora.lora_config(model) is not None
        trainable = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(a.params)[0]]
        assert trainable and all("lora" in str(p) or "value_head" in str(p) for p, _ in trainable)
        assert {str(x.dtype) for x in jax.tree.leaves(a.frozen) if hasattr(x, "dtype")} >= {"bfloat16"}
        base_before = [np.asarray(x) for x in jax.tree.leaves(a.frozen)]
        history = a.train()
        assert "image_sizes" in a.last_batch  # LLaVA-NeXT's sizes reached the update
        for before, after in zip(base_before, jax.tree.leaves(a.frozen)):
            np.testing.assert_array_equal(before, np.asarray(after))  # the base never moves
        assert all(np.isfinite(r["ppo/loss"]) and r["ppo/skipped_minibatches"] == 0 for r in history)
        adapters = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(a.params)[0] if "lora_b" in str(p)]
        assert max(float(np.abs(x).max()) for x in adapters) > 0  # B starts at 0: the adapters learned
        final = [np.asarray(x) for x in jax.tree.leaves(a.params)]
        # Checkpoints hold the trainable state only (adapters, value head), not the base.
        ckpt_dir = tmp_path / "a" / "checkpoints" / "2" / "params"
        ckpt_bytes = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
        base_bytes = sum(x.nbytes for x in base_before)
        assert ckpt_bytes < base_bytes
    finally:
        a.close()
    # Resume at iteration 1 and redo iteration 2: the same adapters.
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    b = PPOTrainer(cfg, tmp_path / "b", resume=True, resume_step=1)
    try:
        b.train()
        for x, y in zip(final, jax.tree.leaves(b.params)):
            np.testing.assert_allclose(x, np.asarray(y), rtol=1e-5, atol=1e-6)
    finally:
        b.close()
