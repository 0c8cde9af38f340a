"""Decoder-only language model of the Llama / Mistral / Qwen2 family in Flax NNX.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half convention), grouped-query
attention with an optional sliding window (Mistral) and optional q/k/v bias (Qwen2), SwiGLU MLP,
optional tied input/output embeddings, and a preallocated `KVCache` for decoding.

Two modules:
  * `DecoderModel` — embeddings + layers + final norm, no output projection. Vision-language models
    (coso_jax/models/llava.py) wrap it as their language model and add their own `lm_head`.
  * `CausalLM` — `DecoderModel` + `lm_head`: the policy-model interface of docs/contracts.md
    (`__call__`, `embed_inputs`, `decode`, `init_cache`, `config.text`).

Positions are `cumsum(attention_mask) - 1` (clamped at 0), so left-padded prompts and right-padded
responses need no special care. Causality is by cache *slot* (a query at slot i sees slots <= i);
inside one row the real tokens occupy contiguous slots, so slot distance equals position distance and
the sliding window is exact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax.models.kv_cache import KVCache

Dtype = Any


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama-family decoder (hashable: usable as a static jit argument).

    `attention_bias` adds biases to q/k/v (Qwen2; Llama's `attention_bias=True` also sets
    `attention_out_bias`). `head_dim` defaults to hidden_size // num_heads. `dtype` is the compute
    dtype, `param_dtype` the storage dtype of the parameters.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def text(self) -> "DecoderConfig":
        """The language-model config (contract: every policy model's `config.text`)."""
        return self

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "DecoderConfig":
        """CPU-sized decoder for tests and the demo (~1.3M parameters)."""
        base = dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048)
        return cls(**{**base, **overrides})

    @classmethod
    def llama2_7b(cls, **overrides) -> "DecoderConfig":
        base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096)
        return cls(**{**base, **overrides})

    @classmethod
    def vicuna_7b(cls, **overrides) -> "DecoderConfig":
        """LLaVA-1.5-7b's language model (Vicuna-7B v1.5: Llama-2 shape, vocab 32064 with image/pad tokens)."""
        return cls.llama2_7b(**{"vocab_size": 32064, **overrides})

    @classmethod
    def mistral_7b(cls, **overrides) -> "DecoderConfig":
        """llava-v1.6-mistral-7b-hf's language model (Mistral-7B-Instruct-v0.2; vocab 32064)."""
        base = dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, sliding_window=None)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_0_5b(cls, **overrides) -> "DecoderConfig":
        base = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                    num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6, attention_bias=True,
                    tie_word_embeddings=True, max_position_embeddings=32768)
        return cls(**{**base, **overrides})

    def num_params(self) -> int:
        """Parameter count of `CausalLM(self)`, computed abstractly (nothing is allocated)."""
        abstract = nnx.eval_shape(lambda: CausalLM(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """x / rms(x) * weight, with the statistics in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, *, eps: float, dtype: Dtype, param_dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.weight[...].astype(self.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """`[B, T]` position ids `cumsum(mask) - 1`, clamped at 0 (padding gets a harmless position)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, head_dim]` for integer `positions[B, T]` (computed in float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # HF layout: the two halves repeat
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x[B, T, H, Dh]` (rotate-half convention: pairs are (i, i + Dh/2))."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask_bias(key_valid: jax.Array, q_slots: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean mask `[B, 1, 1, T, S]`: key valid, causal by slot, inside the sliding window."""
    s = jnp.arange(key_valid.shape[-1], dtype=jnp.int32)
    allowed = s[None, :] <= q_slots[:, None]  # [T, S]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - s[None, :]) < sliding_window
    return key_valid.astype(jnp.bool_)[:, None, None, None, :] & allowed[None, None, None]


def _linear(cfg: DecoderConfig, din: int, dout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hk, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _linear(cfg, d, h * dh, cfg.attention_bias, rngs)
        self.k_proj = _linear(cfg, d, hk * dh, cfg.attention_bias, rngs)
        self.v_proj = _linear(cfg, d, hk * dh, cfg.attention_bias, rngs)
        self.o_proj = _linear(cfg, h * dh, d, cfg.attention_out_bias, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: KVCache | None, layer: int) -> tuple[jax.Array, KVCache | None]:
        """x `[B, T, D]`, mask `[B, 1, 1, T, S]` -> (`[B, T, D]`, cache with this layer's keys written)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x2 = x.reshape(b * t, -1)  # 2-D matmuls: see MLP.__call__
        q = apply_rope(self.q_proj(x2).reshape(b, t, h, dh), cos, sin)
        k = apply_rope(self.k_proj(x2).reshape(b, t, hk, dh), cos, sin)
        v = self.v_proj(x2).reshape(b, t, hk, dh)
        # Heads-major layout [B, Hkv, *, Dh] (the cache's): the matmuls then need no transposes of
        # the (long) key/value sequence, only of the T new tokens.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None:
            cache = cache.update_layer(layer, k, v)
            k, v = cache.k[layer], cache.v[layer]  # [B, Hkv, S, Dh], read in place
        # Group query heads by their shared kv head (HF's repeat_kv order): [B, Hkv, G, T, Dh], then
        # merge (G, T) into one axis so every matmul has a single contracting dim (XLA:CPU runs
        # the backward of two-contracting-dim einsums several times slower).
        g = h // hk
        q = q.reshape(b, t, hk, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, hk, g * t, dh)
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k).astype(jnp.float32) / math.sqrt(dh)
        scores = scores.reshape(b, hk, g, t, -1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hk, g * t, -1)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, hk, g, t, dh)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b * t, h * dh)
        return self.o_proj(out).reshape(b, t, -1), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
        self.up_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
        self.down_proj = _linear(cfg, f, d, cfg.mlp_bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Flatten tokens to one axis: XLA:CPU runs the weight-gradient matmuls of [B, T, D] inputs
        # (two contracting dims) ~1.7x slower than the same matmuls on [B*T, D] (measured).
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y.reshape(shape)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache, layer):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


def _cast_floating(state: nnx.State, dtype: Dtype) -> nnx.State:
    """Casts the floating leaves of `state` to `dtype` (differentiable: gradients flow back in the
    leaves' own dtype)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def run_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              cache: KVCache | None, index: int, *, remat: bool, compute_dtype: Dtype
              ) -> tuple[jax.Array, KVCache | None]:
    """Applies one decoder layer, optionally rematerialised; works inside any jax transform.

    A plain layer without remat is called directly. Otherwise the layer runs functionally: it is
    split into (graphdef, LoRA params, other params, other state), the pure function "merge, call,
    return the outputs and the new non-parameter state" is (with `remat`) wrapped in `jax.checkpoint`,
    and the new non-parameter state (e.g. the counter of a LoRA dropout `nnx.Rngs`) is written back
    into `layer` afterwards. Only values cross the function boundary and no parameter is written
    back, so it composes with `jax.value_and_grad` inside `jax.lax.scan` over a model merged inside
    the loss (the trainer's pattern). `nnx.remat`, which updates the module's Variables in place,
    raised `flax.errors.TraceContextError: Cannot mutate Param from a different trace level` there
    (e.g. after a `jax.eval_shape` of the loss in the same scan body).

    LoRA parameters (`nnx.LoRAParam`, coso_jax.models.lora) are cast to `compute_dtype` inside the
    function: they may be stored in float32 (master weights, float32 optimizer state) while a bfloat16
    base computes in bfloat16; their gradients come back in float32.

    `jax.checkpoint` with its default policy saves nothing but the function's inputs (the layer's
    input activations, its parameters, RoPE tables and mask) and recomputes the layer in the backward
    pass: activation memory per layer drops from all intermediates to one `[B, T, D]` input.

    Args:
      layer: the `DecoderLayer` (possibly carrying qwix LoRA parameters).
      x, cos, sin, mask, cache, index: as `DecoderLayer.__call__`.
      remat: rematerialise the layer in the backward pass.
      compute_dtype: the dtype LoRA parameters are cast to.
    Returns:
      (`[B, T, D]` output, the cache with this layer's keys/values written or None).
    """
    graphdef, lora, params, rest = nnx.split(layer, nnx.LoRAParam, nnx.Param, ...)
    if not remat and not jax.tree.leaves(lora):
        return layer(x, cos, sin, mask, cache, index)

    def apply(lora, params, rest, x, cos, sin, mask, cache):
        lyr = nnx.merge(graphdef, _cast_floating(lora, compute_dtype), params, rest)
        y, cache = lyr(x, cos, sin, mask, cache, index)
        return y, cache, nnx.state(lyr, nnx.Not(nnx.Param))

    if remat:
        apply = jax.checkpoint(apply, prevent_cse=True)
    y, cache, new_rest = apply(lora, params, rest, x, cos, sin, mask, cache)
    if jax.tree.leaves(new_rest):
        nnx.update(layer, new_rest)
    return y, cache


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class DecoderModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm (HF `LlamaModel`); no output projection.

    Reusable as the language model of a VLM: `embed(input_ids)` -> embeddings the VLM may splice
    image features into, then `__call__(inputs_embeds, attention_mask, positions, cache)`.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """`input_ids[B, T]` int -> `[B, T, D]` in the compute dtype."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        cfg = self.config
        return KVCache.create(cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim,
                              dtype or cfg.dtype)

    def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                 cache: KVCache | None = None, *, remat: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder stack.

        Args:
          inputs_embeds: `[B, T, D]`.
          attention_mask: key validity. Without a cache `[B, T]`. With a cache either `[B, T]` (the
            validity of the new tokens; written into `cache.mask`) or `[B, S]` (the whole cache's key
            mask, S = cache.max_length; stored as is).
          positions: `[B, T]` int position ids (RoPE), usually `positions_from_mask`.
          cache: optional `KVCache`; the T new tokens are written at slots index..index+T-1.
          remat: rematerialise each layer in the backward pass (saves activation memory); a functional
            per-layer `jax.checkpoint` (see `run_layer`), safe under `jax.value_and_grad` in `lax.scan`.
        Returns:
          (hidden `[B, T, D]` after the final norm, updated cache or None).
        """
        cfg = self.config
        b, t, d = inputs_embeds.shape
        if d != cfg.hidden_size:
            raise ValueError(f"inputs_embeds last dim {d} != hidden_size {cfg.hidden_size}")
        if positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != (B, T) = {(b, t)}")
        if cache is None:
            if attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != (B, T) = {(b, t)} (no cache)")
            key_valid = attention_mask
            q_slots = jnp.arange(t, dtype=jnp.int32)
        else:
            cache.check(cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, t)
            if attention_mask.shape == (b, t):
                cache = cache.update_mask(attention_mask)
            elif attention_mask.shape == (b, cache.max_length):
                cache = dataclasses.replace(cache, mask=attention_mask.astype(jnp.bool_))
            else:
                raise ValueError(f"attention_mask shape {attention_mask.shape} is neither (B, T) = {(b, t)} "
                                 f"nor (B, S) = {(b, cache.max_length)}")
            key_valid = cache.mask
            q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
        mask = attention_mask_bias(key_valid, q_slots, cfg.sliding_window)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

        x = inputs_embeds.astype(cfg.dtype)
        for i, layer in enumerate(self.layers):
            x, cache = run_layer(layer, x, cos, sin, mask, cache, i, remat=remat, compute_dtype=cfg.dtype)
        if cache is not None:
            cache = cache.advance(t)
        return self.norm(x), cache


class CausalLM(nnx.Module):
    """Llama / Mistral / Qwen2 causal LM (HF `*ForCausalLM`) with the policy-model interface.

    Parameter tree mirrors Hugging Face names: `model.embed_tokens`, `model.layers[i].self_attn.q_proj`,
    ..., `model.norm`, `lm_head` (absent when `tie_word_embeddings`).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
                                      param_dtype=config.param_dtype,
                                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`hidden[B, T, D]` -> `logits[B, T, V]` float32 (see `output_logits`)."""
        return output_logits(hidden, self.model.embed_tokens, self.lm_head, self.config.dtype)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     image_sizes: jax.Array | None = None) -> jax.Array:
        """`input_ids[B, T]` -> `inputs_embeds[B, T, D]`. A text-only model rejects images."""
        if pixel_values is not None:
            raise ValueError("CausalLM is text-only: pixel_values must be None")
        del image_sizes
        return self.model.embed(input_ids)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        """Empty preallocated cache for `decode` (k/v in `dtype`, default the compute dtype)."""
        return self.model.init_cache(batch_size, max_length, dtype)

    def decode(self, inputs_embeds: jax.Array, attention_mask: jax.Array, positions: jax.Array,
               cache: KVCache | None = None, *, remat: bool = False, logits_slice: tuple[int, int] | None = None
               ) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """-> (logits `[B, T, V]` float32, final hidden `[B, T, D]`, cache). See `DecoderModel.__call__`.

        `logits_slice=(start, stop)` (static ints) computes logits only for positions start..stop-1
        (`[B, stop - start, V]`): the sampler's prefill needs the last position only, the scorer the
        response positions, and XLA does not prune an unused vocabulary projection by itself.
        """
        hidden, cache = self.model(inputs_embeds, attention_mask, positions, cache, remat=remat)
        selected = hidden if logits_slice is None else hidden[:, logits_slice[0]:logits_slice[1]]
        return self.logits(selected), hidden, cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_sizes: jax.Array | None = None) -> jax.Array:
        """HF-equivalent forward: `input_ids[B, T]`, `attention_mask[B, T]` -> `logits[B, T, V]`."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        logits, _, _ = self.decode(embeds, attention_mask, positions_from_mask(attention_mask))
        return logits


def output_logits(hidden: jax.Array, embed_tokens: nnx.Embed, lm_head: nnx.Linear | None, dtype: Dtype) -> jax.Array:
    """The output projection `hidden[..., D]` -> `logits[..., V]`, returned in float32.

    The operands are in the compute dtype `dtype` (bf16 for a bf16 model) and the matmul accumulates
    and returns float32 (`preferred_element_type`): log-softmax, PPO ratios and entropies then see
    logits without a bf16 rounding of the output (HF rounds them to the model dtype and upcasts
    afterwards). For float32 models this is the plain float32 projection. `lm_head=None` means tied
    embeddings (the embedding table `[V, D]` is the projection; `lm_head` has no bias in this family).
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)  # 2-D matmul (see MLP.__call__)
    if lm_head is None:
        weight, contract = embed_tokens.embedding[...].astype(dtype), 1  # [V, D]
    else:
        weight, contract = lm_head.kernel[...].astype(dtype), 0  # [D, V]
    logits = jax.lax.dot_general(flat, weight, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
    return logits.reshape(hidden.shape[:-1] + (-1,))


def random_init(build: Callable[[], nnx.Module], seed: int = 0, scale: float = 0.02) -> nnx.Module:
    """`build()` with every variable drawn in numpy: N(0, scale), norm weights 1 + N(0, scale).

    Equivalent in spirit to the modules' own initialisers but without one XLA compile per
    initializer (seconds on a small CPU): the model is built abstractly and filled from numpy.
    Use it for tests, benchmarks and demos at any size that fits in host memory.
    """
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rs = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        x = rs.standard_normal(abstract.shape, dtype=np.float32) * scale
        if path[-1] == "weight":  # RMSNorm gains
            x += 1.0
        filled.append((path, var.replace(jnp.asarray(x, abstract.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --------------------------------------------------------------------------------------------------
# Hugging Face import (used by coso_jax.models.hf_import)
# --------------------------------------------------------------------------------------------------
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(hf_config: dict, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None) -> DecoderConfig:
    """`DecoderConfig` from a Hugging Face `config.json` dict of a Llama / Mistral / Qwen2 model."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config_from_hf: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only the default RoPE)")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
        if window is not None:
            raise NotImplementedError("Qwen2 use_sliding_window=True (per-layer windows) is not supported")
    else:
        qkv_bias = out_bias = bool(hf_config.get("attention_bias", False))
        window = hf_config.get("sliding_window") if model_type == "mistral" else None
    return DecoderConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(hf_config.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        sliding_window=window,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def build_model(config: DecoderConfig, *, rngs: nnx.Rngs) -> CausalLM:
    return CausalLM(config, rngs=rngs)


def transpose(x):
    """torch `nn.Linear.weight` `[out, in]` -> NNX `Linear.kernel` `[in, out]`."""
    return x.T


def decoder_key_map(cfg: DecoderConfig, hf_prefix: str, nnx_prefix: tuple) -> list[tuple[str, tuple, Any]]:
    """Key map of a `DecoderModel` whose HF weights live under `hf_prefix` (e.g. "model." or
    "model.language_model.") and whose NNX path starts with `nnx_prefix` (e.g. ("model",)).

    Entries are `(hf_key, nnx_path, transform)`; `transform` maps the numpy tensor to the NNX layout.
    """
    entries = [(f"{hf_prefix}embed_tokens.weight", nnx_prefix + ("embed_tokens", "embedding"), None),
               (f"{hf_prefix}norm.weight", nnx_prefix + ("norm", "weight"), None)]
    for i in range(cfg.num_layers):
        hf, nx = f"{hf_prefix}layers.{i}.", nnx_prefix + ("layers", i)
        entries += [(f"{hf}input_layernorm.weight", nx + ("input_layernorm", "weight"), None),
                    (f"{hf}post_attention_layernorm.weight", nx + ("post_attention_layernorm", "weight"), None)]
        projections = [("self_attn", "q_proj", cfg.attention_bias), ("self_attn", "k_proj", cfg.attention_bias),
                       ("self_attn", "v_proj", cfg.attention_bias), ("self_attn", "o_proj", cfg.attention_out_bias),
                       ("mlp", "gate_proj", cfg.mlp_bias), ("mlp", "up_proj", cfg.mlp_bias),
                       ("mlp", "down_proj", cfg.mlp_bias)]
        for block, name, bias in projections:
            entries.append((f"{hf}{block}.{name}.weight", nx + (block, name, "kernel"), transpose))
            if bias:
                entries.append((f"{hf}{block}.{name}.bias", nx + (block, name, "bias"), None))
    return entries


def hf_key_map(config: DecoderConfig) -> list[tuple[str, tuple | None, Any]]:
    """Explicit map from HF `*ForCausalLM` safetensors keys to `CausalLM` parameter paths.

    An entry with `nnx_path=None` names a tensor that may be present and is ignored (the tied
    `lm_head.weight` some checkpoints still store).
    """
    entries = decoder_key_map(config, "model.", ("model",))
    if config.tie_word_embeddings:
        entries.append(("lm_head.weight", None, None))
    else:
        entries.append(("lm_head.weight", ("lm_head", "kernel"), transpose))
    return entries
