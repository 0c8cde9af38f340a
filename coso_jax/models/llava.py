"""LLaVA-1.5 and LLaVA-NeXT (LLaVA-1.6, "anyres") vision-language models in Flax NNX.

A CLIP ViT (coso_jax.models.clip) encodes each image (LLaVA-1.5) or each S x S tile of an image
(NeXT); the hidden states of `vision_feature_layer` (default -2) without the class token go through a
2-layer GELU projector into the language model's embedding space; the projected features replace the
embeddings of the `<image>` tokens of `input_ids` (which the prompt builder has already expanded to
one token per feature, as the HF processors do); the Llama-family decoder (coso_jax.models.llama)
runs on the result.

LLaVA-NeXT packs an image's features as HF's `pack_image_features` ("spatial_unpad"): the base tile's
`g x g` features first (g = S / patch), then the tile grid assembled into one `(rows*g) x (cols*g)` map,
the letterbox padding cropped away, and a learned `image_newline` vector after every row.

Everything is jit-friendly with static shapes: NeXT images arrive as `pixel_values[N, P, C, S, S]` (P
tiles, zero-padded), every tile is encoded, and the per-image layout (best pinpoint, crop window,
newline slots) is computed from `image_sizes` with integer jnp arithmetic into gather indices over a
padded `[N, max_image_tokens, D]` feature array. The k-th image token of the (row-major flattened)
batch receives the k-th feature of the concatenated per-image sequences, as HF's `masked_scatter` does,
so a row may hold zero, one or several images. Outside jit, a mismatch between the number of image
tokens and of image features raises; inside jit it cannot be checked (extra tokens reuse the last
feature).

Parameter tree mirrors the Hugging Face names: `vision_tower.*` (see clip.py),
`multi_modal_projector.linear_{1,2}`, `image_newline` (NeXT), `language_model.*` (a `DecoderModel`) and
`lm_head` (absent when the embeddings are tied).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax.models import clip, llama
from coso_jax.models import image_processing as improc
from coso_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from coso_jax.models.kv_cache import KVCache
from coso_jax.models.llama import DecoderConfig, DecoderModel, positions_from_mask

Dtype = Any

LLAVA_1_6_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA VLM: vision tower, projector and language model (hashable: a valid static jit argument).

    Attributes:
      vision: the CLIP vision tower.
      text: the language model (`DecoderConfig`; its `tie_word_embeddings` decides the lm_head).
      image_token_id: the `<image>` token id of the tokenizer; its embeddings are replaced by features.
      image_grid_pinpoints: LLaVA-NeXT anyres resolutions `((h, w), ...)`, multiples of the tile size;
        None for LLaVA-1.5 (one resized image per `<image>`).
      vision_feature_layer: index into the vision tower's hidden states (or several, concatenated).
      vision_feature_select_strategy: "default" drops the class token, "full" keeps it (LLaVA-1.5 only).
      projector_hidden_act: the projector's activation (HF `ACT2FN` name; "gelu" is the exact GELU).
      projector_bias: whether the projector's linears have biases.
    """

    vision: CLIPVisionConfig
    text: DecoderConfig
    image_token_id: int
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        # Normalise lists (e.g. from JSON) to tuples so the config stays hashable.
        if self.image_grid_pinpoints is not None:
            pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
            object.__setattr__(self, "image_grid_pinpoints", pins)
            if not pins:
                raise ValueError("image_grid_pinpoints is empty (use None for LLaVA-1.5)")
            tile = self.vision.image_size
            for h, w in pins:
                if h % tile or w % tile or h <= 0 or w <= 0:
                    raise ValueError(f"grid pinpoint {(h, w)} is not a positive multiple of the tile size {tile}")
            if self.vision_feature_select_strategy != "default":
                raise ValueError("LLaVA-NeXT needs vision_feature_select_strategy='default': its tile features "
                                 "are arranged on a grid, which the class token would break")
        if not isinstance(self.vision_feature_layer, int):
            object.__setattr__(self, "vision_feature_layer", tuple(int(i) for i in self.vision_feature_layer))
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary [0, {self.text.vocab_size})")
        clip.activation(self.projector_hidden_act)

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def is_next(self) -> bool:
        """LLaVA-NeXT (anyres tiling) rather than LLaVA-1.5."""
        return self.image_grid_pinpoints is not None

    @property
    def model_type(self) -> str:
        return "llava_next" if self.is_next else "llava"

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)

    @property
    def tokens_per_tile(self) -> int:
        """Features per encoded image (LLaVA-1.5) or tile (NeXT)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def max_patches(self) -> int:
        """NeXT: the most tiles (base tile included) an image can need — a static `P` that fits any image."""
        if not self.is_next:
            return 1
        return improc.max_anyres_patches(self.image_grid_pinpoints, self.vision.image_size)

    @property
    def max_image_tokens(self) -> int:
        """The most image tokens one image can expand to (exact for LLaVA-1.5)."""
        if not self.is_next:
            return self.tokens_per_tile
        g, tile = self.vision.grid, self.vision.image_size
        grid_map = max((h // tile * g) * (w // tile * g + 1) for h, w in self.image_grid_pinpoints)
        return g * g + grid_map

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Image tokens one image of `(height, width)` expands to (the size matters only for NeXT)."""
        if not self.is_next:
            return self.tokens_per_tile
        if image_size is None:
            raise ValueError("LLaVA-NeXT token counts depend on the image size: pass image_size=(height, width)")
        return improc.num_image_tokens_next(image_size, self.image_grid_pinpoints, self.vision.image_size,
                                            self.vision.patch_size)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, image_token_id: int = 4, text: DecoderConfig | None = None, **overrides) -> "LlavaConfig":
        """CPU-sized LLaVA-1.5: 32 px images, 8 px patches (16 image tokens), width-32 ViT, `DecoderConfig.tiny()`.

        `image_token_id` must be the tokenizer's `<image>` id (4 in coso_jax.tokenizer's special-token order).
        """
        base = dict(vision=CLIPVisionConfig.tiny(), text=text or DecoderConfig.tiny(), image_token_id=image_token_id)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny_next(cls, image_token_id: int = 4, text: DecoderConfig | None = None, **overrides) -> "LlavaConfig":
        """CPU-sized LLaVA-NeXT: 32 px tiles, pinpoints 32x64 / 64x32 / 64x64 (a 300x300 frame -> 88 tokens)."""
        return cls.tiny(image_token_id, text, **{"image_grid_pinpoints": TINY_PINPOINTS, **overrides})

    @classmethod
    def llava_1_5_7b(cls, **overrides) -> "LlavaConfig":
        """llava-hf/llava-1.5-7b-hf: ViT-L/14-336 + Vicuna-7B, 576 image tokens per image."""
        base = dict(vision=CLIPVisionConfig.vit_l_14_336(), text=DecoderConfig.vicuna_7b(), image_token_id=32000)
        return cls(**{**base, **overrides})

    @classmethod
    def llava_1_6_mistral_7b(cls, **overrides) -> "LlavaConfig":
        """llava-hf/llava-v1.6-mistral-7b-hf (the paper's policy): ViT-L/14-336 + Mistral-7B-Instruct-v0.2."""
        base = dict(vision=CLIPVisionConfig.vit_l_14_336(), text=DecoderConfig.mistral_7b(), image_token_id=32000,
                    image_grid_pinpoints=LLAVA_1_6_PINPOINTS)
        return cls(**{**base, **overrides})

    def with_dtype(self, dtype: Dtype, param_dtype: Dtype | None = None) -> "LlavaConfig":
        """The same architecture with another compute / parameter dtype in every part."""
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype)
        return self.replace(vision=self.vision.replace(**kw), text=self.text.replace(**kw))

    def num_params(self) -> int:
        """Parameter count of `Llava(self)`, computed abstractly (nothing is allocated)."""
        abstract = nnx.eval_shape(lambda: Llava(self, rngs=nnx.Rngs(0)))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class MultiModalProjector(nnx.Module):
    """linear_2(act(linear_1(x))): vision features `[..., Dv * k]` -> language embeddings `[..., D]`."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        text = config.text
        din, d = config.vision.hidden_size * config.num_feature_layers, text.hidden_size
        kw = dict(use_bias=config.projector_bias, dtype=text.dtype, param_dtype=text.param_dtype,
                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.linear_1 = nnx.Linear(din, d, **kw)
        self.linear_2 = nnx.Linear(d, d, **kw)
        self.hidden_act = config.projector_hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(clip.activation(self.hidden_act)(self.linear_1(x)))


def _is_concrete(*xs) -> bool:
    """True when no argument is a tracer, i.e. data-dependent checks can run on the host."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def splice_image_features(inputs_embeds: jax.Array, is_image: jax.Array, features: jax.Array,
                          lengths: jax.Array) -> jax.Array:
    """Replaces the embeddings at image-token positions with image features, in order.

    The k-th True of `is_image` (row-major over the batch) receives the k-th feature of the
    concatenation `features[0, :lengths[0]], features[1, :lengths[1]], ...` (HF's `masked_scatter`).

    Args:
      inputs_embeds: `[B, T, D]` token embeddings.
      is_image: `[B, T]` bool, True at image-token positions.
      features: `[N, L, D]` per-image features, valid up to `lengths`.
      lengths: `[N]` int, features per image.
    Returns:
      `[B, T, D]` in `inputs_embeds.dtype`.
    """
    b, t, d = inputs_embeds.shape
    n, max_len, fd = features.shape
    if fd != d:
        raise ValueError(f"image features have width {fd} but the language model's embeddings have {d}")
    if is_image.shape != (b, t):
        raise ValueError(f"is_image shape {is_image.shape} != input shape {(b, t)}")
    if lengths.shape != (n,):
        raise ValueError(f"lengths shape {lengths.shape} != (num_images,) = {(n,)}")
    if _is_concrete(is_image, lengths):
        tokens, feats = int(np.asarray(is_image).sum()), int(np.asarray(lengths).sum())
        if tokens != feats:
            raise ValueError(f"input_ids hold {tokens} image tokens but the {n} image(s) give {feats} features; "
                             "expand each <image> placeholder to the image's token count "
                             "(LlavaConfig.num_image_tokens / image_processing.expand_image_tokens)")
    flat = is_image.reshape(-1)
    rank = jnp.cumsum(flat.astype(jnp.int32)) - 1  # which image token this is, batch-wide
    ends = jnp.cumsum(lengths.astype(jnp.int32))
    image = jnp.minimum(jnp.searchsorted(ends, rank, side="right"), n - 1)
    offset = jnp.clip(rank - (ends[image] - lengths[image]), 0, max_len - 1)
    gathered = features[image, offset].astype(inputs_embeds.dtype)  # [B*T, D]
    out = jnp.where(flat[:, None], gathered, inputs_embeds.reshape(b * t, d))
    return out.reshape(b, t, d)


