"""benchmarks/paper_curves.py and benchmarks/alpha_sweep.py: the endpoints, the bootstrap CI, the alpha
rule, the reports from hand-made runs, and a real smoke sweep + grid that finishes, skips and resumes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import _common
from benchmarks import alpha_sweep as sw
from benchmarks import paper_curves as pc


def test_mean_se_matches_numpy():
    values = [0.2, 0.5, 0.9, 0.4]
    mean, se = pc.mean_se(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(np.std(values, ddof=1) / 2.0)
    assert pc.mean_se([0.3]) == (pytest.approx(0.3), 0.0)
    assert all(math.isnan(v) for v in pc.mean_se([float("nan")]))


# --------------------------------------------------------------------------------------- bootstrap
def _plain_bootstrap(values, resamples, seed):
    """The percentile bootstrap written out: `resamples` draws of n indices with replacement, one row at a
    time, the mean of each, and the 2.5 / 97.5 percentiles of those means."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        means[i] = np.mean(values[rng.integers(0, len(values), len(values))])
    return float(np.mean(values)), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_bootstrap_ci_matches_plain_numpy():
    diffs = [0.12, -0.03, 0.25, 0.07, 0.18, 0.02, 0.09, 0.15]  # eight per-seed differences
    got = _common.bootstrap_mean_ci(diffs)
    want = _plain_bootstrap(diffs, 10_000, _common.BOOTSTRAP_SEED)
    assert got == pytest.approx(want, abs=1e-12)
    assert _common.BOOTSTRAP_RESAMPLES == 10_000
    assert _common.bootstrap_mean_ci(diffs) == got  # seeded: reproducible
    other = _common.bootstrap_mean_ci(diffs, seed=1)
    assert other == pytest.approx(_plain_bootstrap(diffs, 10_000, 1), abs=1e-12) and other != got
    # Against normal theory on a larger sample: the interval is close to mean +/- 1.96 SE.
    sample = np.random.default_rng(0).normal(0.3, 1.0, 400)
    mean, low, high = _common.bootstrap_mean_ci(sample)
    se = sample.std(ddof=1) / 20.0
    assert low == pytest.approx(mean - 1.96 * se, abs=0.2 * se)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.2 * se)
    assert _common.bootstrap_mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in _common.bootstrap_mean_ci([]))
    assert _common.bootstrap_mean_ci([0.1, float("nan"), None, 0.3])[0] == pytest.approx(0.2)


def test_paired_difference_pairs_seeds_and_separates_only_when_the_ci_excludes_zero():
    a = {0: 0.6, 1: 0.7, 2: 0.65, 3: 0.8, 7: 0.9}
    b = {0: 0.5, 1: 0.55, 2: 0.6, 3: 0.6, 4: 0.1}  # seeds 4 and 7 have no pair
    d = pc.paired_difference(a, b)
    diffs = [0.1, 0.15, 0.05, 0.2]
    assert d["n"] == 4 and d["per_seed"] == pytest.approx({"0": 0.1, "1": 0.15, "2": 0.05, "3": 0.2})
    mean, low, high = _plain_bootstrap(diffs, 10_000, _common.BOOTSTRAP_SEED)
    assert d["mean"] == pytest.approx(mean) and d["ci95"] == pytest.approx([low, high])
    assert low > 0 and d["separated"] and d["direction"] == ">"
    mixed = pc.paired_difference({0: 0.5, 1: 0.7, 2: 0.4}, {0: 0.6, 1: 0.5, 2: 0.45})
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1] and not mixed["separated"] and mixed["direction"] == "~"
    assert pc.paired_difference(b, a)["direction"] == "<"
    single = pc.paired_difference({0: 0.9}, {0: 0.1})  # one pair: its CI is a point, but no claim
    assert single["n"] == 1 and not single["separated"]
    nan = pc.paired_difference({0: float("nan"), 1: 0.5}, {0: 0.2, 1: 0.4})
    assert nan["n"] == 1


