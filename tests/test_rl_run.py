"""The run scaffold (coso_jax/rl/run.py) without a trainer: the work-directory lock, what opening a run
checks (and leaves behind when it fails), resume-step choice, old-format checkpoints, the loop's
cadences and non-finite policy on a fake backbone, keys, and one-line user errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from coso_jax import metrics as metrics_lib
from coso_jax.checkpoint import Checkpointer, CheckpointError, config_fingerprint
from coso_jax.rl.config import ConfigError, RunConfig
from coso_jax.rl.run import (
    CHECKPOINT_FORMAT,
    IterationOutput,
    Run,
    RunError,
    WorkdirLock,
    eval_key,
    exit_on_user_error,
    iteration_key,
    phase_key,
)

FIELDS = {"env": "NumberLine", "alpha": 0.01}


def _run(workdir, **kwargs):
    cfg = kwargs.pop("run_config", RunConfig(progress=False, checkpoint_every=1, keep_checkpoints=5))
    fields, fingerprint_fields = kwargs.pop("fields", FIELDS), kwargs.pop("fields_fp", FIELDS)
    return Run(workdir, config_fields=fields, fingerprint=config_fingerprint(fingerprint_fields), run_config=cfg, **kwargs)


class FakeBackbone:
    """Counts iterations; `skip` lists iterations whose every optimizer step is skipped."""

    def __init__(self, skip=()):
        self.iteration, self.skip, self.keys = 0, set(skip), []

    def run_iteration(self, key):
        self.keys.append(np.asarray(jax.random.key_data(key)))
        self.iteration += 1
        skipped = 4 if self.iteration in self.skip else 0
        return IterationOutput({"success_rate": 0.5, "x": float(self.iteration)}, env_steps=10 * self.iteration,
                               skipped=skipped, minibatches=4)

    def checkpoint_state(self):
        return {"state": {"it": np.asarray(self.iteration)}}, {"format": CHECKPOINT_FORMAT, "iteration": self.iteration}


def test_loop_cadence_metrics_checkpoints_and_derived_keys(tmp_path):
    run = _run(tmp_path / "w", run_config=RunConfig(progress=False, checkpoint_every=2, keep_checkpoints=5,
                                                    heatmap_every=2))
    run.open_writer(0, {"a": 1})
    backbone = FakeBackbone()
    key = jax.random.key(3)
    history = run.train(backbone, key, 5, desc="t", heatmap_title="h", plot_title="p", max_skipped_updates=2)
    run.close()
    assert [r["x"] for r in history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    records = metrics_lib.read_jsonl(tmp_path / "w" / "metrics.jsonl")
    assert [(r["step"], r["env_steps"]) for r in records] == [(i, 10 * i) for i in range(1, 6)]
    assert Checkpointer(tmp_path / "w" / "checkpoints").all_steps() == [2, 4, 5]  # every 2, and the last
    assert (tmp_path / "w" / "success_rate.png").exists()
    # Iteration i's key is fold_in(key, i): nothing is carried between iterations.
    for i, k in enumerate(backbone.keys):
        np.testing.assert_array_equal(k, jax.random.key_data(iteration_key(key, i)))
    assert len({k.tobytes() for k in backbone.keys}) == 5
    streams = [phase_key(key, p) for p in ("rollout", "update", "causal")] + [eval_key(key, 0), eval_key(key, 1)]
    assert len({np.asarray(jax.random.key_data(k)).tobytes() for k in streams}) == 5


def test_only_skipped_updates_stop_the_run_and_are_not_checkpointed(tmp_path, caplog):
    run = _run(tmp_path / "w")
    run.open_writer(0, {})
    with pytest.raises(RunError, match=r"2 updates in a row .* \(iterations 3-4\).*last checkpoint \(step 2\) is kept"):
        run.train(FakeBackbone(skip={3, 4}), jax.random.key(0), 10, desc="t", heatmap_title="h", plot_title="p",
                  max_skipped_updates=2)
    run.close()
    assert Checkpointer(tmp_path / "w" / "checkpoints").all_steps() == [1, 2]
    # One skipped update alone is warned about and the run goes on.
    run = _run(tmp_path / "v")
    run.open_writer(0, {})
    with caplog.at_level("WARNING"):
        run.train(FakeBackbone(skip={2}), jax.random.key(0), 3, desc="t", heatmap_title="h", plot_title="p",
                  max_skipped_updates=2)
    run.close()
    assert "iteration 2: 4 of 4 optimizer steps skipped" in caplog.text


def test_existing_checkpoints_without_resume_and_failed_open_leave_nothing(tmp_path):
    run = _run(tmp_path / "w")
    run.save(1, {"state": {"it": np.asarray(1)}}, {"format": CHECKPOINT_FORMAT})
    run.close()
    with pytest.raises(RunError, match="already holds checkpoints; pass --resume"):
        _run(tmp_path / "w")
    # A run that fails to open removes the directories it created (and only those).
    fresh = tmp_path / "a" / "b" / "c"

    class Boom(Exception):
        pass

    def failing_check(self, step):
        raise Boom()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "_check_resume", failing_check)
        with pytest.raises(Boom):
            _run(fresh, resume=True)
    assert not (tmp_path / "a").exists()


def test_resume_checks(tmp_path, caplog):
    run = _run(tmp_path / "w")
    for step in (1, 2, 3):
        run.save(step, {"state": {"it": np.asarray(step)}}, {"format": CHECKPOINT_FORMAT})
    run.close()
    with pytest.raises(RunError, match=r"--resume_step=7: no such checkpoint .* \(available: \[1, 2, 3\]\)"):
        _run(tmp_path / "w", resume=True, resume_step=7)
    with pytest.raises(CheckpointError, match=r"other settings \(its metadata: alpha: 0.01 -> 0.5\)"):
        _run(tmp_path / "w", resume=True, fields={**FIELDS, "alpha": 0.5}, fields_fp={**FIELDS, "alpha": 0.5})
    # An older step branches the run there: the newer checkpoints are moved aside, not deleted.
    run = _run(tmp_path / "w", resume=True, resume_step=2)
    items, meta = run.restore(lambda meta: {"state": {"it": np.asarray(0)}})
    assert int(items["state"]["it"]) == 2
    assert run.checkpointer.all_steps() == [1, 2]
    run.close()
    (aside,) = (tmp_path / "w" / "checkpoints_discarded").iterdir()
    assert (aside / "3").is_dir()
    # Resume with no checkpoint: a warning, then a new run.
    with caplog.at_level("WARNING"):
        run = _run(tmp_path / "empty", resume=True)
    assert run.resume_step is None and "holds no checkpoint" in caplog.text
    run.close()


def test_checkpoints_of_the_old_format_are_refused_with_the_reason(tmp_path):
    store = Checkpointer(tmp_path / "w" / "checkpoints", fingerprint=config_fingerprint(FIELDS))
    store.save(4, {"params": {"x": np.zeros(2)}}, {"iteration": 4}, force=True)
    store.close()
    with pytest.raises(CheckpointError, match="written by an older coso_jax .* start a new --workdir"):
        _run(tmp_path / "w", resume=True)


def test_lock_refuses_a_second_holder_and_survives_a_killed_one(tmp_path):
    lock = WorkdirLock(tmp_path)
    with pytest.raises(RunError, match=f"in use by process {os.getpid()}"):
        WorkdirLock(tmp_path)
    lock.release()
    # A process that dies holding the lock leaves its file (and pid) behind; the kernel dropped the lock.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from pathlib import Path
        from coso_jax.rl.run import WorkdirLock
        WorkdirLock(Path({str(tmp_path)!r}))
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert (tmp_path / ".lock").read_text().strip() != str(os.getpid())
    WorkdirLock(tmp_path).release()  # not blocked


def test_unwritable_workdir_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="exists and is not a directory"):
        _run(tmp_path / "file")


@pytest.mark.parametrize("error", [ConfigError("lr must be a number, got 'abc'"), RunError("busy"),
                                   CheckpointError("corrupt"), FileNotFoundError("no such file"),
                                   PermissionError("denied"), FileExistsError("exists")])
def test_exit_on_user_error_prints_one_line(error, capsys, monkeypatch):
    monkeypatch.delenv("COSO_DEBUG", raising=False)

    def fail():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fail)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"
    with pytest.raises(type(error)):
        exit_on_user_error(fail, debug=True)
    monkeypatch.setenv("COSO_DEBUG", "1")
    with pytest.raises(type(error)):
        exit_on_user_error(fail)


def test_other_errors_keep_their_traceback():
    def bug():
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):
        exit_on_user_error(bug)
