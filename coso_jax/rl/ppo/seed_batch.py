"""Several seeds of one (game, algo) as one program: `SeedBatch`.

S ordinary `PPOTrainer`s (seed, seed + 1, ..., each with its own envs, classifier, replay, work
directory and checkpoints) run their iterations in lockstep, one thread each; their device programs
(sampler, value, PPO update) are gathered into one call on parameters and optimizer states stacked on
a leading seed axis (`jax.vmap` of the same functions), so an accelerator runs S seeds for about the
price of one. Everything else (envs, the classifier's online step, the counterfactual kernel, GAE,
logging) stays per seed. Each seed's result equals its solo run (tests/test_seed_batch.py) up to
float rounding of the batched programs.

    batch = SeedBatch([ppo_preset("tiny_cpu", seed=s, ...) for s in range(4)], "runs/nl_coso")
    histories = batch.train(); batch.close()      # runs/nl_coso/seed_0 ... seed_3

One device only (`mesh` data:1): the seed axis is the batch. On a 2-core CPU it does not pay
(benchmarks/seed_batch.py measures it); on a GPU it should.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from coso_jax.rl.config import ConfigError, PPOConfig
from coso_jax.rl.ppo.trainer import DeviceSteps, PPOTrainer, sample, value
from coso_jax.rl.ppo.update import update


@functools.partial(jax.jit, static_argnums=(0, 1))
def batched_sample(graphdef: nnx.GraphDef, settings: Any, params: Any, frozen: Any, inputs: Any, keys: jax.Array):
    """`sample` of S seeds: params/inputs/keys with a leading seed axis; the frozen base is shared."""
    return jax.vmap(lambda p, i, k: sample(graphdef, settings, p, frozen, i, k))(params, inputs, keys)


@functools.partial(jax.jit, static_argnums=(0,))
def batched_value(graphdef: nnx.GraphDef, params: Any, frozen: Any, inputs: Any) -> jax.Array:
    return jax.vmap(lambda p, i: value(graphdef, p, frozen, i))(params, inputs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def batched_update(graphdef: nnx.GraphDef, hp: Any, opt: Any, params: Any, opt_state: Any, batch: Any,
                   keys: jax.Array, alphas: jax.Array, frozen: Any):
    return jax.vmap(lambda p, o, b, k, a: update(graphdef, hp, opt, None, p, o, b, k, a, frozen))(
        params, opt_state, batch, keys, alphas)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


class _Gather:
    """A rendezvous of S threads: each calls `__call__(slot, args)`; the last to arrive runs
    `fn([args of every slot])` once and every thread gets its slot's share of the result. A failure in
    any thread breaks the rendezvous for all (no thread waits forever)."""

    def __init__(self, size: int, fn: Callable[[list[tuple]], list[Any]]):
        self.size, self.fn = size, fn
        self.cond = threading.Condition()
        self.args: dict[int, tuple] = {}
        self.results: list[Any] | None = None
        self.generation = 0
        self.broken: BaseException | None = None

    def __call__(self, slot: int, args: tuple) -> Any:
        with self.cond:
            if self.broken is not None:
                raise RuntimeError("another seed of the batch failed") from self.broken
            generation = self.generation
            self.args[slot] = args
            if len(self.args) == self.size:
                try:
                    self.results = self.fn([self.args[i] for i in range(self.size)])
                except BaseException as e:
                    self.break_(e)
                    raise
                self.args = {}
                self.generation += 1
                self.cond.notify_all()
            else:
                while self.generation == generation and self.broken is None:
                    self.cond.wait()
                if self.broken is not None:
                    raise RuntimeError("another seed of the batch failed") from self.broken
            return self.results[slot]

    def break_(self, error: BaseException) -> None:
        with self.cond:
            self.broken = error
            self.cond.notify_all()


class SeedBatch:
    """S seeds of one config as one program (see the module docstring).

    Args:
      configs: one PPOConfig per seed, equal but for `run.seed` (and `sft.dir`, which must be the same).
      workdir: the batch's directory; seed k's run lives in `<workdir>/seed_<seed>`.
      resume: continue every seed from its latest checkpoint.
    Raises ConfigError when the configs differ in anything but the seed or ask for several devices.
    """

    def __init__(self, configs: Sequence[PPOConfig], workdir: str | Path, *, resume: bool = False) -> None:
        if len(configs) < 1:
            raise ConfigError("a seed batch needs at least one config")
        first = configs[0]
        for c in configs[1:]:
            if c.replace(seed=first.run.seed).to_flat_dict() != first.to_flat_dict():
                raise ConfigError("the configs of a seed batch must differ in their seed only")
        if first.mesh != "data:1":
            raise ConfigError("a seed batch runs on one device (the seed axis is its batch): leave --mesh at data:1")
        self.workdir = Path(workdir)
        self.trainers: list[PPOTrainer] = []
        try:
            for c in configs:
                self.trainers.append(PPOTrainer(c, self.workdir / f"seed_{c.run.seed}", resume=resume))
        except BaseException:
            self.close()
            raise
        n = len(self.trainers)
        self.gathers = {"sample": _Gather(n, self._sample), "value": _Gather(n, self._value),
                        "update": _Gather(n, self._update)}
        # Orbax's asynchronous saves are not safe from several threads at once: one seed saves at a time.
        save_lock = threading.Lock()
        for slot, trainer in enumerate(self.trainers):
            trainer.run.save = functools.partial(self._save_one, save_lock, trainer.run.save, trainer.run)
            trainer.steps = DeviceSteps(
                sample=lambda *a, slot=slot: self.gathers["sample"](slot, a),
                value=lambda *a, slot=slot: self.gathers["value"](slot, a),
                update=lambda *a, slot=slot: self.gathers["update"](slot, a))

    @staticmethod
    def _save_one(lock: threading.Lock, save: Callable, run: Any, *args: Any, **kwargs: Any) -> None:
        with lock:
            save(*args, **kwargs)
            run.checkpointer.wait()

    # The batched programs: args of every seed in, each seed's share out.
    def _sample(self, calls: list[tuple]) -> list[Any]:
        graphdef, settings, _, frozen, _, _ = calls[0]
        out = batched_sample(graphdef, settings, _stack([c[2] for c in calls]), frozen, _stack([c[4] for c in calls]),
                             jnp.stack([c[5] for c in calls]))
        return _unstack(jax.device_get(out), len(calls))

    def _value(self, calls: list[tuple]) -> list[Any]:
        graphdef, _, frozen, _ = calls[0]
        out = batched_value(graphdef, _stack([c[1] for c in calls]), frozen, _stack([c[3] for c in calls]))
        return _unstack(jax.device_get(out), len(calls))

    def _update(self, calls: list[tuple]) -> list[Any]:
        graphdef, hp, opt, _, _, _, _, _, _, frozen = calls[0]
        params, opt_state, metrics = batched_update(
            graphdef, hp, opt, _stack([c[4] for c in calls]), _stack([c[5] for c in calls]),
            _stack([c[6] for c in calls]), jnp.stack([c[7] for c in calls]), jnp.stack([c[8] for c in calls]), frozen)
        return list(zip(_unstack(params, len(calls)), _unstack(opt_state, len(calls)), _unstack(metrics, len(calls))))

    def train(self) -> list[list[dict[str, Any]]]:
        """Trains every seed to its end; returns each seed's history. A failure in one seed stops all."""
        histories: list[Any] = [None] * len(self.trainers)
        errors: list[BaseException] = []

        def one(slot: int) -> None:
            try:
                histories[slot] = self.trainers[slot].train()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after every thread stopped
                errors.append(e)
                for gather in self.gathers.values():
                    gather.break_(e)

        threads = [threading.Thread(target=one, args=(slot,), name=f"seed-{slot}") for slot in range(len(self.trainers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return histories

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.close()
