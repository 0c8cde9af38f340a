"""The text interface of the ALFWorld env: prompt, parser, action label (the command's verb).

Unlike the gym_cards games, the legal actions change every step: they are the state's admissible
commands (`info["admissible_commands"]`). So `parse(text, rng=None, info=None)` (the protocol of
`coso_jax.envs.base`) reads them from `info` (or from the keyword `admissible=`, a command list, which
wins), and `ParsedAction.action` is an index into that list:

  1. look at the text from the first `"action":` key (ASCII case-insensitive) to the end,
     lower-cased, runs of white space collapsed;
  2. find every admissible command there that stands as whole words (no letter or digit right
     before or after it); take the one that starts first (the longest on a tie, so "cabinet 10"
     wins over "cabinet 1");
  3. none -> invalid. In "penalty" mode (the default, RL4VLM's rule) the action is `INADMISSIBLE`
     (-1): the env does nothing and its reward carries the -1, so `invalid_penalty` is 0 here (the
     trainer must not add it twice). In "random" mode a uniformly random admissible command is
     played instead, without penalty.

Labels for the causal classifier are the verbs of `VERBS` ("go to X" -> "go").
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

import numpy as np

from coso_jax.envs.base import ACTION_KEY, InvalidActionPolicy, ParsedAction, TextInterface

__all__ = ["VERBS", "INADMISSIBLE", "ALFWorldText", "verb_label", "format_answer"]

VERBS: tuple[str, ...] = ("go", "open", "close", "take", "move", "use", "heat", "clean", "cool", "slice",
                          "examine", "look", "inventory", "help")
INADMISSIBLE = -1
_KEY_RE = re.compile(re.escape(ACTION_KEY), re.IGNORECASE | re.ASCII)
_WS_RE = re.compile(r"\s+")
_VERB_INDEX = {v: i for i, v in enumerate(VERBS)}


def verb_label(command: str) -> int | None:
    """Index in `VERBS` of a command's verb (None for an unknown verb)."""
    words = command.split()
    return _VERB_INDEX.get(words[0].lower()) if words else None


def format_answer(thoughts: str | None, action: str) -> str:
    """The JSON answer the prompt asks for (used by the demonstrations)."""
    fields = {"thoughts": thoughts, "action": action} if thoughts is not None else {"action": action}
    return json.dumps(fields, ensure_ascii=False)


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


class ALFWorldText(TextInterface):
    """Prompt / parse / label for `coso_jax/ALFWorld-v0` (see the module docstring)."""

    name = "ALFWorld"

    def __init__(self, invalid_policy: InvalidActionPolicy | None = None) -> None:
        self.action_names = VERBS  # no fixed action list; verbs give num_actions / labels
        self.label_names = VERBS
        self.invalid_policy = invalid_policy or InvalidActionPolicy(mode="penalty", fallback_action=INADMISSIBLE)

    @property
    def invalid_penalty(self) -> float:
        return 0.0  # the env's reward already holds -1 for an inadmissible command

    # ------------------------------------------------------------------ prompt
    def prompt(self, info: Mapping[str, Any] | None = None, cot: bool = True, brief: bool = False) -> str:
        info = info or {}
        commands = list(info.get("admissible_commands", []))
        task = info.get("task", "")
        obs = info.get("observation", "")
        if brief:
            return f"ALFWorld. Task: {task}. Now: {obs} Commands: {', '.join(commands)}. Answer in JSON."
        head = (
            "You are a household robot in a text world. The image is a map of the room: every box is a "
            "receptacle (grey: closed, green: open), a red frame marks where you are, and the bottom "
            "lines say what you hold and what you see here.\n"
            f"Your task: {task}.\n"
            f"What just happened: {obs}\n"
            f"Commands you can give now: {', '.join(json.dumps(c) for c in commands)}.\n"
        )
        if cot:
            form = '{"thoughts": "<what to do next and why>", "action": "<one command from the list>"}'
        else:
            form = '{"action": "<one command from the list>"}'
        return f"{head}Reply with one JSON object and nothing else, in this form:\n{form}"

    # ------------------------------------------------------------------ parse
    @staticmethod
    def find_command(text: str, commands: Sequence[str]) -> str | None:
        """The admissible command the answer names (rule in the module docstring), or None."""
        m = _KEY_RE.search(text)
        if m is None:
            return None
        rest = _WS_RE.sub(" ", text[m.end():].lower())
        best: tuple[int, int, str] | None = None
        for cmd in commands:
            c = _WS_RE.sub(" ", str(cmd).lower().strip())
            if not c:
                continue
            start = rest.find(c)
            while start >= 0:
                end = start + len(c)
                before = rest[start - 1] if start > 0 else " "
                after = rest[end] if end < len(rest) else " "
                if not _is_word_char(before) and not _is_word_char(after):
                    key = (start, -len(c), str(cmd))
                    if best is None or key < best:
                        best = key
                    break
                start = rest.find(c, start + 1)
        return best[2] if best is not None else None

    def parse(self, text: str, rng: np.random.Generator | None = None, info: Mapping[str, Any] | None = None,
              *, admissible: Sequence[str] | None = None) -> ParsedAction:
        """Parses an answer against the current admissible commands. Never raises on model output.

        Args:
          text: the model's answer.
          rng: draws the random admissible command of an invalid answer in "random" mode.
          info: the env's info of the state being answered; its "admissible_commands" are the legal
            actions (no info and no `admissible`: nothing is admissible, so the answer is invalid).
          admissible: the command list itself (overrides `info`).
        """
        try:
            if admissible is None:
                admissible = list((info or {}).get("admissible_commands", []))
            admissible = [str(c) for c in admissible]
            if not isinstance(text, str):
                text = "" if text is None else str(text)
            found = self.find_command(text, admissible)
        except Exception:  # defensive: parse must never raise on model output
            found, admissible = None, list(admissible or []) if isinstance(admissible, (list, tuple)) else []
        if found is None:
            return self._invalid(rng, len(admissible))
        return ParsedAction(action=admissible.index(found), valid=True, label=verb_label(found), matched=found)

    def _invalid(self, rng: np.random.Generator | None, n: int) -> ParsedAction:
        if self.invalid_policy.mode == "random" and n > 0:
            if rng is None:
                raise ValueError("parse needs an np.random.Generator in 'random' invalid-action mode")
            return ParsedAction(action=int(rng.integers(n)), valid=False, label=None, matched=None)
        return ParsedAction(action=INADMISSIBLE, valid=False, label=None, matched=None)

    def invalid(self, rng: np.random.Generator | None) -> ParsedAction:
        return self._invalid(rng, 0)
