"""The ALFWorld comparison (`python -m benchmarks.alfworld --compare`): the per-task-type evaluation
breakdown against a plain count over episodes, the tables' mean ± SE, the `--smoke` grid end to end
(trains, resumes, skips), and paper_curves' report picking up the comparison's JSON.

Games are generated into a temporary cache via $COSO_ALFWORLD_CACHE (one game per task type and split).
"""
from __future__ import annotations

import json
import math

import alfworld  # noqa: F401  (a test dependency: fail loudly when missing)
import numpy as np
import pytest

from benchmarks import alfworld as bench
from benchmarks import paper_curves as pc
from coso_jax.envs.alfworld.generator import TASK_TYPES
from coso_jax.envs.alfworld.text import format_answer
from coso_jax.rl.episodes import EpisodeStats, StepOutput, VectorRollout, by_task_type


@pytest.fixture(scope="module")
def game_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("alfworld_compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COSO_ALFWORLD_CACHE", str(root / "pool"))
        yield root


def _plain_count(stats: EpisodeStats) -> dict:
    out = {}
    for t in set(x for x in stats.task_types if x is not None):
        n = wins = 0
        progress = returns = 0.0
        for i in range(len(stats.returns)):
            if stats.task_types[i] == t:
                n += 1
                wins += int(stats.successes[i])
                progress += stats.final_progress[i]
                returns += stats.returns[i]
        out[t] = (n, wins, progress / n, returns / n)
    return out


def test_by_task_type_is_a_plain_count():
    stats = EpisodeStats()
    rng = np.random.default_rng(0)
    for _ in range(40):
        t = TASK_TYPES[int(rng.integers(3))]
        won = bool(rng.random() < 0.4)
        stats.add(float(rng.normal()), int(rng.integers(1, 50)),
                  {"won": won, "task_type": t, "progress": 1.0 if won else float(rng.random())})
    stats.add(1.0, 3, {})  # a gym_cards episode: no task type, left out of the groups
    assert stats.task_types[-1] is None and stats.successes[-1]
    groups = by_task_type(stats)
    assert list(groups) == sorted(groups) and len(groups) == 3
    for t, (n, wins, progress, returns) in _plain_count(stats).items():
        g = groups[t]
        assert (g["episodes"], g["successes"]) == (n, wins)
        assert g["success_rate"] == pytest.approx(wins / n)
        assert g["mean_progress"] == pytest.approx(progress) and g["mean_return"] == pytest.approx(returns)
    assert by_task_type(EpisodeStats()) == {}


class _ScriptedPolicy:
    """Answers with the expert's next command for `winning` task types and with an inadmissible
    command otherwise (stands in for the VLM: `decode` is replaced, so tokens are ignored).

    The episode runner builds one prompt per slot, in slot order, right before each policy call; the
    wrapped `prompt` records those infos, so `decode` answers each slot from its own current state."""

    def __init__(self, rollout: VectorRollout, winning: set[str]) -> None:
        self.rollout, self.winning = rollout, winning
        self.pending: list[dict] = []
        self.infos: list[dict] = []
        self.steps: list[int] = []
        prompt = rollout.prompt

        def recording_prompt(info):
            self.pending.append(info)
            return prompt(info)

        rollout.prompt = recording_prompt
        rollout.decode = self.decode

    def __call__(self, inputs, step) -> StepOutput:
        self.steps.append(step)
        self.infos, self.pending = self.pending, []
        n = self.rollout.num_envs
        assert len(self.infos) == n  # every call sees all slots (one compiled batch shape)
        return StepOutput(np.zeros((n, 2), np.int32), np.zeros((n, 2), np.float32), np.ones((n, 2), bool),
                          np.zeros(n, np.float32))

    def decode(self, tokens, mask):
        texts = []
        for info in self.infos:
            plan, step = info["walkthrough"], info["step"]
            if info["task_type"] in self.winning and step < len(plan):
                texts.append(format_answer("expert", plan[step]))
            else:
                texts.append(format_answer("lost", "fly to the moon"))
        return texts, np.zeros(tokens.shape, bool), np.zeros(tokens.shape, bool)


