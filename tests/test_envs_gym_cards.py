"""gym_cards envs: registration, rules (hand-written episodes with exact rewards), seeding,
env_checker, vector envs, rendering, and parity with the RL4VLM reference (docs/deviations.md)."""
from __future__ import annotations

import time
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils import seeding
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
    # Shared with the reference, whose reset() applies the same fix (not only its __init__).
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
    for token in ("3", "+", "9"):
        env.step(ez(token))
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
def bj_env(dealer, player, draws=(), **kwargs):
    env = BlackjackEnv(**kwargs)
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


# --- parity with the RL4VLM reference (docs/deviations.md) -----------------------------------
def reference_points_reward(numbers, tokens, target):
    """The reference's reward for pressing "=", transcribed from reference_envs.md §1.2 step 3
    (§1.3: the same for Points24): Python `eval` of the tokens joined without separators,
    +10 if the value == target else -1, -1 if eval raises, and -1 unless every card was used.
    Independent of coso_jax; only ever given the fixed literal formulas below."""
    used = [int(t) for t in tokens if t.isdigit()]
    assert sorted(used) == sorted(numbers)  # the formulas below use each card once
    try:
        reward = 10.0 if eval("".join(tokens), {"__builtins__": {}}, {}) == target else -1.0
    except Exception:
        reward = -1.0
    return reward if len(used) == len(numbers) else -1.0


def points_reward(env_name, ranks, tokens, **kwargs):
    """Our reward for entering `tokens` then "=" on a hand-set deal (env built by gym.make with kwargs)."""
    env = gym.make(f"coso_jax/{env_name}-v0", **kwargs).unwrapped
    env.reset(seed=0)
    env.set_state(ranks)
    actions = env.action_names
    results = play(env, [actions.index(t) for t in tokens] + [actions.index("=")])
    assert results[:-1] == [(0.0, False, False)] * len(tokens) and results[-1][1:] == (True, False)
    return results[-1][0]


# Issue #22 item 5: a power with a non-integer exponent. Upstream (float eval): +10 for both.
# Ours by default: such an exponent is refused, so the formula fails (-1).
FRACTIONAL_POWER_CASES = [([4, 3, 2, 3], "4 * * ( 3 / 2 ) * 3", Fraction(3, 2)),
                          ([9, 2, 8, 1], "9 * * ( 1 / 2 ) * 8", Fraction(1, 2))]


@pytest.mark.parametrize("ranks,formula,exponent", FRACTIONAL_POWER_CASES)
def test_points24_fractional_power_reference_and_default(ranks, formula, exponent):
    tokens = formula.split()
    upstream = reference_points_reward(ranks, tokens, 24)
    assert upstream == 10.0  # the upstream number (4 ** 1.5 * 3 == 24.0, 9 ** 0.5 * 8 == 24.0)
    ours_default = -1.0 if exponent.denominator != 1 else None  # our rule: non-integer exponent -> refused
    assert points_reward("Points24", ranks, tokens) == ours_default
    assert points_reward("Points24", ranks, tokens, allow_fractional_powers=False) == ours_default
    assert points_reward("Points24", ranks, tokens, allow_fractional_powers=True) == upstream


def test_points24_fractional_powers_match_reference_eval():
    """With allow_fractional_powers=True, every formula holding a fractional power scores as upstream
    (including negative bases, whose float power is complex, and near-misses of 24)."""
    templates = ["a * * ( b / c ) * d", "a * * ( b / c ) + d", "( a - b ) * * ( c / d )",
                 "d / a * * ( b / c )", "( a + d ) * * ( b / c )", "a * * ( b / c ) - d"]
    rng = np.random.default_rng(0)
    checked = wins = 0
    for _ in range(400):
        template = templates[int(rng.integers(len(templates)))]
        a, b, c, d = (int(v) for v in rng.integers(1, 11, size=4))
        exponent = Fraction(c, d) if template.startswith("( a - b )") else Fraction(b, c)
        if exponent.denominator == 1:
            continue  # only formulas with a fractional power
        tokens = template.replace("a", str(a)).replace("b", str(b)).replace("c", str(c)).replace("d", str(d)).split()
        upstream = reference_points_reward([a, b, c, d], tokens, 24)
        assert points_reward("Points24", [a, b, c, d], tokens, allow_fractional_powers=True) == upstream, tokens
        assert points_reward("Points24", [a, b, c, d], tokens) == -1.0, tokens
        checked += 1
        wins += upstream > 0
    assert checked > 200 and wins >= 1


def test_points24_exact_division_is_a_kept_difference():
    # Documented improvement: exact fractions for "/" (upstream float eval misses 24 by rounding).
    ranks, tokens = [8, 3, 8, 3], "8 / ( 3 - 8 / 3 )".split()
    assert reference_points_reward(ranks, tokens, 24) == -1.0
    for flag in (False, True):
        assert points_reward("Points24", ranks, tokens, allow_fractional_powers=flag) == 10.0


