"""ALFWorld's official game files (`$ALFWORLD_DATA`), played by the same env as our generated games.

Layout (what `alfworld-download` unpacks; only the two files below are read):

  <root>/json_2.1.1/<split dir>/<task_type>-<Object>-<MRecep>-<Recep>-<scene>/<trial_id>/
      game.tw-pddl     JSON: pddl_domain, grammar, pddl_problem, walkthrough, solvable
      traj_data.json   JSON: task_type, pddl_params, scene.floor_plan, turk_annotations.anns[*].task_desc

`<root>` is the `data_dir` argument, else `$ALFWORLD_DATA`. A root that itself holds the split folders
(or any `json_*` folder holding them) is accepted too. Split folders map to our split names:
`train` -> "train", `valid_seen` -> "test", `valid_unseen` -> "unseen" (ALFWorld's in-distribution and
out-of-distribution evaluation sets, as our "test" / "unseen" pools mirror them); other folders are ignored.

What is playable (as ALFWorld's own loader, `AlfredTWEnv`, decides, except where marked): a folder with a
`traj_data.json` and a `game.tw-pddl` beside it; the game file's `solvable` is not false (ALFWorld also
skips files without the key; we play them); paths containing "movable" or "Sliced" are skipped, and so are
task types other than our six and `pddl_params.object_sliced` games (both outside ALFWorld's text benchmark).
Discovery is sorted by path, so the order of games (and `index`) is deterministic for a given data set.

Each discovered game becomes an `OfficialGame` (a `Game` that also keeps the file's domain and grammar):
- ids: ALFRED's mangled ids (`Apple_bar__minus_01_dot_23_bar_...`) are renamed to ours (`apple_2`) with
  ALFWorld's own numbering (its demangler without shuffling: per name, the sorted ids get count, ..., 1),
  so the texts, and the walkthrough stored in the file, read as in ALFWorld. Locations are renamed
  `loc_<receptacle>` (the first receptacle standing there), the agent's start location `loc_start`.
- receptacle positions (for the schematic image) come from the ids' x / z; types from `objectType` /
  `receptacleType`; the goal's types from `pddl_params` (else the directory name).
- task text: the file's own goal text if its grammar carries one; else, where it says "UNKNOWN GOAL" (as
  ALFWorld's files do), ALFWorld's templated text from `pddl_params` (`goal_text="template"`, ALFWorld's
  default; the template is fixed per game, picked by a hash of its path, where ALFWorld draws one per
  episode) or a human annotation (`goal_text="human"`).
- walkthrough: the file's, if it has one; else the planner's (on the game cut down to what the goal
  involves, replayed on the full game; then on the full game; `()` if neither wins).
`engine.progress` and `won` then work as for generated games.

`write_official(game, root, split)` lays out one of our generated games in this format (ALFRED-style ids,
a minimal traj_data.json): tests use it to play the same game both ways.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable

from coso_jax.envs.alfworld import data, engine, generator
from coso_jax.envs.alfworld.game import SPLITS, TASK_TYPES, Game, display_name, task_type_name

__all__ = ["DATA_ENV", "SPLIT_DIRS", "GAME_FILE", "TRAJ_FILE", "OfficialDataError", "OfficialGame", "Entry",
           "OfficialData", "data_root", "discover", "clear_cache", "load", "game_from_dict", "alfworld_ids",
           "rename", "alfworld_renaming", "write_official"]

DATA_ENV = "ALFWORLD_DATA"
# ALFWorld's split folders -> our split names.
SPLIT_DIRS = {"train": "train", "valid_seen": "test", "valid_unseen": "unseen"}
GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
JSON_DIR = "json_2.1.1"
_LAYOUT = (f"<root>/{JSON_DIR}/<train|valid_seen|valid_unseen>/<task_type>-<Object>-<MRecep>-<Recep>-<scene>/"
           f"<trial>/{{{GAME_FILE},{TRAJ_FILE}}}")


class OfficialDataError(ValueError):
    """Missing, empty or malformed official data (the message names the variable, folder or file)."""


@dataclasses.dataclass(frozen=True)
class OfficialGame(Game):
    """A game from ALFWorld's official files. `path`: its trial folder relative to the json root
    (`train/<task folder>/<trial>`); `pddl_domain` / `grammar`: the file's (the grammar with "UNKNOWN
    GOAL" where the task goes), None where they equal the installed package's. `seed` is its index among
    the discovered games of its split."""

    path: str = ""
    pddl_domain: str | None = None
    grammar: str | None = None

    @property
    def key(self) -> str:
        return f"official/{self.path}"

    def tw_game(self) -> dict[str, Any]:
        grammar = (self.grammar if self.grammar is not None else data.grammar_text()).replace("UNKNOWN GOAL",
                                                                                             self.task)
        domain = self.pddl_domain if self.pddl_domain is not None else data.domain_text()
        return {"pddl_domain": domain, "grammar": grammar, "pddl_problem": self.pddl_problem,
                "walkthrough": list(self.walkthrough), "solvable": True}


def game_from_dict(d: dict[str, Any]) -> Game:
    """`Game.from_dict` or `OfficialGame.from_dict`, whichever wrote `d` (snapshots hold either)."""
    extra = {f.name for f in dataclasses.fields(OfficialGame)} - {f.name for f in dataclasses.fields(Game)}
    return (OfficialGame if extra <= set(d) else Game).from_dict(d)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One discovered game: `directory` (absolute), `path` (relative to the json root), our `split`,
    `task_type`, the goal's types, `scene`, the human goal texts, `index` among its split's games."""

    directory: str
    path: str
    split: str
    task_type: str
    obj: str
    recep: str | None
    toggle: str | None
    scene: int
    annotations: tuple[str, ...]
    index: int


