"""The text interface between a language-model policy and an environment.

A policy answers in free text; the env's `TextInterface` turns an observation's `info` into a
prompt, parses an answer into an env action, labels the action for the causal classifier, and
splits the answer into its thought part and its action part (character offsets, so the CoT
log-prob scaling never depends on token ids). Every env family (gym_cards, ALFWorld, web control)
implements this protocol; the online trainer only talks to it.

The protocol (also in docs/contracts.md), one signature for every env:

  prompt(info, cot=True, brief=False) -> str
  parse(text, rng=None, info=None) -> ParsedAction
  spans(text) -> ActionSpans
  action_label(parsed) -> int | None

- `info` is the env's info dict of the state the answer responds to: the one returned by the
  `reset()` / `step()` that produced the observation the prompt was built from. Envs whose legal
  actions change every step read them from it (ALFWorld: `info["admissible_commands"]`); the
  others (gym_cards, web) ignore it, so passing it is always correct and `None` is fine for them.
- `rng` (an `np.random.Generator`) is used only when an invalid answer maps to a random legal
  action (`InvalidActionPolicy(mode="random")`); it may be None otherwise. A None rng in random
  mode is a caller error (ValueError), the one exception `parse` may raise.
- `parse` never raises on model output: any text (also None, non-strings, garbage) gives a
  `ParsedAction`, with `valid=False` and the configured fallback action when it names no legal
  action.

`ChoiceTextInterface` implements the RL4VLM gym_cards parsing rule for a fixed list of action
names:
  1. look at the text from the first `"action":` key (ASCII case-insensitive) to the end;
  2. optionally take "10" first (points games: "10" contains "1"), then collect every action name
     that occurs in the rest (case-insensitive);
  3. exactly one distinct name -> that action, valid; otherwise the text is invalid and the
     configured `InvalidActionPolicy` picks the env action.
Unlike the reference, a text without any `"action":` key is invalid (the reference then looked at
the text's last character only, an artefact of `str.find` returning -1).
"""
from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Literal, Mapping, Sequence

import numpy as np

__all__ = [
    "ACTION_KEY",
    "ParsedAction",
    "ActionSpans",
    "InvalidActionPolicy",
    "TextInterface",
    "ChoiceTextInterface",
    "find_action_keys",
    "action_spans",
]

ACTION_KEY = '"action":'
# ASCII-only case folding: Unicode folding would let e.g. U+0130 match "i" and shift offsets.
_ACTION_KEY_RE = re.compile(re.escape(ACTION_KEY), re.IGNORECASE | re.ASCII)


@dataclasses.dataclass(frozen=True)
class ParsedAction:
    """Result of parsing one answer (frozen; env families may subclass it to carry more).

    Attributes:
      action: what the env is stepped with; always something the env accepts (for an invalid
        answer: the invalid-action policy's fallback). gym_cards: the `Discrete` action index.
        ALFWorld: an index into `info["admissible_commands"]`, or `INADMISSIBLE` (-1) for an
        invalid answer in "penalty" mode (the env then does nothing and gives -1). Web: the
        `ActionType` value (`WebParsedAction.autoui` holds the full action with points / text).
      valid: whether the text named exactly one legal action (per the env's parsing rule).
      label: the class label for the causal classifier (an index into `label_names`); None when
        `valid` is False (ALFWorld: also None for a command with an unknown verb).
      matched: the action name / command found in the text; None when `valid` is False.
    """

    action: int
    valid: bool
    label: int | None
    matched: str | None


@dataclasses.dataclass(frozen=True)
class ActionSpans:
    """Character offsets `[start, end)` of the thought part and the action part of an answer.

    The action part starts at the LAST `"action":` key (as RL4VLM's token search does) and runs to
    the end of the text; the thought part is everything before it. Without a key, the action part
    is empty at the end of the text, `(len, len)`, and the whole text is thought.
    """

    thought: tuple[int, int]
    action: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class InvalidActionPolicy:
    """What happens when an answer does not name exactly one legal action.

    Attributes:
      mode: "random" -> a uniformly random legal action (the gym_cards reference; no extra reward
        penalty); "penalty" -> the fixed `fallback_action`, and the trainer adds `penalty` to the
        env reward (see `TextInterface.invalid_penalty`).
      fallback_action: the action taken in "penalty" mode.
      penalty: reward added for an invalid answer in "penalty" mode (ignored in "random" mode).
    """

    mode: Literal["random", "penalty"] = "random"
    fallback_action: int = 0
    penalty: float = -1.0

    def __post_init__(self) -> None:
        if self.mode not in ("random", "penalty"):
            raise ValueError(f"InvalidActionPolicy.mode must be 'random' or 'penalty', got {self.mode!r}")


def find_action_keys(text: str) -> list[int]:
    """Start offsets of every `"action":` key in `text` (ASCII case-insensitive)."""
    return [m.start() for m in _ACTION_KEY_RE.finditer(text)]


