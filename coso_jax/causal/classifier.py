"""The action-type classifier: CoSo's learned stand-in for the causal model a = f(y).

A small bidirectional transformer encoder (BERT-like, post-LayerNorm) maps the tokens of an action
text to logits over action-type labels (docs/design.md, step 2). Its reference size is hidden 128, 4 heads,
3 layers, FFN 512, 512 positions. Unlike the reference, which averages over *all* positions, we pool
with a masked mean, so a row's logits do not depend on its padded positions: this is what lets the
counterfactual kernel run with ``pad_invariant=True`` and score shorter sequences. Padded positions
carry no weight whatever they hold: their token ids are replaced by 0 before the embedding (an
out-of-range id would embed as NaN, and 0 * NaN poisons attention and pooling), the pooling
selects (``jnp.where``) instead of multiplying by the mask, and dropped rows of the loss are
selected away before the cross-entropy.

Public pieces:
  ``ClassifierConfig``          sizes and dropout (``ClassifierConfig.tiny`` for tests).
  ``CausalClassifier``          the NNX module: ``model(tokens[B, L], mask[B, L]) -> logits[B, C]``.
  ``make_optimizer``            ``nnx.Optimizer`` with Adam (lr 1e-5 by default, as the reference).
  ``make_train_step``           a jitted cross-entropy train step.
  ``predict_proba``             softmax probabilities, dropout off.
  ``logits_fn``                 adapts a model to ``counterfactual_effects``' ``logits_fn`` argument.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = [
    "ClassifierConfig",
    "CausalClassifier",
    "ClassifierLogitsFn",
    "make_optimizer",
    "make_train_step",
    "predict_proba",
    "logits_fn",
    "cross_entropy_loss",
]

# Added to attention scores of padded keys. Finite (not -inf) so an all-padding row gives a
# uniform softmax instead of NaN; exp(-1e9 - max) underflows to exactly 0 otherwise.
_MASKED_SCORE = -1e9


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of the classifier. Defaults are the reference's (CoSo's MiniBert)."""

    vocab_size: int
    num_labels: int
    hidden_size: int = 128
    num_heads: int = 4
    num_layers: int = 3
    ffn_size: int = 512
    max_positions: int = 512
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    # False = exact erf GELU, as torch's "gelu" activation in the reference.
    gelu_approximate: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.vocab_size < 1 or self.num_labels < 2:
            raise ValueError(
                f"ClassifierConfig needs vocab_size >= 1 and num_labels >= 2, got "
                f"vocab_size={self.vocab_size}, num_labels={self.num_labels}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, vocab_size: int, num_labels: int, **overrides) -> "ClassifierConfig":
        """A CPU-test size: hidden 32, 2 heads, 2 layers, FFN 64, 128 positions."""
        sizes = dict(hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, max_positions=128)
        sizes.update(overrides)
        return cls(vocab_size=vocab_size, num_labels=num_labels, **sizes)


# keep(key, shape, sequence_axes, rate) -> bool mask of `shape`: which elements a dropout site keeps.
# `sequence_axes` names the axes of `shape` that run over token positions (the others: batch, heads,
# features), for a mask that must match another program's at other sequence lengths
# (coso_jax.rl.causal_term's fused update). The default is jax's Bernoulli draw over `shape`.
KeepFn = Callable[[jax.Array, tuple[int, ...], tuple[int, ...], float], jax.Array]


def bernoulli_keep(key: jax.Array, shape: tuple[int, ...], sequence_axes: tuple[int, ...], rate: float) -> jax.Array:
    """The default `KeepFn`: `jax.random.bernoulli(key, 1 - rate, shape)`."""
    del sequence_axes
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None, sequence_axes: tuple[int, ...],
             keep: KeepFn = bernoulli_keep) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (inference) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    return jnp.where(keep(key, x.shape, sequence_axes, rate), x / (1.0 - rate), 0.0)


def _split_or_none(key: jax.Array | None, num: int):
    return [None] * num if key is None else list(jax.random.split(key, num))


