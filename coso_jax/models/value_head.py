"""Value head for PPO (RL4VLM): an MLP on the final hidden state of the last prompt token."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# RL4VLM: Linear(4096, 1024) - ReLU - Linear(1024, 512) - ReLU - Linear(512, 1).
RL4VLM_WIDTHS = (1024, 512)
TINY_WIDTHS = (64, 32)


class ValueHead(nnx.Module):
    """`hidden[B, D]` -> `value[B]` float32 through ReLU hidden layers of `widths`.

    Runs in float32 whatever the policy's compute dtype: it is small, and value regression targets
    (discounted returns) want the precision.
    """

    def __init__(self, hidden_size: int, widths: Sequence[int] = RL4VLM_WIDTHS, *, rngs: nnx.Rngs,
                 param_dtype: Any = jnp.float32):
        dims = [hidden_size, *widths, 1]
        self.hidden_size = hidden_size
        self.layers = nnx.List([
            nnx.Linear(a, b, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
            for a, b in zip(dims[:-1], dims[1:])
        ])

    @classmethod
    def tiny(cls, hidden_size: int, *, rngs: nnx.Rngs) -> "ValueHead":
        return cls(hidden_size, TINY_WIDTHS, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        if hidden.ndim != 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"ValueHead expects hidden [B, {self.hidden_size}], got {hidden.shape}")
        x = hidden.astype(jnp.float32)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x[:, 0]
