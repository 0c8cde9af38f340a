"""benchmarks/start_rule.py: the start rule (first sft_epochs of the ladder whose start reaches 10%), its
report from hand-made measurements, and how the sweep and the grid read it."""
from __future__ import annotations

import json

import pytest

from benchmarks import paper_curves as pc
from benchmarks import start_rule as sr


def _entry(epochs, rate, episodes=50, invalid=0.2):
    return {"sft_epochs": epochs, "success_rate": rate, "episodes": episodes, "invalid_action_rate": invalid}


def test_rule_takes_the_first_rung_that_reaches_ten_percent():
    assert sr.choose_sft_epochs([_entry(3, 0.0), _entry(5, 0.12), _entry(10, 0.5)], 3) == (5, True)
    assert sr.choose_sft_epochs([_entry(3, 0.10)], 3) == (3, True)  # >= 10%, not > 10%
    assert sr.choose_sft_epochs([_entry(3, 0.099), _entry(5, 0.05)], 3) == (3, False)
    # No finished episode: success undefined, which does not reach the threshold.
    assert sr.choose_sft_epochs([_entry(3, None, 0), _entry(5, float("nan"), 0)], 3) == (3, False)
    assert sr.choose_sft_epochs([], 3) == (3, False)
    # Addendum 2: success won through the random fallback for invalid answers does not count.
    assert sr.choose_sft_epochs([_entry(3, 0.28, invalid=1.0), _entry(5, 0.3, invalid=0.5)], 3) == (5, True)
    assert sr.choose_sft_epochs([_entry(3, 0.28, invalid=0.51)], 3) == (3, False)


def _write_records(spec, env, rates):
    for epochs, rate in zip(spec.ladder, rates):
        path = spec.record_path(env, epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"env": env, **_entry(epochs, rate, 80)}))


def test_report_from_hand_made_measurements_and_the_grid_reads_it(tmp_path):
    spec = sr.StartSpec(envs=("NumberLine", "EZPoints", "Points24"), workdir=str(tmp_path / "runs"), progress=False)
    _write_records(spec, "NumberLine", [0.3])
    _write_records(spec, "EZPoints", [0.01, 0.04, 0.2])
    _write_records(spec, "Points24", [0.0, 0.0, 0.0125, 0.0])
    out = sr.run(spec, tmp_path / "out", "cpu", report_only=True)
    assert {env: (g["sft_epochs"], g["reached"]) for env, g in out["games"].items()} == {
        "NumberLine": (3, True), "EZPoints": (10, True), "Points24": (3, False)}
    assert out["games"]["Points24"]["best"] == {"sft_epochs": 10, "success_rate": 0.0125}
    assert out["per_game"] == {"EZPoints": {"sft_epochs": 10}}  # only what differs from the regime
    md = (tmp_path / "out" / "start_rule_cpu.md").read_text()
    assert "| EZPoints | 1.0% (80), invalid 20% | 4.0% (80), invalid 20% | 20.0% (80), invalid 20% | not run | 10 |" in md
    assert "3 (flat: best start 10 epochs)" in md

    # A later measurement of one game keeps the others.
    sr.run(sr.StartSpec(envs=("NumberLine",), workdir=spec.workdir, progress=False), tmp_path / "out", "cpu",
           report_only=True)
    saved = json.loads((tmp_path / "out" / "start_rule_cpu.json").read_text())
    assert list(saved["games"]) == ["NumberLine", "EZPoints", "Points24"]

    grid, args = pc.parse_args(["--envs=NumberLine,EZPoints", f"--out={tmp_path / 'out'}"])
    grid = pc.with_start_rule(grid, args, "cpu")
    assert grid.per_game == (("EZPoints", (("sft_epochs", 10),)),)
    sweep, args = pc.parse_args(["--sweep", "--envs=NumberLine", f"--out={tmp_path / 'out'}"])
    sweep = pc.with_start_rule(sweep, args, "cpu")
    assert sweep.per_game == grid.per_game  # every game's choice, whatever --envs, so their settings agree
    assert sweep.config("EZPoints", "coso", 0.1, 100).get("sft_epochs") == 10
    assert sweep.config("NumberLine", "coso", 0.1, 100).get("sft_epochs") == 3
    assert "start rule: EZPoints sft_epochs=10" in pc.fmt_regime(sweep.overrides, sweep.per_game)
    assert pc.settings_of("tiny_cpu", pc.REGIME, grid.per_game)["per_game"] == {"EZPoints": {"sft_epochs": 10}}
    assert "per_game" not in pc.settings_of("tiny_cpu", pc.REGIME)  # as before the start rule

    # --set sft_epochs: the user's value for every game, no start rule.
    grid, args = pc.parse_args(["--envs=EZPoints", "--set", "sft_epochs=4", f"--out={tmp_path / 'out'}"])
    grid = pc.with_start_rule(grid, args, "cpu")
    assert grid.per_game == () and grid.config("EZPoints", "none", 0).get("sft_epochs") == 4
    with pytest.raises(pc.ConfigError, match="other settings"):  # measured under --set-free settings
        pc.with_start_rule(*pc.parse_args(["--set", "temperature=0.5", f"--out={tmp_path / 'out'}"]), "cpu")


def test_missing_or_incomplete_start_rule_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(pc.ConfigError, match=r"no start rule at .*run `python -m benchmarks.paper_curves --starts`"):
        sr.load_per_game(tmp_path / "none.json", pc.settings_of("tiny_cpu", pc.REGIME), ["NumberLine"])
    path = tmp_path / "start_rule_cpu.json"
    path.write_text(json.dumps({"settings": pc.settings_of("tiny_cpu", pc.REGIME), "games": {"NumberLine": {}},
                                "per_game": {}}))
    with pytest.raises(pc.ConfigError, match=r"no measurement for \['Blackjack'\]: run .*--starts --envs=Blackjack"):
        sr.load_per_game(path, pc.settings_of("tiny_cpu", pc.REGIME), ["NumberLine", "Blackjack"])
    # The grid stops before anything trains.
    argv = ["--envs=NumberLine", "--no_progress", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path}",
            f"--starts_from={tmp_path / 'none.json'}"]
    with pytest.raises(SystemExit) as exit_info:
        pc.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --starts_from {tmp_path / 'none.json'}: not a file (pass the start_rule_<tag>.json "
                   "that --starts wrote)"]
    with pytest.raises(SystemExit) as exit_info:  # the default, <out>/start_rule_<tag>.json, is missing too
        pc.main([*argv[:-2], f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no start rule at {tmp_path / 'out' / 'start_rule_cpu.json'}")
    assert not (tmp_path / "runs").exists()


def test_start_flags_are_clear_errors(capsys):
    for argv, message in [(["--starts", "--sweep"], "one at a time"),
                          (["--starts", "--smoke"], "no smoke version"),
                          (["--starts", "--seeds=3"], "--starts: takes --envs"),
                          (["--smoke", "--starts_from=x.json"], "a smoke does not read the start rule")]:
        with pytest.raises(SystemExit):
            pc.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    spec, args = pc.parse_args(["--starts"])
    assert (spec.ladder, spec.workdir, args.out) == ((3, 5, 10, 20), pc.SWEEP_WORKDIR, str(pc.RESULTS_DIR))
