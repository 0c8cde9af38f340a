"""The PPO update (RL4VLM backbone) with the soft-RL bonus, as one module-level jitted function.

`update_step(graphdef, hp, opt, mesh, params, opt_state, batch, key, alpha)` runs the whole update:
`hp.epochs` passes over the rollout batch, each a shuffled sequence of minibatches (indices are
shuffled, rows are gathered per minibatch), each minibatch split into `hp.grad_accum_steps`
micro-batches whose gradients are averaged before one optimizer step (`lax.scan` at every level, so
the update compiles once per batch shape). Its static arguments (the model's GraphDef, the frozen
hyper-parameters, the optimizer's settings, the mesh) are hashable, so jax's own cache serves every
run of a process; `alpha` is traced, so none / entropy / coso and an alpha sweep share one program.

A minibatch whose loss or gradients are not finite leaves the parameters and optimizer state
unchanged; it is counted (`skipped_minibatches`) and left out of the reported means.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coso_jax import losses, sampling
from coso_jax.rl.sharding import state_shardings, tree_all_finite

# Batch fields the update reads (all `[n, ...]`, n = steps_per_update); `image_sizes` too for LLaVA-NeXT.
BATCH_FIELDS = (
    "prompt_ids", "prompt_mask", "pixel_values", "response_ids", "response_mask", "thought_mask",
    "action_mask", "old_logprobs", "old_values", "advantages", "returns", "entropy_weights",
)
OPTIONAL_BATCH_FIELDS = ("image_sizes",)


class ActorCritic(nnx.Module):
    """The policy VLM and its value head, trained jointly by one optimizer (RL4VLM)."""

    def __init__(self, policy: nnx.Module, value_head: nnx.Module):
        self.policy = policy
        self.value_head = value_head


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """Static hyper-parameters of the loss and the minibatch schedule (hashable: a jit cache key)."""

    clip_eps: float = 0.1
    value_clip_eps: float = 0.1
    value_coef: float = 0.5
    thought_coef: float = 0.5
    temperature: float = 1.0
    epochs: int = 4
    minibatch_size: int = 32
    grad_accum_steps: int = 1
    remat: bool = False  # recompute each decoder layer in the backward pass
    lora_dropout: bool = False  # a LoRA model with dropout: enable it in the loss, a fresh key per micro-step


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam with cosine annealing and global-norm clipping (RL4VLM: T_max 25 updates)."""

    lr: float
    lr_min: float
    decay_steps: int  # optimizer steps over which the learning rate decays to lr_min
    max_grad_norm: float
    adam_eps: float


def make_optimizer(opt: OptimizerConfig) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(opt.lr, max(opt.decay_steps, 1), alpha=opt.lr_min / opt.lr)
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), optax.adam(schedule, eps=opt.adam_eps))


