"""LLaVA-1.5 and LLaVA-NeXT: logit and greedy-generation parity with transformers, the anyres feature
layout, key layouts, presets."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax import sampling
from coso_jax.models import from_pretrained, llava
from coso_jax.models import image_processing as ip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
IMAGE = 5  # image token id
PAD, BOS, EOS = 0, 1, 2
TINY_PINS = [[32, 64], [64, 32], [64, 64]]

forward = nnx.jit(lambda model, ids, mask, pixels, sizes: model(ids, mask, pixels, sizes))


def hf_configs(next_: bool):
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if next_:
        return transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                            image_grid_pinpoints=TINY_PINS, attn_implementation="eager")
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                    attn_implementation="eager")


def save_tiny_hf(next_: bool, path):
    """A tiny random HF LLaVA(-NeXT) saved to `path`; LayerNorm/RMSNorm weights perturbed so that any
    mixed-up scale/bias shows in the logits."""
    torch.manual_seed(0)
    cls = transformers.LlavaNextForConditionalGeneration if next_ else transformers.LlavaForConditionalGeneration
    model = cls(hf_configs(next_)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava15")
    return save_tiny_hf(False, path), path


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next")
    return save_tiny_hf(True, path), path


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def build_batch(rows, num_tokens, length, seed=0):
    """Left-padded token ids for rows given as lists of segments: an int n = n random text tokens,
    "img" = the next image's placeholder, expanded with `expand_image_tokens`."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    image = 0
    for r, segments in enumerate(rows):
        toks = [BOS]
        for seg in segments:
            toks += [IMAGE] if seg == "img" else list(rng.integers(6, VOCAB, seg))
        counts = num_tokens[image:image + toks.count(IMAGE)]
        image += len(counts)
        toks = ip.expand_image_tokens(toks, IMAGE, counts)
        assert len(toks) <= length, (len(toks), length)
        ids[r, length - len(toks):] = toks
        mask[r, length - len(toks):] = 1
    assert image == len(num_tokens)
    return ids, mask


def hf_logits(model, ids, mask, pixels, sizes=None):
    # Left padding: positions count real tokens only (what generate() does and what our model does).
    position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
    kwargs = {} if sizes is None else {"image_sizes": torch.tensor(sizes)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids), pixel_values=torch.tensor(pixels), **kwargs)
    return out.logits.float().numpy()


def max_valid_diff(ref, ours, mask):
    assert ref.shape == ours.shape
    return float(np.abs(ref - np.asarray(ours, np.float32))[mask.astype(bool)].max())


# --------------------------------------------------------------------------------------------------
# Logit parity
# --------------------------------------------------------------------------------------------------
def test_llava15_logit_parity(llava15):
    hf_model, path = llava15
    model = from_pretrained(path, dtype=jnp.float32)
    assert isinstance(model, llava.Llava) and not model.config.is_next
    assert model.config.image_token_id == IMAGE and model.config.vision_feature_layer == -2
    proc = ip.LlavaImageProcessor.from_config(model.config)
    # Row 0: one image, left-padded; row 1: two images; row 2: text only, padded.
    images = proc(random_images([(40, 56), (32, 32), (64, 20)]))
    assert images.pixel_values.shape == (3, 3, 32, 32) and list(images.num_image_tokens) == [16] * 3
    ids, mask = build_batch([[3, "img", 4], ["img", 2, "img", 3], [7]], images.num_image_tokens, length=48)
    ref = hf_logits(hf_model, ids, mask, images.pixel_values)
    ours = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.pixel_values), None)
    assert max_valid_diff(ref, ours, mask) <= 1e-4
    # The images matter far beyond the tolerance (a wrong splice could not hide below it).
    swapped = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.pixel_values[::-1].copy()), None)
    assert max_valid_diff(np.asarray(ours), swapped, mask) > 1e-2


