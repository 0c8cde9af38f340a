"""T5 encoder-decoder in Flax NNX, with AutoUI-style image features in the encoder.

The text model follows Hugging Face's `T5ForConditionalGeneration`:
  * T5 layer norm: `x / rms(x) * weight` (no mean subtraction, no bias; statistics in float32);
  * attention without the 1/sqrt(d) scaling (T5 folds it into the initialisation);
  * learned relative position buckets, computed once per stack (in the first layer in HF) and shared by
    all its layers: bidirectional in the encoder, causal in the decoder; cross-attention has none;
  * feed-forward `feed_forward_proj`: "relu" (original T5: `wo(relu(wi(x)))`) or "gated-gelu"
    (T5 v1.1 / FLAN-T5: `wo(gelu_tanh(wi_0(x)) * wi_1(x))`), or any `[gated-]act` with a known act;
  * embeddings shared by encoder and decoder; the output projection either tied to them or a separate
    `lm_head`; `scale_decoder_outputs` multiplies the decoder output by d_model**-0.5 before it (HF does
    so when the config ties the embeddings, i.e. original T5; not for T5 v1.1 / FLAN-T5).

Image features `[B, N, F]` (e.g. BLIP-2 features, F = 1408 in AutoUI / DigiRL) enter the encoder in one
of two ways (`T5Config.image_fusion`):
  * "prefix": a linear layer projects them to d_model and they are prefixed to the token embeddings;
    the encoder attention mask is extended with N ones (the decoder cross-attends to them too). The
    projection is ours: fine-tune it from a text-only T5 checkpoint.
  * "gated_attention": the fusion of AutoUI / MM-CoT's `T5ForMultimodalGeneration` (the model DigiRL and
    CoSo fine-tune): after the text encoder, `img = image_dense(features)`, a one-head attention
    `att = MHA(query=h, key=img, value=img)` and a sigmoid gate `g = sigmoid(gate_dense([h, att]))` give
    `h = (1 - g) * h + g * att`. The encoder length and mask are unchanged. The weights load from such
    checkpoints (`image_dense.*`, `mha_layer.*`, `gate_dense.*`).

Positions. In the encoder, relative distances are taken between mask positions `cumsum(mask) - 1`, so a
row's output does not depend on how much padding it has or where (with contiguous real tokens this is
exactly HF's slot distance). In the decoder they are slot distances (slot = step), as in HF; decoder
inputs are expected right-padded (the start token in slot 0).

Decoding keeps a KV cache (`T5Cache`, a pytree of arrays): the decoder self-attention keys/values,
preallocated, and the cross-attention keys/values of the encoder output, computed once in `init_cache`.
`generate` runs greedy decoding or temperature sampling in one jitted `lax.while_loop`; `generate_fn` is
the same loop un-jitted (traced key, optional custom token choice) for use inside the caller's own jit.

Parameter tree (HF names in the key map, `hf_key_map`):
  shared                                    <- shared.weight
  encoder.relative_attention_bias           <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias
  encoder.layers[i].self_attention.{q,k,v,o} <- encoder.block.i.layer.0.SelfAttention.{q,k,v,o}
  encoder.layers[i].self_attention_norm     <- encoder.block.i.layer.0.layer_norm
  encoder.layers[i].ffn.{wi | wi_0, wi_1, wo} <- encoder.block.i.layer.1.DenseReluDense.*
  encoder.layers[i].ffn_norm                <- encoder.block.i.layer.1.layer_norm
  encoder.final_layer_norm                  <- encoder.final_layer_norm
  decoder.* likewise, plus cross_attention{,_norm} <- decoder.block.i.layer.1.EncDecAttention / layer_norm
  (the decoder's FFN is layer.2), lm_head (untied only), image_fusion.* (see above).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax.models import hf_import
from coso_jax.models.kv_cache import write_layer
from coso_jax.models.llama import RMSNorm

Dtype = Any

# name in `feed_forward_proj` (HF's ACT2FN names) -> activation
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
IMAGE_FUSIONS = ("prefix", "gated_attention")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder (hashable: usable as a static jit argument).

    Attributes:
      vocab_size, d_model, d_kv (per-head dim), d_ff, num_heads: sizes.
      num_layers / num_decoder_layers: encoder / decoder depth (decoder defaults to num_layers).
      relative_attention_num_buckets, relative_attention_max_distance: relative position buckets.
      feed_forward_proj: "relu" | "gated-gelu" | "[gated-]<act>" with act in relu, gelu, gelu_new,
        gelu_pytorch_tanh, silu, swish. As in HF, "gated-gelu" uses the tanh GELU.
      tie_word_embeddings: the output projection is the shared embedding matrix (no `lm_head`).
      scale_decoder_outputs: multiply the decoder output by d_model**-0.5 before the output projection;
        defaults to `tie_word_embeddings` (original T5 behaviour).
      pad_token_id, eos_token_id, decoder_start_token_id: generation defaults.
      image_feature_dim: F of the image features `[B, N, F]`; None = text-only model.
      image_fusion: "prefix" or "gated_attention" (see the module docstring).
      dtype / param_dtype: compute / storage dtype.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    image_feature_dim: int | None = None
    image_fusion: str = "prefix"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
        _ = self.activation  # validates feed_forward_proj
        if self.image_fusion not in IMAGE_FUSIONS:
            raise ValueError(f"image_fusion must be one of {IMAGE_FUSIONS}, got {self.image_fusion!r}")
        if self.image_feature_dim is not None and self.image_feature_dim < 1:
            raise ValueError(f"image_feature_dim must be >= 1 or None, got {self.image_feature_dim}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_decoder_layers",
                     "relative_attention_num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj must be '<act>' or 'gated-<act>', got {self.feed_forward_proj!r}")
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]  # HF's legacy mapping
        if name not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[name]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "T5Config":
        """CPU-sized model for tests and demos (gated-GELU, untied, 2+2 layers, 0.26M parameters)."""
        base = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=64)
        return cls(**{**base, **overrides})

    @classmethod
    def t5_base(cls, **overrides) -> "T5Config":
        """google-t5/t5-base: ReLU FFN, tied embeddings with the d_model**-0.5 output scaling (222.9M)."""
        base = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu", tie_word_embeddings=True)
        return cls(**{**base, **overrides})

    @classmethod
    def flan_t5_base(cls, **overrides) -> "T5Config":
        """google/flan-t5-base (T5 v1.1 layout): gated-GELU FFN, untied lm_head, no output scaling (247.6M)."""
        base = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        return cls(**{**base, **overrides})

    @classmethod
    def autoui_base(cls, **overrides) -> "T5Config":
        """Auto-UI-Base (the DigiRL / CoSo device-control policy): FLAN-T5-base (FLAN-Alpaca-base) with
        BLIP-2 image features (F = 1408) fused by gated attention after the encoder."""
        return cls.flan_t5_base(**{"image_feature_dim": 1408, "image_fusion": "gated_attention", **overrides})

    def num_params(self) -> int:
        """Parameter count of `T5EncoderDecoder(self)`, computed abstractly (nothing is allocated)."""
        abstract = nnx.eval_shape(lambda: T5EncoderDecoder(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# Relative positions, masks, attention
# --------------------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket (int32, in [0, num_buckets)) of `relative_position = key_pos - query_pos`.

    Bidirectional: half the buckets for keys after the query. Causal: positive distances share bucket 0.
    Within each half, distances < max_exact (= half of the half's buckets) get their own bucket, larger
    ones log-spaced buckets up to `max_distance`, beyond which they all share the last bucket. The float
    arithmetic follows HF's order of operations in float32 so bucket edges agree.
    """
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = jnp.maximum(rel, 1).astype(jnp.float32)  # log(0) is never selected; avoid -inf casts
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


