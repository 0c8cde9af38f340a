"""DigiRL's warm start: the analogue of DigiRL's AutoUI checkpoint (pre-trained on AitW), built once
from clean scripted-solver demonstrations and cached (`coso_jax.rl.start.StartCache`), with the
offline trajectories of the off2on schedule. Shared by every algo and seed.

The start directory holds, besides the shared files, `demos.json` (the demonstrations' prompts and
answers), `demo_images.npz` (their screenshots) and `offline.npz` (the offline trajectories).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flax import nnx

from coso_jax.causal import classifier as clf
from coso_jax.rl import policy as policy_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.config import DigiRLConfig
from coso_jax.rl.digirl.web import PromptBuilder, WebEnvPool, WebEpisode, run_web_episodes, solver_actor, stack_episodes
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.start import StartCache, supervised_start

NUM_LABELS = 8  # coso_jax.envs.web.ActionType
OFFLINE_SEED_OFFSET, DEMO_SEED_OFFSET = 0, 100  # train seeds of the offline data and of the demonstrations


@dataclasses.dataclass
class WebStart:
    tokenizer: Any
    encoder: PromptEncoder
    prompt_fn: PromptBuilder
    policy: nnx.Module
    family: Any  # the policy family (coso_jax.rl.digirl.families)
    classifier: clf.CausalClassifier
    summary: dict[str, Any]
    demo_tokens: np.ndarray
    demo_mask: np.ndarray
    demo_labels: np.ndarray
    offline: list[WebEpisode]


def start_cache(config: DigiRLConfig, workdir) -> StartCache:
    return StartCache(config.start_dir(workdir), config.start_fingerprint(), config.start_fields())


def suite_episodes(config: DigiRLConfig, per_task: int, seed_offset: int) -> list[tuple[str, int]]:
    """Train seeds, seed-major so every task is represented early; offsets keep the sets apart."""
    return [(t, seed_offset + k) for k in range(per_task) for t in config.task_names]


def build_policy(config: DigiRLConfig, family: Any, tokenizer: Any) -> nnx.Module:
    """A tiny policy of the config's family from scratch, or the local HF checkpoint `hf_dir`."""
    if config.model.hf_dir:
        if config.policy_family == "t5":
            from coso_jax.models import t5

            return t5.from_hf_dir(config.model.hf_dir)
        return policy_lib.build_policy(config.model, tokenizer)[0]
    return family.build(tokenizer, image_size=config.model.image_size, patch_size=config.model.patch_size,
                        seed=policy_lib.MODEL_SEED)


def _text_only(observations: np.ndarray):
    raise NotImplementedError("the DigiRL encoder encodes prompt text only; images go through the policy family")


