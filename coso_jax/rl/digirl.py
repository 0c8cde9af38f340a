"""The DigiRL backbone (filtered advantage-weighted policy gradient with step and trajectory critics)
for the web-control envs, with the soft-RL term of `algo` none | entropy | coso.

One run is off2on, as DigiRL's default: an *offline* stage on pre-collected trajectories (here: the
scripted DOM solvers of `coso_jax.envs.web.solvers`, with a fraction of random taps so that some
trajectories fail), then an *online* stage on the browser envs. Before both, a behaviour-cloned
start (the analogue of DigiRL's AutoUI checkpoint, which was pre-trained on AitW) is built once from
clean solver demonstrations and cached in `sft_dir`, shared by every algo and seed.

One iteration (DigiRL `offpolicy_train_loop`, reference numbers in `DigiRLConfig`):
  1. rollout (online stage only): `trajectories_per_iteration` complete episodes with the jitted
     sampler, `num_envs` at a time; each transition goes into a replay of `replay_capacity` steps
     with its Monte-Carlo return (gamma) and next state;
  2. step critic: `critic_epochs` Adam steps of cross-entropy on 1[MC return > 0] for both heads of
     the double critic, on s and on s' (DigiRL regresses V(s) and V(s') onto the same label);
  3. trajectory (instruction) critic: `trajectory_critic_epochs` steps on (first state,
     1[trajectory return > 0]);
  4. trajectory filtering: score = return - V_traj(first state); trajectories with a score at or
     above the 0.9 quantile (top 10%) give the actor's transitions (automatic curriculum);
  5. advantages A = clamp(V(s') - V(s) - 0.05 + r + MC, 0, 1), V = min of the two heads;
  6. causal model (coso only): the classifier trains on replayed valid actions and weights the
     actor batch's tokens (coso_jax.causal, the same kernel and classifier as the PPO trainer);
  7. actor: `actor_epochs` Adam steps, each on `actor_batch` transitions drawn from step 4's set,
     loss -mean(log pi(y|s) 1[A > 0]) - alpha * mean(H) with H the naive (entropy) or causal
     (coso) token entropy (losses.weighted_entropy); none has alpha = 0.
The offline stage runs 2-5 and 7 on the offline trajectories (`offline_critic_iterations` critic
iterations, `offline_actor_iterations` actor iterations), then the online stage runs all steps.

Critic design (measured; see `critic_timing` and benchmarks/results/web_digirl_cpu.json):
the critics are a *small separate encoder* (`critic_trunk="separate"`: a patch embedding of the
64x64 screenshot and a bag of token embeddings of the prompt text, into MLP heads), with
their own Adam optimizer, as DigiRL's critics are their own RoBERTa + BLIP-2 models. The
alternative, `critic_trunk="shared"`, puts the heads on the policy VLM's hidden state at the last
prompt token (stop-gradient, so the actor is never pulled by the critic loss). A shared trunk needs
a VLM forward pass over s and s' for every critic step and every advantage, which grows with the
policy (a 7B forward per transition at paper size), and its features move under the critic while
the actor trains; the separate encoder costs the same at any policy size and keeps critic and actor
updates independent. At the tiny CPU size the separate critic is also the faster of the two: on the
2-core CPU one critic update (3 epochs x 32 transitions, s and s') took 0.028 s separate vs 0.48 s
shared, and scoring 64 transitions 0.013 s vs 0.39 s (benchmarks/results/web_digirl_cpu.json,
`critic_timing`), so it is the default. (A convolutional encoder took 3.7 s per update: convolution
gradients are slow on XLA:CPU; hence the patch embedding.)

Soft targets (tau 0.01) are not used: DigiRL's actor loss reads the online critic only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from coso_jax import checkpoint as ckpt
from coso_jax import losses, metrics as metrics_lib, sampling
from coso_jax.causal import classifier as clf
from coso_jax.causal import causal_weights, counterfactual_effects, precompile as causal_precompile, skip_token_mask
from coso_jax.models.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize
from coso_jax.models.llama import positions_from_mask
from coso_jax.rl import policy as policy_lib
from coso_jax.rl import sft as sft_lib
from coso_jax.rl.buffer import ActionReplay
from coso_jax.rl.config import ALGOS
from coso_jax.rl.prompting import PromptEncoder
from coso_jax.rl.train_state import resume_and_open_writer
from coso_jax.tokenizer import IMAGE_TOKEN, build_bpe, load_tokenizer

log = logging.getLogger(__name__)

WEB_ENVS = ("web/general", "web/shopping")
PRESETS = ("tiny_cpu", "paper")
CRITIC_TRUNKS = ("separate", "shared")
NUM_LABELS = 8  # coso_jax.envs.web.ActionType
_MODEL_SEED = 0


# ==============================================================================================
# Configuration
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class DigiRLConfig:
    """One DigiRL run. Defaults are DigiRL's reference config (scripts/config/main/default.yaml)
    where it has a value; `digirl_preset("tiny_cpu")` shrinks sizes and counts for a CPU."""

    env: str = "web/general"
    tasks: tuple[str, ...] | None = None  # a subset of the suite's tasks (None: all of them)
    algo: str = "coso"
    seed: int = 0
    preset: str = "paper"

    # Policy (the LLaVA family of coso_jax.models; tiny from scratch, or a local HF checkpoint).
    model_preset: str = "tiny"
    hf_dir: str | None = None
    image_size: int = 64
    patch_size: int = 16
    vocab_size: int = 1024
    cot: bool = True
    prompt_template: str = "tiny"
    brief_prompt: bool = True
    history_actions: int = 3  # earlier actions shown in the prompt (most recent last)
    classifier_preset: str = "reference"
    screen_scale: int = 2  # browser device scale factor (screenshots 210s x 160s)

    # Rollout.
    num_envs: int = 4  # DigiRL: 4 parallel emulators
    trajectories_per_iteration: int = 16  # rollout_size
    horizon: int | None = None  # None: the suite's (10 general, 20 shopping)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    max_browsers: int = 12  # browsers kept open across tasks (each ~0.5 GB)

    # DigiRL.
    gamma: float = 0.5
    lr: float = 1e-4
    critic_lr: float = 1e-4
    max_grad_norm: float = 0.01
    replay_capacity: int = 2000  # transitions
    actor_epochs: int = 20
    actor_batch: int = 128  # batch 4 x grad_accum 32
    critic_epochs: int = 5
    critic_batch: int = 128
    trajectory_critic_epochs: int = 5
    advantage_offset: float = 0.05
    filter_quantile: float = 0.9  # keep trajectories scoring >= this quantile (top 10%)
    critic_trunk: str = "separate"
    critic_hidden: int = 128

    # off2on schedule (iterations).
    offline_actor_iterations: int = 30
    offline_critic_iterations: int = 20
    online_iterations: int = 400
    offline_episodes_per_task: int = 76  # 608 general-off2on trajectories / 8 tasks
    offline_imperfect_frac: float = 0.3  # random taps in the offline data, so some trajectories fail

    # Soft RL and the causal classifier.
    alpha: float = 1.0  # the CoSo fork's entropy_coeff
    causal_window: int = 4
    causal_lr: float = 1e-5
    causal_batch: int = 1024
    causal_epochs: int = 2
    causal_minibatch: int = 512
    causal_pretrain_steps: int = 500
    causal_replay_capacity: int = 100_000

    # Behaviour-cloned start on clean solver demonstrations (cached, shared by algos and seeds).
    sft_episodes_per_task: int = 64
    sft_epochs: int = 3
    sft_lr: float = 1e-4
    sft_batch_size: int = 32
    sft_dir: str | None = None

    # Bookkeeping.
    eval_episodes: int = 96  # the suite's fixed test episodes used by `evaluate`
    success_window: int = 64  # trajectories in the running success rate
    checkpoint_every: int = 3  # DigiRL save_freq
    keep_checkpoints: int = 3
    heatmap_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tasks is not None and not isinstance(self.tasks, tuple):
            object.__setattr__(self, "tasks", tuple(self.tasks))  # e.g. a JSON list from --set
        validate(self)

    @property
    def suite(self) -> str:
        return self.env.split("/")[-1]

    @property
    def task_names(self) -> tuple[str, ...]:
        from coso_jax.envs.web import get_suite

        return tuple(self.tasks) if self.tasks else get_suite(self.suite).task_names

    @property
    def offline_iterations(self) -> int:
        return max(self.offline_actor_iterations, self.offline_critic_iterations)

    @property
    def num_iterations(self) -> int:
        return self.offline_iterations + self.online_iterations

    def replace(self, **changes: Any) -> "DigiRLConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(config: DigiRLConfig) -> None:
    """Raises ValueError naming the first bad field."""
    if config.env not in WEB_ENVS:
        raise ValueError(f"env must be one of {WEB_ENVS} for the DigiRL backbone, got {config.env!r}")
    if config.tasks is not None:
        from coso_jax.envs.web import get_suite

        known = get_suite(config.env).task_names
        bad = [t for t in config.tasks if t not in known]
        if not config.tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of the {config.env} suite {known}, got {config.tasks}")
    if config.algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {config.algo!r}")
    if config.critic_trunk not in CRITIC_TRUNKS:
        raise ValueError(f"critic_trunk must be one of {CRITIC_TRUNKS}, got {config.critic_trunk!r}")
    positive = ("num_envs", "trajectories_per_iteration", "max_new_tokens", "replay_capacity", "actor_epochs",
                "actor_batch", "critic_epochs", "critic_batch", "trajectory_critic_epochs", "critic_hidden",
                "sft_batch_size", "causal_window", "max_browsers", "image_size", "patch_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("offline_actor_iterations", "offline_critic_iterations", "online_iterations",
                 "offline_episodes_per_task", "sft_episodes_per_task", "sft_epochs", "history_actions",
                 "eval_episodes", "causal_pretrain_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.horizon is not None and config.horizon < 1:
        raise ValueError(f"horizon must be >= 1 or None, got {config.horizon}")
    if not 0.0 <= config.gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {config.gamma}")
    if not 0.0 <= config.filter_quantile <= 1.0:
        raise ValueError(f"filter_quantile must be in [0, 1], got {config.filter_quantile}")
    if not 0.0 <= config.offline_imperfect_frac <= 1.0:
        raise ValueError(f"offline_imperfect_frac must be in [0, 1], got {config.offline_imperfect_frac}")
    if config.alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {config.alpha}")
    if not config.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    if not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.screen_scale not in (1, 2, 3, 4):
        raise ValueError(f"screen_scale must be 1..4, got {config.screen_scale}")
    if config.offline_iterations > 0 and config.offline_episodes_per_task == 0:
        raise ValueError("offline iterations need offline trajectories: set offline_episodes_per_task > 0, or "
                         "offline_actor_iterations = offline_critic_iterations = 0 for a purely online run")


def digirl_preset(name: str, **overrides: Any) -> DigiRLConfig:
    """`paper`: DigiRL's reference numbers (meant for a real policy on an accelerator).

    `tiny_cpu`: a tiny LLaVA from scratch, 1x screenshots, 5-step horizon, 8 trajectories per
    iteration, 8 actor epochs of 16 transitions, 2 offline + 6 online iterations, temperature 0.5
    (at 1.0 the tiny behaviour-cloned policy writes almost no parseable action): a full off2on run
    in minutes on two CPU cores (the behaviour-cloned start is built once, ~5 minutes unloaded).
    """
    if name == "paper":
        return DigiRLConfig(preset=name, **overrides)
    if name == "tiny_cpu":
        base: dict[str, Any] = dict(
            preset=name, classifier_preset="tiny", screen_scale=1, history_actions=2,
            num_envs=4, trajectories_per_iteration=8, horizon=5, max_new_tokens=80, max_browsers=10,
            temperature=0.5, actor_epochs=8, actor_batch=16, critic_epochs=3, critic_batch=32,
            trajectory_critic_epochs=3, critic_hidden=64, lr=1e-4, critic_lr=1e-3,
            offline_actor_iterations=2, offline_critic_iterations=2, online_iterations=6,
            offline_episodes_per_task=4, offline_imperfect_frac=0.5, alpha=0.05, causal_lr=1e-3, causal_batch=256,
            causal_minibatch=256, causal_pretrain_steps=100, causal_replay_capacity=8192,
            sft_episodes_per_task=24, sft_epochs=20, sft_lr=2e-3, sft_batch_size=32,
            eval_episodes=16, success_window=32, checkpoint_every=2, heatmap_every=4,
        )
        base.update(overrides)
        return DigiRLConfig(**base)
    raise ValueError(f"unknown DigiRL preset {name!r}; choose one of {PRESETS}")


# ==============================================================================================
# Pure functions (host NumPy for the per-trajectory bookkeeping; JAX for the losses)
# ==============================================================================================
def mc_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted Monte-Carlo returns of one trajectory: G_t = r_t + gamma G_{t+1}, G_T = 0.

    rewards float[T] -> float32[T].
    """
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def trajectory_filter(returns: np.ndarray, values: np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """DigiRL's `filter_buffer`: keep trajectories whose return - V_traj(first state) is at or above
    the `quantile` quantile of all scores (top 10% for 0.9).

    returns float[n], values float[n] (trajectory-critic success probabilities, clipped to
    [1e-4, 1 - 1e-4]) -> bool[n]. Empty input gives an empty mask.
    """
    returns = np.asarray(returns, np.float64)
    values = np.clip(np.asarray(values, np.float64), 1e-4, 1 - 1e-4)
    if returns.shape != values.shape or returns.ndim != 1:
        raise ValueError(f"trajectory_filter expects equal 1-D arrays, got {returns.shape} and {values.shape}")
    if returns.size == 0:
        return np.zeros(0, np.bool_)
    scores = returns - values
    return scores >= np.quantile(scores, quantile)


def success_prob(logits: jax.Array) -> jax.Array:
    """P(success) of 2-class critic logits [..., 2] -> [...] (softmax, class 1)."""
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., 1]