# -------------------------------------------------------------------------------------------- AUC
def test_auc_is_the_mean_training_success_over_iterations():
    records = [
        {"step": 1, "env_steps": 128, "success_rate": None},  # no episode finished yet: left out
        {"step": 2, "env_steps": 256, "success_rate": 0.2},
        {"step": 3, "env_steps": 384, "success_rate": 0.9},  # superseded: written again after a resume
        {"step": 3, "env_steps": 384, "success_rate": 0.5},
        {"step": 4, "env_steps": 512, "success_rate": 0.8},
    ]
    assert pc.auc(records) == pytest.approx((0.2 + 0.5 + 0.8) / 3)
    # Equally spaced iterations: the trapezoid-free area under the step curve divided by its length.
    ys = np.array([0.2, 0.5, 0.8])
    assert pc.auc(records) == pytest.approx(np.sum(ys * 128) / (3 * 128))
    assert math.isnan(pc.auc([{"step": 1, "success_rate": float("nan")}, {"step": 2, "success_rate": None}]))
    assert pc.mean_over_iterations(records, "success_rate") == pytest.approx(pc.auc(records))
    unique = [records[0], records[1], records[3], records[4]]
    assert pc.auc(reversed(unique)) == pytest.approx(pc.auc(records))  # step order, not file order


# -------------------------------------------------------------------------------------- alpha rule
def _records(table):
    return [{"alpha": a, "seed": s, "auc": v} for (a, s), v in table.items()]


def test_alpha_rule_picks_the_best_mean_auc_ties_to_the_smaller_alpha():
    alphas, tuning = (0.03, 0.1, 0.3, 1.0), (100, 101)
    aucs = {(0.03, 100): 0.40, (0.03, 101): 0.50, (0.1, 100): 0.60, (0.1, 101): 0.50,
            (0.3, 100): 0.50, (0.3, 101): 0.60, (1.0, 100): 0.20, (1.0, 101): 0.10}
    chosen, means = sw.choose_alpha(_records(aucs), alphas, tuning)
    assert means == pytest.approx({0.03: 0.45, 0.1: 0.55, 0.3: 0.55, 1.0: 0.15})
    assert chosen == 0.1  # 0.1 and 0.3 tie at 0.55: the smaller alpha
    # Order of the records does not matter.
    assert sw.choose_alpha(list(reversed(_records(aucs))), alphas, tuning)[0] == 0.1
    # A clear winner.
    assert sw.choose_alpha(_records({**aucs, (1.0, 100): 0.9, (1.0, 101): 0.9}), alphas, tuning)[0] == 1.0
    # Every alpha tied: the smallest.
    assert sw.choose_alpha(_records({k: 0.3 for k in aucs}), alphas, tuning)[0] == 0.03


def test_alpha_rule_reads_only_the_tuning_seeds():
    alphas, tuning = (0.03, 0.1), (100, 101)
    aucs = {(0.03, 100): 0.5, (0.03, 101): 0.5, (0.1, 100): 0.4, (0.1, 101): 0.4}
    # Grid seeds 0..7 where 0.1 would win by far: ignored.
    other = {(0.1, s): 1.0 for s in range(8)}
    chosen, means = sw.choose_alpha(_records(aucs) + _records(other), alphas, tuning)
    assert chosen == 0.03 and means == pytest.approx({0.03: 0.5, 0.1: 0.4})
    # An alpha without one tuning seed: no choice (the other seed cannot stand in for it).
    partial = {k: v for k, v in aucs.items() if k != (0.1, 101)}
    chosen, means = sw.choose_alpha(_records(partial) + _records({(0.1, 0): 0.9}), alphas, tuning)
    assert chosen is None and set(means) == {0.03}
    # A non-finite AUC is missing; alphas outside the list are ignored.
    assert sw.choose_alpha(_records({**aucs, (0.1, 100): float("nan")}), alphas, tuning)[0] is None
    assert sw.choose_alpha(_records({**aucs, (3.0, 100): 1.0, (3.0, 101): 1.0}), alphas, tuning)[0] == 0.03


# ------------------------------------------------------------------------------ hand-made run dirs
def _fake_run(run_dir, curve, final=None, invalid=0.1):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, (episodes, success) in enumerate(curve):
            f.write(json.dumps({"step": i + 1, "env_steps": 16 * (i + 1), "episodes": episodes,
                                "success_rate": success, "invalid_action_rate": invalid}) + "\n")
    final_eval = None if final is None else {"success_rate": final, "invalid_action_rate": invalid / 2}
    (run_dir / "result.json").write_text(json.dumps({"final_eval": final_eval, "wall_s_this_invocation": 10.0}))


