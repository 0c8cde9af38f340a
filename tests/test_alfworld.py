"""ALFWorld env: generator, progress, env, text interface (parser tables + fuzz).

`alfworld` is a test dependency (pyproject's `test` extra): a missing package fails here loudly.
"""
import json
import os

import alfworld  # noqa: F401  (no importorskip: the dependency list installs it)
import gymnasium as gym
import numpy as np
import pytest

import coso_jax.envs as envs
from coso_jax.envs.alfworld import data, engine, generator, pools
from coso_jax.envs.alfworld.generator import TASK_TYPES, generate
from coso_jax.envs.alfworld.text import INADMISSIBLE, VERBS, ALFWorldText, verb_label
from coso_jax.envs.base import InvalidActionPolicy

SEEDS_PER_TYPE = 2  # the default run; the slow test and benchmarks/alfworld.py run 100 per type


@pytest.fixture(scope="module")
def games():
    return {(t, s): generate(s, t) for t in TASK_TYPES for s in range(SEEDS_PER_TYPE)}


def _play(game, commands, fast=True):
    eng = engine.Engine(fast=fast)
    eng.load(game)
    trace = [(eng.won, engine.progress(game, eng.facts))]
    for c in commands:
        assert c in eng.admissible, (c, eng.admissible)
        eng.step(c)
        trace.append((eng.won, engine.progress(game, eng.facts)))
    return eng, trace


# ----------------------------------------------------------------------------- generator

@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_generated_games_are_solved_by_their_walkthrough(games, task_type):
    for s in range(SEEDS_PER_TYPE):
        g = games[(task_type, s)]
        assert g.task_type == task_type and g.walkthrough
        eng, trace = _play(g, g.walkthrough)
        assert eng.won
        # progress is 1 exactly when won, and the goal is not met at the start
        assert trace[0] == (False, trace[0][1]) and trace[0][1] < 1.0
        for won, prog in trace:
            assert (prog == 1.0) == won
            assert 0.0 <= prog <= 1.0
        assert trace[-1] == (True, 1.0)


def test_progress_equals_won_on_random_play(games):
    rng = np.random.default_rng(0)
    for t in TASK_TYPES:
        g = games[(t, 0)]
        eng = engine.Engine(fast=True)
        eng.load(g)
        for _ in range(15):
            eng.step(eng.admissible[int(rng.integers(len(eng.admissible)))])
            assert (engine.progress(g, eng.facts) == 1.0) == eng.won
            assert engine.goal_met(g, eng.facts) == eng.won


def test_generation_is_deterministic_and_splits_differ(games):
    for t in (TASK_TYPES[0], TASK_TYPES[3]):
        assert generate(0, t) == games[(t, 0)]  # planner check included
    for t in TASK_TYPES:
        for s in range(20):
            a = generate(s, t, verify=False)
            assert a == generate(s, t, verify=False)
            assert a.pddl_problem != generate(s, t, "test", verify=False).pddl_problem
    unseen = set(data.constants().TEST_SCENE_NUMBERS)
    for t in TASK_TYPES:
        for s in range(10):
            assert generate(s, t, "unseen", verify=False).scene in unseen
            assert generate(s, t, "train", verify=False).scene not in unseen
            assert generate(s, t, "test", verify=False).scene not in unseen


def test_generation_does_not_depend_on_the_hash_seed():
    import subprocess
    import sys

    code = ("import hashlib; from coso_jax.envs.alfworld.generator import generate, TASK_TYPES; "
            "print(hashlib.sha256(''.join(generate(s, t, verify=False).to_json() "
            "for t in TASK_TYPES for s in range(5)).encode()).hexdigest())")
    out = [subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                          capture_output=True, text=True, check=True).stdout for h in ("1", "2")]
    assert out[0] == out[1] and len(out[0].strip()) == 64


def test_sampled_worlds_follow_the_tables():
    c = data.constants()
    vro = c.VAL_RECEPTACLE_OBJECTS
    need = {TASK_TYPES[2]: "SinkBasin", TASK_TYPES[3]: "Microwave", TASK_TYPES[4]: "Fridge"}
    prop = {TASK_TYPES[2]: "Cleanable", TASK_TYPES[3]: "Heatable", TASK_TYPES[4]: "Coolable"}
    for t in TASK_TYPES:
        for s in range(25):
            g = generate(s, t, verify=False)
            assert data.room_type(g.scene) in c.GOALS_VALID[t]
            assert len(g.receptacles) <= generator.MAX_RECEPTACLES
            assert set(g.locations) == set(g.objects) and set(g.locations.values()) <= set(g.receptacles)
            for o, r in g.locations.items():
                ot, rt = g.objects[o], g.receptacles[r]
                if ot in generator.LAMP_TYPES:
                    assert rt in generator.LAMP_HOLDERS
                else:
                    assert ot in vro[rt], (ot, rt)
                if ot == g.obj and g.recep is not None:
                    assert rt != g.recep  # the goal is not already met
            assert g.obj in g.objects.values()
            if t in need:
                assert need[t] in g.receptacles.values() and g.obj in c.VAL_ACTION_OBJECTS[prop[t]]
            if t == TASK_TYPES[1]:
                assert g.toggle in g.objects.values() and g.recep is None
            else:
                assert g.obj in vro[g.recep] and g.recep in g.receptacles.values()
            if t == TASK_TYPES[5]:
                assert sum(v == g.obj for v in g.objects.values()) >= 2
            assert g.obj.lower() in g.task


