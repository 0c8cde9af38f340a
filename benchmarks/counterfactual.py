"""Benchmark: the counterfactual-effect kernel against a naive vmap and the PyTorch reference loop.

On the same inputs and the same classifier weights (reference size: hidden 128, 4 heads, 3 layers,
FFN 512) it times
  (a) ``coso_jax.causal.counterfactual_effects`` (+ ``causal_weights``), pad_invariant=True;
  (b) a naive JAX vmap: every position of every row ablated at the full padded length L and
      scored 64 positions at a time, then zeroing and normalisation;
  (c) the reference algorithm in PyTorch: the classifier ported to a torch module holding the
      same weights, positions processed 64 at a time (all B rows each), windowed replacement
      with the unk id (clamped at L - 1), then zeroing of padding/skip positions and the per-row
      min-max + sqrt normalisation;
for B in {32, 128} x L in {64, 256}, row lengths uniform in [L/4, L], 10% skip tokens, fp32.
It checks that (a) and (c) agree to 1e-4 (raw effects, and normalised effects before the square
root, which magnifies float32 noise near 0; the weights' own error is reported), prints times
and the ratios against the torch baseline measured in the same run (compile time separately from
steady state; wall and process CPU time, since this 2-core machine is shared and its load drifts)
and writes one JSON, ``benchmarks/results/counterfactual_<platform>.json``, with the device,
shapes, dtype and load averages.

(a) runs with XLA's default flags (XLA_FLAGS is recorded): on this jaxlib (0.10.2) none of the CPU
flags tried made the kernel faster (``--xla_cpu_prefer_vector_width=512``, ``--xla_cpu_use_xnnpack``,
``--xla_cpu_use_onednn``, ``--xla_cpu_experimental_{xnn,ynn,onednn}_fusion_type`` with eltwise /
reduce fusions, ``--xla_cpu_enable_fast_math``, ``--xla_cpu_use_thunk_runtime=false``): dots and
the attention core already run as YNNPACK fusions by default.

Run: ``python -m benchmarks.counterfactual`` (add ``--quick`` for one small shape).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks._common import Timing, block, write_results
from coso_jax.causal import causal_weights, counterfactual_effects, precompile, trace_count
from coso_jax.causal.classifier import CausalClassifier, ClassifierConfig, logits_fn

VOCAB = 4096
NUM_LABELS = 8
PAD_ID, UNK_ID = 0, 3
WINDOW = 4
POSITIONS_PER_STEP = 64  # the reference's processing_batch_size
SKIP_FRACTION = 0.1
# The reference runs all B rows x 64 positions in one forward: 8192 sequences x L tokens at
# B=128. At L=256 that is 2M tokens (>10 GB of activations), more than this shared 23 GB box can
# hold, so (b) and (c) split the rows into groups of at most this many tokens per forward (all
# rows in one group at B=128, L=64, exactly as the reference). Per-sequence work is unchanged.
TOKENS_PER_FORWARD = 128 * POSITIONS_PER_STEP * 64
# At L = 256 the full (b) and (c) take many minutes on 2 cores; they are timed on this many rows.
SAMPLED_ROWS = 16


def rows_per_group(batch: int, length: int) -> int:
    return max(1, min(batch, TOKENS_PER_FORWARD // (POSITIONS_PER_STEP * length)))


# ----------------------------------------------------------------------------------------------
# (c) The reference, in PyTorch.
class TorchClassifier(torch.nn.Module):
    """Our classifier's forward in torch, laid out as the reference's MiniBert (post-LN
    nn.TransformerEncoderLayer, sequence-first), with masked mean pooling as ours."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.token_embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embed = torch.nn.Embedding(config.max_positions, config.hidden_size)
        self.embed_norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = torch.nn.ModuleList([
            torch.nn.TransformerEncoderLayer(
                d_model=config.hidden_size, nhead=config.num_heads,
                dim_feedforward=config.ffn_size, dropout=config.dropout_rate,
                activation="gelu", layer_norm_eps=config.layer_norm_eps)
            for _ in range(config.num_layers)])
        self.head = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask):
        length = input_ids.shape[1]
        x = self.token_embed(input_ids) + self.position_embed(
            torch.arange(length, device=input_ids.device))[None]
        x = self.embed_norm(x).transpose(0, 1)
        padding = attention_mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        x = x.transpose(0, 1)
        weights = attention_mask.to(x.dtype)[..., None]
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def port_to_torch(model: CausalClassifier) -> TorchClassifier:
    """Copies the NNX classifier's weights into ``TorchClassifier`` (Linear kernels transposed)."""
    cfg = model.config
    torch_model = TorchClassifier(cfg)

    def t(array):
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def copy_linear(dst, src):
        dst.weight.data = t(src.kernel[...]).T.contiguous()
        dst.bias.data = t(src.bias[...])

    def copy_norm(dst, src):
        dst.weight.data = t(src.scale[...])
        dst.bias.data = t(src.bias[...])

    torch_model.token_embed.weight.data = t(model.token_embed.embedding[...])
    torch_model.position_embed.weight.data = t(model.position_embed.embedding[...])
    copy_norm(torch_model.embed_norm, model.embed_norm)
    for dst, src in zip(torch_model.layers, model.layers):
        # Our fused qkv kernel's columns are [q | k | v], heads contiguous: torch's in_proj layout.
        dst.self_attn.in_proj_weight.data = t(src.qkv.kernel[...]).T.contiguous()
        dst.self_attn.in_proj_bias.data = t(src.qkv.bias[...])
        copy_linear(dst.self_attn.out_proj, src.attn_out)
        copy_norm(dst.norm1, src.attn_norm)
        copy_linear(dst.linear1, src.ffn_in)
        copy_linear(dst.linear2, src.ffn_out)
        copy_norm(dst.norm2, src.ffn_norm)
    copy_linear(torch_model.head, model.head)
    return torch_model.eval()


