"""JAX-native environments (gymnax) and the normalised return of Evolving RL.

The normalised return of a training run on an environment is the mean undiscounted return of its
last episodes (the last 50, as the reference's `custom_dqn` keeps them) mapped onto [0, 1] by the
environment's return range: (clip(R, R_min, R_max) - R_min) / (R_max - R_min). R_min is about a
random policy's return and R_max the best return reachable (or a good agent's return where the
maximum is unbounded), so 0 is "learned nothing" and 1 is "solved"; a search's fitness sums these
over its training environments, so each environment weighs the same whatever its reward scale.
The ranges below are ours (the paper's environments are not all in gymnax): the classic-control
ones are the episode-length limits, the MinAtar maxima are round numbers above the returns DQN
reaches in gymnax's own benchmarks.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """A gymnax environment and its return range for normalisation."""

    name: str
    return_min: float
    return_max: float


ENVS = {s.name: s for s in (
    EnvSpec("CartPole-v1", 0.0, 500.0),          # +1 per step, 500 steps at most
    EnvSpec("Acrobot-v1", -500.0, 0.0),          # -1 per step until the goal, 500 at most
    EnvSpec("MountainCar-v0", -200.0, -100.0),   # -1 per step, 200 at most; ~-100 is good
    EnvSpec("Breakout-MinAtar", 0.0, 30.0),
    EnvSpec("SpaceInvaders-MinAtar", 0.0, 200.0),
    EnvSpec("Asterix-MinAtar", 0.0, 30.0),
)}


def spec(name: str) -> EnvSpec:
    if name not in ENVS:
        raise KeyError(f"no return range for environment {name!r}; known: {', '.join(ENVS)}.")
    return ENVS[name]


def make(name: str):
    """(env, env_params) of a gymnax environment."""
    import gymnax

    spec(name)
    return gymnax.make(name)


def normalized_return(name: str, mean_return: float) -> float:
    """(clip(R, R_min, R_max) - R_min) / (R_max - R_min) for environment `name`."""
    s = spec(name)
    r = float(np.clip(mean_return, s.return_min, s.return_max))
    return (r - s.return_min) / (s.return_max - s.return_min)
