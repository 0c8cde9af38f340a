"""Blackjack with card images (RL4VLM gym_cards Blackjack-v0 = gymnasium Blackjack-v1 rules).

Infinite deck: each card's value is drawn uniformly from [1..9, 10, 10, 10, 10]; its suit is
uniform; a 10-valued card is shown as J, Q or K (uniformly), a 1 as an ace. The dealer and the
player get two cards each. An ace counts 11 when that does not bust the hand ("usable ace").
Action 0 = stand (stick): the dealer draws while below 17 (standing on soft 17), reward =
sign(player score - dealer score) with a bust scoring 0, terminated. Action 1 = hit: the player
draws; a bust gives -1 and terminates, otherwise reward 0. No natural bonus (natural=False,
sab=False): a natural wins +1 against a dealer without 21, like any other better hand.

The image shows the dealer's first card face up, the second face down, and the player's cards
(70x98 px): up to four side by side from (5, 150), 74 px apart; a longer hand is fanned
(overlapping) so that every card stays on screen. The reference laid the row out without fanning:
card k (0-based) at x = 5 + 74 k for k <= 4, so the fifth card starts at x = 301, off the 300-px
image, and from the sixth on a second row at y = 252 (x = 5, 79, ...) of which only the top 48
pixel rows show (`reference_envs.md` §1.4). Its policy thus never saw a fifth card. The
constructor keyword `reference_render=True` (a `gym.make` kwarg) reproduces that layout; the
default (False) shows every card. Rules and rewards are the same either way.
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

__all__ = ["BlackjackEnv", "ACTION_NAMES", "hand_value", "usable_ace", "score", "player_card_positions"]

ACTION_NAMES: tuple[str, ...] = ("stand", "hit")
DECK: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 10)
CARD_W, CARD_H = 70, 98
PLAYER_X, PLAYER_Y, CARD_STEP = 5, 150, 74  # first player card's corner; x step (card width + 4)
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


def player_card_positions(n: int, reference: bool = False) -> list[tuple[int, int]]:
    """Top-left corners (x, y) in pixels of a player's `n` cards on the 300x300 image.

    Args:
      n: number of player cards (>= 0).
      reference: the reference's layout (five to a row from (5, 150), 74 px apart, then a second
        row 102 px lower; cards past the image edge are clipped away) instead of ours (four side by
        side, a longer hand fanned across the row so every card is visible).
    """
    if reference:
        row2 = PLAYER_Y + CARD_H + (CARD_STEP - CARD_W)
        return [(PLAYER_X + CARD_STEP * i, PLAYER_Y) if i <= 4 else (PLAYER_X + CARD_STEP * (i - 5), row2)
                for i in range(n)]
    step = CARD_STEP if n <= 4 else (R.CANVAS - 2 * PLAYER_X - CARD_W) // (n - 1)
    return [(PLAYER_X + i * step, PLAYER_Y) for i in range(n)]


class BlackjackEnv(gym.Env):
    """Blackjack as a gymnasium env with 300x300 RGB observations (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, reference_render: bool = False) -> None:
        """Args:
          render_mode: None or "rgb_array" (observations are always the 300x300 RGB image).
          reference_render: lay the player's cards out as the reference did (a fifth card off the
            image, a sixth and later half off it); False (ours) keeps every card visible.
        """
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.reference_render = bool(reference_render)
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
        positions = player_card_positions(len(self.player), self.reference_render)
        for (x, y), (_, rank, suit) in zip(positions, self.player):
            R.paste(obs, R.card_face(rank, suit, CARD_W, CARD_H), x, y)  # clipped at the image edge
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
