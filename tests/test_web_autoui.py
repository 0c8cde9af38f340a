"""AutoUI parser, text interface, browser-command mapping and env logic (no browser needed)."""
from __future__ import annotations

import string
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import coso_jax.envs  # noqa: F401  (gym_cards still imports and registers alongside web)
from coso_jax.envs.base import InvalidActionPolicy
from coso_jax.envs.web import ENV_IDS, env_id, get_suite, task_spec, text_interface
from coso_jax.envs.web.autoui import (
    DECISION_KEY,
    ActionType,
    AutoUIAction,
    BrowserCommand,
    CommandKind,
    decision_spans,
    format_answer,
    format_autoui,
    parse_autoui,
    to_browser_commands,
)
from coso_jax.envs.web.browser import BrowserConfig, BrowserCrashedError, PageState
from coso_jax.envs.web.env import WebControlEnv
from coso_jax.envs.web.suites import SUITES, TEST_SEED_BASE

D = DECISION_KEY


def _autoui(kind: str, touch: str = "[-1.0, -1.0]", lift: str = "[-1.0, -1.0]", text: str = "") -> str:
    return f'{D} "action_type": "{kind}", "touch_point": "{touch}", "lift_point": "{lift}", "typed_text": "{text}"'


# (text, expected ActionType or None for invalid, touch (x, y), lift (x, y), typed text)
TABLE = [
    (_autoui("DUAL_POINT", "[0.5, 0.25]", "[0.5, 0.25]"), ActionType.DualPoint, (0.25, 0.5), (0.25, 0.5), None),
    (_autoui("DUAL_POINT", "[0.8, 0.5]", "[0.2, 0.5]"), ActionType.DualPoint, (0.5, 0.8), (0.5, 0.2), None),
    (_autoui("TYPE", text="hello, world"), ActionType.Type, None, None, "hello, world"),
    (_autoui("TYPE", text='say "hi", then go'), ActionType.Type, None, None, 'say "hi", then go'),
    (_autoui("TYPE", text=""), ActionType.Type, None, None, ""),
    (_autoui("PRESS_BACK"), ActionType.GoBack, None, None, None),
    (_autoui("PRESS_HOME"), ActionType.GoHome, None, None, None),
    (_autoui("PRESS_ENTER"), ActionType.Enter, None, None, None),
    (_autoui("STATUS_TASK_COMPLETE"), ActionType.TaskComplete, None, None, None),
    (_autoui("TASK_IMPOSSIBLE"), ActionType.TaskImpossible, None, None, None),
    # thought before the key, lower-case key and type, no quotes around values, extra spaces
    ("Thought: tap it.\n" + _autoui("DUAL_POINT", "[0.1, 0.2]", "[0.1, 0.2]"), ActionType.DualPoint,
     (0.2, 0.1), (0.2, 0.1), None),
    ('action decision:  "action_type" : dual_point , "touch_point": [ 0.3 , 0.4 ], "lift_point": [0.3,0.4]',
     ActionType.DualPoint, (0.4, 0.3), (0.4, 0.3), None),
    # the LAST key counts
    (_autoui("PRESS_BACK") + "\n" + _autoui("PRESS_ENTER"), ActionType.Enter, None, None, None),
    # fields in another order; type without the other fields
    (f'{D} "typed_text": "abc", "action_type": "TYPE"', ActionType.Type, None, None, "abc"),
    (f'{D} "action_type": "PRESS_ENTER"', ActionType.Enter, None, None, None),
    (_autoui("DUAL_POINT", "[1, 0]", "[1e-1, 1.0]"), ActionType.DualPoint, (0.0, 1.0), (1.0, 0.1), None),
    # invalid
    ("", None, None, None, None),
    ("tap the button", None, None, None, None),
    ('"action_type": "DUAL_POINT", "touch_point": "[0.5, 0.5]", "lift_point": "[0.5, 0.5]"', None, None, None, None),
    (_autoui("CLICK", "[0.5, 0.5]", "[0.5, 0.5]"), None, None, None, None),
    (_autoui("DUAL_POINT"), None, None, None, None),                       # sentinel points
    (_autoui("DUAL_POINT", "[0.5, 0.5]", "[1.5, 0.5]"), None, None, None, None),  # off screen
    (_autoui("DUAL_POINT", "[0.5, nan]", "[0.5, 0.5]"), None, None, None, None),
    (f'{D} "action_type": "DUAL_POINT", "touch_point": "[0.5, 0.5]"', None, None, None, None),
    (f'{D} "action_type": "TYPE"', None, None, None, None),
    (f"{D} ", None, None, None, None),
    (_autoui("DUAL_POINT", "[0.5, 0.5]", "[0.5, 0.5]") + "\n" + D, None, None, None, None),  # empty last key
]


