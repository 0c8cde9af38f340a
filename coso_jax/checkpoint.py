"""Training checkpoints: a thin, strict wrapper over Orbax's ``CheckpointManager``.

A checkpoint is one step directory holding several named *items* (pytrees of arrays:
NNX model state, optimizer state, classifier params, PRNG keys...) and one JSON
*metadata* record (iteration and env-step counters, numpy RNG states of the envs, the
config fingerprint...). Example::

    with Checkpointer(workdir / "ckpt", save_interval_steps=5, max_to_keep=3,
                      fingerprint=config_fingerprint(cfg)) as ckpt:
        if ckpt.latest_step() is not None:           # resume
            items, meta = ckpt.restore(abstract_items={"model": abstract_model_state,
                                                       "opt": abstract_opt_state,
                                                       "key": key})
        ...
        ckpt.save(it, {"model": nnx.state(model), "opt": nnx.state(optimizer),
                       "key": key}, {"iteration": it, "env_steps": n})

Design notes (orbax-checkpoint 0.12.x, V0 API):

* Items are written with ``ocp.args.StandardSave`` inside ``ocp.args.Composite``; the
  metadata with ``ocp.args.JsonSave`` under the reserved item name ``"metadata"``.
  Saves are asynchronous and atomic (written to a temporary directory, renamed on
  commit); a step that never committed is invisible to :meth:`Checkpointer.latest_step`.
* Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data and
  re-wrapped on restore with the key implementation of the abstract target, so the
  on-disk format does not depend on Orbax's own key support.
* Restoring validates the stored tree against the abstract target first (missing and
  unexpected leaves, shape mismatches) and raises :class:`CheckpointError` naming the
  item, the leaf paths and the checkpoint path. Dtypes are *cast* to the target's
  (e.g. a float32 checkpoint restores into a bfloat16 target); shardings come from the
  target, so a ``jax.ShapeDtypeStruct`` with a ``NamedSharding`` restores sharded.
* Any failure while reading (truncated or deleted files, unreadable JSON) is re-raised as
  :class:`CheckpointError` with the original exception chained; a run never silently
  restarts from scratch because of a bad checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["CheckpointError", "Checkpointer", "config_fingerprint", "open_run_checkpointer", "tree_digest"]

METADATA_ITEM = "metadata"
FINGERPRINT_KEY = "config_fingerprint"
_MAX_LISTED = 8  # leaf paths listed in one error message


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or incompatible with what the caller expects."""


# --------------------------------------------------------------------------- fingerprint


def _canonical(obj: Any) -> Any:
    """Converts a config into plain JSON types with a deterministic layout."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        return _canonical(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def config_fingerprint(config: Mapping[str, Any] | Any, *, ignore: Iterable[str] = ()) -> str:
    """A short stable hash of a config (mapping or dataclass) for checkpoint compatibility.

    Args:
      config: the run configuration: nested mappings / dataclasses / lists of JSON-able
        values (numpy scalars, paths and tuples are normalised; key order is irrelevant).
      ignore: top-level keys left out of the hash, for fields that may legitimately change
        across a resume (work directory, total number of iterations, logging cadence...).

    Returns:
      16 hex characters of the SHA-256 of the canonical JSON.
    """
    canon = _canonical(config)
    if not isinstance(canon, dict):
        raise TypeError(f"config_fingerprint expects a mapping or dataclass, got {type(config).__name__}")
    ignored = set(ignore)
    canon = {k: v for k, v in canon.items() if k not in ignored}
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tree_digest(tree: Any, sample: int = 256) -> str:
    """A short hash of a pytree of arrays that is cheap at any size: every leaf's path, shape and dtype,
    and the values of its first and last `sample` elements (e.g. to tell, when resuming LoRA adapters,
    that the frozen base model they were trained on is the one loaded now). 16 hex characters.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat = leaf.reshape(-1)
        ends = flat if flat.size <= 2 * sample else jax.numpy.concatenate([flat[:sample], flat[-sample:]])
        h.update(f"{_path_str(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype)}|".encode())
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(ends))).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tree helpers


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(_key_name(e) for e in path) or "<root>"


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_storable(x: Any) -> Any:
    """Typed PRNG keys -> raw uint32 key data; everything else unchanged."""
    return jax.random.key_data(x) if _is_typed_key(x) else x


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


@dataclasses.dataclass(frozen=True)
class _KeyLeaf:
    """Abstract leaf standing for a typed PRNG key (re-wrapped after restore)."""

    impl: Any
    data: jax.ShapeDtypeStruct


