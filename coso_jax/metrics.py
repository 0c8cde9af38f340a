"""Training metrics: JSONL + TensorBoard scalars, success tracking, timers and progress bars
(plots are in `coso_jax.plots`).

* :class:`MetricsWriter` — one JSON record per iteration in ``<workdir>/metrics.jsonl``
  and the same scalars in TensorBoard event files under ``<workdir>/tb/``. A resumed run
  drops the records past the step it resumed from, so the log has no duplicates.
* :class:`SuccessTracker` — RL4VLM's success rate over the last ``window`` finished
  episodes (success iff the episode return is > 0), mean return and length; it can
  be checkpointed through ``state_dict`` / ``load_state_dict``.
* :class:`PhaseTimer` — wall-clock time per named phase (rollout, update, causal...)
  summed over one iteration. JAX dispatches work asynchronously, so a phase's clock only
  means something if the phase waits for its outputs: pass them to ``phase.block(...)``
  (the trainer does so at every phase end; it calls ``jax.block_until_ready``).
* :func:`progress_bar` — a tqdm bar that stays quiet when stderr is not a terminal.
* :func:`mean_and_se` — mean and standard error of a list of values (seeds).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MetricsWriter",
    "PhaseTimer",
    "ProgressBar",
    "SuccessTracker",
    "mean_and_se",
    "progress_bar",
    "read_jsonl",
    "to_scalar",
]

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"


# --------------------------------------------------------------------------- scalars


def to_scalar(value: Any, name: str = "value") -> bool | int | float | str | None:
    """Converts a JAX / numpy / Python scalar to a plain Python value for logging.

    Size-1 arrays become ``int`` / ``float`` / ``bool``; strings and ``None`` pass through.
    Non-finite floats become ``None`` (JSON has no NaN), so a NaN loss reads back as null.

    Raises:
      ValueError: for arrays with more than one element (the error names ``name``).
      TypeError: for other objects.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        arr = np.asarray(value)  # for a jax.Array this waits for its value
        if arr.size != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {arr.shape}")
        item = arr.reshape(()).item()
        return to_scalar(item, name)
    raise TypeError(f"metric {name!r} has type {type(value).__name__}, expected a scalar")


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | os.PathLike[str], *, strict: bool = False) -> list[dict[str, Any]]:
    """Reads a JSON-lines file into a list of dicts.

    Blank lines are skipped. A malformed *last* line (a record cut short by a crash) is
    dropped unless ``strict``; a malformed line anywhere else raises ``ValueError`` naming
    the file and line number.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last and not strict:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


class MetricsWriter:
    """Writes one record per iteration to ``<workdir>/metrics.jsonl`` and TensorBoard.

    Args:
      workdir: run directory (created if missing).
      resume_step: ``None`` starts a fresh log (an existing ``metrics.jsonl`` is
        truncated). An int resumes: records with ``step > resume_step`` (written after the
        checkpoint the run resumed from) are dropped, later records are appended, and
        TensorBoard is told to purge its events past ``resume_step``.
      tensorboard: also write TensorBoard scalars under ``<workdir>/tb/``.

    Each record is ``{"step": int, "env_steps": int (if given), "time": unix seconds,
    **scalars}``. Every line is flushed as it is written, so a killed run keeps its log.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / JSONL_NAME
        self._last_step: int | None = None
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = []
            if self.path.exists():
                kept = [r for r in read_jsonl(self.path) if int(r.get("step", -1)) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(_dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
            if kept:
                self._last_step = max(int(r["step"]) for r in kept if "step" in r)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(logdir=str(self.workdir / TB_DIR), purge_step=purge)

    @property
    def tb_dir(self) -> Path:
        return self.workdir / TB_DIR

    def write(
        self,
        step: int,
        scalars: Mapping[str, Any],
        *,
        env_steps: int | None = None,
    ) -> dict[str, Any]:
        """Appends one record and returns it (as written).

        ``scalars`` values may be Python, numpy or JAX scalars (JAX values are fetched, which
        waits for them); strings, and missing values (None, NaN or inf; null in the JSONL), are kept in
        the JSONL but not sent to TensorBoard.
        Records must come in increasing ``step`` order.
        """
        step = int(step)
        if self._fh.closed:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"metrics step {step} is not after the previous step {self._last_step} ({self.path})")
        record: dict[str, Any] = {"step": step}
        if env_steps is not None:
            record["env_steps"] = int(env_steps)
        record["time"] = round(time.time(), 3)
        for key, value in scalars.items():
            if key in ("step", "env_steps", "time"):
                raise ValueError(f"metric name {key!r} is reserved")
            record[str(key)] = to_scalar(value, key)
        self._fh.write(_dumps(record) + "\n")
        self._fh.flush()
        self._last_step = step
        if self._tb is not None:
            for key, value in record.items():
                # A missing value (None: NaN or inf in the JSONL) is left out of TensorBoard, which would
                # draw nothing for it anyway; tensorboardX warns on every non-finite scalar.
                if key in ("step", "time") or isinstance(value, str) or value is None:
                    continue
                self._tb.add_scalar(key, float(value), global_step=step)
        return record

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------- success


class SuccessTracker:
    """Success rate, mean return and mean length over the last ``window`` finished episodes.

    As in RL4VLM, an episode is a success iff its return is > 0, unless :meth:`add_episode` is given
    an explicit flag (ALFWorld: ``info["won"]``; shaped rewards make the return's sign no success
    signal). Feed finished episodes with :meth:`add_episode`.
    """

    def __init__(self, window: int = 100) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._episodes: collections.deque[tuple[float, int]] = collections.deque(maxlen=self.window)
        self._successes: collections.deque[bool] = collections.deque(maxlen=self.window)
        self.total_episodes = 0

    def add_episode(self, episode_return: float, length: int, success: bool | None = None) -> None:
        """Records one finished episode; ``success`` defaults to ``episode_return > 0``."""
        self._episodes.append((float(episode_return), int(length)))
        self._successes.append(bool(episode_return > 0 if success is None else success))
        self.total_episodes += 1

    def __len__(self) -> int:
        return len(self._episodes)

    @property
    def success_rate(self) -> float:
        """Fraction of the last ``window`` episodes that succeeded (NaN before any)."""
        if not self._successes:
            return float("nan")
        return float(np.mean(self._successes))

    @property
    def mean_return(self) -> float:
        if not self._episodes:
            return float("nan")
        return float(np.mean([r for r, _ in self._episodes]))

    @property
    def mean_length(self) -> float:
        if not self._episodes:
            return float("nan")
        return float(np.mean([n for _, n in self._episodes]))

    def summary(self, prefix: str = "") -> dict[str, float | int]:
        """``{success_rate, mean_return, mean_length, episodes}`` with an optional key prefix."""
        return {
            f"{prefix}success_rate": self.success_rate,
            f"{prefix}mean_return": self.mean_return,
            f"{prefix}mean_length": self.mean_length,
            f"{prefix}episodes": self.total_episodes,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for checkpoint metadata)."""
        return {
            "window": self.window,
            "episodes": [[r, n] for r, n in self._episodes],
            "successes": list(self._successes),
            "total_episodes": self.total_episodes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output (the window must match)."""
        if int(state["window"]) != self.window:
            raise ValueError(f"SuccessTracker window {self.window} != saved window {state['window']}")
        self._episodes = collections.deque(((float(r), int(n)) for r, n in state["episodes"]), maxlen=self.window)
        saved = state.get("successes")
        if saved is None:  # a checkpoint from before success flags: return > 0, as it was then
            saved = [r > 0 for r, _ in self._episodes]
        self._successes = collections.deque((bool(x) for x in saved), maxlen=self.window)
        self.total_episodes = int(state["total_episodes"])


# --------------------------------------------------------------------------- timing


class _Phase:
    """Handle yielded by :meth:`PhaseTimer.phase`; collects outputs to wait for."""

    def __init__(self) -> None:
        self._pending: list[Any] = []

    def block(self, *trees: Any) -> Any:
        """Registers pytrees of JAX arrays to wait for before the phase's clock stops.

        Returns its argument (or the tuple of them), so ``out = ph.block(step(...))``.
        """
        self._pending.extend(trees)
        return trees[0] if len(trees) == 1 else trees


def _block(tree: Any) -> None:
    import jax

    jax.block_until_ready(tree)


class PhaseTimer:
    """Wall-clock seconds per named phase, summed until :meth:`reset` / :meth:`pop`.

    Usage, once per iteration::

        with timer.phase("rollout") as ph:
            batch = ph.block(rollout(...))      # waits for JAX work before stopping
        with timer.phase("update") as ph:
            state, stats = ph.block(update(state, batch))
        writer.write(it, {**stats, **timer.pop()})   # {"time/rollout": s, ...}

    JAX dispatch is asynchronous: without ``block`` (i.e. ``jax.block_until_ready``) a
    phase would time only the dispatch, and its work would be billed to a later phase.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *wait_first: Any) -> Iterator[_Phase]:
        """Times the ``with`` body under ``name``.

        ``wait_first`` (pytrees of JAX arrays, e.g. the phase's inputs) are waited for
        *before* the clock starts, so earlier asynchronous work is not billed to this
        phase; outputs registered with ``ph.block(...)`` are waited for before it stops.
        """
        if wait_first:
            _block(wait_first)
        handle = _Phase()
        start = time.perf_counter()
        try:
            yield handle
        finally:
            if handle._pending:
                _block(handle._pending)
            elapsed = time.perf_counter() - start
            self._totals[name] = self._totals.get(name, 0.0) + elapsed

    def totals(self, prefix: str = "time/") -> dict[str, float]:
        """Seconds per phase (keys ``prefix + name``), plus ``prefix + "total"``."""
        out = {f"{prefix}{k}": v for k, v in self._totals.items()}
        out[f"{prefix}total"] = float(sum(self._totals.values()))
        return out

    def reset(self) -> None:
        self._totals.clear()

    def pop(self, prefix: str = "time/") -> dict[str, float]:
        """:meth:`totals`, then :meth:`reset` (call once per iteration)."""
        out = self.totals(prefix)
        self.reset()
        return out


# --------------------------------------------------------------------------- progress


class ProgressBar:
    """A tqdm bar with scalar postfixes; a no-op shell when disabled."""

    def __init__(self, total: int | None, desc: str = "", *, disable: bool | None = None, initial: int = 0,
                 file: Any = None) -> None:
        from tqdm import tqdm

        stream = sys.stderr if file is None else file
        if disable is None:
            disable = not (hasattr(stream, "isatty") and stream.isatty())
        self.disabled = bool(disable)
        self._bar = tqdm(total=total, desc=desc, initial=initial, disable=self.disabled, file=stream,
                         dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, scalars: Mapping[str, Any] | None = None) -> None:
        """Advances by ``n`` and shows ``scalars`` (formatted to 4 significant digits)."""
        if scalars:
            self.set_scalars(scalars, refresh=False)
        self._bar.update(n)

    def set_scalars(self, scalars: Mapping[str, Any], refresh: bool = True) -> None:
        if self.disabled:
            return
        shown = {}
        for k, v in scalars.items():
            v = to_scalar(v, k)
            shown[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        self._bar.set_postfix(shown, refresh=refresh)

    @property
    def n(self) -> int:
        return int(self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", *, disable: bool | None = None, initial: int = 0,
                 file: Any = None) -> ProgressBar:
    """A :class:`ProgressBar`; ``disable=None`` hides it unless the stream (stderr) is a TTY.

    ``initial`` starts a resumed run's bar at the resumed iteration.
    """
    return ProgressBar(total, desc, disable=disable, initial=initial, file=file)


def mean_and_se(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and standard error (std with ddof=1 / sqrt(n); 0 for one value) of the finite values.

    None and non-finite values are dropped; no value left gives (nan, nan).
    """
    x = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