def mask_positions(mask: jax.Array) -> jax.Array:
    """`[B, S]` positions `cumsum(mask) - 1`, clamped at 0 (padding gets a harmless position)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array) -> jax.Array:
    """Unscaled dot-product attention.

    q `[B, T, H, Dk]`, k / v `[B, S, H, Dk]`, bias `[B or 1, H, T, S]` (added to the scores) or None,
    mask `[B, 1 or H, T, S]` bool (True = may attend) -> `[B, T, H * Dk]`. Scores and softmax in float32.
    """
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def _linear(cfg: T5Config, din: int, dout: int, std: float, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


# T5's LayerNorm is an RMSNorm: no mean subtraction, no bias, statistics in float32.
T5LayerNorm = RMSNorm


class T5Attention(nnx.Module):
    """Multi-head attention with bias-free q/k/v/o projections (no relative bias of its own)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, inner = cfg.d_model, cfg.inner_dim
        # HF's initialisation scales (the missing 1/sqrt(d_kv) of the scores lives in q's init).
        self.q = _linear(cfg, d, inner, (d * cfg.d_kv) ** -0.5, rngs)
        self.k = _linear(cfg, d, inner, d ** -0.5, rngs)
        self.v = _linear(cfg, d, inner, d ** -0.5, rngs)
        self.o = _linear(cfg, inner, d, inner ** -0.5, rngs)

    def heads(self, proj: nnx.Linear, x: jax.Array) -> jax.Array:
        """`x[B, T, D]` -> `[B, T, H, Dk]` through projection `proj` (q, k or v)."""
        return proj(x).reshape(*x.shape[:2], self.cfg.num_heads, self.cfg.d_kv)

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array) -> jax.Array:
        """Queries from `x[B, T, D]` over projected keys/values `[B, S, H, Dk]` -> `[B, T, D]`."""
        return self.o(_attend(self.heads(self.q, x), k, v, bias, mask))


