"""KV-cache sampler and teacher-forced scorer for any policy model of docs/contracts.md.

Two layers:
  * pure functions `sample_fn`, `score_fn` (and the phases `prefill_fn`, `generate_fn`): plain
    traceable code taking the NNX model as an argument. Use these *inside* your own `jax.jit` /
    `nnx.jit` / `jax.grad` — e.g. the PPO update merges its params and calls
    `score_fn(model.policy, model.value_head, ...)` under `jax.value_and_grad`; `score_fn` is
    differentiable w.r.t. the model parameters and adds no jit boundary of its own.
  * jitted wrappers `sample`, `score` with the same signatures, for callers outside jit (rollouts,
    evaluation, tests). They split the model into (graphdef, state) and call `jax.jit`-compiled
    phases keyed on the static graphdef and shapes: the prefill, and the decode loop (a
    `lax.while_loop` over the donated, preallocated cache). Temperature, top-p, eos and pad ids are
    traced values, so changing them does not recompile. Every trace of a jitted phase increments
    `compile_counts()[phase]` (a Python side effect that only runs while tracing).

Shapes: B batch, P prompt length (left-padded), N = max_new_tokens / response length (right-padded),
V vocabulary, D hidden size.

Masked slots carry no weight, whatever they hold: token ids at masked prompt/response positions are
replaced by id 0 before the embedding (an out-of-range id embeds as NaN, and NaN values at a masked
key still poison attention through 0 * NaN), and outputs there are selected (`jnp.where`), never
multiplied by the mask. -inf logits (tokens banned by constraints) are probability 0: they contribute
exactly 0 to entropies, with finite gradients (double-where), and are never drawn.
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from coso_jax.models.kv_cache import KVCache
from coso_jax.models.llama import positions_from_mask

log = logging.getLogger(__name__)

_TRACES: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
    """How many times each jitted phase ("prefill", "generate", "score") has been traced."""
    return dict(_TRACES)


def _note_trace(phase: str, **shapes: Any) -> None:
    _TRACES[phase] += 1
    log.info("sampling: tracing %s (#%d) %s", phase, _TRACES[phase], shapes)


class SampleOutput(NamedTuple):
    tokens: jax.Array    # [B, N] int32, pad_id after EOS
    logprobs: jax.Array  # [B, N] float32, log-prob of each token under the temperature-scaled policy; 0 at pad
    mask: jax.Array      # [B, N] bool, True for generated tokens (EOS included)
    lengths: jax.Array   # [B] int32, number of generated tokens
    values: jax.Array    # [B] float32, value head at the last prompt token (0 without a head)
    # [B, N] float32, entropy (nats) of the temperature-scaled next-token distribution at each generated
    # position, before top-p filtering (the distribution `ScoreOutput.entropies` scores); 0 at pad.
    entropies: jax.Array


class GenerateOutput(NamedTuple):
    """`generate_fn`'s result. The first five fields keep the order of the tuple it used to return."""

    tokens: jax.Array     # [B, N] int32, pad_id after EOS
    logprobs: jax.Array   # [B, N] float32, temperature-scaled, before top-p; 0 at pad
    mask: jax.Array       # [B, N] bool, True for generated tokens (EOS included)
    lengths: jax.Array    # [B] int32
    cache: KVCache        # the final cache
    entropies: jax.Array  # [B, N] float32, temperature-scaled, before top-p; 0 at pad


class ScoreOutput(NamedTuple):
    logprobs: jax.Array   # [B, N] float32, teacher-forced, temperature-scaled; 0 where response_mask is False
    entropies: jax.Array  # [B, N] float32, entropy (nats) of the temperature-scaled distribution; 0 at pad
    values: jax.Array     # [B] float32, value head at the last prompt token (0 without a head)


