"""Building the policy VLM, its prompt encoder and the causal classifier from a `ModelConfig`.

No caching here (see `coso_jax.rl.start` for the cached warm start): these functions build fresh
modules. `check_hf_dir` is the cheap check a run makes before anything costly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax.causal import classifier as clf
from coso_jax.models import llava
from coso_jax.models.clip import CLIPVisionConfig
from coso_jax.models.hf_import import from_pretrained
from coso_jax.models.image_processing import LlavaImageProcessor
from coso_jax.models.llama import DecoderConfig
from coso_jax.rl.config import ConfigError, ModelConfig
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.tokenizer import IMAGE_TOKEN

MODEL_SEED = 0
OBSERVATION_SIZE = (300, 300)  # gym_cards frames and ALFWorld's schematic: one image token count per model


def check_hf_dir(hf_dir: str | None) -> None:
    """ConfigError unless `hf_dir` is None or a directory with config.json and safetensors weights."""
    if hf_dir is None:
        return
    path = Path(hf_dir)
    if not path.is_dir():
        raise ConfigError(f"--hf_dir {hf_dir}: no such directory; point it at a local Hugging Face LLaVA "
                          "checkpoint (config.json + *.safetensors + tokenizer files)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--hf_dir {hf_dir} has no config.json: it is not a Hugging Face model directory")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise ConfigError(f"--hf_dir {hf_dir} holds no model.safetensors (or index): save the model with "
                          "safe_serialization=True, or point --hf_dir at a directory that has the weights")


TINY_PRESETS = ("tiny", "tiny_next")


def dtypes(model: ModelConfig) -> tuple[Any, Any]:
    """(compute dtype, parameter dtype) of the policy's base."""
    return jnp.dtype(model.compute_dtype), jnp.dtype(model.param_dtype)


def build_policy(model: ModelConfig, tokenizer: Any) -> tuple[nnx.Module, Any]:
    """A freshly initialised tiny LLaVA (or a local HF LLaVA) in the config's dtypes, and its LlavaConfig."""
    compute, param = dtypes(model)
    if model.hf_dir:
        policy = from_pretrained(model.hf_dir, dtype=compute, param_dtype=param)
        return policy, policy.config
    if model.random_weights:
        model_config = named_llava_config(model, tokenizer)
        return llava.random_init(model_config, seed=MODEL_SEED, dtype=compute, param_dtype=param), model_config
    if model.model_preset not in TINY_PRESETS:
        raise ConfigError(
            f"model_preset {model.model_preset!r} has no pretrained weights here: pass --hf_dir with a "
            f"local Hugging Face LLaVA checkpoint, or use --set model_preset=tiny (or {TINY_PRESETS[1]})"
        )
    model_config = tiny_llava_config(model, tokenizer)
    # numpy-filled init: the modules' own initialisers compile one XLA program each (slow on a CPU).
    return llava.random_init(model_config, seed=MODEL_SEED, dtype=compute, param_dtype=param), model_config


def named_llava_config(model: ModelConfig, tokenizer: Any) -> llava.LlavaConfig:
    """The architecture of `model.model_preset` (a `LlavaConfig` constructor, e.g. "llava_1_6_mistral_7b")
    with the tokenizer's vocabulary and image token, cut to `text_layers` / `vision_layers` when set
    (benchmarks of real-size shapes without weights). ConfigError for an unknown preset."""
    make = getattr(llava.LlavaConfig, model.model_preset, None)
    if model.model_preset in TINY_PRESETS or make is None:
        raise ConfigError(f"random_weights needs a real-size model_preset (a LlavaConfig constructor such as "
                          f"'llava_1_6_mistral_7b'), got {model.model_preset!r}")
    config = make()
    text = config.text.replace(vocab_size=len(tokenizer))
    if model.text_layers:
        text = text.replace(num_layers=model.text_layers)
    vision = config.vision.replace(num_layers=model.vision_layers) if model.vision_layers else config.vision
    return config.replace(text=text, vision=vision, image_token_id=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)))


def tiny_llava_config(model: Any, tokenizer: Any) -> llava.LlavaConfig:
    """The CPU preset: a LLaVA-1.5-style model ("tiny"; LLaVA-NeXT-style anyres tiles for "tiny_next")
    with a width-64 ViT and a 2-layer width-128 decoder. `model` needs image_size, patch_size and
    (optionally) model_preset."""
    vision = CLIPVisionConfig.tiny(image_size=model.image_size, patch_size=model.patch_size, hidden_size=64,
                                   intermediate_size=128, num_layers=2, num_heads=4)
    text = DecoderConfig.tiny(vocab_size=len(tokenizer))
    make = llava.LlavaConfig.tiny_next if getattr(model, "model_preset", "tiny") == "tiny_next" else llava.LlavaConfig.tiny
    return make(image_token_id=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)), vision=vision, text=text)


def classifier_config(model: ModelConfig, vocab_size: int, num_labels: int) -> clf.ClassifierConfig:
    """Reference size (hidden 128, 3 layers) for real models; a proportionate one for the tiny policy."""
    if model.classifier_preset == "reference":
        return clf.ClassifierConfig(vocab_size=vocab_size, num_labels=num_labels)
    return clf.ClassifierConfig.tiny(vocab_size=vocab_size, num_labels=num_labels,
                                     max_positions=max(model.max_new_tokens, 16))


def build_classifier(model: ModelConfig, vocab_size: int, num_labels: int) -> clf.CausalClassifier:
    return clf.CausalClassifier(classifier_config(model, vocab_size, num_labels), rngs=nnx.Rngs(MODEL_SEED + 2))


def llava_image_fn(model_config: Any) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], int]:
    """The LLaVA image processor as a prompt-encoder image function, and the image token count of a
    300x300 frame."""
    processor = LlavaImageProcessor.from_config(model_config)

    def image_fn(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        processed = processor(list(observations))
        return processed.pixel_values, processed.image_sizes if processor.is_next else None

    return image_fn, processor.num_image_tokens(OBSERVATION_SIZE)


def make_encoder(model: ModelConfig, tokenizer: Any, prompts: Sequence[str], image_fn: Callable,
                 num_image_tokens: int) -> PromptEncoder:
    """A PromptEncoder whose prompt length P fits the longest of `prompts` plus `model.prompt_margin`
    tokens (for states the demonstrations did not visit, e.g. longer formulas after mistakes; ALFWorld:
    more admissible commands and longer observations off the expert's path), rounded up to 8."""
    probe = PromptEncoder(tokenizer, 1 << 20, num_image_tokens, image_fn, model.prompt_template)
    longest = max(len(probe.token_ids(p)) for p in prompts)
    prompt_len = -(-(longest + model.prompt_margin) // 8) * 8
    return PromptEncoder(tokenizer, prompt_len, num_image_tokens, image_fn, model.prompt_template)
