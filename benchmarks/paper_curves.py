"""The paper's gym_cards comparison (issue #20, pre-registered in benchmarks/README.md): CoSo vs entropy vs
none over paired seeds, from one SFT start per game, at the alpha an alpha sweep chose.

  python -m benchmarks.paper_curves --starts              # 0. the start rule: each game's sft_epochs, from its
                                                          #    SFT start's success alone -> start_rule_cpu.*
  python -m benchmarks.paper_curves --sweep               # 1. the alpha sweep: 4 games x 3 arms x 4 alphas
                                                          #    x tuning seeds 100, 101 -> alpha_sweep_cpu.*
  python -m benchmarks.paper_curves                       # 2. the main grid at the chosen alphas: 4 games x
                                                          #    none/entropy/coso[/coso_soft] + entropy_x10,
                                                          #    coso_x10 x seeds 0-7 -> paper_curves_cpu.*
  python -m benchmarks.paper_curves --report_only         # re-draw figures and tables from runs/
  python -m benchmarks.paper_curves --sweep --report_only # re-apply the alpha rule, re-draw the sweep
  python -m benchmarks.paper_curves --sweep --smoke --envs=NumberLine --arms=coso --alphas=0.03,0.1
  python -m benchmarks.paper_curves --smoke --envs=NumberLine --arms=coso   # (after the smoke sweep)

`python -m benchmarks.alpha_sweep ...` is the same as `python -m benchmarks.paper_curves --sweep ...`.

**The regime** (`REGIME`): every run of the sweep and of the grid, every game and arm, samples at
`temperature=1.0` from an SFT start of `sft_epochs=3`; all other `tiny_cpu` settings as committed.
**The start rule** (`benchmarks/start_rule.py`, an addendum written before the grid) then raises a game's
`sft_epochs` through 5, 10, 20 when its start succeeds < 10% or answers invalidly > 50%; the sweep and the
grid read each game's value from ``start_rule_<tag>.json`` (``--starts_from``) and refuse to start without it
(a smoke reads none).

**Arms** (`ARMS`): `none`, `entropy`, `coso` (the algos), `coso_soft` (coso with `soft_backup=true`,
issue #21), and the exploration arms `entropy_x10` / `coso_x10` (entropy / coso at 10x the alpha the
sweep chose for that game). The sweep runs `entropy`, `coso` and `coso_soft`; `none` has no alpha.

**The sweep** (`benchmarks/alpha_sweep.py`): every run under
``runs/paper_curves_sweep/<game>/<arm>/alpha_<a>/seed_<k>/``; the rule picks, per (game, arm), the alpha
with the largest mean AUC over the tuning seeds 100 and 101 (ties to the smaller alpha), computed from
those seeds' runs only. Writes ``alpha_sweep_<tag>.{json,md,png}``.

**The grid**: every (game, arm, seed) run under ``<workdir>/<game>/<arm>/seed_<k>/``; alphas from the
sweep's JSON (``--alphas_from``, default ``<out>/alpha_sweep_<tag>.json``; the grid refuses to start
without it, or with a sweep run under other settings). Paired: every arm of a seed starts from the same
SFT start (one per game) and trains on the same env seeds (the run's seed). Endpoints per run: **AUC**,
the mean of the windowed training success rate (metrics.jsonl's `success_rate`) over the iterations, and
**final success**, `PPOTrainer.evaluate(eval_steps=512)` after the last update. The report gives mean ±
SE per (game, arm), the paired differences coso - entropy, coso - none and coso_soft - coso (per seed,
then their mean) with a 10,000-resample bootstrap 95% CI (fixed seed, `_common.bootstrap_mean_ci`), and
calls a difference "separated" only when that interval excludes 0. A separate, post hoc section (not
pre-registered, no separation claimed from it) pairs a uniform-entropy arm with a CoSo arm wherever the
two ran a game at the same alpha (the chosen alphas and their 10x can coincide): the paper's claim that at
equal weight uniform entropy breaks the answer format first.

The start's own success (the "SFT start" column) comes from the grid's evaluation of it (512 env steps,
written with the first run) or, with ``--start_eval_steps N`` (also with ``--report_only``), from a longer
evaluation of the same cached start on N env steps (``<workdir>/sft_eval_<game>_<N>_steps.json``, once): the
one with more episodes is reported, with its binomial standard error.

Runs are resumable: a run that finished has ``result.json`` (with its settings' fingerprint) and is
skipped on the next invocation; one with settings other than the current ones stops the grid with one
line; an interrupted run resumes from its last checkpoint. All runs of a game share one cached SFT start
(``<workdir>/sft/``) and, within one process, the compiled steps (module-level jits).

Outputs (``--out``, default ``benchmarks/results/``; with ``--smoke`` the run directory, so a smoke
never touches the committed results): ``paper_curves_<tag>.png`` (one panel per game, success vs env
steps, mean ± SE over seeds, arms none/entropy/coso/coso_soft), ``paper_curves_exploration_<tag>.png``
(per game, training success and invalid-action rate of entropy and coso at the chosen alpha and at 10x),
``paper_curves_<tag>.json`` and ``.md`` (per (game, arm) AUC, final success, peak, invalid-action rates;
the paired differences and their intervals; the exploration table; the paper's numbers for reference).

Other benchmarks' JSON, where it exists, adds a panel and a table: `--web_results` (device control,
`benchmarks.web --digirl`) and `--alfworld_results` (ALFWorld, `benchmarks.alfworld --compare`).

Success measures (all over episodes, success = return > 0, as RL4VLM):
  * ``train``: the trainer's curve, success over the last `success_window` finished training episodes;
  * ``auc``: the mean of ``train`` over the run's iterations (iterations with no finished episode yet,
    whose ``train`` is undefined, are left out);
  * ``final``: the final policy on fresh evaluation envs (``--eval_steps`` steps, training temperature);
  * ``peak``: the maximum of the ``train`` curve once >= ``--peak_min_episodes`` training episodes
    have finished (RL4VLM reports peak success within the step budget).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from benchmarks._common import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    RESULTS_DIR,
    bootstrap_mean_ci,
    device_description,
    fmt_mean_se,
    parse_seeds,
    read_json,
    shown_path,
    write_json_atomic,
    write_results,
)
from coso_jax import metrics as metrics_lib
from coso_jax import plots
from coso_jax.rl.config import (
    GYM_CARDS_ENVS,
    PRESETS,
    ConfigError,
    PPOConfig,
    field_differences,
    parse_overrides,
    ppo_preset,
)

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

# ------------------------------------------------------------------------------- pre-registration
# benchmarks/README.md, "Pre-registration of the paper comparison (issue #20)".
REGIME: tuple[tuple[str, Any], ...] = (("sft_epochs", 3), ("temperature", 1.0))
PREREGISTERED_ALPHAS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
TUNING_SEEDS: tuple[int, ...] = (100, 101)  # the sweep's; never used by the main grid
GRID_SEEDS: tuple[int, ...] = tuple(range(8))
EXPLORATION_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the comparison: an algo, optionally with CoSo's soft backup, at the alpha the sweep chose
    for the swept arm `alpha_from` (times `alpha_factor`); `alpha_from` None: no alpha (`none`)."""

    algo: str
    soft_backup: bool = False
    alpha_from: str | None = None
    alpha_factor: float = 1.0


