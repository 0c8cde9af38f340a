"""RolloutBuffer and ActionReplay (coso_jax/rl/buffers.py), and GAE over the buffer's time-major
layout, each against a plain computation."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from coso_jax import losses
from coso_jax.rl.buffers import ActionReplay, RolloutBuffer, image_fields_of

IMAGE_FIELDS = {"pixel_values": ((3, 2, 2), np.float32)}


# ---------------------------------------------------------------------------------------------
# RolloutBuffer
def _buffer_fields(rng, t, e, p=5, n=4, pixel=(3, 2, 2)):
    return dict(
        prompt_ids=rng.integers(0, 50, (e, p)).astype(np.int32),
        prompt_mask=rng.random((e, p)) > 0.3,
        pixel_values=rng.normal(size=(e,) + pixel).astype(np.float32),
        response_ids=rng.integers(0, 50, (e, n)).astype(np.int32),
        response_mask=rng.random((e, n)) > 0.3,
        thought_mask=rng.random((e, n)) > 0.5,
        action_mask=rng.random((e, n)) > 0.5,
        old_logprobs=rng.normal(size=(e, n)).astype(np.float32),
        old_entropies=rng.random((e, n)).astype(np.float32),
        old_values=rng.normal(size=(e,)).astype(np.float32),
        rewards=rng.normal(size=(e,)).astype(np.float32),
        dones=rng.random(e) > 0.5,
        valid=rng.random(e) > 0.5,
        labels=rng.integers(-1, 2, e).astype(np.int32),
    )


def test_rollout_buffer_add_and_flat_are_time_major():
    rng = np.random.default_rng(0)
    t, e = 3, 2
    buf = RolloutBuffer(t, e, prompt_len=5, max_new_tokens=4, image_fields=IMAGE_FIELDS)
    steps = [_buffer_fields(rng, t, e) for _ in range(t)]
    for k, fields in enumerate(steps):
        assert not buf.full
        buf.add([f"t{k}e{j}" for j in range(e)], **fields)
    assert buf.full
    flat = buf.flat()
    assert flat["prompt_ids"].shape == (t * e, 5)
    assert flat["pixel_values"].shape == (t * e, 3, 2, 2)
    assert flat["old_values"].shape == (t * e,)
    for name in steps[0]:
        for k in range(t):
            for j in range(e):
                np.testing.assert_array_equal(flat[name][k * e + j], steps[k][name][j], err_msg=name)
    assert buf.flat_texts() == [f"t{k}e{j}" for k in range(t) for j in range(e)]
    # reset: a new iteration overwrites in place
    buf.reset()
    assert buf.step == 0 and not buf.full


def test_rollout_buffer_errors():
    rng = np.random.default_rng(1)
    buf = RolloutBuffer(1, 2, prompt_len=5, max_new_tokens=4, image_fields=IMAGE_FIELDS)
    with pytest.raises(RuntimeError, match="1/|0/1"):
        buf.flat()
    fields = _buffer_fields(rng, 1, 2)
    missing = dict(fields)
    missing.pop("labels")
    with pytest.raises(KeyError, match="labels"):
        buf.add(["a", "b"], **missing)
    with pytest.raises(KeyError, match="bogus"):
        buf.add(["a", "b"], bogus=np.zeros(2), **fields)
    bad = dict(fields, old_logprobs=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="old_logprobs"):
        buf.add(["a", "b"], **bad)
    with pytest.raises(ValueError, match="texts"):
        buf.add(["a"], **fields)
    assert buf.step == 0
    buf.add(["a", "b"], **fields)
    with pytest.raises(RuntimeError, match="full"):
        buf.add(["a", "b"], **fields)


# ---------------------------------------------------------------------------------------------
# ActionReplay
def test_action_replay_ring_keeps_last_valid_rows():
    replay = ActionReplay(capacity=3, max_len=5, seed=0)
    tokens = np.arange(1, 5 * 4 + 1, dtype=np.int32).reshape(5, 4)  # rows shorter than max_len
    mask = np.ones((5, 4), bool)
    labels = np.array([10, 11, 12, 13, 14], np.int32)
    valid = np.array([True, False, True, True, True])
    replay.add(tokens, mask, labels, valid)
    # Valid rows 0, 2, 3, 4 enter in order; capacity 3 -> row 0 was overwritten by row 4.
    assert replay.size == 3 and replay.cursor == 1
    np.testing.assert_array_equal(replay.labels, [14, 12, 13])
    np.testing.assert_array_equal(replay.tokens[0, :4], tokens[4])
    assert replay.tokens[0, 4] == 0 and not replay.mask[0, 4]  # right padding
    np.testing.assert_array_equal(replay.tokens[1, :4], tokens[2])
    # Nothing invalid ever stored
    assert 11 not in set(replay.labels.tolist())
    toks, m, lab = replay.sample(64)
    assert toks.shape == (64, 5) and m.shape == (64, 5) and lab.shape == (64,)
    assert set(lab.tolist()) <= {12, 13, 14}
    for row, label in zip(toks, lab):  # tokens and label sampled together
        np.testing.assert_array_equal(row[:4], tokens[label - 10])
    with pytest.raises(ValueError, match="max_len"):
        replay.add(np.zeros((1, 6), np.int32), np.ones((1, 6), bool), np.zeros(1, np.int32), np.ones(1, bool))
    with pytest.raises(ValueError, match="capacity"):
        ActionReplay(capacity=0, max_len=3)
    with pytest.raises(RuntimeError, match="empty"):
        ActionReplay(capacity=2, max_len=3).sample(1)


def test_action_replay_state_round_trip_through_json():
    rng = np.random.default_rng(0)
    a = ActionReplay(capacity=8, max_len=6, seed=3)
    a.add(rng.integers(0, 9, (11, 6)), rng.random((11, 6)) > 0.2, rng.integers(0, 3, 11), rng.random(11) > 0.3)
    a.sample(5)  # advance the RNG
    arrays = {k: v.copy() for k, v in a.arrays().items()}
    meta = json.loads(json.dumps(a.meta()))  # checkpoint metadata is JSON
    b = ActionReplay(capacity=8, max_len=6, seed=999)
    b.load(arrays, meta)
    assert (b.size, b.cursor) == (a.size, a.cursor)
    for x, y in zip(a.sample(7), b.sample(7)):
        np.testing.assert_array_equal(x, y)
    # both continue identically after more adds
    new = (rng.integers(0, 9, (3, 6)), np.ones((3, 6), bool), rng.integers(0, 3, 3), np.ones(3, bool))
    a.add(*new)
    b.add(*new)
    for x, y in zip(a.sample(7), b.sample(7)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="tokens"):
        ActionReplay(capacity=4, max_len=6).load(arrays, meta)


# ---------------------------------------------------------------------------------------------
# GAE as the trainer wires it: buffer arrays are [T, E]; flat order is t * E + e.
def python_gae(rewards, values, dones, bootstrap, gamma, lam):
    t_max, num_envs = rewards.shape
    adv = np.zeros((t_max, num_envs))
    for e in range(num_envs):
        running = 0.0
        for t in reversed(range(t_max)):
            next_v = bootstrap[e] if t == t_max - 1 else values[t + 1, e]
            nonterminal = 0.0 if dones[t, e] else 1.0
            delta = rewards[t, e] + gamma * next_v * nonterminal - values[t, e]
            running = delta + gamma * lam * nonterminal * running
            adv[t, e] = running
    return adv, adv + values


def trainer_gae(arrays, bootstrap, gamma, lam):
    """Exactly the trainer's wiring (PPOTrainer.run_iteration)."""
    advantages, returns = losses.gae(jnp.asarray(arrays["rewards"]), jnp.asarray(arrays["old_values"]),
                                     jnp.asarray(arrays["dones"]), jnp.asarray(bootstrap), gamma, lam)
    return (np.asarray(losses.normalise_advantages(advantages)).reshape(-1),
            np.asarray(returns).reshape(-1))


