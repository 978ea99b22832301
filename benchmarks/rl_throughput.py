#!/usr/bin/env python
"""RL throughput: environment steps per second of the jitted, vectorised DQN agent
(`moetx.rl.dqn`) and of bare gymnax CartPole, against a plain Python `gymnasium` CartPole loop;
and trials per hour of the Evolving RL search (`search/rl_proxy.gin` or `rl_tiny.gin`).

Rows:
- `gymnasium_python`: `gymnasium.make('CartPole-v1')`, random actions, one env, a Python loop.
- `gymnax_random_<E>`: gymnax CartPole, random actions, E envs vmapped, `lax.scan` under jit.
- `dqn_agent_<E>`: the whole DQN iteration (act, step, store, one Adam update on a batch of 64,
  the target copy) with E envs; env steps/s after compilation (a second run of the same
  jitted agent), and the compile-inclusive time of the first run.
- `search`: with `--search_trials N`, the search of `--search_gin` run for N trials in this
  process (num_workers 0), trials per hour including compilation.

Prints one JSON line (`rl_throughput`); progress goes to stderr.

  nice -n 10 .venv/bin/python benchmarks/rl_throughput.py --search_trials 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import reserve_stdout_for_json  # noqa: E402


def log(msg: str) -> None:
    print(f"[rl_throughput] {msg}", file=sys.stderr, flush=True)


def gymnasium_rate(steps: int) -> float | None:
    try:
        import gymnasium
    except ImportError:
        return None
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    env.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def gymnax_rate(num_envs: int, steps: int) -> float:
    import jax

    from moetx.rl import envs

    env, params = envs.make("CartPole-v1")
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    @jax.jit
    def run(key):
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs),
                                                            params)

        def body(carry, _):
            state, key = carry
            key, k_act, k_step = jax.random.split(key, 3)
            action = jax.random.randint(k_act, (num_envs,), 0, 2)
            _, state, reward, _, _, _ = step(jax.random.split(k_step, num_envs), state,
                                             action, params)
            return (state, key), reward.sum()

        _, rewards = jax.lax.scan(body, (state, key), None, length=steps // num_envs)
        return rewards.sum()

    run(jax.random.PRNGKey(0)).block_until_ready()
    start = time.perf_counter()
    run(jax.random.PRNGKey(1)).block_until_ready()
    return (steps // num_envs) * num_envs / (time.perf_counter() - start)


def agent_rate(num_envs: int, steps: int) -> dict:
    from moetx.rl import dqn

    config = dqn.DQNConfig(total_env_steps=steps, num_envs=num_envs, learning_starts=0,
                           chunk_iterations=steps // num_envs)
    start = time.perf_counter()
    dqn.train("CartPole-v1", "dqn", config, seed=0)
    first = time.perf_counter() - start
    result = dqn.train("CartPole-v1", "dqn", config, seed=1)
    return {"env_steps_per_sec": round(steps / result.seconds, 1),
            "updates_per_sec": round(steps / num_envs / result.seconds, 1),
            "first_run_seconds_with_compile": round(first, 2)}


def search_rate(gin_file: str, trials: int) -> dict:
    import gin

    from moetx.search import evolution
    from moetx.util import gin_files

    with tempfile.TemporaryDirectory() as d:
        gin.clear_config()
        gin_files.parse_files([gin_file], [f"SEARCH_DIR = {d!r}", f"NUM_TRIALS = {trials}",
                                           "NUM_WORKERS = 0", "search.verbose = False",
                                           "search.plot = False"])
        start = time.perf_counter()
        summary = evolution.Search().run()
        seconds = time.perf_counter() - start
    return {"gin_file": gin_file, "trials": trials, "seconds": round(seconds, 1),
            "trials_per_hour": round(3600 * trials / seconds, 1), "counts": summary["counts"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20_000, help="env steps per agent row")
    p.add_argument("--search_trials", type=int, default=0)
    p.add_argument("--search_gin", default="search/rl_tiny.gin")
    args = p.parse_args(argv)
    out = reserve_stdout_for_json()
    import jax

    row = {"benchmark": "rl_throughput", "devices": jax.device_count(),
           "cpus": os.cpu_count(), "env": "CartPole-v1"}
    log("gymnasium")
    rate = gymnasium_rate(args.steps)
    row["gymnasium_python_env_steps_per_sec"] = None if rate is None else round(rate, 1)
    for e in (1, 16, 256):
        log(f"gymnax random policy, {e} envs")
        row[f"gymnax_random_{e}_env_steps_per_sec"] = round(gymnax_rate(e, 50 * args.steps), 1)
    for e in (4, 16):
        log(f"dqn agent, {e} envs")
        row[f"dqn_agent_{e}"] = agent_rate(e, args.steps)
    if args.search_trials:
        log(f"search {args.search_gin}, {args.search_trials} trials")
        row["search"] = search_rate(args.search_gin, args.search_trials)
    out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
