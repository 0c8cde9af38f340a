"""numpy/PIL preprocessing for LLaVA-1.5 and LLaVA-NeXT against transformers' PIL image processors and
its anyres helpers (torch-free, except the unpadding check against transformers' modeling code, which
skips without torch)."""
import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from coso_jax.models import image_processing as ip

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402

LLAVA16_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINS = [[32, 64], [64, 32], [64, 64]]
SIZES = [(30, 70), (50, 45), (300, 300), (17, 90), (64, 64), (90, 17), (1, 1)]


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_clip_pixels_match_hf():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ims = images(SIZES[:-1])
    ref = hf(ims, return_tensors="np")["pixel_values"]
    ours = ip.LlavaImageProcessor(tile=32, patch=8)(ims)
    assert ours.pixel_values.shape == ref.shape == (len(ims), 3, 32, 32)
    np.testing.assert_allclose(ours.pixel_values, ref, atol=1e-5, rtol=0)
    assert list(ours.num_image_tokens) == [16] * len(ims)
    assert ip.LlavaImageProcessor(tile=32, patch=8, strategy="full").num_image_tokens((5, 5)) == 17


def test_next_pixels_match_hf():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=TINY_PINS)
    ims = images(SIZES[:-1])  # (HF infers a 1x1x3 array as channels-first, so 1x1 is left out)
    ref = hf(ims, return_tensors="np")
    ours = ip.LlavaImageProcessor(tile=32, patch=8, pinpoints=tuple(map(tuple, TINY_PINS)), pad_patches_to=0)(ims)
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours.image_sizes, ref["image_sizes"])
    # Default padding: the static maximum (1 + 2x2 tiles) whatever the batch.
    fixed = ip.LlavaImageProcessor(tile=32, patch=8, pinpoints=tuple(map(tuple, TINY_PINS)))(ims[:1])
    assert fixed.pixel_values.shape == (1, 5, 3, 32, 32)
    assert not fixed.pixel_values[0, 3:].any()  # a 30x70 image uses 1 + 1x2 tiles; the rest is zero padding


def test_pil_and_grayscale_inputs():
    rgb = images([(20, 30)])[0]
    proc = ip.LlavaImageProcessor(tile=32, patch=8)
    a = proc([rgb]).pixel_values
    b = proc([Image.fromarray(rgb)]).pixel_values
    np.testing.assert_array_equal(a, b)
    gray = proc([rgb[:, :, 0]]).pixel_values
    assert gray.shape == (1, 3, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        proc([rgb.astype(np.float32)])


def _hf_float_artifact(h, w, pins):
    """True if HF's float64 `int(x * (p / x))` (the scaled size of a side that fits a pinpoint side
    exactly) comes out one short for this image, the only source of disagreement."""
    return any(int(w * (pw / w)) != pw or int(h * (ph / h)) != ph for ph, pw in pins)


def test_best_resolution_matches_hf():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(1, 2500, (1500, 2))]
    sizes += [(300, 300), (336, 336), (336, 672), (1, 1), (2000, 10), (10, 2000)]
    for pins in (LLAVA16_PINS, TINY_PINS):
        differ = 0
        for h, w in sizes:
            want = tuple(hf_select_best_resolution((h, w), pins))
            if tuple(int(v) for v in ip.select_best_resolution(h, w, pins)) != want:
                assert _hf_float_artifact(h, w, pins), (h, w)
                differ += 1
        assert differ <= len(sizes) // 200
    # Vectorised and traced-array forms agree with the scalar one.
    arr = np.asarray(sizes, np.int32)
    bh, bw = ip.select_best_resolution(jnp.asarray(arr[:, 0]), jnp.asarray(arr[:, 1]), LLAVA16_PINS, xp=jnp)
    want = np.asarray([[int(v) for v in ip.select_best_resolution(h, w, LLAVA16_PINS)] for h, w in sizes])
    np.testing.assert_array_equal(np.stack([bh, bw], 1), want)


def test_known_float_tie_divergence_is_documented():
    """HF picks pinpoints in float64; at 567x1133 rounding turns a win into a tie and HF keeps 336x672,
    where exact arithmetic (ours, identical in the model and the host count) picks 672x672."""
    assert tuple(hf_select_best_resolution((567, 1133), LLAVA16_PINS)) == (336, 672)
    assert tuple(int(v) for v in ip.select_best_resolution(567, 1133, LLAVA16_PINS)) == (672, 672)
    assert _hf_float_artifact(567, 1133, LLAVA16_PINS)


@pytest.mark.torch
def test_unpadding_matches_hf_unpad_image():
    pytest.importorskip("torch")  # transformers' modeling_llava_next imports torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = np.random.default_rng(1)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 1500, 2))
        rows, cols = (int(v) * 24 for v in rng.integers(1, 4, 2))
        ref = unpad_image(np.zeros((1, rows, cols)), (h, w)).shape[1:]
        row0, n_rows, col0, n_cols = (int(v) for v in ip.unpadded_extent(h, w, rows, cols))
        assert (n_rows, n_cols) == ref, (h, w, rows, cols)
        assert row0 == (rows - n_rows) // 2 and col0 == (cols - n_cols) // 2


def _hf_processor_token_count(pins, tile, patch):
    """`LlavaNextProcessor`'s own token count, called without building a tokenizer."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    fake = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
                                 patch_size=patch, num_additional_image_tokens=1)
    fake._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, fake)
    # "default" strategy: the processor subtracts the class token it counted in the base tile.
    return lambda h, w: LlavaNextProcessor._get_number_of_features(fake, h, w, tile, tile) - 1


def test_token_counts_match_hf_processor():
    rng = np.random.default_rng(2)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(1, 1500, (300, 2))] + [(300, 300), (567, 1133)]
    for pins, tile, patch in ((LLAVA16_PINS, 336, 14), (TINY_PINS, 32, 8)):
        hf_count = _hf_processor_token_count(pins, tile, patch)
        for h, w in sizes:
            if tuple(hf_select_best_resolution((h, w), pins)) != tuple(
                    int(v) for v in ip.select_best_resolution(h, w, pins)):
                continue  # the documented float-tie cases
            assert ip.num_image_tokens_next((h, w), pins, tile, patch) == hf_count(h, w), (h, w)


def test_expand_image_tokens():
    assert ip.expand_image_tokens([1, 9, 5, 7, 5], 9, [2]) == [1, 9, 9, 5, 7, 5]
    assert ip.expand_image_tokens([9, 3, 9], 9, [1, 3]) == [9, 3, 9, 9, 9]
    assert ip.expand_image_tokens([9, 3, 9], 9, 2) == [9, 9, 3, 9, 9]
    with pytest.raises(ValueError, match="2 image placeholders but 3 images"):
        ip.expand_image_tokens([9, 3, 9], 9, [4, 4, 4])
    with pytest.raises(ValueError, match="more image placeholders"):
        ip.expand_image_tokens([9, 9, 9], 9, [1, 1])


def test_bad_pinpoints():
    with pytest.raises(ValueError, match="multiple of the tile size"):
        ip.anyres_preprocess_one(images([(10, 10)])[0], [(32, 40)], 32)
