"""The run scaffold shared by both backbones: work directory, lock, checkpoints, resume, metrics,
timing, progress bar, keys, and the iteration loop with its cadences.

A backbone (PPO, DigiRL) supplies only its iteration, rollout -> targets -> update, as a method
`run_iteration(key) -> IterationOutput`, plus its checkpoint state; `Run.train` does the rest:

    for iteration in range(start, num_iterations):
        out = backbone.run_iteration(iteration_key(run_key, iteration))
        write metrics; save every `checkpoint_every`; heatmap / plots every `heatmap_every`

Keys are derived, never carried: iteration i of a run uses `fold_in(key(seed), i)` and phases
fold in their own tag, so a resumed run needs no key in its checkpoint and evaluation draws from
its own stream (`eval_key`) without touching training's.

Errors a user can cause (a locked or unwritable work directory, a checkpoint from other settings, a
corrupt checkpoint, a run that only produced non-finite updates) raise `RunError`/`CheckpointError`
with one line naming the problem and the fix; `experiments/train.py` prints just that line.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np

from coso_jax import metrics as metrics_lib
from coso_jax.checkpoint import FINGERPRINT_KEY, Checkpointer, CheckpointError
from coso_jax.rl.config import RunConfig, field_differences

log = logging.getLogger(__name__)

CONFIG_FIELDS_KEY = "config_fields"  # checkpoint metadata: the resume fields themselves, not only their hash
# Checkpoint layout version (metadata "format"). 2: keys derived per iteration (none stored), the
# classifier's Adam state as an optax state; checkpoints without it were written before the shared
# scaffold and cannot be resumed (their RNG and optimizer state are stored differently).
CHECKPOINT_FORMAT = 2
LOCK_NAME = ".lock"
# fold_in tags of the key streams (any distinct constants).
EVAL_STREAM = 10_000_019


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


def iteration_key(run_key: jax.Array, iteration: int) -> jax.Array:
    """The key of one iteration: `fold_in(run_key, iteration)`."""
    return jax.random.fold_in(run_key, iteration)


def phase_key(key: jax.Array, phase: str) -> jax.Array:
    """A named sub-stream of `key` (e.g. "rollout", "update", "causal")."""
    return jax.random.fold_in(key, _PHASES[phase])


_PHASES = {"rollout": 1, "update": 2, "causal": 3, "critic": 4, "actor": 5}


def eval_key(run_key: jax.Array, seed: int) -> jax.Array:
    """Evaluation's own stream, per evaluation seed; training's keys are untouched."""
    return jax.random.fold_in(jax.random.fold_in(run_key, EVAL_STREAM), seed)


@dataclasses.dataclass
class HeatmapRows:
    """What a CoSo heatmap draws: per row, the response's token strings and their weights."""

    tokens: list[list[str]]
    weights: list[np.ndarray]


@dataclasses.dataclass
class IterationOutput:
    """What one backbone iteration hands the loop.

    record: scalars for metrics.jsonl / TensorBoard. env_steps: the run's env-step counter after
    the iteration. heatmap: rows for the CoSo weight heatmap (coso only). skipped / minibatches:
    optimizer steps skipped for non-finite values, of how many (the loop warns and, after
    `max_skipped_updates` updates in a row with every step skipped, stops the run).
    """

    record: dict[str, Any]
    env_steps: int
    heatmap: HeatmapRows | None = None
    skipped: int = 0
    minibatches: int = 0
    plot: bool = True


class Backbone(Protocol):
    iteration: int

    def run_iteration(self, key: jax.Array) -> IterationOutput: ...

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]: ...


