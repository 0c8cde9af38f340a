"""Tokenizers: a small byte-level BPE trained offline, or any local Hugging Face tokenizer.

`build_bpe` trains a byte-level BPE (the `tokenizers` library) on a corpus such as the envs'
prompts and demonstrations, in seconds and deterministically, and wraps it as a transformers
`PreTrainedTokenizerFast` with the special tokens `<pad>` (id 0), `<s>` (BOS), `</s>` (EOS),
`<unk>` and the image placeholder `<image>`. Byte-level BPE covers every string, so
`decode(encode(text)) == text` exactly (no normaliser, no prefix space, no clean-up of spaces).
Encoding adds no special tokens: callers add BOS/EOS where they want them.

`load_tokenizer(path)` loads ours or a real Hugging Face tokenizer directory, offline.
"""
from __future__ import annotations

import os
from typing import Iterable

__all__ = ["IMAGE_TOKEN", "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "UNK_TOKEN", "SPECIAL_TOKENS",
           "build_bpe", "load_tokenizer"]

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def build_bpe(corpus: Iterable[str], vocab_size: int, *, save_dir: str | os.PathLike | None = None,
              min_frequency: int = 2):
    """Trains a byte-level BPE on `corpus` and returns it as a `PreTrainedTokenizerFast`.

    Args:
      corpus: texts to learn merges from (e.g. prompts and demonstration answers).
      vocab_size: size of the final vocabulary, special tokens and the 256 byte symbols included
        (so at least 261); fewer merges are learned when the corpus runs out of pairs.
      save_dir: when given, the tokenizer is saved there (`save_pretrained`) for `load_tokenizer`.
      min_frequency: a pair must occur this often to be merged.

    Deterministic: the same corpus (in the same order) and arguments give the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_size = len(SPECIAL_TOKENS) + 256
    if int(vocab_size) < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (5 special tokens + 256 bytes), got {vocab_size}")
    texts = [t for t in corpus]
    if not texts:
        raise ValueError("build_bpe needs a non-empty corpus")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"build_bpe corpus must hold strings, found {bad[0]}")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:
            raise RuntimeError(f"special token {special!r} got id {tok.token_to_id(special)}, expected {i}")
    hf = _wrap(tok)
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        hf.save_pretrained(os.fspath(save_dir))
    return hf


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from a local directory (ours from `build_bpe`, or a Hugging Face one).

    Offline: never contacts the Hub. Raises FileNotFoundError when `path` is not a directory with
    tokenizer files.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    files = set(os.listdir(path))
    if not files & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer.model, ...) in {path}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tok
