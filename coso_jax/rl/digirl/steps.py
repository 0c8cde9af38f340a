"""DigiRL's jitted phases, defined once at module level.

Their static arguments are hashable (the policy's and critics' GraphDefs, the policy family, frozen
settings dataclasses), so jax's own cache serves every run of a process with the same structure;
optimizers are built inside from the static settings. alpha is traced (one program for every algo).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coso_jax import losses
from coso_jax.rl.digirl.critics import critic_logits
from coso_jax.rl.digirl.losses import (
    actor_loss,
    double_critic_advantage,
    double_critic_loss,
    floor_logprobs,
    success_prob,
)
from coso_jax.rl.sharding import tree_all_finite

ACTOR_FIELDS = ("prompt_ids", "prompt_mask", "image", "response_ids", "response_mask", "advantages",
                "entropy_weights", "valid")
CRITIC_FIELDS = ("prompt_ids", "prompt_mask", "image", "next_prompt_ids", "next_prompt_mask", "next_image",
                 "mc_return")
TRAJECTORY_FIELDS = ("prompt_ids", "prompt_mask", "image", "traj_success")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclasses.dataclass(frozen=True)
class CriticSettings:
    """Static settings of the critic steps: the image placeholder id (left out of the separate critic's
    text), Adam's learning rate and the clip norm, and the advantage offset."""

    image_token_id: int
    lr: float
    max_grad_norm: float
    advantage_offset: float = 0.05


@dataclasses.dataclass(frozen=True)
class ActorSettings:
    """Static settings of the actor step (see `losses.actor_loss` and docs/deviations.md)."""

    lr: float
    max_grad_norm: float
    temperature: float
    drop_unparseable: bool = False  # valid rows only, in both means (the reference's intent)
    reference_averaging: bool = False  # the reference's mean(S) * mean(1 / n) entropy average
    logprob_floor: float | None = None  # the reference floors token probabilities at 1e-10


def optimizer(lr: float, max_grad_norm: float) -> optax.GradientTransformation:
    """Adam with global-norm clipping (DigiRL: lr 1e-4, max_grad_norm 0.01)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(lr))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def sample(policy_gd: nnx.GraphDef, family: Any, settings: SampleSettings, params: Any, prompt_ids: jax.Array,
           prompt_mask: jax.Array, images: jax.Array, key: jax.Array):
    """The family's sampler on uint8 screenshots `[B, S, S, 3]` and left-padded prompts `[B, P]`."""
    policy = nnx.merge(policy_gd, params)
    return family.sample(policy, prompt_ids, prompt_mask, family.image_inputs(images), key,
                         max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                         top_p=settings.top_p)