class T5FeedForward(nnx.Module):
    """`wo(act(wi(x)))` (e.g. ReLU) or, gated, `wo(act(wi_0(x)) * wi_1(x))` (e.g. gated-GELU)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.act = cfg.activation
        self.gated = cfg.is_gated
        d, f = cfg.d_model, cfg.d_ff
        if self.gated:
            self.wi_0 = _linear(cfg, d, f, d ** -0.5, rngs)
            self.wi_1 = _linear(cfg, d, f, d ** -0.5, rngs)
        else:
            self.wi = _linear(cfg, d, f, d ** -0.5, rngs)
        self.wo = _linear(cfg, f, d, f ** -0.5, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5Block(nnx.Module):
    """Pre-norm residual block: self-attention, [cross-attention (decoder)], feed-forward."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.self_attention_norm = T5LayerNorm(cfg.d_model, **norm)
        self.self_attention = T5Attention(cfg, rngs=rngs)
        if is_decoder:
            self.cross_attention_norm = T5LayerNorm(cfg.d_model, **norm)
            self.cross_attention = T5Attention(cfg, rngs=rngs)
        else:
            self.cross_attention_norm = self.cross_attention = None
        self.ffn_norm = T5LayerNorm(cfg.d_model, **norm)
        self.ffn = T5FeedForward(cfg, rngs=rngs)

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values `[B, S_enc, H, Dk]` of the encoder output `[B, S_enc, D]`."""
        attn = self.cross_attention
        return attn.heads(attn.k, encoder_hidden), attn.heads(attn.v, encoder_hidden)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array, *,
                 cross: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 cache: "T5Cache | None" = None, layer: int = 0) -> tuple[jax.Array, "T5Cache | None"]:
        """x `[B, T, D]`; bias `[B or 1, H, T, S]`; mask `[B, 1, T, S]`; cross = (k, v, mask `[B, 1, 1, S_enc]`).

        With `cache`, this layer's new self-attention keys/values are written at the cache's write slots
        and attention runs over the whole cache (S = cache length).
        """
        attn = self.self_attention
        h = self.self_attention_norm(x)
        k, v = attn.heads(attn.k, h), attn.heads(attn.v, h)
        if cache is not None:
            cache = cache.write_layer(layer, k, v)
            k, v = cache.self_k[layer], cache.self_v[layer]
        x = x + attn(h, k, v, bias, mask)
        if cross is not None:
            ck, cv, cmask = cross
            x = x + self.cross_attention(self.cross_attention_norm(x), ck, cv, None, cmask)
        x = x + self.ffn(self.ffn_norm(x))
        return x, cache


class T5Stack(nnx.Module):
    """Blocks + final layer norm, with the stack's relative position bias table `[buckets, H]`."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        self.config = cfg
        self.is_decoder = is_decoder
        depth = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=cfg.dtype,
                                                 param_dtype=cfg.param_dtype,
                                                 embedding_init=nnx.initializers.normal(cfg.d_model ** -0.5),
                                                 rngs=rngs)
        self.layers = nnx.List([T5Block(cfg, is_decoder=is_decoder, rngs=rngs) for _ in range(depth)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                            param_dtype=cfg.param_dtype)

    def position_bias(self, relative_position: jax.Array) -> jax.Array:
        """`relative_position[..., T, S]` (key - query) -> bias `[..., H, T, S]`."""
        cfg = self.config
        buckets = relative_position_bucket(relative_position, bidirectional=not self.is_decoder,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        return jnp.moveaxis(self.relative_attention_bias(buckets), -1, -3)


# --------------------------------------------------------------------------------------------------
# Image fusion
# --------------------------------------------------------------------------------------------------
class ImagePrefix(nnx.Module):
    """Projects image features `[B, N, F]` to `[B, N, D]` tokens prefixed to the encoder input."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.proj = _linear(cfg, cfg.image_feature_dim, cfg.d_model, cfg.image_feature_dim ** -0.5, rngs, bias=True)

    def __call__(self, image_features: jax.Array) -> jax.Array:
        return self.proj(image_features)


class GatedImageFusion(nnx.Module):
    """AutoUI / MM-CoT fusion of image features into the encoder output (one-head attention + gate).

    `img = image_dense(f)`; `att = out_proj(softmax(q k^T / sqrt(D)) v)` with q from the encoder output and
    k, v from `img` (torch `nn.MultiheadAttention`, one head, with biases, no key mask);
    `g = sigmoid(gate_dense([h, att]))`; returns `(1 - g) * h + g * att`.
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.image_feature_dim
        self.image_dense = _linear(cfg, f, d, f ** -0.5, rngs, bias=True)
        self.q_proj = _linear(cfg, d, d, d ** -0.5, rngs, bias=True)
        self.k_proj = _linear(cfg, d, d, d ** -0.5, rngs, bias=True)
        self.v_proj = _linear(cfg, d, d, d ** -0.5, rngs, bias=True)
        self.out_proj = _linear(cfg, d, d, d ** -0.5, rngs, bias=True)
        self.gate_dense = _linear(cfg, 2 * d, d, (2 * d) ** -0.5, rngs, bias=True)

    def __call__(self, hidden: jax.Array, image_features: jax.Array) -> jax.Array:
        """hidden `[B, S, D]`, image_features `[B, N, F]` -> fused hidden `[B, S, D]`."""
        img = self.image_dense(image_features)
        d = hidden.shape[-1]
        q = self.q_proj(hidden)[:, :, None, :] * (d ** -0.5)
        k, v = self.k_proj(img)[:, :, None, :], self.v_proj(img)[:, :, None, :]
        every = jnp.ones((1, 1, 1, img.shape[1]), jnp.bool_)
        att = self.out_proj(_attend(q, k, v, None, every))
        gate = jax.nn.sigmoid(self.gate_dense(jnp.concatenate([hidden, att], axis=-1)))
        return (1 - gate) * hidden + gate * att


def _image_fusion(cfg: T5Config, rngs: nnx.Rngs) -> ImagePrefix | GatedImageFusion:
    return (ImagePrefix if cfg.image_fusion == "prefix" else GatedImageFusion)(cfg, rngs=rngs)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class T5Cache:
    """Decoding state: decoder self-attention keys/values and the encoder side of cross-attention.

    All rows write at the same slot `index` (slot = decoder step); per-row validity is `self_mask`.

    Attributes:
      self_k, self_v: tuples of L_dec arrays `[B, S_max, H, Dk]`, the decoder self-attention keys/values (one
        array per layer: a layer's slice of one stacked array is copied by XLA:CPU at every decode step, see
        coso_jax/models/kv_cache.py).
      self_mask: `[B, S_max]` bool; True where a slot holds a real decoder token.
      index: int32 scalar; the slot the next `decode` call writes first.
      cross_k, cross_v: tuples of L_dec arrays `[B, S_enc, H, Dk]`, the cross-attention keys/values of the
        encoder output.
      encoder_mask: `[B, S_enc]` bool.
    """

    self_k: tuple[jax.Array, ...]
    self_v: tuple[jax.Array, ...]
    self_mask: jax.Array
    index: jax.Array
    cross_k: tuple[jax.Array, ...]
    cross_v: tuple[jax.Array, ...]
    encoder_mask: jax.Array

    @property
    def max_length(self) -> int:
        return self.self_k[0].shape[1]

    def write_layer(self, layer: int, k: jax.Array, v: jax.Array) -> "T5Cache":
        """Writes layer `layer`'s (a Python int) new keys/values `[B, T, H, Dk]` at slots index..index+T-1."""
        zero = jnp.zeros((), jnp.int32)
        start = (zero, self.index, zero, zero)
        return dataclasses.replace(self, self_k=write_layer(self.self_k, layer, k, start),
                                   self_v=write_layer(self.self_v, layer, v, start))

    def write_mask(self, new_mask: jax.Array) -> "T5Cache":
        """Records the validity `[B, T]` of the T tokens about to be decoded."""
        mask = jax.lax.dynamic_update_slice(self.self_mask, new_mask.astype(jnp.bool_), (0, self.index))
        return dataclasses.replace(self, self_mask=mask)


class T5GenerateOutput(NamedTuple):
    """tokens `[B, N]` int32 (pad after EOS, no start token); logprobs `[B, N]` float32 of the
    temperature-scaled distribution (0 at pad); mask `[B, N]` bool (generated tokens incl. EOS);
    lengths `[B]` int32; entropies `[B, N]` float32, entropy (nats) of that distribution at each
    generated position (0 at pad)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    entropies: jax.Array


class T5EncoderDecoder(nnx.Module):
    """T5 for conditional generation (HF `T5ForConditionalGeneration`), optionally with image features.

    Call: `model(input_ids[B, T], attention_mask[B, T], decoder_input_ids[B, T_dec],
    decoder_attention_mask=None, image_features=None) -> logits[B, T_dec, V]`.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype, param_dtype=config.param_dtype,
                                embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.encoder = T5Stack(config, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, is_decoder=True, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else _linear(
            config, config.d_model, config.vocab_size, config.d_model ** -0.5, rngs)
        self.image_fusion = None if config.image_feature_dim is None else _image_fusion(config, rngs)

    # ---- encoder ---------------------------------------------------------------------------------
    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               image_features: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Encodes tokens (and image features).

        Args:
          input_ids: `[B, T]` int.
          attention_mask: `[B, T]` 0/1 (default all ones); left or right padding.
          image_features: `[B, N, F]` or None (allowed, also for an image model: text only).
        Returns:
          (encoder hidden `[B, S, D]`, encoder mask `[B, S]` bool), S = N + T for "prefix" fusion, else T.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, t)}")
        x = self.shared(input_ids)
        if image_features is not None:
            if self.image_fusion is None:
                raise ValueError("image_features given, but this model has no image input "
                                 "(T5Config.image_feature_dim is None)")
            if image_features.ndim != 3 or image_features.shape[0] != b \
                    or image_features.shape[-1] != cfg.image_feature_dim:
                raise ValueError(f"image_features must be [B={b}, N, F={cfg.image_feature_dim}], "
                                 f"got {image_features.shape}")
            image_features = image_features.astype(cfg.dtype)
            if cfg.image_fusion == "prefix":
                x = jnp.concatenate([self.image_fusion(image_features), x], axis=1)
                mask = jnp.concatenate([jnp.ones(image_features.shape[:2], jnp.bool_), mask], axis=1)

        positions = mask_positions(mask)
        bias = self.encoder.position_bias(positions[:, None, :] - positions[:, :, None])  # [B, H, S, S]
        key_mask = mask[:, None, None, :]
        for layer in self.encoder.layers:
            x, _ = layer(x, bias, key_mask)
        x = self.encoder.final_layer_norm(x)
        if image_features is not None and cfg.image_fusion == "gated_attention":
            x = self.image_fusion(x, image_features)
        return x, mask

    # ---- decoder ---------------------------------------------------------------------------------
    def init_cache(self, encoder_hidden: jax.Array, encoder_mask: jax.Array, max_length: int,
                   dtype: Dtype | None = None) -> T5Cache:
        """Empty decoder cache for `max_length` decoder tokens, with the cross-attention keys/values of
        `encoder_hidden[B, S_enc, D]` (mask `[B, S_enc]`) precomputed for every decoder layer."""
        cfg = self.config
        if max_length < 1:
            raise ValueError(f"init_cache: max_length must be >= 1, got {max_length}")
        b = encoder_hidden.shape[0]
        dtype = dtype or cfg.dtype
        kv = [layer.cross_kv(encoder_hidden) for layer in self.decoder.layers]
        shape = (b, max_length, cfg.num_heads, cfg.d_kv)
        layers = range(cfg.num_decoder_layers)
        return T5Cache(
            self_k=tuple(jnp.zeros(shape, dtype) for _ in layers), self_v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            self_mask=jnp.zeros((b, max_length), jnp.bool_), index=jnp.zeros((), jnp.int32),
            cross_k=tuple(k.astype(dtype) for k, _ in kv),
            cross_v=tuple(v.astype(dtype) for _, v in kv),
            encoder_mask=encoder_mask.astype(jnp.bool_),
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder output `[B, T, D]` -> `[B, T, V]` (scaled by d_model**-0.5 first if configured)."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model ** -0.5)
        if self.lm_head is None:
            return self.shared.attend(hidden)
        return self.lm_head(hidden)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array | None = None,
               encoder_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None,
               cache: T5Cache | None = None) -> tuple[jax.Array, jax.Array, T5Cache | None]:
        """Runs the decoder.

        Without a cache: `decoder_input_ids[B, T]` attend causally to each other (and to valid keys of
        `decoder_attention_mask[B, T]`, default all) and cross-attend to `encoder_hidden[B, S_enc, D]`
        under `encoder_mask[B, S_enc]`.
        With a cache (from `init_cache`): the encoder side comes from the cache (`encoder_hidden` /
        `encoder_mask` are ignored); the T new tokens take slots index..index+T-1 and attend to every
        earlier valid slot; `decoder_attention_mask`, if given, is their `[B, T]` validity.
        Returns:
          (logits `[B, T, V]`, final decoder hidden `[B, T, D]` (after the final norm), cache or None).
        """
        cfg = self.config
        if decoder_input_ids.ndim != 2:
            raise ValueError(f"decoder_input_ids must be [B, T], got shape {decoder_input_ids.shape}")
        b, t = decoder_input_ids.shape
        new_mask = (jnp.ones((b, t), jnp.bool_) if decoder_attention_mask is None
                    else decoder_attention_mask.astype(jnp.bool_))
        if new_mask.shape != (b, t):
            raise ValueError(f"decoder_attention_mask shape {new_mask.shape} != decoder_input_ids shape {(b, t)}")
        if cache is None:
            if encoder_hidden is None:
                raise ValueError("decode needs encoder_hidden (from encode) when no cache is given")
            if encoder_mask is None:
                encoder_mask = jnp.ones(encoder_hidden.shape[:2], jnp.bool_)
            key_valid, q_slots = new_mask, jnp.arange(t, dtype=jnp.int32)
            cross = [layer.cross_kv(encoder_hidden) for layer in self.decoder.layers]
            cross_mask = encoder_mask.astype(jnp.bool_)[:, None, None, :]
        else:
            want = (b, cache.max_length, cfg.num_heads, cfg.d_kv)
            self_shapes = {x.shape for x in cache.self_k + cache.self_v}
            cross_batches = {x.shape[0] for x in cache.cross_k + cache.cross_v}
            if (len(cache.self_k) != cfg.num_decoder_layers or len(cache.cross_k) != cfg.num_decoder_layers
                    or self_shapes != {want} or cross_batches != {b}):
                raise ValueError(f"T5Cache of {len(cache.self_k)} layers, self-attention shapes {sorted(self_shapes)}, "
                                 f"cross-attention batch {sorted(cross_batches)} does not fit {cfg.num_decoder_layers} "
                                 f"layers of [batch={b}, S, heads={want[2]}, d_kv={want[3]}]")
            if t > cache.max_length:
                raise ValueError(f"decode of {t} tokens does not fit a T5Cache of length {cache.max_length}")
            cache = cache.write_mask(new_mask)
            key_valid = cache.self_mask
            q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
            cross = [(cache.cross_k[i], cache.cross_v[i]) for i in range(cfg.num_decoder_layers)]
            cross_mask = cache.encoder_mask[:, None, None, :]
        k_slots = jnp.arange(key_valid.shape[-1], dtype=jnp.int32)
        bias = self.decoder.position_bias(k_slots[None, :] - q_slots[:, None])[None]  # [1, H, T, S]
        mask = key_valid[:, None, None, :] & (k_slots[None, :] <= q_slots[:, None])[None, None]

        x = self.shared(decoder_input_ids)
        for i, layer in enumerate(self.decoder.layers):
            ck, cv = cross[i]
            x, cache = layer(x, bias, mask, cross=(ck, cv, cross_mask), cache=cache, layer=i)
        hidden = self.decoder.final_layer_norm(x)
        if cache is not None:
            cache = dataclasses.replace(cache, index=cache.index + jnp.int32(t))
        return self.logits(hidden), hidden, cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None, decoder_input_ids: jax.Array,
                 decoder_attention_mask: jax.Array | None = None,
                 image_features: jax.Array | None = None) -> jax.Array:
        """HF-equivalent teacher-forced forward -> `logits[B, T_dec, V]` (compute dtype).

        input_ids / attention_mask `[B, T]`, decoder_input_ids / decoder_attention_mask `[B, T_dec]`
        (decoder inputs start with `decoder_start_token_id`, i.e. labels shifted right), image_features
        `[B, N, F]` or None.
        """
        hidden, mask = self.encode(input_ids, attention_mask, image_features)
        logits, _, _ = self.decode(decoder_input_ids, hidden, mask, decoder_attention_mask)
        return logits


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def generate_fn(model: T5EncoderDecoder, input_ids: jax.Array, attention_mask: jax.Array,
                image_features: jax.Array | None, rng: jax.Array, *, max_new_tokens: int, eos_id: int, pad_id: int,
                start_id: int, temperature: float | jax.Array = 1.0, greedy: bool | jax.Array = True,
                select: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> T5GenerateOutput:
    """Pure (un-jitted, traceable) KV-cache decoding loop; `generate` is its jitted wrapper.

    Use it inside your own `jax.jit` / `nnx.jit` (the PRNG key, temperature and greedy may be traced).

    Args:
      model: the T5. input_ids / attention_mask: encoder inputs `[B, T]` (left or right padding: the
        encoder is padding-invariant, see the module docstring); image_features `[B, N, F]` or None.
      rng: PRNG key (split once per step; unused when greedy).
      max_new_tokens: N (static). eos_id / pad_id / start_id: token ids (static Python ints or traced
        int32 scalars); pad_id fills the slots after a row's EOS (finished rows feed id 0 to the
        decoder, so a pad id outside the vocabulary is harmless).
      temperature: > 0 (not checked here), scales the logits: log-probs are of softmax(logits / temperature).
      greedy: argmax instead of a `jax.random.categorical` draw (Python or traced bool).
      select: optional token choice `select(scaled_logits [B, V] float32, key) -> tokens [B] int32`
        replacing the default (greedy / categorical), e.g. nucleus sampling; the recorded log-probs
        are still those of the full temperature-scaled distribution.
    Returns:
      `T5GenerateOutput(tokens[B, N], logprobs[B, N], mask[B, N], lengths[B], entropies[B, N])`.
    """
    hidden, enc_mask = model.encode(input_ids, attention_mask, image_features)
    b = input_ids.shape[0]
    cache = model.init_cache(hidden, enc_mask, max_new_tokens)
    n = max_new_tokens
    temperature = jnp.asarray(temperature, jnp.float32)
    eos_id, pad_id = jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32)
    if select is None:
        def select(scaled, key):
            # `greedy` may be traced: greedy decoding and sampling then share one compiled loop.
            return jnp.where(greedy, jnp.argmax(scaled, axis=-1), jax.random.categorical(key, scaled, axis=-1))

    def cond(state):
        i, done = state[0], state[6]
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, token, cache, tokens, logprobs, entropies, done, rng = state
        logits, _, cache = model.decode(token[:, None], cache=cache)
        scaled = logits[:, 0].astype(jnp.float32) / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        finite = logp > -jnp.inf  # a -inf logit adds exactly 0 to the entropy
        safe = jnp.where(finite, logp, 0.0)
        entropy = -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)
        rng, key = jax.random.split(rng)
        nxt = select(scaled, key).astype(jnp.int32)
        chosen = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, i].set(jnp.where(done, pad_id, nxt))
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, chosen))
        entropies = entropies.at[:, i].set(jnp.where(done, 0.0, entropy))
        # Finished rows feed id 0 (in the vocabulary whatever pad_id is); their outputs are discarded.
        fed = jnp.where(done, 0, nxt)
        return i + 1, fed, cache, tokens, logprobs, entropies, done | (nxt == eos_id), rng

    state = (jnp.zeros((), jnp.int32), jnp.full((b,), start_id, jnp.int32), cache,
             jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b,), jnp.bool_), rng)
    _, _, _, tokens, logprobs, entropies, _, _ = jax.lax.while_loop(cond, body, state)
    # Generated = up to and including the first EOS (everything after it is padding).
    is_eos = tokens == eos_id
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
    mask = jnp.arange(n)[None, :] < lengths[:, None]
    return T5GenerateOutput(tokens=tokens, logprobs=jnp.where(mask, logprobs, 0.0), mask=mask, lengths=lengths,
                            entropies=jnp.where(mask, entropies, 0.0))