def test_play_episodes_breakdown_matches_the_episodes(game_cache):
    rollout = VectorRollout("ALFWorld", 4, encoder=lambda prompts, obs: {}, tokenizer=None, seed=0,
                            env_kwargs={"pool_size": 1, "max_steps": 12})
    winning = set(TASK_TYPES[::2])
    policy = _ScriptedPolicy(rollout, winning)
    episodes = bench.eval_episodes("test", 1)
    assert len(episodes) == 6 and {e["task_type"] for e in episodes} == set(TASK_TYPES)
    stats = rollout.play_episodes(policy, episodes)
    rollout.close()
    assert policy.steps == list(range(len(policy.steps)))  # the runner numbers its policy calls 0, 1, ...
    assert sorted(stats.task_types) == sorted(TASK_TYPES)  # every episode counted, however long
    groups = by_task_type(stats)
    for t, (n, wins, progress, _) in _plain_count(stats).items():
        assert groups[t]["episodes"] == n == 1 and groups[t]["successes"] == wins
        assert groups[t]["mean_progress"] == pytest.approx(progress)
        assert wins == int(t in winning)  # the expert wins, the inadmissible answers never do
        assert (progress == 1.0) == (t in winning)
    for t, length in zip(stats.task_types, stats.lengths):
        assert (length == 12) == (t not in winning)


def test_table_row_mean_and_se():
    def evaluation(rates):
        return {"success_rate": float(np.mean(rates)), "mean_progress": float(np.mean(rates)) / 2,
                "by_task_type": {t: {"episodes": 2, "success_rate": r, "mean_progress": r / 2}
                                 for t, r in zip(TASK_TYPES, rates)}}

    per_seed = [[0.5, 0.0, 1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.5, 0.5, 0.0, 0.5], [0.0, 0.5, 1.0, 0.0, 0.0, 0.0]]
    row = bench._table_row([evaluation(r) for r in per_seed])
    assert row["seeds"] == 3
    x = np.asarray(per_seed)
    for j, t in enumerate(TASK_TYPES):
        assert row[t]["success"][0] == pytest.approx(x[:, j].mean())
        assert row[t]["success"][1] == pytest.approx(x[:, j].std(ddof=1) / math.sqrt(3))
        assert row[t]["progress"][0] == pytest.approx(x[:, j].mean() / 2)
    assert row["average"]["success"][0] == pytest.approx(x.mean())
    assert row["average"]["success"][1] == pytest.approx(x.mean(axis=1).std(ddof=1) / math.sqrt(3))


@pytest.mark.slow  # ~45 s; `python -m benchmarks.alfworld --compare --smoke` runs the same grid (CI time budget)
def test_compare_smoke_trains_resumes_and_skips(game_cache):
    workdir, out = game_cache / "runs", game_cache / "out"
    argv = ["--compare", "--smoke", "--algos=none", "--no_progress", f"--workdir={workdir}", f"--out={out}"]
    first = bench.main(argv)
    assert first["timings"]["runs_trained"] == 1
    run_dir = workdir / "none" / "seed_0"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    run = first["runs"][0]
    assert run["env_steps"] == [8, 16] and len(run["success_rate"]) == 2
    test = run["final_eval"]["test"]
    assert test["episodes"] == 6 and sorted(test["by_task_type"]) == sorted(TASK_TYPES)
    wins = sum(g["successes"] for g in test["by_task_type"].values())
    assert test["success_rate"] == pytest.approx(wins / 6)
    rows = first["table"]["test"]
    assert set(rows) == {"none", "sft_start"} and rows["none"]["seeds"] == 1
    for t in TASK_TYPES:
        assert rows["none"][t]["success"][0] == test["by_task_type"][t]["success_rate"]
        assert 0.0 <= rows["sft_start"][t]["progress"][0] <= 1.0
    saved = json.loads((out / "alfworld_compare_smoke.json").read_text())
    assert saved["device"]["platform"] and saved["dtype"] == "float32" and saved["shapes"]["prompt_len"] > 0
    assert "| none | 1 |" in saved["markdown"]
    assert (workdir / "sft_eval.json").exists()

    (run_dir / "result.json").unlink()  # as if interrupted after the last checkpoint
    second = bench.main(argv)
    assert second["timings"]["runs_trained"] == 1
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # resumed at iteration 2: nothing trained twice

    third = bench.main(argv)
    assert third["timings"]["runs_trained"] == 0 and third["timings"]["runs_skipped"] == 1


