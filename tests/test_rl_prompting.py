"""Prompt encoding (coso_jax/rl/prompting.py): template, image tokens, left padding, errors."""
from __future__ import annotations

import numpy as np
import pytest

from coso_jax.rl.prompting import PromptEncoder
from coso_jax.tokenizer import IMAGE_TOKEN


# ---------------------------------------------------------------------------------------------
# Prompt encoding
def _encoder(tokenizer, prompt_len, num_image_tokens=5, template="tiny"):
    def image_fn(obs):
        return obs.astype(np.float32).transpose(0, 3, 1, 2) / 255.0, None
    return PromptEncoder(tokenizer, prompt_len, num_image_tokens, image_fn, template)


def test_prompt_encoder_left_pads_and_expands_image_tokens(tokenizer, numberline_records):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompts = ["short", numberline_records[0]["prompt"][:120]]
    enc = _encoder(tokenizer, 96)
    obs = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    out = enc(prompts, obs)
    ids, mask = out["prompt_ids"], out["prompt_mask"]
    assert ids.shape == mask.shape == (2, 96) and ids.dtype == np.int32 and mask.dtype == np.bool_
    assert out["pixel_values"].shape == (2, 3, 8, 8) and "image_sizes" not in out
    for row, prompt in enumerate(prompts):
        # Independent: BOS + "USER: " + 5 x <image> + "\n{prompt} ASSISTANT:".
        expected = ([tokenizer.bos_token_id] + tokenizer.encode("USER: ", add_special_tokens=False)
                    + [image_id] * 5 + tokenizer.encode(f"\n{prompt} ASSISTANT:", add_special_tokens=False))
        n = len(expected)
        assert mask[row].sum() == n
        assert not mask[row, : 96 - n].any() and mask[row, 96 - n:].all()  # left padding
        assert (ids[row, : 96 - n] == tokenizer.pad_token_id).all()
        np.testing.assert_array_equal(ids[row, 96 - n:], expected)
        image_pos = np.flatnonzero(ids[row] == image_id)
        assert image_pos.size == 5 and np.all(np.diff(image_pos) == 1)
        text = tokenizer.decode(ids[row][mask[row]], skip_special_tokens=True)
        assert text.endswith(f"{prompt} ASSISTANT:")
    assert enc.max_prompt_tokens(prompts) == int(mask.sum(1).max())


def test_prompt_encoder_errors(tokenizer):
    enc = _encoder(tokenizer, 12)
    with pytest.raises(ValueError, match="prompt_len is 12"):
        enc.encode_text(["a prompt that is much too long for twelve tokens with five image tokens in it"])
    with pytest.raises(ValueError, match=r"\{image\}"):
        _encoder(tokenizer, 12, template="no placeholders {prompt}")




def test_frame_cache_equals_the_image_function_and_stays_within_its_budget():
    from coso_jax.rl.prompting import FrameCache

    calls = []

    def image_fn(obs):  # row-wise, with a second output
        calls.append(len(obs))
        return obs.astype(np.float32).transpose(0, 3, 1, 2) / 255.0, np.full((len(obs), 2), obs.shape[1], np.int32)

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4, 6, 6, 3), dtype=np.uint8)
    cache = FrameCache(1 << 20)
    batch = frames[[0, 1, 0, 2]]  # a frame twice in one batch: processed once
    for got, want in zip(cache(image_fn, batch), image_fn(batch)):
        np.testing.assert_array_equal(got, want)
    assert calls[0] == 3 and len(cache) == 3
    batch = frames[[2, 3, 1]]
    for got, want in zip(cache(image_fn, batch), image_fn(batch)):
        np.testing.assert_array_equal(got, want)
    assert calls[2] == 1 and cache.hits == 3  # only the unseen frame
    per_frame = frames[0].nbytes + image_fn(frames[:1])[0].nbytes + 8
    small = FrameCache(2 * per_frame)  # room for two frames: the least recently used goes
    for i in (0, 1, 2, 0):
        small(image_fn, frames[i:i + 1])
    assert len(small) == 2 and small.nbytes <= 2 * per_frame and small.misses == 4

    def not_rowwise(obs):  # pads to the batch's size, as a batch-dependent processor would
        return np.zeros((len(obs), len(obs)), np.float32), None

    cache = FrameCache(1 << 20)
    cache(not_rowwise, frames[:1])
    with pytest.raises(ValueError, match="not row-wise"):
        cache(not_rowwise, frames[:3])
    uncached = FrameCache(0)
    assert uncached(not_rowwise, frames[:3])[0].shape == (3, 3)
