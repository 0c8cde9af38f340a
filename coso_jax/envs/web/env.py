"""`WebControlEnv`: one MiniWoB++ task in a real headless browser, driven by AutoUI action text.

  env = gym.make("coso_jax/web-click-button-v0")        # after `import coso_jax.envs.web`
  obs, info = env.reset(seed=3)                          # obs: uint8 [420, 320, 3]
  obs, reward, terminated, truncated, info = env.step(answer_text)

- Observation: the task screen, uint8 `[210 * s, 160 * s, 3]` (s = `BrowserConfig.scale_factor`,
  2 by default -> 320x420), the yellow instruction banner included. After the episode ends the
  observation is all zeros (the page has moved on to MiniWoB's sync cover).
- Action: the policy's answer text (parsed with `autoui.parse_autoui`; an invalid answer is an Idle
  step), an `AutoUIAction`, or the text interface's `WebParsedAction` of an answer.
- Reward: 1.0 on the step where MiniWoB ends the episode with `raw_reward == 1` (task solved),
  else 0.0 (sparse and terminal, like DigiRL). MiniWoB ends an episode on the first *decisive*
  action, right or wrong; `terminated` is True then, and also on STATUS_TASK_COMPLETE /
  TASK_IMPOSSIBLE (success only if the task was already solved, which cannot happen in MiniWoB, so
  these end the episode as a failure).
- `truncated` is True when `horizon` steps passed without termination.
- `info`: "task", "seed", "goal" (the utterance), "step" (steps taken), "horizon", "history"
  (descriptions of the actions taken so far, for the prompt), and after a step also "valid",
  "action_type" (ActionType value), "action" (the canonical AutoUI text of what was executed),
  "success", "raw_reward", "env_reward" (MiniWoB's time-scaled reward; logs only), "reason",
  "crashed" (the browser died: the episode is truncated and the next reset relaunches it).
  With `observe_elements=True` also "elements": the page's tap targets (`autoui.tap_targets`, for
  prompts that list them; read from the DOM after every step, empty once the episode has ended).

`reset(seed=s)` starts the task's episode number `s` (the same page and utterance for the same
seed, in every run); without a seed the env draws one from its own RNG.
The browser is any object with `MiniWoBBrowser`'s methods (`backend_factory`), so tests can run
the env against a fake page.
"""
from __future__ import annotations

import logging
import string
import time
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

from coso_jax.envs.web.autoui import (
    ActionType,
    AutoUIAction,
    BrowserCommand,
    CommandKind,
    WebParsedAction,
    format_autoui,
    parse_autoui,
    tap_targets,
    to_browser_commands,
)
from coso_jax.envs.web.browser import TASK_HEIGHT, TASK_WIDTH, BrowserConfig, BrowserCrashedError, PageState

__all__ = ["WebControlEnv", "Backend", "DEFAULT_HORIZON"]

log = logging.getLogger(__name__)
DEFAULT_HORIZON = 10
MAX_ANSWER_CHARS = 4096


class Backend(Protocol):
    """What the env needs from a browser (`browser.MiniWoBBrowser` implements it)."""

    alive: bool

    def reset(self, seed: int) -> PageState: ...
    def page(self) -> PageState: ...
    def metadata(self) -> dict[str, Any]: ...
    def screenshot(self) -> np.ndarray: ...
    def is_draggable(self, x: float, y: float) -> bool: ...
    def execute(self, command: BrowserCommand) -> None: ...
    def close(self) -> None: ...


def _default_factory(task: str, config: BrowserConfig, data_mode: str) -> Backend:
    from coso_jax.envs.web.browser import MiniWoBBrowser

    return MiniWoBBrowser(task, config, data_mode=data_mode)