def test_sweep_report_from_hand_made_runs(tmp_path):
    spec = sw.SweepSpec(envs=("NumberLine", "Blackjack"), arms=("entropy", "coso"), alphas=(0.03, 0.1, 0.3),
                        seeds=(100, 101), workdir=str(tmp_path / "sweep"))
    # AUC = mean of the curve: per (arm, alpha), seed 100 / seed 101.
    aucs = {("entropy", 0.03): (0.3, 0.5), ("entropy", 0.1): (0.6, 0.4), ("entropy", 0.3): (0.2, 0.2),
            ("coso", 0.03): (0.1, 0.1), ("coso", 0.1): (0.3, 0.3), ("coso", 0.3): (0.5, 0.5)}
    for env in spec.envs:
        for (arm, alpha), per_seed in aucs.items():
            if env == "Blackjack" and (arm, alpha) == ("coso", 0.3):
                per_seed = per_seed[:1]  # seed 101 unfinished: Blackjack/coso gets no choice
            for seed, value in zip((100, 101), per_seed):
                _fake_run(spec.run_dir(env, arm, alpha, seed), [(4, value - 0.1), (4, value + 0.1)])
        # A grid seed with a huge AUC next to the sweep's runs: the rule never reads it.
        _fake_run(spec.run_dir(env, "entropy", 0.3, 0), [(4, 1.0)])
    assert (tmp_path / "sweep" / "NumberLine" / "coso" / "alpha_0.03" / "seed_100" / "result.json").exists()

    payload = sw.report(spec, tmp_path / "out", "t", None)
    assert payload["chosen"] == {"NumberLine": {"entropy": 0.1, "coso": 0.3}, "Blackjack": {"entropy": 0.1}}
    row = payload["table"]["NumberLine"]["entropy"]["alphas"]
    assert row["0.1"]["mean_auc"] == pytest.approx(0.5) and row["0.03"]["mean_auc"] == pytest.approx(0.4)
    assert row["0.3"]["per_seed_auc"] == pytest.approx({"100": 0.2, "101": 0.2})  # seed 0 not read
    assert payload["table"]["Blackjack"]["coso"]["chosen_alpha"] is None
    assert not payload["preregistered"] and payload["settings"] == pc.settings_of("tiny_cpu", pc.REGIME)
    md = (tmp_path / "out" / "alpha_sweep_t.md").read_text()
    assert "| NumberLine | entropy | 40.0 (2) | **50.0 (2)** | 20.0 (2) | 0.1 |" in md
    assert "| Blackjack | coso | 10.0 (2) | 30.0 (2) | 50.0 (1) | incomplete |" in md
    assert (tmp_path / "out" / "alpha_sweep_t.png").stat().st_size > 10_000

    # The grid reads the chosen alphas back, refuses other settings and a missing file.
    path = tmp_path / "out" / "alpha_sweep_t.json"
    alphas = pc.load_alphas(path, pc.settings_of("tiny_cpu", pc.REGIME), smoke=False)
    assert set(alphas) == {("NumberLine", "entropy", 0.1), ("NumberLine", "coso", 0.3), ("Blackjack", "entropy", 0.1)}
    with pytest.raises(pc.ConfigError, match="other settings.*temperature"):
        pc.load_alphas(path, pc.settings_of("tiny_cpu", (("sft_epochs", 3), ("temperature", 0.5))), smoke=False)
    with pytest.raises(pc.ConfigError, match="no alpha sweep at .*--sweep --smoke"):
        pc.load_alphas(tmp_path / "missing.json", {}, smoke=True)
    grid = pc.GridSpec(envs=("NumberLine", "Blackjack"), alphas=alphas, alphas_source=str(path))
    assert grid.alpha("NumberLine", "coso_x10") == pytest.approx(3.0) and grid.alpha("Blackjack", "none") is None
    assert grid.config("NumberLine", "coso", 0).get("alpha") == 0.3
    with pytest.raises(pc.ConfigError, match="chose no alpha for Blackjack/coso"):
        grid.alpha("Blackjack", "coso_x10")


def test_sweep_entropy_tie_goes_to_the_smaller_alpha_in_the_table(tmp_path):
    spec = sw.SweepSpec(envs=("NumberLine",), arms=("entropy",), alphas=(0.1, 0.3), seeds=(100, 101),
                        workdir=str(tmp_path / "sweep"))
    for alpha in spec.alphas:
        for seed in spec.seeds:
            _fake_run(spec.run_dir("NumberLine", "entropy", alpha, seed), [(4, 0.25), (4, 0.75)])
    payload = sw.report(spec, tmp_path / "out", "t", None)
    assert payload["chosen"] == {"NumberLine": {"entropy": 0.1}}
    md = (tmp_path / "out" / "alpha_sweep_t.md").read_text()
    assert "| NumberLine | entropy | **50.0 (2)** | 50.0 (2) | 0.1 |" in md


