"""T5 encoder-decoder: logit and greedy-generation parity with transformers, image features, HF import."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.models import hf_import, t5
from coso_jax.models.llama import random_init

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
FEAT = 24  # image feature dim of the multimodal tests

# One jitted forward (eager JAX compiles op by op: far slower on this CPU).
forward = nnx.jit(lambda model, ids, mask, dec, dec_mask, img: model(ids, mask, dec, dec_mask, img))


def hf_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,  # log buckets at T ~ 12
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.T5Config(**kwargs)


def tiny_hf_t5(path=None, *, weight_std=None, **overrides):
    """A tiny random HF `T5ForConditionalGeneration`, saved to `path` if given. `weight_std` redraws every
    non-norm weight from N(0, std) (HF's init makes a tiny model's greedy output one repeated token)."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config(**overrides)).eval()
    if weight_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" not in name:
                    p.normal_(0.0, weight_std)
    if path is not None:
        model.save_pretrained(path)
    return model


def batch(seed=0, b=3, t=11, t_dec=7):
    """Encoder ids/mask with left padding (row 0), right padding (row 1), a full row (2); decoder ids with
    the start token first and a right-padded decoder mask (row 1)."""
    rs = np.random.RandomState(seed)
    mask = np.ones((b, t), np.int64)
    mask[0, :4] = 0
    mask[1, 8:] = 0
    ids = rs.randint(2, VOCAB, (b, t)) * mask
    dec = rs.randint(2, VOCAB, (b, t_dec))
    dec[:, 0] = 0
    dec_mask = np.ones((b, t_dec), np.int64)
    dec_mask[1, 5:] = 0
    return ids, mask, dec, dec_mask


def jax_logits(model, ids, mask, dec, dec_mask=None, img=None):
    as_jnp = lambda x: None if x is None else jnp.asarray(x)
    return np.asarray(forward(model, as_jnp(ids), as_jnp(mask), as_jnp(dec), as_jnp(dec_mask), as_jnp(img)))


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-700, 700)
    cases = [(bi, buckets, distance) for bi in (True, False) for buckets, distance in ((32, 128), (8, 20), (16, 64))]
    ours = jax.jit(lambda r: [t5.relative_position_bucket(r, bidirectional=bi, num_buckets=n, max_distance=m)
                              for bi, n, m in cases])(jnp.asarray(rel))  # one compile for all cases
    for (bi, n, m), got in zip(cases, ours):
        ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bi, num_buckets=n,
                                                    max_distance=m).numpy()
        np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"bidirectional={bi} buckets={n} max={m}")


@pytest.mark.parametrize("ffn,tie,use_registry", [
    ("relu", True, True),  # original T5: tied embeddings, output scaled by d_model**-0.5; hf_import registry
    ("gated-gelu", False, False),  # T5 v1.1 / FLAN: no output scaling (transformers 5 still ties the matrix)
])
def test_logit_parity_padded(tmp_path, monkeypatch, ffn, tie, use_registry):
    torch_model = tiny_hf_t5(tmp_path, feed_forward_proj=ffn, tie_word_embeddings=tie, num_decoder_layers=3)
    if use_registry:  # the family protocol of coso_jax.models.hf_import (FAMILIES["t5"] once registered)
        monkeypatch.setitem(hf_import.FAMILIES, "t5", "coso_jax.models.t5")
        model = hf_import.from_pretrained(tmp_path)
    else:
        model = t5.from_hf_dir(tmp_path)
    assert isinstance(model, t5.T5EncoderDecoder)
    assert model.config.feed_forward_proj == ffn and model.config.num_decoder_layers == 3
    assert model.config.scale_decoder_outputs == tie
    ids, mask, dec, dec_mask = batch()
    dec_mask = dec_mask if ffn == "relu" else None  # both: decoder padding and HF's default (all valid)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          decoder_input_ids=torch.tensor(dec),
                          decoder_attention_mask=None if dec_mask is None else torch.tensor(dec_mask)).logits.numpy()
    out = jax_logits(model, ids, mask, dec, dec_mask)
    assert out.shape == ref.shape == (3, 7, VOCAB)
    valid = np.ones(dec.shape, bool) if dec_mask is None else dec_mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-4


