"""DigiRL on the web envs: a pool of browsers, prompts that fit, episodes played through the shared
runner (`coso_jax.rl.episodes.play_episodes`) and turned into replay transitions, and the scripted
solver that writes demonstrations."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from coso_jax.models.image_processing import resize
from coso_jax.rl.episodes import Answer, SlotView, play_episodes
from coso_jax.rl.prompting import PromptEncoder


def resize_observation(obs: np.ndarray, size: int) -> np.ndarray:
    """The whole screenshot (banner included, no crop) resized to uint8 [size, size, 3]."""
    return resize(np.asarray(obs, np.uint8), size, size)


class WebEnvPool:
    """Browsers by task, reused across episodes; at most `max_browsers` open (idle ones of other
    tasks are closed first)."""

    def __init__(self, horizon: int | None, screen_scale: int, max_browsers: int):
        self.horizon = horizon
        self.screen_scale = screen_scale
        self.max_browsers = max_browsers
        self.free: dict[str, list[Any]] = {}
        self.count = 0

    def lease(self, task: str):
        from coso_jax.envs.web import BrowserConfig, make

        envs = self.free.get(task)
        if envs:
            return envs.pop()
        while self.count >= self.max_browsers and self._close_one_idle():
            pass
        kwargs: dict[str, Any] = {"config": BrowserConfig(scale_factor=self.screen_scale)}
        if self.horizon is not None:
            kwargs["horizon"] = self.horizon
        self.count += 1
        return make(task, **kwargs)

    def release(self, task: str, env) -> None:
        self.free.setdefault(task, []).append(env)

    def _close_one_idle(self) -> bool:
        for envs in self.free.values():
            if envs:
                envs.pop(0).close()
                self.count -= 1
                return True
        return False

    def close(self) -> None:
        for envs in self.free.values():
            for env in envs:
                env.close()
        self.free.clear()
        self.count = 0


class PromptBuilder:
    """The web text interface's prompt for an env `info`, with at most `history_actions` earlier
    actions and, with `elements` = K > 0, the page's first K tap targets (`info["elements"]`, label
    and `[y, x]` point each; the envs of `run_web_episodes` record them); with an `encoder`, trimmed
    to fit its prompt length (fewer earlier actions when a long typed text would not fit; ValueError
    naming the fix if the task and its tap targets alone do not fit)."""

    def __init__(self, cot: bool, brief: bool, history_actions: int, encoder: PromptEncoder | None = None,
                 elements: int = 0):
        from coso_jax.envs.web import text_interface

        self.iface = text_interface()
        self.encoder = encoder
        self.cot, self.brief, self.history_actions = cot, brief, history_actions
        self.elements = int(elements)

    def __call__(self, info: dict[str, Any]) -> str:
        history = list(info.get("history", ()))
        for k in range(min(self.history_actions, len(history)), -1, -1):
            prompt = self.iface.prompt(dict(info, history=history[len(history) - k:] if k else []),
                                       cot=self.cot, brief=self.brief, elements=self.elements)
            if self.encoder is None:
                return prompt
            try:
                self.encoder.token_ids(prompt)
                return prompt
            except ValueError:
                continue
        if self.elements:
            raise ValueError(f"the task text and its {self.elements} tap targets alone do not fit the prompt length "
                             f"{self.encoder.prompt_len}: raise prompt_margin or lower prompt_elements. "
                             f"Prompt: {prompt[:300]!r}")
        raise ValueError(f"the task text alone does not fit the prompt length: {info.get('goal')!r}")


@dataclasses.dataclass
class WebEpisode:
    task: str
    seed: int
    success: bool
    length: int
    transitions: dict[str, np.ndarray]  # [T, ...] per-transition fields of TransitionReplay
    texts: list[str]
    prompts: list[str] = dataclasses.field(default_factory=list)


# act(prompts, images u8[B, S, S, 3], views) -> [(text, response_ids[N], response_mask[N], token_entropies[N])]
WebActor = Callable[[list[str], np.ndarray, list[SlotView]], list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]


def run_web_episodes(pool: WebEnvPool, episodes: Sequence[tuple[str, int]], num_slots: int,
                     prompt_fn: PromptBuilder, image_size: int, act: WebActor) -> list[WebEpisode]:
    """Plays `episodes` [(task, seed)] to their ends, `num_slots` at a time, and returns each as
    replay transitions (prompts encoded once per episode; next state = the following step's, or the
    final observation's)."""
    from coso_jax.envs.web import text_interface

    iface = text_interface()

    def start(slot: int, spec: tuple[str, int]):
        env = pool.lease(spec[0])
        env.unwrapped.observe_elements = prompt_fn.elements > 0  # the prompt's tap targets come from the info
        obs, info = env.reset(seed=int(spec[1]))
        return env, obs, info

    def answer(views: list[SlotView]) -> list[Answer]:
        images = np.stack([resize_observation(v.obs, image_size) for v in views])
        out = act([v.prompt for v in views], images, views)
        return [Answer(text, (ids, mask, images[i], entropies)) for i, (text, ids, mask, entropies) in enumerate(out)]

    finished = play_episodes(episodes, num_slots, start=start, act=answer, prompt=prompt_fn,
                             parse=lambda text, info: iface.parse(text, None, info),
                             finish=lambda slot, spec, env: pool.release(spec[0], env),
                             env_action=lambda parsed: parsed, record=True)
    encoder = prompt_fn.encoder
    results = []
    for ep in finished:
        prompts = [s.prompt for s in ep.steps]
        if encoder is not None:
            ids, mask = encoder.encode_text(prompts + [prompt_fn(ep.final_info)])
        else:  # demonstrations collected before a tokenizer exists keep only their texts
            ids, mask = np.zeros((len(prompts) + 1, 1), np.int32), np.zeros((len(prompts) + 1, 1), np.bool_)
        images = np.stack([s.answer.extra[2] for s in ep.steps] + [resize_observation(ep.final_obs, image_size)])
        transitions = {
            "prompt_ids": ids[:-1], "prompt_mask": mask[:-1], "image": images[:-1],
            "next_prompt_ids": ids[1:], "next_prompt_mask": mask[1:], "next_image": images[1:],
            "response_ids": np.stack([s.answer.extra[0] for s in ep.steps]),
            "response_mask": np.stack([s.answer.extra[1] for s in ep.steps]),
            "token_entropies": np.stack([s.answer.extra[3] for s in ep.steps]).astype(np.float32),
            "reward": np.asarray([s.reward for s in ep.steps], np.float32),
            "done": np.asarray([s.done for s in ep.steps], np.bool_),
            "valid": np.asarray([bool(s.parsed.valid) for s in ep.steps], np.bool_),
            "label": np.asarray([-1 if s.parsed.label is None else int(s.parsed.label) for s in ep.steps], np.int32),
        }
        results.append(WebEpisode(ep.spec[0], int(ep.spec[1]), bool(ep.final_info.get("success")), ep.length,
                                  transitions, [s.answer.text for s in ep.steps], prompts))
    return results


def listed_tap(action: Any, targets: Sequence[Any], limit: int) -> Any:
    """`action` with a tap moved onto the point the prompt lists for the tapped element: the first
    `limit` tap targets whose box holds the tap, the one whose centre is nearest. Anything else
    (not a tap, or an element the prompt does not list) is returned unchanged."""
    from coso_jax.envs.web.autoui import AutoUIAction
    from coso_jax.envs.web.browser import TASK_HEIGHT, TASK_WIDTH

    if limit <= 0 or not action.is_tap:
        return action
    px, py = action.touch_point[0] * TASK_WIDTH, action.touch_point[1] * TASK_HEIGHT
    hits = [t for t in list(targets)[:limit]
            if t.box[0] <= px <= t.box[0] + t.box[2] and t.box[1] <= py <= t.box[1] + t.box[3]]
    if not hits:
        return action
    best = min(hits, key=lambda t: (t.box[0] + t.box[2] / 2 - px) ** 2 + (t.box[1] + t.box[3] / 2 - py) ** 2)
    return AutoUIAction.tap(*best.point)


def solver_actor(encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None, max_new_tokens: int,
                 imperfect_frac: float, rng: np.random.Generator, cot: bool, elements: int = 0) -> WebActor:
    """A `WebActor` that plays the scripted DOM solvers (with a fraction `imperfect_frac` of random
    taps, `solvers.random_tap`: on a listed target when the prompt lists them), returning the AutoUI
    answer text and its tokens (`encode(texts) -> (ids, mask)`; zeros without a tokenizer). A scripted
    answer has no policy entropy: its token entropies are 0. With `elements` = K > 0 (the prompt lists
    K tap targets) a solver's tap goes to the point the prompt lists for its element (`listed_tap`), so
    the demonstrations copy coordinates from the prompt."""
    from coso_jax.envs.web.autoui import ActionType, AutoUIAction, format_answer
    from coso_jax.envs.web.solvers import random_tap, solve

    def act(prompts, images, views):
        texts = []
        for view in views:
            if imperfect_frac > 0 and rng.random() < imperfect_frac:
                thought, action = random_tap(rng, view.info.get("elements", ()), elements)
            else:
                try:
                    thought, action = solve(view.spec[0], view.env.unwrapped.page())
                    action = listed_tap(action, view.info.get("elements", ()), elements)
                except Exception:  # a finished slot repeated as filler, or a page in flux
                    thought, action = "I wait.", AutoUIAction(ActionType.Idle)
            texts.append(format_answer(thought, action) if cot else action.to_text())
        if encode is None:
            ids, mask = np.zeros((len(texts), max_new_tokens), np.int32), np.zeros((len(texts), max_new_tokens), np.bool_)
        else:
            ids, mask = encode(texts)
        return [(t, ids[i], mask[i], np.zeros(max_new_tokens, np.float32)) for i, t in enumerate(texts)]

    return act


def stack_episodes(episodes: Sequence[WebEpisode]) -> dict[str, np.ndarray]:
    keys = episodes[0].transitions.keys()
    return {k: np.concatenate([e.transitions[k] for e in episodes]) for k in keys}
