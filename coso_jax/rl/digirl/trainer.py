"""The DigiRL backbone (filtered advantage-weighted policy gradient with step and trajectory critics)
on the web-control envs, with the soft-RL term of `algo` none | entropy | coso.

One run is off2on, as DigiRL's default: an *offline* stage on pre-collected trajectories (the
scripted DOM solvers of `coso_jax.envs.web.solvers`, with a fraction of random taps so that some
fail), then an *online* stage on the browser envs. Both start from a behaviour-cloned start
(`coso_jax.rl.digirl.start`), built once and shared by every algo and seed.

One iteration (DigiRL `offpolicy_train_loop`; reference numbers in `DigiRLConfig`),
`DigiRLTrainer.run_iteration`:
  1. rollout (online stage only): `trajectories_per_iteration` complete episodes, `num_envs` at a
     time; each transition goes into the replay with its Monte-Carlo return (gamma) and next state;
  2. step critic: `critic_epochs` Adam steps of cross-entropy on 1[MC return > 0] for both heads of
     the double critic, on s and on s'; trajectory critic: `trajectory_critic_epochs` steps on
     (first state, 1[last reward > 0]);
  3. trajectory filtering: online, score = return - V_traj(first state); offline (the reference's
     `filterbc_buffer`), the return alone (`offline_filter`); the top 10% give the actor's transitions;
  4. advantages A = clamp(V(s') - V(s) - 0.05 + r + MC, 0, 1), V = min of the two heads; with
     `soft_backup`, r and MC (and the filter's return) are those of the soft rewards
     r_t + alpha * H_B(y_t) (CoSo's soft policy evaluation). The critics stay success classifiers of
     1[MC > 0]: a positive entropy bonus would make every soft label 1;
  5. soft-RL weights (`CausalTerm`: the classifier trains on replayed valid actions for coso);
  6. actor: `actor_epochs` Adam steps, each on `actor_batch` transitions from step 3's set, loss
     -mean(log pi(y|s) 1[A > 0]) - alpha * mean H_B; the bonus applies online only unless
     `offline_entropy` (the reference's `is_online`).
The offline stage runs 2-6 (`offline_critic_iterations` critic and `offline_actor_iterations` actor
iterations), then the online stage all steps. Soft target networks (tau 0.01) are not used: DigiRL's
actor loss reads the online critic only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coso_jax import losses
from coso_jax import metrics as metrics_lib
from coso_jax.rl import policy as policy_lib
from coso_jax.rl.causal_term import CausalTerm
from coso_jax.rl.config import DigiRLConfig
from coso_jax.rl.digirl import start as start_lib
from coso_jax.rl.digirl import steps
from coso_jax.rl.digirl.critics import build_critics
from coso_jax.rl.digirl.losses import trajectory_filter
from coso_jax.rl.digirl.replay import TransitionReplay
from coso_jax.rl.digirl.web import WebEnvPool, WebEpisode, run_web_episodes
from coso_jax.rl.run import CHECKPOINT_FORMAT, IterationOutput, Run, eval_key, phase_key
from coso_jax.tokenizer import IMAGE_TOKEN

log = logging.getLogger(__name__)

EVAL_SEED = 10_000_019


def _committed(tree: Any) -> Any:
    """On the first device, committed (as restored arrays are), so a resumed run hits the jit cache."""
    return jax.device_put(tree, jax.local_devices()[0])


class DigiRLTrainer:
    """Owns the policy, critics, causal term, replay, browsers and run directory of one DigiRL run.

      trainer = DigiRLTrainer(digirl_preset("tiny_cpu", algo="coso"), "runs/web_coso")
      trainer.train(); print(trainer.evaluate()); trainer.close()

    Raises ConfigError / RunError / CheckpointError (one line naming the problem and the fix), and
    RunError when the browser env is unavailable.
    """

    def __init__(self, config: DigiRLConfig, workdir: str | Path, *, resume: bool = False,
                 resume_step: int | None = None) -> None:
        from coso_jax.envs.web import browser_unavailable_reason
        from coso_jax.rl.run import RunError

        self.config = config
        policy_lib.check_hf_dir(config.model.hf_dir)
        if jax.process_count() > 1:
            raise RunError("the DigiRL backbone runs on one process (its browsers and replay are local); launch it "
                           "without JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES")
        reason = browser_unavailable_reason()
        if reason:
            raise RunError(f"the DigiRL web backbone needs the browser env: {reason}")
        Run.open(self, config, workdir, start_lib.start_cache(config, workdir), resume=resume, resume_step=resume_step,
                 abstract_items=lambda meta: self._checkpoint_items())

    def _build(self, cache) -> None:
        c, model = self.config, self.config.model
        start = start_lib.load_or_build(c, cache)
        self.start_summary = start.summary
        self.tokenizer, self.encoder, self.prompt_fn = start.tokenizer, start.encoder, start.prompt_fn
        self.family = start.family
        self.causal = CausalTerm(c.algo, c.causal, start.classifier, self.tokenizer, model.max_new_tokens,
                                 seed=c.run.seed, demonstrations=(start.demo_tokens, start.demo_mask, start.demo_labels))
        self.policy_gd, params = nnx.split(start.policy, nnx.Param)
        critics = build_critics(c.critic_trunk, len(self.tokenizer), model.image_size, c.critic_hidden,
                                self.family.hidden_size(start.policy), c.run.seed + 11)
        self.critic_gd, critic_params = nnx.split(critics, nnx.Param)
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.critic_settings = steps.CriticSettings(int(image_token_id), c.critic_lr, c.max_grad_norm,
                                                    c.advantage_offset)
        self.actor_settings = steps.ActorSettings(c.lr, c.max_grad_norm, model.temperature, c.drop_unparseable,
                                                  c.reference_entropy_averaging, c.logprob_floor)
        self.sample_settings = steps.SampleSettings(model.max_new_tokens, model.temperature, model.top_p)
        self.params = _committed(params)
        self.opt_state = _committed(steps.optimizer(c.lr, c.max_grad_norm).init(params))
        self.critic_params = _committed(critic_params)
        self.critic_opt = _committed(steps.optimizer(c.critic_lr, c.max_grad_norm).init(critic_params))
        self.run_key = jax.random.key(c.run.seed)
        self.np_rng = np.random.default_rng(c.run.seed + 104729)
        self.iteration = 0
        self.env_steps = 0
        self.replay = TransitionReplay(c.replay_capacity, self.encoder.prompt_len, model.max_new_tokens,
                                       model.image_size, seed=c.run.seed)
        for episode in start.offline:
            self._add_episode(episode)
        self.tracker = metrics_lib.SuccessTracker(c.run.success_window)
        self.pool = WebEnvPool(c.horizon, c.screen_scale, c.max_browsers)

    def _add_episode(self, episode: WebEpisode, entropy_bonus: np.ndarray | None = None) -> None:
        tr = dict(episode.transitions)
        if entropy_bonus is not None:
            tr["entropy_bonus"] = entropy_bonus
        self.replay.add_trajectory({k: v for k, v in tr.items() if k in self.replay.data}, self.config.gamma,
                                   self.causal.alpha if self.config.soft_backup else 0.0)
        self.causal.observe(tr["response_ids"], tr["response_mask"], tr["label"], tr["valid"])

    def entropy_bonus(self, episodes: list[WebEpisode]) -> list[np.ndarray]:
        """H_B(y_t) of every step of `episodes` under the behaviour policy: its sampled token entropies
        weighted by the algo's weights (one batched call), split per episode."""
        cat = {k: np.concatenate([e.transitions[k] for e in episodes]) for k in
               ("response_ids", "response_mask", "label", "valid", "token_entropies")}
        weights = self.causal.weights(cat["response_ids"], cat["response_mask"], cat["label"], cat["valid"])
        bonus = np.asarray(losses.weighted_entropy(cat["token_entropies"], weights, cat["response_mask"]))
        return np.split(bonus, np.cumsum([e.length for e in episodes])[:-1])

    # ------------------------------------------------------------------------------------------
    def policy_actor(self, key: jax.Array):
        """A web actor sampling from the current policy; call `t` samples with `fold_in(key, t)`."""
        calls = [0]

        def act(prompts, images, views):
            ids, mask = self.encoder.encode_text(prompts)
            out = jax.device_get(steps.sample(self.policy_gd, self.family, self.sample_settings, self.params, ids,
                                              mask, images, jax.random.fold_in(key, calls[0])))
            calls[0] += 1
            result = []
            for row in range(len(prompts)):
                n = int(out.mask[row].sum())
                text = self.tokenizer.decode([int(t) for t in out.tokens[row, :n]], skip_special_tokens=True)
                result.append((text, np.asarray(out.tokens[row]), np.asarray(out.mask[row]),
                               np.asarray(out.entropies[row])))
            return result

        return act

    def rollout(self, key: jax.Array) -> list[WebEpisode]:
        from coso_jax.envs.web import get_suite

        suite = get_suite(self.config.suite)
        tasks = self.config.task_names
        episodes = [(tasks[int(self.np_rng.integers(len(tasks)))], int(self.np_rng.integers(suite.num_train_seeds)))
                    for _ in range(self.config.trajectories_per_iteration)]
        return run_web_episodes(self.pool, episodes, self.config.num_envs, self.prompt_fn, self.config.model.image_size,
                                self.policy_actor(key))

    def _epoch_batches(self, idx: np.ndarray, fields: Sequence[str], epochs: int, batch: int) -> dict[str, np.ndarray]:
        rows = idx[self.replay.rng.integers(0, idx.size, size=epochs * batch)]
        data = self.replay.batch(rows, fields)
        return {k: v.reshape((epochs, batch) + v.shape[1:]) for k, v in data.items()}

    def update_critics(self) -> dict[str, float]:
        c = self.config
        batches = self._epoch_batches(self.replay.indices(), steps.CRITIC_FIELDS, c.critic_epochs, c.critic_batch)
        self.critic_params, self.critic_opt, m = steps.critic_update(
            self.policy_gd, self.critic_gd, self.family, self.critic_settings, self.critic_params, self.critic_opt,
            self.params, batches)
        batches = self._epoch_batches(self.replay.first_steps(), steps.TRAJECTORY_FIELDS, c.trajectory_critic_epochs,
                                      c.critic_batch)
        self.critic_params, self.critic_opt, t = steps.trajectory_update(
            self.policy_gd, self.critic_gd, self.family, self.critic_settings, self.critic_params, self.critic_opt,
            self.params, batches)
        m, t = jax.device_get((m, t))
        return {"critic/loss": float(m["loss"]), "critic/accuracy": float(m["accuracy"]),
                "trajectory_critic/loss": float(t["loss"]), "trajectory_critic/accuracy": float(t["accuracy"])}

    def critic_values(self, idx: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(advantages, trajectory-critic values) of replay rows `idx` (padded to `chunk` rows per call,
        one compiled shape)."""
        fields = steps.CRITIC_FIELDS + ("reward", "entropy_bonus", "soft_mc_return")
        soft_alpha = np.float32(self.causal.alpha if self.config.soft_backup else 0.0)
        advs, trajs = [], []
        for start in range(0, idx.size, chunk):
            part = idx[start:start + chunk]
            padded = np.concatenate([part, np.full(chunk - part.size, part[0])])
            batch = self.replay.batch(padded, fields)
            if self.config.soft_backup:  # r + MC of the advantage become their soft versions
                batch["reward"] = batch["reward"] + soft_alpha * batch["entropy_bonus"]
                batch["mc_return"] = batch["soft_mc_return"]
            batch = {k: v for k, v in batch.items() if k not in ("entropy_bonus", "soft_mc_return")}
            a, v = jax.device_get(steps.critic_values(self.policy_gd, self.critic_gd, self.family, self.critic_settings,
                                                      self.critic_params, self.params, batch))
            advs.append(np.asarray(a)[: part.size])
            trajs.append(np.asarray(v)[: part.size])
        if not advs:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(advs), np.concatenate(trajs)

    def filtered_indices(self, online: bool) -> tuple[np.ndarray, dict[str, float]]:
        """Transitions of the top-`1 - filter_quantile` trajectories: by return - V_traj(first state)
        online; offline by the return alone with `offline_filter="reward"` (the reference)."""
        first = self.replay.first_steps()
        returns = self.replay.data["traj_soft_return" if self.config.soft_backup else "traj_return"][first]
        if online or self.config.offline_filter == "critic":
            values = self.critic_values(first)[1]
        else:
            values = None
        keep = trajectory_filter(returns, values, self.config.filter_quantile)
        kept_ids = self.replay.data["traj_id"][first][keep]
        rows = np.flatnonzero(np.isin(self.replay.data["traj_id"][: self.replay.size], kept_ids))
        stats = {"filter/trajectories": float(first.size), "filter/kept_trajectories": float(keep.sum()),
                 "filter/kept_success_rate": float((returns[keep] > 0).mean()) if keep.any() else float("nan")}
        return rows, stats

    def update_actor(self, rows: np.ndarray, key: jax.Array, online: bool) -> tuple[dict[str, Any], Any, tuple]:
        c = self.config
        timer = self.run.timer
        picks = rows[self.replay.rng.integers(0, rows.size, size=c.actor_epochs * c.actor_batch)]
        with timer.phase("advantage"):
            advantages, _ = self.critic_values(picks)
        data = self.replay.batch(picks, ("prompt_ids", "prompt_mask", "image", "response_ids", "response_mask",
                                         "valid", "label"))
        with timer.phase("causal"):
            weights, record = self.causal.step(phase_key(key, "causal"), data["response_ids"], data["response_mask"],
                                               data["label"], data["valid"])
        heatmap = self.causal.heatmap(data["response_ids"], data["response_mask"], data["valid"], weights)
        batch = {k: data[k] for k in ("prompt_ids", "prompt_mask", "image", "response_ids", "response_mask", "valid")}
        batch.update(advantages=advantages.astype(np.float32), entropy_weights=weights)
        batch = {k: v.reshape((c.actor_epochs, c.actor_batch) + v.shape[1:]) for k, v in batch.items()}
        # The reference applies the bonus in online updates only (`is_online`).
        alpha = self.causal.alpha if (online or c.offline_entropy) else 0.0
        with timer.phase("actor") as phase:
            self.params, self.opt_state, m = phase.block(steps.actor_update(
                self.policy_gd, self.family, self.actor_settings, self.params, self.opt_state, batch, jnp.float32(alpha)))
        m = jax.device_get(m)
        record.update({f"actor/{k}": float(v) for k, v in m.items() if k != "steps"})
        record["actor/positive_advantage_rate"] = float((advantages > 0).mean())
        return record, heatmap, (int(m["skipped"]), int(m["steps"]))

    # ------------------------------------------------------------------------------------------
    def stage(self, iteration: int | None = None) -> str:
        it = self.iteration if iteration is None else iteration
        return "offline" if it < self.config.offline_iterations else "online"

    def run_iteration(self, key: jax.Array) -> IterationOutput:
        c = self.config
        online = self.stage() == "online"
        record: dict[str, Any] = {"stage": self.stage()}
        if online:
            with self.run.timer.phase("rollout"):
                episodes = self.rollout(phase_key(key, "rollout"))
            bonuses = self.entropy_bonus(episodes) if c.soft_backup else [None] * len(episodes)
            if c.soft_backup:
                record["soft/entropy_bonus"] = float(np.mean(np.concatenate(bonuses)))
            for episode, bonus in zip(episodes, bonuses):
                self._add_episode(episode, bonus)
                self.tracker.add_episode(float(episode.success), episode.length)
                self.env_steps += episode.length
            record["iteration_success_rate"] = float(np.mean([e.success for e in episodes]))
            record["episode_length"] = float(np.mean([e.length for e in episodes]))
            record["invalid_action_rate"] = float(1.0 - np.mean(np.concatenate([e.transitions["valid"]
                                                                                 for e in episodes])))
        do_critic = online or self.iteration < c.offline_critic_iterations
        do_actor = online or self.iteration < c.offline_actor_iterations
        heatmap, skipped, steps_total = None, 0, 0
        if do_critic:
            with self.run.timer.phase("critic"):
                record.update(self.update_critics())
        if do_actor:
            with self.run.timer.phase("filter"):
                rows, stats = self.filtered_indices(online)
            record.update(stats)
            actor_record, heatmap, (skipped, steps_total) = self.update_actor(rows, key, online)
            record.update(actor_record)
        self.iteration += 1
        if len(self.tracker):  # no episodes yet in the offline stage: no success metrics (not NaNs)
            record.update(self.tracker.summary())
            record["success_rate"] = self.tracker.success_rate
        record["replay_size"] = self.replay.size
        record.update(self.run.timer.pop())
        return IterationOutput(record, self.env_steps, heatmap, skipped=skipped, minibatches=steps_total,
                               plot=self.stage() == "online")

    def train(self) -> list[dict[str, Any]]:
        c = self.config
        return self.run.train(self, self.run_key, c.num_iterations, desc=f"{c.env}/digirl/{c.algo}",
                              heatmap_title=f"{c.env}: CoSo causal weights",
                              plot_title=f"{c.env} / DigiRL / {c.algo}", max_skipped_updates=c.max_skipped_updates)

    def evaluate(self, num_episodes: int | None = None, seed: int = EVAL_SEED) -> dict[str, Any]:
        """Success on the suite's fixed test episodes (the first `num_episodes`), sampling at the
        training temperature from evaluation's own key stream (training's is untouched)."""
        from coso_jax.envs.web import get_suite

        n = self.config.eval_episodes if num_episodes is None else num_episodes
        tasks = set(self.config.task_names)
        episodes = [e for e in get_suite(self.config.suite).test_episodes() if e[0] in tasks][:n]
        results = run_web_episodes(self.pool, episodes, self.config.num_envs, self.prompt_fn,
                                   self.config.model.image_size, self.policy_actor(eval_key(self.run_key, seed)))
        per_task: dict[str, list[bool]] = {}
        for r in results:
            per_task.setdefault(r.task, []).append(r.success)
        valid = np.concatenate([r.transitions["valid"] for r in results]) if results else np.zeros(0)
        return {"episodes": len(results),
                "success_rate": float(np.mean([r.success for r in results])) if results else float("nan"),
                "per_task": {t: float(np.mean(v)) for t, v in per_task.items()},
                "invalid_action_rate": float(1 - valid.mean()) if valid.size else float("nan"),
                "mean_length": float(np.mean([r.length for r in results])) if results else float("nan")}

    # ------------------------------------------------------------------------------------------
    def _checkpoint_items(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "critic": self.critic_params,
                "critic_opt": self.critic_opt, "replay": self.replay.arrays(), **self.causal.checkpoint_items()}

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        meta = {"format": CHECKPOINT_FORMAT, "iteration": self.iteration, "env_steps": self.env_steps,
                "tracker": self.tracker.state_dict(), "replay": self.replay.meta(),
                "np_rng": self.np_rng.bit_generator.state, **self.causal.checkpoint_metadata()}
        return self._checkpoint_items(), meta

    def _restore(self, items: dict[str, Any], meta: dict[str, Any]) -> None:
        self.params, self.opt_state = items["params"], items["opt_state"]
        self.critic_params, self.critic_opt = items["critic"], items["critic_opt"]
        self.causal.restore(items, meta)
        self.replay.load(jax.device_get(items["replay"]), meta["replay"])
        self.tracker.load_state_dict(meta["tracker"])
        self.np_rng.bit_generator.state = meta["np_rng"]
        self.iteration, self.env_steps = int(meta["iteration"]), int(meta["env_steps"])
        log.info("resumed from iteration %d (%d env steps)", self.iteration, self.env_steps)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            self.run.close()