# ----------------------------------------------------------------------------- discovery

def data_root(root: str | None = None) -> str:
    """The data root: `root`, else `$ALFWORLD_DATA`; an error naming what is missing."""
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise OfficialDataError(f"ALFWorld's official data: no data_dir given and ${DATA_ENV} is not set; point "
                                    f"it at the folder alfworld-download filled ({_LAYOUT})")
        where = f"${DATA_ENV}={root!r}"
    else:
        where = f"data_dir {root!r}"
    path = os.path.expanduser(os.path.expandvars(str(root)))
    if not os.path.isdir(path):
        raise OfficialDataError(f"ALFWorld's official data: {where} is not a folder")
    return os.path.abspath(path)


def _json_root(root: str) -> str | None:
    cands = [os.path.join(root, JSON_DIR)] + sorted(glob.glob(os.path.join(root, "json_*"))) + [root]
    for c in cands:
        if any(os.path.isdir(os.path.join(c, d)) for d in SPLIT_DIRS):
            return c
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise OfficialDataError(f"malformed ALFWorld file {path}: {e}") from e
    if not isinstance(out, dict):
        raise OfficialDataError(f"malformed ALFWorld file {path}: not a JSON object")
    return out


def _from_dirname(rel: str) -> tuple[str | None, list[str]]:
    """(task type, [Object, MRecep, Recep, scene]) from `<task_type>-<Object>-<MRecep>-<Recep>-<scene>`."""
    for part in reversed(rel.replace(os.sep, "/").split("/")):
        fields = part.split("-")
        if fields[0] in TASK_TYPES:
            return fields[0], fields[1:]
    return None, []


