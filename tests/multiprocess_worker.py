"""One process of a multi-process PPO run on this machine (driven by tests/test_multiprocess.py).

  python tests/multiprocess_worker.py --workdir W --sft_dir S --out OUT.npz --processes 2 --process_id 0 \
      --port 12355 --devices 4 [--iterations 2] [--resume] [--kill_after 1]

`--processes 1 --devices 8` is the single-process reference (8 fake devices). Every process uses CPU
collectives (gloo) over a loopback coordinator; the run's envs are split into 2 groups
(`env_partitions=2`) in both cases. Process 0 writes the final parameters and metrics to OUT.npz.
`--kill_after N` ends the process abruptly (os._exit, no cleanup) once checkpoint N is committed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--sft_dir", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=12355)
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--iterations", type=int, default=2)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--kill_after", type=int, default=0)
parser.add_argument("--compile_cache", default=None, help="a persistent compilation cache shared by the runs")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if args.compile_cache:  # the runs of one test compile the same programs: compile them once
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)

import numpy as np  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from coso_jax.rl.config import ppo_preset  # noqa: E402
from coso_jax.rl.ppo.trainer import PPOTrainer  # noqa: E402

absl_logging.set_verbosity(absl_logging.WARNING)

STEPS = 16  # env steps per update: 8 envs x 2 steps
config = ppo_preset(
    "tiny_cpu", env="NumberLine", algo="coso", mesh="data:8", env_partitions=2, num_envs=8,
    steps_per_update=STEPS, minibatch_size=8, ppo_epochs=1, total_env_steps=STEPS * args.iterations,
    sft_episodes=8, sft_epochs=1, sft_batch_size=8, sft_lr=3e-3, causal_pretrain_steps=2, causal_batch=64,
    causal_minibatch=64, max_new_tokens=48, checkpoint_every=1, heatmap_every=100, progress=False,
    sft_dir=args.sft_dir)

trainer = PPOTrainer(config, args.workdir, resume=args.resume)
if args.kill_after:
    real_save = trainer.run.save

    def save_then_die(step, items, metadata):
        real_save(step, items, metadata)
        if step == args.kill_after:
            trainer.run.checkpointer.wait()
            os._exit(0)  # killed: no close, no flush

    trainer.run.save = save_then_die
history = trainer.train()
# Parameters are replicated over the mesh (no fsdp axis): any local shard holds the whole array.
params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(trainer.params)]
classifier = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.causal.params))]
if jax.process_index() == 0:
    records = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]
    np.savez(args.out, *params, classifier=np.concatenate([c.reshape(-1) for c in classifier]),
             history=json.dumps(records), env_steps=trainer.config.num_envs * trainer.rollout.total_env_steps
             // trainer.local_envs)
trainer.close()
