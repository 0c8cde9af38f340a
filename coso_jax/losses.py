"""Loss functions of CoSo and its two backbones (RL4VLM-style PPO, DigiRL), as pure functions.

Conventions (rlax style): arrays in, arrays out; no globals or flags; everything is jit-, vmap-
and grad-safe. Token-level inputs are batch-major ``[B, T]`` (``[B, T, V]`` for logits); masks are
bool or 0/1 of the same shape and select the action tokens. Rollout-level inputs of ``gae`` are
time-major ``[T, ...]``. Masked means divide by ``max(sum(mask), 1)`` so an empty mask gives 0,
not NaN. Results are float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "PROB_FLOOR",
    "token_entropy",
    "weighted_entropy",
    "naive_entropy",
    "causal_entropy",
    "sequence_logprob",
    "gae",
    "normalise_advantages",
    "ppo_policy_loss",
    "value_loss",
    "soft_q_target",
    "soft_value_target",
    "filtered_pg_loss",
    "digirl_advantage",
    "binary_critic_loss",
]

# The reference clamps probabilities at 1e-10 before taking the log in the entropy.
PROB_FLOOR = 1e-10


def _as_mask(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(mask).astype(dtype)


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {a.shape} != {name_b} shape {b.shape}")


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values.mean()
    mask = _as_mask(mask)
    _check_same_shape("values", values, "mask", mask)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# ---------------------------------------------------------------------------------------------
# Entropies (DESIGN.md step 5).
def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token entropy of the next-token distribution, in nats.

    H_t = -sum_v p_t(v) log max(p_t(v), 1e-10), p_t = softmax(logits_t) in float32.

    Args:
      logits: [..., T, V] (any float dtype; computed in float32).
      mask: [..., T] bool or 0/1; 0 where the position is not an action token.
    Returns:
      float32 [..., T], 0 where ``mask`` is 0.
    """
    logits = jnp.asarray(logits)
    if logits.ndim < 2 or logits.shape[:-1] != jnp.shape(mask):
        raise ValueError(f"token_entropy expects logits [..., T, V] and mask [..., T], got "
                         f"{logits.shape} and {jnp.shape(mask)}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -(probs * jnp.log(jnp.maximum(probs, PROB_FLOOR))).sum(axis=-1)
    return jnp.where(jnp.asarray(mask).astype(bool), entropy, 0.0)


def weighted_entropy(entropies: jax.Array, weights: jax.Array | None, mask: jax.Array) -> jax.Array:
    """sum_t m_t w_t H_t / max(sum_t m_t, 1): the masked mean of weighted token entropies.

    Used directly on the per-token entropies the trainer's scorer returns. The weights are
    constants: they pass through ``stop_gradient`` (CoSo's causal weights never get gradients).

    Args:
      entropies: [..., T] per-token entropies (e.g. ``token_entropy`` or the scorer's output).
      weights: [..., T] causal weights in [0, 1], or None for all ones (the naive entropy).
      mask: [..., T] action-token mask.
    Returns:
      float32 [...]: one value per sequence.
    """
    entropies = jnp.asarray(entropies, jnp.float32)
    mask = _as_mask(mask)
    _check_same_shape("entropies", entropies, "mask", mask)
    if weights is None:
        weighted = entropies * mask
    else:
        weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
        _check_same_shape("weights", weights, "mask", mask)
        weighted = entropies * weights * mask
    return weighted.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)


