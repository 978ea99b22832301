"""`python -m moetx.cli.train` (`moetx-train`): train a gin-configured model.

    python -m moetx.cli.train \\
      --gin_file=models/decoder_small.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}" --gin.TRAIN_STEPS=600

Resumes from the latest checkpoint in MODEL_DIR when there is one. The library function is
`moetx.trainer.train.train` (gin name `train`).

Exit status: 0 when done, 2 for a configuration or input error (one `moetx: error:` line), 75
after a SIGTERM or SIGINT (a checkpoint of the step in progress is saved; run the same command
again to resume), 69 when another process of a multi-process run was lost (restart all of
them to resume from the last checkpoint). On several processes, start one per host with
--coordinator_address=H:P --process_count=N --process_index=I, or with --multiprocess alone on
a cluster JAX detects (SLURM, Open MPI, Cloud TPU, GKE); see `moetx.trainer.preemption` for
how the processes stop together and what happens when one dies.

When it starts, the run writes its gin configuration to `MODEL_DIR/config.gin` (as T5X does;
process 0). Resuming with the same configuration leaves the file alone; with a different one
the earlier file is kept as `config.gin.<n>` (the lowest free n).

`--help` lists the flags and, with --gin_file=..., those files' gin macros (REQUIRED first).
"""

import sys
from typing import Sequence

from moetx.cli import flags

PROG = "moetx-train"


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the gin flags in `argv` and runs `moetx.trainer.train.train`; returns the exit
    status (a failed process of a multi-process run ends at once instead, see
    `preemption.run_command`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags.parse_flags(argv, PROG, __doc__)  # --help and bad flags: before the heavy imports
    from moetx.trainer import preemption, train

    def run_train(args) -> None:
        del args
        preemption.raising_peer_lost(train.train)

    return preemption.run_command(lambda: flags.run(run_train, argv, prog=PROG,
                                                    description=__doc__))


if __name__ == "__main__":
    sys.exit(main())
