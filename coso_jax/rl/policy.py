"""The SFT start of a run: tokenizer, policy VLM, value head, causal classifier, prompt encoder.

`load_or_build_sft_start(config, sft_dir)` builds it once (offline BPE on the env's prompts and
demonstrations, a tiny LLaVA or a local Hugging Face one, SFT on oracle demonstrations, classifier
pre-training on the same answers) and caches it in `sft_dir`; later runs with the same SFT-relevant
settings load it, so every algo and seed starts from exactly the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from coso_jax import checkpoint as ckpt
from coso_jax import metrics as metrics_lib
from coso_jax.causal import classifier as clf
from coso_jax.envs import text_interface
from coso_jax.models import llava
from coso_jax.models.clip import CLIPVisionConfig
from coso_jax.models.hf_import import from_pretrained
from coso_jax.models.image_processing import LlavaImageProcessor
from coso_jax.models.llama import DecoderConfig
from coso_jax.models.value_head import ValueHead
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.config import TrainConfig
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.tokenizer import IMAGE_TOKEN, build_bpe, load_tokenizer

log = logging.getLogger(__name__)

_DEMO_SEED = 1_000_003  # demonstrations use seeds disjoint from the online runs' env seeds
_MODEL_SEED = 0
DEMO_TEXTS = "demo_texts.json.gz"  # in the SFT dir: the demonstrations' texts and labels
OBSERVATION_SIZE = (300, 300)


@dataclasses.dataclass
class SFTStart:
    tokenizer: Any
    encoder: PromptEncoder
    policy: nnx.Module
    value_head: ValueHead
    classifier: clf.CausalClassifier
    summary: dict[str, Any]
    demo_tokens: np.ndarray
    demo_mask: np.ndarray
    demo_labels: np.ndarray


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_policy(config: TrainConfig, tokenizer: Any) -> tuple[nnx.Module, Any]:
    """A freshly initialised tiny LLaVA (or a local HF LLaVA) and its LlavaConfig."""
    if config.hf_dir:
        model = from_pretrained(config.hf_dir)
        return model, model.config
    if config.model_preset != "tiny":
        raise ValueError(
            f"model_preset {config.model_preset!r} has no pretrained weights here: pass --hf_dir with a "
            "local Hugging Face LLaVA checkpoint, or use --model_preset=tiny"
        )
    model_config = tiny_llava_config(config, tokenizer)
    # numpy-filled init: the modules' own initialisers compile one XLA program each (slow on a CPU).
    return llava.random_init(model_config, seed=_MODEL_SEED), model_config


def tiny_llava_config(config: TrainConfig, tokenizer: Any) -> llava.LlavaConfig:
    """The CPU preset: a LLaVA-1.5-style model with a width-64 ViT and a 2-layer width-128 decoder."""
    vision = CLIPVisionConfig.tiny(image_size=config.image_size, patch_size=config.patch_size, hidden_size=64,
                                   intermediate_size=128, num_layers=2, num_heads=4)
    text = DecoderConfig.tiny(vocab_size=len(tokenizer))
    return llava.LlavaConfig.tiny(image_token_id=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
                                  vision=vision, text=text)


def classifier_config(config: TrainConfig, vocab_size: int, num_labels: int) -> clf.ClassifierConfig:
    """Reference size (hidden 128, 3 layers) for real models; a proportionate one for the tiny policy."""
    if config.classifier_preset == "reference":
        return clf.ClassifierConfig(vocab_size=vocab_size, num_labels=num_labels)
    return clf.ClassifierConfig.tiny(vocab_size=vocab_size, num_labels=num_labels,
                                     max_positions=max(config.max_new_tokens, 16))


def make_encoder(config: TrainConfig, tokenizer: Any, model_config: Any, prompts: list[str]) -> PromptEncoder:
    processor = LlavaImageProcessor.from_config(model_config)

    def image_fn(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        processed = processor(list(observations))
        return processed.pixel_values, processed.image_sizes if processor.is_next else None

    # gym_cards frames and ALFWorld's schematic are always 300x300: one image token count per model.
    num_image_tokens = processor.num_image_tokens(OBSERVATION_SIZE)
    template = config.prompt_template
    probe = PromptEncoder(tokenizer, 1 << 20, num_image_tokens, image_fn, template)
    longest = max(len(probe.token_ids(p)) for p in prompts)
    # Margin for states the demonstrations did not visit (e.g. longer formulas after mistakes; ALFWorld:
    # more admissible commands and longer observations off the expert's path).
    return PromptEncoder(tokenizer, _round_up(longest + config.prompt_margin, 8), num_image_tokens, image_fn,
                         template)


def prepare_env(config: TrainConfig) -> None:
    """Work an env needs once before a run. ALFWorld: generate (or find cached) its game pool up
    front, so demonstrations and rollouts never wait on the planner-checked generator."""
    if config.env != "ALFWorld":
        return
    from coso_jax.envs.alfworld import TASK_TYPES, pools

    types = TASK_TYPES if config.alfworld_task_type is None else (config.alfworld_task_type,)
    start = time.perf_counter()
    n = pools.build(["train"], types, config.alfworld_pool_size)
    log.info("ALFWorld pool: %d games in %s (%.1f s)", n, pools.default_cache_dir(), time.perf_counter() - start)


def load_or_build_sft_start(config: TrainConfig, sft_dir: Path) -> SFTStart:
    sft_dir = Path(sft_dir)
    prepare_env(config)
    done = sft_dir / "summary.json"
    texts = sft_dir / DEMO_TEXTS
    if done.exists() and texts.exists():
        # A cached start needs only the texts (prompt length, the classifier's replay): replaying the
        # episodes for their images again took 20-50 s per ALFWorld run.
        demos = sft_lib.load_demo_texts(texts)
    else:
        demos = sft_lib.collect_demos(config.env, config.sft_episodes, _DEMO_SEED, config.sft_imperfect_frac,
                                      cot=config.cot, brief=config.brief_prompt, env_kwargs=config.env_kwargs)
    if config.hf_dir:
        tokenizer = load_tokenizer(config.hf_dir)
    elif done.exists():
        tokenizer = load_tokenizer(sft_dir / "tokenizer")
    else:
        # Every prompt, repeats included: BPE merges follow frequency, so the fixed prompt text
        # compresses into few tokens (short prompts make the tiny CPU model fast).
        corpus = demos.prompts + demos.answers
        tokenizer = build_bpe(corpus, config.vocab_size, save_dir=sft_dir / "tokenizer")
    policy, model_config = build_policy(config, tokenizer)
    value_rngs = nnx.Rngs(_MODEL_SEED + 1)
    value_head = (ValueHead(model_config.text.hidden_size, rngs=value_rngs) if config.hf_dir
                  else ValueHead.tiny(model_config.text.hidden_size, rngs=value_rngs))
    encoder = make_encoder(config, tokenizer, model_config, demos.prompts)
    iface = text_interface(config.env)
    classifier = clf.CausalClassifier(classifier_config(config, len(tokenizer), iface.num_labels),
                                      rngs=nnx.Rngs(_MODEL_SEED + 2))
    demo_tokens, demo_mask = sft_lib.encode_answers(tokenizer, demos.answers, config.max_new_tokens)
    store = ckpt.Checkpointer(sft_dir / "weights", save_interval_steps=1, max_to_keep=1)
    items = {"policy": nnx.state(policy, nnx.Param), "value_head": nnx.state(value_head, nnx.Param),
             "classifier": nnx.state(classifier, nnx.Param)}
    if done.exists():
        restored, _ = store.restore(None, abstract_items=items)
        nnx.update(policy, restored["policy"])
        nnx.update(value_head, restored["value_head"])
        nnx.update(classifier, restored["classifier"])
        summary = json.loads(done.read_text())
        log.info("loaded SFT start from %s", sft_dir)
    else:
        summary = _build(config, sft_dir, demos, tokenizer, policy, encoder, classifier, demo_tokens, demo_mask)
        items = {"policy": nnx.state(policy, nnx.Param), "value_head": nnx.state(value_head, nnx.Param),
                 "classifier": nnx.state(classifier, nnx.Param)}
        store.save(0, items, {"fingerprint": summary["fingerprint"]}, force=True)
        store.wait()
        done.write_text(json.dumps(summary, indent=2) + "\n")
    if not texts.exists():
        sft_lib.save_demo_texts(demos, texts)
    store.close()
    return SFTStart(tokenizer, encoder, policy, value_head, classifier, summary, demo_tokens, demo_mask,
                    demos.labels)


def _build(config, sft_dir, demos, tokenizer, policy, encoder, classifier, demo_tokens, demo_mask) -> dict[str, Any]:
    from coso_jax.rl.trainer import sft_fingerprint

    sft_dir.mkdir(parents=True, exist_ok=True)
    data = sft_lib.sft_arrays(demos, encoder, tokenizer, config.max_new_tokens)
    steps = config.sft_epochs * (len(demos) // config.sft_batch_size)
    bar = metrics_lib.progress_bar(steps, desc=f"SFT {config.env}", disable=not config.progress)
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        bar.update(1, {"loss": loss})

    history = sft_lib.train_sft(policy, data, epochs=config.sft_epochs, lr=config.sft_lr,
                                batch_size=config.sft_batch_size, seed=_MODEL_SEED, on_step=on_step)
    bar.close()
    sft_seconds = time.perf_counter() - start

    valid = demos.labels >= 0
    tx = clf.make_optimizer(classifier, learning_rate=config.causal_lr)
    step_fn = clf.make_train_step()
    rng = np.random.default_rng(_MODEL_SEED)
    key = jax.random.key(_MODEL_SEED)
    idx_valid = np.flatnonzero(valid)
    cls_loss = cls_acc = float("nan")
    for _ in range(config.causal_pretrain_steps):
        idx = rng.choice(idx_valid, size=min(config.causal_minibatch, idx_valid.size), replace=True)
        key, sub = jax.random.split(key)
        cls_loss, cls_acc = step_fn(classifier, tx, demo_tokens[idx], demo_mask[idx], demos.labels[idx], sub)
    return {
        "fingerprint": sft_fingerprint(config),
        "env": config.env,
        "demonstrations": len(demos),
        "sft_steps": len(history),
        "sft_first_loss": history[0] if history else None,
        "sft_final_loss": float(np.mean(history[-10:])) if history else None,
        "sft_seconds": sft_seconds,
        "classifier_pretrain_steps": config.causal_pretrain_steps,
        "classifier_final_loss": float(cls_loss),
        "classifier_final_accuracy": float(cls_acc),
        "prompt_len": encoder.prompt_len,
    }
