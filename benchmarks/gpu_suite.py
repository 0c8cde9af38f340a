"""One-GPU suite of the `paper` preset: memory per phase, sampler speed, update time and MFU, CoSo's overhead.

    python -m benchmarks.gpu_suite --out DIR [--steps_per_update 16] [--num_envs 8] [--layers 0] [--tiny]

On the lent GPU (see ../shared/gpu/README.md: first `bash ../shared/gpu/prepare.sh` here, then one device run
with carry [".whl"] and a timeout of ~540 s):

    bash .whl/run_on_gpu.sh python -m benchmarks.gpu_suite --out $OUT

It prints where the JSON went (`<out>/gpu_suite_<platform>.json`; written after every stage, so a run cut
short still leaves what it measured). Nothing is downloaded. A run or iteration that would start past
`--budget_s` (450 s) is skipped and listed under "skipped", so the suite ends inside a 540 s device call.

What runs
---------
Two real `PPOTrainer`s (`ppo_preset("paper", env="NumberLine", algo=coso | entropy, random_weights=True, ...)`)
in a temporary work directory, each for two iterations (`run_iteration` with the run's keys, as `train()` calls
it, without the checkpoint / plot bookkeeping): the paper-size LLaVA-1.6-Mistral-7B architecture
(`LlavaConfig.llava_1_6_mistral_7b`: 32 decoder layers, the 24-layer ViT-L/14-336, anyres tiles) with RANDOM
weights, LoRA r128 / alpha 256 / dropout 0.05 on a bf16 base, layer remat, micro-batch 1 (grad accumulation
= minibatch), 4 PPO epochs, 256 new tokens, temperature 0.2, the reference-size classifier (coso).

Differences from the paper run, all forced by "one GPU, no downloads, <= 8 minutes":
  * the tokenizer is our offline BPE built on the NumberLine demonstrations (`coso_jax.tokenizer.build_bpe`,
    target 32064), so the vocabulary is `len(tokenizer)` (a few hundred tokens: the corpus is small), not
    Mistral's 32064: the embedding / lm_head are smaller (lm_head is ~2% of a token's FLOPs at 32064), and the
    BPE packs the fixed prompt text into fewer tokens than Mistral would, so P is shorter than the paper's
    (~1448; recorded as `prompt_len`);
  * `steps_per_update` 16 (paper: 512), `minibatch_size` = `grad_accum_steps` = 16 (paper: 128 / 128: the
    micro-batch stays 1): two iterations per algo must fit the budget with the compiles. Per-sequence costs
    (sampling, scoring) do not depend on it; `--steps_per_update` raises it;
  * random weights never produce a valid NumberLine action, so the counterfactual kernel has no valid row to
    score inside the run (the coso run's causal phase is the classifier's online update); the kernel is
    timed separately on `--kernel_rows` (512) synthetic valid responses of 64-256 tokens;
  * both runs share one random base (`llava.random_init` is memoised for the suite: ~a minute of numpy draws
    at 7B), as two runs on one --hf_dir share theirs; the value head is the one `random_weights` builds
    (`ValueHead.tiny`; the hf_dir path uses RL4VLM's 4096-1024-512-1 MLP: ~4.7 M parameters, negligible).

Measured
--------
  * memory per phase: `jax.devices()[0].memory_stats()` before / after each phase call (rollout: every
    sampler call; causal; update): bytes in use and the process's peak bytes in use so far (XLA keeps one
    peak per process, so a phase's figure is the peak reached by the end of that phase; the first algo's
    first iteration shows each phase's own rise). null where the backend reports none (CPU);
  * sampler: in-run tokens/s (generated tokens over the time in `sample_step`, per call) and one timed
    `sample_step` at the run's shapes (batch `num_envs`, P, 256 new tokens) after the runs;
  * update: seconds of the jitted update per iteration (the first includes its compile), per micro-step;
  * MFU of the update: model FLOPs / update seconds / peak, with
        model FLOPs = epochs x rows x [3 x (T x F_dec(T/2) + N x 2 D V) + F_vit(tiles)]
    F_dec(c) = forward FLOPs of one token through the decoder layers attending over c tokens
    (2 x weights + 4 x heads x head_dim x c per layer, `benchmarks.iteration.decoder_flops_per_token` without
    its lm_head), T = P + N the padded sequence the scorer runs, N x 2 D V the logits of the N response
    positions only (`logits_slice`), F_vit the frozen vision tower's forward over all `max_patches` tiles (no
    backward: nothing below it trains). 3 x forward is the usual 6 x params x tokens rule for a training step;
    it counts weight gradients of the frozen base that a LoRA step does not compute and leaves out the remat
    recompute (one more forward) that it does: the two roughly cancel. Peak: 989 TFLOP/s dense bf16
    (H100 SXM and H200); null on other devices;
  * CoSo's overhead: (coso iteration - entropy iteration) / coso iteration on the second (compiled) iteration,
    the coso run's causal phase share, and a projection to the paper's 512 steps (policy phases scaled
    linearly in steps, plus the classifier update and the kernel on 512 rows). Paper: 0.5 of 14.5 GPU-hours;
  * the counterfactual kernel (`counterfactual_effects` + `causal_weights`) on `--kernel_rows` x 256 synthetic
    valid responses with the run's classifier, and the classifier's online update (1024 x 2 epochs).

On a CPU (`make test` runs it through tests/test_gpu_suite.py) use `--tiny`: the tiny LLaVA-NeXT widths
(`model_preset` tiny_next: 32 px tiles, a 2-layer width-128 decoder, a width-64 ViT), vocabulary 1024 (our
BPE's target), the tiny classifier (64 replayed actions, 4 pre-training steps), 24 demonstration episodes,
64 new tokens, 8 steps per update on 4 envs, 32 kernel rows; every other setting is the paper's (LoRA r128 /
dropout, bf16, remat, micro-batch 1, 4 epochs). `--layers L` cuts the paper-size model to L decoder and L
ViT layers (`text_layers` / `vision_layers`); the tiny model has 2 of each, so with --tiny it may only be 2
(`--tiny --layers=2` is the test's command).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from benchmarks._common import device_description, write_json_atomic
from benchmarks.iteration import decoder_flops_per_token, vision_flops_per_image
from coso_jax.causal import causal_weights, counterfactual_effects
from coso_jax.models import llava
from coso_jax.rl.config import ppo_preset
from coso_jax.rl.ppo import trainer as trainer_lib
from coso_jax.rl.run import iteration_key

GIB = float(1 << 30)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM
PAPER_STEPS = 512
PAPER_COSO_OVERHEAD_PERCENT = 100 * 0.5 / 14.5
DEFAULT_BUDGET_S = 450.0  # stop optional stages past this (the suite's bar is 8 minutes with compiles)

# --tiny: CPU-sized widths, everything else the paper's (see the module docstring).
TINY_OVERRIDES = dict(model_preset="tiny_next", image_size=32, patch_size=8, vocab_size=1024, random_weights=False,
                      classifier_preset="tiny", causal_batch=64, causal_minibatch=64, causal_pretrain_steps=4,
                      sft_episodes=24, max_new_tokens=64)
TINY_STEPS, TINY_ENVS, TINY_KERNEL_ROWS = 8, 4, 32
TINY_LAYERS = 2  # `policy.tiny_llava_config`: 2 decoder and 2 ViT layers


# ----------------------------------------------------------------------------------------------
def memory_snapshot() -> dict[str, float] | None:
    """Bytes in use and the process's peak so far on device 0 (GiB), or None if the backend reports none."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    out = {"bytes_in_use_gib": stats.get("bytes_in_use", 0) / GIB,
           "peak_bytes_in_use_gib": stats.get("peak_bytes_in_use", 0) / GIB}
    if "bytes_limit" in stats:
        out["bytes_limit_gib"] = stats["bytes_limit"] / GIB
    return out


