"""Expert demonstrations for ALFWorld: planner walkthroughs as chain-of-thought answers for SFT.

`generate(num_episodes, seed, ...)` plays pool games (seeds drawn from `seed`) along their
planner-verified walkthroughs and yields one record per step, in the gym_cards demo format:

  {"env": "ALFWorld", "seed", "step", "prompt", "answer", "action", "reward", "imperfect",
   "task_type", "game", "index"}

`seed` and `index` give the pool game (`env.reset(options={"task_type": ..., "index": ...})`
replays it); `action` is the command; `answer` is the JSON answer the prompt asks for, with short
"thoughts" written from the task and the step's role in the plan (find the object, take it,
heat/clean/cool it, put it, light the lamp). With probability `imperfect_frac` a step first wastes
a move on a harmless command ("look" / "inventory", `imperfect` True; the plan stays valid), so a
model fine-tuned on the records is good but not perfect.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from coso_jax.envs.alfworld import pools
from coso_jax.envs.alfworld.env import ALFWorldEnv
from coso_jax.envs.alfworld.game import TASK_TYPES, Game, task_type_name
from coso_jax.envs.alfworld.text import ALFWorldText, format_answer

__all__ = ["generate", "thoughts_for"]

_HARMLESS = ("look", "inventory")
_PURPOSE = {TASK_TYPES[2]: "clean", TASK_TYPES[3]: "heat", TASK_TYPES[4]: "cool"}


def thoughts_for(game: Game, command: str, holding: bool, placed_before: int) -> str:
    """Short reasoning for one expert command (our own wording)."""
    obj = game.obj.lower()
    words = command.split()
    verb = words[0] if words else ""
    if verb == "go":
        place = " ".join(words[2:])
        if not holding:
            if game.task_type == TASK_TYPES[1] and placed_before:
                return f"I hold the {obj}; the {game.toggle.lower()} is at the {place}, so I go there."
            return f"The task needs a {obj}. I go to the {place} to get one."
        purpose = _PURPOSE.get(game.task_type)
        if purpose and place.split()[0] in ("sinkbasin", "microwave", "fridge") and not placed_before:
            return f"I hold the {obj} and must {purpose} it first, so I go to the {place}."
        if game.task_type == TASK_TYPES[1]:
            return f"I hold the {obj}; I go to the {place} where the {game.toggle.lower()} is."
        return f"I hold the {obj}; it has to go in the {game.recep.lower()}, so I go to the {place}."
    if verb == "open":
        return f"The {' '.join(words[1:])} is closed; I open it."
    if verb == "take":
        return f"Here is a {obj}; I take it."
    if verb in ("heat", "clean", "cool"):
        return f"The task wants a {'hot' if verb == 'heat' else verb} {obj}, so I {verb} it here."
    if verb == "move":
        if game.task_type == TASK_TYPES[5] and placed_before == 0:
            return f"I put this {obj} in the {game.recep.lower()}; then I need a second one."
        return f"I put the {obj} in the {game.recep.lower()}, which completes the task."
    if verb == "use":
        return f"I turn on the {' '.join(words[1:])} to look at the {obj} under its light."
    return "I check my surroundings."


def generate(num_episodes: int, seed: int = 0, *, task_types: Sequence[str] | None = None, split: str = "train",
             pool_size: int = 100, imperfect_frac: float = 0.0, cot: bool = True,
             cache_dir: str | None = None, brief: bool = False) -> Iterator[dict[str, Any]]:
    """Records of expert episodes (see the module docstring); deterministic per `seed`."""
    types = tuple(task_type_name(t) for t in (task_types or TASK_TYPES))
    rng = np.random.default_rng(seed)
    text = ALFWorldText()
    env = ALFWorldEnv(split=split, pool_size=pool_size, cache_dir=cache_dir, render_images=False)
    for ep in range(int(num_episodes)):
        task = types[ep % len(types)]
        index = int(rng.integers(pool_size))
        game = pools.load_game(index, task, split, cache_dir)
        _, info = env.reset(options={"game": game})
        step = 0
        placed = 0
        for cmd in game.walkthrough:
            plays = [cmd]
            if imperfect_frac > 0 and rng.random() < imperfect_frac:
                plays = [_HARMLESS[int(rng.integers(len(_HARMLESS)))], cmd]
            for c in plays:
                imperfect = c != cmd
                holding = bool(env.engine.holding())
                thought = ("I look around before the next move." if imperfect
                           else thoughts_for(game, c, holding, placed))
                record = {
                    "env": "ALFWorld", "seed": int(seed), "index": index, "game": game.key, "task_type": task,
                    "step": step, "prompt": text.prompt(info, cot=cot, brief=brief),
                    "answer": format_answer(thought if cot else None, c), "action": c, "imperfect": imperfect,
                }
                _, reward, term, _, info = env.step(c)
                record["reward"] = float(reward)
                yield record
                step += 1
                if not imperfect and c.startswith("move "):
                    placed += 1
                elif not imperfect and c.startswith("take ") and task == TASK_TYPES[1]:
                    placed += 1
        if not info["won"]:
            raise RuntimeError(f"walkthrough of {game.key} did not win")
