"""Tests for coso_jax.checkpoint: round trips, retention, resume, and clear failures."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from coso_jax.checkpoint import Checkpointer, CheckpointError, config_fingerprint


class _Net(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(din, dout, rngs=rngs)
        self.norm = nnx.BatchNorm(dout, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # carries a typed PRNG key in its state

    def __call__(self, x):
        return self.drop(self.norm(self.dense(x)))


def _trained(seed: int = 0, din: int = 4, dout: int = 6):
    """A model and adam optimizer after one update (non-trivial moments and count)."""
    model = _Net(din, dout, nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss(m):
        return jnp.mean(m(jnp.ones((3, din))) ** 2)

    grads = nnx.grad(loss)(model)
    opt.update(model, grads)
    return model, opt


def _abstract(din: int = 4, dout: int = 6):
    model = nnx.eval_shape(lambda: _Net(din, dout, nnx.Rngs(7)))
    opt = nnx.eval_shape(lambda: nnx.Optimizer(_Net(din, dout, nnx.Rngs(7)), optax.adam(1e-2), wrt=nnx.Param))
    return nnx.state(model), nnx.state(opt)


def _leaves_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _items(seed: int = 0):
    model, opt = _trained(seed)
    return {"model": nnx.state(model), "opt": nnx.state(opt), "key": {"rng": jax.random.key(seed + 11)}}


def test_round_trip_nnx_optax_and_key(tmp_path: Path):
    items = _items()
    np_rng = np.random.default_rng(5)
    meta = {"iteration": 3, "env_steps": 1536, "np_rng": np_rng.bit_generator.state}
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, items, meta)
        ckpt.wait()
        assert ckpt.latest_step() == 3
        abs_model, abs_opt = _abstract()
        target = {"model": abs_model, "opt": abs_opt,
                  "key": {"rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype)}}
        restored, got_meta = ckpt.restore(abstract_items=target)

    assert isinstance(restored["model"], nnx.State)
    _leaves_equal(items["model"], restored["model"])
    _leaves_equal(items["opt"], restored["opt"])
    _leaves_equal(items["key"], restored["key"])
    assert jax.random.key_impl(restored["key"]["rng"]) == jax.random.key_impl(items["key"]["rng"])
    assert got_meta["iteration"] == 3 and got_meta["env_steps"] == 1536
    # The numpy generator resumes exactly where it was.
    resumed = np.random.default_rng()
    resumed.bit_generator.state = got_meta["np_rng"]
    np.testing.assert_array_equal(resumed.integers(0, 1 << 30, 8), np_rng.integers(0, 1 << 30, 8))

    # Restored state plugs back into live NNX objects and trains identically.
    model, opt = _trained(seed=99)
    nnx.update(model, restored["model"])
    nnx.update(opt, restored["opt"])
    ref_model, ref_opt = _trained(seed=0)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    for m, o in ((model, opt), (ref_model, ref_opt)):
        o.update(m, nnx.grad(lambda mm: jnp.mean(mm(x) ** 2))(m))
    _leaves_equal(nnx.state(model), nnx.state(ref_model))
    _leaves_equal(nnx.state(opt), nnx.state(ref_opt))


def test_restore_into_concrete_targets_and_plain_optax(tmp_path: Path):
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    opt_state = optax.adam(1e-3).init(params)
    key = jax.random.key(3)
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(0, {"params": params, "opt": opt_state, "key": {"k": key}})
        ckpt.wait()
        zeros = jax.tree.map(jnp.zeros_like, params)
        restored, _ = ckpt.restore(0, {"params": zeros, "opt": optax.adam(1e-3).init(zeros),
                                       "key": {"k": jax.random.key(0)}})
    _leaves_equal(params, restored["params"])
    _leaves_equal(opt_state, restored["opt"])
    assert type(restored["opt"][0]).__name__ == "ScaleByAdamState"
    _leaves_equal({"k": key}, restored["key"])
    # Dtypes follow the target (e.g. float32 on disk -> bfloat16 params).
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
        restored, _ = ckpt.restore(0, {"params": bf16})
    assert restored["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"], np.float32), np.asarray(params["w"]))


def test_interval_keep_last_n_and_latest(tmp_path: Path):
    items = {"p": {"x": jnp.zeros(2)}}
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
        written = []
        for step in range(7):
            items = {"p": {"x": jnp.full(2, float(step))}}
            written.append(ckpt.save(step, items, {"iteration": step}))
        assert written == [True, False, True, False, True, False, True]
        items = {"p": {"x": jnp.full(2, 7.0)}}
        assert ckpt.save(7, items, {"iteration": 7}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert sorted(p.name for p in (tmp_path).iterdir() if p.name.isdigit()) == ["6", "7"]
        # Same step again: no-op; an older step: refused.
        assert not ckpt.save(7, items, force=True)
        with pytest.raises(CheckpointError, match="older than the latest"):
            ckpt.save(4, items, force=True)

    # A new Checkpointer (a resumed process) sees the latest step and its content.
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 7
        restored, meta = ckpt.restore(abstract_items={"p": {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}})
        assert meta["iteration"] == 7
        np.testing.assert_array_equal(restored["p"]["x"], np.full(2, 7.0))
        restored, meta = ckpt.restore(6, {"p": {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}})
        assert meta["iteration"] == 6
        assert ckpt.restore_metadata()["iteration"] == 7


def test_sharded_restore_on_two_devices(tmp_path: Path):
    assert len(jax.devices()) >= 2, "tests/conftest.py should provide 8 host CPU devices"
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    model, _ = _trained(din=4, dout=6)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": nnx.state(model), "key": {"k": jax.random.key(1)}})
        ckpt.wait()

        def shard(x):
            if x.ndim == 2:  # the kernel: split its output dim over the mesh
                spec = jax.P(None, "data")
            else:
                spec = jax.P()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, spec))

        abs_model, _ = _abstract()
        target = jax.tree.map(shard, abs_model)
        key_target = {"k": jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                               sharding=jax.NamedSharding(mesh, jax.P()))}
        restored, _ = ckpt.restore(1, {"model": target, "key": key_target})

    kernel = restored["model"]["dense"]["kernel"][...]
    assert kernel.sharding == jax.NamedSharding(mesh, jax.P(None, "data"))
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 3)}
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.dense.kernel[...]))
    _leaves_equal(nnx.state(model), restored["model"])
    _leaves_equal({"k": jax.random.key(1)}, restored["key"])


def test_structure_and_shape_mismatch_name_the_key(tmp_path: Path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, _items())
        ckpt.wait()
        abs_model, abs_opt = _abstract()

        wider, _ = _abstract(dout=8)
        mismatch = r"shape mismatches: .*dense/kernel/value: stored \(4, 6\) vs target \(4, 8\)"
        with pytest.raises(CheckpointError, match=mismatch) as err:
            ckpt.restore(2, {"model": wider})
        assert str(tmp_path) in str(err.value) and "'model'" in str(err.value)

        renamed = {"weights": {"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)}}
        with pytest.raises(CheckpointError, match="item 'weights' is missing") as err:
            ckpt.restore(2, renamed)
        assert "model" in str(err.value)

        fewer = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32)}}
        with pytest.raises(CheckpointError, match="not in the target: .*dense/bias/value"):
            ckpt.restore(2, {"model": fewer})

        more = {"key": {"rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
                        "extra": jax.ShapeDtypeStruct((3,), jnp.float32)}}
        with pytest.raises(CheckpointError, match="missing from the checkpoint: extra"):
            ckpt.restore(2, more)

        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*available: \[2\]"):
            ckpt.restore(5, {"model": abs_model})

    with Checkpointer(tmp_path / "empty") as empty:
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            empty.restore(abstract_items={"model": abs_model})


def test_corrupt_checkpoint_raises(tmp_path: Path):
    # Random data, large enough that OCDBT stores it in chunk files rather than inline.
    target = {"p": {"w": jax.ShapeDtypeStruct((128, 128), jnp.float32)}}
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            w = jax.random.normal(jax.random.key(step), (128, 128))
            ckpt.save(step, {"p": {"w": w}}, {"iteration": step})
        ckpt.wait()

    # Truncate the array chunk files of step 1 (its tree metadata stays readable).
    data_files = list((tmp_path / "1" / "p" / "ocdbt.process_0" / "d").iterdir())
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(7)
    # Delete the metadata JSON of step 2.
    os.remove(tmp_path / "2" / "metadata" / "metadata")
    # Truncate the OCDBT manifest of step 3.
    with open(tmp_path / "3" / "p" / "manifest.ocdbt", "r+b") as fh:
        fh.truncate(5)

    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        assert ckpt.latest_step() == 3
        for step, pattern in ((1, "corrupt or unreadable"), (2, "metadata of checkpoint .* missing or corrupt"),
                              (3, "corrupt")):
            with pytest.raises(CheckpointError, match=pattern) as err:
                ckpt.restore(step, target)
            assert str(tmp_path / str(step)) in str(err.value)


def test_fingerprint(tmp_path: Path):
    cfg = {"env": "NumberLine", "algo": "coso", "alpha": 0.1, "model": {"layers": 2, "dims": (8, 16)}}
    fp = config_fingerprint(cfg)
    assert fp == config_fingerprint(dict(reversed(list(cfg.items()))))
    assert len(fp) == 16
    assert fp != config_fingerprint({**cfg, "alpha": 0.2})
    assert config_fingerprint({**cfg, "workdir": "a"}, ignore=["workdir"]) == config_fingerprint(
        {**cfg, "workdir": "b"}, ignore=["workdir"])
    assert config_fingerprint({**cfg, "alpha": np.float64(0.1)}) == fp

    items = {"p": {"w": jnp.ones(3)}}
    target = {"p": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with Checkpointer(tmp_path, fingerprint=fp) as ckpt:
        ckpt.save(1, items, {"iteration": 1})
        ckpt.wait()
        assert ckpt.restore_metadata()["config_fingerprint"] == fp
        ckpt.restore(1, target)
    other = config_fingerprint({**cfg, "algo": "entropy"})
    with Checkpointer(tmp_path, fingerprint=other) as ckpt:
        with pytest.raises(CheckpointError, match=f"incompatible config: fingerprint '{fp}' != this run's '{other}'"):
            ckpt.restore(1, target)
        with pytest.raises(CheckpointError, match="incompatible config"):
            ckpt.restore_metadata()


def test_save_argument_errors(tmp_path: Path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="reserved"):
            ckpt.save(0, {"metadata": {"x": jnp.ones(1)}})
        with pytest.raises(TypeError, match=r"metadata\.bad"):
            ckpt.save(0, {"p": {"x": jnp.ones(1)}}, {"bad": object()})
        with pytest.raises(ValueError, match="non-finite"):
            ckpt.save(0, {"p": {"x": jnp.ones(1)}}, {"loss": float("nan")})
        assert ckpt.latest_step() is None