def naive_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The entropy baseline: masked mean of token entropies. logits [..., T, V] -> float32 [...]."""
    return weighted_entropy(token_entropy(logits, mask), None, mask)


def causal_entropy(logits: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """CoSo's causal entropy sum_t m w H / sum_t m (weights stop-gradiented).

    Args:
      logits: [B, T, V] teacher-forced policy logits at the action tokens.
      weights: [B, T] causal weights (``causal_weights``), constants.
      mask: [B, T] action-token mask.
    Returns:
      float32 [B].
    """
    return weighted_entropy(token_entropy(logits, mask), weights, mask)


# ---------------------------------------------------------------------------------------------
# Log-probabilities and advantages.
def sequence_logprob(token_logprobs: jax.Array, mask: jax.Array,
                     thought_mask: jax.Array | None = None, cot_lambda: float = 1.0) -> jax.Array:
    """Log-probability of each action text: sum of token log-probs over ``mask``.

    RL4VLM scales the chain-of-thought part: log pi(y) = sum_{action} lp + lambda * sum_{thought} lp,
    where thought tokens are ``mask & thought_mask``, action tokens ``mask & ~thought_mask``.

    Args:
      token_logprobs: [..., T] per-token log-probs.
      mask: [..., T] generated-token mask.
      thought_mask: [..., T] or None (no scaling).
      cot_lambda: the CoT scale lambda (float or traced scalar).
    Returns:
      float32 [...].
    """
    token_logprobs = jnp.asarray(token_logprobs, jnp.float32)
    mask = _as_mask(mask)
    _check_same_shape("token_logprobs", token_logprobs, "mask", mask)
    if thought_mask is None:
        return (token_logprobs * mask).sum(axis=-1)
    thought = _as_mask(thought_mask) * mask
    _check_same_shape("thought_mask", thought, "mask", mask)
    scale = mask - thought + cot_lambda * thought
    return (token_logprobs * scale).sum(axis=-1)


# Jitted so the scan compiles once per rollout shape; called eagerly, lax.scan compiles its body
# again on every call (~0.1 s per PPO iteration on the CPU).
@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae(rewards: jax.Array, values: jax.Array, dones: jax.Array, next_value: jax.Array,
        gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a time-major rollout.

    ``dones[t]`` is 1 when the episode ended after step t, by termination *or* time-limit
    truncation: like RL4VLM, truncation is treated as terminal (no bootstrap through it).

      delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t,  V_T = next_value
      A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}

    Args:
      rewards, values, dones: [T, ...] (dones bool or 0/1).
      next_value: [...] value of the state after the last step.
      gamma, lam: discount and GAE lambda.
    Returns:
      (advantages [T, ...], returns = advantages + values [T, ...]), float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    dones = jnp.asarray(dones).astype(jnp.float32)
    next_value = jnp.asarray(next_value, jnp.float32)
    _check_same_shape("rewards", rewards, "values", values)
    _check_same_shape("rewards", rewards, "dones", dones)
    if rewards.ndim < 1 or next_value.shape != rewards.shape[1:]:
        raise ValueError(f"gae expects [T, ...] rollouts and next_value [...], got rewards "
                         f"{rewards.shape} and next_value {next_value.shape}")
    following_values = jnp.concatenate([values[1:], next_value[None]], axis=0)
    not_done = 1.0 - dones
    deltas = rewards + gamma * not_done * following_values - values

    def backward(advantage_next, inputs):
        delta, keep = inputs
        advantage = delta + gamma * lam * keep * advantage_next
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(next_value), (deltas, not_done),
                                 reverse=True)
    return advantages, advantages + values


def normalise_advantages(advantages: jax.Array, mask: jax.Array | None = None,
                         eps: float = 1e-8) -> jax.Array:
    """(A - mean) / (std + eps), statistics over the masked entries (all if mask is None).

    Masked-out entries are returned as 0. Shape-preserving, float32.
    """
    advantages = jnp.asarray(advantages, jnp.float32)
    mask_f = jnp.ones_like(advantages) if mask is None else _as_mask(mask)
    _check_same_shape("advantages", advantages, "mask", mask_f)
    count = jnp.maximum(mask_f.sum(), 1.0)
    mean = (advantages * mask_f).sum() / count
    var = (jnp.square(advantages - mean) * mask_f).sum() / count
    return jnp.where(mask_f > 0, (advantages - mean) / (jnp.sqrt(var) + eps), 0.0)


# ---------------------------------------------------------------------------------------------
# PPO (RL4VLM backbone).
def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                    clip_eps: float, mask: jax.Array | None = None) -> jax.Array:
    """Clipped-surrogate PPO loss: -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)).

    Args:
      logprobs: [B] sequence log-probs under the current policy (differentiated).
      old_logprobs: [B] under the behaviour policy (treated as constants).
      advantages: [B] (treated as constants).
      clip_eps: the clip range epsilon.
      mask: [B] rows to include (e.g. valid samples), or None.
    Returns:
      float32 scalar.
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    old_logprobs = jax.lax.stop_gradient(jnp.asarray(old_logprobs, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    _check_same_shape("logprobs", logprobs, "old_logprobs", old_logprobs)
    _check_same_shape("logprobs", logprobs, "advantages", advantages)
    ratio = jnp.exp(logprobs - old_logprobs)
    surrogate = jnp.minimum(ratio * advantages,
                            jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    return -_masked_mean(surrogate, mask)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
               clip_eps: float | None, mask: jax.Array | None = None) -> jax.Array:
    """Value regression, clipped as in RL4VLM / PPO2.

    With clipping: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2));
    ``clip_eps=None``: 0.5 * mean((V - R)^2). values/old_values/returns [B] -> float32 scalar.
    """
    values = jnp.asarray(values, jnp.float32)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    returns = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))
    _check_same_shape("values", values, "returns", returns)
    _check_same_shape("values", values, "old_values", old_values)
    squared = jnp.square(values - returns)
    if clip_eps is not None:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        squared = jnp.maximum(squared, jnp.square(clipped - returns))
    return 0.5 * _masked_mean(squared, mask)


