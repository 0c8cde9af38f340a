"""DigiRL's replay of transitions (host arrays), each tagged with its trajectory."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coso_jax.rl.digirl.losses import mc_returns


class TransitionReplay:
    """Ring buffer of `capacity` transitions, each tagged with its trajectory id.

    Per transition: prompt_ids/mask [P], image u8 [S, S, 3], the same for the next state, response
    ids/mask [N], reward, done, mc_return, valid, label, traj_id, step (index in its trajectory),
    traj_return (the trajectory's undiscounted return: what the filters rank) and traj_success
    (1[last reward > 0]: the trajectory critic's label, as the reference's
    `traj[-1]["mc_return"] > 0`; equal to 1[return > 0] for the web env's terminal-only reward).
    Soft policy evaluation (`soft_backup`): entropy_bonus (H_B of the step's answer under the behaviour
    policy), and the soft versions of the returns, soft_mc_return and traj_soft_return, of the rewards
    r_t + alpha * H_B(y_t).
    """

    def __init__(self, capacity: int, prompt_len: int, max_new_tokens: int, image_size: int, seed: int = 0):
        shapes = {
            "prompt_ids": ((prompt_len,), np.int32), "prompt_mask": ((prompt_len,), np.bool_),
            "image": ((image_size, image_size, 3), np.uint8),
            "next_prompt_ids": ((prompt_len,), np.int32), "next_prompt_mask": ((prompt_len,), np.bool_),
            "next_image": ((image_size, image_size, 3), np.uint8),
            "response_ids": ((max_new_tokens,), np.int32), "response_mask": ((max_new_tokens,), np.bool_),
            "reward": ((), np.float32), "done": ((), np.bool_), "mc_return": ((), np.float32),
            "valid": ((), np.bool_), "label": ((), np.int32), "traj_id": ((), np.int32),
            "step": ((), np.int32), "traj_return": ((), np.float32), "traj_success": ((), np.bool_),
            "entropy_bonus": ((), np.float32), "soft_mc_return": ((), np.float32),
            "traj_soft_return": ((), np.float32),
        }
        self.capacity = capacity
        self.data = {k: np.zeros((capacity,) + s, d) for k, (s, d) in shapes.items()}
        self.size = 0
        self.cursor = 0
        self.next_traj_id = 0
        self.rng = np.random.default_rng(seed)

    def add_trajectory(self, traj: dict[str, np.ndarray], gamma: float, alpha: float = 0.0) -> None:
        """Adds one trajectory (a dict of [T, ...] arrays with the per-transition fields, `entropy_bonus`
        optional (0 without), except the returns, traj_id, step and traj_success, computed here)."""
        t_len = len(traj["reward"])
        rows = dict(traj)
        rows["mc_return"] = mc_returns(traj["reward"], gamma)
        bonus = np.asarray(traj.get("entropy_bonus", np.zeros(t_len)), np.float32)
        soft_rewards = np.asarray(traj["reward"], np.float32) + np.float32(alpha) * bonus
        rows["entropy_bonus"] = bonus
        rows["soft_mc_return"] = mc_returns(soft_rewards, gamma)
        rows["traj_soft_return"] = np.full(t_len, float(np.sum(soft_rewards)), np.float32)
        rows["traj_id"] = np.full(t_len, self.next_traj_id, np.int32)
        rows["step"] = np.arange(t_len, dtype=np.int32)
        rows["traj_return"] = np.full(t_len, float(np.sum(traj["reward"])), np.float32)
        rows["traj_success"] = np.full(t_len, bool(t_len and traj["reward"][-1] > 0), np.bool_)
        self.next_traj_id += 1
        for t in range(t_len):
            i = self.cursor
            for k, arr in self.data.items():
                arr[i] = rows[k][t]
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def indices(self) -> np.ndarray:
        return np.arange(self.size)

    def first_steps(self) -> np.ndarray:
        """Indices of the stored transitions that start a trajectory (the trajectory critic's data)."""
        return np.flatnonzero(self.data["step"][: self.size] == 0)

    def sample(self, n: int, among: np.ndarray | None = None) -> np.ndarray:
        """`n` indices drawn with replacement (from `among`, default all); RuntimeError if empty."""
        pool = self.indices() if among is None else np.asarray(among)
        if pool.size == 0:
            raise RuntimeError("the replay holds no transition to sample")
        return pool[self.rng.integers(0, pool.size, size=n)]

    def batch(self, idx: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: self.data[k][idx] for k in fields}

    def arrays(self) -> dict[str, np.ndarray]:
        return self.data

    def meta(self) -> dict[str, Any]:
        return {"size": self.size, "cursor": self.cursor, "next_traj_id": self.next_traj_id,
                "rng": self.rng.bit_generator.state}

    def load(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        for k, target in self.data.items():
            value = np.asarray(arrays[k])
            if value.shape != target.shape:
                raise ValueError(f"replay checkpoint field {k!r} has shape {value.shape}, expected {target.shape}")
            target[...] = value
        self.size, self.cursor = int(meta["size"]), int(meta["cursor"])
        self.next_traj_id = int(meta["next_traj_id"])
        self.rng.bit_generator.state = meta["rng"]
