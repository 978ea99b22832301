"""`python -m moetx.search.run_compare`: train named arms of one configuration for the same budget
and compare their curves (what a search found against its baselines on a larger run).

    python -m moetx.search.run_compare --gin_file=search/nos_transfer.gin \\
        --gin.OUTPUT_DIR="'runs/nos_transfer'"

A command line (it counts as `moetx.cli` in the layering); the library is
`moetx.search.compare.compare`.
"""

import sys

import moetx.cli  # noqa: F401  (process preamble before JAX starts)
from moetx.cli import flags
from moetx.search import compare

MODULES = ("moetx.lm.models", "moetx.search.compare")


def main(argv=None) -> int:
    return flags.run(lambda args: compare.compare(), argv, module_imports=MODULES)


if __name__ == "__main__":
    sys.exit(main())
