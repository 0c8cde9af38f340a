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
from coso_jax.rl import distributed
from coso_jax.rl import policy as policy_lib
from coso_jax.rl.buffers import RolloutBuffer, image_fields_of
from coso_jax.rl.causal_term import CausalTerm, weight_statistics
from coso_jax.rl.config import ConfigError, PPOConfig
from coso_jax.rl.episodes import EpisodeStats, StepOutput, VectorRollout
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
from coso_jax.rl.sharding import batch_sharding, check_batch_divisible, make_mesh, put, state_shardings

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


def sample(graphdef: nnx.GraphDef, settings: SampleSettings, params: Any, frozen: Any,
           inputs: dict[str, jax.Array], key: jax.Array) -> sampling.SampleOutput:
    """Responses, log-probs, entropies and values for one batch of encoded prompts (`sampling.sample_fn`)."""
    model = nnx.merge(graphdef, params, frozen)
    return sampling.sample_fn(
        model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"], key,
        pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"),
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        eos_id=settings.eos_id, pad_id=settings.pad_id)


def value(graphdef: nnx.GraphDef, params: Any, frozen: Any, inputs: dict[str, jax.Array]) -> jax.Array:
    """The value head at the last prompt token `[B]` (GAE's bootstrap)."""
    model = nnx.merge(graphdef, params, frozen)
    _, _, values, _ = sampling.prefill_fn(
        model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"],
        pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"), max_new_tokens=1)
    return values


# The jitted phases of the process (static: the GraphDef and the settings).
sample_step = jax.jit(sample, static_argnums=(0, 1))
value_step = jax.jit(value, static_argnums=(0,))
normalise_advantages_step = jax.jit(losses.normalise_advantages)


@dataclasses.dataclass
class DeviceSteps:
    """The trainer's device programs, as called by `run_iteration` (a seed batch swaps in batched ones)."""

    sample: Any = sample_step
    value: Any = value_step
    update: Any = update_step


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
        processes = distributed.process_count()
        if config.env_partitions % processes:
            raise ConfigError(f"a run of {processes} processes splits its envs over the processes: set --set "
                              f"env_partitions={processes} (or a multiple of it), got {config.env_partitions}")
        # This process's envs: a contiguous block of the global env indices (one block of env groups).
        self.local_groups = config.env_partitions // processes
        self.local_envs = config.num_envs // processes
        self.env_offset = distributed.process_index() * self.local_envs
        # Rollout rows live on the mesh (split over its batch axes) when there is more than one device.
        self.distributed_batch = processes > 1 or self.mesh.size > 1
        if self.distributed_batch:
            check_batch_divisible(self.mesh, self.config.num_envs, "num_envs (the sampler's batch)")
        Run.open(self, config, workdir, start_lib.start_cache(config, workdir), resume=resume, resume_step=resume_step,
                 abstract_items=lambda meta: self._checkpoint_items(int(max(meta["env_state_bytes"]))))

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
        self.steps = DeviceSteps()
        self.run_key = jax.random.key(config.run.seed)
        self.iteration = 0
        self.rollout = self._vector_rollout(config.run.seed, config.num_envs)
        self.buffer = RolloutBuffer(config.steps_per_env, self.local_envs, self.encoder.prompt_len,
                                    model.max_new_tokens, image_fields_of(self.rollout.current_inputs()))
        self.tracker = metrics_lib.SuccessTracker(config.run.success_window)

    def _vector_rollout(self, seed: int, num_envs: int, env_kwargs: dict[str, Any] | None = None) -> VectorRollout:
        """This process's share of `num_envs` envs (a contiguous block of the global env indices)."""
        c = self.config
        local = num_envs // distributed.process_count()
        return VectorRollout(c.env, local, self.encoder, self.tokenizer, seed=seed, cot=c.model.cot,
                             brief=c.model.brief_prompt, env_kwargs={**c.env_kwargs, **(env_kwargs or {})},
                             env_offset=distributed.process_index() * local)

    # ------------------------------------------------------------------------------------------
    def policy_fn(self, key: jax.Array):
        """The rollout's policy: call `t` of a collection samples with `fold_in(key, t)`. With several
        processes every call is collective: all processes' envs are one global batch."""
        def sample(inputs: dict[str, np.ndarray], t: int) -> StepOutput:
            out = self._local_rows(self.steps.sample(self.graphdef, self.sample_settings, self.params, self.frozen,
                                                     self._global_rows(inputs), jax.random.fold_in(key, t)))
            return StepOutput(out.tokens, out.logprobs, out.mask, out.values, out.entropies)
        return sample

    def run_iteration(self, key: jax.Array) -> IterationOutput:
        """Rollout -> soft-RL weights -> GAE targets -> PPO update, for the iteration's `key`.

        Every process runs it together; arrays of the process's envs are `local` ([T, E_local] time-major
        in the buffer, partition-major rows in the batch), everything that decides a number for the whole
        run (the classifier's replay, success, advantage statistics, the update) sees all envs."""
        config, timer = self.config, self.run.timer
        with timer.phase("rollout"):
            stats = self.rollout.collect(self.buffer, self.policy_fn(phase_key(key, "rollout")))
            bootstrap = self._local_rows(self.steps.value(self.graphdef, self.params, self.frozen,
                                                    self._global_rows(self.rollout.current_inputs())))
        episodes = self._all_episodes(stats)
        for episode_return, length, success in episodes:
            self.tracker.add_episode(episode_return, length, success)
        arrays, flat = self.buffer.arrays, self.buffer.flat()  # local, time-major
        t_len, e_local = arrays["rewards"].shape
        responses = (flat["response_ids"], flat["response_mask"], flat["labels"], flat["valid"])
        # Every env's answers, time-major as one process holds them: the replay (and with it the classifier)
        # is the same on every process and equals a one-process run's.
        every = self._time_major_all({"ids": arrays["response_ids"], "mask": arrays["response_mask"],
                                      "labels": arrays["labels"], "valid": arrays["valid"]})

        with timer.phase("causal"):
            self.causal.observe(every["ids"], every["mask"], every["labels"], every["valid"])
            record = self.causal.update_classifier(phase_key(key, "causal"))
            weights = self.causal.weights(*responses)
        if self.causal.uses_classifier:
            gathered = distributed.allgather({"w": weights, "m": flat["response_mask"] & flat["valid"][:, None]})
            record.update(weight_statistics(gathered["w"].reshape(-1, weights.shape[-1]),
                                            gathered["m"].reshape(-1, weights.shape[-1])))
        flat["entropy_weights"] = weights

        rewards = jnp.asarray(arrays["rewards"])
        if config.soft_backup:
            # The soft value: each step's reward gains alpha * H_B(y_t) of the behaviour policy (its sampled
            # token entropies, weighted by the algo's weights), so the value head learns the soft value and
            # the advantages carry the entropy's future value (paper Sec. 4.2, Lemma 4.2).
            bonus = losses.weighted_entropy(jnp.asarray(flat["old_entropies"]), jnp.asarray(weights),
                                            jnp.asarray(flat["response_mask"]))
            rewards = losses.soft_rewards(rewards, bonus.reshape(rewards.shape), self.causal.alpha)
            record["soft/entropy_bonus"] = float(np.mean(distributed.allgather(np.asarray(bonus))))
        advantages, returns = losses.gae(rewards, jnp.asarray(arrays["old_values"]), jnp.asarray(arrays["dones"]),
                                         jnp.asarray(bootstrap), config.gamma, config.gae_lambda)
        flat["returns"] = np.asarray(returns).reshape(-1)
        flat["advantages"] = np.asarray(advantages).reshape(-1)
        # The batch, partition-major (the env groups' blocks in order; one block per process).
        local = {k: distributed.to_partition_major(v.reshape((t_len, e_local) + v.shape[1:]), self.local_groups)
                 for k, v in flat.items()}
        local["advantages"] = self._local_rows(normalise_advantages_step(self._global_rows(local["advantages"])))

        batch = {k: local[k] for k in BATCH_FIELDS + OPTIONAL_BATCH_FIELDS if k in local}
        with timer.phase("update") as phase:
            batch = self._global_rows(batch)
            self.params, self.opt_state, metrics = phase.block(self.steps.update(
                self.graphdef, self.hp, self.opt, self.mesh, self.params, self.opt_state, batch,
                phase_key(key, "update"), jnp.float32(self.causal.alpha), self.frozen))
            metrics = jax.device_get(metrics)
        self.iteration += 1
        self.last_batch = local

        totals = distributed.allgather(np.array([flat["valid"].sum(), flat["valid"].size,
                                                 flat["response_mask"].sum()], np.float64)).sum(0)
        record.update({f"ppo/{k}": float(v) for k, v in metrics.items() if k != "minibatches"})
        record.update(self.tracker.summary())
        record["success_rate"] = self.tracker.success_rate
        record["iteration_success_rate"] = (float(np.mean([s for _, _, s in episodes])) if episodes
                                            else float("nan"))
        record["episodes"] = len(episodes)
        record["invalid_action_rate"] = float(1.0 - totals[0] / totals[1])
        record["response_tokens"] = float(totals[2] / totals[1])
        record.update(timer.pop())
        heatmap = self.causal.heatmap(flat["response_ids"], flat["response_mask"], flat["valid"], weights)
        return IterationOutput(record, self.config.num_envs * self.rollout.total_env_steps // e_local, heatmap,
                               skipped=int(metrics["skipped_minibatches"]), minibatches=int(metrics["minibatches"]))

    # --- across processes (no-ops on one process with one device) ---------------------------------
    def _global_rows(self, tree: Any) -> Any:
        """A pytree of this process's rows as global arrays split over the mesh's batch axes."""
        if not self.distributed_batch:
            return tree
        return distributed.global_rows(tree, jax.tree.map(lambda x: batch_sharding(self.mesh, np.ndim(x)), tree))

    def _local_rows(self, tree: Any) -> Any:
        return distributed.local_rows(tree) if self.distributed_batch else jax.tree.map(np.asarray, tree)

    def _time_major_all(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """[T, E_local, ...] arrays of every process as [T * E, ...], time-major over all envs."""
        gathered = distributed.allgather(arrays)  # [P, T, E_local, ...]
        return {k: np.moveaxis(v, 0, 1).reshape((-1,) + v.shape[3:]) for k, v in gathered.items()}

    def _all_episodes(self, stats: EpisodeStats) -> list[tuple[float, int, bool]]:
        """Every process's finished episodes as (return, length, success), in (step, env) order."""
        rows = np.array([[s, e + self.env_offset, r, n, ok] for s, e, r, n, ok in
                         zip(stats.steps, stats.envs, stats.returns, stats.lengths, stats.successes)],
                        np.float64).reshape(-1, 5)
        counts = distributed.allgather(np.array([len(rows)]))[:, 0]
        padded = np.zeros((int(counts.max()) if counts.size else 0, 5))
        padded[: len(rows)] = rows
        gathered = distributed.allgather(padded)
        merged = np.concatenate([g[:c] for g, c in zip(gathered, counts)])
        merged = merged[np.lexsort((merged[:, 1], merged[:, 0]))] if len(merged) else merged
        return [(float(r), int(n), bool(ok)) for _, _, r, n, ok in merged]

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
        scratch = RolloutBuffer(steps, self.local_envs, self.encoder.prompt_len, config.model.max_new_tokens,
                                self.buffer.image_fields)
        try:
            stats = evaluator.collect(scratch, self.policy_fn(eval_key(self.run_key, seed)))
        finally:
            evaluator.close()
        if distributed.process_count() > 1:  # every process's episodes, in (step, env) order
            merged = EpisodeStats()
            for episode_return, length, success in self._all_episodes(stats):
                merged.returns.append(episode_return)
                merged.lengths.append(length)
                merged.successes.append(success)
            stats = merged
        summary = stats.summary()
        out = {k: summary[k] for k in ("episodes", "success_rate", "mean_return")}
        valid = distributed.allgather(scratch.flat()["valid"])
        out["invalid_action_rate"] = float(1.0 - valid.mean())
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
        if distributed.process_count() > 1:
            raise ConfigError("evaluate_episodes plays a list of episodes on one process; a multi-process run "
                              "evaluates with evaluate()")
        evaluator = self._vector_rollout(seed, max(min(self.config.num_envs, len(episodes)), 1), env_kwargs)
        try:
            stats = evaluator.play_episodes(self.policy_fn(eval_key(self.run_key, seed)), episodes)
        finally:
            evaluator.close()
        return stats.summary()

    # ------------------------------------------------------------------------------------------
    def _checkpoint_items(self, state_len: int, env_state: bytes = b"") -> dict[str, Any]:
        """The checkpoint's items. The envs' state (pickled, zero-padded to `state_len` bytes: the longest of
        all processes') and observations are per process: one [P, ...] global array each, row p on process
        p, so every process saves and restores its own envs."""
        state = np.zeros(state_len, np.uint8)
        state[: len(env_state)] = np.frombuffer(env_state, np.uint8)
        return {
            "envs": {"state": distributed.process_stack(state),
                     "obs": distributed.process_stack(self.rollout.observations())},
            "params": self.params,
            "opt_state": self.opt_state,
            **self.causal.checkpoint_items(),
        }

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        env_state = self.rollout.state_bytes()
        lengths = [int(n) for n in distributed.allgather(np.array([len(env_state)]))[:, 0]]
        meta = {
            "format": CHECKPOINT_FORMAT,
            "base_digest": self.base_digest,  # the frozen base is not saved: it comes from the start / hf_dir
            "iteration": self.iteration,
            "env_steps": self.rollout.total_env_steps,
            "tracker": self.tracker.state_dict(),
            "env_state_bytes": lengths,  # per process
            "processes": distributed.process_count(),
            **self.causal.checkpoint_metadata(),
        }
        return self._checkpoint_items(max(lengths), env_state), meta

    def _restore(self, items: dict[str, Any], meta: dict[str, Any]) -> None:
        if meta.get("base_digest", self.base_digest) != self.base_digest:
            raise CheckpointError(
                f"the frozen base model differs from the one this checkpoint's adapters were trained on "
                f"({self.config.model.hf_dir or 'the cached start'}); resume with the same base weights")
        self.params = put(items["params"], self.param_shardings)
        self.opt_state = put(items["opt_state"], self.opt_shardings)
        if meta.get("processes", 1) != distributed.process_count():
            raise CheckpointError(f"this checkpoint was written by {meta.get('processes', 1)} processes; resume it "
                                  f"with as many (this run has {distributed.process_count()})")
        self.causal.restore(items, meta)
        length = meta["env_state_bytes"][distributed.process_index()]
        self.rollout.load_state(distributed.own_row(items["envs"]["state"])[:length].tobytes(),
                                distributed.own_row(items["envs"]["obs"]))
        self.tracker.load_state_dict(meta["tracker"])
        self.iteration = int(meta["iteration"])
        log.info("resumed from iteration %d (%d env steps)", self.iteration, self.rollout.total_env_steps)

    def close(self) -> None:
        try:
            self.rollout.close()
        finally:
            self.run.close()
