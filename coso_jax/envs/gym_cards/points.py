"""EZPoints and Points24: build a formula from the dealt cards, one token per step.

Rules (RL4VLM gym_cards EZPoints-v0 / Points24-v0); J, Q and K count as 10:
- EZPoints: two cards, target 12, tokens "1".."10", "+", "*", "=". The first card's rank is
  uniform in 2..13; if its value is in {2, 3, 4, 6} then with probability 1/2 the second card is
  12 // value (a product solution), otherwise 12 - value (a sum solution); the order of the two
  cards is then swapped with probability 1/2. A solution always exists.
- Points24: four cards, ranks uniform in 1..13 (ace = 1), target 24, tokens "1".."10", "+", "-",
  "*", "/", "(", ")", "=". Many deals have no solution.
- Step, in this order: (1) if the formula already holds more than `max_formula_len` tokens (5 /
  20), the episode is truncated with reward -1 (the action is ignored); (2) a number that would be
  used more often than it appears among the cards appends a blank token (so the formula still
  grows) and gives -1; (3) "=" ends the episode: +10 if the formula's value equals the target and
  every card was used, else -1 ("=" is not appended); (4) any other token is appended, reward 0.
- The formula is evaluated exactly (see `formula.py`), unlike the reference's float `eval`: `/`,
  `//` and negative integer powers are exact fractions (8 / (3 - 8 / 3) makes 24 here, not in the
  reference). A power with a non-integer exponent is refused (-1) by default; the constructor
  keyword `allow_fractional_powers=True` (a `gym.make` kwarg) evaluates such a formula with Python
  floats, as the reference did, so 4 ** (3 / 2) * 3 with cards 4, 3, 2, 3 wins +10 as there.
  EZPoints has no "/" or parentheses, so its exponents are always integers and the keyword changes
  nothing there (it is accepted for uniformity). docs/deviations.md lists every difference.

info: {"cards": ["5H", "KD", ...] (rank + suit), "numbers": [5, 10, ...] (card values),
"formula": [tokens so far; " " marks a refused number]}.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from coso_jax.envs.gym_cards import render as R
from coso_jax.envs.gym_cards.formula import FormulaError, evaluate

__all__ = ["PointsEnv", "EZPointsEnv", "Points24Env", "EZPOINTS_ACTIONS", "POINTS24_ACTIONS"]

NUMBER_TOKENS: tuple[str, ...] = tuple(str(v) for v in range(1, 11))
EZPOINTS_ACTIONS: tuple[str, ...] = NUMBER_TOKENS + ("+", "*", "=")
POINTS24_ACTIONS: tuple[str, ...] = NUMBER_TOKENS + ("+", "-", "*", "/", "(", ")", "=")
BLANK = " "


def display_formula(tokens: list[str]) -> str:
    """The formula as shown to the agent: tokens joined by single spaces, refused-number blanks dropped."""
    return " ".join(t for t in tokens if t != BLANK)


class PointsEnv(gym.Env):
    """Shared logic of the points games; subclasses deal the cards and lay out the canvas."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    action_names: tuple[str, ...] = ()
    num_cards: int = 0
    target: int = 0
    max_formula_len: int = 0
    success_reward: float = 10.0

    def __init__(self, render_mode: str | None = None, allow_fractional_powers: bool = False) -> None:
        """Args:
          render_mode: None or "rgb_array" (observations are always the 300x300 RGB image).
          allow_fractional_powers: False (ours): a formula with a non-integer exponent fails (-1);
            True (the reference): it is evaluated with Python floats (see `formula.py`).
        """
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.allow_fractional_powers = bool(allow_fractional_powers)
        self.action_space = spaces.Discrete(len(self.action_names))
        self.observation_space = spaces.Box(0, 255, (R.CANVAS, R.CANVAS, 3), np.uint8)
        self.cards: list[str] = []
        self.numbers: list[int] = []
        self.formula: list[str] = []
        self.used: list[int] = []
        self._base: np.ndarray | None = None

    # --- dealing and drawing (per game) -------------------------------------------------------
    def _deal(self) -> tuple[list[int], list[str]]:
        """Returns (ranks 1..13, suits) of the dealt cards, drawn from self.np_random."""
        raise NotImplementedError

    def _draw_cards(self) -> np.ndarray:
        """The cards in a row on the table, vertically centred; sizes come from the subclass."""
        canvas = np.empty((R.CANVAS, R.CANVAS, 3), np.uint8)
        canvas[:] = R.TABLE_GREEN
        y = int((R.CANVAS - self.card_h) / 2)
        for i, (rank, suit) in enumerate(zip(self._ranks, self._suits)):
            x = 5 + int(i * self.card_w * 1.1)
            R.paste(canvas, R.card_face(R.rank_name(rank), suit, self.card_w, self.card_h), x, y)
        return canvas

    def _formula_band(self) -> tuple[int, np.ndarray]:
        raise NotImplementedError

    # --- gymnasium API ----------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"cards": list(self.cards), "numbers": list(self.numbers), "formula": list(self.formula)}

    def _obs(self) -> np.ndarray:
        if self._base is None:
            raise RuntimeError(f"{type(self).__name__}: call reset() before step() or render()")
        obs = self._base.copy()
        y, band = self._formula_band()
        R.paste(obs, band, 0, y)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        ranks, suits = self._deal()
        self.cards = [R.rank_name(r) + s for r, s in zip(ranks, suits)]
        self.numbers = [min(r, 10) for r in ranks]
        self._ranks = ranks
        self._suits = suits
        self.formula = []
        self.used = []
        self._base = self._draw_cards()
        return self._obs(), self._info()

    def set_state(self, ranks: list[int], suits: list[str] | None = None, formula: list[str] = ()) -> tuple[np.ndarray, dict]:
        """Puts the game in a given state (for tests and hand-made examples); returns (obs, info).

        Args:
          ranks: card ranks 1..13 (ace = 1, J/Q/K = 11..13), one per card.
          suits: suits from "CDHS" (default: all spades).
          formula: tokens already entered (numbers in it count as used cards).
        """
        if len(ranks) != self.num_cards:
            raise ValueError(f"{type(self).__name__} needs {self.num_cards} card ranks, got {len(ranks)}")
        suits = list(suits) if suits is not None else ["S"] * self.num_cards
        if len(suits) != self.num_cards or any(s not in R.SUITS for s in suits):
            raise ValueError(f"suits must be {self.num_cards} letters from {R.SUITS}, got {suits}")
        self._ranks, self._suits = [int(r) for r in ranks], suits
        self.cards = [R.rank_name(r) + s for r, s in zip(self._ranks, suits)]
        self.numbers = [min(r, 10) for r in self._ranks]
        self.formula = list(formula)
        self.used = [int(t) for t in self.formula if t in NUMBER_TOKENS]
        self._base = self._draw_cards()
        return self._obs(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(
                f"{type(self).__name__} action must be an int in 0..{self.action_space.n - 1}, got {action!r}")
        token = self.action_names[int(action)]
        if len(self.formula) > self.max_formula_len:
            return self._obs(), -1.0, False, True, self._info()
        if token in NUMBER_TOKENS:
            value = int(token)
            if self.used.count(value) + 1 > self.numbers.count(value):
                self.formula.append(BLANK)
                return self._obs(), -1.0, False, False, self._info()
            self.used.append(value)
        if token == "=":
            try:
                result = evaluate(self.formula, allow_fractional_powers=self.allow_fractional_powers)
                ok = result == self.target
            except FormulaError:
                ok = False
            if len(self.used) != self.num_cards:
                ok = False
            reward = self.success_reward if ok else -1.0
            return self._obs(), reward, True, False, self._info()
        self.formula.append(token)
        return self._obs(), 0.0, False, False, self._info()

    def render(self) -> np.ndarray:
        return self._obs()


class EZPointsEnv(PointsEnv):
    """Two cards, "+" and "*", make 12 (see the module docstring)."""

    action_names = EZPOINTS_ACTIONS
    num_cards = 2
    target = 12
    max_formula_len = 5
    card_w = int(R.CANVAS / 2 * 0.9)  # 135
    card_h = int(card_w * 7 / 5)  # 189

    def _deal(self) -> tuple[list[int], list[str]]:
        rng = self.np_random
        first = int(rng.integers(2, 14))
        value = min(first, 10)
        if value in (1, 2, 3, 4, 6) and rng.random() <= 0.5:
            second = self.target // value
        else:
            second = self.target - value
        suits = [R.SUITS[int(rng.integers(4))], R.SUITS[int(rng.integers(4))]]
        ranks = [first, second]
        if rng.random() <= 0.5:
            ranks, suits = ranks[::-1], suits[::-1]
        return ranks, suits

    def _formula_band(self) -> tuple[int, np.ndarray]:
        top = 250
        text = "Formula: " + display_formula(self.formula)
        band = R.text_strip(((258 - top, text),), R.CANVAS, R.CANVAS - top, size=20)
        return top, band


class Points24Env(PointsEnv):
    """Four cards, + - * / and parentheses, make 24 (see the module docstring)."""

    action_names = POINTS24_ACTIONS
    num_cards = 4
    target = 24
    max_formula_len = 20
    card_w = int(R.CANVAS / 4 * 0.9)  # 67
    card_h = int(card_w * 7 / 5)  # 93

    def _deal(self) -> tuple[list[int], list[str]]:
        rng = self.np_random
        ranks = [int(r) for r in rng.integers(1, 14, size=4)]
        suits = [R.SUITS[int(s)] for s in rng.integers(0, 4, size=4)]
        return ranks, suits

    def _formula_band(self) -> tuple[int, np.ndarray]:
        top = 200
        lines = R.wrap_tokens([t for t in self.formula if t != BLANK], R.font(16), R.CANVAS - 20)
        placed = [(210 - top, "Formula:")] + [(240 - top + 20 * k, line) for k, line in enumerate(lines[:3])]
        band = R.text_strip(tuple(placed), R.CANVAS, R.CANVAS - top, size=16)
        return top, band