def test_greedy_generate_matches_hf(tmp_path):
    torch_model = tiny_hf_t5(tmp_path, feed_forward_proj="gated-gelu", weight_std=1.0)
    model = t5.from_hf_dir(tmp_path)
    ids, mask, _, _ = batch(seed=0)
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                  do_sample=False, num_beams=1, pad_token_id=0)
    with torch.no_grad():
        free = torch_model.generate(**kwargs, eos_token_id=None).numpy()[:, 1:]
    eos = int(free[0, 3])  # an EOS that stops row 0 early (the other rows may or may not meet it)
    with torch.no_grad():
        hf_out = torch_model.generate(**kwargs, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    ref = hf_out.sequences.numpy()[:, 1:]  # drop the start token
    ref_logp = torch.log_softmax(torch.stack(hf_out.scores, dim=1), dim=-1).numpy()  # [B, steps, V]
    out = t5.generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=10, eos_token_id=eos)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, 10)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    assert (tokens[:, ref.shape[1]:] == 0).all()  # HF stops once every row is done; the rest is pad
    assert int(out.lengths[0]) == 4 and tokens[0, 3] == eos and not np.asarray(out.mask)[0, 4:].any()

    # Per-token log-probs of the KV-cache loop equal HF's (its scores are the raw greedy logits).
    steps = ref.shape[1]
    hf_chosen = np.take_along_axis(ref_logp, ref[..., None], axis=-1)[..., 0]
    got_mask = np.asarray(out.mask)[:, :steps]
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, :steps][got_mask], hf_chosen[got_mask], atol=1e-4)

    # Sampling reuses the compiled loop (greedy / temperature are traced).
    sampled = t5.generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=10, eos_token_id=eos,
                          greedy=False, temperature=0.7, rng=jax.random.key(1))
    assert sampled.tokens.shape == (3, 10) and bool(jnp.all(sampled.logprobs <= 0))
    assert bool(jnp.all(sampled.mask.sum(1) == sampled.lengths))



def test_generate_fn_is_pure_with_custom_selection():
    """`generate_fn` runs inside the caller's own jit with a traced key, matches `generate`, takes a custom
    token choice, and tolerates a pad id outside the vocabulary (finished rows feed id 0)."""
    cfg = t5.T5Config.tiny(vocab_size=VOCAB)
    model = random_init(lambda: t5.T5EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed=0, scale=0.2)
    ids, mask, _, _ = batch(seed=5)
    free = t5.generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6, eos_token_id=VOCAB + 1)
    eos, pad = int(free.tokens[0, 1]), VOCAB + 7  # row 0 stops after 2 tokens; pad is not a token
    ref = t5.generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    kw = dict(max_new_tokens=6, eos_id=eos, pad_id=pad, start_id=0)

    @nnx.jit
    def run(model, ids, mask, key):
        return (t5.generate_fn(model, ids, mask, None, key, **kw),
                t5.generate_fn(model, ids, mask, None, key, temperature=0.5, select=lambda s, k: jnp.full(
                    s.shape[:1], 7, jnp.int32), **kw),
                t5.generate_fn(model, ids, mask, None, key, greedy=False, **kw))

    greedy, seven, sampled = run(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(3))
    for got, want in zip(greedy, ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(greedy.lengths[0]) == 2 and (np.asarray(greedy.tokens)[0, 2:] == pad).all()
    assert (np.asarray(seven.tokens) == 7).all() and bool(seven.mask.all())
    logp7 = jax.nn.log_softmax(run_first_step_logits(model, ids, mask) / 0.5, axis=-1)[:, 7]
    np.testing.assert_allclose(np.asarray(seven.logprobs)[:, 0], np.asarray(logp7), atol=1e-5)
    assert np.isfinite(np.asarray(sampled.logprobs)).all() and bool(jnp.all(sampled.mask.sum(1) == sampled.lengths))


def run_first_step_logits(model, ids, mask):
    start = jnp.zeros((ids.shape[0], 1), jnp.int32)
    return jnp.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), start, None, None))[:, 0]

