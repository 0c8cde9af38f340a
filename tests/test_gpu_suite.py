"""benchmarks/gpu_suite.py at the tiny widths on this CPU: the code paths of the GPU suite (two real PPOTrainer
runs per algo, memory hooks, sampler / update / kernel timings, MFU, CoSo overhead) and its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_suite import all_numbers_finite, update_model_flops
from coso_jax.models import llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--tiny", "--layers=2", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / "gpu_suite_cpu.json"
    assert f"results go to {path}" in proc.stdout and f"wrote {path}" in proc.stdout
    return json.loads(path.read_text())


def test_suite_json_has_every_section_and_finite_numbers(suite_json):
    r = suite_json
    for key in ("device", "config", "choices", "per_algo", "sampler", "update", "counterfactual_kernel",
                "coso_overhead", "memory", "wall_s", "stages"):
        assert key in r, key
    assert r["stages"][-1] == "done" and not r["skipped"]
    assert set(r["per_algo"]) == {"coso", "entropy"}
    for algo, entry in r["per_algo"].items():
        assert len(entry["iterations"]) == 2, algo
        for it in entry["iterations"]:
            for key in ("iteration_s", "rollout_s", "update_s", "update_step_s", "sampler_tokens_per_s"):
                assert it[key] > 0, (algo, key)
            assert it["skipped_minibatches"] == 0
    # The second run reuses the first run's compiled programs (same GraphDef print).
    assert r["per_algo"]["entropy"]["shares_first_runs_programs"]
    assert r["config"]["lora_rank"] == 128 and r["config"]["remat"] and r["config"]["param_dtype"] == "bfloat16"
    assert r["config"]["minibatch_size"] == r["config"]["grad_accum_steps"]  # micro-batch 1, as the paper
    u = r["update"]
    assert u["model_flops"] > 0 and u["achieved_flops_per_s"] > 0
    assert u["mfu"] is None and u["peak_flops_per_s"] is None  # no known peak for a CPU
    assert r["sampler"]["tokens_per_s"] > 0 and r["counterfactual_kernel"]["median_s"] > 0
    o = r["coso_overhead"]
    for key in ("measured_percent", "causal_share_percent", "projected_paper_percent", "paper_percent"):
        assert key in o, key
    assert r["memory"]["available"] is False  # XLA:CPU reports no memory stats
    assert all_numbers_finite(r)


def test_update_flop_model_counts_three_forwards_of_the_decoder():
    cfg = llava.LlavaConfig.tiny_next()
    one = update_model_flops(cfg, rows=1, epochs=1, prompt_len=16, new_tokens=8)
    assert update_model_flops(cfg, rows=4, epochs=2, prompt_len=16, new_tokens=8) == pytest.approx(8 * one)
    text = cfg.text
    t = 24
    head_dim = text.head_dim or text.hidden_size // text.num_heads
    per_layer = 2 * (text.hidden_size * head_dim * (2 * text.num_heads + 2 * text.num_kv_heads)
                     + 3 * text.hidden_size * text.intermediate_size) + 4 * text.num_heads * head_dim * t / 2
    decoder = 3 * (t * text.num_layers * per_layer + 8 * 2 * text.hidden_size * text.vocab_size)
    assert one > decoder  # plus the frozen vision tower's forward over the tiles
    assert one - decoder < decoder