ARMS: dict[str, Arm] = {
    "none": Arm("none"),
    "entropy": Arm("entropy", alpha_from="entropy"),
    "coso": Arm("coso", alpha_from="coso"),
    "coso_soft": Arm("coso", soft_backup=True, alpha_from="coso_soft"),
    "entropy_x10": Arm("entropy", alpha_from="entropy", alpha_factor=EXPLORATION_FACTOR),
    "coso_x10": Arm("coso", alpha_from="coso", alpha_factor=EXPLORATION_FACTOR),
}
SWEPT_ARMS = ("entropy", "coso", "coso_soft")
# The grid's arms; coso_soft joins them when the sweep chose an alpha for it.
GRID_ARMS = ("none", "entropy", "coso", "entropy_x10", "coso_x10")
WEB_RESULTS_DEFAULT = str(RESULTS_DIR / "web_digirl_cpu.json")
ALFWORLD_RESULTS_DEFAULT = str(RESULTS_DIR / "alfworld_compare_cpu.json")
CURVE_ARMS = ("none", "entropy", "coso", "coso_soft")  # the main figure's lines
EXPLORATION_ARMS = ("entropy", "entropy_x10", "coso", "coso_x10")
COMPARISONS = (("coso", "entropy"), ("coso", "none"), ("coso_soft", "coso"))  # paired: a - b per seed
ENDPOINTS = {"auc": "AUC (mean training success)", "final": "final success (evaluate)"}
# Post hoc, not pre-registered: pairs of a uniform-entropy arm and a CoSo arm that ran at the same alpha
# in a game (the chosen alphas and their 10x can coincide), compared on these endpoints.
SAME_ALPHA_ARMS = (("entropy", "entropy_x10"), ("coso", "coso_x10"))
SAME_ALPHA_ENDPOINTS = ("auc", "final", "final_invalid")
PREREGISTERED_PAIRS = frozenset(f"{a} - {b}" for a, b in COMPARISONS)
# Set by the grid itself (its axes), never through --set.
GRID_FIELDS = ("env", "algo", "seed", "alpha", "causal.alpha", "soft_backup", "progress")

# The smoke grid: the trainer test's tiny settings, two iterations of 16 env steps, on top of the regime
# (its temperature stays; 16 demonstrations need the trainer test's 6 SFT epochs to answer in format).
SMOKE_OVERRIDES = dict(
    sft_episodes=16, sft_epochs=6, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2,
    causal_batch=64, causal_minibatch=64, num_envs=4, steps_per_update=16, minibatch_size=8,
    total_env_steps=32, ppo_epochs=1, checkpoint_every=1, heatmap_every=2,
)


def arm_config(preset: str, env: str, arm: str, seed: int, alpha: float | None,
               overrides: Iterable[tuple[str, Any]]) -> PPOConfig:
    """The PPOConfig of one run: `preset`, then `overrides` (the regime, smoke sizes, --set), then the arm's
    algo, soft backup and alpha, the env and the seed."""
    spec = ARMS[arm]
    values = dict(overrides)
    values.update(env=env, algo=spec.algo, seed=seed, progress=False)
    if spec.soft_backup:
        values["soft_backup"] = True
    if alpha is not None:
        values["alpha"] = float(alpha)
    return ppo_preset(preset, **values)


def fmt_regime(overrides: Iterable[tuple[str, Any]],
               per_game: Iterable[tuple[str, Iterable[tuple[str, Any]]]] = ()) -> str:
    """The regime's fields as this grid sets them ("sft_epochs=3, temperature=1.0"; a smoke's sizes differ),
    then the start rule's per-game fields ("; start rule: EZPoints sft_epochs=10")."""
    values = dict(overrides)
    text = ", ".join(f"{k}={values.get(k, v)}" for k, v in REGIME)
    games = [f"{env} " + ", ".join(f"{k}={v}" for k, v in fields) for env, fields in per_game]
    return text + ("; start rule: " + "; ".join(games) if games else "")


def fmt_alpha(alpha: float | None) -> str:
    return "-" if alpha is None else f"{alpha:g}"


