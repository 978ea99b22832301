"""`python -m moetx.cli.progressive`: EfficientNetV2 progressive learning through the trainer.

    python -m moetx.cli.progressive --gin_file=vision/progressive_fashion_mnist.gin \\
      --gin.MODEL_DIR="'runs/fmnist_progressive'" --gin.TRAIN_STEPS=800

The library function is `moetx.pipelines.progressive.run`.
"""

import sys

from moetx.cli import flags


def load():
    """The library function, imported only after the flags are parsed (a fast --help)."""
    from moetx.pipelines import progressive

    return progressive.run


main = flags.gin_command(load, "moetx-progressive", __doc__)


if __name__ == "__main__":
    sys.exit(main())
