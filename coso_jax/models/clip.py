"""CLIP ViT vision tower in Flax NNX (Hugging Face `CLIPVisionModel` semantics).

Patch embedding (a stride-`patch` convolution without bias, written as a patch-flatten + matmul),
a learned class token and learned absolute positions, a pre-LayerNorm (`pre_layrnorm`, HF's spelling),
pre-norm encoder layers (LayerNorm -> multi-head attention -> residual, LayerNorm -> MLP with
quick-GELU -> residual) and a `post_layernorm` applied to the class token only (`pooler_output`).

LLaVA does not use the pooled output: it reads the hidden states *after* encoder layer
`vision_feature_layer` (HF default -2, the penultimate layer) and, with the "default" strategy, drops the
class token. `CLIPVisionModel.features` does exactly that and stops the forward pass at the deepest
layer it needs (the last layer's output is never used by LLaVA, so it is not computed).

Hidden-state indexing follows Hugging Face: `hidden_states[0]` is the embedding output after
`pre_layrnorm`, `hidden_states[i]` the output of encoder layer i (1-based), so index -2 of the
`num_layers + 1` states is the output of layer `num_layers - 1`.

Parameter tree mirrors the Hugging Face names (transformers 5 layout, no `vision_model.` level):
`embeddings.{class_embedding, patch_embedding, position_embedding}`, `pre_layrnorm`,
`encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}}`,
`post_layernorm`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

ACTIVATIONS = {
    # CLIP's original activation: x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
    """The activation function named like Hugging Face's `ACT2FN` keys (`gelu` is the exact erf GELU)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP ViT image encoder (hashable: usable as a static jit argument).

    Square images of `image_size` pixels are cut into `(image_size // patch_size)**2` patches; the
    sequence is `[class token, patches...]`, so `num_positions = num_patches + 1`.
    """

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        activation(self.hidden_act)  # fail early on an unknown name

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "CLIPVisionConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "CLIPVisionConfig":
        """CPU-sized tower for tests and the demo: 32 px images, 8 px patches (16 patches), width 32."""
        base = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
        return cls(**{**base, **overrides})

    @classmethod
    def vit_l_14_336(cls, **overrides) -> "CLIPVisionConfig":
        """openai/clip-vit-large-patch14-336: the vision tower of LLaVA-1.5 and LLaVA-1.6."""
        base = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24,
                    num_heads=16)
        return cls(**{**base, **overrides})

    def num_params(self) -> int:
        """Parameter count of `CLIPVisionModel(self)`, computed abstractly (nothing is allocated)."""
        abstract = nnx.eval_shape(lambda: CLIPVisionModel(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
def _linear(cfg: CLIPVisionConfig, din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _layer_norm(cfg: CLIPVisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # nnx.LayerNorm computes its statistics in float32 whatever the compute dtype.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         rngs=rngs)


class PatchEmbedding(nnx.Module):
    """Non-overlapping `patch x patch` convolution without bias, as a matmul over flattened patches.

    `kernel` is `[C, p, p, D]` (torch Conv2d weight `[D, C, p, p]` transposed), so the contraction is
    one einsum over (channel, row-in-patch, column-in-patch): the same arithmetic as the convolution,
    in the form accelerators' matrix units like.
    """

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        c, p, d = cfg.num_channels, cfg.patch_size, cfg.hidden_size
        self.kernel = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c, p, p, d), cfg.param_dtype))
        self.patch_size = p
        self.dtype = cfg.dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`pixel_values[N, C, H, W]` -> `[N, (H/p)*(W/p), D]`, patches in row-major order (HF's flatten)."""
        n, c, h, w = pixel_values.shape
        p = self.patch_size
        x = pixel_values.astype(self.dtype).reshape(n, c, h // p, p, w // p, p)
        out = jnp.einsum("ncipjq,cpqd->nijd", x, self.kernel[...].astype(self.dtype))
        return out.reshape(n, (h // p) * (w // p), -1)


class CLIPVisionEmbeddings(nnx.Module):
    """`[class token, patch embeddings] + position embeddings`."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(nnx.initializers.normal(d ** -0.5)(rngs.params(), (d,), cfg.param_dtype))
        self.patch_embedding = PatchEmbedding(cfg, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_positions, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`[N, C, S, S]` -> `[N, 1 + num_patches, D]`."""
        cfg = self.config
        patches = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(cfg.dtype), (patches.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(cfg.dtype)[None]


class CLIPAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections (no mask: every
    image token is real)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        self.q_proj = _linear(cfg, d, d, rngs)
        self.k_proj = _linear(cfg, d, d, rngs)
        self.v_proj = _linear(cfg, d, d, rngs)
        self.out_proj = _linear(cfg, d, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[N, T, D]` -> `[N, T, D]`."""
        cfg = self.config
        n, t, _ = x.shape
        h, dh = cfg.num_heads, cfg.head_dim
        q = self.q_proj(x).reshape(n, t, h, dh)
        k = self.k_proj(x).reshape(n, t, h, dh)
        v = self.v_proj(x).reshape(n, t, h, dh)
        # Scores and softmax in float32 (as HF's eager path does) whatever the compute dtype.
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * (dh ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, h * dh)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class CLIPVisionModel(nnx.Module):
    """CLIP ViT image encoder (HF `CLIPVisionModel`).

    `__call__(pixel_values)` returns HF's `(last_hidden_state, pooler_output)`; `hidden_states(...)`
    the per-layer states; `features(...)` the LLaVA feature selection.
    """

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config, rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = _layer_norm(config, rngs)

    def _check_pixels(self, pixel_values: jax.Array) -> None:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIP vision tower expects pixel_values [N, C, H, W] with (C, H, W) = {want} "
                             f"(NCHW, as the HF image processor outputs), got shape {tuple(pixel_values.shape)}")

    def hidden_states(self, pixel_values: jax.Array, num_layers: int | None = None) -> list[jax.Array]:
        """HF's `hidden_states` tuple, stopping after encoder layer `num_layers` (default: all).

        Args:
          pixel_values: `[N, C, S, S]` normalised images.
          num_layers: run only the first `num_layers` encoder layers.
        Returns:
          `num_layers + 1` arrays `[N, 1 + num_patches, D]`: index 0 is the embedding output after
          `pre_layrnorm`, index i the output of layer i.
        """
        self._check_pixels(pixel_values)
        num_layers = self.config.num_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= self.config.num_layers:
            raise ValueError(f"num_layers must be in [0, {self.config.num_layers}], got {num_layers}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
            states.append(x)
        return states

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`pixel_values[N, C, S, S]` -> (last_hidden_state `[N, 1 + P, D]`, pooler_output `[N, D]`).

        As in HF, `last_hidden_state` is the last layer's output *without* `post_layernorm`; the pooled
        output is `post_layernorm` of the class token.
        """
        last = self.hidden_states(pixel_values)[-1]
        return last, self.post_layernorm(last[:, 0])

    def features(self, pixel_values: jax.Array, feature_layer: int | Sequence[int] = -2,
                 strategy: str = "default") -> jax.Array:
        """LLaVA image features: the selected layers' hidden states, class token dropped ("default").

        Args:
          pixel_values: `[N, C, S, S]`.
          feature_layer: an index into `hidden_states` (negative counts from the end: -2 is the output
            of the penultimate layer), or several, whose states are concatenated on the feature axis.
          strategy: "default" drops the class token, "full" keeps it.
        Returns:
          `[N, P, D * k]` (P = num_patches, or num_patches + 1 with "full"; k = number of layers).
        """
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        layers = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
        total = self.config.num_layers + 1
        resolved = []
        for i in layers:
            j = i + total if i < 0 else i
            if not 0 <= j < total:
                raise ValueError(f"vision_feature_layer {i} is out of range for {total} hidden states")
            resolved.append(j)
        states = self.hidden_states(pixel_values, num_layers=max(resolved))
        selected = [states[j] for j in resolved]
        if strategy == "default":
            selected = [s[:, 1:] for s in selected]
        return selected[0] if len(selected) == 1 else jnp.concatenate(selected, axis=-1)


# --------------------------------------------------------------------------------------------------
# Hugging Face import
# --------------------------------------------------------------------------------------------------
def transpose(x: np.ndarray) -> np.ndarray:
    """torch `nn.Linear.weight` `[out, in]` -> NNX `Linear.kernel` `[in, out]`."""
    return x.T


def conv_to_patch_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight `[D, C, p, p]` -> `PatchEmbedding.kernel` `[C, p, p, D]`."""
    return np.transpose(x, (1, 2, 3, 0))


def config_from_hf(hf_config: dict, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None
                   ) -> CLIPVisionConfig:
    """`CLIPVisionConfig` from a HF `clip_vision_model` config dict (or a CLIP config's `vision_config`)."""
    if hf_config.get("model_type") == "clip":
        hf_config = hf_config["vision_config"]
    model_type = hf_config.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise NotImplementedError(f"vision tower model_type {model_type!r} is not supported (only clip_vision_model)")
    return CLIPVisionConfig(
        image_size=hf_config.get("image_size", 224),
        patch_size=hf_config.get("patch_size", 32),
        hidden_size=hf_config.get("hidden_size", 768),
        intermediate_size=hf_config.get("intermediate_size", 3072),
        num_layers=hf_config.get("num_hidden_layers", 12),
        num_heads=hf_config.get("num_attention_heads", 12),
        num_channels=hf_config.get("num_channels", 3),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
        hidden_act=hf_config.get("hidden_act", "quick_gelu"),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def build_model(config: CLIPVisionConfig, *, rngs: nnx.Rngs) -> CLIPVisionModel:
    return CLIPVisionModel(config, rngs=rngs)


def vision_key_map(cfg: CLIPVisionConfig, hf_prefix: str = "", nnx_prefix: tuple = ()) -> list[tuple[str, tuple, Any]]:
    """Key map of a `CLIPVisionModel` whose HF tensors live under `hf_prefix` (transformers 5 names,
    e.g. "" for a saved `CLIPVisionModel`, "vision_tower." inside LLaVA) at NNX path `nnx_prefix`.

    Entries are `(hf_key, nnx_path, transform)`. Older checkpoints name the same tensors with an extra
    `vision_model.` level; `canonical_hf_key` removes it.
    """
    h, n = hf_prefix, tuple(nnx_prefix)
    entries = [
        (f"{h}embeddings.class_embedding", n + ("embeddings", "class_embedding"), None),
        (f"{h}embeddings.patch_embedding.weight", n + ("embeddings", "patch_embedding", "kernel"),
         conv_to_patch_kernel),
        (f"{h}embeddings.position_embedding.weight", n + ("embeddings", "position_embedding", "embedding"), None),
    ]
    for norm in ("pre_layrnorm", "post_layernorm"):
        entries += [(f"{h}{norm}.weight", n + (norm, "scale"), None), (f"{h}{norm}.bias", n + (norm, "bias"), None)]
    for i in range(cfg.num_layers):
        hl, nl = f"{h}encoder.layers.{i}.", n + ("encoder", "layers", i)
        for norm in ("layer_norm1", "layer_norm2"):
            entries += [(f"{hl}{norm}.weight", nl + (norm, "scale"), None),
                        (f"{hl}{norm}.bias", nl + (norm, "bias"), None)]
        for block, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                            ("self_attn", "out_proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            entries += [(f"{hl}{block}.{name}.weight", nl + (block, name, "kernel"), transpose),
                        (f"{hl}{block}.{name}.bias", nl + (block, name, "bias"), None)]
    return entries


def hf_key_map(config: CLIPVisionConfig) -> list[tuple[str, tuple, Any]]:
    """Key map of a saved HF `CLIPVisionModel` (transformers 5 names; see `canonical_hf_key`)."""
    return vision_key_map(config)


def canonical_hf_key(key: str) -> str:
    """Maps older `CLIPVisionModel` checkpoint names (`vision_model.embeddings...`) to transformers 5's."""
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


def normalize_hf_tensors(tensors: dict) -> dict:
    """Renames every tensor with `canonical_hf_key` (raises if two names collide)."""
    out = {}
    for key, value in tensors.items():
        new = canonical_hf_key(key)
        if new in out:
            raise ValueError(f"checkpoint holds both {key!r} and another tensor that maps to {new!r}")
        out[new] = value
    return out