def test_grid_report_from_hand_made_runs(tmp_path):
    arms = ("none", "entropy", "coso", "entropy_x10", "coso_x10")
    alphas = (("NumberLine", "entropy", 0.1), ("NumberLine", "coso", 0.3))
    spec = pc.GridSpec(envs=("NumberLine",), algos=arms, seeds=(0, 1, 2), workdir=str(tmp_path / "runs"),
                       peak_min_episodes=10, alphas=alphas, alphas_source="sweep.json")
    finals = {"none": [0.50, 0.55, 0.45], "entropy": [0.60, 0.50, 0.70], "coso": [0.90, 0.80, 0.85],
              "entropy_x10": [0.2, 0.3, 0.1], "coso_x10": [0.4, 0.5, 0.45]}
    for arm in arms:
        for seed in spec.seeds:
            # Iterations finish 4, 8 and 18 episodes: the first point (4 < 10 episodes so far) must
            # not count as the peak.
            curve = [(4, 1.0), (8, 0.3 + 0.1 * seed), (18, finals[arm][seed] - 0.05)]
            _fake_run(spec.run_dir("NumberLine", arm, seed), curve, finals[arm][seed],
                      invalid=0.5 if arm.endswith("x10") else 0.1)
    (tmp_path / "runs" / "sft_eval_NumberLine.json").write_text(json.dumps({"success_rate": 0.4}))

    payload = pc.report(spec, tmp_path / "out", "t", None)
    row = payload["table"]["NumberLine"]
    curve_auc = {arm: [np.mean([1.0, 0.3 + 0.1 * s, finals[arm][s] - 0.05]) for s in spec.seeds] for arm in arms}
    for arm in arms:
        f = np.asarray(finals[arm])
        assert row[arm]["final_eval"][0] == pytest.approx(f.mean())
        assert row[arm]["final_eval"][1] == pytest.approx(f.std(ddof=1) / np.sqrt(3))
        assert row[arm]["auc"][0] == pytest.approx(np.mean(curve_auc[arm]))
        peaks = np.maximum([0.3, 0.4, 0.5], f - 0.05)
        assert row[arm]["peak_train_window"][0] == pytest.approx(peaks.mean())
    assert row["coso_x10"]["alpha"] == pytest.approx(3.0) and row["none"]["alpha"] is None
    assert row["entropy_x10"]["train_invalid_action_rate"][0] == pytest.approx(0.5)
    assert row["sft_start_eval"] == 0.4

    comparisons = payload["comparisons"]["NumberLine"]
    assert set(comparisons) == {"coso - entropy", "coso - none"}  # no coso_soft arm in this grid
    d = comparisons["coso - entropy"]["final"]
    want = _plain_bootstrap(np.subtract(finals["coso"], finals["entropy"]), 10_000, _common.BOOTSTRAP_SEED)
    assert (d["mean"], *d["ci95"]) == pytest.approx(want)
    assert comparisons["coso - none"]["final"]["separated"]  # +0.35, +0.25, +0.40: CI excludes 0
    auc_diffs = np.subtract(curve_auc["coso"], curve_auc["none"])
    assert comparisons["coso - none"]["auc"]["mean"] == pytest.approx(auc_diffs.mean())
    assert payload["statements"][0].startswith("NumberLine: coso - entropy auc: ")
    assert "coso - none final: separated (> 0" in payload["statements"][0]
    md = (tmp_path / "out" / "paper_curves_t.md").read_text()
    assert "| NumberLine | coso | 0.3 | 3 | 40.0 |" in md and "| 85.0 ± 2.9 |" in md
    assert "| NumberLine | coso - none | final | 3 |" in md
    assert "## Exploration: the chosen alpha and 10x" in md and "| NumberLine | coso_x10 | 3 | 3 |" in md
    assert (tmp_path / "out" / "paper_curves_t.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "paper_curves_exploration_t.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "out" / "paper_curves_t.json").read_text())
    assert written["figure"] == "paper_curves_t.png" and written["exploration_figure"] == "paper_curves_exploration_t.png"
    assert written["alphas"]["per_game"]["NumberLine"]["entropy_x10"] == pytest.approx(1.0)
    assert written["bootstrap"]["resamples"] == 10_000
    # Alphas 0.1 / 0.3 and their 10x never coincide: no post hoc same-alpha pair.
    assert written["same_alpha_post_hoc"] == {"NumberLine": {}} and "Post hoc" not in md


