"""Preallocated key/value cache for incremental decoding.

The cache is a plain pytree (arrays only), so it can be donated to a jitted function, carried
through `lax.while_loop` and sharded like any other array. All rows of a batch write at the same
slot (`index`): prompts are left-padded to a common length, so slot `i` of every row is the i-th
step of the batch, and per-row validity lives in `mask`.

Layout: one array per layer, heads-major `[B, Hkv, S, Dh]`, the layout the attention matmuls consume
(batch dims B, Hkv leading). With `[.., S, Hkv, Dh]` XLA:CPU transposes the whole cache every decode
step (measured: per-step cost grew ~linearly with S). One array per layer rather than one stacked
`[layers, ...]` array: reading layer i of a stacked array is a slice that XLA:CPU materialises, a
copy of every layer's keys and values at every decode step (measured in the sampler's profile: 0.87
ms of a 3.6 ms step at B=16, S=128, 4 layers); a layer's own array is read in place.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def write_layer(layers: tuple[jax.Array, ...], layer: int, new: jax.Array, start: tuple[jax.Array, ...]
                ) -> tuple[jax.Array, ...]:
    """`layers` with `new` written into array `layer` (a Python int) at index `start`
    (`dynamic_update_slice`, cast to that array's dtype); the other arrays are passed through as they are.
    Shared by the per-layer caches (`KVCache`, `t5.T5Cache`)."""
    updated = jax.lax.dynamic_update_slice(layers[layer], new.astype(layers[layer].dtype), start)
    return layers[:layer] + (updated,) + layers[layer + 1:]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, with per-slot key validity and the next write slot.

    Attributes:
      k: a tuple of num_layers arrays `[B, num_kv_heads, S, head_dim]`, the keys (RoPE already applied).
      v: a tuple of num_layers arrays `[B, num_kv_heads, S, head_dim]`, the values.
      mask: `[B, S]` bool; True where the slot holds a real (non-padding) token.
      index: int32 scalar; the slot the next `decode` call writes first.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
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
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            mask=jnp.zeros((batch_size, max_length), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    def check(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, new_tokens: int) -> None:
        """Raises ValueError naming the mismatch if this cache cannot take `new_tokens` more tokens.

        Only static shapes are checked (the write index is traced inside jit; writes past the end are
        clamped by `dynamic_update_slice`, so callers size the cache as prompt + max_new_tokens).
        """
        expected = (batch_size, num_kv_heads, self.max_length, head_dim)
        shapes = {x.shape for x in self.k + self.v}
        if len(self.k) != num_layers or len(self.v) != num_layers or shapes != {expected}:
            raise ValueError(
                f"KVCache shape mismatch: {len(self.k)} key / {len(self.v)} value layers of shapes {sorted(shapes)}, "
                f"expected {num_layers} layers of [batch={batch_size}, kv_heads={num_kv_heads}, S, head_dim={head_dim}]"
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
        """Writes layer `layer`'s (a Python int) new keys/values `[B, Hkv, T, Dh]` at slots index..index+T-1."""
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, self.index, zero)
        return dataclasses.replace(self, k=write_layer(self.k, layer, k, start), v=write_layer(self.v, layer, v, start))

    def advance(self, num_tokens: int) -> "KVCache":
        """Moves the write index past the tokens just decoded."""
        return dataclasses.replace(self, index=self.index + jnp.int32(num_tokens))
