"""The PPO update (coso_jax/rl/ppo/update.py) on a hand-made batch with a tiny random LLaVA: metrics,
coso with unit weights equals entropy, the alpha and weights of each algo, non-finite minibatches
skipped and left out of the means, sharded (8 devices) equals one device, one compile for every algo.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coso_jax import sampling
from coso_jax.models import llava
from coso_jax.models.clip import CLIPVisionConfig
from coso_jax.models.llama import DecoderConfig
from coso_jax.models.value_head import ValueHead
from coso_jax.rl.ppo.update import ActorCritic, OptimizerConfig, PPOHyper, make_optimizer, update_step
from coso_jax.rl.sharding import batch_shardings, make_mesh, put, state_shardings

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
        "entropy_weights": np.where(response_mask, rng.random((BATCH, N)), 0.0).astype(np.float32),
    }


HP = PPOHyper(epochs=2, minibatch_size=8, grad_accum_steps=1, clip_eps=0.2, temperature=1.0)
ALPHA = 0.5
# Adam eps 1e-4 (the trainer's default is 1e-7): with a tiny eps Adam maps a near-zero gradient element to
# about +-lr, so last-bit differences in such elements (reduction order differs across devices) become
# ~1e-5 parameter differences that say nothing about the partitioning.
OPT = OptimizerConfig(lr=1e-3, lr_min=1e-6, decay_steps=20, max_grad_norm=1.0, adam_eps=1e-4)


class UpdateRunner:
    """Calls the module-level `update_step` exactly as PPOTrainer does (shardings from a mesh)."""

    def __init__(self, model):
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.params = jax.tree.map(np.asarray, params)  # host copies: every call re-puts (donation)

    def run(self, batch, alpha=ALPHA, mesh_spec="data:1", key=0):
        mesh = make_mesh(mesh_spec)
        params = put(self.params, state_shardings(mesh, self.params))
        opt_state = make_optimizer(OPT).init(params)
        opt_state = put(opt_state, state_shardings(mesh, opt_state))
        out = update_step(self.graphdef, HP, OPT, mesh, params, opt_state, put(batch, batch_shardings(mesh, batch)),
                          jax.random.key(key), jnp.float32(alpha))
        return jax.device_get(out)


@pytest.fixture(scope="module")
def runner(tiny_actor_critic):
    return UpdateRunner(tiny_actor_critic)


@pytest.fixture(scope="module")
def reference_update(runner, ppo_batch):
    """The 1-device update with algo=coso and random causal weights."""
    return runner.run(ppo_batch)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


def test_update_changes_params_and_reports_metrics(runner, reference_update):
    params, opt_state, metrics = reference_update
    assert _max_abs_diff(params, runner.params) > 1e-4
    assert metrics["skipped_minibatches"] == 0
    for name in ("loss", "policy_loss", "value_loss", "entropy_bonus", "token_entropy", "approx_kl",
                 "clip_fraction", "grad_norm"):
        assert np.isfinite(metrics[name]), name
    assert metrics["entropy_bonus"] < metrics["token_entropy"]  # causal weights in [0, 1)
    assert metrics["minibatches"] == HP.epochs * BATCH // HP.minibatch_size


def test_coso_with_unit_weights_equals_entropy(runner, ppo_batch, reference_update):
    # The entropy algo's weights (CausalTerm: 1 on generated tokens) and coso's with every causal weight 1.
    ones = dict(ppo_batch, entropy_weights=ppo_batch["response_mask"].astype(np.float32))
    entropy_params, _, entropy_metrics = runner.run(ones)
    assert entropy_metrics["entropy_bonus"] == pytest.approx(entropy_metrics["token_entropy"], rel=1e-6)
    # The check can fail: with non-unit causal weights (alpha 0.5) coso's update differs from entropy's,
    # and its bonus is smaller (weights < 1).
    assert _max_abs_diff(reference_update[0], entropy_params) > 1e-5
    assert reference_update[2]["entropy_bonus"] < entropy_metrics["entropy_bonus"]


def test_none_has_no_bonus_whatever_alpha(runner, ppo_batch):
    zeros = dict(ppo_batch, entropy_weights=np.zeros_like(ppo_batch["entropy_weights"]))
    a_params, _, a_metrics = runner.run(zeros, alpha=0.0)
    b_params, _, b_metrics = runner.run(zeros, alpha=5.0)
    assert a_metrics["entropy_bonus"] == 0.0
    for a, b in zip(_leaves(a_params), _leaves(b_params)):
        np.testing.assert_array_equal(a, b)


def test_one_compile_serves_every_algo_and_alpha(runner, ppo_batch, reference_update):
    before = update_step._cache_size()
    runner.run(dict(ppo_batch, entropy_weights=np.zeros_like(ppo_batch["entropy_weights"])), alpha=0.0)  # none
    runner.run(dict(ppo_batch, entropy_weights=ppo_batch["response_mask"].astype(np.float32)), alpha=0.01)
    runner.run(ppo_batch, alpha=2.0)
    assert before >= 1 and update_step._cache_size() == before  # alpha and weights are traced


def test_non_finite_minibatches_are_skipped(runner, ppo_batch):
    all_nan = dict(ppo_batch, advantages=np.full(BATCH, np.nan, np.float32))
    params, opt_state, metrics = runner.run(all_nan)
    for a, b in zip(_leaves(params), _leaves(runner.params)):
        np.testing.assert_array_equal(a, b)  # unchanged, bit for bit
    fresh_opt = make_optimizer(OPT).init(runner.params)
    for a, b in zip(_leaves(opt_state), _leaves(fresh_opt)):
        np.testing.assert_array_equal(a, b)  # Adam moments and step count untouched
    assert metrics["skipped_minibatches"] == metrics["minibatches"] == HP.epochs * BATCH // HP.minibatch_size
    assert np.isnan(metrics["loss"])  # nothing applied: no mean to report
    # One bad sample poisons exactly one minibatch per epoch; the others still update.
    one_nan = dict(ppo_batch, advantages=ppo_batch["advantages"].copy())
    one_nan["advantages"][3] = np.nan
    params, _, metrics = runner.run(one_nan)
    assert metrics["skipped_minibatches"] == HP.epochs
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])  # means over the applied ones
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
    params, opt_state, metrics = runner.run(ppo_batch, mesh_spec=mesh_spec)
    ref_params, ref_opt, ref_metrics = reference_update
    for a, b in zip(_leaves(params), _leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=SHARD_RTOL, atol=SHARD_ATOL)
    for a, b in zip(_leaves(opt_state), _leaves(ref_opt)):
        np.testing.assert_allclose(a, b, rtol=SHARD_RTOL, atol=SHARD_ATOL)
    for name in ("loss", "policy_loss", "value_loss", "entropy_bonus", "approx_kl"):
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-4, abs=1e-5), name
    assert metrics["skipped_minibatches"] == 0
