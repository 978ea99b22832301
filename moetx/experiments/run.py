"""`python -m moetx.experiments.run`: run (or resume) an experiment: named arms trained over
seeds at an equal budget of training FLOPs, compared by their eval-loss curves.

    python -m moetx.experiments.run --gin_file=experiments/primer.gin
    python -m moetx.experiments.run --gin_file=experiments/primer.gin \\
      --gin.OUTPUT_DIR="'runs/experiments/primer_smoke'" --gin.BUDGET=2e11 --gin.SEEDS="(0,)"

The gin file binds `experiment.*` (see `moetx.experiments.experiment.Experiment`); the same
command started again after a kill goes on where the experiment stopped. Outputs (in
OUTPUT_DIR): plan.json, curves.json, summary.json, summary.md, loss_vs_flops.png and
loss_vs_seconds.png. A command line (it counts as `moetx.cli` in the layering); the library is
`moetx.experiments.runner.run`.
"""

import sys

from moetx.cli import flags


def load():
    """The library function, imported only after the flags are parsed (a fast --help)."""
    from moetx.experiments import runner

    return runner.run


main = flags.gin_command(load, "python -m moetx.experiments.run", __doc__)


if __name__ == "__main__":
    sys.exit(main())
