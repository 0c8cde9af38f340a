"""Preallocated key/value cache for incremental decoding.

The cache is a plain pytree (arrays only), so it can be donated to a jitted function, carried
through `lax.while_loop` and sharded like any other array. All rows of a batch write at the same
slot (`index`): prompts are left-padded to a common length, so slot `i` of every row is the i-th
step of the batch, and per-row validity lives in `mask`.

Layout: keys/values are stored heads-major, `[layers, B, Hkv, S, Dh]`, the layout the attention
matmuls consume (batch dims B, Hkv leading). With `[.., S, Hkv, Dh]` XLA:CPU transposes the whole
cache every decode step (measured: per-step cost grew ~linearly with S).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, with per-slot key validity and the next write slot.

    Attributes:
      k: `[num_layers, B, num_kv_heads, S, head_dim]` keys (RoPE already applied).
      v: `[num_layers, B, num_kv_heads, S, head_dim]` values.
      mask: `[B, S]` bool; True where the slot holds a real (non-padding) token.
      index: int32 scalar; the slot the next `decode` call writes first.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        """An empty cache: zeros, all slots invalid, write index 0."""
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_length", max_length),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if int(value) < 1:
                raise ValueError(f"KVCache.create: {name} must be >= 1, got {value}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_length), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def check(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, new_tokens: int) -> None:
        """Raises ValueError naming the mismatch if this cache cannot take `new_tokens` more tokens.

        Only static shapes are checked (the write index is traced inside jit; writes past the end are
        clamped by `dynamic_update_slice`, so callers size the cache as prompt + max_new_tokens).
        """
        expected = (num_layers, batch_size, num_kv_heads, self.max_length, head_dim)
        if self.k.shape != expected or self.v.shape != expected:
            raise ValueError(
                f"KVCache shape mismatch: k {self.k.shape}, v {self.v.shape}, expected "
                f"[layers={num_layers}, batch={batch_size}, kv_heads={num_kv_heads}, S, head_dim={head_dim}]"
            )
        if self.mask.shape != (batch_size, self.max_length):
            raise ValueError(f"KVCache mask shape {self.mask.shape} != (batch={batch_size}, S={self.max_length})")
        if new_tokens > self.max_length:
            raise ValueError(f"decode of {new_tokens} tokens does not fit a KVCache of length {self.max_length}")

    def update_mask(self, new_mask: jax.Array) -> "KVCache":
        """Writes the validity `[B, T]` of the T tokens about to be decoded at slots index..index+T-1."""
        mask = jax.lax.dynamic_update_slice(self.mask, new_mask.astype(jnp.bool_), (0, self.index))
        return dataclasses.replace(self, mask=mask)

    def update_layer(self, layer: int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Writes one layer's new keys/values `[B, Hkv, T, Dh]` at slots index..index+T-1."""
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.asarray(layer, jnp.int32), zero, zero, self.index, zero)
        new_k = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start)
        new_v = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start)
        return dataclasses.replace(self, k=new_k, v=new_v)

    def advance(self, num_tokens: int) -> "KVCache":
        """Moves the write index past the tokens just decoded."""
        return dataclasses.replace(self, index=self.index + jnp.int32(num_tokens))
