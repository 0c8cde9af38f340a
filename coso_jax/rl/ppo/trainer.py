"""Online CoSo on the gym_cards games and ALFWorld: SFT warm start, then PPO with none | entropy | coso.

One iteration (RL4VLM + CoSo), `PPOTrainer.run_iteration`:
  1. rollout: `steps_per_update` env steps with the jitted sampler (phase `rollout`);
  2. soft-RL weights: the classifier trains online on replayed valid actions (coso), then weighs the
     rollout's responses (`CausalTerm`; phase `causal`);
  3. targets: GAE on the rollout (gamma, lambda), advantages normalised over the batch; with
     `soft_backup`, on the soft rewards r_t + alpha * H_B(y_t) (the behaviour policy's sampled token
     entropies, weighted), so the value head learns CoSo's soft value;
  4. update: one jitted function over epochs x minibatches x micro-batches (phase `update`).
The run scaffold (`coso_jax.rl.run.Run`) writes metrics, checkpoints, plots and heatmaps.

    trainer = PPOTrainer(ppo_preset("tiny_cpu", env="NumberLine", algo="coso"), "runs/nl_coso")
    trainer.train(); print(trainer.evaluate()); trainer.close()
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax import losses, sampling
from coso_jax import metrics as metrics_lib
from coso_jax.checkpoint import CheckpointError, tree_digest
from coso_jax.models import lora
from coso_jax.rl import policy as policy_lib
from coso_jax.rl.buffers import RolloutBuffer, image_fields_of
from coso_jax.rl.causal_term import CausalTerm
from coso_jax.rl.config import PPOConfig
from coso_jax.rl.episodes import StepOutput, VectorRollout
from coso_jax.rl.ppo import start as start_lib
from coso_jax.rl.ppo.update import (
    BATCH_FIELDS,
    OPTIONAL_BATCH_FIELDS,
    ActorCritic,
    OptimizerConfig,
    PPOHyper,
    make_optimizer,
    update_step,
)
from coso_jax.rl.run import CHECKPOINT_FORMAT, IterationOutput, Run, eval_key, phase_key
from coso_jax.rl.sharding import batch_shardings, check_batch_divisible, make_mesh, put, state_shardings

log = logging.getLogger(__name__)

EVAL_SEED = 10_000_019


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Static settings of the sampler (hashable: a jit cache key)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_id: int
    pad_id: int


@functools.partial(jax.jit, static_argnums=(0, 1))
def sample_step(graphdef: nnx.GraphDef, settings: SampleSettings, params: Any, frozen: Any,
                inputs: dict[str, jax.Array], key: jax.Array) -> sampling.SampleOutput:
    """Responses, log-probs, entropies and values for one batch of encoded prompts (`sampling.sample_fn`)."""
    model = nnx.merge(graphdef, params, frozen)
    return sampling.sample_fn(
        model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"], key,
        pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"),
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        eos_id=settings.eos_id, pad_id=settings.pad_id)


@functools.partial(jax.jit, static_argnums=(0,))
def value_step(graphdef: nnx.GraphDef, params: Any, frozen: Any, inputs: dict[str, jax.Array]) -> jax.Array:
    """The value head at the last prompt token `[B]` (GAE's bootstrap)."""
    model = nnx.merge(graphdef, params, frozen)
    _, _, values, _ = sampling.prefill_fn(
        model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"],
        pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"), max_new_tokens=1)
    return values


class PPOTrainer:
    """Owns the policy, causal term, envs, optimizer and run directory of one PPO run.

    Cheap checks come first (the HF directory, the mesh against the devices, the work directory, the
    checkpoint's and the cached start's settings), before any SFT, env or model is built.

    Args:
      config: the run's PPOConfig. workdir: its directory. resume: continue from a checkpoint;
      resume_step: which one (default: the latest).
    Raises:
      ConfigError, RunError, CheckpointError: one line naming the problem and the fix.
    """

    def __init__(self, config: PPOConfig, workdir: str | Path, *, resume: bool = False,
                 resume_step: int | None = None) -> None:
        self.config = config
        policy_lib.check_hf_dir(config.model.hf_dir)
        self.mesh = make_mesh(config.mesh)
        check_batch_divisible(self.mesh, config.minibatch_size // config.grad_accum_steps, "micro-batch size")
        Run.open(self, config, workdir, start_lib.start_cache(config, workdir), resume=resume, resume_step=resume_step,
                 abstract_items=lambda meta: self._checkpoint_items(bytes(meta["env_state_bytes"])))

    def _build(self, cache) -> None:
        config, model = self.config, self.config.model
        start = start_lib.load_or_build(config, cache)
        self.start_summary = start.summary
        self.tokenizer, self.encoder = start.tokenizer, start.encoder
        self.causal = CausalTerm(config.algo, config.causal, start.classifier, self.tokenizer, model.max_new_tokens,
                                 seed=config.run.seed,
                                 demonstrations=(start.demo_tokens, start.demo_mask, start.demo_labels))
        actor_critic = ActorCritic(start.policy, start.value_head)
        trainable = nnx.Param  # full fine-tuning: every parameter
        if model.lora_rank:
            actor_critic = lora.apply_lora(actor_critic, rank=model.lora_rank, alpha=model.lora_alpha,
                                           dropout=model.lora_dropout, rngs=nnx.Rngs(config.run.seed))
            trainable = lora.trainable_filter(train_vision=model.train_vision, train_projector=model.train_vision)
        # Trainable state (optimised, donated, checkpointed) and the frozen rest (the LoRA base).
        self.graphdef, params, frozen = nnx.split(actor_critic, trainable, ...)
        self.frozen = put(frozen, state_shardings(self.mesh, frozen))
        self.base_digest = tree_digest(frozen)
        self.param_shardings = state_shardings(self.mesh, params)
        self.params = put(params, self.param_shardings)
        steps_per_update = config.ppo_epochs * (config.steps_per_update // config.minibatch_size)
        self.opt = OptimizerConfig(config.lr, config.lr_min, config.lr_decay_updates * steps_per_update,
                                   config.max_grad_norm, config.adam_eps)
        opt_state = make_optimizer(self.opt).init(self.params)
        self.opt_shardings = state_shardings(self.mesh, opt_state)
        self.opt_state = put(opt_state, self.opt_shardings)
        self.hp = PPOHyper(clip_eps=config.clip_eps, value_clip_eps=config.value_clip_eps, value_coef=config.value_coef,
                           thought_coef=config.thought_coef, temperature=model.temperature, epochs=config.ppo_epochs,
                           minibatch_size=config.minibatch_size, grad_accum_steps=config.grad_accum_steps,
                           remat=model.remat, lora_dropout=bool(model.lora_rank and model.lora_dropout))
        self.sample_settings = SampleSettings(model.max_new_tokens, model.temperature, model.top_p,
                                              int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id))
        self.run_key = jax.random.key(config.run.seed)
        self.iteration = 0
        self.rollout = self._vector_rollout(config.run.seed, config.num_envs)
        self.buffer = RolloutBuffer(config.steps_per_env, config.num_envs, self.encoder.prompt_len,
                                    model.max_new_tokens, image_fields_of(self.rollout.current_inputs()))
        self.tracker = metrics_lib.SuccessTracker(config.run.success_window)

    def _vector_rollout(self, seed: int, num_envs: int, env_kwargs: dict[str, Any] | None = None) -> VectorRollout:
        c = self.config
        return VectorRollout(c.env, num_envs, self.encoder, self.tokenizer, seed=seed, cot=c.model.cot,
                             brief=c.model.brief_prompt, env_kwargs={**c.env_kwargs, **(env_kwargs or {})})

    # ------------------------------------------------------------------------------------------
    def policy_fn(self, key: jax.Array):
        """The rollout's policy: call `t` of a collection samples with `fold_in(key, t)`."""
        def sample(inputs: dict[str, np.ndarray], t: int) -> StepOutput:
            out = jax.device_get(sample_step(self.graphdef, self.sample_settings, self.params, self.frozen, inputs,
                                             jax.random.fold_in(key, t)))
            return StepOutput(np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.mask),
                              np.asarray(out.values), np.asarray(out.entropies))
        return sample

    def run_iteration(self, key: jax.Array) -> IterationOutput:
        """Rollout -> soft-RL weights -> GAE targets -> PPO update, for the iteration's `key`."""
        config, timer = self.config, self.run.timer
        with timer.phase("rollout"):
            stats = self.rollout.collect(self.buffer, self.policy_fn(phase_key(key, "rollout")))
            bootstrap = np.asarray(value_step(self.graphdef, self.params, self.frozen, self.rollout.current_inputs()))
        for episode_return, length, success in zip(stats.returns, stats.lengths, stats.successes):
            self.tracker.add_episode(episode_return, length, success)
        flat = self.buffer.flat()
        responses = (flat["response_ids"], flat["response_mask"], flat["labels"], flat["valid"])

        with timer.phase("causal"):
            self.causal.observe(*responses)
            weights, record = self.causal.step(phase_key(key, "causal"), *responses)
        flat["entropy_weights"] = weights

        arrays = self.buffer.arrays
        rewards = jnp.asarray(arrays["rewards"])
        if config.soft_backup:
            # The soft value: each step's reward gains alpha * H_B(y_t) of the behaviour policy (its sampled
            # token entropies, weighted by the algo's weights), so the value head learns the soft value and
            # the advantages carry the entropy's future value (paper Sec. 4.2, Lemma 4.2).
            bonus = losses.weighted_entropy(jnp.asarray(flat["old_entropies"]), jnp.asarray(weights),
                                            jnp.asarray(flat["response_mask"]))
            rewards = losses.soft_rewards(rewards, bonus.reshape(rewards.shape), self.causal.alpha)
            record["soft/entropy_bonus"] = float(jnp.mean(bonus))
        advantages, returns = losses.gae(rewards, jnp.asarray(arrays["old_values"]), jnp.asarray(arrays["dones"]),
                                         jnp.asarray(bootstrap), config.gamma, config.gae_lambda)
        flat["returns"] = np.asarray(returns).reshape(-1)
        flat["advantages"] = np.asarray(losses.normalise_advantages(advantages)).reshape(-1)

        batch = {k: flat[k] for k in BATCH_FIELDS + OPTIONAL_BATCH_FIELDS if k in flat}
        with timer.phase("update") as phase:
            batch = put(batch, batch_shardings(self.mesh, batch))
            self.params, self.opt_state, metrics = phase.block(update_step(
                self.graphdef, self.hp, self.opt, self.mesh, self.params, self.opt_state, batch,
                phase_key(key, "update"), jnp.float32(self.causal.alpha), self.frozen))
            metrics = jax.device_get(metrics)
        self.iteration += 1
        self.last_batch = flat

        record.update({f"ppo/{k}": float(v) for k, v in metrics.items() if k != "minibatches"})
        record.update(self.tracker.summary())
        record["success_rate"] = self.tracker.success_rate
        record["iteration_success_rate"] = float(np.mean(stats.successes)) if stats.successes else float("nan")
        record["episodes"] = len(stats.returns)
        record["invalid_action_rate"] = float(1.0 - flat["valid"].mean())
        record["response_tokens"] = float(flat["response_mask"].sum(axis=1).mean())
        record.update(timer.pop())
        heatmap = self.causal.heatmap(flat["response_ids"], flat["response_mask"], flat["valid"], weights)
        return IterationOutput(record, self.rollout.total_env_steps, heatmap,
                               skipped=int(metrics["skipped_minibatches"]), minibatches=int(metrics["minibatches"]))

    def train(self) -> list[dict[str, Any]]:
        c = self.config
        return self.run.train(self, self.run_key, c.num_iterations, desc=f"{c.env}/{c.algo}",
                              heatmap_title=f"{c.env}: CoSo causal weights", plot_title=f"{c.env} / {c.algo}",
                              max_skipped_updates=c.max_skipped_updates)

    # ------------------------------------------------------------------------------------------
    def evaluate(self, num_steps: int = 256, seed: int = EVAL_SEED) -> dict[str, float]:
        """Success of the current policy on fresh envs (own seeds; the training envs and keys are
        untouched). Samples at the training temperature, as RL4VLM's curves do. Episodes still running
        after `num_steps` steps are not counted.

        Returns "episodes", "success_rate", "mean_return", "invalid_action_rate" and, where the env
        reports task types (ALFWorld), "by_task_type".
        """
        config = self.config
        evaluator = self._vector_rollout(seed, config.num_envs)
        steps = max(num_steps // config.num_envs, 1)
        scratch = RolloutBuffer(steps, config.num_envs, self.encoder.prompt_len, config.model.max_new_tokens,
                                self.buffer.image_fields)
        try:
            stats = evaluator.collect(scratch, self.policy_fn(eval_key(self.run_key, seed)))
        finally:
            evaluator.close()
        summary = stats.summary()
        out = {k: summary[k] for k in ("episodes", "success_rate", "mean_return")}
        out["invalid_action_rate"] = float(1.0 - scratch.flat()["valid"].mean())
        if "by_task_type" in summary:
            out["by_task_type"] = summary["by_task_type"]
        return out

    def evaluate_episodes(self, episodes: list[dict[str, Any]], seed: int = EVAL_SEED,
                          env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The current policy on a fixed list of episodes, each played to its end (e.g. ALFWorld's
        held-out games: {"split": "test", "task_type": t, "index": i}), on min(num_envs, len(episodes))
        envs at a time, at the training temperature; training envs and keys are untouched.
        `env_kwargs` update the config's (e.g. "max_steps").

        Returns "episodes", "success_rate", "mean_return", "mean_length", "mean_progress" (nan where the
        env reports no progress) and, where the env reports task types, "by_task_type".
        """
        evaluator = self._vector_rollout(seed, max(min(self.config.num_envs, len(episodes)), 1), env_kwargs)
        try:
            stats = evaluator.play_episodes(self.policy_fn(eval_key(self.run_key, seed)), episodes)
        finally:
            evaluator.close()
        return stats.summary()

    # ------------------------------------------------------------------------------------------
    def _checkpoint_items(self, env_state: bytes) -> dict[str, Any]:
        """The checkpoint's items; `env_state` (or, when restoring, its length) shapes the env item."""
        return {
            "envs": {"state": np.frombuffer(env_state, np.uint8), "obs": self.rollout.observations()},
            "params": self.params,
            "opt_state": self.opt_state,
            **self.causal.checkpoint_items(),
        }

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        env_state = self.rollout.state_bytes()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "base_digest": self.base_digest,  # the frozen base is not saved: it comes from the start / hf_dir
            "iteration": self.iteration,
            "env_steps": self.rollout.total_env_steps,
            "tracker": self.tracker.state_dict(),
            "env_state_bytes": len(env_state),
            **self.causal.checkpoint_metadata(),
        }
        return self._checkpoint_items(env_state), meta

    def _restore(self, items: dict[str, Any], meta: dict[str, Any]) -> None:
        if meta.get("base_digest", self.base_digest) != self.base_digest:
            raise CheckpointError(
                f"the frozen base model differs from the one this checkpoint's adapters were trained on "
                f"({self.config.model.hf_dir or 'the cached start'}); resume with the same base weights")
        self.params = put(items["params"], self.param_shardings)
        self.opt_state = put(items["opt_state"], self.opt_shardings)
        self.causal.restore(items, meta)
        self.rollout.load_state(np.asarray(items["envs"]["state"]).tobytes(), np.asarray(items["envs"]["obs"]))
        self.tracker.load_state_dict(meta["tracker"])
        self.iteration = int(meta["iteration"])
        log.info("resumed from iteration %d (%d env steps)", self.iteration, self.rollout.total_env_steps)

    def close(self) -> None:
        try:
            self.rollout.close()
        finally:
            self.run.close()