def _torch_gated_fusion(hidden, feats, image_dense, mha, gate_dense):
    img = image_dense(feats)
    att, _ = mha(hidden, img, img)
    gate = torch.sigmoid(gate_dense(torch.cat([hidden, att], dim=-1)))
    return (1 - gate) * hidden + gate * att


def test_autoui_checkpoint_parity_untied(tmp_path):
    """An AutoUI-style checkpoint (transformers-4 layout: untied lm_head, image_dense / mha_layer /
    gate_dense after the encoder) against the same computation in torch."""
    torch_model = tiny_hf_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    d = torch_model.config.d_model
    torch.manual_seed(1)
    torch_model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, d) * d ** -0.5)  # really untied
    image_dense, gate_dense = torch.nn.Linear(FEAT, d), torch.nn.Linear(2 * d, d)
    mha = torch.nn.MultiheadAttention(d, 1, batch_first=True)
    tensors = {k: v for k, v in torch_model.state_dict().items() if "embed_tokens" not in k}
    for prefix, module in (("image_dense", image_dense), ("mha_layer", mha), ("gate_dense", gate_dense)):
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = {**torch_model.config.to_dict(), "tie_word_embeddings": False,
              "architectures": ["T5ForMultimodalGeneration"]}
    config.pop("scale_decoder_outputs", None)  # a transformers-4 config.json
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = t5.from_hf_dir(tmp_path)
    cfg = model.config
    assert (cfg.image_fusion, cfg.image_feature_dim, cfg.tie_word_embeddings) == ("gated_attention", FEAT, False)
    assert model.lm_head is not None and not cfg.scale_decoder_outputs
    ids, mask, dec, _ = batch(seed=2)
    feats = np.random.RandomState(3).randn(3, 5, FEAT).astype(np.float32)
    with torch.no_grad():
        hidden = torch_model.encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        fused = _torch_gated_fusion(hidden, torch.tensor(feats), image_dense, mha, gate_dense)
        ref = torch_model(encoder_outputs=(fused,), attention_mask=torch.tensor(mask),
                          decoder_input_ids=torch.tensor(dec)).logits.numpy()
        ref_text = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               decoder_input_ids=torch.tensor(dec)).logits.numpy()
    both = nnx.jit(lambda m, a, b, c, f: (m(a, b, c, image_features=f), m(a, b, c)))
    with_img, text_only = (np.asarray(x) for x in both(model, ids, mask, dec, feats))
    assert np.abs(with_img - ref).max() <= 1e-4
    assert np.abs(text_only - ref_text).max() <= 1e-4  # no features: the text model


