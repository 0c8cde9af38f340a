"""Data across processes (jax.distributed): the PPO trainer's rows, partitioned over env groups.

A run's envs are split into `env_partitions` equal groups; in a run of P processes (P =
`env_partitions`) process p steps group p. The rollout batch is laid out partition-major: row
(p, t, e) of a [T, E/P] group, so every process contributes one contiguous block and a single
process reproduces a P-process run exactly by using the same layout (`to_partition_major`).

Helpers (all no-ops on one process):
  * `global_rows(local, sharding)`: a global jax.Array whose rows are the processes' local blocks,
    in process order (`jax.make_array_from_process_local_data`).
  * `local_rows(x)`: this process's rows of a row-sharded global array, as numpy.
  * `allgather(tree)`: every process's value, stacked on a new leading axis of size P.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Process 0 writes the run's files (metrics, config, plots); everyone writes checkpoints."""
    return jax.process_index() == 0


def to_partition_major(arrays: np.ndarray, partitions: int) -> np.ndarray:
    """[T, E, ...] -> [P * T * (E / P), ...]: the rows of env group 0 (time-major), then group 1, ..."""
    t, e = arrays.shape[:2]
    grouped = arrays.reshape((t, partitions, e // partitions) + arrays.shape[2:])
    return np.moveaxis(grouped, 1, 0).reshape((partitions * t * (e // partitions),) + arrays.shape[2:])


def global_rows(local: Any, sharding: Any) -> Any:
    """A pytree of global arrays from each process's local row blocks (leading axes concatenated in
    process order); `sharding` (a pytree of shardings, or one) splits the rows over the mesh."""
    def one(x, s):
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(s, x, shape)

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding), local)
    return jax.tree.map(one, local, sharding)


def local_rows(x: Any) -> Any:
    """This process's rows of row-sharded global arrays (a pytree), as numpy, in row order."""
    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(jax.device_get(a))
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        seen, blocks = set(), []
        for s in shards:  # replicated columns give several shards of the same rows
            start = s.index[0].start or 0
            if start not in seen:
                seen.add(start)
                blocks.append(np.asarray(s.data))
        return np.concatenate(blocks)

    return jax.tree.map(one, x)


def process_mesh() -> jax.sharding.Mesh:
    """A mesh of all devices with axis "process" (one row per process) and "local"."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(devices).reshape(jax.process_count(), -1), ("process", "local"))


def process_sharding() -> jax.sharding.NamedSharding:
    """Rows of a [P, ...] array on their process (replicated over its devices)."""
    return jax.sharding.NamedSharding(process_mesh(), jax.sharding.PartitionSpec("process"))


def process_stack(local: np.ndarray) -> jax.Array:
    """One global [P, ...] array whose row p is process p's `local` (same shape on every process):
    per-process state (its envs) that a multi-process checkpoint saves collectively."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(process_sharding(), local[None],
                                                  (jax.process_count(),) + local.shape)


def own_row(x: jax.Array) -> np.ndarray:
    """This process's row of a `process_stack` array."""
    return np.asarray(x.addressable_shards[0].data)[0]


def allgather(tree: Any) -> Any:
    """Every process's value of a pytree of host arrays, stacked: leaves [P, ...] (P = 1 on one process)."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))