class PhaseMemory:
    """Memory before / after every call of a phase (`wrap`), kept per phase name."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def wrap(self, name: str, fn: Callable, block: bool = False) -> Callable:
        def wrapped(*args, **kwargs):
            before = memory_snapshot()
            out = fn(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
            after = memory_snapshot()
            if before is not None and after is not None:
                self.calls.setdefault(name, []).append({
                    "in_use_before_gib": before["bytes_in_use_gib"], "in_use_after_gib": after["bytes_in_use_gib"],
                    "peak_after_gib": after["peak_bytes_in_use_gib"],
                    "peak_rise_gib": after["peak_bytes_in_use_gib"] - before["peak_bytes_in_use_gib"]})
            return out
        return wrapped

    def summary(self) -> dict[str, Any]:
        return {name: {"calls": len(c), "peak_after_gib": max(x["peak_after_gib"] for x in c),
                       "max_peak_rise_gib": max(x["peak_rise_gib"] for x in c),
                       "in_use_after_gib": c[-1]["in_use_after_gib"]}
                for name, c in self.calls.items()}


@contextlib.contextmanager
def shared_random_base():
    """Memoises `llava.random_init` (what `build_policy` calls for random_weights) for the suite, so the two
    runs build the 7B random base once and share it (a clone: new Variables, the same arrays)."""
    original = llava.random_init
    cache: dict[Any, Any] = {}

    def memo(config, seed=0, scale=0.02, *, dtype=None, param_dtype=None):
        key = (config, seed, scale, None if dtype is None else str(dtype),
               None if param_dtype is None else str(param_dtype))
        if key not in cache:
            cache[key] = original(config, seed, scale, dtype=dtype, param_dtype=param_dtype)
        return nnx.clone(cache[key])

    llava.random_init = memo
    try:
        yield cache
    finally:
        llava.random_init = original
        cache.clear()


@contextlib.contextmanager
def timed_update(trainer: trainer_lib.PPOTrainer, memory: PhaseMemory, sink: list[float]):
    """Wraps the trainer's jitted update (`trainer.steps.update`, or the trainer module's `update_step` where the
    trainer calls that directly) to record memory around it and its blocked wall time."""
    steps = getattr(trainer, "steps", None)
    owner, name = (steps, "update") if hasattr(steps, "update") else (trainer_lib, "update_step")
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(original(*args, **kwargs))
        sink.append(time.perf_counter() - start)
        return out

    setattr(owner, name, memory.wrap("update", timed))
    try:
        yield
    finally:
        setattr(owner, name, original)


def instrument(trainer: trainer_lib.PPOTrainer, memory: PhaseMemory, sampler_calls: list[dict[str, float]],
               causal_parts: dict[str, float]) -> None:
    """Per-instance wrappers: memory around the rollout's sampler calls and the causal phase; the time and
    generated tokens of every `sample_step` call; the causal phase's two parts."""
    original_policy_fn = trainer.policy_fn

    def policy_fn(key):
        sample = original_policy_fn(key)

        def timed_sample(inputs, t):
            start = time.perf_counter()
            out = sample(inputs, t)
            sampler_calls.append({"s": time.perf_counter() - start, "tokens": float(np.sum(out.mask)),
                                  "rows": float(out.mask.shape[0]), "width": float(out.mask.shape[1])})
            return out
        return memory.wrap("rollout_sample", timed_sample)

    trainer.policy_fn = policy_fn
    trainer.causal.step = memory.wrap("causal", trainer.causal.step)
    for method, name in (("update_classifier", "classifier_update_s"), ("weights", "effects_and_weights_s")):
        fn = getattr(trainer.causal, method)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            out = _fn(*args, **kwargs)
            causal_parts[_name] = causal_parts.get(_name, 0.0) + time.perf_counter() - start
            return out
        setattr(trainer.causal, method, timed)