def test_same_alpha_pairs_are_reported_apart_as_post_hoc(tmp_path):
    # Blackjack: entropy at 0.1 (x10: 1) and coso at 1 (x10: 10), as the sweep chose: entropy_x10 and coso
    # share alpha 1, the only pair of equal alphas. EZPoints: both at 0.03 (and so both x10 at 0.3).
    arms = ("entropy", "coso", "entropy_x10", "coso_x10")
    alphas = (("Blackjack", "entropy", 0.1), ("Blackjack", "coso", 1.0),
              ("EZPoints", "entropy", 0.03), ("EZPoints", "coso", 0.03))
    spec = pc.GridSpec(envs=("Blackjack", "EZPoints"), algos=arms, seeds=(0, 1, 2, 3), workdir=str(tmp_path / "runs"),
                       peak_min_episodes=1, alphas=alphas, alphas_source="sweep.json")
    assert pc.same_alpha_pairs(spec, "Blackjack") == [("entropy_x10", "coso")]
    assert pc.same_alpha_pairs(spec, "EZPoints") == [("entropy", "coso"), ("entropy_x10", "coso_x10")]
    finals = {"entropy": [0.3, 0.35, 0.3, 0.32], "coso": [0.34, 0.33, 0.36, 0.35],
              "entropy_x10": [0.28, 0.28, 0.29, 0.28], "coso_x10": [0.27, 0.28, 0.28, 0.27]}
    invalid = {"entropy": 0.2, "coso": 0.3, "entropy_x10": 1.0, "coso_x10": 0.9}
    for env in spec.envs:
        for arm in arms:
            for seed in spec.seeds:
                _fake_run(spec.run_dir(env, arm, seed), [(5, 0.3), (5, finals[arm][seed])], finals[arm][seed],
                          invalid=invalid[arm] * (1 - 0.01 * seed))
    payload = pc.report(spec, tmp_path / "out", "t", None)
    pair = payload["same_alpha_post_hoc"]["Blackjack"]["coso - entropy_x10"]
    assert pair["alpha"] == pytest.approx(1.0)
    want = _plain_bootstrap(np.subtract(finals["coso"], finals["entropy_x10"]), 10_000, _common.BOOTSTRAP_SEED)
    assert (pair["final"]["mean"], *pair["final"]["ci95"]) == pytest.approx(want)
    # _fake_run's final evaluation reports half the training invalid rate.
    inv_diffs = [(invalid["coso"] - invalid["entropy_x10"]) * (1 - 0.01 * s) / 2 for s in spec.seeds]
    assert pair["final_invalid"]["mean"] == pytest.approx(np.mean(inv_diffs))
    md = (tmp_path / "out" / "paper_curves_t.md").read_text()
    section = md.split("## Post hoc, not pre-registered")[1]
    assert "| Blackjack | coso - entropy_x10 | 1 | 4 |" in section
    # At equal chosen alphas, coso - entropy is the pre-registered comparison, repeated and marked as such.
    assert "| EZPoints | coso - entropy (pre-registered above) | 0.03 | 4 |" in section
    assert "| EZPoints | coso_x10 - entropy_x10 | 0.3 | 4 |" in section
    # The pre-registered statements never mention a post hoc pair.
    assert "entropy_x10" not in " ".join(payload["statements"])


def test_a_run_finished_under_other_settings_stops_the_grid(tmp_path):
    from coso_jax.rl.run import RunError

    spec = pc.GridSpec(envs=("NumberLine",), algos=("none",), seeds=(0,), workdir=str(tmp_path / "runs"))
    (item,) = spec.items()
    item.run_dir.mkdir(parents=True)
    result = {"env_steps": item.config.total_env_steps, "resume_fingerprint": item.config.resume_fingerprint(),
              "config_fields": item.config.resume_fields()}
    (item.run_dir / "result.json").write_text(json.dumps(result))
    assert pc._finished(item) == result
    other = pc.arm_config("tiny_cpu", "NumberLine", "none", 0, None, (("temperature", 0.5),))
    (item.run_dir / "result.json").write_text(json.dumps(
        dict(result, resume_fingerprint=other.resume_fingerprint(), config_fields=other.resume_fields())))
    with pytest.raises(RunError, match="finished under other settings.*temperature: 0.5 -> 1.0"):
        pc._finished(item)
    (item.run_dir / "result.json").write_text(json.dumps({"final_eval": {"success_rate": 0.5}}))  # an old grid's
    with pytest.raises(RunError, match="settings not recorded"):
        pc._finished(item)


