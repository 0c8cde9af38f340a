"""The four RL4VLM gym_cards games, reimplemented: NumberLine, EZPoints, Points24, Blackjack.

Envs (gymnasium, 300x300 RGB observations), their text interfaces (`text.py`), exact oracles
(`oracle.py`) and oracle demonstrations (`demos.py`). Registration happens in `coso_jax.envs`.
"""
from coso_jax.envs.gym_cards.blackjack import BlackjackEnv
from coso_jax.envs.gym_cards.numberline import NumberLineEnv
from coso_jax.envs.gym_cards.points import EZPointsEnv, Points24Env
from coso_jax.envs.gym_cards.text import BlackjackText, EZPointsText, NumberLineText, Points24Text, format_answer

GAMES: tuple[str, ...] = ("NumberLine", "EZPoints", "Points24", "Blackjack")
ENV_CLASSES = {
    "NumberLine": NumberLineEnv,
    "EZPoints": EZPointsEnv,
    "Points24": Points24Env,
    "Blackjack": BlackjackEnv,
}

__all__ = [
    "GAMES",
    "ENV_CLASSES",
    "NumberLineEnv",
    "EZPointsEnv",
    "Points24Env",
    "BlackjackEnv",
    "NumberLineText",
    "EZPointsText",
    "Points24Text",
    "BlackjackText",
    "format_answer",
]
