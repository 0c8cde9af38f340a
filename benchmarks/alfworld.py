"""ALFWorld env: game generation (solvable rate, time) and engine speed, plain vs our fast path.

1. Generation: `--gen_seeds` seeds per task type (train split), each planner-checked; reports the
   share generated, the time per game and the walkthrough lengths, and replays every walkthrough
   on the engine (it must win with progress 1). `--gen_seeds 100` is the issue's 100-per-type check.
2. Engine speed, one game per task type (seed 0): game load + first reset (for the fast path:
   warm, a game already seen in this process; cold, a game never seen; disk, a game whose
   translations a previous process cached on disk, as pool games have), a re-reset of the same
   game, and steps/s of a random agent (uniform over admissible commands), on the unmodified
   TextWorld engine ("plain") and with the memoised fast path ("fast"); the two must give the same
   feedback, admissible commands and won flag on the same command sequence (checked here too).
3. The gym env (`coso_jax/ALFWorld-v0`, fast path, schematic image drawn every step): steps/s.

  python -m benchmarks.alfworld [--gen_seeds 20] [--plain_steps 40] [--fast_steps 400]

Writes benchmarks/results/alfworld_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks._common import write_results
from coso_jax.envs.alfworld import engine
from coso_jax.envs.alfworld.generator import TASK_TYPES, GenerationError, generate


def bench_generation(seeds: int) -> dict:
    out = {}
    for t in TASK_TYPES:
        times, lengths, ok, failed, wins = [], [], 0, [], 0
        for s in range(seeds):
            start = time.perf_counter()
            try:
                g = generate(s, t)
            except GenerationError:
                failed.append(s)
                continue
            times.append(time.perf_counter() - start)
            ok += 1
            lengths.append(len(g.walkthrough))
            eng = engine.Engine(fast=True)
            eng.load(g)
            for c in g.walkthrough:
                eng.step(c)
            wins += int(eng.won and engine.progress(g, eng.facts) == 1.0)
        out[t] = {
            "seeds": seeds, "generated": ok, "failed_seeds": failed, "walkthrough_wins": wins,
            "gen_time_s_median": round(statistics.median(times), 3) if times else None,
            "gen_time_s_max": round(max(times), 3) if times else None,
            "walkthrough_len_mean": round(float(np.mean(lengths)), 2) if lengths else None,
            "walkthrough_len_max": max(lengths) if lengths else None,
        }
        print(f"{t:32s} generated {ok}/{seeds}, walkthrough wins {wins}, "
              f"median {out[t]['gen_time_s_median']} s/game, plan length {out[t]['walkthrough_len_mean']}", flush=True)
    return out


def _random_commands(game, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    eng = engine.Engine(fast=True)
    eng.load(game)
    cmds = []
    for _ in range(n):
        c = eng.admissible[int(rng.integers(len(eng.admissible)))]
        eng.step(c)
        cmds.append(c)
        if eng.won:
            eng.reset()
            cmds.append("<reset>")
    return cmds


def _run(fast: bool, game, cmds):
    eng = engine.Engine(fast=fast)
    t0 = time.perf_counter()
    eng.load(game)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.reset()
    reset_s = time.perf_counter() - t0
    records = []
    steps = 0
    t0 = time.perf_counter()
    for c in cmds:
        if c == "<reset>":
            eng.reset()
            continue
        records.append((eng.step(c), tuple(eng.admissible), eng.won))
        steps += 1
    step_s = time.perf_counter() - t0
    return {"load_s": load_s, "reset_s": reset_s, "steps_per_s": steps / step_s}, records


def bench_engine(plain_steps: int, fast_steps: int) -> dict:
    out = {}
    for t in TASK_TYPES:
        game = generate(0, t)
        cmds = _random_commands(game, max(plain_steps, fast_steps), seed=1)
        plain_cmds = cmds[:plain_steps]
        plain, plain_rec = _run(False, game, plain_cmds)
        fast_same, fast_rec = _run(True, game, plain_cmds)
        fast, _ = _run(True, game, cmds[:fast_steps])
        # a game this process never loaded: the translation caches are cold (what a new pool game costs)
        fresh = generate(10_000, t, verify=False)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            engine.Engine(fast=True, sas_cache_dir=d).load(fresh)
            fast["cold_load_s"] = time.perf_counter() - t0
            # a later process: memory caches empty, translations read from the disk cache
            engine.clear_memory_caches()
            t0 = time.perf_counter()
            engine.Engine(fast=True, sas_cache_dir=d).load(fresh)
            fast["disk_cached_load_s"] = time.perf_counter() - t0
        out[t] = {
            "receptacles": len(game.receptacles), "objects": len(game.objects),
            "plain": {k: round(v, 4) for k, v in plain.items()},
            "fast": {k: round(v, 4) for k, v in fast.items()},
            "identical_on_plain_steps": plain_rec == fast_rec,
            "steps_compared": len(plain_rec),
            "step_speedup": round(fast["steps_per_s"] / plain["steps_per_s"], 1),
        }
        print(f"{t:32s} plain {plain['steps_per_s']:6.1f} steps/s load {plain['load_s']:.2f}s reset "
              f"{plain['reset_s']:.2f}s | fast {fast['steps_per_s']:6.1f} steps/s load {fast['load_s']:.2f}s "
              f"(cold {fast['cold_load_s']:.2f}s, disk {fast['disk_cached_load_s']:.2f}s) "
              f"reset {fast['reset_s']:.3f}s | identical {plain_rec == fast_rec}", flush=True)
    return out


def bench_env(steps: int, cache_dir: str) -> dict:
    import gymnasium as gym

    import coso_jax.envs  # noqa: F401  (registers the env)

    env = gym.make("coso_jax/ALFWorld-v0", pool_size=1, cache_dir=cache_dir)
    rng = np.random.default_rng(0)
    _, info = env.reset(seed=0)
    for t in TASK_TYPES:  # generate + cache the pool (one game per type) before timing
        env.reset(options={"task_type": t, "index": 0})
    _, info = env.reset(seed=0)
    resets = 0
    start = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, info = env.step(int(rng.integers(len(info["admissible_commands"]))))
        if term or trunc:
            _, info = env.reset()
            resets += 1
    elapsed = time.perf_counter() - start
    return {"steps_per_s": round(steps / elapsed, 1), "steps": steps, "resets": resets,
            "note": "fast path, image drawn every step, resets (cached games) included"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen_seeds", type=int, default=20)
    ap.add_argument("--plain_steps", type=int, default=40)
    ap.add_argument("--fast_steps", type=int, default=400)
    ap.add_argument("--env_steps", type=int, default=400)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    gen = bench_generation(args.gen_seeds)
    eng = bench_engine(args.plain_steps, args.fast_steps)
    with tempfile.TemporaryDirectory() as d:
        env = bench_env(args.env_steps, d)
    print(f"env: {env}")
    summary = {
        "plain_steps_per_s_median": round(statistics.median(v["plain"]["steps_per_s"] for v in eng.values()), 1),
        "fast_steps_per_s_median": round(statistics.median(v["fast"]["steps_per_s"] for v in eng.values()), 1),
        "plain_load_s_median": round(statistics.median(v["plain"]["load_s"] for v in eng.values()), 3),
        "fast_load_s_median": round(statistics.median(v["fast"]["load_s"] for v in eng.values()), 3),
        "fast_cold_load_s_median": round(statistics.median(v["fast"]["cold_load_s"] for v in eng.values()), 3),
        "fast_disk_cached_load_s_median": round(
            statistics.median(v["fast"]["disk_cached_load_s"] for v in eng.values()), 3),
        "plain_reset_s_median": round(statistics.median(v["plain"]["reset_s"] for v in eng.values()), 3),
        "fast_reset_s_median": round(statistics.median(v["fast"]["reset_s"] for v in eng.values()), 4),
        "all_identical": all(v["identical_on_plain_steps"] for v in eng.values()),
        "generated": sum(v["generated"] for v in gen.values()),
        "requested": sum(v["seeds"] for v in gen.values()),
        "walkthrough_wins": sum(v["walkthrough_wins"] for v in gen.values()),
    }
    print(summary)
    write_results("alfworld_cpu", {
        "what": "ALFWorld generated games: generation + engine speed, unmodified TextWorld PDDL engine vs "
                "our memoised fast path; one process, random agent over admissible commands",
        "args": vars(args),
        "load_avg_1min_start": load0,
        "load_avg_1min_end": os.getloadavg()[0],
        "summary": summary,
        "generation": gen,
        "engine": eng,
        "env": env,
    })


if __name__ == "__main__":
    main()
