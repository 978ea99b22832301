"""`python -m moetx.cli.strata`: the STraTA pipeline (task augmentation and self-training).

    python -m moetx.cli.strata --gin_file=models/t5_demo.gin --gin_file=runs/strata.gin \\
      --gin.OUTPUT_DIR="'runs/strata_spam'" \\
      --gin.PRETRAINED_CHECKPOINT="'runs/demo_t5/checkpoint_400'" --gin.TARGET_TASK="'spam'"

The library function is `moetx.pipelines.strata.run.run_pipeline`.
"""

import sys

from moetx.cli import flags
from moetx.pipelines.strata import run as strata_run

main = flags.gin_command(strata_run.run_pipeline)


if __name__ == "__main__":
    sys.exit(main())
