"""Fixed game pools per (split, task type), cached on disk so rollouts never wait on generation.

A pool is the games for seeds 0..size-1 of one split and task type (the split is part of each
game's random stream, so the train and test pools are distinct draws; "unseen" uses held-out
scenes). Each game is stored as one JSON file under

  <cache_dir>/v<GENERATOR_VERSION>/<split>/<task_type>/<seed>.json

and generated (planner check included) on first use; the PDDL->SAS translations made while
checking it are kept under <cache_dir>/v<GENERATOR_VERSION>/sas/, so a pool game loads fast in
every later process too. `cache_dir` defaults to
$COSO_ALFWORLD_CACHE, else ~/.cache/coso_jax/alfworld. Pre-generate with

  python -m coso_jax.envs.alfworld.pools --split train --size 200 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Iterable

from coso_jax.envs.alfworld.game import SPLITS, TASK_TYPES, Game, task_type_name
from coso_jax.envs.alfworld.generator import generate

__all__ = ["GENERATOR_VERSION", "default_cache_dir", "game_path", "sas_dir", "load_game", "pool", "build"]

# Bump when generator changes would change games for the same seed (old caches are then ignored).
GENERATOR_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("COSO_ALFWORLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "coso_jax",
                                                                   "alfworld")


def sas_dir(cache_dir: str | None = None) -> str:
    """Where the engine's fast path keeps PDDL->SAS translations of pool games (pickles)."""
    return os.path.join(cache_dir or default_cache_dir(), f"v{GENERATOR_VERSION}", "sas")


def game_path(seed: int, task_type: str, split: str, cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"v{GENERATOR_VERSION}", split,
                        task_type_name(task_type), f"{int(seed)}.json")


def load_game(seed: int, task_type: str, split: str = "train", cache_dir: str | None = None,
              *, use_cache: bool = True) -> Game:
    """The game of (seed, task type, split): from the cache, else generated and cached."""
    task_type = task_type_name(task_type)
    path = game_path(seed, task_type, split, cache_dir)
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                return Game.from_dict(json.load(f))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a damaged file: regenerate
    if use_cache:
        from coso_jax.envs.alfworld.engine import sas_disk_cache

        with sas_disk_cache(sas_dir(cache_dir)):  # the full game's translation is kept for later loads
            game = generate(seed, task_type, split)
    else:
        game = generate(seed, task_type, split)
    if use_cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(game.to_json())
        os.replace(tmp, path)  # atomic: parallel workers never read half a file
    return game


def pool(split: str, task_type: str, size: int, cache_dir: str | None = None) -> list[Game]:
    """The games of seeds 0..size-1 (generated and cached as needed)."""
    return [load_game(s, task_type, split, cache_dir) for s in range(int(size))]


def _build_one(args) -> str:
    seed, task_type, split, cache_dir = args
    return load_game(seed, task_type, split, cache_dir).key


def build(splits: Iterable[str], task_types: Iterable[str], size: int, cache_dir: str | None = None,
          workers: int = 1) -> int:
    """Generates (or finds cached) every game of the pools; returns how many games there are."""
    jobs = [(s, task_type_name(t), sp, cache_dir) for sp in splits for t in task_types for s in range(size)]
    if workers <= 1:
        for j in jobs:
            _build_one(j)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as p:
            for _ in p.imap_unordered(_build_one, jobs, chunksize=4):
                pass
    return len(jobs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", action="append", choices=SPLITS)
    ap.add_argument("--task_type", action="append")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    n = build(a.split or ["train"], a.task_type or TASK_TYPES, a.size, a.cache_dir, a.workers)
    print(f"{n} games in {a.cache_dir or default_cache_dir()}")


if __name__ == "__main__":
    main()
