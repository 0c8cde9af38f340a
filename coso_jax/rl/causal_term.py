"""The soft-RL term of both backbones, with `algo` none | entropy | coso decided here and only here.

Each action text y gets per-token entropy weights w, and the backbone's actor loss subtracts
alpha * H_B(y), H_B(y) = sum_t m_t w_t H_t / sum_t m_t (`losses.weighted_entropy`; paper Sec. 4.2):

  none     w = 0: no bonus (H_B = 0, whatever alpha is)
  entropy  w = 1 on every generated token: the naive entropy bonus
  coso     w = CoSo's causal weights: each token's counterfactual effect on the action type the
           classifier predicts (`coso_jax.causal`), min-max normalised per row and square-rooted

For coso this object also owns the classifier (CoSo's stand-in for the causal model a = f(y)), its
Adam state and its replay of valid action texts. Every iteration the classifier takes
`causal.epochs` Adam steps, each on `causal.batch` actions drawn from the replay (the reference's
1024 actions x 2 epochs), then weighs the iteration's responses.

The classifier step is a module-level `jax.jit` whose static arguments are the classifier's
GraphDef and the learning rate, so every run of a process with the same classifier structure
reuses one compiled program.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coso_jax.causal import causal_weights, counterfactual_effects, precompile, skip_token_mask
from coso_jax.causal import classifier as clf
from coso_jax.rl.buffers import ActionReplay
from coso_jax.rl.config import ALGOS, CausalConfig
from coso_jax.rl.run import HeatmapRows


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("learning_rate",))
def classifier_step(graphdef: nnx.GraphDef, params: Any, opt_state: Any, tokens: jax.Array, mask: jax.Array,
                    labels: jax.Array, key: jax.Array, *, learning_rate: float):
    """One Adam step of the classifier's cross-entropy on a batch (dropout on).

    tokens/mask [B, L], labels [B] int32, key: dropout key. Returns (params, opt_state, loss,
    accuracy) with float32 scalars. Adam(learning_rate) as the reference (lr 1e-5 at paper size).
    """
    tx = optax.adam(learning_rate)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(tokens, mask, dropout_key=key)
        return clf.cross_entropy_loss(logits, labels), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    accuracy = jnp.mean((logits.argmax(-1) == labels).astype(jnp.float32))
    return optax.apply_updates(params, updates), opt_state, loss, accuracy


def pretrain_classifier(classifier: clf.CausalClassifier, tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray,
                        *, steps: int, minibatch: int, learning_rate: float, seed: int) -> tuple[float, float]:
    """`steps` Adam steps on minibatches drawn with replacement from the rows with a label >= 0.
    Updates `classifier` in place; returns the last (loss, accuracy) (nan for 0 steps)."""
    graphdef, params = nnx.split(classifier, nnx.Param)
    opt_state = optax.adam(learning_rate).init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    rows = np.flatnonzero(np.asarray(labels) >= 0)
    loss = acc = float("nan")
    for step in range(steps):
        idx = rng.choice(rows, size=min(minibatch, rows.size), replace=True)
        params, opt_state, loss, acc = classifier_step(graphdef, params, opt_state, tokens[idx], mask[idx],
                                                       labels[idx], jax.random.fold_in(key, step),
                                                       learning_rate=learning_rate)
    nnx.update(classifier, params)
    return float(loss), float(acc)


def weight_statistics(weights: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean weight and the fractions above 0.8 / below 0.2 over the selected tokens (the paper's
    Fig. 5 reports < 10% above 0.8 and > 80% below 0.2). Empty selection: {}."""
    selected = np.asarray(weights)[np.asarray(mask, bool)]
    if not selected.size:
        return {}
    return {"causal/weight_mean": float(selected.mean()),
            "causal/frac_above_0.8": float((selected > 0.8).mean()),
            "causal/frac_below_0.2": float((selected < 0.2).mean())}