@torch.no_grad()
def reference_effects(torch_model, tokens, mask, labels, skip_positions, window=WINDOW):
    """The reference's get_token_effect loop (raw effects, then weights), in torch."""
    batch, length = tokens.shape
    group = rows_per_group(batch, length)
    if group < batch:
        parts = [reference_raw_effects(torch_model, tokens[i:i + group], mask[i:i + group],
                                       labels[i:i + group], window)
                 for i in range(0, batch, group)]
        effects = torch.cat(parts)
    else:
        effects = reference_raw_effects(torch_model, tokens, mask, labels, window)
    effects[skip_positions | (mask == 0)] = 0.0
    low = effects.min(1, keepdim=True).values
    high = effects.max(1, keepdim=True).values
    weights = ((effects - low) / (high - low + 1e-10)).pow(0.5)
    return effects, weights


@torch.no_grad()
def reference_raw_effects(torch_model, tokens, mask, labels, window):
    """Unzeroed |p0 - p| at every position, 64 positions (x all given rows) per forward."""
    batch, length = tokens.shape
    true_prob = torch.softmax(torch_model(tokens, mask), -1).gather(1, labels[:, None])[:, 0]
    effects = torch.zeros(batch, length)
    for start in range(0, length, POSITIONS_PER_STEP):
        end = min(start + POSITIONS_PER_STEP, length)
        positions = torch.arange(start, end)
        count = end - start
        expanded = tokens[:, None].expand(-1, count, -1).reshape(-1, length).clone()
        expanded_mask = mask[:, None].expand(-1, count, -1).reshape(-1, length)
        rows = torch.arange(batch * count)
        for offset in range(window):
            target = (positions + offset).clamp(0, length - 1)
            expanded[rows, target[None].expand(batch, -1).reshape(-1)] = UNK_ID
        probs = torch.softmax(torch_model(expanded, expanded_mask), -1)
        ablated = probs.gather(1, labels.repeat_interleave(count)[:, None])[:, 0]
        effects[:, start:end] = (true_prob[:, None] - ablated.view(batch, count)).abs()
    return effects


