"""Plots of training curves (matplotlib, Agg; no display, no pyplot state).

* :func:`plot_curves` — one metric against env steps for one run or several, from metrics.jsonl.
* :func:`curves_mean_se` — several runs' curves (seeds) on a common x grid: mean and standard error.
* :func:`plot_mean_se_panels` — one panel per game, a mean ± standard-error band per algorithm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coso_jax.metrics import read_jsonl

__all__ = ["curves_mean_se", "plot_curves", "plot_mean_se_panels"]


def _xy(records: Iterable[Mapping[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        xv, yv = r.get(x), r.get(y)
        if xv is None or yv is None or isinstance(xv, str) or isinstance(yv, str):
            continue
        if not (math.isfinite(float(xv)) and math.isfinite(float(yv))):
            continue
        xs.append(float(xv))
        ys.append(float(yv))
    return np.asarray(xs), np.asarray(ys)


def _figure():
    # A bare Figure renders with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    return fig, fig.add_subplot(1, 1, 1)


def plot_curves(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Mapping[str, Any],
    out_png: str | os.PathLike[str],
    *,
    x: str = "env_steps",
    y: str = "success_rate",
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Path:
    """Plots ``y`` against ``x`` for one run or several and writes a PNG.

    Args:
      source: a JSONL path, a list of records, or a mapping label -> (path or records)
        to draw several runs on one axis. Records missing ``x`` or ``y`` (or with null /
        non-finite values) are skipped.
      out_png: output file (parent directories are created).

    Returns:
      The PNG path. With no plottable point the figure says so (it is still written).
    """
    if isinstance(source, Mapping):
        runs = {str(k): v for k, v in source.items()}
    else:
        runs = {"": source}
    fig, ax = _figure()
    drawn = 0
    for label, run in runs.items():
        records = read_jsonl(run) if isinstance(run, (str, os.PathLike)) else list(run)
        xs, ys = _xy(records, x, y)
        if xs.size:
            ax.plot(xs, ys, marker="o" if xs.size < 30 else None, markersize=3, label=label or None)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no data for {y!r} vs {x!r}", ha="center", va="center", transform=ax.transAxes)
    _decorate(ax, xlabel or x, ylabel or y, title, legend=drawn > 0 and any(runs))
    return _save(fig, out_png)


def curves_mean_se(
    runs: Sequence[tuple[Any, Any]], *, num_points: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard error of several runs' curves on a common x grid.

    Each run ``(x, y)`` (x increasing) is linearly interpolated onto ``num_points`` points
    spanning the range all runs cover. SE = std(ddof=1) / sqrt(n); 0 for a single run.

    Returns:
      ``(grid, mean, se)``, each float64[num_points] (or [k] for k distinct x when every
      run shares the same x values, which are then used as is).
    """
    cleaned = []
    for i, (xs, ys) in enumerate(runs):
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(f"run {i}: x {xs.shape} and y {ys.shape} must be equal-length 1-D arrays")
        ok = np.isfinite(xs) & np.isfinite(ys)
        xs, ys = xs[ok], ys[ok]
        if xs.size == 0:
            raise ValueError(f"run {i} has no finite points")
        order = np.argsort(xs, kind="stable")
        cleaned.append((xs[order], ys[order]))
    if not cleaned:
        raise ValueError("curves_mean_se needs at least one run")
    if all(c[0].shape == cleaned[0][0].shape and np.array_equal(c[0], cleaned[0][0]) for c in cleaned):
        grid = cleaned[0][0]
        ys = np.stack([c[1] for c in cleaned])
    else:
        lo = max(c[0][0] for c in cleaned)
        hi = min(c[0][-1] for c in cleaned)
        if lo > hi:
            raise ValueError(f"runs do not overlap in x (common range [{lo}, {hi}] is empty)")
        grid = np.linspace(lo, hi, num_points) if hi > lo else np.asarray([lo])
        ys = np.stack([np.interp(grid, cx, cy) for cx, cy in cleaned])
    mean = ys.mean(axis=0)
    se = ys.std(axis=0, ddof=1) / math.sqrt(ys.shape[0]) if ys.shape[0] > 1 else np.zeros_like(mean)
    return grid, mean, se


def plot_mean_se_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[Any, Any]]]],
    out_png: str | os.PathLike[str],
    *,
    ncols: int = 2,
    xlabel: str = "env steps",
    ylabel: str = "success rate",
    title: str | None = None,
    num_points: int = 100,
    xlabels: Mapping[str, str] | None = None,
) -> Path:
    """One panel per key of ``panels`` (e.g. a game), each a mean line per label with a ± standard-error band.

    Labels keep the same colour in every panel, so one legend reads across the figure.
    ``xlabels`` overrides ``xlabel`` per panel (e.g. a panel counted in trajectories).
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("plot_mean_se_panels needs at least one panel")
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), dpi=120)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, (name, curves) in zip(axes, panels.items()):
        _draw_mean_se(ax, curves, num_points, colors)
        _decorate(ax, (xlabels or {}).get(name, xlabel), ylabel, name, legend=bool(curves))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def _draw_mean_se(ax, curves, num_points: int, colors: Mapping[str, str] | None = None) -> None:
    for label, runs in curves.items():
        if not runs:
            continue
        grid, mean, se = curves_mean_se(runs, num_points=num_points)
        color = colors.get(label) if colors else None
        (line,) = ax.plot(grid, mean, label=f"{label} (n={len(runs)})", color=color)
        ax.fill_between(grid, mean - se, mean + se, color=line.get_color(), alpha=0.25, linewidth=0)


def _decorate(ax, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(loc="best", fontsize="small")


def _save(fig, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)  # readers (a browser, the demo) never see a half-written PNG
    return out