def test_llava_next_logit_parity_two_tilings(llava_next):
    hf_model, path = llava_next
    model = from_pretrained(path, dtype=jnp.float32)
    assert isinstance(model, llava.Llava) and model.config.is_next
    proc = ip.LlavaImageProcessor.from_config(model.config)
    # 30x70 -> 32x64 pinpoint (1x2 tiles, rows cropped); 50x45 -> 64x64 (2x2, columns cropped);
    # 80x24 -> 64x32 (2x1 tiles).
    sizes = [(30, 70), (50, 45), (80, 24)]
    images = proc(random_images(sizes))
    hf_modeling = transformers.models.llava_next.modeling_llava_next
    for (h, w), n_tok in zip(sizes, images.num_image_tokens):
        assert ip.anyres_grid_shape((h, w), TINY_PINS, 32) == tuple(
            hf_modeling.get_anyres_image_grid_shape((h, w), TINY_PINS, 32))
        assert ip.num_anyres_patches((h, w), TINY_PINS, 32) == hf_modeling.image_size_to_num_patches(
            (h, w), TINY_PINS, 32)
        assert n_tok == model.config.num_image_tokens((h, w))
    grids = {ip.anyres_grid_shape(s, TINY_PINS, 32) for s in sizes}
    assert grids == {(1, 2), (2, 2), (2, 1)}  # three different tilings in one batch
    assert images.pixel_values.shape == (3, model.config.max_patches, 3, 32, 32)
    ids, mask = build_batch([[3, "img", 4], ["img", 2], [2, "img", 5]], images.num_image_tokens, length=112)
    ref = hf_logits(hf_model, ids, mask, images.pixel_values, images.image_sizes)
    ours = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.pixel_values),
                   jnp.asarray(images.image_sizes))
    assert max_valid_diff(ref, ours, mask) <= 1e-4
    blank = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.zeros(images.pixel_values.shape),
                    jnp.asarray(images.image_sizes))
    assert max_valid_diff(np.asarray(ours), blank, mask) > 1e-2


def test_llava_next_image_features_match_hf(llava_next):
    """The packed per-image features (base tile, unpadded grid, newlines) equal HF's pack_image_features,
    for square, wide and tall images and one needing no unpadding."""
    hf_model, path = llava_next
    model = from_pretrained(path, dtype=jnp.float32)
    proc = ip.LlavaImageProcessor.from_config(model.config, pad_patches_to=0)
    sizes = [(64, 64), (33, 100), (100, 33), (7, 9)]
    images = proc(random_images(sizes, seed=1))
    with torch.no_grad():
        ref = hf_model.model.get_image_features(torch.tensor(images.pixel_values),
                                                torch.tensor(images.image_sizes)).pooler_output
    feats, lengths = nnx.jit(lambda m, p, s: m.image_features(p, s))(
        model, jnp.asarray(images.pixel_values), jnp.asarray(images.image_sizes))
    assert list(np.asarray(lengths)) == [r.shape[0] for r in ref] == list(images.num_image_tokens)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(np.asarray(feats[i, :r.shape[0]]), r.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,param_dtype,rel", [(jnp.bfloat16, None, 3e-2), (jnp.float32, jnp.bfloat16, 2e-2)],
                         ids=["bf16", "bf16_params_f32_compute"])
def test_from_pretrained_bf16_close_to_hf(llava_next, dtype, param_dtype, rel):
    """bf16 weights (and compute) from an f32 checkpoint: logits come out float32 and stay within
    `rel * max|logit|` of HF's float32 model (bf16 keeps 8 significant bits, 4e-3 relative per rounding;
    measured: 1.0e-2 relative for bf16 compute)."""
    hf_model, path = llava_next
    model = from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert model.config.text.dtype == model.config.vision.dtype == dtype
    proc = ip.LlavaImageProcessor.from_config(model.config)
    sizes = [(30, 70), (50, 45)]
    images = proc(random_images(sizes))
    ids, mask = build_batch([[3, "img", 4], ["img", 2]], images.num_image_tokens, length=112)
    ref = hf_logits(hf_model, ids, mask, images.pixel_values, images.image_sizes)
    ours = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.pixel_values),
                   jnp.asarray(images.image_sizes))
    assert ours.dtype == jnp.float32
    diff = max_valid_diff(ref, ours, mask)
    assert 0 < diff <= rel * np.abs(ref).max(), (diff, np.abs(ref).max())


