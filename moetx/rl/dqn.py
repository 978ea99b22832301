"""A DQN agent in JAX whose loss is a program of the loss language (`moetx.rl.losses`).

One training run (`train`): `num_envs` gymnax environments stepped together (vmapped, with
gymnax's auto-reset), epsilon-greedy actions from the online Q-network (epsilon decays linearly
from `eps_start` to `eps_end` over `eps_decay_steps` environment steps), every transition written
to a circular replay buffer, and after `learning_starts` steps one Adam update per iteration on a
uniformly sampled batch; the target network copies the online one every `target_period`
iterations. The whole loop runs in `lax.scan` chunks of `chunk_iterations` iterations, jitted
once per (environment, config): the loss program is an argument (int32 arrays interpreted by
`losses.interpret`), so every program of a search reuses the same compiled agent.

The bootstrapping input of a loss is `discount = gamma * (1 - terminated)`: a truncated episode
(the time limit) still bootstraps from the true final observation (gymnax's
`info['final_observation']`), a terminated one does not. The reported return is the mean
undiscounted return of the last `last_episodes` finished training episodes, as in the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moetx.rl import envs, losses


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """Hyperparameters of a run; the defaults learn CartPole-v1 in about 60k env steps.

    Attributes:
      total_env_steps: the budget (all environments together).
      num_envs: environments stepped in parallel; one update per `num_envs` env steps.
      buffer_size: replay capacity in transitions.
      batch_size: transitions per update.
      learning_rate: Adam's step size.
      gamma: the discount.
      target_period: iterations between target-network copies.
      eps_start, eps_end, eps_decay_steps: the linear exploration schedule (env steps).
      learning_starts: env steps before the first update.
      hidden: widths of the Q-network's hidden layers (ReLU MLP over the flattened observation).
      max_grad_norm: gradient clipping before Adam (a searched loss can have large gradients).
      chunk_iterations: iterations per jitted `lax.scan` chunk (the returns curve's resolution).
      last_episodes: finished episodes averaged for the reported return.
    """

    total_env_steps: int = 60_000
    num_envs: int = 4
    buffer_size: int = 20_000
    batch_size: int = 64
    learning_rate: float = 5e-4
    gamma: float = 0.99
    target_period: int = 125
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 10_000
    learning_starts: int = 1_000
    hidden: tuple[int, ...] = (64, 64)
    max_grad_norm: float = 10.0
    chunk_iterations: int = 500
    last_episodes: int = 50

    def __post_init__(self):
        if self.total_env_steps < self.num_envs or self.num_envs < 1:
            raise ValueError(f"total_env_steps ({self.total_env_steps}) must be at least "
                             f"num_envs ({self.num_envs}) >= 1.")
        if self.buffer_size < self.batch_size:
            raise ValueError(f"buffer_size {self.buffer_size} < batch_size {self.batch_size}.")
        object.__setattr__(self, "hidden", tuple(self.hidden))

    @property
    def iterations(self) -> int:
        return self.total_env_steps // self.num_envs


class QNetwork(nn.Module):
    """Q(s, .): <float32>[B, *obs_shape] -> <float32>[B, num_actions]."""

    num_actions: int
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = obs.reshape(obs.shape[0], -1).astype(jnp.float32)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_actions)(x)


@dataclasses.dataclass
class DQNResult:
    """What a run gave: the mean return of the last episodes, normalised, and the curve."""

    env_name: str
    mean_return: float
    normalized_return: float
    episodes: int
    env_steps: int
    seconds: float
    curve: list[tuple[int, float]]  # (env steps, mean return of the last episodes) per chunk


@functools.lru_cache(maxsize=16)
def _agent(env_name: str, config: DQNConfig):
    """(init(rng) -> state, chunk(state, program) -> state), jitted, for one env and config."""
    env, env_params = envs.make(env_name)
    num_actions = env.action_space(env_params).n
    obs_shape = env.observation_space(env_params).shape
    net = QNetwork(num_actions, config.hidden)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adam(config.learning_rate))
    e, cap, k = config.num_envs, config.buffer_size, config.last_episodes
    step_env = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def init(rng):
        r_net, r_env, rng = jax.random.split(rng, 3)
        params = net.init(r_net, jnp.zeros((1, *obs_shape), jnp.float32))
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(r_env, e), env_params)
        buffer = {"obs": jnp.zeros((cap, *obs_shape), jnp.float32),
                  "action": jnp.zeros((cap,), jnp.int32),
                  "reward": jnp.zeros((cap,), jnp.float32),
                  "discount": jnp.zeros((cap,), jnp.float32),
                  "next_obs": jnp.zeros((cap, *obs_shape), jnp.float32)}
        return {"params": params, "target": params, "opt": tx.init(params), "buffer": buffer,
                "obs": obs.astype(jnp.float32), "env_state": env_state, "rng": rng,
                "iteration": jnp.zeros((), jnp.int32), "ep_return": jnp.zeros((e,)),
                "recent": jnp.zeros((k,)), "episodes": jnp.zeros((), jnp.int32),
                "loss": jnp.zeros(())}

    def loss_fn(params, target, batch, program):
        q_tm1 = net.apply(params, batch["obs"])
        q_t = net.apply(params, batch["next_obs"])
        qtarg_t = net.apply(target, batch["next_obs"])
        per_transition = losses.interpret(program, {
            "q_tm1": q_tm1, "a_tm1": batch["action"], "r_t": batch["reward"],
            "discount": batch["discount"], "qtarg_t": jax.lax.stop_gradient(qtarg_t),
            "q_t": q_t})
        return jnp.mean(per_transition)

    def iteration(st, program):
        rng, k_act, k_eps, k_env, k_sample = jax.random.split(st["rng"], 5)
        steps = st["iteration"] * e
        frac = jnp.clip(steps / config.eps_decay_steps, 0.0, 1.0)
        eps = config.eps_start + frac * (config.eps_end - config.eps_start)
        # Shape: q [E, A].
        q = net.apply(st["params"], st["obs"])
        explore = jax.random.uniform(k_eps, (e,)) < eps
        action = jnp.where(explore, jax.random.randint(k_act, (e,), 0, num_actions),
                           jnp.argmax(q, -1)).astype(jnp.int32)
        obs, env_state, reward, terminated, truncated, info = step_env(
            jax.random.split(k_env, e), st["env_state"], action, env_params)
        slots = (steps + jnp.arange(e)) % cap
        transition = {"obs": st["obs"], "action": action, "reward": reward.astype(jnp.float32),
                      "discount": config.gamma * (1.0 - terminated.astype(jnp.float32)),
                      "next_obs": info["final_observation"].astype(jnp.float32)}
        buffer = {n: st["buffer"][n].at[slots].set(transition[n]) for n in transition}
        # Finished episodes go into a ring of the last k returns, in env order.
        done = jnp.logical_or(terminated, truncated)
        ep_return = st["ep_return"] + reward
        ring = (st["episodes"] + jnp.cumsum(done) - 1) % k
        recent = st["recent"].at[jnp.where(done, ring, k)].set(ep_return, mode="drop")
        episodes = st["episodes"] + jnp.sum(done)

        def update(operand):
            params, opt = operand
            size = jnp.minimum(steps + e, cap)
            idx = jax.random.randint(k_sample, (config.batch_size,), 0, size)
            batch = {n: v[idx] for n, v in buffer.items()}
            loss, grads = jax.value_and_grad(loss_fn)(params, st["target"], batch, program)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, loss

        params, opt, loss = jax.lax.cond(
            steps + e >= config.learning_starts, update,
            lambda operand: (*operand, st["loss"]), (st["params"], st["opt"]))
        copy = (st["iteration"] + 1) % config.target_period == 0
        target = jax.tree.map(lambda p, t: jnp.where(copy, p, t), params, st["target"])
        return {"params": params, "target": target, "opt": opt, "buffer": buffer,
                "obs": obs.astype(jnp.float32), "env_state": env_state, "rng": rng,
                "iteration": st["iteration"] + 1, "ep_return": jnp.where(done, 0.0, ep_return),
                "recent": recent, "episodes": episodes, "loss": loss}

    @functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
    def chunk(st, program, length):
        st, _ = jax.lax.scan(lambda s, _: (iteration(s, program), None), st, None,
                             length=length)
        return st

    return jax.jit(init), chunk


def mean_recent_return(state: dict[str, Any], last_episodes: int) -> float:
    """Mean return of the last `last_episodes` finished episodes (NaN before the first)."""
    n = int(state["episodes"])
    if n == 0:
        return float("nan")
    recent = np.asarray(state["recent"])[:min(n, last_episodes)]
    return float(np.mean(recent))


def train(env_name: str, loss: losses.LossProgram | str = "dqn",
          config: DQNConfig = DQNConfig(), seed: int = 0) -> DQNResult:
    """Trains a DQN agent on gymnax `env_name` with `loss` (a program or a reference name)."""
    prog = losses.program(loss) if isinstance(loss, str) else loss
    program = {n: jnp.asarray(v) for n, v in losses.program_arrays(prog).items()}
    init, chunk = _agent(env_name, config)
    start = time.time()
    state = init(jax.random.PRNGKey(seed))
    curve, done_iters = [], 0
    while done_iters < config.iterations:
        length = min(config.chunk_iterations, config.iterations - done_iters)
        state = chunk(state, program, length)
        done_iters += length
        curve.append((done_iters * config.num_envs,
                      mean_recent_return(state, config.last_episodes)))
    mean_return = curve[-1][1]
    if np.isnan(mean_return):  # no finished episode: the running ones are all we know
        mean_return = float(np.mean(np.asarray(state["ep_return"])))
    if not np.isfinite(float(state["loss"])):  # the loss diverged: the run has no score
        mean_return = float("nan")
    normalized = envs.normalized_return(env_name, mean_return) if np.isfinite(mean_return) \
        else float("nan")
    return DQNResult(env_name, mean_return, normalized, int(state["episodes"]),
                     config.iterations * config.num_envs, round(time.time() - start, 3), curve)
