"""`python -m moetx.cli.strata`: the STraTA pipeline (task augmentation and self-training).

    python -m moetx.cli.strata --gin_file=models/t5_demo.gin --gin_file=runs/strata.gin \\
      --gin.OUTPUT_DIR="'runs/strata_spam'" \\
      --gin.PRETRAINED_CHECKPOINT="'runs/demo_t5/checkpoint_400'" --gin.TARGET_TASK="'spam'"

The library function is `moetx.pipelines.strata.run.run_pipeline`.
"""

import sys

from moetx.cli import flags


def load():
    """The library function, imported only after the flags are parsed (a fast --help)."""
    from moetx.pipelines.strata import run as strata_run

    return strata_run.run_pipeline


main = flags.gin_command(load, "moetx-strata", __doc__)


if __name__ == "__main__":
    sys.exit(main())
