"""Image preprocessing for LLaVA-1.5 and LLaVA-NeXT in numpy + PIL (no torch, no torchvision).

Reproduces the Hugging Face PIL image processors (`CLIPImageProcessorPil`, `LlavaNextImageProcessorPil`)
on uint8 RGB inputs, and counts the image tokens each image expands to, so a trainer can expand its
`<image>` placeholders itself without the HF processor.

LLaVA-1.5 (`clip_preprocess`): resize the shortest edge to S (bicubic), centre-crop S x S, scale to
[0, 1], normalise with the OpenAI CLIP mean/std -> `pixel_values[N, 3, S, S]`; every image becomes
`(S / patch)**2` image tokens ("default" strategy; one more with "full").

LLaVA-NeXT "anyres" (`anyres_preprocess`): pick the grid pinpoint (a multiple of the tile size S) that
keeps the most of the image's resolution while wasting the least; resize the image to fit it keeping
the aspect ratio, pad it centred with black to the pinpoint, cut it into S x S tiles (row-major), and
put the whole image resized to S x S first (the "base" tile) -> `[1 + rows * cols, 3, S, S]`. Images of
a batch are zero-padded on the tile axis -> `pixel_values[N, P, 3, S, S]` plus `image_sizes[N, 2]`
(original height, width). Token count per image (`num_image_tokens_next`): `g*g` base tokens (g = S /
patch) plus the tile grid's `(rows*g) x (cols*g)` feature map with the letterbox padding removed
("unpadded") and one image-newline token per remaining row.

The resolution choice and the unpadding are computed with exact integer arithmetic by functions that
take an array module (`xp=numpy` here, `xp=jax.numpy` in coso_jax.models.llava), so the host-side token
count and the model's traced feature layout cannot disagree. Hugging Face computes the same quantities
in float64; the two agree except on rare near-ties where HF's `int(x * (p / x))` comes out one short
and turns a win into a tie (e.g. a 567 x 1133 image with the llava-1.6 pinpoints: HF picks 336x672,
we pick 672x672; 12 of the 1.4M sizes up to 1200 x 1200). Images from our own processor always agree
with the model; HF-processed pixels of such a size would not (the model raises on the tile or token count).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Pinpoints = Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------------
# Pixel operations (uint8 HWC in, as HF's PIL backend does them)
# --------------------------------------------------------------------------------------------------
def to_rgb_uint8(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array `[H, W]`, `[H, W, 3]` or `[H, W, 4]` -> uint8 RGB `[H, W, 3]`."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (or PIL images), got dtype {arr.dtype}; "
                        "convert floats with (x * 255).round().astype(np.uint8)")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr)  # already RGB: PIL's convert("RGB") would return the same pixels
    if arr.ndim == 3 and arr.shape[2] == 4:
        return np.asarray(Image.fromarray(arr).convert("RGB"))
    raise ValueError(f"images must be HWC with 1, 3 or 4 channels, got shape {arr.shape}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic PIL resize of a uint8 `[H, W, 3]` image to `[height, width, 3]` (uint8)."""
    if image.shape[:2] == (height, width):
        return image  # PIL returns an identical copy for a same-size resize
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.BICUBIC))


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop `[H, W, C]` (top-left rounding as HF's `center_crop`); the image must be large enough."""
    h, w = image.shape[:2]
    if h < height or w < width:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {height}x{width}")
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def normalize(image: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[3, H, W]`: `(x / 255 - mean) / std`."""
    x = image.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest edge is resized to `size` (HF: the long edge is truncated)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------------
def clip_preprocess_one(image: Any, size: int, crop_size: int | None = None,
                        mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
                        ) -> np.ndarray:
    """One image -> float32 `[3, crop, crop]` (resize shortest edge, centre crop, normalise)."""
    crop_size = size if crop_size is None else crop_size
    rgb = to_rgb_uint8(image)
    h, w = shortest_edge_size(rgb.shape[0], rgb.shape[1], size)
    return normalize(center_crop(resize(rgb, h, w), crop_size, crop_size), mean, std)


def clip_preprocess(images: Iterable[Any], size: int, crop_size: int | None = None,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
                    ) -> np.ndarray:
    """LLaVA-1.5 images -> `pixel_values[N, 3, crop, crop]` float32 (NCHW, HF layout)."""
    return np.stack([clip_preprocess_one(im, size, crop_size, mean, std) for im in images])


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT anyres: geometry (exact integer arithmetic, numpy or jax.numpy)
# --------------------------------------------------------------------------------------------------
def select_best_resolution(height, width, pinpoints: Pinpoints, xp=np):
    """The pinpoint `(h, w)` that maximises the effective resolution, then minimises the waste.

    For each pinpoint (H, W) the image is scaled by `min(W / width, H / height)`; the effective
    resolution is the scaled area capped at the original area, the waste the pinpoint's area minus it.
    Ties keep the earlier pinpoint. Works on Python/numpy ints (`xp=numpy`) and on traced int32 arrays
    (`xp=jax.numpy`, elementwise over any batch shape).

    Returns:
      `(best_h, best_w)` with the shape of `height`.
    """
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty")
    height = xp.asarray(height, dtype=xp.int32)
    width = xp.asarray(width, dtype=xp.int32)
    original = height * width
    best_h = xp.zeros_like(height)
    best_w = xp.zeros_like(height)
    best_eff = xp.zeros_like(height)
    best_waste = xp.full_like(height, np.iinfo(np.int32).max)
    for ph, pw in pinpoints:
        ph, pw = int(ph), int(pw)
        # scale = min(pw / width, ph / height), compared without division: pw * height <= ph * width.
        width_limited = pw * height <= ph * width
        down_w = xp.where(width_limited, pw, (width * ph) // height)
        down_h = xp.where(width_limited, (height * pw) // width, ph)
        eff = xp.minimum(down_w * down_h, original)
        waste = ph * pw - eff
        better = (eff > best_eff) | ((eff == best_eff) & (waste < best_waste))
        best_h = xp.where(better, ph, best_h)
        best_w = xp.where(better, pw, best_w)
        best_eff = xp.where(better, eff, best_eff)
        best_waste = xp.where(better, waste, best_waste)
    return best_h, best_w


def unpadded_extent(height, width, rows, cols, xp=np):
    """The feature map left after removing the letterbox padding (HF `unpad_image`), exactly.

    Args:
      height, width: the original image size.
      rows, cols: the padded feature map's size (tile grid x tokens per tile side).
    Returns:
      `(row0, num_rows, col0, num_cols)`: the kept window of the `[rows, cols]` feature map.
    """
    height = xp.asarray(height, dtype=xp.int32)
    width = xp.asarray(width, dtype=xp.int32)
    rows = xp.asarray(rows, dtype=xp.int32)
    cols = xp.asarray(cols, dtype=xp.int32)
    # Original wider than the map (width / height > cols / rows): padding was added above and below.
    wider = width * rows > cols * height
    new_rows = (height * cols) // width
    new_cols = (width * rows) // height
    pad_rows = xp.where(wider, (rows - new_rows) // 2, 0)
    pad_cols = xp.where(wider, 0, (cols - new_cols) // 2)
    return pad_rows, rows - 2 * pad_rows, pad_cols, cols - 2 * pad_cols


def anyres_grid_shape(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int) -> tuple[int, int]:
    """`(rows, cols)` of S x S tiles for an image of `image_size = (height, width)`."""
    bh, bw = select_best_resolution(int(image_size[0]), int(image_size[1]), pinpoints)
    return int(bh) // tile, int(bw) // tile


def num_anyres_patches(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int) -> int:
    """Tiles an image is cut into, plus the base tile (HF `image_size_to_num_patches`)."""
    rows, cols = anyres_grid_shape(image_size, pinpoints, tile)
    return rows * cols + 1


def max_anyres_patches(pinpoints: Pinpoints, tile: int) -> int:
    """The largest tile count any image can need: the static `P` of a jit-friendly batch."""
    return max((int(h) // tile) * (int(w) // tile) for h, w in pinpoints) + 1


def num_image_tokens_next(image_size: tuple[int, int], pinpoints: Pinpoints, tile: int, patch: int,
                          strategy: str = "default") -> int:
    """Image tokens one LLaVA-NeXT image expands to (only the "default" strategy exists for NeXT)."""
    if strategy != "default":
        raise ValueError("LLaVA-NeXT needs vision_feature_select_strategy='default' (the class token is dropped)")
    g = tile // patch
    rows, cols = anyres_grid_shape(image_size, pinpoints, tile)
    _, kept_rows, _, kept_cols = unpadded_extent(image_size[0], image_size[1], rows * g, cols * g)
    return g * g + int(kept_rows) * (int(kept_cols) + 1)


def num_image_tokens_clip(tile: int, patch: int, strategy: str = "default") -> int:
    """Image tokens one LLaVA-1.5 image expands to."""
    return (tile // patch) ** 2 + (1 if strategy == "full" else 0)


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT anyres: pixels
# --------------------------------------------------------------------------------------------------
def _fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Resized size keeping the aspect ratio inside (target_h, target_w) — HF's float formula
    (`get_patch_output_size`), kept as is since it decides pixels only, never token counts."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_preprocess_one(image: Any, pinpoints: Pinpoints, tile: int,
                          mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
                          ) -> np.ndarray:
    """One image -> float32 `[1 + rows * cols, 3, tile, tile]`: base tile, then the grid row-major."""
    for ph, pw in pinpoints:
        if int(ph) % tile or int(pw) % tile:
            raise ValueError(f"grid pinpoint {(ph, pw)} is not a multiple of the tile size {tile}")
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    bh, bw = (int(v) for v in select_best_resolution(h, w, pinpoints))
    nh, nw = _fit_size(h, w, bh, bw)
    fitted = resize(rgb, nh, nw)
    top, r_y = divmod(bh - nh, 2)
    left, r_x = divmod(bw - nw, 2)
    canvas = np.pad(fitted, ((top, top + r_y), (left, left + r_x), (0, 0)), constant_values=0)
    tiles = [resize(rgb, tile, tile)]
    tiles += [canvas[i:i + tile, j:j + tile] for i in range(0, bh, tile) for j in range(0, bw, tile)]
    return np.stack([normalize(t, mean, std) for t in tiles])


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
    """What the model call needs, plus the placeholder expansion.

    Attributes:
      pixel_values: float32 `[N, 3, S, S]` (LLaVA-1.5) or `[N, P, 3, S, S]` (LLaVA-NeXT, zero-padded tiles).
      image_sizes: int32 `[N, 2]` original (height, width) of each image.
      num_image_tokens: int32 `[N]` image tokens each image expands to.
    """

    pixel_values: np.ndarray
    image_sizes: np.ndarray
    num_image_tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class LlavaImageProcessor:
    """Preprocessing for one LLaVA model: `LlavaImageProcessor.from_config(model.config)(images)`.

    Attributes:
      tile: the vision tower's input size S.
      patch: the vision tower's patch size.
      pinpoints: LLaVA-NeXT grid pinpoints `((h, w), ...)`; None for LLaVA-1.5.
      strategy: the vision feature selection strategy ("default" drops the class token).
      pad_patches_to: NeXT only: the tile axis length P; None pads to the largest any image can need
        (a fixed shape, so a jitted sampler compiles once), 0 to the batch's own maximum (as HF does).
    """

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...] | None = None
    strategy: str = "default"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    pad_patches_to: int | None = None

    @classmethod
    def from_config(cls, config, **overrides) -> "LlavaImageProcessor":
        """From a `coso_jax.models.llava.LlavaConfig`."""
        pins = config.image_grid_pinpoints
        base = dict(tile=config.vision.image_size, patch=config.vision.patch_size,
                    pinpoints=None if pins is None else tuple(tuple(p) for p in pins),
                    strategy=config.vision_feature_select_strategy)
        return cls(**{**base, **overrides})

    @property
    def is_next(self) -> bool:
        return self.pinpoints is not None

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Tokens an image of `(height, width)` expands to."""
        if self.is_next:
            return num_image_tokens_next(image_size, self.pinpoints, self.tile, self.patch, self.strategy)
        return num_image_tokens_clip(self.tile, self.patch, self.strategy)

    def __call__(self, images: Sequence[Any]) -> ProcessedImages:
        """A list of images (PIL or uint8 HWC arrays) -> `ProcessedImages`."""
        images = [to_rgb_uint8(im) for im in images]
        if not images:
            raise ValueError("no images")
        sizes = np.asarray([im.shape[:2] for im in images], np.int32)
        tokens = np.asarray([self.num_image_tokens(tuple(s)) for s in sizes], np.int32)
        if not self.is_next:
            pixels = clip_preprocess(images, self.tile, self.tile, self.mean, self.std)
            return ProcessedImages(pixels, sizes, tokens)
        per_image = [anyres_preprocess_one(im, self.pinpoints, self.tile, self.mean, self.std) for im in images]
        most = max(len(p) for p in per_image)
        target = max_anyres_patches(self.pinpoints, self.tile) if self.pad_patches_to is None else self.pad_patches_to
        target = max(target, most)
        pixels = np.stack([np.pad(p, ((0, target - len(p)), (0, 0), (0, 0), (0, 0))) for p in per_image])
        return ProcessedImages(pixels, sizes, tokens)


def expand_image_tokens(token_ids: Sequence[int], image_token_id: int, num_tokens: Sequence[int] | int
                        ) -> list[int]:
    """Replaces the k-th `image_token_id` placeholder of `token_ids` with `num_tokens[k]` copies of it.

    This is what the HF processors do to the text; the model then splices image k's features at those
    positions, in order. Raises if the placeholder count and `num_tokens` disagree.
    """
    counts = [int(num_tokens)] * sum(t == image_token_id for t in token_ids) if np.isscalar(num_tokens) \
        else [int(n) for n in num_tokens]
    out, k = [], 0
    for t in token_ids:
        if t == image_token_id:
            if k >= len(counts):
                raise ValueError(f"token_ids hold more image placeholders than the {len(counts)} images given")
            out.extend([image_token_id] * counts[k])
            k += 1
        else:
            out.append(int(t))
    if k != len(counts):
        raise ValueError(f"token_ids hold {k} image placeholders but {len(counts)} images were given")
    return out
