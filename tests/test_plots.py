"""Tests for coso_jax.plots: success curves and mean +- standard-error panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coso_jax.metrics import MetricsWriter, read_jsonl
from coso_jax.plots import curves_mean_se, plot_curves, plot_mean_se_panels

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == _PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_plot_curves_png(tmp_path: Path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 11):
            w.write(step, {"success_rate": step / 10 if step > 1 else float("nan")}, env_steps=step * 64)
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "success.png", title="NumberLine")
    _assert_png(out)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    out2 = plot_curves({"coso": records, "entropy": records[:5]}, tmp_path / "two.png")
    _assert_png(out2)
    out3 = plot_curves([{"step": 1}], tmp_path / "empty.png")  # nothing to draw: still a PNG
    _assert_png(out3)


def test_mean_se_and_plot(tmp_path: Path):
    x = np.array([0.0, 1.0, 2.0])
    runs = [(x, np.array([0.0, 0.5, 1.0])), (x, np.array([0.2, 0.5, 0.6])), (x, np.array([0.1, 0.2, 0.8]))]
    grid, mean, se = curves_mean_se(runs)
    ys = np.stack([r[1] for r in runs])
    np.testing.assert_allclose(grid, x)
    np.testing.assert_allclose(mean, ys.mean(0))
    np.testing.assert_allclose(se, ys.std(0, ddof=1) / np.sqrt(3))
    # Different x grids: interpolated over the common range.
    grid, mean, se = curves_mean_se([(np.array([0.0, 10.0]), np.array([0.0, 1.0])),
                              (np.array([2.0, 8.0, 12.0]), np.array([0.0, 0.6, 1.0]))], num_points=7)
    assert grid[0] == 2.0 and grid[-1] == 10.0 and len(grid) == 7
    np.testing.assert_allclose(mean[[0, -1]], [(0.2 + 0.0) / 2, (1.0 + 0.8) / 2])
    _, _, se1 = curves_mean_se([runs[0]])
    assert np.all(se1 == 0)
    with pytest.raises(ValueError, match="do not overlap"):
        curves_mean_se([(np.array([0.0, 1.0]), np.zeros(2)), (np.array([2.0, 3.0]), np.zeros(2))])
    out = plot_mean_se_panels({"NumberLine": {"coso": runs, "entropy": runs[:2]}, "EZPoints": {"coso": runs}},
                              tmp_path / "mean_se.png", title="seeds", xlabels={"EZPoints": "trajectories"})
    _assert_png(out)


