"""Device memory of every phase of a named PPO preset, from XLA's buffer assignment, without weights.

    python -m benchmarks.memory [--preset paper] [--env NumberLine] [--steps_per_update 512,1024]
                                [--compile_full sample] [--out DIR] [--quick]

Each phase's program is lowered and compiled with ABSTRACT inputs (`nnx.eval_shape` builds the policy,
LoRA is applied under it, every array is a `jax.ShapeDtypeStruct`: no weight is ever materialised), exactly
as the trainer calls it:

  sample          `trainer.sample_step` (prefill + KV-cache decode loop) at the rollout batch `num_envs`,
                  prompt length P, N = `max_new_tokens` new tokens;
  update_n<n>     `update.update_step` (epochs x minibatches x micro-batches, params and Adam state donated)
                  at n = steps_per_update rows (the paper: 512, and 1024 for EZPoints / Points24), with
                  the preset's LoRA / bf16 base / remat / minibatch / grad accumulation;
  classifier      `causal_term.classifier_step` (one Adam step of the causal classifier) on
                  `causal.batch` x N replayed actions (the start's pre-training runs it at `causal.minibatch`);
  classifier_fused  where this checkout's causal_term has `classifier_update` (all epochs in one program,
                  gradients accumulated over chunks of rows), that program at `CausalTerm.update_classifier`'s
                  shapes: what the online update runs when it applies;
  counterfactual  the kernel's chunk scorer (`effects._score_chunk_fast`) at the chunk shapes the trainer
                  runs (`effects._chunk_for` / `_fast_rows`, `chunk_size` None), shortest / middle / longest
                  length bucket of N;
  sft             not compiled when the preset skips SFT (`sft_epochs` 0: the paper starts from --hf_dir).

Per program: argument, output, alias (donated inputs reused by outputs) and temp bytes, and the peak
argument + output - alias + temp. State that lives on the device outside a program (e.g. the Adam state
while sampling) is added per phase from the abstract shapes ("resident"), giving the phase's total.

How the numbers are obtained on a CPU (and why)
-----------------------------------------------
XLA:CPU is not XLA:GPU, and two of its behaviours would dominate a bf16 program's numbers:
  1. XLA:CPU has no bf16 matmul: it converts bf16 dot operands to float32. The converted weights are
     loop-invariant, so they are hoisted out of the decode loop / the micro-batch scans and stay alive: an f32
     copy (and a transposed one for the backward) of every layer's weights, ~0.8-1.6 GiB per decoder layer that
     a GPU never allocates (the sampler's temp grew 0.92 GiB per layer, 0.09 without them);
  2. this jaxlib's default CPU scheduler (CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED) starts independent work
     early, so every layer's rematerialised activations are alive at once and layer remat saves nothing
     (1.65 GiB per decoder layer with or without remat at T = 1704); XLA:GPU's scheduler is memory-aware.
So each policy program is measured as follows:
  * argument / output / alias: from the signature of the PRESET's program (bf16 base, f32 adapters and Adam):
    the bytes of every argument, of every output, and of the donated arguments that match an output (this is
    what XLA reports, checked program by program against the proxy's XLA numbers: `signature_matches_xla`;
    jit prunes arguments a program never reads, e.g. the ViT's last layer, as LLaVA reads layer -2: they stay
    resident, so the estimate counts them, `pruned_argument_bytes`);
  * temp: XLA:CPU's buffer assignment of a FLOAT32 PROXY (the same program with a float32 base and compute:
    no converts), compiled with the memory-optimised scheduler (`CPU_OPTIONS`). Every buffer of the bf16
    program is at most as large as its f32 counterpart, so this is an upper bound of the bf16 program's temp
    under the same buffer assignment (by up to ~2x on bf16 activations; attention scores, logits, LoRA
    gradients and Adam are float32 in both).
  * for comparison, the bf16 program as XLA:CPU compiles it by default is also reported at the check depth
    (`xla_cpu_bf16_as_is_gib`): what this CPU would need, not a GPU.
Expect +-10-15% against XLA:GPU (other fusions; ../shared/research/real_scale.md) on top of the bound.
Compile options are passed per compile (`lowered.compile(options)`), so importing this module (tests) changes
no process-wide flag; `xla_backend_optimization_level` 0 (LLVM codegen only) halves compile time and leaves the
buffer assignment unchanged.

Depth. 32 decoder + 24 ViT layers unrolled compile on this CPU for the sampler (about a minute) but not for the
update (over 8 minutes and 13 GiB of RAM before it was stopped). Each policy program is compiled at (text,
vision) layers (2, 2), (4, 2), (2, 3) (`--quick`: (1, 2), (2, 2), (1, 3)); each of the four numbers is fitted
as c + a * text + b * vision (exact through the three points) and predicted at full depth (32, 24). One-layer
programs are outliers of XLA's buffer reuse (`FIT_POINTS`), hence 2 and 4. The fit is CHECKED against a
compiled deeper program, (8, 4) (`--quick`: the quick model's full depth (3, 3)), and against the full depth
where that is compiled (`--compile_full`, default the sampler); predicted vs measured is reported, and the full
depth's argument bytes (exact, from its signature) against their extrapolation. (ViT config layers: LLaVA reads
layer -2, so config depth 24 runs 23 layers; the fit is in config layers, whose last one is weights only.)

P, the prompt length of the paper preset: a 300x300 frame is 1176 image tokens in LLaVA-1.6 (anyres 336x672:
576 base + 24x24 unpadded + 24 newlines) and the longest gym_cards prompt text is 578 characters (Points24;
NumberLine's is 472). Without the Mistral tokenizer here, its text tokens are bounded at 2.5 characters per
token (SentencePiece averages 3.5-4 on English; digits and JSON punctuation split finer): 232 tokens, plus
BOS, 10 template tokens ("[INST] ", "\\n", " [/INST]") and the preset's 24-token prompt margin, rounded up
to 8: P = 1448, T = P + N = 1704 (the research note used P = 1408). `--prompt_len` overrides it.

Bar (issue #17): every phase of the paper preset <= 64 GiB per device, i.e. one 80 GB H100 (79.6 GiB) with
headroom; the H200's margin (143,771 MiB = 140.4 GiB) is reported too. JAX on a GPU preallocates 75% of
memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION): 59.7 GiB on an H100, 105.3 GiB on an H200.

Writes benchmarks/results/memory_<preset>.json (`--quick`: memory_quick.json; or under --out) with the device,
jax version, shapes, dtypes, load average, the compile seconds of every program and every number above, and
prints a table. The paper run takes ~15 minutes on the 2-core CPU; `--quick` (tiny widths) ~1-2 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks._common import device_description, write_json_atomic
from coso_jax.causal import classifier as clf
from coso_jax.causal import effects as effects_lib
from coso_jax.envs import text_interface
from coso_jax.models import llava, lora
from coso_jax.models.value_head import RL4VLM_WIDTHS, ValueHead
from coso_jax.rl import policy as policy_lib
from coso_jax.rl.causal_term import classifier_step
from coso_jax.rl.config import ModelConfig, PPOConfig, ppo_preset
from coso_jax.rl.ppo.trainer import SampleSettings, sample_step
from coso_jax.rl.ppo.update import ActorCritic, OptimizerConfig, PPOHyper, make_optimizer, update_step
from coso_jax.rl.sharding import make_mesh
from coso_jax.tokenizer import IMAGE_TOKEN

GIB = float(1 << 30)
BAR_GIB = 64.0
H100_GIB = 81_559 / 1024  # nvidia-smi total of an H100 80GB: 79.6 GiB
H200_GIB = 143_771 / 1024  # H200 141GB: 140.4 GiB
DEFAULT_MEM_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default on GPU

FRAME = (300, 300)  # gym_cards frames
LONGEST_PROMPT_CHARS = 578  # Points24, the longest gym_cards prompt text (brief=False, cot=True)
CHARS_PER_TOKEN = 2.5  # conservative bound for Mistral's SentencePiece on these prompts
TEMPLATE_TOKENS = 10  # "[INST] ", "\n", " [/INST]"
MISTRAL_IMAGE_TOKEN_ID = 32000  # llava-v1.6-mistral-7b-hf's <image>

# (text layers, vision config layers) compiled for the fit. One decoder layer is an outlier of XLA's buffer
# reuse: a fit through (1, 2), (2, 2), (1, 3) put the update's temp at 0.29 GiB per layer where (2..8) layers
# grow by 0.07, over-predicting the compiled (8, 4) update's peak by 11% (32 layers: by ~6 GiB). The paper run
# fits from 2 and 4 layers; --quick (tiny widths, seconds) from 1 and 2.
FIT_POINTS = ((2, 2), (4, 2), (2, 3))
QUICK_FIT_POINTS = ((1, 2), (2, 2), (1, 3))
CHECK_POINT = (8, 4)  # compiled to check the fit (paper)
QUICK_DEPTH = (3, 3)  # the quick model's full depth, compiled: the check compares the fit with the full program
FIELDS = ("argument", "output", "alias", "temp")
PHASES = ("sample", "update", "classifier", "counterfactual")
# XLA:CPU compile options (per compile, so importing this module changes no global flag). The memory-optimised
# scheduler: XLA:CPU's default in this jaxlib (CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED) runs independent work
# early and so keeps every layer's rematerialised activations alive at once (layer remat then saves nothing:
# 1.65 GiB per decoder layer with or without it at T = 1704), which XLA:GPU's memory-aware scheduler does not.
# Backend optimisation level 0: LLVM codegen only (the buffer assignment is the same), about half the compile time.
CPU_OPTIONS: dict[str, Any] = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                               "xla_backend_optimization_level": 0}
AS_IS_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0}
SIGNATURE_TOLERANCE = 0.01  # relative (or 1 MiB) agreement of the signature's bytes with XLA's

# `--quick`: the tiny LLaVA-NeXT widths (tiny_next: 32 px tiles, width-128 decoder, width-64 ViT) and small
# rollout / update sizes, with every other paper setting (LoRA r128, bf16, remat, micro-batch 1, ...).
QUICK_OVERRIDES = dict(model_preset="tiny_next", image_size=32, patch_size=8, vocab_size=1024, num_envs=4,
                       steps_per_update=16, minibatch_size=8, grad_accum_steps=8, max_new_tokens=32,
                       causal_batch=64)
QUICK_STEPS = (16,)
QUICK_PROMPT_TEXT_TOKENS = 40


class _VocabOnly:
    """What `policy.named_llava_config` / `tiny_llava_config` read off a tokenizer: its size and <image> id."""

    def __init__(self, size: int, image_token_id: int) -> None:
        self.size, self.image_token_id = size, image_token_id

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        if token != IMAGE_TOKEN:
            raise KeyError(token)
        return self.image_token_id


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
def nbytes(tree: Any) -> int:
    """Bytes of every array leaf (concrete or ShapeDtypeStruct) of a pytree."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "shape") and hasattr(x, "dtype")))


