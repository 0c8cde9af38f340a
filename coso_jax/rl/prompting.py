"""Policy inputs from env prompts and observations: chat template, image tokens, left padding.

The HF LLaVA processors expand one `<image>` placeholder into as many image tokens as the vision
tower produces; we do the same here without the processor (no torchvision on our machines), so
`input_ids` already hold the expanded image tokens when they reach the model (docs/design.md).
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class PromptEncoder:
    """Builds left-padded `prompt_ids[B, P]`, `prompt_mask[B, P]` and image arrays for the policy.

    Args:
      tokenizer: a Hugging Face tokenizer with `IMAGE_TOKEN` in its vocabulary.
      prompt_len: static P; a longer prompt raises (prompts are short and fixed in structure, so
        truncating one would silently change the task).
      num_image_tokens: how many image tokens one image expands to (from the vision config).
      image_fn: maps uint8 observations `[B, H, W, 3]` to `(pixel_values, image_sizes or None)`.
      template: one of `TEMPLATES` (or a custom string with `{image}` and `{prompt}`).
    """

    tokenizer: object
    prompt_len: int
    num_image_tokens: int
    image_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    template: str = "tiny"

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

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded `(ids[B, P] int32, mask[B, P] bool)`."""
        ids = np.full((len(prompts), self.prompt_len), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.prompt_len), np.bool_)
        for row, prompt in enumerate(prompts):
            toks = self.token_ids(prompt)
            ids[row, self.prompt_len - len(toks):] = toks
            mask[row, self.prompt_len - len(toks):] = True
        return ids, mask

    def __call__(self, prompts: Sequence[str], observations: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = self.encode_text(prompts)
        pixel_values, image_sizes = self.image_fn(np.asarray(observations))
        out = {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": pixel_values}
        if image_sizes is not None:
            out["image_sizes"] = image_sizes
        return out

    def max_prompt_tokens(self, prompts: Sequence[str]) -> int:
        return max(len(self.token_ids(p)) for p in prompts)
