"""Offline tokenizer: build a byte-level BPE, save, reload, exact round trips, special tokens."""
from __future__ import annotations

import json

import pytest

from coso_jax.envs.gym_cards import demos
from coso_jax.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_bpe, load_tokenizer

GAMES = ["NumberLine", "EZPoints", "Points24", "Blackjack"]


@pytest.fixture(scope="module")
def records():
    return [r for g in GAMES for r in demos.generate(g, 25, seed=0, imperfect_frac=0.2)]


@pytest.fixture(scope="module")
def corpus(records):
    return [r["prompt"] for r in records] + [r["answer"] for r in records]


def test_build_save_reload_round_trip(corpus, records, tmp_path):
    tok = build_bpe(corpus, 600, save_dir=tmp_path / "tok")
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, IMAGE_TOKEN: 4}
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 3)
    assert len(tok) <= 600
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab()
    assert set(loaded.all_special_ids) == {0, 1, 2, 3, 4}
    for rec in records:
        for text in (rec["prompt"], rec["answer"]):
            enc = loaded.encode(text, add_special_tokens=False)
            assert enc == tok.encode(text, add_special_tokens=False)
            assert loaded.decode(enc) == text
    # BPE learned the frequent pieces: a NumberLine answer is short
    nl = next(r["answer"] for r in records if r["env"] == "NumberLine")
    assert len(loaded.encode(nl)) < 45


def test_round_trip_arbitrary_text_and_image_token(corpus):
    tok = build_bpe(corpus, 400)
    for text in ["", " ", "  two  spaces ", "ünïcødé 😀 \u0130 \x00 tab\tnew\nline", '{"action": "="}',
                 "x" * 5000]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.encode(f"USER: {IMAGE_TOKEN}\nhello", add_special_tokens=False)
    assert ids.count(4) == 1
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=True) == "hi"


def test_build_is_deterministic(corpus, tmp_path):
    a = build_bpe(corpus, 500, save_dir=tmp_path / "a")
    b = build_bpe(corpus, 500, save_dir=tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    ja = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    jb = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert ja["model"]["merges"] == jb["model"]["merges"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe(["abc"], 100)
    with pytest.raises(ValueError, match="corpus"):
        build_bpe([], 1000)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_load_foreign_hf_tokenizer_dir(tmp_path):
    """A tokenizer directory that is not ours (other special tokens, a tokenizer_config naming its
    class) loads through the same function, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "foreign"
    d.mkdir()
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "[UNK]"}))
    tok = load_tokenizer(d)
    assert tok.encode("hello world", add_special_tokens=False) == [1, 2]
    assert tok.eos_token_id == 0