def ppo_loss(model: ActorCritic, batch: dict[str, jax.Array], hp: PPOHyper, alpha: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO policy loss + value_coef * value loss - alpha * mean H_B, and diagnostics.

    H_B (`losses.weighted_entropy` with `batch["entropy_weights"]`) is the soft-RL bonus of the run's
    algo: 0 (none), the naive token entropy (entropy) or the causal entropy (coso); see
    `coso_jax.rl.causal_term`. Sequence log-probs scale thought tokens by `thought_coef` (RL4VLM's
    lambda). Returns (float32 scalar, metrics).
    """
    out = sampling.score_batch_fn(model.policy, model.value_head, batch, temperature=hp.temperature, remat=hp.remat)
    mask = batch["response_mask"]
    new_logp = losses.sequence_logprob(out.logprobs, mask, batch["thought_mask"], hp.thought_coef)
    old_logp = losses.sequence_logprob(batch["old_logprobs"], mask, batch["thought_mask"], hp.thought_coef)
    policy_loss = losses.ppo_policy_loss(new_logp, old_logp, batch["advantages"], hp.clip_eps)
    log_ratio = jax.lax.stop_gradient(new_logp - old_logp)
    value_loss = losses.value_loss(out.values, batch["old_values"], batch["returns"], hp.value_clip_eps)
    bonus = jnp.mean(losses.weighted_entropy(out.entropies, batch["entropy_weights"], mask))
    loss = policy_loss + hp.value_coef * value_loss - alpha * bonus
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy_bonus": bonus,
        "token_entropy": jnp.mean(losses.weighted_entropy(out.entropies, None, mask)),
        "approx_kl": jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > hp.clip_eps).astype(jnp.float32)),
    }
    return loss, metrics


def update(graphdef: nnx.GraphDef, hp: PPOHyper, opt: OptimizerConfig, mesh: jax.sharding.Mesh | None,
           params: Any, opt_state: Any, batch: dict[str, jax.Array], key: jax.Array, alpha: jax.Array,
           frozen: Any = None) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One PPO update: `(params, opt_state, metrics)` (see the module docstring).

    params: the trainable state of an `ActorCritic` (graphdef): every `nnx.Param`, or with LoRA the
    adapters and the value head; frozen: the rest (the frozen base; not differentiated, not donated).
    batch: `BATCH_FIELDS` with the same leading size n, a multiple of `hp.minibatch_size`. mesh: where
    params and optimizer state live (their shardings are kept; None: one device). Metrics are means
    over the applied minibatches (nan if none was applied), plus `skipped_minibatches` and
    `minibatches` (counts).
    """
    tx = make_optimizer(opt)
    n = batch["response_ids"].shape[0]
    num_minibatches = n // hp.minibatch_size
    micro = hp.minibatch_size // hp.grad_accum_steps

    frozen = nnx.State({}) if frozen is None else frozen

    def micro_loss(p, m, dropout_key):
        model = nnx.merge(graphdef, p, frozen)
        if hp.lora_dropout:
            from coso_jax.models import lora

            lora.enable_dropout(model, dropout_key)
        return ppo_loss(model, m, hp, alpha)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def minibatch_step(carry, xs):
        idx, mb_key = xs
        params, opt_state = carry
        minibatch = jax.tree.map(lambda x: x[idx].reshape((hp.grad_accum_steps, micro) + x.shape[1:]), batch)
        micro_keys = jax.random.split(mb_key, hp.grad_accum_steps)

        def accumulate(acc, m_and_key):
            m, k = m_and_key
            (_, aux), grads = grad_fn(params, m, k)
            return jax.tree.map(jnp.add, acc, (grads, aux)), None

        first = jax.tree.map(lambda x: x[0], minibatch)
        zeros = jax.tree.map(jnp.zeros_like, (params, jax.eval_shape(lambda: micro_loss(params, first, mb_key)[1])))
        (grads, aux), _ = jax.lax.scan(accumulate, zeros, (minibatch, micro_keys))
        grads, aux = jax.tree.map(lambda a: a / hp.grad_accum_steps, (grads, aux))
        finite = tree_all_finite(grads) & jnp.isfinite(aux["loss"])
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        aux = dict(aux, grad_norm=optax.tree.norm(grads))
        return (keep(new_params, params), keep(new_opt_state, opt_state)), (aux, finite)

    def epoch(carry, keys):
        epoch_key, dropout_key = keys
        order = jax.random.permutation(epoch_key, n).reshape(num_minibatches, hp.minibatch_size)
        return jax.lax.scan(minibatch_step, carry, (order, jax.random.split(dropout_key, num_minibatches)))

    # Minibatch order from split(key); LoRA dropout masks from their own stream.
    dropout_keys = jax.random.split(jax.random.fold_in(key, 1), hp.epochs)
    (params, opt_state), (metrics, applied) = jax.lax.scan(
        epoch, (params, opt_state), (jax.random.split(key, hp.epochs), dropout_keys))
    count = jnp.sum(applied)
    summary = jax.tree.map(lambda m: jnp.where(count > 0, jnp.sum(jnp.where(applied, m, 0.0)) / jnp.maximum(count, 1),
                                               jnp.nan), metrics)
    summary["skipped_minibatches"] = jnp.sum(~applied).astype(jnp.float32)
    summary["minibatches"] = jnp.asarray(applied.size, jnp.float32)
    if mesh is not None:
        params = jax.lax.with_sharding_constraint(params, state_shardings(mesh, params))
        opt_state = jax.lax.with_sharding_constraint(opt_state, state_shardings(mesh, opt_state))
    return params, opt_state, summary


# The one jitted update of the process: static (graphdef, hp, opt, mesh), params and optimizer state donated.
update_step = jax.jit(update, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))

