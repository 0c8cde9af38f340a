"""Hugging Face safetensors import: errors naming keys, bf16 checkpoints, sharded indexes."""
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from coso_jax.models import HFImportError, ValueHead, from_pretrained, hf_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def _tiny_llama(**overrides):
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs, attn_implementation="eager")).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(path)
    return path


def _rewrite(src, dst, edit):
    """Copies the checkpoint at `src` to `dst` with `edit(tensors: dict) -> dict` applied."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {k: np.array(v) for k, v in hf_import.load_hf_tensors(src).items()}
    safetensors_numpy.save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_named(llama_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(HFImportError, match="missing tensors") as err:
        from_pretrained(bad)
    assert err.value.missing == [key] and key in str(err.value)
    assert not err.value.unexpected and not err.value.mismatched and not err.value.uncovered


def test_unexpected_tensor_named(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.rotary_extra.weight"
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: {**t, key: np.zeros((3,), np.float32)})
    with pytest.raises(HFImportError, match="unexpected tensors") as err:
        from_pretrained(bad)
    assert err.value.unexpected == [key] and key in str(err.value)


def test_wrong_shape_named(llama_dir, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: {**t, key: np.zeros((8, 32), np.float32)})
    with pytest.raises(HFImportError, match="shape mismatch") as err:
        from_pretrained(bad)
    assert [m[0] for m in err.value.mismatched] == [key]
    assert key in str(err.value) and "(32, 8)" in str(err.value)  # transformed shape vs model (32, 16)


def test_all_problems_in_one_error(llama_dir, tmp_path):
    def edit(t):
        t = dict(t)
        del t["lm_head.weight"]
        t["extra.bias"] = np.zeros(2, np.float32)
        t["model.norm.weight"] = np.ones(5, np.float32)
        return t

    with pytest.raises(HFImportError) as err:
        from_pretrained(_rewrite(llama_dir, tmp_path / "bad", edit))
    msg = str(err.value)
    for key in ("lm_head.weight", "extra.bias", "model.norm.weight"):
        assert key in msg


def test_bf16_checkpoint(tmp_path):
    torch_model = _tiny_llama().to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path)
    tensors = hf_import.load_hf_tensors(tmp_path)
    assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    # f32 compute over the exact bf16 values: matches torch run in f32 on the same rounded weights.
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    ref_model = torch_model.to(torch.float32)
    np.testing.assert_array_equal(np.asarray(model.model.embed_tokens.embedding[...]),
                                  ref_model.model.embed_tokens.weight.detach().numpy())
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4
    # bf16 storage and compute also load (and keep the dtype).
    model16 = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    torch_model = _tiny_llama(tie_word_embeddings=True)
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(hf_import.safetensors_files(tmp_path)) > 1
    model = from_pretrained(tmp_path)
    assert model.lm_head is None
    np.testing.assert_array_equal(np.asarray(model.model.layers[1].mlp.down_proj.kernel[...]),
                                  torch_model.model.layers[1].mlp.down_proj.weight.detach().numpy().T)


def test_unknown_model_type_and_missing_files(llama_dir, tmp_path):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_value_head():
    head = ValueHead(16, (8, 4), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    out = head(jnp.ones((3, 16), jnp.bfloat16))
    assert out.shape == (3,) and out.dtype == jnp.float32
    assert len(nnx.eval_shape(lambda: ValueHead(16, rngs=nnx.Rngs(0))).layers) == 3  # RL4VLM: 1024 -> 512 -> 1
    with pytest.raises(ValueError, match="hidden"):
        head(jnp.ones((3, 5)))