def _entry(directory: str, rel: str, split: str, index: int) -> Entry | None:
    traj = _read_json(os.path.join(directory, TRAJ_FILE))
    dir_type, fields = _from_dirname(rel)
    task_type = traj.get("task_type") or dir_type
    if task_type not in TASK_TYPES:
        return None  # movable-receptacle tasks and others outside the text benchmark
    params = traj.get("pddl_params") or {}
    if params.get("object_sliced"):
        return None
    game_file = os.path.join(directory, GAME_FILE)
    game = _read_json(game_file)
    missing = [k for k in ("pddl_domain", "grammar", "pddl_problem") if not isinstance(game.get(k), str)]
    if missing:
        raise OfficialDataError(f"malformed ALFWorld game file {game_file}: no {', '.join(missing)}")
    if game.get("solvable") is False:
        return None
    fields = fields + [""] * (4 - len(fields))
    obj = params.get("object_target") or fields[0] or None
    if task_type == TASK_TYPES[1]:  # the folder name's receptacle slot holds the lamp for these
        recep, toggle = None, params.get("toggle_target") or fields[2] or None
    else:
        recep, toggle = params.get("parent_target") or fields[2] or None, None
    if obj is None or (recep is None and toggle is None):
        raise OfficialDataError(f"ALFWorld game {directory}: no goal objects in {TRAJ_FILE} (pddl_params) or in "
                                f"the folder name")
    scene = None
    sc = traj.get("scene") or {}
    m = re.search(r"(\d+)", str(sc.get("floor_plan") or ""))
    if m:
        scene = int(m.group(1))
    elif sc.get("scene_num") is not None:
        scene = int(sc["scene_num"])
    elif fields[3].isdigit():
        scene = int(fields[3])
    anns = tuple(str(a["task_desc"]).strip() for a in (traj.get("turk_annotations") or {}).get("anns", [])
                 if isinstance(a, dict) and a.get("task_desc"))
    return Entry(directory=directory, path=rel.replace(os.sep, "/"), split=split, task_type=task_type, obj=obj,
                 recep=recep, toggle=toggle, scene=-1 if scene is None else scene, annotations=anns, index=index)


@functools.lru_cache(maxsize=16)
def _discover_split(json_root: str, split_dir: str) -> tuple[Entry, ...]:
    base = os.path.join(json_root, split_dir)
    if not os.path.isdir(base):
        return ()
    dirs = []
    for d, subdirs, files in os.walk(base):
        subdirs.sort()
        if TRAJ_FILE in files and GAME_FILE in files:
            dirs.append(d)
    out: list[Entry] = []
    for d in sorted(dirs):
        rel = os.path.relpath(d, json_root)
        if "movable" in rel or "Sliced" in rel:
            continue  # as ALFWorld's loader
        e = _entry(d, rel, SPLIT_DIRS[split_dir], len(out))
        if e is not None:
            out.append(e)
    return tuple(out)


def discover(root: str | None = None, split: str | None = None, task_types: Iterable[str] | None = None,
             *, require: bool = True) -> list[Entry]:
    """The playable games under the data root (default `$ALFWORLD_DATA`), sorted by path.

    `split`: one of ours ("train", "test", "unseen") or None for all; `task_types`: names or aliases, or
    None for all six. `require`: raise when none is found. Results (and loaded games) are cached per
    folder and split: `clear_cache()` re-reads."""
    root = data_root(root)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    types = None if task_types is None else {task_type_name(t) for t in task_types}
    json_root = _json_root(root)
    out: list[Entry] = []
    if json_root is not None:
        for split_dir, ours in SPLIT_DIRS.items():
            if split is None or split == ours:
                out += [e for e in _discover_split(json_root, split_dir) if types is None or e.task_type in types]
    if require and not out:
        what = f"split {split!r}" if split else "any split"
        if types is not None:
            what += f", task types {sorted(types)}"
        raise OfficialDataError(f"no playable ALFWorld games under {root} ({what}); expected {_LAYOUT}")
    return out


def clear_cache() -> None:
    """Forgets discovered and loaded games (after the files changed)."""
    _discover_split.cache_clear()
    _load.cache_clear()



# ----------------------------------------------------------------------------- naming

