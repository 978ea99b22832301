"""`python -m moetx.cli.flan_evaluate`: zero-/few-shot FLAN evaluation of a checkpoint.

    python -m moetx.cli.flan_evaluate --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_eval.gin --gin.CHECKPOINT_DIR="'runs/flan_no_tc'" \\
      --gin.MIXTURE_OR_TASK_NAME="'flan_offline_text_classification_eval'"

The library function is `moetx.pipelines.flan_eval.evaluate_flan`.
"""

import sys

from moetx.cli import flags


def load():
    """The library function, imported only after the flags are parsed (a fast --help)."""
    from moetx.pipelines import flan_eval

    return flan_eval.evaluate_flan


main = flags.gin_command(load, "moetx-flan-evaluate", __doc__)


if __name__ == "__main__":
    sys.exit(main())
