"""The pre-registered alpha sweep of the paper comparison (issue #20; benchmarks/README.md): per game,
the arms entropy, coso and coso_soft (coso with `soft_backup=true`) at every alpha of {0.03, 0.1, 0.3, 1.0}
on the tuning seeds 100 and 101, under the grid's regime; the rule picks each (game, arm)'s alpha.

  python -m benchmarks.alpha_sweep                       # = python -m benchmarks.paper_curves --sweep
  python -m benchmarks.alpha_sweep --report_only         # re-apply the rule, re-draw table and figure
  python -m benchmarks.alpha_sweep --smoke --envs=NumberLine --arms=coso --alphas=0.03,0.1

Every run is an ordinary resumable PPOTrainer run under
``runs/paper_curves_sweep/<game>/<arm>/alpha_<a>/seed_<k>/`` (see benchmarks/paper_curves.py for the
runner: skipping of finished runs, resuming, one SFT start per game). No final evaluation: the rule
needs only each run's AUC (the mean of the windowed training success rate over the iterations).

**The rule** (`choose_alpha`): for each (game, arm), the mean AUC over the tuning seeds of each alpha;
the alpha with the largest mean wins, ties (within 1e-9) go to the smaller alpha. Only the tuning seeds'
runs are read, and an alpha missing any tuning seed's finished run leaves the (game, arm) without a
choice (the grid then refuses to run that arm).

Outputs (``--out``; ``--smoke``: the work directory): ``alpha_sweep_<tag>.json`` (per (game, arm, alpha)
the per-seed AUCs and their mean; the chosen alphas, which the grid reads), ``.md`` (the table) and
``.png`` (one panel per game: mean AUC vs alpha per arm, per-seed points, the chosen alpha starred).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from benchmarks import paper_curves as pc
from benchmarks._common import device_description, read_json, write_results
from coso_jax import metrics as metrics_lib

TIE_TOLERANCE = 1e-9
RULE = ("per (game, arm): the alpha with the largest mean AUC over the tuning seeds {seeds}; ties (within "
        f"{TIE_TOLERANCE:g}) go to the smaller alpha; only the tuning seeds' runs count, and every alpha needs a "
        "finished run on every tuning seed")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    envs: tuple[str, ...] = pc.GYM_CARDS_ENVS
    arms: tuple[str, ...] = pc.SWEPT_ARMS
    alphas: tuple[float, ...] = pc.PREREGISTERED_ALPHAS
    seeds: tuple[int, ...] = pc.TUNING_SEEDS  # the seeds this invocation runs
    tuning_seeds: tuple[int, ...] = pc.TUNING_SEEDS  # the seeds the rule reads
    preset: str = "tiny_cpu"
    workdir: str = pc.SWEEP_WORKDIR
    overrides: tuple[tuple[str, Any], ...] = pc.REGIME
    per_game: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # the start rule's, on top per game
    progress: bool = True
    smoke: bool = False

    def config(self, env: str, arm: str, alpha: float, seed: int):
        return pc.arm_config(self.preset, env, arm, seed, alpha, pc.game_overrides(self.overrides, self.per_game, env))

    def run_dir(self, env: str, arm: str, alpha: float, seed: int) -> Path:
        return Path(self.workdir) / env / arm / f"alpha_{alpha:g}" / f"seed_{seed}"

    def items(self) -> list[pc.RunItem]:
        # Seed-major, then game, arm, alpha: a time-boxed sweep finishes whole seeds first.
        return [pc.RunItem(env, arm, seed, alpha, self.run_dir(env, arm, alpha, seed),
                           self.config(env, arm, alpha, seed))
                for seed in self.seeds for env in self.envs for arm in self.arms for alpha in self.alphas]


def choose_alpha(records: Iterable[Mapping[str, Any]], alphas: Sequence[float],
                 tuning_seeds: Sequence[int]) -> tuple[float | None, dict[float, float]]:
    """The pre-registered rule on one (game, arm)'s runs, given as records {"alpha", "seed", "auc"}.

    Returns (chosen alpha or None, {alpha: mean AUC over the tuning seeds} for the alphas that have every
    tuning seed). Records of other seeds or other alphas are ignored; None when any alpha lacks a tuning
    seed's finite AUC. The largest mean wins; ties (within TIE_TOLERANCE) go to the smaller alpha.
    """
    tuning = set(int(s) for s in tuning_seeds)
    aucs: dict[tuple[float, int], float] = {}
    for record in records:
        seed, auc = int(record["seed"]), record.get("auc")
        match = [a for a in alphas if math.isclose(float(record["alpha"]), a, rel_tol=1e-9)]
        if seed in tuning and match and auc is not None and math.isfinite(float(auc)):
            aucs[(match[0], seed)] = float(auc)
    means = {a: float(np.mean([aucs[(a, s)] for s in sorted(tuning)]))
             for a in alphas if all((a, s) in aucs for s in tuning)}
    if not tuning or len(means) < len(alphas):
        return None, means
    best = max(means.values())
    return min(a for a in means if means[a] >= best - TIE_TOLERANCE), means


def collect(spec: SweepSpec) -> dict[str, Any]:
    """Every finished tuning-seed run of the sweep: per (game, arm, alpha) the per-seed AUCs, their mean,
    and per (game, arm) the rule's choice."""
    table: dict[str, dict[str, Any]] = {}
    chosen: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list]] = {}
    for env in spec.envs:
        table[env] = {}
        for arm in spec.arms:
            records = []
            for alpha in spec.alphas:
                for seed in spec.tuning_seeds:  # the rule reads the tuning seeds only
                    run_dir = spec.run_dir(env, arm, alpha, seed)
                    if pc._read_result(run_dir) is None:
                        continue
                    records.append({"alpha": alpha, "seed": seed,
                                    "auc": pc.auc(metrics_lib.read_jsonl(run_dir / "metrics.jsonl"))})
            choice, means = choose_alpha(records, spec.alphas, spec.tuning_seeds)
            per_alpha = {}
            for alpha in spec.alphas:
                per_seed = {str(r["seed"]): r["auc"] for r in records if r["alpha"] == alpha}
                finite = [v for v in per_seed.values() if math.isfinite(v)]
                per_alpha[f"{alpha:g}"] = {"alpha": alpha, "per_seed_auc": per_seed, "seeds": len(per_seed),
                                           "mean_auc": means.get(alpha, float(np.mean(finite)) if finite else None),
                                           "complete": alpha in means}
            table[env][arm] = {"alphas": per_alpha, "chosen_alpha": choice, "complete": choice is not None}
            curves.setdefault(env, {})[arm] = records
            if choice is not None:
                chosen.setdefault(env, {})[arm] = choice
    return {"table": table, "chosen": chosen, "records": curves}


