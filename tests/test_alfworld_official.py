"""ALFWorld's official game files (`official.py`): discovery, loading, and the env playing them.

No official data is downloaded: generated games are written in the official layout (`write_official`)
and the env playing that copy must behave exactly as the env playing the generated game (renamed to
ALFWorld's instance numbering, which the official reader reproduces).
"""
import json
import os
import pickle

import alfworld  # noqa: F401  (a test dependency, as in test_alfworld.py)
import gymnasium as gym
import numpy as np
import pytest

import coso_jax.envs  # noqa: F401  (registers coso_jax/ALFWorld-v0)
from coso_jax.envs.alfworld import data, engine, official, pools
from coso_jax.envs.alfworld.env import ALFWorldEnv
from coso_jax.envs.alfworld.generator import TASK_TYPES, Game, generate

HEAT, CLEAN, LOOK = TASK_TYPES[3], TASK_TYPES[2], TASK_TYPES[1]
# (task type, seed, official split folder, trial id): sink and bathtub basins, appliances without a
# layout position, a lamp; the look game twice (train and valid_unseen)
LAYOUT = [(HEAT, 0, "train", "trial_T20190001_000000_000001"),
          (LOOK, 0, "train", "trial_T20190001_000000_000002"),
          (CLEAN, 0, "valid_seen", "trial_T20190001_000000_000003"),
          (LOOK, 0, "valid_unseen", "trial_T20190001_000000_000004")]


def _game(task_type: str, seed: int) -> Game:
    """A pool game from the default cache when it is there (no planner run), else generated."""
    path = pools.game_path(seed, task_type, "train")
    if os.path.exists(path):
        with open(path) as f:
            g = Game.from_dict(json.load(f))
        if g.walkthrough:
            return g
    return generate(seed, task_type)


@pytest.fixture(scope="module")
def games():
    return {(t, s): _game(t, s) for t, s, _, _ in LAYOUT}


@pytest.fixture(scope="module")
def root(tmp_path_factory, games):
    r = str(tmp_path_factory.mktemp("alfworld_data"))
    for t, s, split, trial in LAYOUT:
        official.write_official(games[(t, s)], r, split, trial_id=trial)
    official.clear_cache()
    return r


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("alfworld_cache"))  # the envs' translation cache, off the user's


# ----------------------------------------------------------------------------- discovery and loading

def test_discovery_splits_task_types_and_order(root, games):
    found = official.discover(root)
    # split folders in order (train, valid_seen, valid_unseen), paths sorted within each
    assert [(e.split, e.task_type) for e in found] == [("train", LOOK), ("train", HEAT), ("test", CLEAN),
                                                       ("unseen", LOOK)]
    assert all(e.path.split("/")[0] in official.SPLIT_DIRS for e in found)
    heat = found[1]
    g = games[(HEAT, 0)]
    assert (heat.obj, heat.recep, heat.toggle, heat.scene, heat.index) == (g.obj, g.recep, None, g.scene, 1)
    look = found[0]
    assert (look.obj, look.recep, look.toggle, look.index) == (games[(LOOK, 0)].obj, None, games[(LOOK, 0)].toggle, 0)
    assert [e.task_type for e in official.discover(root, "train", ["look"])] == [LOOK]
    assert [e.split for e in official.discover(root, "unseen")] == ["unseen"]
    assert official.discover(root) == found  # deterministic
    with pytest.raises(official.OfficialDataError, match="no playable ALFWorld games"):
        official.discover(root, "test", ["heat"])


def test_loaded_game_is_the_renamed_generated_game(root, games):
    for e in official.discover(root):
        g = games[(e.task_type, 0)]
        og = official.load(e)
        want = official.rename(g, official.alfworld_renaming(g))
        assert isinstance(og, official.OfficialGame) and og.key == f"official/{e.path}"
        assert (og.split, og.task_type, og.scene, og.task, og.obj, og.recep, og.toggle) == (
            e.split, g.task_type, g.scene, g.task, g.obj, g.recep, g.toggle)
        for field in ("receptacles", "positions", "objects", "locations", "pddl_problem", "walkthrough"):
            assert getattr(og, field) == getattr(want, field), field
        assert og.pddl_domain is None and og.grammar is None  # the installed domain and grammar
        # the renaming is ALFWorld's numbering: a permutation of the instance numbers within each type
        for table in ("receptacles", "objects"):
            assert sorted(getattr(og, table).items()) == sorted(getattr(g, table).items())
        assert official.game_from_dict(json.loads(json.dumps(og.to_dict()))) == og
        assert official.game_from_dict(g.to_dict()) == g


def test_alfworld_numbering_and_names():
    ids = ["Cabinet_bar__plus_00_dot_68_bar__plus_00_dot_50_bar__minus_02_dot_20",
           "Cabinet_bar__minus_01_dot_00_bar__plus_00_dot_50_bar__minus_02_dot_20",
           "Sink_bar__minus_01_dot_99_bar__plus_01_dot_14_bar__minus_00_dot_98_bar_SinkBasin", "agent1"]
    out = official.alfworld_ids(ids)
    # sorted ids, numbered from the count down ("_minus_" sorts before "_plus_")
    assert out[ids[1].lower()] == "cabinet_2" and out[ids[0].lower()] == "cabinet_1"
    assert out[ids[2].lower()] == "sinkbasin_1" and out["agent1"] == "agent1"


