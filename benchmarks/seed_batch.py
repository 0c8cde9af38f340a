"""Seed batching: S seeds' sampler and PPO update as one vmapped program vs S sequential calls.

    python -m benchmarks.seed_batch [--seeds 2,4] [--repeats 3] [--set name=value ...] [--out DIR]

Builds one tiny_cpu PPO trainer (NumberLine, its cached SFT start), runs one iteration to get a real
rollout batch, then times, for each S: the sampler (one rollout step: num_envs prompts) and the PPO
update (one rollout batch) called S times in a row vs once on parameters stacked over S seeds
(`coso_jax.rl.ppo.seed_batch`). Compile time is reported apart from steady state; the ratio
sequential / batched > 1 means batching pays. Writes benchmarks/results/seed_batch_<platform>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks._common import block, time_fn, write_results
from coso_jax.rl.config import PPOConfig, parse_overrides, ppo_preset
from coso_jax.rl.ppo.seed_batch import batched_sample, batched_update
from coso_jax.rl.ppo.trainer import PPOTrainer, sample_step
from coso_jax.rl.ppo.update import BATCH_FIELDS, update_step
from coso_jax.rl.run import exit_on_user_error, iteration_key


def _stack(tree, n):
    return jax.tree.map(lambda x: jnp.stack([x] * n), tree)


def measure(trainer: PPOTrainer, seeds: int, repeats: int) -> dict:
    inputs = trainer.rollout.current_inputs()
    batch = {k: jnp.asarray(trainer.last_batch[k]) for k in BATCH_FIELDS if k in trainer.last_batch}
    keys = jax.random.split(jax.random.key(0), seeds)
    alpha = jnp.float32(trainer.causal.alpha)
    g, st, hp, opt = trainer.graphdef, trainer.sample_settings, trainer.hp, trainer.opt
    params, opt_state, frozen = trainer.params, trainer.opt_state, trainer.frozen

    def seq_sample():
        return [sample_step(g, st, params, frozen, inputs, k) for k in keys]

    s_params, s_inputs, s_opt, s_batch = _stack(params, seeds), _stack(inputs, seeds), _stack(opt_state, seeds), \
        _stack(batch, seeds)

    def bat_sample():
        return batched_sample(g, st, s_params, frozen, s_inputs, keys)

    def seq_update():
        # Fresh copies each call: update_step donates its params and optimizer state.
        return [update_step(g, hp, opt, trainer.mesh, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state),
                            batch, k, alpha, frozen) for k in keys]

    def bat_update():
        return batched_update(g, hp, opt, s_params, s_opt, s_batch, keys, jnp.full(seeds, alpha), frozen)

    out = {}
    for name, seq, bat in (("sample", seq_sample, bat_sample), ("update", seq_update, bat_update)):
        t_seq = time_fn(lambda: block(seq()), repeats=repeats)
        t_bat = time_fn(lambda: block(bat()), repeats=repeats)
        out[name] = {"sequential": t_seq.as_dict(), "batched": t_bat.as_dict(),
                     "ratio_sequential_over_batched": t_seq.median_s / t_bat.median_s}
        print(f"S={seeds} {name}: sequential {t_seq.median_s:.3f} s, batched {t_bat.median_s:.3f} s "
              f"-> {out[name]['ratio_sequential_over_batched']:.2f}x (compile {t_seq.compile_s:.1f} / "
              f"{t_bat.compile_s:.1f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=None)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()

    def run() -> None:
        config = ppo_preset("tiny_cpu", env="NumberLine", progress=False, **parse_overrides(args.set, PPOConfig))
        if config.sft.dir is None:  # the same cache as `make demo` and a default run under runs/
            config = config.replace(sft_dir=str(config.start_dir(Path("runs") / "bench")))
        load = [os.getloadavg()[0]]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = PPOTrainer(config, Path(tmp) / "run")
            try:
                trainer.run_iteration(iteration_key(trainer.run_key, 0))
                results = {str(s): measure(trainer, s, args.repeats) for s in (int(x) for x in args.seeds.split(","))}
            finally:
                trainer.close()
        load.append(os.getloadavg()[0])
        platform = jax.devices()[0].platform
        write_results(f"seed_batch_{platform}", {
            "shapes": {"num_envs": config.num_envs, "steps_per_update": config.steps_per_update,
                       "max_new_tokens": config.model.max_new_tokens, "prompt_len": int(trainer.encoder.prompt_len)},
            "dtype": config.model.compute_dtype, "load_average_1min": {"start": load[0], "end": load[1]},
            "results": results}, args.out)

    exit_on_user_error(run, debug=args.debug)


if __name__ == "__main__":
    main()
