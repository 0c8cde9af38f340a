r"""CoSo's causal part end to end on synthetic NumberLine-style action texts (CPU, about a minute).

1. Generate JSON answers such as
   {"current": 3, "target": 7, "thoughts": "3 is below 7, so move right.", "action": "+"}
   whose action-type label is the parsed action ("+" or "-"). Half of the thoughts do not give
   the direction away and 15% of the actions contradict the thoughts, so the action token
   itself must matter.
2. Train a small byte-level BPE tokenizer (``tokenizers``) on them.
3. Train the action-type classifier (cross-entropy, Adam).
4. On held-out texts compute counterfactual effects (window 4, unk replacement, skip mask of
   special tokens + punctuation) and causal weights.
5. Write ``<out_dir>/heatmap.png`` and ``<out_dir>/weights.json``; print the accuracy and paths.
   A weight at position i is the effect of ablating positions i .. i + window - 1, so the top
   weight sits up to window - 1 tokens before the deciding token (the printout names the window).

Run: ``python -m experiments.causal_demo [--out_dir=runs/demo] [--steps=300]``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

FLAGS = flags.DEFINE_string("out_dir", "runs/demo", "where heatmap.png and weights.json go")
_STEPS = flags.DEFINE_integer("steps", 150, "classifier training steps")
_BATCH = flags.DEFINE_integer("batch_size", 32, "classifier batch size")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate (online CoSo uses 1e-5)")
_SIZE = flags.DEFINE_enum("classifier", "small", ["small", "reference"],
                          "small: hidden 64, 2 layers (fast on CPU); reference: 128/4/3/512")
_NUM_SHOWN = flags.DEFINE_integer("num_shown", 8, "held-out texts drawn in the heatmap")
_WINDOW = flags.DEFINE_integer("window", 4, "ablation window (docs/design.md default 4)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")

ACTIONS = ("+", "-")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MAX_LENGTH = 64
DIRECTIONAL = ("{a} is below {b}, so I should move right.",
               "{a} is above {b}, so I should move left.")
NEUTRAL = ("I compare the current number {a} with the target {b} and pick a step.",
           "The target is {b}. Current position {a}. Choose the next move.",
           "Let me think about numbers {a} and {b} carefully.")


def make_texts(num: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Synthetic action texts and their labels (0 = '+', 1 = '-', the parsed action).

    In 15% of the texts the action contradicts the thoughts (the agent slips), so only the
    action token decides the label for sure, and the classifier does not saturate at p = 1
    (where every ablation would change p by less than float32 resolution).
    """
    texts, labels = [], []
    for _ in range(num):
        current, target = rng.choice(10, size=2, replace=False)
        reasoned = int(current > target)
        label = 1 - reasoned if rng.random() < 0.15 else reasoned
        if rng.random() < 0.5:
            thought = DIRECTIONAL[reasoned].format(a=current, b=target)
        else:
            thought = NEUTRAL[rng.integers(len(NEUTRAL))].format(a=current, b=target)
        texts.append(json.dumps({"current": int(current), "target": int(target),
                                 "thoughts": thought, "action": ACTIONS[label]}))
        labels.append(label)
    return texts, np.asarray(labels, np.int32)