def _demangle(mangled: str) -> str:
    for a, b in (("_bar_", "|"), ("_minus_", "-"), ("_plus_", "+"), ("_dot_", "."), ("_comma_", ",")):
        mangled = mangled.replace(a, b)
    return mangled


def _mangle(text: str) -> str:
    for a, b in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        text = text.replace(a, b)
    return text


def _alfworld_name(mangled_lower: str) -> str:
    name = mangled_lower.split("_bar_", 1)[0]
    return name + "basin" if "basin" in mangled_lower else name


def alfworld_ids(ids: Iterable[str]) -> dict[str, str]:
    """{id (lower-cased): our id `name_k`} with ALFWorld's numbering of ALFRED ids: per name (the text
    before the first `_bar_`, + "basin" for sink/bathtub basins), the sorted ids get count, ..., 1.
    Ids that are not ALFRED-mangled are kept (lower-cased)."""
    ids = sorted({i.lower() for i in ids})
    left = collections.Counter(_alfworld_name(i) for i in ids if "_bar_" in i)
    out = {}
    for i in ids:
        if "_bar_" in i:
            name = _alfworld_name(i)
            out[i] = f"{name}_{left[name]}"
            left[name] -= 1
        else:
            out[i] = i
    return out


_TOKEN = re.compile(r"[\w\-]+")


def _rename_tokens(text: str, mapping: dict[str, str], lower: bool = False) -> str:
    if lower:
        return _TOKEN.sub(lambda m: mapping.get(m.group(0).lower(), m.group(0)), text)
    return _TOKEN.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def _rename_commands(commands: Iterable[str], mapping: dict[str, str]) -> tuple[str, ...]:
    """Renames the entity names ('cabinet 3') in commands by an id mapping ({'cabinet_3': 'cabinet_5'})."""
    def sub(m):
        new = mapping.get(f"{m.group(1)}_{m.group(2)}")
        return display_name(new) if new else m.group(0)

    return tuple(re.sub(r"\b([a-z][a-z0-9]*) (\d+)\b", sub, c) for c in commands)


def rename(game: Game, mapping: dict[str, str]) -> Game:
    """`game` with its receptacle / object ids renamed by `mapping` (our ids -> our ids; locations
    `loc_<id>` follow), in its problem text, tables and walkthrough. The renamed game plays the same."""
    tokens = dict(mapping)
    tokens.update({f"loc_{k}": f"loc_{v}" for k, v in mapping.items() if k in game.receptacles})
    m = lambda k: mapping.get(k, k)  # noqa: E731
    return dataclasses.replace(
        game, receptacles={m(k): v for k, v in game.receptacles.items()},
        positions={m(k): v for k, v in game.positions.items()}, objects={m(k): v for k, v in game.objects.items()},
        locations={m(k): m(v) for k, v in game.locations.items()},
        pddl_problem=_rename_tokens(game.pddl_problem, tokens), walkthrough=_rename_commands(game.walkthrough, mapping))


# ----------------------------------------------------------------------------- loading

_ATOM = re.compile(r"\(\s*([A-Za-z][\w\-]*)((?:\s+[^\s()]+)*)\s*\)")


def _parse_problem(text: str, path: str):
    """(declared {id: pddl type}, init atoms [(predicate lower, args)], agent start location)."""
    body = re.sub(r";[^\n]*", "", text)
    m = re.search(r"\(\s*:objects\b([^()]*)\)", body, re.I)
    i, j = body.lower().find("(:init"), body.lower().find("(:goal")
    if m is None or i < 0 or j < i:
        raise OfficialDataError(f"malformed ALFWorld game file {path}: pddl_problem has no :objects / :init / :goal")
    declared: dict[str, str] = {}
    names: list[str] = []
    toks = m.group(1).split()
    k = 0
    while k < len(toks):
        if toks[k] == "-" and k + 1 < len(toks):
            for n in names:
                declared[n] = toks[k + 1].lower()
            names, k = [], k + 2
        else:
            names.append(toks[k])
            k += 1
    atoms = [(a.group(1).lower(), a.group(2).split()) for a in _ATOM.finditer(body[i + len("(:init"):j])]
    return declared, atoms


