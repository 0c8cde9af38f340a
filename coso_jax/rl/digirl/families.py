"""Policy families of the DigiRL trainer: the tiny LLaVA and the T5 / AutoUI port, behind one protocol.

The trainer never touches a policy model directly: it asks its `PolicyFamily` to build one, to turn
screenshots into the model's image inputs, to sample actions and to score them (teacher-forced
log-probs and entropies for the actor loss and behaviour cloning). Two implementations:

  * `LlavaFamily` - a decoder-only VLM (coso_jax.models.llava) through coso_jax.sampling: the prompt
    holds the image placeholder tokens (`num_image_tokens(model)` of them), CLIP-normalised pixels are
    spliced in there, and the response continues the prompt.
  * `T5Family` - AutoUI, DigiRL's policy: a T5 encoder-decoder (coso_jax.models.t5) whose encoder output
    is fused with image features by AutoUI's gated attention. The prompt is the encoder input (no image
    tokens); the response is decoded from the decoder start token. AutoUI feeds frozen BLIP-2 features
    (F = 1408); here a frozen, parameter-free encoding of the screenshot stands in for them: its
    8x8-pixel patches, flattened and scaled to [-1, 1] (`screenshot_patches`, F = 192), which the
    trainable `image_dense` of the fusion projects like AutoUI's projects BLIP-2's.

Family instances are frozen dataclasses of static settings (token ids), hashable and comparable by
value: pass them as static arguments of `jax.jit` / `nnx.jit`. Every method is pure and traceable and
takes the NNX model explicitly, so the caller decides what is jitted and what is differentiated;
`sample` and `score` add no jit boundary of their own.

Shapes and conventions (both families):
  B batch; P prompt length, prompts LEFT-padded (`prompt_mask` 1 at real tokens); N response length,
  responses RIGHT-padded (`response_mask` True at real tokens, EOS included); S the square screenshot
  side in pixels; V vocabulary. Token ids int32; log-probs and entropies float32, in nats, of the
  temperature-scaled distribution softmax(logits / temperature) (top-p renormalisation excluded).
  Masked prompt / response slots are fed as id 0 whatever they hold, and outputs there are selected
  with `jnp.where` (0), never multiplied by the mask; -inf logits contribute exactly 0 to entropies,
  with finite gradients.

Usage (the trainer's side):

    family = make_family("t5", tokenizer)
    policy = family.build(tokenizer, image_size=64)
    images = family.image_inputs(screenshots_u8)                      # dict of arrays
    out = family.sample(policy, prompt_ids, prompt_mask, images, key, max_new_tokens=32,
                        temperature=1.0, top_p=1.0)                  # PolicySample
    logprobs, entropies = family.score(policy, dict(batch, **images), temperature=1.0)
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, ClassVar, Mapping, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from coso_jax import sampling
from coso_jax.models import llava, t5
from coso_jax.models.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from coso_jax.models.llama import positions_from_mask, random_init

FEATURE_PATCH = 8  # side in pixels of the T5 family's frozen screenshot patches
FEATURE_DIM = FEATURE_PATCH * FEATURE_PATCH * 3  # 192 features per patch
INIT_SCALE = 0.02  # std of the numpy-drawn initial parameters of `build`


class PolicySample(NamedTuple):
    """What `PolicyFamily.sample` returns.

    tokens `[B, N]` int32 (pad_id after a row's EOS); logprobs `[B, N]` float32, log-prob of each token
    under the temperature-scaled policy, 0 after the row ends; mask `[B, N]` bool, True for generated
    tokens (EOS included); lengths `[B]` int32, number of generated tokens (= mask.sum(1)); entropies
    `[B, N]` float32, entropy (nats) of the temperature-scaled policy at each generated position (before
    top-p), 0 after the row ends.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    entropies: jax.Array


class PolicyScore(NamedTuple):
    """What `PolicyFamily.score` returns (unpacks as `(logprobs, entropies)`).

    logprobs `[B, N]` float32, teacher-forced log-prob of each response token; entropies `[B, N]`
    float32, entropy (nats) of the policy's distribution at that step; both 0 where `response_mask`
    is False.
    """

    logprobs: jax.Array
    entropies: jax.Array


@runtime_checkable
class PolicyFamily(Protocol):
    """The sampler protocol of the DigiRL trainer (see the module docstring for conventions).

    Implementations are frozen, hashable dataclasses holding only static settings; `name` is the
    `policy_family` config value that selects them.
    """

    name: ClassVar[str]
    eos_id: int
    pad_id: int

    def build(self, tokenizer: Any, *, image_size: int, patch_size: int = 16, seed: int = 0,
              scale: float = INIT_SCALE) -> nnx.Module:
        """A freshly initialised tiny policy (the CPU preset) for `tokenizer`'s vocabulary."""
        ...

    def num_image_tokens(self, model: nnx.Module) -> int:
        """How many `<image>` placeholder tokens a prompt must contain (one image per prompt)."""
        ...

    def hidden_size(self, model: nnx.Module) -> int:
        """D of `features`."""
        ...

    def image_inputs(self, images: jax.Array) -> dict[str, jax.Array]:
        """uint8 screenshots `[B, S, S, 3]` -> the model's image inputs (a dict of arrays)."""
        ...

    def sample(self, model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array,
               image_inputs: Mapping[str, jax.Array], key: jax.Array, *, max_new_tokens: int,
               temperature: float | jax.Array, top_p: float | jax.Array = 1.0, greedy: bool = False) -> PolicySample:
        """Samples (or greedily decodes) up to `max_new_tokens` response tokens per prompt."""
        ...

    def score(self, model: nnx.Module, batch: Mapping[str, jax.Array], *,
              temperature: float | jax.Array) -> PolicyScore:
        """Teacher-forced log-probs and entropies of the batch's responses (differentiable)."""
        ...

    def features(self, model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array,
                 image_inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Stop-gradient state features `[B, D]` float32 (for a critic sharing the policy's trunk)."""
        ...


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------
def clip_pixels(images: jax.Array) -> jax.Array:
    """uint8 `[B, S, S, 3]` -> CLIP-normalised float32 `[B, 3, S, S]` (LLaVA's pixel_values)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)) / jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def screenshot_patches(images: jax.Array, patch: int = FEATURE_PATCH) -> jax.Array:
    """uint8 `[B, S, S, 3]` -> float32 `[B, (S / patch)^2, patch * patch * 3]` in [-1, 1].

    The frozen, parameter-free image encoding of the T5 family (standing in for AutoUI's frozen BLIP-2
    features): non-overlapping `patch` x `patch` pixel patches in row-major order, each flattened as
    (row, column, channel), pixel values mapped by x / 127.5 - 1.
    Raises ValueError unless the images are `[B, S, S, 3]` with S a multiple of `patch`.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"screenshots must be [B, S, S, 3], got shape {images.shape}")
    b, side = images.shape[0], images.shape[1]
    if side % patch:
        raise ValueError(f"screenshot side {side} is not a multiple of the {patch}-pixel feature patch")
    g = side // patch
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    x = x.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, patch * patch * 3)


def token_logprobs_and_entropies(logits: jax.Array, tokens: jax.Array, mask: jax.Array,
                                 temperature: float | jax.Array) -> PolicyScore:
    """Log-probs of `tokens` and entropies under softmax(logits / temperature).

    Args:
      logits: `[B, N, V]` (any float dtype; computed in float32), -inf allowed (probability 0) as long
        as each row keeps one finite logit.
      tokens: `[B, N]` int, any value where `mask` is False (looked up as id 0 there).
      mask: `[B, N]` bool / 0-1.
      temperature: > 0.
    Returns:
      `PolicyScore(logprobs [B, N], entropies [B, N])`, float32, nats, 0 where `mask` is False; finite
      values and gradients when logits contain -inf.
    """
    mask = mask.astype(jnp.bool_)
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    logp_all, entropies = sampling._logprobs_and_entropies(scaled)
    safe_tokens = jnp.where(mask, tokens, 0).astype(jnp.int32)
    logprobs = jnp.take_along_axis(logp_all, safe_tokens[..., None], axis=-1)[..., 0]
    return PolicyScore(logprobs=jnp.where(mask, logprobs, 0.0), entropies=jnp.where(mask, entropies, 0.0))


def _check_batch(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    missing = [k for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask") if k not in batch]
    if missing:
        raise KeyError(f"score: the batch lacks {missing} (it needs prompt_ids, prompt_mask, response_ids, "
                       "response_mask and the image inputs or a uint8 'image')")
    ids, pmask, resp, rmask = (batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"))
    if ids.ndim != 2 or pmask.shape != ids.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {pmask.shape} must both be [B, P]")
    if resp.ndim != 2 or rmask.shape != resp.shape or resp.shape[0] != ids.shape[0]:
        raise ValueError(f"response_ids {resp.shape} / response_mask {rmask.shape} must be [B, N] "
                         f"with B = {ids.shape[0]}")
    return ids, pmask, resp, rmask


def _check_sample_args(prompt_ids, prompt_mask, max_new_tokens: int, top_p) -> None:
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, P]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling._check_top_p(top_p)


# --------------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlavaFamily:
    """The decoder-only VLM family (tiny LLaVA, or a local HF LLaVA the caller loads itself).

    Attributes:
      eos_id: a row stops after emitting it. pad_id: fills the tokens after a row's EOS.
    Image inputs: `{"pixel_values": [B, 3, S, S] float32}` (CLIP-normalised); each prompt must hold the
    model's `num_image_tokens` `<image>` placeholders, where the image features are spliced in.
    """

    eos_id: int
    pad_id: int
    name: ClassVar[str] = "llava"
    image_key: ClassVar[str] = "pixel_values"

    def build(self, tokenizer: Any, *, image_size: int, patch_size: int = 16, seed: int = 0,
              scale: float = INIT_SCALE) -> llava.Llava:
        """The CPU preset (`coso_jax.rl.policy.tiny_llava_config`: width-64 ViT with `patch_size`-pixel
        patches on `image_size`-pixel images, 2-layer width-128 decoder, vocabulary `len(tokenizer)`),
        filled from numpy (N(0, scale), norm gains 1 + N(0, scale); `llava.random_init`)."""
        from coso_jax.rl import policy as policy_lib  # lazy: the rl package is being reorganised

        model_settings = types.SimpleNamespace(image_size=int(image_size), patch_size=int(patch_size))
        return llava.random_init(policy_lib.tiny_llava_config(model_settings, tokenizer), seed=seed, scale=scale)

    def num_image_tokens(self, model: llava.Llava) -> int:
        return int(model.config.num_image_tokens())

    def hidden_size(self, model: llava.Llava) -> int:
        return int(model.config.text.hidden_size)

    def image_inputs(self, images: jax.Array) -> dict[str, jax.Array]:
        """uint8 `[B, S, S, 3]` -> `{"pixel_values": float32 [B, 3, S, S]}` (CLIP mean/std)."""
        return {"pixel_values": clip_pixels(images)}

    def sample(self, model: llava.Llava, prompt_ids: jax.Array, prompt_mask: jax.Array,
               image_inputs: Mapping[str, jax.Array], key: jax.Array, *, max_new_tokens: int,
               temperature: float | jax.Array, top_p: float | jax.Array = 1.0, greedy: bool = False) -> PolicySample:
        """`sampling.sample_fn` (KV cache, `lax.while_loop`, stops once every row emitted EOS).

        Args:
          prompt_ids, prompt_mask: `[B, P]` left-padded. image_inputs: from `image_inputs` (may be empty:
            the `<image>` tokens then keep their token embeddings). key: PRNG key (may be traced).
          max_new_tokens: N (static). temperature: > 0 (may be traced). top_p: in (0, 1], nucleus
            sampling (1 = off). greedy: static bool, argmax instead of sampling.
        Raises:
          ValueError: bad shapes, `max_new_tokens < 1`, or a concrete `top_p` outside (0, 1].
        """
        _check_sample_args(prompt_ids, prompt_mask, max_new_tokens, top_p)
        out = sampling.sample_fn(model, None, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                                 key, pixel_values=image_inputs.get(self.image_key),
                                 image_sizes=image_inputs.get("image_sizes"), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, eos_id=self.eos_id, pad_id=self.pad_id,
                                 greedy=bool(greedy))
        return PolicySample(out.tokens, out.logprobs, out.mask, out.lengths, out.entropies)

    def score(self, model: llava.Llava, batch: Mapping[str, jax.Array], *,
              temperature: float | jax.Array) -> PolicyScore:
        """Teacher-forced `sampling.score_fn` over `[prompt, response]`.

        `batch`: prompt_ids / prompt_mask `[B, P]` (left-padded), response_ids / response_mask `[B, N]`
        (right-padded), and either "pixel_values" (from `image_inputs`) or a uint8 "image" `[B, S, S, 3]`
        (converted here); neither = no image features. Differentiable w.r.t. the model's parameters.
        Raises KeyError / ValueError for missing keys or inconsistent shapes.
        """
        ids, pmask, resp, rmask = _check_batch(batch)
        pixels = batch.get(self.image_key)
        if pixels is None and batch.get("image") is not None:
            pixels = clip_pixels(batch["image"])
        out = sampling.score_fn(model, None, jnp.asarray(ids, jnp.int32), jnp.asarray(pmask, jnp.int32),
                                jnp.asarray(resp, jnp.int32), jnp.asarray(rmask, jnp.bool_), pixel_values=pixels,
                                image_sizes=batch.get("image_sizes"), temperature=temperature)
        return PolicyScore(out.logprobs, out.entropies)

    def features(self, model: llava.Llava, prompt_ids: jax.Array, prompt_mask: jax.Array,
                 image_inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Final hidden state at the last prompt token (the one predicting the first response token),
        stop-gradient, `[B, D]` float32."""
        p = prompt_ids.shape[1]
        mask = jnp.asarray(prompt_mask, jnp.int32)
        ids = jnp.where(mask > 0, prompt_ids, 0).astype(jnp.int32)
        embeds = model.embed_inputs(ids, pixel_values=image_inputs.get(self.image_key),
                                    image_sizes=image_inputs.get("image_sizes"))
        _, hidden, _ = sampling._decode_slice(model, embeds, mask, positions_from_mask(mask), p - 1, p)
        return jax.lax.stop_gradient(hidden[:, -1].astype(jnp.float32))


# --------------------------------------------------------------------------------------------------
# T5 / AutoUI
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5Family:
    """AutoUI's encoder-decoder family (T5 with gated image fusion; see the module docstring).

    Attributes:
      eos_id: a row stops after emitting it. pad_id: fills the tokens after a row's EOS.
      start_id: the decoder start token (T5 convention: the pad id).
    Image inputs: `{"image_features": [B, (S / 8)^2, 192] float32}` (`screenshot_patches`). Prompts hold
    no image tokens (`num_image_tokens` is 0). The encoder is padding-invariant (relative positions are
    taken between real tokens), so the trainer's left-padded prompts are used as they are: a prompt
    scores the same left- or right-padded (tests/test_digirl_families.py checks it).
    """

    eos_id: int
    pad_id: int
    start_id: int
    name: ClassVar[str] = "t5"
    image_key: ClassVar[str] = "image_features"

    def config(self, vocab_size: int) -> t5.T5Config:
        """The CPU preset: `T5Config.tiny` (2+2 layers, d_model 64) with `vocab_size` tokens, this family's
        token ids, and AutoUI's gated-attention fusion of F = 192 frozen patch features."""
        return t5.T5Config.tiny(vocab_size=int(vocab_size), pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                decoder_start_token_id=self.start_id, image_feature_dim=FEATURE_DIM,
                                image_fusion="gated_attention")

    def build(self, tokenizer: Any, *, image_size: int, patch_size: int = 16, seed: int = 0,
              scale: float = INIT_SCALE) -> t5.T5EncoderDecoder:
        """`T5EncoderDecoder(self.config(len(tokenizer)))` filled from numpy (N(0, scale), layer-norm
        gains 1 + N(0, scale); `llama.random_init`, no XLA compile per initialiser).

        `patch_size` is ignored (the feature patch is fixed at 8 pixels); `image_size` must be a
        multiple of 8 (ValueError otherwise).
        """
        if image_size % FEATURE_PATCH:
            raise ValueError(f"image_size {image_size} must be a multiple of the {FEATURE_PATCH}-pixel feature patch")
        cfg = self.config(len(tokenizer))
        return random_init(lambda: t5.T5EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed=seed, scale=scale)

    def num_image_tokens(self, model: t5.T5EncoderDecoder) -> int:
        return 0

    def hidden_size(self, model: t5.T5EncoderDecoder) -> int:
        return int(model.config.d_model)

    def image_inputs(self, images: jax.Array) -> dict[str, jax.Array]:
        """uint8 `[B, S, S, 3]` -> `{"image_features": float32 [B, (S / 8)^2, 192]}` in [-1, 1]."""
        return {"image_features": screenshot_patches(images)}

    def _encode(self, model: t5.T5EncoderDecoder, prompt_ids, prompt_mask, image_features):
        mask = jnp.asarray(prompt_mask).astype(jnp.bool_)
        ids = jnp.where(mask, prompt_ids, 0).astype(jnp.int32)  # masked slots as id 0, whatever they hold
        return model.encode(ids, mask, image_features)

    def sample(self, model: t5.T5EncoderDecoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
               image_inputs: Mapping[str, jax.Array], key: jax.Array, *, max_new_tokens: int,
               temperature: float | jax.Array, top_p: float | jax.Array = 1.0, greedy: bool = False) -> PolicySample:
        """`t5.generate_fn` (encoder once, decoder with a KV cache in a `lax.while_loop`), with the token
        choice of `sampling` (greedy argmax, or nucleus + inverse-CDF draws).

        Args and errors as `LlavaFamily.sample`; image_inputs may be empty (text only).
        """
        _check_sample_args(prompt_ids, prompt_mask, max_new_tokens, top_p)
        mask = jnp.asarray(prompt_mask).astype(jnp.bool_)
        ids = jnp.where(mask, prompt_ids, 0).astype(jnp.int32)
        top_p = jnp.asarray(top_p, jnp.float32)
        out = t5.generate_fn(model, ids, mask, image_inputs.get(self.image_key), key, max_new_tokens=max_new_tokens,
                             eos_id=self.eos_id, pad_id=self.pad_id, start_id=self.start_id, temperature=temperature,
                             select=lambda scaled, k: sampling._select(scaled, k, top_p, bool(greedy)))
        return PolicySample(out.tokens, out.logprobs, out.mask, out.lengths, out.entropies)

    def score(self, model: t5.T5EncoderDecoder, batch: Mapping[str, jax.Array], *,
              temperature: float | jax.Array) -> PolicyScore:
        """Teacher-forced decoder over `[start_id, response[:-1]]` (right-padded) given the encoded prompt.

        `batch`: as `LlavaFamily.score`, with "image_features" (from `image_inputs`) or a uint8 "image".
        Differentiable w.r.t. the model's parameters. Raises KeyError / ValueError as `LlavaFamily.score`.
        """
        ids, pmask, resp, rmask = _check_batch(batch)
        feats = batch.get(self.image_key)
        if feats is None and batch.get("image") is not None:
            feats = screenshot_patches(batch["image"])
        hidden, enc_mask = self._encode(model, ids, pmask, feats)
        rmask = jnp.asarray(rmask).astype(jnp.bool_)
        resp = jnp.where(rmask, resp, 0).astype(jnp.int32)
        b = resp.shape[0]
        dec_ids = jnp.concatenate([jnp.full((b, 1), self.start_id, jnp.int32), resp[:, :-1]], axis=1)
        dec_mask = jnp.concatenate([jnp.ones((b, 1), jnp.bool_), rmask[:, :-1]], axis=1)
        logits, _, _ = model.decode(dec_ids, hidden, enc_mask, dec_mask)
        return token_logprobs_and_entropies(logits, resp, rmask, temperature)

    def features(self, model: t5.T5EncoderDecoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                 image_inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Final decoder hidden state at the start token (the one predicting the first response token),
        stop-gradient, `[B, D]` float32."""
        hidden, enc_mask = self._encode(model, prompt_ids, prompt_mask, image_inputs.get(self.image_key))
        start = jnp.full((prompt_ids.shape[0], 1), self.start_id, jnp.int32)
        _, dec_hidden, _ = model.decode(start, hidden, enc_mask)
        return jax.lax.stop_gradient(dec_hidden[:, 0].astype(jnp.float32))


FAMILIES: dict[str, type] = {LlavaFamily.name: LlavaFamily, T5Family.name: T5Family}


def make_family(name: str, tokenizer: Any) -> LlavaFamily | T5Family:
    """The family `name` ("llava" | "t5", the config's `policy_family`) with `tokenizer`'s EOS and pad
    ids (T5: decoder start = pad, as in T5). Raises ValueError for another name."""
    if name not in FAMILIES:
        raise ValueError(f"policy_family must be one of {tuple(FAMILIES)}, got {name!r}")
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    return LlavaFamily(eos, pad) if name == "llava" else T5Family(eos, pad, pad)
