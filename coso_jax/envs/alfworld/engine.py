"""TextWorld's PDDL engine (`textworld.envs.PddlEnv` + Fast Downward) for our generated games,
with an optional memoised fast path, and the goal-condition progress of a state.

`Engine(fast=False)` runs the unmodified engine. `Engine(fast=True)` runs the same code with five
memoisations that do not change any output (tests/test_alfworld_engine.py replays recorded random
episodes on both and compares feedback, admissible commands, won and facts):
  1. the grammar's TatSu parse of a text snippet (`textgen._parse_and_convert`), keyed by its
     arguments; a deep copy of the cached symbols is returned, as a fresh parse would be;
  2. the same for the game-logic parse (`logic._parse_and_convert`, once per load);
  3. `Rule.parse_conjunctive_query`, keyed by the query text (rules are read only);
  4. `textgen.copy_context` copies the `variables` / `mapping` dicts shallowly: the grammar only
     adds keys to them and never mutates the entities they hold;
  5. `fast_downward.pddl2sas` (PDDL -> SAS translation, twice per load and per reset), keyed by
     (domain, problem, options), LRU-bounded in memory and, with `sas_cache_dir`, pickled on disk
     (a pool game then loads in milliseconds in every later process). Only point it at a
     directory you trust: loading a pickle runs code.
The patches are installed once per process and each checks a switch, so plain and fast engines
can run side by side; an `Engine` turns the switch on only inside its own calls.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import os
import pickle
import sys
import tempfile
from typing import Iterable

from coso_jax.envs.alfworld import data
from coso_jax.envs.alfworld.game import TASK_TYPES, Game, display_name

__all__ = ["Engine", "fast_mode", "sas_disk_cache", "install_fast_path", "clear_memory_caches", "progress",
           "subgoals", "goal_met"]

_FAST = {"depth": 0, "installed": False, "sas_dir": None}
SAS_CACHE_SIZE = 256  # translations (2 per game) kept in memory; ~0.2-0.5 MB each


@contextlib.contextmanager
def fast_mode(enabled: bool = True):
    """Turns the memoised fast path on (or leaves it off) for the calls inside the block."""
    install_fast_path()
    if not enabled:
        saved = _FAST["depth"]
        _FAST["depth"] = 0
        try:
            yield
        finally:
            _FAST["depth"] = saved
        return
    _FAST["depth"] += 1
    try:
        yield
    finally:
        _FAST["depth"] -= 1


@contextlib.contextmanager
def _keep_argv():
    """Fast Downward's translator overwrites `sys.argv` on every call; put it back afterwards."""
    original = sys.argv
    saved = list(original)
    try:
        yield
    finally:
        original[:] = saved
        sys.argv = original


@contextlib.contextmanager
def sas_disk_cache(directory: str | None):
    """Inside the block (and with the fast path on), translations are read from / written to
    `directory` (None: memory only). An `Engine` without its own `sas_cache_dir` follows this."""
    saved = _FAST["sas_dir"]
    _FAST["sas_dir"] = directory
    try:
        yield
    finally:
        _FAST["sas_dir"] = saved


def _sas_path(key) -> str | None:
    d = _FAST["sas_dir"]
    if not d:
        return None
    h = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()
    return os.path.join(d, h[:2], h + ".pkl")


def _on() -> bool:
    return _FAST["depth"] > 0


def _freeze(obj):
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    return obj


def _memo_deepcopy(fn, cache: dict):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _on():
            return fn(*args, **kwargs)
        key = (_freeze(args), _freeze(kwargs))
        if key not in cache:
            cache[key] = fn(*args, **kwargs)
        return copy.deepcopy(cache[key])

    wrapper.__wrapped_original__ = fn
    return wrapper


