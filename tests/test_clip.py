"""CLIP vision tower: parity with transformers' `CLIPVisionModel` (tiny random weights, f32)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from coso_jax.models import clip  # noqa: E402
from coso_jax.models.hf_import import apply_key_map, load_hf_tensors, read_hf_config  # noqa: E402


def _load(local_dir):
    """Our CLIPVisionModel from a saved HF CLIPVisionModel directory (shared importer helpers)."""
    cfg = clip.config_from_hf(read_hf_config(local_dir), dtype=jnp.float32)
    abstract = nnx.eval_shape(lambda: clip.build_model(cfg, rngs=nnx.Rngs(0)))
    tensors = clip.normalize_hf_tensors(load_hf_tensors(local_dir))
    return apply_key_map(abstract, tensors, clip.hf_key_map(cfg), source=str(local_dir))


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=40, patch_size=8,
                                           attn_implementation="eager")
    model = transformers.CLIPVisionModel(config).eval()
    # Random LayerNorm affine parameters so a swapped scale/bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return model, path


def test_clip_vision_parity(hf_clip):
    model, path = hf_clip
    ours = _load(path)
    assert ours.config.num_layers == 3 and ours.config.grid == 5
    pixels = np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels), output_hidden_states=True)
    states = ours.hidden_states(jnp.asarray(pixels))
    assert len(states) == len(ref.hidden_states) == 4
    for ours_h, ref_h in zip(states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(ours_h), ref_h.numpy(), atol=1e-5, rtol=0)
    last, pooled = ours(jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    # LLaVA selection: penultimate layer, class token dropped; the last layer is not run.
    feats = ours.features(jnp.asarray(pixels), -2, "default")
    np.testing.assert_allclose(np.asarray(feats), ref.hidden_states[-2][:, 1:].numpy(), atol=1e-5, rtol=0)
    both = ours.features(jnp.asarray(pixels), (1, -1), "full")
    want = np.concatenate([ref.hidden_states[1].numpy(), ref.hidden_states[-1].numpy()], axis=-1)
    np.testing.assert_allclose(np.asarray(both), want, atol=1e-5, rtol=0)


def test_clip_legacy_key_names(hf_clip):
    """Checkpoints written before transformers 5 carry a `vision_model.` level; they load the same."""
    _, path = hf_clip
    tensors = {f"vision_model.{k}": v for k, v in load_hf_tensors(path).items()}
    cfg = clip.config_from_hf(read_hf_config(path))
    abstract = nnx.eval_shape(lambda: clip.build_model(cfg, rngs=nnx.Rngs(0)))
    legacy = apply_key_map(abstract, clip.normalize_hf_tensors(tensors), clip.hf_key_map(cfg))
    direct = _load(path)
    np.testing.assert_array_equal(np.asarray(legacy.embeddings.patch_embedding.kernel[...]),
                                  np.asarray(direct.embeddings.patch_embedding.kernel[...]))


def test_clip_rejects_wrong_image_size():
    model = nnx.eval_shape(lambda: clip.CLIPVisionModel(clip.CLIPVisionConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NCHW"):
        model(jnp.zeros((1, 32, 32, 3)))


def test_clip_presets_param_count():
    # ViT-L/14-336 vision tower: 303.5M parameters (HF CLIPVisionModel of openai/clip-vit-large-patch14-336).
    assert clip.CLIPVisionConfig.vit_l_14_336().num_params() == 303_507_456
