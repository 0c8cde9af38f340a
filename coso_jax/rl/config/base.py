"""The machinery shared by every config: typed frozen dataclasses, the four sections both backbones
compose (model, causal, SFT, run), flat names, fingerprints, `--set` parsing and mesh specs.
See `coso_jax.rl.config` for the overview.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

from coso_jax.checkpoint import config_fingerprint

ALGOS = ("none", "entropy", "coso")
GYM_CARDS_ENVS = ("NumberLine", "EZPoints", "Points24", "Blackjack")
PPO_ENVS = GYM_CARDS_ENVS + ("ALFWorld",)
WEB_ENVS = ("web/general", "web/shopping")
BACKBONES = ("ppo", "digirl")
PRESETS = ("tiny_cpu", "paper")
CRITIC_TRUNKS = ("separate", "shared")
POLICY_FAMILIES = ("llava", "t5")
OFFLINE_FILTERS = ("critic", "reward")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


# ==============================================================================================
# Typed fields
# ==============================================================================================
def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """`value` as the field's type `tp`, or ConfigError("<name> must be <type>, got <value>")."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=globals())


class _Typed:
    """Dataclass mixin: fields are coerced to their annotated types on construction."""

    def _coerce_fields(self, prefix: str = "") -> None:
        hints = _resolved_types(type(self))
        for f in dataclasses.fields(self):
            if f.name not in hints or dataclasses.is_dataclass(hints[f.name]):
                continue
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(prefix + f.name, value, hints[f.name]))


def _positive(obj: Any, *names: str, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(obj, name)}")


