"""Device mesh and shardings, declared once from a mesh spec; multi-host initialisation.

Shardings are declared once here from a mesh (axes `data` and `fsdp`):
- the batch axis of every batch array is split over all mesh axes (`data` x `fsdp`), as in FSDP;
- a parameter is split on `fsdp` along its largest dimension divisible by the `fsdp` size
  (replicated otherwise, and always replicated on `data`).
The mesh uses `AxisType.Auto` (GSPMD propagation), so model code needs no sharding annotations.
Multi-host runs call `maybe_initialize_distributed()` first (`jax.distributed.initialize`).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from coso_jax.rl.config import ConfigError, parse_mesh

log = logging.getLogger(__name__)

_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when a coordinator address is in the environment.

    Set `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every host
    (or run under a cluster that JAX auto-detects: SLURM, Open MPI, TPU pods) and launch the same
    command on each host. Returns True when initialised.
    """
    if not any(os.environ.get(v) for v in _COORDINATOR_VARS):
        return False
    jax.distributed.initialize()
    log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


def make_mesh(spec: str) -> jax.sharding.Mesh:
    """A mesh from a spec such as "data:8" or "data:2,fsdp:4" (always both axes, size 1 if absent)."""
    axes = parse_mesh(spec)
    sizes = (axes.get("data", 1), axes.get("fsdp", 1))
    needed = math.prod(sizes)
    available = jax.device_count()
    if needed > available:
        raise ConfigError(
            f"mesh {spec!r} needs {needed} devices but only {available} are visible "
            f"({jax.devices()[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
        )
    return jax.make_mesh(
        sizes, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=jax.devices()[:needed]
    )


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    return tuple(name for name in ("data", "fsdp") if name in mesh.shape)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Split axis 0 over every mesh axis; other axes replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """FSDP rule: shard the largest dimension divisible by the fsdp size; replicate small leaves."""
    if fsdp_size <= 1 or not shape or math.prod(shape) < 1024:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in order:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: jax.sharding.Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of parameters or optimizer state (same rule for every leaf)."""
    fsdp = mesh.shape.get("fsdp", 1)

    def leaf_sharding(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, param_spec(shape, fsdp))

    return jax.tree.map(leaf_sharding, tree)


def batch_shardings(mesh: jax.sharding.Mesh, batch: dict[str, Any]) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def check_batch_divisible(mesh: jax.sharding.Mesh, batch_size: int, what: str) -> None:
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if batch_size % shards:
        raise ConfigError(f"{what} ({batch_size}) must be divisible by the mesh's batch shards ({shards})")


def put(tree: Any, shardings: Any) -> Any:
    """Places a pytree by its shardings. A sharding that spans other processes' devices takes this
    process's copy of the value (the same on every process: replicated state, such as parameters)."""
    def one(x, s):
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) and x.is_fully_addressable else x
        if isinstance(host, jax.Array):  # already global
            return jax.device_put(host, s)
        return jax.make_array_from_callback(np.shape(host), s, lambda index: np.asarray(host)[index])

    return jax.tree.map(one, tree, shardings)


def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
