"""Unit tests of the online trainer's pieces (coso_jax/rl/), each against an independent computation.

No trainer and no SFT here: buffers, text spans, GAE layout, config/mesh validation, prompt
encoding, the entropy bonus, and the PPO update on a hand-made batch with a tiny random LLaVA
(algo switching, non-finite skipping, and 8-device sharded == 1-device).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax import losses, sampling
from coso_jax.envs import text_interface
from coso_jax.envs.gym_cards import demos as gym_cards_demos
from coso_jax.models import llava
from coso_jax.models.clip import CLIPVisionConfig
from coso_jax.models.llama import DecoderConfig
from coso_jax.models.value_head import ValueHead
from coso_jax.rl import ppo
from coso_jax.rl.buffer import ActionReplay, RolloutBuffer
from coso_jax.rl.config import TrainConfig, parse_mesh, preset
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.text import thought_action_masks, token_char_offsets
from coso_jax.rl.train_state import (
    ActorCritic,
    batch_shardings,
    make_mesh,
    put,
    replicated,
    state_shardings,
)
from coso_jax.tokenizer import IMAGE_TOKEN, build_bpe


# ---------------------------------------------------------------------------------------------
# Shared small objects
@pytest.fixture(scope="module")
def numberline_records():
    return list(gym_cards_demos.generate("NumberLine", 6, 0, 0.0))


@pytest.fixture(scope="module")
def tokenizer(numberline_records):
    corpus = [r["prompt"] for r in numberline_records] + [r["answer"] for r in numberline_records]
    return build_bpe(corpus, 400)


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
        old_values=rng.normal(size=(e,)).astype(np.float32),
        rewards=rng.normal(size=(e,)).astype(np.float32),
        dones=rng.random(e) > 0.5,
        valid=rng.random(e) > 0.5,
        labels=rng.integers(-1, 2, e).astype(np.int32),
    )


def test_rollout_buffer_add_and_flat_are_time_major():
    rng = np.random.default_rng(0)
    t, e = 3, 2
    buf = RolloutBuffer(t, e, prompt_len=5, max_new_tokens=4, pixel_shape=(3, 2, 2))
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
    buf = RolloutBuffer(1, 2, prompt_len=5, max_new_tokens=4, pixel_shape=(3, 2, 2))
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
# Thought / action token masks with a real byte-level BPE
@pytest.mark.parametrize("variant", ["plain", "multibyte"])
def test_thought_action_masks_on_demo_answer(tokenizer, numberline_records, variant):
    answer = numberline_records[0]["answer"]
    if variant == "multibyte":  # '→' and 'é' split over byte tokens: exercises the prefix fallback
        answer = answer.replace("so I", "so → I é")
    iface = text_interface("NumberLine")
    ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    text, starts, ends = token_char_offsets(tokenizer, ids)
    assert text == answer
    assert np.all(np.diff(ends) >= 0) and np.all(starts <= ends) and ends[-1] == len(answer)
    action_start = iface.spans(text).action[0]
    assert text[action_start:].startswith('"action":')
    width = len(ids) + 5
    thought, action = thought_action_masks(starts, ends, action_start, len(ids), width)
    # Independent: token k is a thought token iff the decoded prefix through k ends before `"action":`.
    prefix_len = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    expected_thought = np.array([n <= action_start for n in prefix_len] + [False] * 5)
    np.testing.assert_array_equal(thought, expected_thought)
    np.testing.assert_array_equal(action[: len(ids)], ~expected_thought[: len(ids)])
    assert not action[len(ids):].any() and not thought[len(ids):].any()  # padding
    assert action[len(ids) - 1]  # EOS closes the action
    n_thought = int(thought.sum())
    assert answer[: action_start].startswith(tokenizer.decode(ids[:n_thought]))
    assert '"action":' in tokenizer.decode(ids[n_thought:], skip_special_tokens=True)
    assert tokenizer.decode(ids[:n_thought]) + tokenizer.decode(ids[n_thought:], skip_special_tokens=True) == answer


def test_thought_action_masks_without_action_key(tokenizer):
    text = "no key here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, starts, ends = token_char_offsets(tokenizer, ids)
    action_start = text_interface("NumberLine").spans(text).action[0]
    assert action_start == len(text)
    thought, action = thought_action_masks(starts, ends, action_start, len(ids), len(ids))
    assert thought.all() and not action.any()


# ---------------------------------------------------------------------------------------------
# GAE as the trainer wires it: buffer arrays are [T, E]; flat order is t * E + e.
def _python_gae(rewards, values, dones, bootstrap, gamma, lam):
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
    """Exactly the trainer's wiring (Trainer.run_iteration)."""
    advantages, returns = losses.gae(jnp.asarray(arrays["rewards"]), jnp.asarray(arrays["old_values"]),
                                     jnp.asarray(arrays["dones"]), jnp.asarray(bootstrap), gamma, lam)
    return (np.asarray(losses.normalise_advantages(advantages)).reshape(-1),
            np.asarray(returns).reshape(-1))


