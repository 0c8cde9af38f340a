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

The online update is one jitted program (`classifier_update`): a scan over the epochs, each
epoch a scan over chunks of `_UPDATE_CHUNK` rows that accumulates the gradient of the batch's
mean cross-entropy, then one Adam step. It computes what `epochs` calls of `classifier_step`
compute (the same rows, dropout masks, learning rate and Adam state), only cheaper:
  * the rows of all epochs are drawn from the replay on the host first (the same draws, in the
    same order), sorted by length and cut into chunks; each chunk runs at the smallest of a few
    static lengths (`update_buckets`) that holds its longest row, not at the padded length. The
    classifier is pad-invariant (masked attention and mean pooling), so a row's loss and gradient
    do not depend on its padding; only the order of the float sums over rows changes;
  * dropout keeps each element of the padded batch's masks: jax's partitionable threefry draws
    element i of `bernoulli(key, p, shape)` from the counter i alone, so the masks are drawn for
    the kept (row, position) pairs only, by an unrolled threefry (XLA:CPU's lowering of
    `jax.random` runs the 20 rounds as a 5-step loop over memory, ~5x slower);
  * no host round trip between epochs, and one compiled program per (classifier structure,
    learning rate, batch, length): every iteration of a run reuses it.
Where the shortcut does not apply (another PRNG implementation, counters past 2^32, a classifier
that is not a `CausalClassifier`) the update runs today's `classifier_step` loop.

