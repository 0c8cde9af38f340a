"""The memoised fast path of the ALFWorld engine equals the unmodified TextWorld engine.

Random episodes are recorded on the plain engine (feedback, admissible commands, won, the full
fact set after every step, including inadmissible commands and a reset in the middle), then
replayed on the fast engine, which must give identical records.
"""
import alfworld  # noqa: F401  (no importorskip: the dependency list installs it)
import numpy as np
import pytest

from coso_jax.envs.alfworld import engine
from coso_jax.envs.alfworld.generator import TASK_TYPES, generate

STEPS = 24


def _record(eng, game, commands):
    out = [("load", eng.load(game), tuple(eng.admissible), eng.won, tuple(sorted(map(str, eng.facts))))]
    for c in commands:
        if c == "<reset>":
            out.append(("reset", eng.reset(), tuple(eng.admissible), eng.won, tuple(sorted(map(str, eng.facts)))))
        else:
            out.append((c, eng.step(c), tuple(eng.admissible), eng.won, tuple(sorted(map(str, eng.facts)))))
    return out


def _random_commands(game, seed):
    """A random episode: mostly admissible commands, some junk, one reset (drawn on the fast
    engine to save time; any divergence of the two engines shows up in the records below)."""
    rng = np.random.default_rng(seed)
    eng = engine.Engine(fast=True)
    eng.load(game)
    cmds = []
    for k in range(STEPS):
        if k == STEPS // 2:
            c = "<reset>"
            eng.reset()
        elif rng.random() < 0.1:
            c = ["dance", "go to the moon", "take everything"][int(rng.integers(3))]
            eng.step(c)
        else:
            c = eng.admissible[int(rng.integers(len(eng.admissible)))]
            eng.step(c)
        cmds.append(c)
    return cmds


@pytest.mark.parametrize("task_type,seed", [(TASK_TYPES[5], 0), (TASK_TYPES[1], 1), (TASK_TYPES[3], 2)])
def test_fast_path_equals_plain_engine(task_type, seed):
    game = generate(seed, task_type, verify=False)
    cmds = _random_commands(game, seed)
    plain = _record(engine.Engine(fast=False), game, cmds)
    fast = _record(engine.Engine(fast=True), game, cmds)
    assert len(plain) == len(fast) == STEPS + 1
    for p, f in zip(plain, fast):
        assert p == f
    # the episode did something: states changed and some commands were inadmissible or not
    assert len({r[4] for r in plain}) > 2


def test_walkthrough_on_plain_engine_wins():
    game = generate(0, TASK_TYPES[0])
    eng = engine.Engine(fast=False)
    eng.load(game)
    for c in game.walkthrough:
        eng.step(c)
    assert eng.won and engine.progress(game, eng.facts) == 1.0


def test_fast_mode_is_scoped():
    engine.install_fast_path()
    assert not engine._on()
    with engine.fast_mode(True):
        assert engine._on()
        with engine.fast_mode(False):
            assert not engine._on()
        assert engine._on()
    assert not engine._on()


def test_engine_keeps_sys_argv():
    import sys

    before = sys.argv
    copy = list(before)
    eng = engine.Engine(fast=False)
    eng.load(generate(3, TASK_TYPES[0], verify=False))
    eng.reset()
    assert sys.argv is before and sys.argv == copy


def test_fast_path_with_disk_cache_equals_plain_engine(tmp_path):
    game = generate(4, TASK_TYPES[2], verify=False)
    cmds = _random_commands(game, 4)[:10]
    plain = _record(engine.Engine(fast=False), game, cmds)
    engine.clear_memory_caches()  # drawing the commands translated the game already
    first = _record(engine.Engine(fast=True, sas_cache_dir=str(tmp_path)), game, cmds)
    files = sorted(p.name for p in tmp_path.rglob("*.pkl"))
    assert len(files) == 2  # one translation per mode (plain and optimised for the planner)
    # a later process has an empty memory cache: emulate it, so the pickles are what is read
    engine.clear_memory_caches()
    second = _record(engine.Engine(fast=True, sas_cache_dir=str(tmp_path)), game, cmds)
    assert plain == first == second