def test_gae_time_major_with_done_resets_matches_python_loop():
    rng = np.random.default_rng(0)
    t, e = 6, 3
    buf = RolloutBuffer(t, e, prompt_len=5, max_new_tokens=4, pixel_shape=(3, 2, 2))
    for _ in range(t):
        buf.add(["x"] * e, **_buffer_fields(rng, t, e))
    buf.arrays["dones"][:] = False
    buf.arrays["dones"][1, 0] = buf.arrays["dones"][4, 0] = buf.arrays["dones"][5, 1] = True
    bootstrap = rng.normal(size=e).astype(np.float32)
    adv_flat, ret_flat = trainer_gae(buf.arrays, bootstrap, 0.9, 0.95)
    adv, ret = _python_gae(buf.arrays["rewards"].astype(np.float64), buf.arrays["old_values"].astype(np.float64),
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


# ---------------------------------------------------------------------------------------------
# Config and mesh validation
@pytest.mark.parametrize("spec", ["data:8", "data:2,fsdp:4", "fsdp:2", " data:1 , fsdp:1 "])
def test_parse_mesh_accepts(spec):
    axes = parse_mesh(spec)
    assert set(axes) <= {"data", "fsdp"} and all(v >= 1 for v in axes.values())
    assert parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("spec, match", [
    ("data", "bad mesh spec"), ("data:0", "bad mesh spec"), ("model:2", "bad mesh spec"),
    ("data:x", "bad mesh spec"), ("", "bad mesh spec"), ("data:2,data:4", "given twice"),
    ("data:-1", "bad mesh spec"),
])
def test_parse_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(spec)


def test_make_mesh_too_many_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("data:4,fsdp:4")
    mesh = make_mesh("data:2,fsdp:4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("overrides, match", [
    ({"env": "Nope"}, "env must be one of"),
    ({"alpha": -0.1}, "alpha must be >= 0"),
    ({"mesh": "gpu:2"}, "bad mesh spec"),
    ({"mesh": "data:2,data:2"}, "given twice"),
    ({"algo": "sac"}, "algo must be one of"),
    ({"num_envs": 3}, "multiple of num_envs"),
    ({"minibatch_size": 48}, "minibatch_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"causal_window": 0}, "causal_window"),
])
def test_train_config_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)
    with pytest.raises(ValueError, match=match):
        preset("tiny_cpu", **overrides)


def test_presets():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    paper = preset("paper", env="Points24")
    assert (paper.gamma, paper.gae_lambda, paper.clip_eps, paper.thought_coef, paper.temperature) == (
        0.9, 0.95, 0.1, 0.5, 0.2)
    assert paper.steps_per_update == 1024 and paper.lr == 1e-5
    assert preset("paper").steps_per_update == 512
    cfg = preset("tiny_cpu", num_envs=4, steps_per_update=16, minibatch_size=8, total_env_steps=40)
    assert cfg.steps_per_env == 4 and cfg.num_updates == 2


# ---------------------------------------------------------------------------------------------
# Prompt encoding
def _encoder(tokenizer, prompt_len, num_image_tokens=5, template="tiny"):
    def image_fn(obs):
        return obs.astype(np.float32).transpose(0, 3, 1, 2) / 255.0, None
    return PromptEncoder(tokenizer, prompt_len, num_image_tokens, image_fn, template)


