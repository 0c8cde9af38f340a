r"""`make demo`: the main job on a CPU, end to end, in minutes.

Builds the offline tokenizer, warm-starts a tiny LLaVA with SFT on NumberLine oracle
demonstrations (cached under runs/sft/), then tunes it online with CoSo (PPO + counterfactual
soft RL), with a progress bar. Prints the SFT and final success rates (each measured on fresh
evaluation envs) and where the metrics, the success-rate plot and the token-weight heatmaps are.
Re-running continues from the last checkpoint.

  python -m experiments.demo [--algo=coso] [--workdir=runs/demo] [--total_env_steps=...]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

from coso_jax.rl.config import ALGOS, ppo_preset
from coso_jax.rl.run import exit_on_user_error

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where metrics, plots and checkpoints go.")
flags.DEFINE_enum("algo", "coso", list(ALGOS), "none | entropy | coso.")
flags.DEFINE_integer("total_env_steps", None, "Online env steps (default: the tiny_cpu preset's).")
flags.DEFINE_integer("seed", 0, "Run seed.")
flags.DEFINE_integer("eval_steps", 512, "Env steps of each evaluation (SFT start and final policy).")


def main(argv):
    del argv
    # Orbax logs every checkpoint step at INFO through absl; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    exit_on_user_error(demo)


def demo() -> None:
    from coso_jax.rl.ppo.trainer import PPOTrainer

    overrides = {"env": "NumberLine", "algo": FLAGS.algo, "seed": FLAGS.seed}
    if FLAGS.total_env_steps:
        overrides["total_env_steps"] = FLAGS.total_env_steps
    config = ppo_preset("tiny_cpu", **overrides)
    workdir = Path(FLAGS.workdir)
    resume = (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir())
    start = time.perf_counter()
    trainer = PPOTrainer(config, workdir, resume=resume)
    summary_path = workdir / "demo_summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
        if "sft_eval" not in summary:
            print("evaluating the SFT start ...")
            summary["sft_eval"] = trainer.evaluate(FLAGS.eval_steps)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        trainer.train()
        print("evaluating the final policy ...")
        summary["final_eval"] = trainer.evaluate(FLAGS.eval_steps)
        summary["env_steps"] = trainer.rollout.total_env_steps
        summary["config"] = config.to_flat_dict()
    finally:
        trainer.close()
    summary["wall_seconds_this_invocation"] = time.perf_counter() - start
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    sft, final = summary["sft_eval"], summary["final_eval"]
    print(f"\nNumberLine, algo={config.algo}, {summary['env_steps']} online env steps")
    print(f"  SFT start : success {sft['success_rate']:.3f} over {sft['episodes']} episodes "
          f"(invalid actions {sft['invalid_action_rate']:.3f})")
    print(f"  after RL  : success {final['success_rate']:.3f} over {final['episodes']} episodes "
          f"(invalid actions {final['invalid_action_rate']:.3f})")
    print(f"metrics:   {workdir / 'metrics.jsonl'} (TensorBoard: {workdir / 'tb'})")
    print(f"plot:      {workdir / 'success_rate.png'}")
    if config.algo == "coso":
        heatmaps = sorted(workdir.glob("heatmap_*.png"))
        if heatmaps:
            print(f"heatmap:   {heatmaps[-1]}")
    print(f"summary:   {summary_path}")


if __name__ == "__main__":
    app.run(main)
