"""Decoder LM: logit parity with transformers (Llama / Mistral / Qwen2), KV cache, presets.

(Remat gradients are checked through the scorer in test_sampling.py and in the trainer's scanned update in
test_lora.py.)
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.models import CausalLM, DecoderConfig, KVCache, from_pretrained, positions_from_mask
from coso_jax.models.llama import random_init

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256

# Eager JAX dispatches (and compiles) op by op; one jitted forward is much faster on this CPU.
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
decode = nnx.jit(lambda model, embeds, mask, positions, cache: model.decode(embeds, mask, positions, cache))


def save_tiny_hf(kind: str, path, **overrides):
    """A tiny random HF `*ForCausalLM` (eager attention) saved to `path`; returns the torch model."""
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[kind]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    model.save_pretrained(path)
    return model


def padded_batch(seed=0, batch=4, length=12):
    """Token ids and a mask with left padding (rows 0, 2), right padding (row 1) and a full row (3)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[0, :5] = 0
    mask[1, 9:] = 0
    mask[2, :1] = 0
    return ids * mask, mask


def max_valid_logit_diff(torch_model, jax_model, ids, mask):
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    out = np.asarray(forward(jax_model, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    assert out.shape == ref.shape
    # Padding positions attend to nothing real; their logits are meaningless in both frameworks.
    return float(np.abs(ref - out)[mask.astype(bool)].max())


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("mistral", {"sliding_window": 4}),  # window shorter than the sequence: exercises the band mask
    ("qwen2", {"tie_word_embeddings": True}),  # q/k/v bias + tied embeddings
])
def test_logit_parity_padded(tmp_path, kind, overrides):
    torch_model = save_tiny_hf(kind, tmp_path, **overrides)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    assert isinstance(model, CausalLM)
    if kind == "qwen2":
        assert model.lm_head is None and model.config.attention_bias
    if kind == "mistral":
        assert model.config.sliding_window == 4
    ids, mask = padded_batch()
    assert max_valid_logit_diff(torch_model, model, ids, mask) <= 1e-4


def test_llama_attention_bias_and_head_dim(tmp_path):
    """Llama's attention_bias (q/k/v/o biases) and an explicit head_dim != hidden / heads."""
    torch_model = save_tiny_hf("llama", tmp_path, attention_bias=True, head_dim=32, rope_theta=500.0)
    model = from_pretrained(tmp_path)
    assert model.config.head_dim == 32 and model.config.attention_out_bias
    ids, mask = padded_batch(seed=1)
    assert max_valid_logit_diff(torch_model, model, ids, mask) <= 1e-4


def _tiny_model(**overrides):
    cfg = DecoderConfig.tiny(vocab_size=128, hidden_size=64, intermediate_size=96, **overrides)
    return random_init(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("window", [None, 3])
def test_cache_step_by_step_equals_full_forward(window):
    model = _tiny_model(sliding_window=window)
    ids, mask = padded_batch(seed=2, length=10)
    ids, mask = jnp.asarray(ids % 128), jnp.asarray(mask)
    full = forward(model, ids, mask)
    b, t = ids.shape
    # Prefill 4 tokens at once, then one token per call.
    cache = model.init_cache(b, t + 2)
    positions = positions_from_mask(mask)
    embeds = model.embed_inputs(ids)
    pieces = []
    logits, _, cache = decode(model, embeds[:, :4], mask[:, :4], positions[:, :4], cache)
    pieces.append(logits)
    for i in range(4, t):
        logits, _, cache = decode(model, embeds[:, i:i + 1], mask[:, i:i + 1], positions[:, i:i + 1], cache)
        pieces.append(logits)
    stepped = jnp.concatenate(pieces, axis=1)
    assert int(cache.index) == t
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(stepped)[valid], np.asarray(full)[valid], atol=1e-5)


def test_decode_with_full_key_mask():
    """A [B, S] key mask (whole cache) is accepted and stored as is."""
    model = _tiny_model()
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    mask = jnp.ones((2, 6), jnp.int32)
    cache = model.init_cache(2, 8)
    key_mask = jnp.zeros((2, 8), jnp.int32).at[:, :6].set(1)
    logits, _, cache = decode(model, model.embed_inputs(ids), key_mask, positions_from_mask(mask), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(model, ids, mask)), atol=1e-5)
    assert cache.mask.shape == (2, 8) and int(cache.index) == 6


def test_cache_shape_errors():
    model = _tiny_model()
    ids = jnp.zeros((2, 3), jnp.int32)
    embeds, mask, pos = model.embed_inputs(ids), jnp.ones((2, 3)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="batch=2"):
        model.decode(embeds, mask, pos, model.init_cache(3, 8))
    with pytest.raises(ValueError, match="does not fit"):
        model.decode(embeds, mask, pos, model.init_cache(2, 2))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.decode(embeds, jnp.ones((2, 5)), pos, model.init_cache(2, 8))
    with pytest.raises(ValueError, match="max_length"):
        KVCache.create(2, 1, 0, 2, 16)


def test_bf16_compute_close_to_f32():
    model = _tiny_model()
    cfg16 = dataclasses.replace(model.config, dtype=jnp.bfloat16)
    model16 = random_init(lambda: CausalLM(cfg16, rngs=nnx.Rngs(0)))  # same (f32) params, bf16 compute
    ids, mask = padded_batch(seed=4, length=8)
    ids, mask = jnp.asarray(ids % 128), jnp.asarray(mask)
    a, b = forward(model, ids, mask), forward(model16, ids, mask)
    # The decoder runs in bf16; the output projection accumulates and returns float32.
    assert b.dtype == jnp.float32
    _, hidden, _ = decode(model16, model16.embed_inputs(ids), mask, positions_from_mask(mask), None)
    assert hidden.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(b, np.float32)))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a), atol=5e-2)


def test_preset_param_counts():
    # Counted abstractly (nnx.eval_shape): nothing is allocated.
    assert DecoderConfig.mistral_7b().num_params() == 7_242_256_384
    assert DecoderConfig.qwen2_0_5b().num_params() == 494_032_768
    tiny = DecoderConfig.tiny()
    assert tiny.text is tiny and tiny.num_params() < 2_000_000


def test_config_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig.tiny(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="text-only"):
        _tiny_model().embed_inputs(jnp.zeros((1, 2), jnp.int32), pixel_values=jnp.zeros((1, 3, 4, 4)))
