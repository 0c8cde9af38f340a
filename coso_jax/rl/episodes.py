"""Playing envs with the VLM policy: one episode runner for both backbones, and the PPO rollout.

Every step is: env infos -> prompts (the env's text interface) -> one batched policy call for all
envs -> answer texts -> `parse(text, rng, info)` (the text-interface protocol of
`coso_jax.envs.base`, parsed once) -> `env.step(parsed.action)`.

* `play_episodes` plays a queue of episodes to their ends, `num_slots` at a time (an evaluation
  set, DigiRL's trajectories): every episode counts however long it runs, and the policy always
  sees `num_slots` inputs (one compiled batch shape; finished slots repeat an active one and their
  answers are ignored).
* `VectorRollout` keeps `num_envs` gymnasium envs running across iterations and fills a
  `RolloutBuffer` with a fixed number of steps (PPO; finished episodes reset at once, as SB3's
  DummyVecEnv does in RL4VLM). Its `play_episodes` runs an evaluation list through the same runner.

An episode's success is `info["won"]` where the env reports it (ALFWorld), else return > 0
(RL4VLM's rule for the gym_cards games).
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

import coso_jax.envs  # noqa: F401  (registers the envs)
from coso_jax.envs import text_interface
from coso_jax.rl.buffers import RolloutBuffer
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.text import thought_action_masks, token_char_offsets


def episode_success(episode_return: float, final_info: dict) -> bool:
    """`final_info["won"]` where the env reports it (ALFWorld), else return > 0 (gym_cards)."""
    return bool(final_info["won"]) if "won" in final_info else episode_return > 0


@dataclasses.dataclass
class Answer:
    """The policy's answer for one slot: its text and whatever the caller wants recorded with it
    (e.g. response tokens)."""

    text: str
    extra: Any = None


@dataclasses.dataclass
class Step:
    """One recorded transition of `play_episodes(record=True)`."""

    obs: np.ndarray
    info: dict
    prompt: str
    answer: Answer
    parsed: Any
    reward: float
    done: bool


@dataclasses.dataclass
class Episode:
    """One finished episode: what started it, its return, length, final info and (recorded) steps."""

    spec: Any
    episode_return: float
    length: int
    final_info: dict
    final_obs: np.ndarray
    steps: list[Step]

    @property
    def success(self) -> bool:
        return episode_success(self.episode_return, self.final_info)


@dataclasses.dataclass
class SlotView:
    """What the policy sees of one slot: the episode's spec, its env, observation, info and prompt."""

    spec: Any
    env: Any
    obs: np.ndarray
    info: dict
    prompt: str


def play_episodes(
    specs: Sequence[Any],
    num_slots: int,
    *,
    start: Callable[[int, Any], tuple[Any, np.ndarray, dict]],
    act: Callable[[list[SlotView]], list[Answer]],
    prompt: Callable[[dict], str],
    parse: Callable[[str, dict], Any],
    finish: Callable[[int, Any, Any], None] | None = None,
    env_action: Callable[[Any], Any] = lambda parsed: parsed.action,
    record: bool = False,
) -> list[Episode]:
    """Plays one episode per entry of `specs` to its end, `num_slots` at a time.

    Args:
      specs: what starts each episode (reset options, (task, seed), ...), in order.
      num_slots: episodes played together (the policy's batch size).
      start(slot, spec) -> (env, obs, info): starts the episode in a slot.
      act(views) -> answers: one answer per view; `len(views) == num_slots` always.
      prompt(info) -> the policy's prompt text. parse(text, info) -> ParsedAction.
      finish(slot, spec, env): called when a slot's episode ends (or the run is interrupted).
      env_action(parsed) -> what `env.step` takes (default `parsed.action`; the web env takes the
        ParsedAction itself, so an answer is parsed once).
      record: keep every step (`Episode.steps`), else only the episode totals.
    Returns:
      The episodes in the order they finished.
    """
    queue = list(specs)
    slots: list[dict[str, Any] | None] = [None] * num_slots
    episodes: list[Episode] = []

    def begin(slot: int) -> None:
        spec = queue.pop(0)
        env, obs, info = start(slot, spec)
        slots[slot] = {"spec": spec, "env": env, "obs": obs, "info": info, "return": 0.0, "length": 0, "steps": []}

    try:
        for s in range(num_slots):
            if queue:
                begin(s)
        while any(slot is not None for slot in slots):
            active = [s for s in range(num_slots) if slots[s] is not None]
            views = []
            for s in range(num_slots):
                ep = slots[s] if slots[s] is not None else slots[active[0]]
                views.append(SlotView(ep["spec"], ep["env"], ep["obs"], ep["info"], prompt(ep["info"])))
            answers = act(views)
            for s in active:
                ep = slots[s]
                parsed = parse(answers[s].text, ep["info"])
                obs, reward, terminated, truncated, info = ep["env"].step(env_action(parsed))
                done = bool(terminated or truncated)
                if record:
                    ep["steps"].append(Step(ep["obs"], ep["info"], views[s].prompt, answers[s], parsed,
                                            float(reward), done))
                ep["return"] += float(reward)
                ep["length"] += 1
                ep["obs"], ep["info"] = obs, info
                if done:
                    episodes.append(Episode(ep["spec"], ep["return"], ep["length"], info, obs, ep["steps"]))
                    slots[s] = None
                    if finish is not None:
                        finish(s, ep["spec"], ep["env"])
                    if queue:
                        begin(s)
    except BaseException:
        if finish is not None:
            for s, ep in enumerate(slots):
                if ep is not None:
                    finish(s, ep["spec"], ep["env"])
        raise
    return episodes


