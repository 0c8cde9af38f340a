"""Seed batching (coso_jax/rl/ppo/seed_batch.py): two seeds trained as one program equal their solo
runs (parameters within 1e-5: the batched programs round differently in the last bits), each with
its own work directory, metrics and checkpoints."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from test_ppo_trainer import tiny_config

from coso_jax import metrics as metrics_lib
from coso_jax.rl.config import ConfigError
from coso_jax.rl.ppo.seed_batch import SeedBatch
from coso_jax.rl.ppo.trainer import PPOTrainer


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.params)]


def test_each_seed_of_a_batch_equals_its_solo_run(rl_sft_dir, tmp_path):
    configs = [tiny_config(rl_sft_dir, total_env_steps=32, seed=s, checkpoint_every=1) for s in (0, 1)]
    batch = SeedBatch(configs, tmp_path / "batch")
    try:
        histories = batch.train()
        batched = [_params(t) for t in batch.trainers]
    finally:
        batch.close()
    for config, params, history in zip(configs, batched, histories):
        solo = PPOTrainer(config, tmp_path / f"solo_{config.run.seed}")
        try:
            solo_history = solo.train()
            for a, b in zip(params, _params(solo)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        finally:
            solo.close()
        assert [r["episodes"] for r in history] == [r["episodes"] for r in solo_history]
        records = metrics_lib.read_jsonl(tmp_path / "batch" / f"seed_{config.run.seed}" / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2]
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(batched[0], batched[1]))  # the seeds differ


def test_a_batch_is_one_config_on_one_device(rl_sft_dir, tmp_path):
    with pytest.raises(ConfigError, match="differ in their seed only"):
        SeedBatch([tiny_config(rl_sft_dir, seed=0), tiny_config(rl_sft_dir, seed=1, alpha=0.5)], tmp_path / "x")
    with pytest.raises(ConfigError, match="one device"):
        SeedBatch([tiny_config(rl_sft_dir, seed=0, mesh="data:2")], tmp_path / "y")