def count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def abstract_key() -> Any:
    return jax.eval_shape(lambda: jax.random.key(0))


def llava_config(model: ModelConfig, text_layers: int, vision_layers: int) -> llava.LlavaConfig:
    """The policy's LlavaConfig as the trainer builds it (`build_policy`), cut to the given depth, in the
    config's dtypes."""
    compute, param = policy_lib.dtypes(model)
    if model.model_preset in policy_lib.TINY_PRESETS:
        cfg = policy_lib.tiny_llava_config(model, _VocabOnly(model.vocab_size, 4))
        cfg = cfg.replace(text=cfg.text.replace(num_layers=text_layers),
                          vision=cfg.vision.replace(num_layers=vision_layers))
    else:
        cut = dataclasses.replace(model, random_weights=True, text_layers=text_layers, vision_layers=vision_layers)
        cfg = policy_lib.named_llava_config(cut, _VocabOnly(model.vocab_size, MISTRAL_IMAGE_TOKEN_ID))
    return cfg.with_dtype(compute, param)


def full_depth(model: ModelConfig, quick: bool) -> tuple[int, int]:
    if quick:
        return QUICK_DEPTH
    full = policy_lib.named_llava_config(dataclasses.replace(model, random_weights=True, text_layers=0,
                                                             vision_layers=0),
                                         _VocabOnly(model.vocab_size, MISTRAL_IMAGE_TOKEN_ID))
    return full.text.num_layers, full.vision.num_layers