def _synthetic_alfworld_json(path):
    def evaluation(rate):
        return {"success_rate": rate, "mean_progress": 0.5,
                "by_task_type": {t: {"episodes": 4, "success_rate": rate, "mean_progress": 0.5} for t in TASK_TYPES}}

    runs, table = [], {}
    for algo, rates in {"none": [0.25, 0.5], "coso": [0.5, 0.75]}.items():
        for seed, rate in enumerate(rates):
            runs.append({"algo": algo, "seed": seed, "env_steps": [128, 256, 384],
                         "success_rate": [None, rate / 2, rate], "final_eval": {"test": evaluation(rate)}})
        table[algo] = bench._table_row([evaluation(r) for r in rates])
    table["sft_start"] = bench._table_row([evaluation(0.125)])
    path.write_text(json.dumps({"task_types": list(TASK_TYPES), "short_names": bench.SHORT_NAMES,
                                "eval": {"games_per_task_type": {"test": 4}}, "runs": runs,
                                "table": {"test": table}}))


def test_paper_curves_report_adds_the_alfworld_panel(tmp_path):
    spec = pc.GridSpec(envs=("NumberLine",), algos=("none",), seeds=(0,), workdir=str(tmp_path / "runs"))
    run_dir = spec.run_dir("NumberLine", "none", 0)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "env_steps": 16 * i, "episodes": 60, "success_rate": 0.1 * i}) + "\n"
        for i in (1, 2)))
    (run_dir / "result.json").write_text(json.dumps({"final_eval": {"success_rate": 0.3},
                                                     "wall_s_this_invocation": 1.0}))
    alf = tmp_path / "alfworld_compare.json"

    without = pc.report(spec, tmp_path / "a", "t", None, alfworld_results=alf)  # the file is absent
    md_without = (tmp_path / "a" / "paper_curves_t.md").read_text()
    assert "alfworld" not in without and "ALFWorld" not in md_without
    plain = pc.report(spec, tmp_path / "b", "t", None)  # as before this option existed
    assert md_without == (tmp_path / "b" / "paper_curves_t.md").read_text()
    assert set(plain) == set(without)

    _synthetic_alfworld_json(alf)
    payload = pc.report(spec, tmp_path / "c", "t", None, alfworld_results=alf)
    md = (tmp_path / "c" / "paper_curves_t.md").read_text()
    assert md.startswith(md_without)  # the gym_cards report is unchanged, the ALFWorld part follows
    assert "## ALFWorld (6 task types)" in md
    assert "| Pick | Look | Clean | Heat | Cool | Pick2 | Avg |" in md
    assert "| coso | 2 | 62.5 ± 12.5 |" in md and "| SFT start | 1 | 12.5 ± 0.0 |" in md
    assert "| paper CoSo (7B, different scale) |" in md and "26.5 |" in md
    assert payload["alfworld"]["table"]["test"]["none"]["average"]["success"][0] == pytest.approx(0.375)
    assert payload["alfworld"]["paper_average_percent"] == pc.PAPER_ALFWORLD_AVERAGE
    size = {d: (tmp_path / d / "paper_curves_t.png").stat().st_size for d in "ac"}
    assert size["c"] > size["a"]  # one more panel
    panel = pc.alfworld_panel(alf)
    assert sorted(panel[0]) == ["coso", "none"] and len(panel[0]["coso"]) == 2
    assert math.isnan(panel[0]["none"][0][1][0])
    args = pc.parse_args([f"--alfworld_results={alf}"])[1]
    assert args.alfworld_results == str(alf)
