"""`python -m moetx.cli.train` (`moetx-train`): train a gin-configured model.

    python -m moetx.cli.train \\
      --gin_file=models/decoder_small.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}" --gin.TRAIN_STEPS=600

Resumes from the latest checkpoint in MODEL_DIR when there is one. The library function is
`moetx.trainer.train.train` (gin name `train`).
"""

import sys

from moetx.cli import flags
from moetx.trainer import train

main = flags.gin_command(train.train)


if __name__ == "__main__":
    sys.exit(main())