def double_critic_advantage(logits_s: jax.Array, logits_next: jax.Array, rewards: jax.Array,
                            mc: jax.Array, offset: float = 0.05) -> jax.Array:
    """A = clamp(min_h V_h(s') - min_h V_h(s) - offset + r + MC, 0, 1).

    logits_s, logits_next [B, H, 2] (H heads of the double critic), rewards [B], mc [B] -> float32 [B].
    """
    v = jnp.min(success_prob(logits_s), axis=-1)
    nv = jnp.min(success_prob(logits_next), axis=-1)
    return losses.digirl_advantage(v, nv, rewards, mc, offset)


def double_critic_loss(logits_s: jax.Array, logits_next: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over heads and over (s, s') of the binary cross-entropy on `targets` = 1[MC > 0].

    logits_s, logits_next [B, H, 2]; targets [B] -> float32 scalar.
    """
    total = jnp.zeros((), jnp.float32)
    for logits in (logits_s, logits_next):
        for h in range(logits.shape[1]):
            total = total + losses.binary_critic_loss(logits[:, h], targets)
    return total


def actor_loss(seq_logprobs: jax.Array, advantages: jax.Array, entropies: jax.Array,
               entropy_weights: jax.Array, mask: jax.Array, alpha: jax.Array | float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-mean(log pi(y|s) 1[A > 0]) - alpha * mean_b(sum_t m w H / sum_t m).

    seq_logprobs [B] (differentiated), advantages [B], entropies [B, N] (differentiated),
    entropy_weights [B, N] (ones: naive entropy; CoSo causal weights; constants), mask [B, N],
    alpha scalar (0 for algo none) -> (float32 scalar, diagnostics).
    """
    pg = losses.filtered_pg_loss(seq_logprobs, advantages)
    bonus = losses.weighted_entropy(entropies, entropy_weights, mask)
    loss = pg - alpha * jnp.mean(bonus)
    return loss, {"pg_loss": pg, "entropy_bonus": jnp.mean(bonus),
                  "kept_fraction": jnp.mean((advantages > 0).astype(jnp.float32))}


def images_to_pixels(images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> CLIP-normalised float32 [B, 3, S, S] (the policy's pixel_values)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)) / jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def resize_observation(obs: np.ndarray, size: int) -> np.ndarray:
    """The whole screenshot (banner included, no crop) resized to uint8 [size, size, 3]."""
    return resize(np.asarray(obs, np.uint8), size, size)


# ==============================================================================================
# Critics
# ==============================================================================================
PATCH = 8  # the separate critic's image patches (8x8 px of the resized screenshot)
PATCH_FEATURES = 16


class _Head(nnx.Module):
    def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(din, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.fc(x)))


class CriticNet(nnx.Module):
    """Success classifier(s): `num_heads` heads of 2-class logits on state features.

    Separate trunk (`feature_dim=None`): its own encoder of the screenshot (8x8-px patches, each
    embedded by one shared linear map, then all of them, in place, projected to `hidden`; matmuls
    only, as convolution gradients are slow on XLA:CPU) and of the prompt text (masked mean of
    token embeddings). Shared trunk: heads only, on features the
    caller takes from the policy VLM.
    `__call__(images u8[B,S,S,3], ids[B,P], mask[B,P], features=None) -> logits [B, num_heads, 2]`.
    """

    def __init__(self, vocab_size: int, image_size: int, hidden: int, num_heads: int,
                 feature_dim: int | None = None, *, rngs: nnx.Rngs):
        self.separate = feature_dim is None
        if self.separate:
            if image_size % PATCH:
                raise ValueError(f"the critic's image size {image_size} must be a multiple of {PATCH}")
            grid = (image_size // PATCH) ** 2
            self.patch_embed = nnx.Linear(PATCH * PATCH * 3, PATCH_FEATURES, rngs=rngs)
            self.image_proj = nnx.Linear(grid * PATCH_FEATURES, hidden, rngs=rngs)
            self.embed = nnx.Embed(vocab_size, hidden, rngs=rngs)
            self.fuse = nnx.Linear(2 * hidden, hidden, rngs=rngs)
            din = hidden
        else:
            din = feature_dim
        self.heads = nnx.List([_Head(din, hidden, rngs=rngs) for _ in range(num_heads)])

    def encode(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        b, side = x.shape[0], x.shape[1] // PATCH
        patches = x.reshape(b, side, PATCH, side, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, side * side, -1)
        x = jax.nn.gelu(self.patch_embed(patches))  # [B, grid, F]: where things are is kept
        img = self.image_proj(x.reshape(b, -1))
        w = mask.astype(jnp.float32)[..., None]
        txt = (self.embed(ids) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return jax.nn.gelu(self.fuse(jnp.concatenate([jax.nn.gelu(img), txt], axis=-1)))

    def __call__(self, images, ids, mask, features=None) -> jax.Array:
        h = self.encode(images, ids, mask) if self.separate else features
        return jnp.stack([head(h) for head in self.heads], axis=1)


class Critics(nnx.Module):
    """The step-level double critic (2 heads) and the trajectory-level critic (1 head)."""

    def __init__(self, step: CriticNet, trajectory: CriticNet):
        self.step = step
        self.trajectory = trajectory


def policy_features(policy: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    pixel_values: jax.Array) -> jax.Array:
    """Shared-trunk critic features: the policy's hidden state at the last prompt token,
    stop-gradient. [B, P] -> float32 [B, D]."""
    p = prompt_ids.shape[1]
    embeds = policy.embed_inputs(prompt_ids, pixel_values=pixel_values)
    _, hidden, _ = sampling._decode_slice(policy, embeds, prompt_mask, positions_from_mask(prompt_mask), p - 1, p)
    return jax.lax.stop_gradient(hidden[:, -1].astype(jnp.float32))


# ==============================================================================================
# Replay of transitions
# ==============================================================================================
class TransitionReplay:
    """Ring buffer of `capacity` transitions (host arrays), each tagged with its trajectory id.

    Per transition: prompt_ids/mask [P], image u8 [S, S, 3], the same for the next state, response
    ids/mask [N], reward, done, mc_return, valid, label, traj_id, step (index in its trajectory),
    traj_return (the whole trajectory's undiscounted return).
    """

    def __init__(self, capacity: int, prompt_len: int, max_new_tokens: int, image_size: int, seed: int = 0):
        shapes = {
            "prompt_ids": ((prompt_len,), np.int32), "prompt_mask": ((prompt_len,), np.bool_),
            "image": ((image_size, image_size, 3), np.uint8),
            "next_prompt_ids": ((prompt_len,), np.int32), "next_prompt_mask": ((prompt_len,), np.bool_),
            "next_image": ((image_size, image_size, 3), np.uint8),
            "response_ids": ((max_new_tokens,), np.int32), "response_mask": ((max_new_tokens,), np.bool_),
            "reward": ((), np.float32), "done": ((), np.bool_), "mc_return": ((), np.float32),
            "valid": ((), np.bool_), "label": ((), np.int32), "traj_id": ((), np.int32),
            "step": ((), np.int32), "traj_return": ((), np.float32),
        }
        self.capacity = capacity
        self.data = {k: np.zeros((capacity,) + s, d) for k, (s, d) in shapes.items()}
        self.size = 0
        self.cursor = 0
        self.next_traj_id = 0
        self.rng = np.random.default_rng(seed)

    def add_trajectory(self, traj: dict[str, np.ndarray], gamma: float) -> None:
        """Adds one trajectory (a dict of [T, ...] arrays with the per-transition fields except
        mc_return / traj_id / step / traj_return, which are computed here)."""
        t_len = len(traj["reward"])
        rows = dict(traj)
        rows["mc_return"] = mc_returns(traj["reward"], gamma)
        rows["traj_id"] = np.full(t_len, self.next_traj_id, np.int32)
        rows["step"] = np.arange(t_len, dtype=np.int32)
        rows["traj_return"] = np.full(t_len, float(np.sum(traj["reward"])), np.float32)
        self.next_traj_id += 1
        for t in range(t_len):
            i = self.cursor
            for k, arr in self.data.items():
                arr[i] = rows[k][t]
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def indices(self) -> np.ndarray:
        return np.arange(self.size)

    def first_steps(self) -> np.ndarray:
        """Indices of the stored transitions that start a trajectory (the trajectory critic's data)."""
        return np.flatnonzero(self.data["step"][: self.size] == 0)

    def sample(self, n: int, among: np.ndarray | None = None) -> np.ndarray:
        pool = self.indices() if among is None else np.asarray(among)
        if pool.size == 0:
            raise RuntimeError("the replay holds no transition to sample")
        return pool[self.rng.integers(0, pool.size, size=n)]

    def batch(self, idx: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: self.data[k][idx] for k in fields}

    def arrays(self) -> dict[str, np.ndarray]:
        return self.data

    def meta(self) -> dict[str, Any]:
        return {"size": self.size, "cursor": self.cursor, "next_traj_id": self.next_traj_id,
                "rng": self.rng.bit_generator.state}

    def load(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        for k, target in self.data.items():
            value = np.asarray(arrays[k])
            if value.shape != target.shape:
                raise ValueError(f"replay checkpoint field {k!r} has shape {value.shape}, expected {target.shape}")
            target[...] = value
        self.size, self.cursor = int(meta["size"]), int(meta["cursor"])
        self.next_traj_id = int(meta["next_traj_id"])
        self.rng.bit_generator.state = meta["rng"]


# ==============================================================================================
# Web episodes: a pool of browsers, batched rollouts, scripted demonstrations
# ==============================================================================================
class WebEnvPool:
    """Browsers by task, reused across episodes; at most `max_browsers` open (idle ones of other
    tasks are closed first)."""

    def __init__(self, horizon: int | None, screen_scale: int, max_browsers: int):
        self.horizon = horizon
        self.screen_scale = screen_scale
        self.max_browsers = max_browsers
        self.free: dict[str, list[Any]] = {}
        self.leased: set[int] = set()
        self.count = 0

    def lease(self, task: str):
        from coso_jax.envs.web import BrowserConfig, make

        envs = self.free.get(task)
        if envs:
            env = envs.pop()
        else:
            while self.count >= self.max_browsers and self._close_one_idle():
                pass
            kwargs: dict[str, Any] = {"config": BrowserConfig(scale_factor=self.screen_scale)}
            if self.horizon is not None:
                kwargs["horizon"] = self.horizon
            env = make(task, **kwargs)
            self.count += 1
        self.leased.add(id(env))
        return env

    def release(self, task: str, env) -> None:
        self.leased.discard(id(env))
        self.free.setdefault(task, []).append(env)

    def _close_one_idle(self) -> bool:
        for envs in self.free.values():
            if envs:
                envs.pop(0).close()
                self.count -= 1
                return True
        return False

    def close(self) -> None:
        for envs in self.free.values():
            for env in envs:
                env.close()
        self.free.clear()
        self.count = 0


class PromptBuilder:
    """The web text interface's prompt for an env `info`, trimmed to fit the encoder's prompt length
    (at most `history_actions` earlier actions, fewer when a long typed text would not fit)."""

    def __init__(self, encoder: PromptEncoder, cot: bool, brief: bool, history_actions: int):
        from coso_jax.envs.web import text_interface

        self.iface = text_interface()
        self.encoder = encoder
        self.cot, self.brief, self.history_actions = cot, brief, history_actions

    def __call__(self, info: dict[str, Any]) -> str:
        history = list(info.get("history", ()))
        for k in range(min(self.history_actions, len(history)), -1, -1):
            prompt = self.iface.prompt(dict(info, history=history[len(history) - k:] if k else []),
                                       cot=self.cot, brief=self.brief)
            try:
                self.encoder.token_ids(prompt)
                return prompt
            except ValueError:
                continue
        raise ValueError(f"the task text alone does not fit the prompt length: {info.get('goal')!r}")


@dataclasses.dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    length: int
    transitions: dict[str, np.ndarray]  # [T, ...] per-transition fields of TransitionReplay
    texts: list[str]
    prompts: list[str] = dataclasses.field(default_factory=list)


def run_episodes(
    pool: WebEnvPool,
    episodes: Sequence[tuple[str, int]],
    num_slots: int,
    prompt_fn: PromptBuilder,
    image_size: int,
    act: Callable[[list[str], np.ndarray, list[str], list[Any]], list[tuple[str, np.ndarray, np.ndarray]]],
) -> list[EpisodeResult]:
    """Plays `episodes` [(task, seed)], `num_slots` at a time, to the end.

    `act(prompts, images u8[num_slots, S, S, 3], tasks, envs) -> [(text, response_ids[N], response_mask[N])]`
    for every slot (inactive slots repeat an active one so the batch shape never changes; their
    answers are ignored).
    """
    from coso_jax.envs.web import text_interface

    iface = text_interface()
    encoder = prompt_fn.encoder
    queue = list(episodes)
    slots: list[dict[str, Any] | None] = [None] * num_slots
    results: list[EpisodeResult] = []

    def start(slot: int) -> None:
        task, seed = queue.pop(0)
        env = pool.lease(task)
        obs, info = env.reset(seed=int(seed))
        slots[slot] = {"task": task, "seed": int(seed), "env": env, "obs": obs, "info": info, "rows": [], "texts": [],
                       "prompts": []}

    try:
        for s in range(num_slots):
            if queue:
                start(s)
        while any(slots):
            active = [s for s in range(num_slots) if slots[s] is not None]
            filler = slots[active[0]]
            view = [slots[s] if slots[s] is not None else filler for s in range(num_slots)]
            prompts = [prompt_fn(v["info"]) for v in view]
            images = np.stack([resize_observation(v["obs"], image_size) for v in view])
            answers = act(prompts, images, [v["task"] for v in view], [v["env"] for v in view])
            for s in active:
                ep = slots[s]
                text, resp_ids, resp_mask = answers[s]
                parsed = iface.parse(text)
                ids, mask = encoder.encode_text([prompts[s]])
                obs, reward, terminated, truncated, info = ep["env"].step(text)
                ep["rows"].append({
                    "prompt_ids": ids[0], "prompt_mask": mask[0], "image": images[s],
                    "response_ids": resp_ids, "response_mask": resp_mask, "reward": np.float32(reward),
                    "done": bool(terminated or truncated), "valid": bool(parsed.valid),
                    "label": -1 if parsed.label is None else int(parsed.label),
                })
                ep["texts"].append(text)
                ep["prompts"].append(prompts[s])
                ep["obs"], ep["info"] = obs, info
                if terminated or truncated:
                    rows = ep["rows"]
                    nids, nmask = encoder.encode_text([prompt_fn(info)])
                    nexts = [(r["prompt_ids"], r["prompt_mask"], r["image"]) for r in rows[1:]]
                    nexts.append((nids[0], nmask[0], resize_observation(obs, image_size)))
                    arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
                    arrays["next_prompt_ids"] = np.stack([n[0] for n in nexts])
                    arrays["next_prompt_mask"] = np.stack([n[1] for n in nexts])
                    arrays["next_image"] = np.stack([n[2] for n in nexts])
                    results.append(EpisodeResult(ep["task"], ep["seed"], bool(info.get("success")), len(rows),
                                                 arrays, ep["texts"], ep["prompts"]))
                    pool.release(ep["task"], ep["env"])
                    slots[s] = None
                    if queue:
                        start(s)
    except BaseException:
        for ep in slots:
            if ep is not None:
                pool.release(ep["task"], ep["env"])
        raise
    return results


def solver_actor(tokenizer: Any, max_new_tokens: int, imperfect_frac: float, rng: np.random.Generator, cot: bool):
    """An `act` function for `run_episodes` that plays the scripted DOM solvers (with a fraction of
    random taps), returning the AutoUI answer text and its tokens."""
    from coso_jax.envs.web.autoui import ActionType, AutoUIAction, format_answer
    from coso_jax.envs.web.solvers import solve

    def act(prompts, images, tasks, envs):
        out = []
        for task, env in zip(tasks, envs):
            if imperfect_frac > 0 and rng.random() < imperfect_frac:
                x, y = rng.uniform(0.02, 0.98), rng.uniform(0.26, 0.98)
                thought, action = "I try tapping here.", AutoUIAction.tap(round(float(x), 4), round(float(y), 4))
            else:
                try:
                    thought, action = solve(task, env.unwrapped.page())
                except Exception:  # a finished slot repeated as filler, or a page in flux
                    thought, action = "I wait.", AutoUIAction(ActionType.Idle)
            text = format_answer(thought, action) if cot else action.to_text()
            ids, mask = sft_lib.encode_answers(tokenizer, [text], max_new_tokens) if tokenizer is not None else (
                np.zeros((1, max_new_tokens), np.int32), np.zeros((1, max_new_tokens), np.bool_))
            out.append((text, ids[0], mask[0]))
        return out

    return act


def _stack_episodes(results: Sequence[EpisodeResult]) -> dict[str, np.ndarray]:
    keys = results[0].transitions.keys()
    return {k: np.concatenate([r.transitions[k] for r in results]) for k in keys}


# ==============================================================================================
# The behaviour-cloned start (cached) and the offline data
# ==============================================================================================
@dataclasses.dataclass
class WebStart:
    tokenizer: Any
    encoder: PromptEncoder
    prompt_fn: PromptBuilder
    policy: nnx.Module
    classifier: clf.CausalClassifier
    summary: dict[str, Any]
    demo_tokens: np.ndarray
    demo_mask: np.ndarray
    demo_labels: np.ndarray
    offline: list[EpisodeResult]


_START_FIELDS = ("env", "tasks", "model_preset", "hf_dir", "image_size", "patch_size", "vocab_size", "cot", "brief_prompt",
                 "history_actions", "prompt_template", "classifier_preset", "max_new_tokens", "screen_scale",
                 "horizon", "sft_episodes_per_task", "sft_epochs", "sft_lr", "sft_batch_size",
                 "causal_pretrain_steps", "causal_lr", "causal_minibatch", "offline_episodes_per_task",
                 "offline_imperfect_frac")


def start_fingerprint(config: DigiRLConfig) -> str:
    return ckpt.config_fingerprint({k: getattr(config, k) for k in _START_FIELDS})


def default_sft_dir(config: DigiRLConfig, workdir: str | Path) -> Path:
    return Path(workdir).parent / "sft" / f"{config.suite}-{config.preset}-{start_fingerprint(config)[:10]}"


def _web_encoder(config: DigiRLConfig, tokenizer: Any, model_config: Any, prompts: list[str]) -> PromptEncoder:
    num_image_tokens = model_config.num_image_tokens()

    def image_fn(observations: np.ndarray):
        imgs = np.stack([resize_observation(o, config.image_size) for o in observations])
        return np.asarray(images_to_pixels(imgs)), None

    probe = PromptEncoder(tokenizer, 1 << 20, num_image_tokens, image_fn, config.prompt_template)
    longest = max(len(probe.token_ids(p)) for p in prompts)
    return PromptEncoder(tokenizer, -(-(longest + 24) // 8) * 8, num_image_tokens, image_fn, config.prompt_template)


def _suite_episodes(config: DigiRLConfig, per_task: int, seed_offset: int) -> list[tuple[str, int]]:
    # Train seeds, seed-major so every task is represented early; offsets keep the two sets apart.
    return [(t, seed_offset + k) for k in range(per_task) for t in config.task_names]


def load_or_build_start(config: DigiRLConfig, sft_dir: Path) -> WebStart:
    """Tokenizer, BC'd tiny LLaVA, pre-trained classifier and the offline trajectories (cached)."""
    sft_dir = Path(sft_dir)
    done = sft_dir / "summary.json"
    pool = WebEnvPool(config.horizon, config.screen_scale, config.max_browsers)
    rng = np.random.default_rng(_MODEL_SEED)
    if done.exists():
        built = json.loads(done.read_text()).get("fingerprint")
        if built != start_fingerprint(config):
            raise ValueError(f"the behaviour-cloned start in {sft_dir} was built with other settings (fingerprint "
                             f"{built} != {start_fingerprint(config)}); choose another --sft_dir or delete it")
    try:
        if done.exists():
            tokenizer = load_tokenizer(config.hf_dir or sft_dir / "tokenizer")
            demos = json.loads((sft_dir / "demos.json").read_text())
            offline = _load_offline(sft_dir / "offline.npz")
        else:
            t0 = time.perf_counter()
            # Clean solver demonstrations for BC: train seeds 100.. (offline data uses 0..).
            demo_eps = run_episodes(pool, _suite_episodes(config, config.sft_episodes_per_task, 100),
                                    config.num_envs, _RawPrompt(config), config.image_size,
                                    solver_actor(None, config.max_new_tokens, 0.0, rng, config.cot))
            demos = {"prompts": [p for r in demo_eps for p in r.prompts],
                     "answers": [t for r in demo_eps for t in r.texts],
                     "success": [r.success for r in demo_eps], "seconds": time.perf_counter() - t0}
            sft_dir.mkdir(parents=True, exist_ok=True)
            (sft_dir / "demos.json").write_text(json.dumps(demos) + "\n")
            np.savez_compressed(sft_dir / "demo_images.npz",
                                images=np.concatenate([r.transitions["image"] for r in demo_eps]))
            tokenizer = (load_tokenizer(config.hf_dir) if config.hf_dir else
                         build_bpe(demos["prompts"] + demos["answers"], config.vocab_size,
                                   save_dir=sft_dir / "tokenizer"))
            offline = None
        policy, model_config = policy_lib.build_policy(config, tokenizer)  # duck-typed config fields
        encoder = _web_encoder(config, tokenizer, model_config, demos["prompts"])
        prompt_fn = PromptBuilder(encoder, config.cot, config.brief_prompt, config.history_actions)
        classifier = clf.CausalClassifier(policy_lib.classifier_config(config, len(tokenizer), NUM_LABELS),
                                          rngs=nnx.Rngs(_MODEL_SEED + 2))
        from coso_jax.envs.web import text_interface

        iface = text_interface()
        labels = np.asarray([iface.parse(a).label if iface.parse(a).valid else -1 for a in demos["answers"]], np.int32)
        demo_tokens, demo_mask = sft_lib.encode_answers(tokenizer, demos["answers"], config.max_new_tokens)
        store = ckpt.Checkpointer(sft_dir / "weights", save_interval_steps=1, max_to_keep=1)
        items = {"policy": nnx.state(policy, nnx.Param), "classifier": nnx.state(classifier, nnx.Param)}
        if done.exists():
            restored, _ = store.restore(None, abstract_items=items)
            nnx.update(policy, restored["policy"])
            nnx.update(classifier, restored["classifier"])
            summary = json.loads(done.read_text())
        else:
            images = np.load(sft_dir / "demo_images.npz")["images"]
            summary = _train_start(config, tokenizer, encoder, policy, classifier, demos, images, demo_tokens,
                                   demo_mask, labels)
            t0 = time.perf_counter()
            offline = _collect_offline(config, pool, prompt_fn, tokenizer, rng)
            summary["offline_seconds"] = time.perf_counter() - t0
            summary["offline_trajectories"] = len(offline)
            summary["offline_success_rate"] = float(np.mean([r.success for r in offline])) if offline else None
            _save_offline(sft_dir / "offline.npz", offline)
            store.save(0, {"policy": nnx.state(policy, nnx.Param), "classifier": nnx.state(classifier, nnx.Param)},
                       {"fingerprint": summary["fingerprint"]}, force=True)
            store.wait()
            done.write_text(json.dumps(summary, indent=2) + "\n")
        store.close()
    finally:
        pool.close()
    return WebStart(tokenizer, encoder, prompt_fn, policy, classifier, summary, demo_tokens, demo_mask, labels,
                    offline)


class _RawPrompt:
    """Prompt builder before a tokenizer exists (demo collection): no length check."""

    def __init__(self, config: DigiRLConfig):
        from coso_jax.envs.web import text_interface

        self.iface = text_interface()
        self.config = config
        self.encoder = _NullEncoder()

    def __call__(self, info):
        history = list(info.get("history", ()))
        k = min(self.config.history_actions, len(history))
        return self.iface.prompt(dict(info, history=history[len(history) - k:] if k else []),
                                 cot=self.config.cot, brief=self.config.brief_prompt)


class _NullEncoder:
    """Stands in for PromptEncoder while collecting BC demos: keeps the prompt text itself."""

    def encode_text(self, prompts):
        return np.zeros((1, 1), np.int32), np.zeros((1, 1), np.bool_)


def _train_start(config, tokenizer, encoder, policy, classifier, demos, images, demo_tokens, demo_mask, labels):
    prompts = demos["prompts"]
    ids, mask = encoder.encode_text(prompts)
    data = {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": np.asarray(images_to_pixels(images)),
            "response_ids": demo_tokens, "response_mask": demo_mask}
    steps = config.sft_epochs * (len(prompts) // config.sft_batch_size)
    bar = metrics_lib.progress_bar(steps, desc=f"BC start {config.env}", disable=not config.progress)
    t0 = time.perf_counter()
    history = sft_lib.train_sft(policy, data, epochs=config.sft_epochs, lr=config.sft_lr,
                                batch_size=config.sft_batch_size, seed=_MODEL_SEED,
                                on_step=lambda step, loss: bar.update(1, {"loss": loss}))
    bar.close()
    sft_seconds = time.perf_counter() - t0
    tx = clf.make_optimizer(classifier, learning_rate=config.causal_lr)
    step_fn = classifier_train_step()
    rng = np.random.default_rng(_MODEL_SEED)
    key = jax.random.key(_MODEL_SEED)
    valid = np.flatnonzero(labels >= 0)
    cls_loss = cls_acc = float("nan")
    for _ in range(config.causal_pretrain_steps):
        idx = rng.choice(valid, size=min(config.causal_minibatch, valid.size), replace=True)
        key, sub = jax.random.split(key)
        cls_loss, cls_acc = step_fn(classifier, tx, demo_tokens[idx], demo_mask[idx], labels[idx], sub)
    return {
        "fingerprint": start_fingerprint(config), "env": config.env, "demonstrations": len(prompts),
        "demo_episodes": len(demos["success"]), "demo_success_rate": float(np.mean(demos["success"])),
        "demo_seconds": demos["seconds"], "sft_steps": len(history),
        "sft_first_loss": history[0] if history else None,
        "sft_final_loss": float(np.mean(history[-10:])) if history else None, "sft_seconds": sft_seconds,
        "classifier_final_loss": float(cls_loss), "classifier_final_accuracy": float(cls_acc),
        "prompt_len": encoder.prompt_len, "max_answer_tokens": int(demo_mask.sum(1).max()),
    }


def _collect_offline(config, pool, prompt_fn, tokenizer, rng) -> list[EpisodeResult]:
    if config.offline_episodes_per_task == 0:
        return []
    return run_episodes(pool, _suite_episodes(config, config.offline_episodes_per_task, 0), config.num_envs,
                        prompt_fn, config.image_size,
                        solver_actor(tokenizer, config.max_new_tokens, config.offline_imperfect_frac, rng, config.cot))


def _save_offline(path: Path, episodes: Sequence[EpisodeResult]) -> None:
    if not episodes:
        np.savez_compressed(path, lengths=np.zeros(0, np.int64))
        return
    arrays = _stack_episodes(episodes)
    np.savez_compressed(path, lengths=np.asarray([e.length for e in episodes]),
                        success=np.asarray([e.success for e in episodes]),
                        tasks=np.asarray([e.task for e in episodes]), seeds=np.asarray([e.seed for e in episodes]),
                        **{f"t_{k}": v for k, v in arrays.items()})


def _load_offline(path: Path) -> list[EpisodeResult]:
    z = np.load(path)
    lengths = z["lengths"]
    out, start = [], 0
    for i, n in enumerate(lengths):
        tr = {k[2:]: z[k][start:start + n] for k in z.files if k.startswith("t_")}
        out.append(EpisodeResult(str(z["tasks"][i]), int(z["seeds"][i]), bool(z["success"][i]), int(n), tr, []))
        start += n
    return out


# ==============================================================================================
# Jitted steps (cached by graph structure and static settings, so runs in one process share them)
# ==============================================================================================
_ACTOR_FIELDS = ("prompt_ids", "prompt_mask", "image", "response_ids", "response_mask", "advantages",
                 "entropy_weights")
_CRITIC_FIELDS = ("prompt_ids", "prompt_mask", "image", "next_prompt_ids", "next_prompt_mask", "next_image",
                  "mc_return")


def _critic_logits(net: CriticNet, policy, image_token_id: int, images, ids, mask):
    if net.separate:
        return net(images, ids, mask & (ids != image_token_id))
    return net(None, None, None, features=policy_features(policy, ids, mask, images_to_pixels(images)))


@functools.lru_cache(maxsize=16)
def _steps(policy_gd, critic_gd, tx_actor, tx_critic, image_token_id: int, sample_kw: tuple, temperature: float):
    """Builds the jitted phase functions: sample, critic update, trajectory-critic update, critic
    inference, actor update."""
    sample_kw = dict(sample_kw)

    def _critic_epochs(loss_fn, critic_params, critic_opt, batches):
        """One Adam step of `loss_fn(params, batch) -> (loss, accuracy)` per leading slice of batches."""
        def epoch(carry, b):
            cp, opt = carry
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(cp, b)
            updates, opt = tx_critic.update(grads, opt, cp)
            return (optax.apply_updates(cp, updates), opt), (loss, acc)

        (critic_params, critic_opt), (loss, acc) = jax.lax.scan(epoch, (critic_params, critic_opt), batches)
        return critic_params, critic_opt, {"loss": loss.mean(), "accuracy": acc.mean()}

    def sample(params, prompt_ids, prompt_mask, images, key):
        policy = nnx.merge(policy_gd, params)
        return sampling.sample_fn(policy, None, prompt_ids, prompt_mask, key,
                                  pixel_values=images_to_pixels(images), **sample_kw)

    def critic_update(critic_params, critic_opt, policy_params, batches):
        """`batches`: fields of _CRITIC_FIELDS with a leading [epochs, B] layout."""
        policy = nnx.merge(policy_gd, policy_params)

        def loss_fn(cp, b):
            critics = nnx.merge(critic_gd, cp)
            ls = _critic_logits(critics.step, policy, image_token_id, b["image"], b["prompt_ids"], b["prompt_mask"])
            ln = _critic_logits(critics.step, policy, image_token_id, b["next_image"], b["next_prompt_ids"],
                                b["next_prompt_mask"])
            target = b["mc_return"] > 0
            acc = jnp.mean(((success_prob(ls).min(-1) > 0.5) == target).astype(jnp.float32))
            return double_critic_loss(ls, ln, target), acc

        return _critic_epochs(loss_fn, critic_params, critic_opt, batches)

    def trajectory_update(critic_params, critic_opt, policy_params, batches):
        policy = nnx.merge(policy_gd, policy_params)

        def loss_fn(cp, b):
            critics = nnx.merge(critic_gd, cp)
            logits = _critic_logits(critics.trajectory, policy, image_token_id, b["image"], b["prompt_ids"],
                                    b["prompt_mask"])[:, 0]
            target = b["traj_return"] > 0
            acc = jnp.mean(((success_prob(logits) > 0.5) == target).astype(jnp.float32))
            return losses.binary_critic_loss(logits, target), acc

        return _critic_epochs(loss_fn, critic_params, critic_opt, batches)

    def critic_values(critic_params, policy_params, b):
        """(advantages [B], trajectory-critic P(success) [B]) of a batch of transitions."""
        policy = nnx.merge(policy_gd, policy_params)
        critics = nnx.merge(critic_gd, critic_params)
        ls = _critic_logits(critics.step, policy, image_token_id, b["image"], b["prompt_ids"], b["prompt_mask"])
        ln = _critic_logits(critics.step, policy, image_token_id, b["next_image"], b["next_prompt_ids"],
                            b["next_prompt_mask"])
        adv = double_critic_advantage(ls, ln, b["reward"], b["mc_return"])
        traj = success_prob(_critic_logits(critics.trajectory, policy, image_token_id, b["image"], b["prompt_ids"],
                                           b["prompt_mask"])[:, 0])
        return adv, traj

    def actor_update(params, opt_state, batches, alpha):
        def loss_fn(p, b):
            policy = nnx.merge(policy_gd, p)
            batch = dict(b, pixel_values=images_to_pixels(b["image"]))
            out = sampling.score_batch_fn(policy, None, batch, temperature=temperature)
            logp = losses.sequence_logprob(out.logprobs, b["response_mask"])
            return actor_loss(logp, b["advantages"], out.entropies, b["entropy_weights"], b["response_mask"], alpha)

        def epoch(carry, b):
            p, opt = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
            finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            updates, new_opt = tx_actor.update(grads, opt, p)
            new_p = optax.apply_updates(p, updates)
            keep = lambda a, b_: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b_)
            aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), skipped=(~finite).astype(jnp.float32))
            return (keep(new_p, p), keep(new_opt, opt)), aux

        (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state), batches)
        summary = jax.tree.map(jnp.mean, aux)
        summary["skipped"] = jnp.sum(aux["skipped"])
        return params, opt_state, summary

    return {
        "sample": jax.jit(sample),
        "critic_update": jax.jit(critic_update, donate_argnums=(0, 1)),
        "trajectory_update": jax.jit(trajectory_update, donate_argnums=(0, 1)),
        "critic_values": jax.jit(critic_values),
        "actor_update": jax.jit(actor_update, donate_argnums=(0, 1)),
    }


@functools.lru_cache(maxsize=1)
def classifier_train_step() -> Callable:
    """One jitted classifier step for the whole process (`clf.make_train_step` builds a new jitted
    function, and so a new compile, on every call)."""
    return clf.make_train_step()


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, max_grad_norm: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(lr))


def build_critics(config: DigiRLConfig, vocab_size: int, hidden_size: int, seed: int) -> Critics:
    """Both critics, initialised from NumPy (LeCun-normal kernels, zero biases, N(0, 0.1) embeddings):
    the modules' own initialisers would compile one XLA program each, tens of seconds on a small CPU."""
    feature_dim = None if config.critic_trunk == "separate" else hidden_size

    def build():
        rngs = nnx.Rngs(0)
        return Critics(CriticNet(vocab_size, config.image_size, config.critic_hidden, 2, feature_dim, rngs=rngs),
                       CriticNet(vocab_size, config.image_size, config.critic_hidden, 1, feature_dim, rngs=rngs))

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rs = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        name = str(path[-1])
        if name == "bias":
            x = np.zeros(abstract.shape, np.float32)
        elif name == "kernel":
            x = rs.standard_normal(abstract.shape, dtype=np.float32) / np.sqrt(np.prod(abstract.shape[:-1]))
        else:
            x = rs.standard_normal(abstract.shape, dtype=np.float32) * 0.1
        filled.append((path, var.replace(jnp.asarray(x, abstract.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ==============================================================================================
# The trainer
# ==============================================================================================
class DigiRLTrainer:
    """Owns the policy, critics, classifier, replay, browsers, checkpoints and metrics of one run.

      trainer = DigiRLTrainer(digirl_preset("tiny_cpu", algo="coso"), "runs/web_coso")
      trainer.train(); print(trainer.evaluate()); trainer.close()
    """

    def __init__(self, config: DigiRLConfig, workdir: str | Path, *, resume: bool = False) -> None:
        from coso_jax.envs.web import browser_unavailable_reason

        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = ckpt.open_run_checkpointer(
            self.workdir, resume=resume, max_to_keep=config.keep_checkpoints,
            fingerprint=ckpt.config_fingerprint(_resume_fields(config)))
        reason = browser_unavailable_reason()
        if reason:
            self.checkpointer.close()
            raise RuntimeError(f"the DigiRL web backbone needs the browser env: {reason}")
        self.sft_dir = Path(config.sft_dir) if config.sft_dir else default_sft_dir(config, self.workdir)
        self.timer = metrics_lib.PhaseTimer()

        start = load_or_build_start(config, self.sft_dir)
        self.start_summary = start.summary
        self.tokenizer, self.encoder, self.prompt_fn = start.tokenizer, start.encoder, start.prompt_fn
        self.classifier = start.classifier
        self.skip_vocab = skip_token_mask(self.tokenizer, vocab_size=self.classifier.config.vocab_size)
        self.mask_token_id = int(self.tokenizer.unk_token_id)
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        if config.algo == "coso":
            # Every response-length bucket now (as the PPO trainer does), so no iteration stops to compile.
            causal_precompile(clf.logits_fn(self.classifier), config.max_new_tokens)

        self.policy_gd, params = nnx.split(start.policy, nnx.Param)
        hidden = start.policy.config.text.hidden_size
        critics = build_critics(config, len(self.tokenizer), hidden, config.seed + 11)
        self.critic_gd, critic_params = nnx.split(critics, nnx.Param)
        self.tx_actor = _optimizer(config.lr, config.max_grad_norm)
        self.tx_critic = _optimizer(config.critic_lr, config.max_grad_norm)
        self.params, self.opt_state = params, self.tx_actor.init(params)
        self.critic_params, self.critic_opt = critic_params, self.tx_critic.init(critic_params)
        self.classifier_tx = clf.make_optimizer(self.classifier, learning_rate=config.causal_lr)
        self.classifier_step = classifier_train_step()
        sample_kw = (("max_new_tokens", config.max_new_tokens), ("temperature", config.temperature),
                     ("top_p", config.top_p), ("eos_id", int(self.tokenizer.eos_token_id)),
                     ("pad_id", int(self.tokenizer.pad_token_id)))
        self.fns = _steps(self.policy_gd, self.critic_gd, self.tx_actor, self.tx_critic, self.image_token_id,
                          sample_kw, 1.0)
        self.key = jax.random.key(config.seed)
        self.np_rng = np.random.default_rng(config.seed + 104729)
        self.iteration = 0
        self.env_steps = 0

        self.replay = TransitionReplay(config.replay_capacity, self.encoder.prompt_len, config.max_new_tokens,
                                       config.image_size, seed=config.seed)
        self.action_replay = ActionReplay(config.causal_replay_capacity, config.max_new_tokens, seed=config.seed)
        self.action_replay.add(start.demo_tokens, start.demo_mask, start.demo_labels, start.demo_labels >= 0)
        for ep in start.offline:
            self._add_episode(ep)
        self.tracker = metrics_lib.SuccessTracker(config.success_window)
        self.pool = WebEnvPool(config.horizon, config.screen_scale, config.max_browsers)
        self._last = None
        self.writer = resume_and_open_writer(self, config.to_dict(), resume=resume)

    # ------------------------------------------------------------------------------------------
    def _next_key(self) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    def _add_episode(self, ep: EpisodeResult) -> None:
        tr = ep.transitions
        self.replay.add_trajectory({k: v for k, v in tr.items() if k in self.replay.data}, self.config.gamma)
        self.action_replay.add(tr["response_ids"], tr["response_mask"], tr["label"], tr["valid"] & (tr["label"] >= 0))

    def policy_act(self, prompts, images, tasks, envs):
        ids, mask = self.encoder.encode_text(prompts)
        out = jax.device_get(self.fns["sample"](self.params, ids, mask, images, self._next_key()))
        result = []
        for row in range(len(prompts)):
            n = int(out.mask[row].sum())
            text = self.tokenizer.decode([int(t) for t in out.tokens[row, :n]], skip_special_tokens=True)
            result.append((text, np.asarray(out.tokens[row]), np.asarray(out.mask[row])))
        return result

    # ------------------------------------------------------------------------------------------
    def rollout(self) -> list[EpisodeResult]:
        from coso_jax.envs.web import get_suite

        suite = get_suite(self.config.suite)
        tasks = self.config.task_names
        episodes = [(tasks[int(self.np_rng.integers(len(tasks)))], int(self.np_rng.integers(suite.num_train_seeds)))
                    for _ in range(self.config.trajectories_per_iteration)]
        return run_episodes(self.pool, episodes, self.config.num_envs, self.prompt_fn, self.config.image_size,
                            self.policy_act)

    def _epoch_batches(self, idx: np.ndarray, fields: Sequence[str], epochs: int, batch: int) -> dict[str, np.ndarray]:
        rows = idx[self.replay.rng.integers(0, idx.size, size=epochs * batch)]
        data = self.replay.batch(rows, fields)
        return {k: v.reshape((epochs, batch) + v.shape[1:]) for k, v in data.items()}

    def update_critics(self) -> dict[str, float]:
        c = self.config
        with self.timer.phase("critic"):
            batches = self._epoch_batches(self.replay.indices(), _CRITIC_FIELDS, c.critic_epochs, c.critic_batch)
            self.critic_params, self.critic_opt, m = self.fns["critic_update"](
                self.critic_params, self.critic_opt, self.params, batches)
            first = self.replay.first_steps()
            batches = self._epoch_batches(first, ("prompt_ids", "prompt_mask", "image", "traj_return"),
                                          c.trajectory_critic_epochs, c.critic_batch)
            self.critic_params, self.critic_opt, t = self.fns["trajectory_update"](
                self.critic_params, self.critic_opt, self.params, batches)
            m, t = jax.device_get((m, t))
        return {"critic/loss": float(m["loss"]), "critic/accuracy": float(m["accuracy"]),
                "trajectory_critic/loss": float(t["loss"]), "trajectory_critic/accuracy": float(t["accuracy"])}

    def critic_values(self, idx: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(advantages, trajectory-critic values) of replay rows `idx` (padded to `chunk` rows per call)."""
        fields = _CRITIC_FIELDS + ("reward",)
        advs, trajs = [], []
        for start in range(0, idx.size, chunk):
            part = idx[start:start + chunk]
            padded = np.concatenate([part, np.full(chunk - part.size, part[0])])
            a, v = jax.device_get(self.fns["critic_values"](self.critic_params, self.params,
                                                            self.replay.batch(padded, fields)))
            advs.append(np.asarray(a)[: part.size])
            trajs.append(np.asarray(v)[: part.size])
        if not advs:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(advs), np.concatenate(trajs)

    def filtered_indices(self) -> tuple[np.ndarray, dict[str, float]]:
        """Transitions of the top-`1 - filter_quantile` trajectories (by return - V_traj(first state))."""
        first = self.replay.first_steps()
        _, values = self.critic_values(first)
        keep = trajectory_filter(self.replay.data["traj_return"][first], values, self.config.filter_quantile)
        kept_ids = self.replay.data["traj_id"][first][keep]
        rows = np.flatnonzero(np.isin(self.replay.data["traj_id"][: self.replay.size], kept_ids))
        stats = {"filter/trajectories": float(first.size), "filter/kept_trajectories": float(keep.sum()),
                 "filter/kept_success_rate": float((self.replay.data["traj_return"][first][keep] > 0).mean())
                 if keep.any() else float("nan")}
        return rows, stats

    def update_classifier(self) -> dict[str, float]:
        c = self.config
        out_l, out_a = [], []
        for _ in range(c.causal_epochs):
            tokens, mask, labels = self.action_replay.sample(c.causal_batch)
            loss, acc = self.classifier_step(self.classifier, self.classifier_tx, tokens, mask, labels, self._next_key())
            out_l.append(float(loss))
            out_a.append(float(acc))
        return {"causal/loss": float(np.mean(out_l)), "causal/accuracy": float(np.mean(out_a))}

    def causal_weights(self, response_ids: np.ndarray, response_mask: np.ndarray, labels: np.ndarray,
                       valid: np.ndarray) -> np.ndarray:
        """CoSo token weights [n, N] (0 for invalid actions and skip tokens)."""
        ok = valid & (labels >= 0)
        mask = response_mask & ok[:, None]
        effects = counterfactual_effects(clf.logits_fn(self.classifier), response_ids, mask, np.where(ok, labels, 0),
                                         window=self.config.causal_window, mask_token_id=self.mask_token_id,
                                         skip_mask=self.skip_vocab, pad_invariant=True)
        skip = self.skip_vocab[np.clip(response_ids, 0, len(self.skip_vocab) - 1)]
        return np.asarray(causal_weights(effects, mask & ~skip), np.float32)

    def update_actor(self, rows: np.ndarray) -> dict[str, float]:
        c = self.config
        record: dict[str, float] = {}
        picks = rows[self.replay.rng.integers(0, rows.size, size=c.actor_epochs * c.actor_batch)]
        with self.timer.phase("advantage"):
            advantages, _ = self.critic_values(picks)
        data = self.replay.batch(picks, ("prompt_ids", "prompt_mask", "image", "response_ids", "response_mask",
                                         "valid", "label"))
        if c.algo == "coso":
            with self.timer.phase("causal"):
                record.update(self.update_classifier())
                weights = self.causal_weights(data["response_ids"], data["response_mask"], data["label"], data["valid"])
            sel = data["response_mask"] & data["valid"][:, None]
            if sel.any():
                record["causal/weight_mean"] = float(weights[sel].mean())
                record["causal/frac_above_0.8"] = float((weights[sel] > 0.8).mean())
            self._last = (data, weights)
        else:
            weights = data["response_mask"].astype(np.float32)
        batch = {"prompt_ids": data["prompt_ids"], "prompt_mask": data["prompt_mask"], "image": data["image"],
                 "response_ids": data["response_ids"], "response_mask": data["response_mask"],
                 "advantages": advantages.astype(np.float32), "entropy_weights": weights}
        batch = {k: v.reshape((c.actor_epochs, c.actor_batch) + v.shape[1:]) for k, v in batch.items()}
        alpha = np.float32(0.0 if c.algo == "none" else c.alpha)
        with self.timer.phase("actor") as phase:
            self.params, self.opt_state, m = phase.block(
                self.fns["actor_update"](self.params, self.opt_state, batch, alpha))
        m = jax.device_get(m)
        record.update({f"actor/{k}": float(v) for k, v in m.items()})
        record["actor/positive_advantage_rate"] = float((advantages > 0).mean())
        return record

    # ------------------------------------------------------------------------------------------
    def stage(self, iteration: int | None = None) -> str:
        it = self.iteration if iteration is None else iteration
        return "offline" if it < self.config.offline_iterations else "online"

    def run_iteration(self) -> dict[str, Any]:
        c = self.config
        record: dict[str, Any] = {"stage": self.stage()}
        if self.stage() == "online":
            with self.timer.phase("rollout"):
                episodes = self.rollout()
            for ep in episodes:
                self._add_episode(ep)
                self.tracker.add_episode(float(ep.success), ep.length)
                self.env_steps += ep.length
            record["iteration_success_rate"] = float(np.mean([ep.success for ep in episodes]))
            record["episode_length"] = float(np.mean([ep.length for ep in episodes]))
            record["invalid_action_rate"] = float(1.0 - np.mean(np.concatenate([ep.transitions["valid"]
                                                                                 for ep in episodes])))
            do_critic = do_actor = True
        else:
            do_critic = self.iteration < c.offline_critic_iterations
            do_actor = self.iteration < c.offline_actor_iterations
        if do_critic:
            record.update(self.update_critics())
        if do_actor:
            with self.timer.phase("filter"):
                rows, stats = self.filtered_indices()
            record.update(stats)
            record.update(self.update_actor(rows))
        self.iteration += 1
        if len(self.tracker):  # no episodes yet in the offline stage: no success metrics (not NaNs)
            record.update(self.tracker.summary())
            record["success_rate"] = self.tracker.success_rate
        record["replay_size"] = self.replay.size
        record.update(self.timer.pop())
        return record

    def train(self) -> list[dict[str, Any]]:
        c = self.config
        history = []
        bar = metrics_lib.progress_bar(c.num_iterations, desc=f"{c.env}/digirl/{c.algo}", disable=not c.progress,
                                       initial=self.iteration)
        try:
            while self.iteration < c.num_iterations:
                record = self.run_iteration()
                self.writer.write(self.iteration, record, env_steps=self.env_steps)
                history.append(record)
                bar.update(1, {"stage": record["stage"], "success": record.get("success_rate", float("nan"))})
                last = self.iteration == c.num_iterations
                if self.iteration % c.checkpoint_every == 0 or last:
                    self.save()
                if c.algo == "coso" and self._last is not None and (self.iteration % c.heatmap_every == 0 or last):
                    self.write_heatmap()
                if self.stage() == "online" and (self.iteration % c.heatmap_every == 0 or last):
                    self.write_plots()
        finally:
            bar.close()
            self.checkpointer.wait()
            self.writer.flush()
        return history

    def evaluate(self, num_episodes: int | None = None) -> dict[str, Any]:
        """Success on the suite's fixed test episodes (the first `num_episodes`), sampling at the
        training temperature with its own RNG (the training RNG is untouched)."""
        from coso_jax.envs.web import get_suite

        n = self.config.eval_episodes if num_episodes is None else num_episodes
        tasks = set(self.config.task_names)
        episodes = [e for e in get_suite(self.config.suite).test_episodes() if e[0] in tasks][:n]
        saved = self.key
        self.key = jax.random.fold_in(self.key, 10_000_019)
        try:
            results = run_episodes(self.pool, episodes, self.config.num_envs, self.prompt_fn, self.config.image_size,
                                   self.policy_act)
        finally:
            self.key = saved
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
    def write_plots(self) -> None:
        metrics_lib.plot_curves(self.workdir / "metrics.jsonl", self.workdir / "success_rate.png", x="env_steps",
                                y="success_rate", title=f"{self.config.env} / DigiRL / {self.config.algo}")

    def write_heatmap(self, rows: int = 6) -> None:
        from coso_jax.causal.render import render_token_heatmap

        data, weights = self._last
        sel = np.flatnonzero(data["valid"])[:rows]
        if sel.size == 0:
            return
        token_rows, weight_rows = [], []
        for r in sel:
            n = int(data["response_mask"][r].sum())
            token_rows.append([self.tokenizer.decode([int(t)]) for t in data["response_ids"][r, :n]])
            weight_rows.append(weights[r, :n])
        render_token_heatmap(token_rows, weight_rows, self.workdir / f"heatmap_{self.iteration:05d}.png",
                             title=f"{self.config.env}: CoSo causal weights, iteration {self.iteration}")

    def _items(self) -> dict[str, Any]:
        return {
            "params": self.params, "opt_state": self.opt_state,
            "critic": self.critic_params, "critic_opt": self.critic_opt,
            "classifier": nnx.state(self.classifier), "classifier_opt": nnx.state(self.classifier_tx),
            "rng": {"key": self.key}, "replay": self.replay.arrays(), "action_replay": self.action_replay.arrays(),
        }

    def save(self) -> None:
        meta = {"iteration": self.iteration, "env_steps": self.env_steps, "tracker": self.tracker.state_dict(),
                "replay": self.replay.meta(), "action_replay": self.action_replay.meta(),
                "np_rng": self.np_rng.bit_generator.state}
        self.checkpointer.save(self.iteration, self._items(), meta, force=True)

    def _restore(self) -> None:
        items, meta = self.checkpointer.restore(None, abstract_items=self._items())
        # Restored arrays are committed to a device; fresh ones are not. jit keys its cache on that, so
        # rebuild them uncommitted: a resumed run then reuses the steps already compiled in-process.
        fresh = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
        self.params, self.opt_state = fresh(items["params"]), fresh(items["opt_state"])
        self.critic_params, self.critic_opt = fresh(items["critic"]), fresh(items["critic_opt"])
        nnx.update(self.classifier, fresh(items["classifier"]))
        nnx.update(self.classifier_tx, fresh(items["classifier_opt"]))
        self.key = jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(items["rng"]["key"]))))
        self.replay.load(jax.device_get(items["replay"]), meta["replay"])
        self.action_replay.load(jax.device_get(items["action_replay"]), meta["action_replay"])
        self.tracker.load_state_dict(meta["tracker"])
        self.np_rng.bit_generator.state = meta["np_rng"]
        self.iteration, self.env_steps = int(meta["iteration"]), int(meta["env_steps"])
        log.info("resumed from iteration %d (%d env steps)", self.iteration, self.env_steps)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            self.checkpointer.close()
            self.writer.close()


def _resume_fields(config: DigiRLConfig) -> dict[str, Any]:
    ignore = {"progress", "checkpoint_every", "keep_checkpoints", "heatmap_every", "online_iterations",
              "eval_episodes"}
    return {k: v for k, v in config.to_dict().items() if k not in ignore}


def critic_timing(trainer: DigiRLTrainer, trunk: str, repeats: int = 3) -> dict[str, float]:
    """Seconds per critic update (`critic_epochs` steps of `critic_batch`) and per advantage pass
    (64 transitions) for a critic of `trunk` ("separate" / "shared") on `trainer`'s replay and policy.
    The first call (compilation) is reported separately."""
    c = trainer.config.replace(critic_trunk=trunk)
    critics = build_critics(c, len(trainer.tokenizer), nnx.merge(trainer.policy_gd, trainer.params).config.text.hidden_size,
                            c.seed + 11)
    gd, params = nnx.split(critics, nnx.Param)
    fns = _steps(trainer.policy_gd, gd, trainer.tx_actor, trainer.tx_critic, trainer.image_token_id,
                 (("max_new_tokens", c.max_new_tokens), ("temperature", c.temperature), ("top_p", c.top_p),
                  ("eos_id", int(trainer.tokenizer.eos_token_id)), ("pad_id", int(trainer.tokenizer.pad_token_id))),
                 1.0)
    opt = trainer.tx_critic.init(params)
    out: dict[str, float] = {"critic_params": float(sum(x.size for x in jax.tree.leaves(params)))}
    times, adv_times = [], []
    idx64 = trainer.replay.sample(64)
    for i in range(repeats + 1):
        batches = trainer._epoch_batches(trainer.replay.indices(), _CRITIC_FIELDS, c.critic_epochs, c.critic_batch)
        t0 = time.perf_counter()
        params, opt, m = fns["critic_update"](params, opt, trainer.params, batches)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(fns["critic_values"](params, trainer.params,
                                                   trainer.replay.batch(idx64, _CRITIC_FIELDS + ("reward",))))
        adv_times.append(time.perf_counter() - t0)
    out.update(first_update_s=times[0], update_s=float(np.median(times[1:])), first_advantage_s=adv_times[0],
               advantage_64_s=float(np.median(adv_times[1:])))
    return out