def test_image_prefix_shapes_padding_and_errors():
    cfg = t5.T5Config.tiny(vocab_size=VOCAB, image_feature_dim=FEAT, image_fusion="prefix")
    model = random_init(lambda: t5.T5EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed=0, scale=0.2)
    rs = np.random.RandomState(0)
    tokens = rs.randint(2, VOCAB, (6,))
    ids = np.zeros((2, 9), np.int64)
    mask = np.zeros((2, 9), np.int64)
    ids[0, 3:], mask[0, 3:] = tokens, 1  # the same row, left- and right-padded
    ids[1, :6], mask[1, :6] = tokens, 1
    feats = np.repeat(rs.randn(1, 4, FEAT).astype(np.float32), 2, axis=0)
    dec = np.stack([np.r_[0, rs.randint(2, VOCAB, 4)]] * 2)

    hidden = nnx.eval_shape(lambda m: m.encode(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(feats))[0], model)
    assert hidden.shape == (2, 4 + 9, cfg.d_model)  # N image tokens prefixed to T text tokens
    # (the encoder mask only: XLA drops the unused hidden states of that third encode)
    run = nnx.jit(lambda m, a, b, c, f: (m(a, b, c, image_features=f), m(a, b, c), m.encode(a, b, f)[1]))
    with_img, text_only, enc_mask = (np.asarray(x) for x in run(model, ids, mask, dec, feats))
    assert (enc_mask == np.c_[np.ones((2, 4), bool), mask.astype(bool)]).all()  # mask extended
    assert with_img.shape == text_only.shape == (2, 5, VOCAB)
    assert np.abs(with_img - text_only).max() > 1e-3  # the features reach the logits
    # Padding side does not matter (up to float32 summation order: ~1e-5 on logits of size ~3; a padding
    # bug moves them by > 1e-2).
    np.testing.assert_allclose(with_img[0], with_img[1], atol=5e-5)

    with pytest.raises(ValueError, match="image_features must be"):
        model.encode(jnp.asarray(ids), jnp.asarray(mask), jnp.zeros((2, 4, FEAT + 1)))
    text_model = random_init(lambda: t5.T5EncoderDecoder(cfg.replace(image_feature_dim=None), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no image input"):
        text_model.encode(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(feats))


def test_fresh_image_projection_on_text_checkpoint(tmp_path):
    tiny_hf_t5(tmp_path, feed_forward_proj="relu")
    text = t5.from_hf_dir(tmp_path)
    multi = t5.from_hf_dir(tmp_path, image_feature_dim=FEAT)
    assert multi.config.image_feature_dim == FEAT and isinstance(multi.image_fusion, t5.ImagePrefix)
    assert multi.image_fusion.proj.kernel.shape == (FEAT, 32)
    text_state = nnx.to_flat_state(nnx.state(text, nnx.Param))
    multi_state = dict(nnx.to_flat_state(nnx.state(multi, nnx.Param)))
    assert len(multi_state) == len(text_state) + 2  # + the projection's kernel and bias
    for path, var in text_state:
        np.testing.assert_array_equal(np.asarray(multi_state[path][...]), np.asarray(var[...]))


def test_import_errors_name_the_keys(tmp_path):
    tiny_hf_t5(tmp_path, feed_forward_proj="gated-gelu")
    from safetensors.numpy import save_file
    tensors = {k: np.array(v) for k, v in hf_import.load_hf_tensors(tmp_path).items()}
    del tensors["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"]
    tensors["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = np.zeros((64, 32), np.float32)
    tensors["decoder.final_layer_norm.weight"] = np.ones((31,), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_import.HFImportError) as err:
        t5.from_hf_dir(tmp_path)
    message = str(err.value)
    assert "missing tensors (1): decoder.block.1.layer.2.DenseReluDense.wi_1.weight" in message
    assert "unexpected tensors (1): encoder.block.0.layer.1.DenseReluDense.wi.weight" in message
    assert "shape mismatch: decoder.final_layer_norm.weight: checkpoint (31,)" in message


def test_config_presets_and_validation():
    assert t5.T5Config.t5_base().scale_decoder_outputs and t5.T5Config.t5_base().feed_forward_proj == "relu"
    auto = t5.T5Config.autoui_base()
    assert (auto.image_feature_dim, auto.image_fusion, auto.tie_word_embeddings) == (1408, "gated_attention", False)
    assert 240e6 < t5.T5Config.flan_t5_base().num_params() < 260e6  # flan-t5-base: 247.6M
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config.tiny(feed_forward_proj="gated-gelu-relu")
    with pytest.raises(ValueError, match="image_fusion"):
        t5.T5Config.tiny(image_fusion="sideways")
