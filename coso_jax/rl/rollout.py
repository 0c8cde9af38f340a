"""Rollouts: N environments stepped together by the VLM policy.

Each step: env infos -> prompts (the env's text interface) -> policy inputs (PromptEncoder) ->
one jitted sampler call for all envs -> decode -> parse -> env.step. Finished episodes reset at
once (as SB3's DummyVecEnv does in RL4VLM), and their returns feed the success tracker.

Envs whose legal actions change every step (ALFWorld: the admissible commands) take the current
`info` in `parse` (`parse(text, rng, info=info)`); an episode's success is `info["won"]` where the
env reports it, else return > 0 (RL4VLM's rule for the gym_cards games).

Evaluation: `VectorRollout.play_episodes` plays a fixed list of episodes (reset options) to their end;
`by_task_type` groups episode stats by the task type their env reports (ALFWorld).
"""
from __future__ import annotations

import dataclasses
import inspect
import pickle
from typing import Any, Callable

import gymnasium as gym
import numpy as np

import coso_jax.envs  # noqa: F401  (registers the envs)
from coso_jax.envs import text_interface
from coso_jax.rl.buffer import RolloutBuffer
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.text import thought_action_masks, token_char_offsets


@dataclasses.dataclass
class StepOutput:
    """What the policy returns for one batch of prompts (host arrays)."""

    tokens: np.ndarray  # [B, N] int32
    logprobs: np.ndarray  # [B, N] float32
    mask: np.ndarray  # [B, N] bool
    values: np.ndarray  # [B] float32


@dataclasses.dataclass
class EpisodeStats:
    returns: list[float] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    successes: list[bool] = dataclasses.field(default_factory=list)
    # Per episode, from its final info where the env reports them (ALFWorld), else None.
    task_types: list[str | None] = dataclasses.field(default_factory=list)
    final_progress: list[float | None] = dataclasses.field(default_factory=list)

    def add(self, episode_return: float, length: int, final_info: dict) -> None:
        self.returns.append(float(episode_return))
        self.lengths.append(int(length))
        self.successes.append(episode_success(float(episode_return), final_info))
        self.task_types.append(final_info.get("task_type"))
        progress = final_info.get("progress")
        self.final_progress.append(None if progress is None else float(progress))


def by_task_type(stats: EpisodeStats) -> dict[str, dict[str, float]]:
    """Episodes grouped by their task type (episodes without one are left out), sorted by name:
    {task_type: {"episodes", "successes", "success_rate", "mean_return", "mean_progress"}}.
    `mean_progress` (the final goal-condition progress, 1 when won) is nan where no episode reports it."""
    groups: dict[str, list[int]] = {}
    for i, task_type in enumerate(stats.task_types):
        if task_type is not None:
            groups.setdefault(task_type, []).append(i)
    out = {}
    for task_type in sorted(groups):
        idx = groups[task_type]
        progress = [stats.final_progress[i] for i in idx if stats.final_progress[i] is not None]
        out[task_type] = {
            "episodes": len(idx),
            "successes": int(sum(stats.successes[i] for i in idx)),
            "success_rate": float(np.mean([stats.successes[i] for i in idx])),
            "mean_return": float(np.mean([stats.returns[i] for i in idx])),
            "mean_progress": float(np.mean(progress)) if progress else float("nan"),
        }
    return out


def episode_success(episode_return: float, final_info: dict) -> bool:
    """`final_info["won"]` where the env reports it (ALFWorld), else return > 0 (gym_cards)."""
    return bool(final_info["won"]) if "won" in final_info else episode_return > 0


