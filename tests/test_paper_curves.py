"""benchmarks/paper_curves.py: statistics, the report from hand-made runs, and a real smoke grid that
finishes, skips and resumes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import paper_curves as pc


def test_mean_se_matches_numpy():
    values = [0.2, 0.5, 0.9, 0.4]
    mean, se = pc.mean_se(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(np.std(values, ddof=1) / 2.0)
    assert pc.mean_se([0.3]) == (pytest.approx(0.3), 0.0)
    assert all(math.isnan(v) for v in pc.mean_se([float("nan")]))


@pytest.mark.parametrize("a, b, expected", [
    ((0.9, 0.05), (0.5, 0.05), ">"),
    ((0.5, 0.05), (0.9, 0.05), "<"),
    ((0.6, 0.1), (0.5, 0.1), "~"),  # bands [0.5, 0.7] and [0.4, 0.6] overlap
    ((float("nan"), 0.0), (0.5, 0.1), "?"),
])
def test_separation(a, b, expected):
    assert pc.separation(a, b) == expected


def _fake_run(spec, env, algo, seed, curve, final):
    run_dir = spec.run_dir(env, algo, seed)
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, (episodes, success) in enumerate(curve):
            f.write(json.dumps({"step": i + 1, "env_steps": 16 * (i + 1), "episodes": episodes,
                                "success_rate": success}) + "\n")
    (run_dir / "result.json").write_text(json.dumps(
        {"env": env, "algo": algo, "seed": seed, "final_eval": {"success_rate": final},
         "wall_s_this_invocation": 10.0}))


def test_report_from_hand_made_runs(tmp_path):
    spec = pc.GridSpec(envs=("NumberLine",), algos=("none", "coso"), seeds=(0, 1, 2),
                       workdir=str(tmp_path / "runs"), peak_min_episodes=10)
    finals = {"none": [0.50, 0.55, 0.45], "coso": [0.90, 0.80, 0.85]}
    for algo in spec.algos:
        for seed in spec.seeds:
            # Iterations finish 4, 8 and 18 episodes: the first point (4 < 10 episodes so far) must
            # not count as the peak.
            curve = [(4, 1.0), (8, 0.3 + 0.1 * seed), (18, finals[algo][seed] - 0.05)]
            _fake_run(spec, "NumberLine", algo, seed, curve, finals[algo][seed])
    (tmp_path / "runs" / "sft_eval_NumberLine.json").write_text(json.dumps({"success_rate": 0.4}))

    payload = pc.report(spec, tmp_path / "out", "t", None)
    row = payload["table"]["NumberLine"]
    for algo in spec.algos:
        f = np.asarray(finals[algo])
        assert row[algo]["final_eval"][0] == pytest.approx(f.mean())
        assert row[algo]["final_eval"][1] == pytest.approx(f.std(ddof=1) / np.sqrt(3))
        peaks = np.maximum([0.3, 0.4, 0.5], f - 0.05)
        assert row[algo]["peak_train_window"][0] == pytest.approx(peaks.mean())
    assert row["sft_start_eval"] == 0.4
    assert row["separation_final"] == {"coso vs none": ">"}
    assert payload["statements"] == ["NumberLine: CoSo > none: yes"]
    md = (tmp_path / "out" / "paper_curves_t.md").read_text()
    assert "| NumberLine | coso | 3 | 40.0 | 85.0 ± 2.9 |" in md
    assert (tmp_path / "out" / "paper_curves_t.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "paper_curves_t.json").read_text())["figure"] == "paper_curves_t.png"


def test_bad_flags_are_clear_errors(capsys):
    for argv, message in [(["--envs=Chess"], "--envs: unknown ['Chess']"),
                          (["--seeds=a,b"], "--seeds must be"),
                          (["--set", "nope=1"], "nope=1")]:
        with pytest.raises(SystemExit):
            pc.parse_args(argv)
        assert message in capsys.readouterr().err


def test_smoke_grid_finishes_skips_and_resumes(tmp_path):
    """The real trainer, 2 tiny iterations: the first call trains, a call after losing result.json
    resumes from the last checkpoint (no iteration is trained twice), a third call skips the run."""
    argv = ["--smoke", "--envs=NumberLine", "--algos=coso", "--no_progress",
            f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}"]
    first = pc.main(argv)
    assert first["timings"]["runs_trained"] == 1
    run_dir = tmp_path / "runs" / "NumberLine" / "coso" / "seed_0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert 0.0 <= first["table"]["NumberLine"]["coso"]["final_eval"][0] <= 1.0
    assert (tmp_path / "out" / "paper_curves_smoke.png").exists()

    (run_dir / "result.json").unlink()  # as if interrupted after the last checkpoint
    second = pc.main(argv)
    assert second["timings"]["runs_trained"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]

    third = pc.main(argv)
    assert third["timings"]["runs_trained"] == 0 and third["timings"]["runs_skipped"] == 1

    # Invocations that trained are kept with the runs, so a report drawn later still states the time.
    history = json.loads((tmp_path / "runs" / "grid_timings.json").read_text())
    assert [h["runs_trained"] for h in history] == [1, 1]
    redrawn = pc.main(argv + ["--report_only"])
    assert redrawn["timings"]["grid_wall_s_this_invocation"] == history[-1]["grid_wall_s_this_invocation"]
    assert len(redrawn["timings_all_invocations"]) == 2