def _adam_epochs(loss_fn, tx, critic_params, critic_opt, batches):
    """One Adam step of `loss_fn(params, batch) -> (loss, accuracy)` per leading slice of `batches`."""
    def epoch(carry, b):
        cp, opt = carry
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(cp, b)
        updates, opt = tx.update(grads, opt, cp)
        return (optax.apply_updates(cp, updates), opt), (loss, acc)

    (critic_params, critic_opt), (loss, acc) = jax.lax.scan(epoch, (critic_params, critic_opt), batches)
    return critic_params, critic_opt, {"loss": loss.mean(), "accuracy": acc.mean()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def critic_update(policy_gd, critic_gd, family, settings: CriticSettings, critic_params, critic_opt, policy_params,
                  batches):
    """`critic_epochs` Adam steps of the double critic's cross-entropy on 1[MC > 0] for s and s'
    (DigiRL regresses V(s) and V(s') onto the same label). batches: CRITIC_FIELDS as [epochs, B, ...]."""
    policy = nnx.merge(policy_gd, policy_params)

    def loss_fn(cp, b):
        critics = nnx.merge(critic_gd, cp)
        ls = critic_logits(critics.step, policy, family, settings.image_token_id, b["image"], b["prompt_ids"],
                           b["prompt_mask"])
        ln = critic_logits(critics.step, policy, family, settings.image_token_id, b["next_image"],
                           b["next_prompt_ids"], b["next_prompt_mask"])
        target = b["mc_return"] > 0
        acc = jnp.mean(((success_prob(ls).min(-1) > 0.5) == target).astype(jnp.float32))
        return double_critic_loss(ls, ln, target), acc

    return _adam_epochs(loss_fn, optimizer(settings.lr, settings.max_grad_norm), critic_params, critic_opt, batches)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def trajectory_update(policy_gd, critic_gd, family, settings: CriticSettings, critic_params, critic_opt,
                      policy_params, batches):
    """Adam steps of the trajectory critic on (first state, 1[last reward > 0]) (the reference's
    `traj[-1]["mc_return"] > 0`). batches: TRAJECTORY_FIELDS as [epochs, B, ...]."""
    policy = nnx.merge(policy_gd, policy_params)

    def loss_fn(cp, b):
        critics = nnx.merge(critic_gd, cp)
        logits = critic_logits(critics.trajectory, policy, family, settings.image_token_id, b["image"],
                               b["prompt_ids"], b["prompt_mask"])[:, 0]
        target = b["traj_success"]
        acc = jnp.mean(((success_prob(logits) > 0.5) == target).astype(jnp.float32))
        return losses.binary_critic_loss(logits, target), acc

    return _adam_epochs(loss_fn, optimizer(settings.lr, settings.max_grad_norm), critic_params, critic_opt, batches)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def critic_values(policy_gd, critic_gd, family, settings: CriticSettings, critic_params, policy_params, b):
    """(advantages [B], trajectory-critic P(success) [B]) of a batch of transitions (CRITIC_FIELDS + reward)."""
    policy = nnx.merge(policy_gd, policy_params)
    critics = nnx.merge(critic_gd, critic_params)
    logits = lambda net, image, ids, mask: critic_logits(net, policy, family, settings.image_token_id, image, ids, mask)
    ls = logits(critics.step, b["image"], b["prompt_ids"], b["prompt_mask"])
    ln = logits(critics.step, b["next_image"], b["next_prompt_ids"], b["next_prompt_mask"])
    adv = double_critic_advantage(ls, ln, b["reward"], b["mc_return"], settings.advantage_offset)
    traj = success_prob(logits(critics.trajectory, b["image"], b["prompt_ids"], b["prompt_mask"])[:, 0])
    return adv, traj


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def actor_update(policy_gd, family, settings: ActorSettings, params, opt_state, batches, alpha):
    """`actor_epochs` Adam steps of the filtered policy gradient minus alpha * H_B, one per leading slice
    of `batches` (ACTOR_FIELDS as [epochs, B, ...]). A step with a non-finite loss or gradients is
    skipped (parameters and optimizer state unchanged); the metrics average the applied steps (nan if
    none), plus `skipped` and `steps` (counts)."""
    tx = optimizer(settings.lr, settings.max_grad_norm)

    def loss_fn(p, b):
        out = family.score(nnx.merge(policy_gd, p), b, temperature=settings.temperature)
        logp = losses.sequence_logprob(floor_logprobs(out.logprobs, settings.logprob_floor), b["response_mask"])
        rows = b["valid"] if settings.drop_unparseable else None
        return actor_loss(logp, b["advantages"], out.entropies, b["entropy_weights"], b["response_mask"], alpha,
                          rows=rows, reference_averaging=settings.reference_averaging)

    def epoch(carry, b):
        p, opt = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        updates, new_opt = tx.update(grads, opt, p)
        new_p = optax.apply_updates(p, updates)
        keep = lambda a, b_: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b_)
        return (keep(new_p, p), keep(new_opt, opt)), (dict(aux, loss=loss, grad_norm=optax.tree.norm(grads)), finite)

    (params, opt_state), (aux, applied) = jax.lax.scan(epoch, (params, opt_state), batches)
    count = jnp.sum(applied)
    summary = jax.tree.map(lambda m: jnp.where(count > 0, jnp.sum(jnp.where(applied, m, 0.0)) / jnp.maximum(count, 1),
                                               jnp.nan), aux)
    summary["skipped"] = jnp.sum(~applied).astype(jnp.float32)
    summary["steps"] = jnp.asarray(applied.size, jnp.float32)
    return params, opt_state, summary