# --------------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("next_", [False, True], ids=["llava15", "llava_next"])
def test_greedy_generation_matches_transformers(request, next_):
    hf_model, path = request.getfixturevalue("llava_next" if next_ else "llava15")
    model = from_pretrained(path, dtype=jnp.float32)
    proc = ip.LlavaImageProcessor.from_config(model.config)
    images = proc(random_images([(30, 70), (50, 45)] if next_ else [(40, 56), (32, 32)], seed=2))
    ids, mask = build_batch([[2, "img", 3], ["img", 6]], images.num_image_tokens, length=images.num_image_tokens.max() + 12)
    new = 6
    kwargs = {"image_sizes": torch.tensor(images.image_sizes)} if next_ else {}
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                pixel_values=torch.tensor(images.pixel_values), max_new_tokens=new, do_sample=False,
                                pad_token_id=PAD, eos_token_id=EOS, **kwargs)[:, ids.shape[1]:].numpy()
    out = sampling.sample(model, None, ids, mask, jax.random.key(0), pixel_values=jnp.asarray(images.pixel_values),
                          image_sizes=jnp.asarray(images.image_sizes) if next_ else None, max_new_tokens=new,
                          temperature=1.0, eos_id=EOS, pad_id=PAD, greedy=True)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    # The sampler's log-probs equal the teacher-forced scorer's.
    scored = sampling.score(model, None, ids, mask, tokens, np.asarray(out.mask),
                            pixel_values=jnp.asarray(images.pixel_values),
                            image_sizes=jnp.asarray(images.image_sizes) if next_ else None, temperature=1.0)
    np.testing.assert_allclose(np.asarray(scored.logprobs), np.asarray(out.logprobs), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Layout, splice, errors
# --------------------------------------------------------------------------------------------------
def test_anyres_layout_lengths_match_host_counts():
    """The traced (jnp) layout and the host token count agree over many image sizes."""
    cfg = llava.LlavaConfig.llava_1_6_mistral_7b()
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(1, 2000, (300, 2)), [[300, 300], [336, 336], [672, 1008], [1, 1000]]])
    layout = jax.jit(lambda s: llava.anyres_layout(cfg, s, cfg.max_patches))
    index, lengths = layout(jnp.asarray(sizes, jnp.int32))
    want = [ip.num_image_tokens_next(tuple(s), llava.LLAVA_1_6_PINPOINTS, 336, 14) for s in sizes]
    np.testing.assert_array_equal(np.asarray(lengths), want)
    assert max(want) <= cfg.max_image_tokens == index.shape[1]
    # Indices stay inside the table of max_patches tiles + the newline slot.
    assert 0 <= int(index.min()) and int(index.max()) <= cfg.max_patches * 576
    # llava-v1.6-mistral-7b on a 300x300 gym_cards frame: upscaled into the 336x672 pinpoint (1x2 tiles),
    # a 24x48 feature map cropped to 24x24, one newline per row: 576 + 24 * 25 tokens.
    assert cfg.num_image_tokens((300, 300)) == 576 + 24 * 25


def test_splice_handles_several_images_per_row_and_checks_counts():
    embeds = jnp.zeros((2, 5, 3))
    is_image = jnp.asarray([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], bool)
    feats = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
    lengths = jnp.asarray([3, 1])
    out = np.asarray(llava.splice_image_features(embeds, is_image, feats, lengths))
    np.testing.assert_array_equal(out[0, [1, 2, 4]], np.asarray(feats[0]))
    np.testing.assert_array_equal(out[1, 0], np.asarray(feats[1, 0]))
    assert not out[0, [0, 3]].any() and not out[1, 1:].any()
    with pytest.raises(ValueError, match="4 image tokens but the 2 image"):
        llava.splice_image_features(embeds, is_image, feats, jnp.asarray([3, 2]))


def test_input_errors():
    model = llava.random_init(llava.LlavaConfig.tiny_next())
    ids = jnp.full((1, 4), 7)
    with pytest.raises(ValueError, match="image_sizes"):
        model(ids, None, jnp.zeros((1, 5, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"\[N, patches, C, H, W\]"):
        model(ids, None, jnp.zeros((1, 3, 32, 32)), jnp.asarray([[32, 32]]))
    with pytest.raises(ValueError, match="needs 5 tiles"):
        model(ids, None, jnp.zeros((1, 2, 3, 32, 32)), jnp.asarray([[64, 64]]))
    with pytest.raises(ValueError, match="multiple of the tile size"):
        llava.LlavaConfig.tiny(image_grid_pinpoints=((32, 48),))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llava.LlavaConfig.tiny(image_token_id=5000)


def test_legacy_key_layouts_load(llava_next, tmp_path):
    """Hub checkpoints (`vision_tower.vision_model.*`) and the transformers-4.5x layout
    (`model.language_model.*`, `lm_head.weight`) load to the same model."""
    from safetensors.numpy import save_file

    from coso_jax.models.hf_import import load_hf_tensors

    _, path = llava_next
    tensors = {k: np.array(v) for k, v in load_hf_tensors(path).items()}
    config = json.loads((path / "config.json").read_text())
    reference = from_pretrained(path)
    renames = {
        "hub": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
        "v4_52": lambda k: ("lm_head.weight" if k == "language_model.lm_head.weight"
                            else "model." + k.replace("language_model.model.", "language_model.", 1)),
    }
    for name, rename in renames.items():
        d = tmp_path / name
        d.mkdir()
        save_file({rename(k): v for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        loaded = llava.load_pretrained(d)
        for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(reference))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hub_config_defaults_are_completed():
    """llava-v1.6-mistral-7b-hf's config.json omits most of text_config; config_from_hf fills HF's defaults."""
    hub = {"architectures": ["LlavaNextForConditionalGeneration"],
           "image_grid_pinpoints": [list(p) for p in llava.LLAVA_1_6_PINPOINTS],
           "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
           "text_config": {"architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                           "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
                           "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                           "vocab_size": 32064},
           "use_image_newline_parameter": True,
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                             "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
           "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    cfg = llava.config_from_hf(hub)
    assert cfg == llava.LlavaConfig.llava_1_6_mistral_7b()


@pytest.mark.slow
def test_preset_param_counts_match_transformers():
    """Real-size presets have exactly the parameters of the HF models (built on the meta device)."""
    cfg = llava.LlavaConfig.llava_1_6_mistral_7b()
    hf_cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
                           num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768),
        text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064),
        image_token_index=32000, image_grid_pinpoints=[list(p) for p in llava.LLAVA_1_6_PINPOINTS])
    with torch.device("meta"):
        hf_model = transformers.LlavaNextForConditionalGeneration(hf_cfg)
    assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters())  # ~7.57B
    assert llava.LlavaConfig.tiny().num_params() < 2_000_000


def test_tiny_next_preset_runs_jitted():
    for cfg in (llava.LlavaConfig.tiny_next(),):
        model = llava.random_init(cfg, seed=1)
        assert float(model.vision_tower.pre_layrnorm.scale[...].mean()) == pytest.approx(1.0, abs=0.05)
        proc = ip.LlavaImageProcessor.from_config(cfg)
        images = proc(random_images([(300, 300), (120, 300)]))
        ids, mask = build_batch([["img", 3], [2, "img"]], images.num_image_tokens,
                                length=int(images.num_image_tokens.sum()) + 8)
        ids = np.where(ids == IMAGE, cfg.image_token_id, ids)
        logits = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.pixel_values),
                         jnp.asarray(images.image_sizes))
        assert logits.shape == ids.shape + (cfg.text.vocab_size,)
        assert np.isfinite(np.asarray(logits)).all()
    # A 300x300 frame is downscaled into the 64x64 pinpoint: 2x2 tiles, an 8x8 map, 16 + 8 * 9 tokens.
    assert llava.LlavaConfig.tiny_next().num_image_tokens((300, 300)) == 16 + 8 * 9
    assert llava.LlavaConfig.tiny().num_image_tokens() == 16