class WorkdirLock:
    """An exclusive `flock` on `<workdir>/.lock` holding the owner's pid: a second process on the same
    work directory is refused with the holder's pid. The kernel drops the lock when its process
    dies, so a lock file left by a killed run never blocks a resume."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_NAME
        self.created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunError(f"work directory {workdir} is in use by process {holder}; wait for it to finish "
                               "or choose another --workdir") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Run:
    """A training run's directory and bookkeeping, opened before anything costly is built.

    Opening checks, in order: the work directory is writable; no other process holds it; without
    `resume`, it holds no checkpoint (a finished or interrupted run is never overwritten); with it,
    the checkpoint to resume (the latest, or `resume_step`) was written with the same settings (the
    differing fields are named). A failure leaves no new file behind.

    Args:
      workdir: the run directory (created if missing).
      config_fields: the config's resume fields (flat name -> value); their fingerprint goes into
        every checkpoint, the fields themselves into its metadata.
      fingerprint: `config_fingerprint(config_fields)`.
      run_config: bookkeeping cadences.
      resume: continue from a checkpoint. resume_step: which one (default: the latest); checkpoints
        newer than it are moved to `<workdir>/checkpoints_discarded/`, never deleted.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, config_fields: dict[str, Any], fingerprint: str,
                 run_config: RunConfig, resume: bool = False, resume_step: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.run_config = run_config
        self.config_fields = config_fields
        self.resume = resume
        self.timer = metrics_lib.PhaseTimer()
        self.writer: metrics_lib.MetricsWriter | _NoWriter | None = None
        # In a multi-process run every process checkpoints (collectively); process 0 alone holds the lock
        # and writes metrics, config.json, plots and heatmaps.
        self.primary = jax.process_index() == 0
        self._created = _make_workdir(self.workdir) if self.primary else None
        self.lock: WorkdirLock | None = None
        self.checkpointer: Checkpointer | None = None
        self.resume_metadata: dict[str, Any] | None = None
        try:
            if self.primary:
                self.lock = WorkdirLock(self.workdir)
            _sync("coso_jax: work directory ready")  # the others open it once process 0 holds it
            ckpt_dir = self.workdir / "checkpoints"
            had_checkpoints = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
            if not resume and had_checkpoints:
                raise RunError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run or "
                               "choose a new --workdir")
            self.checkpointer = Checkpointer(ckpt_dir, save_interval_steps=1,
                                             max_to_keep=run_config.keep_checkpoints, fingerprint=fingerprint)
            self.resume_step = self._check_resume(resume_step) if resume else None
        except BaseException:
            self.abort()
            raise

    @classmethod
    def open(cls, backbone: Any, config: Any, workdir: str | os.PathLike[str], cache: Any, *,
             abstract_items: Callable[[dict[str, Any]], dict[str, Any]], resume: bool = False,
             resume_step: int | None = None) -> "Run":
        """A backbone's set-up, shared by both trainers: checks the cached start, opens the run, then
        `backbone._build(cache)`, restores the resumed checkpoint into `abstract_items(metadata)`
        (`backbone._restore(items, metadata)`) and opens the metrics writer at `backbone.iteration`.
        Anything failing after the run opened aborts it (no new file is left behind)."""
        cache.check()
        run = cls(workdir, config_fields=config.resume_fields(), fingerprint=config.resume_fingerprint(),
                  run_config=config.run, resume=resume, resume_step=resume_step)
        backbone.run, backbone.workdir = run, run.workdir
        try:
            backbone._build(cache)
            restored = run.restore(abstract_items)
            if restored is not None:
                backbone._restore(*restored)
            run.open_writer(backbone.iteration, dict(config.to_flat_dict(), backbone=config.backbone))
        except BaseException:
            run.abort()
            raise
        return run

    # ------------------------------------------------------------------------------------------
    def _check_resume(self, requested: int | None) -> int | None:
        """The step to resume from, after checking it was written by these settings."""
        ckpt = self.checkpointer
        steps = ckpt.all_steps()
        if not steps:
            if requested is not None:
                raise RunError(f"--resume_step={requested}: {ckpt.directory} holds no checkpoint")
            log.warning("--resume given but %s holds no checkpoint: starting a new run", self.workdir)
            return None
        step = steps[-1] if requested is None else int(requested)
        if step not in steps:
            raise RunError(f"--resume_step={step}: no such checkpoint in {ckpt.directory} (available: {steps})")
        try:
            meta = ckpt._read_metadata(step)
        except CheckpointError as e:
            raise CheckpointError(f"{e}. {self._intact_hint(step)}") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {ckpt.step_path(step)} was written by an older coso_jax (before the shared run "
                "scaffold: its RNG and optimizer state are stored differently) and cannot be resumed; start a new "
                "--workdir (a cached SFT start is still reused)")
        stored = meta.get(FINGERPRINT_KEY)
        if stored != ckpt.fingerprint:
            raise CheckpointError(self._mismatch_message(step, meta))
        self.resume_metadata = meta
        return step

    def _mismatch_message(self, step: int, meta: dict[str, Any]) -> str:
        stored_fields = meta.get(CONFIG_FIELDS_KEY)
        source = "its metadata"
        if stored_fields is None and (self.workdir / "config.json").exists():
            # Checkpoints from before the fields were stored: the run's config.json has them.
            stored_fields = json.loads((self.workdir / "config.json").read_text())
            source = "config.json"
        if stored_fields is None:
            diff = "its settings were not recorded"
        else:
            stored_fields = {k: v for k, v in stored_fields.items() if k in self.config_fields}
            diff = "; ".join(field_differences(stored_fields, self.config_fields)) or "no field differs"
        return (f"checkpoint {self.checkpointer.step_path(step)} was written with other settings ({source}: "
                f"{diff}). Resume with the settings that wrote it, or choose a new --workdir")

    def _intact_hint(self, bad_step: int) -> str:
        older = [s for s in self.checkpointer.all_steps() if s < bad_step]
        for s in reversed(older):
            try:
                self.checkpointer._read_metadata(s)
                return (f"The newest older checkpoint is step {s} (unverified data): resume from it with "
                        f"--resume_step={s}; nothing was deleted")
            except CheckpointError:
                continue
        return "No older checkpoint is readable; nothing was deleted"

    def restore(self, abstract_items: Callable[[dict[str, Any]], dict[str, Any]]
                ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The checkpoint chosen at opening (None for a new run), restored into the targets that
        `abstract_items(metadata)` gives for its metadata.

        A corrupt checkpoint raises CheckpointError naming it and the newest older step that
        restores, with the flag to resume from it; nothing is deleted."""
        if self.resume_step is None:
            return None
        step = self.resume_step
        try:
            items, meta = self.checkpointer.restore(step, abstract_items=abstract_items(self.resume_metadata))
        except CheckpointError as e:
            raise CheckpointError(f"{_brief(e)}. {self._restorable_hint(step, abstract_items)}") from None
        newer = [s for s in self.checkpointer.all_steps() if s > step]
        if newer:
            self._set_aside(newer)
        return items, meta

    def _restorable_hint(self, bad_step: int, abstract_items: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
        for s in reversed([s for s in self.checkpointer.all_steps() if s < bad_step]):
            try:
                self.checkpointer.restore(s, abstract_items=abstract_items(self.checkpointer._read_metadata(s)))
            except CheckpointError:
                continue
            return (f"The newest intact checkpoint is step {s}: resume from it with --resume --resume_step={s} "
                    "(the newer ones are then moved to checkpoints_discarded/; nothing is deleted)")
        return "No older checkpoint restores either; nothing was deleted"

    def _set_aside(self, steps: list[int]) -> None:
        """Moves checkpoints newer than the resumed step out of the way (the run branches there)."""
        self.checkpointer.close()
        if self.primary:
            target = self.workdir / "checkpoints_discarded" / time.strftime("%Y%m%d-%H%M%S")
            target.mkdir(parents=True, exist_ok=True)
            for s in steps:
                shutil.move(str(self.checkpointer.step_path(s)), str(target / str(s)))
            log.warning("resuming from step %d: moved the newer checkpoints %s to %s", self.resume_step, steps, target)
        _sync("coso_jax: newer checkpoints set aside")
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", save_interval_steps=1,
                                         max_to_keep=self.run_config.keep_checkpoints,
                                         fingerprint=self.checkpointer.fingerprint)

    def open_writer(self, iteration: int, config_json: dict[str, Any]) -> None:
        """Opens metrics.jsonl (cut back to `iteration` when resuming) and writes config.json (process 0)."""
        if not self.primary:
            self.writer = _NoWriter()
            return
        self.writer = metrics_lib.MetricsWriter(self.workdir, resume_step=iteration if self.resume else None)
        (self.workdir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

    def save(self, step: int, items: dict[str, Any], metadata: dict[str, Any]) -> None:
        meta = dict(metadata, **{CONFIG_FIELDS_KEY: self.config_fields})
        self.checkpointer.save(step, items, meta, force=True)

    # ------------------------------------------------------------------------------------------
    def train(self, backbone: Backbone, run_key: jax.Array, num_iterations: int, *, desc: str,
              heatmap_title: str, plot_title: str, max_skipped_updates: int) -> list[dict[str, Any]]:
        """The iteration loop: metrics every iteration, a checkpoint every `checkpoint_every` and at the
        end, heatmap (coso) and success plot every `heatmap_every` and at the end.

        Raises RunError after `max_skipped_updates` consecutive iterations whose optimizer steps were
        all skipped for non-finite values; the last checkpoint written before them is kept."""
        cfg = self.run_config
        history: list[dict[str, Any]] = []
        bar = metrics_lib.progress_bar(num_iterations, desc=desc, disable=not cfg.progress, initial=backbone.iteration)
        all_skipped_in_a_row = 0
        try:
            while backbone.iteration < num_iterations:
                iteration = backbone.iteration
                out = backbone.run_iteration(iteration_key(run_key, iteration))
                done = backbone.iteration
                self.writer.write(done, out.record, env_steps=out.env_steps)
                history.append(out.record)
                bar.update(1, {"success": out.record.get("success_rate", float("nan")),
                               "invalid": out.record.get("invalid_action_rate", float("nan"))})
                if out.skipped:
                    log.warning("iteration %d: %d of %d optimizer steps skipped (non-finite loss or gradients); "
                                "the metrics average the applied ones", done, out.skipped, out.minibatches)
                all_skipped = bool(out.minibatches) and out.skipped == out.minibatches
                all_skipped_in_a_row = all_skipped_in_a_row + 1 if all_skipped else 0
                if all_skipped_in_a_row >= max_skipped_updates:
                    last = self.checkpointer.latest_step()
                    raise RunError(
                        f"{all_skipped_in_a_row} updates in a row had every optimizer step skipped for non-finite "
                        f"loss or gradients (iterations {done - all_skipped_in_a_row + 1}-{done}); the policy is "
                        f"not learning. Lower the learning rate or check the inputs; the last checkpoint "
                        f"({'none' if last is None else f'step {last}'}) is kept")
                # An iteration that applied no update is not checkpointed: the last checkpoint stays a good one.
                if (done % cfg.checkpoint_every == 0 or done == num_iterations) and not all_skipped:
                    items, meta = backbone.checkpoint_state()
                    self.save(done, items, meta)
                if out.heatmap is not None and (done % cfg.heatmap_every == 0 or done == 1):
                    self.write_heatmap(out.heatmap, done, heatmap_title)
                if out.plot and (done % cfg.heatmap_every == 0 or done == num_iterations):
                    self.write_plot(plot_title)
        finally:
            bar.close()
            self.checkpointer.wait()
            self.writer.flush()
        return history

    def write_heatmap(self, rows: HeatmapRows, iteration: int, title: str) -> None:
        from coso_jax.causal.render import render_token_heatmap

        if rows.tokens and self.primary:
            render_token_heatmap(rows.tokens, rows.weights, self.workdir / f"heatmap_{iteration:05d}.png",
                                 title=f"{title}, iteration {iteration}")

    def write_plot(self, title: str) -> None:
        from coso_jax import plots

        if not self.primary:
            return
        plots.plot_curves(self.workdir / metrics_lib.JSONL_NAME, self.workdir / "success_rate.png",
                          x="env_steps", y="success_rate", title=title)

    # ------------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Releases everything; removes the work directory if this run created it and wrote nothing
        of value (a failed start leaves no new files behind)."""
        lock = self.lock
        self.close()
        if self._created is not None and self._created.exists():
            shutil.rmtree(self._created, ignore_errors=True)
        elif lock is not None and lock.created:
            lock.path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
                self.checkpointer = None
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.lock is not None:
                self.lock.release()
                self.lock = None


class _NoWriter:
    """The metrics writer of processes other than 0: records are written by process 0 only."""

    def write(self, *args: Any, **kwargs: Any) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def _sync(name: str) -> None:
    """A barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def exit_on_user_error(fn, *, debug: bool = False) -> Any:
    """Runs `fn()` for a command-line entry point: a user error (config, flags, files, checkpoints, a
    busy work directory) exits with status 2 and one line on stderr instead of a traceback, unless
    `debug` or the environment variable COSO_DEBUG=1."""
    import sys

    from coso_jax.rl.config import ConfigError

    try:
        return fn()
    except (ConfigError, RunError, CheckpointError, FileNotFoundError, FileExistsError, PermissionError) as e:
        if debug or os.environ.get("COSO_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def _make_workdir(workdir: Path) -> Path | None:
    """Creates `workdir`; returns the topmost directory this created (None if it existed).
    RunError if it cannot be written."""
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"--workdir {workdir} exists and is not a directory")
    created = None
    for parent in [workdir, *workdir.absolute().parents]:
        if parent.exists():
            break
        created = parent
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to --workdir {workdir} ({e.strerror}); choose a writable directory") from None
    return created


def _brief(e: BaseException, limit: int = 160) -> str:
    """The first line of an error, its parenthesised detail cut to `limit` characters."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    head, sep, detail = text.partition(" (")
    if sep and len(detail) > limit:
        return f"{head} ({detail[:limit]}...)"
    return text
