"""Shared helpers for benchmark scripts: device description, timing, JSON results.

Every benchmark measures its baseline in the same run (these machines are noisy), reports compile
time separately from steady-state time, and writes JSON under ``benchmarks/results/``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parent.parent


def shown_path(path: str | Path) -> str:
    """A path as a committed report should quote it: relative to the repository root when it lies
    inside it (so a report does not carry one machine's checkout path), else unchanged."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def device_description() -> dict[str, Any]:
    """What ran the benchmark: accelerator kind, JAX version, CPU count, host."""
    import jax

    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of one callable: first call (compile + run) and steady-state repeats."""

    first_call_s: float
    steady_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.steady_s)

    @property
    def compile_s(self) -> float:
        """First call minus one steady-state call: the compile (and tracing) cost."""
        return max(self.first_call_s - self.median_s, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {
            "first_call_s": self.first_call_s,
            "compile_s": self.compile_s,
            "median_s": self.median_s,
            "min_s": min(self.steady_s),
            "repeats": len(self.steady_s),
        }


def block(x: Any) -> Any:
    """Wait for every JAX array in a pytree (no-op for other leaves)."""
    import jax

    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Times ``fn()`` (which must block until its result is ready, e.g. via ``block``)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        steady.append(time.perf_counter() - start)
    return Timing(first, steady)


class CompileCounter:
    """Counts XLA backend compiles while started, by function name, from jax.monitoring's
    backend-compile events (a persistent-cache hit is not a compile and is not counted).

        counter = CompileCounter().start(); ...; counter.stop(); counter.total
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._active = False

    EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        if self._active and event == self.EVENT:
            name = str(kwargs.get("fun_name", "?"))
            self.counts[name] = self.counts.get(name, 0) + 1

    def start(self) -> "CompileCounter":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._active = True
        return self

    def stop(self) -> "CompileCounter":
        import jax

        if self._active:
            self._active = False
            jax.monitoring.unregister_event_duration_listener(self._listener)
        return self

    def __enter__(self) -> "CompileCounter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def matching(self, *names: str) -> int:
        """Compiles of functions whose name contains any of `names` (e.g. "sample_step")."""
        return sum(n for fn, n in self.counts.items() if any(name in fn for name in names))

    def by_name(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON at ``path``, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as JSON through a temporary file, so an interrupted write leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def parse_seeds(text: str) -> tuple[int, ...]:
    """A grid's ``--seeds``: a count N (seeds 0..N-1) or a comma-separated list; ValueError otherwise."""
    return tuple(range(int(text))) if "," not in text else tuple(int(s) for s in text.split(","))


def fmt_mean_se(mean_se: tuple[float, float]) -> str:
    """(mean, standard error) of a rate as "12.3 ± 4.5" percent ("n/a" when the mean is not finite)."""
    mean, se = mean_se
    return "n/a" if not math.isfinite(mean) else f"{100 * mean:.1f} ± {100 * se:.1f}"


def write_results(name: str, payload: dict[str, Any], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Writes ``<out_dir or benchmarks/results>/<name>.json`` with the device description and a timestamp."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(),
        **payload,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return path


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_261_130  # fixed: a report re-drawn from the same runs gives the same intervals


def bootstrap_mean_ci(values: Any, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile bootstrap interval at `level`.

    `resamples` resamples of len(values) values drawn with replacement (``numpy.random.default_rng(seed)
    .integers(0, n, size=(resamples, n))``, row by row), the mean of each, and the (1 - level) / 2 and
    (1 + level) / 2 percentiles of those means (NumPy's default linear interpolation). Non-finite values
    are dropped first; no value left gives (nan, nan, nan), a single value (v, v, v).
    """
    import numpy as np

    x = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(x.mean()), float(low), float(high)