@dataclasses.dataclass
class StepOutput:
    """What the policy returns for one batch of prompts (host arrays)."""

    tokens: np.ndarray  # [B, N] int32
    logprobs: np.ndarray  # [B, N] float32
    mask: np.ndarray  # [B, N] bool
    values: np.ndarray  # [B] float32
    entropies: np.ndarray | None = None  # [B, N] float32 (nats), where the sampler reports them


@dataclasses.dataclass
class EpisodeStats:
    returns: list[float] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    successes: list[bool] = dataclasses.field(default_factory=list)
    # Per episode, from its final info where the env reports them (ALFWorld), else None.
    task_types: list[str | None] = dataclasses.field(default_factory=list)
    final_progress: list[float | None] = dataclasses.field(default_factory=list)
    # Where each episode finished: the collection step and the env (local index), for merging processes.
    steps: list[int] = dataclasses.field(default_factory=list)
    envs: list[int] = dataclasses.field(default_factory=list)

    def add(self, episode_return: float, length: int, final_info: dict, step: int = 0, env: int = 0) -> None:
        self.returns.append(float(episode_return))
        self.lengths.append(int(length))
        self.successes.append(episode_success(float(episode_return), final_info))
        self.task_types.append(final_info.get("task_type"))
        progress = final_info.get("progress")
        self.final_progress.append(None if progress is None else float(progress))
        self.steps.append(int(step))
        self.envs.append(int(env))

    def summary(self) -> dict[str, Any]:
        """Episodes, success rate, mean return, length and progress (nan without episodes / progress),
        and `by_task_type` where the env reports task types."""
        progress = [p for p in self.final_progress if p is not None]
        n = len(self.returns)
        out: dict[str, Any] = {
            "episodes": n,
            "success_rate": float(np.mean(self.successes)) if n else float("nan"),
            "mean_return": float(np.mean(self.returns)) if n else float("nan"),
            "mean_length": float(np.mean(self.lengths)) if n else float("nan"),
            "mean_progress": float(np.mean(progress)) if progress else float("nan"),
        }
        groups = by_task_type(self)
        if groups:
            out["by_task_type"] = groups
        return out


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


PolicyFn = Callable[[dict[str, np.ndarray], int], StepOutput]


