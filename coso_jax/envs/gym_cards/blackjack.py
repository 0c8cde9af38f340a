"""Blackjack with card images (RL4VLM gym_cards Blackjack-v0 = gymnasium Blackjack-v1 rules).

Infinite deck: each card's value is drawn uniformly from [1..9, 10, 10, 10, 10]; its suit is
uniform; a 10-valued card is shown as J, Q or K (uniformly), a 1 as an ace. The dealer and the
player get two cards each. An ace counts 11 when that does not bust the hand ("usable ace").
Action 0 = stand (stick): the dealer draws while below 17 (standing on soft 17), reward =
sign(player score - dealer score) with a bust scoring 0, terminated. Action 1 = hit: the player
draws; a bust gives -1 and terminates, otherwise reward 0. No natural bonus (natural=False,
sab=False): a natural wins +1 against a dealer without 21, like any other better hand.

The image shows the dealer's first card face up, the second face down, and the player's cards.
info: {"dealer_cards": [[value, rank, suit], ...] (the full dealer hand; the prompt shows only
the first card), "player_cards": [[value, rank, suit], ...], "player_sum": int, "usable_ace": bool,
"dealer_showing": int (1 for an ace)}.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from coso_jax.envs.gym_cards import render as R

__all__ = ["BlackjackEnv", "ACTION_NAMES", "hand_value", "usable_ace", "score"]

ACTION_NAMES: tuple[str, ...] = ("stand", "hit")
DECK: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 10)
CARD_W, CARD_H = 70, 98
Card = list  # [value, rank, suit]


def usable_ace(values: list[int]) -> bool:
    """True when the hand holds an ace that can count 11 without busting."""
    return 1 in values and sum(values) + 10 <= 21


def hand_value(values: list[int]) -> int:
    """Best total of a hand of card values (an ace counts 11 when that does not bust)."""
    total = sum(values)
    return total + 10 if usable_ace(values) else total


def score(values: list[int]) -> int:
    """Hand total, or 0 for a bust."""
    total = hand_value(values)
    return 0 if total > 21 else total


def _static_canvas() -> np.ndarray:
    canvas = np.empty((R.CANVAS, R.CANVAS, 3), np.uint8)
    canvas[:] = R.TABLE_GREEN
    dealer = R.text_strip(((0, "Dealer"),), 100, 20, size=16, bold=True, x=0)
    player = R.text_strip(((0, "Player"),), 100, 20, size=16, bold=True, x=0)
    R.paste(canvas, dealer, 5, 5)
    R.paste(canvas, player, 5, 130)
    R.paste(canvas, R.card_back(CARD_W, CARD_H), 78, 25)
    canvas.setflags(write=False)
    return canvas


_STATIC: list[np.ndarray] = []


class BlackjackEnv(gym.Env):
    """Blackjack as a gymnasium env with 300x300 RGB observations (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(2)
        self.observation_space = spaces.Box(0, 255, (R.CANVAS, R.CANVAS, 3), np.uint8)
        self.dealer: list[Card] = []
        self.player: list[Card] = []

    def _draw(self) -> Card:
        rng = self.np_random
        value = int(DECK[int(rng.integers(len(DECK)))])
        suit = R.SUITS[int(rng.integers(4))]
        if value == 1:
            rank = "A"
        elif value == 10:
            rank = ("J", "Q", "K")[int(rng.integers(3))]
        else:
            rank = str(value)
        return [value, rank, suit]

    @staticmethod
    def _values(hand: list[Card]) -> list[int]:
        return [card[0] for card in hand]

    def _info(self) -> dict[str, Any]:
        values = self._values(self.player)
        return {
            "dealer_cards": [list(c) for c in self.dealer],
            "player_cards": [list(c) for c in self.player],
            "player_sum": hand_value(values),
            "usable_ace": bool(usable_ace(values)),
            "dealer_showing": int(self.dealer[0][0]) if self.dealer else 0,
        }

    def _obs(self) -> np.ndarray:
        if not self.dealer:
            raise RuntimeError("BlackjackEnv: call reset() before step() or render()")
        if not _STATIC:
            _STATIC.append(_static_canvas())
        obs = _STATIC[0].copy()
        _, rank, suit = self.dealer[0]
        R.paste(obs, R.card_face(rank, suit, CARD_W, CARD_H), 5, 25)
        n = len(self.player)
        # Up to four cards side by side; more are fanned (overlapping) so the row stays on screen.
        step = 74 if n <= 4 else (R.CANVAS - 10 - CARD_W) // (n - 1)
        for i, (_, rank, suit) in enumerate(self.player):
            R.paste(obs, R.card_face(rank, suit, CARD_W, CARD_H), 5 + i * step, 150)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.dealer = [self._draw(), self._draw()]
        self.player = [self._draw(), self._draw()]
        return self._obs(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"Blackjack action must be 0 ('stand') or 1 ('hit'), got {action!r}")
        if int(action) == 1:
            self.player.append(self._draw())
            if hand_value(self._values(self.player)) > 21:
                return self._obs(), -1.0, True, False, self._info()
            return self._obs(), 0.0, False, False, self._info()
        while hand_value(self._values(self.dealer)) < 17:
            self.dealer.append(self._draw())
        player, dealer = score(self._values(self.player)), score(self._values(self.dealer))
        reward = float((player > dealer) - (player < dealer))
        return self._obs(), reward, True, False, self._info()

    def render(self) -> np.ndarray:
        return self._obs()