def _gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU; the exact form is x/2 (1 + erf(x / sqrt 2)), as torch's ``gelu``.

    Written with ``erf``: ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose
    XLA:CPU expansion (two branches and an exp) makes the FFN ~10% slower. Same function; the
    two forms differ by float32 rounding (< 1e-6 absolute for |x| < 10)."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class EncoderLayer(nnx.Module):
    """Post-LN transformer encoder layer (as torch's TransformerEncoderLayer, norm_first=False)."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        hidden, ffn = config.hidden_size, config.ffn_size
        self.config = config
        # Q, K and V in one matmul: one [H, 3H] product is faster than three [H, H] ones.
        self.qkv = nnx.Linear(hidden, 3 * hidden, kernel_init=init, rngs=rngs)
        self.attn_out = nnx.Linear(hidden, hidden, kernel_init=init, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(hidden, epsilon=config.layer_norm_eps, rngs=rngs)
        self.ffn_in = nnx.Linear(hidden, ffn, kernel_init=init, rngs=rngs)
        self.ffn_out = nnx.Linear(ffn, hidden, kernel_init=init, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(hidden, epsilon=config.layer_norm_eps, rngs=rngs)

    def project_qkv(self, x: jax.Array) -> jax.Array:
        """Q, K and V of ``x`` [B, L, H] as one array [3, B, heads, L, head_dim].

        Projecting straight into this layout makes the attention's batched matmuls over
        (B, heads) run ~2x faster on CPU than einsums over a [B, L, heads, head_dim] layout.
        Each position's Q/K/V depends on that position's input only."""
        cfg = self.config
        kernel = self.qkv.kernel[...].reshape(x.shape[-1], 3, cfg.num_heads, cfg.head_dim)
        bias = self.qkv.bias[...].reshape(3, 1, cfg.num_heads, 1, cfg.head_dim)
        return jnp.einsum("blc,cshd->sbhld", x, kernel) + bias

    def __call__(self, x: jax.Array, key_bias: jax.Array, dropout_key: jax.Array | None = None,
                 *, qkv: jax.Array | None = None, keep: KeepFn = bernoulli_keep):
        """x: [B, L, H]; key_bias: [B, 1, 1, L] additive attention bias (0 or -1e9). -> [B, L, H].

        ``qkv``: ``self.project_qkv(x)`` when the caller already has it (the counterfactual
        kernel assembles it from per-row and per-position tables). ``keep``: the dropout masks' draw."""
        cfg = self.config
        hidden = x.shape[-1]
        keys = _split_or_none(dropout_key, 4)
        q, k, v = self.project_qkv(x) if qkv is None else qkv
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(cfg.head_dim) + key_bias
        # Softmax with the normalisation deferred until after the product with V: dividing the
        # [.., L, head_dim] result is cheaper than dividing [.., L, L] probabilities (same math;
        # dropout commutes with the per-row division).
        unnormalised = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        total = unnormalised.sum(axis=-1, keepdims=True)
        attended = (_dropout(unnormalised, cfg.dropout_rate, keys[0], (2, 3), keep) @ v) / total
        out_kernel = self.attn_out.kernel[...].reshape(cfg.num_heads, cfg.head_dim, hidden)
        attended = jnp.einsum("bhld,hdc->blc", attended, out_kernel) + self.attn_out.bias[...]
        x = self.attn_norm(x + _dropout(attended, cfg.dropout_rate, keys[1], (1,), keep))
        h = _gelu(self.ffn_in(x), cfg.gelu_approximate)
        h = self.ffn_out(_dropout(h, cfg.dropout_rate, keys[2], (1,), keep))
        return self.ffn_norm(x + _dropout(h, cfg.dropout_rate, keys[3], (1,), keep))


