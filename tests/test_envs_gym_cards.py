"""gym_cards envs: registration, rules (hand-written episodes with exact rewards), seeding,
env_checker, vector envs, rendering."""
from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import coso_jax.envs as envs
from coso_jax.envs.gym_cards import render as R
from coso_jax.envs.gym_cards.blackjack import BlackjackEnv
from coso_jax.envs.gym_cards.formula import FormulaError, evaluate
from coso_jax.envs.gym_cards.numberline import NumberLineEnv
from coso_jax.envs.gym_cards.points import EZPOINTS_ACTIONS, POINTS24_ACTIONS, EZPointsEnv, Points24Env

GAMES = ["NumberLine", "EZPoints", "Points24", "Blackjack"]
NUM_ACTIONS = {"NumberLine": 2, "EZPoints": 13, "Points24": 17, "Blackjack": 2}


def ez(token: str) -> int:
    return EZPOINTS_ACTIONS.index(token)


def p24(token: str) -> int:
    return POINTS24_ACTIONS.index(token)


def play(env, actions):
    """Steps `actions`; returns the list of (reward, terminated, truncated)."""
    out = []
    for a in actions:
        _, r, term, trunc, _ = env.step(a)
        out.append((r, term, trunc))
    return out


# --- registration, spaces, checker -----------------------------------------------------------
@pytest.mark.parametrize("name", GAMES)
def test_registered_and_spaces(name):
    env = gym.make(f"coso_jax/{name}-v0")
    obs, info = env.reset(seed=3)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert env.action_space.n == NUM_ACTIONS[name]
    assert isinstance(info, dict) and info
    assert env.spec.max_episode_steps == 300
    assert envs.text_interface(name).num_actions == NUM_ACTIONS[name]
    assert envs.env_id(name.lower()) == f"coso_jax/{name}-v0"
    env.close()


@pytest.mark.parametrize("name", GAMES)
def test_env_checker(name):
    env = gym.make(f"coso_jax/{name}-v0", render_mode="rgb_array").unwrapped
    check_env(env, skip_render_check=False)


def test_unknown_env_name_is_named_in_error():
    with pytest.raises(ValueError, match="NoSuchGame"):
        envs.text_interface("NoSuchGame")


@pytest.mark.parametrize("name", GAMES)
def test_illegal_action_raises_clear_error(name):
    env = gym.make(f"coso_jax/{name}-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(NUM_ACTIONS[name])


# --- seeding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GAMES)
def test_seeded_episodes_reproduce(name):
    def run(seed):
        env = gym.make(f"coso_jax/{name}-v0")
        obs, info = env.reset(seed=seed)
        act_rng = np.random.default_rng(123)
        trace = [(obs.copy(), repr(info))]
        for _ in range(40):
            obs, r, term, trunc, info = env.step(int(act_rng.integers(env.action_space.n)))
            trace.append((obs.copy(), repr(info), r, term, trunc))
            if term or trunc:
                obs, info = env.reset()
                trace.append((obs.copy(), repr(info)))
        return trace

    a, b = run(11), run(11)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
    firsts = {repr(gym.make(f"coso_jax/{name}-v0").reset(seed=s)[1]) for s in range(20)}
    assert len(firsts) > 3, "different seeds should deal different starts"


def test_sync_vector_env():
    for name in GAMES:
        vec = gym.vector.SyncVectorEnv([lambda n=name: gym.make(f"coso_jax/{n}-v0") for _ in range(3)])
        obs, infos = vec.reset(seed=[1, 2, 3])
        assert obs.shape == (3, 300, 300, 3) and obs.dtype == np.uint8
        for _ in range(30):
            obs, rew, term, trunc, infos = vec.step(vec.action_space.sample())
            assert obs.shape == (3, 300, 300, 3) and rew.shape == (3,)
        vec.close()


# --- NumberLine --------------------------------------------------------------------------------
def nl_env(current, target):
    env = NumberLineEnv()
    env.reset(seed=0)
    env.position, env.target, env.steps_made = current, target, 0
    return env


def test_numberline_episode_with_wall_bump():
    env = nl_env(0, 2)
    # "-" at the wall: distance unchanged -> -1; then "+" (closer, 0) and "+" (reached, +1).
    assert play(env, [0, 1, 1]) == [(-1.0, False, False), (0.0, False, False), (1.0, True, False)]
    assert env.position == 2


def test_numberline_wrong_way_and_truncation():
    env = nl_env(2, 5)
    assert play(env, [0]) == [(-1.0, False, False)]  # away from the target
    env = nl_env(0, 5)
    results = play(env, [0] * 10)
    assert results[:9] == [(-1.0, False, False)] * 9
    assert results[9] == (-1.0, False, True)  # 10 steps = 2 * max_position -> truncated


def test_numberline_upper_wall_and_info():
    env = nl_env(5, 3)
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc) == (-1.0, False, False) and info == {"target": 3, "current": 5}


