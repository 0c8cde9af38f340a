"""One headless Chromium per web env, driven through MiniWoB++ (the `miniwob` package).

`MiniWoBBrowser(task, config)` launches Chromium + ChromeDriver once and reuses them across
episodes: `reset(seed)` starts a seeded episode of the task page, `execute(command)` runs one
low-level `BrowserCommand` (from `autoui.to_browser_commands`), `screenshot()` returns the task
area as uint8 `[210 * s, 160 * s, 3]` (s = device scale factor, 2 by default -> 320x420),
`metadata()` the episode status (done, raw_reward, ...), `page()` the utterance, fields and DOM.

What this module does beyond miniwob (see ../shared/research/miniwob.md):
- Chromium flags: miniwob hard-codes its ChromeOptions, so `_Instance.create_driver` replaces its
  driver construction: headless, no GPU/sandbox/dev-shm, `--force-device-scale-factor=s` together
  with a window size large enough that the 210-px task area is fully rendered.
- The 10-second episode clock of MiniWoB's core.js is lifted (`EPISODE_MAX_TIME`), so a slow
  policy never times out; success uses `raw_reward`, which the clock does not scale.
- Clean shutdown: `close()`; an `atexit` hook and a SIGTERM/SIGHUP handler close every live
  browser; and ChromeDriver and Chromium are started through small generated wrapper scripts that
  run them under `setpriv --pdeathsig KILL`, so even a SIGKILLed Python process leaves no orphans
  (the kernel kills ChromeDriver when the thread that launched it dies, and Chromium when
  ChromeDriver dies). Caveat: "the thread that launched it" is literal; create browsers in a
  long-lived thread (or set `BrowserConfig.kill_with_parent=False`).

Nothing here is imported by `coso_jax.envs` itself: the selenium/miniwob imports happen only when
a browser is launched, so the package works without them (`browser_unavailable_reason()` says
what is missing).
"""
from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
import weakref
from typing import Any

import numpy as np

from coso_jax.envs.web.autoui import BrowserCommand, CommandKind

__all__ = [
    "BrowserConfig",
    "BrowserUnavailableError",
    "BrowserCrashedError",
    "MiniWoBBrowser",
    "PageState",
    "browser_unavailable_reason",
    "close_all_browsers",
    "live_browsers",
    "TASK_WIDTH",
    "TASK_HEIGHT",
]

log = logging.getLogger(__name__)

# MiniWoB task area in CSS pixels (miniwob.constants.TASK_WIDTH / TASK_HEIGHT).
TASK_WIDTH = 160
TASK_HEIGHT = 210
# core.EPISODE_MAX_TIME after the lift (ms): far longer than any horizon of model calls.
EPISODE_MAX_TIME_MS = 3_600_000
_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_DRAGGABLE_JS = """
var el = document.elementFromPoint(arguments[0], arguments[1]);
while (el && el !== document.body) {
  var c = (el.className && el.className.baseVal === undefined) ? String(el.className) : '';
  if (el.draggable || /ui-slider-handle|ui-draggable|ui-sortable-handle|ui-resizable-handle/.test(c)) return true;
  el = el.parentElement;
}
return false;
"""


class BrowserUnavailableError(RuntimeError):
    """Chromium, ChromeDriver, selenium or miniwob is missing (the message says which)."""


class BrowserCrashedError(RuntimeError):
    """The browser session died (Chromium crashed or was killed); the env relaunches it on reset."""


