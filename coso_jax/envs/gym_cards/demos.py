"""Oracle demonstrations: complete chain-of-thought answers for supervised warm starts.

`generate(env_name, num_episodes, seed, imperfect_frac)` plays seeded episodes with the oracle
(`oracle.py`) and yields one record per step:

  {"env", "seed", "step", "prompt", "answer", "action", "reward", "imperfect"}

`seed` is the episode's reset seed (so `env.reset(seed=record["seed"])` and replaying the earlier
actions reproduces the step's image); `answer` is the JSON answer in the prompt's format: what the
image shows, short "thoughts" that explain the choice, then "action". With probability
`imperfect_frac` a step takes a different legal action instead (drawn uniformly, `imperfect` is
True) and its thoughts argue for that action, so a model fine-tuned on the records is good but not
perfect and leaves room for RL. Thoughts are short on purpose (about 15-30 tokens): a tiny CPU
model must learn them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping

import gymnasium as gym
import numpy as np

from coso_jax.envs import env_id, short_name, text_interface
from coso_jax.envs.gym_cards.oracle import EZPOINTS_OPS, POINTS24_OPS, blackjack_action, numberline_action, points_plan
from coso_jax.envs.gym_cards.points import BLANK, display_formula
from coso_jax.envs.gym_cards.text import format_answer

__all__ = ["generate", "write_jsonl", "read_jsonl", "answer_for", "episode_seed"]

_POINTS = {"EZPoints": (12, EZPOINTS_OPS), "Points24": (24, POINTS24_OPS)}


def episode_seed(seed: int, episode: int) -> int:
    """Reset seed of episode `episode` of a demonstration run started with `seed`."""
    return int(seed) * 1_000_003 + int(episode)


def _card_word(value: int) -> str:
    return "an ace" if value == 1 else str(value)


def answer_for(env_name: str, info: Mapping[str, Any], action: int, *, cot: bool = True) -> str:
    """The JSON answer (in the prompt's format) whose thoughts argue for taking `action`."""
    name = short_name(env_name)
    iface = text_interface(name)
    token = iface.action_names[action]
    if not cot:
        return format_answer({"action": token})
    if name == "NumberLine":
        cur, tgt = int(info["current"]), int(info["target"])
        relation = "less than" if cur < tgt else "greater than"
        verb = "increase" if token == "+" else "decrease"
        thoughts = f"{cur} is {relation} {tgt}, so I should {verb}."
        return format_answer({"current number": str(cur), "target number": str(tgt),
                              "thoughts": thoughts, "action": token})
    if name == "Blackjack":
        total = int(info["player_sum"])
        soft = " with a usable ace" if info["usable_ace"] else ""
        verb = "hit" if token == "hit" else "stand"
        thoughts = (f"I have {total}{soft} and the dealer shows "
                    f"{_card_word(int(info['dealer_showing']))}, so I {verb}.")
        return format_answer({"thoughts": thoughts, "action": token})
    target, ops = _POINTS[name]
    numbers = [int(v) for v in info["numbers"]]
    formula = list(info["formula"])
    plan, best = points_plan(numbers, formula, target, ops)
    if plan is None:
        if any(t != BLANK for t in formula):
            reason = f"The formula so far cannot reach {target}"
        else:
            reason = f"No formula of these cards makes {target}"
        thoughts = f"{reason}, so I finish with {token}." if token == "=" else f"{reason}; I try {token}."
    elif token == "=":
        thoughts = f"{' '.join(plan)} makes {target} and is complete, so I finish with =."
    else:
        thoughts = f"{' '.join(plan)} makes {target}, so the next token is {token}."
    return format_answer({"cards": numbers, "formula": display_formula(formula),
                          "thoughts": thoughts, "action": token})


def _oracle(name: str, info: Mapping[str, Any], action_names: tuple[str, ...]) -> int:
    if name == "NumberLine":
        return numberline_action(int(info["current"]), int(info["target"]))
    if name == "Blackjack":
        return blackjack_action(int(info["player_sum"]), bool(info["usable_ace"]), int(info["dealer_showing"]))
    target, ops = _POINTS[name]
    _, token = points_plan(info["numbers"], info["formula"], target, ops)
    return action_names.index(token)


def generate(env_name: str, num_episodes: int, seed: int = 0, imperfect_frac: float = 0.0, *,
             cot: bool = True) -> Iterator[dict[str, Any]]:
    """Yields demonstration records (see the module docstring), episode by episode.

    Args:
      env_name: short name ("NumberLine") or id ("coso_jax/NumberLine-v0").
      num_episodes: episodes to play.
      seed: run seed; episode k resets with `episode_seed(seed, k)`; the imperfect-action draws
        come from their own generator seeded by `seed`, so the records are reproducible.
      imperfect_frac: probability in [0, 1] that a step takes a non-oracle action.
      cot: chain-of-thought answers (default) or action-only answers.
    """
    if not 0.0 <= imperfect_frac <= 1.0:
        raise ValueError(f"imperfect_frac must be in [0, 1], got {imperfect_frac}")
    if num_episodes < 0:
        raise ValueError(f"num_episodes must be >= 0, got {num_episodes}")
    name = short_name(env_name)
    iface = text_interface(name)
    rng = np.random.default_rng(seed)
    env = gym.make(env_id(name))
    try:
        for episode in range(num_episodes):
            ep_seed = episode_seed(seed, episode)
            _, info = env.reset(seed=ep_seed)
            step = 0
            while True:
                action = _oracle(name, info, iface.action_names)
                imperfect = bool(imperfect_frac > 0 and rng.random() < imperfect_frac)
                if imperfect:
                    others = [a for a in range(iface.num_actions) if a != action]
                    action = int(others[int(rng.integers(len(others)))])
                prompt = iface.prompt(info, cot=cot)
                answer = answer_for(name, info, action, cot=cot)
                _, reward, terminated, truncated, next_info = env.step(action)
                yield {"env": name, "seed": ep_seed, "step": step, "prompt": prompt, "answer": answer,
                       "action": int(action), "reward": float(reward), "imperfect": imperfect}
                step += 1
                info = next_info
                if terminated or truncated:
                    break
    finally:
        env.close()


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Writes records as JSON lines (UTF-8), creating parent dirs; returns the number written."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads records written by `write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
