"""DigiRL policy families (coso_jax/rl/digirl/families.py): the tiny LLaVA and the T5 / AutoUI port behind
one sampler protocol. Scores against independent per-row forwards, greedy samples against scores,
gradients, one compile per model structure, T5 padding invariance, -inf logits, image inputs."""
import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.models.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from coso_jax.tokenizer import IMAGE_TOKEN, build_bpe

ROOT = Path(__file__).resolve().parents[1]


def _load_families():
    """The module; loaded from its path while coso_jax/rl/digirl/ is not (yet) a package."""
    if (ROOT / "coso_jax/rl/digirl/__init__.py").exists():
        return importlib.import_module("coso_jax.rl.digirl.families")
    name = "_coso_digirl_families"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "coso_jax/rl/digirl/families.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


F = _load_families()
IMAGE_SIZE = 32
PROMPT_LEN, RESPONSE_LEN = 10, 5
TEMPERATURE = 0.7
GARBAGE = 10 ** 6  # masked slots may hold anything, even ids outside the vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe(["click the ok button", "type hello into the search box", "scroll down the page"] * 10, 300)


@pytest.fixture(scope="module", params=["llava", "t5"])
def setup(request, tokenizer):
    family = F.make_family(request.param, tokenizer)
    model = family.build(tokenizer, image_size=IMAGE_SIZE, seed=0, scale=0.2)
    return family, model


def make_batch(family, model, tokenizer, seed=0):
    """Two rows: prompt 3-left-padded / full, response 3 tokens (garbage after) / 5 tokens."""
    rs = np.random.RandomState(seed)
    vocab = len(tokenizer)
    k = family.num_image_tokens(model)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt_ids = np.full((2, PROMPT_LEN), GARBAGE, np.int32)
    prompt_mask = np.zeros((2, PROMPT_LEN), np.int32)
    for row, real in enumerate((7, PROMPT_LEN)):
        prompt_ids[row, PROMPT_LEN - real:] = np.r_[[image_id] * k, rs.randint(5, vocab, real - k)]
        prompt_mask[row, PROMPT_LEN - real:] = 1
    response_ids = rs.randint(5, vocab, (2, RESPONSE_LEN)).astype(np.int32)
    response_mask = np.ones((2, RESPONSE_LEN), bool)
    response_mask[0, 3:] = False
    response_ids[0, 3:] = GARBAGE
    images = rs.randint(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                response_mask=response_mask, image=images)


_plain = nnx.jit(lambda model, *args: model(*args))


def reference_logits(family, model, batch, row):
    """Row `row`'s teacher-forced logits `[n, V]` of the real response tokens, from the model's plain
    `__call__` on the unpadded row alone."""
    pm, rm = batch["prompt_mask"][row].astype(bool), batch["response_mask"][row]
    prompt, response = batch["prompt_ids"][row][pm], batch["response_ids"][row][rm]
    p, n = len(prompt), len(response)
    image = family.image_inputs(batch["image"][row:row + 1])
    if family.name == "llava":
        ids = np.r_[prompt, response][None]
        logits = _plain(model, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), image["pixel_values"])
        return np.asarray(logits, np.float64)[0, p - 1:p + n - 1]
    dec = np.r_[family.start_id, response[:-1]][None]
    logits = _plain(model, jnp.asarray(prompt[None]), jnp.ones((1, p), jnp.int32), jnp.asarray(dec), None,
                    image["image_features"])
    return np.asarray(logits, np.float64)[0]


def np_logprobs_entropies(logits, temperature):
    x = logits / temperature
    logp = x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)
    return logp, -np.sum(np.exp(logp) * logp, axis=-1)


@nnx.jit(static_argnums=0)
def _score(family, model, batch):
    return family.score(model, batch, temperature=TEMPERATURE)


@nnx.jit(static_argnums=0)
def _greedy(family, model, prompt_ids, prompt_mask, image_inputs):
    return family.sample(model, prompt_ids, prompt_mask, image_inputs, jax.random.key(0),
                         max_new_tokens=RESPONSE_LEN, temperature=TEMPERATURE, greedy=True)