@dataclasses.dataclass(frozen=True)
class BrowserConfig:
    """How the headless browser is launched.

    Attributes:
      chromium: Chromium binary; default `$COSO_CHROMIUM`, else `$MINIWOB_CHROME_BINARY`, else the
        first of chromium / chromium-browser / google-chrome on PATH.
      chromedriver: ChromeDriver binary; default `$COSO_CHROMEDRIVER`, `$MINIWOB_CHROMEDRIVER`, or
        `chromedriver` on PATH. Its major version must match Chromium's.
      scale_factor: device scale factor; screenshots are `[210 * s, 160 * s, 3]` (CSS coordinates
        of actions are unchanged).
      window_size: browser window (CSS px); must be large enough at this scale factor for the whole
        210-px task area to render (800x600 works for s <= 3).
      extra_flags: more Chromium command-line flags.
      kill_with_parent: run ChromeDriver/Chromium under `setpriv --pdeathsig KILL` (see the module
        docstring); ignored where `setpriv` is missing.
      wait_ms: pause after every command (ms), for pages with animations.
    """

    chromium: str | None = None
    chromedriver: str | None = None
    scale_factor: int = 2
    window_size: tuple[int, int] = (800, 600)
    extra_flags: tuple[str, ...] = ()
    kill_with_parent: bool = True
    wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale_factor, int) and 1 <= self.scale_factor <= 4):
            raise ValueError(f"scale_factor must be an int in 1..4, got {self.scale_factor!r}")

    @property
    def screen_shape(self) -> tuple[int, int, int]:
        """Shape of a screenshot: (height, width, 3)."""
        return (TASK_HEIGHT * self.scale_factor, TASK_WIDTH * self.scale_factor, 3)

    def resolve(self) -> tuple[str, str]:
        """(chromium, chromedriver) absolute paths; raises BrowserUnavailableError naming what is missing."""
        chromium = (self.chromium or os.environ.get("COSO_CHROMIUM")
                    or os.environ.get("MINIWOB_CHROME_BINARY"))
        if not chromium:
            chromium = next((p for p in map(shutil.which, _CHROMIUM_NAMES) if p), None)
        driver = (self.chromedriver or os.environ.get("COSO_CHROMEDRIVER")
                  or os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver"))
        missing = []
        if not chromium or not os.access(chromium, os.X_OK):
            missing.append(f"chromium (looked for {chromium or ', '.join(_CHROMIUM_NAMES)})")
        if not driver or not os.access(driver, os.X_OK):
            missing.append(f"chromedriver (looked for {driver or 'chromedriver on PATH'})")
        if missing:
            raise BrowserUnavailableError(
                "cannot launch the web env browser: missing " + " and ".join(missing)
                + ". On Debian/Ubuntu containers: apt-get install -y chromium chromium-driver")
        return os.path.abspath(chromium), os.path.abspath(driver)


def browser_unavailable_reason(config: BrowserConfig | None = None) -> str | None:
    """None when a browser can be launched, else why not (for pytest skips and error messages)."""
    for module, pip_name in (("selenium", "selenium"), ("miniwob", "miniwob==1.1.0")):
        if importlib.util.find_spec(module) is None:
            return f"python package {module!r} is not installed (pip install {pip_name})"
    try:
        (config or BrowserConfig()).resolve()
    except BrowserUnavailableError as e:
        return str(e)
    return None


@dataclasses.dataclass(frozen=True)
class PageState:
    """What a DOM-reading solver sees: the task utterance, miniwob's parsed fields, the DOM.

    `dom` is a tuple of dicts (miniwob's flattened DOM: ref, parent, tag, text, value, id, classes,
    left, top, width, height in CSS px, flags ...).
    """

    utterance: str
    fields: tuple[tuple[str, str], ...]
    dom: tuple[dict[str, Any], ...]


# --------------------------------------------------------------------------------------------
# Process hygiene: wrapper scripts, live-browser registry, atexit and signal handlers.

_LIVE: "weakref.WeakSet[MiniWoBBrowser]" = weakref.WeakSet()
_LOCK = threading.Lock()
_WRAPPER_DIR: str | None = None
_HOOKS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def live_browsers() -> list["MiniWoBBrowser"]:
    """Browsers launched in this process and not yet closed."""
    return [b for b in list(_LIVE) if b.alive]


def close_all_browsers() -> None:
    """Closes every live browser of this process (the atexit / signal hook; safe to call twice)."""
    for b in list(_LIVE):
        try:
            b.close()
        except Exception:  # shutting down: never let one browser block the others
            log.exception("error while closing a web env browser")


def _on_signal(signum: int, frame: Any) -> None:
    close_all_browsers()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    # Default action: terminate with the signal, as if no handler had been installed.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    with _LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
    atexit.register(close_all_browsers)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    for sig in (signal.SIGTERM, signal.SIGHUP):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue
        _PREVIOUS_HANDLERS[sig] = current if current is not None else signal.SIG_DFL
        signal.signal(sig, _on_signal)


def _wrapper(name: str, target: str, kill_with_parent: bool) -> str:
    """Path of a generated `sh` wrapper that execs `target` (under setpriv --pdeathsig KILL if asked)."""
    global _WRAPPER_DIR
    setpriv = shutil.which("setpriv") if kill_with_parent else None
    if not setpriv:
        return target
    with _LOCK:
        if _WRAPPER_DIR is None:
            # One fixed per-user dir, reused by every process (two tiny scripts; nothing to leak
            # when a process is killed). Files are written atomically, so processes may race.
            _WRAPPER_DIR = os.path.join(tempfile.gettempdir(), f"coso_web_wrappers_{os.getuid()}")
            os.makedirs(_WRAPPER_DIR, mode=0o700, exist_ok=True)
    tag = hashlib.sha1(f"{setpriv}\0{target}".encode()).hexdigest()[:12]
    path = os.path.join(_WRAPPER_DIR, f"{name}-{tag}.sh")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(f'#!/bin/sh\nexec {setpriv} --pdeathsig KILL "{target}" "$@"\n')
        os.chmod(tmp, stat.S_IRWXU)
        os.replace(tmp, path)
    return path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:  # children of every thread (ChromeDriver launches Chromium from a worker thread)
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc; empty elsewhere)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(_children(p))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------------------------


