"""Tests for coso_jax.metrics: JSONL/TensorBoard logging, success tracking, timing, progress bars."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax.metrics import (
    MetricsWriter,
    PhaseTimer,
    SuccessTracker,
    mean_and_se,
    progress_bar,
    read_jsonl,
    to_scalar,
)


def test_to_scalar_conversions():
    assert to_scalar(jnp.float32(1.5)) == 1.5 and isinstance(to_scalar(jnp.float32(1.5)), float)
    assert to_scalar(jnp.array([3], dtype=jnp.int32)) == 3
    assert to_scalar(np.int64(7)) == 7 and isinstance(to_scalar(np.int64(7)), int)
    assert to_scalar(np.bool_(True)) is True
    assert to_scalar(float("nan")) is None and to_scalar(jnp.array(jnp.inf)) is None
    assert to_scalar("coso") == "coso"
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        to_scalar(jnp.ones(3), "loss")
    with pytest.raises(TypeError, match="'x' has type"):
        to_scalar(object(), "x")


def test_jsonl_round_trip_and_tensorboard(tmp_path: Path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 4):
            w.write(step, {"loss": jnp.float32(0.5 * step), "success_rate": np.float64(step / 4),
                           "episodes": np.int32(step), "algo": "coso", "nan_loss": float("nan")},
                    env_steps=step * 128)
        with pytest.raises(ValueError, match="not after the previous step 3"):
            w.write(3, {"loss": 0.0})
        with pytest.raises(ValueError, match="reserved"):
            w.write(4, {"step": 1})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["env_steps"] for r in records] == [128, 256, 384]
    assert records[1]["loss"] == 1.0 and records[2]["success_rate"] == 0.75
    assert records[0]["episodes"] == 1 and records[0]["algo"] == "coso"
    assert records[0]["nan_loss"] is None  # strict JSON: NaN is written as null
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # The event file holds our scalar tags (tensorboardX writes serialized protos; tag names appear verbatim).
    blob = b"".join(e.read_bytes() for e in events)
    assert b"success_rate" in blob and b"env_steps" in blob
    assert b"nan_loss" not in blob  # a missing value is left out, not written as NaN (tensorboardX warns)


def test_resume_drops_records_after_resumed_step(tmp_path: Path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 7):
            w.write(step, {"x": step})
    # Simulate a crash mid-line after step 6.
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "x"')
    # The run resumes from its checkpoint at step 4: steps 5-6 (and the partial line) go away.
    with MetricsWriter(tmp_path, resume_step=4, tensorboard=False) as w:
        assert [r["step"] for r in read_jsonl(w.path)] == [1, 2, 3, 4]
        with pytest.raises(ValueError, match="not after the previous step 4"):
            w.write(4, {"x": 0})
        for step in range(5, 9):
            w.write(step, {"x": 10 * step})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["x"] for r in records] == [1, 2, 3, 4, 50, 60, 70, 80]
    # A fresh (non-resumed) run starts a new log.
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"x": 1})
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_read_jsonl_errors(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"step": 1}\n\n{"step": 2, "x"\n')
    assert read_jsonl(cut) == [{"step": 1}]
    with pytest.raises(ValueError, match=r"cut\.jsonl:3"):
        read_jsonl(cut, strict=True)


def test_success_tracker_matches_plain_computation():
    rng = np.random.default_rng(0)
    window = 16
    episodes = [(float(rng.choice([-1.0, 0.0, 1.0, 5.0])), int(rng.integers(1, 9))) for _ in range(60)]
    tracker = SuccessTracker(window)
    halfway = None
    for i, (ret, length) in enumerate(episodes):
        tracker.add_episode(ret, length)
        if i == 30:
            halfway = json.loads(json.dumps(tracker.state_dict()))  # must survive JSON
    last = episodes[-window:]
    assert len(tracker) == window and tracker.total_episodes == len(episodes)
    assert math.isclose(tracker.success_rate, np.mean([r > 0 for r, _ in last]))
    assert math.isclose(tracker.mean_return, np.mean([r for r, _ in last]))
    assert math.isclose(tracker.mean_length, np.mean([n for _, n in last]))
    summary = tracker.summary("train/")
    assert summary["train/success_rate"] == tracker.success_rate and summary["train/episodes"] == len(episodes)
    # Restoring the mid-run state and replaying the rest gives the same statistics.
    resumed = SuccessTracker(window)
    resumed.load_state_dict(halfway)
    for ret, length in episodes[31:]:
        resumed.add_episode(ret, length)
    assert resumed.state_dict() == tracker.state_dict()
    empty = SuccessTracker(3)
    assert math.isnan(empty.success_rate)
    with pytest.raises(ValueError, match="window 3 != saved window 16"):
        empty.load_state_dict(halfway)


def test_mean_and_se():
    mean, se = mean_and_se([1.0, 2.0, None, float("nan"), 6.0])
    assert mean == pytest.approx(3.0) and se == pytest.approx(np.std([1, 2, 6], ddof=1) / np.sqrt(3))
    assert mean_and_se([4.0]) == (4.0, 0.0)
    assert all(math.isnan(x) for x in mean_and_se([]))


def test_phase_timer_blocks_on_jax_work():
    timer = PhaseTimer()
    f = jax.jit(lambda x: (x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()  # compile outside the timed phases
    with timer.phase("update") as ph:
        out = ph.block(f(x))
    assert float(out) == 64.0 * 64 * 64
    with timer.phase("rollout"):
        time.sleep(0.02)
    with timer.phase("rollout", x):
        time.sleep(0.01)
    totals = timer.pop()
    assert set(totals) == {"time/update", "time/rollout", "time/total"}
    assert totals["time/rollout"] >= 0.03
    assert math.isclose(totals["time/total"], sum(v for k, v in totals.items() if k != "time/total"))
    assert timer.totals() == {"time/total": 0.0}


def test_progress_bar_quiet_when_not_a_tty():
    stream = io.StringIO()
    with progress_bar(5, "train", file=stream) as bar:
        assert bar.disabled
        for _ in range(5):
            bar.update(1, {"success": jnp.float32(0.25), "it": 3})
    assert stream.getvalue() == ""
    shown = io.StringIO()
    with progress_bar(3, "train", disable=False, file=shown, initial=1) as bar:
        bar.update(2, {"success": 0.123456})
        assert bar.n == 3
    assert "success=0.1235" in shown.getvalue()


def test_success_tracker_explicit_flags_and_checkpoints_from_before_them():
    t = SuccessTracker(window=3)
    for ret, won in [(1.0, True), (5.0, False), (-2.0, False), (3.0, None)]:
        t.add_episode(ret, 10, won)
    assert t.success_rate == pytest.approx(1 / 3)  # last 3: False, False, 3.0 > 0 (returns alone: 2/3)
    u = SuccessTracker(window=3)
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert u.success_rate == t.success_rate and u.state_dict() == t.state_dict()
    old = {k: v for k, v in t.state_dict().items() if k != "successes"}  # written before the flags
    u.load_state_dict(old)
    assert u.success_rate == pytest.approx(2 / 3)  # return > 0, as it was then
