r"""Online RL tuning of a VLM agent with CoSo (or the entropy / none baselines).

  python -m experiments.train --env=NumberLine --algo=coso --preset=tiny_cpu \
      --workdir=runs/numberline_coso --seed=0
  python -m experiments.train --env=web/general --backbone=digirl --algo=coso --preset=tiny_cpu \
      --workdir=runs/web_general_coso          # DigiRL off2on on MiniWoB++ in a headless Chromium

--backbone=ppo (default, RL4VLM) trains on the gym_cards games and ALFWorld; --backbone=digirl
(DigiRL's filtered policy gradient with step and trajectory critics, coso_jax/rl/digirl/) on the web
suites web/general and web/shopping. --set name=value overrides any field of the backbone's config
(flat names such as causal_lr, or dotted ones such as causal.lr; see coso_jax/rl/config.py).

Writes under --workdir: metrics.jsonl, tb/ (TensorBoard), success_rate.png, heatmap_*.png (coso),
checkpoints/ (resume with --resume; an older one with --resume_step=N) and config.json. The warm start
is cached in --sft_dir (default: <workdir>/../sft/<env>-<preset>-<hash>) and shared by every algo and
seed. A mistake in a flag, a file or a checkpoint prints one line naming it and the fix (--debug, or
COSO_DEBUG=1, shows the traceback) and leaves no new file behind.

Multi-host: set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID on each host
and launch the same command everywhere; --mesh then spans all hosts' devices.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging

from coso_jax.rl.config import (
    ALGOS,
    BACKBONES,
    PPO_ENVS,
    PRESETS,
    WEB_ENVS,
    ConfigError,
    DigiRLConfig,
    PPOConfig,
    digirl_preset,
    parse_mesh,
    parse_overrides,
    ppo_preset,
)
from coso_jax.rl.run import exit_on_user_error

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", "NumberLine", list(PPO_ENVS) + list(WEB_ENVS),
                  "gym_cards game or ALFWorld (--backbone=ppo), or web task suite (--backbone=digirl).")
flags.DEFINE_enum("backbone", "ppo", list(BACKBONES),
                  "ppo: RL4VLM PPO (gym_cards, ALFWorld); digirl: DigiRL filtered PG + critics, off2on (web suites).")
flags.DEFINE_enum("algo", "coso", list(ALGOS), "none: the backbone alone; entropy: - alpha*H; coso: - alpha*H_causal.")
flags.DEFINE_enum("preset", "tiny_cpu", list(PRESETS), "Hyper-parameter preset.")
flags.DEFINE_string("workdir", None, "Run directory (metrics, plots, checkpoints).", required=True)
flags.DEFINE_integer("seed", 0, "Run seed (envs, sampling, update order).")
flags.DEFINE_float("alpha", None, "Entropy coefficient (default: the preset's).")
flags.DEFINE_integer("total_env_steps", None, "Environment steps to train for (default: the preset's).")
flags.DEFINE_integer("steps_per_update", None, "Env steps per PPO update (default: the preset's).")
flags.DEFINE_integer("num_envs", None, "Environments stepped together (default: the preset's).")
flags.DEFINE_string("mesh", "data:1", "Device mesh, e.g. data:8 or data:2,fsdp:4.")
flags.DEFINE_string("hf_dir", None, "Local Hugging Face LLaVA directory to start from (config.json + safetensors + tokenizer).")
flags.DEFINE_string("sft_dir", None, "Where the shared warm start is cached.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_integer("resume_step", None, "With --resume: continue from this (older) checkpoint step instead; "
                     "newer checkpoints are moved to checkpoints_discarded/.")
flags.DEFINE_integer("seed_batch", 1, "PPO: train seeds seed .. seed+N-1 as one program (stacked parameters; "
                     "one work directory per seed under --workdir: seed_<k>/). Pays on an accelerator.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_multi_string("set", [], "Any other config field, as name=value (repeatable).")
flags.DEFINE_bool("debug", False, "Show tracebacks of errors (also COSO_DEBUG=1).")

flags.register_validator("alpha", lambda v: v is None or v >= 0, message="--alpha must be >= 0")
flags.register_validator("seed", lambda v: v >= 0, message="--seed must be >= 0")
flags.register_validator("resume_step", lambda v: v is None or v >= 0, message="--resume_step must be >= 0")
flags.register_validator("seed_batch", lambda v: v >= 1, message="--seed_batch must be >= 1")


def _mesh_ok(spec: str) -> bool:
    try:
        parse_mesh(spec)
    except ConfigError as e:
        raise flags.ValidationError(str(e)) from e
    return True


flags.register_validator("mesh", _mesh_ok)


def _combo_ok(values) -> bool:
    env, backbone = values["env"], values["backbone"]
    if backbone == "ppo" and env in WEB_ENVS:
        raise flags.ValidationError(f"--env={env} needs --backbone=digirl (the PPO backbone trains on the "
                                    f"envs {', '.join(PPO_ENVS)})")
    if backbone == "digirl" and env not in WEB_ENVS:
        raise flags.ValidationError(f"--backbone=digirl trains on the web suites {', '.join(WEB_ENVS)}, "
                                    f"not --env={env} (use --backbone=ppo for {', '.join(PPO_ENVS)})")
    if backbone == "digirl":
        for name in ("total_env_steps", "steps_per_update"):
            if values[name] is not None:
                raise flags.ValidationError(f"--{name} is a PPO setting; DigiRL counts iterations: use "
                                            "--set online_iterations=N / --set trajectories_per_iteration=N")
        if values["mesh"] != "data:1":
            raise flags.ValidationError("--backbone=digirl runs on one device; leave --mesh at data:1")
    if values["resume_step"] is not None and not values["resume"]:
        raise flags.ValidationError("--resume_step needs --resume")
    if values["seed_batch"] > 1 and (backbone != "ppo" or values["resume_step"] is not None):
        raise flags.ValidationError("--seed_batch runs the PPO backbone, and resumes from each seed's latest "
                                    "checkpoint (no --resume_step)")
    return True


flags.register_multi_flags_validator(
    ["env", "backbone", "total_env_steps", "steps_per_update", "mesh", "resume", "resume_step", "seed_batch"],
    _combo_ok)


def config_from_flags() -> PPOConfig | DigiRLConfig:
    """The backbone's config from the flags; ConfigError naming the bad flag or `--set` item."""
    overrides = {"env": FLAGS.env, "algo": FLAGS.algo, "seed": FLAGS.seed, "progress": FLAGS.progress}
    names = ("alpha", "num_envs", "hf_dir", "sft_dir")
    if FLAGS.backbone == "ppo":
        overrides["mesh"] = FLAGS.mesh
        names += ("total_env_steps", "steps_per_update")
    for name in names:
        value = getattr(FLAGS, name)
        if value is not None:
            overrides[name] = value
    cls, make = (PPOConfig, ppo_preset) if FLAGS.backbone == "ppo" else (DigiRLConfig, digirl_preset)
    overrides.update(parse_overrides(FLAGS.set, cls))
    return make(FLAGS.preset, **overrides)