# ----------------------------------------------------------------------------------------------
# (b) Naive vmap over every position at the full padded length.
@functools.partial(jax.jit, static_argnames=("window",))
def _naive_step(fn, tokens, mask, labels, positions, window):
    length = tokens.shape[1]
    index = jnp.arange(length)

    def ablate(row, position):
        hit = (index >= position) & (index <= jnp.minimum(position + window - 1, length - 1))
        return jnp.where(hit, UNK_ID, row)

    def per_row(row, row_mask, label):
        ablated = jax.vmap(ablate, in_axes=(None, 0))(row, positions)
        masks = jnp.broadcast_to(row_mask, ablated.shape)
        probs = jax.nn.softmax(fn(ablated, masks), -1)
        return probs[:, label]

    return jax.vmap(per_row)(tokens, mask, labels)


def naive_effects(fn, tokens, mask, labels, scored, window=WINDOW):
    batch, length = tokens.shape
    base = jax.nn.softmax(fn(tokens, mask), -1)[jnp.arange(batch), labels]
    group = rows_per_group(batch, length)
    rows = []
    for r in range(0, batch, group):
        chunks = []
        for start in range(0, length, POSITIONS_PER_STEP):
            positions = jnp.arange(start, min(start + POSITIONS_PER_STEP, length))
            chunks.append(_naive_step(fn, tokens[r:r + group], mask[r:r + group],
                                      labels[r:r + group], positions, window))
        rows.append(jnp.concatenate(chunks, 1))
    effects = jnp.where(scored, jnp.abs(base[:, None] - jnp.concatenate(rows, 0)), 0.0)
    return effects, causal_weights(effects, scored)


# ----------------------------------------------------------------------------------------------
def make_inputs(batch, length, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 4, length + 1, batch)
    mask = np.arange(length)[None] < lengths[:, None]
    tokens = rng.integers(5, VOCAB, (batch, length)).astype(np.int32)
    # 10% of tokens are skip tokens: ids 5..(5 + 10% of the vocabulary) are "punctuation".
    is_skip = rng.random((batch, length)) < SKIP_FRACTION
    num_skip_ids = VOCAB // 10
    tokens[is_skip] = rng.integers(5, 5 + num_skip_ids, int(is_skip.sum()))
    tokens[~is_skip] = rng.integers(5 + num_skip_ids, VOCAB, int((~is_skip).sum()))
    tokens[~mask] = PAD_ID
    skip_vocab = np.zeros(VOCAB, bool)
    skip_vocab[:5 + num_skip_ids] = True  # specials 0..4 and the punctuation ids
    labels = rng.integers(0, NUM_LABELS, batch).astype(np.int32)
    return tokens, mask, labels, skip_vocab