def install_fast_path() -> None:
    """Installs the switchable memoisations (idempotent). Off until `fast_mode()` turns them on."""
    if _FAST["installed"]:
        return
    data.require()
    import fast_downward
    import textworld.logic
    from textworld.envs.pddl import logic as pddl_logic
    from textworld.envs.pddl import textgen

    textgen._parse_and_convert = _memo_deepcopy(textgen._parse_and_convert, {})
    pddl_logic._parse_and_convert = _memo_deepcopy(pddl_logic._parse_and_convert, {})

    original_query = textworld.logic.Rule.parse_conjunctive_query.__func__
    query_cache: dict = {}

    def parse_conjunctive_query(cls, expr):
        if not _on():
            return original_query(cls, expr)
        key = (cls, expr)
        if key not in query_cache:
            query_cache[key] = original_query(cls, expr)
        return query_cache[key]

    textworld.logic.Rule.parse_conjunctive_query = classmethod(parse_conjunctive_query)

    original_copy_context = textgen.copy_context

    def copy_context(context):
        if not _on():
            return original_copy_context(context)
        return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
                "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}

    textgen.copy_context = copy_context

    original_pddl2sas = fast_downward.pddl2sas
    sas_cache: collections.OrderedDict = collections.OrderedDict()

    def pddl2sas(domain, problem, *args, **kwargs):
        if not _on():
            return original_pddl2sas(domain, problem, *args, **kwargs)
        key = (domain, problem, args, _freeze(kwargs))
        if key in sas_cache:
            sas_cache.move_to_end(key)
            return sas_cache[key]
        path = _sas_path(key)
        out = None
        if path is not None and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    out = pickle.load(f)
            except Exception:
                out = None  # damaged file: translate again
        if out is None:
            out = original_pddl2sas(domain, problem, *args, **kwargs)
            if path is not None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, path)
        sas_cache[key] = out
        while len(sas_cache) > SAS_CACHE_SIZE:
            sas_cache.popitem(last=False)
        return out

    fast_downward.pddl2sas = pddl2sas
    _FAST["caches"] = (sas_cache, query_cache)
    _FAST["installed"] = True


def clear_memory_caches() -> None:
    """Empties the in-memory translation and query caches (the disk cache stays)."""
    for cache in _FAST.get("caches", ()):
        cache.clear()


def _pddl_env_class():
    from textworld.envs.pddl import PddlEnv

    class _NamedPddlEnv(PddlEnv):
        """PddlEnv that shows our ids as 'apple 2' (the engine itself is unchanged)."""

        def load(self, game_data):
            super().load(game_data)
            for info in self._entity_infos.values():
                if info.type in ("object", "receptacle"):
                    info.name = display_name(info.id)

    return _NamedPddlEnv


class Engine:
    """One game on TextWorld's PDDL engine.

    After `load` / `reset` / `step`: `feedback` (text), `admissible` (sorted commands),
    `won`, `facts` (the state's propositions, lower-case predicate names, our ids as args),
    `moves`. `planned` holds the planner's plan from the initial state when `load(plan=True)`.
    `sas_cache_dir`: where the fast path keeps translations on disk (None: memory only).
    """

    def __init__(self, fast: bool = True, sas_cache_dir: str | None = None) -> None:
        data.require()
        install_fast_path()
        import textworld

        self.fast = bool(fast)
        self.sas_cache_dir = sas_cache_dir
        self._infos = textworld.EnvInfos(admissible_commands=True, won=True)
        with fast_mode(self.fast):
            self._env = _pddl_env_class()(self._infos)
        self.game: Game | None = None
        self.planned: list[str] | None = None
        self.feedback = ""
        self.admissible: list[str] = []
        self.won = False
        self.moves = 0
        self._state = None

    def _disk(self):
        return sas_disk_cache(self.sas_cache_dir) if self.sas_cache_dir is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Frees the planner state held by this engine's copy of Fast Downward's library (each
        PddlEnv loads its own copy of libdownward.so and never frees it). The copy stays mapped:
        unloading it (dlclose) crashes the interpreter at exit. The engine is unusable afterwards."""
        env = getattr(self, "_env", None)
        if env is not None and getattr(env, "downward_lib", None) is not None:
            lib, env.downward_lib = env.downward_lib, None
            self._env = None
            lib.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _absorb(self, state) -> None:
        self._state = state
        self.feedback = state.feedback
        self.admissible = list(state["admissible_commands"])
        self.won = bool(state["won"])

    @property
    def facts(self) -> list:
        return list(self._state["_facts"]) if self._state is not None else []

    def load(self, game: Game, plan: bool = False) -> str:
        with fast_mode(self.fast), self._disk(), _keep_argv():
            tw = game.tw_game()
            tw["walkthrough"] = list(game.walkthrough) or None
            self._env.load(tw)
            self.game = game
            self._absorb(self._env.reset())
            self.moves = 0
            self.planned = None
            if plan:
                self.planned = list(self._env._pddl_state.replan(self._env._entity_infos))
        return self.feedback

    def reset(self) -> str:
        if self.game is None:
            raise RuntimeError("load a game first")
        with fast_mode(self.fast), self._disk(), _keep_argv():
            self._absorb(self._env.reset())
        self.moves = 0
        return self.feedback

    def step(self, command: str) -> str:
        """Plays a command; an inadmissible one does nothing ('Nothing happens.')."""
        with fast_mode(self.fast):
            state, _, _ = self._env.step(command)
        self._absorb(state)
        self.moves += 1
        return self.feedback

    def replan(self) -> list[str]:
        """The planner's plan from the current state ([] when none)."""
        with fast_mode(self.fast):
            return list(self._env._pddl_state.replan(self._env._entity_infos))

    def holding(self) -> list[str]:
        return sorted(a[1] for a in _fact_args(self.facts, "holds"))

    def agent_at(self) -> str | None:
        for args in _fact_args(self.facts, "atlocation"):
            loc = args[1]
            return loc[len("loc_"):] if loc.startswith("loc_") and loc != "loc_start" else None
        return None

    def opened(self) -> set[str]:
        return {a[0] for a in _fact_args(self.facts, "opened")}

    def contents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = collections.defaultdict(list)
        for o, r in _fact_args(self.facts, "inreceptacle"):
            out[r].append(o)
        return {k: sorted(v) for k, v in out.items()}


