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
explain the measured figure; the JSON puts each phase's measured share of the coso iteration next
to its FLOP share ("phase_shares"), with the classifier's training FLOPs at the padded length and at
the bucketed lengths the fused update computes.

The rollout is split into host work (prompts, frames, decoding, parsing, env steps) and the sampler
calls (dispatch + device + transfer) plus the bootstrap value. Baselines measured in the same run,
after the interleaved iterations, on the coso trainer:
  * "classifier_update_ab": the fused online update (`causal_term.classifier_update`) vs the plain
    loop of `classifier_step` calls on the same replay state and key (the computation before the
    fused update), interleaved, with the largest parameter difference between the two;
  * "rollout_ab": collections with the encoder's frame cache and the decoder's token cache vs
    without them (every frame resized and every token decoded each step), interleaved.
Load averages are recorded before and after. Writes benchmarks/results/iteration_<platform>.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
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
from coso_jax.rl import causal_term as causal_term_lib
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


def _timed_sampler(sample, sink: dict[str, float]):
    """`sample` that adds each call's wall time (dispatch, device, transfer to host: the call returns host
    arrays) to sink["sampler"]."""
    def timed(inputs, t):
        start = time.perf_counter()
        out = sample(inputs, t)
        sink["sampler"] = sink.get("sampler", 0.0) + time.perf_counter() - start
        return out

    return timed


def _timed_policy(trainer: PPOTrainer, sink: dict[str, float]) -> None:
    """Wraps `trainer.policy_fn` so every sampler call is timed into sink["sampler"] (`_timed_sampler`)."""
    make = trainer.policy_fn

    def policy_fn(key):
        return _timed_sampler(make(key), sink)

    trainer.policy_fn = policy_fn


class _NoPieceCache(dict):
    """`token_char_offsets`' piece cache that never hits: every token is decoded on its own each step."""

    def __contains__(self, key) -> bool:
        return False


def rollout_ab(trainer: PPOTrainer, repeats: int) -> dict[str, Any]:
    """Collections with and without the rollout's host caches, interleaved; host vs sampler seconds."""
    rollout = trainer.rollout
    cached_encoder, cached_pieces = rollout.encoder, rollout._pieces
    plain_encoder = dataclasses.replace(cached_encoder, image_cache_mb=0)
    runs: dict[str, list[dict[str, float]]] = {"cached": [], "uncached": []}
    key = jax.random.key(2024)
    try:
        for i in range(repeats + 1):  # the first round warms the uncached encoder's prompt rows
            for mode in runs:
                rollout.encoder = cached_encoder if mode == "cached" else plain_encoder
                rollout._pieces = cached_pieces if mode == "cached" else _NoPieceCache()
                sink: dict[str, float] = {}
                timed = _timed_sampler(trainer.policy_fn(jax.random.fold_in(key, i)), sink)
                start = time.perf_counter()
                rollout.collect(trainer.buffer, timed)
                total = time.perf_counter() - start
                if i:
                    runs[mode].append({"collect_s": total, "sampler_s": sink["sampler"],
                                       "host_s": total - sink["sampler"]})
    finally:
        rollout.encoder, rollout._pieces = cached_encoder, cached_pieces
    out: dict[str, Any] = {}
    for mode, rows in runs.items():
        med = {k: float(statistics.median(r[k] for r in rows)) for k in rows[0]}
        out[mode] = {**med, "host_share": med["host_s"] / med["collect_s"], "runs": rows}
    out["collect_speedup"] = out["uncached"]["collect_s"] / out["cached"]["collect_s"]
    out["host_speedup"] = out["uncached"]["host_s"] / out["cached"]["host_s"]
    out["frame_cache"] = {"frames": len(cached_encoder.frames), "hits": cached_encoder.frames.hits,
                          "misses": cached_encoder.frames.misses, "bytes": cached_encoder.frames.nbytes}
    return out