class VectorRollout:
    """Owns `num_envs` gymnasium envs and their running episodes.

    `policy_fn(inputs: dict[str, np.ndarray]) -> StepOutput` is the (jitted) sampler bound to the
    current parameters and an RNG stream; `value_fn(inputs) -> values[B]` bootstraps GAE.
    """

    def __init__(
        self,
        env_name: str,
        num_envs: int,
        encoder: PromptEncoder,
        tokenizer: Any,
        *,
        seed: int,
        cot: bool = True,
        brief: bool = False,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.env_name = env_name
        self.env_id = f"coso_jax/{env_name}-v0"
        self.iface = text_interface(env_name)
        # ALFWorld's parser needs the state's admissible commands; the gym_cards parsers take no info.
        self._parse_takes_info = "info" in inspect.signature(self.iface.parse).parameters
        self.num_envs = num_envs
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cot = cot
        self.brief = brief
        self.envs = [gym.make(self.env_id, **(env_kwargs or {})) for _ in range(num_envs)]
        self.parse_rng = np.random.default_rng(seed + 7919)
        self.obs: list[np.ndarray] = []
        self.infos: list[dict] = []
        for i, env in enumerate(self.envs):
            obs, info = env.reset(seed=seed * 100_003 + i)
            self.obs.append(obs)
            self.infos.append(info)
        self.episode_return = np.zeros(num_envs, np.float64)
        self.episode_length = np.zeros(num_envs, np.int64)
        self.total_env_steps = 0

    # --- policy inputs -------------------------------------------------------------------------
    def current_prompts(self) -> list[str]:
        return [self.iface.prompt(info, cot=self.cot, brief=self.brief) for info in self.infos]

    def current_inputs(self) -> dict[str, np.ndarray]:
        return self.encoder(self.current_prompts(), np.stack(self.obs))

    def decode(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Texts and thought/action token masks of a batch of generated responses."""
        width = tokens.shape[1]
        texts, thought, action = [], np.zeros(tokens.shape, np.bool_), np.zeros(tokens.shape, np.bool_)
        for row in range(tokens.shape[0]):
            length = int(mask[row].sum())
            text, starts, ends = token_char_offsets(self.tokenizer, tokens[row, :length])
            spans = self.iface.spans(text)
            thought[row], action[row] = thought_action_masks(starts, ends, spans.action[0], length, width)
            texts.append(text)
        return texts, thought, action

    # --- stepping ------------------------------------------------------------------------------
    def collect(
        self,
        buffer: RolloutBuffer,
        policy_fn: Callable[[dict[str, np.ndarray]], StepOutput],
        on_step: Callable[[], None] | None = None,
    ) -> EpisodeStats:
        """Fills `buffer` (reset first) with `buffer.num_steps` steps of every env."""
        stats = EpisodeStats()
        buffer.reset()
        while not buffer.full:
            inputs = self.current_inputs()
            out = policy_fn(inputs)
            texts, thought, action = self.decode(out.tokens, out.mask)
            rewards = np.zeros(self.num_envs, np.float32)
            dones = np.zeros(self.num_envs, np.bool_)
            valid = np.zeros(self.num_envs, np.bool_)
            labels = np.full(self.num_envs, -1, np.int32)
            for e, env in enumerate(self.envs):
                parsed = self._parse(texts[e], e)
                valid[e] = parsed.valid
                if parsed.label is not None:
                    labels[e] = parsed.label
                obs, reward, terminated, truncated, info = env.step(parsed.action)
                rewards[e] = reward
                self.episode_return[e] += reward
                self.episode_length[e] += 1
                if terminated or truncated:
                    # RL4VLM treats time-limit truncation as terminal (use_proper_time_limits=False).
                    dones[e] = True
                    stats.add(float(self.episode_return[e]), int(self.episode_length[e]), info)
                    self.episode_return[e] = 0.0
                    self.episode_length[e] = 0
                    obs, info = env.reset()
                self.obs[e] = obs
                self.infos[e] = info
            self.total_env_steps += self.num_envs
            buffer.add(
                texts,
                prompt_ids=inputs["prompt_ids"],
                prompt_mask=inputs["prompt_mask"],
                pixel_values=inputs["pixel_values"],
                response_ids=out.tokens,
                response_mask=out.mask,
                thought_mask=thought,
                action_mask=action,
                old_logprobs=out.logprobs,
                old_values=out.values,
                rewards=rewards,
                dones=dones,
                valid=valid,
                labels=labels,
            )
            if on_step is not None:
                on_step()
        return stats

    def _parse(self, text: str, e: int):
        """Env `e`'s parse of `text` (with its current info where the interface takes it)."""
        if self._parse_takes_info:
            return self.iface.parse(text, self.parse_rng, info=self.infos[e])
        return self.iface.parse(text, self.parse_rng)

    def play_episodes(
        self,
        policy_fn: Callable[[dict[str, np.ndarray]], StepOutput],
        episodes: list[dict[str, Any]],
    ) -> EpisodeStats:
        """Plays one episode per entry of `episodes` (each the `reset(options=...)` of its env, e.g.
        ALFWorld's {"split", "task_type", "index"}) to its end, `num_envs` at a time; returns their stats.

        Unlike `collect`, every episode counts, however long it runs (no bias towards short ones), and
        no buffer is filled. The policy always sees all `num_envs` prompts (one compiled batch shape);
        envs with no episode left keep their last state and their answers are ignored. Overwrites the
        running episodes: meant for an evaluation `VectorRollout`.
        """
        stats = EpisodeStats()
        queue = list(episodes)
        active = np.zeros(self.num_envs, np.bool_)

        def start(e: int) -> None:
            if not queue:
                active[e] = False
                return
            obs, info = self.envs[e].reset(options=dict(queue.pop(0)))
            self.obs[e], self.infos[e] = obs, info
            self.episode_return[e], self.episode_length[e] = 0.0, 0
            active[e] = True

        for e in range(self.num_envs):
            start(e)
        while active.any():
            out = policy_fn(self.current_inputs())
            texts, _, _ = self.decode(out.tokens, out.mask)
            for e in np.flatnonzero(active):
                parsed = self._parse(texts[e], e)
                obs, reward, terminated, truncated, info = self.envs[e].step(parsed.action)
                self.episode_return[e] += reward
                self.episode_length[e] += 1
                self.total_env_steps += 1
                self.obs[e], self.infos[e] = obs, info
                if terminated or truncated:
                    stats.add(float(self.episode_return[e]), int(self.episode_length[e]), info)
                    start(e)
        return stats

    # --- checkpointing -------------------------------------------------------------------------
    # Attributes that are configuration, rebuilt by gym.make, and large (the Box bounds).
    _STATIC_ENV_ATTRS = frozenset({"observation_space", "action_space", "spec", "render_mode", "metadata"})

    def state_bytes(self) -> bytes:
        """Everything needed to continue the running episodes exactly, except the observations.

        That is each env's own state (positions, hands, formulas, its `np_random`; an env with
        `snapshot`/`restore_snapshot`, such as ALFWorld's, gives its own), its TimeLimit counter,
        the infos, the episode accumulators and the parser's RNG.
        """
        envs = []
        for env in self.envs:
            if hasattr(env.unwrapped, "snapshot"):
                attrs = env.unwrapped.snapshot()
            else:
                attrs = {k: v for k, v in vars(env.unwrapped).items() if k not in self._STATIC_ENV_ATTRS}
            envs.append((attrs, _time_limit_state(env)))
        return pickle.dumps({
            "envs": envs,
            "infos": self.infos,
            "episode_return": self.episode_return,
            "episode_length": self.episode_length,
            "parse_rng": self.parse_rng.bit_generator.state,
            "total_env_steps": self.total_env_steps,
        })

    def observations(self) -> np.ndarray:
        return np.stack(self.obs)

    def load_state(self, blob: bytes, observations: np.ndarray) -> None:
        state = pickle.loads(blob)
        if len(state["envs"]) != self.num_envs or len(observations) != self.num_envs:
            raise ValueError(f"checkpoint has {len(state['envs'])} envs, this run has {self.num_envs}")
        for env, (attrs, elapsed) in zip(self.envs, state["envs"]):
            if hasattr(env.unwrapped, "snapshot"):
                env.unwrapped.restore_snapshot(attrs)
            else:
                vars(env.unwrapped).update(attrs)
            _set_time_limit_state(env, elapsed)
        self.obs = [np.asarray(o) for o in observations]
        self.infos = state["infos"]
        self.episode_return = state["episode_return"]
        self.episode_length = state["episode_length"]
        self.parse_rng.bit_generator.state = state["parse_rng"]
        self.total_env_steps = state["total_env_steps"]

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _time_limit_state(env: gym.Env) -> int | None:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env._elapsed_steps
        env = env.env
    return None


def _set_time_limit_state(env: gym.Env, elapsed: int | None) -> None:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            env._elapsed_steps = elapsed
            return
        env = env.env