def test_score_matches_plain_forward(setup, tokenizer):
    family, model = setup
    batch = make_batch(family, model, tokenizer)
    out = _score(family, model, batch)
    logprobs, entropies = (np.asarray(x) for x in out)
    assert logprobs.shape == entropies.shape == (2, RESPONSE_LEN)
    assert logprobs.dtype == entropies.dtype == np.float32
    for row in range(2):
        mask = batch["response_mask"][row]
        logp_all, ent = np_logprobs_entropies(reference_logits(family, model, batch, row), TEMPERATURE)
        want = np.take_along_axis(logp_all, batch["response_ids"][row][mask][:, None], axis=-1)[:, 0]
        np.testing.assert_allclose(logprobs[row][mask], want, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(entropies[row][mask], ent, atol=2e-5, rtol=1e-5)
        assert (logprobs[row][~mask] == 0).all() and (entropies[row][~mask] == 0).all()
    # Precomputed image inputs and the raw screenshots give the same scores.
    images = family.image_inputs(batch["image"])
    pre = _score(family, model, {**{k: v for k, v in batch.items() if k != "image"}, **images})
    np.testing.assert_allclose(np.asarray(pre.logprobs), logprobs, atol=2e-5, rtol=1e-5)


def test_greedy_sample_matches_score_and_stops_at_eos(setup, tokenizer):
    family, model = setup
    batch = make_batch(family, model, tokenizer, seed=1)
    images = family.image_inputs(batch["image"])
    out = _greedy(family, model, batch["prompt_ids"], batch["prompt_mask"], images)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens.shape == mask.shape == out.logprobs.shape == (2, RESPONSE_LEN) and tokens.dtype == np.int32
    assert (mask.sum(1) == np.asarray(out.lengths)).all()
    scored = _score(family, model, dict(batch, response_ids=tokens, response_mask=mask))
    np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(out.logprobs), atol=1e-4)
    # Greedy: every token is the argmax of the teacher-forced distribution.
    for row in range(2):
        ref = reference_logits(family, model, dict(batch, response_ids=tokens, response_mask=mask), row)
        np.testing.assert_array_equal(ref.argmax(-1), tokens[row][mask[row]])

    # With row 0's first token as EOS, row 0 stops there (EOS included, pad after).
    eos = int(tokens[0, 0])
    stop = dataclasses.replace(family, eos_id=eos)
    short = _greedy(stop, model, batch["prompt_ids"], batch["prompt_mask"], images)
    assert int(short.lengths[0]) == 1 and (np.asarray(short.tokens)[0, 1:] == family.pad_id).all()
    assert np.asarray(short.mask)[0].tolist() == [True] + [False] * (RESPONSE_LEN - 1)
    assert (np.asarray(short.logprobs)[0, 1:] == 0).all()


def test_score_gradients_finite_and_nonzero(setup, tokenizer):
    family, model = setup
    batch = make_batch(family, model, tokenizer, seed=2)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: sum(x.sum() for x in family.score(m, batch, temperature=TEMPERATURE)))(model)

    flat = {tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads(model))}
    assert all(np.isfinite(g).all() for g in flat.values())
    assert sum(float(np.square(g).sum()) for g in flat.values()) > 0
    # The screenshot reaches the loss: the image path has gradients too.
    image_part = "vision_tower" if family.name == "llava" else "image_fusion"
    image_grads = [g for path, g in flat.items() if image_part in path]
    assert image_grads and any(np.abs(g).max() > 0 for g in image_grads)


def test_jit_compiles_once_for_two_models(setup, tokenizer):
    family, model = setup
    other = family.build(tokenizer, image_size=IMAGE_SIZE, seed=1, scale=0.2)  # same structure, other weights
    batch = make_batch(family, model, tokenizer, seed=3)
    traces = []

    @nnx.jit(static_argnums=0)
    def step(fam, model, batch, key, top_p):
        traces.append(fam)  # runs only while tracing
        images = fam.image_inputs(batch["image"])
        sampled = fam.sample(model, batch["prompt_ids"], batch["prompt_mask"], images, key,
                             max_new_tokens=RESPONSE_LEN, temperature=1.0, top_p=top_p)
        return sampled, fam.score(model, dict(batch, response_ids=sampled.tokens, response_mask=sampled.mask),
                                  temperature=1.0)

    key = jax.random.key(7)
    a = step(family, model, batch, key, jnp.float32(0.9))
    b = step(family, other, batch, key, jnp.float32(0.9))
    c = step(dataclasses.replace(family), other, batch, key, jnp.float32(1.0))  # equal instance, other top_p
    assert len(traces) == 1
    for sampled, scored in (a, b, c):
        mask = np.asarray(sampled.mask)
        assert (mask.sum(1) == np.asarray(sampled.lengths)).all() and (np.asarray(sampled.logprobs) <= 0).all()
        np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(sampled.logprobs), atol=1e-4)
    assert not np.array_equal(np.asarray(a[1].entropies), np.asarray(b[1].entropies))  # really the other model