def _type_name(t: str) -> str:
    return t[:-4] if t.lower().endswith("type") else t


def _position(mangled: str) -> tuple[float, float] | None:
    parts = _demangle(mangled).split("|")
    try:
        return float(parts[1]), float(parts[3])
    except (IndexError, ValueError):
        return None


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def _task_text(entry: Entry, goal_text: str) -> str:
    if goal_text == "human" and entry.annotations:
        return entry.annotations[_pick(entry.path, len(entry.annotations))]
    templates = data.goal_library()[entry.task_type]["templates"]
    t = templates[_pick(entry.path, len(templates))]
    return t.format(obj=entry.obj.lower(), recep=(entry.recep or "").lower(), toggle=(entry.toggle or "").lower(),
                    mrecep="")


_GOAL_RE = re.compile(r'Your task is to: (.*?)\."')


def load(entry: Entry, goal_text: str = "template", plan: bool = True) -> OfficialGame:
    """The `OfficialGame` of a discovered game (cached per entry). `plan`: compute a walkthrough with the
    planner when the file has none (else it stays empty)."""
    if goal_text not in ("template", "human"):
        raise ValueError(f"goal_text must be 'template' or 'human', got {goal_text!r}")
    return _load(entry, goal_text, bool(plan))


@functools.lru_cache(maxsize=128)
def _load(entry: Entry, goal_text: str, plan: bool) -> OfficialGame:
    data.require()
    path = os.path.join(entry.directory, GAME_FILE)
    raw = _read_json(path)
    problem = raw["pddl_problem"]
    declared, atoms = _parse_problem(problem, path)
    kinds = {k: [i for i, t in declared.items() if t == k] for k in ("object", "receptacle", "location")}
    if not kinds["object"] or not kinds["receptacle"]:
        raise OfficialDataError(f"malformed ALFWorld game file {path}: no objects or receptacles in :objects")
    ids = alfworld_ids(kinds["object"] + kinds["receptacle"])
    otype, rtype, inrec, rloc = {}, {}, {}, collections.defaultdict(list)
    start = None
    for pred, args in atoms:
        a = [x.lower() for x in args]
        if pred == "objecttype" and len(a) == 2:
            otype[a[0]] = _type_name(args[1])
        elif pred == "receptacletype" and len(a) == 2:
            rtype[a[0]] = _type_name(args[1])
        elif pred == "inreceptacle" and len(a) == 2:
            inrec[a[0]] = a[1]
        elif pred == "receptacleatlocation" and len(a) == 2:
            rloc[a[1]].append(ids.get(a[0], a[0]))
        elif pred == "atlocation" and len(a) == 2:
            start = a[1]
    receptacles = {ids[r.lower()]: rtype.get(r.lower(), _alfworld_name(r.lower())) for r in kinds["receptacle"]}
    objects = {ids[o.lower()]: otype.get(o.lower(), _alfworld_name(o.lower())) for o in kinds["object"]}
    positions = {ids[r.lower()]: _position(r.lower()) for r in kinds["receptacle"]}
    locations = {ids[o]: ids.get(r, r) for o, r in inrec.items() if o in ids}
    # location names: loc_<first receptacle there>, the agent's start loc_start (when no receptacle is there)
    tokens = dict(ids)
    spare = 0
    for loc in kinds["location"]:
        lo = loc.lower()
        if rloc.get(lo):
            tokens[lo] = f"loc_{sorted(rloc[lo])[0]}"
        elif lo == start:
            tokens[lo] = "loc_start"
        else:
            spare += 1
            tokens[lo] = f"loc_none_{spare}"
    problem = _rename_tokens(problem, tokens, lower=True)

    # goal types, in the problem's own spelling
    spelled = {t.lower(): t for t in list(objects.values()) + list(receptacles.values())}
    fix = lambda t: None if t is None else spelled.get(t.lower(), t)  # noqa: E731
    grammar = raw["grammar"]
    m = _GOAL_RE.search(grammar)
    if "UNKNOWN GOAL" not in grammar and m:
        task = m.group(1)
        grammar = grammar[:m.start(1)] + "UNKNOWN GOAL" + grammar[m.end(1):]
    else:
        task = _task_text(entry, goal_text)
    walkthrough = tuple(str(s) for s in (raw.get("walkthrough") or ()))
    game = OfficialGame(
        seed=entry.index, split=entry.split, task_type=entry.task_type, scene=entry.scene, task=task,
        obj=fix(entry.obj), recep=fix(entry.recep), toggle=fix(entry.toggle), receptacles=receptacles,
        positions=positions, objects=objects, locations=locations, pddl_problem=problem, walkthrough=walkthrough,
        path=entry.path, pddl_domain=None if raw["pddl_domain"] == data.domain_text() else raw["pddl_domain"],
        grammar=None if grammar == data.grammar_text() else grammar)
    if not walkthrough and plan:
        game = dataclasses.replace(game, walkthrough=_plan(game))
    return game


