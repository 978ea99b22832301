"""`python -m moetx.cli.infer` (`moetx-infer`): decode (or score) prompts from a file to JSONL.

    python -m moetx.cli.infer --gin_file=models/decoder_small.gin --gin_file=runs/infer.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.PROMPTS_FILE="'prompts.txt'" \\
      --gin.TEMPERATURE=0.8 --gin.TOPK=40

Modes: `predict` writes {"prompt", "output", "output_ids"} per line; `score` writes
{"text", "score"} (sum of token log-likelihoods, EOS included). The library function is
`moetx.lm.infer.infer` (gin name `infer`).
"""

import sys

from moetx.cli import flags

PROG = "moetx-infer"


def run(args) -> None:
    del args
    from moetx.lm import infer

    for r in infer.infer():
        if "output" in r:
            print(f"{r['prompt']} ▸ {r['output']}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags.parse_flags(argv, PROG, __doc__)  # --help and bad flags: before the heavy imports
    from moetx.lm import infer  # noqa: F401  (registers `infer` with gin before parsing)

    return flags.run(run, argv, prog=PROG, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