def test_prompt_encoder_left_pads_and_expands_image_tokens(tokenizer, numberline_records):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompts = ["short", numberline_records[0]["prompt"][:120]]
    enc = _encoder(tokenizer, 96)
    obs = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    out = enc(prompts, obs)
    ids, mask = out["prompt_ids"], out["prompt_mask"]
    assert ids.shape == mask.shape == (2, 96) and ids.dtype == np.int32 and mask.dtype == np.bool_
    assert out["pixel_values"].shape == (2, 3, 8, 8) and "image_sizes" not in out
    for row, prompt in enumerate(prompts):
        # Independent: BOS + "USER: " + 5 x <image> + "\n{prompt} ASSISTANT:".
        expected = ([tokenizer.bos_token_id] + tokenizer.encode("USER: ", add_special_tokens=False)
                    + [image_id] * 5 + tokenizer.encode(f"\n{prompt} ASSISTANT:", add_special_tokens=False))
        n = len(expected)
        assert mask[row].sum() == n
        assert not mask[row, : 96 - n].any() and mask[row, 96 - n:].all()  # left padding
        assert (ids[row, : 96 - n] == tokenizer.pad_token_id).all()
        np.testing.assert_array_equal(ids[row, 96 - n:], expected)
        image_pos = np.flatnonzero(ids[row] == image_id)
        assert image_pos.size == 5 and np.all(np.diff(image_pos) == 1)
        text = tokenizer.decode(ids[row][mask[row]], skip_special_tokens=True)
        assert text.endswith(f"{prompt} ASSISTANT:")
    assert enc.max_prompt_tokens(prompts) == int(mask.sum(1).max())


def test_prompt_encoder_errors(tokenizer):
    enc = _encoder(tokenizer, 12)
    with pytest.raises(ValueError, match="prompt_len is 12"):
        enc.encode_text(["a prompt that is much too long for twelve tokens with five image tokens in it"])
    with pytest.raises(ValueError, match=r"\{image\}"):
        _encoder(tokenizer, 12, template="no placeholders {prompt}")