# ------------------------------------------------------------------------------------- endpoints
def _by_step(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per iteration (a step written twice keeps its last record), in step order."""
    out: dict[int, Mapping[str, Any]] = {}
    for i, record in enumerate(records):
        out[int(record.get("step", i + 1))] = record
    return [out[k] for k in sorted(out)]


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def auc(records: Iterable[Mapping[str, Any]]) -> float:
    """The AUC endpoint: the mean of the windowed training success rate (`success_rate`) over the run's
    iterations, i.e. the area under the success-vs-env-steps curve divided by its length (iterations
    are equally spaced in env steps). An iteration before any episode finished (success_rate null/NaN)
    is left out; nan when none is left."""
    ys = _finite(r.get("success_rate") for r in _by_step(records))
    return float(np.mean(ys)) if ys else float("nan")


def mean_over_iterations(records: Iterable[Mapping[str, Any]], key: str) -> float:
    ys = _finite(r.get(key) for r in _by_step(records))
    return float(np.mean(ys)) if ys else float("nan")


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """a - b over the seeds both have (finite values): the per-seed differences, their mean and its
    percentile bootstrap 95% CI; `separated` only when there are >= 2 pairs and the CI excludes 0."""
    seeds = sorted(s for s in set(a) & set(b) if all(v is not None and math.isfinite(v) for v in (a[s], b[s])))
    diffs = [a[s] - b[s] for s in seeds]
    mean, low, high = bootstrap_mean_ci(diffs, resamples=resamples, seed=seed)
    separated = len(diffs) >= 2 and (low > 0 or high < 0)
    return {"n": len(diffs), "mean": mean, "ci95": [low, high], "separated": bool(separated),
            "direction": (">" if low > 0 else "<") if separated else "~",
            "per_seed": {str(s): d for s, d in zip(seeds, diffs)}}


# ------------------------------------------------------------------------------------------ grid
@dataclasses.dataclass(frozen=True)
class RunItem:
    """One run to train (or skip): where it lives and its config."""

    env: str
    arm: str
    seed: int
    alpha: float | None
    run_dir: Path
    config: PPOConfig

    @property
    def label(self) -> str:
        return f"{self.env}/{self.arm}/seed_{self.seed}" + ("" if self.alpha is None else f" (alpha {self.alpha:g})")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    envs: tuple[str, ...] = GYM_CARDS_ENVS
    algos: tuple[str, ...] = GRID_ARMS  # the arms (ARMS' names)
    seeds: tuple[int, ...] = GRID_SEEDS
    preset: str = "tiny_cpu"
    workdir: str = "runs/paper_curves"
    overrides: tuple[tuple[str, Any], ...] = REGIME  # regime (+ smoke sizes) (+ --set), sorted
    per_game: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # the start rule's, on top per game
    eval_steps: int = 512
    peak_min_episodes: int = 50
    progress: bool = True
    # The sweep's choices: (game, swept arm, alpha), and the JSON they came from.
    alphas: tuple[tuple[str, str, float], ...] = ()
    alphas_source: str = ""

    def alpha(self, env: str, arm: str) -> float | None:
        """The arm's alpha on `env` (None for `none`); ConfigError if the sweep chose none for it."""
        spec = ARMS[arm]
        if spec.alpha_from is None:
            return None
        for e, swept, value in self.alphas:
            if e == env and swept == spec.alpha_from:
                return value * spec.alpha_factor
        source = self.alphas_source or "(no alpha sweep given)"
        raise ConfigError(f"the alpha sweep {source} chose no alpha for {env}/{spec.alpha_from}: finish the "
                          "sweep (python -m benchmarks.paper_curves --sweep) or leave that arm out (--arms)")

    def alpha_or_none(self, env: str, arm: str) -> float | None:
        try:
            return self.alpha(env, arm)
        except ConfigError:
            return None

    def config(self, env: str, algo: str, seed: int) -> PPOConfig:
        return arm_config(self.preset, env, algo, seed, self.alpha(env, algo),
                          game_overrides(self.overrides, self.per_game, env))

    def run_dir(self, env: str, algo: str, seed: int) -> Path:
        return Path(self.workdir) / env / algo / f"seed_{seed}"

    def items(self) -> list[RunItem]:
        # Seed-major order: an interrupted or time-boxed grid still holds every game and arm with as
        # many seeds as it got through.
        return [RunItem(env, arm, seed, self.alpha(env, arm), self.run_dir(env, arm, seed),
                        self.config(env, arm, seed))
                for seed in self.seeds for env in self.envs for arm in self.algos]


def run_items(items: Sequence[RunItem], *, workdir: str | Path, eval_steps: int, progress: bool,
              desc: str) -> dict[str, Any]:
    """Trains (or resumes, or skips) every run; returns the invocation's timings (also appended to
    <workdir>/grid_timings.json when something trained). With `eval_steps` > 0 each run ends with
    `evaluate(eval_steps)` and each game's SFT start is evaluated once (<workdir>/sft_eval_<game>.json).

    SFT starts are cached per game; compiled steps are shared by every run of the process with the
    same shapes (module-level jits), i.e. per game."""
    from coso_jax.rl.ppo.trainer import PPOTrainer

    done = {item.label: _finished(item) for item in items}
    bar = metrics_lib.progress_bar(len(items), desc=desc, disable=not progress,
                                   initial=sum(r is not None for r in done.values()))
    timings = {"runs_trained": 0, "runs_skipped": sum(r is not None for r in done.values()),
               "run_wall_s": {}, "sft_eval_wall_s": {}}
    start = time.perf_counter()
    try:
        for item in [item for item in items if done[item.label] is None]:
            config = item.config.replace(sft_dir=str(_sft_dir(workdir, item.config)))
            checkpoints = item.run_dir / "checkpoints"
            resume = checkpoints.is_dir() and any(checkpoints.iterdir())
            bar.set_scalars({"run": item.label + (" (resumed)" if resume else "")})
            t0 = time.perf_counter()
            trainer = PPOTrainer(config, item.run_dir, resume=resume)
            final = None
            try:
                sft_eval_path = Path(workdir) / f"sft_eval_{item.env}.json"
                if eval_steps > 0 and not sft_eval_path.exists():
                    # The SFT start's success, on the same evaluation envs as every final policy.
                    t_eval = time.perf_counter()
                    sft_eval = dict(trainer.evaluate(eval_steps), sft=trainer.start_summary)
                    write_json_atomic(sft_eval_path, sft_eval)
                    timings["sft_eval_wall_s"][item.env] = time.perf_counter() - t_eval
                trainer.train()
                if eval_steps > 0:
                    final = trainer.evaluate(eval_steps)
            finally:
                trainer.close()
            records = metrics_lib.read_jsonl(item.run_dir / "metrics.jsonl")
            arm = ARMS[item.arm]
            result = {"env": item.env, "arm": item.arm, "algo": arm.algo, "soft_backup": arm.soft_backup,
                      "alpha": item.alpha, "seed": item.seed, "auc": auc(records), "final_eval": final,
                      "env_steps": trainer.rollout.total_env_steps,
                      "wall_s_this_invocation": time.perf_counter() - t0,
                      "resume_fingerprint": item.config.resume_fingerprint(),
                      "config_fields": item.config.resume_fields()}
            write_json_atomic(item.run_dir / "result.json", result)
            done[item.label] = result
            timings["runs_trained"] += 1
            timings["run_wall_s"][item.label] = result["wall_s_this_invocation"]
            shown = {"auc": result["auc"]} if final is None else {"final": final["success_rate"]}
            bar.update(1, shown)
            print(f"{item.label}: AUC {result['auc']:.3f}"
                  + ("" if final is None else f", final success {final['success_rate']:.3f}")
                  + f" ({result['wall_s_this_invocation']:.0f} s)", flush=True)
    finally:
        bar.close()
    timings["grid_wall_s_this_invocation"] = time.perf_counter() - start
    if timings["runs_trained"]:
        _record_invocation(workdir, timings)
    return timings


def run_grid(spec: GridSpec) -> dict[str, Any]:
    """Runs (or resumes, or skips) every run of the grid; returns its timings."""
    return {"timings": run_items(spec.items(), workdir=spec.workdir, eval_steps=spec.eval_steps,
                                 progress=spec.progress, desc="paper_curves")}


def _finished(item: RunItem) -> dict[str, Any] | None:
    """The run's result.json if it finished under the current settings; None if it has not finished
    (or was extended: fewer env steps than the config's); RunError if it finished under other settings."""
    from coso_jax.rl.run import RunError

    result = _read_result(item.run_dir)
    if result is None:
        return None
    if result.get("resume_fingerprint") != item.config.resume_fingerprint():
        stored = result.get("config_fields")
        diffs = (field_differences(stored, item.config.resume_fields()) if stored
                 else ["settings not recorded (written by an older grid)"])
        raise RunError(f"{item.run_dir} finished under other settings ({'; '.join(diffs[:3])}"
                       f"{'; ...' if len(diffs) > 3 else ''}): move it away or use another --workdir")
    if int(result.get("env_steps", 0)) < item.config.total_env_steps:
        return None
    return result


def _timings_path(workdir: str | Path) -> Path:
    return Path(workdir) / "grid_timings.json"


def _record_invocation(workdir: str | Path, timings: dict[str, Any]) -> None:
    """Appends one invocation's timings to <workdir>/grid_timings.json, so `--report_only` (and a
    later report) still states how long the grid took."""
    path = _timings_path(workdir)
    history = read_json(path) or []
    history.append(dict(timings, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        load_avg_1min=os.getloadavg()[0]))
    write_json_atomic(path, history)


def _sft_dir(workdir: str | Path, config: PPOConfig) -> Path:
    return Path(workdir) / "sft" / f"{config.env}-{config.preset}-{config.start_fingerprint()[:10]}"


def evaluate_start(config: PPOConfig, workdir: str | Path, eval_steps: int, run_dir: str | Path, *,
                   seed: int | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`PPOTrainer.evaluate(eval_steps)` (at `seed`, else the trainer's evaluation seed) of `config`'s SFT
    start, cached under <workdir>/sft (built there first if missing), by a fresh trainer writing to `run_dir`;
    returns the evaluation and the start's summary."""
    from coso_jax.rl.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(config.replace(sft_dir=str(_sft_dir(workdir, config))), run_dir, resume=False)
    try:
        measured = trainer.evaluate(eval_steps) if seed is None else trainer.evaluate(eval_steps, seed=seed)
        return measured, trainer.start_summary
    finally:
        trainer.close()


def _read_result(run_dir: Path) -> dict[str, Any] | None:
    return read_json(run_dir / "result.json")


def settings_of(preset: str, overrides: Iterable[tuple[str, Any]],
                per_game: Iterable[tuple[str, Iterable[tuple[str, Any]]]] = ()) -> dict[str, Any]:
    """What a sweep and the grid that uses its alphas must share: the preset, every override and the start
    rule's per-game overrides (the key is left out when there are none, as before the start rule)."""
    out: dict[str, Any] = {"preset": preset, "overrides": {k: v for k, v in sorted(dict(overrides).items())}}
    games = {env: dict(fields) for env, fields in per_game}
    if games:
        out["per_game"] = {env: games[env] for env in sorted(games)}
    return out


def settings_key(settings: Mapping[str, Any]) -> str:
    return json.dumps(dict(settings), sort_keys=True)


def settings_differences(stored: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """The fields in which two `settings_of` records differ, named as a user sets them ("--set x: a -> b")."""
    flat = lambda s: {"preset": s.get("preset"), **{f"--set {k}": v for k, v in s.get("overrides", {}).items()},
                      **{f"start rule {e}.{k}": v for e, f in s.get("per_game", {}).items() for k, v in f.items()}}
    return field_differences(flat(stored), flat(settings))


def game_overrides(overrides: Iterable[tuple[str, Any]], per_game: Iterable[tuple[str, Iterable[tuple[str, Any]]]],
                   env: str) -> tuple[tuple[str, Any], ...]:
    """`overrides` with the start rule's fields for `env` on top (`start_rule.load_per_game`)."""
    values = dict(overrides)
    values.update(dict(dict(per_game).get(env, ())))
    return tuple(sorted(values.items()))


def read_input_json(path: str | Path, what: str, required: Sequence[str] = ()) -> Any:
    """A JSON file given to this script (`what`: what it should be), or None if there is no such file;
    ConfigError with one line if it is not JSON or lacks one of the `required` top-level keys."""
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path} is not a valid JSON file ({e}): pass {what}") from None
    if data is not None:
        missing = list(required) if not isinstance(data, dict) else [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{path} is not {what} (it has no {', '.join(repr(k) for k in missing)})")
    return data


def load_alphas(path: str | Path, settings: Mapping[str, Any], *, smoke: bool) -> tuple[tuple[str, str, float], ...]:
    """The sweep's chosen alphas from its JSON as (game, swept arm, alpha); ConfigError with one line if
    the file is missing, is not a sweep's JSON or the sweep ran under other settings than `settings`."""
    data = read_input_json(path, "the alpha sweep's JSON (alpha_sweep_<tag>.json, written by --sweep)",
                           ("settings", "chosen"))
    if data is None:
        raise ConfigError(f"no alpha sweep at {path}: run `python -m benchmarks.paper_curves --sweep"
                          f"{' --smoke' if smoke else ''}` first (or pass --alphas_from)")
    stored = data.get("settings", {})
    if settings_key(stored) != settings_key(settings):
        diffs = settings_differences(stored, settings)
        raise ConfigError(f"the alpha sweep {path} ran under other settings than this grid ({'; '.join(diffs[:3])}): "
                          "rerun the sweep with the grid's settings or pass another --alphas_from")
    return tuple((env, arm, float(alpha)) for env, per_arm in data.get("chosen", {}).items()
                 for arm, alpha in per_arm.items())


# ------------------------------------------------------------------------------------------ report
mean_se = metrics_lib.mean_and_se  # (mean, standard error) of finite values


def start_eval_path(workdir: str | Path, env: str, eval_steps: int | None = None) -> Path:
    """Where a game's SFT start evaluation lives: the grid's own (`eval_steps` None, written with the first
    run) or a longer one of `eval_steps` env steps (`--start_eval_steps`)."""
    suffix = "" if eval_steps is None else f"_{eval_steps}_steps"
    return Path(workdir) / f"sft_eval_{env}{suffix}.json"


def start_measurement(workdir: str | Path, env: str) -> dict[str, Any] | None:
    """The game's SFT start evaluation with the most episodes (the grid's, or a longer one), or None."""
    pattern = re.compile(rf"sft_eval_{re.escape(env)}(_\d+_steps)?\.json")  # not another game's whose name
    found = [read_json(p) for p in sorted(Path(workdir).glob(f"sft_eval_{env}*.json"))  # starts with env
             if pattern.fullmatch(p.name)]
    found = [f for f in found if f is not None]
    return max(found, key=lambda f: f.get("episodes", 0)) if found else None


def measure_starts(spec: GridSpec, eval_steps: int) -> dict[str, dict[str, Any]]:
    """Evaluates each game's cached SFT start on `eval_steps` env steps (the same evaluation as every final
    policy, longer, so the start's success has a smaller standard error) and writes
    <workdir>/sft_eval_<game>_<eval_steps>_steps.json; a game already measured at that length is read back.
    ConfigError if a game's start has not been built (run the grid first)."""
    import tempfile

    out = {}
    for env in spec.envs:
        path = start_eval_path(spec.workdir, env, eval_steps)
        config = spec.config(env, "none", spec.seeds[0])
        sft_dir = _sft_dir(spec.workdir, config)
        if (done := read_json(path)) is not None and done.get("start") == sft_dir.name:
            out[env] = done  # measured before, of this start (another start's measurement is redone)
            continue
        if not (sft_dir / "summary.json").exists():
            raise ConfigError(f"no SFT start of {env} for these settings under {spec.workdir}/sft: run the grid "
                              "first (its first run builds the start), or pass the --workdir and --starts_from "
                              "it ran with")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=spec.workdir) as run_dir:  # the trainer's files are not kept
            measured, _ = evaluate_start(config, spec.workdir, eval_steps, run_dir)
        result = dict(measured, eval_steps=eval_steps, start=sft_dir.name, wall_s=time.perf_counter() - t0)
        write_json_atomic(path, result)
        print(f"{env}: SFT start success {result['success_rate']:.3f} over {result['episodes']} episodes "
              f"({eval_steps} env steps, {result['wall_s']:.0f} s)", flush=True)
        out[env] = result
    return out


def collect(spec: GridSpec) -> dict[str, Any]:
    """Reads every finished run of the grid: curves, endpoints, per (game, arm), and the paired
    differences with bootstrap CIs."""
    table: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list]] = {}
    invalid_curves: dict[str, dict[str, list]] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    same_alpha: dict[str, dict[str, Any]] = {}
    for env in spec.envs:
        table[env], curves[env], invalid_curves[env] = {}, {}, {}
        sft_eval = start_measurement(spec.workdir, env)
        per_seed: dict[str, dict[str, dict[int, float]]] = {}
        for arm in spec.algos:
            runs, invalid_runs = [], []
            values: dict[str, dict[int, float]] = {k: {} for k in (
                "auc", "final", "final_invalid", "train_invalid", "peak", "last_train")}
            for seed in spec.seeds:
                run_dir = spec.run_dir(env, arm, seed)
                result = _read_result(run_dir)
                if result is None:
                    continue
                records = _by_step(metrics_lib.read_jsonl(run_dir / "metrics.jsonl"))
                xs = np.asarray([r["env_steps"] for r in records], np.float64)
                ys = np.asarray([r.get("success_rate") for r in records], np.float64)
                inv = np.asarray([r.get("invalid_action_rate") for r in records], np.float64)
                # A record's "episodes" counts the episodes its iteration finished.
                seen = np.cumsum([r.get("episodes", 0) for r in records])
                window_full = seen >= spec.peak_min_episodes
                runs.append((xs, ys))
                if np.isfinite(inv).any():
                    invalid_runs.append((xs, inv))
                final = result.get("final_eval") or {}
                values["auc"][seed] = auc(records)
                values["final"][seed] = final.get("success_rate", float("nan"))
                values["final_invalid"][seed] = final.get("invalid_action_rate", float("nan"))
                values["train_invalid"][seed] = mean_over_iterations(records, "invalid_action_rate")
                values["last_train"][seed] = float(ys[-1]) if ys.size else float("nan")
                values["peak"][seed] = (float(np.nanmax(ys[window_full])) if window_full.any()
                                        and np.isfinite(ys[window_full]).any() else float("nan"))
            curves[env][arm], invalid_curves[env][arm] = runs, invalid_runs
            per_seed[arm] = values
            seeds = sorted(values["final"])
            table[env][arm] = {
                "seeds": len(seeds), "alpha": spec.alpha_or_none(env, arm),
                "auc": mean_se(values["auc"].values()),
                "final_eval": mean_se(values["final"].values()),
                "final_invalid_action_rate": mean_se(values["final_invalid"].values()),
                "train_invalid_action_rate": mean_se(values["train_invalid"].values()),
                "final_train_window": mean_se(values["last_train"].values()),
                "peak_train_window": mean_se(values["peak"].values()),
                "per_seed": {str(s): {k: values[k].get(s) for k in values} for s in seeds},
            }
        table[env]["sft_start_eval"] = None if sft_eval is None else sft_eval["success_rate"]
        table[env]["sft_start_episodes"] = None if sft_eval is None else sft_eval.get("episodes")
        table[env]["sft_start_eval_steps"] = None if sft_eval is None else sft_eval.get("eval_steps", spec.eval_steps)
        comparisons[env] = {
            f"{a} - {b}": {endpoint: paired_difference(per_seed[a][endpoint], per_seed[b][endpoint])
                           for endpoint in ENDPOINTS}
            for a, b in COMPARISONS if a in spec.algos and b in spec.algos}
        same_alpha[env] = {
            f"{c} - {e}": {"alpha": spec.alpha_or_none(env, c),
                           **{endpoint: paired_difference(per_seed[c][endpoint], per_seed[e][endpoint])
                              for endpoint in SAME_ALPHA_ENDPOINTS}}
            for e, c in same_alpha_pairs(spec, env)}
    return {"table": table, "curves": curves, "invalid_curves": invalid_curves, "comparisons": comparisons,
            "same_alpha": same_alpha}


def same_alpha_pairs(spec: GridSpec, env: str) -> list[tuple[str, str]]:
    """(entropy arm, coso arm) pairs of this grid that ran `env` at the same alpha (post hoc)."""
    entropy_arms, coso_arms = ([a for a in family if a in spec.algos] for family in SAME_ALPHA_ARMS)
    pairs = []
    for e in entropy_arms:
        for c in coso_arms:
            alpha_e, alpha_c = spec.alpha_or_none(env, e), spec.alpha_or_none(env, c)
            if alpha_e is not None and alpha_c is not None and math.isclose(alpha_e, alpha_c, rel_tol=1e-9):
                pairs.append((e, c))
    return pairs


def fmt_start(success: float | None, episodes: int | None) -> str:
    """A start's success in %, ± the binomial standard error sqrt(p (1 - p) / n) when n is known."""
    if success is None:
        return "n/a"
    if not episodes:
        return f"{100 * success:.1f}"
    if success in (0.0, 1.0):  # the binomial SE is 0 there, which would read as exact
        return f"{100 * success:.1f} ({round(success * episodes)} of {episodes})"
    return f"{100 * success:.1f} ± {100 * math.sqrt(success * (1 - success) / episodes):.1f}"


def _fmt_diff(d: Mapping[str, Any]) -> str:
    """A paired difference in percentage points: "+3.1 [-1.0, +7.2]"."""
    if not d["n"] or not math.isfinite(d["mean"]):
        return "n/a"
    low, high = d["ci95"]
    return f"{100 * d['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def statement(env: str, comparisons: Mapping[str, Any]) -> str:
    """One sentence per game: which paired differences have a 95% CI that excludes 0, per endpoint."""
    parts = []
    for name, per_endpoint in comparisons.items():
        for endpoint, d in per_endpoint.items():
            if d["n"] < 2:
                verdict = f"{d['n']} paired seed(s), no claim"
            elif d["separated"]:
                verdict = f"separated ({'>' if d['mean'] > 0 else '<'} 0: {_fmt_diff(d)} pts)"
            else:
                verdict = f"not separated ({_fmt_diff(d)} pts, CI includes 0)"
            parts.append(f"{name} {endpoint}: {verdict}")
    return f"{env}: " + "; ".join(parts) if parts else f"{env}: no paired comparison in this grid"


def markdown(spec: GridSpec, table: dict[str, Any], comparisons: dict[str, Any], meta: dict[str, Any],
             same_alpha: Mapping[str, Any] | None = None) -> str:
    regime = fmt_regime(spec.overrides, spec.per_game)
    lines = [
        f"# gym_cards: CoSo vs entropy vs none ({spec.preset} preset, regime {regime})",
        "",
        f"Success rate in %, mean ± standard error over seeds {list(spec.seeds)} (paired: one SFT start per "
        f"game, the same env seeds for every arm). `AUC`: mean of the training curve (success over the last "
        f"`success_window` episodes) over the iterations. `final`: final policy on fresh envs "
        f"({spec.eval_steps} env steps). `SFT start`: the start's success on fresh envs ± its binomial standard "
        f"error, from its evaluation with the most episodes (the grid's, or a longer `--start_eval_steps` one). "
        f"`peak`: maximum of the training curve once >= "
        f"{spec.peak_min_episodes} episodes have finished. `invalid`: invalid-action rate of the final "
        f"evaluation. Alphas: chosen by the alpha sweep ({spec.alphas_source or 'none given'}); x10 arms at "
        f"10x. Device: {meta['device']['platform']} ({meta['device']['cpu_count']} cores). Grid wall time: "
        f"{meta['wall_time']}.",
        "",
        "| game | arm | alpha | seeds | SFT start | AUC | final | peak | invalid | paper RL4VLM PPO peak (7B) "
        "| paper SFT init (7B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for env, row in table.items():
        paper = PAPER_PEAK_PERCENT.get(env, {})
        sft = row["sft_start_eval"]
        for arm in spec.algos:
            cell = row[arm]
            lines.append(
                f"| {env} | {arm} | {fmt_alpha(cell['alpha'])} | {cell['seeds']} | "
                f"{fmt_start(sft, row.get('sft_start_episodes'))} | {fmt_mean_se(tuple(cell['auc']))} | "
                f"{fmt_mean_se(tuple(cell['final_eval']))} | {fmt_mean_se(tuple(cell['peak_train_window']))} | "
                f"{fmt_mean_se(tuple(cell['final_invalid_action_rate']))} | "
                f"{paper.get('rl4vlm_ppo', 'n/a') if arm == 'none' else ''} | "
                f"{paper.get('sft_init', 'n/a') if arm == 'none' else ''} |")
    lines += ["", PAPER_NOTE, "",
              f"## Paired differences ({BOOTSTRAP_RESAMPLES:,}-resample bootstrap 95% CI, seed {BOOTSTRAP_SEED})",
              "",
              "Per seed a - b, then the mean over seeds, in percentage points; a difference is called "
              "separated only when its 95% interval excludes 0 (and at least 2 seeds pair up).", "",
              "| game | comparison | endpoint | pairs | mean [95% CI] (pts) | separated |", "|---|---|---|---|---|---|"]
    for env, per_env in comparisons.items():
        for name, per_endpoint in per_env.items():
            for endpoint, d in per_endpoint.items():
                lines.append(f"| {env} | {name} | {endpoint} | {d['n']} | {_fmt_diff(d)} | "
                             f"{'yes' if d['separated'] else 'no'} |")
    lines += ["", "## Separation (95% bootstrap CI of the paired difference excludes 0)", ""]
    lines += [f"- {statement(env, per_env)}" for env, per_env in comparisons.items()]
    explore = [arm for arm in EXPLORATION_ARMS if arm in spec.algos]
    if any(arm.endswith("_x10") for arm in explore):
        lines += ["", "## Exploration: the chosen alpha and 10x", "",
                  "Invalid-action rates in %: `train` is the mean over the iterations of the rollouts' rate, "
                  "`final` the final evaluation's.", "",
                  "| game | arm | alpha | seeds | AUC | final | invalid (train) | invalid (final) |",
                  "|---|---|---|---|---|---|---|---|"]
        for env, row in table.items():
            for arm in explore:
                cell = row[arm]
                lines.append(f"| {env} | {arm} | {fmt_alpha(cell['alpha'])} | {cell['seeds']} | "
                             f"{fmt_mean_se(tuple(cell['auc']))} | {fmt_mean_se(tuple(cell['final_eval']))} | "
                             f"{fmt_mean_se(tuple(cell['train_invalid_action_rate']))} | "
                             f"{fmt_mean_se(tuple(cell['final_invalid_action_rate']))} |")
    if same_alpha and any(same_alpha.values()):
        lines += ["", "## Post hoc, not pre-registered: uniform entropy and CoSo at the same alpha", "",
                  "Where a game's chosen alphas or their 10x coincide, the two arms differ only in the "
                  "entropy term's weighting. Paired per seed (coso arm - entropy arm), percentage points, 95% "
                  "bootstrap CI; `final invalid`: the final evaluation's invalid-action rate. Descriptive: "
                  "these pairs were not declared before the grid, so no separation is claimed from them "
                  "(except `coso - entropy` where the chosen alphas coincide: the pre-registered comparison "
                  "above, repeated here, which adds `final invalid`).", "",
                  "| game | pair | alpha | pairs | AUC | final | final invalid |", "|---|---|---|---|---|---|---|"]
        for env, per_env in same_alpha.items():
            for name, d in per_env.items():
                shown = name + (" (pre-registered above)" if name in PREREGISTERED_PAIRS else "")
                lines.append(f"| {env} | {shown} | {fmt_alpha(d['alpha'])} | {d['final']['n']} | "
                             + " | ".join(_fmt_diff(d[k]) for k in SAME_ALPHA_ENDPOINTS) + " |")
    return "\n".join(lines) + "\n"


def exploration_panels(spec: GridSpec, curves: Mapping[str, Any], invalid_curves: Mapping[str, Any]) -> dict[str, Any]:
    """Per game two panels (training success; invalid-action rate) of entropy and coso at the chosen alpha
    and at 10x; empty when the grid has no x10 arm or no such run finished."""
    arms = [arm for arm in EXPLORATION_ARMS if arm in spec.algos]
    if not any(arm.endswith("_x10") for arm in arms):
        return {}
    panels: dict[str, Any] = {}
    for env in spec.envs:
        alphas = ", ".join(f"{a} {fmt_alpha(spec.alpha_or_none(env, a))}" for a in ("entropy", "coso") if a in arms)
        for what, source in (("success", curves), ("invalid-action rate", invalid_curves)):
            panel = {arm.replace("_x10", " x10"): source[env][arm] for arm in arms if source[env].get(arm)}
            if panel:
                # The alphas on a second line: one line overflows a half-width panel.
                panels[f"{env}: {what}" + (f"\n(alpha {alphas})" if alphas else "")] = panel
    return panels


def web_panel(path: Path) -> tuple[dict[str, list], dict[str, Any]] | None:
    """The device-control panel from `python -m benchmarks.web --digirl`'s JSON, if it exists:
    online success per iteration vs online trajectories, per algo over seeds, and its test summary.
    ConfigError if the file is not valid JSON or not that benchmark's (no `runs` / `summary`)."""
    data = read_input_json(path, "a `benchmarks.web --digirl` JSON", ("runs", "summary"))
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
    over seeds, and the JSON itself (its per-task-type `table`). ConfigError if the file is not valid JSON
    or not that benchmark's (no `runs` / `table`)."""
    data = read_input_json(path, "a `benchmarks.alfworld --compare` JSON", ("runs", "table"))
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
    table, curves, comparisons = collected["table"], collected["curves"], collected["comparisons"]
    panels = {env: {arm: runs for arm, runs in per_arm.items() if runs and arm in CURVE_ARMS}
              for env, per_arm in curves.items()}
    panels = {env: per_arm for env, per_arm in panels.items() if per_arm}
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
    explore = exploration_panels(spec, curves, collected["invalid_curves"])
    explore_png = out_dir / f"paper_curves_exploration_{tag}.png"
    if explore:
        plots.plot_mean_se_panels(explore, explore_png, ncols=2, ylabel="rate",
                                  title="Exploration: entropy and CoSo at the chosen alpha and at 10x "
                                        "(mean ± SE over seeds)")
    history = read_json(_timings_path(spec.workdir)) or []
    if timings is None:  # --report_only: the latest invocation that trained something
        timings = history[-1] if history else {}
    # The wall-time line states the latest invocation that trained (this one unless it trained nothing).
    recorded = timings if timings.get("runs_trained") or not history else history[-1]
    wall = recorded.get("grid_wall_s_this_invocation")
    results = [_read_result(spec.run_dir(e, a, s)) for e in spec.envs for a in spec.algos for s in spec.seeds]
    run_walls = sum(r.get("wall_s_this_invocation", 0.0) or 0.0 for r in results if r is not None)
    meta = {"device": device_description(),
            "wall_time": (f"{run_walls / 60:.1f} min summed over {sum(r is not None for r in results)} runs"
                          + ("" if wall is None else
                             f"; the last recorded invocation trained {recorded.get('runs_trained', '?')} runs "
                             f"in {wall / 60:.1f} min"))}
    md = markdown(spec, table, comparisons, meta, collected["same_alpha"])
    if web is not None:
        md += (f"\n## Device control: web/general, DigiRL backbone ({shown_path(web_results)})\n\n"
               "| algo | seeds | test success | online success |\n|---|---|---|---|\n")
        for algo, row in web[1].items():
            md += (f"| {algo} | {len(row['seeds'])} | {fmt_mean_se((row['test_success_mean'], row['test_success_se']))} | "
                   f"{fmt_mean_se((row['online_success_mean'], row['online_success_se']))} |\n")
    if alfworld is not None:
        md += alfworld_markdown(alfworld[1], shown_path(alfworld_results))
    (out_dir / f"paper_curves_{tag}.md").write_text(md)
    try:
        config_example = spec.config(spec.envs[0], spec.algos[0], spec.seeds[0]).to_flat_dict()
    except ConfigError:  # no alpha for that arm (a report drawn without the sweep's JSON)
        config_example = None
    payload = {
        "description": ("gym_cards CoSo vs entropy vs none over paired seeds at the sweep's alphas "
                        "(benchmarks/paper_curves.py; pre-registered in benchmarks/README.md)"),
        "grid": {"envs": list(spec.envs), "arms": list(spec.algos), "seeds": list(spec.seeds),
                 "preset": spec.preset, "regime": dict(REGIME), "overrides": dict(spec.overrides),
                 "start_rule": {env: dict(fields) for env, fields in spec.per_game},
                 "eval_steps": spec.eval_steps, "peak_min_episodes": spec.peak_min_episodes,
                 "arm_definitions": {a: dataclasses.asdict(ARMS[a]) for a in spec.algos}},
        "alphas": {"source": spec.alphas_source,
                   "per_game": {env: {arm: spec.alpha_or_none(env, arm) for arm in spec.algos} for env in spec.envs}},
        "config_example": config_example,
        "dtype": "float32",
        "table": table,
        "comparisons": comparisons,
        "same_alpha_post_hoc": collected["same_alpha"],
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95,
                      "statistic": "mean of the per-seed paired differences", "interval": "percentile"},
        "statements": [statement(env, per_env) for env, per_env in comparisons.items()],
        "paper_peak_percent": PAPER_PEAK_PERCENT,
        "paper_gym_cards_average": PAPER_GYM_CARDS_AVERAGE,
        "paper_note": PAPER_NOTE,
        "timings": timings,
        "timings_all_invocations": history,
        "summed_run_wall_s": run_walls,
        "figure": png.name,
        "exploration_figure": explore_png.name if explore else None,
        "device_control": None if web is None else {"source": shown_path(web_results), "summary": web[1]},
    }
    if alfworld is not None:  # only then: the payload is unchanged without the ALFWorld results
        payload["alfworld"] = {"source": shown_path(alfworld_results), "table": alfworld[1].get("table"),
                               "task_types": alfworld[1].get("task_types"),
                               "eval": alfworld[1].get("eval"),
                               "paper_average_percent": PAPER_ALFWORLD_AVERAGE,
                               "paper_note": PAPER_ALFWORLD_NOTE}
    write_results(f"paper_curves_{tag}", payload, out_dir=out_dir)
    print(md)
    return payload


# -------------------------------------------------------------------------------------------- CLI
SMOKE_WORKDIR = "runs/paper_curves_smoke"
SWEEP_WORKDIR = "runs/paper_curves_sweep"
SWEEP_SMOKE_WORKDIR = "runs/paper_curves_sweep_smoke"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, argparse.Namespace]:
    """(GridSpec, args), or (alpha_sweep.SweepSpec, args) with --sweep. The grid's alphas are read later
    (`_run`), so parsing never needs the sweep's JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", action="store_true",
                        help="measure the SFT starts and apply the start rule (benchmarks/start_rule.py) instead of "
                             "the grid")
    parser.add_argument("--sweep", action="store_true", help="run the alpha sweep (tuning seeds) instead of the grid")
    parser.add_argument("--envs", default=",".join(GYM_CARDS_ENVS))
    parser.add_argument("--arms", "--algos", dest="arms", default=None,
                        help=f"comma-separated, from {list(ARMS)}; grid default {list(GRID_ARMS)} (+ coso_soft "
                             f"when the sweep chose an alpha for it), sweep default {list(SWEPT_ARMS)}")
    parser.add_argument("--seeds", default=None,
                        help="grid: a count N (seeds 0..N-1) or a list like 0,3,7, default 8; sweep: a list "
                             "of tuning seeds (100 or 100,101, the default); --smoke: the first of those")
    parser.add_argument("--alphas", default=None,
                        help=f"--sweep only: comma-separated alphas (default the pre-registered {list(PREREGISTERED_ALPHAS)})")
    parser.add_argument("--alphas_from", default=None,
                        help="grid only: the sweep's JSON (default <out>/alpha_sweep_<tag>.json; --smoke: "
                             f"{SWEEP_SMOKE_WORKDIR}/alpha_sweep_smoke.json)")
    parser.add_argument("--starts_from", default=None,
                        help="sweep and grid: the start rule's JSON (default <out>/start_rule_<tag>.json; not read "
                             "with --smoke)")
    parser.add_argument("--preset", default="tiny_cpu", choices=PRESETS)
    parser.add_argument("--workdir", default=None,
                        help=f"default {GridSpec.workdir} / {SWEEP_WORKDIR} (--smoke: {SMOKE_WORKDIR} / "
                             f"{SWEEP_SMOKE_WORKDIR})")
    parser.add_argument("--out", default=None, help=f"default {RESULTS_DIR} (--smoke: the workdir)")
    parser.add_argument("--tag", default=None, help="output name suffix (default: cpu, gpu or smoke)")
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--peak_min_episodes", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any PPOConfig field (flat or dotted name) other than the grid's axes "
                             f"{list(GRID_FIELDS)}, for every run (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="the first seed only, 2 tiny iterations per run")
    parser.add_argument("--report_only", action="store_true", help="only re-draw figures and tables")
    parser.add_argument("--start_eval_steps", type=int, default=None,
                        help="grid: also evaluate each game's SFT start on this many env steps (once; cached in "
                             "the workdir) and report the start from it, for a smaller standard error than the "
                             "grid's own evaluation; works with --report_only")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    parser.add_argument("--web_results", default=WEB_RESULTS_DEFAULT,
                        help="benchmarks.web --digirl JSON drawn as the device-control panel if it exists "
                             "('' for none)")
    parser.add_argument("--alfworld_results", default=ALFWORLD_RESULTS_DEFAULT,
                        help="benchmarks.alfworld --compare JSON drawn as the ALFWorld panel and per-task-type "
                             "table if it exists ('' for none)")
    args = parser.parse_args(argv)
    for flag, default in (("web_results", WEB_RESULTS_DEFAULT), ("alfworld_results", ALFWORLD_RESULTS_DEFAULT)):
        value = getattr(args, flag)  # a file named on the command line must exist; the default may not
        if value and value != default and not Path(value).is_file():
            parser.error(f"--{flag} {value}: not a file (pass the benchmark's JSON, or '' for no panel)")

    def split(text, allowed, what):
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        bad = [t for t in items if t not in allowed]
        if not items or bad:
            parser.error(f"--{what}: unknown {bad or 'empty list'}; choose from {list(allowed)}")
        return items

    envs = split(args.envs, GYM_CARDS_ENVS, "envs")
    if args.starts and args.sweep:
        parser.error("--starts and --sweep: one at a time (the start rule first, then the sweep, then the grid)")
    if args.starts and args.smoke:
        parser.error("--starts: no smoke version (the smoke sizes fix sft_epochs)")
    if args.starts and (args.arms or args.seeds or args.alphas or args.alphas_from or args.starts_from):
        parser.error("--starts: takes --envs, --preset, --workdir, --out, --tag and --set only")
    if args.starts_from is not None and args.smoke:
        parser.error("--starts_from: a smoke does not read the start rule")
    arms = None if args.arms is None else split(args.arms, SWEPT_ARMS if args.sweep else tuple(ARMS), "arms")
    try:
        if args.seeds is None:
            seeds = TUNING_SEEDS if args.sweep else GRID_SEEDS
        elif args.sweep:  # always a list: "--seeds=100" is seed 100, not 100 seeds
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        else:
            seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds must be a count or a comma-separated list of ints, got {args.seeds!r}")
    if args.smoke and args.seeds is None:
        seeds = seeds[:1]
    if not seeds:
        parser.error("--seeds: need at least one seed")
    if args.sweep and not args.smoke and not set(seeds) <= set(TUNING_SEEDS):
        parser.error(f"--seeds: the sweep runs the tuning seeds {list(TUNING_SEEDS)} only, got "
                     f"{sorted(set(seeds) - set(TUNING_SEEDS))[:5]}")
    if not args.sweep and set(seeds) & set(TUNING_SEEDS):
        parser.error(f"--seeds: {sorted(set(seeds) & set(TUNING_SEEDS))} are the sweep's tuning seeds, never "
                     "used by the main grid")
    if args.alphas is not None and not args.sweep:
        parser.error("--alphas: only with --sweep (the grid takes its alphas from the sweep, --alphas_from)")
    if args.alphas_from is not None and args.sweep:
        parser.error("--alphas_from: only without --sweep")
    if args.start_eval_steps is not None and (args.sweep or args.starts):
        parser.error("--start_eval_steps: only for the grid (not with --sweep or --starts)")
    if args.start_eval_steps is not None and args.start_eval_steps <= 0:
        parser.error(f"--start_eval_steps must be positive, got {args.start_eval_steps}")
    alphas = PREREGISTERED_ALPHAS
    if args.alphas is not None:
        try:
            alphas = tuple(sorted(set(float(a) for a in args.alphas.split(",") if a.strip())))
        except ValueError:
            parser.error(f"--alphas must be a comma-separated list of numbers, got {args.alphas!r}")
        if not alphas or min(alphas) <= 0 or not all(math.isfinite(a) for a in alphas):
            parser.error(f"--alphas must be positive numbers, got {args.alphas!r}")
    try:
        user = parse_overrides(args.set, PPOConfig)
    except ValueError as err:
        parser.error(str(err))
    axes = [name for name in user if name in GRID_FIELDS]
    if axes:
        parser.error(f"--set {axes[0]}: set by the grid itself (arms, sweep alphas, seeds, envs), not by --set")
    overrides = dict(REGIME)
    if args.smoke:
        overrides.update(SMOKE_OVERRIDES)
    overrides.update(user)
    overrides = tuple(sorted(overrides.items()))
    args.user_fields = tuple(user)
    if args.sweep or args.starts:  # the start rule caches its starts where the sweep will read them
        workdir = args.workdir or (SWEEP_SMOKE_WORKDIR if args.smoke else SWEEP_WORKDIR)
    else:
        workdir = args.workdir or (SMOKE_WORKDIR if args.smoke else GridSpec.workdir)
    args.out = args.out or (workdir if args.smoke else str(RESULTS_DIR))
    progress = not args.no_progress
    try:
        if args.starts:
            from benchmarks.start_rule import StartSpec

            spec = StartSpec(envs=envs, preset=args.preset, workdir=workdir, overrides=overrides, progress=progress)
            spec.config(envs[0], 3)
        elif args.sweep:
            from benchmarks.alpha_sweep import SweepSpec

            spec = SweepSpec(envs=envs, arms=arms or SWEPT_ARMS, alphas=alphas, seeds=seeds,
                             tuning_seeds=seeds if args.smoke else TUNING_SEEDS, preset=args.preset,
                             workdir=workdir, overrides=overrides, progress=progress, smoke=args.smoke)
            spec.config(envs[0], spec.arms[0], alphas[0], seeds[0])
        else:
            eval_steps = args.eval_steps or (32 if args.smoke else 512)
            spec = GridSpec(envs=envs, algos=arms or GRID_ARMS, seeds=seeds, preset=args.preset, workdir=workdir,
                            overrides=overrides, eval_steps=eval_steps,
                            peak_min_episodes=1 if args.smoke else args.peak_min_episodes, progress=progress)
            args.default_arms = arms is None
            arm_config(args.preset, envs[0], "none", seeds[0], None, overrides)
    except (TypeError, ValueError) as err:
        parser.error(f"bad configuration: {err}")
    return spec, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep (--sweep) or the grid, unless --report_only, and writes the report. A user error (a
    busy or foreign run directory, a checkpoint or a finished run from other settings, a missing alpha
    sweep) exits with status 2 and one line."""
    from coso_jax.rl.run import exit_on_user_error

    logging.basicConfig(level=logging.WARNING)
    spec, args = parse_args(argv)
    return exit_on_user_error(lambda: _run(spec, args), debug=args.debug)


