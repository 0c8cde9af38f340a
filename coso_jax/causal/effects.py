"""Counterfactual token effects and causal weights (docs/design.md, steps 3 and 4).

For a row y with label c and classifier f, p0 = softmax(f(y))[c]; the ablation at position i
replaces positions min(i + o, L - 1), o = 0..window-1, with ``mask_token_id`` and the effect is
e_i = |p0 - softmax(f(y^(i)))[c]|. Padding and skip positions get e_i = 0, whatever they hold:
a padded token id is never looked up in a per-vocabulary skip mask, a row with no scored position
never has its label read, and ``causal_weights`` selects (``jnp.where``) invalid effects away
before the min-max, so NaN/inf there carries no weight.

How the kernel avoids work whose result would be thrown away:
  * Only (row, position) pairs that are valid and not skip tokens are scored; each row's
    unablated baseline is scored once, as one more item of the same stream (next to the row's
    ablations). Identical rows of a batch are scored once.
  * With ``pad_invariant=True`` a row is scored at a bucketed length L' >= its last valid
    position + 1 instead of the batch's padded length L (length buckets step by at most 1/4).
  * Items of one bucket are packed into chunks of a static shape [chunk, L'] and each chunk is one
    jitted forward whose ablations are built on device. A bucket's partial last chunk moves on to
    the next longer bucket instead of being padded. Shapes depend only on (chunk, L'), never on
    the batch contents or size, so new batches reuse the compiled code; ``trace_count()`` exposes
    how often a chunk scorer was traced.
  * A chunk holds about 2048 tokens (``chunk_size=None``): on CPU, bigger chunks spill the FFN's
    [tokens, 512] activations out of the per-core L2 cache and ran ~1.6x slower at 8192 tokens.

Classifier fast path. When ``logits_fn`` is the project's ``ClassifierLogitsFn`` (a
``CausalClassifier``), the kernel uses the model's structure: an ablation changes only its
window's tokens, and the first layer's input (LayerNorm of token + position embedding) and its
Q/K/V projection are per-position functions of (token, position). So each chunk computes them
once for the (few) rows its items come from, plus once for the mask token at every position, and
every item's first-layer input and Q/K/V are a per-position select between the two; attention
mixes positions only after Q/K/V, so the result is the same function. A chunk then takes at most
``_fast_rows(chunk, L')`` distinct rows (items come in runs by row, ~L' per row, so a chunk of
~2048 tokens spans 2-3 rows at L' = 48); shapes still depend on (chunk, L') only. Any other
``logits_fn`` takes the generic path (opaque forward on the ablated token ids).

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

from coso_jax.causal.classifier import CausalClassifier, ClassifierLogitsFn

__all__ = ["counterfactual_effects", "causal_weights", "bucket_length", "bucket_lengths", "precompile",
           "trace_count"]

# Tokens per forward when chunk_size is None: on a 2-core CPU, chunks of 512-2048 tokens ran
# fastest for the reference classifier (their FFN activations, [tokens, 512] float32, stay near
# the L2 cache); 8192 tokens per chunk was ~1.6x slower.
_AUTO_TOKENS_PER_CHUNK = 2048
_MIN_AUTO_CHUNK = 8

# How often a chunk scorer was traced (= compiled), per shape. Instrumentation only: tests and
# benchmarks read it to show that new batches of a known shape do not recompile.
_TRACES: collections.Counter = collections.Counter()
_log = logging.getLogger(__name__)


def trace_count() -> int:
    """Total number of times the kernel's chunk scorers have been traced (compiled) so far."""
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


