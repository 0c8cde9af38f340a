"""Loss functions of CoSo and its two backbones (RL4VLM-style PPO, DigiRL), as pure functions.

Conventions (rlax style): arrays in, arrays out; no globals or flags; everything is jit-, vmap-
and grad-safe. Token-level inputs are batch-major ``[B, T]`` (``[B, T, V]`` for logits); masks are
bool or 0/1 of the same shape and select the action tokens. Rollout-level inputs of ``gae`` are
time-major ``[T, ...]``. Masked means divide by ``max(sum(mask), 1)`` so an empty mask gives 0,
not NaN. Results are float32.

Masked-out slots carry no weight, whatever they hold: every masked reduction *selects*
(``jnp.where(mask, x, 0)``) instead of multiplying by the mask, and inputs are sanitised that way
*before* any arithmetic, so NaN/inf in a masked slot (or in a ``done`` slot of ``gae`` /
``soft_q_target``) gives neither a NaN value nor a NaN gradient (0 * inf = NaN, and
``where(m, f(x), 0)`` still back-propagates NaN when f(NaN) is computed). Entropies treat -inf
logits (tokens banned by top-p, masks or constraints) as probability 0: they contribute exactly 0.
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
    "soft_rewards",
    "soft_q_target",
    "soft_value_target",
    "filtered_pg_loss",
    "digirl_advantage",
    "binary_critic_loss",
]

# The reference clamps probabilities at 1e-10 before taking the log in the entropy.
PROB_FLOOR = 1e-10


def _as_bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)


def _select(mask: jax.Array | None, x: jax.Array) -> jax.Array:
    """``x`` where ``mask`` (bool, broadcastable) is True, else 0: masked slots lose whatever they
    held (NaN, inf) before any arithmetic touches them, so neither values nor gradients see it."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {a.shape} != {name_b} shape {b.shape}")


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """sum(where(mask, values, 0)) / max(sum(mask), 1); the plain mean when ``mask`` is None."""
    if mask is None:
        return values.mean()
    mask = _as_bool(mask)
    _check_same_shape("values", values, "mask", mask)
    return _select(mask, values).sum() / jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)


