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

4. `--compare`: CoSo vs entropy vs none on all six task types (one agent for all, as the paper), see
   `run_compare`; writes benchmarks/results/alfworld_compare_<tag>.json, which
   `python -m benchmarks.paper_curves` draws as its ALFWorld panel and per-task-type table.

  python -m benchmarks.alfworld --compare [--algos none,entropy,coso] [--seeds 3]
      [--workdir runs/alfworld_compare] [--set FIELD=VALUE ...] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks._common import parse_seeds, read_json, write_json_atomic, write_results
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

# ------------------------------------------------------------------------------- --compare
# CoSo vs entropy vs none on ALFWorld, all six task types, one agent (the paper's setting), tiny_cpu.
#
# Every (algo, seed) run is an ordinary `PPOTrainer` run under <workdir>/<algo>/seed_<k>/; a run with
# result.json is skipped, an interrupted one resumes from its last checkpoint. All runs start from one
# cached SFT start (<workdir>/sft/) and share compiled steps (the trainer's jits are module-level, so
# every run of the process with the same shapes reuses them). After training,
# each final policy (and the SFT start, once) plays a fixed list of held-out games to their end:
# `eval_games` games per task type of the "test" split (and `unseen_games` of the "unseen" split),
# sampled at the training temperature; success and final goal-condition progress per task type.

# The comparison's settings, the same for every algo, on top of the tiny_cpu preset's ALFWorld defaults
# (prompt margin 256 -> 528-token prompts, 64 new tokens, 16 envs x 8 steps per PPO update, lambda 0.2).
# Calibrated on this 2-core CPU (2026-11-28, see COMPARE_NOTE) to fit the whole grid (SFT + 3 algos x 3
# seeds + 10 evaluations) in about 35 minutes.
COMPARE_OVERRIDES: dict = dict(
    alfworld_pool_size=24,  # training games per task type (the preset's 100 take ~15 min to generate)
    sft_episodes=120,  # 20 expert episodes per task type, ~1,000 demonstrations
    sft_epochs=6,  # ~186 SFT steps of 32 at ~2.3 s each
    total_env_steps=512,  # 4 PPO updates of 128 env steps
    # 4 envs x 32 steps per update (the preset: 16 x 8): an unsuccessful episode lasts 50 steps, so with 16
    # envs none would end within 512 env steps and the training curve would count only won episodes.
    num_envs=4,
)
COMPARE_EVAL_GAMES = 2  # test-split games per task type: 12 episodes, one batch of 12 envs (~25-30 s)
COMPARE_UNSEEN_GAMES = 0  # unseen-split games per task type (--unseen_games 2 adds ~30 s per evaluation)
COMPARE_NOTE = (
    "Calibration, 2 CPU cores (tiny_cpu, prompt_len 528, 16 envs): an SFT step (batch 32) takes ~2.3 s, so the "
    "preset's 300 episodes x 10 epochs (2,392 demonstrations, ~740 steps) would take ~28 min alone; a PPO "
    "iteration (128 env steps) ~18 s steady for none and coso (rollout ~5 s at 16 envs, update ~12 s, coso's "
    "causal phase ~2 s), the first of each algo ~35-55 s (compilation); a trainer's set-up with the SFT start "
    "cached ~30-50 s (the demonstrations are re-collected); one batch of evaluation episodes played to 50 steps "
    "~30 s. Not measured: the rollout at 4 envs (estimated ~10 s per iteration: 32 sampler calls of 4 prompts) "
    "and the SFT start's success at these settings. Projection for these defaults: SFT start ~9 min, 9 runs x "
    "~2.7 min with 10 evaluations: ~35 min.")

# --smoke: the trainer test's tiny settings (one game per task type, 2 iterations of 8 env steps) and a
# short evaluation (one test game per task type, episodes cut at 4 steps).
SMOKE_OVERRIDES: dict = dict(
    alfworld_pool_size=1, prompt_margin=160, sft_episodes=12, sft_epochs=3, sft_batch_size=8, sft_lr=3e-3,
    causal_pretrain_steps=2, causal_batch=64, causal_minibatch=64, num_envs=2, steps_per_update=8,
    minibatch_size=4, ppo_epochs=1, total_env_steps=16, checkpoint_every=1, heatmap_every=2,
)
SMOKE_EVAL_MAX_STEPS = 4

SHORT_NAMES = {  # the paper's column names
    "pick_and_place_simple": "Pick", "look_at_obj_in_light": "Look", "pick_clean_then_place_in_recep": "Clean",
    "pick_heat_then_place_in_recep": "Heat", "pick_cool_then_place_in_recep": "Cool",
    "pick_two_obj_and_place": "Pick2",
}


