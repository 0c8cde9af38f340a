"""Named task suites of the web envs, mirroring the paper's two Android-in-the-Wild task sets.

- "general" (AitW General): single-page tasks finished in one to three actions (tap a button,
  link, tab, option or dialog control; focus or fill one text field). Horizon 10.
- "shopping" (AitW Web Shopping): multi-step form tasks: log in, fill two password fields, pick
  an item from an autocomplete menu, search and page through results. Horizon 20.

Splits: every task of a suite appears in both splits; the split is over episode seeds (MiniWoB
draws each episode's page and instruction from its seed, so different seeds are different
instructions of the same task, as AitW's test set holds new instructions for the same apps).
  train: (task, seed) for seed in 0 .. num_train_seeds - 1, for every task
  test:  `num_test` episodes, task round-robin, seeds TEST_SEED_BASE + i (disjoint from train)
Both lists are fixed (no RNG), so every run evaluates on the same episodes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Suite", "TaskSpec", "SUITES", "TASKS", "TEST_SEED_BASE", "get_suite", "task_spec"]

TEST_SEED_BASE = 1_000_000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One MiniWoB task as our envs run it.

    Attributes:
      name: MiniWoB task name (the env id is `coso_jax/web-<name>-v0`).
      horizon: steps before truncation.
      type_settle_ms: pause after typing (pages that react to keys with a delay).
    """

    name: str
    horizon: int
    type_settle_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named list of tasks with fixed train/test episode splits (see the module docstring)."""

    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    num_train_seeds: int = 200
    num_test: int = 96

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def horizon(self) -> int:
        return max(t.horizon for t in self.tasks)

    def env_ids(self) -> tuple[str, ...]:
        return tuple(f"coso_jax/web-{t.name}-v0" for t in self.tasks)

    def train_episodes(self) -> list[tuple[str, int]]:
        """All (task, seed) training episodes, seed-major (every task at seed 0, then seed 1, ...)."""
        return [(t.name, s) for s in range(self.num_train_seeds) for t in self.tasks]

    def test_episodes(self) -> list[tuple[str, int]]:
        """The fixed test episodes: task round-robin, seeds TEST_SEED_BASE + i."""
        n = len(self.tasks)
        return [(self.tasks[i % n].name, TEST_SEED_BASE + i) for i in range(self.num_test)]

    def episodes(self, split: str) -> list[tuple[str, int]]:
        if split == "train":
            return self.train_episodes()
        if split == "test":
            return self.test_episodes()
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def sample_train(self, rng: np.random.Generator) -> tuple[str, int]:
        """One training episode drawn uniformly from the train split."""
        task = self.tasks[int(rng.integers(len(self.tasks)))].name
        return task, int(rng.integers(self.num_train_seeds))


GENERAL = Suite(
    name="general",
    description="single-page tasks, one to three actions (AitW General analogue)",
    tasks=tuple(TaskSpec(name, 10) for name in (
        "click-button", "click-link", "click-dialog", "click-tab", "click-option",
        "click-checkboxes", "focus-text", "enter-text")),
)
SHOPPING = Suite(
    name="shopping",
    description="multi-step forms: login, passwords, autocomplete, search with pages (AitW Web Shopping analogue)",
    tasks=(TaskSpec("login-user", 20), TaskSpec("enter-password", 20),
           TaskSpec("use-autocomplete", 20, type_settle_ms=400.0), TaskSpec("search-engine", 20)),
)
SUITES: dict[str, Suite] = {s.name: s for s in (GENERAL, SHOPPING)}
TASKS: dict[str, TaskSpec] = {t.name: t for s in SUITES.values() for t in s.tasks}


def get_suite(name: str) -> Suite:
    """A suite by name ("general", "shopping"; also "web/general")."""
    key = name.split("/")[-1].lower()
    if key not in SUITES:
        raise ValueError(f"unknown web task suite {name!r}; known: {sorted(SUITES)}")
    return SUITES[key]


def task_spec(name_or_id: str) -> TaskSpec:
    """The TaskSpec of a task by name ("click-button", "web/click-button") or id ("coso_jax/web-click-button-v0")."""
    name = name_or_id.split("/")[-1]
    if name.endswith("-v0"):
        name = name[:-3]
    if name.startswith("web-") and name not in TASKS:
        name = name[4:]
    if name not in TASKS:
        raise ValueError(f"unknown web task {name_or_id!r}; known: {sorted(TASKS)}")
    return TASKS[name]
