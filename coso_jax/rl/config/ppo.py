"""PPOConfig (RL4VLM's PPO on gym_cards and ALFWorld), its presets and per-env defaults."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from coso_jax.rl.config.base import (
    ALGOS,
    PPO_ENVS,
    PRESETS,
    WEB_ENVS,
    CausalConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    SFTConfig,
    _build,
    _Composed,
    _positive,
    _unit_interval,
    parse_mesh,
)


# ==============================================================================================
# PPO (RL4VLM) on gym_cards and ALFWorld
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class PPOConfig(_Composed):
    """One PPO run (RL4VLM's backbone). Defaults are the `tiny_cpu` preset's."""

    env: str = "NumberLine"
    algo: str = "coso"
    preset: str = "tiny_cpu"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    causal: CausalConfig = dataclasses.field(default_factory=CausalConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    # ALFWorld only (ignored by the gym_cards games): one task type (full name or alias, e.g. "pick")
    # or None for all six; games per task type in the training pool (pool seeds 0..size-1, cached
    # under $COSO_ALFWORLD_CACHE, see coso_jax/envs/alfworld/pools.py).
    alfworld_task_type: str | None = None
    alfworld_pool_size: int = 100

    # Rollout.
    num_envs: int = 16
    steps_per_update: int = 128  # env steps per PPO update, over all envs together
    total_env_steps: int = 2048

    # PPO (RL4VLM).
    gamma: float = 0.9
    gae_lambda: float = 0.95
    clip_eps: float = 0.1
    value_clip_eps: float = 0.1
    value_coef: float = 0.5
    thought_coef: float = 0.5  # lambda: CoT log-prob scale on thought tokens
    ppo_epochs: int = 2
    minibatch_size: int = 32
    grad_accum_steps: int = 1  # micro-batches per optimizer step inside one minibatch
    lr: float = 1e-4
    lr_min: float = 1e-9
    lr_decay_updates: int = 16  # cosine annealing horizon, in PPO updates (RL4VLM: T_max 25)
    adam_eps: float = 1e-7
    max_grad_norm: float = 1.0
    mesh: str = "data:1"  # e.g. "data:8" or "data:2,fsdp:4"
    # Consecutive updates in which every minibatch was skipped (non-finite loss or gradients) that stop
    # the run with an error.
    max_skipped_updates: int = 3
    # RL4VLM's gym-cards behaviour where ours differs (docs/deviations.md): Points24's float powers,
    # Blackjack's off-image fifth card.
    points_allow_fractional_powers: bool = False
    blackjack_reference_render: bool = False
    # CoSo's soft policy evaluation (paper Sec. 4.2): GAE on r_t + alpha * H_B(y_t), so the value head
    # learns the soft value. Off: the reference code's shortcut (the bonus in the actor loss only).
    soft_backup: bool = False
    # Env groups of a multi-process run (one or more per process; the rollout batch is laid out group by
    # group). A single process set to P reproduces a P-process run exactly.
    env_partitions: int = 1

    _START_FIELDS: ClassVar[tuple[str, ...]] = (
        "env", "model_preset", "hf_dir", "image_size", "patch_size", "vocab_size", "cot", "brief_prompt",
        "prompt_template", "classifier_preset", "max_new_tokens",
        "sft_episodes", "sft_imperfect_frac", "sft_epochs", "sft_lr", "sft_batch_size",
        "causal_pretrain_steps", "causal_lr", "causal_minibatch",
        "points_allow_fractional_powers", "blackjack_reference_render",
        # ALFWorld's demonstrations play games of this task type and pool; left out (at their default)
        # for the gym_cards games, whose fingerprints predate them.
        "alfworld_task_type", "alfworld_pool_size",
        "param_dtype", "compute_dtype", "random_weights", "text_layers", "vision_layers",
    )
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = (
        "prompt_margin", "alfworld_task_type", "alfworld_pool_size", "max_skipped_updates",
        "points_allow_fractional_powers", "blackjack_reference_render", "soft_backup", "env_partitions",
        "lora_rank", "lora_alpha", "lora_dropout", "train_vision", "param_dtype", "compute_dtype", "remat",
        "random_weights", "text_layers", "vision_layers")
    # Bookkeeping, and where the start is cached (its content is checked by the start's own fingerprint),
    # so a moved or renamed grid still resumes.
    _RESUME_IGNORE: ClassVar[tuple[str, ...]] = (
        "progress", "checkpoint_every", "keep_checkpoints", "heatmap_every", "total_env_steps",
        "max_skipped_updates", "sft_dir")

    def __post_init__(self) -> None:
        self._coerce_fields()
        validate_ppo(self)

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return PPOConfig().to_flat_dict()

    def start_fields(self) -> dict[str, Any]:
        fields = super().start_fields()
        alfworld = ("alfworld_task_type", "alfworld_pool_size")
        for name in alfworld:  # always part of an ALFWorld start, never of a gym_cards one
            fields.pop(name, None)
        if self.env == "ALFWorld":
            fields.update({name: self.get(name) for name in alfworld})
        return fields

    @property
    def backbone(self) -> str:
        return "ppo"

    @property
    def env_id(self) -> str:
        return f"coso_jax/{self.env}-v0"

    @property
    def steps_per_env(self) -> int:
        return self.steps_per_update // self.num_envs

    @property
    def num_iterations(self) -> int:
        return self.total_env_steps // self.steps_per_update

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `gym.make(self.env_id, ...)`: ALFWorld's task type and pool; the
        RL4VLM-parity switches of the games that have them (only where set, so the defaults make the
        same envs as before the switches existed)."""
        if self.env == "ALFWorld":
            return {"task_type": self.alfworld_task_type, "pool_size": self.alfworld_pool_size}
        if self.env in ("Points24", "EZPoints") and self.points_allow_fractional_powers:
            return {"allow_fractional_powers": True}
        if self.env == "Blackjack" and self.blackjack_reference_render:
            return {"reference_render": True}
        return {}


def validate_ppo(config: PPOConfig) -> None:
    """Raises ConfigError naming the first bad field."""
    if config.algo not in ALGOS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {config.algo!r}")
    if config.env not in PPO_ENVS:
        hint = " (the web suites train with the DigiRL backbone)" if config.env in WEB_ENVS else ""
        raise ConfigError(f"env must be one of {PPO_ENVS}, got {config.env!r}{hint}")
    if config.preset not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}, got {config.preset!r}")
    if config.alfworld_task_type is not None:
        from coso_jax.envs.alfworld.generator import task_type_name

        try:
            task_type_name(config.alfworld_task_type)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"alfworld_task_type: {e}") from None
    _positive(config, "alfworld_pool_size", "num_envs", "steps_per_update", "minibatch_size", "grad_accum_steps",
              "ppo_epochs", "max_skipped_updates")
    if config.steps_per_update % config.num_envs:
        raise ConfigError(f"steps_per_update ({config.steps_per_update}) must be a multiple of "
                          f"num_envs ({config.num_envs})")
    _positive(config, "env_partitions")
    if config.num_envs % config.env_partitions:
        raise ConfigError(f"num_envs ({config.num_envs}) must be a multiple of env_partitions "
                          f"({config.env_partitions})")
    if config.steps_per_update % config.minibatch_size:
        raise ConfigError(f"steps_per_update ({config.steps_per_update}) must be a multiple of "
                          f"minibatch_size ({config.minibatch_size})")
    if config.minibatch_size % config.grad_accum_steps:
        raise ConfigError(f"minibatch_size ({config.minibatch_size}) must be a multiple of "
                          f"grad_accum_steps ({config.grad_accum_steps})")
    if config.total_env_steps < config.steps_per_update:
        raise ConfigError(f"total_env_steps ({config.total_env_steps}) is less than one update of "
                          f"steps_per_update ({config.steps_per_update}) env steps: raise total_env_steps")
    _unit_interval(config, "gamma", "gae_lambda")
    if not config.lr > 0:
        raise ConfigError(f"lr must be > 0, got {config.lr}")
    if not 0 <= config.lr_min <= config.lr:
        raise ConfigError(f"lr_min must be in [0, lr={config.lr}], got {config.lr_min}")
    if not config.max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm must be > 0, got {config.max_grad_norm}")
    parse_mesh(config.mesh)