def _abstract_leaf(x: Any) -> Any:
    """Turns a target leaf (array or ShapeDtypeStruct) into what Orbax restores into."""
    if _is_typed_key(x):
        holder: list[Any] = []

        def data_of(k):
            holder.append(jax.random.key_impl(k))
            return jax.random.key_data(k)

        data = jax.eval_shape(data_of, x)
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            sharding = _default_sharding()
        elif isinstance(sharding, jax.NamedSharding):
            # Key data has trailing implementation dims: leave them unsharded.
            spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
            sharding = jax.NamedSharding(sharding.mesh, jax.P(*spec))
        elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            raise TypeError(f"unsupported sharding {sharding!r} on a typed PRNG key target")
        return _KeyLeaf(holder[0], jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding))
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding if x.sharding is not None else _default_sharding()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=_default_sharding())
    raise TypeError(f"abstract target leaf of type {type(x).__name__} is not an array or jax.ShapeDtypeStruct")


def _unwrap(abstract: Any) -> Any:
    return jax.tree.map(lambda a: a.data if isinstance(a, _KeyLeaf) else a, abstract,
                        is_leaf=lambda a: isinstance(a, _KeyLeaf))


def _rewrap(restored: Any, abstract: Any) -> Any:
    def fix(a, r):
        return jax.random.wrap_key_data(r, impl=a.impl) if isinstance(a, _KeyLeaf) else r

    return jax.tree.map(fix, abstract, restored, is_leaf=lambda a: isinstance(a, _KeyLeaf))


