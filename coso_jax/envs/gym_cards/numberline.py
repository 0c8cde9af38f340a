"""NumberLine: move the current number to the target number, one step at a time.

Rules (RL4VLM gym_cards NumberLine-v0): positions 0..max_position (5). At reset the current and
target numbers are drawn independently and uniformly; if they are equal the target becomes
(target + 1) % max_position. Action 0 ("-") decreases the current number (not below 0), action 1
("+") increases it (not above max_position). Reward: +1 and the episode terminates when the target
is reached; -1 when the distance did not shrink (a wrong move or a bump into a wall); 0 otherwise.
The episode is truncated after 2 * max_position steps without reaching the target.

The reference applies the same rule at construction and in every `reset()`, so an episode never
starts on its target there either (shared behaviour, not a difference). Its `step()` repeats the
check, which cannot fire after a reset (start and target already differ and neither is redrawn);
we leave it out. What differs is the random stream: the reference drew with Python's unseeded
global `random`, we draw from the env's seeded `np_random` (docs/deviations.md).
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw

from coso_jax.envs.gym_cards import render as R

__all__ = ["NumberLineEnv", "ACTION_NAMES"]

ACTION_NAMES: tuple[str, ...] = ("-", "+")
_IMAGES: dict[tuple[int, int], np.ndarray] = {}


def _numberline_image(target: int, current: int) -> np.ndarray:
    """The cached (read-only) observation for one (target, current) pair."""
    key = (target, current)
    img = _IMAGES.get(key)
    if img is None:
        canvas = Image.new("RGB", (R.CANVAS, R.CANVAS), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        fnt = R.font(36, bold=True)
        draw.text((30, 60), f"Target: {target}", font=fnt, fill=(0, 0, 0))
        draw.text((30, 180), f"Current: {current}", font=fnt, fill=(0, 0, 0))
        img = np.asarray(canvas, dtype=np.uint8).copy()
        img.setflags(write=False)
        _IMAGES[key] = img
    return img


class NumberLineEnv(gym.Env):
    """NumberLine as a gymnasium env with 300x300 RGB observations (see the module docstring).

    info: {"target": int, "current": int}.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, max_position: int = 5, render_mode: str | None = None) -> None:
        if max_position < 1:
            raise ValueError(f"max_position must be >= 1, got {max_position}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.max_position = int(max_position)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(2)
        self.observation_space = spaces.Box(0, 255, (R.CANVAS, R.CANVAS, 3), np.uint8)
        self.position = 0
        self.target = 1
        self.steps_made = 0

    def _info(self) -> dict[str, Any]:
        return {"target": self.target, "current": self.position}

    def _obs(self) -> np.ndarray:
        return _numberline_image(self.target, self.position).copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self.position = int(rng.integers(0, self.max_position + 1))
        self.target = int(rng.integers(0, self.max_position + 1))
        if self.position == self.target:
            self.target = (self.target + 1) % self.max_position
        self.steps_made = 0
        return self._obs(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"NumberLine action must be 0 ('-') or 1 ('+'), got {action!r}")
        action = int(action)
        self.steps_made += 1
        before = abs(self.position - self.target)
        if action == 0 and self.position > 0:
            self.position -= 1
        elif action == 1 and self.position < self.max_position:
            self.position += 1
        after = abs(self.position - self.target)
        terminated = after == 0
        if terminated:
            reward = 1.0
        elif after >= before:
            reward = -1.0
        else:
            reward = 0.0
        truncated = (not terminated) and self.steps_made >= 2 * self.max_position
        return self._obs(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray:
        return self._obs()