def classifier_update_ab(term: causal_term_lib.CausalTerm, repeats: int) -> dict[str, Any]:
    """The fused online update vs the plain loop of `classifier_step` calls (the computation before it),
    from the same classifier, Adam state, replay state and key; interleaved."""
    snapshot = (term.params, term.opt_state, copy.deepcopy(term.replay.rng.bit_generator.state))
    key = jax.random.key(4242)
    applies = causal_term_lib.fused_update_applies
    runs: dict[str, list[float]] = {"fused": [], "loop": []}
    firsts: dict[str, float] = {}
    finals: dict[str, Any] = {}
    try:
        for i in range(repeats + 1):  # the first round compiles the loop's step (not timed into the medians)
            for mode in runs:
                term.params, term.opt_state = snapshot[0], snapshot[1]
                term.replay.rng.bit_generator.state = copy.deepcopy(snapshot[2])
                causal_term_lib.fused_update_applies = applies if mode == "fused" else (lambda *a: False)
                start = time.perf_counter()
                term.update_classifier(key)
                jax.block_until_ready(term.params)
                elapsed = time.perf_counter() - start
                if i:
                    runs[mode].append(elapsed)
                else:
                    firsts[mode] = elapsed
                finals[mode] = term.params
    finally:
        causal_term_lib.fused_update_applies = applies
        term.params, term.opt_state = snapshot[0], snapshot[1]
        term.replay.rng.bit_generator.state = snapshot[2]
    med = {mode: float(statistics.median(v)) for mode, v in runs.items()}
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(finals["fused"]), jax.tree.leaves(finals["loop"])))
    return {"fused_s": med["fused"], "loop_s": med["loop"], "speedup": med["loop"] / med["fused"],
            "first_call_s": firsts, "runs": runs, "max_abs_param_difference": diff,
            "learning_rate": term.config.lr, "batch": term.config.batch, "epochs": term.config.epochs,
            "buckets": list(term.update_buckets), "chunk": term.update_chunk}


def bucketed_length(term: causal_term_lib.CausalTerm, samples: int = 4) -> float:
    """The mean length the fused update runs a sampled row at (its chunk's bucket), over a few draws of
    the replay (its RNG state is restored)."""
    state = copy.deepcopy(term.replay.rng.bit_generator.state)
    try:
        draws = [term.replay.sample(term.config.batch) for _ in range(samples)]
    finally:
        term.replay.rng.bit_generator.state = state
    plan = causal_term_lib.plan_update(*(np.stack(parts) for parts in zip(*draws)), chunk=term.update_chunk,
                                       buckets=term.update_buckets)
    return float(np.mean(np.asarray(term.update_buckets)[plan["branches"]]))