def _first_iteration_success(workdir: str) -> float | None:
    """The first iteration's success rate (the SFT start's own rollout), read from metrics.jsonl so a
    resumed run reports it too."""
    from coso_jax import metrics as metrics_lib

    records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.JSONL_NAME))
    first = [r for r in records if r.get("step") == 1]
    return first[0].get("iteration_success_rate") if first else None


def run() -> None:
    from coso_jax.rl import make_trainer
    from coso_jax.rl.sharding import maybe_initialize_distributed

    config = config_from_flags()
    if FLAGS.seed_batch > 1:
        run_seed_batch(config)
        return
    if config.backbone == "ppo":
        maybe_initialize_distributed()
    trainer = make_trainer(config, FLAGS.workdir, resume=FLAGS.resume, resume_step=FLAGS.resume_step)
    try:
        history = trainer.train()
        result = trainer.evaluate()
    finally:
        trainer.close()
    (trainer.workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if config.backbone == "ppo":
        first = _first_iteration_success(FLAGS.workdir)
        if history:
            shown = "n/a" if first is None else f"{first:.3f}"
            print(f"first-iteration success (the SFT start's rollout): {shown}; final windowed success: "
                  f"{history[-1]['success_rate']:.3f} after {trainer.rollout.total_env_steps} env steps")
    else:
        online = [r for r in history if r.get("stage") == "online"]
        if online:
            print(f"online success (last {config.run.success_window} trajectories): {online[-1]['success_rate']:.3f} "
                  f"after {len(online)} online iterations")
    print(f"evaluation: success {result['success_rate']:.3f} over {result['episodes']} episodes "
          f"({FLAGS.workdir}/eval.json)")
    print(f"metrics: {FLAGS.workdir}/metrics.jsonl; plots: {FLAGS.workdir}/success_rate.png")


def run_seed_batch(config) -> None:
    from coso_jax.rl.ppo.seed_batch import SeedBatch

    configs = [config.replace(seed=config.run.seed + k) for k in range(FLAGS.seed_batch)]
    batch = SeedBatch(configs, FLAGS.workdir, resume=FLAGS.resume)
    try:
        histories = batch.train()
        results = [trainer.evaluate() for trainer in batch.trainers]
    finally:
        batch.close()
    for trainer, history, result in zip(batch.trainers, histories, results):
        (trainer.workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        final = f"{history[-1]['success_rate']:.3f}" if history else "n/a"
        print(f"seed {trainer.config.run.seed}: final windowed success {final}; evaluation {result['success_rate']:.3f} "
              f"over {result['episodes']} episodes ({trainer.workdir})")


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO through absl; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    exit_on_user_error(run, debug=FLAGS.debug)


if __name__ == "__main__":
    app.run(main)
