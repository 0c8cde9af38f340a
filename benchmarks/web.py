"""Web env speed: env steps per second with 1, 2 and 4 headless browsers running at once.

Each instance is its own OS process with one `WebControlEnv` (one Chromium), as parallel rollout
workers would run. A step is the full env step: parse an AutoUI answer (a random tap on the task
area), click in the page, read the episode status and take a 320x420 screenshot; episodes that end
are reset (counted separately). Every instance runs for `--seconds` after a warm-up, all at once.

  python -m benchmarks.web [--instances 1 2 4] [--seconds 20] [--task click-button]

Writes benchmarks/results/web_env_cpu.json. Each browser needs about 0.5 GB of memory and most of
one CPU core: with more instances than cores the aggregate rate stops growing.

  python -m benchmarks.web --digirl [--seeds 0 1 2] [--online-iterations 4] [--budget-min 25]
                            [--prompt-elements K] [--no-start-eval] [--set FIELD=VALUE ...]

The device-control comparison: DigiRL off2on (tiny_cpu preset) with algo none, entropy and coso on
the general suite, seeds interleaved (seed 0 of every algo, then seed 1, ...), all in one process so
the jitted steps compile once. Each run: the shared behaviour-cloned start (built once, cached in
--workdir), the offline stage, `--online-iterations` online iterations, then success on the suite's
first `--eval-episodes` fixed test episodes. The start itself (before any RL) is evaluated once on
the same test episodes (`start_test`, with the first run's evaluation seed). `--prompt-elements K`
overrides the preset's tap targets in the prompt (0: screenshot only). Also times one critic update for a separate critic
encoder vs heads on the shared policy trunk (`critic_timing`). A run that would start after
`--budget-min` is skipped and listed as such. Writes benchmarks/results/web_digirl_cpu.json and
web_digirl_cpu.png.
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
from coso_jax import metrics as metrics_lib


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


def critic_timing(trainer: Any, trunk: str, repeats: int = 3) -> dict[str, float]:
    """Seconds per critic update (`critic_epochs` Adam steps of `critic_batch` transitions, s and s')
    and per advantage pass (64 transitions) for a fresh critic of `trunk` ("separate" / "shared") on a
    `DigiRLTrainer`'s replay and current policy, through the library's module-level jitted steps
    (`coso_jax.rl.digirl.steps.critic_update` / `critic_values`). The first call (compilation) is
    reported separately; the trainer's own critics are untouched."""
    import jax
    from flax import nnx

    from coso_jax.rl.digirl import steps
    from coso_jax.rl.digirl.critics import build_critics

    c = trainer.config.replace(critic_trunk=trunk)
    policy = nnx.merge(trainer.policy_gd, trainer.params)
    critics = build_critics(trunk, len(trainer.tokenizer), c.model.image_size, c.critic_hidden,
                            trainer.family.hidden_size(policy), c.run.seed + 11)
    gd, params = nnx.split(critics, nnx.Param)
    opt = steps.optimizer(c.critic_lr, c.max_grad_norm).init(params)
    out: dict[str, float] = {"critic_params": float(sum(x.size for x in jax.tree.leaves(params)))}
    times, adv_times = [], []
    idx64 = trainer.replay.sample(64)
    for _ in range(repeats + 1):
        batches = trainer._epoch_batches(trainer.replay.indices(), steps.CRITIC_FIELDS, c.critic_epochs,
                                         c.critic_batch)
        t0 = time.perf_counter()
        params, opt, m = steps.critic_update(trainer.policy_gd, gd, trainer.family, trainer.critic_settings, params,
                                             opt, trainer.params, batches)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(steps.critic_values(trainer.policy_gd, gd, trainer.family, trainer.critic_settings,
                                                  params, trainer.params,
                                                  trainer.replay.batch(idx64, steps.CRITIC_FIELDS + ("reward",))))
        adv_times.append(time.perf_counter() - t0)
    out.update(first_update_s=times[0], update_s=float(np.median(times[1:])), first_advantage_s=adv_times[0],
               advantage_64_s=float(np.median(adv_times[1:])))
    return out


def run_digirl(args: argparse.Namespace) -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    from coso_jax.rl.config import ConfigError, DigiRLConfig, digirl_preset, parse_overrides
    from coso_jax.rl.digirl.trainer import DigiRLTrainer

    start_time = time.perf_counter()
    budget_s = 60.0 * args.budget_min
    workdir = os.path.abspath(args.workdir)
    overrides = dict(online_iterations=args.online_iterations, eval_episodes=args.eval_episodes,
                     sft_dir=os.path.join(workdir, "sft"), progress=False)
    if args.prompt_elements is not None:
        overrides["prompt_elements"] = args.prompt_elements
    user = parse_overrides(args.set, DigiRLConfig)
    own = sorted(name for name in user if name.split(".")[-1] in RUN_FIELDS)  # flat or dotted names
    if own:
        raise ConfigError(f"--set {', '.join(own)}: set by this script for every run (use --algos, --seeds, "
                          "--workdir, --online-iterations, --eval-episodes or --prompt-elements)")
    overrides.update(user)
    runs, skipped, critic, start_test = [], [], None, None
    probe = digirl_preset("tiny_cpu", env="web/general", **overrides)
    start_cached = os.path.exists(os.path.join(probe.sft.dir, "summary.json"))  # built before this run's clock
    durations: list[float] = []
    for seed in args.seeds:
        for algo in args.algos:
            elapsed = time.perf_counter() - start_time
            # Skip a run that would likely overrun the budget (the first run also builds the start).
            expected = float(np.median(durations)) if durations else 0.0
            if elapsed + expected > budget_s:
                skipped.append({"algo": algo, "seed": seed, "reason": f"budget ({args.budget_min} min) spent"})
                print(f"skip {algo} seed {seed}: budget spent", flush=True)
                continue
            cfg = digirl_preset("tiny_cpu", env="web/general", algo=algo, seed=seed, **overrides)
            run_dir = os.path.join(workdir, f"{algo}_s{seed}_{int(time.time())}")
            t0 = time.perf_counter()
            trainer = DigiRLTrainer(cfg, run_dir)
            try:
                setup_s = time.perf_counter() - t0
                start_eval_s = 0.0
                if start_test is None and args.start_eval:  # the shared start, before any RL
                    start_test = trainer.evaluate()
                    start_eval_s = time.perf_counter() - t0 - setup_s
                    start_test.update(seconds=start_eval_s, eval_seed_of=f"{algo} seed {seed}")
                    print(f"start (before RL): test success {start_test['success_rate']:.3f} "
                          f"({start_test['episodes']} episodes)", flush=True)
                history = trainer.train()
                train_s = time.perf_counter() - t0 - setup_s - start_eval_s
                result = trainer.evaluate()
                if critic is None and args.critic_timing:
                    critic = {trunk: critic_timing(trainer, trunk) for trunk in ("separate", "shared")}
                    print(f"critic timing: {critic}", flush=True)
                start_summary = trainer.start_summary
            finally:
                trainer.close()
            total = time.perf_counter() - t0
            durations.append(total - setup_s if runs else total)
            online = [r for r in history if r.get("stage") == "online"]
            row = {
                "algo": algo, "seed": seed, "seconds": total, "setup_s": setup_s, "train_s": train_s,
                "test_success_rate": result["success_rate"], "test_episodes": result["episodes"],
                "test_per_task": result["per_task"], "test_invalid_action_rate": result["invalid_action_rate"],
                "online_success_per_iteration": [r.get("iteration_success_rate") for r in online],
                "online_trajectories_per_iteration": cfg.trajectories_per_iteration,
                "final_windowed_online_success": online[-1]["success_rate"] if online else None,
                "online_invalid_action_rate": [r.get("invalid_action_rate") for r in online],
                "actor_positive_advantage_rate": [r.get("actor/positive_advantage_rate") for r in history],
            }
            runs.append(row)
            print(f"{algo} seed {seed}: test success {result['success_rate']:.3f} ({result['episodes']} episodes), "
                  f"online {row['online_success_per_iteration']}, {total:.0f} s", flush=True)
    summary = {}
    for algo in args.algos:
        rows = [r for r in runs if r["algo"] == algo]
        m, se = metrics_lib.mean_and_se([r["test_success_rate"] for r in rows])
        om, ose = metrics_lib.mean_and_se([float(np.mean(r["online_success_per_iteration"])) for r in rows
                            if r["online_success_per_iteration"]])
        summary[algo] = {"seeds": [r["seed"] for r in rows], "test_success_mean": m, "test_success_se": se,
                         "online_success_mean": om, "online_success_se": ose}
    cfg = digirl_preset("tiny_cpu", **overrides)
    payload = {
        "what": "DigiRL off2on on the MiniWoB++ general suite (tiny LLaVA from scratch, CPU): none vs entropy vs "
                "coso; test success on the suite's fixed test episodes after training",
        "config": {k: v for k, v in cfg.to_flat_dict().items() if k not in ("algo", "seed", "sft_dir")},
        "start": start_summary if runs else None,
        "start_was_cached": start_cached,
        "start_test": start_test,
        "summary": summary,
        "runs": runs,
        "skipped": skipped,
        "critic_timing": critic,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - start_time,
        "note": "2-core CPU shared with other jobs while measured (see load_avg_at_end); a handful of online "
                "iterations of a tiny from-scratch policy: differences between algos are within noise unless "
                "the standard errors say otherwise",
    }
    write_results(args.name, payload)
    _plot_digirl(runs, args.algos, cfg.trajectories_per_iteration, os.path.join(os.path.dirname(__file__), "results",
                                                                                 f"{args.name}.png"))


def _plot_digirl(runs: list[dict[str, Any]], algos: list[str], per_iteration: int, out_png: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, algo in enumerate(algos):
        curves = [r["online_success_per_iteration"] for r in runs if r["algo"] == algo and r["online_success_per_iteration"]]
        if curves:
            n = min(len(c) for c in curves)
            ys = np.asarray([c[:n] for c in curves], np.float64)
            x = per_iteration * np.arange(1, n + 1)
            mean = ys.mean(0)
            se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros(n)
            (line,) = ax1.plot(x, mean, marker="o", label=f"{algo} (n={len(ys)})")
            ax1.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2, linewidth=0)
        m, se = metrics_lib.mean_and_se([r["test_success_rate"] for r in runs if r["algo"] == algo])
        ax2.bar(i, m, yerr=se, capsize=4, color=f"C{i}")
        for r in runs:
            if r["algo"] == algo:
                ax2.plot(i, r["test_success_rate"], "k.", alpha=0.6)
    ax1.set_xlabel("online trajectories")
    ax1.set_ylabel("success rate of the iteration's rollouts")
    ax1.set_title("DigiRL on MiniWoB++ general (tiny, CPU)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize="small")
    ax2.set_xticks(range(len(algos)), algos)
    ax2.set_ylabel("test success (mean ± SE over seeds)")
    ax2.set_title("after training: fixed test episodes")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    print(f"wrote {out_png}")


# DigiRLConfig fields this script sets per run or from its own flags (`--set` of one would clash or be lost).
RUN_FIELDS = frozenset({"algo", "seed", "env", "sft_dir", "progress", "online_iterations", "eval_episodes",
                        "prompt_elements"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--task", default="click-button")
    parser.add_argument("--name", default=None, help="results name (default web_env_cpu / web_digirl_cpu)")
    parser.add_argument("--digirl", action="store_true", help="run the none/entropy/coso DigiRL comparison")
    parser.add_argument("--algos", nargs="+", default=["none", "entropy", "coso"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--online-iterations", type=int, default=4)
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--budget-min", type=float, default=25.0)
    parser.add_argument("--critic-timing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--prompt-elements", type=int, default=None,
                        help="tap targets listed in the prompt (default: the tiny_cpu preset's; 0: none)")
    parser.add_argument("--start-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the start on the test episodes before any RL")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --digirl: any DigiRLConfig field (flat or dotted name), for every run "
                             "(repeatable; over the flags above)")
    parser.add_argument("--workdir", default="runs/bench_web_digirl")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = parser.parse_args()
    from coso_jax.rl.run import exit_on_user_error

    exit_on_user_error(lambda: run_main(args), debug=args.debug)


def run_main(args: argparse.Namespace) -> None:
    from coso_jax.envs.web import browser_unavailable_reason
    from coso_jax.rl.config import ConfigError

    if args.set and not args.digirl:
        raise ConfigError("--set: only with --digirl (the env-speed benchmark has no config to override)")
    reason = browser_unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run the web benchmark: {reason}")
    if args.digirl:
        args.name = args.name or "web_digirl_cpu"
        run_digirl(args)
        return
    args.name = args.name or "web_env_cpu"
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
