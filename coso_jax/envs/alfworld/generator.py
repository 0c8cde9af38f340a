"""Procedural ALFWorld-style games: a scene from ALFWorld's shipped layouts, objects placed by the
canContain table, a goal from ALFWorld's goal library, checked solvable by the Fast Downward planner.

`generate(seed, task_type, split="train") -> Game` is deterministic per (seed, task_type, split).
A `Game` holds our own record of the world (receptacles, objects, positions for the schematic
image) plus the PDDL problem that TextWorld's `PddlEnv` plays (`Game.tw_game()`), and the planner's
plan as `walkthrough` (verified at generation: playing it wins). `Game` and the task-type names live
in `game.py` (re-exported here); `plan_and_check(game)` is the planner check that `official.py` also
uses for games without a stored walkthrough.

Splits: "train" and "test" draw from ALFWorld's training scenes with distinct random streams;
"unseen" draws from ALFWorld's held-out scenes (`TEST_SCENE_NUMBERS`: FloorPlan 1-6, 201-206,
301-306, 401-406), as ALFWorld's valid_unseen split does.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from coso_jax.envs.alfworld import data, engine
from coso_jax.envs.alfworld.game import SPLITS, TASK_ALIASES, TASK_TYPES, Game, display_name, task_type_name

__all__ = [
    "TASK_TYPES",
    "TASK_ALIASES",
    "SPLITS",
    "Game",
    "GenerationError",
    "task_type_name",
    "generate",
    "scenes_for",
    "display_name",
    "problem_text",
    "relevant_subgame",
    "planning_engines",
    "plan_and_check",
]

MAX_RECEPTACLES = 18     # receptacle instances kept per game (load/plan time grows with it)
MAX_OBJECT_TYPES = 8     # pickupable types per game, the task's type included
MAX_ATTEMPTS = 40
LAMP_TYPES = ("DeskLamp", "FloorLamp")
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "DiningTable", "CoffeeTable", "Shelf", "CounterTop")
# Types the domain names as constants; every problem declares them.
_CONST_RTYPES = ("SinkBasin", "Microwave", "Fridge")
_CONST_OTYPES = ("Knife", "ButterKnife")
# Appliances (no layout position) added when the scene lists their type: (type, instances).
_EXTRA_APPLIANCES = (("StoveBurner", 2), ("Toaster", 1), ("CoffeeMachine", 1))
# The appliance each task needs, and which target types make no sense for it.
_NEEDS = {TASK_TYPES[2]: "SinkBasin", TASK_TYPES[3]: "Microwave", TASK_TYPES[4]: "Fridge"}
_EXCLUDED_TARGETS = {TASK_TYPES[2]: {"SinkBasin", "BathtubBasin"}, TASK_TYPES[3]: {"Microwave"},
                     TASK_TYPES[4]: {"Fridge"}}
_PROPERTY_SET = {TASK_TYPES[2]: "Cleanable", TASK_TYPES[3]: "Heatable", TASK_TYPES[4]: "Coolable"}


class GenerationError(RuntimeError):
    """No solvable game could be made for this (seed, task type, split)."""


# ----------------------------------------------------------------------------- tables

def _tables():
    c = data.constants()
    vro = c.VAL_RECEPTACLE_OBJECTS
    rtypes = (set(c.STATIC_RECEPTACLES) & set(vro)) - {"Sink", "Bathtub"}
    contained = set().union(*vro.values())
    pickupable = {t for t in contained if not t.endswith("Sliced")} - rtypes - {"Box"} - set(LAMP_TYPES)
    return c, vro, rtypes, pickupable


def _split_scenes(split: str) -> list[int]:
    c = data.constants()
    unseen = set(c.TEST_SCENE_NUMBERS)
    scenes = data.scene_numbers()
    if split == "unseen":
        return [s for s in scenes if s in unseen]
    if split in ("train", "test"):
        return [s for s in scenes if s not in unseen]
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")


def _receptacle_type(rid: str) -> str:
    parts = rid.split("|")
    return parts[-1] if parts[0] == "Sink" or parts[0] == "Bathtub" else parts[0]


def scenes_for(task_type: str, split: str) -> list[int]:
    """Scenes of the split whose room type fits the task and that hold what the task needs."""
    task_type = task_type_name(task_type)
    c, _, rtypes, pickupable = _tables()
    rooms = c.GOALS_VALID[task_type]
    out = []
    for s in _split_scenes(split):
        if data.room_type(s) not in rooms:
            continue
        types, positions = data.scene_layout(s)
        present_r = {_receptacle_type(r) for r in positions} & rtypes
        if task_type in _NEEDS and _NEEDS[task_type] not in present_r:
            continue
        if task_type == TASK_TYPES[1] and not set(types) & set(LAMP_TYPES):
            continue
        if not set(types) & pickupable:
            continue
        out.append(s)
    return out


# ----------------------------------------------------------------------------- sampling

def _rng(seed: int, task_type: str, split: str) -> np.random.Generator:
    return np.random.default_rng([SPLITS.index(split), TASK_TYPES.index(task_type), int(seed)])


def _choice(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _sample_world(rng: np.random.Generator, task_type: str, split: str):
    """One draw of (scene, receptacles, objects, goal types); None if this draw does not fit."""
    c, vro, rtypes, pickupable = _tables()
    scene = _choice(rng, scenes_for(task_type, split))
    types, positions = data.scene_layout(scene)

    # Receptacle instances: the layout's openable list plus position-less appliances.
    recs = [(rid, _receptacle_type(rid), pos) for rid, pos in positions.items()
            if _receptacle_type(rid) in rtypes]
    for t, n in _EXTRA_APPLIANCES:
        if t in types and t in rtypes:
            recs += [(f"{t}|extra|{k}", t, None) for k in range(n)]
    need = _NEEDS.get(task_type)
    if len(recs) > MAX_RECEPTACLES:
        order = list(rng.permutation(len(recs)))
        keep = [i for i in order if recs[i][1] == need][:1]
        keep += [i for i in order if i not in keep][:MAX_RECEPTACLES - len(keep)]
        recs = [recs[i] for i in sorted(keep)]
    present_r = sorted({t for _, t, _ in recs})

    # Goal types.
    obj_types = sorted(set(types) & pickupable)
    if task_type in _PROPERTY_SET:
        obj_types = [t for t in obj_types if t in c.VAL_ACTION_OBJECTS[_PROPERTY_SET[task_type]]]
    toggle = None
    if task_type == TASK_TYPES[1]:
        lamps = sorted(set(types) & set(LAMP_TYPES))
        holders = [t for t in present_r if t in LAMP_HOLDERS]
        if not lamps or not holders:
            return None
        toggle = _choice(rng, lamps)
    if not obj_types:
        return None
    obj = _choice(rng, obj_types)
    recep = None
    if task_type != TASK_TYPES[1]:
        targets = [r for r in present_r if obj in vro.get(r, ()) and r not in _EXCLUDED_TARGETS.get(task_type, ())]
        # the object must have somewhere to start that is not a target
        starts = [r for r in present_r if obj in vro.get(r, ())]
        if not targets:
            return None
        recep = _choice(rng, targets)
        if not [r for r in starts if r != recep]:
            return None

    # Object types: the goal's plus distractors.
    others = [t for t in sorted(set(types) & pickupable) if t != obj]
    n_other = min(len(others), MAX_OBJECT_TYPES - 1)
    chosen = [obj]
    if others:
        chosen += [others[i] for i in sorted(rng.choice(len(others), size=n_other, replace=False))]

    # Instances and placement.
    placed: list[tuple[str, str]] = []  # (type, receptacle index)
    for t in chosen:
        lo, hi = (2, 3) if (t == obj and task_type == TASK_TYPES[5]) else (1, 2 if t != obj else 3)
        n = int(rng.integers(lo, hi + 1))
        allowed = [i for i, (_, rt, _) in enumerate(recs) if t in vro.get(rt, ())]
        if t == obj and recep is not None:
            allowed = [i for i in allowed if recs[i][1] != recep]
        if not allowed:
            if t == obj:
                return None
            continue
        for _ in range(n):
            placed.append((t, _choice(rng, allowed)))
    if toggle is not None:
        holders = [i for i, (_, rt, _) in enumerate(recs) if rt in LAMP_HOLDERS]
        placed.append((toggle, _choice(rng, holders)))

    # Ids: per-type numbers in a random order (so "cabinet 1" is not always the same cabinet).
    rec_ids: list[str] = [""] * len(recs)
    for t in present_r:
        idx = [i for i, r in enumerate(recs) if r[1] == t]
        for k, i in enumerate(rng.permutation(idx), start=1):
            rec_ids[int(i)] = f"{t.lower()}_{k}"
    obj_ids: list[str] = [""] * len(placed)
    for t in sorted({t for t, _ in placed}):
        idx = [i for i, p in enumerate(placed) if p[0] == t]
        for k, i in enumerate(rng.permutation(idx), start=1):
            obj_ids[int(i)] = f"{t.lower()}_{k}"

    receptacles = {rec_ids[i]: recs[i][1] for i in range(len(recs))}
    positions_out = {rec_ids[i]: recs[i][2] for i in range(len(recs))}
    objects = {obj_ids[j]: placed[j][0] for j in range(len(placed))}
    locations = {obj_ids[j]: rec_ids[placed[j][1]] for j in range(len(placed))}
    return scene, receptacles, positions_out, objects, locations, obj, recep, toggle


def _task_text(rng: np.random.Generator, task_type: str, obj: str, recep: str | None, toggle: str | None) -> str:
    templates = data.goal_library()[task_type]["templates"]
    t = _choice(rng, templates)
    return t.format(obj=obj.lower(), recep=(recep or "").lower(), toggle=(toggle or "").lower())


def _goal_pddl(task_type: str, obj: str, recep: str | None, toggle: str | None) -> str:
    g = data.goal_library()[task_type]["pddl"].format(obj=obj, recep=recep or "", toggle=toggle or "")
    g = g.replace("#", "-").rstrip()
    if not g.endswith(")"):
        raise GenerationError("unexpected goal library format")
    return g[:-1]  # the library's last ")" closes `(define`, which we write ourselves


def problem_text(scene: int, receptacles: dict[str, str], objects: dict[str, str], locations: dict[str, str],
                 goal: str) -> str:
    """The PDDL problem for a world: one location per receptacle, the agent starts at none."""
    c, vro, rtypes, _ = _tables()
    rtype_names = sorted(set(receptacles.values()) | set(_CONST_RTYPES))
    otype_names = sorted(set(objects.values()) | set(_CONST_OTYPES))
    lines = [f"(define (problem alfworld_scene{scene})", "  (:domain alfred)", "  (:objects", "    agent1 - agent"]
    lines += [f"    {t}Type - rtype" for t in rtype_names]
    lines += [f"    {t}Type - otype" for t in otype_names]
    lines += [f"    {r} - receptacle" for r in receptacles]
    lines += [f"    {o} - object" for o in objects]
    lines += ["    loc_start - location"] + [f"    loc_{r} - location" for r in receptacles]
    lines += ["  )", "  (:init", "    (atLocation agent1 loc_start)", "    (= (total-cost) 0)"]
    for r, t in receptacles.items():
        lines += [f"    (receptacleType {r} {t}Type)", f"    (receptacleAtLocation {r} loc_{r})"]
        if t in c.OPENABLE_CLASS_SET:
            lines.append(f"    (openable {r})")
    props = c.VAL_ACTION_OBJECTS
    for o, t in objects.items():
        r = locations[o]
        lines += [f"    (objectType {o} {t}Type)", f"    (inReceptacle {o} {r})", f"    (objectAtLocation {o} loc_{r})"]
        if t not in LAMP_TYPES:
            lines.append(f"    (pickupable {o})")
        for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                           ("Toggleable", "toggleable"), ("Sliceable", "sliceable")):
            if t in props[prop]:
                lines.append(f"    ({pred} {o})")
    for rt in sorted(set(receptacles.values())):
        for ot in sorted(set(objects.values())):
            if ot in vro.get(rt, ()):
                lines.append(f"    (canContain {rt}Type {ot}Type)")
    lines += ["  )", goal, ")"]
    return "\n".join(lines) + "\n"


def generate(seed: int, task_type: str, split: str = "train", *, verify: bool = True) -> Game:
    """A solvable game, deterministic per (seed, task_type, split).

    Draws worlds until one fits the task, then asks the planner for a plan and plays it on the
    engine; a draw whose problem fails to translate, has no plan, or whose plan does not win is
    dropped and the next draw is tried. `verify=False` skips the planner (walkthrough empty):
    for tests of the sampler only.
    """
    task_type = task_type_name(task_type)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    rng = _rng(seed, task_type, split)
    last_err: Exception | None = None
    for _ in range(MAX_ATTEMPTS):
        world = _sample_world(rng, task_type, split)
        if world is None:
            continue
        scene, receptacles, positions, objects, locations, obj, recep, toggle = world
        task = _task_text(rng, task_type, obj, recep, toggle)
        problem = problem_text(scene, receptacles, objects, locations, _goal_pddl(task_type, obj, recep, toggle))
        game = Game(seed=int(seed), split=split, task_type=task_type, scene=scene, task=task, obj=obj, recep=recep,
                    toggle=toggle, receptacles=receptacles, positions=positions, objects=objects,
                    locations=locations, pddl_problem=problem, walkthrough=())
        if not verify:
            return game
        try:
            plan = plan_and_check(game)
        except Exception as e:  # translation errors (KeyError 'val1' = unsolvable), planner failures
            last_err = e
            continue
        if plan:
            return dataclasses.replace(game, walkthrough=tuple(plan))
    raise GenerationError(f"no solvable game for seed={seed} task={task_type} split={split}: {last_err!r}")


def relevant_subgame(game: Game) -> Game:
    """The game cut down to what its goal involves, for the planner.

    Fast Downward's replanner here is a blind (uniform-cost) search, exponential in the plan
    length with the number of receptacles and objects as branching. Any plan of the cut-down
    problem is executable in the full game (the cut removes options, never preconditions), and an
    optimal plan of the full game only touches these entities; the caller replays the plan on the
    full game to check that it wins.
    """
    keep_o = {o for o, t in game.objects.items() if t == game.obj or t == game.toggle}
    keep_r = {game.locations[o] for o in keep_o}
    need = _NEEDS.get(game.task_type)
    keep_r |= {r for r, t in game.receptacles.items() if t == game.recep or t == need}
    receptacles = {r: t for r, t in game.receptacles.items() if r in keep_r}
    objects = {o: t for o, t in game.objects.items() if o in keep_o}
    locations = {o: game.locations[o] for o in objects}
    problem = problem_text(game.scene, receptacles, objects, locations,
                           _goal_pddl(game.task_type, game.obj, game.recep, game.toggle))
    return dataclasses.replace(game, receptacles=receptacles, objects=objects, locations=locations,
                               positions={r: game.positions[r] for r in receptacles}, pddl_problem=problem)


_ENGINES: dict = {}


def planning_engines() -> tuple[engine.Engine, engine.Engine]:
    """This process's two planning engines, (sub-game engine, full-game engine), fast path on.

    Reused, never rebuilt: each engine holds its own copy of Fast Downward's library, which is never
    unloaded, so new engines per game would pile up. Callers use them one game at a time.
    """
    if not _ENGINES:
        _ENGINES["sub"] = engine.Engine(fast=True)
        _ENGINES["full"] = engine.Engine(fast=True)
    return _ENGINES["sub"], _ENGINES["full"]


def plan_and_check(game: Game) -> list[str] | None:
    """The planner's plan for `game`, found on `relevant_subgame(game)` and kept only if playing it on
    the full game wins with progress 1; None otherwise. Translation / planner errors propagate."""
    sub, eng = planning_engines()
    with engine.sas_disk_cache(None):  # the cut-down game is never played again: keep it off disk
        sub.load(relevant_subgame(game), plan=True)
    plan = list(sub.planned or [])
    if not plan:
        return None
    eng.load(game)
    for cmd in plan:
        if cmd not in eng.admissible:
            return None
        eng.step(cmd)
    if not eng.won or engine.progress(game, eng.facts) != 1.0:
        return None
    return plan
