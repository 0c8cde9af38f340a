"""Meshes and shardings (coso_jax/rl/sharding.py)."""
from __future__ import annotations

import numpy as np
import pytest

from coso_jax.rl.config import ConfigError
from coso_jax.rl.sharding import batch_shardings, check_batch_divisible, make_mesh, param_spec, state_shardings


def test_make_mesh_too_many_devices():
    with pytest.raises(ConfigError, match="needs 16 devices"):
        make_mesh("data:4,fsdp:4")
    mesh = make_mesh("data:2,fsdp:4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}


def test_fsdp_rule_and_batch_split():
    assert tuple(param_spec((4096, 128), 4)) == ("fsdp", None)
    assert tuple(param_spec((6, 4096), 4)) == (None, "fsdp")
    assert tuple(param_spec((10, 10), 4)) == ()  # small leaves stay replicated
    assert tuple(param_spec((4096, 128), 1)) == ()
    mesh = make_mesh("data:2,fsdp:4")
    shard = state_shardings(mesh, {"w": np.zeros((64, 128)), "b": np.zeros(3)})
    assert tuple(shard["w"].spec) == (None, "fsdp") and tuple(shard["b"].spec) == ()
    assert tuple(batch_shardings(mesh, {"x": np.zeros((8, 3))})["x"].spec) == (("data", "fsdp"), None)
    check_batch_divisible(mesh, 16, "micro-batch size")
    with pytest.raises(ConfigError, match="micro-batch size \\(12\\) must be divisible by the mesh's batch shards \\(8\\)"):
        check_batch_divisible(mesh, 12, "micro-batch size")
