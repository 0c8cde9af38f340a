"""The soft-RL term (coso_jax/rl/causal_term.py): each algo's entropy weights against a plain
computation, the classifier's online step, its replay and checkpoint state, and one compile for every
classifier of the same structure."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from coso_jax.causal import classifier as clf
from coso_jax.causal import skip_token_mask
from coso_jax.envs.gym_cards import demos as gym_cards_demos
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.causal_term import CausalTerm, classifier_step, weight_statistics
from coso_jax.rl.config import CausalConfig
from coso_jax.tokenizer import build_bpe

N = 56


@pytest.fixture(scope="module")
def answers():
    records = list(gym_cards_demos.generate("NumberLine", 8, 0, 0.0))
    tokenizer = build_bpe([r["prompt"] for r in records] + [r["answer"] for r in records], 400)
    texts = [r["answer"] for r in records][:12]
    tokens, mask = sft_lib.encode_answers(tokenizer, texts, N)
    labels = np.array([0 if '"-"' in t else 1 for t in texts], np.int32)
    return tokenizer, tokens, mask, labels


def _term(algo, tokenizer, answers_, seed=0, **causal):
    _, tokens, mask, labels = answers_
    classifier = clf.CausalClassifier(clf.ClassifierConfig.tiny(len(tokenizer), 2, max_positions=64),
                                      rngs=nnx.Rngs(seed))
    config = CausalConfig(**{"alpha": 0.2, "batch": 16, "epochs": 2, "lr": 1e-3, **causal})
    return CausalTerm(algo, config, classifier, tokenizer, N, seed=0, demonstrations=(tokens, mask, labels))


def _loop_weights(term, tokens, mask, labels, valid):
    """CoSo's weights literally (paper Sec. 4.1; docs/design.md steps 3-4): per valid row, p0 = P(label), each
    non-skip position's window of `window` tokens replaced by the mask token, |p0 - p|, then
    sqrt((e - min) / (max - min + 1e-10)) over the row's scored positions."""
    logits = jax.jit(term.logits_fn())
    skip = skip_token_mask(term.tokenizer, vocab_size=term.classifier.config.vocab_size)
    out = np.zeros(tokens.shape, np.float32)
    for b in range(len(tokens)):
        if not valid[b] or labels[b] < 0:
            continue
        row, row_mask = tokens[b:b + 1], mask[b:b + 1]
        p0 = float(jax.nn.softmax(logits(row, row_mask)[0])[labels[b]])
        scored = mask[b] & ~skip[tokens[b]]
        effects = np.zeros(tokens.shape[1])
        for i in np.flatnonzero(scored):
            ablated = row.copy()
            for o in range(term.config.window):
                ablated[0, min(i + o, tokens.shape[1] - 1)] = term.mask_token_id
            effects[i] = abs(p0 - float(jax.nn.softmax(logits(ablated, row_mask)[0])[labels[b]]))
        e = np.where(scored, effects, 0.0)
        out[b] = np.where(scored, np.sqrt((e - e.min()) / (e.max() - e.min() + 1e-10)), 0.0)
    return out


def test_weights_of_each_algo(answers):
    tokenizer, tokens, mask, labels = answers
    valid = np.ones(len(tokens), bool)
    valid[2] = False  # an unparseable answer: no bonus, whatever the algo
    labels = labels.copy()
    labels[5] = -1  # a valid text without an action type
    none = _term("none", tokenizer, answers)
    np.testing.assert_array_equal(none.weights(tokens, mask, labels, valid), 0.0)
    assert none.alpha == 0.0 and none.checkpoint_items() == {} and none.update_classifier(jax.random.key(0)) == {}
    entropy = _term("entropy", tokenizer, answers)
    np.testing.assert_array_equal(entropy.weights(tokens, mask, labels, valid), mask.astype(np.float32))
    assert entropy.alpha == 0.2
    coso = _term("coso", tokenizer, answers)
    got = coso.weights(tokens, mask, labels, valid)
    np.testing.assert_allclose(got, _loop_weights(coso, tokens, mask, labels, valid), atol=2e-5)
    assert not got[2].any() and not got[5].any()
    assert got[0].max() == pytest.approx(1.0, abs=1e-5)  # min-max normalised per row
    with pytest.raises(ValueError, match="algo must be one of"):
        _term("sac", tokenizer, answers)


def test_classifier_update_replay_and_checkpoint_state(answers):
    tokenizer, tokens, mask, labels = answers
    coso = _term("coso", tokenizer, answers)
    assert coso.replay.size == len(tokens)  # seeded with the demonstrations
    coso.observe(tokens[:4], mask[:4], np.array([0, -1, 1, 1]), np.array([True, True, False, True]))
    assert coso.replay.size == len(tokens) + 2  # only valid, labelled rows
    before = [np.asarray(x) for x in jax.tree.leaves(coso.params)]
    record = coso.update_classifier(jax.random.key(0))
    assert set(record) == {"causal/loss", "causal/accuracy"} and np.isfinite(record["causal/loss"])
    assert any(np.abs(a - np.asarray(b)).max() > 0 for a, b in zip(before, jax.tree.leaves(coso.params)))
    items, meta = coso.checkpoint_items(), coso.checkpoint_metadata()
    other = _term("coso", tokenizer, answers, seed=5)
    other.restore(jax.tree.map(np.asarray, items), meta)
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(coso.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(other.replay.sample(5), coso.replay.sample(5)):
        np.testing.assert_array_equal(a, b)
    weights, record = coso.step(jax.random.key(1), tokens, mask, labels, np.ones(len(tokens), bool))
    assert {"causal/weight_mean", "causal/frac_above_0.8", "causal/frac_below_0.2"} <= set(record)
    rows = coso.heatmap(tokens, mask, np.ones(len(tokens), bool), weights, rows=3)
    assert len(rows.tokens) == 3 and len(rows.tokens[0]) == int(mask[0].sum()) == len(rows.weights[0])


def test_weight_statistics():
    w = np.array([[0.9, 0.1, 0.5, 0.0], [1.0, 0.05, 0.0, 0.0]])
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    stats = weight_statistics(w, m)
    assert stats["causal/weight_mean"] == pytest.approx(np.mean([0.9, 0.1, 0.5, 1.0, 0.05]))
    assert stats["causal/frac_above_0.8"] == pytest.approx(2 / 5) and stats["causal/frac_below_0.2"] == pytest.approx(2 / 5)
    assert weight_statistics(w, np.zeros_like(m)) == {}


def test_one_classifier_step_program_serves_every_classifier(answers):
    tokenizer, tokens, mask, labels = answers
    first = _term("coso", tokenizer, answers, seed=1)
    first.update_classifier(jax.random.key(0))
    size = classifier_step._cache_size()
    for seed in (2, 3):  # new classifiers, same structure: no new program
        _term("coso", tokenizer, answers, seed=seed).update_classifier(jax.random.key(seed))
    assert classifier_step._cache_size() == size
