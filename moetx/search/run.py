"""`python -m moetx.search.run`: run (or resume) a gin-configured search.

    python -m moetx.search.run --gin_file=search/nos_proxy.gin --gin.SEARCH_DIR="'runs/nos'"

The gin file binds `search.space`, `search.fitness` and the search's settings (see
`moetx.search.evolution.Search`); running the same command again resumes the search from its
trial log. This module is a command line (it counts as `moetx.cli` in the layering); the library
is `moetx.search.evolution`.
"""

import sys

import moetx.cli  # noqa: F401  (process preamble before JAX starts)
from moetx.cli import flags
from moetx.search import evolution

MODULES = ("moetx.lm.models", "moetx.search.evolution", "moetx.search.fitness",
           "moetx.search.toy")


def main(argv=None) -> int:
    return flags.run(lambda args: evolution.run_search(), argv, module_imports=MODULES)


if __name__ == "__main__":
    sys.exit(main())