# ----------------------------------------------------------------------------- the env

def _play(env, options, commands):
    obs, info = env.reset(seed=0, options=options)
    steps = [(obs, 0.0, False, False, info)]
    for c in commands:
        steps.append(env.step(c))
    return steps


@pytest.mark.parametrize("index", [0, 1, 2])
def test_official_copy_plays_like_the_generated_game(root, games, cache, index):
    e = official.discover(root)[index]
    g = games[(e.task_type, 0)]
    want = official.rename(g, official.alfworld_renaming(g))
    env_off = gym.make("coso_jax/ALFWorld-v0", data_dir=root, split=e.split, cache_dir=cache).unwrapped
    env_ref = ALFWorldEnv(cache_dir=cache)
    split_games = env_off.official.games(e.split)
    off = _play(env_off, {"index": split_games.index(e)}, want.walkthrough)
    ref = _play(env_ref, {"game": want}, want.walkthrough)
    orig = _play(env_ref, {"game": g}, g.walkthrough)
    assert off[0][4]["game"] == f"official/{e.path}" and off[0][4]["walkthrough"] == list(want.walkthrough)
    for (o1, r1, te1, tr1, i1), (o2, r2, te2, tr2, i2), (_, r3, te3, _, i3) in zip(off, ref, orig):
        assert np.array_equal(o1, o2)
        for k in ("observation", "task", "task_type", "admissible_commands", "won", "progress", "admissible"):
            assert i1[k] == i2[k], k
        assert (r1, te1, tr1) == (r2, te2, tr2)
        # and as the game with its own numbering: same rewards, progress, won
        assert (r1, te1, i1["won"], i1["progress"]) == (r3, te3, i3["won"], i3["progress"])
        assert (i1["progress"] == 1.0) == i1["won"]
    assert off[-1][4]["won"] and off[-1][1] == pytest.approx(51.0)
    assert not any(s[4]["won"] for s in off[:-1])


def test_env_samples_official_games_progress_and_snapshot(root, cache):
    env = ALFWorldEnv(data_dir=root, cache_dir=cache)  # train: the heat and look games
    seen = set()
    for k in range(8):
        _, info = env.reset(seed=k)
        seen.add(info["task_type"])
        assert info["game"].startswith("official/train/")
    assert seen == {HEAT, LOOK}
    _, info = env.reset(options={"task_type": "heat"})
    assert info["task_type"] == HEAT
    # progress is 1 exactly when won, on random play too
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, _, term, _, info = env.step(int(rng.integers(len(info["admissible_commands"]))))
        assert (info["progress"] == 1.0) == info["won"] == engine.goal_met(env.game, env.engine.facts)
        if term:
            break
    # snapshot / restore mid-walkthrough
    _, info = env.reset(options={"task_type": "look"})
    walk = info["walkthrough"]
    env.step(walk[0])
    env.step("dance")
    state = pickle.loads(pickle.dumps(env.snapshot()))
    other = ALFWorldEnv(data_dir=root, cache_dir=cache)
    other.restore_snapshot(state)
    assert isinstance(other.game, official.OfficialGame) and other.game == env.game
    assert np.array_equal(other.render(), env.render())
    for c in walk[1:]:
        a, b = env.step(c), other.step(c)
        assert a[1:4] == b[1:4] and a[4]["observation"] == b[4]["observation"] and np.array_equal(a[0], b[0])
    assert a[4]["won"]


def test_env_reads_alfworld_data_variable(root, cache, monkeypatch):
    monkeypatch.setenv(official.DATA_ENV, root)
    env = gym.make("coso_jax/ALFWorld-v0", source="official", split="unseen", cache_dir=cache)
    _, info = env.reset(seed=0)
    assert info["game"].startswith("official/valid_unseen/") and info["task_type"] == LOOK
    with pytest.raises(ValueError, match="data_dir"):
        ALFWorldEnv(source="generated", data_dir=root)


# ----------------------------------------------------------------------------- files and errors

