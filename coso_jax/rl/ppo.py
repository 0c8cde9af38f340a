"""The PPO update (RL4VLM backbone) with the soft-RL entropy term of `algo` none | entropy | coso.

One jitted function runs the whole update: `ppo_epochs` passes over the rollout batch, each a
shuffled sequence of minibatches, each minibatch split into `grad_accum_steps` micro-batches whose
gradients are averaged before one optimizer step (lax.scan at every level, so the update compiles
once per batch shape). A minibatch whose loss or gradients are not finite leaves the parameters
and optimizer state unchanged and is counted in the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coso_jax import losses, sampling
from coso_jax.rl.train_state import ActorCritic, tree_all_finite

# Batch fields the update reads (all `[n, ...]`, n = steps_per_update).
BATCH_FIELDS = (
    "prompt_ids", "prompt_mask", "pixel_values", "response_ids", "response_mask", "thought_mask",
    "action_mask", "old_logprobs", "old_values", "advantages", "returns", "causal_weights",
)


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """Static hyper-parameters of the update (hashable: part of the jit cache key)."""

    algo: str = "coso"
    alpha: float = 0.01
    clip_eps: float = 0.1
    value_clip_eps: float = 0.1
    value_coef: float = 0.5
    thought_coef: float = 0.5
    temperature: float = 1.0
    epochs: int = 4
    minibatch_size: int = 32
    grad_accum_steps: int = 1
    remat: bool = False


def entropy_bonus(entropies: jax.Array, mask: jax.Array, causal_weights: jax.Array, algo: str) -> jax.Array:
    """Per-sample soft-RL bonus `[B]`: naive (w = 1), causal (w = CoSo weights) or zero."""
    if algo == "none":
        return jnp.zeros(entropies.shape[0], jnp.float32)
    if algo == "entropy":
        return losses.weighted_entropy(entropies, jnp.ones_like(entropies), mask)
    if algo == "coso":
        return losses.weighted_entropy(entropies, causal_weights, mask)
    raise ValueError(f"unknown algo {algo!r}")


def ppo_loss(model: ActorCritic, batch: dict[str, jax.Array], hp: PPOHyper) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO policy loss + value loss - alpha * entropy bonus, and diagnostics."""
    out = sampling.score_batch_fn(model.policy, model.value_head, batch, temperature=hp.temperature, remat=hp.remat)
    mask = batch["response_mask"]
    new_logp = losses.sequence_logprob(out.logprobs, mask, batch["thought_mask"], hp.thought_coef)
    old_logp = losses.sequence_logprob(batch["old_logprobs"], mask, batch["thought_mask"], hp.thought_coef)
    policy_loss = losses.ppo_policy_loss(new_logp, old_logp, batch["advantages"], hp.clip_eps)
    log_ratio = jax.lax.stop_gradient(new_logp - old_logp)
    value_loss = losses.value_loss(out.values, batch["old_values"], batch["returns"], hp.value_clip_eps)
    bonus = entropy_bonus(out.entropies, mask, batch["causal_weights"], hp.algo)
    loss = policy_loss + hp.value_coef * value_loss - hp.alpha * jnp.mean(bonus)
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy_bonus": jnp.mean(bonus),
        "token_entropy": jnp.mean(losses.weighted_entropy(out.entropies, jnp.ones_like(out.entropies), mask)),
        "causal_entropy": jnp.mean(losses.weighted_entropy(out.entropies, batch["causal_weights"], mask)),
        "approx_kl": jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > hp.clip_eps).astype(jnp.float32)),
    }
    return loss, metrics


def make_optimizer(lr: float, lr_min: float, decay_updates: int, steps_per_update: int, max_grad_norm: float,
                   adam_eps: float) -> optax.GradientTransformation:
    """Adam with cosine annealing per PPO update (RL4VLM: T_max 25 updates) and global-norm clipping."""
    decay_steps = max(decay_updates * steps_per_update, 1)
    schedule = optax.cosine_decay_schedule(lr, decay_steps, alpha=lr_min / lr if lr > 0 else 0.0)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule, eps=adam_eps))


def optimizer_steps_per_update(hp: PPOHyper, batch_size: int) -> int:
    return hp.epochs * (batch_size // hp.minibatch_size)


def make_update_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, hp: PPOHyper):
    """Returns `update(params, opt_state, batch, key) -> (params, opt_state, metrics)` (not jitted).

    `params` is the `nnx.Param` state of an `ActorCritic`; `batch` holds `BATCH_FIELDS` with the
    same leading size n, a multiple of `hp.minibatch_size`. Metrics are means over all minibatches,
    plus `skipped_minibatches` (non-finite loss or gradients).
    """

    def micro_loss(params, micro):
        model = nnx.merge(graphdef, params)
        return ppo_loss(model, micro, hp)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        micro = jax.tree.map(
            lambda x: x.reshape((hp.grad_accum_steps, x.shape[0] // hp.grad_accum_steps) + x.shape[1:]), minibatch
        )

        def accumulate(acc, m):
            (loss, aux), grads = grad_fn(params, m)
            return jax.tree.map(jnp.add, acc, (grads, aux)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], micro)
        aux_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: micro_loss(params, first)[1]))
        (grads, aux), _ = jax.lax.scan(accumulate, (zeros, aux_zeros), micro)
        grads = jax.tree.map(lambda g: g / hp.grad_accum_steps, grads)
        aux = jax.tree.map(lambda a: a / hp.grad_accum_steps, aux)
        finite = tree_all_finite(grads) & jnp.isfinite(aux["loss"])
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep(new_params, params)
        opt_state = keep(new_opt_state, opt_state)
        aux = dict(aux, grad_norm=optax.tree.norm(grads), skipped_minibatches=(~finite).astype(jnp.float32))
        return (params, opt_state), aux

    def update(params, opt_state, batch, key):
        n = batch["response_ids"].shape[0]
        num_minibatches = n // hp.minibatch_size

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, n)
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape((num_minibatches, hp.minibatch_size) + x.shape[1:]), batch
            )
            return jax.lax.scan(minibatch_step, carry, shuffled)

        (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, hp.epochs))
        summary = jax.tree.map(jnp.mean, metrics)
        summary["skipped_minibatches"] = jnp.sum(metrics["skipped_minibatches"])
        return params, opt_state, summary

    return update