def markdown(spec: SweepSpec, table: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    pre = preregistered(spec)
    lines = [
        f"# Alpha sweep ({spec.preset} preset, regime {pc.fmt_regime(spec.overrides, spec.per_game)}"
        f"{', smoke' if spec.smoke else ''})",
        "",
        f"Mean AUC in % (the mean of the windowed training success rate over the iterations) over the tuning "
        f"seeds {list(spec.tuning_seeds)}; (n) finished seeds. Rule: {RULE.format(seeds=list(spec.tuning_seeds))}. "
        f"{'As pre-registered in benchmarks/README.md.' if pre else '**Not the pre-registered alphas or seeds.**'} "
        f"Device: {meta['device']['platform']} ({meta['device']['cpu_count']} cores); "
        f"{meta['run_wall_s'] / 60:.1f} min summed over runs.",
        "",
        "| game | arm | " + " | ".join(f"alpha {a:g}" for a in spec.alphas) + " | chosen |",
        "|---|---|" + "---|" * (len(spec.alphas) + 1),
    ]
    for env, per_arm in table.items():
        for arm, row in per_arm.items():
            cells = []
            for alpha in spec.alphas:
                cell = row["alphas"][f"{alpha:g}"]
                text = "n/a" if cell["mean_auc"] is None else f"{100 * cell['mean_auc']:.1f} ({cell['seeds']})"
                cells.append(f"**{text}**" if row["chosen_alpha"] == alpha else text)
            choice = "incomplete" if row["chosen_alpha"] is None else f"{row['chosen_alpha']:g}"
            lines.append(f"| {env} | {arm} | " + " | ".join(cells) + f" | {choice} |")
    return "\n".join(lines) + "\n"


def preregistered(spec: SweepSpec) -> bool:
    return (tuple(spec.alphas) == pc.PREREGISTERED_ALPHAS and tuple(spec.tuning_seeds) == pc.TUNING_SEEDS
            and not spec.smoke)


def plot(spec: SweepSpec, collected: Mapping[str, Any], out_png: Path) -> Path | None:
    """One panel per game: mean AUC vs alpha (log x) per arm, the tuning seeds' AUCs as points, a star
    on the chosen alpha."""
    from matplotlib.figure import Figure

    envs = [env for env in spec.envs if any(collected["records"][env][arm] for arm in spec.arms)]
    if not envs:
        return None
    ncols = 2 if len(envs) > 1 else 1
    nrows = -(-len(envs) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), dpi=120)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, env in zip(axes, envs):
        for i, arm in enumerate(spec.arms):
            row = collected["table"][env][arm]
            color = f"C{i}"
            xs = [a for a in spec.alphas if row["alphas"][f"{a:g}"]["mean_auc"] is not None]
            ax.plot(xs, [row["alphas"][f"{a:g}"]["mean_auc"] for a in xs], "-o", color=color, label=arm)
            for record in collected["records"][env][arm]:
                ax.plot([record["alpha"]], [record["auc"]], ".", color=color, alpha=0.4)
            if row["chosen_alpha"] is not None:
                ax.plot([row["chosen_alpha"]], [row["alphas"][f"{row['chosen_alpha']:g}"]["mean_auc"]], "*",
                        color=color, markersize=16, markeredgecolor="black")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(spec.alphas), [f"{a:g}" for a in spec.alphas])
        ax.set_xlabel("alpha")
        ax.set_ylabel("AUC (mean training success)")
        ax.set_title(env)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for ax in axes[len(envs):]:
        ax.set_visible(False)
    fig.suptitle(f"Alpha sweep: mean AUC over\ntuning seeds {list(spec.tuning_seeds)} (star: chosen)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_png)
    return out_png


def report(spec: SweepSpec, out_dir: Path, tag: str, timings: dict[str, Any] | None) -> dict[str, Any]:
    collected = collect(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(spec, collected, out_dir / f"alpha_sweep_{tag}.png")
    history = read_json(pc._timings_path(spec.workdir)) or []
    if timings is None:
        timings = history[-1] if history else {}
    results = [pc._read_result(spec.run_dir(e, a, al, s)) for e in spec.envs for a in spec.arms
               for al in spec.alphas for s in spec.tuning_seeds]
    run_walls = sum(r.get("wall_s_this_invocation", 0.0) or 0.0 for r in results if r is not None)
    md = markdown(spec, collected["table"], {"device": device_description(), "run_wall_s": run_walls})
    (out_dir / f"alpha_sweep_{tag}.md").write_text(md)
    payload = {
        "description": "alpha sweep of the paper comparison (benchmarks/alpha_sweep.py; benchmarks/README.md)",
        "rule": RULE.format(seeds=list(spec.tuning_seeds)),
        "preregistered": preregistered(spec),
        "smoke": spec.smoke,
        "envs": list(spec.envs), "arms": list(spec.arms), "alphas": list(spec.alphas),
        "tuning_seeds": list(spec.tuning_seeds),
        "regime": dict(pc.REGIME),
        # The grid refuses alphas chosen under other settings than its own.
        "settings": pc.settings_of(spec.preset, spec.overrides, spec.per_game),
        "start_rule": {env: dict(fields) for env, fields in spec.per_game},
        "table": collected["table"],
        "chosen": collected["chosen"],
        "timings": timings,
        "timings_all_invocations": history,
        "summed_run_wall_s": run_walls,
        "figure": None if png is None else png.name,
    }
    write_results(f"alpha_sweep_{tag}", payload, out_dir=out_dir)
    print(md)
    return payload


def run(spec: SweepSpec, out_dir: Path, tag: str, *, report_only: bool = False) -> dict[str, Any]:
    timings = None if report_only else pc.run_items(spec.items(), workdir=spec.workdir, eval_steps=0,
                                                    progress=spec.progress, desc="alpha_sweep")
    return report(spec, out_dir, tag, timings)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.paper_curves --sweep ...`."""
    import sys

    return pc.main(["--sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