def test_decode_logits_slice_matches_the_full_logits():
    cfg = llava.LlavaConfig.tiny()
    model = llava.random_init(cfg, seed=3)
    rng = np.random.default_rng(0)
    mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32))
    embeds = jnp.asarray(rng.normal(size=(2, 6, cfg.text.hidden_size)).astype(np.float32))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full, hidden, _ = model.decode(embeds, mask, positions)
    part, hidden_part, _ = model.decode(embeds, mask, positions, logits_slice=(4, 6))
    assert part.shape == (2, 2, cfg.text.vocab_size)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, 4:6]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(hidden_part), np.asarray(hidden))


def test_scorer_treats_image_tokens_in_a_response_as_plain_tokens():
    """An under-trained policy can emit the image token: scoring such a response must neither raise nor shift
    the other rows' image features; the reference is a forward on hand-built embeddings (features in the
    prompt's image slots only, the response's tokens as plain embeddings)."""
    cfg = llava.LlavaConfig.tiny()
    model = llava.random_init(cfg, seed=2)
    images = ip.LlavaImageProcessor.from_config(cfg)(random_images([(32, 32), (32, 32)], seed=3))
    ids, mask = build_batch([["img", 3], [2, "img", 1]], images.num_image_tokens,
                            length=int(images.num_image_tokens.max()) + 6)
    ids = np.where(ids == IMAGE, cfg.image_token_id, ids)
    response = np.array([[7, cfg.image_token_id, 9, cfg.image_token_id], [8, 10, 11, 12]], np.int32)
    resp_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    pixels = jnp.asarray(images.pixel_values)
    out = sampling.score(model, None, ids, mask, response, resp_mask, pixel_values=pixels, temperature=1.0)

    p = ids.shape[1]
    prompt_embeds = model.embed_inputs(jnp.asarray(ids), pixels)
    resp_embeds = model.language_model.embed(jnp.asarray(np.where(resp_mask, response, 0)))
    full_mask = jnp.asarray(np.concatenate([mask, resp_mask], 1).astype(np.int32))
    logits, _, _ = model.decode(jnp.concatenate([prompt_embeds, resp_embeds], 1), full_mask,
                                jnp.maximum(jnp.cumsum(full_mask, 1) - 1, 0))
    logp = np.asarray(jax.nn.log_softmax(logits[:, p - 1:-1].astype(jnp.float32)))
    want = np.where(resp_mask, np.take_along_axis(logp, response[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(np.asarray(out.logprobs), want, rtol=1e-4, atol=1e-4)
    alone = sampling.score(model, None, ids[1:], mask[1:], response[1:], resp_mask[1:], pixel_values=pixels[1:],
                           temperature=1.0)
    np.testing.assert_allclose(np.asarray(out.logprobs[1]), np.asarray(alone.logprobs[0]), rtol=1e-5, atol=1e-5)
