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
from moetx.lm import infer


def run(args) -> None:
    del args
    for r in infer.infer():
        if "output" in r:
            print(f"{r['prompt']} ▸ {r['output']}", flush=True)


def main(argv=None) -> int:
    return flags.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