def _fast_rows(chunk: int, bucket: int) -> int:
    """Distinct rows one fast-path chunk may draw its items from (static).

    Enough for rows with >= L'/4 items each to fill a chunk (a row has up to L' + 1 items), and
    small enough that the per-row tables (embedding + first Q/K/V for rows x L' tokens) cost a
    few percent of the chunk's forward. Chunks close early when rows have fewer items (e.g.
    mostly skip tokens): slower, never wrong."""
    return int(min(chunk, max(2, -(-4 * chunk // int(bucket)) + 1)))


def _uses_fast_path(logits_fn: Callable) -> bool:
    """True for a ``ClassifierLogitsFn`` whose model is a ``CausalClassifier``."""
    if not isinstance(logits_fn, ClassifierLogitsFn):
        return False
    graphdef = logits_fn.graphdef
    known = _FAST_GRAPHS.get(graphdef)
    if known is None:
        known = _FAST_GRAPHS[graphdef] = isinstance(logits_fn.model(), CausalClassifier)
    return known


_FAST_GRAPHS: dict = {}


def precompile(logits_fn: Callable, full_length: int, *, chunk_size: int | None = None,
               pad_invariant: bool = True) -> int:
    """Compiles the chunk scorer for every shape batches padded to ``full_length`` can need.

    With ``pad_invariant`` rows are scored at any bucket length up to ``full_length``, and which
    buckets a batch touches depends on its row lengths, so a new batch can meet a bucket no earlier
    batch did and compile it then. Calling this once up front (e.g. when a trainer starts) moves
    all of those compiles to one place (shapes compiled before are a cache hit: one dummy forward
    each). Shapes do not depend on the batch size. Returns the number of shapes compiled now.
    """
    fn_arrays, fn_static = _split_callable(logits_fn)
    fast = _uses_fast_path(logits_fn)
    lengths = bucket_lengths(full_length) if pad_invariant else [int(full_length)]
    before = trace_count()
    for bucket in lengths:
        chunk = _chunk_for(bucket, chunk_size)
        items = np.zeros(chunk, np.int32)
        starts = np.full(chunk, -1, np.int32)
        if fast:
            rows = np.zeros((_fast_rows(chunk, bucket), bucket), np.int32)
            _score_chunk_fast(fn_arrays, rows, np.ones_like(rows), items, items, starts, np.int32(1),
                              np.int32(0), fn_static=fn_static)
        else:
            zeros = np.zeros((chunk, bucket), np.int32)
            _score_chunk(fn_arrays, zeros, np.ones_like(zeros), items, starts, np.int32(1), np.int32(0),
                         fn_static=fn_static)
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


def _label_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]


def _window_hits(starts: jax.Array, length: int, window: jax.Array) -> jax.Array:
    """[C, L'] bool: position p of item c is ablated (start < 0 means the unablated baseline)."""
    positions = jnp.arange(length)[None]
    starts = starts[:, None]
    return (starts >= 0) & (positions >= starts) & (positions < starts + window)


def _score_chunk_impl(fn_arrays, tokens, mask, labels, starts, window, mask_token_id, *, fn_static):
    """Generic path: probabilities of each item's label after its ablation. Shapes: tokens/mask
    [C, L'], labels/starts [C]; start < 0 means the unablated baseline. ``window`` and
    ``mask_token_id`` are traced scalars, so changing them does not recompile. float32 [C]."""
    _TRACES[tokens.shape] += 1
    _log.info("counterfactual_effects: compiling chunk scorer for shape %s", tokens.shape)
    logits_fn = _join_callable(fn_arrays, fn_static)
    hit = _window_hits(starts, tokens.shape[1], window)
    ablated = jnp.where(hit, mask_token_id.astype(tokens.dtype), tokens)
    return _label_probs(logits_fn(ablated, mask), labels)


_score_chunk = jax.jit(_score_chunk_impl, static_argnames=("fn_static",))


def _score_chunk_fast_impl(fn_arrays, row_tokens, row_mask, item_rows, labels, starts, window, mask_token_id,
                           *, fn_static):
    """Classifier fast path: like ``_score_chunk`` for items drawn from a few rows.

    row_tokens/row_mask [R, L'] (the chunk's distinct rows), item_rows [C] (index into them),
    labels/starts [C]. The first layer's input and Q/K/V are computed per row and for the mask
    token at each position, then selected per item and position (see the module docstring).
    Equal to ``model(ablated tokens, mask)`` item by item. float32 [C]."""
    _TRACES[("classifier", item_rows.shape[0]) + row_tokens.shape] += 1
    _log.info("counterfactual_effects: compiling classifier chunk scorer for %d items from %s rows",
              item_rows.shape[0], row_tokens.shape)
    model = _join_callable(fn_arrays, fn_static).model()
    first = model.layers[0]
    length = row_tokens.shape[1]
    row_valid = row_mask.astype(bool)
    row_x = model.embed(row_tokens, row_valid)                                # [R, L', H]
    row_qkv = first.project_qkv(row_x)                                        # [3, R, heads, L', hd]
    all_masked = jnp.full((1, length), mask_token_id, row_tokens.dtype)
    mask_x = model.embed(all_masked, jnp.ones((1, length), bool))            # [1, L', H]
    mask_qkv = first.project_qkv(mask_x)                                      # [3, 1, heads, L', hd]
    valid = row_valid[item_rows]                                              # [C, L']
    # Ablating a padded position changes nothing (padding embeds id 0 whatever it holds).
    hit = _window_hits(starts, length, window) & valid
    x = jnp.where(hit[..., None], mask_x, row_x[item_rows])
    qkv = jnp.where(hit[None, :, None, :, None], mask_qkv, row_qkv[:, item_rows])
    return _label_probs(model.encode(x, valid, first_qkv=qkv), labels)


_score_chunk_fast = jax.jit(_score_chunk_fast_impl, static_argnames=("fn_static",))


def _fixed_chunks(num_items: int, chunk: int) -> list[tuple[int, int]]:
    return [(begin, min(begin + chunk, num_items)) for begin in range(0, num_items, chunk)]


def _row_limited_chunks(rows: np.ndarray, chunk: int, max_rows: int) -> list[tuple[int, int]]:
    """Splits an item stream whose rows come in runs into [begin, end) ranges of at most ``chunk``
    items drawn from at most ``max_rows`` runs (distinct rows)."""
    if rows.size == 0:
        return []
    run_begins = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    run_ends = np.r_[run_begins[1:], rows.size]
    bounds, begin, runs = [], 0, 0
    for run_begin, run_end in zip(run_begins.tolist(), run_ends.tolist()):
        position = run_begin
        while position < run_end:
            if runs == max_rows or position - begin == chunk:
                bounds.append((begin, position))
                begin, runs = position, 0
            position = min(run_end, begin + chunk)
            runs += 1
    bounds.append((begin, rows.size))
    return bounds


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
        as traced inputs, so new weights do not recompile. A ``ClassifierLogitsFn`` of a
        ``CausalClassifier`` takes the fast path (same results; see the module docstring).
      tokens: int [B, L] token ids (L is the padded length).
      attention_mask: bool or 0/1 [B, L]; False/0 = padding (effect 0, never scored).
      labels: int [B], the action-type label c of each row (>= 0 wherever the row has a scored
        position; rows without one are never scored and may hold anything, e.g. -1).
      window: number of positions replaced per ablation (>= 1): min(i + o, L - 1), o < window.
      mask_token_id: the id written into the ablated positions (the tokenizer's unk/mask id).
      skip_mask: None, bool [vocab] indexed by token id (see ``skip_token_mask``), or bool [B, L];
        skip positions get effect 0 and are not scored (they still can be inside a window).
      chunk_size: ablated sequences per forward (bounds memory). None: about 2048 tokens per
        forward, i.e. max(8, 2048 // L') sequences at bucket length L'.
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
    # Identical rows (same tokens, mask, scored positions and label: e.g. an action text sampled
    # many times) are scored once and copied. Padding is part of a row unless pad_invariant.
    key = np.concatenate([np.where(valid, tokens, -1) if pad_invariant else tokens, valid, scored,
                          labels[:, None]], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    representative = first[inverse.reshape(-1)]
    rows_to_score = rows_to_score[representative[rows_to_score] == rows_to_score]

    if pad_invariant:
        # Last valid position + 1: everything past it is padding the classifier ignores.
        extent = length - np.argmax(valid[:, ::-1], axis=1)
    else:
        extent = np.full(batch, length)
    row_bucket = np.array([bucket_length(e, length) for e in extent])
    mask_i32 = valid.astype(np.int32)
    fn_arrays, fn_static = _split_callable(logits_fn)
    fast = _uses_fast_path(logits_fn)
    window_arr = np.int32(window)
    mask_token_arr = np.int32(mask_token_id)

    def dispatch(bucket, chunk, rows, starts):
        """One jitted forward over the items (rows, starts), padded to ``chunk`` items."""
        pad = chunk - rows.size
        if fast:
            unique, local = np.unique(rows, return_inverse=True)
            row_ids = np.concatenate([unique, np.full(_fast_rows(chunk, bucket) - unique.size, unique[0])])
            return _score_chunk_fast(
                fn_arrays, tokens[row_ids, :bucket], mask_i32[row_ids, :bucket],
                np.concatenate([local.astype(np.int32), np.zeros(pad, np.int32)]),
                np.concatenate([labels[rows], np.zeros(pad, np.int32)]),
                np.concatenate([starts, np.full(pad, -1, np.int32)]), window_arr, mask_token_arr,
                fn_static=fn_static)
        # Tail padding repeats the last item as a baseline; its results are discarded.
        rows = np.concatenate([rows, np.full(pad, rows[-1])])
        return _score_chunk(fn_arrays, tokens[rows, :bucket], mask_i32[rows, :bucket], labels[rows],
                            np.concatenate([starts, np.full(pad, -1, np.int32)]), window_arr, mask_token_arr,
                            fn_static=fn_static)

    pending = []  # (rows, starts, device probabilities) per dispatched chunk
    carry_rows = np.zeros(0, np.int64)
    carry_starts = np.zeros(0, np.int32)
    buckets = np.unique(row_bucket[rows_to_score])
    for bucket_index, bucket in enumerate(buckets):
        bucket_rows = rows_to_score[row_bucket[rows_to_score] == bucket]
        item_rows, item_starts = np.nonzero(scored[bucket_rows])
        # Items carried over from shorter buckets, then each row's baseline (start -1) followed
        # by its scored positions: items come in runs by row.
        rows = np.concatenate([bucket_rows, bucket_rows[item_rows]])
        starts = np.concatenate([np.full(bucket_rows.size, -1, np.int32), item_starts.astype(np.int32)])
        order = np.lexsort((starts, rows))
        rows = np.concatenate([carry_rows, rows[order]])
        starts = np.concatenate([carry_starts, starts[order]])
        chunk = _chunk_for(bucket, chunk_size)
        bounds = (_row_limited_chunks(rows, chunk, _fast_rows(chunk, bucket)) if fast
                  else _fixed_chunks(rows.size, chunk))
        if bucket_index + 1 < len(buckets) and bounds[-1][1] - bounds[-1][0] < chunk:
            # A partial last chunk is not padded: its items move on to the next (longer) bucket,
            # where they are exact as well (pad invariance), so only the longest bucket pads.
            begin = bounds.pop()[0]
            carry_rows, carry_starts = rows[begin:], starts[begin:]
        else:
            carry_rows, carry_starts = rows[:0], starts[:0]
        for begin, end in bounds:
            pending.append((rows[begin:end], starts[begin:end],
                            dispatch(int(bucket), chunk, rows[begin:end], starts[begin:end])))

    baseline = np.zeros(batch, np.float32)
    results = [(r, s, np.asarray(p)[:r.size]) for r, s, p in pending]
    for r, s, p in results:
        base = s < 0
        baseline[r[base]] = p[base]
    for r, s, p in results:
        ablation = s >= 0
        effects[r[ablation], s[ablation]] = np.abs(baseline[r[ablation]] - p[ablation])
    return jnp.asarray(effects[representative])


def causal_weights(effects: Any, valid_mask: Any) -> jax.Array:
    """Per-row min-max normalised, square-rooted weights (docs/design.md, step 4). float32 [B, L].

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
