"""Read ALFWorld's shipped data from the installed `alfworld` package (never copied into this repo).

What is used (all from `alfworld==0.4.2`): the PDDL domain `data/alfred.pddl`, the grammar
`data/alfred.twl2`, the scene layouts `gen/layouts/FloorPlan{N}-objects.json` /
`-openable.json`, the property tables of `gen/constants.py` and the goal library
`gen/goal_library.py`. `require()` raises an ImportError that says how to install the package.
"""
from __future__ import annotations

import functools
import json
import os
import re
from types import ModuleType

__all__ = [
    "INSTALL_HINT",
    "require",
    "package_dir",
    "domain_text",
    "grammar_text",
    "constants",
    "goal_library",
    "scene_numbers",
    "room_type",
    "scene_layout",
]

INSTALL_HINT = ("the ALFWorld env needs the `alfworld` package (0.4.2): `make test` installs it, or "
                "PATH=\"$PWD/.venv/bin:$PATH\" .venv/bin/pip install -e '.[alfworld]' (its dependency "
                "fast-downward-textworld builds from source with cmake and g++)")

ROOM_TYPES = ("Kitchen", "LivingRoom", "Bedroom", "Bathroom")
_ROOM_BASE = {"Kitchen": 0, "LivingRoom": 200, "Bedroom": 300, "Bathroom": 400}


def require() -> ModuleType:
    """Imports and returns the `alfworld` package; ImportError with an install hint if missing."""
    try:
        import alfworld  # noqa: F401
        import fast_downward  # noqa: F401
        import textworld  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return alfworld


@functools.lru_cache(maxsize=None)
def package_dir() -> str:
    return os.path.dirname(require().__file__)


@functools.lru_cache(maxsize=None)
def domain_text() -> str:
    with open(os.path.join(package_dir(), "data", "alfred.pddl")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def grammar_text() -> str:
    with open(os.path.join(package_dir(), "data", "alfred.twl2")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def constants() -> ModuleType:
    require()
    import alfworld.gen.constants as c

    return c


@functools.lru_cache(maxsize=None)
def goal_library() -> dict:
    require()
    import alfworld.gen.goal_library as g

    return g.gdict


def room_type(scene: int) -> str:
    for room, base in _ROOM_BASE.items():
        if base + 1 <= scene <= base + 30:
            return room
    raise ValueError(f"not an ALFWorld scene number: {scene}")


@functools.lru_cache(maxsize=None)
def scene_numbers() -> tuple[int, ...]:
    """All scenes that ship both an objects and an openable layout, sorted."""
    d = os.path.join(package_dir(), "gen", "layouts")
    found = set()
    for name in os.listdir(d):
        m = re.fullmatch(r"FloorPlan(\d+)-objects\.json", name)
        if m and os.path.exists(os.path.join(d, f"FloorPlan{m.group(1)}-openable.json")):
            found.add(int(m.group(1)))
    return tuple(sorted(found))


@functools.lru_cache(maxsize=None)
def scene_layout(scene: int) -> tuple[tuple[str, ...], dict[str, tuple[float, float]]]:
    """(object/receptacle type names of the scene, {receptacle instance id: (x, z) position}).

    The instance ids are ALFRED's (`Cabinet|+00.68|+00.50|-02.20`, `Sink|...|SinkBasin`); the
    position is the instance's own x, z from its id (falls back to the agent pose).
    """
    d = os.path.join(package_dir(), "gen", "layouts")
    with open(os.path.join(d, f"FloorPlan{scene}-objects.json")) as f:
        types = tuple(json.load(f))
    with open(os.path.join(d, f"FloorPlan{scene}-openable.json")) as f:
        openable = json.load(f)
    positions = {}
    for rid, pose in sorted(openable.items()):
        parts = rid.split("|")
        try:
            x, z = float(parts[1]), float(parts[3])
        except (IndexError, ValueError):
            x, z = float(pose[0]), float(pose[1])
        positions[rid] = (x, z)
    return types, positions
