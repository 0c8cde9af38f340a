"""Building the policy (coso_jax/rl/policy.py): the cheap --hf_dir check and preset errors."""
from __future__ import annotations

import pytest

from coso_jax.rl.config import ConfigError, ModelConfig
from coso_jax.rl.policy import build_policy, check_hf_dir, classifier_config


def test_check_hf_dir(tmp_path):
    check_hf_dir(None)
    with pytest.raises(ConfigError, match="no such directory"):
        check_hf_dir(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="has no config.json"):
        check_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no model.safetensors"):
        check_hf_dir(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_hf_dir(str(tmp_path))


def test_unknown_model_preset_without_weights_names_the_fix():
    with pytest.raises(ConfigError, match="pass --hf_dir"):
        build_policy(ModelConfig(model_preset="llava_1_6_mistral_7b"), tokenizer=None)


def test_classifier_sizes():
    ref = classifier_config(ModelConfig(classifier_preset="reference"), 100, 3)
    assert (ref.hidden_size, ref.num_layers, ref.num_heads, ref.ffn_size) == (128, 3, 4, 512)
    tiny = classifier_config(ModelConfig(max_new_tokens=200), 100, 3)
    assert tiny.max_positions == 200 and tiny.hidden_size < 128
