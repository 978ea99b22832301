"""Finding and parsing gin files, through gin's public API only.

moetx's own gin files live in `moetx/gin/` (`models/*.gin`, `runs/*.gin`, `vision/*.gin`); a
file named on the command line or in an `include` is looked up in the given search paths, then
there, then in the working directory. Both the command lines (`moetx.cli.flags`) and the
checkpoint converter (`moetx.convert.formats.load_model`) parse gin through this module.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

_MACRO_LINE = re.compile(r"^([A-Za-z_]\w*) = ", re.M)


class _QuietMisses(logging.Filter):
    """Drops gin's 'Path not found' log lines.

    For each search path an `include` does not resolve against, gin's package-resource reader
    logs an ERROR before the next path is tried, although the file is then found. Such a miss
    is not an error; a file that is found nowhere still fails with gin's own IOError.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Path not found"))


_FILTER = _QuietMisses()


def search_paths(extra: Sequence[str] = ()) -> list[str]:
    """`extra` (e.g. `--gin_search_paths`), then moetx's `gin/`, then the working directory."""
    return [p for p in extra if p] + [GIN_DIR, os.getcwd()]


def find_file(name: str, search: Sequence[str]) -> str:
    """The path of gin file `name`: as given when it exists, else the first hit in `search`.

    Raises FileNotFoundError naming the places searched.
    """
    if os.path.exists(name):
        return name
    for prefix in search:
        candidate = os.path.join(prefix, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"gin file {name!r} not found (searched: {', '.join(search)}).")


def parse_files(files: Sequence[str], bindings: Sequence[str] = (),
                extra_search_paths: Sequence[str] = ()) -> list[str]:
    """Parses gin `files` (looked up with `find_file`) and `bindings` without finalizing;
    `include`s resolve against the same search paths. Returns the files' paths."""
    search = search_paths(extra_search_paths)
    for prefix in search:
        gin.add_config_file_search_path(prefix)
    logging.getLogger().addFilter(_FILTER)
    paths = [find_file(f, search) for f in files]
    gin.parse_config_files_and_bindings(paths, list(bindings), finalize_config=False)
    return paths


def macro_names() -> set[str]:
    """Names of the macros (`NAME = value` at top level) of the parsed configuration."""
    return set(_MACRO_LINE.findall(gin.config_str()))


def is_required(macro: str) -> bool:
    """Whether macro `macro` is still `%gin.REQUIRED`."""
    try:
        return repr(gin.query_parameter(f"%{macro}")) == "%gin.REQUIRED"
    except ValueError:
        return False
