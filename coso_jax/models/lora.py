"""LoRA (low-rank adapters) on the language model of a policy, through qwix.

`apply_lora` puts a LoRA pair on every target linear layer of the model's one `llama.DecoderModel`
(`Llava.language_model`, `CausalLM.model`, a bare `DecoderModel`, or one nested deeper, e.g.
`ActorCritic.policy.language_model`): for a kernel `W[in, out]` the layer computes

    y = x W + (alpha / rank) * dropout(x) A B,    A `[in, rank]`, B `[rank, out]`

(Hu et al. 2021, "LoRA", eq. 3 with the `alpha / rank` scaling; dropout on the adapter input only, as
peft's `lora_dropout`). A starts as U(-1/sqrt(in), 1/sqrt(in)) and B as zeros, peft's default
(`LoraLayer.reset_lora_parameters`: `kaiming_uniform_(a=sqrt(5))` for A, zeros for B), so a fresh
adapter leaves the model's outputs unchanged.

RL4VLM's setting (RL4VLM/RL4VLM, VLM_PPO/main.py: `LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
target_modules=find_all_linear_names(base, train_vision))`; `find_all_linear_names` in
a2c_ppo_acktr/llava_interface/utils.py skips the vision tower, the projector and `lm_head`): rank 128,
alpha 256, dropout 0.05 on the language model's q, k, v, o, gate, up and down projections. On
llava-v1.6-mistral-7b that is 32 layers x 7 pairs, 335.5 M adapter parameters (1.25 GiB in float32)
next to a frozen 7.57 B base.

How qwix is used, and what it implies
-------------------------------------
qwix (`qwix.apply_lora_to_model` with a `qwix.LoraProvider`) runs the module once on dummy inputs,
creates `nnx.LoRAParam` variables `<param>_lora_a` / `<param>_lora_b` next to each matched kernel
(e.g. `language_model.layers[3].self_attn.q_proj.kernel_lora_a`), and swaps the module's class for
one whose `__call__` intercepts `jax.lax.dot_general` and adds the adapter term. It intercepts one
method only, so the wrapped module must be the one whose `__call__` every path goes through: the
`DecoderModel` (what `Llava.decode` / `CausalLM.decode` call, hence the sampler's prefill and decode
loop and the teacher-forced scorer of coso_jax/sampling.py). Wrapping the whole `Llava` would
intercept `Llava.__call__` only and leave `decode` (the sampler and the scorer) without adapters.
The vision tower, the projector, the embeddings and `lm_head` get no adapters.

Dtypes. The adapters are stored in `dtype` (float32 by default) whatever the base's dtype: Adam
updates of ~1e-5 vanish in bf16 weights of magnitude ~1e-2 (bf16 resolves 2^-8 relative). The decoder
casts them to its compute dtype inside each layer's forward (`llama.run_layer`), so a bf16 base
computes in bf16 and the gradients of the adapters arrive in float32.

Dropout. qwix's `LoraRule(dropout=p)` applies dropout on every call (no deterministic switch) and
draws its keys from an `nnx.Rngs` it looks up in the `qwix_rngs` attribute of each module. Sampling
must not drop, so `apply_lora` returns the model with dropout off, and `enable_dropout(model, rng)`
switches a model (typically the one merged inside the loss) to a second qwix class built with the
dropout rule and seeds it with `rng`. The dropout masks are then a function of `rng` and of the
order of the calls (the `nnx.Rngs` counter, which `llama.run_layer` threads through `jax.checkpoint`),
so a rematerialised layer recomputes the masks of its forward pass.

Training only the adapters. `nnx.LoRAParam` subclasses `nnx.Param`, so `nnx.split(model, nnx.Param)`
would train the base too. Use `nnx.split(model, trainable_filter(), ...)`: LoRA parameters plus the
value head (and the projector / vision tower when asked), everything else in the frozen remainder.

Public API:
  * `apply_lora(model, *, rank, alpha, dropout, target_modules, rngs, dtype)` -> a new model with adapters.
  * `trainable_filter(*, train_vision, train_projector, train_value_head)` -> an nnx filter.
  * `enable_dropout(model, rng)` / `disable_dropout(model)`: in place, for a model merged inside a trace.
  * `merge_lora(model)` -> a new plain model with `W + (alpha / rank) A B` as its kernels.
  * `lora_config(model)` -> the `LoraConfig` of a LoRA model, or None.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from coso_jax.models.llama import DecoderModel

Dtype = Any

# RL4VLM's LoRA (VLM_PPO/main.py).
RL4VLM_RANK = 128
RL4VLM_ALPHA = 256.0
RL4VLM_DROPOUT = 0.05
# The language model's linear layers (RL4VLM's `find_all_linear_names` on a Llama/Mistral LLaVA).
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_QWIX_ATTRIBUTES = ("qwix_path", "disable_quant_stats_update", "qwix_rngs")

# qwix 0.1.8 uses flax APIs that flax 0.12 deprecates (`Variable.value`, `VariableState`), once per
# adapted projection and trace; the warnings say nothing about this project's code.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"qwix\.")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters of a model (hashable: stored as a static attribute of the wrapped `DecoderModel`).

    Attributes:
      rank: r, the inner width of A `[in, r]` and B `[r, out]`.
      alpha: the adapter output is scaled by alpha / rank.
      dropout: dropout rate on the adapter input (active only after `enable_dropout`).
      target_modules: attribute names of the adapted linear layers (e.g. "q_proj").
      dtype: storage dtype of A and B.
    """

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    dtype: Any

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def module_path(self) -> str:
        """qwix rule regex over module paths relative to the `DecoderModel` ("layers/3/self_attn/q_proj")."""
        return r"(.*/)?(" + "|".join(re.escape(t) for t in self.target_modules) + ")"


