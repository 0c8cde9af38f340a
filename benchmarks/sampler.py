"""Sampler and scorer speed: coso_jax vs transformers (PyTorch) on the same tiny Llama weights.

    python -m benchmarks.sampler [--size small|tiny] [--repeats 5]

One random `LlamaForCausalLM` is saved with `save_pretrained` and loaded by our importer, so both
frameworks run identical weights. Measured, each in the same process (this machine is shared/noisy):
  * generation, batch 16, left-padded prompts of length 64, 64 new tokens, greedy and sampled
    (temperature 0.7, top-p 0.9), EOS disabled so both produce exactly 64 tokens per row:
    `coso_jax.sampling.sample` vs `model.generate` (torch CPU, 2 threads). The greedy time is also split
    into the prompt's forward (prefill: a 1-token generation) and the per-token decode step
    ((time of 64 tokens - time of 1) / 63), for both frameworks. The baseline passes
    `disable_compile=True`: transformers 5.x's generate otherwise takes an automatic torch.compile
    path that on this CPU re-compiles across calls (5-30 s per call instead of ~0.4 s), which made
    earlier results (8x) measure transformers' compiler, not its decoding;
  * the scorer's forward + backward (teacher-forced log-probs and entropies of the 64 response
    tokens, gradient w.r.t. all parameters) vs the same loss in torch.
Compile time (first call minus a steady call) is reported apart from steady-state time; steady
repeats of the two frameworks are interleaved so that load from other processes hits both alike;
each ratio is against the baseline measured in the same run. Load averages (before / after) are
recorded: on a loaded 2-core machine torch's OpenMP threads stall on descheduled peers, so ratios
measured under load overstate ours. Writes benchmarks/results/sampler_<platform>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._common import Timing, block, device_description, write_results
from coso_jax import sampling
from coso_jax.models import from_pretrained

SIZES = {
    # Our CPU demo scale: the default tiny LM of the demo is of this order.
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
BATCH, PROMPT, NEW = 16, 64, 64
TEMPERATURE, TOP_P = 0.7, 0.9
PAD = 0


def time_pair(ours, theirs, repeats: int) -> tuple[Timing, Timing]:
    """Times two callables with their repeats interleaved (ours, theirs, ours, ...), so that load from
    other processes on this shared machine hits both alike. First calls (compile) are kept apart."""
    firsts, steady = [], ([], [])
    for fn in (ours, theirs):
        start = time.perf_counter()
        fn()
        firsts.append(time.perf_counter() - start)
    for _ in range(repeats):
        for fn, out in zip((ours, theirs), steady):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return Timing(firsts[0], steady[0]), Timing(firsts[1], steady[1])


def make_models(size: str, path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=512, rms_norm_eps=1e-6,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=PAD, attn_implementation="eager")
    torch_model = transformers.LlamaForCausalLM(cfg).eval()
    torch_model.save_pretrained(path)
    return torch_model, from_pretrained(path, dtype=jnp.float32)


def make_prompts(vocab: int):
    rs = np.random.RandomState(0)
    lengths = rs.randint(PROMPT // 2, PROMPT + 1, BATCH)
    mask = (np.arange(PROMPT)[None] >= (PROMPT - lengths)[:, None]).astype(np.int64)  # left padding
    ids = rs.randint(3, vocab, (BATCH, PROMPT)) * mask
    return ids, mask


def bench_generation(torch_model, model, ids, mask, repeats: int) -> dict:
    import torch

    def pair(greedy: bool, new: int):
        key = [jax.random.key(0)]

        def ours():
            key[0], sub = jax.random.split(key[0])
            out = sampling.sample(model, None, ids, mask, sub, max_new_tokens=new, temperature=TEMPERATURE,
                                  top_p=1.0 if greedy else TOP_P, eos_id=-1, pad_id=PAD, greedy=greedy)
            block(out)
            assert int(out.lengths.min()) == new
            return out

        gen_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=TEMPERATURE,
                                                               top_p=TOP_P, top_k=0)
        gen_kwargs["disable_compile"] = True  # eager decoding (module docstring)
        t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

        def theirs():
            with torch.no_grad():
                out = torch_model.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=new,
                                           min_new_tokens=new, pad_token_id=PAD, **gen_kwargs)
            assert out.shape[1] == PROMPT + new
            return out

        return time_pair(ours, theirs, repeats)

    results = {}
    tokens = BATCH * NEW
    for mode in ("greedy", "sampled"):
        ours_t, theirs_t = pair(mode == "greedy", NEW)
        results[mode] = {
            "coso_jax": {**ours_t.as_dict(), "tokens_per_s": tokens / ours_t.median_s},
            "transformers": {**theirs_t.as_dict(), "tokens_per_s": tokens / theirs_t.median_s},
            "speedup": theirs_t.median_s / ours_t.median_s,
        }
        print(f"{mode:8s} coso_jax {tokens / ours_t.median_s:9.0f} tok/s (compile {ours_t.compile_s:.2f}s) | "
              f"transformers {tokens / theirs_t.median_s:9.0f} tok/s | speedup {results[mode]['speedup']:.2f}x")
    # Where the greedy time goes: one new token is the prompt's forward (prefill) plus one selection; the
    # other NEW - 1 tokens are decode steps, (time(NEW) - time(1)) / (NEW - 1) each.
    ours_1, theirs_1 = pair(True, 1)
    split = {}
    for name, first, full in (("coso_jax", ours_1, results["greedy"]["coso_jax"]),
                              ("transformers", theirs_1, results["greedy"]["transformers"])):
        split[name] = {"prefill_s": first.median_s,
                       "decode_step_s": (full["median_s"] - first.median_s) / (NEW - 1)}
    split["prefill_speedup"] = split["transformers"]["prefill_s"] / split["coso_jax"]["prefill_s"]
    split["decode_step_speedup"] = split["transformers"]["decode_step_s"] / split["coso_jax"]["decode_step_s"]
    results["greedy_split"] = split
    print(f"greedy split: prefill {split['coso_jax']['prefill_s'] * 1e3:.1f} vs "
          f"{split['transformers']['prefill_s'] * 1e3:.1f} ms ({split['prefill_speedup']:.2f}x), decode step "
          f"{split['coso_jax']['decode_step_s'] * 1e3:.2f} vs {split['transformers']['decode_step_s'] * 1e3:.2f} ms "
          f"({split['decode_step_speedup']:.2f}x)")
    return results


def bench_scorer(torch_model, model, ids, mask, repeats: int) -> dict:
    import torch

    rs = np.random.RandomState(1)
    vocab = torch_model.config.vocab_size
    resp = rs.randint(3, vocab, (BATCH, NEW))
    resp_mask = np.arange(NEW)[None] < rs.randint(NEW // 2, NEW + 1, BATCH)[:, None]
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, ids, mask, resp, resp_mask):
        m = nnx.merge(graphdef, params)
        out = sampling.score_fn(m, None, ids, mask, resp, resp_mask, temperature=TEMPERATURE)
        return -jnp.sum(out.logprobs) - 0.01 * jnp.sum(out.entropies)

    grad_fn = jax.jit(jax.value_and_grad(loss))
    args = tuple(jnp.asarray(x) for x in (ids, mask, resp, resp_mask))

    full_ids = torch.tensor(np.concatenate([ids, resp * resp_mask], 1))
    full_mask = torch.tensor(np.concatenate([mask, resp_mask.astype(np.int64)], 1))
    t_resp, t_resp_mask = torch.tensor(resp), torch.tensor(resp_mask)
    torch_model.train(False)

    def theirs():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(input_ids=full_ids, attention_mask=full_mask).logits[:, PROMPT - 1:-1] / TEMPERATURE
        logp_all = torch.log_softmax(logits.float(), -1)
        logp = logp_all.gather(-1, t_resp[..., None])[..., 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        loss = -(logp * t_resp_mask).sum() - 0.01 * (ent * t_resp_mask).sum()
        loss.backward()
        return loss

    ours_t, theirs_t = time_pair(lambda: block(grad_fn(params, *args)), theirs, repeats)
    speedup = theirs_t.median_s / ours_t.median_s
    print(f"scorer fwd+bwd coso_jax {ours_t.median_s * 1e3:.1f} ms (compile {ours_t.compile_s:.2f}s) | "
          f"torch {theirs_t.median_s * 1e3:.1f} ms | speedup {speedup:.2f}x")
    return {"coso_jax": ours_t.as_dict(), "transformers": theirs_t.as_dict(), "speedup": speedup}


def bench_scorer_vocab_pass(model, ids, mask, vocab: int, repeats: int) -> dict:
    """The scorer's fused log-softmax / entropy over the vocabulary (`sampling._token_logprobs_and_entropies`,
    one custom-VJP pass) vs the plain autodiff of `_logprobs_and_entropies` + a gather (the scorer before
    it), same loss and weights, interleaved."""
    rs = np.random.RandomState(1)
    resp = rs.randint(3, vocab, (BATCH, NEW))
    resp_mask = np.arange(NEW)[None] < rs.randint(NEW // 2, NEW + 1, BATCH)[:, None]
    graphdef, params = nnx.split(model, nnx.Param)
    fused = sampling._token_logprobs_and_entropies

    def plain(scaled, tokens):
        logp, entropies = sampling._logprobs_and_entropies(scaled)
        return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], entropies

    def make(vocab_pass):
        def loss(params, ids, mask, resp, resp_mask):
            sampling._token_logprobs_and_entropies = vocab_pass  # read while tracing only
            try:
                out = sampling.score_fn(nnx.merge(graphdef, params), None, ids, mask, resp, resp_mask,
                                        temperature=TEMPERATURE)
            finally:
                sampling._token_logprobs_and_entropies = fused
            return -jnp.sum(out.logprobs) - 0.01 * jnp.sum(out.entropies)
        return jax.jit(jax.value_and_grad(loss))

    args = tuple(jnp.asarray(x) for x in (ids, mask, resp, resp_mask))
    fns = {"fused": make(fused), "plain": make(plain)}
    fused_t, plain_t = time_pair(lambda: block(fns["fused"](params, *args)),
                                 lambda: block(fns["plain"](params, *args)), repeats)
    (loss_a, grads_a), (loss_b, grads_b) = fns["fused"](params, *args), fns["plain"](params, *args)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)))
    speedup = plain_t.median_s / fused_t.median_s
    print(f"scorer vocabulary pass: plain autodiff {plain_t.median_s * 1e3:.1f} ms -> fused {fused_t.median_s * 1e3:.1f} ms "
          f"({speedup:.2f}x; max gradient difference {diff:.1e})")
    return {"fused": fused_t.as_dict(), "plain": plain_t.as_dict(), "speedup": speedup,
            "loss_difference": float(loss_a - loss_b), "max_abs_gradient_difference": diff}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--also_torch_threads", default="1",
                        help="comma-separated torch thread counts measured as well (each against coso_jax again, "
                             "interleaved); a 1-thread torch does not stall on a loaded machine. Empty: none")
    parser.add_argument("--name", default=None, help="results file name (default sampler_<platform>)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = parser.parse_args()
    from coso_jax.rl.run import exit_on_user_error

    exit_on_user_error(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as path:
        torch_model, model = make_models(args.size, path)
    ids, mask = make_prompts(SIZES[args.size]["vocab_size"])
    start, load_before = time.perf_counter(), os.getloadavg()
    print(f"torch on {args.torch_threads} threads (load {load_before[0]:.1f}):")
    generation = bench_generation(torch_model, model, ids, mask, args.repeats)
    scorer = bench_scorer(torch_model, model, ids, mask, args.repeats)
    vocab_pass = bench_scorer_vocab_pass(model, ids, mask, SIZES[args.size]["vocab_size"], args.repeats)
    others = {}
    for threads in [int(t) for t in args.also_torch_threads.split(",") if t.strip()]:
        torch.set_num_threads(threads)
        load = os.getloadavg()
        print(f"torch on {threads} thread(s) (load {load[0]:.1f}):")
        others[str(threads)] = {"load_average_before": load,
                                "generation": bench_generation(torch_model, model, ids, mask, args.repeats),
                                "scorer_fwd_bwd": bench_scorer(torch_model, model, ids, mask, args.repeats)}
    torch.set_num_threads(args.torch_threads)
    platform = device_description()["platform"]
    write_results(args.name or f"sampler_{platform}", {
        "model": {"size": args.size, **SIZES[args.size],
                  "num_params": int(sum(p.numel() for p in torch_model.parameters()))},
        "setup": {"batch": BATCH, "prompt_len": PROMPT, "new_tokens": NEW, "temperature": TEMPERATURE,
                  "top_p_sampled": TOP_P, "dtype": "float32", "torch_threads": args.torch_threads,
                  "torch_version": torch.__version__, "xla_cpu_threads": os.cpu_count(),
                  "baseline": "transformers generate / forward+backward, eager attention, same weights"},
        "generation": generation,
        "scorer_fwd_bwd": scorer,
        "scorer_vocabulary_pass": vocab_pass,
        "other_torch_threads": others,
        "aims": {"sampler_speedup": 3.0, "scorer_speedup": 1.5},
        "wall_s": time.perf_counter() - start,
        # This 2-core machine is shared: load averages (1, 5, 15 min) show how contended the run was.
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }, out_dir=args.out)
    print(f"load average before {load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