def test_numberline_reset_never_starts_on_target():
    env = NumberLineEnv()
    pairs = set()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        assert 0 <= info["current"] <= 5 and 0 <= info["target"] <= 5
        assert info["current"] != info["target"]
        pairs.add((info["current"], info["target"]))
    assert len(pairs) >= 25


def test_numberline_image_shows_state():
    env = nl_env(1, 4)
    a = env.render()
    env.position = 2
    b = env.render()
    assert not np.array_equal(a, b)
    assert a[0, 0].tolist() == [255, 255, 255] and a.min() == 0  # black text on white


# --- EZPoints ----------------------------------------------------------------------------------
def test_ezpoints_product_with_card_used_twice():
    env = EZPointsEnv()
    env.reset(seed=0)
    env.set_state([2, 6])
    results = play(env, [ez("2"), ez("2"), ez("*"), ez("6"), ez("=")])
    # the second "2" is refused (-1) and leaves a blank token; "2 *6" still makes 12 -> +10
    assert results == [(0.0, False, False), (-1.0, False, False), (0.0, False, False),
                       (0.0, False, False), (10.0, True, False)]
    assert env.formula == ["2", " ", "*", "6"]


def test_ezpoints_wrong_value_unused_card_and_truncation():
    env = EZPointsEnv()
    env.reset(seed=0)
    env.set_state([3, 9])
    assert play(env, [ez("3"), ez("*"), ez("9"), ez("=")])[-1] == (-1.0, True, False)  # 27
    env.set_state([3, 9])
    assert play(env, [ez("3"), ez("+"), ez("=")])[-1] == (-1.0, True, False)  # a card unused
    env.set_state([3, 9])
    assert play(env, [ez("=")]) == [(-1.0, True, False)]  # empty formula
    env.set_state([3, 9])
    env.step(ez("3")); env.step(ez("+")); env.step(ez("9"))
    assert env.step(ez("="))[1] == 10.0
    env.set_state([3, 9])
    results = play(env, [ez("+")] * 7)
    assert results[:6] == [(0.0, False, False)] * 6 and results[6] == (-1.0, False, True)


def test_ezpoints_deals_always_solvable():
    env = EZPointsEnv()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        a, b = info["numbers"]
        assert a + b == 12 or a * b == 12
        assert all(2 <= v <= 10 for v in info["numbers"])
        assert all(len(c) in (2, 3) and c[-1] in "CDHS" for c in info["cards"])


# --- Points24 ----------------------------------------------------------------------------------
def run_formula(env, ranks, tokens):
    env.set_state(ranks)
    return play(env, [p24(t) for t in tokens] + [p24("=")])