def _plan(game: OfficialGame) -> tuple[str, ...]:
    """The planner's walkthrough: on the game cut down to its goal's entities (fast), else on the full
    game (Fast Downward's blind search: can be slow on large games); () if no plan wins."""
    goal_objs = [o for o, t in game.objects.items() if t in (game.obj, game.toggle)]
    if all(o in game.locations for o in goal_objs):
        try:
            plan = generator.plan_and_check(game)
        except Exception:  # translation failure of the cut-down problem
            plan = None
        if plan:
            return tuple(plan)
    _, eng = generator.planning_engines()
    try:
        eng.load(game, plan=True)
        plan = list(eng.planned or [])
        eng.reset()
        for cmd in plan:
            if cmd not in eng.admissible:
                return ()
            eng.step(cmd)
    except Exception:
        return ()
    return tuple(plan) if eng.won and engine.progress(game, eng.facts) == 1.0 else ()


class OfficialData:
    """The official games under one data root (default `$ALFWORLD_DATA`), for `ALFWorldEnv(data_dir=...)`.

    `games(split, task_types)`: the discovered entries; `load(entry)`: its `OfficialGame`.
    `goal_text`: "template" (ALFWorld's default) or "human" (see the module docstring)."""

    def __init__(self, root: str | None = None, goal_text: str = "template", plan: bool = True) -> None:
        if goal_text not in ("template", "human"):
            raise ValueError(f"goal_text must be 'template' or 'human', got {goal_text!r}")
        self.root = data_root(root)
        self.goal_text = goal_text
        self.plan = bool(plan)

    def games(self, split: str, task_types: Iterable[str] | None = None) -> list[Entry]:
        return discover(self.root, split, task_types)

    def load(self, entry: Entry) -> OfficialGame:
        return load(entry, self.goal_text, self.plan)

    def __repr__(self) -> str:
        return f"OfficialData({self.root!r}, goal_text={self.goal_text!r})"


# ----------------------------------------------------------------------------- writing (tests)

_BASINS = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}


def _coord(v: float) -> str:
    s = f"{v:+06.2f}"
    return s if float(s) == v else f"{v:+.17g}"


