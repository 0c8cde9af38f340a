"""Time per phase of one online iteration for algo none / entropy / coso, and CoSo's overhead.

    python -m benchmarks.iteration [--iterations 3] [--sft_dir DIR] [--set name=value ...] [--out DIR]

The same config (the `tiny_cpu` preset unless --set overrides it) runs for each algo from the same
cached SFT start. Each algo first runs one warm-up iteration (compiles: reported apart), then
`--iterations` measured iterations, interleaved across algos (algo A, B, C, A, B, C, ...) so that load
from other processes on a shared machine hits all alike. Phases come from the trainer's PhaseTimer:
`rollout` (sampling + env steps + bootstrap value), `causal` (coso only: online classifier update +
counterfactual effects + weights; split here into its two parts), `update` (the jitted PPO update).
"Iteration" is the wall-clock time of `PPOTrainer.run_iteration` (phases + GAE, replay, bookkeeping).
Recompiles during the measured iterations are counted from the kernel's and sampler's trace counters
and from jax.monitoring's backend-compile events (`benchmarks._common.CompileCounter`).

CoSo's overhead = causal time / coso iteration time. Paper: 0.5 of 14.5 GPU-hours (3.6%).
An analytic FLOP estimate of the causal work vs the policy's work is printed for the measured tiny
config and for the paper's setting (LLaVA-1.6-Mistral-7B policy, reference-size classifier), to
explain the measured figure. Writes benchmarks/results/iteration_<platform>.json.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks._common import CompileCounter, write_results
from coso_jax import sampling
from coso_jax.causal import classifier as clf
from coso_jax.causal import effects as effects_lib
from coso_jax.models.clip import CLIPVisionConfig
from coso_jax.models.llama import DecoderConfig
from coso_jax.rl.config import PPOConfig, parse_overrides, ppo_preset
from coso_jax.rl.ppo.trainer import PPOTrainer
from coso_jax.rl.run import iteration_key

ALGOS = ("none", "entropy", "coso")


# ----------------------------------------------------------------------------------------------
# FLOP model (multiply-add = 2 FLOPs; backward = 2x forward; attention score/value products included)
def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def decoder_flops_per_token(cfg: DecoderConfig, context: float) -> float:
    """Forward FLOPs of one token through the decoder + LM head, attending over `context` tokens."""
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    q = cfg.hidden_size * cfg.num_heads * head_dim
    kv = 2 * cfg.hidden_size * cfg.num_kv_heads * head_dim
    o = cfg.num_heads * head_dim * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    attn = 2 * cfg.num_heads * head_dim * context  # QK^T and AV
    per_layer = 2 * (q + kv + o + mlp) + 2 * attn
    return cfg.num_layers * per_layer + 2 * cfg.hidden_size * cfg.vocab_size


def vision_flops_per_image(cfg: CLIPVisionConfig, tiles: int = 1) -> float:
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    per_token_layer = 2 * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)
    per_token_layer += 4 * cfg.hidden_size * tokens
    return tiles * tokens * cfg.num_layers * per_token_layer


def classifier_flops_per_token(cfg: clf.ClassifierConfig, length: float) -> float:
    per_layer = 2 * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.ffn_size) + 4 * cfg.hidden_size * length
    return cfg.num_layers * per_layer


def flop_model(*, dec: DecoderConfig, vis: CLIPVisionConfig, vision_tiles: int, cls: clf.ClassifierConfig,
               steps: int, prompt: float, response: float, ppo_epochs: int, causal_batch: int,
               causal_epochs: int, replay_len: int, scored_positions: float, bucket_len: float) -> dict[str, float]:
    """FLOPs of one iteration, split into policy work and causal work."""
    ctx = prompt + response
    # Sampling: prefill the prompt, then decode `response` tokens one at a time (KV cache).
    prefill = prompt * decoder_flops_per_token(dec, prompt / 2)
    decode = response * decoder_flops_per_token(dec, prompt + response / 2)
    rollout = steps * (prefill + decode + vision_flops_per_image(vis, vision_tiles))
    # PPO: every epoch scores prompt+response with gradients (forward + backward = 3x forward).
    update = ppo_epochs * steps * 3 * (ctx * decoder_flops_per_token(dec, ctx / 2)
                                       + vision_flops_per_image(vis, vision_tiles))
    # Causal: classifier training on the replay (padded to replay_len), and one forward of length
    # ~bucket_len per scored position (+ one baseline per row) for the counterfactual effects.
    train = causal_epochs * causal_batch * replay_len * 3 * classifier_flops_per_token(cls, replay_len)
    effects = steps * (scored_positions + 1) * bucket_len * classifier_flops_per_token(cls, bucket_len)
    policy = rollout + update
    causal = train + effects
    return {
        "rollout_flops": rollout, "update_flops": update, "classifier_train_flops": train,
        "effects_flops": effects, "causal_share_percent": 100.0 * causal / (policy + causal),
    }


def paper_flop_estimate(measured_scored_fraction: float) -> dict[str, Any]:
    """The paper's gym_cards setting: LLaVA-1.6-Mistral-7B, 512 steps per update, 4 PPO epochs,
    reference classifier (hidden 128, 3 layers, FFN 512), 1024 replay actions x 2 epochs at the
    padded length 256 (max_new_tokens), a 300x300 frame -> 2 anyres tiles of 576 image tokens."""
    response = 100.0  # typical CoT answer length in tokens (max_new_tokens 256)
    assumptions = dict(steps=512, prompt=2 * 576 + 350, response=response, ppo_epochs=4, causal_batch=1024,
                       causal_epochs=2, replay_len=256, scored_positions=measured_scored_fraction * response,
                       bucket_len=112, vision_tiles=2)
    est = flop_model(dec=DecoderConfig.mistral_7b(), vis=CLIPVisionConfig.vit_l_14_336(),
                     cls=clf.ClassifierConfig(vocab_size=32064, num_labels=2), **assumptions)
    return {"assumptions": assumptions, **est}


# ----------------------------------------------------------------------------------------------
def _timed(obj: Any, method: str, sink: dict[str, float], name: str) -> None:
    """Wraps a (host-synchronising) method of `obj` to accumulate its wall time in sink[name]."""
    fn = getattr(obj, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sink[name] = sink.get(name, 0.0) + time.perf_counter() - start
        return out

    setattr(obj, method, wrapper)


def _iterate(trainer: PPOTrainer) -> dict[str, Any]:
    """One `run_iteration` with the run's key for its iteration (as `Run.train` derives it); its record."""
    return trainer.run_iteration(iteration_key(trainer.run_key, trainer.iteration)).record


