"""`python -m moetx.cli.eval` (`moetx-eval`): evaluate a checkpoint with teacher forcing.

    python -m moetx.cli.eval --gin_file=models/decoder_small.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"

Writes `<OUTPUT_DIR>/eval_results.json` and TensorBoard scalars under `<OUTPUT_DIR>/eval`. The
library function is `moetx.trainer.eval.evaluate` (gin name `evaluate`).
"""

import sys

from moetx.cli import flags


def load():
    """The library function, imported only after the flags are parsed (a fast --help)."""
    from moetx.trainer import eval as eval_lib

    return eval_lib.evaluate


main = flags.gin_command(load, "moetx-eval", __doc__)


if __name__ == "__main__":
    sys.exit(main())
