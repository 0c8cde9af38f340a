"""Can the soft-RL term move the policy? Per-iteration diagnostics of a run (issue #20, item 1).

    python -m benchmarks.soft_rl_diagnostics --algo=coso --alpha=0.01 [--env=NumberLine]
        [--iterations=16] [--set name=value ...] [--sft_dir DIR] [--out DIR] [--name NAME]

Runs an ordinary PPO run (the `tiny_cpu` preset unless --set overrides it) and after every iteration
measures, on that iteration's rollout batch and the updated policy:

  grad_ratio        ||grad(alpha * mean H_B)|| / ||grad(PPO policy loss)|| over the trainable parameters
                    (H_B with the run's weights: naive for entropy; causal for coso; for none the naive
                    entropy at the given alpha, i.e. what an entropy bonus *would* weigh)
  entropy_w_high    mean token entropy (nats, sampling temperature) of tokens with causal weight > 0.5
  entropy_w_low     ... with causal weight < 0.2
  token_entropy     mean token entropy of all generated tokens
  frac_w_above_0.8 / frac_w_below_0.2
                    fractions of (valid, generated) tokens by causal weight (the paper reports < 10% above
                    0.8 and > 80% below 0.2)
  classifier_accuracy
                    the classifier of the previous iteration on this iteration's valid actions (fresh:
                    before it trained on them)
  invalid_action_rate, success_rate (windowed), iteration_success_rate

Causal weights come from the run's own classifier for coso and, for none / entropy, from a shadow
CoSo term (the same pre-trained classifier, trained online on the same rollouts, never used by the
run). Writes benchmarks/results/soft_rl_diagnostics_<name>.json and a PNG of the curves.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks._common import write_results
from coso_jax import losses, sampling
from coso_jax.causal import classifier as clf
from coso_jax.rl.causal_term import CausalTerm
from coso_jax.rl.config import PPOConfig, parse_overrides, ppo_preset
from coso_jax.rl.ppo.trainer import PPOTrainer
from coso_jax.rl.run import exit_on_user_error, iteration_key

RESULTS = Path(__file__).resolve().parent / "results"


def gradient_norms(trainer: PPOTrainer, batch: dict[str, np.ndarray], alpha: float, weights: np.ndarray
                   ) -> dict[str, float]:
    """Norms of the gradients of the PPO policy loss and of alpha * mean H_B (same batch, same params)."""
    hp = trainer.hp
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def parts(params):
        model = nnx.merge(trainer.graphdef, params, trainer.frozen)
        out = sampling.score_batch_fn(model.policy, model.value_head, batch, temperature=hp.temperature)
        mask = batch["response_mask"]
        new = losses.sequence_logprob(out.logprobs, mask, batch["thought_mask"], hp.thought_coef)
        old = losses.sequence_logprob(batch["old_logprobs"], mask, batch["thought_mask"], hp.thought_coef)
        pg = losses.ppo_policy_loss(new, old, batch["advantages"], hp.clip_eps)
        bonus = alpha * jnp.mean(losses.weighted_entropy(out.entropies, jnp.asarray(weights), mask))
        return pg, bonus, out.entropies

    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), trainer.params)
    g_pg = jax.grad(lambda p: parts(p)[0])(params)
    g_bonus = jax.grad(lambda p: parts(p)[1])(params)
    entropies = np.asarray(parts(params)[2])
    pg_norm, bonus_norm = float(optax.tree.norm(g_pg)), float(optax.tree.norm(g_bonus))
    return {"grad_norm_pg": pg_norm, "grad_norm_bonus": bonus_norm,
            "grad_ratio": bonus_norm / pg_norm if pg_norm > 0 else float("nan"), "_entropies": entropies}


def diagnose(config: PPOConfig, workdir: Path, iterations: int, diag_alpha: float) -> list[dict[str, Any]]:
    trainer = PPOTrainer(config, workdir)
    shadow = None
    if not trainer.causal.uses_classifier:  # weights for the diagnostics only
        start_classifier = trainer.causal.classifier
        shadow = CausalTerm("coso", config.causal, start_classifier, trainer.tokenizer, config.model.max_new_tokens,
                            seed=config.run.seed, demonstrations=_demonstrations(trainer))
    term = trainer.causal if shadow is None else shadow
    rows = []
    try:
        for it in range(iterations):
            previous = jax.tree.map(np.asarray, jax.device_get(term.params))
            out = trainer.run_iteration(iteration_key(trainer.run_key, trainer.iteration))
            batch = trainer.last_batch
            ids, mask, labels, valid = (batch["response_ids"], batch["response_mask"], batch["labels"], batch["valid"])
            if shadow is not None:
                shadow.observe(ids, mask, labels, valid)
                shadow.update_classifier(jax.random.fold_in(jax.random.key(config.run.seed + 1), it))
            weights = term.weights(ids, mask, labels, valid)
            ok = valid & (labels >= 0)
            logits = clf.ClassifierLogitsFn(term.graphdef, previous)(jnp.asarray(ids[ok]), jnp.asarray(mask[ok]))
            accuracy = float(np.mean(np.asarray(logits).argmax(-1) == labels[ok])) if ok.any() else float("nan")
            alpha = config.causal.alpha if config.algo != "none" else diag_alpha
            run_weights = batch["entropy_weights"] if config.algo != "none" else mask.astype(np.float32)
            fields = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "pixel_values", "image_sizes", "response_ids",
                                            "response_mask", "thought_mask", "old_logprobs", "advantages") if k in batch}
            grads = gradient_norms(trainer, fields, alpha, run_weights)
            entropies = grads.pop("_entropies")
            scored = mask & valid[:, None]
            high, low = scored & (weights > 0.5), scored & (weights < 0.2)
            rows.append({
                "iteration": it + 1,
                **grads,
                "token_entropy": float(entropies[mask].mean()),
                "entropy_w_high": float(entropies[high].mean()) if high.any() else float("nan"),
                "entropy_w_low": float(entropies[low].mean()) if low.any() else float("nan"),
                "frac_w_above_0.8": float((weights[scored] > 0.8).mean()) if scored.any() else float("nan"),
                "frac_w_below_0.2": float((weights[scored] < 0.2).mean()) if scored.any() else float("nan"),
                "classifier_accuracy": accuracy,
                "invalid_action_rate": out.record["invalid_action_rate"],
                "success_rate": out.record["success_rate"],
                "iteration_success_rate": out.record["iteration_success_rate"],
            })
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    finally:
        trainer.close()
    return rows


def _demonstrations(trainer: PPOTrainer):
    from coso_jax.rl.ppo import start as start_lib

    start = start_lib.load_or_build(trainer.config, start_lib.start_cache(trainer.config, trainer.workdir))
    return start.demo_tokens, start.demo_mask, start.demo_labels


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=110)
    axes = fig.subplots(2, 2).ravel()
    x = [r["iteration"] for r in rows]
    panels = [("grad_ratio", "||grad alpha H_B|| / ||grad PG||", True),
              (("token_entropy", "entropy_w_high", "entropy_w_low"), "token entropy (nats)", True),
              (("frac_w_above_0.8", "frac_w_below_0.2", "classifier_accuracy"), "fraction", False),
              (("success_rate", "invalid_action_rate"), "rate", False)]
    for ax, (keys, ylabel, log) in zip(axes, panels):
        for k in (keys,) if isinstance(keys, str) else keys:
            ax.plot(x, [r[k] for r in rows], marker="o", markersize=3, label=k)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="NumberLine")
    parser.add_argument("--algo", default="coso", choices=("none", "entropy", "coso"))
    parser.add_argument("--alpha", type=float, default=None, help="the run's alpha (default: the preset's)")
    parser.add_argument("--diag_alpha", type=float, default=0.01, help="alpha of the gradient ratio for algo=none")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="name=value config overrides")
    parser.add_argument("--sft_dir", default=None)
    parser.add_argument("--name", default=None, help="results name (default: <env>_<algo>_<alpha>)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()

    def run() -> None:
        overrides = {"env": args.env, "algo": args.algo, "seed": args.seed, "progress": False,
                     **parse_overrides(args.set, PPOConfig)}
        if args.alpha is not None:
            overrides["alpha"] = args.alpha
        if args.sft_dir:
            overrides["sft_dir"] = args.sft_dir
        config = ppo_preset("tiny_cpu", **overrides)
        config = config.replace(total_env_steps=max(config.total_env_steps, args.iterations * config.steps_per_update))
        name = args.name or f"{args.env}_{args.algo}_{config.causal.alpha:g}"
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp) / "run"
            if not args.sft_dir:
                # The same cache as a default run under runs/ (and `make demo` for NumberLine).
                config = config.replace(sft_dir=str(config.start_dir(Path("runs") / "diag")))
            rows = diagnose(config, workdir, args.iterations, args.diag_alpha)
        out = Path(args.out)
        payload = {"name": name, "config": config.to_flat_dict(), "iterations": rows,
                   "summary": {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k != "iteration"}}
        path = write_results(f"soft_rl_diagnostics_{name}", payload, out)
        plot(rows, out / f"soft_rl_diagnostics_{name}.png", f"{args.env} / {args.algo}, alpha {config.causal.alpha:g}")
        print(f"wrote {path}")

    exit_on_user_error(run, debug=args.debug)


if __name__ == "__main__":
    main()
