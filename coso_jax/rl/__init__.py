"""Online RL tuning of VLM agents with CoSo: configs, the run scaffold, the soft-RL term and the two
backbones. The layout, one line a module (docs/design.md has the why):

  config.py       ModelConfig / CausalConfig / SFTConfig / RunConfig sections; PPOConfig, DigiRLConfig;
                  presets; fingerprints; `--set` parsing
  run.py          the run scaffold: work directory, lock, checkpoints, resume, metrics, loop, keys
  causal_term.py  none | entropy | coso: entropy weights and CoSo's classifier, replay and step
  start.py        the cached warm start's bookkeeping (fingerprint, tokenizer, weights, SFT)
  policy.py       building the policy VLM, its prompt encoder and the classifier
  prompting.py    prompts -> left-padded ids with image tokens
  text.py         token offsets and thought/action masks of answers
  sft.py          demonstrations and supervised fine-tuning
  episodes.py     the episode runner and the PPO rollout (VectorRollout)
  buffers.py      RolloutBuffer, ActionReplay
  sharding.py     meshes and shardings, multi-host initialisation
  distributed.py  rows across processes (partition-major layout, global/local rows, allgather)
  ppo/            RL4VLM's PPO: start, jitted update, PPOTrainer
  digirl/         DigiRL: losses, critics, replay, web episodes, policy families, start, steps, trainer

Public API (lazy: importing `coso_jax.rl` does not import jax's trainers until used).
"""
from __future__ import annotations

from typing import Any

from coso_jax.rl.config import (
    ALGOS,
    BACKBONES,
    PPO_ENVS,
    PRESETS,
    WEB_ENVS,
    CausalConfig,
    ConfigError,
    DigiRLConfig,
    ModelConfig,
    PPOConfig,
    RunConfig,
    SFTConfig,
    digirl_preset,
    parse_overrides,
    ppo_preset,
    preset,
)

__all__ = [
    "ALGOS", "BACKBONES", "PPO_ENVS", "PRESETS", "WEB_ENVS",
    "CausalConfig", "ConfigError", "DigiRLConfig", "ModelConfig", "PPOConfig", "RunConfig", "SFTConfig",
    "digirl_preset", "parse_overrides", "ppo_preset", "preset",
    "PPOTrainer", "DigiRLTrainer", "CausalTerm", "Run", "RunError", "make_trainer",
]


def make_trainer(config: PPOConfig | DigiRLConfig, workdir, **kwargs: Any):
    """The trainer of `config`'s backbone (`PPOTrainer` or `DigiRLTrainer`)."""
    return __getattr__("PPOTrainer" if config.backbone == "ppo" else "DigiRLTrainer")(config, workdir, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "PPOTrainer":
        from coso_jax.rl.ppo.trainer import PPOTrainer
        return PPOTrainer
    if name == "DigiRLTrainer":
        from coso_jax.rl.digirl.trainer import DigiRLTrainer
        return DigiRLTrainer
    if name == "CausalTerm":
        from coso_jax.rl.causal_term import CausalTerm
        return CausalTerm
    if name in ("Run", "RunError"):
        from coso_jax.rl import run
        return getattr(run, name)
    raise AttributeError(f"module 'coso_jax.rl' has no attribute {name!r}")