def test_gae_time_major_with_done_resets_matches_python_loop():
    rng = np.random.default_rng(0)
    t, e = 6, 3
    buf = RolloutBuffer(t, e, prompt_len=5, max_new_tokens=4, image_fields=IMAGE_FIELDS)
    for _ in range(t):
        buf.add(["x"] * e, **_buffer_fields(rng, t, e))
    buf.arrays["dones"][:] = False
    buf.arrays["dones"][1, 0] = buf.arrays["dones"][4, 0] = buf.arrays["dones"][5, 1] = True
    bootstrap = rng.normal(size=e).astype(np.float32)
    adv_flat, ret_flat = trainer_gae(buf.arrays, bootstrap, 0.9, 0.95)
    adv, ret = python_gae(buf.arrays["rewards"].astype(np.float64), buf.arrays["old_values"].astype(np.float64),
                           buf.arrays["dones"], bootstrap, 0.9, 0.95)
    np.testing.assert_allclose(ret_flat, ret.reshape(-1), rtol=1e-5, atol=1e-5)
    norm = (adv - adv.mean()) / (adv.std() + 1e-8)
    np.testing.assert_allclose(adv_flat, norm.reshape(-1), rtol=1e-4, atol=1e-5)
    # a done at step 1 of env 0 cuts the bootstrap: its return is just its reward
    np.testing.assert_allclose(ret[1, 0] - buf.arrays["old_values"][1, 0],
                               buf.arrays["rewards"][1, 0] - buf.arrays["old_values"][1, 0], rtol=1e-6)
    assert ret_flat[1 * e + 0] == pytest.approx(buf.arrays["rewards"][1, 0], abs=1e-5)
    # and the wiring would be wrong env-major: the two layouts differ on this data
    assert not np.allclose(ret_flat, ret.T.reshape(-1))




def test_rollout_buffer_stores_llava_next_image_sizes():
    inputs = {"prompt_ids": np.zeros((2, 5), np.int32), "pixel_values": np.zeros((2, 5, 3, 4, 4), np.float32),
              "image_sizes": np.array([[300, 300], [300, 300]], np.int32)}
    fields = image_fields_of(inputs)
    assert fields == {"pixel_values": ((5, 3, 4, 4), np.float32), "image_sizes": ((2,), np.int32)}
    assert "image_sizes" not in image_fields_of({"pixel_values": np.zeros((2, 3)), "image_sizes": None})
    buf = RolloutBuffer(1, 2, prompt_len=5, max_new_tokens=4, image_fields=fields)
    step = _buffer_fields(np.random.default_rng(0), 1, 2)
    step.pop("pixel_values")
    buf.add(["a", "b"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], **step)
    np.testing.assert_array_equal(buf.flat()["image_sizes"], inputs["image_sizes"])