class CausalClassifier(nnx.Module):
    """Bidirectional transformer classifier over action-text tokens.

    ``model(tokens[B, L] int, mask[B, L] bool/0-1, dropout_key=None) -> logits[B, num_labels] f32``.
    Dropout is applied only when a ``dropout_key`` is given (training); inference is deterministic.
    Token ids at padded positions are ignored (any value, out-of-range ids included).
    """

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.config = config
        self.token_embed = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init,
                                     rngs=rngs)
        self.position_embed = nnx.Embed(config.max_positions, config.hidden_size,
                                        embedding_init=init, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                        rngs=rngs)
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.head = nnx.Linear(config.hidden_size, config.num_labels, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array,
                 dropout_key: jax.Array | None = None, *, keep: KeepFn = bernoulli_keep) -> jax.Array:
        """``keep``: how the dropout masks are drawn (`KeepFn`; jax's Bernoulli by default)."""
        cfg = self.config
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"CausalClassifier expects tokens [B, L] and a mask of the same shape, "
                             f"got tokens {tokens.shape} and mask {mask.shape}")
        keys = _split_or_none(dropout_key, cfg.num_layers + 2)
        valid = mask.astype(bool)
        x = _dropout(self.embed(tokens, valid), cfg.dropout_rate, keys[0], (1,), keep)
        return self.encode(x, valid, keys[1:], keep=keep)

    def embed(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
        """The first layer's input [B, L, H] (no dropout): LayerNorm(token + position embedding).

        Each position's value depends on its own token and index only; padded positions embed
        id 0, whatever they hold."""
        length = tokens.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions={self.config.max_positions}")
        tokens = jnp.where(valid, tokens, 0)  # padded slots hold anything; id 0 embeds finitely
        x = self.token_embed(tokens) + self.position_embed(jnp.arange(length))[None]
        return self.embed_norm(x)

    def encode(self, x: jax.Array, valid: jax.Array, dropout_keys=None, *,
               first_qkv: jax.Array | None = None, keep: KeepFn = bernoulli_keep) -> jax.Array:
        """Logits [B, num_labels] from the embedded input ``x`` [B, L, H] and bool ``valid``
        [B, L]. ``dropout_keys``: num_layers + 1 keys (or None); ``first_qkv``: the first layer's
        ``project_qkv(x)``, when the caller has it; ``keep``: the dropout masks' draw."""
        cfg = self.config
        keys = [None] * (cfg.num_layers + 1) if dropout_keys is None else dropout_keys
        key_bias = jnp.where(valid, 0.0, _MASKED_SCORE).astype(x.dtype)[:, None, None, :]
        for index, (layer, key) in enumerate(zip(self.layers, keys[:-1])):
            x = layer(x, key_bias, key, qkv=first_qkv if index == 0 else None, keep=keep)
        # Masked mean pooling: padded positions never reach the logits (pad invariance).
        count = valid.astype(x.dtype).sum(axis=1)[..., None]
        pooled = jnp.where(valid[..., None], x, 0.0).sum(axis=1) / jnp.maximum(count, 1.0)
        return self.head(_dropout(pooled, cfg.dropout_rate, keys[-1], (), keep))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy. logits [B, C], labels [B] int, weights [B] (e.g. valid rows).

    sum_b w_b CE_b / max(sum_b w_b, 1). Rows with weight 0 are selected away before the
    cross-entropy, so their logits and labels (NaN, -1 for an unparseable text) carry no weight
    and give a zero, finite gradient. float32 scalar.
    """
    if weights is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    weights = weights.astype(logits.dtype)
    keep = weights != 0
    per_row = optax.softmax_cross_entropy_with_integer_labels(
        jnp.where(keep[:, None], logits, 0.0), jnp.where(keep, labels, 0))
    return jnp.where(keep, per_row * weights, 0.0).sum() / jnp.maximum(weights.sum(), 1.0)


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # One transformation object per learning rate: `nnx.jit` keys its cache on the optimizer's graph,
    # which holds `tx` as static data compared by identity, so a fresh `optax.adam` per optimizer made
    # every new classifier (each run of a grid) recompile the train step (~12 s per run on 2 cores).
    return optax.adam(learning_rate)


def make_optimizer(model: CausalClassifier, learning_rate: float = 1e-5,
                   tx: optax.GradientTransformation | None = None) -> nnx.Optimizer:
    """Adam over the model's parameters (reference: lr 1e-5).

    Optimizers made here with the same learning rate share one `tx`, so a train step compiled for
    one classifier serves every other of the same structure."""
    return nnx.Optimizer(model, tx if tx is not None else _adam(float(learning_rate)), wrt=nnx.Param)


def make_train_step() -> Callable:
    """Returns a jitted ``step(model, optimizer, tokens, mask, labels, dropout_key, weights=None)``.

    One Adam step of cross-entropy on a batch; updates ``model`` and ``optimizer`` in place and
    returns ``(loss, accuracy)`` as float32 scalars. ``weights`` [B] (optional) drops rows, e.g.
    unparseable texts, without changing the batch shape (so no recompiles).
    """

    def loss_fn(model, tokens, mask, labels, dropout_key, weights):
        logits = model(tokens, mask, dropout_key=dropout_key)
        return cross_entropy_loss(logits, labels, weights), logits

    @nnx.jit
    def step(model, optimizer, tokens, mask, labels, dropout_key, weights=None):
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
            model, tokens, mask, labels, dropout_key, weights)
        optimizer.update(model, grads)
        correct = (logits.argmax(-1) == labels).astype(jnp.float32)
        if weights is None:
            accuracy = correct.mean()
        else:
            w = weights.astype(jnp.float32)
            accuracy = jnp.where(w != 0, correct * w, 0.0).sum() / jnp.maximum(w.sum(), 1.0)
        return loss, accuracy

    return step


@nnx.jit
def predict_proba(model: CausalClassifier, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Class probabilities [B, num_labels] (float32), dropout off."""
    return jax.nn.softmax(model(tokens, mask).astype(jnp.float32), axis=-1)


@jax.tree_util.register_pytree_node_class
class ClassifierLogitsFn:
    """``(tokens[N, L], mask[N, L]) -> logits[N, C]`` for a fixed classifier, as a pytree.

    The parameters are pytree leaves and the graph definition is static, so the kernel can pass
    it into ``jax.jit`` as an ordinary argument: a new model with new weights (same structure)
    reuses the compiled code instead of recompiling, as a fresh closure would.
    """

    def __init__(self, graphdef, state):
        self.graphdef = graphdef
        self.state = state

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.model()(tokens, mask)

    def model(self) -> "CausalClassifier":
        """The classifier (``nnx.merge`` of the graph definition and the weights)."""
        return nnx.merge(self.graphdef, self.state)

    def tree_flatten(self):
        return (self.state,), self.graphdef

    @classmethod
    def tree_unflatten(cls, graphdef, children):
        return cls(graphdef, children[0])


def logits_fn(model: CausalClassifier) -> ClassifierLogitsFn:
    """Adapts ``model`` to ``counterfactual_effects``' ``logits_fn`` (a snapshot of its weights)."""
    graphdef, state = nnx.split(model)
    return ClassifierLogitsFn(graphdef, state)