def test_game_round_trips_through_json(games, tmp_path):
    g = games[(TASK_TYPES[5], 1)]
    assert generator.Game.from_dict(json.loads(g.to_json())) == g
    tw = g.tw_game()
    assert "UNKNOWN GOAL" not in tw["grammar"] and g.task in tw["grammar"]
    assert tw["pddl_domain"] == data.domain_text()


def test_pool_cache(tmp_path, games):
    g = pools.load_game(0, "pick", "train", str(tmp_path))
    assert g == games[(TASK_TYPES[0], 0)]
    path = pools.game_path(0, "pick", "train", str(tmp_path))
    assert os.path.exists(path)
    with open(path) as f:
        assert generator.Game.from_dict(json.load(f)) == g
    # a cached game is read back, not regenerated
    d = g.to_dict()
    d["task"] = "marker"
    with open(path, "w") as f:
        json.dump(d, f)
    assert pools.load_game(0, "pick", "train", str(tmp_path)).task == "marker"


@pytest.mark.slow
@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_hundred_seeds_per_type_are_solvable(task_type):
    for s in range(100):
        g = generate(s, task_type)
        eng, trace = _play(g, g.walkthrough)
        assert eng.won and all((p == 1.0) == w for w, p in trace)


# ----------------------------------------------------------------------------- env

