"""Token-level views of generated text: character offsets of tokens, thought/action token masks.

The CoT log-prob scaling (RL4VLM) multiplies the log-probs of thought tokens by lambda. Which
tokens are "thought" is decided from character offsets of the `"action":` span that the env's
text interface reports, never from hard-coded token ids (those depend on the tokenizer version).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def token_char_offsets(tokenizer, token_ids: Sequence[int], pieces: dict[int, str] | None = None
                       ) -> tuple[str, np.ndarray, np.ndarray]:
    """Decodes `token_ids` and returns `(text, starts[n], ends[n])` character offsets per token.

    Special tokens (EOS, pad) decode to nothing and get a zero-length span at their position.
    Byte-level BPE can split one character over several tokens; then per-token decoding does not
    concatenate to the full text and we fall back to decoding prefixes (exact, O(n^2) but rare).
    `pieces`: a cache of single-token decodes (token id -> text) shared across calls with the same
    tokenizer; a token decodes alone to the same text whatever surrounds it, so the result is the same.
    """
    ids = [int(t) for t in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cache = {} if pieces is None else pieces
    for t in ids:
        if t not in cache:
            cache[t] = tokenizer.decode([t], skip_special_tokens=True)
    texts = [cache[t] for t in ids]
    if "".join(texts) == text:
        lengths = np.array([len(p) for p in texts], np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        return text, starts, ends
    ends = np.array([len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))], np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if len(ids) else ends
    return text, starts, ends


def thought_action_masks(
    starts: np.ndarray, ends: np.ndarray, action_start: int, length: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token masks `[width]` for the thought part (before `action_start`) and the action part.

    A token that overlaps `action_start` belongs to the action part, as do zero-length tokens at or
    after it (the EOS token closes the action, as in RL4VLM). Positions >= `length` are padding.
    """
    n = min(length, len(starts), width)
    action = np.zeros(width, np.bool_)
    thought = np.zeros(width, np.bool_)
    s, e = starts[:n], ends[:n]
    in_action = (e > action_start) | (s >= action_start)
    action[:n] = in_action
    thought[:n] = ~in_action
    return thought, action
