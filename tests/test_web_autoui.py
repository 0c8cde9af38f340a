"""AutoUI parser, text interface, browser-command mapping and env logic (no browser needed)."""
from __future__ import annotations

import re
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
    TARGET_LABEL_CHARS,
    ActionType,
    AutoUIAction,
    BrowserCommand,
    CommandKind,
    decision_spans,
    format_answer,
    format_autoui,
    parse_autoui,
    tap_targets,
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


# -- tap targets in the prompt (the page's clickable elements) -------------------------------------


def _el(ref, parent, tag, text="", left=0.0, top=0.0, width=0.0, height=0.0, ident="", classes=""):
    """A flattened-DOM element as miniwob writes it (positions as 1-element arrays)."""
    a = lambda v: np.asarray([v], np.float32)  # noqa: E731
    return {"ref": ref, "parent": parent, "tag": tag, "text": text, "id": ident, "classes": classes,
            "left": a(left), "top": a(top), "width": a(width), "height": a(height), "value": "",
            "flags": np.zeros(4, np.int8)}


# A click-button / click-option / click-dialog / click-link mix; the elements a prompt should list, in order.
DOM = (
    _el(1, 0, "body", width=800, height=210), _el(2, 1, "div", width=160, height=210, ident="wrap"),
    _el(3, 2, "input_text", left=2, top=63, width=60, height=21),
    _el(4, 2, "button", "previous", left=2, top=84, width=66.39, height=21),
    _el(5, 2, "label", left=2, top=59, width=41.4, height=11),
    _el(6, 5, "input_radio", left=7, top=55, width=20, height=13, ident="ch0"),
    _el(-5, 5, "t", "8ai", left=30, top=59, width=13.4, height=11),
    _el(7, 2, "button", "", left=116, top=94.5, width=20, height=20, classes="ui-dialog-titlebar-close"),
    _el(8, 7, "span", "", left=118, top=96.5, width=16, height=16, classes="ui-icon"),  # inside the button
    _el(-2, 7, "t", "Close", left=-4886.3, top=99, width=25.6, height=11),
    _el(9, 2, "span", "pretium", left=84.27, top=74, width=33.36, height=11, classes="alink"),
    _el(10, 2, "button", "hidden", left=2, top=150, width=0, height=0),      # not rendered
    _el(11, 2, "button", "far right", left=170, top=150, width=30, height=20),  # off the task screen
    _el(12, 2, "button", "No", left=2, top=148, width=33.05, height=21),
    _el(13, 2, "a", "Tab #3", left=95, top=58, width=40.03, height=23, ident="ui-id-3"),
)
LISTED = [(3, "textbox"), (4, "previous"), (6, "8ai"), (7, "Close"), (9, "pretium"), (12, "No"), (13, "Tab #3")]
_TAP_RE = re.compile(r"([^;]+?) \[(\d\.\d\d), (\d\.\d\d)\]")


def _listed(prompt: str) -> list[tuple[str, float, float]]:
    """(label, x, y) of the prompt's `Tap:` line, read with a regex (not with the formatting code)."""
    line = next(ln for ln in prompt.splitlines() if ln.startswith(("Tap: ", "Tap targets")))
    line = line.split(": ", 1)[1]
    return [(m.group(1).strip(), float(m.group(3)), float(m.group(2))) for m in _TAP_RE.finditer(line)]


def _box(ref):
    e = next(e for e in DOM if e["ref"] == ref)
    return tuple(float(e[k][0]) for k in ("left", "top", "width", "height"))