def _generate_traced(model: T5EncoderDecoder, input_ids, attention_mask, image_features, rng, temperature, greedy, *,
                     max_new_tokens: int, eos_id: int, pad_id: int, start_id: int) -> T5GenerateOutput:
    return generate_fn(model, input_ids, attention_mask, image_features, rng, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, pad_id=pad_id, start_id=start_id, temperature=temperature, greedy=greedy)


_generate_jit = nnx.jit(_generate_traced, static_argnames=("max_new_tokens", "eos_id", "pad_id", "start_id"))


def generate(model: T5EncoderDecoder, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
             image_features: jax.Array | None = None, max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, rng: jax.Array | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, decoder_start_token_id: int | None = None) -> T5GenerateOutput:
    """Greedy or temperature sampling with the KV cache, in one jitted `lax.while_loop`.

    Stops when every row has produced `eos_token_id` or after `max_new_tokens`; tokens after a row's EOS
    are `pad_token_id`. Greedy decoding equals HF `generate(do_sample=False, num_beams=1)` without the
    leading start token. Token ids default to the model config's. Compiles once per model, shapes and
    token ids (greedy and temperature are traced: switching them does not recompile).

    Args:
      input_ids, attention_mask: encoder inputs `[B, T]`; image_features `[B, N, F]` or None.
      max_new_tokens: N. greedy: argmax instead of sampling. temperature: > 0, scales the logits.
      rng: PRNG key for sampling (required unless greedy).
    Returns:
      `T5GenerateOutput(tokens[B, N], logprobs[B, N], mask[B, N], lengths[B])`.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and rng is None:
        raise ValueError("generate(greedy=False) needs an rng key")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    return _generate_jit(model, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask), image_features, rng,
                         jnp.asarray(temperature, jnp.float32), jnp.asarray(greedy, jnp.bool_),
                         max_new_tokens=max_new_tokens,
                         eos_id=cfg.eos_token_id if eos_token_id is None else int(eos_token_id),
                         pad_id=cfg.pad_token_id if pad_token_id is None else int(pad_token_id),
                         start_id=cfg.decoder_start_token_id if decoder_start_token_id is None
                         else int(decoder_start_token_id))


# --------------------------------------------------------------------------------------------------
# Hugging Face import
# --------------------------------------------------------------------------------------------------
MULTIMODAL_ARCHITECTURES = ("T5ForMultimodalGeneration",)  # AutoUI / MM-CoT / DigiRL class name


def config_from_hf(hf_config: dict, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                   image_feature_dim: int | None = None, image_fusion: str | None = None) -> T5Config:
    """`T5Config` from a Hugging Face T5 `config.json` dict (model_type "t5").

    Output scaling: `scale_decoder_outputs` if the config has it (transformers >= 5 writes it and always
    writes `tie_word_embeddings: true`), else `tie_word_embeddings` (default True) as in transformers 4.
    An `architectures` entry `T5ForMultimodalGeneration` (AutoUI) selects "gated_attention" fusion with
    `image_feature_dim` (default: the config's `image_feature_dim`, else 1408, BLIP-2's).
    """
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"config_from_hf: model_type {hf_config.get('model_type')!r} is not 't5'")
    tie = hf_config.get("tie_word_embeddings", True) is not False
    scale = hf_config.get("scale_decoder_outputs", tie)
    if any(a in MULTIMODAL_ARCHITECTURES for a in hf_config.get("architectures") or ()):
        image_fusion = image_fusion or "gated_attention"
        image_feature_dim = image_feature_dim or hf_config.get("image_feature_dim", 1408)
    eos = hf_config.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = hf_config.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    start = hf_config.get("decoder_start_token_id")
    start = pad if start is None else int(start)  # T5 starts decoding with the pad token
    return T5Config(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["d_model"],
        d_kv=hf_config["d_kv"],
        d_ff=hf_config["d_ff"],
        num_layers=hf_config["num_layers"],
        num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
        num_heads=hf_config["num_heads"],
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf_config.get("feed_forward_proj", "relu"),
        tie_word_embeddings=tie,
        scale_decoder_outputs=bool(scale),
        pad_token_id=pad,
        eos_token_id=1 if eos is None else int(eos),
        decoder_start_token_id=start,
        image_feature_dim=image_feature_dim,
        image_fusion=image_fusion or "prefix",
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def build_model(config: T5Config, *, rngs: nnx.Rngs) -> T5EncoderDecoder:
    return T5EncoderDecoder(config, rngs=rngs)


def _transpose(x: np.ndarray) -> np.ndarray:
    """torch `nn.Linear.weight` `[out, in]` -> NNX `Linear.kernel` `[in, out]`."""
    return x.T


def _rows(start: int, stop: int, transpose: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Slice rows start:stop of a packed tensor (torch MHA `in_proj_*`), transposed for weights."""
    return (lambda x: x[start:stop].T) if transpose else (lambda x: x[start:stop])