def _tag(args: argparse.Namespace) -> str:
    import jax

    return args.tag or ("smoke" if args.smoke else ("cpu" if jax.devices()[0].platform == "cpu" else "gpu"))


def _run(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    tag = _tag(args)
    if args.starts:
        from benchmarks import start_rule

        return start_rule.run(spec, Path(args.out), tag, report_only=args.report_only)
    spec = with_start_rule(spec, args, tag)
    if args.sweep:
        from benchmarks import alpha_sweep

        return alpha_sweep.run(spec, Path(args.out), tag, report_only=args.report_only)
    spec = with_sweep_alphas(spec, args, tag)
    if not args.report_only:
        for env in spec.envs:  # every arm's alpha, before anything trains
            for arm in spec.algos:
                spec.alpha(env, arm)
    if args.report_only and not any(_read_result(spec.run_dir(e, a, s)) is not None
                                    for e in spec.envs for a in spec.algos for s in spec.seeds):
        raise ConfigError(f"no finished run of this grid under {spec.workdir}: nothing to report (train the "
                          "grid first, or pass the --workdir that holds its runs)")
    timings = None if args.report_only else run_grid(spec)["timings"]
    if args.start_eval_steps:
        measure_starts(spec, args.start_eval_steps)
    return report(spec, Path(args.out), tag, timings,
                  web_results=Path(args.web_results) if args.web_results and not args.smoke else None,
                  alfworld_results=(Path(args.alfworld_results) if args.alfworld_results and not args.smoke
                                    else None))


def _note(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the command."""
    import sys

    sys.stderr.write(f"note: {message}\n")


def with_start_rule(spec: Any, args: argparse.Namespace, tag: str) -> Any:
    """The sweep or the grid with the start rule's per-game fields (benchmarks/start_rule.py). A smoke, or a
    run that sets sft_epochs itself (--set), reads none; `--report_only` without the rule's JSON at its default
    path draws the report without it and says so on stderr. A missing `--starts_from` file is a ConfigError."""
    from benchmarks import start_rule

    if args.smoke or start_rule.FIELD in getattr(args, "user_fields", ()):  # --set sft_epochs: every game's
        return spec
    path = Path(args.starts_from) if args.starts_from else Path(args.out) / f"start_rule_{tag}.json"
    if args.starts_from and not path.is_file():
        raise ConfigError(f"--starts_from {path}: not a file (pass the start_rule_<tag>.json that --starts wrote)")
    if args.report_only and not path.exists():
        _note(f"no start rule at {path}: the report states none (pass --starts_from to use one)")
        return spec
    per_game = start_rule.load_per_game(path, settings_of(spec.preset, spec.overrides), spec.envs)
    return dataclasses.replace(spec, per_game=per_game)


def with_sweep_alphas(spec: GridSpec, args: argparse.Namespace, tag: str) -> GridSpec:
    """The grid with the sweep's alphas (and, with the default arms, coso_soft when the sweep chose an alpha
    for it). `--report_only` without the sweep's JSON at its default path draws the report without alphas
    and says so on stderr. A missing `--alphas_from` file is a ConfigError."""
    default = Path(SWEEP_SMOKE_WORKDIR) / "alpha_sweep_smoke.json" if args.smoke else Path(args.out) / f"alpha_sweep_{tag}.json"
    path = Path(args.alphas_from) if args.alphas_from else default
    if args.alphas_from and not path.is_file():
        raise ConfigError(f"--alphas_from {path}: not a file (pass the alpha_sweep_<tag>.json that --sweep wrote)")
    if args.report_only and not path.exists():
        _note(f"no alpha sweep at {path}: the report shows no alphas (pass --alphas_from to use one)")
        return spec
    alphas = load_alphas(path, settings_of(spec.preset, spec.overrides, spec.per_game), smoke=args.smoke)
    arms = spec.algos
    if getattr(args, "default_arms", False) and any(arm == "coso_soft" for _, arm, _ in alphas):
        arms = ("none", "entropy", "coso", "coso_soft") + tuple(a for a in GRID_ARMS if a.endswith("_x10"))
    return dataclasses.replace(spec, algos=arms, alphas=alphas, alphas_source=shown_path(path))


if __name__ == "__main__":
    main()
