"""Scripted DOM-reading solvers for the suite tasks, and AutoUI demonstrations from them.

A solver reads the page (`PageState`: utterance, miniwob's parsed fields, the flattened DOM with
positions, values and the focus flag) and returns the next action with a short thought. Solvers
are stateless: every step they re-read the DOM (which field holds what, what is focused, which
boxes are checked), so they recover from a lost focus or a slow widget by looking again.

`generate(tasks, episodes_per_task, seed, split)` plays seeded episodes and yields one record per
step, in the format of `coso_jax.envs.gym_cards.demos`:

  {"env", "task", "seed", "step", "prompt", "answer", "action_type", "reward", "success",
   "imperfect", "image" (PNG path, only with image_dir)}

`answer` is a full AutoUI answer (`Thought: ...` + `Action Decision: ...`), the target of the
supervised (offline) stage; `prompt` is `AutoUIText.prompt` of the step's info. `write_jsonl` /
`read_jsonl` are the gym_cards ones.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from coso_jax.envs.gym_cards.demos import read_jsonl, write_jsonl
from coso_jax.envs.web.autoui import ActionType, AutoUIAction, AutoUIText, element_box, format_answer, on_screen
from coso_jax.envs.web.browser import TASK_HEIGHT, TASK_WIDTH, PageState
from coso_jax.envs.web.suites import TEST_SEED_BASE, get_suite, task_spec

__all__ = ["SOLVERS", "solve", "SolverError", "generate", "run_solver", "write_jsonl", "read_jsonl",
           "episode_seed"]

Element = Mapping[str, Any]
Step = tuple[str, AutoUIAction]


class SolverError(RuntimeError):
    """The solver found no element it needs on the page (names the task and what is missing)."""


# -- DOM helpers -------------------------------------------------------------------------------


def _center(e: Element) -> tuple[float, float]:
    """Centre of an element as (x, y) fractions of the task screen."""
    left, top, w, h = element_box(e)
    x = (left + w / 2) / TASK_WIDTH
    y = (top + h / 2) / TASK_HEIGHT
    return (min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0))


def _tap(e: Element) -> AutoUIAction:
    x, y = _center(e)
    return AutoUIAction.tap(round(x, 4), round(y, 4))


def _norm(text: Any) -> str:
    return re.sub(r"[^\w#]+", " ", str(text or "")).strip().lower()


def _focused(e: Element) -> bool:
    flags = e.get("flags")
    return bool(flags is not None and len(flags) > 0 and flags[0])


def _visible(e: Element) -> bool:
    return on_screen(element_box(e), TASK_WIDTH, TASK_HEIGHT)


def _by_tag(page: PageState, *tags: str) -> list[Element]:
    return [e for e in page.dom if e["tag"] in tags and _visible(e)]


def _field(page: PageState, key: str) -> str:
    for k, v in page.fields:
        if k == key:
            return v
    raise SolverError(f"no field {key!r} in the utterance {page.utterance!r} (fields: {page.fields})")


def _need(elements: Sequence[Element], what: str, page: PageState) -> Element:
    if not elements:
        raise SolverError(f"no {what} on the page for {page.utterance!r}")
    return elements[0]


def _submit(page: PageState) -> Element:
    buttons = [e for e in _by_tag(page, "button") if _norm(e["text"]) in ("submit", "search", "login")]
    return _need(buttons, "submit button", page)


def _fill(field: Element, text: str, label: str) -> Step | None:
    """The next step to make `field` hold `text` (None when it already does)."""
    if str(field.get("value") or "") == text:
        return None
    if not _focused(field):
        return f"I select the {label} field.", _tap(field)
    return f'I type "{text}" into the {label} field.', AutoUIAction.type(text)


# -- solvers ----------------------------------------------------------------------------------


def _click_button(page: PageState) -> Step:
    target = _field(page, "target")
    button = _need(_best_text_match(_by_tag(page, "button"), target), f'button "{target}"', page)
    return f'The task wants the "{target}" button, so I tap it.', _tap(button)


def _best_text_match(elements: Sequence[Element], target: str) -> list[Element]:
    """Elements whose text is `target`: exact (punctuation aside) first, then case-insensitive."""
    def strip(t: Any) -> str:
        return re.sub(r"[^\w#]+", " ", str(t or "")).strip()

    exact = [e for e in elements if strip(e["text"]) == strip(target)]
    return exact or [e for e in elements if _norm(e["text"]) == _norm(target)]


def _click_link(page: PageState) -> Step:
    target = _field(page, "target")
    links = _best_text_match([e for e in page.dom if "alink" in str(e["classes"]).split()], target)
    return f'I tap the link "{target}".', _tap(_need(links, f'link "{target}"', page))


def _click_dialog(page: PageState) -> Step:
    close = [e for e in page.dom if "ui-dialog-titlebar-close" in str(e["classes"])]
    return 'I close the dialog with its "x" button.', _tap(_need(close, "dialog close button", page))


def _click_tab(page: PageState) -> Step:
    target = _field(page, "target")
    tabs = [e for e in _by_tag(page, "a") if _norm(e["text"]) == _norm(f"Tab #{target}")]
    return f"I tap Tab #{target}.", _tap(_need(tabs, f"Tab #{target}", page))


def _choices(page: PageState, tag: str) -> list[tuple[str, Element]]:
    """(label text, input element) pairs of radio buttons / checkboxes (label text is a sibling)."""
    out = []
    for box in _by_tag(page, tag):
        texts = [e["text"] for e in page.dom if e["parent"] == box["parent"] and e["tag"] == "t"]
        out.append((" ".join(texts).strip(), box))
    return out


def _click_option(page: PageState) -> Step:
    target = _field(page, "target")
    for text, box in _choices(page, "input_radio"):
        if text == target:
            if str(box.get("value")) == "True":
                return f'"{target}" is selected, so I tap Submit.', _tap(_submit(page))
            return f'I select the option "{target}".', _tap(box)
    raise SolverError(f'no option "{target}" for {page.utterance!r}')


def _click_checkboxes(page: PageState) -> Step:
    targets = {v for k, v in page.fields if k.startswith("target")}
    for text, box in _choices(page, "input_checkbox"):
        checked = str(box.get("value")) == "True"
        if (text in targets) != checked:
            verb = "check" if not checked else "uncheck"
            return f'I {verb} "{text}".', _tap(box)
    return "The right boxes are checked, so I tap Submit.", _tap(_submit(page))


def _focus_text(page: PageState) -> Step:
    box = _need(_by_tag(page, "input_text"), "text box", page)
    return "I tap the text box to focus it.", _tap(box)


def _enter_text(page: PageState) -> Step:
    target = _field(page, "target")
    box = _need(_by_tag(page, "input_text"), "text box", page)
    return _fill(box, target, "text") or (f'The box holds "{target}", so I tap Submit.', _tap(_submit(page)))


def _by_id(page: PageState, ident: str) -> Element:
    return _need([e for e in page.dom if e.get("id") == ident], f"element #{ident}", page)


def _login_user(page: PageState) -> Step:
    user, password = _field(page, "username"), _field(page, "password")
    return (_fill(_by_id(page, "username"), user, "username")
            or _fill(_by_id(page, "password"), password, "password")
            or ("Both fields are filled, so I tap Login.", _tap(_submit(page))))


def _enter_password(page: PageState) -> Step:
    target = _field(page, "target")
    return (_fill(_by_id(page, "password"), target, "password")
            or _fill(_by_id(page, "verify"), target, "verify password")
            or ("Both fields hold the password, so I tap Submit.", _tap(_submit(page))))


def _use_autocomplete(page: PageState) -> Step:
    start = _field(page, "start")
    end = dict(page.fields).get("end", "")  # some utterances give only the start
    box = _by_id(page, "tags")
    value = str(box.get("value") or "")
    if value.startswith(start) and value.endswith(end):
        return f'"{value}" fits, so I tap Submit.', _tap(_submit(page))
    items = [e for e in page.dom if "ui-menu-item-wrapper" in str(e["classes"]) and _visible(e)]
    for item in items:
        text = str(item["text"])
        if text.startswith(start) and text.endswith(end):
            return f'The menu offers "{text}", which fits; I tap it.', _tap(item)
    if value != start:
        step = _fill(box, start, "tags")
        if step is not None and value == "":
            return step
    return "The menu has not shown a match yet; I wait.", AutoUIAction(ActionType.Idle)


_ORDINAL = re.compile(r"(\d+)")


def _search_engine(page: PageState) -> Step:
    query = _field(page, "query")
    rank = int(_ORDINAL.search(_field(page, "rank")).group(1))
    box = _by_id(page, "search-text")
    titles = [e for e in page.dom if "search-title" in str(e["classes"]) and _visible(e)]
    if not titles:
        step = _fill(box, query, "search")
        if step is not None:
            return step
        return f'The box holds "{query}", so I tap Search.', _tap(_by_id(page, "search"))
    page_no = (rank - 1) // 3 + 1
    active = {e["ref"] for e in page.dom if e["tag"] == "li" and "active" in str(e["classes"]).split()}
    labels = [_norm(e["text"]) for e in page.dom if e["parent"] in active and e["tag"] == "a"]
    current = int(labels[0]) if labels and labels[0].isdigit() else 1
    if current == page_no:
        link = titles[(rank - 1) % 3] if len(titles) > (rank - 1) % 3 else titles[-1]
        return f"Result {rank} is on this page; I tap it.", _tap(link)
    pages = [e for e in _by_tag(page, "a") if _norm(e["text"]) == str(page_no)]
    return f"Result {rank} is on page {page_no}; I go there.", _tap(_need(pages, f"page link {page_no}", page))


SOLVERS: dict[str, Callable[[PageState], Step]] = {
    "click-button": _click_button,
    "click-link": _click_link,
    "click-dialog": _click_dialog,
    "click-tab": _click_tab,
    "click-option": _click_option,
    "click-checkboxes": _click_checkboxes,
    "focus-text": _focus_text,
    "enter-text": _enter_text,
    "login-user": _login_user,
    "enter-password": _enter_password,
    "use-autocomplete": _use_autocomplete,
    "search-engine": _search_engine,
}


def solve(task: str, page: PageState) -> Step:
    """(thought, action) of the scripted solver of `task` for the current page."""
    try:
        solver = SOLVERS[task]
    except KeyError:
        raise ValueError(f"no scripted solver for web task {task!r}; have: {sorted(SOLVERS)}") from None
    return solver(page)


# -- running and demonstrations ------------------------------------------------------------------


def episode_seed(split: str, index: int) -> int:
    """Reset seed of the index-th episode of a split (train: index; test: TEST_SEED_BASE + index)."""
    if split == "train":
        return int(index)
    if split == "test":
        return TEST_SEED_BASE + int(index)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def random_tap(rng: np.random.Generator, targets: Sequence[Any] = (), limit: int = 0) -> Step:
    """An imperfect demonstration step: a uniformly random tap below the task bar, or, when the prompt
    lists tap targets (`limit` = K > 0 and `targets`, `autoui.TapTarget`s), one of the first K listed
    targets drawn uniformly, tapped at its listed point and worded as the solvers word a tap. The listed
    form keeps the wrong step in the answer format the policy learns (a random screen point and its
    "I try tapping here." are text the SFT start never sees: ~20 nats per token under it, measured)."""
    shown = list(targets)[:max(int(limit), 0)]
    if shown:
        target = shown[int(rng.integers(len(shown)))]
        return f'I tap "{target.label}".', AutoUIAction.tap(*target.point)
    x, y = rng.uniform(0.02, 0.98), rng.uniform(0.26, 0.98)
    return "I try tapping here.", AutoUIAction.tap(round(float(x), 4), round(float(y), 4))


def run_solver(env: Any, task: str, seed: int, *, imperfect_frac: float = 0.0,
               rng: np.random.Generator | None = None, cot: bool = True,
               image_dir: str | None = None) -> list[dict[str, Any]]:
    """Plays one episode of `env` (a WebControlEnv, possibly wrapped) with the solver; returns its records."""
    iface = AutoUIText()
    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    records: list[dict[str, Any]] = []
    step = 0
    while True:
        imperfect = bool(imperfect_frac > 0 and rng is not None and rng.random() < imperfect_frac)
        thought, action = random_tap(rng) if imperfect else solve(task, base.page())
        answer = format_answer(thought, action) if cot else action.to_text()
        record = {"env": f"web/{task}", "task": task, "seed": int(seed), "step": step,
                  "prompt": iface.prompt(info, cot=cot), "answer": answer,
                  "action_type": int(action.action_type), "imperfect": imperfect}
        if image_dir is not None:
            path = os.path.join(image_dir, f"{task}-{seed}-{step}.png")
            from PIL import Image

            os.makedirs(image_dir, exist_ok=True)
            Image.fromarray(obs).save(path)
            record["image"] = path
        obs, reward, terminated, truncated, info = env.step(action if action.action_type is ActionType.Idle
                                                            else answer)
        record.update(reward=float(reward), success=bool(info["success"]))
        records.append(record)
        step += 1
        if terminated or truncated:
            return records


def generate(tasks: str | Sequence[str], episodes_per_task: int, seed: int = 0, *, split: str = "train",
             imperfect_frac: float = 0.0, cot: bool = True, image_dir: str | None = None,
             env_kwargs: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Yields demonstration records (module docstring), task by task, episode by episode.

    Args:
      tasks: a suite name ("general", "shopping") or a list of task names.
      episodes_per_task: episodes per task.
      seed: the run seed; episode k of a task uses reset seed `episode_seed(split, seed * 10_000 + k)`
        (train seeds stay below TEST_SEED_BASE for seed < 100); it also seeds the imperfect draws.
      split: "train" or "test" seeds.
      imperfect_frac: probability that a step is a random tap instead of the solver's action.
      image_dir: if set, the step's screenshot is saved there as PNG and its path recorded.
      env_kwargs: extra `gym.make` kwargs (e.g. a BrowserConfig).
    """
    import gymnasium as gym

    from coso_jax.envs.web import env_id

    if not 0.0 <= imperfect_frac <= 1.0:
        raise ValueError(f"imperfect_frac must be in [0, 1], got {imperfect_frac}")
    names = list(get_suite(tasks).task_names) if isinstance(tasks, str) else [task_spec(t).name for t in tasks]
    rng = np.random.default_rng(seed)
    for task in names:
        env = gym.make(env_id(task), **dict(env_kwargs or {}))
        try:
            for k in range(episodes_per_task):
                ep_seed = episode_seed(split, int(seed) * 10_000 + k)
                yield from run_solver(env, task, ep_seed, imperfect_frac=imperfect_frac, rng=rng, cot=cot,
                                      image_dir=image_dir)
        finally:
            env.close()


def success_rate(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per-task fraction of episodes that ended in success (from demonstration records)."""
    wins: dict[str, list[bool]] = {}
    last: dict[tuple[str, int], bool] = {}
    for r in records:
        last[(r["task"], r["seed"])] = bool(r["success"])
    for (task, _), ok in last.items():
        wins.setdefault(task, []).append(ok)
    return {t: float(np.mean(v)) for t, v in wins.items()}


__all__.append("success_rate")