def text_key_map(config: T5Config) -> list[tuple[str, tuple | None, Any]]:
    """HF `T5ForConditionalGeneration` keys -> `T5EncoderDecoder` paths (text model only)."""
    ff_names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    entries = [("shared.weight", ("shared", "embedding"), None),
               # tied copies some checkpoints store, and a weight HF itself ignores
               ("encoder.embed_tokens.weight", None, None), ("decoder.embed_tokens.weight", None, None),
               ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None, None)]
    for stack, depth in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        entries += [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     (stack, "relative_attention_bias", "embedding"), None),
                    (f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "weight"), None)]
        sublayers = [(0, "SelfAttention", "self_attention")]
        if stack == "decoder":
            sublayers.append((1, "EncDecAttention", "cross_attention"))
        ff_index = len(sublayers)
        for i in range(depth):
            hf, nx = f"{stack}.block.{i}.layer.", (stack, "layers", i)
            for j, hf_name, name in sublayers:
                entries.append((f"{hf}{j}.layer_norm.weight", nx + (f"{name}_norm", "weight"), None))
                for proj in "qkvo":
                    entries.append((f"{hf}{j}.{hf_name}.{proj}.weight", nx + (name, proj, "kernel"), _transpose))
            entries.append((f"{hf}{ff_index}.layer_norm.weight", nx + ("ffn_norm", "weight"), None))
            for proj in ff_names:
                entries.append((f"{hf}{ff_index}.DenseReluDense.{proj}.weight", nx + ("ffn", proj, "kernel"),
                                _transpose))
    if config.tie_word_embeddings:
        entries.append(("lm_head.weight", None, None))  # tied: a stored copy is ignored
    else:
        entries.append(("lm_head.weight", ("lm_head", "kernel"), _transpose))
    return entries