@pytest.mark.parametrize("flag", [False, True])
def test_ezpoints_shares_the_evaluator(flag):
    """EZPoints has no "/" or parentheses, so its exponents are integers: the keyword changes nothing
    and its rewards equal upstream's for these formulas (concatenation quirk included)."""
    for ranks, formula in (([6, 2], "6 * 2"), ([6, 2], "6 * * 2"), ([1, 2], "1 2"), ([3, 4], "3 * 4"),
                           ([2, 10], "2 * * 10"), ([5, 7], "5 + 7"), ([5, 7], "7 * * 5")):
        tokens = formula.split()
        assert points_reward("EZPoints", ranks, tokens, allow_fractional_powers=flag) == \
            reference_points_reward([min(r, 10) for r in ranks], tokens, 12), formula


def test_formula_evaluator_fractional_powers():
    from coso_jax.envs.gym_cards.formula import FractionalPowerError

    with pytest.raises(FractionalPowerError):
        evaluate("4**(3/2)")
    assert evaluate("4**(3/2)*3", allow_fractional_powers=True) == 24
    assert isinstance(evaluate("(1-3)**(1/2)", allow_fractional_powers=True), complex)
    assert evaluate("8/(3-8/3)", allow_fractional_powers=True) == 24  # no fractional power: still exact
    # float division by zero, a refused integer power inside, complex floor division, float overflow
    for bad in ("2**(1/2)//(1-1)", "10**(1/2)**(10**10)", "(1-3)**(1/2)//2", "(10*10)**(1010/3)"):
        with pytest.raises(FormulaError):
            evaluate(bad, allow_fractional_powers=True)


# Issue #22 item 6: the reference lays player cards 70x98 at x = 5 + 74 k (k = 0..4) from y = 150, then a
# second row at y = 150 + 98 + 4 (reference_envs.md §1.4): the fifth card starts at x = 301, off the image.
REF_X = [5 + 74 * k for k in range(5)]
REF_ROW2_Y = 150 + 98 + 4


def test_blackjack_reference_render_hides_fifth_card():
    assert REF_X[4] >= 300 and REF_ROW2_Y + 98 > 300
    dealer, four, fifth, sixth = [KS, c(7)], [c(2), c(3), c(2, "H"), c(3, "D")], c(4, "H"), c(5, "S")

    def render(hand, reference):
        return bj_env(dealer, hand, reference_render=reference).render()

    # reference setting: the fifth card leaves no pixel on the image ...
    assert np.array_equal(render(four, True), render(four + [fifth], True))
    # ... and a sixth card shows only its top 300 - 252 = 48 rows, at (5, 252)
    six = render(four + [fifth, sixth], True)
    visible = 300 - REF_ROW2_Y
    assert np.array_equal(six[REF_ROW2_Y:, 5:5 + 70], R.card_face("5", "S", 70, 98)[:visible])
    assert np.array_equal(six[:REF_ROW2_Y], render(four, True)[:REF_ROW2_Y])
    # ours (default): the fifth card is drawn
    assert not np.array_equal(render(four, False), render(four + [fifth], False))
    assert not np.array_equal(render(four + [fifth], True), render(four + [fifth], False))
    # up to four cards both layouts agree (x = 5, 79, 153, 227)
    assert np.array_equal(render(four, False), render(four, True))


def test_blackjack_reference_render_is_a_gym_make_kwarg():
    env = gym.make("coso_jax/Blackjack-v0", reference_render=True)
    assert env.unwrapped.reference_render is True
    assert gym.make("coso_jax/Blackjack-v0").unwrapped.reference_render is False
    check_env(env.unwrapped, skip_render_check=True)
    points = gym.make("coso_jax/Points24-v0", allow_fractional_powers=True)
    assert points.unwrapped.allow_fractional_powers is True
    assert gym.make("coso_jax/EZPoints-v0").unwrapped.allow_fractional_powers is False


def test_blackjack_player_card_positions():
    from coso_jax.envs.gym_cards.blackjack import player_card_positions

    assert player_card_positions(7, reference=True) == [(x, 150) for x in REF_X] + [(5, REF_ROW2_Y), (79, REF_ROW2_Y)]
    ours = player_card_positions(7)
    assert all(0 <= x and x + 70 <= 300 and y == 150 for x, y in ours)  # every card fully on the image


# Issue #22 item 7: the reference's reset() draws start and target uniformly from 0..5 and, if they are
# equal, sets target := (target + 1) % 5 (reference_envs.md §1.1) -- at every reset, as ours does.
def test_numberline_reset_applies_the_reference_rule():
    env = NumberLineEnv()
    fixed = 0
    for seed in range(200):
        _, info = env.reset(seed=seed)
        rng, _ = seeding.np_random(seed)  # our stream (the reference's was unseeded `random`)
        start, target = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        if start == target:
            target, fixed = (target + 1) % 5, fixed + 1
        assert (info["current"], info["target"]) == (start, target)
    assert fixed > 10
