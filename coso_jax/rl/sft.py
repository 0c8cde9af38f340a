"""Supervised warm start on oracle demonstrations (the paper's backbones start from an SFT model).

The demonstrations come from `coso_jax.envs.gym_cards.demos` (ALFWorld: `coso_jax.envs.alfworld.demos`,
the planner's walkthroughs) as (seed, step, prompt, answer, action) records; the observation image of
each record is recovered by replaying the episode from its seed (ALFWorld: its pool game), so the
demo files stay small and the images are exactly what the env renders.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import coso_jax.envs  # noqa: F401  (registers the envs)
from coso_jax import sampling
from coso_jax.envs import text_interface
from coso_jax.envs.gym_cards import demos as gym_cards_demos
from coso_jax.rl.prompting import PromptEncoder


@dataclasses.dataclass
class DemoSet:
    """Demonstrations with their observations: `observations[n, H, W, 3]`, texts and labels.

    `observations` is None for the texts alone (`load_demo_texts`: what a cached SFT start needs).
    """

    observations: np.ndarray | None
    prompts: list[str]
    answers: list[str]
    labels: np.ndarray  # [n] int32, -1 where the answer does not parse (never for oracle answers)

    def __len__(self) -> int:
        return len(self.prompts)


def save_demo_texts(demos: DemoSet, path: str | Path) -> None:
    """Writes the texts and labels of `demos` (gzipped JSON; no observations)."""
    payload = {"prompts": demos.prompts, "answers": demos.answers, "labels": [int(x) for x in demos.labels]}
    tmp = Path(str(path) + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(payload, f)
    tmp.replace(path)


def load_demo_texts(path: str | Path) -> DemoSet:
    """The `DemoSet` written by `save_demo_texts`, with `observations=None`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        payload = json.load(f)
    return DemoSet(None, list(payload["prompts"]), list(payload["answers"]),
                   np.asarray(payload["labels"], np.int32))


def collect_demos(env_name: str, episodes: int, seed: int, imperfect_frac: float, cot: bool = True,
                  brief: bool = False, env_kwargs: dict[str, Any] | None = None) -> DemoSet:
    """Generates demonstrations and replays each episode to recover its observations.

    `env_kwargs` are the env's `gym.make` arguments (ALFWorld: `task_type`, `pool_size`; the demos
    play games of that pool).
    """
    iface = text_interface(env_name)
    env_kwargs = dict(env_kwargs or {})
    alfworld = env_name == "ALFWorld"
    if alfworld:
        from coso_jax.envs.alfworld import demos as alfworld_demos

        task_type = env_kwargs.get("task_type")
        records = list(alfworld_demos.generate(
            episodes, seed, task_types=None if task_type is None else [task_type],
            pool_size=env_kwargs.get("pool_size", 100), imperfect_frac=imperfect_frac, cot=cot))
    else:
        records = list(gym_cards_demos.generate(env_name, episodes, seed, imperfect_frac, cot=cot))
    env = gym.make(f"coso_jax/{env_name}-v0", **env_kwargs)
    observations, prompts, answers, labels = [], [], [], []
    obs = info = None
    rng = np.random.default_rng(0)
    for rec in records:
        if rec["step"] == 0:
            if alfworld:
                obs, info = env.reset(options={"task_type": rec["task_type"], "index": rec["index"]})
            else:
                obs, info = env.reset(seed=int(rec["seed"]))
        if iface.prompt(info, cot=cot) != rec["prompt"]:
            raise RuntimeError(
                f"demo replay diverged at seed {rec['seed']} step {rec['step']}: the demo's prompt does "
                "not match the replayed env's prompt"
            )
        parsed = iface.parse(rec["answer"], rng, info)
        observations.append(obs)
        prompts.append(iface.prompt(info, cot=cot, brief=brief))
        answers.append(rec["answer"])
        labels.append(parsed.label if parsed.valid and parsed.label is not None else -1)
        # ALFWorld's actions are command strings; the gym_cards games' are action indices.
        obs, _, terminated, truncated, info = env.step(rec["action"] if alfworld else int(rec["action"]))
    env.close()
    return DemoSet(np.stack(observations), prompts, answers, np.asarray(labels, np.int32))


def encode_answers(tokenizer: Any, answers: Iterable[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded answer ids + EOS `[n, width]` and their mask; an answer too long raises."""
    answers = list(answers)
    ids = np.full((len(answers), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(answers), width), np.bool_)
    for row, answer in enumerate(answers):
        toks = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(toks) > width:
            raise ValueError(
                f"demonstration answer is {len(toks)} tokens (with EOS) but max_new_tokens is {width}; "
                f"raise max_new_tokens. Answer: {answer[:200]!r}"
            )
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = True
    return ids, mask


def sft_arrays(demos: DemoSet, encoder: PromptEncoder, tokenizer: Any, max_new_tokens: int) -> dict[str, np.ndarray]:
    inputs = encoder(demos.prompts, demos.observations)
    response_ids, response_mask = encode_answers(tokenizer, demos.answers, max_new_tokens)
    return dict(inputs, response_ids=response_ids, response_mask=response_mask)


def sft_loss(model: nnx.Module, batch: dict[str, jax.Array], score: Callable | None = None) -> jax.Array:
    """Mean negative log-likelihood per answer token (teacher forcing, temperature 1).

    `score(model, batch) -> token log-probs [B, N]` (default: the LLaVA scorer `sampling.score_batch_fn`;
    DigiRL passes its policy family's)."""
    if score is None:
        logprobs = sampling.score_batch_fn(model, None, batch, temperature=1.0).logprobs
    else:
        logprobs = score(model, batch)
    mask = batch["response_mask"].astype(bool)
    return -jnp.sum(jnp.where(mask, logprobs, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def train_sft(
    policy: nnx.Module,
    data: dict[str, np.ndarray],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    score: Callable | None = None,
) -> list[float]:
    """Fine-tunes `policy` in place with Adam (cosine decay, warmup-free); returns per-step losses.

    `score(model, batch) -> token log-probs` as in `sft_loss`. ValueError with fewer demonstrations than
    one batch."""
    n = len(data["response_ids"])
    if n < batch_size:
        raise ValueError(f"SFT needs at least batch_size={batch_size} demonstrations, got {n}")
    steps_per_epoch = n // batch_size
    total = max(epochs * steps_per_epoch, 1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=0.0))
    graphdef, params = nnx.split(policy, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: sft_loss(nnx.merge(graphdef, p), batch, score))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    history = []
    for _ in range(epochs):
        order = rng.permutation(n)
        for k in range(steps_per_epoch):
            idx = order[k * batch_size:(k + 1) * batch_size]
            batch = {key: value[idx] for key, value in data.items()}
            params, opt_state, loss = step(params, opt_state, batch)
            history.append(float(loss))
            if on_step is not None:
                on_step(len(history), history[-1])
    nnx.update(policy, params)
    return history
