"""Counterfactual token effects and causal weights (DESIGN.md steps 3 and 4).

For a row y with label c and classifier f, p0 = softmax(f(y))[c]; the ablation at position i
replaces positions min(i + o, L - 1), o = 0..window-1, with ``mask_token_id`` and the effect is
e_i = |p0 - softmax(f(y^(i)))[c]|. Padding and skip positions get e_i = 0, whatever they hold:
a padded token id is never looked up in a per-vocabulary skip mask, a row with no scored position
never has its label read, and ``causal_weights`` selects (``jnp.where``) invalid effects away
before the min-max, so NaN/inf there carries no weight.

How the kernel avoids work whose result would be thrown away:
  * Only (row, position) pairs that are valid and not skip tokens are scored; each row's
    unablated baseline is scored once, as one more item of the same stream.
  * With ``pad_invariant=True`` a row is scored at a bucketed length L' >= its last valid
    position + 1 instead of the batch's padded length L (length buckets step by at most 1/4).
  * Items of one bucket are packed into chunks of a static shape [chunk, L'] and each chunk is one
    jitted forward whose ablations are built on device with ``vmap``. A bucket's partial last
    chunk moves on to the next longer bucket instead of being padded. Shapes depend only on
    (chunk, L'), never on the batch contents, so new batches reuse the compiled code;
    ``trace_count()`` exposes how often the chunk scorer was traced.

Since the ablated range {min(i + o, L - 1)} is the contiguous range [i, min(i + window, L) - 1],
the clamp at L - 1 needs no special code; positions at or past L' are padding the classifier
ignores (pad invariance) and are simply not materialised.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["counterfactual_effects", "causal_weights", "bucket_length", "bucket_lengths", "precompile",
           "trace_count"]

# Tokens per forward when chunk_size is None: big enough for efficient matmuls on a CPU,
# small enough that a chunk's activations stay in the tens of MB for the reference classifier.
_AUTO_TOKENS_PER_CHUNK = 8192
_MIN_AUTO_CHUNK = 8

# How often the chunk scorer was traced (= compiled), per (chunk, length) shape. Instrumentation
# only: tests and benchmarks read it to show that new batches of a known shape do not recompile.
_TRACES: collections.Counter = collections.Counter()
_log = logging.getLogger(__name__)


def trace_count() -> int:
    """Total number of times the kernel's chunk scorer has been traced (compiled) so far."""
    return sum(_TRACES.values())


