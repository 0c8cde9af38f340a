"""The paper's gym_cards comparison: CoSo vs entropy vs none, over seeds, from one SFT start per game.

  python -m benchmarks.paper_curves                       # 4 games x 3 algos x 5 seeds, tiny_cpu
  python -m benchmarks.paper_curves --envs=NumberLine --seeds=3 --algos=none,coso
  python -m benchmarks.paper_curves --smoke               # 1 seed, 2 short iterations (tests)
  python -m benchmarks.paper_curves --report_only         # re-draw figure and tables from runs/

Other benchmarks' JSON, where it exists, adds a panel and a table: `--web_results` (device control,
`benchmarks.web --digirl`) and `--alfworld_results` (ALFWorld, six task types, per-task-type success and
progress, `benchmarks.alfworld --compare`).

Every (game, algo, seed) run is an ordinary `PPOTrainer` run under
``<workdir>/<game>/<algo>/seed_<k>/`` (metrics.jsonl, TensorBoard, checkpoints). A run that finished
has ``result.json`` and is skipped on the next invocation; a run that was interrupted resumes from its
last checkpoint. All algos and seeds of a game start from the same cached SFT policy and classifier
(``<workdir>/sft/``), and the trainer's jitted steps are defined once at module level (static
arguments: the model structure and settings), so all runs of a game in one process share compiled
programs and only the first run of each game pays for compilation.

Outputs (``--out``, default ``benchmarks/results/``): ``paper_curves_<tag>.png`` (one panel per game,
success rate vs env steps, mean +/- standard error over seeds, one line per algo),
``paper_curves_<tag>.json`` and ``paper_curves_<tag>.md`` (final and peak success per (game, algo)
with standard errors, the paper's numbers for reference, and a per-game separation statement).

Success measures (all over episodes, success = return > 0, as RL4VLM):
  * ``train``: the trainer's curve, success over the last `success_window` finished training episodes;
  * ``final``: the final policy on fresh evaluation envs (``--eval_steps`` steps, training temperature);
  * ``peak``: the maximum of the ``train`` curve once >= ``--peak_min_episodes`` training episodes
    have finished (RL4VLM reports peak success within the step budget).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks._common import (
    RESULTS_DIR,
    device_description,
    fmt_mean_se,
    parse_seeds,
    read_json,
    write_json_atomic,
    write_results,
)
from coso_jax import metrics as metrics_lib
from coso_jax import plots
from coso_jax.rl.config import ALGOS, GYM_CARDS_ENVS, PRESETS, PPOConfig, parse_overrides, ppo_preset

log = logging.getLogger(__name__)

# RL4VLM (arXiv 2405.10292) Table 2, peak success %, LLaVA-1.6-Mistral-7B, 15k env steps (recalled
# in ../shared/research/reference_envs.md §5, not re-verified). CoSo's per-game cells were not found;
# the CoSo paper (arXiv 2505.03792) gives only the gym_cards average: RL4VLM 45.1 -> CoSo 49.3.
PAPER_PEAK_PERCENT = {
    "NumberLine": {"sft_init": 24.8, "rl4vlm_ppo": 89.4},
    "EZPoints": {"sft_init": 23.0, "rl4vlm_ppo": 50.0},
    "Points24": {"sft_init": 2.6, "rl4vlm_ppo": 2.3},
    "Blackjack": {"sft_init": 23.1, "rl4vlm_ppo": 40.2},
}
WEB_PANEL = "web/general, DigiRL (x: online trajectories)"
PAPER_GYM_CARDS_AVERAGE = {"rl4vlm": 45.1, "coso": 49.3}
PAPER_NOTE = ("Paper columns: a 7B LLaVA-1.6 after SFT, 15k env steps on 8 GPUs (RL4VLM Table 2, "
              "recalled, not re-verified); not comparable in scale with a tiny model trained from "
              "scratch on a CPU. CoSo's per-game numbers were not available: the CoSo paper reports "
              "a gym_cards average of 49.3 vs 45.1 for RL4VLM.")

# CoSo paper, ALFWorld (6 subtasks, LLaVA-1.6-7B + PPO/RL4VLM): only the average success % is known
# (../shared/research/paper.md §4.1, from a secondary digest of the paper, not checked against the PDF);
# the per-task-type cells were not found.
PAPER_ALFWORLD_AVERAGE = {"rl4vlm": 22.7, "coso": 26.5}
PAPER_ALFWORLD_NOTE = ("Paper rows: LLaVA-1.6-7B after SFT, trained with PPO (RL4VLM) on ALFWorld's official games; "
                       "a different model scale (and game set) from our tiny model trained from scratch on generated "
                       "games, so not comparable. Only the paper's averages are known (secondary source); its "
                       "per-task-type numbers were not available.")

# The smoke grid: the trainer test's tiny settings, two iterations of 16 env steps.
SMOKE_OVERRIDES = dict(
    sft_episodes=16, sft_epochs=6, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2,
    causal_batch=64, causal_minibatch=64, num_envs=4, steps_per_update=16, minibatch_size=8,
    total_env_steps=32, ppo_epochs=1, checkpoint_every=1, heatmap_every=2,
)


@dataclasses.dataclass(frozen=True)
class GridSpec:
    envs: tuple[str, ...] = GYM_CARDS_ENVS
    algos: tuple[str, ...] = ALGOS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    preset: str = "tiny_cpu"
    workdir: str = "runs/paper_curves"
    overrides: tuple[tuple[str, Any], ...] = ()
    eval_steps: int = 512
    peak_min_episodes: int = 50
    progress: bool = True

    def config(self, env: str, algo: str, seed: int):
        return ppo_preset(self.preset, env=env, algo=algo, seed=seed, progress=False,
                          **dict(self.overrides))

    def run_dir(self, env: str, algo: str, seed: int) -> Path:
        return Path(self.workdir) / env / algo / f"seed_{seed}"


def run_grid(spec: GridSpec) -> dict[str, Any]:
    """Runs (or resumes, or skips) every run of the grid; returns per-run results and timings."""
    from coso_jax.rl.ppo.trainer import PPOTrainer

    # Seed-major order: an interrupted or time-boxed grid still holds every game and algo with as
    # many seeds as it got through. SFT starts are cached per game; compiled steps are shared by every
    # run of the process with the same shapes (module-level jits), i.e. per game.
    runs = [(env, algo, seed) for seed in spec.seeds for env in spec.envs for algo in spec.algos]
    done = {run: _read_result(spec.run_dir(*run)) for run in runs}
    bar = metrics_lib.progress_bar(len(runs), desc="paper_curves", disable=not spec.progress,
                                   initial=sum(r is not None for r in done.values()))
    timings = {"runs_trained": 0, "runs_skipped": sum(r is not None for r in done.values()),
               "run_wall_s": {}, "sft_eval_wall_s": {}}
    start = time.perf_counter()
    try:
        for run in [run for run in runs if done[run] is None]:
            env, algo, seed = run
            run_dir = spec.run_dir(*run)
            config = spec.config(env, algo, seed)
            config = config.replace(sft_dir=str(_sft_dir(spec, config)))
            resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            bar.set_scalars({"run": f"{env}/{algo}/{seed}" + (" (resumed)" if resume else "")})
            t0 = time.perf_counter()
            trainer = PPOTrainer(config, run_dir, resume=resume)
            try:
                sft_eval_path = Path(spec.workdir) / f"sft_eval_{env}.json"
                if not sft_eval_path.exists():
                    # The SFT start's success, on the same evaluation envs as every final policy.
                    t_eval = time.perf_counter()
                    sft_eval = dict(trainer.evaluate(spec.eval_steps), sft=trainer.start_summary)
                    write_json_atomic(sft_eval_path, sft_eval)
                    timings["sft_eval_wall_s"][env] = time.perf_counter() - t_eval
                trainer.train()
                final = trainer.evaluate(spec.eval_steps)
            finally:
                trainer.close()
            result = {"env": env, "algo": algo, "seed": seed, "final_eval": final,
                      "env_steps": trainer.rollout.total_env_steps,
                      "wall_s_this_invocation": time.perf_counter() - t0}
            write_json_atomic(run_dir / "result.json", result)
            done[run] = result
            timings["runs_trained"] += 1
            timings["run_wall_s"]["/".join(map(str, run))] = result["wall_s_this_invocation"]
            bar.update(1, {"final": final["success_rate"]})
            print(f"{env}/{algo}/seed_{seed}: final success {final['success_rate']:.3f} "
                  f"({result['wall_s_this_invocation']:.0f} s)", flush=True)
    finally:
        bar.close()
    timings["grid_wall_s_this_invocation"] = time.perf_counter() - start
    if timings["runs_trained"]:
        _record_invocation(spec, timings)
    return {"timings": timings}


def _timings_path(spec: GridSpec) -> Path:
    return Path(spec.workdir) / "grid_timings.json"


def _record_invocation(spec: GridSpec, timings: dict[str, Any]) -> None:
    """Appends one invocation's timings to <workdir>/grid_timings.json, so `--report_only` (and a
    later report) still states how long the grid took."""
    path = _timings_path(spec)
    history = read_json(path) or []
    history.append(dict(timings, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        load_avg_1min=os.getloadavg()[0]))
    write_json_atomic(path, history)


def _sft_dir(spec: GridSpec, config) -> Path:
    return Path(spec.workdir) / "sft" / f"{config.env}-{config.preset}-{config.start_fingerprint()[:10]}"


def _read_result(run_dir: Path) -> dict[str, Any] | None:
    return read_json(run_dir / "result.json")


# ------------------------------------------------------------------------------------------ report
mean_se = metrics_lib.mean_and_se  # (mean, standard error) of finite values


def separation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'>' if a's mean - SE exceeds b's mean + SE, '<' for the reverse, '~' if the ±1 SE bands overlap."""
    (ma, sa), (mb, sb) = a, b
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return "?"
    if ma - sa > mb + sb:
        return ">"
    if mb - sb > ma + sa:
        return "<"
    return "~"