@pytest.mark.parametrize("brief", [True, False])
def test_prompt_tap_targets_hit_their_elements(brief):
    iface = text_interface()
    info = {"goal": 'Click on the "No" button.', "history": [], "step": 0, "horizon": 5,
            "elements": tap_targets(DOM)}
    listed = _listed(iface.prompt(info, brief=brief, elements=8))
    assert [label for label, _, _ in listed] == [label for _, label in LISTED]
    for (label, x, y), (ref, _) in zip(listed, LISTED):
        left, top, width, height = _box(ref)
        (click,) = to_browser_commands(AutoUIAction.tap(x, y))   # what the env executes for that tap
        assert click.kind is CommandKind.CLICK
        assert left < click.x < left + width and top < click.y < top + height, (label, x, y, _box(ref))
    # only the first K are listed
    assert [lb for lb, _, _ in _listed(iface.prompt(info, brief=brief, elements=2))] == ["textbox", "previous"]


def test_prompt_length_is_bounded_with_many_elements():
    iface = text_interface()
    many = tuple(_el(100 + i, 2, "button", f"a very long button label number {i}", left=1 + (i % 8) * 19,
                     top=60 + (i // 8) * 12, width=18, height=11) for i in range(64))
    info = {"goal": "Click on the button.", "history": ["tap at [0.50, 0.50]"], "elements": tap_targets(many)}
    assert len(info["elements"]) == 64
    k = 8
    base = iface.prompt(dict(info, elements=()), brief=True, elements=k)   # "Tap: none"
    p = iface.prompt(info, brief=True, elements=k)
    listed = _listed(p)
    assert len(listed) == k and all(len(label) <= TARGET_LABEL_CHARS for label, _, _ in listed)
    per_target = TARGET_LABEL_CHARS + len(" [0.00, 0.00]") + len("; ")
    assert len(p) <= len(base) - len("none") + k * per_target
    for (label, x, y), e in zip(listed, many):                        # the DOM's own boxes
        left, top, width, height = (float(e[k][0]) for k in ("left", "top", "width", "height"))
        assert e["text"].startswith(label) and left < x * 160 < left + width and top < y * 210 < top + height


def test_prompt_without_targets_is_unchanged():
    """elements=0 gives exactly the prompts written before tap targets existed (targets in the info or not)."""
    iface = text_interface()
    info = {"goal": 'Click on the "OK" button.', "history": ["tap at [0.50, 0.50]"], "step": 1, "horizon": 10}
    with_targets = dict(info, elements=tap_targets(DOM))
    assert iface.prompt(with_targets, brief=True) == 'Task: Click on the "OK" button.\nDone: tap at [0.50, 0.50]'
    assert iface.prompt(with_targets, brief=True, elements=0) == iface.prompt(info, brief=True)
    for cot in (True, False):
        assert iface.prompt(with_targets, cot=cot, elements=0) == iface.prompt(info, cot=cot)
    full = iface.prompt(info)
    assert full.splitlines()[:4] == [
        "You operate a web page on a small touch screen. The screenshot shows the page; the yellow banner at "
        "its top states the task.", 'Task: Click on the "OK" button.', "Actions so far: 1. tap at [0.50, 0.50]",
        "This is step 2 of at most 10."] and "Tap" not in full
    with pytest.raises(ValueError, match="observe_elements=True"):
        iface.prompt(info, brief=True, elements=4)


def test_listed_tap_moves_solver_taps_onto_the_prompt_points():
    from coso_jax.rl.digirl.web import listed_tap

    targets = tap_targets(DOM)
    left, top, width, height = _box(12)                               # the "No" button
    solver = AutoUIAction.tap(round((left + width / 2) / 160, 4), round((top + height / 2) / 210, 4))
    moved = listed_tap(solver, targets, 8)
    listed = {label: (x, y) for label, x, y in _listed(text_interface().prompt(
        {"goal": "g", "history": [], "elements": targets}, brief=True, elements=8))}
    assert moved.touch_point == moved.lift_point == listed["No"]
    assert listed_tap(solver, targets, 5) == solver                   # "No" is not among the first 5
    assert listed_tap(solver, targets, 0) == solver
    typed = AutoUIAction.type("x")
    assert listed_tap(typed, targets, 8) is typed
    corner = AutoUIAction.tap(0.99, 0.99)
    assert listed_tap(corner, targets, 8) == corner


def test_random_tap_lands_on_a_listed_target_in_the_answer_format():
    from coso_jax.envs.web.solvers import random_tap

    targets = tap_targets(DOM)
    rng = np.random.default_rng(0)
    drawn = [random_tap(rng, targets, 3) for _ in range(60)]
    first3 = {t.point: t.label for t in targets[:3]}
    assert {a.touch_point for _, a in drawn} == set(first3)          # every draw from the first 3, each drawn
    for thought, action in drawn:
        assert action.is_tap and thought == f'I tap "{first3[action.touch_point]}".'
        assert parse_autoui(format_answer(thought, action)) == (action, True)  # the answer format, parsed
    thought, action = random_tap(np.random.default_rng(0))           # nothing listed: a screen point
    x, y = action.touch_point
    assert thought == "I try tapping here." and 0.02 <= x <= 0.98 and 0.26 <= y <= 0.98
    assert random_tap(np.random.default_rng(0), targets, 0)[0] == "I try tapping here."


class ElementPage(FakePage):
    """FakePage with its target button in the DOM (box 70..90 x 90..110 CSS px: a click inside solves it)."""

    DOM = (_el(1, 0, "body", width=800, height=210),
           _el(2, 1, "button", "Go", left=70, top=90, width=20, height=20),
           _el(3, 1, "button", "Stop", left=20, top=150, width=30, height=20))

    def reset(self, seed):
        self.done, self.raw = False, 0.0
        return PageState(utterance='Click on the "Go" button.', fields=(("target", "Go"),), dom=self.DOM)

    def page(self):
        return PageState('Click on the "Go" button.', (("target", "Go"),), self.DOM)


def test_env_observes_elements_and_the_listed_point_solves_the_task():
    from coso_jax.rl.digirl.web import PromptBuilder

    env = WebControlEnv("click-button", horizon=3, backend_factory=ElementPage, observe_elements=True)
    _, info = env.reset(seed=0)
    assert [t.label for t in info["elements"]] == ["Go", "Stop"]
    prompt = PromptBuilder(cot=True, brief=True, history_actions=2, elements=8)(info)
    (label, x, y), _ = _listed(prompt)
    assert label == "Go"
    _, r, term, _, info = env.step(AutoUIAction.tap(0.01, 0.3))       # a miss that does not end the episode
    assert (r, term) == (0.0, False) and [t.label for t in info["elements"]] == ["Go", "Stop"]
    _, r, term, _, info = env.step(format_answer("tap Go", AutoUIAction.tap(x, y)))
    assert (r, term) == (1.0, True) and info["elements"] == ()
    env.close()
    plain = _fake_env()
    _, info = plain.reset(seed=0)
    assert "elements" not in info
    plain.close()


class _Encoder:
    """Stands in for a PromptEncoder: a prompt of more than `prompt_len` characters does not fit."""

    def __init__(self, prompt_len):
        self.prompt_len = prompt_len

    def token_ids(self, prompt):
        if len(prompt) > self.prompt_len:
            raise ValueError("too long")
        return list(prompt)


def test_prompt_builder_trims_history_then_names_the_fix():
    from coso_jax.rl.digirl.web import PromptBuilder

    info = {"goal": "Click on the button.", "history": ['type "' + "x" * 40 + '"'], "elements": tap_targets(DOM)}
    alone = PromptBuilder(True, True, 2, elements=8)(dict(info, history=[]))
    builder = PromptBuilder(True, True, 2, _Encoder(len(alone)), elements=8)
    assert builder(info) == alone                                      # the earlier action goes first
    with pytest.raises(ValueError, match="raise prompt_margin or lower prompt_elements"):
        PromptBuilder(True, True, 2, _Encoder(len(alone) - 1), elements=8)(info)
