"""DigiRL's pure pieces: Monte-Carlo returns, trajectory filtering, the double-critic advantage and
losses, and the actor loss with the soft-RL bonus.

Host NumPy for the per-trajectory bookkeeping (returns, filtering), JAX for the losses. Formulas
follow the CoSo fork of DigiRL (github.com/langfengQ/CoSo at eb4f205; files cited per function);
every deliberate difference is listed in docs/deviations.md with its switch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from coso_jax import losses


def mc_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted Monte-Carlo returns of one trajectory: G_t = r_t + gamma G_{t+1}, G_T = 0
    (`digirl/environment/env_utils.py` add_mc_return). rewards float[T] -> float32[T]."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def trajectory_filter(returns: np.ndarray, values: np.ndarray | None, quantile: float = 0.9) -> np.ndarray:
    """Keep trajectories whose score is at or above the `quantile` quantile of all scores (top 10% for
    0.9); score = return - V_traj(first state) (DigiRL's online `filter_buffer`), or the return alone
    when `values` is None (its offline `filterbc_buffer`; `digirl/algorithms/offpolicy_train_loop.py`).

    returns float[n], values float[n] (trajectory-critic success probabilities, clipped to
    [1e-4, 1 - 1e-4]) or None -> bool[n]. Empty input gives an empty mask. ValueError on shapes.
    """
    returns = np.asarray(returns, np.float64)
    scores = returns
    if values is not None:
        values = np.clip(np.asarray(values, np.float64), 1e-4, 1 - 1e-4)
        if returns.shape != values.shape:
            raise ValueError(f"trajectory_filter expects equal 1-D arrays, got {returns.shape} and {values.shape}")
        scores = returns - values
    if returns.ndim != 1:
        raise ValueError(f"trajectory_filter expects equal 1-D arrays, got {returns.shape}")
    if returns.size == 0:
        return np.zeros(0, np.bool_)
    return scores >= np.quantile(scores, quantile)


def success_prob(logits: jax.Array) -> jax.Array:
    """P(success) of 2-class critic logits [..., 2] -> [...] (softmax, class 1)."""
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., 1]


def double_critic_advantage(logits_s: jax.Array, logits_next: jax.Array, rewards: jax.Array,
                            mc: jax.Array, offset: float = 0.05) -> jax.Array:
    """A = clamp(min_h V_h(s') - min_h V_h(s) - offset + r + MC, 0, 1)
    (`digirl/algorithms/causal_digirl/trainer.py` actor_loss).

    logits_s, logits_next [B, H, 2] (H heads of the double critic), rewards [B], mc [B] -> float32 [B].
    """
    v = jnp.min(success_prob(logits_s), axis=-1)
    nv = jnp.min(success_prob(logits_next), axis=-1)
    return losses.digirl_advantage(v, nv, rewards, mc, offset)


def double_critic_loss(logits_s: jax.Array, logits_next: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over heads and over (s, s') of the binary cross-entropy on `targets` = 1[MC > 0].

    logits_s, logits_next [B, H, 2]; targets [B] -> float32 scalar.
    """
    total = jnp.zeros((), jnp.float32)
    for logits in (logits_s, logits_next):
        for h in range(logits.shape[1]):
            total = total + losses.binary_critic_loss(logits[:, h], targets)
    return total


def reference_entropy_mean(entropies: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """The reference's batch entropy: per-row sums S_b = sum_t m w H divided by a [B, 1] token count,
    which broadcasts to [B, B], then averaged: mean(S) * mean(1 / n) instead of mean(S / n)
    (`digirl/models/autoui_agent.py` get_log_prob, `entropy / torch.sum(mask, dim=-1, keepdim=True)`).

    entropies/weights/mask [B, N] -> float32 scalar. Rows of equal length give the stated intent.
    """
    mask = jnp.asarray(mask).astype(bool)
    sums = jnp.sum(jnp.where(mask, jnp.asarray(entropies, jnp.float32) * jnp.asarray(weights, jnp.float32), 0.0), -1)
    counts = jnp.sum(mask, axis=-1).astype(jnp.float32)
    return jnp.mean(sums[None, :] / jnp.maximum(counts, 1.0)[:, None])


def floor_logprobs(token_logprobs: jax.Array, floor: float | None) -> jax.Array:
    """max(log p, log floor): the reference clamps token probabilities at 1e-10 before the log
    (`digirl/models/autoui_agent.py` get_log_prob); None leaves them as they are (ours)."""
    if floor is None:
        return token_logprobs
    return jnp.maximum(token_logprobs, jnp.log(jnp.float32(floor)))


def actor_loss(seq_logprobs: jax.Array, advantages: jax.Array, entropies: jax.Array, entropy_weights: jax.Array,
               mask: jax.Array, alpha: jax.Array | float, *, rows: jax.Array | None = None,
               reference_averaging: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-mean(log pi(y|s) 1[A > 0]) - alpha * mean_b H_B(y_b), H_B = sum_t m w H / sum_t m.

    seq_logprobs [B] (differentiated), advantages [B], entropies [B, N] (differentiated),
    entropy_weights [B, N] (constants: 0 none, 1 entropy, causal weights coso), mask [B, N], alpha scalar.
    rows [B] bool or None: the rows both means run over (DigiRL's `drop_unparseable`: valid rows only).
    reference_averaging: the reference's batch entropy (`reference_entropy_mean`) instead of mean_b H_B.
    Returns (float32 scalar, diagnostics).
    """
    pg = losses.filtered_pg_loss(seq_logprobs, advantages, rows)
    if reference_averaging:
        bonus = reference_entropy_mean(entropies, jax.lax.stop_gradient(entropy_weights),
                                       mask if rows is None else jnp.asarray(mask).astype(bool) & rows[:, None])
    else:
        per_row = losses.weighted_entropy(entropies, entropy_weights, mask)
        bonus = per_row.mean() if rows is None else jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(rows.sum(), 1)
    loss = pg - alpha * bonus
    return loss, {"pg_loss": pg, "entropy_bonus": bonus,
                  "kept_fraction": jnp.mean((advantages > 0).astype(jnp.float32))}