def _make_instance_class():
    """miniwob's SeleniumInstance with our driver construction (imported lazily)."""
    from miniwob.selenium_instance import SeleniumInstance
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.wait import WebDriverWait

    class _Instance(SeleniumInstance):
        config: BrowserConfig

        def create_driver(self) -> None:
            chromium, chromedriver = self.config.resolve()
            options = webdriver.ChromeOptions()
            w, h = self.config.window_size
            for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update",
                         "--no-first-run", "--disable-sync", "--disable-default-apps",
                         "--disable-extensions", "--mute-audio", "--no-default-browser-check",
                         "--hide-scrollbars", f"--force-device-scale-factor={self.config.scale_factor}",
                         f"--window-size={w},{h}", *self.config.extra_flags):
                options.add_argument(flag)
            kill = self.config.kill_with_parent
            options.binary_location = _wrapper("chromium", chromium, kill)
            service = Service(executable_path=_wrapper("chromedriver", chromedriver, kill),
                              log_output=os.devnull)
            self.driver = webdriver.Chrome(service=service, options=options)
            self.driver.implicitly_wait(5)
            self.driver.get(self.url)
            try:
                WebDriverWait(self.driver, 10).until(
                    EC.element_to_be_clickable((By.ID, self.SYNC_SCREEN_ID)))
            except TimeoutException as e:
                raise BrowserUnavailableError(f"MiniWoB page {self.url} did not load within 10 s") from e
            self.inner_width, self.inner_height = self.driver.execute_script(
                "return [window.innerWidth, window.innerHeight];")

    return _Instance