def _iterate(trainer: PPOTrainer) -> dict[str, Any]:
    """One `run_iteration` with the run's key for its iteration (as `Run.train` derives it); its record."""
    return trainer.run_iteration(iteration_key(trainer.run_key, trainer.iteration)).record


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
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
        # The rollout's parts: collect (host work + sampler calls), the sampler calls alone.
        _timed(tr.rollout, "collect", sub[algo], "collect")
        _timed_policy(tr, sub[algo])
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
            for name in ("update_classifier", "compute_causal_weights", "collect", "sampler"):
                rec[f"sub/{name}"] = sub[algo].get(name, 0.0) - before.get(name, 0.0)
            rec["load_1min"] = os.getloadavg()[0]
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

    def med_of(algo: str, fn) -> float:
        return float(statistics.median(fn(r) for r in records[algo]))

    per_algo = {}
    for algo in args.algos:
        per_algo[algo] = {
            "iteration_s": med(algo, "wall_s"),
            "rollout_s": med(algo, "time/rollout"),
            # rollout = host work + sampler calls (inside collect) + the bootstrap value (after it)
            "rollout_host_s": med_of(algo, lambda r: r["sub/collect"] - r["sub/sampler"]),
            "rollout_sampler_s": med(algo, "sub/sampler"),
            "rollout_bootstrap_s": med_of(algo, lambda r: r["time/rollout"] - r["sub/collect"]),
            "rollout_host_share": med_of(algo, lambda r: (r["sub/collect"] - r["sub/sampler"]) / r["time/rollout"]),
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
                              "recompiles_during_measurement": recompiles,
                              "load_average_during_iterations": [r["load_1min"] for a in args.algos
                                                                 for r in records[a]]}
    ab_trainer = trainers["coso"] if "coso" in trainers else next(iter(trainers.values()))
    if args.ab_repeats:
        result["rollout_ab"] = rollout_ab(ab_trainer, args.ab_repeats)
        print(f"rollout host work: {result['rollout_ab']['uncached']['host_s']:.3f}s without caches -> "
              f"{result['rollout_ab']['cached']['host_s']:.3f}s with them "
              f"({result['rollout_ab']['host_speedup']:.1f}x); host share of collect "
              f"{result['rollout_ab']['uncached']['host_share']:.0%} -> {result['rollout_ab']['cached']['host_share']:.0%}",
              flush=True)
        if "coso" in trainers:
            result["classifier_update_ab"] = classifier_update_ab(trainers["coso"].causal, args.ab_repeats)
            ab = result["classifier_update_ab"]
            print(f"classifier update: loop of classifier_step {ab['loop_s']:.3f}s -> fused {ab['fused_s']:.3f}s "
                  f"({ab['speedup']:.1f}x; max parameter difference {ab['max_abs_param_difference']:.1e})",
                  flush=True)
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
        # The fused update runs each sampled row at its chunk's bucket length, not at max_new_tokens.
        bucket_len = bucketed_length(tr.causal)
        tiny_bucketed = flop_model(dec=model_cfg.text, vis=model_cfg.vision, vision_tiles=1, cls=classifier.config,
                                   steps=cfg.steps_per_update, prompt=float(tr.encoder.prompt_len), response=resp,
                                   ppo_epochs=cfg.ppo_epochs, causal_batch=cfg.causal.batch,
                                   causal_epochs=cfg.causal.epochs, replay_len=bucket_len,
                                   scored_positions=float(scored), bucket_len=bucket)
        result["flop_model"] = {"tiny": tiny, "tiny_bucketed_classifier": {**tiny_bucketed,
                                                                           "classifier_train_length": bucket_len},
                                "tiny_params": params, "scored_positions_per_response": float(scored),
                                "scored_fraction": scored_fraction, "measured_causal_split": measured_split,
                                "paper": paper_flop_estimate(max(scored_fraction, 0.5))}
        it = coso["iteration_s"]
        measured = {"rollout": coso["rollout_s"] / it, "update": coso["update_s"] / it,
                    "causal_classifier_update": coso["causal_classifier_update_s"] / it,
                    "causal_effects_and_weights": coso["causal_effects_and_weights_s"] / it}
        measured["other"] = 1.0 - sum(measured.values())

        def flop_shares(model: dict[str, float]) -> dict[str, float]:
            total = sum(model[k] for k in ("rollout_flops", "update_flops", "classifier_train_flops", "effects_flops"))
            return {"rollout": model["rollout_flops"] / total, "update": model["update_flops"] / total,
                    "causal_classifier_update": model["classifier_train_flops"] / total,
                    "causal_effects_and_weights": model["effects_flops"] / total}

        result["phase_shares"] = {
            "measured_share_of_coso_iteration": measured,
            "flop_share_padded_classifier": flop_shares(tiny),
            "flop_share_bucketed_classifier": flop_shares(tiny_bucketed),
            "measured_causal_share_percent": 100.0 * coso["causal_s"] / it,
            "flop_causal_share_percent": tiny["causal_share_percent"],
            "flop_causal_share_percent_bucketed": tiny_bucketed["causal_share_percent"],
        }
        aims = {"causal_share_vs_flop_model": {
            "measured_percent": 100.0 * coso["causal_s"] / it,
            "aim_max_percent": 1.5 * tiny["causal_share_percent"],
            "met": 100.0 * coso["causal_s"] / it <= 1.5 * tiny["causal_share_percent"]},
            "causal_phase_share": {"measured_percent": 100.0 * coso["causal_s"] / it, "aim_max_percent": 10.0,
                                   "met": coso["causal_s"] / it <= 0.10},
            "rollout_host_share": {"measured": coso["rollout_host_share"], "aim_max": 0.25,
                                   "met": coso["rollout_host_share"] <= 0.25}}
        if "coso_vs_entropy_iteration_ratio" in result:
            aims["coso_extra_time_over_entropy_percent"] = 100.0 * (result["coso_vs_entropy_iteration_ratio"] - 1.0)
        result["aims"] = aims
    for tr in trainers.values():
        tr.close()
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()
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
    parser.add_argument("--ab_repeats", type=int, default=3,
                        help="repeats of the same-run baselines (rollout caches, classifier update); 0: skip them")
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
    print(f"{'algo':8s} {'iteration':>9s} {'rollout':>8s} {'(host':>7s} {'sampler)':>9s} {'update':>8s} {'causal':>8s} "
          f"{'(clf upd':>9s} {'effects)':>9s}")
    for algo, p in per.items():
        print(f"{algo:8s} {p['iteration_s']:9.2f} {p['rollout_s']:8.2f} {p['rollout_host_s']:7.2f} "
              f"{p['rollout_sampler_s']:9.2f} {p['update_s']:8.2f} {p['causal_s']:8.2f} "
              f"{p['causal_classifier_update_s']:9.2f} {p['causal_effects_and_weights_s']:9.2f}")
    if "coso_overhead_percent" in result:
        print(f"\nCoSo overhead (causal / iteration): {result['coso_overhead_percent']:.1f}% "
              f"(paper: 3.6%; aims at tiny_cpu: <= 10%, and <= 1.5x the FLOP model's causal share)")
        if "coso_vs_entropy_iteration_ratio" in result:
            print(f"coso / entropy iteration time: {result['coso_vs_entropy_iteration_ratio']:.2f}x (baseline: entropy)")
        fm = result["flop_model"]
        print(f"FLOP model, causal share of iteration FLOPs: tiny config {fm['tiny']['causal_share_percent']:.1f}% "
              f"(classifier at the padded length; {fm['tiny_bucketed_classifier']['causal_share_percent']:.1f}% at the "
              f"fused update's bucketed length), paper setting (7B policy) {fm['paper']['causal_share_percent']:.4f}%")
        shares = result["phase_shares"]
        print("phase share of the coso iteration, measured vs FLOP model (padded / bucketed classifier):")
        for phase, value in shares["measured_share_of_coso_iteration"].items():
            flops = (f"{shares['flop_share_padded_classifier'][phase]:6.1%} / "
                     f"{shares['flop_share_bucketed_classifier'][phase]:6.1%}"
                     if phase in shares["flop_share_padded_classifier"] else "")
            print(f"  {phase:28s} {value:6.1%}   {flops}")
    print(f"recompiles during measurement: {result['recompiles_during_measurement']}")
    platform = jax.devices()[0].platform
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}")
    write_results(args.name or f"iteration_{platform}", {
        "shapes": {"num_envs": result["config"]["num_envs"], "steps_per_update": result["config"]["steps_per_update"],
                   "max_new_tokens": result["config"]["max_new_tokens"],
                   "minibatch_size": result["config"]["minibatch_size"], "ppo_epochs": result["config"]["ppo_epochs"],
                   "causal_batch": result["config"]["causal_batch"], "causal_epochs": result["config"]["causal_epochs"]},
        "dtype": "float32",
        **result,
    }, out_dir=args.out)


if __name__ == "__main__":
    main()
