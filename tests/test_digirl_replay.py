"""DigiRL's transition replay (coso_jax/rl/digirl/replay.py) and critics (critics.py)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax.rl.digirl.critics import build_critics
from coso_jax.rl.digirl.replay import TransitionReplay


def _trajectory(t_len, success, p=4, n=3, s=8, fill=0):
    reward = np.zeros(t_len, np.float32)
    reward[-1] = float(success)
    return {"prompt_ids": np.full((t_len, p), fill, np.int32), "prompt_mask": np.ones((t_len, p), bool),
            "image": np.zeros((t_len, s, s, 3), np.uint8), "next_prompt_ids": np.zeros((t_len, p), np.int32),
            "next_prompt_mask": np.ones((t_len, p), bool), "next_image": np.zeros((t_len, s, s, 3), np.uint8),
            "response_ids": np.zeros((t_len, n), np.int32), "response_mask": np.ones((t_len, n), bool),
            "reward": reward, "done": np.arange(t_len) == t_len - 1, "valid": np.ones(t_len, bool),
            "label": np.ones(t_len, np.int32)}


def test_transition_replay_ring_and_trajectory_fields():
    replay = TransitionReplay(5, prompt_len=4, max_new_tokens=3, image_size=8)
    replay.add_trajectory(_trajectory(3, True, fill=1), gamma=0.5)
    np.testing.assert_allclose(replay.data["mc_return"][:3], [0.25, 0.5, 1.0])
    np.testing.assert_array_equal(replay.first_steps(), [0])
    replay.add_trajectory(_trajectory(4, False, fill=2), gamma=0.5)  # wraps: overwrites rows 0, 1
    assert replay.size == 5 and replay.cursor == 2
    np.testing.assert_array_equal(replay.data["traj_id"], [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(replay.data["step"], [2, 3, 2, 0, 1])
    np.testing.assert_array_equal(replay.first_steps(), [3])  # trajectory 0 lost its first step
    np.testing.assert_array_equal(replay.data["traj_return"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(replay.data["traj_success"], [0, 0, 1, 0, 0])
    again = TransitionReplay(5, prompt_len=4, max_new_tokens=3, image_size=8)
    again.load(replay.arrays(), json.loads(json.dumps(replay.meta())))
    np.testing.assert_array_equal(again.sample(7), replay.sample(7))
    with pytest.raises(ValueError, match="shape"):
        TransitionReplay(6, 4, 3, 8).load(replay.arrays(), replay.meta())


def test_trajectory_critic_label_is_the_last_reward_as_the_reference():
    """The reference labels a trajectory by `traj[-1]["mc_return"] > 0` (causal_digirl/trainer.py:94-99,
    257-258), i.e. its last reward; a trajectory rewarded only before its end is a failure there."""
    replay = TransitionReplay(8, prompt_len=4, max_new_tokens=3, image_size=8)
    traj = _trajectory(3, False)
    traj["reward"] = np.array([1.0, 0.0, 0.0], np.float32)
    replay.add_trajectory(traj, gamma=0.5)
    mc_last = replay.data["mc_return"][2]
    assert replay.data["traj_return"][0] == 1.0 and not replay.data["traj_success"][0]
    assert bool(replay.data["traj_success"][0]) == bool(mc_last > 0)


def test_critics_shapes_and_init():
    critics = build_critics("separate", vocab_size=50, image_size=16, hidden=8, policy_hidden=12, seed=0)
    out = nnx.jit(lambda m, *a: m(*a))(critics.step, jnp.zeros((3, 16, 16, 3), jnp.uint8),
                                       jnp.ones((3, 5), jnp.int32), jnp.ones((3, 5), bool))
    assert out.shape == (3, 2, 2) and np.all(np.isfinite(np.asarray(out)))
    assert float(jnp.abs(critics.step.patch_embed.kernel.get_value()).sum()) > 0
    assert float(jnp.abs(critics.step.patch_embed.bias.get_value()).sum()) == 0
    shared = build_critics("shared", vocab_size=50, image_size=16, hidden=8, policy_hidden=12, seed=0)
    assert shared.trajectory(None, None, None, features=jnp.zeros((3, 12))).shape == (3, 1, 2)
    assert not hasattr(shared.step, "patch_embed")
    # The text encoder ignores masked slots, whatever ids they hold.
    ids = np.ones((2, 5), np.int32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    garbage = ids.copy()
    garbage[0, 2:] = 49
    a = critics.step(jnp.zeros((2, 16, 16, 3), jnp.uint8), jnp.asarray(ids), jnp.asarray(mask))
    b = critics.step(jnp.zeros((2, 16, 16, 3), jnp.uint8), jnp.asarray(garbage), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_soft_returns_add_the_entropy_bonus_to_every_reward():
    """soft_mc_return_t = sum_k gamma^k (r_{t+k} + alpha * H_{t+k}); traj_soft_return = sum_t (r_t + alpha H_t);
    alpha = 0 gives the hard returns."""
    replay = TransitionReplay(8, prompt_len=4, max_new_tokens=3, image_size=8)
    traj = _trajectory(4, True)
    traj["entropy_bonus"] = np.array([0.5, 1.0, 0.0, 2.0], np.float32)
    replay.add_trajectory(traj, gamma=0.5, alpha=0.1)
    soft_r = traj["reward"] + 0.1 * traj["entropy_bonus"]
    expected = [sum(0.5 ** (k - t) * soft_r[k] for k in range(t, 4)) for t in range(4)]
    np.testing.assert_allclose(replay.data["soft_mc_return"][:4], expected, rtol=1e-6)
    np.testing.assert_allclose(replay.data["traj_soft_return"][:4], soft_r.sum(), rtol=1e-6)
    np.testing.assert_array_equal(replay.data["entropy_bonus"][:4], traj["entropy_bonus"])
    hard = TransitionReplay(8, prompt_len=4, max_new_tokens=3, image_size=8)
    hard.add_trajectory(traj, gamma=0.5, alpha=0.0)
    np.testing.assert_array_equal(hard.data["soft_mc_return"], hard.data["mc_return"])
    np.testing.assert_array_equal(hard.data["traj_soft_return"], hard.data["traj_return"])