class MiniWoBBrowser:
    """One headless Chromium showing one MiniWoB++ task page, reused across episodes.

    Args:
      task: MiniWoB task name, e.g. "click-button" (FlightWoB tasks "flight.*" are not supported).
      config: launch options (default `BrowserConfig()`).
      data_mode: miniwob data mode ("train" / "test"), used by a few tasks.

    Raises:
      BrowserUnavailableError: selenium / miniwob / chromium / chromedriver missing, or the page
        did not load.
    """

    def __init__(self, task: str, config: BrowserConfig | None = None, *, data_mode: str = "train") -> None:
        reason = browser_unavailable_reason(config)
        if reason:
            raise BrowserUnavailableError(reason)
        if task.startswith("flight."):
            raise ValueError(f"FlightWoB task {task!r} is not supported (needs a 375x667 screen)")
        from miniwob.selenium_instance import HTML_DIR

        if not (HTML_DIR / "miniwob" / f"{task}.html").exists():
            raise ValueError(f"unknown MiniWoB task {task!r} (no {task}.html in {HTML_DIR / 'miniwob'})")
        self.task = task
        self.config = config or BrowserConfig()
        self._closed = False
        self._pids: list[int] = []
        self._instance = None
        _install_hooks()
        _LIVE.add(self)
        cls = _make_instance_class()
        instance = cls(index=0, subdomain=task, headless=True, data_mode=data_mode,
                       wait_ms=self.config.wait_ms)
        instance.config = self.config
        instance.record_screenshots = False  # we take our own, full-resolution screenshot
        self._instance = instance
        try:
            instance.create_driver()
            self._pids = _process_tree(instance.driver.service.process.pid)
            self._lift_clock()
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed

    @property
    def pids(self) -> list[int]:
        """ChromeDriver and Chromium process ids recorded at launch (for leak checks)."""
        return list(self._pids)

    def close(self) -> None:
        """Quits ChromeDriver and Chromium and kills any process of theirs still alive. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        instance, self._instance = self._instance, None
        driver = getattr(instance, "driver", None) if instance is not None else None
        if driver is not None:
            pids = _process_tree(driver.service.process.pid) if driver.service.process else []
            self._pids = sorted(set(self._pids) | set(pids))
            try:
                driver.quit()
            except Exception as e:  # the session may already be dead
                log.debug("driver.quit failed: %s", e)
        deadline = time.monotonic() + 3.0
        for pid in self._pids:
            if not pid_alive(pid):
                continue
            if "chrom" not in _cmdline(pid) and "setpriv" not in _cmdline(pid):
                continue  # pid reused by an unrelated process
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for pid in self._pids:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(pid) and "chrom" in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "MiniWoBBrowser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    # -- episode -------------------------------------------------------------------------------
    def _driver(self):
        if self._closed or self._instance is None:
            raise BrowserCrashedError(f"the browser of task {self.task!r} is closed")
        return self._instance.driver

    def _lift_clock(self) -> None:
        self._driver().execute_script(f"core.EPISODE_MAX_TIME = {EPISODE_MAX_TIME_MS};")

    def reset(self, seed: int) -> PageState:
        """Starts a new episode with `seed` (deterministic layout and utterance per seed)."""
        with self._guard():
            self._lift_clock()
            obs: list[Any] = [None]
            infos: list[Any] = [None]
            self._instance.reset(obs, infos, int(seed))
            return self._page_from(obs[0])

    def page(self) -> PageState:
        """Utterance, fields and the current DOM."""
        with self._guard():
            obs, _ = self._instance.get_observation(use_cached_fields=True)
            return self._page_from(obs)

    @staticmethod
    def _page_from(obs: dict[str, Any]) -> PageState:
        return PageState(utterance=str(obs["utterance"]), fields=tuple(obs["fields"]),
                         dom=tuple(obs["dom_elements"]))

    def metadata(self) -> dict[str, Any]:
        """{"done", "raw_reward", "env_reward", "reason"} of the current episode."""
        with self._guard():
            return dict(self._instance.get_metadata())

    def screenshot(self) -> np.ndarray:
        """The task area as uint8 `[210 * s, 160 * s, 3]` (one clipped PNG via the DevTools protocol)."""
        from PIL import Image

        with self._guard():
            shot = self._driver().execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png",
                "clip": {"x": 0, "y": 0, "width": TASK_WIDTH, "height": TASK_HEIGHT, "scale": 1},
            })
        img = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
        h, w, _ = self.config.screen_shape
        if arr.shape[:2] != (h, w):  # e.g. a window too small for the scale factor
            out = np.zeros((h, w, 3), np.uint8)
            out[:min(h, arr.shape[0]), :min(w, arr.shape[1])] = arr[:h, :w]
            arr = out
        return arr

    def is_draggable(self, x: float, y: float) -> bool:
        """Whether the element at CSS point (x, y) is a drag handle (slider, draggable...)."""
        with self._guard():
            return bool(self._driver().execute_script(_DRAGGABLE_JS, float(x), float(y)))

    def execute(self, command: BrowserCommand) -> None:
        """Runs one low-level command (CSS px coordinates) in the page."""
        from miniwob import selenium_actions as sa
        from miniwob.constants import DEFAULT_SCROLL_AMOUNT, DEFAULT_SCROLL_TIME

        with self._guard():
            driver = self._driver()
            kind = command.kind
            if kind is CommandKind.NONE:
                pass
            elif kind is CommandKind.CLICK:
                sa.execute_click_coords(command.x, command.y, driver)
            elif kind is CommandKind.MOUSEDOWN:
                sa.execute_mousedown_coords(command.x, command.y, driver)
            elif kind is CommandKind.MOUSEUP:
                sa.execute_mouseup_coords(command.x, command.y, driver)
            elif kind in (CommandKind.SCROLL_UP, CommandKind.SCROLL_DOWN):
                amount = DEFAULT_SCROLL_AMOUNT * (-1 if kind is CommandKind.SCROLL_UP else 1)
                sa.execute_scroll_coords(command.x, command.y, amount, DEFAULT_SCROLL_TIME, driver)
            elif kind is CommandKind.TYPE:
                if command.text:
                    sa.execute_type_text(command.text, driver)
            elif kind is CommandKind.KEY:
                sa.execute_press_key(command.text, driver)
            else:  # pragma: no cover - CommandKind is closed
                raise ValueError(f"unknown browser command {command!r}")
            if self.config.wait_ms:
                time.sleep(self.config.wait_ms / 1000.0)

    def _guard(self):
        return _SessionGuard(self)


class _SessionGuard:
    """Turns a dead WebDriver session into BrowserCrashedError (and closes the remains)."""

    def __init__(self, browser: MiniWoBBrowser) -> None:
        self.browser = browser

    def __enter__(self) -> None:
        if not self.browser.alive:
            raise BrowserCrashedError(f"the browser of task {self.browser.task!r} is closed")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from selenium.common.exceptions import InvalidSessionIdException, WebDriverException

        dead = isinstance(exc, InvalidSessionIdException) or (
            isinstance(exc, (WebDriverException, ConnectionError, OSError))
            and any(s in str(exc).lower() for s in ("session deleted", "invalid session", "disconnected",
                                                     "not reachable", "connection refused", "max retries")))
        if dead:
            self.browser.close()
            raise BrowserCrashedError(f"the browser of task {self.browser.task!r} died: {exc}") from exc
        return False
