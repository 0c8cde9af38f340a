"""Configuration of an online training run (PPO backbone, algos none | entropy | coso).

A `TrainConfig` is a plain frozen dataclass: the launcher builds one from a preset and flag
overrides, and library code only ever reads it (no flags or globals below `experiments/`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

ALGOS = ("none", "entropy", "coso")
GYM_CARDS_ENVS = ("NumberLine", "EZPoints", "Points24", "Blackjack")
SUPPORTED_ENVS = GYM_CARDS_ENVS + ("ALFWorld",)
PRESETS = ("tiny_cpu", "paper")

Algo = Literal["none", "entropy", "coso"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one online run needs. Defaults are the `tiny_cpu` preset."""

    # What to train on.
    env: str = "NumberLine"
    algo: str = "coso"
    seed: int = 0
    preset: str = "tiny_cpu"

    # Policy model. `model_preset` names a tiny LLaVA built from scratch; `hf_dir` loads a local
    # Hugging Face LLaVA checkpoint instead (then the tokenizer is read from the same directory).
    model_preset: str = "tiny"
    hf_dir: str | None = None
    image_size: int = 64  # observation side after resizing for the vision tower
    patch_size: int = 16  # tiny ViT patch: (64 / 16)^2 = 16 image tokens
    vocab_size: int = 1024  # size of the offline BPE built from the env's prompts and demos
    cot: bool = True  # chain-of-thought prompt (RL4VLM default)
    prompt_template: str = "tiny"  # see coso_jax.rl.prompting.TEMPLATES
    brief_prompt: bool = True  # short prompts for tiny models trained from scratch (paper: False)
    classifier_preset: str = "tiny"  # "reference": hidden 128, 4 heads, 3 layers, FFN 512
    prompt_margin: int = 24  # prompt length P = longest demonstration prompt + this many tokens

    # ALFWorld only (ignored by the gym_cards games): one task type (full name or alias, e.g. "pick")
    # or None for all six; games per task type in the training pool (pool seeds 0..size-1, cached
    # under $COSO_ALFWORLD_CACHE, see coso_jax/envs/alfworld/pools.py).
    alfworld_task_type: str | None = None
    alfworld_pool_size: int = 100

    # Rollout.
    num_envs: int = 16
    steps_per_update: int = 128  # env steps per PPO update, over all envs together
    total_env_steps: int = 2048
    max_new_tokens: int = 48
    temperature: float = 0.5
    top_p: float = 1.0

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

    # Soft RL.
    alpha: float = 0.01  # entropy coefficient (entropy and coso)

    # Causal classifier (CoSo's SCM approximation).
    causal_window: int = 4
    causal_lr: float = 1e-3
    causal_batch: int = 1024  # actions sampled from the replay buffer per online update
    causal_epochs: int = 2
    causal_minibatch: int = 512
    causal_pretrain_steps: int = 100
    causal_replay_capacity: int = 8192  # the paper preset uses the reference 100,000
    causal_chunk_size: int | None = None

    # SFT warm start on oracle demonstrations.
    sft_episodes: int = 300
    sft_imperfect_frac: float = 0.3
    sft_epochs: int = 10  # fewer leave the tiny decoder unable to copy the state into its thoughts
    sft_lr: float = 1e-3
    sft_batch_size: int = 32
    sft_dir: str | None = None  # where the shared SFT start is cached (default: <workdir>/../sft)

    # Bookkeeping.
    success_window: int = 200  # RL4VLM: success over the last 200 episodes (Blackjack: 1000)
    # Iterations between checkpoints. Each save costs ~1 s of a 2-core CPU's time at tiny_cpu (async, but it
    # competes with training): 4 keeps a resume within ~15 s of work and a 16-iteration run ~10 s faster than 2.
    checkpoint_every: int = 4
    keep_checkpoints: int = 3
    heatmap_every: int = 5  # iterations
    mesh: str = "data:1"  # e.g. "data:8" or "data:2,fsdp:4"
    progress: bool = True

    def __post_init__(self) -> None:
        validate(self)

    @property
    def env_id(self) -> str:
        return f"coso_jax/{self.env}-v0"

    @property
    def steps_per_env(self) -> int:
        return self.steps_per_update // self.num_envs

    @property
    def num_updates(self) -> int:
        return max(self.total_env_steps // self.steps_per_update, 1)

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `gym.make(self.env_id, ...)` (none for the gym_cards games)."""
        if self.env == "ALFWorld":
            return {"task_type": self.alfworld_task_type, "pool_size": self.alfworld_pool_size}
        return {}

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(config: TrainConfig) -> None:
    """Raises ValueError naming the first bad field."""
    if config.algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {config.algo!r}")
    if config.env not in SUPPORTED_ENVS:
        raise ValueError(f"env must be one of {SUPPORTED_ENVS}, got {config.env!r}")
    if config.alfworld_task_type is not None:
        from coso_jax.envs.alfworld.generator import task_type_name

        try:
            task_type_name(config.alfworld_task_type)
        except (KeyError, ValueError) as e:
            raise ValueError(f"alfworld_task_type: {e}") from None
    if config.alfworld_pool_size < 1:
        raise ValueError(f"alfworld_pool_size must be >= 1, got {config.alfworld_pool_size}")
    if config.prompt_margin < 0:
        raise ValueError(f"prompt_margin must be >= 0, got {config.prompt_margin}")
    if config.alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {config.alpha}")
    if config.num_envs < 1 or config.steps_per_update % config.num_envs:
        raise ValueError(
            f"steps_per_update ({config.steps_per_update}) must be a positive multiple of "
            f"num_envs ({config.num_envs})"
        )
    if config.steps_per_update % config.minibatch_size:
        raise ValueError(
            f"steps_per_update ({config.steps_per_update}) must be a multiple of "
            f"minibatch_size ({config.minibatch_size})"
        )
    if config.minibatch_size % config.grad_accum_steps:
        raise ValueError(
            f"minibatch_size ({config.minibatch_size}) must be a multiple of "
            f"grad_accum_steps ({config.grad_accum_steps})"
        )
    if not 0.0 < config.temperature:
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    if not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if not 0.0 <= config.sft_imperfect_frac <= 1.0:
        raise ValueError(f"sft_imperfect_frac must be in [0, 1], got {config.sft_imperfect_frac}")
    if config.causal_window < 1:
        raise ValueError(f"causal_window must be >= 1, got {config.causal_window}")
    if config.max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2, got {config.max_new_tokens}")
    parse_mesh(config.mesh)


def parse_overrides(items: list[str] | tuple[str, ...], fields: Any = None) -> dict[str, Any]:
    """Parses ``name=value`` strings (e.g. from a repeatable ``--set`` flag) into config overrides.

    Values are read as JSON when they parse (numbers, true/false, null), else kept as strings.
    ``fields``: the allowed names (default: TrainConfig's fields; e.g. DigiRLConfig's).
    Raises ValueError naming the item when it is not ``name=value`` or names no such field.
    """
    import json

    fields = TrainConfig.__dataclass_fields__ if fields is None else fields
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected name=value with name one of the config's fields "
                             f"({', '.join(sorted(fields))})")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


def parse_mesh(spec: str) -> dict[str, int]:
    """Parses "data:8" / "data:2,fsdp:4" into an ordered {axis: size} dict."""
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep or name not in ("data", "fsdp") or not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"bad mesh spec {spec!r}: expected comma-separated axis:size with axes 'data' "
                "and/or 'fsdp', e.g. 'data:8' or 'data:2,fsdp:4'"
            )
        if name in axes:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        axes[name] = int(size)
    return axes


# Per-env defaults under a preset's own values and above TrainConfig's (explicit overrides win).
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


def preset(name: str, **overrides: Any) -> TrainConfig:
    """Returns a named preset with overrides applied.

    `tiny_cpu`: a tiny LLaVA trained from scratch that runs SFT + online RL on this CPU in minutes.
    `paper`: RL4VLM's PPO numbers (gamma 0.9, GAE 0.95, clip 0.1, lambda 0.5, temperature 0.2,
    lr 1e-5 cosine, 512 steps per update (1024 for EZPoints/Points24), 15k env steps); meant for a
    real LLaVA (`hf_dir`) on an accelerator.

    Per-env defaults (explicit overrides win): Points24 (tiny_cpu): `max_new_tokens` 64.
      EZPoints (tiny_cpu): `sft_epochs` 3, so the SFT start leaves room to improve (~31% vs 97%).
      ALFWorld: `thought_coef` 0.2 (RL4VLM's lambda for ALFWorld, every algo); `prompt_margin` 256
      tokens (tiny_cpu) / 512 (paper) over the longest demonstration prompt, since prompts off the
      expert's path list more commands and longer observations; `max_new_tokens` 64 (tiny_cpu; the
      paper preset keeps 256). `alfworld_task_type` None trains on all six task types.
    """
    env = overrides.get("env", TrainConfig.env)
    env_defaults = _ENV_DEFAULTS.get((name, env), {})
    if name == "tiny_cpu":
        return TrainConfig(**{"preset": name, **env_defaults, **overrides})
    if name == "paper":
        steps = 1024 if env in ("EZPoints", "Points24") else 512
        base: dict[str, Any] = dict(
            preset=name,
            model_preset="llava_1_6_mistral_7b",
            prompt_template="mistral_instruct",
            brief_prompt=False,
            classifier_preset="reference",
            image_size=336,
            patch_size=14,
            vocab_size=32064,
            # RL4VLM steps one env per GPU process; batched sampling makes several envs cheaper.
            num_envs=8,
            steps_per_update=steps,
            total_env_steps=15_000,
            max_new_tokens=256,
            temperature=0.2,
            gamma=0.9,
            gae_lambda=0.95,
            clip_eps=0.1,
            value_clip_eps=0.1,
            thought_coef=0.5,
            ppo_epochs=4,
            minibatch_size=128,
            grad_accum_steps=128,
            lr=1e-5,
            lr_min=1e-9,
            lr_decay_updates=25,
            sft_epochs=3,
            max_grad_norm=0.01,
            causal_lr=1e-5,
            causal_pretrain_steps=500,
            causal_replay_capacity=100_000,
            success_window=1000 if env == "Blackjack" else 200,
        )
        base.update(env_defaults)
        base.update(overrides)
        return TrainConfig(**base)
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
