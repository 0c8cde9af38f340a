"""The cached warm start shared by every algo and seed of a (game, settings): its directory, its
fingerprint check, its tokenizer and weights, and the supervised training that builds it.

A start directory holds `summary.json` (written last: its presence means the start is complete;
it records the start fingerprint and the fields behind it), `tokenizer/` (our BPE; absent with
`hf_dir`), `weights/` (one orbax checkpoint of the policy, value head and classifier parameters) and
the demonstrations the backbone needs to rebuild prompts and the classifier's replay. Each
backbone's builder (`coso_jax.rl.ppo.start`, `coso_jax.rl.digirl.start`) decides what goes in;
this module does the bookkeeping.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flax import nnx

from coso_jax import checkpoint as ckpt
from coso_jax import metrics as metrics_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.causal_term import pretrain_classifier
from coso_jax.rl.config import ConfigError, field_differences
from coso_jax.tokenizer import build_bpe, load_tokenizer

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


class StartCache:
    """One start directory, checked against a config's start fingerprint.

    Args:
      directory: the start directory (need not exist).
      fingerprint: the config's start fingerprint. fields: the fields behind it (flat name -> value).
    """

    def __init__(self, directory: str | Path, fingerprint: str, fields: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.fields = fields

    @property
    def complete(self) -> bool:
        return (self.directory / SUMMARY).is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.directory / SUMMARY).read_text())

    def check(self) -> None:
        """ConfigError, naming the fields that differ, if a complete start here was built with other
        settings. Cheap: reads summary.json only."""
        if not self.complete:
            return
        summary = self.summary()
        built = summary.get("fingerprint")
        if built == self.fingerprint:
            return
        stored = summary.get("fields")
        diff = ("; ".join(field_differences(stored, self.fields)) if stored is not None
                else "its settings were not recorded")
        raise ConfigError(f"the start in {self.directory} was built with other settings ({diff}); use its "
                          "settings, choose another --sft_dir, or delete that directory to rebuild it")

    def tokenizer(self, hf_dir: str | None, corpus: Callable[[], list[str]], vocab_size: int) -> Any:
        """The policy's tokenizer: `hf_dir`'s, the cached BPE, or a new BPE on `corpus()` (saved here).

        Every prompt goes into the corpus, repeats included: BPE merges follow frequency, so the fixed
        prompt text compresses into few tokens (short prompts make the tiny CPU model fast)."""
        if hf_dir:
            return load_tokenizer(hf_dir)
        if self.complete:
            return load_tokenizer(self.directory / "tokenizer")
        return build_bpe(corpus(), vocab_size, save_dir=self.directory / "tokenizer")

    def _store(self) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(self.directory / "weights", save_interval_steps=1, max_to_keep=1)

    def load_weights(self, modules: dict[str, nnx.Module]) -> dict[str, Any]:
        """Fills each module's parameters from the cache; returns the summary."""
        store = self._store()
        try:
            restored, _ = store.restore(None, abstract_items={k: nnx.state(m, nnx.Param) for k, m in modules.items()})
        finally:
            store.close()
        for name, module in modules.items():
            nnx.update(module, restored[name])
        log.info("loaded the start from %s", self.directory)
        return self.summary()

    def save(self, modules: dict[str, nnx.Module], summary: dict[str, Any]) -> dict[str, Any]:
        """Writes the modules' parameters, then summary.json (with the fingerprint and its fields)."""
        summary = dict(summary, fingerprint=self.fingerprint, fields=self.fields)
        self.directory.mkdir(parents=True, exist_ok=True)
        store = self._store()
        try:
            store.save(0, {k: nnx.state(m, nnx.Param) for k, m in modules.items()}, {"fingerprint": self.fingerprint},
                       force=True)
            store.wait()
        finally:
            store.close()
        (self.directory / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def supervised_start(policy: nnx.Module, classifier: Any, data: dict[str, np.ndarray], answers: tuple, *,
                     epochs: int, lr: float, batch_size: int, pretrain_steps: int, classifier_lr: float,
                     classifier_minibatch: int, desc: str, progress: bool, seed: int,
                     score: Callable | None = None) -> dict[str, Any]:
    """SFT (or behaviour cloning) of `policy` on `data` with a progress bar, then `pretrain_steps` of
    the classifier on the answers' tokens; both in place. `answers` = (tokens [n, N], mask [n, N],
    labels [n]); `score` as `sft.sft_loss`'s. Returns the summary entries (losses, accuracy, seconds)."""
    steps = epochs * (len(data["response_ids"]) // batch_size)
    start = time.perf_counter()
    history: list[float] = []
    if epochs:  # no SFT: the policy starts as it is (e.g. an SFT'd checkpoint)
        bar = metrics_lib.progress_bar(steps, desc=desc, disable=not progress)
        try:
            history = sft_lib.train_sft(policy, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                        on_step=lambda step, loss: bar.update(1, {"loss": loss}), score=score)
        finally:
            bar.close()
    sft_seconds = time.perf_counter() - start
    tokens, mask, labels = answers
    loss, acc = pretrain_classifier(classifier, tokens, mask, labels, steps=pretrain_steps,
                                    minibatch=classifier_minibatch, learning_rate=classifier_lr, seed=seed)
    return {
        "sft_steps": len(history),
        "sft_first_loss": history[0] if history else None,
        "sft_final_loss": float(np.mean(history[-10:])) if history else None,
        "sft_seconds": sft_seconds,
        "classifier_pretrain_steps": pretrain_steps,
        "classifier_final_loss": loss,
        "classifier_final_accuracy": acc,
    }