def test_missing_and_empty_data(tmp_path, monkeypatch):
    monkeypatch.delenv(official.DATA_ENV, raising=False)
    with pytest.raises(official.OfficialDataError, match=official.DATA_ENV):
        official.discover()
    with pytest.raises(official.OfficialDataError, match=official.DATA_ENV):
        ALFWorldEnv(source="official")
    missing = str(tmp_path / "nowhere")
    monkeypatch.setenv(official.DATA_ENV, missing)
    with pytest.raises(official.OfficialDataError, match="nowhere"):
        official.discover()
    empty = tmp_path / "empty"
    (empty / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(official.OfficialDataError, match=f"no playable ALFWorld games under {empty}"):
        ALFWorldEnv(data_dir=str(empty))


def _copy(games, tmp_path, name, **kw):
    r = str(tmp_path / name)
    d = official.write_official(games[(LOOK, 0)], r, "train", **kw)
    official.clear_cache()
    return r, d


def test_malformed_game_files_are_named(tmp_path, games):
    r, d = _copy(games, tmp_path, "broken")
    path = os.path.join(d, official.GAME_FILE)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(official.OfficialDataError, match=f"malformed ALFWorld file {path}"):
        official.discover(r)
    with open(path, "w") as f:
        json.dump({"pddl_domain": data.domain_text(), "grammar": data.grammar_text(), "solvable": True}, f)
    official.clear_cache()
    with pytest.raises(official.OfficialDataError, match=f"game file {path}: no pddl_problem"):
        official.discover(r)
    with open(path, "w") as f:
        json.dump({"pddl_domain": data.domain_text(), "grammar": data.grammar_text(), "pddl_problem": "(define)"}, f)
    official.clear_cache()
    (e,) = official.discover(r)  # no `solvable` key: played
    with pytest.raises(official.OfficialDataError, match=f"game file {path}: pddl_problem has no"):
        official.load(e)


def test_what_is_skipped(tmp_path, games):
    r, d = _copy(games, tmp_path, "skips")
    g = games[(LOOK, 0)]
    base = os.path.dirname(d)
    for trial, edit in (("trial_unsolvable", lambda tw, traj: tw.update(solvable=False)),
                        ("trial_sliced", lambda tw, traj: traj["pddl_params"].update(object_sliced=True)),
                        ("trial_mrecep", lambda tw, traj: traj.update(task_type="pick_and_place_with_movable_recep")),
                        ("trial_Sliced_path", None), ("trial_no_game", "rm")):
        t = official.write_official(g, r, "train", trial_id=trial)
        if edit == "rm":
            os.remove(os.path.join(t, official.GAME_FILE))
        elif edit is not None:
            tw, traj = (json.load(open(os.path.join(t, n))) for n in (official.GAME_FILE, official.TRAJ_FILE))
            edit(tw, traj)
            for n, obj in ((official.GAME_FILE, tw), (official.TRAJ_FILE, traj)):
                with open(os.path.join(t, n), "w") as f:
                    json.dump(obj, f)
    assert sorted(os.listdir(base)) == sorted([os.path.basename(d), "trial_unsolvable", "trial_sliced",
                                               "trial_mrecep", "trial_Sliced_path", "trial_no_game"])
    official.clear_cache()
    assert [e.directory for e in official.discover(r)] == [d]


def test_goal_text_from_traj_data_and_planned_walkthrough(tmp_path, games, cache):
    g = games[(LOOK, 0)]
    r, d = _copy(games, tmp_path, "placeholder", walkthrough=False)
    path = os.path.join(d, official.GAME_FILE)
    tw = json.load(open(path))
    tw["grammar"] = data.grammar_text()  # "UNKNOWN GOAL", as ALFWorld's own files
    with open(path, "w") as f:
        json.dump(tw, f)
    (e,) = official.discover(r)
    og = official.load(e)
    texts = [t.format(obj=g.obj.lower(), recep="", toggle=g.toggle.lower(), mrecep="")
             for t in data.goal_library()[LOOK]["templates"]]
    assert og.task in texts and og.grammar is None
    assert official.load(e, goal_text="human").task == g.task[:1].upper() + g.task[1:] + "."
    # no walkthrough in the file: the planner's, which wins
    assert og.walkthrough
    env = ALFWorldEnv(data_dir=official.OfficialData(r, goal_text="human"), cache_dir=cache)
    _, info = env.reset(seed=0)
    assert info["task"].endswith(".") and info["walkthrough"] == list(og.walkthrough)
    for c in og.walkthrough:
        _, reward, term, _, info = env.step(c)
    assert term and info["won"] and info["progress"] == 1.0


def test_schematic_gives_every_receptacle_of_a_large_room_its_own_cell(games):
    """Official kitchens list 30-40 receptacles; the 3 x 8 schematic grows instead of stacking them."""
    import dataclasses

    from coso_jax.envs.alfworld import render

    assert render.grid_shape(12) == (3, 8) and render.grid_shape(24) == (3, 8)
    assert render.grid_shape(40) == (5, 8) and render.grid_shape(60) == (6, 10)
    rng = np.random.default_rng(0)
    positions = {f"cabinet_{i}": (float(x), float(z)) for i, (x, z) in enumerate(rng.uniform(-3, 3, (38, 2)))}
    positions.update({"toaster_1": None, "stoveburner_1": None})
    big = dataclasses.replace(next(iter(games.values())), positions=positions, seed=987_654)
    cells = render.grid_cells(big)
    cols, rows = render.grid_shape(40)
    assert len(set(cells.values())) == 40 and set(cells) == set(positions)
    assert all(0 <= c < cols and 0 <= r < rows for c, r in cells.values())
    image = render.draw_state(big, "cabinet_3", [], set(), {}, {"cabinet_3"})
    assert image.shape == (render.CANVAS, render.CANVAS, 3) and image.dtype == np.uint8
