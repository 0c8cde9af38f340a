"""The start rule of the paper comparison (issue #20; benchmarks/README.md, "Addendum: the start rule"):
per game, the SFT start's own success decides how many SFT epochs that game's start gets, before any
sweep or grid run of it is read.

  python -m benchmarks.paper_curves --starts               # measure the ladder -> start_rule_cpu.{json,md}
  python -m benchmarks.paper_curves --starts --report_only # re-apply the rule to the measured starts

**The rule** (`choose_sft_epochs`): for `sft_epochs` in `LADDER` (3, 5, 10, 20), in order, build the game's
SFT start under the regime (temperature 1.0; everything else as the grid) and measure it on
`EVAL_STEPS` (512) fresh evaluation env steps with evaluation seed `EVAL_SEED` (2026: neither the grid's
nor the sweep's evaluations use it). The first value whose start succeeds on >= `MIN_START_SUCCESS` (10%)
of its finished episodes **and** answers invalidly at most `MAX_START_INVALID` (50%) of the time (addendum
2: gym_cards plays a random legal action for an invalid answer, so a start that never answers validly
can still "succeed") is the game's `sft_epochs`; the ladder stops there. A game that reaches it at
none keeps the regime's value and is reported as flat, with the best start measured.

Every start is cached where the sweep caches its starts (``<workdir>/sft/``, default the sweep's work
directory), so the sweep re-uses them; each measurement is kept in
``<workdir>/starts/<game>/sft_epochs_<e>.json`` with its settings' fingerprint, so a re-invocation measures
only what is missing. The sweep and the grid read each game's chosen value from ``start_rule_<tag>.json``
(``per_game``: only the games whose value differs from the regime's).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from benchmarks import paper_curves as pc
from benchmarks._common import device_description, read_json, write_json_atomic, write_results
from coso_jax.rl.config import ConfigError

LADDER: tuple[int, ...] = (3, 5, 10, 20)
MIN_START_SUCCESS = 0.10
MAX_START_INVALID = 0.50  # addendum 2: a start that wins through gym_cards' random fallback is no start
EVAL_STEPS = 512
EVAL_SEED = 2026
FIELD = "sft_epochs"
RULE = (f"per game: the first {FIELD} of {list(LADDER)} whose SFT start succeeds on >= {MIN_START_SUCCESS:.0%} of "
        f"its finished episodes with an invalid-action rate <= {MAX_START_INVALID:.0%}, over {EVAL_STEPS} fresh "
        f"evaluation env steps (evaluation seed {EVAL_SEED}, the regime's temperature); none qualifying: the "
        "regime's value, and the game is reported flat")


@dataclasses.dataclass(frozen=True)
class StartSpec:
    envs: tuple[str, ...] = pc.GYM_CARDS_ENVS
    preset: str = "tiny_cpu"
    workdir: str = pc.SWEEP_WORKDIR
    overrides: tuple[tuple[str, Any], ...] = pc.REGIME
    ladder: tuple[int, ...] = LADDER
    eval_steps: int = EVAL_STEPS
    progress: bool = True
    smoke: bool = False

    def config(self, env: str, sft_epochs: int):
        values = dict(self.overrides, **{FIELD: sft_epochs})
        # The seed only names the (unused) training envs; the start and its evaluation do not depend on it.
        return pc.arm_config(self.preset, env, "none", pc.TUNING_SEEDS[0], None, tuple(sorted(values.items())))

    def record_path(self, env: str, sft_epochs: int) -> Path:
        return Path(self.workdir) / "starts" / env / f"{FIELD}_{sft_epochs}.json"


def qualifies(entry: Mapping[str, Any]) -> bool:
    """Whether one measured start passes: success_rate >= MIN_START_SUCCESS and invalid_action_rate <=
    MAX_START_INVALID. A start with no finished episode (success_rate None or NaN) does not."""
    rate, invalid = entry.get("success_rate"), entry.get("invalid_action_rate")
    return (rate is not None and rate == rate and rate >= MIN_START_SUCCESS
            and invalid is not None and invalid <= MAX_START_INVALID)


def choose_sft_epochs(ladder: Sequence[Mapping[str, Any]], default: int) -> tuple[int, bool]:
    """(the game's sft_epochs, whether its start qualified) from the measured ladder in order: the first
    entry that `qualifies`, else `default`."""
    for entry in ladder:
        if qualifies(entry):
            return int(entry[FIELD]), True
    return default, False


def game_entry(ladder: Sequence[Mapping[str, Any]], default: int) -> dict[str, Any]:
    """One game's report: its measured ladder, the rule's choice, whether a rung qualified, and the rung
    with the highest success."""
    chosen, reached = choose_sft_epochs(ladder, default)
    best = max(ladder, key=lambda r: (r.get("success_rate") or 0.0))
    return {"ladder": list(ladder), FIELD: chosen, "reached": reached,
            "best": {FIELD: best[FIELD], "success_rate": best.get("success_rate")}}


def measure(spec: StartSpec) -> dict[str, Any]:
    """Measures each game's ladder up to the first start that reaches the threshold (cached measurements
    are re-used if their settings match); returns per game the ladder and the choice."""
    from coso_jax import metrics as metrics_lib

    default = int(dict(spec.overrides)[FIELD])
    games: dict[str, Any] = {}
    bar = metrics_lib.progress_bar(len(spec.envs) * len(spec.ladder), desc="start_rule", disable=not spec.progress)
    try:
        for env in spec.envs:
            ladder = []
            for sft_epochs in spec.ladder:
                config = spec.config(env, sft_epochs)
                path = spec.record_path(env, sft_epochs)
                record = read_json(path)
                if record is None or record.get("fingerprint") != config.resume_fingerprint() \
                        or record.get("eval_steps") != spec.eval_steps:
                    bar.set_scalars({"start": f"{env}, {FIELD}={sft_epochs}"})
                    t0 = time.perf_counter()
                    measured, sft = pc.evaluate_start(config, spec.workdir, spec.eval_steps,
                                                      path.parent / f"{FIELD}_{sft_epochs}_run", seed=EVAL_SEED)
                    record = {"env": env, FIELD: sft_epochs, **measured, "eval_steps": spec.eval_steps,
                              "eval_seed": EVAL_SEED, "fingerprint": spec.config(env, sft_epochs).resume_fingerprint(),
                              "sft_seconds": (sft or {}).get("sft_seconds"),
                              "sft_final_loss": (sft or {}).get("sft_final_loss"),
                              "wall_s": time.perf_counter() - t0}
                    write_json_atomic(path, record)
                    print(f"{env} {FIELD}={sft_epochs}: start success {record['success_rate']:.3f} over "
                          f"{record['episodes']} episodes, invalid {record['invalid_action_rate']:.3f} "
                          f"({record['wall_s']:.0f} s)", flush=True)
                bar.update(1)
                ladder.append(record)
                if qualifies(record):
                    break
            games[env] = game_entry(ladder, default)
    finally:
        bar.close()
    return games


def per_game(games: Mapping[str, Any], default: int) -> dict[str, dict[str, int]]:
    """The games whose chosen value differs from the regime's: {game: {"sft_epochs": e}}."""
    return {env: {FIELD: g[FIELD]} for env, g in games.items() if g[FIELD] != default}


