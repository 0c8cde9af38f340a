"""DigiRL's critics: the step-level double critic (2 heads) and the trajectory critic (1 head).

Critic design (measured; benchmarks/results/web_digirl_cpu.json, `critic_timing`): the critics are a
*small separate encoder* (`critic_trunk="separate"`: a patch embedding of the 64x64 screenshot and
a bag of token embeddings of the prompt text, into MLP heads), with their own Adam optimizer, as
DigiRL's critics are their own RoBERTa + BLIP-2 models. The alternative, `critic_trunk="shared"`,
puts the heads on the policy VLM's hidden state at the last prompt token (stop-gradient, so the actor
is never pulled by the critic loss). A shared trunk needs a VLM forward pass over s and s' for every
critic step and every advantage, which grows with the policy (a 7B forward per transition at paper
size), and its features move under the critic while the actor trains; the separate encoder costs the
same at any policy size and keeps critic and actor updates independent. At the tiny CPU size the
separate critic is also the faster: one critic update (3 epochs x 32 transitions, s and s') took
0.028 s separate vs 0.48 s shared on the 2-core CPU, and scoring 64 transitions 0.013 s vs 0.39 s.
(A convolutional encoder took 3.7 s per update: convolution gradients are slow on XLA:CPU.)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PATCH = 8  # the separate critic's image patches (8x8 px of the resized screenshot)
PATCH_FEATURES = 16


class _Head(nnx.Module):
    def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(din, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.fc(x)))


class CriticNet(nnx.Module):
    """Success classifier(s): `num_heads` heads of 2-class logits on state features.

    Separate trunk (`feature_dim=None`): its own encoder of the screenshot (8x8-px patches, each
    embedded by one shared linear map, then all of them, in place, projected to `hidden`; matmuls
    only) and of the prompt text (masked mean of token embeddings). Shared trunk: heads only, on
    features the caller takes from the policy VLM.
    `__call__(images u8[B,S,S,3], ids[B,P], mask[B,P], features=None) -> logits [B, num_heads, 2]`.
    ValueError if the image size is not a multiple of the patch size.
    """

    def __init__(self, vocab_size: int, image_size: int, hidden: int, num_heads: int,
                 feature_dim: int | None = None, *, rngs: nnx.Rngs):
        self.separate = feature_dim is None
        if self.separate:
            if image_size % PATCH:
                raise ValueError(f"the critic's image size {image_size} must be a multiple of {PATCH}")
            grid = (image_size // PATCH) ** 2
            self.patch_embed = nnx.Linear(PATCH * PATCH * 3, PATCH_FEATURES, rngs=rngs)
            self.image_proj = nnx.Linear(grid * PATCH_FEATURES, hidden, rngs=rngs)
            self.embed = nnx.Embed(vocab_size, hidden, rngs=rngs)
            self.fuse = nnx.Linear(2 * hidden, hidden, rngs=rngs)
            din = hidden
        else:
            din = feature_dim
        self.heads = nnx.List([_Head(din, hidden, rngs=rngs) for _ in range(num_heads)])

    def encode(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        b, side = x.shape[0], x.shape[1] // PATCH
        patches = x.reshape(b, side, PATCH, side, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, side * side, -1)
        x = jax.nn.gelu(self.patch_embed(patches))  # [B, grid, F]: where things are is kept
        img = self.image_proj(x.reshape(b, -1))
        keep = jnp.asarray(mask).astype(bool)[..., None]
        count = jnp.maximum(keep.sum(1).astype(jnp.float32), 1.0)
        txt = jnp.where(keep, self.embed(jnp.where(keep[..., 0], ids, 0)), 0.0).sum(1) / count
        return jax.nn.gelu(self.fuse(jnp.concatenate([jax.nn.gelu(img), txt], axis=-1)))

    def __call__(self, images, ids, mask, features=None) -> jax.Array:
        h = self.encode(images, ids, mask) if self.separate else features
        return jnp.stack([head(h) for head in self.heads], axis=1)


class Critics(nnx.Module):
    """The step-level double critic (2 heads) and the trajectory-level critic (1 head)."""

    def __init__(self, step: CriticNet, trajectory: CriticNet):
        self.step = step
        self.trajectory = trajectory


def critic_logits(net: CriticNet, policy: nnx.Module | None, family: Any, image_token_id: int, images, ids, mask):
    """Logits `[B, H, 2]` of one critic on a batch of states (uint8 screenshots and prompts): its own
    encoder (separate trunk; image placeholder tokens left out of the text), or the policy family's
    stop-gradient features (shared trunk)."""
    if net.separate:
        return net(images, ids, jnp.asarray(mask).astype(bool) & (ids != image_token_id))
    return net(None, None, None, features=family.features(policy, ids, mask, family.image_inputs(images)))


def build_critics(trunk: str, vocab_size: int, image_size: int, hidden: int, policy_hidden: int, seed: int) -> Critics:
    """Both critics, initialised from NumPy (LeCun-normal kernels, zero biases, N(0, 0.1) embeddings):
    the modules' own initialisers would compile one XLA program each, tens of seconds on a small CPU."""
    feature_dim = None if trunk == "separate" else policy_hidden

    def build():
        rngs = nnx.Rngs(0)
        return Critics(CriticNet(vocab_size, image_size, hidden, 2, feature_dim, rngs=rngs),
                       CriticNet(vocab_size, image_size, hidden, 1, feature_dim, rngs=rngs))

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rs = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        name = str(path[-1])
        if name == "bias":
            x = np.zeros(abstract.shape, np.float32)
        elif name == "kernel":
            x = rs.standard_normal(abstract.shape, dtype=np.float32) / np.sqrt(np.prod(abstract.shape[:-1]))
        else:
            x = rs.standard_normal(abstract.shape, dtype=np.float32) * 0.1
        filled.append((path, var.replace(jnp.asarray(x, abstract.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
