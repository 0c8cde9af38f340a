"""DigiRLConfig (DigiRL off2on on the web suites) and its presets."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from coso_jax.rl.config.base import (
    ALGOS,
    CRITIC_TRUNKS,
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
    _build,
    _Composed,
    _non_negative,
    _positive,
    _unit_interval,
)


# ==============================================================================================
# DigiRL on the web suites
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class DigiRLConfig(_Composed):
    """One DigiRL run. Defaults are DigiRL's reference config (scripts/config/main/default.yaml)
    where it has a value; `digirl_preset("tiny_cpu")` shrinks sizes and counts for a CPU."""

    env: str = "web/general"
    tasks: tuple[str, ...] | None = None  # a subset of the suite's tasks (None: all of them)
    algo: str = "coso"
    preset: str = "paper"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(
        classifier_preset="reference", max_new_tokens=128, temperature=1.0))
    causal: CausalConfig = dataclasses.field(default_factory=lambda: CausalConfig(
        alpha=1.0, lr=1e-5, pretrain_steps=500, replay_capacity=100_000))  # the CoSo fork's entropy_coeff
    sft: SFTConfig = dataclasses.field(default_factory=lambda: SFTConfig(episodes=64, epochs=3, lr=1e-4))
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(
        success_window=64, checkpoint_every=3, heatmap_every=10))  # DigiRL save_freq 3
    policy_family: str = "llava"  # "t5": AutoUI's T5 encoder-decoder with gated image fusion

    # Web envs.
    history_actions: int = 3  # earlier actions shown in the prompt (most recent last)
    # Tap targets in the prompt: the page's first K clickable elements, each as its label and the
    # [y, x] point to tap (coso_jax.envs.web.autoui.tap_targets); the demonstrations tap those points.
    # 0 (off) by default: the paper's policy reads targets off the screenshot. tiny_cpu turns it on,
    # as its gym_cards runs put state the image does not show in the prompt.
    prompt_elements: int = 0
    screen_scale: int = 2  # browser device scale factor (screenshots 210s x 160s)
    num_envs: int = 4  # DigiRL: 4 parallel emulators
    trajectories_per_iteration: int = 16  # rollout_size
    horizon: int | None = None  # None: the suite's (10 general, 20 shopping)
    max_browsers: int = 12  # browsers kept open across tasks (each ~0.5 GB)

    # DigiRL.
    gamma: float = 0.5
    lr: float = 1e-4
    critic_lr: float = 1e-4
    max_grad_norm: float = 0.01
    replay_capacity: int = 2000  # transitions
    actor_epochs: int = 20
    actor_batch: int = 128  # batch 4 x grad_accum 32
    critic_epochs: int = 5
    critic_batch: int = 128
    trajectory_critic_epochs: int = 5
    advantage_offset: float = 0.05
    filter_quantile: float = 0.9  # keep trajectories scoring >= this quantile (top 10%)
    critic_trunk: str = "separate"
    critic_hidden: int = 128
    max_skipped_updates: int = 3

    # Parity with the CoSo/DigiRL reference (docs/deviations.md). Offline stage as the reference and the
    # paper (the bonus is online-only; trajectories ranked by return alone):
    offline_filter: str = "reward"  # "critic": return - V_traj, as online
    offline_entropy: bool = False  # True: the soft-RL bonus in offline actor updates too
    # Kept ours, with the reference's behaviour one switch away:
    drop_unparseable: bool = False  # True: unparseable rows leave both actor means (the reference's intent)
    reference_entropy_averaging: bool = False  # True: mean(S) * mean(1/n), the reference's broadcast
    logprob_floor: float | None = None  # 1e-10: token probabilities floored as the reference
    # CoSo's soft policy evaluation: the advantage's r + MC and the filter's returns on r_t + alpha * H_B(y_t).
    soft_backup: bool = False

    # off2on schedule (iterations).
    offline_actor_iterations: int = 30
    offline_critic_iterations: int = 20
    online_iterations: int = 400
    offline_episodes_per_task: int = 76  # 608 general-off2on trajectories / 8 tasks
    offline_imperfect_frac: float = 0.3  # random taps in the offline data, so some trajectories fail
    eval_episodes: int = 96  # the suite's fixed test episodes used by `evaluate`

    _RENAMES: ClassVar[dict[str, str]] = {"causal.alpha": "alpha", "sft.episodes": "sft_episodes_per_task"}
    _NOT_APPLICABLE: ClassVar[frozenset[str]] = frozenset({"sft.imperfect_frac"})
    _START_FIELDS: ClassVar[tuple[str, ...]] = (
        "env", "tasks", "model_preset", "hf_dir", "image_size", "patch_size", "vocab_size", "cot", "brief_prompt",
        "history_actions", "prompt_elements", "prompt_template", "classifier_preset", "max_new_tokens", "screen_scale",
        "horizon", "sft_episodes_per_task", "sft_epochs", "sft_lr", "sft_batch_size",
        "causal_pretrain_steps", "causal_lr", "causal_minibatch", "offline_episodes_per_task",
        "offline_imperfect_frac", "policy_family")
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = (
        "prompt_margin", "prompt_elements", "causal_chunk_size", "policy_family", "max_skipped_updates", "offline_filter",
        "offline_entropy", "drop_unparseable", "reference_entropy_averaging", "logprob_floor", "soft_backup",
        "lora_rank", "lora_alpha", "lora_dropout", "train_vision", "param_dtype", "compute_dtype", "remat",
        "random_weights", "text_layers", "vision_layers")
    _RESUME_IGNORE: ClassVar[tuple[str, ...]] = (
        "progress", "checkpoint_every", "keep_checkpoints", "heatmap_every", "online_iterations",
        "eval_episodes", "max_skipped_updates", "sft_dir")

    def __post_init__(self) -> None:
        self._coerce_fields()
        validate_digirl(self)

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return DigiRLConfig().to_flat_dict()

    def start_fields(self) -> dict[str, Any]:
        fields = super().start_fields()
        if self.prompt_elements > 0 and self.offline_episodes_per_task > 0 and self.offline_imperfect_frac > 0:
            # The offline data's random taps land on listed targets (solvers.random_tap, 2026-12-01); a start
            # cached before holds random screen points, so it must not be re-used. Starts without listed
            # targets keep their fingerprints.
            fields["offline_random_taps"] = "listed_targets"
        return fields

    @property
    def backbone(self) -> str:
        return "digirl"

    @property
    def suite(self) -> str:
        return self.env.split("/")[-1]

    @property
    def task_names(self) -> tuple[str, ...]:
        from coso_jax.envs.web import get_suite

        return tuple(self.tasks) if self.tasks else get_suite(self.suite).task_names

    @property
    def offline_iterations(self) -> int:
        return max(self.offline_actor_iterations, self.offline_critic_iterations)

    @property
    def num_iterations(self) -> int:
        return self.offline_iterations + self.online_iterations


def validate_digirl(config: DigiRLConfig) -> None:
    """Raises ConfigError naming the first bad field."""
    if config.env not in WEB_ENVS:
        hint = " (the gym_cards games and ALFWorld train with the PPO backbone)" if config.env in PPO_ENVS else ""
        raise ConfigError(f"env must be one of {WEB_ENVS} for the DigiRL backbone, got {config.env!r}{hint}")
    if config.preset not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}, got {config.preset!r}")
    if config.tasks is not None:
        from coso_jax.envs.web import get_suite

        known = get_suite(config.env).task_names
        bad = [t for t in config.tasks if t not in known]
        if not config.tasks or bad:
            raise ConfigError(f"tasks must be a non-empty subset of the {config.env} suite {known}, got {config.tasks}")
    if config.algo not in ALGOS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {config.algo!r}")
    if config.critic_trunk not in CRITIC_TRUNKS:
        raise ConfigError(f"critic_trunk must be one of {CRITIC_TRUNKS}, got {config.critic_trunk!r}")
    model = config.model
    if model.lora_rank or model.param_dtype != "float32" or model.compute_dtype != "float32" or model.remat:
        raise ConfigError("LoRA, bf16 and remat (lora_rank, param_dtype, compute_dtype, remat) are wired into the "
                          "PPO backbone only; the DigiRL backbone trains its policy in full, in float32")
    if config.offline_filter not in OFFLINE_FILTERS:
        raise ConfigError(f"offline_filter must be one of {OFFLINE_FILTERS}, got {config.offline_filter!r}")
    if config.logprob_floor is not None and not 0.0 < config.logprob_floor < 1.0:
        raise ConfigError(f"logprob_floor must be in (0, 1) or null, got {config.logprob_floor}")
    if config.policy_family not in POLICY_FAMILIES:
        raise ConfigError(f"policy_family must be one of {POLICY_FAMILIES}, got {config.policy_family!r}")
    _positive(config, "num_envs", "trajectories_per_iteration", "replay_capacity", "actor_epochs", "actor_batch",
              "critic_epochs", "critic_batch", "trajectory_critic_epochs", "critic_hidden", "max_browsers",
              "max_skipped_updates")
    _non_negative(config, "offline_actor_iterations", "offline_critic_iterations", "online_iterations",
                  "offline_episodes_per_task", "history_actions", "eval_episodes", "prompt_elements")
    if config.horizon is not None and config.horizon < 1:
        raise ConfigError(f"horizon must be >= 1 or None, got {config.horizon}")
    _unit_interval(config, "gamma", "filter_quantile", "offline_imperfect_frac")
    if config.screen_scale not in (1, 2, 3, 4):
        raise ConfigError(f"screen_scale must be 1..4, got {config.screen_scale}")
    if config.num_iterations < 1:
        raise ConfigError("a DigiRL run needs at least one iteration: set online_iterations or the offline ones > 0")
    if config.offline_iterations > 0 and config.offline_episodes_per_task == 0:
        raise ConfigError("offline iterations need offline trajectories: set offline_episodes_per_task > 0, or "
                          "offline_actor_iterations = offline_critic_iterations = 0 for a purely online run")


_DIGIRL_TINY: dict[str, Any] = dict(
    classifier_preset="tiny", screen_scale=1, history_actions=2, prompt_elements=8,
    num_envs=4, trajectories_per_iteration=8, horizon=5, max_new_tokens=80, max_browsers=10,
    temperature=0.5, actor_epochs=8, actor_batch=16, critic_epochs=3, critic_batch=32,
    trajectory_critic_epochs=3, critic_hidden=64, lr=1e-4, critic_lr=1e-3,
    offline_actor_iterations=2, offline_critic_iterations=2, online_iterations=6,
    offline_episodes_per_task=4, offline_imperfect_frac=0.5, alpha=0.05, causal_lr=1e-3, causal_batch=256,
    causal_minibatch=256, causal_pretrain_steps=100, causal_replay_capacity=8192,
    sft_episodes_per_task=24, sft_epochs=20, sft_lr=2e-3, sft_batch_size=32,
    eval_episodes=16, success_window=32, checkpoint_every=2, heatmap_every=4,
)


def digirl_preset(name: str, **overrides: Any) -> DigiRLConfig:
    """`paper`: DigiRL's reference numbers (meant for a real policy on an accelerator).

    `tiny_cpu`: a tiny LLaVA from scratch, 1x screenshots, 5-step horizon, 8 trajectories per
    iteration, 8 actor epochs of 16 transitions, 2 offline + 6 online iterations, temperature 0.5
    (at 1.0 the tiny behaviour-cloned policy writes almost no parseable action), and the page's first
    8 tap targets (label and [y, x] point) in the prompt, which a 64-px screenshot cannot show
    (`prompt_elements`; the start's success on the 96 general test episodes before any RL: 0.18 with
    them, 0.10 without): a full off2on run in minutes on two CPU cores (the behaviour-cloned start is
    built once, ~5 minutes unloaded).
    Raises ConfigError for an unknown preset or field, or a bad value.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown DigiRL preset {name!r}; choose one of {PRESETS}")
    values: dict[str, Any] = {"preset": name}
    if name == "tiny_cpu":
        values.update(_DIGIRL_TINY)
    values.update(overrides)
    return _build(DigiRLConfig, values)