@pytest.mark.parametrize("text,kind,touch,lift,typed", TABLE)
def test_parse_table(text, kind, touch, lift, typed):
    action, valid = parse_autoui(text)
    if kind is None:
        assert not valid and action.action_type is ActionType.Idle
        return
    assert valid and action.action_type is kind
    if touch is not None:
        np.testing.assert_allclose(action.touch_point, touch)
        np.testing.assert_allclose(action.lift_point, lift)
    if typed is not None:
        assert action.typed_text == typed


def test_tap_vs_swipe():
    assert AutoUIAction.tap(0.3, 0.3).is_tap
    assert AutoUIAction.swipe((0.3, 0.3), (0.32, 0.33)).is_tap          # within 0.04
    assert not AutoUIAction.swipe((0.3, 0.3), (0.3, 0.35)).is_tap
    assert not AutoUIAction.type("x").is_tap


@pytest.mark.parametrize("action", [
    AutoUIAction.tap(0.25, 0.5), AutoUIAction.swipe((0.5, 0.8), (0.5, 0.2)), AutoUIAction.type("a, b"),
    *[AutoUIAction(t) for t in (ActionType.GoBack, ActionType.GoHome, ActionType.Enter,
                                ActionType.TaskComplete, ActionType.TaskImpossible)]])
def test_format_roundtrip(action):
    parsed, valid = parse_autoui(format_answer("some thought, with a comma.", action))
    assert valid and parsed == action


def test_format_matches_autoui_layout():
    text = format_autoui(AutoUIAction.tap(0.25, 0.5))
    assert text == (f'{D} "action_type": "DUAL_POINT", "touch_point": "[0.5000, 0.2500]", '
                    '"lift_point": "[0.5000, 0.2500]", "typed_text": ""')
    assert not parse_autoui(format_autoui(AutoUIAction(ActionType.Idle)))[1]  # Idle has no AutoUI name