def image_key_map(config: T5Config) -> list[tuple[str, tuple, Any]]:
    """Keys of the image fusion: AutoUI names for "gated_attention", our own (`image_proj.*`) for "prefix"."""
    if config.image_feature_dim is None:
        return []
    if config.image_fusion == "prefix":
        return [("image_proj.weight", ("image_fusion", "proj", "kernel"), _transpose),
                ("image_proj.bias", ("image_fusion", "proj", "bias"), None)]
    d, p = config.d_model, ("image_fusion",)
    entries = [("image_dense.weight", p + ("image_dense", "kernel"), _transpose),
               ("image_dense.bias", p + ("image_dense", "bias"), None),
               ("mha_layer.out_proj.weight", p + ("out_proj", "kernel"), _transpose),
               ("mha_layer.out_proj.bias", p + ("out_proj", "bias"), None),
               ("gate_dense.weight", p + ("gate_dense", "kernel"), _transpose),
               ("gate_dense.bias", p + ("gate_dense", "bias"), None)]
    for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
        entries += [("mha_layer.in_proj_weight", p + (name, "kernel"), _rows(n * d, (n + 1) * d, True)),
                    ("mha_layer.in_proj_bias", p + (name, "bias"), _rows(n * d, (n + 1) * d, False))]
    return entries