# ----------------------------------------------------------------------------------------------
def update_model_flops(cfg: llava.LlavaConfig, rows: int, epochs: int, prompt_len: int, new_tokens: int) -> float:
    """The update's model FLOPs (module docstring): epochs x rows x [3 (T F_dec(T/2) + N 2DV) + F_vit]."""
    text, t = cfg.text, prompt_len + new_tokens
    lm_head = 2 * text.hidden_size * text.vocab_size
    layers_per_token = decoder_flops_per_token(text, t / 2) - lm_head
    tiles = cfg.max_patches if cfg.is_next else 1
    return float(epochs * rows * (3 * (t * layers_per_token + new_tokens * lm_head)
                                  + vision_flops_per_image(cfg.vision, tiles)))


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def synthetic_responses(rows: int, width: int, vocab: int, num_labels: int, skip_vocab: np.ndarray, seed: int = 0):
    """Valid, labelled responses of 64..width tokens (width/4..width when width < 256), non-skip token ids."""
    rng = np.random.default_rng(seed)
    allowed = np.flatnonzero(~np.asarray(skip_vocab[:vocab], bool))
    tokens = allowed[rng.integers(0, allowed.size, (rows, width))].astype(np.int32)
    lengths = rng.integers(max(width // 4, 1), width + 1, rows)
    mask = np.arange(width)[None] < lengths[:, None]
    labels = rng.integers(0, num_labels, rows).astype(np.int32)
    return np.where(mask, tokens, 0), mask, labels


def time_kernel(trainer: trainer_lib.PPOTrainer, rows: int, repeats: int = 2) -> dict[str, Any]:
    """`counterfactual_effects` + `causal_weights` as `CausalTerm.weights` runs them, on synthetic rows."""
    causal = trainer.causal
    width = trainer.config.model.max_new_tokens
    vocab = causal.classifier.config.vocab_size
    num_labels = causal.classifier.config.num_labels
    tokens, mask, labels = synthetic_responses(rows, width, vocab, num_labels, causal.skip_vocab)

    def once():
        effects = counterfactual_effects(causal.logits_fn(), tokens, mask, labels, window=causal.config.window,
                                         mask_token_id=causal.mask_token_id, skip_mask=causal.skip_vocab,
                                         chunk_size=causal.config.chunk_size, pad_invariant=True)
        return jax.block_until_ready(causal_weights(effects, mask))

    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        steady.append(time.perf_counter() - start)
    return {"rows": rows, "width": width, "mean_length": float(mask.sum(1).mean()),
            "scored_tokens": int(mask.sum()), "first_call_s": first, "median_s": statistics.median(steady),
            "tokens_per_s": float(mask.sum()) / statistics.median(steady)}


def time_sampler(trainer: trainer_lib.PPOTrainer, repeats: int = 2) -> dict[str, Any]:
    """One more `sample_step` at the run's shapes (compiled), timed."""
    inputs = trainer.rollout.current_inputs()
    key = jax.random.key(123)
    sample_step = getattr(getattr(trainer, "steps", None), "sample", trainer_lib.sample_step)
    times, tokens = [], []
    for r in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(sample_step(trainer.graphdef, trainer.sample_settings, trainer.params,
                                                trainer.frozen, inputs, jax.random.fold_in(key, r)))
        times.append(time.perf_counter() - start)
        tokens.append(float(np.sum(np.asarray(out.mask))))
    median = statistics.median(times)
    batch, width = np.asarray(out.mask).shape
    return {"batch": int(batch), "prompt_len": int(np.shape(inputs["prompt_ids"])[1]), "new_tokens": int(width),
            "median_s": median, "generated_tokens": statistics.median(tokens),
            "tokens_per_s": statistics.median(tokens) / median, "decode_slots_per_s": batch * width / median}


# ----------------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, algo: str, workdir: Path):
    steps = args.steps_per_update or (TINY_STEPS if args.tiny else 16)
    envs = args.num_envs or (TINY_ENVS if args.tiny else 8)
    overrides: dict[str, Any] = dict(env="NumberLine", algo=algo, random_weights=True, steps_per_update=steps,
                                     num_envs=envs, minibatch_size=min(128, steps), grad_accum_steps=min(128, steps),
                                     total_env_steps=args.iterations * steps, progress=False,
                                     sft_dir=str(workdir / "start"))
    if args.tiny:
        overrides.update(TINY_OVERRIDES)
    elif args.layers:
        overrides.update(text_layers=args.layers, vision_layers=args.layers)
    return ppo_preset("paper", **overrides)


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    out_path = Path(args.out) / f"gpu_suite_{jax.devices()[0].platform}.json"
    print(f"gpu_suite: results go to {out_path}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="coso_gpu_suite_"))
    algos = [a for a in args.algos.split(",") if a]
    result: dict[str, Any] = {
        "benchmark": "gpu_suite", "device": device_description(), "load_average_before": os.getloadavg(),
        "tiny": bool(args.tiny), "layers": args.layers, "budget_s": args.budget_s, "stages": [],
        "per_algo": {}, "skipped": [],
    }

    def save(stage: str) -> None:
        result["stages"].append(stage)
        result["wall_s"] = time.perf_counter() - wall
        result["load_average_after"] = os.getloadavg()
        write_json_atomic(out_path, result)

    memory_by_algo: dict[str, PhaseMemory] = {}
    first_graphdef = None
    try:
        with shared_random_base():
            for index, algo in enumerate(algos):
                if index and time.perf_counter() - wall > args.budget_s:
                    result["skipped"].append(f"{algo}: past the {args.budget_s:.0f} s budget")
                    continue
                config = make_config(args, algo, workdir)
                if index == 0:
                    result["config"] = config.to_flat_dict()
                    result["choices"] = {
                        "steps_per_update": config.steps_per_update, "paper_steps_per_update": PAPER_STEPS,
                        "num_envs": config.num_envs, "minibatch_size": config.minibatch_size,
                        "grad_accum_steps": config.grad_accum_steps, "iterations": args.iterations,
                        "why": "two iterations per algo with the compiles within 8 minutes on one H100/H200; every "
                               "other setting is the paper preset's (module docstring)"}
                memory = memory_by_algo[algo] = PhaseMemory()
                update_times: list[float] = []
                sampler_calls: list[dict[str, float]] = []
                causal_parts: dict[str, float] = {}
                start = time.perf_counter()
                before_build = memory_snapshot()
                trainer = trainer_lib.PPOTrainer(config, workdir / algo)
                build_s = time.perf_counter() - start
                # apply_lora reuses one class per LoRA config, so a later algo's programs are the first's.
                shared = first_graphdef is not None and first_graphdef == trainer.graphdef
                first_graphdef = first_graphdef or trainer.graphdef
                instrument(trainer, memory, sampler_calls, causal_parts)
                policy_cfg = nnx.merge(trainer.graphdef, trainer.params, trainer.frozen).policy.config
                entry: dict[str, Any] = {
                    "build_s": build_s, "shares_first_runs_programs": shared,
                    "memory_before_build": before_build, "memory_after_build": memory_snapshot(),
                    "prompt_len": trainer.encoder.prompt_len, "vocab_size": len(trainer.tokenizer),
                    "params": {"trainable": int(sum(x.size for x in jax.tree.leaves(trainer.params))),
                               "frozen": int(sum(x.size for x in jax.tree.leaves(trainer.frozen)))},
                    "model": {"text_layers": policy_cfg.text.num_layers, "vision_layers": policy_cfg.vision.num_layers,
                              "hidden_size": policy_cfg.text.hidden_size, "vision_hidden": policy_cfg.vision.hidden_size,
                              "tiles": policy_cfg.max_patches, "tile": policy_cfg.vision.image_size},
                    "iterations": []}
                result["per_algo"][algo] = entry
                save(f"{algo}: built")
                with timed_update(trainer, memory, update_times):
                    for it in range(args.iterations):
                        if it and time.perf_counter() - wall > args.budget_s:
                            result["skipped"].append(f"{algo} iteration {it + 1}: past the {args.budget_s:.0f} s budget")
                            break
                        calls_before, causal_before = len(sampler_calls), dict(causal_parts)
                        start = time.perf_counter()
                        record = trainer.run_iteration(iteration_key(trainer.run_key, trainer.iteration)).record
                        seconds = time.perf_counter() - start
                        calls = sampler_calls[calls_before:]
                        sample_s = sum(c["s"] for c in calls)
                        entry["iterations"].append({
                            "iteration_s": seconds,
                            **{k[5:] + "_s": float(v) for k, v in record.items() if k.startswith("time/")},
                            "update_step_s": update_times[-1] if update_times else float("nan"),
                            "sampler_calls": len(calls), "sampler_s": sample_s,
                            "sampler_tokens_per_s": sum(c["tokens"] for c in calls) / max(sample_s, 1e-9),
                            "response_tokens": float(record.get("response_tokens", float("nan"))),
                            "invalid_action_rate": float(record.get("invalid_action_rate", float("nan"))),
                            **{k: causal_parts.get(k, 0.0) - causal_before.get(k, 0.0)
                               for k in ("classifier_update_s", "effects_and_weights_s")},
                            "skipped_minibatches": float(record.get("ppo/skipped_minibatches", float("nan"))),
                            "loss": float(record.get("ppo/loss", float("nan")))})
                        entry["memory"] = memory.summary()
                        print(f"[{algo}] iteration {it + 1}: {seconds:.1f} s "
                              + " ".join(f"{k[5:]}={v:.1f}" for k, v in record.items() if k.startswith("time/")),
                              flush=True)
                        save(f"{algo}: iteration {it + 1}")
                if index == 0 and entry["iterations"]:
                    # At the run's shapes, with the first run's (compiled) programs.
                    result["update"] = update_summary(entry, config, trainer, policy_cfg)
                    result["sampler"] = time_sampler(trainer)
                    save("sampler timed")
                if trainer.causal.uses_classifier:  # coso: the kernel with the run's classifier
                    rows = args.kernel_rows or (TINY_KERNEL_ROWS if args.tiny else PAPER_STEPS)
                    result["counterfactual_kernel"] = time_kernel(trainer, rows)
                    save("kernel timed")
                trainer.close()
                del trainer
                gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["memory"] = {
        "available": memory_snapshot() is not None,
        "per_algo": {a: m.summary() for a, m in memory_by_algo.items()},
        "note": "peak_bytes_in_use is one monotone peak per process: a phase's peak_after is the highest reached "
                "by the end of that phase; the first algo's first iteration shows each phase's own rise "
                "(max_peak_rise). null / empty where the backend reports no memory stats (CPU).",
    }
    result["coso_overhead"] = overhead(result)
    save("done")
    return result


def update_summary(entry: dict[str, Any], config, trainer, policy_cfg) -> dict[str, Any]:
    its = entry["iterations"]
    steady = [i["update_step_s"] for i in its[1:]] or [its[-1]["update_step_s"]]
    update_s = statistics.median(steady)
    rows, epochs = config.steps_per_update, config.ppo_epochs
    flops = update_model_flops(policy_cfg, rows, epochs, trainer.encoder.prompt_len, config.model.max_new_tokens)
    peak = peak_flops()
    return {"first_update_s": its[0]["update_step_s"], "update_s": update_s,
            "micro_steps": epochs * rows, "per_micro_step_s": update_s / (epochs * rows),
            "model_flops": flops, "achieved_flops_per_s": flops / update_s,
            "peak_flops_per_s": peak, "mfu": None if peak is None else flops / update_s / peak,
            "flop_formula": "epochs x rows x [3 x (T x F_dec(T/2) + N x 2 D V) + F_vit(tiles)], T = P + N "
                            "(module docstring)",
            "prompt_len": trainer.encoder.prompt_len, "new_tokens": config.model.max_new_tokens}


def overhead(result: dict[str, Any]) -> dict[str, Any]:
    """CoSo's overhead: measured (coso vs entropy iteration), the causal share, and a paper-scale projection."""
    per = result["per_algo"]
    out: dict[str, Any] = {"paper_percent": PAPER_COSO_OVERHEAD_PERCENT}

    def steady(algo: str, key: str) -> float:
        its = per[algo]["iterations"]
        return float(its[-1][key]) if its else float("nan")

    if "coso" in per and per["coso"]["iterations"]:
        coso_it = steady("coso", "iteration_s")
        causal = steady("coso", "causal_s")
        out["coso_iteration_s"] = coso_it
        out["causal_share_percent"] = 100 * causal / coso_it
        if "entropy" in per and per["entropy"]["iterations"]:
            entropy_it = steady("entropy", "iteration_s")
            out["entropy_iteration_s"] = entropy_it
            out["measured_percent"] = 100 * (coso_it - entropy_it) / coso_it
        kernel = result.get("counterfactual_kernel")
        steps = result["config"]["steps_per_update"]
        if kernel:
            policy = (steady("coso", "rollout_s") + steady("coso", "update_s")) * PAPER_STEPS / steps
            causal_paper = steady("coso", "classifier_update_s") + kernel["median_s"] * PAPER_STEPS / kernel["rows"]
            out["projected_paper_iteration_s"] = policy + causal_paper
            out["projected_paper_causal_s"] = causal_paper
            out["projected_paper_percent"] = 100 * causal_paper / (policy + causal_paper)
            out["projection"] = ("rollout + update scaled linearly from steps_per_update to 512; causal = the measured "
                                 "classifier update (1024 x 2 epochs) + the kernel on 512 synthetic valid rows")
    return out


def all_numbers_finite(obj: Any) -> bool:
    """True when every int / float in a JSON-like object is finite (None allowed)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return True
    if isinstance(obj, (int, float)):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_numbers_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_numbers_finite(v) for v in obj)
    return True


def print_summary(result: dict[str, Any]) -> None:
    print("\n== gpu_suite ==")
    for algo, e in result["per_algo"].items():
        for i, it in enumerate(e["iterations"]):
            print(f"{algo:8s} it {i + 1}: {it['iteration_s']:7.1f} s  rollout {it.get('rollout_s', 0):6.1f}  "
                  f"causal {it.get('causal_s', 0):6.1f}  update {it.get('update_s', 0):6.1f}  "
                  f"sampler {it['sampler_tokens_per_s']:8.0f} tok/s")
    if "sampler" in result:
        s = result["sampler"]
        print(f"sampler at B={s['batch']} P={s['prompt_len']} N={s['new_tokens']}: {s['median_s']:.2f} s, "
              f"{s['tokens_per_s']:.0f} tok/s")
    if "update" in result:
        u = result["update"]
        mfu = "n/a" if u["mfu"] is None else f"{100 * u['mfu']:.1f}%"
        print(f"update: {u['update_s']:.1f} s ({u['per_micro_step_s'] * 1e3:.0f} ms / micro-step), MFU {mfu}")
    if "counterfactual_kernel" in result:
        k = result["counterfactual_kernel"]
        print(f"counterfactual kernel: {k['rows']} rows x {k['width']}: {k['median_s']:.2f} s")
    print(f"CoSo overhead: {result['coso_overhead']}")
    print(f"memory: {result['memory']['per_algo']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of the JSON")
    parser.add_argument("--steps_per_update", type=int, default=0, help="default 16 (--tiny: 8); paper 512")
    parser.add_argument("--num_envs", type=int, default=0, help="default 8, the paper's (--tiny: 4)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--algos", default="coso,entropy")
    parser.add_argument("--layers", type=int, default=0, help="cut the paper-size model to this many decoder and ViT "
                                                               "layers (0: full depth)")
    parser.add_argument("--tiny", action="store_true", help="the tiny LLaVA-NeXT widths (CPU tests)")
    parser.add_argument("--kernel_rows", type=int, default=0, help="rows of the kernel timing (default 512; --tiny 32)")
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help="a later run or iteration starts only before this many seconds (the stages done "
                             "are in the JSON, the rest listed under 'skipped')")
    args = parser.parse_args()
    if args.tiny and args.layers not in (0, TINY_LAYERS):
        parser.error(f"--tiny builds the tiny LLaVA-NeXT with {TINY_LAYERS} decoder and ViT layers; --layers must be "
                     f"0 or {TINY_LAYERS} with it")
    result = run(args)
    print_summary(result)
    print(f"wrote {Path(args.out) / ('gpu_suite_' + jax.devices()[0].platform + '.json')}")


if __name__ == "__main__":
    main()