@dataclasses.dataclass
class Policy:
    """The trainer's split of an abstract actor-critic: graphdef, trainable params, frozen rest, Adam state."""

    config: llava.LlavaConfig
    graphdef: Any
    params: Any
    frozen: Any
    opt_state: Any


def abstract_policy(config: PPOConfig, cfg: llava.LlavaConfig, opt: OptimizerConfig) -> Policy:
    """`ActorCritic(Llava, ValueHead)` under `nnx.eval_shape`, LoRA applied there (as `PPOTrainer._build`),
    split into trainable / frozen with `lora.trainable_filter`, and the abstract Adam state."""
    model = config.model
    # The real run's value head (hf_dir): RL4VLM's 4096 -> 1024 -> 512 -> 1 MLP.
    widths = RL4VLM_WIDTHS if model.model_preset not in policy_lib.TINY_PRESETS else (64, 32)

    def build():
        ac = ActorCritic(llava.Llava(cfg, rngs=nnx.Rngs(0)),
                         ValueHead(cfg.text.hidden_size, widths, rngs=nnx.Rngs(1)))
        if model.lora_rank:
            ac = lora.apply_lora(ac, rank=model.lora_rank, alpha=model.lora_alpha, dropout=model.lora_dropout,
                                 rngs=nnx.Rngs(0))
        return ac

    abstract = nnx.eval_shape(build)
    trainable = (lora.trainable_filter(train_vision=model.train_vision, train_projector=model.train_vision)
                 if model.lora_rank else nnx.Param)
    graphdef, params, frozen = nnx.split(abstract, trainable, ...)
    opt_state = jax.eval_shape(make_optimizer(opt).init, params)
    return Policy(cfg, graphdef, params, frozen, opt_state)