def _jsonable(obj: Any, where: str = "metadata") -> Any:
    """Validates / converts checkpoint metadata to plain JSON values (numpy -> python)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: JSON object keys must be str, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        return _jsonable(np.asarray(obj).tolist(), where)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where}: non-finite float {obj!r} is not valid JSON")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: value of type {type(obj).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores training state every ``save_interval_steps``, keeping the last N.

    Args:
      directory: root directory; step ``s`` lives in ``<directory>/<s>``. Created if absent.
      save_interval_steps: :meth:`save` writes only when ``step % save_interval_steps == 0``
        (or ``force=True``).
      max_to_keep: number of most recent checkpoints kept; ``None`` keeps all.
      fingerprint: the run's :func:`config_fingerprint`. When given, every save records it
        in the metadata and every restore checks it, raising :class:`CheckpointError` on a
        mismatch (or when the checkpoint has none).
      async_save: write in a background thread (Orbax default). :meth:`wait` / :meth:`close`
        block until pending writes are committed.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = 3,
        fingerprint: str | None = None,
        async_save: bool = True,
    ) -> None:
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = Path(directory).expanduser().resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} exists and is not a directory")
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        try:
            self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    # ---------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> Path:
        """Directory of one step's checkpoint."""
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would write (without ``force``)."""
        return step not in self._manager.all_steps() and self._manager.should_save(step)

    # ---------------------------------------------------------------- save

    def save(
        self,
        step: int,
        items: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves ``items`` (pytrees of arrays) and JSON ``metadata`` at ``step``.

        Writes only on the save interval unless ``force``. Typed PRNG keys anywhere in the
        items are stored as key data. Returns whether a checkpoint was started (the write
        may still be in flight: see :meth:`wait`). Saving a step that already exists
        returns ``False`` (e.g. the step a run just resumed from); saving a step older than
        the latest raises :class:`CheckpointError` (it would disorder "keep the last N").
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        if not items:
            raise ValueError("save needs at least one item")
        for name in items:
            if name == METADATA_ITEM:
                raise ValueError(f"item name {METADATA_ITEM!r} is reserved for the JSON metadata")
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"item name {name!r} must be alphanumeric (with _ or -)")
        meta = _jsonable(dict(metadata or {}))
        if self.fingerprint is not None:
            if FINGERPRINT_KEY in meta and meta[FINGERPRINT_KEY] != self.fingerprint:
                raise ValueError(
                    f"metadata[{FINGERPRINT_KEY!r}]={meta[FINGERPRINT_KEY]!r} differs from the "
                    f"Checkpointer's fingerprint {self.fingerprint!r}")
            meta[FINGERPRINT_KEY] = self.fingerprint

        existing = self._manager.all_steps()
        if step in existing:
            return False
        latest = max(existing) if existing else None
        if latest is not None and step < latest:
            raise CheckpointError(
                f"refusing to save step {step} in {self.directory}: it is older than the latest "
                f"checkpoint {latest}; delete the newer steps first to branch from an old one")
        if not force and not self._manager.should_save(step):
            return False

        args = {name: ocp.args.StandardSave(jax.tree.map(_to_storable, tree)) for name, tree in items.items()}
        args[METADATA_ITEM] = ocp.args.JsonSave(meta)
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=force))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving step {step} to {self.step_path(step)} failed: {e}") from e

    # ---------------------------------------------------------------- restore

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Reads only the JSON metadata of ``step`` (default: latest). Checks the fingerprint."""
        step = self._resolve_step(step)
        meta = self._read_metadata(step)
        self._check_fingerprint(step, meta)
        return meta

    def restore(
        self,
        step: int | None = None,
        abstract_items: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores items into the structure, shardings and dtypes of ``abstract_items``.

        Args:
          step: the step to restore; ``None`` restores the latest.
          abstract_items: item name -> target pytree whose leaves are arrays or
            ``jax.ShapeDtypeStruct`` (e.g. ``nnx.state(nnx.eval_shape(make_model))`` with
            shardings attached). Only the named items are read, so a subset (say, just the
            model for evaluation) is fine. Leaves without a sharding land on the first
            local device. Typed-key leaves come back as typed keys.

        Returns:
          ``(items, metadata)``: the restored pytrees (same structure as the targets, leaves
          are ``jax.Array``) and the JSON metadata.

        Raises:
          CheckpointError: no checkpoint, unknown step, missing item, tree structure or shape
            mismatch, fingerprint mismatch, or unreadable / corrupt files.
        """
        step = self._resolve_step(step)
        path = self.step_path(step)
        meta = self._read_metadata(step)
        self._check_fingerprint(step, meta)
        abstract_items = dict(abstract_items or {})

        targets: dict[str, Any] = {}
        for name, target in abstract_items.items():
            item_dir = path / name
            if not item_dir.is_dir():
                available = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != METADATA_ITEM)
                raise CheckpointError(
                    f"item {name!r} is missing from checkpoint {path} (available items: {available})")
            try:
                abstract = jax.tree.map(_abstract_leaf, target)
            except TypeError as e:
                raise TypeError(f"abstract target for item {name!r}: {e}") from e
            self._validate_item(name, item_dir, _unwrap(abstract))
            targets[name] = abstract

        if not targets:
            return {}, meta
        args = {name: ocp.args.StandardRestore(_unwrap(a)) for name, a in targets.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - tensorstore / orbax raise many kinds
            raise CheckpointError(
                f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {_short(e)})") from e
        items = {name: _rewrap(restored[name], targets[name]) for name in targets}
        return items, meta

    # ---------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"an asynchronous save to {self.directory} failed: {e}") from e

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (available: {steps})")
        return int(step)

    def _read_metadata(self, step: int) -> dict[str, Any]:
        path = self.step_path(step) / METADATA_ITEM
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
            meta = restored[METADATA_ITEM]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"metadata of checkpoint {self.step_path(step)} is missing or corrupt "
                f"({type(e).__name__}: {_short(e)}); expected JSON at {path}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"metadata of checkpoint {path} is not a JSON object: {meta!r:.200}")
        return meta

    def _check_fingerprint(self, step: int, meta: Mapping[str, Any]) -> None:
        if self.fingerprint is None:
            return
        stored = meta.get(FINGERPRINT_KEY)
        if stored != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {self.step_path(step)} was written by an incompatible config: "
                f"fingerprint {stored!r} != this run's {self.fingerprint!r}. Use a fresh work "
                f"directory, or restore with the config that wrote it")

    def _validate_item(self, name: str, item_dir: Path, abstract: Any) -> None:
        """Compares the stored tree of one item with its abstract target."""
        try:
            stored_tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"item {name!r} of checkpoint {item_dir.parent} is corrupt: cannot read its tree "
                f"metadata ({type(e).__name__}: {_short(e)})") from e
        stored = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
        wanted = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        problems = []
        if missing:
            problems.append(f"leaves missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"leaves in the checkpoint but not in the target: {_listing(unexpected)}")
        shape_diffs = []
        for key in sorted(set(stored) & set(wanted)):
            s_shape = getattr(stored[key], "shape", None)
            if s_shape is not None and tuple(s_shape) != tuple(wanted[key].shape):
                shape_diffs.append(f"{key}: stored {tuple(s_shape)} vs target {tuple(wanted[key].shape)}")
        if shape_diffs:
            problems.append(f"shape mismatches: {_listing(shape_diffs)}")
        if problems:
            raise CheckpointError(
                f"item {name!r} of checkpoint {item_dir.parent} does not match the restore target: "
                + "; ".join(problems))


def _listing(entries: list[str]) -> str:
    shown = ", ".join(entries[:_MAX_LISTED])
    more = len(entries) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def open_run_checkpointer(workdir: str | os.PathLike[str], *, resume: bool, max_to_keep: int | None,
                          fingerprint: str) -> "Checkpointer":
    """The checkpointer of a training run in ``workdir/checkpoints``, opened before anything costly.

    The fingerprint makes resuming with other settings a clear error, not a silent mix; without
    ``resume`` a directory that already holds checkpoints raises FileExistsError, so a finished or
    interrupted run is never overwritten by accident.
    """
    directory = Path(workdir) / "checkpoints"
    checkpointer = Checkpointer(directory, save_interval_steps=1, max_to_keep=max_to_keep,
                                fingerprint=fingerprint)
    if not resume and checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(f"{directory} already holds checkpoints; pass --resume to continue that run "
                              "or choose a new --workdir")
    return checkpointer