class VectorRollout:
    """Owns `num_envs` gymnasium envs and their running episodes.

    `policy_fn(inputs, step) -> StepOutput` samples for one batch of encoded inputs; `step` counts the
    calls of one `collect` / `play_episodes` (0, 1, ...), so the caller derives the sampling key of each
    call from it (`jax.random.fold_in(key, step)`) and no key is carried in between.

    `env_offset`: the global index of the first env (a process of a multi-process run owns envs
    env_offset .. env_offset + num_envs - 1). Env i resets with seed `seed * 100_003 + i` and parses
    invalid answers with its own RNG, so an env behaves the same whichever process steps it.

    The host work of a step is cached where it repeats, with the same results: the encoder keeps each
    prompt's padded row and each distinct frame's pixels (`PromptEncoder`, `FrameCache`), and decoding
    keeps each token id's text. What stays on the critical path is inherent to it: step t + 1's inputs
    come from the envs stepped with step t's parsed answers, so the sampler cannot run ahead of them.
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
        env_offset: int = 0,
    ) -> None:
        self.env_name = env_name
        self.env_id = f"coso_jax/{env_name}-v0"
        self.iface = text_interface(env_name)
        self.num_envs = num_envs
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cot = cot
        self.brief = brief
        self.envs = [gym.make(self.env_id, **(env_kwargs or {})) for _ in range(num_envs)]
        self.parse_rngs = [np.random.default_rng([seed + 7919, env_offset + i]) for i in range(num_envs)]
        self.obs: list[np.ndarray] = []
        self.infos: list[dict] = []
        for i, env in enumerate(self.envs):
            obs, info = env.reset(seed=seed * 100_003 + env_offset + i)
            self.obs.append(obs)
            self.infos.append(info)
        self.episode_return = np.zeros(num_envs, np.float64)
        self.episode_length = np.zeros(num_envs, np.int64)
        self.total_env_steps = 0
        self._pieces: dict[int, str] = {}  # token id -> its text alone (`token_char_offsets`' cache)

    # --- policy inputs -------------------------------------------------------------------------
    def prompt(self, info: dict) -> str:
        return self.iface.prompt(info, cot=self.cot, brief=self.brief)

    def current_inputs(self) -> dict[str, np.ndarray]:
        return self.encoder([self.prompt(info) for info in self.infos], np.stack(self.obs))

    def decode(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Texts and thought/action token masks of a batch of generated responses."""
        width = tokens.shape[1]
        texts, thought, action = [], np.zeros(tokens.shape, np.bool_), np.zeros(tokens.shape, np.bool_)
        lengths = np.asarray(mask).sum(1)
        for row in range(tokens.shape[0]):
            length = int(lengths[row])
            text, starts, ends = token_char_offsets(self.tokenizer, tokens[row, :length], self._pieces)
            spans = self.iface.spans(text)
            thought[row], action[row] = thought_action_masks(starts, ends, spans.action[0], length, width)
            texts.append(text)
        return texts, thought, action

    def parse(self, text: str, info: dict, env: int = 0):
        return self.iface.parse(text, self.parse_rngs[env], info)

    # --- stepping ------------------------------------------------------------------------------
    def collect(self, buffer: RolloutBuffer, policy_fn: PolicyFn) -> EpisodeStats:
        """Fills `buffer` (reset first) with `buffer.num_steps` steps of every env."""
        stats = EpisodeStats()
        buffer.reset()
        step = 0
        while not buffer.full:
            inputs = self.current_inputs()
            out = policy_fn(inputs, step)
            step += 1
            texts, thought, action = self.decode(out.tokens, out.mask)
            rewards = np.zeros(self.num_envs, np.float32)
            dones = np.zeros(self.num_envs, np.bool_)
            valid = np.zeros(self.num_envs, np.bool_)
            labels = np.full(self.num_envs, -1, np.int32)
            for e, env in enumerate(self.envs):
                parsed = self.parse(texts[e], self.infos[e], e)
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
                    stats.add(float(self.episode_return[e]), int(self.episode_length[e]), info, step - 1, e)
                    self.episode_return[e] = 0.0
                    self.episode_length[e] = 0
                    obs, info = env.reset()
                self.obs[e] = obs
                self.infos[e] = info
            self.total_env_steps += self.num_envs
            images = {k: inputs[k] for k in buffer.image_fields}
            buffer.add(
                texts,
                prompt_ids=inputs["prompt_ids"],
                prompt_mask=inputs["prompt_mask"],
                response_ids=out.tokens,
                response_mask=out.mask,
                thought_mask=thought,
                action_mask=action,
                old_logprobs=out.logprobs,
                old_entropies=out.entropies if out.entropies is not None else np.zeros_like(out.logprobs),
                old_values=out.values,
                rewards=rewards,
                dones=dones,
                valid=valid,
                labels=labels,
                **images,
            )
        return stats

    def play_episodes(self, policy_fn: PolicyFn, episodes: list[dict[str, Any]]) -> EpisodeStats:
        """Plays one episode per entry of `episodes` (each the `reset(options=...)` of its env, e.g.
        ALFWorld's {"split", "task_type", "index"}) to its end, `num_envs` at a time; returns their stats.
        Overwrites the running episodes: meant for an evaluation `VectorRollout`."""
        calls = [0]

        def start(slot: int, spec: dict[str, Any]):
            obs, info = self.envs[slot].reset(options=dict(spec))
            return self.envs[slot], obs, info

        def act(views: list[SlotView]) -> list[Answer]:
            inputs = self.encoder([v.prompt for v in views], np.stack([v.obs for v in views]))
            out = policy_fn(inputs, calls[0])
            calls[0] += 1
            texts, _, _ = self.decode(out.tokens, out.mask)
            return [Answer(t) for t in texts]

        finished = play_episodes(episodes, self.num_envs, start=start, act=act, prompt=self.prompt,
                                 parse=self.parse)
        stats = EpisodeStats()
        for ep in finished:
            stats.add(ep.episode_return, ep.length, ep.final_info)
            self.total_env_steps += ep.length
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
            "parse_rngs": [rng.bit_generator.state for rng in self.parse_rngs],
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
        for rng, rng_state in zip(self.parse_rngs, state["parse_rngs"]):
            rng.bit_generator.state = rng_state
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