def test_bad_flags_are_clear_errors(capsys):
    for argv, message in [(["--envs=Chess"], "--envs: unknown ['Chess']"),
                          (["--seeds=a,b"], "--seeds must be"),
                          (["--set", "nope=1"], "nope=1"),
                          (["--set", "alpha=0.1"], "--set alpha: set by the grid itself"),
                          (["--seeds=0,100"], "[100] are the sweep's tuning seeds"),
                          (["--sweep", "--seeds=100,102"], "the sweep runs the tuning seeds [100, 101] only"),
                          (["--sweep", "--arms=none"], "--arms: unknown ['none']"),
                          (["--alphas=0.1"], "--alphas: only with --sweep"),
                          (["--sweep", "--alphas=0,0.1"], "--alphas must be positive"),
                          (["--sweep", "--alphas_from=x.json"], "--alphas_from: only without --sweep"),
                          (["--sweep", "--start_eval_steps=64"], "--start_eval_steps: only for the grid"),
                          (["--start_eval_steps=0"], "--start_eval_steps must be positive")]:
        with pytest.raises(SystemExit):
            pc.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_defaults_follow_the_preregistration():
    spec, _ = pc.parse_args([])
    assert spec.seeds == tuple(range(8)) and spec.algos == pc.GRID_ARMS and spec.workdir == "runs/paper_curves"
    assert dict(spec.overrides) == {"sft_epochs": 3, "temperature": 1.0}
    sweep, args = pc.parse_args(["--sweep"])
    assert sweep.seeds == sweep.tuning_seeds == (100, 101) and sweep.alphas == (0.03, 0.1, 0.3, 1.0)
    assert sweep.arms == ("entropy", "coso", "coso_soft") and args.out == str(_common.RESULTS_DIR)
    config = sweep.config("EZPoints", "coso_soft", 0.3, 100)
    assert [config.get(k) for k in ("algo", "soft_backup", "alpha", "seed")] == ["coso", True, 0.3, 100]
    assert (config.get("temperature"), config.get("sft_epochs")) == (1.0, 3)
    assert sweep.run_dir("EZPoints", "coso_soft", 0.3, 100).as_posix() == \
        "runs/paper_curves_sweep/EZPoints/coso_soft/alpha_0.3/seed_100"
    smoke, args = pc.parse_args(["--smoke"])  # a smoke writes under its run directory, never to results/
    assert smoke.seeds == (0,) and args.out == "runs/paper_curves_smoke"
    assert pc.parse_args(["--sweep", "--smoke"])[0].seeds == (100,)


def test_grid_takes_its_alphas_and_the_coso_soft_arm_from_the_sweep(tmp_path):
    path = tmp_path / "alpha_sweep_cpu.json"
    chosen = {"NumberLine": {"entropy": 0.1, "coso": 0.3, "coso_soft": 1.0}}
    path.write_text(json.dumps({"settings": pc.settings_of("tiny_cpu", pc.REGIME), "chosen": chosen}))
    spec, args = pc.parse_args(["--envs=NumberLine", f"--alphas_from={path}"])
    spec = pc.with_sweep_alphas(spec, args, "cpu")
    assert spec.algos == ("none", "entropy", "coso", "coso_soft", "entropy_x10", "coso_x10")
    assert spec.alpha("NumberLine", "none") is None
    assert [spec.alpha("NumberLine", a) for a in spec.algos[1:]] == pytest.approx([0.1, 0.3, 1.0, 1.0, 3.0])
    soft = spec.config("NumberLine", "coso_soft", 0)
    assert [soft.get(k) for k in ("algo", "soft_backup", "alpha", "temperature")] == ["coso", True, 1.0, 1.0]
    spec, args = pc.parse_args(["--envs=NumberLine", "--arms=none,coso", f"--alphas_from={path}"])
    assert pc.with_sweep_alphas(spec, args, "cpu").algos == ("none", "coso")  # explicit arms stay
    assert pc.parse_args(["--sweep", "--seeds=100"])[0].seeds == (100,)  # a seed, not a count


def test_grid_refuses_to_start_without_the_sweep(tmp_path, capsys, monkeypatch):
    argv = ["--smoke", "--envs=NumberLine", "--arms=coso", "--no_progress", f"--workdir={tmp_path / 'runs'}",
            f"--alphas_from={tmp_path / 'none.json'}"]
    with pytest.raises(SystemExit) as exit_info:
        pc.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --alphas_from {tmp_path / 'none.json'}: not a file (pass the alpha_sweep_<tag>.json "
                   "that --sweep wrote)"]
    assert not (tmp_path / "runs" / "NumberLine").exists()
    # Without --alphas_from, the default sweep file is looked for and its absence explained.
    monkeypatch.setattr(pc, "SWEEP_SMOKE_WORKDIR", str(tmp_path / "no_sweep"))
    with pytest.raises(SystemExit):
        pc.main(argv[:-1])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no alpha sweep at {tmp_path / 'no_sweep'}")


