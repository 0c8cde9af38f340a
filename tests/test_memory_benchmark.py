"""benchmarks/memory.py at tiny widths (`--quick`): every phase's code path, the shape accounting against
XLA's own, and the per-layer extrapolation against a compiled deeper program."""
from __future__ import annotations

import argparse
import json
import math

import jax
import pytest

from benchmarks import memory

# The fit through (1, 2), (2, 2), (1, 3) layers must predict the compiled (3, 3) program's peak this closely
# at tiny widths (measured: within ~1% for the sampler, ~5% for the update, whose fixed part dominates there).
QUICK_TOLERANCE_PERCENT = 10.0


def _numbers(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def quick_result():
    args = argparse.Namespace(preset="paper", env="NumberLine", steps_per_update="", prompt_len=0,
                              phases=",".join(memory.PHASES), compile_full="", quick=True, out=None)
    return memory.run(args)


def test_quick_run_reports_every_phase_with_finite_numbers(quick_result, tmp_path):
    phases = quick_result["phases"]
    assert set(phases) == {"sample", "update_n16", "classifier", "counterfactual", "sft"}  # --quick: no fused one
    assert phases["sft"]["skipped"] and "sft_epochs=0" in phases["sft"]["reason"]
    for name in ("sample", "update_n16", "classifier", "counterfactual"):
        p = phases[name]
        for field in ("argument_gib", "output_gib", "alias_gib", "temp_gib", "peak_gib", "total_gib"):
            assert p[field] >= 0.0, (name, field)
        assert p["peak_gib"] == pytest.approx(p["argument_gib"] + p["output_gib"] - p["alias_gib"] + p["temp_gib"],
                                              abs=0.01)
        assert p["total_gib"] >= p["peak_gib"] and p["fits_bar"]
        # The signature's argument / output / alias bytes are XLA's, for every compiled program.
        assert p["signature_matches_xla"] if "signature_matches_xla" in p else all(
            c["signature_matches_xla"] for c in p["compiled"])
    assert all(math.isfinite(x) for x in _numbers(quick_result))
    path = tmp_path / "memory_quick.json"
    path.write_text(json.dumps(quick_result))
    assert json.loads(path.read_text())["quick"] is True


def test_quick_extrapolation_predicts_the_compiled_depth(quick_result):
    for name in ("sample", "update_n16"):
        p = quick_result["phases"][name]
        assert [(c["text_layers"], c["vision_layers"]) for c in p["compiled"]] == [(1, 2), (2, 2), (1, 3), (3, 3)]
        check = p["full_depth_check"]
        assert abs(check["peak_error_percent"]) <= QUICK_TOLERANCE_PERCENT, (name, check)
        assert p["method"] == "compiled at full depth"
        # argument bytes are linear in the depth: the fit is exact up to rounding
        assert abs(p["argument_extrapolation_error_percent"]) < 0.5, name


def test_update_donates_the_trainable_state_and_resident_state_adds_up(quick_result):
    update = quick_result["phases"]["update_n16"]
    resident = quick_result["resident_gib"]
    # params + Adam state are donated and come back as outputs: XLA aliases them.
    assert update["alias_gib"] == pytest.approx(resident["trainable"] + resident["adam_state"], abs=0.002)
    # The sampler's total adds the Adam state (resident, not an argument of the sampler).
    sample = quick_result["phases"]["sample"]
    assert sample["total_gib"] == pytest.approx(
        sample["peak_gib"] + resident["adam_state"] + resident["classifier"] + resident["classifier_adam"], abs=0.01)


def test_shape_accounting_matches_xla_for_donation():
    @jax.jit
    def f(x, y):
        return x * 2, y.sum()

    donating = jax.jit(lambda x, y: (x * 2, y.sum()), donate_argnums=(0,))
    x = jax.ShapeDtypeStruct((64, 32), "float32")
    y = jax.ShapeDtypeStruct((16,), "bfloat16")
    for fn, alias in ((f, 0), (donating, 64 * 32 * 4)):
        lowered = fn.lower(x, y)
        signature = memory.shape_accounting(lowered)
        xla = memory.xla_memory(lowered, memory.CPU_OPTIONS)
        assert signature["argument"] == xla["argument"] and signature["alias"] == xla["alias"] == alias
        assert 0 <= xla["output"] - signature["output"] <= 64  # XLA adds the output tuple's pointer table