def build_tokenizer(corpus: list[str]):
    """A small byte-level BPE trained on the demo corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # Padded to the longest text (<= MAX_LENGTH): one static shape per split, no wasted length.
    batch = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LENGTH,
                      return_tensors="np")
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)


def main(argv):
    del argv
    from coso_jax.causal import causal_weights, counterfactual_effects, skip_token_mask
    from coso_jax.causal.classifier import (
        CausalClassifier,
        ClassifierConfig,
        logits_fn,
        make_optimizer,
        make_train_step,
        predict_proba,
    )
    from coso_jax.causal.render import render_token_heatmap

    start = time.perf_counter()
    rng = np.random.default_rng(_SEED.value)
    train_texts, train_labels = make_texts(4096, rng)
    test_texts, test_labels = make_texts(256, rng)
    tokenizer = build_tokenizer(train_texts)
    train_tokens, train_mask = encode(tokenizer, train_texts)
    test_tokens, test_mask = encode(tokenizer, test_texts)
    print(f"tokenizer: {len(tokenizer)} tokens; texts padded to {train_tokens.shape[1]}; "
          f"example: {test_texts[0]}")

    if _SIZE.value == "reference":
        config = ClassifierConfig(vocab_size=len(tokenizer), num_labels=len(ACTIONS),
                                  max_positions=MAX_LENGTH)
    else:
        config = ClassifierConfig(vocab_size=len(tokenizer), num_labels=len(ACTIONS),
                                  hidden_size=64, num_heads=4, num_layers=2, ffn_size=256,
                                  max_positions=MAX_LENGTH)
    model = CausalClassifier(config, rngs=nnx.Rngs(_SEED.value))
    optimizer = make_optimizer(model, learning_rate=_LR.value)
    train_step = make_train_step()
    key = jax.random.key(_SEED.value)
    for step in range(1, _STEPS.value + 1):
        idx = rng.integers(0, len(train_texts), _BATCH.value)
        key, dropout_key = jax.random.split(key)
        loss, accuracy = train_step(model, optimizer, train_tokens[idx], train_mask[idx],
                                    train_labels[idx], dropout_key)
        if step % 50 == 0 or step == _STEPS.value:
            print(f"step {step:4d}  loss {float(loss):.4f}  batch accuracy {float(accuracy):.3f}")
    probs = np.asarray(predict_proba(model, test_tokens, test_mask))
    test_accuracy = float((probs.argmax(-1) == test_labels).mean())
    print(f"held-out accuracy: {test_accuracy:.3f} on {len(test_texts)} texts")

    skip = skip_token_mask(tokenizer, vocab_size=config.vocab_size)
    shown = slice(0, max(_NUM_SHOWN.value, 1))
    tokens, mask, labels = test_tokens[shown], test_mask[shown], test_labels[shown]
    window = _WINDOW.value
    effects = counterfactual_effects(logits_fn(model), tokens, mask, labels, window=window,
                                     mask_token_id=tokenizer.unk_token_id, skip_mask=skip,
                                     pad_invariant=True)
    valid = mask & ~skip[tokens]
    weights = np.asarray(causal_weights(effects, valid))

    out_dir = Path(FLAGS.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, pieces = [], []
    for row in range(len(tokens)):
        length = int(mask[row].sum())
        row_pieces = [tokenizer.decode([int(t)], clean_up_tokenization_spaces=False)
                      for t in tokens[row, :length]]
        pieces.append(row_pieces)
        top = int(np.argmax(weights[row, :length]))
        # e_i is the effect of ablating the window i .. i + window - 1, so report the window.
        top_window = "".join(row_pieces[top:top + window])
        records.append({"text": test_texts[row], "label": ACTIONS[labels[row]],
                        "p_label": float(probs[row, labels[row]]),
                        "tokens": row_pieces,
                        "effects": [round(float(e), 6) for e in np.asarray(effects)[row, :length]],
                        "weights": [round(float(w), 4) for w in weights[row, :length]],
                        "top_position": top, "top_window": top_window})
        print(f"  label {ACTIONS[labels[row]]}: highest weight at {row_pieces[top]!r}, "
              f"its window {top_window!r}")
    heatmap = render_token_heatmap(pieces, weights, out_dir / "heatmap.png",
                                   title=f"CoSo causal weights (held-out accuracy "
                                         f"{test_accuracy:.2f})")
    weights_path = out_dir / "weights.json"
    weights_path.write_text(json.dumps({"accuracy": test_accuracy, "window": window,
                                        "classifier": _SIZE.value, "rows": records}, indent=1))
    print(f"wrote {heatmap} and {weights_path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    app.run(main)
