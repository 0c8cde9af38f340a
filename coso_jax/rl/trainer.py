"""Online CoSo training on the gym_cards games: SFT warm start, then PPO with none | entropy | coso.

One iteration (RL4VLM + CoSo):
  1. rollout: `steps_per_update` env steps with the jitted sampler (phase `rollout`);
  2. GAE on the rollout (gamma, lambda), advantages normalised over the batch;
  3. causal model (coso only): the classifier trains online on valid actions sampled from the
     replay, then scores the rollout's responses -> counterfactual effects -> weights (phase `causal`);
  4. PPO update: one jitted function over epochs x minibatches x micro-batches (phase `update`);
  5. metrics (JSONL + TensorBoard), a success curve PNG, a token-weight heatmap, checkpoints.

The SFT start (tokenizer, SFT'd policy, pre-trained classifier) is computed once per (env,
model settings) and cached under `sft_dir`, so every algo and seed starts from the same policy.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coso_jax import checkpoint as ckpt
from coso_jax import losses, metrics as metrics_lib, sampling
from coso_jax.causal import classifier as clf
from coso_jax.causal import counterfactual_effects, causal_weights, skip_token_mask
from coso_jax.causal import precompile as causal_precompile
from coso_jax.causal.render import render_token_heatmap
from coso_jax.rl import policy as policy_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.buffer import ActionReplay, RolloutBuffer
from coso_jax.rl.config import TrainConfig
from coso_jax.rl.ppo import BATCH_FIELDS, PPOHyper, make_optimizer, make_update_fn
from coso_jax.rl.rollout import StepOutput, VectorRollout, by_task_type
from coso_jax.rl.train_state import (
    ActorCritic,
    batch_shardings,
    check_batch_divisible,
    make_mesh,
    put,
    replicated,
    resume_and_open_writer,
    state_shardings,
)

log = logging.getLogger(__name__)

# Config fields that define the SFT start; algo, alpha and seed are deliberately absent so every
# algo and seed shares it.
_SFT_FIELDS = (
    "env", "model_preset", "hf_dir", "image_size", "patch_size", "vocab_size", "cot", "brief_prompt",
    "prompt_template", "classifier_preset", "max_new_tokens",
    "sft_episodes", "sft_imperfect_frac", "sft_epochs", "sft_lr", "sft_batch_size",
    "causal_pretrain_steps", "causal_lr", "causal_minibatch",
)
# ALFWorld's too (its demonstrations play games of this task type and pool); only for ALFWorld, so
# the gym_cards fingerprints are those of the runs made before these fields existed.
_ALFWORLD_SFT_FIELDS = ("alfworld_task_type", "alfworld_pool_size")
# Fields added after runs existed: left out of the resume fingerprint at their default value, so those
# runs still resume.
_LATER_FIELDS = ("prompt_margin", "alfworld_task_type", "alfworld_pool_size")


def sft_fingerprint(config: TrainConfig) -> str:
    fields = _SFT_FIELDS + (_ALFWORLD_SFT_FIELDS if config.env == "ALFWorld" else ())
    return ckpt.config_fingerprint({k: getattr(config, k) for k in fields})


def default_sft_dir(config: TrainConfig, workdir: str | Path) -> Path:
    return Path(workdir).parent / "sft" / f"{config.env}-{config.preset}-{sft_fingerprint(config)[:10]}"


class StepCache:
    """Compiled step functions shared by the Trainers of one process.

    Each Trainer builds its sample/value/update/classifier steps as new closures, and jax compiles a
    new closure again even when the program is the same (~30 s per run on 2 cores at the tiny
    preset). Passing one `StepCache` to several Trainers (e.g. the seeds and algos of a grid) reuses
    a step whenever everything its program depends on is equal: the model's graph structure and the
    config fields listed in its key. Explicit, not a module global, so nothing leaks between users.
    """

    def __init__(self) -> None:
        self._steps: dict[Any, Any] = {}
        self.builds: dict[str, int] = {}

    def get(self, name: str, key: Any, build):
        full_key = (name, key)
        if full_key not in self._steps:
            self._steps[full_key] = build()
            self.builds[name] = self.builds.get(name, 0) + 1
        return self._steps[full_key]


# Config fields each cached step's program depends on (besides the model graph structure).
_SAMPLE_FIELDS = ("max_new_tokens", "temperature", "top_p")
_UPDATE_FIELDS = ("algo", "alpha", "clip_eps", "value_clip_eps", "value_coef", "thought_coef",
                  "temperature", "ppo_epochs", "minibatch_size", "grad_accum_steps", "lr", "lr_min",
                  "lr_decay_updates", "steps_per_update", "max_grad_norm", "adam_eps", "mesh")


class Trainer:
    """Owns the policy, classifier, envs, optimizer, checkpoints and metrics of one run.

    `step_cache`: share compiled steps with other Trainers of this process (see `StepCache`).
    """

    def __init__(self, config: TrainConfig, workdir: str | Path, *, resume: bool = False,
                 step_cache: StepCache | None = None) -> None:
        self.config = config
        self.step_cache = step_cache if step_cache is not None else StepCache()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Checked first, before envs and models exist: the fingerprint makes resuming with different
        # settings a clear error, not a silent mix, and a finished run is never overwritten.
        self.checkpointer = ckpt.open_run_checkpointer(
            self.workdir, resume=resume, max_to_keep=config.keep_checkpoints,
            fingerprint=ckpt.config_fingerprint(_resume_fields(config)))
        self.mesh = make_mesh(config.mesh)
        check_batch_divisible(self.mesh, config.minibatch_size // config.grad_accum_steps, "micro-batch size")
        self.sft_dir = Path(config.sft_dir) if config.sft_dir else default_sft_dir(config, self.workdir)
        self.timer = metrics_lib.PhaseTimer()

        # --- SFT start: tokenizer, policy, classifier (cached) ---------------------------------
        start = policy_lib.load_or_build_sft_start(config, self.sft_dir)
        self.tokenizer = start.tokenizer
        self.encoder = start.encoder
        self.model = ActorCritic(start.policy, start.value_head)
        self.classifier = start.classifier
        self.sft_summary = start.summary
        self.skip_vocab = skip_token_mask(self.tokenizer, vocab_size=self.classifier.config.vocab_size)
        self.mask_token_id = int(self.tokenizer.unk_token_id)
        if config.algo == "coso":
            # Every response-length bucket now, so no later iteration stops to compile one.
            causal_precompile(clf.logits_fn(self.classifier), config.max_new_tokens,
                              chunk_size=config.causal_chunk_size)

        # --- optimisation state ----------------------------------------------------------------
        self.hp = PPOHyper(
            algo=config.algo,
            alpha=config.alpha,
            clip_eps=config.clip_eps,
            value_clip_eps=config.value_clip_eps,
            value_coef=config.value_coef,
            thought_coef=config.thought_coef,
            temperature=config.temperature,
            epochs=config.ppo_epochs,
            minibatch_size=config.minibatch_size,
            grad_accum_steps=config.grad_accum_steps,
        )
        steps_per_update = config.ppo_epochs * (config.steps_per_update // config.minibatch_size)
        self.tx = make_optimizer(config.lr, config.lr_min, config.lr_decay_updates, steps_per_update,
                                 config.max_grad_norm, config.adam_eps)
        self.graphdef, params = nnx.split(self.model, nnx.Param)
        self.param_shardings = state_shardings(self.mesh, params)
        self.params = put(params, self.param_shardings)
        opt_state = self.tx.init(self.params)
        self.opt_shardings = state_shardings(self.mesh, opt_state)
        self.opt_state = put(opt_state, self.opt_shardings)
        self.classifier_tx = clf.make_optimizer(self.classifier, learning_rate=config.causal_lr)
        # nnx.jit keys its cache on the module's graph structure, so one step serves every classifier.
        self.classifier_step = self.step_cache.get("classifier_step", config.causal_lr,
                                                   clf.make_train_step)
        self.key = jax.random.key(config.seed)
        self.iteration = 0

        # --- envs, buffers -----------------------------------------------------------------------
        self.rollout = VectorRollout(config.env, config.num_envs, self.encoder, self.tokenizer,
                                     seed=config.seed, cot=config.cot, brief=config.brief_prompt,
                                     env_kwargs=config.env_kwargs)
        probe = self.rollout.current_inputs()
        self.buffer = RolloutBuffer(config.steps_per_env, config.num_envs, self.encoder.prompt_len,
                                    config.max_new_tokens, probe["pixel_values"].shape[1:],
                                    probe["pixel_values"].dtype)
        self.replay = ActionReplay(config.causal_replay_capacity, config.max_new_tokens, seed=config.seed)
        self.replay.add(start.demo_tokens, start.demo_mask, start.demo_labels, start.demo_labels >= 0)
        self.tracker = metrics_lib.SuccessTracker(config.success_window)

        self._build_jitted()
        self.writer = resume_and_open_writer(self, config.to_dict(), resume=resume)

    # ------------------------------------------------------------------------------------------
    def _build_jitted(self) -> None:
        graphdef, config, tok = self.graphdef, self.config, self.tokenizer
        eos_id, pad_id = int(tok.eos_token_id), int(tok.pad_token_id)
        rep = replicated(self.mesh)

        def sample(params, inputs, key):
            model = nnx.merge(graphdef, params)
            return sampling.sample_fn(
                model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"], key,
                pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"),
                max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                eos_id=eos_id, pad_id=pad_id,
            )

        def value(params, inputs):
            model = nnx.merge(graphdef, params)
            _, _, values, _ = sampling.prefill_fn(
                model.policy, model.value_head, inputs["prompt_ids"], inputs["prompt_mask"],
                pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"), max_new_tokens=1)
            return values

        sample_key = (graphdef, eos_id, pad_id) + tuple(getattr(config, f) for f in _SAMPLE_FIELDS)
        self._sample = self.step_cache.get("sample", sample_key, lambda: jax.jit(sample))
        self._value = self.step_cache.get("value", (graphdef,), lambda: jax.jit(value))
        self._update_key = (graphdef,) + tuple(getattr(config, f) for f in _UPDATE_FIELDS)
        self._update_impl = make_update_fn(graphdef, self.tx, self.hp)
        self._update = None  # built lazily with the batch's shardings

    def _jit_update(self, batch: dict[str, np.ndarray]):
        if self._update is None:
            shardings = batch_shardings(self.mesh, batch)
            self._batch_shardings = shardings
            shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
            self._update = self.step_cache.get("update", self._update_key + (shapes,), lambda: jax.jit(
                self._update_impl,
                in_shardings=(self.param_shardings, self.opt_shardings, shardings, replicated(self.mesh)),
                out_shardings=(self.param_shardings, self.opt_shardings, replicated(self.mesh)),
                donate_argnums=(0, 1),
            ))
        return self._update

    def _next_key(self) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    # ------------------------------------------------------------------------------------------
    def policy_fn(self, inputs: dict[str, np.ndarray]) -> StepOutput:
        out = self._sample(self.params, inputs, self._next_key())
        out = jax.device_get(out)
        return StepOutput(np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.mask),
                          np.asarray(out.values))

    def compute_causal_weights(self, flat: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(effects, weights) `[n, N]` for the rollout's responses; zero for invalid actions."""
        valid_rows = flat["valid"] & (flat["labels"] >= 0)
        labels = np.where(valid_rows, flat["labels"], 0)
        mask = flat["response_mask"] & valid_rows[:, None]
        effects = counterfactual_effects(
            clf.logits_fn(self.classifier), flat["response_ids"], mask, labels,
            window=self.config.causal_window, mask_token_id=self.mask_token_id,
            skip_mask=self.skip_vocab, chunk_size=self.config.causal_chunk_size, pad_invariant=True,
        )
        skip = self.skip_vocab[np.clip(flat["response_ids"], 0, len(self.skip_vocab) - 1)]
        weights = causal_weights(effects, mask & ~skip)
        return np.asarray(effects), np.asarray(weights)

    def update_classifier(self) -> dict[str, float]:
        """`causal_epochs` optimizer steps, each on `causal_batch` actions from the replay."""
        config = self.config
        losses_, accs = [], []
        for _ in range(config.causal_epochs):
            # The reference accumulates gradients over minibatches of one sampled batch into one
            # optimizer step; a single step on the whole batch is the same update.
            tokens, mask, labels = self.replay.sample(config.causal_batch)
            loss, acc = self.classifier_step(self.classifier, self.classifier_tx, tokens, mask, labels,
                                             self._next_key())
            losses_.append(float(loss))
            accs.append(float(acc))
        return {"causal/loss": float(np.mean(losses_)), "causal/accuracy": float(np.mean(accs))}

    # ------------------------------------------------------------------------------------------
    def run_iteration(self) -> dict[str, Any]:
        config = self.config
        record: dict[str, Any] = {}
        with self.timer.phase("rollout"):
            stats = self.rollout.collect(self.buffer, self.policy_fn)
            bootstrap = np.asarray(self._value(self.params, self.rollout.current_inputs()))
        for episode_return, length, success in zip(stats.returns, stats.lengths, stats.successes):
            self.tracker.add_episode(episode_return, length, success)
        arrays = self.buffer.arrays
        advantages, returns = losses.gae(
            jnp.asarray(arrays["rewards"]), jnp.asarray(arrays["old_values"]), jnp.asarray(arrays["dones"]),
            jnp.asarray(bootstrap), config.gamma, config.gae_lambda,
        )
        flat = self.buffer.flat()
        flat["returns"] = np.asarray(returns).reshape(-1)
        flat["advantages"] = np.asarray(losses.normalise_advantages(advantages)).reshape(-1)
        self.replay.add(flat["response_ids"], flat["response_mask"], flat["labels"], flat["valid"])

        if config.algo == "coso":
            with self.timer.phase("causal"):
                record.update(self.update_classifier())
                effects, weights = self.compute_causal_weights(flat)
            valid_w = weights[flat["response_mask"] & flat["valid"][:, None]]
            if valid_w.size:
                record["causal/weight_mean"] = float(valid_w.mean())
                record["causal/frac_above_0.8"] = float((valid_w > 0.8).mean())
                record["causal/frac_below_0.2"] = float((valid_w < 0.2).mean())
        else:
            weights = flat["response_mask"].astype(np.float32)
        flat["causal_weights"] = weights.astype(np.float32)

        batch = {k: flat[k] for k in BATCH_FIELDS}
        with self.timer.phase("update") as phase:
            update = self._jit_update(batch)
            batch = put(batch, self._batch_shardings)
            self.params, self.opt_state, update_metrics = phase.block(
                update(self.params, self.opt_state, batch, self._next_key()))
            update_metrics = jax.device_get(update_metrics)
        self.iteration += 1

        record.update({f"ppo/{k}": float(v) for k, v in update_metrics.items()})
        record.update(self.tracker.summary())
        record["success_rate"] = self.tracker.success_rate
        record["iteration_success_rate"] = float(np.mean(stats.successes)) if stats.successes else float("nan")
        record["episodes"] = len(stats.returns)
        record["invalid_action_rate"] = float(1.0 - flat["valid"].mean())
        record["response_tokens"] = float(flat["response_mask"].sum(axis=1).mean())
        record["env_steps"] = self.rollout.total_env_steps
        record.update(self.timer.pop())
        self._last_texts = (self.buffer.flat_texts(), flat, weights)
        return record

    def evaluate(self, num_steps: int = 256, seed: int = 10_000_019) -> dict[str, float]:
        """Success of the current policy on fresh envs (own seeds; the training envs are untouched).

        Samples at the training temperature, as RL4VLM's curves do. Episodes still running after
        `num_steps` steps are not counted.
        """
        config = self.config
        evaluator = VectorRollout(config.env, config.num_envs, self.encoder, self.tokenizer, seed=seed,
                                  cot=config.cot, brief=config.brief_prompt, env_kwargs=config.env_kwargs)
        steps = max(num_steps // config.num_envs, 1)
        scratch = RolloutBuffer(steps, config.num_envs, self.encoder.prompt_len, config.max_new_tokens,
                                self.buffer.pixel_shape, self.buffer.pixel_dtype)
        saved_key = self.key
        self.key = jax.random.fold_in(self.key, seed)  # evaluation must not shift the training RNG
        try:
            stats = evaluator.collect(scratch, self.policy_fn)
        finally:
            self.key = saved_key
            evaluator.close()
        returns = np.asarray(stats.returns)
        flat_valid = scratch.flat()["valid"]
        out = {
            "episodes": int(returns.size),
            "success_rate": float(np.mean(stats.successes)) if returns.size else float("nan"),
            "mean_return": float(returns.mean()) if returns.size else float("nan"),
            "invalid_action_rate": float(1.0 - flat_valid.mean()),
        }
        groups = by_task_type(stats)
        if groups:  # envs that report a task type (ALFWorld): the same numbers per task type
            out["by_task_type"] = groups
        return out

    def evaluate_episodes(self, episodes: list[dict[str, Any]], seed: int = 10_000_019,
                          env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The current policy on a fixed list of episodes, each played to its end (see
        `VectorRollout.play_episodes`; e.g. ALFWorld's held-out games: {"split": "test", "task_type": t,
        "index": i}), on min(num_envs, len(episodes)) envs at a time. Samples at the training temperature;
        the training envs and RNG are untouched. `env_kwargs` update the config's (e.g. "max_steps").

        Returns "episodes", "success_rate", "mean_return", "mean_length", "mean_progress" (nan where the
        env reports no progress) and, where the env reports task types, "by_task_type" (see `by_task_type`).
        """
        config = self.config
        evaluator = VectorRollout(config.env, max(min(config.num_envs, len(episodes)), 1), self.encoder,
                                  self.tokenizer, seed=seed, cot=config.cot, brief=config.brief_prompt,
                                  env_kwargs={**config.env_kwargs, **(env_kwargs or {})})
        saved_key = self.key
        self.key = jax.random.fold_in(self.key, seed)
        try:
            stats = evaluator.play_episodes(self.policy_fn, episodes)
        finally:
            self.key = saved_key
            evaluator.close()
        progress = [p for p in stats.final_progress if p is not None]
        out = {
            "episodes": len(stats.returns),
            "success_rate": float(np.mean(stats.successes)) if stats.returns else float("nan"),
            "mean_return": float(np.mean(stats.returns)) if stats.returns else float("nan"),
            "mean_length": float(np.mean(stats.lengths)) if stats.lengths else float("nan"),
            "mean_progress": float(np.mean(progress)) if progress else float("nan"),
        }
        groups = by_task_type(stats)
        if groups:
            out["by_task_type"] = groups
        return out

    def train(self) -> list[dict[str, Any]]:
        config = self.config
        history = []
        bar = metrics_lib.progress_bar(config.num_updates, desc=f"{config.env}/{config.algo}",
                                       disable=not config.progress, initial=self.iteration)
        try:
            while self.iteration < config.num_updates:
                record = self.run_iteration()
                self.writer.write(self.iteration, {k: v for k, v in record.items() if k != "env_steps"},
                                  env_steps=record["env_steps"])
                history.append(record)
                bar.update(1, {"success": record["success_rate"], "invalid": record["invalid_action_rate"]})
                if self.iteration % config.checkpoint_every == 0 or self.iteration == config.num_updates:
                    self.save()
                if config.algo == "coso" and (self.iteration % config.heatmap_every == 0 or self.iteration == 1):
                    self.write_heatmap()
                if self.iteration % config.heatmap_every == 0 or self.iteration == config.num_updates:
                    self.write_plots()
        finally:
            bar.close()
            self.checkpointer.wait()
            self.writer.flush()
        return history

    # ------------------------------------------------------------------------------------------
    def write_plots(self) -> None:
        metrics_lib.plot_curves(self.workdir / "metrics.jsonl", self.workdir / "success_rate.png",
                                x="env_steps", y="success_rate",
                                title=f"{self.config.env} / {self.config.algo}")

    def write_heatmap(self, rows: int = 6) -> None:
        texts, flat, weights = self._last_texts
        valid = np.flatnonzero(flat["valid"])[:rows]
        if valid.size == 0:
            return
        token_rows, weight_rows = [], []
        for r in valid:
            n = int(flat["response_mask"][r].sum())
            ids = flat["response_ids"][r, :n]
            token_rows.append([self.tokenizer.decode([int(t)]) for t in ids])
            weight_rows.append(weights[r, :n])
        render_token_heatmap(token_rows, weight_rows, self.workdir / f"heatmap_{self.iteration:05d}.png",
                             title=f"{self.config.env}: CoSo causal weights, iteration {self.iteration}")

    # ------------------------------------------------------------------------------------------
    def _items(self, env_state: bytes | None = None) -> dict[str, Any]:
        env_state = self.rollout.state_bytes() if env_state is None else env_state
        return {
            "envs": {"state": np.frombuffer(env_state, np.uint8), "obs": self.rollout.observations()},
            "params": self.params,
            "opt_state": self.opt_state,
            "classifier": nnx.state(self.classifier),
            "classifier_opt": nnx.state(self.classifier_tx),
            "rng": {"key": self.key},
            "replay": self.replay.arrays(),
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "env_steps": self.rollout.total_env_steps,
            "tracker": self.tracker.state_dict(),
            "replay": self.replay.meta(),
        }

    def save(self) -> None:
        env_state = self.rollout.state_bytes()
        meta = dict(self._metadata(), env_state_bytes=len(env_state))
        self.checkpointer.save(self.iteration, self._items(env_state), meta, force=True)

    def _restore(self) -> None:
        # The pickled env state's length varies: read it from the metadata to shape the target.
        env_bytes = self.checkpointer.restore_metadata()["env_state_bytes"]
        items, meta = self.checkpointer.restore(None, abstract_items=self._items(bytes(env_bytes)))
        self.params = put(items["params"], self.param_shardings)
        self.opt_state = put(items["opt_state"], self.opt_shardings)
        nnx.update(self.classifier, items["classifier"])
        nnx.update(self.classifier_tx, items["classifier_opt"])
        self.key = items["rng"]["key"]
        self.rollout.load_state(np.asarray(items["envs"]["state"]).tobytes(), np.asarray(items["envs"]["obs"]))
        self.replay.load(items["replay"], meta["replay"])
        self.tracker.load_state_dict(meta["tracker"])
        self.iteration = int(meta["iteration"])
        log.info("resumed from iteration %d (%d env steps)", self.iteration, self.rollout.total_env_steps)

    def close(self) -> None:
        self.rollout.close()
        self.checkpointer.close()
        self.writer.close()


def _resume_fields(config: TrainConfig) -> dict[str, Any]:
    """Config fields a resumed run must share with the checkpoint (not bookkeeping ones)."""
    ignore = {"progress", "checkpoint_every", "keep_checkpoints", "heatmap_every", "total_env_steps"}
    defaults = TrainConfig.__dataclass_fields__
    ignore |= {k for k in _LATER_FIELDS if getattr(config, k) == defaults[k].default}
    return {k: v for k, v in config.to_dict().items() if k not in ignore}
