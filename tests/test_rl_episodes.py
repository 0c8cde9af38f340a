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


# ---------------------------------------------------------------------------------------------
# VectorRollout: the cached host work (prompt rows, processed frames, token texts) changes nothing
def _clip_image_fn(tile=16):
    from coso_jax.models.image_processing import LlavaImageProcessor

    processor = LlavaImageProcessor(tile=tile, patch=8)
    return lambda obs: (processor(list(obs)).pixel_values, None)


def _scripted_policy(tokenizer, answers, width, calls):
    """A deterministic policy of its inputs: each row's answer (a demo answer or garbage), log-probs and
    value are drawn from a hash of the row's prompt ids, pixels and the call index; every call's inputs
    are recorded."""
    import zlib

    from coso_jax.rl.episodes import StepOutput

    encoded = [tokenizer.encode(a, add_special_tokens=False)[: width - 1] + [tokenizer.eos_token_id] for a in answers]
    encoded.append([5, 9, 11, 7])  # garbage: an invalid action

    def policy(inputs, t):
        calls.append({k: np.array(v) for k, v in inputs.items()})
        rows = len(inputs["prompt_ids"])
        tokens = np.full((rows, width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((rows, width), bool)
        out = np.zeros((rows, width), np.float32), np.zeros(rows, np.float32)
        for r in range(rows):
            seed = zlib.crc32(inputs["prompt_ids"][r].tobytes() + inputs["pixel_values"][r].tobytes()) + t
            rng = np.random.default_rng(seed)
            ids = encoded[rng.integers(len(encoded))]
            tokens[r, : len(ids)], mask[r, : len(ids)] = ids, True
            out[0][r, : len(ids)] = -rng.random(len(ids))
            out[1][r] = rng.normal()
        return StepOutput(tokens, out[0], mask, out[1], -out[0])

    return policy


def test_vector_rollout_equals_the_plain_host_computation(tokenizer, numberline_records):
    """Same tokens, inputs, texts, masks, rewards and episodes as encoding every prompt and frame afresh
    and decoding every token (the computation without caches), over several collections."""
    from coso_jax.rl.buffers import RolloutBuffer
    from coso_jax.rl.episodes import VectorRollout
    from coso_jax.rl.prompting import PromptEncoder
    from coso_jax.rl.text import thought_action_masks, token_char_offsets
    from coso_jax.tokenizer import IMAGE_TOKEN

    answers = [r["answer"] for r in numberline_records]
    width, prompt_len, envs, steps = 64, 320, 5, 6
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def plain_inputs(rollout):
        prompts = [rollout.prompt(info) for info in rollout.infos]
        ids = np.full((envs, prompt_len), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((envs, prompt_len), bool)
        for row, prompt in enumerate(prompts):
            before, after = f"USER: \x00\n{prompt} ASSISTANT:".split("\x00")
            toks = ([tokenizer.bos_token_id] + tokenizer.encode(before, add_special_tokens=False) + [image_id] * 4
                    + tokenizer.encode(after, add_special_tokens=False))
            ids[row, prompt_len - len(toks):], mask[row, prompt_len - len(toks):] = toks, True
        return {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": _clip_image_fn()(np.stack(rollout.obs))[0]}

    def plain_decode(rollout, tokens, mask):
        texts, thought, action = [], np.zeros(tokens.shape, bool), np.zeros(tokens.shape, bool)
        for row in range(len(tokens)):
            n = int(mask[row].sum())
            ids = [int(t) for t in tokens[row, :n]]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            _, starts, ends = token_char_offsets(tokenizer, ids)
            thought[row], action[row] = thought_action_masks(starts, ends, rollout.iface.spans(text).action[0], n,
                                                             tokens.shape[1])
            texts.append(text)
        return texts, thought, action

    results = []
    for plain in (False, True):
        encoder = PromptEncoder(tokenizer, prompt_len, 4, _clip_image_fn(), "tiny", image_cache_mb=0 if plain else 64)
        rollout = VectorRollout("NumberLine", envs, encoder, tokenizer, seed=3, brief=True)
        if plain:
            rollout.current_inputs = lambda r=rollout: plain_inputs(r)
            rollout.decode = lambda tokens, mask, r=rollout: plain_decode(r, tokens, mask)
        calls, collected = [], []
        policy = _scripted_policy(tokenizer, answers, width, calls)
        for _ in range(3):
            buffer = RolloutBuffer(steps, envs, prompt_len, width, {"pixel_values": ((3, 16, 16), np.float32)})
            stats = rollout.collect(buffer, policy)
            collected.append(({k: v.copy() for k, v in buffer.arrays.items()}, buffer.flat_texts(),
                              (stats.returns, stats.lengths, stats.steps, stats.envs)))
        results.append((collected, calls, rollout.current_inputs()))
        if not plain:
            assert encoder.frames.hits > encoder.frames.misses > 0  # frames repeat, and were served from the cache
        rollout.close()
    (fast, fast_calls, fast_next), (slow, slow_calls, slow_next) = results
    assert len(fast_calls) == len(slow_calls) == 3 * steps
    for a, b in zip(fast_calls + [fast_next], slow_calls + [slow_next]):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for (arrays_a, texts_a, stats_a), (arrays_b, texts_b, stats_b) in zip(fast, slow):
        assert texts_a == texts_b and stats_a == stats_b
        for k in arrays_a:
            np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
    rewards = np.concatenate([arrays["rewards"].ravel() for arrays, _, _ in fast])
    valid = np.concatenate([arrays["valid"].ravel() for arrays, _, _ in fast])
    assert valid.any() and not valid.all() and np.unique(rewards).size > 1 and fast[-1][2][0]  # a varied run
