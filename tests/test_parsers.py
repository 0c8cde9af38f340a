"""Text interfaces: prompts, the RL4VLM parsing rule (table + fuzz), invalid-action policies, spans."""
from __future__ import annotations

import numpy as np
import pytest

from coso_jax.envs import InvalidActionPolicy, ParsedAction, text_interface
from coso_jax.envs.base import action_spans

GAMES = ["NumberLine", "EZPoints", "Points24", "Blackjack"]


def act(text: str) -> str:
    return '{"thoughts": "some reasoning", "action": "' + text + '"}'


# (text, expected action name or None for invalid)
TABLE = {
    "NumberLine": [
        (act("+"), "+"),
        (act("-"), "-"),
        ('{"current number": "3", "target number": "5", "thoughts": "3 - 1 < 5", "action": "+"}', "+"),
        (act("+-"), None),  # two actions
        (act("up"), None),  # none
        ('"ACTION": "-"', "-"),  # the key is matched case-insensitively
        ('{"action" : "+"}', None),  # not the key (space before the colon)
        ("the answer is +", None),  # no key at all
        ('"action": "+"} then "action": "-"', None),  # everything after the FIRST key counts
        ('{"action": "+"', "+"),  # unterminated JSON is fine
        ("", None),
    ],
    "Blackjack": [
        (act("hit"), "hit"),
        (act("Stand"), "stand"),
        (act("HIT"), "hit"),
        (act("hit or stand"), None),
        (act("white"), "hit"),  # the reference's substring rule: "white" contains "hit"
        (act("double"), None),
        ('{"thoughts": "I could hit", "action": "stand"}', "stand"),
    ],
    "EZPoints": [
        (act("10"), "10"),  # "10" is taken first, so "1" and "0" do not count
        (act("12"), None),  # "1" and "2"
        (act("1"), "1"),
        (act("100"), "10"),  # the reference removes every "10" before the other names
        (act("="), "="),
        (act("*"), "*"),
        (act("+"), "+"),
        (act("-"), None),  # not an EZPoints action
        (act("10 +"), None),
        ('{"cards": [2, 10], "formula": "2 *", "thoughts": "2 * 6 = 12", "action": "6"}', "6"),
    ],
    "Points24": [
        (act("("), "("),
        (act(")"), ")"),
        (act("/"), "/"),
        (act("-"), "-"),
        (act("-1"), None),
        (act("10"), "10"),
        (act("7"), "7"),
        (act("()"), None),
        ('{"cards": [1, 2, 3, 4], "formula": "( 1 + 2", "thoughts": "...", "action": "+"}', "+"),
    ],
}


@pytest.mark.parametrize("name", GAMES)
def test_parse_table(name):
    iface = text_interface(name)
    rng = np.random.default_rng(0)
    for text, expected in TABLE[name]:
        parsed = iface.parse(text, rng)
        assert isinstance(parsed, ParsedAction)
        assert 0 <= parsed.action < iface.num_actions, text
        if expected is None:
            assert not parsed.valid and parsed.label is None and parsed.matched is None, text
            assert iface.action_label(parsed) is None
        else:
            idx = iface.action_names.index(expected)
            assert parsed.valid and parsed.action == idx and parsed.matched == expected, text
            assert iface.action_label(parsed) == idx == parsed.label


@pytest.mark.parametrize("name", GAMES)
def test_interface_shape_and_prompts(name):
    import gymnasium as gym

    iface = text_interface(f"coso_jax/{name}-v0")
    assert iface.name == name
    assert iface.label_names == iface.action_names and iface.num_labels == iface.num_actions
    _, info = gym.make(f"coso_jax/{name}-v0").reset(seed=0)
    cot, plain = iface.prompt(info, cot=True), iface.prompt(info, cot=False)
    assert "<image>" not in cot
    assert '"thoughts"' in cot and '"action"' in cot
    assert '"thoughts"' not in plain and '"action"' in plain
    assert cot.index('"thoughts"') < cot.rindex('"action"')
    for action in iface.action_names:
        assert f'"{action}"' in cot or action.isdigit()  # every legal action is listed