def hf_key_map(config: T5Config) -> list[tuple[str, tuple | None, Any]]:
    """Explicit map from HF safetensors keys to `T5EncoderDecoder` parameter paths (the hf_import protocol:
    `(hf_key, nnx_path | None, transform | None)`, None path = tolerated and ignored)."""
    return text_key_map(config) + image_key_map(config)


def from_hf_dir(local_dir: str | Path, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None,
                image_feature_dim: int | None = None, image_fusion: str | None = None,
                seed: int = 0) -> T5EncoderDecoder:
    """Loads a local HF T5 checkpoint directory (`config.json` + safetensors) into `T5EncoderDecoder`.

    * A text-only `T5ForConditionalGeneration` (t5, flan-t5...) loads as is.
    * An AutoUI-style checkpoint (`image_dense.*`, `mha_layer.*`, `gate_dense.*` tensors) loads with its
      gated image fusion; `image_feature_dim` is read from `image_dense.weight`.
    * Asking for an image input (`image_feature_dim`) that the checkpoint lacks adds a freshly
      initialised fusion module (PRNG seed `seed`) to the loaded text model, to be fine-tuned.

    Every missing / unexpected / mismatched tensor is reported together in one `HFImportError`.
    """
    hf_config = hf_import.read_hf_config(local_dir)
    tensors = hf_import.load_hf_tensors(local_dir)
    if "image_dense.weight" in tensors and "mha_layer.in_proj_weight" in tensors:
        image_fusion = image_fusion or "gated_attention"
        image_feature_dim = image_feature_dim or int(tensors["image_dense.weight"].shape[1])
    config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, image_feature_dim=image_feature_dim,
                            image_fusion=image_fusion)
    stored_image = any(key in tensors for key, _, _ in image_key_map(config))
    fresh_image = config.image_feature_dim is not None and not stored_image
    load_config = config.replace(image_feature_dim=None) if fresh_image else config
    abstract = nnx.eval_shape(lambda: T5EncoderDecoder(load_config, rngs=nnx.Rngs(0)))
    model = hf_import.apply_key_map(abstract, tensors, hf_key_map(load_config), source=str(local_dir))
    if fresh_image:  # a new image fusion on top of a text checkpoint
        model.image_fusion = nnx.data(_image_fusion(config, nnx.Rngs(seed)))
        model.config = config
    return model
