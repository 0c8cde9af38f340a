"""The AutoUI action space (as DigiRL's AutoUI policy writes it) and the web envs' text interface.

An answer ends with one action in AutoUI's text format, after the key `Action Decision:`:

  Action Decision: "action_type": "DUAL_POINT", "touch_point": "[y, x]", "lift_point": "[y, x]", "typed_text": ""

Points are `[y, x]` fractions of the screen height and width in [0, 1] (AutoUI's order; we store
them as (x, y)); actions without points write "[-1.0, -1.0]". Action types: DUAL_POINT, TYPE,
PRESS_BACK, PRESS_HOME, PRESS_ENTER, STATUS_TASK_COMPLETE, TASK_IMPOSSIBLE. They map onto the 8
`ActionType` classes of DigiRL (Idle, DualPoint, Type, GoBack, GoHome, Enter, TaskComplete,
TaskImpossible), which are also the causal classifier's labels.

Parsing (`parse_autoui`) never raises. It reads the text after the LAST `Action Decision:` key
(ASCII case-insensitive; the same span `AutoUIText.spans` calls the action part) and looks up each
field by its key, so field order, spacing and quotes around values do not matter, and a typed text
may contain commas and quotes (it runs to the last `"` of the text, or to the `", "<key>":` of a
field that follows it). An answer is *invalid* (-> Idle,
`valid=False`, as DigiRL maps parse errors to Idle) when the key is missing, the action type is not
one of the seven names (case-insensitive), a DUAL_POINT lacks a point or has a coordinate outside
[0, 1], or a TYPE lacks its typed_text field. Fields an action type does not use are ignored.

Mapping to the browser (`to_browser_commands`, MiniWoB's 160x210 CSS-px task screen):
- DUAL_POINT tap (touch and lift at most `TAP_DISTANCE` = 0.04 apart, AitW's threshold) -> click.
- DUAL_POINT swipe: a drag (mouse down at touch, up at lift) when the touch point is on a drag
  handle or the swipe is mostly horizontal; else scroll wheel ticks at the touch point (finger
  moving up = content scrolls down), one 50-px tick per 50 px of swipe, 1 to 4.
- TYPE -> keystrokes into the focused element (at most 64 characters, MiniWoB's limit; characters
  outside the printable range are dropped so text can never inject WebDriver key codes).
- PRESS_ENTER -> the Enter key. PRESS_BACK / PRESS_HOME / Idle -> nothing (a task is one page).
- STATUS_TASK_COMPLETE / TASK_IMPOSSIBLE -> nothing; the env ends the episode.

Tap targets in the prompt (`tap_targets`, `AutoUIText.prompt(..., elements=K)`): a tiny policy
cannot read a click target off a 64-px screenshot, so the prompt can list the page's clickable
elements (at most K, in DOM order), each as its label (visible text, the text of a radio button's or
checkbox's label, or "textbox"; at most `TARGET_LABEL_CHARS` characters) and the point to tap, in the
action space's `[y, x]` fractions rounded to 2 decimals, chosen so that tapping it lands inside the
element's box. The env puts the targets in `info["elements"]` when built with
`observe_elements=True`.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from coso_jax.envs.base import ActionSpans, InvalidActionPolicy, ParsedAction, TextInterface

__all__ = [
    "ActionType",
    "AutoUIAction",
    "WebParsedAction",
    "AutoUIText",
    "BrowserCommand",
    "CommandKind",
    "DECISION_KEY",
    "TAP_DISTANCE",
    "TYPE_MAX_CHARS",
    "parse_autoui",
    "format_autoui",
    "decision_spans",
    "to_browser_commands",
    "TapTarget",
    "tap_targets",
    "element_box",
    "on_screen",
    "TARGET_LABEL_CHARS",
]

DECISION_KEY = "Action Decision:"
TAP_DISTANCE = 0.04
TYPE_MAX_CHARS = 64
NO_POINT = "[-1.0, -1.0]"
TARGET_LABEL_CHARS = 16  # longest label of a tap target in the prompt
_DECISION_RE = re.compile(re.escape(DECISION_KEY), re.IGNORECASE | re.ASCII)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TYPE_RE = re.compile(r'"action_type"\s*:\s*"?\s*([A-Za-z_]+)', re.ASCII)
_POINT_RE = {key: re.compile(rf'"{key}"\s*:\s*"?\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*\]', re.ASCII)
             for key in ("touch_point", "lift_point")}
_TEXT_RE = re.compile(r'"typed_text"\s*:\s*"', re.ASCII)
_NEXT_FIELD_RE = re.compile(r'"\s*,\s*"(?:action_type|touch_point|lift_point)"\s*:', re.ASCII)


class ActionType(enum.IntEnum):
    """DigiRL's action classes (value = class label)."""

    Idle = 0
    DualPoint = 1
    Type = 2
    GoBack = 3
    GoHome = 4
    Enter = 5
    TaskComplete = 6
    TaskImpossible = 7


