"""Which token ids are "skip" tokens: their counterfactual effect is defined as 0 (docs/design.md, step 3).

Skip tokens are the tokenizer's special tokens plus punctuation from the reference's list
``[] () { } {} : "" ' , ! ? ; _ .``. Byte-level BPE vocabularies hold many spellings of the same
punctuation ('Ġ,' for " ,", '",' for a quote plus comma, 'â€¦'-style byte pieces), so instead of
encoding each string once, as the reference does, we decode every vocabulary entry and test the
decoded text with its whitespace stripped.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SKIP_STRINGS", "SKIP_CHARS", "skip_token_mask", "is_skip_text"]

# The reference's list, verbatim.
SKIP_STRINGS: tuple[str, ...] = ("[]", "()", "{", "}", "{}", ":", '""', "'", ",", "!", "?", ";",
                                 "_", ".")
# Every character that appears in the list. A token made only of these (e.g. '",' or '}.') is
# pure punctuation from the list, just spelled as one BPE piece.
SKIP_CHARS: frozenset[str] = frozenset("".join(SKIP_STRINGS))


def is_skip_text(text: str) -> bool:
    """True when ``text`` minus whitespace is non-empty and made only of the list's characters."""
    stripped = "".join(text.split())
    return bool(stripped) and all(ch in SKIP_CHARS for ch in stripped)


def skip_token_mask(tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """bool [vocab] mask of skip token ids for a Hugging Face tokenizer (fast or slow).

    Args:
      tokenizer: anything with ``all_special_ids``, ``decode`` and ``__len__`` (a transformers
        tokenizer). Special tokens include added special tokens (``<pad>``, ``<unk>``, ...).
      vocab_size: length of the mask; defaults to ``len(tokenizer)``. Pass the model's embedding
        size when it is padded beyond the tokenizer (extra ids are not skip tokens).

    Returns:
      np.ndarray bool [vocab_size]; True = special token or punctuation from ``SKIP_STRINGS``.
    """
    num_tokens = len(tokenizer)
    size = num_tokens if vocab_size is None else int(vocab_size)
    if size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {size}")
    mask = np.zeros(size, bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size]
    mask[special] = True
    # Decoding one id at a time keeps each piece's own text (byte-level pieces included);
    # clean_up_tokenization_spaces off so decode does not rewrite " ," to ",".
    decoded = tokenizer.batch_decode([[i] for i in range(min(num_tokens, size))],
                                     skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    for token_id, text in enumerate(decoded):
        if is_skip_text(text):
            mask[token_id] = True
    return mask
