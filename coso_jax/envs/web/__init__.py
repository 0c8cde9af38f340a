"""Web control envs: MiniWoB++ tasks in a real headless Chromium, with the AutoUI action space.

Importing this package registers one gymnasium id per task of the suites (`suites.py`):

  coso_jax/web-<task>-v0     e.g. coso_jax/web-click-button-v0, coso_jax/web-search-engine-v0

Registration is lazy: nothing here imports selenium or miniwob, and no browser starts before the
first `reset()`. Without them, `gym.make` still works and `reset()` raises
`BrowserUnavailableError` naming what is missing (`browser_unavailable_reason()` says it up front).

  import gymnasium as gym, coso_jax.envs.web as web
  env = gym.make("coso_jax/web-click-button-v0")
  iface = web.text_interface()           # prompt / parse / spans / labels (AutoUI format)
  obs, info = env.reset(seed=0)
  obs, r, term, trunc, info = env.step(answer)   # answer: the policy's text
"""
from __future__ import annotations

import gymnasium as gym

from coso_jax.envs.base import InvalidActionPolicy
from coso_jax.envs.web.autoui import (
    ActionType,
    AutoUIAction,
    AutoUIText,
    WebParsedAction,
    format_answer,
    format_autoui,
    parse_autoui,
)
from coso_jax.envs.web.browser import (
    BrowserConfig,
    BrowserCrashedError,
    BrowserUnavailableError,
    browser_unavailable_reason,
    close_all_browsers,
)
from coso_jax.envs.web.suites import SUITES, TASKS, Suite, TaskSpec, get_suite, task_spec

__all__ = [
    "ENV_IDS",
    "env_id",
    "make",
    "text_interface",
    "ActionType",
    "AutoUIAction",
    "AutoUIText",
    "WebParsedAction",
    "parse_autoui",
    "format_autoui",
    "format_answer",
    "BrowserConfig",
    "BrowserUnavailableError",
    "BrowserCrashedError",
    "browser_unavailable_reason",
    "close_all_browsers",
    "Suite",
    "TaskSpec",
    "SUITES",
    "TASKS",
    "get_suite",
    "task_spec",
]

ENV_IDS: dict[str, str] = {name: f"coso_jax/web-{name}-v0" for name in TASKS}
_ENTRY_POINT = "coso_jax.envs.web.env:WebControlEnv"


def _register() -> None:
    for name, spec in TASKS.items():
        if ENV_IDS[name] not in gym.registry:
            # No gymnasium TimeLimit: the env enforces its own horizon (and reports it in info).
            gym.register(id=ENV_IDS[name], entry_point=_ENTRY_POINT,
                         kwargs={"task": name, "horizon": spec.horizon, "type_settle_ms": spec.type_settle_ms})


def env_id(name_or_id: str) -> str:
    """'click-button', 'web/click-button' or the id -> 'coso_jax/web-click-button-v0'."""
    return ENV_IDS[task_spec(name_or_id).name]


def make(name_or_id: str, **kwargs) -> gym.Env:
    """`gym.make` of a web task by name or id; kwargs override the registered ones (horizon, config...)."""
    return gym.make(env_id(name_or_id), **kwargs)


def text_interface(invalid_policy: InvalidActionPolicy | None = None) -> AutoUIText:
    """The text interface shared by all web tasks (AutoUI format; invalid -> Idle, no penalty by default)."""
    return AutoUIText(invalid_policy=invalid_policy)


_register()
