"""Policy inputs from env prompts and observations: chat template, image tokens, left padding.

The HF LLaVA processors expand one `<image>` placeholder into as many image tokens as the vision
tower produces; we do the same here without the processor (no torchvision on our machines), so
`input_ids` already hold the expanded image tokens when they reach the model (docs/design.md).

Rollouts encode the same prompts and frames over and over (a gym_cards game has few distinct
states), so the encoder keeps each prompt's padded row and each frame's processed pixels
(`FrameCache`: keyed by the frame's contents, exactly) and only processes what it has not seen.
"""
from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Callable, Sequence

import numpy as np

from coso_jax.tokenizer import IMAGE_TOKEN

# Conversation templates by model family; `{image}` marks where the image tokens go.
TEMPLATES = {
    # Our tiny models (trained from scratch on our BPE): LLaVA-1.5 style USER/ASSISTANT turns.
    "tiny": "USER: {image}\n{prompt} ASSISTANT:",
    # llava-v1.6-mistral-7b (Mistral instruct format).
    "mistral_instruct": "[INST] {image}\n{prompt} [/INST]",
    # LLaVA-1.5 / vicuna.
    "vicuna": "USER: {image}\n{prompt} ASSISTANT:",
}


class FrameCache:
    """The per-frame outputs of a row-wise image function, keyed by the frame's contents.

    `cache(image_fn, frames)` equals `image_fn(frames)` for an `image_fn` that processes every frame on
    its own (row i of each output depends on frame i only, as `LlavaImageProcessor` does with a fixed
    tile count): each frame's rows are computed once (frames not seen before, one batched call) and
    assembled from the cache after that. A frame's key is its shape, dtype and crc32; frames whose key
    matches are compared byte for byte, so a hit is always the same frame. Least recently used frames
    are dropped past `max_bytes` (frames + outputs); `max_bytes=0` caches nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        # key -> [(frame, rows)], least recently used first.
        self._entries: collections.OrderedDict[tuple, list[tuple[np.ndarray, tuple]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(chain) for chain in self._entries.values())

    def _find(self, key: tuple, frame: np.ndarray) -> tuple | None:
        for stored, rows in self._entries.get(key, ()):
            if np.array_equal(stored, frame):
                self._entries.move_to_end(key)
                return rows
        return None

    def _store(self, key: tuple, frame: np.ndarray, rows: tuple) -> None:
        size = frame.nbytes + sum(r.nbytes for r in rows if r is not None)
        if size > self.max_bytes:
            return
        self._entries.setdefault(key, []).append((frame.copy(), rows))
        self._entries.move_to_end(key)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, chain = self._entries.popitem(last=False)
            self.nbytes -= sum(f.nbytes + sum(r.nbytes for r in rows if r is not None) for f, rows in chain)

    def __call__(self, fn: Callable[[np.ndarray], tuple], frames: np.ndarray) -> tuple:
        frames = np.ascontiguousarray(frames)  # so every frame is a contiguous buffer for crc32
        if self.max_bytes <= 0 or not len(frames):
            return fn(frames)
        keys, found, missing = [], [], {}  # missing: key -> [(frame index, ...)] of distinct unseen frames
        for i, frame in enumerate(frames):
            key = (frame.shape, frame.dtype.str, zlib.crc32(frame))
            keys.append(key)
            rows = self._find(key, frame)
            found.append(rows)
            if rows is None and not any(np.array_equal(frames[j], frame) for j in missing.get(key, ())):
                missing.setdefault(key, []).append(i)
        new = [i for group in missing.values() for i in group]
        self.hits += len(frames) - len(new)
        self.misses += len(new)
        if new:
            outputs = fn(frames[new])
            for k, i in enumerate(new):
                rows = tuple(None if out is None else np.array(out[k]) for out in outputs)
                self._store(keys[i], frames[i], rows)
                found[i] = rows
            for i, rows in enumerate(found):  # repeats of a frame first seen in this batch
                if rows is None:
                    found[i] = next(found[j] for j in missing[keys[i]] if np.array_equal(frames[j], frames[i]))
        shapes = {tuple(None if r is None else r.shape for r in rows) for rows in found}
        if len(shapes) > 1:
            raise ValueError(f"the image function's rows differ in shape across batches ({sorted(map(str, shapes))}): "
                             f"it is not row-wise; build the PromptEncoder with image_cache_mb=0")
        return tuple(None if found[0][k] is None else np.stack([rows[k] for rows in found])
                     for k in range(len(found[0])))


@dataclasses.dataclass
class PromptEncoder:
    """Builds left-padded `prompt_ids[B, P]`, `prompt_mask[B, P]` and image arrays for the policy.

    Args:
      tokenizer: a Hugging Face tokenizer with `IMAGE_TOKEN` in its vocabulary.
      prompt_len: static P; a longer prompt raises (prompts are short and fixed in structure, so
        truncating one would silently change the task).
      num_image_tokens: how many image tokens one image expands to (from the vision config).
      image_fn: maps uint8 observations `[B, H, W, 3]` to `(pixel_values, image_sizes or None)`, each
        observation on its own (row i of the outputs depends on observation i only).
      template: one of `TEMPLATES` (or a custom string with `{image}` and `{prompt}`).
      image_cache_mb: memory for processed frames (`FrameCache`); 0 processes every frame every call.
    """

    tokenizer: object
    prompt_len: int
    num_image_tokens: int
    image_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    template: str = "tiny"
    image_cache_mb: float = 256.0

    def __post_init__(self) -> None:
        fmt = TEMPLATES.get(self.template, self.template)
        if "{image}" not in fmt or "{prompt}" not in fmt:
            raise ValueError(f"prompt template must contain {{image}} and {{prompt}}: {fmt!r}")
        self._format = fmt
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token; build it with coso_jax.tokenizer.build_bpe")
        self.image_token_id = int(image_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        bos = self.tokenizer.bos_token_id
        self._bos = [int(bos)] if bos is not None else []
        self._cache: dict[str, list[int]] = {}
        self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # prompt -> its padded (ids, mask) row
        self.frames = FrameCache(int(self.image_cache_mb * (1 << 20)))

    def token_ids(self, prompt: str) -> list[int]:
        """Unpadded ids of one prompt: BOS, template text, expanded image tokens (cached)."""
        ids = self._cache.get(prompt)
        if ids is None:
            before, after = self._format.format(image="\x00", prompt=prompt).split("\x00")
            encode = lambda s: self.tokenizer.encode(s, add_special_tokens=False) if s else []
            ids = self._bos + encode(before) + [self.image_token_id] * self.num_image_tokens + encode(after)
            if len(ids) > self.prompt_len:
                raise ValueError(
                    f"prompt is {len(ids)} tokens (with {self.num_image_tokens} image tokens) but "
                    f"prompt_len is {self.prompt_len}; raise prompt_len. Prompt: {prompt[:200]!r}"
                )
            self._cache[prompt] = ids
        return ids

    def padded_row(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """One prompt's left-padded `(ids[P] int32, mask[P] bool)` (cached; read-only)."""
        row = self._rows.get(prompt)
        if row is None:
            toks = self.token_ids(prompt)
            ids = np.full(self.prompt_len, self.pad_id, np.int32)
            mask = np.zeros(self.prompt_len, np.bool_)
            ids[self.prompt_len - len(toks):] = toks
            mask[self.prompt_len - len(toks):] = True
            ids.flags.writeable = mask.flags.writeable = False
            row = self._rows[prompt] = (ids, mask)
        return row

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `(ids[B, P] int32, mask[B, P] bool)`."""
        if not len(prompts):
            return np.zeros((0, self.prompt_len), np.int32), np.zeros((0, self.prompt_len), np.bool_)
        rows = [self.padded_row(p) for p in prompts]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def images(self, observations: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`image_fn(observations)`, each distinct frame processed once (`FrameCache`)."""
        return self.frames(self.image_fn, np.asarray(observations))

    def __call__(self, prompts: Sequence[str], observations: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = self.encode_text(prompts)
        pixel_values, image_sizes = self.images(observations)
        out = {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": pixel_values}
        if image_sizes is not None:
            out["image_sizes"] = image_sizes
        return out

    def max_prompt_tokens(self, prompts: Sequence[str]) -> int:
        return max(len(self.token_ids(p)) for p in prompts)