# --------------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------------
def _top_p_filter(scaled_logits: jax.Array, top_p: jax.Array, iters: int = 32) -> jax.Array:
    """Sets logits outside the nucleus to -inf. `[B, V]`.

    The nucleus keeps token i iff the mass of strictly more probable tokens is < top_p. Rather than
    sorting the vocabulary (a full sort is ~15x slower than everything else in a decode step on
    XLA:CPU), bisect the probability threshold: the kept set is {p > lo} where mass(p > lo) >= top_p
    and mass(p > hi) < top_p, with hi - lo < max_p * 2^-iters. Only tokens whose probabilities tie
    within that resolution can differ from the sorted version. The most probable token(s) always
    stay, whatever `top_p` is (even <= 0, where the bisection alone would keep nothing), so a row is
    never all -inf; tokens already at -inf (probability 0) are never kept.
    """
    probs = jax.nn.softmax(scaled_logits, axis=-1)
    lo = jnp.zeros(probs.shape[:-1] + (1,), probs.dtype)
    top = jnp.max(probs, axis=-1, keepdims=True)
    hi = top  # mass(p > max_p) = 0 < top_p

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = jnp.sum(jnp.where(probs > mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, step, (lo, hi))
    return jnp.where((probs > lo) | (probs >= top), scaled_logits, -jnp.inf)


def _check_top_p(top_p) -> None:
    """Rejects a concrete `top_p` outside (0, 1] (NaN included); traced values pass unchecked."""
    if isinstance(top_p, jax.core.Tracer):
        return
    value = float(top_p)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {value}")


def _logprobs_and_entropies(scaled_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log_softmax and entropy (nats) of temperature-scaled logits `[..., V]` (float32).

    Returns (log-probs `[..., V]`, entropies `[...]`), H = -sum_v p(v) log p(v). A -inf logit has
    log p = -inf and contributes exactly 0 (not 0 * -inf = NaN); the double `jnp.where` keeps the
    gradient finite too. A row needs at least one finite logit.
    """
    logp = jax.nn.log_softmax(scaled_logits, axis=-1)
    return logp, _entropy(logp)


def _finite_logp(logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(finite [..., V], log p with 0 at the -inf entries): what lets -inf logits contribute exactly 0."""
    finite = logp > -jnp.inf
    return finite, jnp.where(finite, logp, 0.0)


def _entropy(logp: jax.Array) -> jax.Array:
    """-sum p log p over the last axis of log-probs `[..., V]`; -inf entries add exactly 0."""
    finite, safe = _finite_logp(logp)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


@jax.custom_vjp
def _token_logprobs_and_entropies(scaled_logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(log_softmax(s)[token], entropy(s))` of temperature-scaled logits `s` `[..., V]` (float32) and
    token ids `[...]`: what `_logprobs_and_entropies` gives at the tokens, without a `[..., V]` array
    of log-probs in the forward or a chain of them in the backward.

    Forward: the log-sum-exp (max, then sum of exp), then the entropy -sum p log p as one fused reduction
    of log p = s - lse. Backward (one fused pass over the vocabulary, from s, lse and H): d log p(tok) / ds
    = onehot(tok) - p and dH / ds = -p (log p + H). -inf logits have p = 0 and contribute exactly 0
    (selected, not multiplied) to both, as in `_logprobs_and_entropies`."""
    return _token_logprobs_and_entropies_fwd(scaled_logits, tokens)[0]


def _log_softmax_parts(scaled_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, log-sum-exp of s - max) over the last axis, keepdims: log p = (s - max) - log_z, the same
    arithmetic as `jax.nn.log_softmax`."""
    top = jax.lax.stop_gradient(jnp.max(scaled_logits, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return top, jnp.log(jnp.sum(jnp.exp(scaled_logits - top), axis=-1, keepdims=True))


def _token_logprobs_and_entropies_fwd(scaled_logits, tokens):
    top, log_z = _log_softmax_parts(scaled_logits)
    entropies = _entropy((scaled_logits - top) - log_z)
    token_logp = (jnp.take_along_axis(scaled_logits, tokens[..., None], axis=-1) - top - log_z)[..., 0]
    return (token_logp, entropies), (scaled_logits, tokens, top, log_z, entropies)


def _token_logprobs_and_entropies_bwd(residuals, cotangents):
    scaled_logits, tokens, top, log_z, entropies = residuals
    g_logp, g_entropy = cotangents
    finite, safe = _finite_logp((scaled_logits - top) - log_z)
    p = jnp.where(finite, jnp.exp(safe), 0.0)
    onehot = (jnp.arange(scaled_logits.shape[-1]) == tokens[..., None]).astype(p.dtype)
    grad = g_logp[..., None] * (onehot - p) - g_entropy[..., None] * (p * (safe + entropies[..., None]))
    return grad, None


_token_logprobs_and_entropies.defvjp(_token_logprobs_and_entropies_fwd, _token_logprobs_and_entropies_bwd)


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) `[B, V]` by inverse CDF (one uniform per row).

    Exact up to float32 rounding of the cumulative sum; ~4x cheaper on CPU than
    `jax.random.categorical`, which draws V Gumbel variates per row. -inf logits are never drawn
    (their CDF step is empty).
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.random.uniform(key, cdf.shape[:-1] + (1,), cdf.dtype) * cdf[..., -1:]
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def _select(scaled_logits: jax.Array, key: jax.Array, top_p: jax.Array, greedy: bool) -> jax.Array:
    """Next tokens `[B]` int32 from temperature-scaled logits `[B, V]`."""
    if greedy:
        return jnp.argmax(scaled_logits, axis=-1).astype(jnp.int32)
    filtered = jax.lax.cond(top_p < 1.0, _top_p_filter, lambda x, _: x, scaled_logits, top_p)
    return _categorical(key, filtered)


def _value(value_head, hidden_last: jax.Array) -> jax.Array:
    if value_head is None:
        return jnp.zeros(hidden_last.shape[:1], jnp.float32)
    return value_head(hidden_last).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _accepts_logits_slice(model_type: type) -> bool:
    return "logits_slice" in inspect.signature(model_type.decode).parameters


def _decode_slice(model, embeds, mask, positions, start: int, stop: int, **kwargs):
    """`model.decode` with logits only for positions start..stop-1 (`logits_slice` when the model
    supports it, else full logits sliced afterwards)."""
    if _accepts_logits_slice(type(model)):
        return model.decode(embeds, mask, positions, logits_slice=(start, stop), **kwargs)
    logits, hidden, cache = model.decode(embeds, mask, positions, **kwargs)
    return logits[:, start:stop], hidden, cache


def _check_prompt(prompt_ids, prompt_mask):
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, P]")


# --------------------------------------------------------------------------------------------------
# Pure phases
# --------------------------------------------------------------------------------------------------
def prefill_fn(model, value_head, prompt_ids, prompt_mask, *, pixel_values=None, image_sizes=None,
               max_new_tokens: int) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Runs the left-padded prompt through the model into a fresh cache of length P + N.

    Returns (cache, last_logits `[B, V]` float32, values `[B]`, next_positions `[B]` int32).
    """
    _check_prompt(prompt_ids, prompt_mask)
    b, p = prompt_ids.shape
    # Padded prompt slots are embedded as id 0, whatever they hold (see the module docstring).
    prompt_ids = jnp.where(prompt_mask.astype(jnp.bool_), prompt_ids, 0)
    embeds = model.embed_inputs(prompt_ids, pixel_values=pixel_values, image_sizes=image_sizes)
    positions = positions_from_mask(prompt_mask)
    cache = model.init_cache(b, p + max_new_tokens)
    # Left padding: the last column is every row's last prompt token.
    logits, hidden, cache = _decode_slice(model, embeds, prompt_mask, positions, p - 1, p, cache=cache)
    next_positions = jnp.sum(prompt_mask.astype(jnp.int32), axis=-1)
    return cache, logits[:, -1].astype(jnp.float32), _value(value_head, hidden[:, -1]), next_positions


def generate_fn(model, cache: KVCache, last_logits, next_positions, rng, *, max_new_tokens: int, temperature,
                top_p=1.0, eos_id, pad_id, greedy: bool = False) -> GenerateOutput:
    """Decode loop (`lax.while_loop`) from a prefilled cache; stops early once every row hit EOS.

    `top_p` must be in (0, 1] (ValueError when concrete; see `sample`).
    Returns `GenerateOutput(tokens [B, N], logprobs [B, N], mask [B, N], lengths [B], cache,
    entropies [B, N])`; log-probs and entropies are of the temperature-scaled distribution before
    top-p filtering (what `score` computes teacher-forced), 0 at padded positions.
    """
    _check_top_p(top_p)
    b = last_logits.shape[0]
    n = max_new_tokens
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    eos_id = jnp.asarray(eos_id, jnp.int32)
    pad_id = jnp.asarray(pad_id, jnp.int32)

    def cond(state):
        i, _, _, _, done, *_ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, logits, positions, done, tokens, logprobs, entropies, mask, rng = state
        rng, key = jax.random.split(rng)
        scaled = logits / temperature
        logp, entropy = _logprobs_and_entropies(scaled)
        tok = _select(scaled, key, top_p, greedy)
        active = ~done
        tok = jnp.where(active, tok, pad_id)
        # Finished rows look up and feed id 0, not pad_id (which may lie outside the vocabulary).
        fed = jnp.where(active, tok, 0)
        tok_logp = jnp.take_along_axis(logp, fed[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, i].set(tok)
        logprobs = logprobs.at[:, i].set(jnp.where(active, tok_logp, 0.0))
        entropies = entropies.at[:, i].set(jnp.where(active, entropy, 0.0))
        mask = mask.at[:, i].set(active)
        done = done | (active & (tok == eos_id))
        # Feed the token back. The last iteration's decode is wasted work (1/N of the loop), but an
        # unconditional body keeps the loop simple and the cache has room for it (P + N slots).
        embeds = model.embed_inputs(fed[:, None])
        new_logits, _, cache = model.decode(embeds, active[:, None], positions[:, None], cache)
        return (i + 1, cache, new_logits[:, -1].astype(jnp.float32), positions + 1, done, tokens, logprobs,
                entropies, mask, rng)

    state = (jnp.zeros((), jnp.int32), cache, last_logits.astype(jnp.float32), next_positions.astype(jnp.int32),
             jnp.zeros((b,), jnp.bool_), jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.bool_), rng)
    _, cache, _, _, _, tokens, logprobs, entropies, mask, _ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, logprobs, mask, jnp.sum(mask, axis=-1, dtype=jnp.int32), cache, entropies)


def sample_fn(model, value_head, prompt_ids, prompt_mask, rng, *, pixel_values=None, image_sizes=None,
              max_new_tokens: int, temperature: float, top_p: float = 1.0, eos_id: int, pad_id: int,
              greedy: bool = False) -> SampleOutput:
    """Pure (un-jitted) sampler; see `sample` (same arguments and errors)."""
    _check_top_p(top_p)
    cache, last_logits, values, next_positions = prefill_fn(
        model, value_head, prompt_ids, prompt_mask, pixel_values=pixel_values, image_sizes=image_sizes,
        max_new_tokens=max_new_tokens)
    out = generate_fn(
        model, cache, last_logits, next_positions, rng, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, eos_id=eos_id, pad_id=pad_id, greedy=greedy)
    return SampleOutput(out.tokens, out.logprobs, out.mask, out.lengths, values, out.entropies)


def score_fn(model, value_head, prompt_ids, prompt_mask, response_ids, response_mask, *, pixel_values=None,
             image_sizes=None, temperature: float, remat: bool = False) -> ScoreOutput:
    """Pure (un-jitted, differentiable) teacher-forced scorer; see `score`."""
    _check_prompt(prompt_ids, prompt_mask)
    if response_ids.ndim != 2 or response_mask.shape != response_ids.shape or response_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"response_ids {response_ids.shape} / response_mask {response_mask.shape} must be [B, N] "
                         f"with B = {prompt_ids.shape[0]}")
    p, n = prompt_ids.shape[1], response_ids.shape[1]
    resp_mask = response_mask.astype(jnp.bool_)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), resp_mask.astype(jnp.int32)], axis=1)
    # Masked slots are embedded (and looked up) as id 0, whatever they hold.
    response_ids = jnp.where(resp_mask, response_ids, 0).astype(jnp.int32)
    prompt_ids = jnp.where(prompt_mask > 0, prompt_ids, 0).astype(jnp.int32)
    # Image features go into the prompt's image tokens only. A response may hold the image token id (an
    # under-trained policy can emit it); the sampler fed it back as a plain token embedding, so the scorer
    # does too. Splicing over the whole sequence would count it as an image slot: a count error outside
    # jit, and under jit every later row's features shifted by one.
    embeds = jnp.concatenate([model.embed_inputs(prompt_ids, pixel_values=pixel_values, image_sizes=image_sizes),
                              model.embed_inputs(response_ids)], axis=1)
    kwargs = {"remat": True} if remat else {}
    # The logits at position t predict token t + 1: response token j is predicted at P - 1 + j.
    logits, hidden, _ = _decode_slice(model, embeds, mask, positions_from_mask(mask), p - 1, p + n - 1, **kwargs)
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    logprobs, entropies = _token_logprobs_and_entropies(scaled, response_ids)
    return ScoreOutput(
        logprobs=jnp.where(resp_mask, logprobs, 0.0),
        entropies=jnp.where(resp_mask, entropies, 0.0),
        values=_value(value_head, hidden[:, p - 1]),
    )


def score_batch_fn(model, value_head, batch, *, temperature: float, remat: bool = False) -> ScoreOutput:
    """`score_fn` on a batch dict with the keys `prompt_ids`, `prompt_mask`, `response_ids`,
    `response_mask`, `pixel_values` and optionally `image_sizes` (the trainer's batch layout)."""
    return score_fn(model, value_head, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                    batch["response_mask"], pixel_values=batch.get("pixel_values"),
                    image_sizes=batch.get("image_sizes"), temperature=temperature, remat=remat)


# --------------------------------------------------------------------------------------------------
# Jitted wrappers
# --------------------------------------------------------------------------------------------------
def _split(module):
    return (None, None) if module is None else nnx.split(module)


def _merge(graphdef, state):
    return None if graphdef is None else nnx.merge(graphdef, state)


def _prefill_split(gd, st, vgd, vst, prompt_ids, prompt_mask, pixel_values, image_sizes, *, max_new_tokens):
    _note_trace("prefill", prompt=prompt_ids.shape, max_new_tokens=max_new_tokens)
    return prefill_fn(_merge(gd, st), _merge(vgd, vst), prompt_ids, prompt_mask, pixel_values=pixel_values,
                      image_sizes=image_sizes, max_new_tokens=max_new_tokens)


def _generate_split(gd, st, cache, last_logits, next_positions, rng, temperature, top_p, eos_id, pad_id, *,
                    max_new_tokens, greedy):
    _note_trace("generate", batch=last_logits.shape[0], max_new_tokens=max_new_tokens, greedy=greedy)
    return generate_fn(_merge(gd, st), cache, last_logits, next_positions, rng, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id, greedy=greedy)


def _score_split(gd, st, vgd, vst, prompt_ids, prompt_mask, response_ids, response_mask, pixel_values, image_sizes,
                 temperature, *, remat):
    _note_trace("score", prompt=prompt_ids.shape, response=response_ids.shape, remat=remat)
    return score_fn(_merge(gd, st), _merge(vgd, vst), prompt_ids, prompt_mask, response_ids, response_mask,
                    pixel_values=pixel_values, image_sizes=image_sizes, temperature=temperature, remat=remat)


_prefill_jit = jax.jit(_prefill_split, static_argnames=("gd", "vgd", "max_new_tokens"))
# The cache (argument 2) is donated: the while_loop updates it in place.
_generate_jit = jax.jit(_generate_split, static_argnames=("gd", "max_new_tokens", "greedy"), donate_argnums=(2,))
_score_jit = jax.jit(_score_split, static_argnames=("gd", "vgd", "remat"))


def sample(model, value_head, prompt_ids, prompt_mask, rng, *, pixel_values=None, image_sizes=None,
           max_new_tokens: int, temperature: float, top_p: float = 1.0, eos_id: int, pad_id: int,
           greedy: bool = False) -> SampleOutput:
    """Samples up to `max_new_tokens` tokens per row from a left-padded prompt batch.

    Args:
      model: policy model (`CausalLM`, LLaVA...) per docs/contracts.md; value_head: `ValueHead` or None.
      prompt_ids, prompt_mask: `[B, P]`, left-padded. rng: a PRNG key.
      pixel_values, image_sizes: passed to `model.embed_inputs` (VLMs).
      temperature: > 0; log-probs are of softmax(logits / temperature). top_p: nucleus sampling, in
        (0, 1] (1 = off; a tiny top_p keeps only the most probable token, i.e. greedy); the returned
        log-probs exclude the top-p renormalisation. greedy: argmax instead of sampling.
      eos_id: a row stops after emitting it (EOS included in the mask); pad_id fills the rest.
    Returns:
      `SampleOutput` (tokens, logprobs, mask, lengths, values, entropies); `entropies` are those of
      the temperature-scaled distribution before top-p filtering, equal to `score`'s on the sampled
      tokens, so the trainer needs no second forward pass for them.
    Raises:
      ValueError: `max_new_tokens < 1`, or `top_p` outside (0, 1] (NaN included), also with greedy.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_top_p(top_p)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    gd, st = _split(model)
    vgd, vst = _split(value_head)
    cache, last_logits, values, next_positions = _prefill_jit(
        gd, st, vgd, vst, prompt_ids, prompt_mask, pixel_values, image_sizes, max_new_tokens=max_new_tokens)
    out = _generate_jit(
        gd, st, cache, last_logits, next_positions, rng, jnp.float32(temperature), jnp.float32(top_p),
        jnp.int32(eos_id), jnp.int32(pad_id), max_new_tokens=max_new_tokens, greedy=bool(greedy))
    return SampleOutput(out.tokens, out.logprobs, out.mask, out.lengths, values, out.entropies)


def score(model, value_head, prompt_ids, prompt_mask, response_ids, response_mask, *, pixel_values=None,
          image_sizes=None, temperature: float, remat: bool = False) -> ScoreOutput:
    """Teacher-forced log-probs and entropies of `response_ids` given the prompt, and the value.

    Args:
      prompt_ids, prompt_mask: `[B, P]` left-padded; response_ids, response_mask: `[B, N]` right-padded.
      temperature: the sampling temperature (log-probs of softmax(logits / temperature)).
      remat: rematerialise decoder layers in the backward pass.
    Returns:
      `ScoreOutput(logprobs [B, N], entropies [B, N], values [B])`, zeros where `response_mask` is False
      (whatever `response_ids` holds there). A -inf logit contributes exactly 0 to the entropy.
      Image features fill the prompt's image tokens only: an image token id in the response is embedded as
      a plain token, as the sampler fed it.
    Inside your own jit/grad, call `score_fn` instead (same signature, no jit boundary).
    """
    gd, st = _split(model)
    vgd, vst = _split(value_head)
    return _score_jit(gd, st, vgd, vst, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                      jnp.asarray(response_ids, jnp.int32), jnp.asarray(response_mask, jnp.bool_), pixel_values,
                      image_sizes, jnp.float32(temperature), remat=bool(remat))