def optimizer_config(config: PPOConfig, n: int) -> OptimizerConfig:
    steps = config.ppo_epochs * (n // config.minibatch_size)
    return OptimizerConfig(config.lr, config.lr_min, config.lr_decay_updates * steps, config.max_grad_norm,
                           config.adam_eps)


def hyper(config: PPOConfig) -> PPOHyper:
    m = config.model
    return PPOHyper(clip_eps=config.clip_eps, value_clip_eps=config.value_clip_eps, value_coef=config.value_coef,
                    thought_coef=config.thought_coef, temperature=m.temperature, epochs=config.ppo_epochs,
                    minibatch_size=config.minibatch_size, grad_accum_steps=config.grad_accum_steps,
                    remat=m.remat, lora_dropout=bool(m.lora_rank and m.lora_dropout))


def image_inputs(cfg: llava.LlavaConfig, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """pixel_values (float32, as the image processor and the rollout buffer hold them) and image_sizes."""
    vis = cfg.vision
    if cfg.is_next:
        return {"pixel_values": sds((rows, cfg.max_patches, 3, vis.image_size, vis.image_size), jnp.float32),
                "image_sizes": sds((rows, 2), jnp.int32)}
    return {"pixel_values": sds((rows, 3, vis.image_size, vis.image_size), jnp.float32)}


def prompt_length(cfg: llava.LlavaConfig, model: ModelConfig, quick: bool) -> dict[str, int]:
    """P from the image token count of a 300x300 frame and a bound on the longest prompt's text tokens."""
    image_tokens = cfg.num_image_tokens(FRAME) if cfg.is_next else cfg.num_image_tokens()
    text = QUICK_PROMPT_TEXT_TOKENS if quick else math.ceil(LONGEST_PROMPT_CHARS / CHARS_PER_TOKEN)
    raw = 1 + TEMPLATE_TOKENS + image_tokens + text + model.prompt_margin
    return {"image_tokens": image_tokens, "text_tokens_bound": text, "template_tokens": TEMPLATE_TOKENS + 1,
            "margin": model.prompt_margin, "prompt_len": -(-raw // 8) * 8}


def ppo_batch(cfg: llava.LlavaConfig, n: int, prompt_len: int, new_tokens: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The update's batch as the trainer builds it from `RolloutBuffer.flat()` (BATCH_FIELDS + image_sizes)."""
    batch = {
        "prompt_ids": sds((n, prompt_len), jnp.int32), "prompt_mask": sds((n, prompt_len), jnp.bool_),
        "response_ids": sds((n, new_tokens), jnp.int32), "response_mask": sds((n, new_tokens), jnp.bool_),
        "thought_mask": sds((n, new_tokens), jnp.bool_), "action_mask": sds((n, new_tokens), jnp.bool_),
        "old_logprobs": sds((n, new_tokens), jnp.float32), "old_values": sds((n,), jnp.float32),
        "advantages": sds((n,), jnp.float32), "returns": sds((n,), jnp.float32),
        "entropy_weights": sds((n, new_tokens), jnp.float32),
    }
    batch.update(image_inputs(cfg, n))
    return batch


def rollout_buffer_bytes(cfg: llava.LlavaConfig, n: int, prompt_len: int, new_tokens: int) -> dict[str, int]:
    """Host bytes of `RolloutBuffer` (its `_FIELDS` + image fields) for n transitions."""
    per_row_text = prompt_len * (4 + 1) + new_tokens * (4 + 1 + 1 + 1 + 4 + 4) + 4 * 5 + 4
    pixels = nbytes(image_inputs(cfg, n))
    return {"pixels": pixels, "other": n * per_row_text, "total": pixels + n * per_row_text}


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------
def _itemsize(dtype: Any) -> int:
    try:
        return int(jnp.dtype(dtype).itemsize)
    except TypeError:  # extended dtypes: a threefry PRNG key is 2 x uint32
        return 8


def _leaf_bytes(x: Any) -> int:
    return int(math.prod(x.shape)) * _itemsize(x.dtype)


def shape_accounting(lowered: Any) -> dict[str, int]:
    """argument / output / alias bytes of a lowered program from its signature: every argument, every
    output, and the donated arguments XLA can alias to an output of the same shape and dtype."""
    args = jax.tree.leaves(lowered.args_info)
    outs = jax.tree.leaves(lowered.out_info)
    free: dict[tuple, int] = {}
    for o in outs:
        key = (tuple(o.shape), str(o.dtype))
        free[key] = free.get(key, 0) + 1
    alias = 0
    for a in args:
        key = (tuple(a.shape), str(a.dtype))
        if getattr(a, "donated", False) and free.get(key, 0):
            free[key] -= 1
            alias += _leaf_bytes(a)
    out = {"argument": sum(_leaf_bytes(a) for a in args), "output": sum(_leaf_bytes(o) for o in outs),
           "alias": alias}
    # The arguments jit passes to XLA: it prunes those the program never reads (jax's `kept_var_idx`, a private
    # field; all of them if it is absent). The estimate counts every argument: pruned ones stay resident.
    kept = getattr(getattr(lowered, "_lowering", None), "compile_args", {}).get("kept_var_idx")
    out["argument_kept"] = (out["argument"] if kept is None else
                            sum(_leaf_bytes(a) for i, a in enumerate(args) if i in kept))
    return out


def with_peak(d: dict[str, float]) -> dict[str, float]:
    return {**d, "peak": d["argument"] + d["output"] - d["alias"] + d["temp"]}


def xla_memory(lowered: Any, options: dict[str, Any] | None) -> dict[str, float]:
    """Compiles a lowered program; XLA's memory analysis (bytes) and the compile seconds."""
    start = time.perf_counter()
    compiled = lowered.compile(options) if options else lowered.compile()
    seconds = time.perf_counter() - start
    ma = compiled.memory_analysis()
    out = with_peak({"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
                     "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes)})
    out["compile_s"] = round(seconds, 2)
    del compiled
    gc.collect()
    return out


def on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"


def measure(lower_preset: Callable[[], Any], lower_proxy: Callable[[], Any] | None, *,
            as_is: bool = False) -> dict[str, Any]:
    """One program's memory estimate for the preset's dtypes (see the module docstring):
    argument / output / alias from the preset program's signature (exact), temp from XLA's buffer
    assignment of the float32 proxy (CPU; the preset program itself on an accelerator). `as_is` also
    compiles the preset (bf16) program with XLA:CPU's default scheduler, to show the CPU-only overheads."""
    start = time.perf_counter()
    preset = lower_preset()
    signature = shape_accounting(preset)
    lower_s = time.perf_counter() - start
    if on_cpu() and lower_proxy is not None:
        start = time.perf_counter()
        proxy = lower_proxy()
        lower_s += time.perf_counter() - start
        xla = xla_memory(proxy, CPU_OPTIONS)
        proxy_signature = shape_accounting(proxy)
        del proxy
    else:
        xla = xla_memory(preset, CPU_OPTIONS if on_cpu() else None)
        proxy_signature = signature
    difference = {"argument": proxy_signature["argument_kept"] - xla["argument"],
                  **{k: proxy_signature[k] - xla[k] for k in ("output", "alias")}}
    out: dict[str, Any] = {
        "estimate": with_peak({**{k: signature[k] for k in ("argument", "output", "alias")}, "temp": xla["temp"]}),
        "xla": {k: xla[k] for k in FIELDS + ("peak",)},
        # XLA's own argument / output / alias agree with the signature's (arguments: those jit passes on;
        # outputs: up to the output tuple's pointer table, a few bytes per output).
        "pruned_argument_bytes": signature["argument"] - signature["argument_kept"],
        "signature_minus_xla_bytes": difference,
        "signature_matches_xla": all(abs(d) <= max(SIGNATURE_TOLERANCE * proxy_signature[k], 1 << 20)
                                     for k, d in difference.items()),
        "lower_s": round(lower_s, 2), "compile_s": xla["compile_s"],
    }
    if as_is and on_cpu():
        out["xla_cpu_as_is"] = {k: v for k, v in xla_memory(preset, AS_IS_OPTIONS).items()}
    del preset
    gc.collect()
    return out


def fit_depth(points: dict[tuple[int, int], dict[str, float]], target: tuple[int, int],
              fit_points: tuple[tuple[int, int], ...] = FIT_POINTS) -> dict[str, Any]:
    """Fits each field as c + a * text + b * vision through the three `fit_points` ((t0, v0), (t1, v0),
    (t0, v1)) and predicts `target`."""
    (t0, v0), (t1, _), (_, v2) = fit_points
    base, more_text, more_vision = (points[p] for p in fit_points)
    out: dict[str, Any] = {"per_text_layer": {}, "per_vision_layer": {}, "predicted": {}}
    for f in FIELDS:
        a = (more_text[f] - base[f]) / (t1 - t0)
        b = (more_vision[f] - base[f]) / (v2 - v0)
        out["per_text_layer"][f] = a
        out["per_vision_layer"][f] = b
        out["predicted"][f] = base[f] + a * (target[0] - t0) + b * (target[1] - v0)
    out["predicted"] = with_peak(out["predicted"])
    out["per_text_layer"] = with_peak(out["per_text_layer"])
    out["per_vision_layer"] = with_peak(out["per_vision_layer"])
    return out


def gib(x: float) -> float:
    return round(x / GIB, 3)


def gib_dict(d: dict[str, float]) -> dict[str, float]:
    return {k: gib(v) for k, v in d.items() if k in FIELDS + ("peak",)}


def error_percent(predicted: float, measured: float) -> float:
    return round(100 * (predicted - measured) / measured, 2)


@dataclasses.dataclass
class Setup:
    config: PPOConfig
    quick: bool
    prompt: dict[str, int]
    new_tokens: int
    full: tuple[int, int]
    check: tuple[int, int]
    steps: tuple[int, ...]
    compile_full: tuple[str, ...] = ()
    log: Callable[[str], None] = print

    @property
    def fit_points(self) -> tuple[tuple[int, int], ...]:
        return QUICK_FIT_POINTS if self.quick else FIT_POINTS

    @property
    def proxy_config(self) -> PPOConfig:
        """The float32 proxy of the preset (same everything, float32 base and compute)."""
        return self.config.replace(param_dtype="float32", compute_dtype="float32")


def policy_phase(setup: Setup, name: str, program: Callable[[Policy, llava.LlavaConfig], Callable[[], Any]],
                 opt: OptimizerConfig) -> dict[str, Any]:
    """Measures `program` at the fit depths and the check depth (and the full depth where it compiles here),
    fits per layer, predicts the full depth and compares."""
    fit_points = setup.fit_points
    depths = list(dict.fromkeys(list(fit_points) + [setup.check]
                                + ([setup.full] if name.split()[0] in setup.compile_full else [])))
    measured: dict[tuple[int, int], dict[str, Any]] = {}
    for depth in depths:
        cfg = llava_config(setup.config.model, *depth)
        pol = abstract_policy(setup.config, cfg, opt)
        proxy_cfg = llava_config(setup.proxy_config.model, *depth)
        proxy_pol = abstract_policy(setup.proxy_config, proxy_cfg, opt)
        # XLA:CPU's bf16 program as is, at the check depth, for the sampler and the first update (--quick: the
        # sampler's only, to keep it fast).
        as_is = depth == setup.check and (name == "sample" or (not setup.quick and name == f"update n={setup.steps[0]}"))
        m = measure(program(pol, cfg), program(proxy_pol, proxy_cfg), as_is=as_is)
        measured[depth] = m
        e = m["estimate"]
        setup.log(f"  {name:16s} layers {str(depth):8s}: peak {gib(e['peak']):8.3f} GiB  (arg {gib(e['argument'])}, "
                  f"out {gib(e['output'])}, alias {gib(e['alias'])}, temp {gib(e['temp'])}; lower {m['lower_s']} s, "
                  f"compile {m['compile_s']} s)" + (f"; XLA:CPU bf16 as is: peak {gib(m['xla_cpu_as_is']['peak'])}"
                                                   if "xla_cpu_as_is" in m else ""))
    estimates = {d: m["estimate"] for d, m in measured.items()}
    check_fit = fit_depth(estimates, setup.check, fit_points)
    full_fit = fit_depth(estimates, setup.full, fit_points)
    check = estimates[setup.check]
    # The full depth's signature (argument / output / alias) is exact without compiling: lower it.
    full_cfg = llava_config(setup.config.model, *setup.full)
    full_signature = shape_accounting(program(abstract_policy(setup.config, full_cfg, opt), full_cfg)())
    result: dict[str, Any] = {
        "compiled": [{"text_layers": t, "vision_layers": v, **gib_dict(m["estimate"]),
                      "xla_proxy_gib": gib_dict(m["xla"]), "signature_matches_xla": m["signature_matches_xla"],
                      "signature_minus_xla_bytes": m["signature_minus_xla_bytes"],
                      "pruned_argument_bytes": m["pruned_argument_bytes"],
                      **({"xla_cpu_bf16_as_is_gib": gib_dict(m["xla_cpu_as_is"]),
                          "xla_cpu_bf16_as_is_compile_s": m["xla_cpu_as_is"]["compile_s"]}
                         if "xla_cpu_as_is" in m else {}),
                      "lower_s": m["lower_s"], "compile_s": m["compile_s"]}
                     for (t, v), m in measured.items()],
        "per_text_layer_gib": gib_dict(full_fit["per_text_layer"]),
        "per_vision_layer_gib": gib_dict(full_fit["per_vision_layer"]),
        "check": {"text_layers": setup.check[0], "vision_layers": setup.check[1],
                  "predicted_gib": gib_dict(check_fit["predicted"]), "measured_gib": gib_dict(check),
                  "peak_error_percent": error_percent(check_fit["predicted"]["peak"], check["peak"]),
                  "temp_error_percent": error_percent(check_fit["predicted"]["temp"], check["temp"])},
        "full_depth": {"text_layers": setup.full[0], "vision_layers": setup.full[1]},
        "full_depth_signature_gib": gib_dict({**full_signature, "temp": 0.0}),
        "argument_extrapolation_error_percent": error_percent(full_fit["predicted"]["argument"],
                                                              full_signature["argument"]),
        "compile_s_total": round(sum(m["lower_s"] + m["compile_s"] + m.get("xla_cpu_as_is", {}).get("compile_s", 0)
                                     for m in measured.values()), 1),
    }
    if setup.full in estimates:  # compiled at full depth: that is the measurement; the fit is checked against it
        full = estimates[setup.full]
        result["method"] = "compiled at full depth"
        result["full_depth_check"] = {"predicted_gib": gib_dict(full_fit["predicted"]), "measured_gib": gib_dict(full),
                                      "peak_error_percent": error_percent(full_fit["predicted"]["peak"], full["peak"])}
        chosen = full
    else:
        result["method"] = ("extrapolated to full depth: c + a * text_layers + b * vision_layers through "
                            + ", ".join(map(str, fit_points)) + f"; checked at {setup.check}")
        chosen = full_fit["predicted"]
    result.update({f"{k}_gib": v for k, v in gib_dict(chosen).items()})
    return result


def sample_program(setup: Setup):
    m = setup.config.model
    settings = SampleSettings(m.max_new_tokens, m.temperature, m.top_p, eos_id=2, pad_id=0)
    rows, plen = setup.config.num_envs, setup.prompt["prompt_len"]

    def program(pol: Policy, cfg: llava.LlavaConfig):
        inputs = {"prompt_ids": sds((rows, plen), jnp.int32), "prompt_mask": sds((rows, plen), jnp.bool_),
                  **image_inputs(cfg, rows)}
        return lambda: sample_step.lower(pol.graphdef, settings, pol.params, pol.frozen, inputs, abstract_key())
    return program


def update_program(setup: Setup, n: int):
    hp, mesh = hyper(setup.config), make_mesh(setup.config.mesh)
    opt = optimizer_config(setup.config, n)

    def program(pol: Policy, cfg: llava.LlavaConfig):
        batch = ppo_batch(cfg, n, setup.prompt["prompt_len"], setup.new_tokens)
        return lambda: update_step.lower(pol.graphdef, hp, opt, mesh, pol.params, pol.opt_state, batch,
                                         abstract_key(), sds((), jnp.float32), pol.frozen)
    return program, opt


def classifier_parts(config: PPOConfig) -> tuple[clf.ClassifierConfig, Any, Any, Any]:
    """The run's causal classifier (`policy.classifier_config`) with zero weights (small: built for real,
    since the kernel passes its weights as traced leaves) and its abstract Adam state."""
    ccfg = policy_lib.classifier_config(config.model, config.model.vocab_size, text_interface(config.env).num_labels)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: clf.CausalClassifier(ccfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    opt_state = jax.eval_shape(optax.adam(config.causal.lr).init, abstract)
    return ccfg, graphdef, params, opt_state


def small_program(lower: Callable[[], Any]) -> dict[str, Any]:
    """A program compiled at full size (no extrapolation): its estimate (signature + XLA's temp)."""
    m = measure(lower, None)
    return {**gib_dict(m["estimate"]), "signature_matches_xla": m["signature_matches_xla"],
            "lower_s": m["lower_s"], "compile_s": m["compile_s"], "peak_bytes": m["estimate"]["peak"]}


def classifier_phase(setup: Setup) -> dict[str, Any]:
    config = setup.config
    ccfg, graphdef, params, opt_state = classifier_parts(config)
    b, n = config.causal.batch, setup.new_tokens
    abstract_params = jax.tree.map(lambda x: sds(x.shape, x.dtype), params)
    stats = small_program(lambda: classifier_step.lower(
        graphdef, abstract_params, opt_state, sds((b, n), jnp.int32), sds((b, n), jnp.bool_), sds((b,), jnp.int32),
        abstract_key(), learning_rate=config.causal.lr))
    setup.log(f"  classifier       batch {b} x {n}: peak {stats['peak']:.3f} GiB (compile {stats['compile_s']} s)")
    out = {"method": "classifier_step compiled at full size (float32 program): one Adam step on the whole batch",
           "batch": [b, n], "classifier": dataclasses.asdict(ccfg), "params": count(params),
           **{f"{k}_gib": stats[k] for k in FIELDS + ("peak",)},
           "signature_matches_xla": stats["signature_matches_xla"],
           "compile_s_total": round(stats["lower_s"] + stats["compile_s"], 1)}
    fused = None if setup.quick else fused_classifier_update(setup, graphdef, abstract_params, opt_state)
    if fused is not None:
        out["fused_update"] = fused
    return out


def fused_classifier_update(setup: Setup, graphdef: Any, params: Any, opt_state: Any) -> dict[str, Any] | None:
    """`causal_term.classifier_update` (all epochs in one program, gradients accumulated over chunks of rows),
    where this checkout's causal_term has it, at the shapes `CausalTerm.update_classifier` plans for the
    batch (the chunk and length buckets it uses); None where it has not (and with --quick, to keep it fast).
    Measured, not relied on: a failure (another signature) is reported as such."""
    from coso_jax.rl import causal_term

    update = getattr(causal_term, "classifier_update", None)
    buckets_of = getattr(causal_term, "update_buckets", None)
    chunk_default = getattr(causal_term, "_UPDATE_CHUNK", None)
    if update is None or buckets_of is None or chunk_default is None:
        return None
    config = setup.config
    b, n, epochs = config.causal.batch, setup.new_tokens, config.causal.epochs
    chunk = min(chunk_default, -(-b // 8) * 8)  # as CausalTerm.update_chunk
    buckets = tuple(buckets_of(n))
    slots = -(-b // chunk) * chunk
    try:
        stats = small_program(lambda: update.lower(
            graphdef, params, opt_state, sds((epochs, slots, n), jnp.int32), sds((epochs, slots, n), jnp.bool_),
            sds((epochs, slots), jnp.int32), sds((epochs, slots), jnp.int32), sds((epochs, slots // chunk), jnp.int32),
            abstract_key(), learning_rate=config.causal.lr, batch=b, buckets=buckets, chunk=chunk))
    except Exception as e:  # noqa: BLE001 - another engineer's work in progress; report, do not fail
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    setup.log(f"  classifier (fused update, chunks of {chunk} rows): peak {stats['peak']:.3f} GiB "
              f"(compile {stats['compile_s']} s)")
    return {"method": "causal_term.classifier_update compiled at full size", "epochs": epochs, "chunk": chunk,
            "buckets": list(buckets), **{f"{k}_gib": stats[k] for k in FIELDS + ("peak",)},
            "signature_matches_xla": stats["signature_matches_xla"],
            "compile_s": round(stats["lower_s"] + stats["compile_s"], 1)}


def counterfactual_phase(setup: Setup) -> dict[str, Any]:
    """The chunk scorer at the shapes `counterfactual_effects` dispatches with `chunk_size` None (the
    trainer's default): shortest, middle and longest length bucket of N. Uses the kernel's private
    helpers (`_score_chunk_fast`, `_chunk_for`, `_fast_rows`, `_split_callable`)."""
    config = setup.config
    _, graphdef, params, _ = classifier_parts(config)
    logits_fn = clf.ClassifierLogitsFn(graphdef, params)
    fn_arrays, fn_static = effects_lib._split_callable(logits_fn)
    abstract_arrays = [sds(x.shape, x.dtype) for x in fn_arrays]
    buckets = effects_lib.bucket_lengths(setup.new_tokens)
    chosen = sorted({buckets[0], buckets[len(buckets) // 2], buckets[-1]})
    chunk_size = config.causal.chunk_size
    shapes = []
    for bucket in chosen:
        chunk = effects_lib._chunk_for(bucket, chunk_size)
        rows = effects_lib._fast_rows(chunk, bucket)
        stats = small_program(lambda: effects_lib._score_chunk_fast.lower(
            abstract_arrays, sds((rows, bucket), jnp.int32), sds((rows, bucket), jnp.int32), sds((chunk,), jnp.int32),
            sds((chunk,), jnp.int32), sds((chunk,), jnp.int32), sds((), jnp.int32), sds((), jnp.int32),
            fn_static=fn_static))
        shapes.append({"bucket": bucket, "chunk": chunk, "rows": rows, **stats})
    worst = max(shapes, key=lambda s: s["peak_bytes"])
    setup.log(f"  counterfactual   buckets {chosen}: peak {worst['peak']:.3f} GiB (chunk {worst['chunk']} x "
              f"{worst['bucket']})")
    return {"method": "compiled at full size; the largest of the chunk shapes", "shapes": shapes,
            **{f"{k}_gib": worst[k] for k in FIELDS + ("peak",)},
            "signature_matches_xla": all(s["signature_matches_xla"] for s in shapes),
            "compile_s_total": round(sum(s["lower_s"] + s["compile_s"] for s in shapes), 1)}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace) -> PPOConfig:
    overrides: dict[str, Any] = {"env": args.env, "progress": False}
    if args.quick:
        overrides.update(QUICK_OVERRIDES)
    return ppo_preset(args.preset, **overrides)


def verdict(total_gib: float) -> dict[str, Any]:
    return {"fits_bar": total_gib <= BAR_GIB, "h100_margin_gib": round(H100_GIB - total_gib, 2),
            "h200_margin_gib": round(H200_GIB - total_gib, 2),
            "fits_h100_default_fraction": total_gib <= DEFAULT_MEM_FRACTION * H100_GIB,
            "fits_h200_default_fraction": total_gib <= DEFAULT_MEM_FRACTION * H200_GIB}


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    load_before = os.getloadavg()
    config = make_config(args)
    model = config.model
    steps = QUICK_STEPS if args.quick else tuple(int(s) for s in args.steps_per_update.split(","))
    for n in steps:
        if n % config.minibatch_size:
            raise ValueError(f"steps_per_update {n} is not a multiple of minibatch_size {config.minibatch_size}")
    full = full_depth(model, args.quick)
    probe_cfg = llava_config(model, *(QUICK_FIT_POINTS if args.quick else FIT_POINTS)[0])
    prompt = prompt_length(probe_cfg, model, args.quick)
    if args.prompt_len:
        prompt["prompt_len"] = args.prompt_len
    setup = Setup(config, args.quick, prompt, model.max_new_tokens, full,
                  QUICK_DEPTH if args.quick else CHECK_POINT, steps,
                  compile_full=tuple(p for p in args.compile_full.split(",") if p))
    print(f"memory of preset {args.preset!r} ({config.env}) on {jax.devices()[0].platform}: depth {full}, "
          f"P {prompt['prompt_len']}, N {model.max_new_tokens}, steps per update {steps}; "
          f"compile options {CPU_OPTIONS if on_cpu() else None}")

    # Resident state at full depth (abstract: nothing is allocated).
    opt0 = optimizer_config(config, steps[0])
    full_pol = abstract_policy(config, llava_config(model, *full), opt0)
    lora_state = nnx.state(nnx.merge(full_pol.graphdef, full_pol.params, full_pol.frozen), nnx.LoRAParam)
    _, _, cls_params, cls_opt = classifier_parts(config)
    resident = {
        "frozen_base": nbytes(full_pol.frozen),
        "trainable": nbytes(full_pol.params),
        "lora_adapters": nbytes(lora_state),
        "adam_state": nbytes(full_pol.opt_state),
        "classifier": nbytes(cls_params),
        "classifier_adam": nbytes(cls_opt),
    }
    params = {"frozen": count(full_pol.frozen), "trainable": count(full_pol.params), "lora": count(lora_state)}
    del full_pol, lora_state
    gc.collect()

    wanted = set(args.phases.split(","))
    unknown = wanted - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    phases: dict[str, Any] = {}
    if "sample" in wanted:
        phases["sample"] = policy_phase(setup, "sample", sample_program(setup), opt0)
        phases["sample"]["shapes"] = {"batch": config.num_envs, "prompt_len": prompt["prompt_len"],
                                      "new_tokens": model.max_new_tokens}
    for n in steps if "update" in wanted else ():
        program, opt = update_program(setup, n)
        phases[f"update_n{n}"] = policy_phase(setup, f"update n={n}", program, opt)
        phases[f"update_n{n}"]["shapes"] = {"rows": n, "minibatch": config.minibatch_size,
                                            "micro_batch": config.minibatch_size // config.grad_accum_steps,
                                            "epochs": config.ppo_epochs,
                                            "sequence": prompt["prompt_len"] + model.max_new_tokens}
    if "classifier" in wanted:
        phases["classifier"] = classifier_phase(setup)
        fused = phases["classifier"].pop("fused_update", None)
        if fused is not None:
            phases["classifier_fused"] = fused
    if "counterfactual" in wanted:
        phases["counterfactual"] = counterfactual_phase(setup)
    phases["sft"] = ({"skipped": True, "reason": "the preset skips SFT (sft_epochs=0): the paper's run starts from "
                      "the --hf_dir checkpoint (RL4VLM starts from an SFT'd LLaVA). rl/sft.train_sft would train "
                      "every nnx.Param with f32 AdamW at sft_batch_size with neither micro-batching nor remat, "
                      "which a 7B policy cannot run on one GPU."}
                     if config.sft.epochs == 0 else {"skipped": True, "reason": "not measured by this benchmark"})

    # Device total per phase: the program's peak + the resident state that is not one of its arguments.
    res = resident
    policy_state = res["frozen_base"] + res["trainable"] + res["adam_state"]
    classifier_state = res["classifier"] + res["classifier_adam"]
    extra = {
        "sample": res["adam_state"] + classifier_state,
        "classifier": policy_state,
        "classifier_fused": policy_state,
        "counterfactual": policy_state + res["classifier_adam"],
        **{f"update_n{n}": classifier_state for n in steps},
    }
    extra_what = {
        "sample": "the policy's Adam state + the classifier and its Adam state",
        "classifier": "the policy: frozen base + trainable + Adam state",
        "classifier_fused": "the policy: frozen base + trainable + Adam state",
        "counterfactual": "the policy (frozen base + trainable + Adam state) + the classifier's Adam state",
        **{f"update_n{n}": "the classifier and its Adam state" for n in steps},
    }
    table = []
    for name, extra_bytes in extra.items():
        if name not in phases or "peak_gib" not in phases[name]:  # e.g. a fused update that failed to lower
            continue
        phase = phases[name]
        phase["resident_outside_gib"] = gib(extra_bytes)
        phase["resident_outside"] = extra_what[name]
        phase["total_gib"] = round(phase["peak_gib"] + gib(extra_bytes), 3)
        phase.update(verdict(phase["total_gib"]))
        table.append(name)

    host = {f"rollout_buffer_n{n}": {k: gib(v) for k, v in rollout_buffer_bytes(probe_cfg, n, prompt["prompt_len"],
                                                                               model.max_new_tokens).items()}
            for n in steps}
    for n in steps:
        pix = nbytes(image_inputs(probe_cfg, n))
        host[f"rollout_buffer_n{n}"]["device_pixels_in_update_gib"] = gib(pix)
        frac_zero = 1 - (policy_lib_tiles(probe_cfg) / probe_cfg.max_patches) if probe_cfg.is_next else 0.0
        host[f"rollout_buffer_n{n}"]["zero_tile_fraction"] = round(frac_zero, 3)
        host[f"rollout_buffer_n{n}"]["pixels_bf16_nonzero_tiles_gib"] = gib(pix / 2 * (1 - frac_zero))
    replay = config.causal.replay_capacity * model.max_new_tokens * 5 + config.causal.replay_capacity * 4
    host["action_replay_gib"] = gib(replay)

    worst = max((phases[k]["total_gib"] for k in table), default=float("nan"))
    result = {
        "preset": args.preset, "env": config.env, "quick": bool(args.quick),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compile_options": CPU_OPTIONS if on_cpu() else None,
        "as_is_compile_options": AS_IS_OPTIONS if on_cpu() else None,
        "temp_source": ("XLA:CPU buffer assignment of the float32 proxy (memory-optimised scheduler); argument / "
                        "output / alias: the bf16 preset program's signature" if on_cpu() else
                        "XLA's buffer assignment of the preset program"),
        "model": {"model_preset": model.model_preset, "full_depth": {"text_layers": full[0], "vision_layers": full[1]},
                  "vocab_size": model.vocab_size, "param_dtype": model.param_dtype,
                  "compute_dtype": model.compute_dtype, "lora_rank": model.lora_rank, "lora_alpha": model.lora_alpha,
                  "lora_dropout": model.lora_dropout, "remat": model.remat, "train_vision": model.train_vision,
                  "value_head_widths": list(RL4VLM_WIDTHS), "params": params,
                  "adapters_dtype": "float32", "adam_dtype": "float32"},
        "shapes": {"prompt": prompt, "new_tokens": model.max_new_tokens,
                   "sequence": prompt["prompt_len"] + model.max_new_tokens, "num_envs": config.num_envs,
                   "steps_per_update": list(steps), "minibatch_size": config.minibatch_size,
                   "grad_accum_steps": config.grad_accum_steps, "ppo_epochs": config.ppo_epochs,
                   "pixel_values": {"tiles": probe_cfg.max_patches, "tile": probe_cfg.vision.image_size,
                                    "dtype": "float32"},
                   "causal_batch": config.causal.batch, "causal_chunk_size": config.causal.chunk_size},
        "resident_gib": {k: gib(v) for k, v in resident.items()},
        "host_gib": host,
        "phases": phases,
        "worst_phase_total_gib": worst,
        "bar_gib": BAR_GIB, "h100_gib": round(H100_GIB, 2), "h200_gib": round(H200_GIB, 2),
        "all_phases_fit_bar": all(phases[k]["fits_bar"] for k in table),
        "compile_s_total": round(sum(p.get("compile_s_total", 0.0) for p in phases.values()), 1),
        "wall_s": round(time.perf_counter() - wall, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "jax_version": jax.__version__,
        "device": device_description(),
        "caveat": "XLA:CPU buffer assignment; expect +-10-15% on a GPU (other fusions, f32 intermediates of bf16 "
                  "dots on the CPU)",
    }
    print_table(result, table)
    return result


def policy_lib_tiles(cfg: llava.LlavaConfig) -> int:
    """Tiles a 300x300 frame really uses (the rest of `max_patches` are zero padding)."""
    from coso_jax.models import image_processing as improc

    return improc.num_anyres_patches(FRAME, cfg.image_grid_pinpoints, cfg.vision.image_size)


def print_table(result: dict[str, Any], names: list[str]) -> None:
    print(f"\n{'phase':16s} {'argument':>9s} {'output':>8s} {'alias':>8s} {'temp':>8s} {'peak':>8s} "
          f"{'+resident':>9s} {'total':>8s}  {'fits<=64':8s} {'H100 margin':>11s} {'H200 margin':>11s}   [GiB]")
    for name in names:
        p = result["phases"][name]
        print(f"{name:16s} {p['argument_gib']:9.2f} {p['output_gib']:8.2f} {p['alias_gib']:8.2f} {p['temp_gib']:8.2f} "
              f"{p['peak_gib']:8.2f} {p['resident_outside_gib']:9.2f} {p['total_gib']:8.2f}  "
              f"{'yes' if p['fits_bar'] else 'NO':8s} {p['h100_margin_gib']:11.2f} {p['h200_margin_gib']:11.2f}")
    print(f"{'sft':16s} skipped: {result['phases']['sft']['reason'][:90]}...")
    print("\nextrapolation checks (program peak, GiB): predicted from the fit depths vs compiled")
    for name in names:
        p = result["phases"][name]
        for label, key in (("check", "check"), ("full depth", "full_depth_check")):
            c = p.get(key)
            if c:
                depth = (f"({c['text_layers']}, {c['vision_layers']})" if "text_layers" in c else
                         f"({p['full_depth']['text_layers']}, {p['full_depth']['vision_layers']})")
                print(f"  {name:16s} {label:10s} {depth:9s} predicted {c['predicted_gib']['peak']:7.2f} "
                      f"measured {c['measured_gib']['peak']:7.2f} ({c['peak_error_percent']:+.1f}%)")
        if "per_text_layer_gib" in p:
            print(f"  {name:16s} per decoder layer {p['per_text_layer_gib']['peak']:.3f} GiB, per ViT layer "
                  f"{p['per_vision_layer_gib']['peak']:.3f} GiB; method: {p['method']}")
    print("resident (GiB):", result["resident_gib"])
    print("host (GiB):", result["host_gib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--env", default="NumberLine")
    parser.add_argument("--steps_per_update", default="512,1024",
                        help="comma-separated rollout sizes of the update (paper: 512; 1024 for EZPoints/Points24)")
    parser.add_argument("--prompt_len", type=int, default=0, help="override the derived prompt length P")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--compile_full", default="sample",
                        help="comma-separated policy programs (sample, update) also compiled at full depth")
    parser.add_argument("--quick", action="store_true", help="tiny widths, seconds (the test's code path)")
    parser.add_argument("--out", default=None, help="directory of the JSON (default benchmarks/results)")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    path = out / ("memory_quick.json" if args.quick else f"memory_{args.preset}.json")
    write_json_atomic(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