def test_points_prompt_shows_formula():
    import gymnasium as gym

    env = gym.make("coso_jax/Points24-v0")
    _, info = env.reset(seed=0)
    for tok in ("(", "+"):
        _, _, _, _, info = env.step(text_interface("Points24").action_names.index(tok))
    prompt = text_interface("Points24").prompt(info)
    assert 'Formula so far: "( +"' in prompt


def test_invalid_policy_random_is_uniform_and_seeded():
    iface = text_interface("Points24")
    a = [iface.parse("garbage", np.random.default_rng(7)).action for _ in range(3)]
    assert len(set(a)) == 1  # same generator state -> same fallback
    rng = np.random.default_rng(0)
    counts = np.bincount([iface.parse(act("x"), rng).action for _ in range(3400)], minlength=17)
    assert (counts > 120).all()  # ~200 each
    assert iface.invalid_penalty == 0.0


def test_invalid_policy_penalty():
    policy = InvalidActionPolicy(mode="penalty", fallback_action=1, penalty=-2.0)
    iface = text_interface("Blackjack", invalid_policy=policy)
    parsed = iface.parse("no answer", None)
    assert parsed == ParsedAction(action=1, valid=False, label=None, matched=None)
    assert iface.invalid_penalty == -2.0
    assert iface.parse(act("stand"), None).action == 0
    with pytest.raises(ValueError, match="fallback_action"):
        text_interface("NumberLine", invalid_policy=InvalidActionPolicy("penalty", fallback_action=5))
    with pytest.raises(ValueError, match="mode"):
        InvalidActionPolicy(mode="ignore")


def test_non_string_input_never_raises():
    iface = text_interface("NumberLine")
    for bad in (None, 3, b'"action": "+"', ["x"]):
        parsed = iface.parse(bad, np.random.default_rng(0))
        assert 0 <= parsed.action < 2
        spans = iface.spans(bad)
        assert spans.thought[0] == 0


def test_spans():
    text = '{"thoughts": "go up", "action": "+"}'
    k = text.index('"action":')
    spans = action_spans(text)
    assert spans.thought == (0, k) and spans.action == (k, len(text))
    two = '{"action": "-", "thoughts": "no", "Action": "+"}'
    assert action_spans(two).action == (two.rindex('"Action":'), len(two))  # the LAST key
    assert action_spans("plain").thought == (0, 5) and action_spans("plain").action == (5, 5)
    assert action_spans("") == action_spans("")  # no error
    assert action_spans("").action == (0, 0)


# --- fuzz -----------------------------------------------------------------------------------------
def reference_matches(text: str, names: tuple[str, ...], ten_first: bool) -> list[str]:
    """An independent implementation of the RL4VLM rule (plus: no key -> no match)."""
    low = text.lower()
    pos = low.find('"action":')
    if pos < 0:
        return []
    s = low[pos:]
    found = []
    if ten_first and "10" in s:
        found.append("10")
        s = s.replace("10", "")
    for n in names:
        if n.lower() in s and n not in found:
            found.append(n)
    return found


PIECES = ['"action":', '"ACTION":', '"Action": ', '"action" :', "action", '"', "'", "\\\"", "{", "}",
          "[", "]", ":", ",", " ", "\n", "\t", "10", "100", "1", "0", "+", "-", "*", "/", "(", ")", "=",
          "hit", "stand", "HIT", "Stand", "white", "thoughts", "\u0130", "\u212a", "\u0131", "\x00",
          "\ud800", "\U0001f600", "\u200b", "é", "ß", "ﬁ", "Σ", "=\"=", '"action": "10"', "null"]


