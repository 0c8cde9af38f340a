"""Env steps per second of the gym_cards games, rendering included, on one CPU core.

For each game: a single env (gym.make, with its TimeLimit and checker wrappers) stepped with
uniformly random actions and reset when an episode ends, and gymnasium's SyncVectorEnv over
`--num_envs` envs (steps/s counts env steps, i.e. vector steps x num_envs). Caches (card images,
text strips) are warmed before timing, as they are after the first few steps of training.

  python -m benchmarks.envs [--steps 4000] [--num_envs 8] [--images docs/images]

Writes benchmarks/results/envs_cpu.json; with --images, also one sample observation per game
(<dir>/<game>.png, mid-episode states reached by the oracle) for the docs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import gymnasium as gym
import numpy as np

import coso_jax.envs  # noqa: F401  (registers the envs)
from benchmarks._common import write_results

GAMES = ("NumberLine", "EZPoints", "Points24", "Blackjack")


def single_env_steps_per_s(name: str, steps: int, seed: int = 0) -> float:
    env = gym.make(f"coso_jax/{name}-v0")
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    n = env.action_space.n
    actions = rng.integers(n, size=steps)
    start = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(int(a))
        if term or trunc:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def vector_env_steps_per_s(name: str, steps: int, num_envs: int, seed: int = 0) -> float:
    vec = gym.vector.SyncVectorEnv([lambda: gym.make(f"coso_jax/{name}-v0") for _ in range(num_envs)])
    vec.reset(seed=seed)
    vec.action_space.seed(seed)
    iters = max(steps // num_envs, 1)
    actions = [vec.action_space.sample() for _ in range(iters)]
    start = time.perf_counter()
    for a in actions:
        vec.step(a)
    elapsed = time.perf_counter() - start
    vec.close()
    return iters * num_envs / elapsed


def write_sample_images(out_dir: str) -> None:
    """Saves one mid-episode observation per game as <out_dir>/<game>.png (seeded, oracle moves)."""
    from PIL import Image

    from coso_jax.envs.gym_cards.oracle import oracle_action

    os.makedirs(out_dir, exist_ok=True)
    plans = {"NumberLine": (0, 1), "EZPoints": (4, 2), "Points24": (6, 5), "Blackjack": (4, 1)}
    for name, (seed, moves) in plans.items():
        env = gym.make(f"coso_jax/{name}-v0")
        obs, info = env.reset(seed=seed)
        for _ in range(moves):
            nxt, _, term, trunc, nxt_info = env.step(oracle_action(name, info))
            if term or trunc:
                break
            obs, info = nxt, nxt_info
        path = os.path.join(out_dir, f"{name.lower()}.png")
        Image.fromarray(obs).save(path, optimize=True)
        print(f"wrote {path} ({os.path.getsize(path)} bytes): {info}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="env steps per timed run")
    parser.add_argument("--num_envs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", default=None, help="also write sample observations to this dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also COSO_DEBUG=1)")
    args = parser.parse_args()
    from coso_jax.rl.run import exit_on_user_error

    exit_on_user_error(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> None:
    if args.images:
        write_sample_images(args.images)
    results = {}
    for name in GAMES:
        # warm the caches (card faces, text strips): training reaches this state after a few episodes
        single_env_steps_per_s(name, 2000, seed=99)
        single = [single_env_steps_per_s(name, args.steps, seed=r) for r in range(args.repeats)]
        vector = [vector_env_steps_per_s(name, args.steps, args.num_envs, seed=r) for r in range(args.repeats)]
        results[name] = {
            "single_env_steps_per_s": round(statistics.median(single), 1),
            "single_env_runs": [round(x, 1) for x in single],
            "sync_vector_env_steps_per_s": round(statistics.median(vector), 1),
            "sync_vector_env_runs": [round(x, 1) for x in vector],
        }
        print(f"{name:10s} single {results[name]['single_env_steps_per_s']:9.1f} steps/s   "
              f"SyncVectorEnv({args.num_envs}) {results[name]['sync_vector_env_steps_per_s']:9.1f} steps/s")
    write_results("envs_cpu", {
        "what": "gym_cards env steps/s incl. rendering; random actions; one process",
        "steps_per_run": args.steps,
        "num_envs_vector": args.num_envs,
        "repeats": args.repeats,
        "load_avg_1min": os.getloadavg()[0],
        "target": "NumberLine >= 1000 steps/s on one core",
        "results": results,
    })


if __name__ == "__main__":
    main()