def _fuzz_strings(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pieces = [D, "action decision:", '"action_type":', '"touch_point":', '"lift_point":', '"typed_text":',
              '"DUAL_POINT"', "TYPE", "PRESS_ENTER", "STATUS_TASK_COMPLETE", "[", "]", ",", '"', ":",
              "0.5", "-1.0", "1e309", "nan", "[0.1, 0.9]", "\n", " ", "\\", "\x00", "\ue006", "é", "💥",
              "Thought:", "{", "}"]
    alphabet = list(string.printable) + ["é", "ß", "\u0130", "\ue000", "😀", "\x00"]
    out = []
    for i in range(n):
        k = int(rng.integers(0, 12))
        if i % 3 == 0:
            out.append("".join(rng.choice(alphabet, size=int(rng.integers(0, 80)))))
        else:
            out.append("".join(pieces[int(j)] for j in rng.integers(0, len(pieces), size=k)))
    base = format_answer("t", AutoUIAction.tap(0.5, 0.5))
    for _ in range(n // 10):  # single-character mutations of a valid answer
        s = list(base)
        j = int(rng.integers(len(s)))
        s[j] = alphabet[int(rng.integers(len(alphabet)))]
        out.append("".join(s))
    return out


def test_fuzz_never_raises():
    iface = text_interface()
    rng = np.random.default_rng(0)
    strings = _fuzz_strings(10_000) + [None, 3, b"bytes"]  # type: ignore[list-item]
    assert len(strings) >= 10_000
    n_valid = 0
    for s in strings:
        action, valid = parse_autoui(s)
        p = iface.parse(s, rng)
        assert p.valid == valid and 0 <= p.action < iface.num_actions
        assert (p.label is None) == (not p.valid)
        if valid:
            assert p.label == int(action.action_type) and p.autoui == action
            if action.action_type is ActionType.DualPoint:
                assert all(0 <= c <= 1 for c in (*action.touch_point, *action.lift_point))
        else:
            assert p.action == int(ActionType.Idle)
        n_valid += valid
        text = s if isinstance(s, str) else ("" if s is None else str(s))
        sp = iface.spans(s)
        assert sp.thought[0] == 0 and sp.thought[1] == sp.action[0] <= sp.action[1] == len(text)
        cmds = to_browser_commands(action, is_draggable=lambda x, y: False)
        assert cmds and all(isinstance(c, BrowserCommand) for c in cmds)
    assert n_valid > 100  # the fuzz does reach valid answers


def test_spans():
    ans = format_answer("I tap OK.", AutoUIAction.tap(0.5, 0.5))
    sp = decision_spans(ans)
    assert ans[sp.thought[0]:sp.thought[1]] == "Thought: I tap OK.\n"
    assert ans[sp.action[0]:sp.action[1]].startswith(D)
    assert decision_spans("no key here").action == (11, 11)
    two = "a Action Decision: x Action Decision: y"
    assert decision_spans(two).action == (two.rindex("Action"), len(two))


def test_interface_protocol_and_policy():
    iface = text_interface()
    assert iface.action_names == ("Idle", "DualPoint", "Type", "GoBack", "GoHome", "Enter", "TaskComplete",
                                  "TaskImpossible")
    assert iface.num_labels == 8 and iface.invalid_penalty == 0.0
    bad = iface.parse("nonsense")
    assert not bad.valid and bad.action == 0 and bad.label is None and iface.action_label(bad) is None
    good = iface.parse(format_answer("t", AutoUIAction.type("abc")))
    assert good.valid and iface.action_label(good) == int(ActionType.Type) and good.matched == "TYPE"
    pen = text_interface(InvalidActionPolicy(mode="penalty", fallback_action=3, penalty=-0.5))
    assert pen.parse("x").action == 3 and pen.invalid_penalty == -0.5
    with pytest.raises(ValueError, match="penalty"):
        text_interface(InvalidActionPolicy(mode="random"))
    with pytest.raises(ValueError, match="without arguments"):
        text_interface(InvalidActionPolicy(mode="penalty", fallback_action=1))


def test_prompt():
    iface = text_interface()
    info = {"goal": 'Click on the "OK" button.', "history": ["tap at [0.50, 0.50]"], "step": 1, "horizon": 10}
    p = iface.prompt(info)
    assert 'Task: Click on the "OK" button.' in p and "1. tap at [0.50, 0.50]" in p
    assert "step 2 of at most 10" in p and "Thought:" in p and D in p and "<image>" not in p
    q = iface.prompt({"goal": "g", "history": []}, cot=False)
    assert "Actions so far: none" in q and "Thought:" not in q
    assert iface.prompt(info, brief=True) == 'Task: Click on the "OK" button.\nDone: tap at [0.50, 0.50]'


# -- mapping to browser commands ----------------------------------------------------------------


def test_mapping_tap_type_keys():
    C = CommandKind
    assert to_browser_commands(AutoUIAction.tap(0.5, 0.25)) == [BrowserCommand(C.CLICK, 80.0, 52.5)]
    assert to_browser_commands(AutoUIAction.type("hi")) == [BrowserCommand(C.TYPE, text="hi")]
    long = to_browser_commands(AutoUIAction.type("x" * 100 + "\ue006\n"))[0]
    assert long.text == "x" * 64                                   # MiniWoB's limit; no key codes
    assert to_browser_commands(AutoUIAction.type("\ue006"))[0].kind is C.NONE
    assert to_browser_commands(AutoUIAction(ActionType.Enter)) == [BrowserCommand(C.KEY, text="<Enter>")]
    for t in (ActionType.Idle, ActionType.GoBack, ActionType.GoHome, ActionType.TaskComplete,
              ActionType.TaskImpossible):
        assert [c.kind for c in to_browser_commands(AutoUIAction(t))] == [C.NONE]


def test_mapping_swipes():
    C = CommandKind
    up = AutoUIAction.swipe((0.5, 0.8), (0.5, 0.3))  # finger moves up by 105 px -> content scrolls down
    cmds = to_browser_commands(up, is_draggable=lambda x, y: False)
    assert [c.kind for c in cmds] == [C.SCROLL_DOWN, C.SCROLL_DOWN] and cmds[0].x == 80.0 and cmds[0].y == 168.0
    down = AutoUIAction.swipe((0.5, 0.3), (0.5, 0.4))
    assert [c.kind for c in to_browser_commands(down)] == [C.SCROLL_UP]
    assert [c.kind for c in to_browser_commands(up, is_draggable=lambda x, y: True)] == [C.MOUSEDOWN, C.MOUSEUP]
    side = to_browser_commands(AutoUIAction.swipe((0.2, 0.5), (0.6, 0.5)))
    assert side == [BrowserCommand(C.MOUSEDOWN, 32.0, 105.0), BrowserCommand(C.MOUSEUP, 96.0, 105.0)]


# -- env logic against a fake page ----------------------------------------------------------------


class FakePage:
    """A page with one target button at CSS (80, 100): clicking it solves the task, any other click on
    the lower half fails it; everything else does nothing."""

    def __init__(self, task, config, data_mode):
        self.alive = True
        self.config = config
        self.done = False
        self.raw = 0.0
        self.log: list[BrowserCommand] = []
        self.crash_on_step = False
        self.launches = FakePage.launches = getattr(FakePage, "launches", 0) + 1

    def reset(self, seed):
        self.done, self.raw = False, 0.0
        return PageState(utterance=f"Click the button ({seed}).", fields=(("target", "b"),), dom=())

    def page(self):
        return PageState("u", (), ())

    def metadata(self):
        return {"done": self.done, "raw_reward": self.raw, "env_reward": 0.9 * self.raw, "reason": None}

    def screenshot(self):
        return np.full(self.config.screen_shape, 7, np.uint8)

    def is_draggable(self, x, y):
        return False

    def execute(self, command):
        if self.crash_on_step:
            raise BrowserCrashedError("fake crash")
        self.log.append(command)
        if command.kind is CommandKind.CLICK:
            if abs(command.x - 80) < 10 and abs(command.y - 100) < 10:
                self.done, self.raw = True, 1.0
            elif command.y > 105:
                self.done, self.raw = True, -1.0

    def close(self):
        self.alive = False


def _fake_env(horizon=3, **kw):
    return WebControlEnv("click-button", horizon=horizon, backend_factory=FakePage, **kw)


def _tap_text(x, y):
    return format_answer("t", AutoUIAction.tap(x, y))


def test_env_success_and_info():
    env = _fake_env()
    obs, info = env.reset(seed=5)
    assert obs.shape == (420, 320, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert info["goal"] == "Click the button (5)." and info["seed"] == 5 and info["history"] == []
    obs, r, term, trunc, info = env.step(_tap_text(0.5, 100 / 210))
    assert (r, term, trunc) == (1.0, True, False) and info["success"] and info["valid"]
    assert info["action_type"] == int(ActionType.DualPoint) and not obs.any()  # zeros after the end
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_tap_text(0.5, 0.5))
    env.close()


def test_env_failure_horizon_invalid_and_declared_end():
    env = _fake_env(horizon=3)
    env.reset(seed=0)
    _, r, term, trunc, info = env.step(_tap_text(0.5, 0.9))            # wrong click: MiniWoB ends it
    assert (r, term, trunc, info["raw_reward"]) == (0.0, True, False, -1.0)
    env.reset(seed=1)
    for _ in range(3):
        _, r, term, trunc, info = env.step("gibberish")
        assert not info["valid"] and info["action_type"] == 0 and r == 0.0
    assert (term, trunc, info["step"]) == (False, True, 3)
    assert info["history"] == ["invalid answer (no action)"] * 3
    env.reset(seed=2)
    _, r, term, trunc, info = env.step(format_answer("done", AutoUIAction(ActionType.TaskComplete)))
    assert (r, term, trunc) == (0.0, True, False)
    env.close()


def test_env_crash_truncates_and_relaunches():
    env = _fake_env()
    env.reset(seed=0)
    first = env.backend
    first.crash_on_step = True
    _, r, term, trunc, info = env.step(_tap_text(0.5, 0.5))
    assert (r, term, trunc, info["crashed"]) == (0.0, False, True, True) and not first.alive
    env.reset(seed=0)
    assert env.backend is not first and env.backend.alive
    env.close()
    assert env.backend is None


def test_env_accepts_action_objects_and_scale_factor():
    env = _fake_env(config=BrowserConfig(scale_factor=1))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (210, 160, 3)
    _, r, *_ = env.step(AutoUIAction.tap(0.5, 100 / 210))
    assert r == 1.0
    env.close()


# -- registration and suites -----------------------------------------------------------------------


def test_registration_is_lazy_and_complete():
    for suite in SUITES.values():
        for eid in suite.env_ids():
            assert eid in gym.registry
    assert env_id("web/click-button") == env_id("coso_jax/web-click-button-v0") == ENV_IDS["click-button"]
    assert task_spec("web-search-engine").horizon == 20 and task_spec("click-tab").horizon == 10
    env = gym.make(ENV_IDS["click-button"], backend_factory=FakePage)  # no browser before reset
    env.close()
    # Importing the envs (web included) must not import selenium / miniwob: they are optional.
    code = ("import sys, coso_jax.envs, coso_jax.envs.web, coso_jax.envs.web.env, coso_jax.envs.web.solvers; "
            "print(sorted(m for m in ('selenium', 'miniwob') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(ValueError, match="unknown web task"):
        task_spec("no-such-task")


def test_suite_splits():
    for suite in SUITES.values():
        train, test = suite.train_episodes(), suite.test_episodes()
        assert len(test) == 96 and len(set(test)) == 96
        assert {s for _, s in train}.isdisjoint({s for _, s in test})
        assert all(s >= TEST_SEED_BASE for _, s in test)
        assert {t for t, _ in test} == set(suite.task_names)
        task, seed = suite.sample_train(np.random.default_rng(0))
        assert (task, seed) in set(train)
    assert get_suite("web/general").horizon == 10 and get_suite("shopping").horizon == 20