def run(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set, PPOConfig)
    base = ppo_preset("tiny_cpu", progress=False, **overrides)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="coso_bench_iteration_"))
    sft_dir = args.sft_dir or str(workdir / "sft")
    total = base.steps_per_update * (1 + args.iterations)
    trainers, warmup, sub = {}, {}, {}
    for algo in args.algos:
        cfg = base.replace(algo=algo, total_env_steps=total, sft_dir=sft_dir)
        start = time.perf_counter()
        tr = PPOTrainer(cfg, workdir / algo)
        setup_s = time.perf_counter() - start
        sub[algo] = {}
        # The causal phase's two parts: the classifier's online update, then effects + weights.
        _timed(tr.causal, "update_classifier", sub[algo], "update_classifier")
        _timed(tr.causal, "weights", sub[algo], "compute_causal_weights")
        start = time.perf_counter()
        rec = _iterate(tr)
        warmup[algo] = {"setup_s": setup_s, "first_iteration_s": time.perf_counter() - start,
                        **{k: v for k, v in rec.items() if k.startswith("time/")}}
        sub[algo].clear()
        trainers[algo] = tr
        print(f"[{algo}] setup {setup_s:.1f}s (SFT start: {tr.start_summary.get('sft_seconds', 0):.0f}s when built), "
              f"warm-up iteration {warmup[algo]['first_iteration_s']:.1f}s (compiles)", flush=True)

    traces_before = effects_lib.trace_count()
    sample_traces_before = dict(sampling.compile_counts())
    compiles = CompileCounter().start()
    records: dict[str, list[dict[str, Any]]] = {a: [] for a in args.algos}
    for it in range(args.iterations):
        for algo in args.algos:
            tr = trainers[algo]
            before = dict(sub[algo])
            start = time.perf_counter()
            rec = _iterate(tr)
            rec["wall_s"] = time.perf_counter() - start
            for name in ("update_classifier", "compute_causal_weights"):
                rec[f"sub/{name}"] = sub[algo].get(name, 0.0) - before.get(name, 0.0)
            records[algo].append(rec)
            print(f"[{algo}] iteration {it + 1}: {rec['wall_s']:.2f}s "
                  + " ".join(f"{k[5:]}={v:.2f}" for k, v in rec.items() if k.startswith("time/")), flush=True)
    compiles.stop()
    # The PPO trainer samples through its own module-level jits (`sample_step`, `value_step`), which the
    # sampling module's trace counter does not see: their XLA compiles count here too.
    recompiles = {"counterfactual_kernel_traces": effects_lib.trace_count() - traces_before,
                  "sampler_traces": sum(sampling.compile_counts().values()) - sum(sample_traces_before.values())
                  + compiles.matching("sample_step", "value_step"),
                  "backend_compiles": compiles.total}

    def med(algo: str, key: str) -> float:
        values = [r.get(key, 0.0) for r in records[algo]]
        return float(statistics.median(values))

    per_algo = {}
    for algo in args.algos:
        per_algo[algo] = {
            "iteration_s": med(algo, "wall_s"),
            "rollout_s": med(algo, "time/rollout"),
            "update_s": med(algo, "time/update"),
            "causal_s": med(algo, "time/causal"),
            "causal_classifier_update_s": med(algo, "sub/update_classifier"),
            "causal_effects_and_weights_s": med(algo, "sub/compute_causal_weights"),
            "iterations_s": [r["wall_s"] for r in records[algo]],
            "warmup": warmup[algo],
            "invalid_action_rate": float(np.mean([r["invalid_action_rate"] for r in records[algo]])),
            "response_tokens": float(np.mean([r["response_tokens"] for r in records[algo]])),
        }
    result: dict[str, Any] = {"config": base.replace(total_env_steps=total).to_flat_dict(),
                              "measured_iterations": args.iterations, "per_algo": per_algo,
                              "recompiles_during_measurement": recompiles}
    if "coso" in per_algo:
        coso = per_algo["coso"]
        result["coso_overhead_percent"] = 100.0 * coso["causal_s"] / coso["iteration_s"]
        result["coso_overhead_percent_per_iteration"] = [
            100.0 * r["time/causal"] / r["wall_s"] for r in records["coso"]]
        if "entropy" in per_algo:
            result["coso_vs_entropy_iteration_ratio"] = coso["iteration_s"] / per_algo["entropy"]["iteration_s"]

        # FLOP model for the measured config.
        tr = trainers["coso"]
        cfg = tr.config
        policy = nnx.merge(tr.graphdef, tr.params).policy  # the current weights (their shapes are what counts)
        classifier = tr.causal.sync_classifier()
        model_cfg = policy.config
        flat = tr.last_batch
        valid_rows = flat["valid"]
        skip_vocab = tr.causal.skip_vocab
        skip = skip_vocab[np.clip(flat["response_ids"], 0, len(skip_vocab) - 1)]
        scored = (flat["response_mask"] & ~skip & valid_rows[:, None]).sum(1).mean()
        resp = float(flat["response_mask"].sum(1).mean())
        lengths = flat["response_mask"].sum(1)
        max_new = cfg.model.max_new_tokens
        bucket = float(np.mean([effects_lib.bucket_length(max(int(n), 1), max_new) for n in lengths]))
        tiny = flop_model(dec=model_cfg.text, vis=model_cfg.vision, vision_tiles=1, cls=classifier.config,
                          steps=cfg.steps_per_update, prompt=float(tr.encoder.prompt_len), response=resp,
                          ppo_epochs=cfg.ppo_epochs, causal_batch=cfg.causal.batch, causal_epochs=cfg.causal.epochs,
                          replay_len=max_new, scored_positions=float(scored), bucket_len=bucket)
        params = {
            "policy_decoder": _count(nnx.state(policy, nnx.Param)) - _count(
                nnx.state(policy.vision_tower, nnx.Param)) if hasattr(policy, "vision_tower") else None,
            "policy_total": _count(nnx.state(policy, nnx.Param)),
            "classifier_total": _count(nnx.state(classifier, nnx.Param)),
            "classifier_config": {k: getattr(classifier.config, k) for k in
                                  ("hidden_size", "num_layers", "ffn_size", "vocab_size")},
        }
        measured_split = {
            "classifier_update_share_of_causal": coso["causal_classifier_update_s"] / max(coso["causal_s"], 1e-9),
            "effects_share_of_causal": coso["causal_effects_and_weights_s"] / max(coso["causal_s"], 1e-9),
        }
        scored_fraction = float(scored) / max(resp, 1.0)
        result["flop_model"] = {"tiny": tiny, "tiny_params": params, "scored_positions_per_response": float(scored),
                                "scored_fraction": scored_fraction, "measured_causal_split": measured_split,
                                "paper": paper_flop_estimate(max(scored_fraction, 0.5))}
    for tr in trainers.values():
        tr.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations per algo (after 1 warm-up)")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--workdir", default=None, help="run directories (default: a fresh temp dir)")
    parser.add_argument("--sft_dir", default=None, help="cached SFT start to reuse (default: <workdir>/sft)")
    parser.add_argument("--set", action="append", default=[],
                        help="PPOConfig override name=value (flat or dotted name; repeatable)")
    parser.add_argument("--name", default=None, help="results file name (default iteration_<platform>)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = parser.parse_args()
    args.algos = [a for a in args.algos.split(",") if a]
    bad = [a for a in args.algos if a not in ALGOS]
    if not args.algos or bad:
        parser.error(f"--algos: unknown {bad or 'empty list'}; choose from {list(ALGOS)}")
    from coso_jax.rl.run import exit_on_user_error

    exit_on_user_error(lambda: report(args), debug=args.debug)


def report(args: argparse.Namespace) -> None:
    result = run(args)
    per = result["per_algo"]
    print("\nmedian seconds per iteration (after warm-up):")
    print(f"{'algo':8s} {'iteration':>9s} {'rollout':>8s} {'update':>8s} {'causal':>8s} {'(clf upd':>9s} {'effects)':>9s}")
    for algo, p in per.items():
        print(f"{algo:8s} {p['iteration_s']:9.2f} {p['rollout_s']:8.2f} {p['update_s']:8.2f} {p['causal_s']:8.2f} "
              f"{p['causal_classifier_update_s']:9.2f} {p['causal_effects_and_weights_s']:9.2f}")
    if "coso_overhead_percent" in result:
        print(f"\nCoSo overhead (causal / iteration): {result['coso_overhead_percent']:.1f}% "
              f"(paper: 3.6%; bar at tiny_cpu: <= 1.5%)")
        if "coso_vs_entropy_iteration_ratio" in result:
            print(f"coso / entropy iteration time: {result['coso_vs_entropy_iteration_ratio']:.2f}x")
        fm = result["flop_model"]
        print(f"FLOP model, causal share of iteration FLOPs: tiny config {fm['tiny']['causal_share_percent']:.1f}%, "
              f"paper setting (7B policy) {fm['paper']['causal_share_percent']:.4f}%")
    print(f"recompiles during measurement: {result['recompiles_during_measurement']}")
    platform = jax.devices()[0].platform
    write_results(args.name or f"iteration_{platform}", {
        "shapes": {"num_envs": result["config"]["num_envs"], "steps_per_update": result["config"]["steps_per_update"],
                   "max_new_tokens": result["config"]["max_new_tokens"],
                   "minibatch_size": result["config"]["minibatch_size"], "ppo_epochs": result["config"]["ppo_epochs"],
                   "causal_batch": result["config"]["causal_batch"]},
        "dtype": "float32",
        **result,
    }, out_dir=args.out)


if __name__ == "__main__":
    main()