def test_input_files_that_are_not_what_they_should_be_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"table": {}}))
    (tmp_path / "web.json").write_text(json.dumps({"runs": [], "summary": {}}))
    for argv, message in [
        (["--alphas_from", str(tmp_path / "bad.json")], f"error: {tmp_path / 'bad.json'} is not a valid JSON file ("),
        (["--alphas_from", str(tmp_path / "other.json")],
         f"error: {tmp_path / 'other.json'} is not the alpha sweep's JSON"),
        (["--starts_from", str(tmp_path / "other.json")],
         f"error: {tmp_path / 'other.json'} is not the start rule's JSON"),
        (["--starts_from", str(tmp_path / "none.json")], f"error: --starts_from {tmp_path / 'none.json'}: not a file"),
        (["--alphas_from", str(tmp_path)], f"error: --alphas_from {tmp_path}: not a file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            pc.main(["--report_only", "--no_progress", f"--out={tmp_path / 'out'}", *argv])
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message) and not any("Traceback" in line for line in err), (argv, err)
    # A report of a work directory without one finished run would be a table of n/a: an error instead.
    with pytest.raises(SystemExit) as exit_info:
        pc.main(["--report_only", "--no_progress", f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / 'empty'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The report states what it lacks (no start rule, no sweep at the default paths), then stops.
    assert [line.split(":")[0] for line in err] == ["note", "note", "error"]
    assert err[-1] == (f"error: no finished run of this grid under {tmp_path / 'empty'}: nothing to report (train "
                       "the grid first, or pass the --workdir that holds its runs)")
    with pytest.raises(SystemExit):
        pc.parse_args(["--report_only", "--web_results", str(tmp_path / "none.json")])
    assert f"--web_results {tmp_path / 'none.json'}: not a file" in capsys.readouterr().err
    assert pc.web_panel(tmp_path / "web.json") == ({}, {})
    with pytest.raises(pc.ConfigError, match="is not a `benchmarks.alfworld --compare` JSON"):
        pc.alfworld_panel(tmp_path / "web.json")


def test_smoke_sweep_then_grid_finishes_skips_and_resumes(tmp_path):
    """The real trainer, 2 tiny iterations per run. The smoke sweep (1 game, 1 arm, 2 alphas, 1 seed)
    chooses an alpha; the smoke grid runs at it: the first call trains, a call after losing result.json
    resumes from the last checkpoint (no iteration is trained twice), a third call skips the run."""
    sweep_argv = ["--smoke", "--envs=NumberLine", "--arms=coso", "--alphas=0.03,0.1", "--no_progress",
                  f"--workdir={tmp_path / 'sweep'}"]
    sweep = sw.main(sweep_argv)
    assert sweep["timings"]["runs_trained"] == 2 and sweep["smoke"] and not sweep["preregistered"]
    means = {a: sweep["table"]["NumberLine"]["coso"]["alphas"][a]["mean_auc"] for a in ("0.03", "0.1")}
    best = max(means.values())
    assert sweep["chosen"] == {"NumberLine": {"coso": 0.03 if means["0.03"] >= best - 1e-9 else 0.1}}
    for alpha in ("0.03", "0.1"):
        result = json.loads((tmp_path / "sweep" / "NumberLine" / "coso" / f"alpha_{alpha}" / "seed_100" /
                             "result.json").read_text())
        assert result["alpha"] == float(alpha) and result["final_eval"] is None and 0.0 <= result["auc"] <= 1.0
    for suffix in ("json", "md", "png"):  # a smoke writes under its work directory
        assert (tmp_path / "sweep" / f"alpha_sweep_smoke.{suffix}").exists()
    assert sw.main(sweep_argv + ["--report_only"])["chosen"] == sweep["chosen"]

    argv = ["--smoke", "--envs=NumberLine", "--arms=coso", "--no_progress", f"--workdir={tmp_path / 'runs'}",
            f"--alphas_from={tmp_path / 'sweep' / 'alpha_sweep_smoke.json'}"]
    first = pc.main(argv)
    assert first["timings"]["runs_trained"] == 1
    run_dir = tmp_path / "runs" / "NumberLine" / "coso" / "seed_0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    row = first["table"]["NumberLine"]["coso"]
    assert 0.0 <= row["final_eval"][0] <= 1.0 and row["auc"][0] == pytest.approx(pc.auc(records))
    assert row["alpha"] == sweep["chosen"]["NumberLine"]["coso"]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["alpha"], config["temperature"], config["sft_epochs"]) == (row["alpha"], 1.0, 6)  # smoke SFT size
    assert (tmp_path / "runs" / "paper_curves_smoke.png").exists()
    assert (tmp_path / "runs" / "paper_curves_smoke.json").exists()

    (run_dir / "result.json").unlink()  # as if interrupted after the last checkpoint
    second = pc.main(argv)
    assert second["timings"]["runs_trained"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]

    third = pc.main(argv)
    assert third["timings"]["runs_trained"] == 0 and third["timings"]["runs_skipped"] == 1
    # Its report states the time of the latest invocation that trained, not "0 runs in 0.0 min".
    md = (tmp_path / "runs" / "paper_curves_smoke.md").read_text()
    assert "the last recorded invocation trained 1 runs in" in md

    # Invocations that trained are kept with the runs, so a report drawn later still states the time.
    history = json.loads((tmp_path / "runs" / "grid_timings.json").read_text())
    assert [h["runs_trained"] for h in history] == [1, 1]
    redrawn = pc.main(argv + ["--report_only"])
    assert redrawn["timings"]["grid_wall_s_this_invocation"] == history[-1]["grid_wall_s_this_invocation"]
    assert len(redrawn["timings_all_invocations"]) == 2

    # A longer evaluation of the cached start replaces the grid's own in the report (more episodes), once.
    grid_start = json.loads((tmp_path / "runs" / "sft_eval_NumberLine.json").read_text())
    longer = pc.main(argv + ["--report_only", "--start_eval_steps=64"])
    measured = json.loads((tmp_path / "runs" / "sft_eval_NumberLine_64_steps.json").read_text())
    assert measured["eval_steps"] == 64 and measured["episodes"] > grid_start["episodes"]
    table = longer["table"]["NumberLine"]
    assert (table["sft_start_eval"], table["sft_start_episodes"], table["sft_start_eval_steps"]) == (
        measured["success_rate"], measured["episodes"], 64)
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("tmp")] == []  # no leftovers
    mtime = (tmp_path / "runs" / "sft_eval_NumberLine_64_steps.json").stat().st_mtime_ns
    pc.main(argv + ["--report_only", "--start_eval_steps=64"])  # cached: not measured again
    assert (tmp_path / "runs" / "sft_eval_NumberLine_64_steps.json").stat().st_mtime_ns == mtime


def test_the_start_is_reported_from_its_evaluation_with_the_most_episodes(tmp_path):
    assert pc.start_measurement(tmp_path, "NumberLine") is None
    (tmp_path / "sft_eval_NumberLine.json").write_text(json.dumps({"success_rate": 0.4, "episodes": 84}))
    (tmp_path / "sft_eval_NumberLine_2048_steps.json").write_text(json.dumps({"success_rate": 0.33, "episodes": 338}))
    (tmp_path / "sft_eval_NumberLineX.json").write_text(json.dumps({"success_rate": 1.0, "episodes": 9999}))
    (tmp_path / "sft_eval_NumberLineX_4096_steps.json").write_text(json.dumps({"success_rate": 1.0, "episodes": 9999}))
    assert pc.start_measurement(tmp_path, "NumberLine")["episodes"] == 338
    # Binomial standard error sqrt(p (1 - p) / n), in percentage points.
    assert pc.fmt_start(0.33, 338) == f"33.0 ± {100 * np.sqrt(0.33 * 0.67 / 338):.1f}"
    assert pc.fmt_start(0.4, None) == "40.0" and pc.fmt_start(None, 10) == "n/a"
    assert pc.fmt_start(0.0, 253) == "0.0 (0 of 253)"  # not "0.0 ± 0.0", which would read as exact
    spec = pc.GridSpec(envs=("NumberLine",), algos=("none",), workdir=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pc.ConfigError, match="no SFT start of NumberLine .*run the grid first"):
        pc.measure_starts(spec, 64)


def test_reports_quote_paths_inside_the_repository_relative_to_it(tmp_path):
    inside = _common.RESULTS_DIR / "alpha_sweep_cpu.json"
    assert _common.shown_path(inside) == "benchmarks/results/alpha_sweep_cpu.json"
    assert _common.shown_path(tmp_path / "x.json") == str(tmp_path / "x.json")