# ---------------------------------------------------------------------------------------------
# Soft RL targets (DESIGN.md step 6).
def soft_q_target(rewards: jax.Array, dones: jax.Array, next_values: jax.Array,
                  gamma: float) -> jax.Array:
    """r + gamma * (1 - done) * V(s'), with V a soft value. All [...] -> float32 [...]."""
    rewards = jnp.asarray(rewards, jnp.float32)
    dones = jnp.asarray(dones).astype(jnp.float32)
    next_values = jnp.asarray(next_values, jnp.float32)
    _check_same_shape("rewards", rewards, "dones", dones)
    _check_same_shape("rewards", rewards, "next_values", next_values)
    return rewards + gamma * (1.0 - dones) * jax.lax.stop_gradient(next_values)


def soft_value_target(q_values: jax.Array, entropies: jax.Array, alpha: float,
                      axis: int | None = None) -> jax.Array:
    """Soft value V(s) = E_y[Q(s, y)] + alpha * H, with H the causal (or naive) entropy of y.

    Args:
      q_values: [...] Q(s, y) of sampled action texts.
      entropies: [...] their causal entropies (``causal_entropy``), same shape.
      alpha: the entropy coefficient.
      axis: if given, the axis of samples y to average over (a Monte-Carlo E_y); None keeps the
        single-sample estimate per entry.
    Returns:
      float32, ``q_values`` shape with ``axis`` removed. Entropies are constants (stop_gradient).
    """
    q_values = jnp.asarray(q_values, jnp.float32)
    entropies = jax.lax.stop_gradient(jnp.asarray(entropies, jnp.float32))
    _check_same_shape("q_values", q_values, "entropies", entropies)
    target = q_values + alpha * entropies
    return target if axis is None else target.mean(axis=axis)


# ---------------------------------------------------------------------------------------------
# DigiRL backbone.
def filtered_pg_loss(logprobs: jax.Array, advantages: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    """DigiRL's filtered policy gradient: -mean(log pi(y|s) * 1[A > 0]).

    logprobs [B] (differentiated), advantages [B] (only their sign is used), mask [B] or None.
    Returns a float32 scalar; the mean runs over all (masked) rows, filtered ones count as 0.
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    advantages = jnp.asarray(advantages)
    _check_same_shape("logprobs", logprobs, "advantages", advantages)
    keep = jax.lax.stop_gradient((advantages > 0).astype(jnp.float32))
    return -_masked_mean(logprobs * keep, mask)


def digirl_advantage(values: jax.Array, next_values: jax.Array, rewards: jax.Array,
                     mc_returns: jax.Array, offset: float = 0.05) -> jax.Array:
    """DigiRL's step advantage clamp(V(s') - V(s) - offset + r + MC return, 0, 1).

    ``values``/``next_values`` are success probabilities of the double critic (the caller takes the
    min over its two heads). All [B] -> float32 [B], no gradient.
    """
    values = jnp.asarray(values, jnp.float32)
    for name, other in (("next_values", next_values), ("rewards", rewards),
                        ("mc_returns", mc_returns)):
        _check_same_shape("values", values, name, jnp.asarray(other))
    advantage = (jnp.asarray(next_values, jnp.float32) - values - offset
                 + jnp.asarray(rewards, jnp.float32) + jnp.asarray(mc_returns, jnp.float32))
    return jax.lax.stop_gradient(jnp.clip(advantage, 0.0, 1.0))


def binary_critic_loss(logits: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of a 2-class critic (DigiRL: target = 1[MC return > 0]).

    logits [B, 2] (class 1 = success), targets [B] bool or 0/1, mask [B] or None -> float32 scalar.
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets)
    if logits.shape != targets.shape + (2,):
        raise ValueError(f"binary_critic_loss expects logits [B, 2] and targets [B], got "
                         f"{logits.shape} and {targets.shape}")
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32))
    return _masked_mean(per_row, mask)
