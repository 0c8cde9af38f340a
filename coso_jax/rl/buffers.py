"""Rollout storage for one PPO iteration, and the replay of action texts for the causal classifier.

`RolloutBuffer` holds `num_steps` x `num_envs` transitions in preallocated host (numpy) arrays,
time-major, so that GAE can run over the time axis and the PPO update can flatten it to a batch.
Generated responses are right-padded to `max_new_tokens`; prompts are left-padded to
`prompt_len` (docs/contracts.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Field name -> (per-transition trailing shape key, dtype). Shape keys are resolved at init.
_FIELDS: dict[str, tuple[tuple[str, ...], Any]] = {
    "prompt_ids": (("P",), np.int32),
    "prompt_mask": (("P",), np.bool_),
    "response_ids": (("N",), np.int32),
    "response_mask": (("N",), np.bool_),
    "thought_mask": (("N",), np.bool_),
    "action_mask": (("N",), np.bool_),
    "old_logprobs": (("N",), np.float32),
    "old_entropies": (("N",), np.float32),  # the behaviour policy's token entropies (soft backup)
    "old_values": ((), np.float32),
    "rewards": ((), np.float32),
    "dones": ((), np.bool_),
    "valid": ((), np.bool_),
    "labels": ((), np.int32),
}


@dataclasses.dataclass
class RolloutBuffer:
    """Fixed-size, time-major storage: every array is `[num_steps, num_envs, ...]`.

    `image_fields` maps the policy's image inputs to their per-observation shape and dtype, as the
    prompt encoder produces them: `pixel_values` (e.g. `[C, H, W]`, or `[tiles, C, H, W]` for
    LLaVA-NeXT) and, for LLaVA-NeXT, `image_sizes` (`[2]` int: each frame's (height, width)).
    `image_fields_of(inputs)` reads them off one encoded batch.
    """

    num_steps: int
    num_envs: int
    prompt_len: int
    max_new_tokens: int
    image_fields: dict[str, tuple[tuple[int, ...], Any]]

    def __post_init__(self) -> None:
        dims = {"P": self.prompt_len, "N": self.max_new_tokens}
        lead = (self.num_steps, self.num_envs)
        self.arrays: dict[str, np.ndarray] = {
            name: np.zeros(lead + tuple(dims[k] for k in shape), dtype)
            for name, (shape, dtype) in _FIELDS.items()
        }
        for name, (shape, dtype) in self.image_fields.items():
            self.arrays[name] = np.zeros(lead + tuple(shape), dtype)
        self.texts: list[list[str]] = [["" for _ in range(self.num_envs)] for _ in range(self.num_steps)]
        self.step = 0

    def reset(self) -> None:
        """Starts a new iteration; arrays are overwritten in place."""
        self.step = 0

    @property
    def full(self) -> bool:
        return self.step == self.num_steps

    def add(self, texts: list[str], **fields: np.ndarray) -> None:
        """Stores one time step for all envs. Every field of `_FIELDS` and `image_fields` is required."""
        if self.full:
            raise RuntimeError(f"RolloutBuffer is full ({self.num_steps} steps); call reset()")
        expected = set(self.arrays)
        given = set(fields)
        if given != expected:
            raise KeyError(
                f"RolloutBuffer.add: missing fields {sorted(expected - given)}, "
                f"unexpected fields {sorted(given - expected)}"
            )
        for name, value in fields.items():
            target = self.arrays[name][self.step]
            value = np.asarray(value)
            if value.shape != target.shape:
                raise ValueError(
                    f"RolloutBuffer.add: field {name!r} has shape {value.shape}, expected {target.shape}"
                )
            target[...] = value
        if len(texts) != self.num_envs:
            raise ValueError(f"RolloutBuffer.add: {len(texts)} texts for {self.num_envs} envs")
        self.texts[self.step] = list(texts)
        self.step += 1

    def flat(self) -> dict[str, np.ndarray]:
        """All fields with the time and env axes merged: `[num_steps * num_envs, ...]`."""
        if not self.full:
            raise RuntimeError(f"RolloutBuffer has {self.step}/{self.num_steps} steps")
        n = self.num_steps * self.num_envs
        return {k: v.reshape((n,) + v.shape[2:]) for k, v in self.arrays.items()}

    def flat_texts(self) -> list[str]:
        return [t for row in self.texts for t in row]


def image_fields_of(inputs: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The per-observation shape and dtype of the image inputs in one encoded batch (`pixel_values`,
    and `image_sizes` where the encoder gives them), for `RolloutBuffer(image_fields=...)`."""
    return {k: (tuple(np.shape(inputs[k])[1:]), np.asarray(inputs[k]).dtype)
            for k in ("pixel_values", "image_sizes") if inputs.get(k) is not None}


class ActionReplay:
    """A ring buffer of (response tokens, label) pairs for training the causal classifier online.

    Only valid actions (those with a label) are stored, as in the reference: unparseable text has
    no action type to predict.
    """

    def __init__(self, capacity: int, max_len: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"ActionReplay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_len = max_len
        self.tokens = np.zeros((capacity, max_len), np.int32)
        self.mask = np.zeros((capacity, max_len), np.bool_)
        self.labels = np.zeros((capacity,), np.int32)
        self.size = 0
        self.cursor = 0
        self.rng = np.random.default_rng(seed)

    def add(self, tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> None:
        """Adds rows `[n, L<=max_len]` whose `valid` flag is set; longer rows raise."""
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"ActionReplay rows have {tokens.shape[1]} tokens > max_len {self.max_len}")
        for row in np.flatnonzero(np.asarray(valid)):
            i = self.cursor
            self.tokens[i] = 0
            self.mask[i] = False
            self.tokens[i, : tokens.shape[1]] = tokens[row]
            self.mask[i, : tokens.shape[1]] = mask[row]
            self.labels[i] = labels[row]
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`n` rows drawn with replacement (the reference samples a fixed count per update)."""
        if self.size == 0:
            raise RuntimeError("ActionReplay is empty: no valid action has been stored yet")
        idx = self.rng.integers(0, self.size, size=n)
        return self.tokens[idx], self.mask[idx], self.labels[idx]

    def arrays(self) -> dict[str, np.ndarray]:
        """Fixed-shape arrays for a checkpoint (see `meta` for the rest)."""
        return {"tokens": self.tokens, "mask": self.mask, "labels": self.labels}

    def meta(self) -> dict[str, Any]:
        """JSON-safe counters and RNG state."""
        return {"size": self.size, "cursor": self.cursor, "rng": self.rng.bit_generator.state}

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        for name in ("tokens", "mask", "labels"):
            value = np.asarray(arrays[name])
            target = getattr(self, name)
            if value.shape != target.shape:
                raise ValueError(f"ActionReplay checkpoint field {name!r} has shape {value.shape}, expected {target.shape}")
            target[...] = value
        self.size = int(meta["size"])
        self.cursor = int(meta["cursor"])
        self.rng.bit_generator.state = meta["rng"]