def fuzz_strings(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = ["", " ", '"action":', '"action": ""', '"action":' * 50, "\\" * 100, '"' * 1000,
           '"action": "' + "+" * 100_000 + '"', "x" * 300_000 + '"action": "hit"',
           '{"thoughts": "' + '\\"action\\": \\"-\\"' * 20 + '", "action": "+"}']
    while len(out) < n:
        kind = rng.integers(4)
        if kind == 0:  # random code points anywhere in Unicode (surrogates included)
            length = int(rng.integers(0, 60))
            out.append("".join(chr(int(c)) for c in rng.integers(0, 0x110000, size=length)))
        elif kind == 1:  # structured pieces
            length = int(rng.integers(1, 25))
            out.append("".join(PIECES[int(i)] for i in rng.integers(0, len(PIECES), size=length)))
        elif kind == 2:  # printable ASCII noise around a key
            noise = "".join(chr(int(c)) for c in rng.integers(32, 127, size=int(rng.integers(0, 40))))
            cut = int(rng.integers(0, len(noise) + 1))
            out.append(noise[:cut] + '"action": ' + noise[cut:])
        else:  # nested JSON-looking answers with several action keys
            keys = int(rng.integers(1, 4))
            vals = [PIECES[int(i)] for i in rng.integers(0, len(PIECES), size=keys)]
            out.append("{" + ", ".join(f'"action": "{v}"' for v in vals) + "}")
    return out[:n]


@pytest.mark.parametrize("name", GAMES)
def test_parse_fuzz(name):
    iface = text_interface(name)
    rng = np.random.default_rng(1)
    ten_first = name in ("EZPoints", "Points24")
    texts = fuzz_strings(10_000, seed=GAMES.index(name))
    n_valid = 0
    for text in texts:
        parsed = iface.parse(text, rng)
        assert 0 <= parsed.action < iface.num_actions and isinstance(parsed.action, int)
        expected = reference_matches(text, iface.action_names, ten_first)
        assert parsed.valid == (len(expected) == 1), repr(text[:200])
        if parsed.valid:
            n_valid += 1
            assert iface.action_names[parsed.action] == expected[0] == parsed.matched
            assert parsed.label == parsed.action
        else:
            assert parsed.label is None
        spans = iface.spans(text)
        (ts, te), (a0, a1) = spans.thought, spans.action
        assert ts == 0 and te == a0 and a1 == len(text) and 0 <= a0 <= a1
        if a0 < a1:
            assert text[a0:a0 + 9].lower() == '"action":'
    assert 500 < n_valid < 9_500  # the fuzz exercises both outcomes


# --- one parse protocol for every env family -------------------------------------------------
def _all_interfaces():
    from coso_jax.envs.web import text_interface as web_text_interface

    return [text_interface(n) for n in GAMES] + [text_interface("ALFWorld"), web_text_interface()]


def test_every_parse_has_the_protocol_signature():
    """`parse(text, rng=None, info=None)`: the same three leading positional parameters everywhere."""
    import inspect

    for iface in _all_interfaces():
        params = list(inspect.signature(iface.parse).parameters.values())
        assert [p.name for p in params[:3]] == ["text", "rng", "info"], type(iface).__name__
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:3])
        assert params[1].default is None and params[2].default is None
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])


def test_every_parse_takes_info_positionally_and_never_raises():
    rng = np.random.default_rng(0)
    alf_info = {"admissible_commands": ["go to desk 1", "look"]}
    for iface in _all_interfaces():
        name = type(iface).__name__
        info = alf_info if name == "ALFWorldText" else {"anything": 1}
        for text in (None, "", "garbage", 7, '{"action": "look"}', "\ud800", '"action": "hit"'):
            parsed = iface.parse(text, rng, info)
            assert isinstance(parsed, ParsedAction), name
            if not parsed.valid:
                assert parsed.label is None and parsed.matched is None, name
        if iface.invalid_policy.mode == "penalty":  # no random fallback: rng may be None
            assert not iface.parse("garbage", None, info).valid
    # info is what makes an ALFWorld answer valid; gym_cards ignore it
    alf = text_interface("ALFWorld")
    assert alf.parse('{"action": "look"}', None, alf_info).action == 1
    assert not alf.parse('{"action": "look"}', None, None).valid
    nl = text_interface("NumberLine")
    assert nl.parse(act("+"), None, {"target": 3}) == nl.parse(act("+"), None)