class WebControlEnv(gym.Env):
    """One MiniWoB++ task with the AutoUI action space (see the module docstring).

    Args:
      task: MiniWoB task name, e.g. "click-button".
      horizon: steps per episode before truncation (10: AitW General; 20 for multi-step suites).
      config: browser launch options.
      data_mode: MiniWoB's data mode ("train" / "test"; a few tasks draw different data).
      type_settle_ms: pause after typing before the screenshot, for pages that react to keys with a
        delay (autocomplete menus).
      backend_factory: `(task, config, data_mode) -> Backend`; default launches `MiniWoBBrowser`
        lazily on the first reset.
      observe_elements: put the page's tap targets in `info["elements"]` (one more DOM read per step).
        A plain attribute: the DigiRL runner switches it on for envs it leases when its prompt lists them.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, task: str, horizon: int = DEFAULT_HORIZON, config: BrowserConfig | None = None, *,
                 data_mode: str = "train", type_settle_ms: float = 0.0,
                 backend_factory: Callable[[str, BrowserConfig, str], Backend] | None = None,
                 render_mode: str | None = None, observe_elements: bool = False) -> None:
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task = task
        self.horizon = horizon
        self.config = config or BrowserConfig()
        self.data_mode = data_mode
        self.type_settle_ms = float(type_settle_ms)
        self.render_mode = render_mode
        self.observe_elements = bool(observe_elements)
        self._factory = backend_factory or _default_factory
        self._backend: Backend | None = None
        shape = self.config.screen_shape
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.action_space = gym.spaces.Text(max_length=MAX_ANSWER_CHARS, min_length=0,
                                            charset=string.printable)
        self._obs = np.zeros(shape, np.uint8)
        self._page: PageState | None = None
        self._info: dict[str, Any] = {}
        self._steps = 0
        self._done = True
        self._history: list[str] = []

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        episode_seed = int(seed) if seed is not None else int(self.np_random.integers(2**31 - 1))
        backend = self._ensure_backend()
        try:
            self._page = backend.reset(episode_seed)
            self._obs = backend.screenshot()
        except BrowserCrashedError:
            log.warning("web env %s: browser died during reset; relaunching", self.task)
            self._close_backend()
            backend = self._ensure_backend()
            self._page = backend.reset(episode_seed)
            self._obs = backend.screenshot()
        self._steps = 0
        self._done = False
        self._history = []
        self._info = {"task": self.task, "seed": episode_seed, "goal": self._page.utterance, "step": 0,
                      "horizon": self.horizon, "history": []}
        extra = {"elements": tap_targets(self._page.dom, width=TASK_WIDTH, height=TASK_HEIGHT)} \
            if self.observe_elements else {}
        return self._obs.copy(), dict(self._info, history=list(self._history), **extra)

    def step(self, action: str | AutoUIAction | WebParsedAction):
        """One step with an answer text, an `AutoUIAction`, or the text interface's `WebParsedAction` of
        an answer (what the trainers pass: the answer is parsed once, by them)."""
        if self._done:
            raise RuntimeError(f"web env {self.task}: step() after the episode ended; call reset() first")
        if isinstance(action, WebParsedAction):
            parsed, valid = action.autoui, bool(action.valid)
        elif isinstance(action, AutoUIAction):
            parsed, valid = action, True
        else:
            parsed, valid = parse_autoui(action)
        backend = self._backend
        assert backend is not None
        self._steps += 1
        crashed = False
        meta: dict[str, Any] = {"done": False, "raw_reward": 0.0, "env_reward": 0.0, "reason": None}
        try:
            commands = to_browser_commands(parsed, width=TASK_WIDTH, height=TASK_HEIGHT,
                                           is_draggable=backend.is_draggable)
            for command in commands:
                backend.execute(command)
                if command.kind is CommandKind.TYPE and self.type_settle_ms > 0:
                    time.sleep(self.type_settle_ms / 1000.0)
            meta = backend.metadata()
        except BrowserCrashedError as e:
            log.warning("web env %s: browser died during a step (%s); truncating the episode", self.task, e)
            self._close_backend()
            crashed = True
        done = bool(meta.get("done"))
        raw = float(meta.get("raw_reward") or 0.0)
        success = done and raw >= 1.0 - 1e-6
        declared = parsed.action_type in (ActionType.TaskComplete, ActionType.TaskImpossible)
        terminated = (done or declared) and not crashed
        truncated = crashed or (not terminated and self._steps >= self.horizon)
        self._done = terminated or truncated
        elements: tuple = ()
        if done or crashed:
            self._obs = np.zeros(self.config.screen_shape, np.uint8)
        else:
            try:
                self._obs = backend.screenshot()
                if self.observe_elements:
                    self._page = backend.page()
                    elements = tap_targets(self._page.dom, width=TASK_WIDTH, height=TASK_HEIGHT)
            except BrowserCrashedError as e:
                log.warning("web env %s: browser died taking a screenshot (%s)", self.task, e)
                self._close_backend()
                crashed, truncated, terminated, self._done = True, True, False, True
                self._obs = np.zeros(self.config.screen_shape, np.uint8)
        self._history.append(parsed.describe() if valid else "invalid answer (no action)")
        info = dict(self._info)
        info.update(step=self._steps, history=list(self._history), valid=valid,
                    action_type=int(parsed.action_type), action=format_autoui(parsed) if valid else "",
                    success=success, raw_reward=raw, env_reward=float(meta.get("env_reward") or 0.0),
                    reason=meta.get("reason"), crashed=crashed)
        if self.observe_elements:
            info["elements"] = elements if not crashed else ()
        return self._obs.copy(), float(success), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        return self._obs.copy() if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        self._close_backend()
        super().close()

    # -- for solvers and tests -------------------------------------------------------------------
    def page(self) -> PageState:
        """The current utterance, fields and DOM (re-read from the browser)."""
        if self._backend is None or self._done:
            raise RuntimeError(f"web env {self.task}: no episode running; call reset() first")
        self._page = self._backend.page()
        return self._page

    @property
    def backend(self) -> Backend | None:
        """The live browser (None before the first reset or after close)."""
        return self._backend

    # -- internals -------------------------------------------------------------------------------
    def _ensure_backend(self) -> Backend:
        if self._backend is None or not self._backend.alive:
            self._close_backend()
            self._backend = self._factory(self.task, self.config, self.data_mode)
        return self._backend

    def _close_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.exception("web env %s: error while closing the browser", self.task)

    def __del__(self) -> None:
        try:
            self._close_backend()
        except Exception:
            pass