def test_points24_division_and_parentheses():
    env = Points24Env()
    env.reset(seed=0)
    # 8 / (3 - 8 / 3) = 24 exactly (Python floats would say 23.999999999999986)
    assert run_formula(env, [8, 3, 8, 3], "8 / ( 3 - 8 / 3 )".split())[-1] == (10.0, True, False)
    assert run_formula(env, [1, 2, 3, 4], "( 1 + 2 + 3 ) * 4".split())[-1] == (10.0, True, False)
    assert run_formula(env, [1, 2, 3, 4], "1 + 2 + 3 * 4".split())[-1] == (-1.0, True, False)
    assert run_formula(env, [4, 4, 10, 10], "( 10 * 10 - 4 ) / 4".split())[-1] == (10.0, True, False)
    # face cards count 10 (K, Q -> 10); all four cards must be used
    assert run_formula(env, [13, 12, 2, 2], "10 + 10 + 2 * 2".split())[-1] == (10.0, True, False)
    assert run_formula(env, [13, 12, 2, 4], "10 + 10 + 4".split())[-1] == (-1.0, True, False)


def test_points24_bad_formulas_give_minus_one():
    env = Points24Env()
    env.reset(seed=0)
    assert run_formula(env, [5, 5, 3, 3], "5 / ( 3 - 3 ) * 5".split())[-1] == (-1.0, True, False)
    assert run_formula(env, [5, 5, 3, 3], "( 5 ) ( 3 ) 5 3".split())[-1] == (-1.0, True, False)
    assert run_formula(env, [5, 5, 3, 3], "( ) 5 5 3 3".split())[-1] == (-1.0, True, False)
    # Python-eval quirks kept: adjacent numbers concatenate ("24*1*1") ...
    assert run_formula(env, [2, 4, 1, 1], "2 4 * 1 * 1".split())[-1] == (10.0, True, False)
    # ... but a power tower is refused instead of computed
    start = time.perf_counter()
    assert run_formula(env, [10, 10, 10, 10], "10 * * 10 * * 10 * * 10".split())[-1] == (-1.0, True, False)
    assert time.perf_counter() - start < 1.0


def test_points24_refused_number_and_truncation():
    env = Points24Env()
    env.reset(seed=0)
    env.set_state([1, 2, 3, 4])
    assert play(env, [p24("5")]) == [(-1.0, False, False)]
    assert env.formula == [" "] and env.used == []
    env.set_state([1, 2, 3, 4])
    results = play(env, [p24("(")] * 22)
    assert results[:21] == [(0.0, False, False)] * 21 and results[21] == (-1.0, False, True)


def test_points24_deals_are_uniform_ranks():
    env = Points24Env()
    seen = np.zeros(14, int)
    for seed in range(400):
        _, info = env.reset(seed=seed)
        assert len(info["numbers"]) == 4 and all(1 <= v <= 10 for v in info["numbers"])
        for c in info["cards"]:
            seen[R.RANKS.index(c[:-1]) + 1] += 1
    assert (seen[1:] > 60).all()  # 1600 cards over 13 ranks (~123 each)


def test_formula_evaluator():
    assert evaluate(["8", "/", "(", "3", "-", "8", "/", "3", ")"]) == 24
    assert evaluate(list("2*-3")) == -6
    assert evaluate(list("7//2")) == 3
    for bad in ([], [" "], list("()"), list("5+"), list("(5)(3)"), list("2**999"), list("5/0"), ["x"]):
        with pytest.raises(FormulaError):
            evaluate(bad)


# --- Blackjack ---------------------------------------------------------------------------------
def bj_env(dealer, player, draws=()):
    env = BlackjackEnv()
    env.reset(seed=0)
    env.dealer = [list(c) for c in dealer]
    env.player = [list(c) for c in player]
    queue = [list(c) for c in draws]
    if draws:
        env._draw = lambda: queue.pop(0)
    return env


AS, KS, QD, TEN = [1, "A", "S"], [10, "K", "S"], [10, "Q", "D"], [10, "J", "H"]


def c(v, s="C"):
    return [v, str(v), s]


def test_blackjack_natural_has_no_bonus():
    env = bj_env([KS, c(7)], [AS, QD])
    assert env._info()["player_sum"] == 21 and env._info()["usable_ace"] is True
    _, r, term, trunc, _ = env.step(0)
    assert (r, term, trunc) == (1.0, True, False)
    env = bj_env([AS, KS], [AS, QD])  # both natural -> draw
    assert env.step(0)[1] == 0.0