def action_spans(text: str) -> ActionSpans:
    """Thought / action character spans of `text` (see `ActionSpans`). Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    last = -1
    for m in _ACTION_KEY_RE.finditer(text):
        last = m.start()
    if last < 0:
        n = len(text)
        return ActionSpans(thought=(0, n), action=(n, n))
    return ActionSpans(thought=(0, last), action=(last, len(text)))


class TextInterface(abc.ABC):
    """Protocol between a text policy and one environment (see the module docstring).

    Subclasses set `name`, `action_names` (index = env action; ALFWorld: its verbs, as its legal
    actions change per step), `label_names`, `invalid_policy` and implement `prompt` and `parse`
    with the signatures below.
    """

    name: str
    action_names: tuple[str, ...]
    label_names: tuple[str, ...]
    invalid_policy: InvalidActionPolicy

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def invalid_penalty(self) -> float:
        """Reward the trainer adds for an invalid answer (0 in "random" mode)."""
        return self.invalid_policy.penalty if self.invalid_policy.mode == "penalty" else 0.0

    @abc.abstractmethod
    def prompt(self, info: dict, cot: bool = True, brief: bool = False) -> str:
        """The text prompt for the current state (without an image placeholder).

        `brief=True` gives a short prompt with only the game and the state the image cannot show,
        for tiny models trained from scratch (they read no instructions and pay for every token).
        """

    @abc.abstractmethod
    def parse(self, text: str, rng: np.random.Generator | None = None,
              info: Mapping[str, Any] | None = None) -> ParsedAction:
        """Parses an answer into an env action. Never raises on model output.

        Args:
          text: the model's answer (anything else is treated as invalid text).
          rng: draws the random legal action of an invalid answer in "random" mode; may be None
            otherwise (None in random mode raises ValueError: a caller error).
          info: the env's info dict of the state being answered (see the module docstring);
            envs with fixed action sets ignore it.
        """

    def action_label(self, parsed: ParsedAction) -> int | None:
        """Class label of a parsed action for the causal classifier (None when invalid)."""
        return parsed.label

    def spans(self, text: str) -> ActionSpans:
        """Character offsets of the thought part and the action part of `text`. Never raises."""
        return action_spans(text)

    def invalid(self, rng: np.random.Generator | None) -> ParsedAction:
        """The ParsedAction for an invalid answer, as the invalid-action policy says."""
        policy = self.invalid_policy
        if policy.mode == "penalty":
            action = int(policy.fallback_action)
        else:
            if rng is None:
                raise ValueError("parse needs an np.random.Generator in 'random' invalid-action mode")
            action = int(rng.integers(self.num_actions))
        return ParsedAction(action=action, valid=False, label=None, matched=None)


class ChoiceTextInterface(TextInterface):
    """A text interface over a fixed list of action names with the RL4VLM matching rule.

    Args:
      name: the env's short name (e.g. "NumberLine").
      action_names: names of the env actions, index = action.
      ten_first: match "10" before the other names and remove it (points games).
      invalid_policy: what an invalid answer does (default: random legal action).
    """

    def __init__(self, name: str, action_names: Sequence[str], *, ten_first: bool = False,
                 invalid_policy: InvalidActionPolicy | None = None) -> None:
        self.name = name
        self.action_names = tuple(action_names)
        if len(set(self.action_names)) != len(self.action_names):
            raise ValueError(f"duplicate action names: {self.action_names}")
        self.label_names = self.action_names
        self.ten_first = ten_first and "10" in self.action_names
        self.invalid_policy = invalid_policy or InvalidActionPolicy()
        if not 0 <= self.invalid_policy.fallback_action < len(self.action_names):
            raise ValueError(
                f"fallback_action {self.invalid_policy.fallback_action} is not an action of {name} "
                f"(0..{len(self.action_names) - 1})")
        self._index = {n: i for i, n in enumerate(self.action_names)}
        self._lower = [(n.lower(), i) for i, n in enumerate(self.action_names) if n != "10" or not self.ten_first]

    def matches(self, text: str) -> list[str]:
        """The distinct action names after the first `"action":` key (empty without a key)."""
        m = _ACTION_KEY_RE.search(text)
        if m is None:
            return []
        rest = text[m.start():].lower()
        found: list[str] = []
        if self.ten_first and "10" in rest:
            found.append("10")
            rest = rest.replace("10", "")
        for low, i in self._lower:
            if low in rest:
                found.append(self.action_names[i])
        return found

    def parse(self, text: str, rng: np.random.Generator | None = None,
              info: Mapping[str, Any] | None = None) -> ParsedAction:
        """The matching rule of the module docstring; `info` is not needed (fixed action set)."""
        del info
        try:
            if not isinstance(text, str):
                text = "" if text is None else str(text)
            found = self.matches(text)
        except Exception:  # defensive: parse must never raise on model output
            found = []
        if len(found) != 1:
            return self.invalid(rng)
        action = self._index[found[0]]
        return ParsedAction(action=action, valid=True, label=action, matched=found[0])
