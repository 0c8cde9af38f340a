"""A multi-process PPO run on this machine: two processes (4 fake CPU devices each, gloo collectives,
a loopback coordinator) train 2 iterations of tiny NumberLine with coso. The result equals one process
with 8 fake devices and the same env partition, and a 2-process run killed after its first checkpoint
and resumed equals the uninterrupted one.

Tolerance: parameters within 1e-5 (relative and absolute) and identical metrics records within 1e-5:
the processes compute the same programs on the same devices; only the order of the cross-device sums
(gloo vs in-process) differs, by float32 rounding.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp, name, processes, *extra, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = _free_port()
    common = ["--workdir", str(tmp / name), "--sft_dir", str(tmp / "sft"), "--out", str(tmp / f"{name}.npz"),
              "--processes", str(processes), "--port", str(port), "--devices", str(8 // processes),
              "--compile_cache", str(tmp / "jax_cache"), *extra]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *common, "--process_id", str(p)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(processes)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _load(path):
    z = np.load(path)
    params = [z[k] for k in sorted((k for k in z.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]
    return params, z["classifier"], json.loads(str(z["history"])), int(z["env_steps"])


def _same(a, b):
    pa, ca, ha, ea = a
    pb, cb, hb, eb = b
    assert ea == eb and len(pa) == len(pb) > 10
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ca, cb, rtol=1e-5, atol=1e-5)
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and not np.isnan(x[k]):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-5), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    _run(tmp, "single", 1)  # also builds the shared SFT start
    _run(tmp, "two", 2)
    _run(tmp, "killed", 2, "--kill_after", "1")
    _run(tmp, "killed", 2, "--resume")
    return {name: _load(tmp / f"{name}.npz") for name in ("single", "two", "killed")}, tmp


def test_two_processes_equal_one_process_with_the_same_partition(runs):
    results, tmp = runs
    _same(results["single"], results["two"])
    assert results["two"][3] == 32  # both processes' env steps count
    records = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by process 0
    assert records[0]["episodes"] >= 1 and np.isfinite(records[-1]["ppo/loss"])


def test_killed_and_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    results, tmp = runs
    params, classifier, history, env_steps = results["killed"]
    assert len(history) == 1  # the resumed run did the second iteration only
    full_params, full_classifier, full_history, full_env_steps = results["two"]
    assert env_steps == full_env_steps
    for x, y in zip(params, full_params):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(classifier, full_classifier, rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in (tmp / "killed" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["ppo/loss"] == pytest.approx(full[1]["ppo/loss"], rel=1e-5, abs=1e-5)