def test_blackjack_hit_bust_and_soft_hand():
    env = bj_env([KS, c(7)], [KS, c(6)], draws=[c(9)])
    assert env.step(1)[1:4] == (-1.0, True, False)
    env = bj_env([KS, c(7)], [AS, c(5)], draws=[TEN])
    _, r, term, _, info = env.step(1)
    assert (r, term) == (0.0, False) and info["player_sum"] == 16 and info["usable_ace"] is False


def test_blackjack_dealer_rules():
    env = bj_env([c(6), TEN], [TEN, c(10)], draws=[c(5)])  # dealer 16 draws to 21, player 20 loses
    assert env.step(0)[1] == -1.0 and len(env.dealer) == 3
    env = bj_env([AS, c(6)], [TEN, c(8)])  # dealer stands on soft 17; player 18 wins
    assert env.step(0)[1] == 1.0 and len(env.dealer) == 2
    env = bj_env([TEN, c(6)], [TEN, c(2)], draws=[KS])  # dealer busts
    assert env.step(0)[1] == 1.0
    env = bj_env([TEN, c(8)], [TEN, c(8)])  # push
    assert env.step(0)[1] == 0.0


def test_blackjack_draws_faces_for_tens():
    env = BlackjackEnv()
    ranks = set()
    for seed in range(200):
        _, info = env.reset(seed=seed)
        for v, rank, suit in info["dealer_cards"] + info["player_cards"]:
            assert suit in "CDHS"
            assert (rank in "JQK") if v == 10 else (rank == ("A" if v == 1 else str(v)))
            ranks.add(rank)
    assert "10" not in ranks and {"J", "Q", "K", "A"} <= ranks


def test_blackjack_many_cards_render():
    env = bj_env([KS, c(7)], [AS, AS, AS, AS, c(2), c(2), c(2), c(2), c(3), c(3)])
    obs = env.render()
    assert obs.shape == (300, 300, 3)
    assert not np.array_equal(obs, bj_env([KS, c(7)], [AS, AS]).render())


# --- rendering ---------------------------------------------------------------------------------
def test_card_images_are_cached_and_distinct():
    a = R.card_face("Q", "H", 67, 93)
    assert a is R.card_face("Q", "H", 67, 93)
    assert a.shape == (93, 67, 3) and not a.flags.writeable
    faces = {R.card_face(r, s, 67, 93).tobytes() for r in R.RANKS for s in R.SUITS}
    assert len(faces) == 52
    red = R.card_face("5", "H", 70, 98).astype(int)
    assert ((red[..., 0] - red[..., 1]) > 80).any()  # red suit ink
    with pytest.raises(ValueError, match="rank"):
        R.card_face("11", "H", 67, 93)


@pytest.mark.parametrize("name", GAMES)
def test_observations_change_with_state(name):
    env = gym.make(f"coso_jax/{name}-v0")
    obs0, _ = env.reset(seed=5)
    env2 = gym.make(f"coso_jax/{name}-v0")
    different = any(not np.array_equal(obs0, env2.reset(seed=s)[0]) for s in range(6, 10))
    assert different


@pytest.mark.parametrize("name", GAMES)
def test_env_state_pickles_and_resumes(name):
    """The trainer checkpoints running episodes by pickling the unwrapped env's state."""
    import pickle

    env = gym.make(f"coso_jax/{name}-v0").unwrapped
    env.reset(seed=1)
    env.step(1)
    state = pickle.loads(pickle.dumps(env.__getstate__()))
    other = gym.make(f"coso_jax/{name}-v0").unwrapped
    other.reset(seed=2)
    other.__dict__.update(state)
    a, b = env.step(0), other.step(0)
    assert np.array_equal(a[0], b[0]) and a[1:4] == b[1:4] and repr(a[4]) == repr(b[4])