def run_shape(model, fn, torch_model, batch, length, repeats, naive_repeats, torch_repeats):
    tokens, mask, labels, skip_vocab = make_inputs(batch, length, seed=batch * 1000 + length)
    skip_positions = skip_vocab[tokens]
    scored = mask & ~skip_positions
    # All bucket shapes of this padded length, compiled up front (as the trainer does): the first
    # timed call and every new batch then run without compiling.
    start = time.perf_counter()
    precompiled = precompile(fn, length)
    precompile_s = time.perf_counter() - start
    traces_before = trace_count()
    last = {}  # each timed callable keeps its latest result for the agreement check

    def ours():
        effects = counterfactual_effects(fn, tokens, mask, labels, window=WINDOW,
                                         mask_token_id=UNK_ID, skip_mask=skip_vocab,
                                         pad_invariant=True)
        last["a"] = block((effects, causal_weights(effects, scored)))

    # (b) and (c) cost the same for every row (they ablate every position at the full length L),
    # so at L > 64 they run on the first `measured` rows only and their time is scaled by
    # B / measured; (a) always runs the whole batch, and (a) == (c) is checked on those rows.
    measured = batch if length <= 64 else min(batch, SAMPLED_ROWS)
    scale = batch / measured
    sub = slice(0, measured)
    tokens_j, mask_j = jnp.asarray(tokens[sub]), jnp.asarray(mask[sub], jnp.int32)
    labels_j, scored_j = jnp.asarray(labels[sub]), jnp.asarray(scored[sub])

    def naive():
        last["b"] = block(naive_effects(fn, tokens_j, mask_j, labels_j, scored_j))

    tokens_t = torch.from_numpy(tokens[sub].astype(np.int64))
    mask_t = torch.from_numpy(mask[sub].astype(np.int64))
    labels_t = torch.from_numpy(labels[sub].astype(np.int64))
    skip_t = torch.from_numpy(skip_positions[sub])

    def reference():
        last["c"] = reference_effects(torch_model, tokens_t, mask_t, labels_t, skip_t)

    # Interleaved rounds (a, b, c, a, b, c, ...): this shared 2-core machine's load drifts over
    # minutes, and interleaving exposes all three to the same drift. The first call of each is
    # its compile (+ warm-up) call.
    timings = {name: Timing(0.0, []) for name in ("a", "b", "c")}
    cpu_times = {name: [] for name in ("a", "b", "c")}  # process CPU seconds (all threads), steady
    calls = {"a": ours, "b": naive, "c": reference}
    counts = {"a": repeats, "b": naive_repeats, "c": torch_repeats}
    load_start = os.getloadavg()
    for round_index in range(1 + max(counts.values())):
        for name, call in calls.items():
            if round_index > counts[name]:
                continue
            start, cpu_start = time.perf_counter(), time.process_time()
            call()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index == 0:
                timings[name].first_call_s = elapsed
                if name == "a":
                    traces_first = trace_count() - traces_before
            else:
                timings[name].steady_s.append(elapsed)
                cpu_times[name].append(cpu)
    load_end = os.getloadavg()
    t_ours, t_naive, t_ref = timings["a"], timings["b"], timings["c"]
    cpu_ours, cpu_ref = statistics.median(cpu_times["a"]), statistics.median(cpu_times["c"]) * scale
    # A fresh batch of the same shape must not recompile the kernel.
    tokens2, mask2, labels2, _ = make_inputs(batch, length, seed=batch * 1000 + length + 1)
    before = trace_count()
    block(counterfactual_effects(fn, tokens2, mask2, labels2, window=WINDOW, mask_token_id=UNK_ID,
                                 skip_mask=skip_vocab, pad_invariant=True))
    retraces_new_batch = trace_count() - before

    eff_a, w_a = (np.asarray(x)[sub] for x in last["a"])
    eff_b, w_b = (np.asarray(x) for x in last["b"])
    eff_c, w_c = (x.numpy() for x in last["c"])
    # Compared: raw effects and the normalised effects before the square root. The sqrt itself
    # magnifies float32 noise near 0 (d sqrt(x)/dx -> inf), so weights are reported, not asserted.
    err_ac = float(max(np.abs(eff_a - eff_c).max(),
                       np.abs(w_a ** 2 - w_c ** 2).max()))
    err_bc = float(max(np.abs(eff_b - eff_c).max(),
                       np.abs(w_b ** 2 - w_c ** 2).max()))
    weights_err_ac = float(np.abs(w_a - w_c).max())
    assert err_ac < 1e-4, f"kernel and torch reference disagree at B={batch} L={length}: {err_ac}"
    assert err_bc < 1e-4, f"naive vmap and torch reference disagree at B={batch} L={length}: {err_bc}"
    row = {
        "batch": batch, "length": length,
        "scored_positions": int(scored.sum()), "all_positions": batch * length,
        "rows_timed_for_naive_and_torch": measured, "naive_and_torch_time_scale": scale,
        "ours": t_ours.as_dict(), "naive_vmap": t_naive.as_dict(), "torch_reference": t_ref.as_dict(),
        "naive_vmap_median_s_full_batch": t_naive.median_s * scale,
        "torch_reference_median_s_full_batch": t_ref.median_s * scale,
        "speedup_ours_vs_torch": t_ref.median_s * scale / t_ours.median_s,
        "ours_cpu_s_median": cpu_ours, "torch_reference_cpu_s_median_full_batch": cpu_ref,
        "cpu_time_ratio_torch_over_ours": cpu_ref / cpu_ours,
        "load_average_1min_start_end": [round(load_start[0], 2), round(load_end[0], 2)],
        "speedup_naive_vs_torch": t_ref.median_s / t_naive.median_s,
        "ratio_time_ours_over_torch": t_ours.median_s / (t_ref.median_s * scale),
        "ratio_time_naive_over_torch": t_naive.median_s / t_ref.median_s,
        "max_abs_err_ours_vs_torch": err_ac, "max_abs_err_naive_vs_torch": err_bc,
        "max_abs_err_weights_ours_vs_torch": weights_err_ac,
        "kernel_precompile_s": precompile_s, "kernel_precompiled_shapes": precompiled,
        "kernel_compiles_first_call": traces_first,
        "kernel_compiles_new_batch_same_shape": retraces_new_batch,
    }
    print(f"B={batch:4d} L={length:4d} | ours {t_ours.median_s:7.3f}s (precompile {precompile_s:5.1f}s,"
          f" {precompiled} shapes; then {traces_first} + {retraces_new_batch} compiles)"
          f" | naive {t_naive.median_s * scale:7.3f}s (compile {t_naive.compile_s:5.1f}s)"
          f" | torch {t_ref.median_s * scale:7.3f}s{'' if scale == 1 else f' (x{scale:g} of {measured} rows)'}"
          f" | torch/ours {row['speedup_ours_vs_torch']:.2f}x wall, {row['cpu_time_ratio_torch_over_ours']:.2f}x CPU"
          f" | torch/naive {row['speedup_naive_vs_torch']:.2f}x | err {err_ac:.1e}"
          f" | load {load_start[0]:.1f}->{load_end[0]:.1f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, no JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--shapes", default="32x64,128x64,32x256,128x256",
                        help="comma-separated BxL shapes to time (a subset is written to "
                             "counterfactual_<platform>_subset.json)")
    args = parser.parse_args()
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes must look like 128x64,32x256; got {args.shapes!r}")
    full_set = args.shapes == parser.get_default("shapes")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = ClassifierConfig(vocab_size=VOCAB, num_labels=NUM_LABELS)
    model = CausalClassifier(config, rngs=nnx.Rngs(0))
    fn = logits_fn(model)
    torch_model = port_to_torch(model)
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if args.quick:
        shapes = [(32, 64)]
    rows = []
    load_before = os.getloadavg()
    for batch, length in shapes:
        long, big = on_cpu and length > 64, on_cpu and batch > 32
        # The headline shape (B=128, L=64) gets more torch rounds: its ratio is the bar.
        rows.append(run_shape(model, fn, torch_model, batch, length, repeats=2 if long else 4,
                              naive_repeats=1 if long or big else 2, torch_repeats=1 if long else (3 if big else 2)))
    if args.quick:
        return
    name = "counterfactual_cpu" if on_cpu else f"counterfactual_{device.platform}"
    if not full_set:
        name += "_subset"
    write_results(name, {
        "description": "counterfactual effects + weights: (a) coso_jax kernel (pad_invariant), "
                       "(b) naive vmap over all positions at full length, (c) reference loop in "
                       "PyTorch (64 positions per step); same inputs, same weights, fp32",
        "dtype": "float32",
        "shapes_BxL": [[b, length] for b, length in shapes],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "kernel_path": "classifier fast path (per-row first-layer tables), ~2048 tokens per chunk",
        "classifier": {"hidden": config.hidden_size, "heads": config.num_heads,
                       "layers": config.num_layers, "ffn": config.ffn_size, "vocab": VOCAB,
                       "num_labels": NUM_LABELS},
        "window": WINDOW, "skip_fraction": SKIP_FRACTION, "row_lengths": "uniform [L/4, L]",
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        # Other jobs share this machine's cores; ratios measured at a high load are pessimistic
        # for (a), whose many short XLA ops suffer more from oversubscribed cores than torch.
        "load_average_1_5_15min_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15min_after": [round(x, 2) for x in os.getloadavg()],
        "bar": "ours >= 5x faster than torch at B=128, L=64 (issue #19)",
        "results": rows,
    })


if __name__ == "__main__":
    main()