# Per-env defaults under a preset's own values and above the dataclass defaults (explicit overrides win).
# ALFWorld: lambda 0.2 on thought tokens (RL4VLM's ALFWorld setting, for every algo); prompts list up
# to ~40 admissible commands and the observation text, which grows off the expert's path (a "look" or
# a full receptacle), so the prompt gets a wide margin over the demonstrations; the tiny preset's
# answers (thoughts + command) need 64 new tokens.
_ENV_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # Points24's answers (cards, formula, thoughts, action) run to 57 tokens with EOS.
    ("tiny_cpu", "Points24"): dict(max_new_tokens=64),
    # EZPoints after 10 SFT epochs already solved 97% of games (no exploration headroom: every algo
    # then only lost ground). 3 epochs start at ~31%, near the paper's 7B SFT start (23%).
    ("tiny_cpu", "EZPoints"): dict(sft_epochs=3),
    ("tiny_cpu", "ALFWorld"): dict(thought_coef=0.2, max_new_tokens=64, prompt_margin=256),
    ("paper", "ALFWorld"): dict(thought_coef=0.2, prompt_margin=512),
}

_PPO_PAPER: dict[str, Any] = dict(
    model_preset="llava_1_6_mistral_7b", prompt_template="mistral_instruct", brief_prompt=False,
    classifier_preset="reference", image_size=336, patch_size=14, vocab_size=32064,
    # RL4VLM steps one env per GPU process; batched sampling makes several envs cheaper.
    num_envs=8, total_env_steps=15_000, max_new_tokens=256, temperature=0.2,
    gamma=0.9, gae_lambda=0.95, clip_eps=0.1, value_clip_eps=0.1, thought_coef=0.5,
    ppo_epochs=4, minibatch_size=128, grad_accum_steps=128, lr=1e-5, lr_min=1e-9, lr_decay_updates=25,
    max_grad_norm=0.01, causal_lr=1e-5, causal_pretrain_steps=500, causal_replay_capacity=100_000,
    # RL4VLM's real-scale setting: start from an SFT'd checkpoint (--hf_dir) as it is, LoRA r128 / alpha
    # 256 / dropout 0.05 on the language model, a bf16 base, layer remat (docs/real_scale.md).
    sft_epochs=0, lora_rank=128, lora_alpha=256.0, lora_dropout=0.05, param_dtype="bfloat16",
    compute_dtype="bfloat16", remat=True,
)