def test_t5_left_padding_equals_right_padding(tokenizer):
    family = F.make_family("t5", tokenizer)
    model = family.build(tokenizer, image_size=IMAGE_SIZE, seed=0, scale=0.2)
    left = make_batch(family, model, tokenizer, seed=4)
    right = dict(left)
    right["prompt_ids"], right["prompt_mask"] = np.full_like(left["prompt_ids"], GARBAGE), np.zeros_like(
        left["prompt_mask"])
    for row in range(2):
        real = left["prompt_ids"][row][left["prompt_mask"][row].astype(bool)]
        right["prompt_ids"][row, :len(real)], right["prompt_mask"][row, :len(real)] = real, 1
    assert not np.array_equal(left["prompt_mask"], right["prompt_mask"])  # row 0 really moved

    @nnx.jit
    def run(model, batch):
        images = family.image_inputs(batch["image"])
        return (family.score(model, batch, temperature=TEMPERATURE),
                family.features(model, batch["prompt_ids"], batch["prompt_mask"], images),
                family.sample(model, batch["prompt_ids"], batch["prompt_mask"], images, jax.random.key(0),
                              max_new_tokens=RESPONSE_LEN, temperature=1.0, greedy=True))

    (ls, lf, lg), (rs, rf, rg) = run(model, left), run(model, right)
    np.testing.assert_allclose(np.asarray(ls.logprobs), np.asarray(rs.logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ls.entropies), np.asarray(rs.entropies), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lf), np.asarray(rf), atol=1e-5)
    assert lf.shape == (2, family.hidden_size(model))
    np.testing.assert_array_equal(np.asarray(lg.tokens), np.asarray(rg.tokens))


def test_token_logprobs_and_entropies_with_inf_logits():
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 3, 6).astype(np.float32)
    logits[0, 0, [1, 4]] = -np.inf  # banned tokens
    logits[1, 2, 1:] = -np.inf  # a single allowed token: entropy exactly 0
    tokens = np.array([[0, 2, GARBAGE], [3, 5, 0]], np.int32)
    mask = np.array([[True, True, False], [True, True, True]])
    out = F.token_logprobs_and_entropies(jnp.asarray(logits), tokens, mask, 2.0)
    logp_all, ent = np_logprobs_entropies(np.where(np.isinf(logits), -1e30, logits).astype(np.float64), 2.0)
    want = np.take_along_axis(logp_all, np.where(mask, tokens, 0)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), np.where(mask, want, 0.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.entropies), np.where(mask, ent, 0.0), atol=1e-5)
    assert float(out.entropies[1, 2]) == 0.0 and float(out.entropies[0, 2]) == 0.0
    grad = jax.grad(lambda x: sum(y.sum() for y in F.token_logprobs_and_entropies(x, tokens, mask, 2.0)))(
        jnp.asarray(logits))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_image_inputs():
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    pixels = np.asarray(F.LlavaFamily(2, 0).image_inputs(images)["pixel_values"])
    want = ((images / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)).transpose(0, 3, 1, 2)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, want, atol=1e-5)

    feats = np.asarray(F.T5Family(2, 0, 0).image_inputs(images)["image_features"])
    assert feats.shape == (2, 4, 192) and feats.dtype == np.float32
    assert feats.min() >= -1.0 and feats.max() <= 1.0
    for i in range(2):
        for j in range(2):  # patch (i, j) in row-major order, flattened (row, column, channel)
            patch = images[1, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1) / 127.5 - 1.0
            np.testing.assert_allclose(feats[1, 2 * i + j], patch, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        F.screenshot_patches(np.zeros((1, 12, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        F.screenshot_patches(np.zeros((1, 16, 8, 3), np.uint8))


def test_families_are_static_settings(tokenizer):
    llava_family, t5_family = F.make_family("llava", tokenizer), F.make_family("t5", tokenizer)
    assert llava_family == F.LlavaFamily(tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert t5_family == F.T5Family(tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id)
    assert hash(t5_family) == hash(F.T5Family(tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id))
    assert isinstance(llava_family, F.PolicyFamily) and isinstance(t5_family, F.PolicyFamily)
    assert (llava_family.name, t5_family.name) == ("llava", "t5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t5_family.eos_id = 5
    with pytest.raises(ValueError, match="policy_family"):
        F.make_family("gpt", tokenizer)
    with pytest.raises(ValueError, match="multiple"):
        t5_family.build(tokenizer, image_size=36)
    model = t5_family.build(tokenizer, image_size=IMAGE_SIZE)
    cfg = model.config
    assert (cfg.vocab_size, cfg.image_feature_dim, cfg.image_fusion) == (len(tokenizer), 192, "gated_attention")
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.decoder_start_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id)
    assert t5_family.num_image_tokens(model) == 0
    ids, mask = np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        t5_family.sample(model, ids, mask, {}, jax.random.key(0), max_new_tokens=0, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        t5_family.sample(model, ids, mask, {}, jax.random.key(0), max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(KeyError, match="response_ids"):
        t5_family.score(model, {"prompt_ids": ids, "prompt_mask": mask}, temperature=1.0)
