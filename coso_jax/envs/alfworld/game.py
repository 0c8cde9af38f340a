"""The record of one ALFWorld-style game and the names shared by the generator, the engine and the
official-data loader (kept here so that none of them imports another just for these).

- `TASK_TYPES` / `TASK_ALIASES` / `SPLITS`: ALFWorld's six text-benchmark task types, their short
  names, and our three game pools.
- `Game`: one game (our record of the world plus the PDDL problem TextWorld's `PddlEnv` plays).
- `task_type_name`, `display_name`: name normalisation.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from coso_jax.envs.alfworld import data

__all__ = ["TASK_TYPES", "TASK_ALIASES", "SPLITS", "Game", "task_type_name", "display_name"]

# ALFWorld's 6 task types (its 7th, pick_and_place_with_movable_recep, is not in the text benchmark).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# The short names ALFWorld's result tables use.
TASK_ALIASES = {"pick": TASK_TYPES[0], "look": TASK_TYPES[1], "clean": TASK_TYPES[2],
                "heat": TASK_TYPES[3], "cool": TASK_TYPES[4], "pick2": TASK_TYPES[5]}
SPLITS = ("train", "test", "unseen")


def task_type_name(task_type: str) -> str:
    """Full ALFWorld task-type name from a full name, a short alias ('heat') or an index string."""
    t = str(task_type).strip()
    if t in TASK_TYPES:
        return t
    if t.lower() in TASK_ALIASES:
        return TASK_ALIASES[t.lower()]
    raise ValueError(f"unknown task type {task_type!r}; known: {TASK_TYPES} or {tuple(TASK_ALIASES)}")


def display_name(entity_id: str) -> str:
    """'apple_2' -> 'apple 2' (the name the text uses); other ids unchanged."""
    head, _, tail = entity_id.rpartition("_")
    return f"{head} {tail}" if head and tail.isdigit() else entity_id


@dataclasses.dataclass(frozen=True)
class Game:
    """One generated game. Ids are lower-case `type_k` (`apple_2`); types are ALFRED names.

    Attributes:
      receptacles: {receptacle id: type}; positions: {receptacle id: (x, z) or None}.
      objects: {object id: type}; locations: {object id: receptacle id it starts in}.
      task: the task text ("put a clean mug in cabinet"); obj/recep/toggle: the goal's types.
      walkthrough: the planner's plan, verified to win.
    """

    seed: int
    split: str
    task_type: str
    scene: int
    task: str
    obj: str
    recep: str | None
    toggle: str | None
    receptacles: dict[str, str]
    positions: dict[str, tuple[float, float] | None]
    objects: dict[str, str]
    locations: dict[str, str]
    pddl_problem: str
    walkthrough: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.split}/{self.task_type}/{self.seed}"

    def tw_game(self) -> dict[str, Any]:
        """The game as TextWorld's `PddlEnv.load` reads it (what ALFWorld stores as game.tw-pddl)."""
        grammar = data.grammar_text().replace("UNKNOWN GOAL", self.task)
        return {"pddl_domain": data.domain_text(), "grammar": grammar, "pddl_problem": self.pddl_problem,
                "walkthrough": list(self.walkthrough), "solvable": True}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["positions"] = {k: (list(v) if v is not None else None) for k, v in self.positions.items()}
        d["walkthrough"] = list(self.walkthrough)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Game":
        d = dict(d)
        d["positions"] = {k: (tuple(v) if v is not None else None) for k, v in d["positions"].items()}
        d["walkthrough"] = tuple(d["walkthrough"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