_AUTOUI_NAMES: dict[ActionType, str] = {
    ActionType.DualPoint: "DUAL_POINT",
    ActionType.Type: "TYPE",
    ActionType.GoBack: "PRESS_BACK",
    ActionType.GoHome: "PRESS_HOME",
    ActionType.Enter: "PRESS_ENTER",
    ActionType.TaskComplete: "STATUS_TASK_COMPLETE",
    ActionType.TaskImpossible: "TASK_IMPOSSIBLE",
}
_FROM_NAME: dict[str, ActionType] = {v: k for k, v in _AUTOUI_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class AutoUIAction:
    """One AutoUI action. Points are (x, y) fractions of the screen width and height."""

    action_type: ActionType
    touch_point: tuple[float, float] | None = None
    lift_point: tuple[float, float] | None = None
    typed_text: str | None = None

    @staticmethod
    def tap(x: float, y: float) -> "AutoUIAction":
        return AutoUIAction(ActionType.DualPoint, (float(x), float(y)), (float(x), float(y)))

    @staticmethod
    def swipe(touch: tuple[float, float], lift: tuple[float, float]) -> "AutoUIAction":
        return AutoUIAction(ActionType.DualPoint, (float(touch[0]), float(touch[1])),
                            (float(lift[0]), float(lift[1])))

    @staticmethod
    def type(text: str) -> "AutoUIAction":
        return AutoUIAction(ActionType.Type, typed_text=str(text))

    @property
    def is_tap(self) -> bool:
        """A DUAL_POINT whose touch and lift points are at most TAP_DISTANCE apart."""
        if self.action_type is not ActionType.DualPoint or self.touch_point is None or self.lift_point is None:
            return False
        return math.dist(self.touch_point, self.lift_point) <= TAP_DISTANCE

    def to_text(self) -> str:
        """The canonical AutoUI text (with the `Action Decision:` key); see `format_autoui`."""
        return format_autoui(self)

    def describe(self) -> str:
        """A short human-readable form for the prompt's action history."""
        t = self.action_type
        if t is ActionType.DualPoint and self.touch_point and self.lift_point:
            (x0, y0), (x1, y1) = self.touch_point, self.lift_point
            if self.is_tap:
                return f"tap at [{y0:.2f}, {x0:.2f}]"
            return f"swipe from [{y0:.2f}, {x0:.2f}] to [{y1:.2f}, {x1:.2f}]"
        if t is ActionType.Type:
            return f'type "{self.typed_text or ""}"'
        return {ActionType.Idle: "no action", ActionType.GoBack: "press back",
                ActionType.GoHome: "press home", ActionType.Enter: "press enter",
                ActionType.TaskComplete: "report the task complete",
                ActionType.TaskImpossible: "report the task impossible"}.get(t, t.name)


IDLE = AutoUIAction(ActionType.Idle)


def _point_text(p: tuple[float, float] | None) -> str:
    return NO_POINT if p is None else f"[{p[1]:.4f}, {p[0]:.4f}]"


def format_autoui(action: AutoUIAction) -> str:
    """`Action Decision: "action_type": ..., "touch_point": "[y, x]", "lift_point": "[y, x]", "typed_text": "..."`.

    Idle has no AutoUI name and is written as nothing: the empty decision, which parses as invalid.
    """
    if action.action_type is ActionType.Idle:
        return f"{DECISION_KEY} "
    name = _AUTOUI_NAMES[action.action_type]
    text = (action.typed_text or "") if action.action_type is ActionType.Type else ""
    return (f'{DECISION_KEY} "action_type": "{name}", "touch_point": "{_point_text(action.touch_point)}", '
            f'"lift_point": "{_point_text(action.lift_point)}", "typed_text": "{text}"')


def decision_spans(text: str) -> ActionSpans:
    """Thought = before the LAST `Action Decision:` key; action = from it to the end. Never raises.

    Without a key the whole text is thought and the action span is `(len, len)`.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    last = -1
    for m in _DECISION_RE.finditer(text):
        last = m.start()
    if last < 0:
        return ActionSpans(thought=(0, len(text)), action=(len(text), len(text)))
    return ActionSpans(thought=(0, last), action=(last, len(text)))


def _point(part: str, key: str) -> tuple[float, float] | None:
    m = _POINT_RE[key].search(part)
    if m is None:
        return None
    y, x = float(m.group(1)), float(m.group(2))
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):  # also rejects nan / inf
        return None
    return (x, y)


def parse_autoui(text: Any) -> tuple[AutoUIAction, bool]:
    """(action, valid) of an answer; invalid answers give (Idle, False). Never raises."""
    try:
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        spans = decision_spans(text)
        start, end = spans.action
        if start == end:
            return IDLE, False
        part = text[start + len(DECISION_KEY):end]
        m = _TYPE_RE.search(part)
        if m is None:
            return IDLE, False
        action_type = _FROM_NAME.get(m.group(1).upper())
        if action_type is None:
            return IDLE, False
        if action_type is ActionType.DualPoint:
            touch, lift = _point(part, "touch_point"), _point(part, "lift_point")
            if touch is None or lift is None:
                return IDLE, False
            return AutoUIAction(action_type, touch, lift), True
        if action_type is ActionType.Type:
            t = _TEXT_RE.search(part)
            if t is None:
                return IDLE, False
            rest = part[t.end():]
            nxt = _NEXT_FIELD_RE.search(rest)  # typed_text followed by another field
            close = nxt.start() if nxt else rest.rfind('"')
            typed = rest[:close] if close >= 0 else rest.rstrip()
            return AutoUIAction(action_type, typed_text=typed), True
        return AutoUIAction(action_type), True
    except Exception:  # defensive: model output must never crash a rollout
        return IDLE, False


# --------------------------------------------------------------------------------------------
# Browser commands (what the env executes; no browser needed to build them).


class CommandKind(enum.Enum):
    NONE = "none"
    CLICK = "click"
    MOUSEDOWN = "mousedown"
    MOUSEUP = "mouseup"
    SCROLL_UP = "scroll_up"      # wheel up: content moves down (earlier content comes into view)
    SCROLL_DOWN = "scroll_down"  # wheel down: later content comes into view
    TYPE = "type"
    KEY = "key"                  # text = a miniwob key name, e.g. "<Enter>"


@dataclasses.dataclass(frozen=True)
class BrowserCommand:
    """One low-level browser command; x, y in CSS pixels of the task screen."""

    kind: CommandKind
    x: float = 0.0
    y: float = 0.0
    text: str = ""


SCROLL_TICK_PX = 50  # miniwob's DEFAULT_SCROLL_AMOUNT


def _printable(text: str) -> str:
    # Drops control characters and Unicode private-use code points (WebDriver special keys live in
    # U+E000..U+F8FF) so typed text is typed, never interpreted as keys.
    return "".join(c for c in text if c.isprintable() and not 0xE000 <= ord(c) <= 0xF8FF)


def to_browser_commands(action: AutoUIAction, *, width: float = 160.0, height: float = 210.0,
                        is_draggable: Callable[[float, float], bool] | None = None) -> list[BrowserCommand]:
    """Browser commands that carry out `action` on a `width` x `height` CSS-px screen (see module doc)."""
    t = action.action_type
    if t is ActionType.DualPoint and action.touch_point is not None and action.lift_point is not None:
        (tx, ty), (lx, ly) = action.touch_point, action.lift_point
        x0, y0 = tx * width, ty * height
        x1, y1 = lx * width, ly * height
        if action.is_tap:
            return [BrowserCommand(CommandKind.CLICK, x0, y0)]
        dx, dy = x1 - x0, y1 - y0
        drag = abs(dx) > abs(dy) or (is_draggable is not None and is_draggable(x0, y0))
        if drag:
            return [BrowserCommand(CommandKind.MOUSEDOWN, x0, y0), BrowserCommand(CommandKind.MOUSEUP, x1, y1)]
        kind = CommandKind.SCROLL_DOWN if dy < 0 else CommandKind.SCROLL_UP
        ticks = int(min(max(round(abs(dy) / SCROLL_TICK_PX), 1), 4))
        return [BrowserCommand(kind, x0, y0)] * ticks
    if t is ActionType.Type:
        text = _printable(action.typed_text or "")[:TYPE_MAX_CHARS]
        return [BrowserCommand(CommandKind.TYPE, text=text)] if text else [BrowserCommand(CommandKind.NONE)]
    if t is ActionType.Enter:
        return [BrowserCommand(CommandKind.KEY, text="<Enter>")]
    return [BrowserCommand(CommandKind.NONE)]


# --------------------------------------------------------------------------------------------
# Tap targets (the page's clickable elements, for the prompt).

_TARGET_TAGS = frozenset({"button", "a", "select", "textarea", "input_text", "input_password", "input_radio",
                          "input_checkbox", "input_number", "input_email", "input_search", "input_tel",
                          "input_url", "input_date", "input_time"})
_TARGET_CLASSES = frozenset({"alink", "ui-menu-item-wrapper", "search-title"})
_LABEL_DROP = re.compile(r"[\[\];\s]+")


@dataclasses.dataclass(frozen=True)
class TapTarget:
    """One clickable element: its prompt label, the point the prompt gives for it ((x, y) fractions on
    the 0.01 grid, inside the element), and its box (left, top, width, height) in CSS px."""

    label: str
    point: tuple[float, float]
    box: tuple[float, float, float, float]

    def text(self) -> str:
        """`label [y, x]` as the prompt lists it (AutoUI's [y, x] order)."""
        return f"{self.label} [{self.point[1]:.2f}, {self.point[0]:.2f}]"


def element_box(e: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(left, top, width, height) in CSS px of a flattened MiniWoB DOM element (a missing key reads as 0)."""
    return tuple(float(np.asarray(e.get(key, 0.0), np.float64).reshape(-1)[0])
                 for key in ("left", "top", "width", "height"))


def on_screen(box: tuple[float, float, float, float], width: float = 160.0, height: float = 210.0) -> bool:
    """Whether an element box has an area and its top-left corner lies on the `width` x `height` screen."""
    left, top, w, h = box
    return w > 0 and h > 0 and 0 <= left < width and 0 <= top < height


def _grid_point(lo: float, size: float, extent: float) -> float | None:
    """A fraction on the 0.01 grid whose pixel lies strictly inside (lo, lo + size): the rounded centre
    when it does, else the grid point on either side of the centre; None for a sliver between grid lines."""
    centre = (lo + size / 2.0) / extent
    for q in (round(centre, 2), math.floor(centre * 100) / 100, math.ceil(centre * 100) / 100):
        if 0.0 <= q <= 1.0 and lo < q * extent < lo + size:
            return round(q, 2)
    return None


def _label(e: Mapping[str, Any], dom: Sequence[Mapping[str, Any]]) -> str:
    tag = str(e.get("tag", ""))
    text = str(e.get("text") or "")
    if not text.strip():  # a button's text lives in its child text nodes (dialog close: "Close")
        text = " ".join(str(c.get("text") or "") for c in dom if c.get("parent") == e.get("ref") and c.get("tag") == "t")
    if not text.strip() and tag in ("input_radio", "input_checkbox"):  # the label's text is a sibling
        text = " ".join(str(c.get("text") or "") for c in dom
                        if c.get("parent") == e.get("parent") and c.get("tag") == "t")
    if not text.strip() and (tag.startswith("input_") or tag == "textarea"):
        ident = str(e.get("id") or "")
        text = ident if len(ident) >= 4 else "textbox"
    text = _LABEL_DROP.sub(" ", text).strip() or tag
    return text[:TARGET_LABEL_CHARS].strip()


def tap_targets(dom: Sequence[Mapping[str, Any]], *, width: float = 160.0,
                height: float = 210.0) -> tuple[TapTarget, ...]:
    """The clickable elements of a flattened MiniWoB DOM (buttons, links, form fields, menu items), in
    DOM order, that are visible on the `width` x `height` task screen; an element inside another target
    (a button's icon) is not listed again. See the module docstring."""
    refs = set()
    out = []
    for e in dom:
        tag = str(e.get("tag", ""))
        classes = set(str(e.get("classes") or "").split())
        if tag not in _TARGET_TAGS and not classes & _TARGET_CLASSES:
            continue
        refs.add(e.get("ref"))
        if e.get("parent") in refs:
            continue
        left, top, w, h = box = element_box(e)
        if not on_screen(box, width, height):
            continue
        x = _grid_point(left, min(w, width - left), width)
        y = _grid_point(top, min(h, height - top), height)
        if x is None or y is None:
            continue
        out.append(TapTarget(_label(e, dom), (x, y), (left, top, w, h)))
    return tuple(out)


def targets_line(targets: Sequence[TapTarget], limit: int) -> str:
    """The first `limit` targets as `label [y, x]; ...` ("none" without any)."""
    shown = list(targets)[:limit]
    return "; ".join(t.text() for t in shown) if shown else "none"


# --------------------------------------------------------------------------------------------
# Text interface.


@dataclasses.dataclass(frozen=True)
class WebParsedAction(ParsedAction):
    """A ParsedAction that also carries the full AutoUI action (points, typed text)."""

    autoui: AutoUIAction = IDLE


ACTION_NAMES = tuple(t.name for t in ActionType)
_TYPE_LIST = "|".join(_AUTOUI_NAMES.values())


def _default_policy() -> InvalidActionPolicy:
    return InvalidActionPolicy(mode="penalty", fallback_action=int(ActionType.Idle), penalty=0.0)


class AutoUIText(TextInterface):
    """The web envs' text interface: prompt, AutoUI parser, ActionType labels, thought/action spans.

    Args:
      invalid_policy: only mode "penalty" is meaningful (an invalid answer does nothing: Idle, as
        DigiRL); the default adds no penalty. The fallback must be an action type that needs no
        arguments (not DualPoint / Type).
    """

    name = "web"
    action_names = ACTION_NAMES
    label_names = ACTION_NAMES

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        policy = invalid_policy or _default_policy()
        if policy.mode != "penalty":
            raise ValueError("web envs take InvalidActionPolicy(mode='penalty', ...): an invalid AutoUI "
                             "answer becomes a no-argument action (Idle by default), never a random one")
        if policy.fallback_action not in {int(t) for t in ActionType} or policy.fallback_action in (
                ActionType.DualPoint, ActionType.Type):
            raise ValueError(f"fallback_action {policy.fallback_action} must be an ActionType without "
                             "arguments (Idle, GoBack, GoHome, Enter, TaskComplete, TaskImpossible)")
        self.invalid_policy = policy

    def prompt(self, info: Mapping[str, Any], cot: bool = True, brief: bool = False, elements: int = 0) -> str:
        """Prompt from `info` keys "goal", "history" (list of earlier action descriptions), "step", "horizon".

        `brief=True`: only the task and the earlier actions (for tiny models trained from scratch).
        `elements=K > 0`: also the first K tap targets of `info["elements"]` (`tap_targets`; the env
        records them with `observe_elements=True`) as `label [y, x]` (ValueError if `info` has none).
        With `elements=0` the prompt is exactly the one without targets.
        """
        goal = str(info.get("goal", "")).strip()
        history = list(info.get("history", ()))
        step, horizon = info.get("step"), info.get("horizon")
        targets = None
        if elements > 0:
            if "elements" not in info:
                raise ValueError("the prompt lists tap targets (elements > 0) but the env info has no 'elements': "
                                 "build the web env with observe_elements=True")
            targets = targets_line(info["elements"], elements)
        if brief:
            done = "; ".join(history) if history else "none"
            return f"Task: {goal}\nDone: {done}" + (f"\nTap: {targets}" if targets is not None else "")
        lines = [
            "You operate a web page on a small touch screen. The screenshot shows the page; the yellow "
            "banner at its top states the task.",
            f"Task: {goal}",
        ]
        if history:
            lines.append("Actions so far: " + "; ".join(f"{i + 1}. {h}" for i, h in enumerate(history)))
        else:
            lines.append("Actions so far: none")
        if step is not None and horizon is not None:
            lines.append(f"This is step {int(step) + 1} of at most {int(horizon)}.")
        if targets is not None:
            lines.append(f"Tap targets (label [y, x]): {targets}")
        lines.append(
            "Points are [y, x]: fractions of the screen height and width from 0 to 1. A tap has equal "
            "touch and lift points; a swipe goes from the touch point to the lift point. Actions without "
            f"a point use {NO_POINT}. TYPE types into the selected field.")
        form = (f'{DECISION_KEY} "action_type": "<{_TYPE_LIST}>", "touch_point": "[y, x]", '
                '"lift_point": "[y, x]", "typed_text": "<text>"')
        if cot:
            lines.append("Answer with one short thought about the next step, then the action:\n"
                         f"Thought: <what to do next and why>\n{form}")
        else:
            lines.append(f"Answer with the action only:\n{form}")
        return "\n".join(lines)

    def parse(self, text: str, rng: np.random.Generator | None = None,
              info: Mapping[str, Any] | None = None) -> WebParsedAction:
        """`parse_autoui` as a `ParsedAction` (the protocol of `coso_jax.envs.base`). Never raises.

        `rng` and `info` are not needed (the action set is fixed and an invalid answer never maps to
        a random action); they are accepted so every env's parser has the same signature.
        """
        del rng, info
        action, valid = parse_autoui(text)
        if not valid:
            fallback = ActionType(self.invalid_policy.fallback_action)
            return WebParsedAction(action=int(fallback), valid=False, label=None, matched=None,
                                   autoui=AutoUIAction(fallback))
        return WebParsedAction(action=int(action.action_type), valid=True, label=int(action.action_type),
                               matched=_AUTOUI_NAMES[action.action_type], autoui=action)

    def spans(self, text: str) -> ActionSpans:
        return decision_spans(text)

    def invalid(self, rng: np.random.Generator | None = None) -> WebParsedAction:
        fallback = ActionType(self.invalid_policy.fallback_action)
        return WebParsedAction(action=int(fallback), valid=False, label=None, matched=None,
                               autoui=AutoUIAction(fallback))


def format_answer(thought: str, action: AutoUIAction) -> str:
    """A complete answer in the prompt's format: `Thought: ...` then the action line."""
    return f"Thought: {thought.strip()}\n{format_autoui(action)}"


__all__.append("format_answer")


def commands_summary(commands: Sequence[BrowserCommand]) -> str:
    """Compact text of a command list (for logs)."""
    return ", ".join(c.kind.value if c.kind in (CommandKind.NONE,) else
                     f"{c.kind.value}({c.text!r})" if c.kind in (CommandKind.TYPE, CommandKind.KEY) else
                     f"{c.kind.value}({c.x:.0f},{c.y:.0f})" for c in commands)
