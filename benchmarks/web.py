"""Web env speed: env steps per second with 1, 2 and 4 headless browsers running at once.

Each instance is its own OS process with one `WebControlEnv` (one Chromium), as parallel rollout
workers would run. A step is the full env step: parse an AutoUI answer (a random tap on the task
area), click in the page, read the episode status and take a 320x420 screenshot; episodes that end
are reset (counted separately). Every instance runs for `--seconds` after a warm-up, all at once.

  python -m benchmarks.web [--instances 1 2 4] [--seconds 20] [--task click-button]

Writes benchmarks/results/web_env_cpu.json. Each browser needs about 0.5 GB of memory and most of
one CPU core: with more instances than cores the aggregate rate stops growing.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks._common import write_results


def _worker(task: str, seconds: float, seed: int, start_at: float, out: "mp.Queue[dict[str, Any]]") -> None:
    from coso_jax.envs.web import make
    from coso_jax.envs.web.autoui import AutoUIAction, format_answer

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    env = make(task)
    try:
        env.reset(seed=seed)
        launch_s = time.perf_counter() - t0

        def answer() -> str:
            x, y = rng.uniform(0.02, 0.98), rng.uniform(0.25, 0.98)
            return format_answer("random tap", AutoUIAction.tap(float(x), float(y)))

        for _ in range(3):  # warm-up
            _, _, term, trunc, _ = env.step(answer())
            if term or trunc:
                env.reset(seed=int(rng.integers(1 << 30)))
        while time.time() < start_at:
            time.sleep(0.01)
        step_s: list[float] = []
        reset_s: list[float] = []
        end = time.perf_counter() + seconds
        begin = time.perf_counter()
        while time.perf_counter() < end:
            t = time.perf_counter()
            _, _, term, trunc, _ = env.step(answer())
            step_s.append(time.perf_counter() - t)
            if term or trunc:
                t = time.perf_counter()
                env.reset(seed=int(rng.integers(1 << 30)))
                reset_s.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - begin
        out.put({"steps": len(step_s), "resets": len(reset_s), "elapsed_s": elapsed, "launch_s": launch_s,
                 "step_ms": [1000 * s for s in step_s], "reset_ms": [1000 * s for s in reset_s]})
    finally:
        env.close()


def run(n: int, task: str, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: "mp.Queue[dict[str, Any]]" = ctx.Queue()
    start_at = time.time() + 15.0 + 3.0 * n  # all instances launched and warmed up by then
    procs = [ctx.Process(target=_worker, args=(task, seconds, 1000 + i, start_at, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=start_at - time.time() + seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    steps = [r["step_ms"] for r in results]
    all_steps = sorted(s for r in steps for s in r)
    resets = [s for r in results for s in r["reset_ms"]]
    per_instance = [r["steps"] / r["elapsed_s"] for r in results]
    return {
        "instances": n,
        "aggregate_steps_per_s": float(sum(per_instance)),
        "per_instance_steps_per_s": [round(x, 2) for x in per_instance],
        "step_ms_mean": float(statistics.mean(all_steps)),
        "step_ms_p95": float(all_steps[int(0.95 * (len(all_steps) - 1))]),
        "reset_ms_mean": float(statistics.mean(resets)) if resets else None,
        "episodes_reset": len(resets),
        "launch_s_mean": float(statistics.mean(r["launch_s"] for r in results)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--task", default="click-button")
    parser.add_argument("--name", default="web_env_cpu")
    args = parser.parse_args()
    from coso_jax.envs.web import browser_unavailable_reason

    reason = browser_unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run the web benchmark: {reason}")
    rows = []
    for n in args.instances:
        row = run(n, args.task, args.seconds)
        print(f"{n} instance(s): {row['aggregate_steps_per_s']:.1f} steps/s in all "
              f"({row['per_instance_steps_per_s']} each), step mean {row['step_ms_mean']:.0f} ms, "
              f"p95 {row['step_ms_p95']:.0f} ms, reset {row['reset_ms_mean'] or 0:.0f} ms", flush=True)
        rows.append(row)
    write_results(args.name, {
        "what": "WebControlEnv steps/s (AutoUI random taps, 320x420 screenshots), one process per browser",
        "task": args.task,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()),
        "note": "machine shared with other jobs while measured; compare rows of the same file only",
        "results": rows,
    })


if __name__ == "__main__":
    main()