def eval_episodes(split: str, games_per_type: int) -> list[dict]:
    """The fixed evaluation list: games 0..games_per_type-1 of each task type of `split`."""
    return [{"split": split, "task_type": t, "index": i} for t in TASK_TYPES for i in range(games_per_type)]


def _evaluate(trainer, splits: dict[str, int], env_kwargs: dict | None) -> dict:
    out = {}
    for split, games in splits.items():
        if games > 0:
            t0 = time.perf_counter()
            out[split] = trainer.evaluate_episodes(eval_episodes(split, games), env_kwargs=env_kwargs)
            out[split]["wall_s"] = time.perf_counter() - t0
    return out


def run_compare(algos, seeds, workdir: str, overrides: dict, splits: dict[str, int],
                eval_env_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Trains (or resumes, or skips) every (algo, seed) run; returns this invocation's timings."""
    from pathlib import Path

    from coso_jax import metrics as metrics_lib
    from coso_jax.rl.config import ppo_preset
    from coso_jax.rl.ppo.trainer import PPOTrainer

    root = Path(workdir)
    runs = [(algo, seed) for seed in seeds for algo in algos]  # seed-major: a cut grid has every algo
    run_dir = {r: root / r[0] / f"seed_{r[1]}" for r in runs}
    done = {r: (run_dir[r] / "result.json").exists() for r in runs}
    timings = {"runs_trained": 0, "runs_skipped": sum(done.values()), "run_wall_s": {}}
    bar = metrics_lib.progress_bar(len(runs), desc="alfworld_compare", disable=not progress,
                                   initial=timings["runs_skipped"])
    start = time.perf_counter()
    try:
        for algo, seed in [r for r in runs if not done[r]]:
            d = run_dir[(algo, seed)]
            config = ppo_preset("tiny_cpu", env="ALFWorld", algo=algo, seed=seed, **{"progress": False, **overrides})
            sft_dir = root / "sft" / f"ALFWorld-{config.preset}-{config.start_fingerprint()[:10]}"
            config = config.replace(sft_dir=str(sft_dir))
            sft_built = not (sft_dir / "summary.json").exists()  # this trainer runs the SFT
            resume = (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())
            bar.set_scalars({"run": f"{algo}/{seed}" + (" (resumed)" if resume else "")})
            t0 = time.perf_counter()
            trainer = PPOTrainer(config, d, resume=resume)
            init_s = time.perf_counter() - t0
            try:
                if sft_built:
                    timings["sft_build_wall_s"] = init_s  # SFT (and the pool) + this run's set-up
                sft_path = root / "sft_eval.json"
                if not sft_path.exists() and not resume:  # a fresh trainer holds the SFT start
                    t_eval = time.perf_counter()
                    sft_eval = _evaluate(trainer, splits, eval_env_kwargs)
                    write_json_atomic(sft_path, {"eval": sft_eval, "sft": trainer.start_summary,
                                           "trainer_init_wall_s": init_s, "sft_built_here": sft_built,
                                           "wall_s": time.perf_counter() - t_eval})
                    timings["sft_eval_wall_s"] = time.perf_counter() - t_eval
                t_train = time.perf_counter()
                trainer.train()
                train_s = time.perf_counter() - t_train
                t_eval = time.perf_counter()
                final = _evaluate(trainer, splits, eval_env_kwargs)
                eval_s = time.perf_counter() - t_eval
            finally:
                trainer.close()
            result = {"algo": algo, "seed": seed, "final_eval": final,
                      "env_steps": trainer.rollout.total_env_steps,
                      "wall_s_this_invocation": time.perf_counter() - t0,
                      "train_wall_s": train_s, "eval_wall_s": eval_s, "trainer_init_wall_s": init_s,
                      "config": config.to_flat_dict()}
            write_json_atomic(d / "result.json", result)
            timings["runs_trained"] += 1
            timings["run_wall_s"][f"{algo}/{seed}"] = result["wall_s_this_invocation"]
            test = final.get("test", next(iter(final.values()), {}))
            bar.update(1, {"test_success": test.get("success_rate", float("nan"))})
            print(f"{algo}/seed_{seed}: test success {test.get('success_rate', float('nan')):.3f}, progress "
                  f"{test.get('mean_progress', float('nan')):.3f} (train {train_s:.0f} s, eval {eval_s:.0f} s)",
                  flush=True)
    finally:
        bar.close()
    timings["grid_wall_s_this_invocation"] = time.perf_counter() - start
    return timings


def _cell(values) -> list[float]:
    from coso_jax.metrics import mean_and_se

    return list(mean_and_se(values))


def _table_row(evals: list[dict]) -> dict:
    """Per task type and on average: success and final progress, mean and SE over the given evals
    (one per seed). The average of one eval is its success over all its episodes (the same number of
    games per task type, so also the mean over task types)."""
    row = {"seeds": len(evals)}
    for t in TASK_TYPES:
        groups = [e.get("by_task_type", {}).get(t) for e in evals]
        groups = [g for g in groups if g is not None]
        row[t] = {"success": _cell(g["success_rate"] for g in groups),
                  "progress": _cell(g["mean_progress"] for g in groups),
                  "episodes_per_seed": groups[0]["episodes"] if groups else 0}
    row["average"] = {"success": _cell(e["success_rate"] for e in evals),
                      "progress": _cell(e["mean_progress"] for e in evals)}
    return row


def collect_compare(algos, seeds, workdir: str, splits: dict[str, int]) -> dict:
    """Reads every finished run: training curves and the per-task-type tables (per split)."""
    from pathlib import Path

    from coso_jax import metrics as metrics_lib

    root = Path(workdir)
    runs, finals = [], {}
    for algo in algos:
        for seed in seeds:
            d = root / algo / f"seed_{seed}"
            result = read_json(d / "result.json")
            if result is None:
                continue
            records = metrics_lib.read_jsonl(d / "metrics.jsonl")
            runs.append({
                "algo": algo, "seed": seed,
                "env_steps": [r["env_steps"] for r in records],
                "success_rate": [r["success_rate"] for r in records],
                "iteration_success_rate": [r.get("iteration_success_rate") for r in records],
                "invalid_action_rate": [r.get("invalid_action_rate") for r in records],
                "episodes": [r.get("episodes", 0) for r in records],
                "final_eval": result["final_eval"],
                "train_wall_s": result.get("train_wall_s"), "eval_wall_s": result.get("eval_wall_s"),
                "wall_s": result.get("wall_s_this_invocation"),
            })
            finals.setdefault(algo, []).append(result["final_eval"])
    sft = read_json(root / "sft_eval.json")
    table = {}
    for split, games in splits.items():
        if games <= 0:
            continue
        rows = {algo: _table_row([f[split] for f in finals.get(algo, []) if split in f]) for algo in algos}
        if sft is not None and split in sft["eval"]:
            rows["sft_start"] = _table_row([sft["eval"][split]])
        table[split] = rows
    return {"runs": runs, "table": table, "sft": sft}


def compare_main(argv=None) -> dict:
    import logging
    from pathlib import Path

    import jax

    from benchmarks._common import RESULTS_DIR
    from benchmarks.paper_curves import alfworld_markdown
    from coso_jax.rl.config import ALGOS, PPOConfig, parse_overrides, ppo_preset

    ap = argparse.ArgumentParser(description="ALFWorld: CoSo vs entropy vs none over the six task types")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a list like 0,3,7")
    ap.add_argument("--workdir", default=None,
                    help="default runs/alfworld_compare (smoke: runs/alfworld_compare_smoke)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default=None, help="output name suffix (default: cpu, gpu or smoke)")
    ap.add_argument("--eval_games", type=int, default=None,
                    help=f"test-split games per task type (default {COMPARE_EVAL_GAMES}; smoke 1)")
    ap.add_argument("--unseen_games", type=int, default=None,
                    help=f"unseen-split games per task type (default {COMPARE_UNSEEN_GAMES}; smoke 0)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any PPOConfig field (flat or dotted name), for every run (repeatable; over the "
                         "comparison's defaults)")
    ap.add_argument("--smoke", action="store_true", help="1 seed, tiny settings, short evaluation (tests)")
    ap.add_argument("--report_only", action="store_true", help="only collect finished runs and write the JSON")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
    if not algos or any(a not in ALGOS for a in algos):
        ap.error(f"--algos: choose from {list(ALGOS)}, got {args.algos!r}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        ap.error(f"--seeds must be a count or a comma-separated list of ints, got {args.seeds!r}")
    if args.smoke and args.seeds == "3":
        seeds = (0,)
    if not seeds:
        ap.error("--seeds: need at least one seed")
    overrides = dict(SMOKE_OVERRIDES if args.smoke else COMPARE_OVERRIDES)
    try:
        overrides.update(parse_overrides(args.set, PPOConfig))
    except ValueError as err:
        ap.error(str(err))
    try:
        example = ppo_preset("tiny_cpu", env="ALFWorld", algo=algos[0], seed=seeds[0], **overrides)
    except (TypeError, ValueError) as err:
        ap.error(f"bad configuration: {err}")
    splits = {"test": args.eval_games if args.eval_games is not None else (1 if args.smoke else COMPARE_EVAL_GAMES),
              "unseen": args.unseen_games if args.unseen_games is not None else (
                  0 if args.smoke else COMPARE_UNSEEN_GAMES)}
    eval_env_kwargs = {"max_steps": SMOKE_EVAL_MAX_STEPS} if args.smoke else None
    workdir = args.workdir or ("runs/alfworld_compare_smoke" if args.smoke else "runs/alfworld_compare")

    timings = None
    if not args.report_only:
        timings = run_compare(algos, seeds, workdir, overrides, splits, eval_env_kwargs,
                              progress=not args.no_progress)
    collected = collect_compare(algos, seeds, workdir, splits)
    sft = collected["sft"] or {}
    shapes = {"num_envs": example.num_envs, "steps_per_update": example.steps_per_update,
              "max_new_tokens": example.model.max_new_tokens, "image_size": example.model.image_size,
              "patch_size": example.model.patch_size,
              "image_tokens": (example.model.image_size // example.model.patch_size) ** 2,
              "prompt_len": (sft.get("sft") or {}).get("prompt_len")}
    run_walls = [r["wall_s"] or 0.0 for r in collected["runs"]]
    tag = args.tag or ("smoke" if args.smoke else ("cpu" if jax.devices()[0].platform == "cpu" else "gpu"))
    payload = {
        "what": "ALFWorld (generated games, all six task types, one agent): CoSo vs entropy vs none, tiny_cpu "
                "preset (tiny LLaVA from scratch, SFT on expert walkthroughs, then PPO); final policies on "
                "held-out games per task type; success and final goal-condition progress, mean ± SE over seeds",
        "algos": list(algos), "seeds": list(seeds), "smoke": args.smoke,
        "task_types": list(TASK_TYPES), "short_names": SHORT_NAMES,
        "eval": {"games_per_task_type": splits, "episode_max_steps": (eval_env_kwargs or {}).get("max_steps", 50),
                 "temperature": example.model.temperature,
                 "note": "each final policy plays games 0..n-1 of every task type of the split to their end"},
        "overrides": overrides, "config_example": example.to_flat_dict(), "shapes": shapes, "dtype": "float32",
        "calibration_note": None if args.smoke else COMPARE_NOTE,
        "table": collected["table"], "runs": collected["runs"],
        "sft_start": {"summary": sft.get("sft"), "trainer_init_wall_s": sft.get("trainer_init_wall_s"),
                      "sft_built_in_that_init": sft.get("sft_built_here"), "eval_wall_s": sft.get("wall_s")},
        "timings": timings, "summed_run_wall_s": sum(run_walls),
    }
    # The same per-task-type tables as the paper-curves report draws from this JSON.
    md = alfworld_markdown(payload, f"alfworld_compare_{tag}.json")
    payload["markdown"] = md
    write_results(f"alfworld_compare_{tag}", payload, out_dir=Path(args.out))
    print(md)
    return payload


def main(argv=None) -> dict | None:
    """The env benchmark, or with --compare the comparison. A user error (a bad --set value, a busy or
    foreign run directory, a checkpoint from other settings) exits with status 2 and one line on stderr
    (--debug, or COSO_DEBUG=1, shows the traceback)."""
    import sys

    from coso_jax.rl.run import exit_on_user_error

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if "--compare" in argv:
        return exit_on_user_error(lambda: compare_main([a for a in argv if a != "--compare"]), debug=debug)
    return exit_on_user_error(lambda: env_main(argv), debug=debug)


def env_main(argv) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen_seeds", type=int, default=20)
    ap.add_argument("--plain_steps", type=int, default=40)
    ap.add_argument("--fast_steps", type=int, default=400)
    ap.add_argument("--env_steps", type=int, default=400)
    ap.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = ap.parse_args(argv)
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
        "args": {k: v for k, v in vars(args).items() if k != "debug"},
        "load_avg_1min_start": load0,
        "load_avg_1min_end": os.getloadavg()[0],
        "summary": summary,
        "generation": gen,
        "engine": eng,
        "env": env,
    })


if __name__ == "__main__":
    main()
