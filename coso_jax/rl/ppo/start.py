"""The PPO backbone's warm start: tokenizer, SFT'd policy, value head and pre-trained classifier.

Built once per (game, start settings) from oracle demonstrations (`coso_jax.rl.sft`) and cached
(`coso_jax.rl.start.StartCache`), so every algo and seed starts from exactly the same weights. A
cached start needs only its demonstrations' texts (prompt length, the classifier's replay), not the
episodes' images.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from flax import nnx

from coso_jax.causal import classifier as clf
from coso_jax.envs import text_interface
from coso_jax.models.value_head import ValueHead
from coso_jax.rl import policy as policy_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.config import PPOConfig
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.start import StartCache, supervised_start

log = logging.getLogger(__name__)

DEMO_SEED = 1_000_003  # demonstrations use seeds disjoint from the online runs' env seeds
DEMO_TEXTS = "demo_texts.json.gz"  # in the start dir: the demonstrations' texts and labels


@dataclasses.dataclass
class PPOStart:
    tokenizer: Any
    encoder: PromptEncoder
    policy: nnx.Module
    value_head: ValueHead
    classifier: clf.CausalClassifier
    summary: dict[str, Any]
    demo_tokens: np.ndarray  # [n, N] the demonstrations' answers (the classifier's first replay)
    demo_mask: np.ndarray
    demo_labels: np.ndarray


def start_cache(config: PPOConfig, workdir) -> StartCache:
    return StartCache(config.start_dir(workdir), config.start_fingerprint(), config.start_fields())


def prepare_env(config: PPOConfig) -> None:
    """Work an env needs once before a run. ALFWorld: generate (or find cached) its game pool up
    front, so demonstrations and rollouts never wait on the planner-checked generator."""
    if config.env != "ALFWorld":
        return
    from coso_jax.envs.alfworld import TASK_TYPES, pools

    types = TASK_TYPES if config.alfworld_task_type is None else (config.alfworld_task_type,)
    start = time.perf_counter()
    n = pools.build(["train"], types, config.alfworld_pool_size)
    log.info("ALFWorld pool: %d games in %s (%.1f s)", n, pools.default_cache_dir(), time.perf_counter() - start)


def load_or_build(config: PPOConfig, cache: StartCache) -> PPOStart:
    """The start of `config` from `cache`, built there first if it is not complete."""
    cache.check()
    prepare_env(config)
    model, sft = config.model, config.sft
    texts = cache.directory / DEMO_TEXTS
    if cache.complete and texts.exists():
        demos = sft_lib.load_demo_texts(texts)
    else:
        demos = sft_lib.collect_demos(config.env, sft.episodes, DEMO_SEED, sft.imperfect_frac, cot=model.cot,
                                      brief=model.brief_prompt, env_kwargs=config.env_kwargs)
    tokenizer = cache.tokenizer(model.hf_dir, lambda: demos.prompts + demos.answers, model.vocab_size)
    policy, model_config = policy_lib.build_policy(model, tokenizer)
    value_rngs = nnx.Rngs(policy_lib.MODEL_SEED + 1)
    # The RL4VLM head for a real-size model (loaded or random_weights), a small one for the tiny presets.
    real_size = bool(model.hf_dir) or model.random_weights
    value_head = (ValueHead(model_config.text.hidden_size, rngs=value_rngs) if real_size
                  else ValueHead.tiny(model_config.text.hidden_size, rngs=value_rngs))
    image_fn, num_image_tokens = policy_lib.llava_image_fn(model_config)
    encoder = policy_lib.make_encoder(model, tokenizer, demos.prompts, image_fn, num_image_tokens)
    classifier = policy_lib.build_classifier(model, len(tokenizer), text_interface(config.env).num_labels)
    demo_tokens, demo_mask = sft_lib.encode_answers(tokenizer, demos.answers, model.max_new_tokens)
    modules = {"value_head": value_head, "classifier": classifier}
    # A start without SFT from a local checkpoint (the paper preset: RL4VLM starts from an SFT'd model) keeps
    # the policy in hf_dir (or in its random seed): the cache stores the value head and classifier only (a 7B
    # policy is ~14-28 GiB).
    if not ((model.hf_dir or model.random_weights) and sft.epochs == 0):
        modules["policy"] = policy
    if cache.complete:
        summary = cache.load_weights(modules)
    else:
        data = (sft_lib.sft_arrays(demos, encoder, tokenizer, model.max_new_tokens) if sft.epochs
                else {"response_ids": demo_tokens})
        summary = supervised_start(
            policy, classifier, data, (demo_tokens, demo_mask, demos.labels), epochs=sft.epochs, lr=sft.lr,
            batch_size=sft.batch_size, pretrain_steps=config.causal.pretrain_steps, classifier_lr=config.causal.lr,
            classifier_minibatch=config.causal.minibatch, desc=f"SFT {config.env}", progress=config.run.progress,
            seed=policy_lib.MODEL_SEED)
        summary = cache.save(modules, dict(summary, env=config.env, demonstrations=len(demos),
                                           prompt_len=encoder.prompt_len))
    if not texts.exists():
        sft_lib.save_demo_texts(demos, texts)
    return PPOStart(tokenizer, encoder, policy, value_head, classifier, summary, demo_tokens, demo_mask, demos.labels)
