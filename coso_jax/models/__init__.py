"""NNX policy models: the Llama-family decoder, LLaVA VLMs (models/llava.py), value head, HF import."""
from coso_jax.models.hf_import import HFImportError, from_pretrained
from coso_jax.models.image_processing import LlavaImageProcessor
from coso_jax.models.kv_cache import KVCache
from coso_jax.models.llama import CausalLM, DecoderConfig, DecoderModel, positions_from_mask
from coso_jax.models.llava import Llava, LlavaConfig
from coso_jax.models.value_head import ValueHead

__all__ = [
    "CausalLM",
    "DecoderConfig",
    "DecoderModel",
    "HFImportError",
    "KVCache",
    "Llava",
    "LlavaConfig",
    "LlavaImageProcessor",
    "ValueHead",
    "from_pretrained",
    "positions_from_mask",
]