def bucket_length(length: int, full_length: int) -> int:
    """Smallest bucket >= ``length``, capped at ``full_length``.

    Buckets are multiples of max(8, 2^floor(log2(length)) / 4): 8, 16, ..., 64, 80, 96, 112, 128,
    160, ... so padding a row up to its bucket wastes at most ~25% and few shapes get compiled.
    """
    length = max(int(length), 1)
    step = max(8, (1 << (length.bit_length() - 1)) // 4)
    return min(-(-length // step) * step, int(full_length))


def bucket_lengths(full_length: int) -> list[int]:
    """Every bucket length a row of a batch padded to ``full_length`` can be scored at."""
    return sorted({bucket_length(n, full_length) for n in range(1, int(full_length) + 1)})


def _chunk_for(bucket: int, chunk_size: int | None) -> int:
    return chunk_size or max(_MIN_AUTO_CHUNK, _AUTO_TOKENS_PER_CHUNK // int(bucket))


def precompile(logits_fn: Callable, full_length: int, *, chunk_size: int | None = None,
               pad_invariant: bool = True) -> int:
    """Compiles the chunk scorer for every shape batches padded to ``full_length`` can need.

    With ``pad_invariant`` rows are scored at any bucket length up to ``full_length``, and which
    buckets a batch touches depends on its row lengths, so a new batch can meet a bucket no earlier
    batch did and compile it then. Calling this once up front (e.g. when a trainer starts) moves
    all of those compiles to one place (shapes compiled before are a cache hit: one dummy forward
    each). Returns the number of shapes compiled now.
    """
    fn_arrays, fn_static = _split_callable(logits_fn)
    lengths = bucket_lengths(full_length) if pad_invariant else [int(full_length)]
    before = trace_count()
    for bucket in lengths:
        chunk = _chunk_for(bucket, chunk_size)
        zeros = np.zeros((chunk, bucket), np.int32)
        _score_chunk(fn_arrays, zeros, np.ones_like(zeros), np.zeros(chunk, np.int32),
                     np.full(chunk, -1, np.int32), np.int32(1), np.int32(0), fn_static=fn_static)
    return trace_count() - before


def _split_callable(fn: Callable) -> tuple[list, tuple]:
    """Splits a (possibly pytree) callable into array leaves (traced) and the rest (static).

    A plain function is all static and compiles once per function object. A pytree callable such
    as ``classifier.logits_fn(model)`` keeps its weights as traced leaves, so new weights reuse
    the compiled chunk scorer.
    """
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, static)


def _join_callable(arrays: list, static: tuple) -> Callable:
    treedef, static_leaves = static
    it = iter(arrays)
    leaves = [next(it) if leaf is None else leaf for leaf in static_leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _score_chunk_impl(fn_arrays, tokens, mask, labels, starts, window, mask_token_id, *, fn_static):
    """Probabilities of each item's label after its ablation. Shapes: tokens/mask [C, L'],
    labels/starts [C]; start < 0 means the unablated baseline. ``window`` and ``mask_token_id``
    are traced scalars, so changing them does not recompile. Returns float32 [C]."""
    _TRACES[tokens.shape] += 1
    _log.info("counterfactual_effects: compiling chunk scorer for shape %s", tokens.shape)
    logits_fn = _join_callable(fn_arrays, fn_static)
    positions = jnp.arange(tokens.shape[1])

    def ablate(row_tokens, start):
        hit = (start >= 0) & (positions >= start) & (positions < start + window)
        return jnp.where(hit, mask_token_id.astype(row_tokens.dtype), row_tokens)

    ablated = jax.vmap(ablate)(tokens, starts)
    logits = logits_fn(ablated, mask).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]


_score_chunk = jax.jit(_score_chunk_impl, static_argnames=("fn_static",))


def _position_skip_mask(skip_mask, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-position skip mask [B, L] from a per-vocabulary [V] or per-position [B, L] mask.

    Only valid positions are looked up (and range-checked) in a per-vocabulary mask: padding may
    hold any id. Invalid positions come back False (they are never scored anyway)."""
    if skip_mask is None:
        return np.zeros(tokens.shape, bool)
    skip = np.asarray(skip_mask).astype(bool)
    if skip.ndim == 1:
        ids = tokens[valid]
        if ids.size and (ids.min() < 0 or ids.max() >= skip.shape[0]):
            raise ValueError(f"skip_mask is per-vocabulary with {skip.shape[0]} entries but tokens "
                             f"hold ids in [{ids.min()}, {ids.max()}] at valid positions")
        return valid & skip[np.where(valid, tokens, 0)]
    if skip.shape != tokens.shape:
        raise ValueError(f"skip_mask must be [vocab] or the tokens' shape {tokens.shape}, "
                         f"got {skip.shape}")
    return skip


def counterfactual_effects(
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    tokens: Any,
    attention_mask: Any,
    labels: Any,
    *,
    window: int = 4,
    mask_token_id: int,
    skip_mask: Any = None,
    chunk_size: int | None = None,
    pad_invariant: bool = False,
) -> jax.Array:
    """Raw counterfactual effects e[B, L] (float32) of every token on the classifier's label prob.

    Args:
      logits_fn: ``(tokens[N, L'] int32, attention_mask[N, L'] int32) -> logits[N, num_labels]``;
        jit-traceable. A pytree callable (e.g. ``classifier.logits_fn(model)``) passes its arrays
        as traced inputs, so new weights do not recompile.
      tokens: int [B, L] token ids (L is the padded length).
      attention_mask: bool or 0/1 [B, L]; False/0 = padding (effect 0, never scored).
      labels: int [B], the action-type label c of each row (>= 0 wherever the row has a scored
        position; rows without one are never scored and may hold anything, e.g. -1).
      window: number of positions replaced per ablation (>= 1): min(i + o, L - 1), o < window.
      mask_token_id: the id written into the ablated positions (the tokenizer's unk/mask id).
      skip_mask: None, bool [vocab] indexed by token id (see ``skip_token_mask``), or bool [B, L];
        skip positions get effect 0 and are not scored (they still can be inside a window).
      chunk_size: ablated sequences per forward (bounds memory). None: about 8192 tokens per
        forward, i.e. max(8, 8192 // L') sequences at bucket length L'.
      pad_invariant: the caller promises a row's logits do not depend on its padded positions
        (masked attention and pooling); rows are then scored at a bucketed length L' <= L.

    Returns:
      float32 [B, L]: e_i = |p0 - p(ablation at i)| at valid non-skip positions, 0 elsewhere.
      Equal to the plain per-position loop at full length L (same logits_fn).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    tokens = tokens.astype(np.int32)
    batch, length = tokens.shape
    valid = np.asarray(attention_mask)
    if valid.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {valid.shape} != tokens shape {tokens.shape}")
    valid = valid.astype(bool)
    labels = np.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"labels must be [B]=[{batch}], got shape {labels.shape}")
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")

    scored = valid & ~_position_skip_mask(skip_mask, tokens, valid)
    effects = np.zeros((batch, length), np.float32)
    rows_to_score = np.flatnonzero(scored.any(axis=1))
    if rows_to_score.size and labels[rows_to_score].min() < 0:
        raise ValueError("labels must be non-negative class ids (drop unparseable rows first)")
    # Rows that are never scored may hold any label; only scored rows' labels are ever read.
    labels = np.where(scored.any(axis=1), labels, 0).astype(np.int32)
    if rows_to_score.size == 0:
        return jnp.asarray(effects)

    if pad_invariant:
        # Last valid position + 1: everything past it is padding the classifier ignores.
        extent = length - np.argmax(valid[:, ::-1], axis=1)
    else:
        extent = np.full(batch, length)
    row_bucket = np.array([bucket_length(e, length) for e in extent])
    mask_i32 = valid.astype(np.int32)
    fn_arrays, fn_static = _split_callable(logits_fn)
    window_arr = np.int32(window)
    mask_token_arr = np.int32(mask_token_id)

    pending = []  # (rows, starts, device probabilities, number kept) per dispatched chunk
    carry_rows = np.zeros(0, np.int64)
    carry_starts = np.zeros(0, np.int32)
    buckets = np.unique(row_bucket[rows_to_score])
    for bucket_index, bucket in enumerate(buckets):
        bucket_rows = rows_to_score[row_bucket[rows_to_score] == bucket]
        item_rows, item_starts = np.nonzero(scored[bucket_rows])
        # Items carried over from shorter buckets, then this bucket's baselines (start -1),
        # then every scored position of its rows.
        rows = np.concatenate([carry_rows, bucket_rows, bucket_rows[item_rows]])
        starts = np.concatenate([carry_starts, np.full(bucket_rows.size, -1, np.int32),
                                 item_starts.astype(np.int32)])
        chunk = _chunk_for(bucket, chunk_size)
        num_items = rows.size
        if bucket_index + 1 < len(buckets):
            # A partial last chunk is not padded: its items move on to the next (longer) bucket,
            # where they are exact as well (pad invariance), so only the longest bucket pads.
            num_full = num_items // chunk * chunk
            carry_rows, carry_starts = rows[num_full:], starts[num_full:]
            rows, starts, num_items = rows[:num_full], starts[:num_full], num_full
            padded = num_full
        else:
            padded = -(-num_items // chunk) * chunk
            # Tail padding repeats the last item; its results are discarded.
            rows = np.concatenate([rows, np.full(padded - num_items, rows[-1])])
            starts = np.concatenate([starts, np.full(padded - num_items, -1, np.int32)])
        for begin in range(0, padded, chunk):
            chunk_rows = rows[begin:begin + chunk]
            probs = _score_chunk(fn_arrays, tokens[chunk_rows, :bucket],
                                 mask_i32[chunk_rows, :bucket], labels[chunk_rows],
                                 starts[begin:begin + chunk], window_arr, mask_token_arr,
                                 fn_static=fn_static)
            keep = min(chunk, num_items - begin)
            pending.append((chunk_rows[:keep], starts[begin:begin + keep], probs, keep))

    baseline = np.zeros(batch, np.float32)
    results = [(r, s, np.asarray(p)[:keep]) for r, s, p, keep in pending]
    for r, s, p in results:
        base = s < 0
        baseline[r[base]] = p[base]
    for r, s, p in results:
        ablation = s >= 0
        effects[r[ablation], s[ablation]] = np.abs(baseline[r[ablation]] - p[ablation])
    return jnp.asarray(effects)


def causal_weights(effects: Any, valid_mask: Any) -> jax.Array:
    """Per-row min-max normalised, square-rooted weights (DESIGN.md step 4). float32 [B, L].

    Effects at invalid positions are first selected away (``jnp.where``; NaN/inf there carries no
    weight) and set to 0 (as the kernel returns them); then, like the
    reference, w = sqrt((e - min e) / (max e - min e + 1e-10)) with min and max over the whole row
    (so min is 0 whenever the row has a padding/skip position), and w = 0 where ``valid_mask`` is
    False. Every row with a non-zero effect reaches 1; an all-zero row gives zeros (no NaN).
    jit/vmap safe; the result carries no gradient (stop_gradient).
    """
    effects = jnp.asarray(effects, jnp.float32)
    valid_mask = jnp.asarray(valid_mask)
    if effects.ndim != 2 or valid_mask.shape != effects.shape:
        raise ValueError(f"causal_weights expects effects [B, L] and valid_mask of the same shape, "
                         f"got {effects.shape} and {valid_mask.shape}")
    valid_mask = valid_mask.astype(bool)
    effects = jnp.where(valid_mask, jax.lax.stop_gradient(effects), 0.0)
    low = effects.min(axis=1, keepdims=True)
    high = effects.max(axis=1, keepdims=True)
    # max(.., 0) guards sqrt against a -0.0/rounding below zero.
    weights = jnp.sqrt(jnp.maximum((effects - low) / (high - low + 1e-10), 0.0))
    return jnp.where(valid_mask, weights, 0.0)