def _non_negative(obj: Any, *names: str, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{prefix}{name} must be >= 0, got {getattr(obj, name)}")


def _unit_interval(obj: Any, *names: str, prefix: str = "") -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ConfigError(f"{prefix}{name} must be in [0, 1], got {getattr(obj, name)}")


# ==============================================================================================
# Shared sections
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class ModelConfig(_Typed):
    """The policy VLM, how prompts are built for it, how it samples and what of it trains.

    `model_preset` "tiny" (LLaVA-1.5 style) or "tiny_next" (LLaVA-NeXT style: anyres tiles and
    `image_sizes`) builds a tiny LLaVA from scratch on the start's own BPE; `hf_dir` loads a local
    Hugging Face LLaVA instead (the tokenizer is read from the same directory).

    Real scale (`coso_jax.models.lora`, the `paper` preset = RL4VLM's setting): `lora_rank` > 0 trains
    LoRA adapters (rank, alpha, dropout) on the language model's linear layers and the value head,
    with the rest frozen (`train_vision` also trains the vision tower and projector in full);
    `param_dtype` / `compute_dtype` "bfloat16" store and run the base in bf16 (adapters, value head,
    Adam state, logits and softmaxes stay float32); `remat` recomputes each decoder layer in the
    backward pass.
    """

    model_preset: str = "tiny"
    hf_dir: str | None = None
    image_size: int = 64  # observation side after resizing for the vision tower
    patch_size: int = 16  # tiny ViT patch: (64 / 16)^2 = 16 image tokens
    vocab_size: int = 1024  # size of the offline BPE built from the env's prompts and demos
    cot: bool = True  # chain-of-thought prompt (RL4VLM default)
    prompt_template: str = "tiny"  # see coso_jax.rl.prompting.TEMPLATES
    brief_prompt: bool = True  # short prompts for tiny models trained from scratch (paper: False)
    prompt_margin: int = 24  # prompt length P = longest demonstration prompt + this many tokens
    classifier_preset: str = "tiny"  # "reference": hidden 128, 4 heads, 3 layers, FFN 512
    max_new_tokens: int = 48
    temperature: float = 0.5
    top_p: float = 1.0
    lora_rank: int = 0  # 0: every parameter trains (full fine-tuning)
    lora_alpha: float = 256.0
    lora_dropout: float = 0.0
    train_vision: bool = False  # with LoRA: also train the vision tower and projector
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    # Benchmarks only: build a named real-size architecture (`model_preset`, e.g. "llava_1_6_mistral_7b")
    # with random weights instead of loading `hf_dir`; `text_layers` / `vision_layers` > 0 cut its depth.
    random_weights: bool = False
    text_layers: int = 0
    vision_layers: int = 0

    def __post_init__(self) -> None:
        self._coerce_fields()
        _positive(self, "image_size", "patch_size", "vocab_size")
        _non_negative(self, "text_layers", "vision_layers")
        _non_negative(self, "lora_rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        _non_negative(self, "prompt_margin")
        if self.max_new_tokens < 2:
            raise ConfigError(f"max_new_tokens must be >= 2, got {self.max_new_tokens}")
        if not self.temperature > 0.0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.classifier_preset not in ("tiny", "reference"):
            raise ConfigError(f"classifier_preset must be 'tiny' or 'reference', got {self.classifier_preset!r}")


@dataclasses.dataclass(frozen=True)
class CausalConfig(_Typed):
    """The soft-RL coefficient and CoSo's action-type classifier (paper Sec. 4; reference numbers
    in the `paper` presets: lr 1e-5, 1024 actions x 2 epochs per update, replay 100k)."""

    alpha: float = 0.01  # entropy coefficient (entropy and coso; none ignores it)
    window: int = 4  # positions masked together by the counterfactual kernel
    lr: float = 1e-3
    batch: int = 1024  # actions sampled from the replay per online update
    epochs: int = 2
    minibatch: int = 512  # pre-training minibatch
    pretrain_steps: int = 100
    replay_capacity: int = 8192
    chunk_size: int | None = None  # rows per kernel call (None: by bucket)

    def __post_init__(self) -> None:
        self._coerce_fields("causal.")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        _positive(self, "window", "batch", "minibatch", "replay_capacity", prefix="causal.")
        _non_negative(self, "epochs", "pretrain_steps", prefix="causal.")
        if self.chunk_size is not None:
            _positive(self, "chunk_size", prefix="causal.")


@dataclasses.dataclass(frozen=True)
class SFTConfig(_Typed):
    """The warm start shared by every algo and seed: supervised fine-tuning on demonstrations (PPO;
    `episodes` demonstration episodes) or behaviour cloning on scripted solvers (DigiRL; `episodes`
    per task), cached under `dir` (default: <workdir>/../sft/<env>-<preset>-<fingerprint>)."""

    episodes: int = 300
    imperfect_frac: float = 0.3  # demonstrations with deliberate mistakes (PPO only)
    epochs: int = 10  # fewer leave the tiny decoder unable to copy the state into its thoughts
    lr: float = 1e-3
    batch_size: int = 32
    dir: str | None = None

    def __post_init__(self) -> None:
        self._coerce_fields("sft.")
        _positive(self, "batch_size", prefix="sft.")
        _non_negative(self, "episodes", "epochs", prefix="sft.")
        _unit_interval(self, "imperfect_frac", prefix="sft.")


@dataclasses.dataclass(frozen=True)
class RunConfig(_Typed):
    """Seed and bookkeeping: none of these change what is computed (except `seed`)."""

    seed: int = 0
    success_window: int = 200  # RL4VLM: success over the last 200 episodes (Blackjack: 1000)
    # Iterations between checkpoints. Each save costs ~1 s of a 2-core CPU's time at tiny_cpu (async, but it
    # competes with training): 4 keeps a resume within ~15 s of work and a 16-iteration run ~10 s faster than 2.
    checkpoint_every: int = 4
    keep_checkpoints: int = 3
    heatmap_every: int = 5  # iterations
    progress: bool = True

    def __post_init__(self) -> None:
        self._coerce_fields()
        _non_negative(self, "seed")
        _positive(self, "success_window", "checkpoint_every", "keep_checkpoints", "heatmap_every")


_SECTIONS = {"model": ModelConfig, "causal": CausalConfig, "sft": SFTConfig, "run": RunConfig}
_SECTION_PREFIX = {"model": "", "causal": "causal_", "sft": "sft_", "run": ""}


class _Composed(_Typed):
    """Flat-name plumbing shared by PPOConfig and DigiRLConfig."""

    # Flat names that differ from the section prefix rule, and section fields a backbone lacks.
    _RENAMES: ClassVar[dict[str, str]] = {"causal.alpha": "alpha"}
    _NOT_APPLICABLE: ClassVar[frozenset[str]] = frozenset()
    # Fields added after runs existed, left out of fingerprints while they hold their default.
    _LATER_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Bookkeeping fields that may change across a resume.
    _RESUME_IGNORE: ClassVar[tuple[str, ...]] = ()
    # Fields that define the cached start (flat names).
    _START_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """flat name -> dotted path ("alpha" -> "causal.alpha", "gamma" -> "gamma")."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            if f.name in _SECTIONS:
                for sf in dataclasses.fields(_SECTIONS[f.name]):
                    path = f"{f.name}.{sf.name}"
                    if path in cls._NOT_APPLICABLE:
                        continue
                    out[cls._RENAMES.get(path, _SECTION_PREFIX[f.name] + sf.name)] = path
            else:
                out[f.name] = f.name
        return out

    @classmethod
    def field_type(cls, path: str) -> Any:
        section, _, name = path.rpartition(".")
        owner = _SECTIONS[section] if section else cls
        return _resolved_types(owner)[name]

    @classmethod
    def resolve(cls, name: str) -> str:
        """The dotted path of a flat or dotted field name; ConfigError listing the choices if none."""
        names = cls.flat_names()
        if name in names:
            return names[name]
        if name in names.values():
            return name
        raise ConfigError(f"{name!r} is not a {cls.__name__} field; choose one of {', '.join(sorted(names))} "
                          "(or their dotted forms, e.g. causal.lr)")

    def get(self, name: str) -> Any:
        """The value of a flat or dotted field name."""
        value: Any = self
        for part in self.resolve(name).split("."):
            value = getattr(value, part)
        return value

    def replace(self, **changes: Any):
        """A copy with fields changed by flat or dotted name (`replace(causal_lr=1e-4, seed=1)`);
        section objects may also be given whole (`replace(causal=CausalConfig(...))`)."""
        top: dict[str, Any] = {}
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name in _SECTIONS and isinstance(value, _SECTIONS[name]):
                top[name] = value
                continue
            path = self.resolve(name)
            section, _, field = path.rpartition(".")
            if section:
                by_section.setdefault(section, {})[field] = value
            else:
                top[path] = value
        for section, fields in by_section.items():
            base = top.get(section, getattr(self, section))
            top[section] = dataclasses.replace(base, **fields)
        return dataclasses.replace(self, **top)

    def to_flat_dict(self) -> dict[str, Any]:
        """Every field under its flat name (what fingerprints hash and `config.json` records)."""
        return {flat: _plain(self.get(path)) for flat, path in self.flat_names().items()}

    def to_dict(self) -> dict[str, Any]:
        """Nested: top-level fields plus one dict per section."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    def resume_fields(self) -> dict[str, Any]:
        """Flat fields a resumed run must share with its checkpoint."""
        return _fingerprint_fields(self, [k for k in self.flat_names() if k not in self._RESUME_IGNORE])

    def start_fields(self) -> dict[str, Any]:
        """Flat fields that define the cached warm start (algo, alpha and seed are deliberately absent,
        so every algo and seed shares it)."""
        return _fingerprint_fields(self, self._START_FIELDS)

    def resume_fingerprint(self) -> str:
        return config_fingerprint(self.resume_fields())

    def start_fingerprint(self) -> str:
        return config_fingerprint(self.start_fields())

    def start_dir(self, workdir: str | Path) -> Path:
        """`sft.dir`, or the default <workdir>/../sft/<env>-<preset>-<start fingerprint[:10]>."""
        if self.sft.dir:
            return Path(self.sft.dir)
        name = self.env.split("/")[-1]
        return Path(workdir).parent / "sft" / f"{name}-{self.preset}-{self.start_fingerprint()[:10]}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _fingerprint_fields(config: _Composed, names) -> dict[str, Any]:
    defaults = type(config)._defaults()
    return {k: _plain(config.get(k)) for k in names
            if not (k in config._LATER_FIELDS and config.get(k) == defaults.get(k))}


def field_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`name: stored -> current` for every field whose values differ (missing shown as <absent>)."""
    out = []
    for name in sorted(set(stored) | set(current)):
        a, b = stored.get(name, "<absent>"), current.get(name, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


# ==============================================================================================
# Overrides and mesh specs
# ==============================================================================================
def parse_overrides(items: list[str] | tuple[str, ...], config_cls: type) -> dict[str, Any]:
    """Parses ``name=value`` strings (a repeatable ``--set`` flag) into overrides of `config_cls`.

    Names are flat (``causal_lr``) or dotted (``causal.lr``). Values are read as JSON where they parse
    (numbers, true/false, null, lists) and then checked against the field's type, so ``lr=abc`` fails
    here with "lr must be a number, got 'abc'" instead of deep inside the optimizer.
    Raises ConfigError naming the item.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set {item!r}: expected name=value, e.g. --set causal_lr=1e-4")
        try:
            path = config_cls.resolve(name)
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        try:
            overrides[name] = _coerce(name, value, config_cls.field_type(path))
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
    return overrides


def parse_mesh(spec: str) -> dict[str, int]:
    """Parses "data:8" / "data:2,fsdp:4" into an ordered {axis: size} dict; ConfigError if malformed."""
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep or name not in ("data", "fsdp") or not size.isdigit() or int(size) < 1:
            raise ConfigError(
                f"bad mesh spec {spec!r}: expected comma-separated axis:size with axes 'data' "
                "and/or 'fsdp', e.g. 'data:8' or 'data:2,fsdp:4'"
            )
        if name in axes:
            raise ConfigError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        axes[name] = int(size)
    return axes



def _build(cls: type, values: Mapping[str, Any]):
    """`cls` from flat or dotted field values over its defaults, validated once."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kwargs[f.name] = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = cls.resolve(name)
        section, _, field = path.rpartition(".")
        if section:
            sections.setdefault(section, {})[field] = value
        else:
            kwargs[path] = value
    for section, fields in sections.items():
        kwargs[section] = dataclasses.replace(kwargs[section], **fields)
    return cls(**kwargs)
