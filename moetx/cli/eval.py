"""`python -m moetx.cli.eval` (`moetx-eval`): evaluate a checkpoint: teacher-forced metrics and,
as T5X's eval, the task's metric functions through a seqio.Evaluator (`--gin.evaluate.seqio_eval`
forces it on or off; by default it runs when the model and the task support it).

    python -m moetx.cli.eval --gin_file=models/decoder_small.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"

Writes `<OUTPUT_DIR>/eval_results.json`, TensorBoard scalars under `<OUTPUT_DIR>/eval` and the
task metrics under `<OUTPUT_DIR>/inference_eval/<task>` (`eval/<metric>`, as T5X). The
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