def ppo_preset(name: str, **overrides: Any) -> PPOConfig:
    """A named PPO preset with overrides (flat or dotted names) applied.

    `tiny_cpu`: a tiny LLaVA trained from scratch that runs SFT + online RL on a CPU in minutes.
    `paper`: RL4VLM's PPO numbers (gamma 0.9, GAE 0.95, clip 0.1, lambda 0.5, temperature 0.2,
    lr 1e-5 cosine, 512 steps per update (1024 for EZPoints/Points24), 15k env steps) and its real-scale
    setting (LoRA r128 / alpha 256 / dropout 0.05 on the language model, bf16 base, layer remat, the
    `hf_dir` checkpoint as the start without further SFT); meant for a real LLaVA on an accelerator.

    Per-env defaults (explicit overrides win): Points24 (tiny_cpu): `max_new_tokens` 64.
      EZPoints (tiny_cpu): `sft_epochs` 3, so the SFT start leaves room to improve (~31% vs 97%).
      ALFWorld: `thought_coef` 0.2 (RL4VLM's lambda for ALFWorld, every algo); `prompt_margin` 256
      tokens (tiny_cpu) / 512 (paper) over the longest demonstration prompt, since prompts off the
      expert's path list more commands and longer observations; `max_new_tokens` 64 (tiny_cpu; the
      paper preset keeps 256). `alfworld_task_type` None trains on all six task types.
    Raises ConfigError for an unknown preset or field, or a bad value.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {PRESETS}")
    env = overrides.get("env", PPOConfig.env)
    values: dict[str, Any] = {"preset": name}
    if name == "paper":
        values.update(_PPO_PAPER)
        values["steps_per_update"] = 1024 if env in ("EZPoints", "Points24") else 512
        values["success_window"] = 1000 if env == "Blackjack" else 200
    values.update(_ENV_DEFAULTS.get((name, env), {}))
    values.update(overrides)
    return _build(PPOConfig, values)
