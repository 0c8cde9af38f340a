"""`coso_jax/ALFWorld-v0`: ALFWorld-style household tasks on TextWorld's PDDL engine.

Each reset plays a game from a fixed pool (`pools.py`: generated from ALFWorld's layouts and
goal library, planner-checked, cached on disk). Observation: a 300x300 RGB schematic of the room
state (`render.py`; the paper's agent sees a 3D frame, which we cannot render). `info` holds the
text: "observation" (the last feedback), "task", "admissible_commands", plus "won", "progress",
"task_type", "game" (its pool key), "walkthrough" (the expert plan from the initial state).

Actions: a command string, or an int index into the current `info["admissible_commands"]`;
-1 (`text.INADMISSIBLE`) or any command that is not admissible does nothing ("Nothing happens.").
Reward (RL4VLM's ALFWorld shaping): 50 * won + goal-condition progress in [0, 1] (`engine.progress`,
the fraction of the task's subgoals met in the new state) - 1 if the command was not admissible.
`progress_reward="delta"` gives the change in progress instead of its level. The episode
terminates when won and is truncated after `max_steps` (50, as RL4VLM) steps.

Options of `reset(options=...)`: "task_type" (full name or alias), "split", "index" (the game's
seed in the pool; with official data, its index among the split's games of the allowed task types),
or "game" (a `Game` to play).

Official data (`official.py`): `ALFWorldEnv(data_dir="/path/to/alfworld_data")` or
`ALFWorldEnv(source="official")` (reads `$ALFWORLD_DATA`) plays ALFWorld's own game files instead of
the generated pools: each reset draws uniformly from the discovered games of the split (train,
valid_seen -> "test", valid_unseen -> "unseen") and allowed task types; everything else is the same.

`snapshot()` / `restore_snapshot(state)`: a picklable snapshot of the running episode (the game, the
commands played since reset, the counters, the RNG) and its exact restoration by replaying those
commands (the engine itself holds a C planner and cannot be pickled); the trainer's checkpoints use it.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from coso_jax.envs.alfworld import data, engine, official, pools, render
from coso_jax.envs.alfworld.game import SPLITS, TASK_TYPES, Game, task_type_name
from coso_jax.envs.alfworld.text import INADMISSIBLE

__all__ = ["ALFWorldEnv", "MAX_STEPS", "WIN_REWARD", "INADMISSIBLE_PENALTY"]

MAX_STEPS = 50
WIN_REWARD = 50.0
INADMISSIBLE_PENALTY = -1.0
NOTHING_HAPPENS = "Nothing happens."


class ALFWorldEnv(gym.Env):
    """See the module docstring.

    Args:
      task_type: one task type (full name or alias) or None for all six (uniformly per reset).
      split: "train", "test" or "unseen".
      pool_size: games per task type in the pool (seeds 0..pool_size-1).
      max_steps: step limit.
      fast: use the memoised engine fast path (identical outputs, ~10-20x faster steps).
      cache_dir: game cache (default: pools.default_cache_dir()).
      progress_reward: "level" (RL4VLM) or "delta".
      render_images: False returns a blank image (text-only agents, benchmarks).
      source: "generated" (the pools) or "official" (ALFWorld's game files); default: "official" when
        `data_dir` is given, else "generated".
      data_dir: the official data root (default `$ALFWORLD_DATA`), or an `official.OfficialData`;
        `pool_size` does not apply to it (all discovered games are played).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, task_type: str | None = None, split: str = "train", pool_size: int = 100,
                 max_steps: int = MAX_STEPS, fast: bool = True, cache_dir: str | None = None,
                 progress_reward: str = "level", render_images: bool = True, render_mode: str | None = None,
                 source: str | None = None, data_dir: "str | official.OfficialData | None" = None) -> None:
        data.require()
        if source is None:
            source = "generated" if data_dir is None else "official"
        if source not in ("generated", "official"):
            raise ValueError(f"source must be 'generated' or 'official', got {source!r}")
        if source == "generated" and data_dir is not None:
            raise ValueError("data_dir is for source='official'")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if progress_reward not in ("level", "delta"):
            raise ValueError(f"progress_reward must be 'level' or 'delta', got {progress_reward!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task_types = TASK_TYPES if task_type is None else (task_type_name(task_type),)
        self.split = split
        self.pool_size = int(pool_size)
        self.max_steps = int(max_steps)
        self.cache_dir = cache_dir
        self.progress_reward = progress_reward
        self.render_images = bool(render_images)
        self.render_mode = render_mode
        self.source = source
        self.official: official.OfficialData | None = None
        if source == "official":
            self.official = data_dir if isinstance(data_dir, official.OfficialData) else official.OfficialData(data_dir)
            self.official.games(split, self.task_types)  # fails now, naming the folder, if there is nothing to play
        self.engine = engine.Engine(fast=fast, sas_cache_dir=pools.sas_dir(cache_dir) if fast else None)
        self.action_space = spaces.Discrete(256)  # index into admissible commands (or a command string)
        self.observation_space = spaces.Box(0, 255, (render.CANVAS, render.CANVAS, 3), np.uint8)
        self.game: Game | None = None
        self.steps_made = 0
        self.progress = 0.0
        self._openable: set[str] = set()
        self._history: list[str] = []  # admissible commands played since the last reset
        self._image: np.ndarray | None = None
        self._images: dict = {}

    # ------------------------------------------------------------------ helpers
    def _pick_game(self, options: dict) -> Game:
        if options.get("game") is not None:
            return options["game"]
        types = (task_type_name(options["task_type"]),) if options.get("task_type") else self.task_types
        split = options.get("split", self.split)
        if self.official is not None:
            games = self.official.games(split, types)
            index = options.get("index")
            if index is None:
                index = int(self.np_random.integers(len(games)))
            return self.official.load(games[int(index)])
        task = types[int(self.np_random.integers(len(types)))]
        index = options.get("index")
        if index is None:
            index = int(self.np_random.integers(self.pool_size))
        return pools.load_game(int(index), task, split, self.cache_dir)

    def _draw(self) -> np.ndarray:
        if not self.render_images:
            return np.zeros(self.observation_space.shape, np.uint8)
        e = self.engine
        at, holding, opened, contents = e.agent_at(), e.holding(), e.opened(), e.contents()
        # the picture depends on these only: states repeat a lot within a game, so cache them
        key = (self.game.key, at, tuple(holding), tuple(sorted(opened)), tuple(contents.get(at, ())) if at else ())
        img = self._images.get(key)
        if img is None:
            img = render.draw_state(self.game, at, holding, opened, contents, self._openable)
            img.setflags(write=False)
            self._images[key] = img
            if len(self._images) > 512:
                self._images.pop(next(iter(self._images)))
        return img

    def _info(self, admissible: bool = True) -> dict[str, Any]:
        e = self.engine
        return {
            "observation": e.feedback,
            "task": self.game.task,
            "task_type": self.game.task_type,
            "admissible_commands": list(e.admissible),
            "won": bool(e.won),
            "progress": float(self.progress),
            "admissible": admissible,
            "game": self.game.key,
            "walkthrough": list(self.game.walkthrough),
            "step": self.steps_made,
        }

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        game = self._pick_game(dict(options or {}))
        if self.game is not None and game.key == self.game.key and game == self.game:
            self.engine.reset()
        else:
            self.engine.load(game)
        self.game = game
        c = data.constants()
        self._openable = {r for r, t in game.receptacles.items() if t in c.OPENABLE_CLASS_SET}
        self.steps_made = 0
        self._history = []
        self.progress = engine.progress(game, self.engine.facts)
        self._image = self._draw()
        return self._image.copy(), self._info()

    def step(self, action):
        if self.game is None:
            raise RuntimeError("call reset() first")
        e = self.engine
        if isinstance(action, (int, np.integer)):
            i = int(action)
            command = e.admissible[i] if i != INADMISSIBLE and 0 <= i < len(e.admissible) else None
        elif isinstance(action, str):
            command = action.strip()
        else:
            raise TypeError(f"action must be an int index or a command string, got {type(action).__name__}")
        admissible = command is not None and command in e.admissible
        before = self.progress
        if admissible:
            e.step(command)
            self._history.append(command)
            self.progress = engine.progress(self.game, e.facts)
            self._image = self._draw()
        else:
            e.feedback = NOTHING_HAPPENS  # the engine's own answer to an unknown command; state unchanged
        self.steps_made += 1
        shaped = self.progress if self.progress_reward == "level" else self.progress - before
        reward = WIN_REWARD * float(e.won) + shaped + (0.0 if admissible else INADMISSIBLE_PENALTY)
        terminated = bool(e.won)
        truncated = not terminated and self.steps_made >= self.max_steps
        return self._image.copy(), float(reward), terminated, truncated, self._info(admissible)

    def snapshot(self) -> dict[str, Any]:
        """A picklable snapshot of the running episode (see the module docstring)."""
        if self.game is None:
            raise RuntimeError("call reset() first")
        return {
            "game": self.game.to_dict(),
            "history": list(self._history),
            "steps_made": self.steps_made,
            "feedback": self.engine.feedback,
            "np_random": self.np_random.bit_generator.state,
        }

    def restore_snapshot(self, state: dict[str, Any]) -> None:
        """Restores a `snapshot()`: loads its game and replays its commands."""
        game = official.game_from_dict(state["game"])
        self.reset(options={"game": game})
        for command in state["history"]:
            self.engine.step(command)
            self._history.append(command)
        self.progress = engine.progress(game, self.engine.facts)
        self.engine.feedback = state["feedback"]  # the last answer ("Nothing happens." after an inadmissible one)
        self.steps_made = int(state["steps_made"])
        self.np_random.bit_generator.state = state["np_random"]
        self._image = self._draw()

    def render(self):
        return None if self._image is None else self._image.copy()
