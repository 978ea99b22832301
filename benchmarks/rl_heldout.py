"""Held-out evaluation of RL losses: DQN, DQNReg, DQNClipped (and any `name=program` given)
trained on one environment at the same budget over seeds; prints one JSON line
(name -> returns per seed, mean, std, normalised mean; plus the wall time).

    python benchmarks/rl_heldout.py SpaceInvaders-MinAtar --steps 250000
    python benchmarks/rl_heldout.py Asterix-MinAtar --steps 100000 'mine=v0 = ...'
"""

import argparse
import json
import time

import moetx.cli  # noqa: F401  (the process preamble: XLA CPU flags)
from moetx.rl import dqn
from moetx.search import rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env")
    parser.add_argument("programs", nargs="*", help="extra losses as name=program text")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    programs = {n: n for n in ("dqn", "dqn_reg", "dqn_clipped")}
    programs.update(dict(p.split("=", 1) for p in args.programs))
    config = dqn.DQNConfig(total_env_steps=args.steps, num_envs=8, buffer_size=50_000,
                           hidden=(128, 128), eps_decay_steps=50_000, target_period=250)
    start = time.time()
    out = rl.compare_losses(args.env, programs, seeds=tuple(args.seeds), config=config)
    out["_seconds"] = time.time() - start
    out["_env"], out["_steps"] = args.env, args.steps
    print(json.dumps(out))


if __name__ == "__main__":
    main()
