"""Configuration of online training runs: four shared sections composed by each backbone's config.

    ModelConfig   the policy VLM, its prompts and sampling        (both backbones)
    CausalConfig  the soft-RL coefficient and CoSo's classifier    (both backbones)
    SFTConfig     the cached warm start (SFT / behaviour cloning)  (both backbones)
    RunConfig     seed, bookkeeping cadences, progress bar         (both backbones)
    PPOConfig     RL4VLM's PPO on gym_cards / ALFWorld = the four sections + PPO and env fields
    DigiRLConfig  DigiRL off2on on the web suites  = the four sections + DigiRL and env fields

Every config is a frozen dataclass that library code only reads (no flags or globals below
`experiments/`). Presets (`ppo_preset`, `digirl_preset`) and per-env defaults live here, and so do
the fingerprints that decide whether a cached start or a checkpoint belongs to a config.

**Flat names.** Every field also has one flat name, the name it had before the sections existed:
model and run fields keep their own (`temperature`, `seed`), causal fields take `causal_`
(`causal_lr`; `alpha` stays `alpha`), SFT fields `sft_` (`sft_epochs`; DigiRL's episode count is
`sft_episodes_per_task`). Presets, `replace` and `--set` accept flat names and dotted ones
(`causal.lr`); `to_flat_dict` and the fingerprints use the flat names, so starts and checkpoints
written before the sections existed still match. A field added later is left out of a fingerprint
while it holds its default (`_LATER_FIELDS`).
"""
from __future__ import annotations

from typing import Any

from coso_jax.rl.config.base import (
    ALGOS,
    BACKBONES,
    CRITIC_TRUNKS,
    GYM_CARDS_ENVS,
    OFFLINE_FILTERS,
    POLICY_FAMILIES,
    PPO_ENVS,
    PRESETS,
    WEB_ENVS,
    CausalConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    SFTConfig,
    field_differences,
    parse_mesh,
    parse_overrides,
)
from coso_jax.rl.config.digirl import DigiRLConfig, digirl_preset, validate_digirl
from coso_jax.rl.config.ppo import PPOConfig, ppo_preset, validate_ppo

__all__ = [
    "ALGOS", "BACKBONES", "CRITIC_TRUNKS", "GYM_CARDS_ENVS", "OFFLINE_FILTERS", "POLICY_FAMILIES", "PPO_ENVS",
    "PRESETS", "WEB_ENVS", "CausalConfig", "ConfigError", "DigiRLConfig", "ModelConfig", "PPOConfig", "RunConfig",
    "SFTConfig", "digirl_preset", "field_differences", "parse_mesh", "parse_overrides", "ppo_preset", "preset",
    "validate_digirl", "validate_ppo",
]


def preset(name: str, backbone: str = "ppo", **overrides: Any) -> PPOConfig | DigiRLConfig:
    """`ppo_preset` or `digirl_preset` by `backbone`."""
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return (ppo_preset if backbone == "ppo" else digirl_preset)(name, **overrides)
