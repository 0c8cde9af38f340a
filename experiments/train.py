r"""Online RL tuning of a VLM agent with CoSo (or the entropy / none baselines).

  python -m experiments.train --env=NumberLine --algo=coso --preset=tiny_cpu \
      --workdir=runs/numberline_coso --seed=0

Writes under --workdir: metrics.jsonl, tb/ (TensorBoard), success_rate.png, heatmap_*.png (coso),
checkpoints/ (resume with --resume) and config.json. The SFT start is cached in --sft_dir
(default: <workdir>/../sft/<env>-<preset>-<hash>) and shared by every algo and seed.

Multi-host: set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID on each host
and launch the same command everywhere; --mesh then spans all hosts' devices.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from coso_jax.rl.config import ALGOS, GYM_CARDS_ENVS, PRESETS, parse_mesh, preset

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", "NumberLine", list(GYM_CARDS_ENVS), "gym_cards game to train on.")
flags.DEFINE_enum("algo", "coso", list(ALGOS), "none: PPO; entropy: PPO - alpha*H; coso: PPO - alpha*H_causal.")
flags.DEFINE_enum("preset", "tiny_cpu", list(PRESETS), "Hyper-parameter preset.")
flags.DEFINE_string("workdir", None, "Run directory (metrics, plots, checkpoints).", required=True)
flags.DEFINE_integer("seed", 0, "Run seed (envs, sampling, update order).")
flags.DEFINE_float("alpha", None, "Entropy coefficient (default: the preset's).")
flags.DEFINE_integer("total_env_steps", None, "Environment steps to train for (default: the preset's).")
flags.DEFINE_integer("steps_per_update", None, "Env steps per PPO update (default: the preset's).")
flags.DEFINE_integer("num_envs", None, "Environments stepped together (default: the preset's).")
flags.DEFINE_string("mesh", "data:1", "Device mesh, e.g. data:8 or data:2,fsdp:4.")
flags.DEFINE_string("hf_dir", None, "Local Hugging Face LLaVA directory to start from (config.json + safetensors + tokenizer).")
flags.DEFINE_string("sft_dir", None, "Where the shared SFT start is cached.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_multi_string("set", [], "Any other TrainConfig field, as name=value (repeatable).")

flags.register_validator("alpha", lambda v: v is None or v >= 0, message="--alpha must be >= 0")
flags.register_validator("seed", lambda v: v >= 0, message="--seed must be >= 0")


def _mesh_ok(spec: str) -> bool:
    try:
        parse_mesh(spec)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from e
    return True


flags.register_validator("mesh", _mesh_ok)


def config_from_flags():
    overrides = {"env": FLAGS.env, "algo": FLAGS.algo, "seed": FLAGS.seed, "mesh": FLAGS.mesh,
                 "progress": FLAGS.progress}
    for name in ("alpha", "total_env_steps", "steps_per_update", "num_envs", "hf_dir", "sft_dir"):
        value = getattr(FLAGS, name)
        if value is not None:
            overrides[name] = value
    from coso_jax.rl.config import TrainConfig
    fields = TrainConfig.__dataclass_fields__
    for item in FLAGS.set:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise app.UsageError(f"--set {item!r}: expected name=value with name one of TrainConfig's fields")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    try:
        return preset(FLAGS.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise app.UsageError(str(e)) from e


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO through absl; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    from coso_jax.rl.train_state import maybe_initialize_distributed
    from coso_jax.rl.trainer import Trainer

    maybe_initialize_distributed()
    config = config_from_flags()
    trainer = Trainer(config, FLAGS.workdir, resume=FLAGS.resume)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(f"SFT start success (first iteration): {history[0]['iteration_success_rate']:.3f}; "
              f"final windowed success: {last['success_rate']:.3f} after {last['env_steps']} env steps")
    print(f"metrics: {FLAGS.workdir}/metrics.jsonl; plots: {FLAGS.workdir}/success_rate.png")


if __name__ == "__main__":
    app.run(main)