def _fact_args(facts: Iterable, name: str) -> list[tuple[str, ...]]:
    return [tuple(v.name for v in f.arguments) for f in facts if f.name.lower() == name]


def _has(facts, name: str) -> set:
    return {a[0] for a in _fact_args(facts, name)}


def subgoals(game: Game, facts: Iterable) -> list[bool]:
    """The task's goal conditions in order; the last one is the whole goal.

    pick: [an obj is held or in a target recep, an obj is in a target recep]
    clean/heat/cool: [an obj is held or in a target recep, some obj is clean/hot/cool,
                      a clean/hot/cool obj is in a target recep]
    pick2: [an obj is held or in a target recep, one obj in a target recep, two in the same one]
    look: [an obj is held, a lamp of the type is on (toggled), holding an obj at a toggled lamp]
    """
    facts = list(facts)
    objs = {o for o, t in game.objects.items() if t == game.obj}
    holds = {a[1] for a in _fact_args(facts, "holds")}
    inrec = _fact_args(facts, "inreceptacle")
    targets = {r for r, t in game.receptacles.items() if t == game.recep}
    placed = [(o, r) for o, r in inrec if o in objs and r in targets]
    t = game.task_type
    if t == TASK_TYPES[0]:
        return [bool(objs & holds) or bool(placed), bool(placed)]
    if t in (TASK_TYPES[2], TASK_TYPES[3], TASK_TYPES[4]):
        pred = {TASK_TYPES[2]: "isclean", TASK_TYPES[3]: "ishot", TASK_TYPES[4]: "iscool"}[t]
        done = _has(facts, pred) & objs
        ok = [o for o, _ in placed if o in done]
        return [bool(objs & holds) or bool(placed), bool(done), bool(ok)]
    if t == TASK_TYPES[5]:
        per = collections.Counter(r for _, r in placed)
        return [bool(objs & holds) or bool(placed), bool(placed), any(n >= 2 for n in per.values())]
    if t == TASK_TYPES[1]:
        lamps = {o for o, ty in game.objects.items() if ty == game.toggle}
        toggled = _has(facts, "istoggled") & lamps
        at = {a[1] for a in _fact_args(facts, "atlocation") if a[0] == "agent1"}
        # where each receptacle stands (generated games: loc_<r>; official ones may share a location)
        rloc = dict(_fact_args(facts, "receptacleatlocation"))
        lamp_here = [o for o, r in inrec if o in toggled and rloc.get(r, f"loc_{r}") in at]
        held = bool(objs & holds)
        return [held, bool(toggled), held and bool(lamp_here)]
    raise ValueError(f"unknown task type {t!r}")


def goal_met(game: Game, facts: Iterable) -> bool:
    return subgoals(game, facts)[-1]


def progress(game: Game, facts: Iterable) -> float:
    """Goal-condition progress in [0, 1]: the fraction of `subgoals` met; 1 exactly when the goal is."""
    s = subgoals(game, facts)
    return 1.0 if s[-1] else sum(s) / len(s)