class CausalTerm:
    """The entropy weights of one run's action texts for `algo`, and (coso) the classifier behind them.

    Args:
      algo: "none" | "entropy" | "coso".
      config: the run's CausalConfig.
      classifier: the start's pre-trained classifier (used for coso only).
      tokenizer: the policy's tokenizer (skip tokens, the mask token id, heatmap text).
      max_len: N, the response width.
      seed: seeds the replay's sampling.
      demonstrations: (tokens [n, N], mask [n, N], labels [n]) that seed the replay (labels -1: none).
    """

    def __init__(self, algo: str, config: CausalConfig, classifier: clf.CausalClassifier, tokenizer: Any,
                 max_len: int, *, seed: int, demonstrations: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
        self.algo = algo
        self.config = config
        self.tokenizer = tokenizer
        self.max_len = max_len
        # alpha * H_B is what the actor loss subtracts; none has no bonus at all.
        self.alpha = 0.0 if algo == "none" else float(config.alpha)
        self.classifier = classifier
        if algo != "coso":
            return
        self.graphdef, params = nnx.split(classifier, nnx.Param)
        # Committed to the first device, as restored arrays are, so a resumed run hits the jit cache.
        self.params = jax.device_put(params, jax.local_devices()[0])
        self.opt_state = jax.device_put(optax.adam(config.lr).init(params), jax.local_devices()[0])
        self.replay = ActionReplay(config.replay_capacity, max_len, seed=seed)
        tokens, mask, labels = demonstrations
        self.replay.add(tokens, mask, labels, labels >= 0)
        self.skip_vocab = skip_token_mask(tokenizer, vocab_size=classifier.config.vocab_size)
        self.mask_token_id = int(tokenizer.unk_token_id)
        # Every response-length bucket now, so no later iteration stops to compile one.
        precompile(self.logits_fn(), max_len, chunk_size=config.chunk_size)

    @property
    def uses_classifier(self) -> bool:
        return self.algo == "coso"

    def logits_fn(self) -> clf.ClassifierLogitsFn:
        return clf.ClassifierLogitsFn(self.graphdef, self.params)

    # ------------------------------------------------------------------------------------------
    def observe(self, response_ids: np.ndarray, response_mask: np.ndarray, labels: np.ndarray,
                valid: np.ndarray) -> None:
        """Adds the valid, labelled action texts of a batch to the classifier's replay (coso)."""
        if self.uses_classifier:
            self.replay.add(response_ids, response_mask, labels, np.asarray(valid) & (np.asarray(labels) >= 0))

    def update_classifier(self, key: jax.Array) -> dict[str, float]:
        """`epochs` Adam steps, each on `batch` actions from the replay (coso; {} otherwise).

        The reference accumulates gradients over minibatches of one sampled batch into one optimizer
        step; one step on the whole batch is the same update."""
        if not self.uses_classifier:
            return {}
        losses, accs = [], []
        for epoch in range(self.config.epochs):
            tokens, mask, labels = self.replay.sample(self.config.batch)
            self.params, self.opt_state, loss, acc = classifier_step(
                self.graphdef, self.params, self.opt_state, tokens, mask, labels, jax.random.fold_in(key, epoch),
                learning_rate=self.config.lr)
            losses.append(loss)
            accs.append(acc)
        if not losses:
            return {}
        losses, accs = jax.device_get((losses, accs))
        return {"causal/loss": float(np.mean(losses)), "causal/accuracy": float(np.mean(accs))}

    def weights(self, response_ids: np.ndarray, response_mask: np.ndarray, labels: np.ndarray,
                valid: np.ndarray) -> np.ndarray:
        """Entropy weights w `[n, N]` float32 of a batch of responses.

        response_ids/response_mask [n, N], labels [n] (-1: no action type), valid [n] (parsed).
        none: 0; entropy: 1 on generated tokens; coso: causal weights on the generated, non-skip
        tokens of valid labelled rows, 0 elsewhere (an unparseable row keeps its policy-gradient
        term but gets no bonus).
        """
        response_mask = np.asarray(response_mask, bool)
        if self.algo == "none":
            return np.zeros(response_mask.shape, np.float32)
        if self.algo == "entropy":
            return response_mask.astype(np.float32)
        ok = np.asarray(valid, bool) & (np.asarray(labels) >= 0)
        mask = response_mask & ok[:, None]
        effects = counterfactual_effects(
            self.logits_fn(), response_ids, mask, np.where(ok, labels, 0), window=self.config.window,
            mask_token_id=self.mask_token_id, skip_mask=self.skip_vocab, chunk_size=self.config.chunk_size,
            pad_invariant=True)
        skip = self.skip_vocab[np.clip(response_ids, 0, len(self.skip_vocab) - 1)]
        return np.asarray(causal_weights(effects, mask & ~skip), np.float32)

    def step(self, key: jax.Array, response_ids: np.ndarray, response_mask: np.ndarray, labels: np.ndarray,
             valid: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Online update of the classifier (coso), then the batch's weights and their statistics."""
        record = self.update_classifier(key)
        weights = self.weights(response_ids, response_mask, labels, valid)
        if self.uses_classifier:
            record.update(weight_statistics(weights, np.asarray(response_mask, bool) & np.asarray(valid, bool)[:, None]))
        return weights, record

    def heatmap(self, response_ids: np.ndarray, response_mask: np.ndarray, valid: np.ndarray, weights: np.ndarray,
                rows: int = 6) -> HeatmapRows | None:
        """The first `rows` valid responses' tokens and weights, for the CoSo heatmap (coso only)."""
        if not self.uses_classifier:
            return None
        tokens, values = [], []
        for r in np.flatnonzero(np.asarray(valid, bool))[:rows]:
            n = int(np.asarray(response_mask[r]).sum())
            tokens.append([self.tokenizer.decode([int(t)]) for t in response_ids[r, :n]])
            values.append(np.asarray(weights[r, :n]))
        return HeatmapRows(tokens, values)

    # ------------------------------------------------------------------------------------------
    def checkpoint_items(self) -> dict[str, Any]:
        if not self.uses_classifier:
            return {}
        # Host copies: the classifier is the same on every process, so a multi-process checkpoint stores
        # it once (a host array is written by process 0) instead of as a process-local device array.
        host = jax.tree.map(np.asarray, jax.device_get((self.params, self.opt_state)))
        return {"classifier": host[0], "classifier_opt": host[1], "action_replay": self.replay.arrays()}

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"action_replay": self.replay.meta()} if self.uses_classifier else {}

    def restore(self, items: dict[str, Any], metadata: dict[str, Any]) -> None:
        if not self.uses_classifier:
            return
        self.params = jax.device_put(items["classifier"], jax.local_devices()[0])
        self.opt_state = jax.device_put(items["classifier_opt"], jax.local_devices()[0])
        self.replay.load(items["action_replay"], metadata["action_replay"])

    def sync_classifier(self) -> clf.CausalClassifier:
        """The classifier module with the current weights (for evaluation or export)."""
        nnx.update(self.classifier, self.params)
        return self.classifier