# --------------------------------------------------------------------------------------------------
# Locating the language model
# --------------------------------------------------------------------------------------------------
def _decoders(model: nnx.Module) -> list[tuple[tuple, DecoderModel]]:
    if isinstance(model, DecoderModel):
        return [((), model)]
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, DecoderModel)]


def _find_decoder(model: nnx.Module) -> tuple[tuple, DecoderModel]:
    found = _decoders(model)
    if len(found) != 1:
        where = ", ".join(".".join(map(str, p)) or "<root>" for p, _ in found) or "none"
        raise ValueError(f"expected exactly one llama.DecoderModel in {type(model).__name__}, found {len(found)} "
                         f"({where})")
    return found[0]


def _find_lora_decoder(model: nnx.Module) -> tuple[tuple, DecoderModel]:
    path, decoder = _find_decoder(model)
    if getattr(decoder, "lora_config", None) is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (use lora.apply_lora first)")
    return path, decoder


def _replace(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def lora_config(model: nnx.Module) -> LoraConfig | None:
    """The `LoraConfig` of the model's language model, or None if it has no adapters."""
    found = _decoders(model)
    if len(found) != 1:
        return None
    return getattr(found[0][1], "lora_config", None)


# --------------------------------------------------------------------------------------------------
# Applying, switching, merging
# --------------------------------------------------------------------------------------------------
# (base DecoderModel class, LoraConfig) -> (eval class, train class), see apply_lora.
_LORA_CLASSES: dict[tuple[type, "LoraConfig"], tuple[type, type]] = {}


def _initializer(init, dtype):
    """`init` with its dtype argument replaced by `dtype` (qwix passes the base kernel's dtype)."""
    def wrapped(key, shape, _dtype=None):
        return init(key, shape, dtype)
    return wrapped


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float,
               target_modules: Sequence[str] = LM_LINEARS, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.Module:
    """A copy of `model` with LoRA adapters on its language model (`DecoderModel`), dropout off.

    Args:
      model: a `Llava`, `CausalLM`, `DecoderModel`, or any module holding exactly one `DecoderModel`
        (e.g. an actor-critic wrapper). Concrete or abstract (works under `nnx.eval_shape`). It is not
        modified; the copy shares its arrays.
      rank: r >= 1 (RL4VLM: 128).
      alpha: the scale numerator, > 0 (RL4VLM: 256; scale alpha / r = 2).
      dropout: adapter-input dropout rate in [0, 1) (RL4VLM: 0.05), active after `enable_dropout`.
      target_modules: attribute names of the linear layers to adapt, inside every decoder layer.
      rngs: draws the A matrices (`rngs.params()`).
      dtype: storage dtype of A and B (default float32; the forward casts them to the compute dtype).
    Returns:
      The copy; its `DecoderModel` carries `kernel_lora_a` `[in, r]` / `kernel_lora_b` `[r, out]`
      `nnx.LoRAParam`s on each target and a `lora_config` attribute.
    Raises:
      ValueError: bad hyper-parameters, no or several `DecoderModel`s, adapters already present, or a
        target that names no linear layer of the decoder layers.
    """
    import qwix  # imported here: the rest of coso_jax.models does not need it

    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = tuple(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")

    model = nnx.clone(model)  # the caller's model stays as it is (Variables copied, arrays shared)
    path, decoder = _find_decoder(model)
    if getattr(decoder, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters (merge_lora first to stack another set)")
    cfg = decoder.config
    layer0 = decoder.layers[0]
    linears = {str(p[-1]) for p, m in nnx.iter_modules(layer0) if isinstance(m, nnx.Linear) and p}
    missing = [t for t in targets if t not in linears]
    if missing:
        raise ValueError(f"target_modules {missing} name no linear layer of the decoder layers; they have "
                         f"{sorted(linears)}")

    config = LoraConfig(rank=int(rank), alpha=float(alpha), dropout=float(dropout), target_modules=targets,
                        dtype=jnp.dtype(dtype))
    # A ~ U(-1/sqrt(in), 1/sqrt(in)): variance_scaling(1/3, fan_in, uniform) has limit sqrt(3 * (1/3) / in).
    rule = dict(module_path=config.module_path, rank=config.rank, alpha=config.alpha,
                lora_a_initializer=_initializer(jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                                config.dtype),
                lora_b_initializer=_initializer(jax.nn.initializers.zeros, config.dtype))
    # Dummy inputs for qwix's initialising call: one token.
    inputs = (jnp.zeros((1, 1, cfg.hidden_size), cfg.dtype), jnp.ones((1, 1), jnp.int32),
              jnp.zeros((1, 1), jnp.int32))
    wrapped = qwix.apply_lora_to_model(decoder, qwix.LoraProvider([qwix.LoraRule(dropout=0.0, **rule)]), *inputs,
                                       rngs=rngs)
    # qwix makes a fresh class on every call, and a graphdef holds its module classes: without reuse two
    # trainers in one process (an alpha sweep, a benchmark's A/B) would compile every program twice.
    key = (type(decoder), config)
    if key in _LORA_CLASSES:
        eval_cls, train_cls = _LORA_CLASSES[key]
        wrapped.__class__ = eval_cls  # same base, same rule: only the class identity changes
    else:
        eval_cls = type(wrapped)
        if config.dropout > 0:
            # Only the class is kept: the same variables under a `__call__` whose rule drops.
            train_cls = type(qwix.apply_lora_to_model(
                wrapped, qwix.LoraProvider([qwix.LoraRule(dropout=config.dropout, **rule)]), *inputs,
                rngs=nnx.Rngs(0), skip_nnx_init=True))
        else:
            train_cls = eval_cls
        for cls in {eval_cls, train_cls}:
            cls._coso_lora_eval, cls._coso_lora_train, cls._coso_lora_base = eval_cls, train_cls, type(decoder)
        _LORA_CLASSES[key] = (eval_cls, train_cls)

    # Check that every target got exactly one A/B pair of the expected shapes and dtype.
    for i, layer in enumerate(wrapped.layers):
        for p, module in nnx.iter_modules(layer):
            if not (isinstance(module, nnx.Linear) and p and str(p[-1]) in targets):
                continue
            where = f"layers.{i}." + ".".join(map(str, p))
            a, b = getattr(module, "kernel_lora_a", None), getattr(module, "kernel_lora_b", None)
            if a is None or b is None:
                raise RuntimeError(f"qwix created no LoRA parameters at {where} (its dot_general was not intercepted)")
            din, dout = module.kernel.shape
            if a.shape != (din, config.rank) or b.shape != (config.rank, dout):
                raise RuntimeError(f"unexpected LoRA shapes at {where}: A {a.shape}, B {b.shape}")
            if a.dtype != config.dtype:  # qwix boxes the value like the base kernel; keep the storage dtype
                a.set_value(a.get_value().astype(config.dtype))
            if b.dtype != config.dtype:
                b.set_value(b.get_value().astype(config.dtype))
    wrapped.lora_config = config
    if not path:
        return wrapped
    _replace(model, path, wrapped)
    return model


def enable_dropout(model: nnx.Module, rng: jax.Array) -> nnx.Module:
    """Turns the adapters' dropout on, in place, drawing masks from `rng`; returns `model`.

    Call it on a model merged inside the traced loss (`model = nnx.merge(graphdef, ...)`), with a key
    that changes every (micro-)step: the masks are a function of the key and the call order. It
    changes the Python class of the `DecoderModel` (at trace time; the graphdef the model was merged
    from is unaffected) and sets an `nnx.Rngs(dropout=rng)` on its modules, which must have been created
    in the current trace (as a merge inside the loss does). A no-op when `LoraConfig.dropout` is 0.
    """
    _, decoder = _find_lora_decoder(model)
    if decoder.lora_config.dropout == 0:
        return model
    object.__setattr__(decoder, "__class__", decoder._coso_lora_train)
    decoder.set_attributes(qwix_rngs=nnx.Rngs(dropout=rng))
    return model


def disable_dropout(model: nnx.Module) -> nnx.Module:
    """Undoes `enable_dropout`, in place; returns `model`."""
    _, decoder = _find_lora_decoder(model)
    object.__setattr__(decoder, "__class__", decoder._coso_lora_eval)
    decoder.set_attributes(qwix_rngs=None)
    return model


def trainable_filter(*, train_vision: bool = False, train_projector: bool = False, train_value_head: bool = True):
    """An nnx filter selecting what a LoRA run trains, for `nnx.split(model, trainable_filter(), ...)`.

    Always the adapters (`nnx.LoRAParam`); plus, as `nnx.Param`s under a path component of that name:
    `value_head` (default on: the critic of an actor-critic is trained fully, as in RL4VLM),
    `multi_modal_projector` and `image_newline` (`train_projector`), `vision_tower` (`train_vision`).
    These parts are trained fully, not through adapters (RL4VLM's `train_vision` instead puts adapters
    on them). Everything else (the base language model, embeddings, `lm_head`) is left to the `...`
    remainder of the split: frozen, kept out of the optimizer state.
    """
    parts: list[Any] = [nnx.LoRAParam]
    names = (["value_head"] if train_value_head else []) \
        + (["multi_modal_projector", "image_newline"] if train_projector else []) \
        + (["vision_tower"] if train_vision else [])
    parts += [nnx.All(nnx.Param, nnx.PathContains(n)) for n in names]
    return nnx.Any(*parts)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of a LoRA model with the adapters folded into the base kernels, and no adapters left.

    Each adapted kernel becomes `W + (alpha / rank) A B`, computed in float32 and stored in W's dtype;
    the copy is a plain model (the `DecoderModel`'s original class, no `LoRAParam`, no qwix attributes)
    whose state has the base model's structure. Dropout plays no part (the merged model is the
    adapter model with dropout off). Arrays other than the adapted kernels are shared with `model`;
    the adapted kernels are new (for llava-v1.6-mistral-7b in bf16: 13 GiB).

    Equal to the adapter forward up to rounding: exactly the same function in exact arithmetic, since
    x (W + s A B) = x W + s (x A) B; float32 models agree to ~1e-6 relative. In bf16 the merged kernel
    is rounded once to bf16 while the adapter path rounds x W and (x A) B separately, so log-probs
    differ at the bf16 level (~1e-2): a sampler on the merged model and a scorer on the adapter
    model do not give PPO ratios of exactly 1.
    """
    model = nnx.clone(model)
    path, decoder = _find_lora_decoder(model)
    scale = decoder.lora_config.scale
    for _, module in list(nnx.iter_modules(decoder)):
        attrs = vars(module)
        for name in [n for n in attrs if n.endswith("_lora_a")]:
            base = name[: -len("_lora_a")]
            a, b = attrs[name].get_value(), attrs[base + "_lora_b"].get_value()
            weight = attrs[base]
            w = weight.get_value()
            if w.ndim != 2 or a.shape != (w.shape[0], a.shape[-1]) or b.shape != (a.shape[-1], w.shape[1]):
                raise ValueError(f"cannot merge LoRA {name} {a.shape} / {b.shape} into {base} {w.shape}")
            merged = w.astype(jnp.float32) + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
            weight.set_value(merged.astype(w.dtype))
            delattr(module, name)
            delattr(module, base + "_lora_b")
        for name in _QWIX_ATTRIBUTES:
            if name in vars(module):
                delattr(module, name)
    base_cls = decoder._coso_lora_base
    delattr(decoder, "lora_config")
    object.__setattr__(decoder, "__class__", base_cls)
    if not path:
        return decoder
    return model