def collect(spec: GridSpec) -> dict[str, Any]:
    """Reads every finished run of the grid: curves, final and peak success, per (env, algo)."""
    table: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list]] = {}
    for env in spec.envs:
        table[env], curves[env] = {}, {}
        sft_eval_path = Path(spec.workdir) / f"sft_eval_{env}.json"
        sft_eval = read_json(sft_eval_path)
        for algo in spec.algos:
            finals, peaks, last_train, runs = [], [], [], []
            for seed in spec.seeds:
                run_dir = spec.run_dir(env, algo, seed)
                result = _read_result(run_dir)
                if result is None:
                    continue
                records = metrics_lib.read_jsonl(run_dir / "metrics.jsonl")
                xs = np.asarray([r["env_steps"] for r in records], np.float64)
                ys = np.asarray([r["success_rate"] for r in records], np.float64)
                # A record's "episodes" counts the episodes its iteration finished.
                seen = np.cumsum([r.get("episodes", 0) for r in records])
                window_full = seen >= spec.peak_min_episodes
                runs.append((xs, ys))
                finals.append(result["final_eval"]["success_rate"])
                last_train.append(float(ys[-1]) if ys.size else float("nan"))
                peaks.append(float(np.nanmax(ys[window_full])) if window_full.any() else float("nan"))
            curves[env][algo] = runs
            table[env][algo] = {
                "seeds": len(finals),
                "final_eval": mean_se(finals), "final_train_window": mean_se(last_train),
                "peak_train_window": mean_se(peaks),
                "per_seed_final_eval": finals, "per_seed_peak": peaks,
            }
        table[env]["sft_start_eval"] = None if sft_eval is None else sft_eval["success_rate"]
        # A standard error needs two seeds: with fewer, no separation is claimed either way.
        present = [a for a in ("coso", "entropy", "none") if a in spec.algos and table[env][a]["seeds"] >= 2]
        table[env]["separation_final"] = {
            f"{a} vs {b}": separation(table[env][a]["final_eval"], table[env][b]["final_eval"])
            for i, a in enumerate(present) for b in present[i + 1:]
        }
        table[env]["separation_peak"] = {
            f"{a} vs {b}": separation(table[env][a]["peak_train_window"], table[env][b]["peak_train_window"])
            for i, a in enumerate(present) for b in present[i + 1:]
        }
    return {"table": table, "curves": curves}


