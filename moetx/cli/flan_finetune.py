"""`python -m moetx.cli.flan_finetune`: start a FLAN finetuning run from a pretrained checkpoint.

    python -m moetx.cli.flan_finetune --init_checkpoint=runs/demo_t5/checkpoint_400 \\
      --model_dir=runs/flan_no_tc
    python -m moetx.cli.train --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_finetune.gin --gin.MODEL_DIR="'runs/flan_no_tc'"

The library function is `moetx.pipelines.flan_finetune.init_model_dir`.
"""

import argparse
import sys

from moetx.pipelines import flan_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moetx-flan-finetune",
                                     description="Start a FLAN finetuning run from a pretrained checkpoint.")
    parser.add_argument("--init_checkpoint", required=True)
    parser.add_argument("--model_dir", required=True)
    args = parser.parse_args(argv)
    try:
        dst = flan_finetune.init_model_dir(args.init_checkpoint, args.model_dir)
    except ValueError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    print(f"initialised {dst} from {args.init_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