`classifier_step` and `classifier_update` are module-level `jax.jit`s whose static arguments are
the classifier's GraphDef and the learning rate (and the update's chunking), so every run of a
process with the same classifier structure reuses one compiled program.
"""
from __future__ import annotations

import functools
import math
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


# ----------------------------------------------------------------------------------------------
# The fused online update
# ----------------------------------------------------------------------------------------------
# Rows per forward/backward of the fused update. At tiny_cpu (1024 rows of ~34 tokens, 2 cores) 32
# rows ran fastest: 0.39 s for both epochs without dropout vs 0.42 s (64), 0.54 s (256), 0.70 s (1024):
# a chunk's activations stay in L2, and chunks bound the padding to the chunk's longest row.
_UPDATE_CHUNK = 32
# Static lengths a chunk can run at: each is one branch of the program (compile time grows with it).
_MAX_BRANCHES = 6


def update_buckets(max_len: int) -> tuple[int, ...]:
    """The static lengths of the fused update for rows padded to `max_len`: multiples of a step of at
    least 8 tokens, at most `_MAX_BRANCHES` of them, the last one `max_len` (48 -> 8, 16, ..., 48)."""
    max_len = int(max_len)
    per_branch = -(-max_len // _MAX_BRANCHES)
    step = max(8, -(-per_branch // 8) * 8)
    return tuple(sorted({min(k * step, max_len) for k in range(1, -(-max_len // step) + 1)}))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry_bits(key: jax.Array, counts: jax.Array) -> jax.Array:
    """uint32 bits `jax.random.bits(key, shape)` holds at the flat indices `counts` (uint32, any shape).

    jax's partitionable threefry (`jax_threefry_partitionable`, the default) draws element i of a
    shape from Threefry-2x32(key, (hi(i), lo(i))) as the xor of the two output words; `counts` < 2^32,
    so hi = 0. The 20 rounds are unrolled here, so XLA fuses them into one elementwise loop."""
    k1, k2 = jax.random.key_data(key)
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0 = jnp.zeros_like(counts) + ks[0]
    x1 = counts + ks[1]
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    for block in range(5):
        for r in rotations[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0 ^ x1


def dropout_keep(key: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """`jax.random.bernoulli(key, 1 - rate, shape)` at the flat indices `counts` (bool, counts' shape):
    the uniform in [0, 1) from the top 23 bits, compared with 1 - rate in float32, as jax does."""
    bits = threefry_bits(key, counts)
    floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    return (floats - jnp.float32(1.0)) < jnp.float32(1.0 - rate)


def _flat_counts(rows: jax.Array, full_shape: tuple[int, ...], sizes: tuple[int, ...]) -> jax.Array:
    """Flat indices into an array of `full_shape` = (B, d1, ..., dk) at rows `rows` [C] and the leading
    `sizes` = (n1, ..., nk) of the other dims: uint32 [C, n1, ..., nk]."""
    strides = [math.prod(full_shape[i + 1:]) for i in range(len(full_shape))]
    out = rows.astype(jnp.uint32).reshape((-1,) + (1,) * len(sizes)) * np.uint32(strides[0])
    for dim, n in enumerate(sizes):
        shape = [1] * (len(sizes) + 1)
        shape[dim + 1] = n
        out = out + (jnp.arange(n, dtype=jnp.uint32) * np.uint32(strides[dim + 1])).reshape(shape)
    return out


def padded_batch_keep(rows: jax.Array, batch: int, full_len: int) -> clf.KeepFn:
    """A `classifier.KeepFn` that draws, for rows `rows` [C] cut to L' positions, the dropout masks a
    padded batch [batch, full_len] draws with the same key (`dropout_keep` at the kept elements' flat
    indices): the mask of shape [C, ...] is the padded batch's at those rows and at the first L' of every
    sequence axis. Positions cut off are padding, which the classifier ignores."""
    def keep(key: jax.Array, shape: tuple[int, ...], sequence_axes: tuple[int, ...], rate: float) -> jax.Array:
        full = (batch,) + tuple(full_len if axis in sequence_axes else size
                                for axis, size in enumerate(shape) if axis > 0)
        return dropout_keep(key, _flat_counts(rows, full, shape[1:]), rate)
    return keep


def epoch_gradients(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, mask: jax.Array, labels: jax.Array,
                    rows: jax.Array, branches: jax.Array, key: jax.Array, *, batch: int, buckets: tuple[int, ...],
                    chunk: int) -> tuple[Any, jax.Array, jax.Array]:
    """The gradient, loss and accuracy `classifier_step` computes on a padded batch [batch, L] with
    dropout key `key`, from its rows in `plan_update`'s layout (traceable; no jit of its own).

    tokens/mask [S, L] (S = chunks x chunk slots), labels/rows [S] (rows: the slot's row of the
    padded batch, -1 for an empty slot), branches [S // chunk]: the index into `buckets` of each
    chunk's length. Returns (grads, mean loss, accuracy) with the means over the `batch` rows."""
    full_len = tokens.shape[-1]

    def chunk_fn(length, params, tok, msk, lab, row):
        used = row >= 0
        row = jnp.where(used, row, 0)

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(tok[:, :length], msk[:, :length], dropout_key=key,
                                            keep=padded_batch_keep(row, batch, full_len))
            ce = optax.softmax_cross_entropy_with_integer_labels(jnp.where(used[:, None], logits, 0.0),
                                                                 jnp.where(used, lab, 0))
            correct = (logits.argmax(-1) == lab).astype(jnp.float32)
            return jnp.where(used, ce, 0.0).sum() / batch, jnp.where(used, correct, 0.0).sum() / batch

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, loss, acc

    branch_fns = [functools.partial(chunk_fn, length) for length in buckets]

    def body(carry, xs):
        grads, loss, acc = carry
        chunk_grads, chunk_loss, chunk_acc = jax.lax.switch(xs[-1], branch_fns, params, *xs[:-1])
        return (jax.tree.map(jnp.add, grads, chunk_grads), loss + chunk_loss, acc + chunk_acc), None

    shaped = lambda x: x.reshape((-1, chunk) + x.shape[1:])
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0.0), jnp.float32(0.0))
    (grads, loss, acc), _ = jax.lax.scan(
        body, zeros, (shaped(tokens), shaped(mask), shaped(labels), shaped(rows), branches))
    return grads, loss, acc


# XLA:CPU with 512-bit vectors (AVX-512 rotates serve threefry's rounds): ~12% faster at tiny_cpu. The
# option is a CPU code-generation setting; other backends ignore it.
@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("learning_rate", "batch", "buckets", "chunk"),
                   compiler_options={"xla_cpu_prefer_vector_width": 512})
def classifier_update(graphdef: nnx.GraphDef, params: Any, opt_state: Any, tokens: jax.Array, mask: jax.Array,
                      labels: jax.Array, rows: jax.Array, branches: jax.Array, key: jax.Array, *,
                      learning_rate: float, batch: int, buckets: tuple[int, ...], chunk: int):
    """`E` Adam steps of the classifier in one program, as `E` calls of `classifier_step`: step e on
    padded batch e with dropout key `fold_in(key, e)`, the batches in `plan_update`'s layout
    ([E, S, L] / [E, S] / [E, S // chunk]). Returns (params, opt_state, losses [E], accuracies [E])."""
    tx = optax.adam(learning_rate)

    def epoch(carry, xs):
        params, opt_state = carry
        e, tok, msk, lab, row, branch = xs
        grads, loss, acc = epoch_gradients(graphdef, params, tok, msk, lab, row, branch, jax.random.fold_in(key, e),
                                           batch=batch, buckets=buckets, chunk=chunk)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, acc)

    (params, opt_state), (losses, accs) = jax.lax.scan(
        epoch, (params, opt_state), (jnp.arange(tokens.shape[0]), tokens, mask, labels, rows, branches))
    return params, opt_state, losses, accs