def anyres_layout(config: LlavaConfig, image_sizes: jax.Array, num_tiles: int) -> tuple[jax.Array, jax.Array]:
    """LLaVA-NeXT feature layout of each image, as gather indices (jit-friendly: `image_sizes` may be traced).

    Per image, the features are: the base tile's `g*g` features, then for each row of the unpadded
    grid map its features followed by one newline. Indices point into a per-image table of
    `num_tiles * g*g` tile features (tile 0 = base tile, then the grid row-major) followed by the
    newline vector at slot `num_tiles * g*g`.

    Args:
      config: a NeXT `LlavaConfig`.
      image_sizes: `[N, 2]` int original (height, width).
      num_tiles: P, the tiles per image in `pixel_values`.
    Returns:
      (`indices[N, config.max_image_tokens]` int32, 0 past each image's length; `lengths[N]` int32).
    """
    if not config.is_next:
        raise ValueError("anyres_layout needs a LLaVA-NeXT config (image_grid_pinpoints set)")
    tile, g = config.vision.image_size, config.vision.grid
    n_base = g * g
    image_sizes = jnp.asarray(image_sizes).astype(jnp.int32)
    h, w = image_sizes[:, 0], image_sizes[:, 1]
    best_h, best_w = improc.select_best_resolution(h, w, config.image_grid_pinpoints, xp=jnp)
    grid_rows, grid_cols = best_h // tile, best_w // tile
    row0, rows, col0, cols = improc.unpadded_extent(h, w, grid_rows * g, grid_cols * g, xp=jnp)
    lengths = n_base + rows * (cols + 1)
    if _is_concrete(image_sizes):
        needed = int(np.max(np.asarray(grid_rows * grid_cols))) + 1
        if needed > num_tiles:
            raise ValueError(f"an image of size {np.asarray(image_sizes).tolist()} needs {needed} tiles "
                             f"but pixel_values holds {num_tiles} per image")
    k = jnp.arange(config.max_image_tokens, dtype=jnp.int32)[None, :]
    col = lambda x: x[:, None]  # noqa: E731  per-image scalar -> broadcast over k
    kk = k - n_base  # index inside the unpadded grid map (newlines included)
    r, c = kk // col(cols + 1), kk % col(cols + 1)
    big_r, big_c = r + col(row0), c + col(col0)  # position in the full (padded) grid map
    tile_idx = 1 + (big_r // g) * col(grid_cols) + big_c // g  # tile 0 is the base tile
    src = tile_idx * n_base + (big_r % g) * g + big_c % g
    src = jnp.where(c == col(cols), num_tiles * n_base, src)  # end of a row: image_newline
    src = jnp.where(k < n_base, k, src)  # the base tile's features come first
    src = jnp.where(k < col(lengths), src, 0)
    return src, lengths.astype(jnp.int32)


class Llava(nnx.Module):
    """HF `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` with the policy-model
    interface of docs/contracts.md (`__call__`, `embed_inputs`, `decode`, `init_cache`, `config.text`)."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        text = config.text
        self.vision_tower = CLIPVisionModel(config.vision, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(config, rngs=rngs)
        if config.is_next:
            std = 1.0 / math.sqrt(text.hidden_size)
            self.image_newline = nnx.Param(
                nnx.initializers.normal(std)(rngs.params(), (text.hidden_size,), text.param_dtype))
        else:
            self.image_newline = None
        self.language_model = DecoderModel(text, rngs=rngs)
        if text.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(text.hidden_size, text.vocab_size, use_bias=False, dtype=text.dtype,
                                      param_dtype=text.param_dtype, kernel_init=nnx.initializers.normal(0.02),
                                      rngs=rngs)

    # ---- images ----------------------------------------------------------------------------------
    def _tile_features(self, tiles: jax.Array) -> jax.Array:
        """`tiles[M, C, S, S]` -> projected features `[M, tokens_per_tile, D]`."""
        cfg = self.config
        feats = self.vision_tower.features(tiles, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        return self.multi_modal_projector(feats.astype(cfg.text.dtype))

    def image_features(self, pixel_values: jax.Array, image_sizes: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
        """Projected image features per image, padded to `max_image_tokens`.

        Args:
          pixel_values: LLaVA-1.5 `[N, C, S, S]`; NeXT `[N, P, C, S, S]` (base tile first, then the grid
            row-major, zero-padded to P tiles).
          image_sizes: NeXT: `[N, 2]` int original (height, width); ignored by LLaVA-1.5.
        Returns:
          (`features[N, max_image_tokens, D]` in the text compute dtype, `lengths[N]` int32).
        """
        cfg = self.config
        vis = cfg.vision
        pixel_values = jnp.asarray(pixel_values)
        if not cfg.is_next:
            if pixel_values.ndim != 4:
                raise ValueError(f"LLaVA-1.5 expects pixel_values [N, C, H, W], got shape {pixel_values.shape}")
            feats = self._tile_features(pixel_values)
            return feats, jnp.full((feats.shape[0],), feats.shape[1], jnp.int32)
        if pixel_values.ndim != 5:
            raise ValueError(f"LLaVA-NeXT expects pixel_values [N, patches, C, H, W], got shape {pixel_values.shape}")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes [N, 2] (original height, width of each image) to lay out "
                             "its anyres features: pass them with pixel_values (embed_inputs, sampling.sample / "
                             "score, and the trainer's batch)")
        image_sizes = jnp.asarray(image_sizes).astype(jnp.int32)
        n, p = pixel_values.shape[:2]
        if image_sizes.shape != (n, 2):
            raise ValueError(f"image_sizes shape {image_sizes.shape} != (num_images, 2) = {(n, 2)}")
        src, lengths = anyres_layout(cfg, image_sizes, p)  # first: it checks that P tiles suffice
        tiles = self._tile_features(pixel_values.reshape(n * p, *pixel_values.shape[2:]))
        d = tiles.shape[-1]
        newline = jnp.broadcast_to(self.image_newline[...].astype(tiles.dtype), (n, 1, d))
        table = jnp.concatenate([tiles.reshape(n, p * vis.num_patches, d), newline], axis=1)
        return jnp.take_along_axis(table, src[..., None], axis=1), lengths

    # ---- policy-model interface ------------------------------------------------------------------
    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     image_sizes: jax.Array | None = None) -> jax.Array:
        """`input_ids[B, T]` (with expanded image tokens) -> `inputs_embeds[B, T, D]` with image features
        spliced in at the `image_token_id` positions. Without `pixel_values` the image tokens keep their
        token embeddings (as in HF)."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:  # no images: as HF, tokens keep their embeddings
            return embeds
        features, lengths = self.image_features(pixel_values, image_sizes)
        return splice_image_features(embeds, input_ids == self.config.image_token_id, features, lengths)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`hidden[B, T, D]` -> `logits[B, T, V]` float32 (compute-dtype operands, float32 accumulation:
        `llama.output_logits`)."""
        return llama.output_logits(hidden, self.language_model.embed_tokens, self.lm_head, self.config.text.dtype)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        """Empty preallocated KV cache of the language model (for `decode`)."""
        return self.language_model.init_cache(batch_size, max_length, dtype)

    def decode(self, inputs_embeds: jax.Array, attention_mask: jax.Array, positions: jax.Array,
               cache: KVCache | None = None, *, remat: bool = False, logits_slice: tuple[int, int] | None = None
               ) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """-> (logits `[B, T, V]` float32, final hidden `[B, T, D]`, cache). See `llama.DecoderModel.__call__`.

        `logits_slice=(start, stop)` (static ints) computes logits only for positions start..stop-1
        (`[B, stop - start, V]`): a prefill needs the last position's, not a 32k-vocab row per prompt token.
        """
        hidden, cache = self.language_model(inputs_embeds, attention_mask, positions, cache, remat=remat)
        selected = hidden if logits_slice is None else hidden[:, logits_slice[0]:logits_slice[1]]
        return self.logits(selected), hidden, cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_sizes: jax.Array | None = None) -> jax.Array:
        """HF-equivalent forward -> `logits[B, T, V]`.

        Args:
          input_ids: `[B, T]` with each `<image>` already expanded to its token count.
          attention_mask: `[B, T]` (left or right padding; positions are `cumsum(mask) - 1`).
          pixel_values: `[N, C, S, S]` (LLaVA-1.5) or `[N, P, C, S, S]` (NeXT), NCHW, normalised.
          image_sizes: `[N, 2]` original (height, width) (NeXT).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        logits, _, _ = self.decode(embeds, attention_mask, positions_from_mask(attention_mask))
        return logits


def random_init(config: LlavaConfig, seed: int = 0, scale: float = 0.02, *, dtype: Dtype | None = None,
                param_dtype: Dtype | None = None) -> Llava:
    """A `Llava` with every parameter drawn in numpy: N(0, scale), norm gains 1 + N(0, scale), norm biases 0.

    Same role as the modules' own initialisers but without one XLA compile per initializer (tens of
    seconds for the tiny presets on a small CPU): the model is built abstractly and filled from numpy.
    For tests, demos and benchmarks at any size that fits in host memory.

    The draws are float32 and cast to each parameter's storage dtype, so for one seed a bf16 model
    holds exactly the bf16 rounding of the float32 model's parameters.

    Args:
      config: the architecture; its `text`/`vision` `dtype` / `param_dtype` apply unless overridden.
      seed, scale: the numpy seed and the standard deviation of the draws.
      dtype: compute dtype of every part (vision tower, projector, language model); with `dtype` alone
        the parameters are stored in it too (`LlavaConfig.with_dtype`), e.g. `dtype=jnp.bfloat16`.
      param_dtype: storage dtype of every parameter (default: `dtype` if given, else the config's).
    """
    if dtype is not None or param_dtype is not None:
        config = config.with_dtype(dtype if dtype is not None else config.text.dtype,
                                   param_dtype if param_dtype is not None else dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0))))
    rs = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        x = rs.standard_normal(abstract.shape, dtype=np.float32) * scale
        names = [str(p) for p in path]
        is_norm = any("norm" in n for n in names)  # RMSNorm `weight`, LayerNorm `scale` / `bias`
        if is_norm and names[-1] in ("weight", "scale"):
            x += 1.0
        elif is_norm and names[-1] == "bias":
            x[...] = 0.0
        filled.append((path, var.replace(jnp.asarray(x, abstract.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --------------------------------------------------------------------------------------------------
# Hugging Face import (used by coso_jax.models.hf_import)
# --------------------------------------------------------------------------------------------------
def _complete_hf_config(hf_config: dict) -> dict:
    """Fills the defaults a hub `config.json` leaves out (e.g. llava-v1.6-mistral-7b-hf's text_config has no
    hidden_size) by round-tripping through transformers' config classes, which need no torch."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency; keep the raw dict otherwise
        return hf_config
    return transformers.AutoConfig.for_model(**hf_config).to_dict()


def config_from_hf(hf_config: dict, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None) -> LlavaConfig:
    """`LlavaConfig` from a HF `config.json` dict of model_type "llava" or "llava_next"."""
    model_type = hf_config.get("model_type")
    if model_type not in ("llava", "llava_next"):
        raise ValueError(f"llava.config_from_hf: model_type {model_type!r} is not 'llava' or 'llava_next'")
    hf = _complete_hf_config(hf_config)
    text_hf = dict(hf["text_config"])
    if "tie_word_embeddings" in hf:  # the composite model's flag decides whether lm_head is tied
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    text = llama.config_from_hf(text_hf, dtype=dtype, param_dtype=param_dtype)
    vision = clip.config_from_hf(hf["vision_config"], dtype=dtype, param_dtype=param_dtype)
    layer = hf.get("vision_feature_layer", -2)
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
        image_grid_pinpoints=hf.get("image_grid_pinpoints") if model_type == "llava_next" else None,
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
    )


def build_model(config: LlavaConfig, *, rngs: nnx.Rngs) -> Llava:
    return Llava(config, rngs=rngs)


def hf_key_map(config: LlavaConfig) -> list[tuple[str, tuple | None, Any]]:
    """Explicit map from HF LLaVA / LLaVA-NeXT safetensors keys to `Llava` parameter paths.

    Keys are in the layout transformers 5 writes with `save_pretrained` (`language_model.model.*`,
    `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`, `image_newline`);
    `canonical_hf_key` maps the other layouts in circulation onto it.
    """
    entries = clip.vision_key_map(config.vision, "vision_tower.", ("vision_tower",))
    for name in ("linear_1", "linear_2"):
        entries.append((f"multi_modal_projector.{name}.weight", ("multi_modal_projector", name, "kernel"),
                        clip.transpose))
        if config.projector_bias:
            entries.append((f"multi_modal_projector.{name}.bias", ("multi_modal_projector", name, "bias"), None))
    if config.is_next:
        entries.append(("image_newline", ("image_newline",), None))
    entries += llama.decoder_key_map(config.text, "language_model.model.", ("language_model",))
    if config.text.tie_word_embeddings:
        entries.append(("language_model.lm_head.weight", None, None))
    else:
        entries.append(("language_model.lm_head.weight", ("lm_head", "kernel"), clip.transpose))
    return entries


# Other layouts -> hf_key_map's. Hub checkpoints (llava-hf/*) carry `vision_tower.vision_model.*`;
# transformers 4.52-4.57 saved the in-memory layout `model.language_model.*`, `lm_head.weight`, ...
_KEY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def canonical_hf_key(key: str) -> str:
    """Maps a LLaVA checkpoint key of any layout in circulation onto `hf_key_map`'s layout."""
    for old, new in _KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def normalize_hf_tensors(tensors: dict) -> dict:
    """Renames every tensor with `canonical_hf_key` (raises if two names collide)."""
    out = {}
    for key, value in tensors.items():
        new = canonical_hf_key(key)
        if new in out:
            raise ValueError(f"checkpoint holds two tensors that both map to {new!r} (one is {key!r})")
        out[new] = value
    return out


def load_pretrained(local_dir, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None) -> Llava:
    """Loads a local LLaVA / LLaVA-NeXT checkpoint of any key layout (`normalize_hf_tensors` first).

    `coso_jax.models.from_pretrained` covers the layout transformers 5 saves; this also takes hub
    checkpoints (`vision_tower.vision_model.*`) until the generic importer applies the renaming itself.
    """
    from coso_jax.models import hf_import

    config = config_from_hf(hf_import.read_hf_config(local_dir), dtype=dtype, param_dtype=param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    tensors = normalize_hf_tensors(hf_import.load_hf_tensors(local_dir))
    return hf_import.apply_key_map(abstract, tensors, hf_key_map(config), source=str(local_dir))
