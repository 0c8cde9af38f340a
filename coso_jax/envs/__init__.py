"""Environments with a text interface. Importing this package registers the gymnasium ids

  coso_jax/NumberLine-v0, coso_jax/EZPoints-v0, coso_jax/Points24-v0, coso_jax/Blackjack-v0,
  coso_jax/ALFWorld-v0 (50-step TimeLimit; needs the `alfworld` package, see envs/alfworld/)

(the gym_cards games each with a 300-step TimeLimit, as the reference registers them; the games'
own limits bind much earlier). `text_interface(name_or_id)` returns the env's `TextInterface`.
"""
from __future__ import annotations

import gymnasium as gym

from coso_jax.envs.base import (
    ActionSpans,
    ChoiceTextInterface,
    InvalidActionPolicy,
    ParsedAction,
    TextInterface,
    action_spans,
)

__all__ = [
    "ENV_IDS",
    "text_interface",
    "env_id",
    "short_name",
    "TextInterface",
    "ChoiceTextInterface",
    "ParsedAction",
    "ActionSpans",
    "InvalidActionPolicy",
    "action_spans",
]

_ENTRY_POINTS = {
    "NumberLine": "coso_jax.envs.gym_cards.numberline:NumberLineEnv",
    "EZPoints": "coso_jax.envs.gym_cards.points:EZPointsEnv",
    "Points24": "coso_jax.envs.gym_cards.points:Points24Env",
    "Blackjack": "coso_jax.envs.gym_cards.blackjack:BlackjackEnv",
    # needs the `alfworld` package (the `alfworld` / `test` extra); imported only when made
    "ALFWorld": "coso_jax.envs.alfworld.env:ALFWorldEnv",
}
ENV_IDS: dict[str, str] = {name: f"coso_jax/{name}-v0" for name in _ENTRY_POINTS}
MAX_EPISODE_STEPS = 300


# Step limits other than MAX_EPISODE_STEPS (ALFWorld: 50, as RL4VLM; the env also truncates itself).
_MAX_STEPS = {"ALFWorld": 50}


def _register() -> None:
    for name, entry in _ENTRY_POINTS.items():
        if ENV_IDS[name] not in gym.registry:
            gym.register(id=ENV_IDS[name], entry_point=entry,
                         max_episode_steps=_MAX_STEPS.get(name, MAX_EPISODE_STEPS))


def short_name(name_or_id: str) -> str:
    """'coso_jax/NumberLine-v0', 'NumberLine-v0', 'numberline' -> 'NumberLine' (case-insensitive)."""
    if not isinstance(name_or_id, str):
        raise TypeError(f"env name must be a string, got {type(name_or_id).__name__}")
    name = name_or_id.split("/")[-1]
    if name.endswith("-v0"):
        name = name[:-3]
    for known in _ENTRY_POINTS:
        if known.lower() == name.lower():
            return known
    raise ValueError(f"unknown env {name_or_id!r}; known: {sorted(ENV_IDS.values())}")


def env_id(name_or_id: str) -> str:
    """The registered gymnasium id of an env given by short name or id."""
    return ENV_IDS[short_name(name_or_id)]


def text_interface(name_or_id: str, invalid_policy: InvalidActionPolicy | None = None) -> TextInterface:
    """The text interface of an env, by short name ('NumberLine') or id ('coso_jax/NumberLine-v0').

    Args:
      invalid_policy: what an unparseable answer does; default: a uniformly random legal action
        (the gym_cards reference).
    """
    name = short_name(name_or_id)
    if name == "ALFWorld":
        from coso_jax.envs.alfworld.text import ALFWorldText

        return ALFWorldText(invalid_policy=invalid_policy)
    from coso_jax.envs.gym_cards.text import INTERFACES

    return INTERFACES[name](invalid_policy=invalid_policy)


_register()