def _check_mask(name: str, x: jax.Array, mask: jax.Array | None) -> jax.Array | None:
    """The mask as bool (None stays None), checked against ``x``'s shape."""
    if mask is None:
        return None
    mask = _as_bool(mask)
    _check_same_shape(name, x, "mask", mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Entropies (docs/design.md, step 5).
def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token entropy of the next-token distribution, in nats.

    H_t = -sum_v p_t(v) log max(p_t(v), 1e-10), p_t = softmax(logits_t) in float32 (the
    reference's clamped entropy).

    A -inf logit (a banned token) has p = 0 and contributes exactly 0; a row needs at least one
    finite logit. Masked positions are replaced by zero logits before the softmax, so whatever
    they hold (NaN, inf, all -inf) they give 0 and a zero gradient.

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
    mask = _as_bool(mask)
    logits = _select(mask[..., None], logits.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    # p = 0 (a -inf logit) gives 0 * log(1e-10) = 0 exactly, with a finite gradient.
    entropy = -(probs * jnp.log(jnp.maximum(probs, PROB_FLOOR))).sum(axis=-1)
    return jnp.where(mask, entropy, 0.0)


def weighted_entropy(entropies: jax.Array, weights: jax.Array | None, mask: jax.Array) -> jax.Array:
    """sum_t m_t w_t H_t / max(sum_t m_t, 1): the masked mean of weighted token entropies.

    Used directly on the per-token entropies the trainer's scorer returns. The weights are
    constants: they pass through ``stop_gradient`` (CoSo's causal weights never get gradients).
    Entropies and weights at masked positions are selected away first, whatever they hold.

    Args:
      entropies: [..., T] per-token entropies (e.g. ``token_entropy`` or the scorer's output).
      weights: [..., T] causal weights in [0, 1], or None for all ones (the naive entropy).
      mask: [..., T] action-token mask.
    Returns:
      float32 [...]: one value per sequence.
    """
    entropies = jnp.asarray(entropies, jnp.float32)
    mask = _check_mask("entropies", entropies, mask)
    weighted = _select(mask, entropies)
    if weights is not None:
        weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
        _check_same_shape("weights", weights, "mask", mask)
        weighted = weighted * _select(mask, weights)
    return weighted.sum(axis=-1) / jnp.maximum(mask.astype(jnp.float32).sum(axis=-1), 1.0)


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
    Log-probs at masked positions (e.g. -inf for a banned pad token) are selected away first.

    Args:
      token_logprobs: [..., T] per-token log-probs.
      mask: [..., T] generated-token mask.
      thought_mask: [..., T] or None (no scaling).
      cot_lambda: the CoT scale lambda (float or traced scalar).
    Returns:
      float32 [...].
    """
    token_logprobs = jnp.asarray(token_logprobs, jnp.float32)
    mask = _check_mask("token_logprobs", token_logprobs, mask)
    token_logprobs = _select(mask, token_logprobs)
    if thought_mask is None:
        return token_logprobs.sum(axis=-1)
    thought = _as_bool(thought_mask)
    _check_same_shape("thought_mask", thought, "mask", mask)
    return jnp.where(thought, cot_lambda * token_logprobs, token_logprobs).sum(axis=-1)


# Jitted so the scan compiles once per rollout shape; called eagerly, lax.scan compiles its body
# again on every call (~0.1 s per PPO iteration on the CPU).
@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae(rewards: jax.Array, values: jax.Array, dones: jax.Array, next_value: jax.Array,
        gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a time-major rollout.

    ``dones[t]`` is 1 when the episode ended after step t, by termination *or* time-limit
    truncation: like RL4VLM, truncation is treated as terminal (no bootstrap through it). The
    (1 - done) factors are selections: V_{t+1} after a done carries no weight, whatever it holds.

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
    dones = _as_bool(dones)
    next_value = jnp.asarray(next_value, jnp.float32)
    _check_same_shape("rewards", rewards, "values", values)
    _check_same_shape("rewards", rewards, "dones", dones)
    if rewards.ndim < 1 or next_value.shape != rewards.shape[1:]:
        raise ValueError(f"gae expects [T, ...] rollouts and next_value [...], got rewards "
                         f"{rewards.shape} and next_value {next_value.shape}")
    following_values = jnp.concatenate([values[1:], next_value[None]], axis=0)
    not_done = ~dones
    deltas = rewards + gamma * _select(not_done, following_values) - values

    def backward(advantage_next, inputs):
        delta, keep = inputs
        advantage = delta + gamma * lam * _select(keep, advantage_next)
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(next_value), (deltas, not_done),
                                 reverse=True)
    return advantages, advantages + values


def normalise_advantages(advantages: jax.Array, mask: jax.Array | None = None,
                         eps: float = 1e-8) -> jax.Array:
    """(A - mean) / (std + eps), statistics over the masked entries (all if mask is None).

    std is the population standard deviation (ddof 0). Masked-out entries are returned as 0 and
    never enter the statistics, whatever they hold. Shape-preserving, float32.
    """
    advantages = jnp.asarray(advantages, jnp.float32)
    mask = jnp.ones(advantages.shape, bool) if mask is None else _as_bool(mask)
    _check_same_shape("advantages", advantages, "mask", mask)
    advantages = _select(mask, advantages)
    count = jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)
    mean = advantages.sum() / count
    var = _select(mask, jnp.square(advantages - mean)).sum() / count
    return jnp.where(mask, (advantages - mean) / (jnp.sqrt(var) + eps), 0.0)


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
      mask: [B] rows to include (e.g. valid samples), or None. Excluded rows are selected away
        before the ratio is formed, so NaN/inf there affects neither the loss nor its gradient.
    Returns:
      float32 scalar.
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    old_logprobs = jax.lax.stop_gradient(jnp.asarray(old_logprobs, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    _check_same_shape("logprobs", logprobs, "old_logprobs", old_logprobs)
    _check_same_shape("logprobs", logprobs, "advantages", advantages)
    mask = _check_mask("logprobs", logprobs, mask)
    logprobs, old_logprobs, advantages = (_select(mask, x)
                                          for x in (logprobs, old_logprobs, advantages))
    ratio = jnp.exp(logprobs - old_logprobs)
    surrogate = jnp.minimum(ratio * advantages,
                            jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    return -_masked_mean(surrogate, mask)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
               clip_eps: float | None, mask: jax.Array | None = None) -> jax.Array:
    """Value regression, clipped as in RL4VLM / PPO2.

    With clipping: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2));
    ``clip_eps=None``: 0.5 * mean((V - R)^2). values/old_values/returns [B] -> float32 scalar.
    Rows outside ``mask`` ([B] or None) are selected away first, whatever they hold.
    """
    values = jnp.asarray(values, jnp.float32)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    returns = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))
    _check_same_shape("values", values, "returns", returns)
    _check_same_shape("values", values, "old_values", old_values)
    mask = _check_mask("values", values, mask)
    values, old_values, returns = (_select(mask, x) for x in (values, old_values, returns))
    squared = jnp.square(values - returns)
    if clip_eps is not None:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        squared = jnp.maximum(squared, jnp.square(clipped - returns))
    return 0.5 * _masked_mean(squared, mask)


# ---------------------------------------------------------------------------------------------
# Soft RL targets (docs/design.md, step 6).
def soft_rewards(rewards: jax.Array, entropy_bonus: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """Entropy-augmented rewards r_t + alpha * H_B(y_t) (CoSo's soft objective, paper Sec. 4.2).

    Returns, GAE or Monte-Carlo returns computed on them estimate the soft value
    V(s_t) = E[sum_k gamma^k (r_{t+k} + alpha * H_B(y_{t+k}))]. `entropy_bonus` is H_B of each step's
    action text under the behaviour policy (`weighted_entropy` of its token entropies with the algo's
    weights), a constant (stop-gradient).

    Args:
      rewards: [...] float. entropy_bonus: [...] same shape, nats. alpha: the entropy coefficient.
    Returns:
      float32 [...].
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    entropy_bonus = jax.lax.stop_gradient(jnp.asarray(entropy_bonus, jnp.float32))
    _check_same_shape("rewards", rewards, "entropy_bonus", entropy_bonus)
    return rewards + alpha * entropy_bonus


def soft_q_target(rewards: jax.Array, dones: jax.Array, next_values: jax.Array,
                  gamma: float) -> jax.Array:
    """r + gamma * (1 - done) * V(s'), with V a soft value. All [...] -> float32 [...].

    (1 - done) selects: V(s') after a done carries no weight, whatever it holds.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    dones = _as_bool(dones)
    next_values = jnp.asarray(next_values, jnp.float32)
    _check_same_shape("rewards", rewards, "dones", dones)
    _check_same_shape("rewards", rewards, "next_values", next_values)
    return rewards + gamma * _select(~dones, jax.lax.stop_gradient(next_values))


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
    Filtered and masked rows are selected away, so a NaN/-inf log-prob there carries no weight.
    """
    logprobs = jnp.asarray(logprobs, jnp.float32)
    advantages = jnp.asarray(advantages)
    _check_same_shape("logprobs", logprobs, "advantages", advantages)
    mask = _check_mask("logprobs", logprobs, mask)
    keep = advantages > 0
    if mask is not None:
        keep = keep & mask
    return -_masked_mean(_select(keep, logprobs), mask)


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
    Masked rows' logits and targets are selected away first, whatever they hold.
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets)
    if logits.shape != targets.shape + (2,):
        raise ValueError(f"binary_critic_loss expects logits [B, 2] and targets [B], got "
                         f"{logits.shape} and {targets.shape}")
    mask = _check_mask("targets", targets, mask)
    if mask is not None:
        logits, targets = _select(mask[:, None], logits), _select(mask, targets)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32))
    return _masked_mean(per_row, mask)