def markdown(spec: StartSpec, games: Mapping[str, Any]) -> str:
    lines = [f"# Start rule ({spec.preset} preset, regime {pc.fmt_regime(spec.overrides)})", "",
             f"Rule: {RULE}. Success and invalid-action rate of each SFT start before any RL, "
             "(episodes finished).", "",
             "| game | " + " | ".join(f"{FIELD} {e}" for e in spec.ladder) + " | chosen |",
             "|---|" + "---|" * (len(spec.ladder) + 1)]
    for env, g in games.items():
        by_e = {r[FIELD]: r for r in g["ladder"]}
        cells = []
        for e in spec.ladder:
            r = by_e.get(e)
            cells.append("not run" if r is None else
                         f"{100 * r['success_rate']:.1f}% ({r['episodes']}), invalid {100 * r['invalid_action_rate']:.0f}%")
        choice = f"{g[FIELD]}" if g["reached"] else f"{g[FIELD]} (flat: best start {g['best'][FIELD]} epochs)"
        lines.append(f"| {env} | " + " | ".join(cells) + f" | {choice} |")
    return "\n".join(lines) + "\n"


def run(spec: StartSpec, out_dir: Path, tag: str, *, report_only: bool = False) -> dict[str, Any]:
    if report_only:
        games = {}
        for env in spec.envs:
            ladder = [r for e in spec.ladder if (r := read_json(spec.record_path(env, e))) is not None]
            if ladder:
                games[env] = game_entry(ladder, int(dict(spec.overrides)[FIELD]))
    else:
        games = measure(spec)
    default = int(dict(spec.overrides)[FIELD])
    settings = pc.settings_of(spec.preset, spec.overrides)
    previous = read_json(out_dir / f"start_rule_{tag}.json")
    if previous is not None and pc.settings_key(previous.get("settings", {})) == pc.settings_key(settings):
        games = {**{e: g for e, g in previous.get("games", {}).items() if e not in games}, **games}
    games = {env: games[env] for env in sorted(games, key=lambda e: (pc.GYM_CARDS_ENVS + (e,)).index(e))}
    md = markdown(spec, games)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"start_rule_{tag}.md").write_text(md)
    payload = {"description": "start rule of the paper comparison (benchmarks/start_rule.py; benchmarks/README.md)",
               "rule": RULE, "smoke": spec.smoke, "ladder": list(spec.ladder),
               "min_start_success": MIN_START_SUCCESS, "eval_steps": spec.eval_steps, "eval_seed": EVAL_SEED,
               # The sweep and the grid refuse a start rule measured under other settings than their own.
               "settings": settings,
               "games": games, "per_game": per_game(games, default), "device": device_description()}
    write_results(f"start_rule_{tag}", payload, out_dir=out_dir)
    print(md)
    return payload


def load_per_game(path: str | Path, settings: Mapping[str, Any],
                  envs: Iterable[str]) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """The start rule's per-game overrides as ((game, ((field, value),)), ...), for every game the file
    chose a value for (not only `envs`, so a sweep and a grid over different games still agree on their
    settings); ConfigError with one line if the file is missing, is not valid JSON or not a start rule's,
    was measured under other settings, or has no measurement for one of `envs`."""
    data = pc.read_input_json(path, "the start rule's JSON (start_rule_<tag>.json, written by --starts)",
                              ("settings", "games", "per_game"))
    if data is None:
        raise ConfigError(f"no start rule at {path}: run `python -m benchmarks.paper_curves --starts` first "
                          "(or pass --starts_from)")
    stored = data.get("settings", {})
    if pc.settings_key(stored) != pc.settings_key(settings):
        diffs = pc.settings_differences(stored, settings)
        raise ConfigError(f"the start rule {path} was measured under other settings than this run "
                          f"({'; '.join(diffs[:3])}): rerun --starts with these settings")
    missing = [env for env in envs if env not in data.get("games", {})]
    if missing:
        raise ConfigError(f"the start rule {path} has no measurement for {missing}: run "
                          f"`python -m benchmarks.paper_curves --starts --envs={','.join(missing)}`")
    return tuple((env, tuple(sorted(values.items()))) for env, values in sorted(data.get("per_game", {}).items())
                 if values)
