r"""Online RL tuning of a VLM agent with CoSo (or the entropy / none baselines).

  python -m experiments.train --env=NumberLine --algo=coso --preset=tiny_cpu \
      --workdir=runs/numberline_coso --seed=0
  python -m experiments.train --env=web/general --backbone=digirl --algo=coso --preset=tiny_cpu \
      --workdir=runs/web_general_coso          # DigiRL off2on on MiniWoB++ in a headless Chromium

--backbone=ppo (default, RL4VLM) trains on the gym_cards games; --backbone=digirl (DigiRL's filtered
policy gradient with step and trajectory critics, coso_jax/rl/digirl.py) on the web suites
web/general and web/shopping. --set name=value overrides any field of the backbone's config
(TrainConfig or DigiRLConfig).

Writes under --workdir: metrics.jsonl, tb/ (TensorBoard), success_rate.png, heatmap_*.png (coso),
checkpoints/ (resume with --resume) and config.json. The SFT start is cached in --sft_dir
(default: <workdir>/../sft/<env>-<preset>-<hash>) and shared by every algo and seed.

Multi-host: set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID on each host
and launch the same command everywhere; --mesh then spans all hosts' devices.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from coso_jax.rl.config import ALGOS, PRESETS, SUPPORTED_ENVS, parse_mesh, parse_overrides, preset

WEB_ENVS = ("web/general", "web/shopping")  # coso_jax.rl.digirl.WEB_ENVS (not imported: it pulls in jax)
BACKBONES = ("ppo", "digirl")

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", "NumberLine", list(SUPPORTED_ENVS) + list(WEB_ENVS),
                  "gym_cards game or ALFWorld (--backbone=ppo), or web task suite (--backbone=digirl).")
flags.DEFINE_enum("backbone", "ppo", list(BACKBONES),
                  "ppo: RL4VLM PPO (gym_cards); digirl: DigiRL filtered PG + critics, off2on (web suites).")
flags.DEFINE_enum("algo", "coso", list(ALGOS),
                  "none: the backbone alone; entropy: - alpha*H; coso: - alpha*H_causal.")
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


def _combo_ok(values) -> bool:
    env, backbone = values["env"], values["backbone"]
    if backbone == "ppo" and env in WEB_ENVS:
        raise flags.ValidationError(f"--env={env} needs --backbone=digirl (the PPO backbone trains on the "
                                    f"envs {', '.join(SUPPORTED_ENVS)})")
    if backbone == "digirl" and env not in WEB_ENVS:
        raise flags.ValidationError(f"--backbone=digirl trains on the web suites {', '.join(WEB_ENVS)}, "
                                    f"not --env={env} (use --backbone=ppo for {', '.join(SUPPORTED_ENVS)})")
    if backbone == "digirl":
        for name in ("total_env_steps", "steps_per_update"):
            if values[name] is not None:
                raise flags.ValidationError(f"--{name} is a PPO setting; DigiRL counts iterations: use "
                                            "--set online_iterations=N / --set trajectories_per_iteration=N")
        if values["mesh"] != "data:1":
            raise flags.ValidationError("--backbone=digirl runs on one device; leave --mesh at data:1")
    return True


flags.register_multi_flags_validator(["env", "backbone", "total_env_steps", "steps_per_update", "mesh"], _combo_ok)


def _parse_sets(fields) -> dict:
    try:
        return parse_overrides(FLAGS.set, fields)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def digirl_config_from_flags():
    from coso_jax.rl.digirl import DigiRLConfig, digirl_preset

    overrides = {"env": FLAGS.env, "algo": FLAGS.algo, "seed": FLAGS.seed, "progress": FLAGS.progress}
    for name in ("alpha", "num_envs", "hf_dir", "sft_dir"):
        value = getattr(FLAGS, name)
        if value is not None:
            overrides[name] = value
    overrides.update(_parse_sets(DigiRLConfig.__dataclass_fields__))
    try:
        return digirl_preset(FLAGS.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise app.UsageError(str(e)) from e


def config_from_flags():
    overrides = {"env": FLAGS.env, "algo": FLAGS.algo, "seed": FLAGS.seed, "mesh": FLAGS.mesh,
                 "progress": FLAGS.progress}
    for name in ("alpha", "total_env_steps", "steps_per_update", "num_envs", "hf_dir", "sft_dir"):
        value = getattr(FLAGS, name)
        if value is not None:
            overrides[name] = value
    from coso_jax.rl.config import TrainConfig
    overrides.update(_parse_sets(TrainConfig.__dataclass_fields__))
    try:
        return preset(FLAGS.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise app.UsageError(str(e)) from e


def main_digirl() -> None:
    from coso_jax.rl.digirl import DigiRLTrainer

    config = digirl_config_from_flags()
    trainer = DigiRLTrainer(config, FLAGS.workdir, resume=FLAGS.resume)
    try:
        history = trainer.train()
        result = trainer.evaluate()
    finally:
        trainer.close()
    (trainer.workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    online = [r for r in history if r.get("stage") == "online"]
    if online:
        print(f"online success (last {config.success_window} trajectories): {online[-1]['success_rate']:.3f} "
              f"after {len(online)} online iterations")
    print(f"test success: {result['success_rate']:.3f} over {result['episodes']} episodes "
          f"({FLAGS.workdir}/eval.json)")
    print(f"metrics: {FLAGS.workdir}/metrics.jsonl; plots: {FLAGS.workdir}/success_rate.png")


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO through absl; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    if FLAGS.backbone == "digirl":
        main_digirl()
        return
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