def load_or_build(config: DigiRLConfig, cache: StartCache) -> WebStart:
    """The start of `config` from `cache`, built there first if it is not complete."""
    from coso_jax.envs.web import text_interface
    from coso_jax.rl.digirl.families import make_family

    cache.check()
    directory = cache.directory
    model = config.model
    pool = WebEnvPool(config.horizon, config.screen_scale, config.max_browsers)
    rng = np.random.default_rng(policy_lib.MODEL_SEED)
    try:
        if cache.complete:
            demos = json.loads((directory / "demos.json").read_text())
        else:
            t0 = time.perf_counter()
            raw_prompt = PromptBuilder(model.cot, model.brief_prompt, config.history_actions,
                                       elements=config.prompt_elements)
            episodes = run_web_episodes(pool, suite_episodes(config, config.sft.episodes, DEMO_SEED_OFFSET),
                                        config.num_envs, raw_prompt, model.image_size,
                                        solver_actor(None, model.max_new_tokens, 0.0, rng, model.cot,
                                                     config.prompt_elements))
            demos = {"prompts": [p for e in episodes for p in e.prompts],
                     "answers": [t for e in episodes for t in e.texts],
                     "success": [e.success for e in episodes], "seconds": time.perf_counter() - t0}
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "demos.json").write_text(json.dumps(demos) + "\n")
            np.savez_compressed(directory / "demo_images.npz",
                                images=np.concatenate([e.transitions["image"] for e in episodes]))
        tokenizer = cache.tokenizer(model.hf_dir, lambda: demos["prompts"] + demos["answers"], model.vocab_size)
        family = make_family(config.policy_family, tokenizer)
        policy = build_policy(config, family, tokenizer)
        encoder = policy_lib.make_encoder(model, tokenizer, demos["prompts"], _text_only,
                                          family.num_image_tokens(policy))
        prompt_fn = PromptBuilder(model.cot, model.brief_prompt, config.history_actions, encoder,
                                  config.prompt_elements)
        classifier = policy_lib.build_classifier(model, len(tokenizer), NUM_LABELS)
        iface = text_interface()
        labels = np.asarray([p.label if p.valid else -1 for p in (iface.parse(a) for a in demos["answers"])], np.int32)
        demo_tokens, demo_mask = sft_lib.encode_answers(tokenizer, demos["answers"], model.max_new_tokens)
        modules = {"policy": policy, "classifier": classifier}
        if cache.complete:
            summary = cache.load_weights(modules)
            offline = load_offline(directory / "offline.npz")
        else:
            images = np.load(directory / "demo_images.npz")["images"]
            ids, mask = encoder.encode_text(demos["prompts"])
            data = {"prompt_ids": ids, "prompt_mask": mask, "image": images, "response_ids": demo_tokens,
                    "response_mask": demo_mask}
            summary = supervised_start(
                policy, classifier, data, (demo_tokens, demo_mask, labels), epochs=config.sft.epochs,
                lr=config.sft.lr, batch_size=config.sft.batch_size, pretrain_steps=config.causal.pretrain_steps,
                classifier_lr=config.causal.lr, classifier_minibatch=config.causal.minibatch,
                desc=f"BC start {config.env}", progress=config.run.progress, seed=policy_lib.MODEL_SEED,
                score=lambda m, batch: family.score(m, batch, temperature=1.0).logprobs)
            t0 = time.perf_counter()
            offline = []
            if config.offline_episodes_per_task:
                encode = lambda texts: sft_lib.encode_answers(tokenizer, texts, model.max_new_tokens)
                offline = run_web_episodes(
                    pool, suite_episodes(config, config.offline_episodes_per_task, OFFLINE_SEED_OFFSET),
                    config.num_envs, prompt_fn, model.image_size,
                    solver_actor(encode, model.max_new_tokens, config.offline_imperfect_frac, rng, model.cot,
                                 config.prompt_elements))
            save_offline(directory / "offline.npz", offline)
            summary = cache.save(modules, dict(
                summary, env=config.env, demonstrations=len(demos["prompts"]), demo_episodes=len(demos["success"]),
                demo_success_rate=float(np.mean(demos["success"])), demo_seconds=demos["seconds"],
                prompt_len=encoder.prompt_len, max_answer_tokens=int(demo_mask.sum(1).max()),
                offline_seconds=time.perf_counter() - t0, offline_trajectories=len(offline),
                offline_success_rate=float(np.mean([e.success for e in offline])) if offline else None))
    finally:
        pool.close()
    return WebStart(tokenizer, encoder, prompt_fn, policy, family, classifier, summary, demo_tokens, demo_mask,
                    labels, offline)


def save_offline(path: Path, episodes: Sequence[WebEpisode]) -> None:
    if not episodes:
        np.savez_compressed(path, lengths=np.zeros(0, np.int64))
        return
    arrays = stack_episodes(episodes)
    np.savez_compressed(path, lengths=np.asarray([e.length for e in episodes]),
                        success=np.asarray([e.success for e in episodes]),
                        tasks=np.asarray([e.task for e in episodes]), seeds=np.asarray([e.seed for e in episodes]),
                        **{f"t_{k}": v for k, v in arrays.items()})


def load_offline(path: Path) -> list[WebEpisode]:
    z = np.load(path)
    out, start = [], 0
    for i, n in enumerate(z["lengths"]):
        transitions = {k[2:]: z[k][start:start + n] for k in z.files if k.startswith("t_")}
        out.append(WebEpisode(str(z["tasks"][i]), int(z["seeds"][i]), bool(z["success"][i]), int(n), transitions, []))
        start += n
    return out