@pytest.fixture()
def env(tmp_path, games):
    e = gym.make("coso_jax/ALFWorld-v0", task_type="heat", pool_size=1, cache_dir=str(tmp_path))
    # seed the cache with the fixture's game so the env does not generate again
    g = games[(TASK_TYPES[3], 0)]
    path = pools.game_path(0, TASK_TYPES[3], "train", str(tmp_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(g.to_json())
    return e


def test_env_walkthrough_rewards_and_images(env, games):
    g = games[(TASK_TYPES[3], 0)]
    obs, info = env.reset(seed=1)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8
    assert info["task"] == g.task and info["walkthrough"] == list(g.walkthrough)
    assert info["admissible_commands"] == sorted(info["admissible_commands"]) and info["progress"] < 1
    first = obs
    for k, cmd in enumerate(g.walkthrough):
        obs, r, term, trunc, info = env.step(info["admissible_commands"].index(cmd) if k % 2 else cmd)
        assert info["admissible"] and not trunc
        assert r == pytest.approx(50.0 * info["won"] + info["progress"])
    assert term and info["won"] and r == pytest.approx(51.0)
    assert not np.array_equal(first, obs)


def test_env_inadmissible_and_step_limit(env):
    obs, info = env.reset(seed=0)
    for k in range(50):
        action = [INADMISSIBLE, "dance wildly", 10_000][k % 3]
        obs2, r, term, trunc, info2 = env.step(action)
        assert info2["observation"] == "Nothing happens." and not info2["admissible"]
        assert r == pytest.approx(info["progress"] - 1.0)
        assert info2["admissible_commands"] == info["admissible_commands"]
        assert np.array_equal(obs, obs2) and not term
        assert trunc == (k == 49)


def test_env_delta_progress_sums_to_final_progress(tmp_path, games):
    g = games[(TASK_TYPES[2], 0)]
    env = gym.make("coso_jax/ALFWorld-v0", progress_reward="delta", cache_dir=str(tmp_path))
    _, info = env.reset(options={"game": g})
    start = info["progress"]
    total = 0.0
    for cmd in g.walkthrough:
        _, r, term, _, info = env.step(cmd)
        total += r
    assert term and total == pytest.approx(50.0 + 1.0 - start)


def test_env_registration_and_interface():
    assert envs.env_id("alfworld") == "coso_jax/ALFWorld-v0"
    assert gym.spec("coso_jax/ALFWorld-v0").max_episode_steps == 50
    ti = envs.text_interface("ALFWorld-v0")
    assert isinstance(ti, ALFWorldText) and ti.num_labels == len(VERBS) and ti.invalid_penalty == 0.0


# ----------------------------------------------------------------------------- text interface

CMDS = ["go to cabinet 1", "go to cabinet 10", "go to countertop 1", "take apple 1 from countertop 1",
        "take apple 10 from countertop 1", "open fridge 1", "look", "inventory", "examine countertop 1",
        "heat apple 1 with microwave 1", "use desklamp 1", "move apple 1 to fridge 1"]

PARSE_TABLE = [
    ('{"thoughts": "go", "action": "go to cabinet 1"}', "go to cabinet 1"),
    ('{"thoughts": "go", "action": "go to cabinet 10"}', "go to cabinet 10"),
    ('"ACTION": "Go To Cabinet 1"', "go to cabinet 1"),
    ('"action":"go  to\ncabinet 1"', "go to cabinet 1"),
    ('"action": "go to cabinet 12"', None),                      # not a whole-word match
    ('"action": "go to cabinet 1x"', None),
    ('"action": "xgo to cabinet 1"', None),
    ('I could "look" or "inventory". "action": "inventory"', "inventory"),  # only after the key
    ('"action": "look", "action": "inventory"', "look"),          # first key, first command
    ('"action": "take apple 10 from countertop 1"', "take apple 10 from countertop 1"),
    ('"action": "take apple 1 from countertop 1 then look"', "take apple 1 from countertop 1"),
    ('"action": "examine countertop 1"', "examine countertop 1"),
    ('"action": "examine countertop"', None),
    ('no key here: go to cabinet 1', None),
    ('"action": ""', None),
    ('', None),
    ('"action": "use desklamp 1"', "use desklamp 1"),
    ('"action": "dance"', None),
]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_table(text, expected):
    ti = ALFWorldText()
    p = ti.parse(text, info={"admissible_commands": CMDS})
    if expected is None:
        assert not p.valid and p.action == INADMISSIBLE and p.label is None and p.matched is None
    else:
        assert p.valid and p.matched == expected and CMDS[p.action] == expected
        assert p.label == VERBS.index(expected.split()[0]) == ti.action_label(p)


def test_verb_labels_and_random_invalid_mode():
    assert verb_label("go to cabinet 1") == VERBS.index("go")
    assert verb_label("move apple 1 to fridge 1") == VERBS.index("move")
    assert verb_label("") is None and verb_label("dance") is None
    ti = ALFWorldText(InvalidActionPolicy(mode="random"))
    rng = np.random.default_rng(0)
    seen = {ti.parse("nothing", rng, admissible=CMDS).action for _ in range(200)}
    assert seen == set(range(len(CMDS)))
    assert ti.parse("nothing", rng, admissible=[]).action == INADMISSIBLE


def test_spans_and_prompt():
    ti = ALFWorldText()
    text = '{"thoughts": "the apple is on the counter", "action": "go to countertop 1"}'
    sp = ti.spans(text)
    assert text[sp.action[0]:].startswith('"action":') and sp.thought == (0, sp.action[0])
    info = {"task": "put a hot apple in fridge", "observation": "You arrive at countertop 1.",
            "admissible_commands": CMDS}
    for cot in (True, False):
        pr = ti.prompt(info, cot=cot)
        assert info["task"] in pr and all(c in pr for c in CMDS) and ('"thoughts"' in pr) == cot
    assert info["task"] in ti.prompt(info, brief=True)


def test_parse_fuzz_never_raises():
    ti = ALFWorldText()
    rng = np.random.default_rng(123)
    alphabet = list('abcdefghijklmnopqrstuvwxyz0123456789 "{}:,\n\t') + ["action", '"action":', "go to", "cabinet 1",
                                                                        "\u0130", "\x00", "apple 1", "é"]
    valid = 0
    for k in range(10_000):
        n = int(rng.integers(0, 30))
        text = "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))
        cmds = CMDS if k % 3 else [text[:8], "", "look"]
        p = ti.parse(text if k % 97 else None, info={"admissible_commands": cmds})
        if p.valid:
            valid += 1
            assert cmds[p.action] == p.matched and p.label == verb_label(p.matched)
        else:
            assert p.action == INADMISSIBLE
    assert valid > 0


# ----------------------------------------------------------------------------- demonstrations

def test_demos_replay_and_parse(tmp_path, games):
    from coso_jax.envs.alfworld import demos

    for (t, s), g in games.items():  # fill the cache so the demos do not generate again
        path = pools.game_path(s, t, "train", str(tmp_path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(g.to_json())
    kw = dict(pool_size=SEEDS_PER_TYPE, imperfect_frac=0.3, cache_dir=str(tmp_path))
    recs = list(demos.generate(12, seed=3, **kw))
    assert recs == list(demos.generate(12, seed=3, **kw))
    ti = ALFWorldText()
    episodes = []
    for r in recs:
        if r["step"] == 0:
            episodes.append([])
        episodes[-1].append(r)
        answer = json.loads(r["answer"])
        assert answer["action"] == r["action"] and answer["thoughts"]
        admissible = r["prompt"].split("Commands you can give now: ")[1].split(".\nReply")[0]
        p = ti.parse(r["answer"], admissible=json.loads("[" + admissible + "]"))
        assert p.valid and p.matched == r["action"]
    assert any(r["imperfect"] for r in recs) and not all(r["imperfect"] for r in recs)
    assert len(episodes) == 12
    for ep in episodes:
        _, t, s = ep[0]["game"].split("/")
        g = games[(t, int(s))]
        assert all(r["game"] == ep[0]["game"] for r in ep)
        assert [r["action"] for r in ep if not r["imperfect"]] == list(g.walkthrough)
        assert ep[-1]["reward"] == pytest.approx(51.0) and [r["step"] for r in ep] == list(range(len(ep)))