def plan_update(tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray, *, chunk: int,
                buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Host side of `classifier_update`: padded batches [E, B, L] -> each epoch's rows sorted by their
    extent (last valid position + 1; longest first) into S = ceil(B / chunk) * chunk slots, each chunk's
    length as an index into `buckets` (the smallest that holds the chunk's longest row).

    Returns tokens/mask [E, S, L], labels [E, S], rows [E, S] (the slot's row of the batch, -1: empty
    slot) and branches [E, S // chunk]."""
    tokens, mask, labels = np.asarray(tokens), np.asarray(mask, bool), np.asarray(labels)
    epochs, batch, length = mask.shape
    slots = -(-batch // chunk) * chunk
    extent = np.where(mask.any(-1), length - np.argmax(mask[..., ::-1], axis=-1), 0)
    rows = np.full((epochs, slots), -1, np.int32)
    rows[:, :batch] = np.argsort(-extent, axis=1, kind="stable")
    used = rows >= 0
    take = np.maximum(rows, 0)
    sorted_extent = np.where(used, np.take_along_axis(extent, take, axis=1), 0)
    need = np.maximum(sorted_extent[:, ::chunk], 1)  # a chunk's first slot holds its longest row
    return {
        "tokens": np.where(used[..., None], np.take_along_axis(tokens, take[..., None], axis=1), 0).astype(np.int32),
        "mask": np.take_along_axis(mask, take[..., None], axis=1) & used[..., None],
        "labels": np.where(used, np.take_along_axis(labels, take, axis=1), 0).astype(np.int32),
        "rows": rows,
        "branches": np.searchsorted(np.asarray(buckets), need).astype(np.int32),
    }


def fused_update_applies(classifier: clf.CausalClassifier, key: jax.Array, batch: int, max_len: int) -> bool:
    """Whether `classifier_update` reproduces `classifier_step`'s dropout for this classifier, key and
    batch: jax's partitionable threefry keys, flat indices of every mask below 2^32, and the
    project's `CausalClassifier` (whose dropout sites `padded_batch_keep` addresses)."""
    if type(classifier) is not clf.CausalClassifier or not jax.config.jax_threefry_partitionable:
        return False
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or str(jax.random.key_impl(key)) != "threefry2x32":
        return False
    cfg = classifier.config
    largest = max(cfg.num_heads * max_len * max_len, max_len * cfg.ffn_size, max_len * cfg.hidden_size)
    return batch * largest < 2 ** 32


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
        self.update_buckets = update_buckets(max_len)
        self.update_chunk = min(_UPDATE_CHUNK, -(-config.batch // 8) * 8)
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
        """`epochs` Adam steps, each on `batch` actions from the replay (coso; {} otherwise), as one
        program (`classifier_update`; module docstring) with one host sync at the end.

        The reference accumulates gradients over minibatches of one sampled batch into one optimizer
        step; one step on the whole batch is the same update."""
        if not self.uses_classifier or self.config.epochs == 0:
            return {}
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key
        # Every epoch's rows first: the same draws, in the same order, as one draw per epoch.
        samples = [self.replay.sample(self.config.batch) for _ in range(self.config.epochs)]
        if fused_update_applies(self.classifier, key, self.config.batch, self.max_len):
            plan = plan_update(*(np.stack(parts) for parts in zip(*samples)), chunk=self.update_chunk,
                               buckets=self.update_buckets)
            self.params, self.opt_state, losses, accs = classifier_update(
                self.graphdef, self.params, self.opt_state, plan["tokens"], plan["mask"], plan["labels"], plan["rows"],
                plan["branches"], key, learning_rate=self.config.lr, batch=self.config.batch,
                buckets=self.update_buckets, chunk=self.update_chunk)
        else:
            losses, accs = [], []
            for epoch, (tokens, mask, labels) in enumerate(samples):
                self.params, self.opt_state, loss, acc = classifier_step(
                    self.graphdef, self.params, self.opt_state, tokens, mask, labels, jax.random.fold_in(key, epoch),
                    learning_rate=self.config.lr)
                losses.append(loss)
                accs.append(acc)
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