def _official_names(game: Game) -> tuple[dict[str, str], dict[str, str]]:
    """({our id: ALFRED-style mangled id}, {our location: ALFRED-style mangled location}) of a game."""
    mangled: dict[str, str] = {}
    j = 0
    for r, t in game.receptacles.items():
        j += 1
        pos = game.positions.get(r)
        y = _coord(j / 100)
        if pos is None:  # appliances without a layout position: an id without coordinates
            parts = [t, "extra", str(j)]
        else:
            parts = [_BASINS.get(t, t), _coord(pos[0]), y, _coord(pos[1])] + ([t] if t in _BASINS else [])
        mangled[r] = _mangle("|".join(parts))
    for o, t in game.objects.items():
        j += 1
        pos = game.positions.get(game.locations.get(o, "")) or (0.0, 0.0)
        mangled[o] = _mangle("|".join([t, _coord(pos[0]), _coord(j / 100), _coord(pos[1])]))
    # locations: ALFRED's agent poses `loc|x|z|rotation|horizon` (grid units of 0.25 m), made unique
    locs: dict[str, str] = {}
    used: set[str] = set()
    for r in list(game.receptacles) + ["start"]:
        pos = game.positions.get(r) or (0.0, 0.0)
        gx, gz = int(round(pos[0] / 0.25)), int(round(pos[1] / 0.25))
        rot = 0
        while True:
            name = _mangle(f"loc|{gx}|{gz}|{rot}|30")
            if name not in used:
                break
            rot += 1
        used.add(name)
        locs["loc_start" if r == "start" else f"loc_{r}"] = name
    return mangled, locs


def alfworld_renaming(game: Game) -> dict[str, str]:
    """{our id: the id the game's entity has once written by `write_official` and read back} (ALFWorld's
    numbering of the written ALFRED ids). `rename(game, alfworld_renaming(game))` plays exactly as the
    written copy."""
    mangled, _ = _official_names(game)
    ids = alfworld_ids(mangled.values())
    return {k: ids[v.lower()] for k, v in mangled.items()}


def write_official(game: Game, root: str, split: str = "train", trial_id: str | None = None,
                   walkthrough: bool = True) -> str:
    """Writes one of our games in ALFWorld's official layout under `root` (for tests; the copy plays
    as `rename(game, alfworld_renaming(game))`); returns the trial folder.

    `split`: ours ("train", "test", "unseen") or ALFWorld's folder name. The game file holds the
    installed domain and grammar (with the task text in it), the problem with ALFRED-style ids and
    locations, `solvable: true`, and the walkthrough in ALFWorld's names (none with `walkthrough=False`);
    traj_data.json the fields the loader reads (task_type, pddl_params, scene, one annotation)."""
    dirs = {v: k for k, v in SPLIT_DIRS.items()}
    split_dir = split if split in SPLIT_DIRS else dirs.get(split)
    if split_dir is None:
        raise ValueError(f"split must be one of {SPLITS} or {tuple(SPLIT_DIRS)}, got {split!r}")
    mangled, locs = _official_names(game)
    new = alfworld_renaming(game)
    problem = _rename_tokens(game.pddl_problem, {**mangled, **locs})
    last = game.toggle if game.task_type == TASK_TYPES[1] else game.recep
    task_dir = f"{game.task_type}-{game.obj}-None-{last}-{game.scene}"
    trial_id = trial_id or f"trial_T{int(game.seed):08d}_000000_000000"
    out = os.path.join(root, JSON_DIR, split_dir, task_dir, trial_id)
    os.makedirs(out, exist_ok=True)
    tw = game.tw_game()
    tw["pddl_problem"] = problem
    tw["walkthrough"] = list(_rename_commands(game.walkthrough, new)) if walkthrough else None
    traj = {
        "task_id": trial_id,
        "task_type": game.task_type,
        "pddl_params": {"object_target": game.obj, "parent_target": game.recep or "",
                        "toggle_target": game.toggle or "", "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{game.scene}", "scene_num": game.scene, "random_seed": int(game.seed)},
        "turk_annotations": {"anns": [{"task_desc": game.task[:1].upper() + game.task[1:] + ".",
                                       "high_descs": [], "votes": [1, 1, 1]}]},
        "plan": {"high_pddl": [], "low_actions": []},
        "images": [],
    }
    for name, obj in ((GAME_FILE, tw), (TRAJ_FILE, traj)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=1)
    return out