# ---------------------------------------------------------------------------------------------
# Entropy bonus
def test_entropy_bonus_algos():
    rng = np.random.default_rng(0)
    ent = rng.random((4, 7)).astype(np.float32) * 3
    mask = rng.random((4, 7)) > 0.3
    mask[0] = False  # an empty row divides by max(count, 1)
    w = rng.random((4, 7)).astype(np.float32)
    naive = np.array([(ent[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(4)])
    causal = np.array([(ent[i] * w[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(4)])
    np.testing.assert_allclose(ppo.entropy_bonus(ent, mask, w, "entropy"), naive, rtol=1e-6)
    np.testing.assert_allclose(ppo.entropy_bonus(ent, mask, w, "coso"), causal, rtol=1e-6)
    np.testing.assert_array_equal(ppo.entropy_bonus(ent, mask, np.ones_like(w), "coso"),
                                  ppo.entropy_bonus(ent, mask, w, "entropy"))
    np.testing.assert_array_equal(ppo.entropy_bonus(ent, mask, w, "none"), np.zeros(4))
    with pytest.raises(ValueError, match="unknown algo"):
        ppo.entropy_bonus(ent, mask, w, "sac")


# ---------------------------------------------------------------------------------------------
# The PPO update on a tiny random LLaVA
VOCAB, P, N, BATCH = 64, 24, 8, 16
NUM_IMAGE_TOKENS = 16  # LlavaConfig.tiny: 32 px images, 8 px patches


@pytest.fixture(scope="module")
def tiny_actor_critic():
    text = DecoderConfig.tiny(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1)
    config = llava.LlavaConfig.tiny(image_token_id=4, text=text, vision=CLIPVisionConfig.tiny(num_layers=1))
    policy = llava.random_init(config, seed=0, scale=0.2)
    value_head = ValueHead.tiny(64, rngs=nnx.Rngs(1))
    return ActorCritic(policy, value_head)


@pytest.fixture(scope="module")
def ppo_batch(tiny_actor_critic):
    """A rollout-like batch; old log-probs/values are the model's own, perturbed (ratios near 1)."""
    rng = np.random.default_rng(0)
    prompt_ids = np.zeros((BATCH, P), np.int32)
    prompt_mask = np.zeros((BATCH, P), bool)
    for b in range(BATCH):
        before, after = rng.integers(1, 4), rng.integers(1, 4)
        row = ([1] + list(rng.integers(5, VOCAB, before)) + [4] * NUM_IMAGE_TOKENS
               + list(rng.integers(5, VOCAB, after)))
        prompt_ids[b, P - len(row):] = row
        prompt_mask[b, P - len(row):] = True
    lengths = rng.integers(2, N + 1, BATCH)
    response_mask = np.arange(N)[None] < lengths[:, None]
    response_ids = np.where(response_mask, rng.integers(5, VOCAB, (BATCH, N)), 0).astype(np.int32)
    thought_mask = response_mask & (np.arange(N)[None] < (lengths[:, None] // 2))
    pixel_values = rng.normal(size=(BATCH, 3, 32, 32)).astype(np.float32)
    model = tiny_actor_critic
    out = sampling.score(model.policy, model.value_head, prompt_ids, prompt_mask, response_ids, response_mask,
                         pixel_values=pixel_values, temperature=1.0)
    old_logprobs = np.where(response_mask, np.asarray(out.logprobs) + 0.05 * rng.normal(size=(BATCH, N)), 0.0)
    old_values = np.asarray(out.values) + 0.1 * rng.normal(size=BATCH)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "pixel_values": pixel_values,
        "response_ids": response_ids, "response_mask": response_mask, "thought_mask": thought_mask,
        "action_mask": response_mask & ~thought_mask,
        "old_logprobs": old_logprobs.astype(np.float32), "old_values": old_values.astype(np.float32),
        "advantages": rng.normal(size=BATCH).astype(np.float32),
        "returns": (old_values + 0.5 * rng.normal(size=BATCH)).astype(np.float32),
        "causal_weights": np.where(response_mask, rng.random((BATCH, N)), 0.0).astype(np.float32),
    }


HP = dict(alpha=0.5, epochs=2, minibatch_size=8, grad_accum_steps=1, clip_eps=0.2, temperature=1.0)


class UpdateRunner:
    """Jits `make_update_fn` exactly as the Trainer does (shardings from coso_jax.rl.train_state)."""

    def __init__(self, model):
        graphdef, params = nnx.split(model, nnx.Param)
        self.graphdef = graphdef
        self.params = jax.tree.map(np.asarray, params)  # host copies: every call re-puts (donation)
        # Adam eps 1e-4 (the trainer's default is 1e-7): with a tiny eps Adam maps a near-zero gradient
        # element to about +-lr, so last-bit differences in such elements (reduction order differs
        # across devices) become ~1e-5 parameter differences that say nothing about the partitioning.
        self.tx = ppo.make_optimizer(1e-3, 1e-6, 5, 4, 1.0, 1e-4)
        self._fns = {}

    def run(self, batch, algo="coso", mesh_spec="data:1", key=0):
        mesh = make_mesh(mesh_spec)
        param_sh = state_shardings(mesh, self.params)
        params = put(self.params, param_sh)
        opt_state = self.tx.init(params)
        opt_sh = state_shardings(mesh, opt_state)
        opt_state = put(opt_state, opt_sh)
        batch_sh = batch_shardings(mesh, batch)
        if (algo, mesh_spec) not in self._fns:
            update = ppo.make_update_fn(self.graphdef, self.tx, ppo.PPOHyper(algo=algo, **HP))
            self._fns[algo, mesh_spec] = jax.jit(
                update, in_shardings=(param_sh, opt_sh, batch_sh, replicated(mesh)),
                out_shardings=(param_sh, opt_sh, replicated(mesh)), donate_argnums=(0, 1))
        out = self._fns[algo, mesh_spec](params, opt_state, put(batch, batch_sh), jax.random.key(key))
        return jax.device_get(out)


@pytest.fixture(scope="module")
def runner(tiny_actor_critic):
    return UpdateRunner(tiny_actor_critic)


@pytest.fixture(scope="module")
def reference_update(runner, ppo_batch):
    """The 1-device update with algo=coso and random causal weights."""
    return runner.run(ppo_batch, "coso")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


def test_update_changes_params_and_reports_metrics(runner, reference_update):
    params, opt_state, metrics = reference_update
    assert _max_abs_diff(params, runner.params) > 1e-4
    assert metrics["skipped_minibatches"] == 0
    for name in ("loss", "policy_loss", "value_loss", "entropy_bonus", "token_entropy", "causal_entropy",
                 "approx_kl", "clip_fraction", "grad_norm"):
        assert np.isfinite(metrics[name]), name
    assert metrics["causal_entropy"] < metrics["token_entropy"]  # weights in [0, 1)


def test_coso_with_unit_weights_equals_entropy(runner, ppo_batch, reference_update):
    ones = dict(ppo_batch, causal_weights=ppo_batch["response_mask"].astype(np.float32))
    coso_params, _, coso_metrics = runner.run(ones, "coso")
    entropy_params, _, entropy_metrics = runner.run(ones, "entropy")
    for a, b in zip(_leaves(coso_params), _leaves(entropy_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert coso_metrics["entropy_bonus"] == pytest.approx(entropy_metrics["entropy_bonus"], rel=1e-6)
    # The check can fail: with non-unit causal weights (alpha 0.5) coso's update differs from entropy's,
    # and its bonus is smaller (weights < 1).
    assert _max_abs_diff(reference_update[0], entropy_params) > 1e-5
    assert reference_update[2]["entropy_bonus"] < entropy_metrics["entropy_bonus"]


def test_non_finite_minibatches_are_skipped(runner, ppo_batch):
    all_nan = dict(ppo_batch, advantages=np.full(BATCH, np.nan, np.float32))
    params, opt_state, metrics = runner.run(all_nan, "coso")
    for a, b in zip(_leaves(params), _leaves(runner.params)):
        np.testing.assert_array_equal(a, b)  # unchanged, bit for bit
    fresh_opt = runner.tx.init(runner.params)
    for a, b in zip(_leaves(opt_state), _leaves(fresh_opt)):
        np.testing.assert_array_equal(a, b)  # Adam moments and step count untouched
    assert metrics["skipped_minibatches"] == HP["epochs"] * BATCH // HP["minibatch_size"]
    # One bad sample poisons exactly one minibatch per epoch; the others still update.
    one_nan = dict(ppo_batch, advantages=ppo_batch["advantages"].copy())
    one_nan["advantages"][3] = np.nan
    params, _, metrics = runner.run(one_nan, "coso")
    assert metrics["skipped_minibatches"] == HP["epochs"]
    assert all(np.all(np.isfinite(x)) for x in _leaves(params))
    assert _max_abs_diff(params, runner.params) > 1e-4


# Sharded vs single device, float32. Tolerance: 1e-5 relative + 1e-5 absolute on every parameter and
# optimizer-state leaf after 4 Adam steps at lr 1e-3 (params move by ~4e-3; observed differences
# <= 3e-7, from the different reduction order across devices).
SHARD_RTOL = SHARD_ATOL = 1e-5


@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4"])
def test_sharded_update_equals_single_device(runner, ppo_batch, reference_update, mesh_spec):
    mesh = make_mesh(mesh_spec)
    specs = [s.spec for s in jax.tree.leaves(state_shardings(mesh, runner.params))]
    if "fsdp" in mesh_spec:  # the FSDP rule really splits the large parameters
        assert sum("fsdp" in tuple(spec) for spec in specs) >= 5
    assert all(s.spec[0] == ("data", "fsdp") for s in batch_shardings(mesh, ppo_batch).values())
    params, opt_state, metrics = runner.run(ppo_batch, "coso", mesh_spec)
    ref_params, ref_opt, ref_metrics = reference_update
    for a, b in zip(_leaves(params), _leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=SHARD_RTOL, atol=SHARD_ATOL)
    for a, b in zip(_leaves(opt_state), _leaves(ref_opt)):
        np.testing.assert_allclose(a, b, rtol=SHARD_RTOL, atol=SHARD_ATOL)
    for name in ("loss", "policy_loss", "value_loss", "entropy_bonus", "approx_kl"):
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-4, abs=1e-5), name
    assert metrics["skipped_minibatches"] == 0
