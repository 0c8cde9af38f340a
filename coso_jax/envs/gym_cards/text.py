"""Prompts and parsers of the four gym_cards games (the `TextInterface` of each env).

Each prompt names the game and its goal, lists the legal actions, gives the state the image
cannot show (the formula so far in the points games) and asks for one JSON object: with chain of
thought, first what the model reads off the image (NumberLine: both numbers; points games: the
card numbers and the formula; Blackjack: nothing extra), then "thoughts", then "action". Without
chain of thought only the "action" field is asked for. The answer format of the demonstrations
(`demos.py`) is built by `format_answer` so the two never drift apart.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from coso_jax.envs.base import ChoiceTextInterface, InvalidActionPolicy
from coso_jax.envs.gym_cards.blackjack import ACTION_NAMES as BLACKJACK_ACTIONS
from coso_jax.envs.gym_cards.numberline import ACTION_NAMES as NUMBERLINE_ACTIONS
from coso_jax.envs.gym_cards.points import EZPOINTS_ACTIONS, POINTS24_ACTIONS, display_formula

__all__ = [
    "NumberLineText",
    "EZPointsText",
    "Points24Text",
    "BlackjackText",
    "format_answer",
    "INTERFACES",
]

_JSON_ONLY = "Reply with one JSON object and nothing else, in this form:"
# The brief prompts are for tiny CPU models trained from scratch: they read no instructions and pay
# for every prompt token, and a from-scratch tiny ViT does not learn to read digits and cards off
# the frame within a CPU budget (measured: chance-level reading after 300 SFT steps), so a brief
# prompt names the game and states the game state in text. Real VLMs use the full prompts.
_BRIEF_TAIL = "Answer in JSON."


def format_answer(fields: Mapping[str, Any]) -> str:
    """One-line JSON answer with the fields in the given order (the format every prompt asks for)."""
    return json.dumps(dict(fields), ensure_ascii=False)


def _quote_list(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)


class NumberLineText(ChoiceTextInterface):
    """NumberLine: "-" / "+"."""

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        super().__init__("NumberLine", NUMBERLINE_ACTIONS, invalid_policy=invalid_policy)

    def prompt(self, info: Mapping[str, Any] | None = None, cot: bool = True, brief: bool = False) -> str:
        if brief:
            info = info or {}
            return f"NumberLine. Current {info.get('current', '?')}, target {info.get('target', '?')}. {_BRIEF_TAIL}"
        head = (
            "You are playing NumberLine. The image shows a target number and a current number, "
            "each between 0 and 5. Move the current number onto the target, one step at a time.\n"
            'Legal actions: "-" (decrease the current number by one), "+" (increase it by one).\n'
        )
        if cot:
            form = ('{"current number": "<current number in the image>", "target number": '
                    '"<target number in the image>", "thoughts": "<which way to move and why>", '
                    '"action": "<- or +>"}')
        else:
            form = '{"action": "<- or +>"}'
        return f"{head}{_JSON_ONLY}\n{form}"


class _PointsText(ChoiceTextInterface):
    num_cards = 0
    target = 0
    game = ""
    ops_sentence = ""
    value_note = "J, Q and K count as 10 and an ace as 1."

    def __init__(self, actions: tuple[str, ...], invalid_policy: InvalidActionPolicy | None) -> None:
        super().__init__(self.game, actions, ten_first=True, invalid_policy=invalid_policy)

    def prompt(self, info: Mapping[str, Any] | None = None, cot: bool = True, brief: bool = False) -> str:
        formula = display_formula(list((info or {}).get("formula", [])))
        if brief:
            numbers = ", ".join(str(n) for n in (info or {}).get("numbers", []))
            return f'{self.game}. Cards {numbers}. Formula so far: "{formula}". {_BRIEF_TAIL}'
        ops = [a for a in self.action_names if not a.isdigit() and a != "="]
        head = (
            f"You are playing {self.game}. The image shows {self.num_cards} playing cards; "
            f"{self.value_note} {self.ops_sentence} Enter one token per step "
            'and "=" when the formula is complete.\n'
            f'Legal actions: "1" to "10", {_quote_list(tuple(ops))}, "=".\n'
            f'Formula so far: "{formula}"\n'
        )
        if cot:
            form = (f'{{"cards": [<the {self.num_cards} card numbers>], "formula": "<the formula so far>", '
                    '"thoughts": "<the formula you aim for and its next token>", "action": "<one token>"}')
        else:
            form = '{"action": "<one token>"}'
        return f"{head}{_JSON_ONLY}\n{form}"


class EZPointsText(_PointsText):
    """EZPoints: "1".."10", "+", "*", "="."""

    num_cards, target, game = 2, 12, "EZPoints"
    value_note = "J, Q and K count as 10."
    ops_sentence = 'Build a formula equal to 12 that uses each card\'s number once, with "+" and "*".'

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        super().__init__(EZPOINTS_ACTIONS, invalid_policy)


class Points24Text(_PointsText):
    """Points24: "1".."10", "+", "-", "*", "/", "(", ")", "="."""

    num_cards, target, game = 4, 24, "Points24"
    ops_sentence = ("Build a formula equal to 24 that uses each card's number once, with "
                    '"+", "-", "*", "/" and parentheses.')

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        super().__init__(POINTS24_ACTIONS, invalid_policy)


class BlackjackText(ChoiceTextInterface):
    """Blackjack: "stand" / "hit"."""

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        super().__init__("Blackjack", BLACKJACK_ACTIONS, invalid_policy=invalid_policy)

    def prompt(self, info: Mapping[str, Any] | None = None, cot: bool = True, brief: bool = False) -> str:
        if brief:
            info = info or {}
            return (f"Blackjack. Your sum {info.get('player_sum', '?')}"
                    f"{' with a usable ace' if info.get('usable_ace') else ''}, dealer shows "
                    f"{info.get('dealer_showing', '?')}. {_BRIEF_TAIL}")
        head = (
            "You are playing Blackjack. The image shows the dealer's cards (one face up, one face "
            "down) and your cards. Finish closer to 21 than the dealer without going over; J, Q and "
            "K count 10, an ace 1 or 11.\n"
            'Legal actions: "stand" (take no more cards), "hit" (take one more card).\n'
        )
        if cot:
            form = ('{"thoughts": "<your total, the dealer\'s card and what to do>", '
                    '"action": "<stand or hit>"}')
        else:
            form = '{"action": "<stand or hit>"}'
        return f"{head}{_JSON_ONLY}\n{form}"


INTERFACES = {
    "NumberLine": NumberLineText,
    "EZPoints": EZPointsText,
    "Points24": Points24Text,
    "Blackjack": BlackjackText,
}