def statement(env: str, row: dict[str, Any]) -> str:
    """One sentence per game: is CoSo > entropy > none outside one standard error (final eval)?"""
    sep = row["separation_final"]
    wanted = [("coso vs entropy", "CoSo > entropy"), ("entropy vs none", "entropy > none"),
              ("coso vs none", "CoSo > none")]
    parts = []
    for key, claim in wanted:
        if key not in sep:
            continue
        verdict = {">": "yes", "<": "no, reversed outside 1 SE", "~": "not separated (±1 SE overlap)",
                   "?": "no data"}[sep[key]]
        parts.append(f"{claim}: {verdict}")
    return f"{env}: " + "; ".join(parts) if parts else f"{env}: fewer than two algos with >= 2 seeds"


def markdown(spec: GridSpec, table: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# gym_cards: CoSo vs entropy vs none ({spec.preset} preset)",
        "",
        f"Success rate in %, mean ± standard error over seeds {list(spec.seeds)}. "
        f"`final`: final policy on fresh envs ({spec.eval_steps} env steps). `peak`: maximum of the "
        f"training curve (success over the last `success_window` episodes) once >= "
        f"{spec.peak_min_episodes} episodes have finished. Device: {meta['device']['platform']} "
        f"({meta['device']['cpu_count']} cores). Grid wall time: {meta['wall_time']}.",
        "",
        "| game | algo | seeds | SFT start | final | peak | paper RL4VLM PPO peak (7B) | paper SFT init (7B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env, row in table.items():
        paper = PAPER_PEAK_PERCENT.get(env, {})
        sft = row["sft_start_eval"]
        for algo in spec.algos:
            cell = row[algo]
            lines.append(
                f"| {env} | {algo} | {cell['seeds']} | {'n/a' if sft is None else f'{100 * sft:.1f}'} | "
                f"{fmt_mean_se(tuple(cell['final_eval']))} | {fmt_mean_se(tuple(cell['peak_train_window']))} | "
                f"{paper.get('rl4vlm_ppo', 'n/a') if algo == 'none' else ''} | "
                f"{paper.get('sft_init', 'n/a') if algo == 'none' else ''} |")
    lines += ["", PAPER_NOTE, "", "## Separation (final success, ±1 SE bands)", ""]
    lines += [f"- {statement(env, row)}" for env, row in table.items()]
    return "\n".join(lines) + "\n"


def web_panel(path: Path) -> tuple[dict[str, list], dict[str, Any]] | None:
    """The device-control panel from `python -m benchmarks.web --digirl`'s JSON, if it exists:
    online success per iteration vs online trajectories, per algo over seeds, and its test summary."""
    data = read_json(path)
    if data is None:
        return None
    curves: dict[str, list] = {}
    for run in data.get("runs", []):
        ys = np.asarray(run["online_success_per_iteration"], np.float64)
        xs = run["online_trajectories_per_iteration"] * np.arange(1, ys.size + 1, dtype=np.float64)
        curves.setdefault(run["algo"], []).append((xs, ys))
    return curves, data.get("summary", {})


def alfworld_panel(path: Path) -> tuple[dict[str, list], dict[str, Any]] | None:
    """The ALFWorld panel from `python -m benchmarks.alfworld --compare`'s JSON, if it exists: the
    training success curve (success over the last `success_window` episodes) vs env steps per algo
    over seeds, and the JSON itself (its per-task-type `table`)."""
    data = read_json(path)
    if data is None:
        return None
    curves: dict[str, list] = {}
    for run in data.get("runs", []):
        xs = np.asarray(run["env_steps"], np.float64)
        ys = np.asarray([np.nan if y is None else y for y in run["success_rate"]], np.float64)
        curves.setdefault(run["algo"], []).append((xs, ys))
    return curves, data


def alfworld_markdown(data: dict[str, Any], source: str) -> str:
    """Per-task-type tables (rows: algos, SFT start, the paper's averages; columns: the six task types
    and the average) of the held-out splits in an ALFWorld comparison JSON: success, then final
    goal-condition progress."""
    types = data.get("task_types", [])
    names = data.get("short_names", {})
    games = data.get("eval", {}).get("games_per_task_type", {})
    md = [f"\n## ALFWorld (6 task types), RL4VLM (PPO) backbone ({source})\n"]
    for split, rows in data.get("table", {}).items():
        for measure, what in (("success", "success"), ("progress", "final goal-condition progress")):
            md += [f"{split} split ({games.get(split, '?')} games per task type), {what} in %, mean ± SE over "
                   "seeds:", "",
                   "| algo | seeds | " + " | ".join(names.get(t, t) for t in types) + " | Avg |",
                   "|---|---|" + "---|" * (len(types) + 1)]
            for name, row in rows.items():
                label = "SFT start" if name == "sft_start" else name
                md.append(f"| {label} | {row['seeds']} | " + " | ".join(
                    fmt_mean_se(tuple(row[t][measure])) for t in types) + f" | {fmt_mean_se(tuple(row['average'][measure]))} |")
            if measure == "success":
                for algo, avg in PAPER_ALFWORLD_AVERAGE.items():
                    md.append(f"| paper {'RL4VLM' if algo == 'rl4vlm' else 'CoSo'} (7B, different scale) | n/a | "
                              + " | ".join("n/a" for _ in types) + f" | {avg:.1f} |")
            md.append("")
    md += [PAPER_ALFWORLD_NOTE, ""]
    return "\n".join(md)


def report(spec: GridSpec, out_dir: Path, tag: str, timings: dict[str, Any] | None,
           web_results: Path | None = None, alfworld_results: Path | None = None) -> dict[str, Any]:
    collected = collect(spec)
    table, curves = collected["table"], collected["curves"]
    panels = {env: {algo: runs for algo, runs in per_algo.items() if runs}
              for env, per_algo in curves.items() if any(per_algo.values())}
    web = web_panel(web_results) if web_results is not None else None
    if web is not None and panels:
        # x of this panel: online trajectories (DigiRL counts trajectories, not env steps).
        panels[WEB_PANEL] = web[0]
    alfworld = alfworld_panel(alfworld_results) if alfworld_results is not None else None
    if alfworld is not None and alfworld[0]:
        panels["ALFWorld (6 task types)"] = alfworld[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"paper_curves_{tag}.png"
    if panels:
        plots.plot_mean_se_panels(
            panels, png, ncols=2 if len(panels) > 1 else 1, xlabels={WEB_PANEL: "online trajectories"},
            title=f"{spec.preset} preset: success (mean ± SE over seeds)")
    history = read_json(_timings_path(spec)) or []
    if timings is None:  # --report_only: the latest invocation that trained something
        timings = history[-1] if history else {}
    wall = timings.get("grid_wall_s_this_invocation")
    run_walls = sum(_read_result(spec.run_dir(e, a, s)) is not None and
                    _read_result(spec.run_dir(e, a, s)).get("wall_s_this_invocation", 0.0) or 0.0
                    for e in spec.envs for a in spec.algos for s in spec.seeds)
    meta = {"device": device_description(),
            "wall_time": (f"{run_walls / 60:.1f} min summed over runs"
                          + ("" if wall is None else f"; this invocation {wall / 60:.1f} min"))}
    md = markdown(spec, table, meta)
    if web is not None:
        md += ("\n## Device control: web/general, DigiRL backbone (benchmarks/results/web_digirl_cpu.json)\n\n"
               "| algo | seeds | test success | online success |\n|---|---|---|---|\n")
        for algo, row in web[1].items():
            md += (f"| {algo} | {len(row['seeds'])} | {fmt_mean_se((row['test_success_mean'], row['test_success_se']))} | "
                   f"{fmt_mean_se((row['online_success_mean'], row['online_success_se']))} |\n")
    if alfworld is not None:
        md += alfworld_markdown(alfworld[1], str(alfworld_results))
    (out_dir / f"paper_curves_{tag}.md").write_text(md)
    payload = {
        "description": "gym_cards CoSo vs entropy vs none over seeds (benchmarks/paper_curves.py)",
        "grid": {"envs": list(spec.envs), "algos": list(spec.algos), "seeds": list(spec.seeds),
                 "preset": spec.preset, "overrides": dict(spec.overrides),
                 "eval_steps": spec.eval_steps, "peak_min_episodes": spec.peak_min_episodes},
        "config_example": spec.config(spec.envs[0], spec.algos[0], spec.seeds[0]).to_flat_dict(),
        "dtype": "float32",
        "table": table,
        "statements": [statement(env, row) for env, row in table.items()],
        "paper_peak_percent": PAPER_PEAK_PERCENT,
        "paper_gym_cards_average": PAPER_GYM_CARDS_AVERAGE,
        "paper_note": PAPER_NOTE,
        "timings": timings,
        "timings_all_invocations": history,
        "summed_run_wall_s": run_walls,
        "figure": png.name,
        "device_control": None if web is None else {"source": str(web_results), "summary": web[1]},
    }
    if alfworld is not None:  # only then: the payload is unchanged without the ALFWorld results
        payload["alfworld"] = {"source": str(alfworld_results), "table": alfworld[1].get("table"),
                               "task_types": alfworld[1].get("task_types"),
                               "eval": alfworld[1].get("eval"),
                               "paper_average_percent": PAPER_ALFWORLD_AVERAGE,
                               "paper_note": PAPER_ALFWORLD_NOTE}
    write_results(f"paper_curves_{tag}", payload, out_dir=out_dir)
    print(md)
    return payload


def parse_args(argv: Sequence[str] | None = None) -> tuple[GridSpec, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default=",".join(GYM_CARDS_ENVS))
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--seeds", default="5", help="a count N (seeds 0..N-1) or a list like 0,3,7")
    parser.add_argument("--preset", default="tiny_cpu", choices=PRESETS)
    parser.add_argument("--workdir", default=None, help="default runs/paper_curves (smoke: runs/paper_curves_smoke)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--tag", default=None, help="output name suffix (default: cpu, gpu or smoke)")
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--peak_min_episodes", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any PPOConfig field (flat or dotted name), for every run (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 tiny iterations per run")
    parser.add_argument("--report_only", action="store_true", help="only re-draw figure and tables")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    parser.add_argument("--web_results", default=str(RESULTS_DIR / "web_digirl_cpu.json"),
                        help="benchmarks.web --digirl JSON drawn as the device-control panel if it exists "
                             "('' for none)")
    parser.add_argument("--alfworld_results", default=str(RESULTS_DIR / "alfworld_compare_cpu.json"),
                        help="benchmarks.alfworld --compare JSON drawn as the ALFWorld panel and per-task-type "
                             "table if it exists ('' for none)")
    args = parser.parse_args(argv)

    def split(text, allowed, what):
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if not items or bad:
            parser.error(f"--{what}: unknown {bad or 'empty list'}; choose from {list(allowed)}")
        return items

    envs, algos = split(args.envs, GYM_CARDS_ENVS, "envs"), split(args.algos, ALGOS, "algos")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds must be a count or a comma-separated list of ints, got {args.seeds!r}")
    if args.smoke:
        seeds = seeds[:1] if args.seeds != "5" else (0,)
    if not seeds:
        parser.error("--seeds: need at least one seed")
    overrides = dict(SMOKE_OVERRIDES) if args.smoke else {}
    try:
        overrides.update(parse_overrides(args.set, PPOConfig))
    except ValueError as err:
        parser.error(str(err))
    eval_steps = args.eval_steps or (32 if args.smoke else 512)
    spec = GridSpec(envs=envs, algos=algos, seeds=seeds, preset=args.preset,
                    workdir=args.workdir or ("runs/paper_curves_smoke" if args.smoke else "runs/paper_curves"),
                    overrides=tuple(sorted(overrides.items())), eval_steps=eval_steps,
                    peak_min_episodes=1 if args.smoke else args.peak_min_episodes,
                    progress=not args.no_progress)
    try:
        spec.config(envs[0], algos[0], seeds[0])
    except (TypeError, ValueError) as err:
        parser.error(f"bad configuration: {err}")
    return spec, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the grid (unless --report_only) and writes the report. A user error (a busy or foreign run
    directory, a checkpoint from other settings, a missing file) exits with status 2 and one line."""
    from coso_jax.rl.run import exit_on_user_error

    logging.basicConfig(level=logging.WARNING)
    spec, args = parse_args(argv)
    return exit_on_user_error(lambda: _run(spec, args), debug=args.debug)


def _run(spec: GridSpec, args: argparse.Namespace) -> dict[str, Any]:
    timings = None if args.report_only else run_grid(spec)["timings"]
    import jax

    tag = args.tag or ("smoke" if args.smoke else ("cpu" if jax.devices()[0].platform == "cpu" else "gpu"))
    return report(spec, Path(args.out), tag, timings,
                  web_results=Path(args.web_results) if args.web_results and not args.smoke else None,
                  alfworld_results=(Path(args.alfworld_results) if args.alfworld_results and not args.smoke
                                    else None))


if __name__ == "__main__":
    main()
