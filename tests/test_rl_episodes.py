"""The episode runner and the PPO rollout (coso_jax/rl/episodes.py) on scripted envs and policies."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coso_jax.rl.episodes import Answer, EpisodeStats, by_task_type, episode_success, play_episodes


@dataclasses.dataclass
class Parsed:
    action: int
    valid: bool = True
    label: int | None = 0


class CountdownEnv:
    """An episode of `spec` steps; reward 1 on the last; the obs is the steps left."""

    def __init__(self):
        self.left = 0

    def reset(self, spec):
        self.left = spec
        return np.array([self.left]), {"left": self.left}

    def step(self, action):
        assert action == 7  # what env_action made of the parsed answer
        self.left -= 1
        done = self.left == 0
        return np.array([self.left]), float(done), done, False, {"left": self.left}


def test_play_episodes_runs_every_spec_to_its_end_with_a_fixed_batch():
    envs = [CountdownEnv(), CountdownEnv()]
    batches, finished_slots = [], []

    def start(slot, spec):
        obs, info = envs[slot].reset(spec)
        return envs[slot], obs, info

    def act(views):
        batches.append([v.info["left"] for v in views])
        return [Answer(f"go {v.spec}") for v in views]

    episodes = play_episodes([3, 1, 2], 2, start=start, act=act, prompt=lambda info: f"left {info['left']}",
                             parse=lambda text, info: Parsed(action=int(text.split()[1])),
                             finish=lambda slot, spec, env: finished_slots.append((slot, spec)),
                             env_action=lambda parsed: 7, record=True)
    assert [(e.spec, e.length, e.episode_return) for e in episodes] == [(1, 1, 1.0), (3, 3, 1.0), (2, 2, 1.0)]
    assert all(len(b) == 2 for b in batches)  # the policy always sees num_slots inputs
    assert finished_slots == [(1, 1), (0, 3), (1, 2)]
    assert [s.prompt for s in episodes[1].steps] == ["left 3", "left 2", "left 1"]
    assert [s.answer.text for s in episodes[1].steps] == ["go 3"] * 3
    assert episodes[1].final_info == {"left": 0} and episodes[1].success


def test_play_episodes_releases_envs_when_interrupted():
    released = []

    def act(views):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        play_episodes([2, 2], 2, start=lambda slot, spec: (CountdownEnv(), np.zeros(1), {"left": spec}), act=act,
                      prompt=str, parse=None, finish=lambda slot, spec, env: released.append(slot))
    assert released == [0, 1]


def test_episode_stats_and_task_types():
    assert episode_success(-3.0, {"won": True}) and not episode_success(12.0, {"won": False})
    assert episode_success(1.0, {}) and not episode_success(0.0, {})  # gym_cards: return > 0
    stats = EpisodeStats()
    for ret, info in [(1.0, {"task_type": "pick", "won": True, "progress": 1.0}), (0.0, {"task_type": "pick"}),
                      (2.0, {"task_type": "heat", "won": False})]:
        stats.add(ret, 5, info)
    summary = stats.summary()
    assert summary["episodes"] == 3 and summary["success_rate"] == pytest.approx(1 / 3)
    assert summary["mean_progress"] == 1.0
    groups = by_task_type(stats)
    assert list(groups) == ["heat", "pick"] and groups["pick"]["successes"] == 1
    assert np.isnan(groups["heat"]["mean_progress"])
    empty = EpisodeStats().summary()
    assert empty["episodes"] == 0 and np.isnan(empty["success_rate"]) and "by_task_type" not in empty
