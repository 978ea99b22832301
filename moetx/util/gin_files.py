"""Finding and parsing gin files, through gin's public API (one exception: gin's package-resource
file check is replaced by a safe one, see `_package_file_exists`).

moetx's own gin files live in `moetx/gin/` (`models/*.gin`, `runs/*.gin`, `vision/*.gin`); a
file named on the command line or in an `include` is looked up in the given search paths, then
there, then in the working directory. Both the command lines (`moetx.cli.flags`) and the
checkpoint converter (`moetx.convert.formats.load_model`) parse gin through this module.

`scan_macros` reads the top-level macros of gin files as text (gin's own statement parser,
nothing imported or bound), for the commands' `--help`, which must not import the
configurables.
"""

from __future__ import annotations

import logging
import os
import re
from typing import NamedTuple, Sequence

import gin
from gin import config as gin_config
from gin import config_parser
from gin import resource_reader

_GIN_PACKAGE_FILE_EXISTS = resource_reader.system_path_file_exists

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

_MACRO_LINE = re.compile(r"^([A-Za-z_]\w*) = ", re.M)


def _package_file_exists(config_path: str) -> bool:
    """gin's package-resource existence check (`gin.resource_reader`), made safe: gin tries it
    for every search path an `include` misses, and it raises TypeError when the path's head
    names a namespace package, i.e. any directory without `__init__.py` reachable from
    `sys.path`, such as a `models/` or `runs/` folder in the working directory of `python -m`
    (gin then aborts the parse of `include 'models/decoder_tiny.gin'`). A miss is a miss."""
    try:
        return _GIN_PACKAGE_FILE_EXISTS(config_path)
    except TypeError:
        return False


def _install_safe_package_reader() -> None:
    # gin has no public way to replace a registered reader; its reader table is a list of
    # (reader, exists) pairs, the package-resource one registered when gin is imported.
    readers = gin_config._FILE_READERS  # noqa: SLF001
    for i, (reader, exists) in enumerate(readers):
        if exists is _GIN_PACKAGE_FILE_EXISTS:
            readers[i] = (reader, _package_file_exists)


class _QuietMisses(logging.Filter):
    """Drops gin's 'Path not found' log lines.

    For each search path an `include` does not resolve against, gin's package-resource reader
    logs an ERROR before the next path is tried, although the file is then found. Such a miss
    is not an error; a file that is found nowhere still fails with gin's own IOError.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Path not found"))


_FILTER = _QuietMisses()
# Installed on import: gin may look files up (and log its misses) before `parse_files` runs.
logging.getLogger().addFilter(_FILTER)
_install_safe_package_reader()


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


class GinMacro(NamedTuple):
    """A top-level macro of a gin file as `scan_macros` reads it."""

    name: str
    value: str  # the value as gin text; 'REQUIRED' for `%gin.REQUIRED`
    file: str  # the file (as named on the command line or in an `include`) that set it last

    @property
    def required(self) -> bool:
        return self.value == "REQUIRED"


class _Text:
    """A reference or macro in a scanned value, kept as its gin text."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _TextDelegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Text(f"@{scoped_configurable_name}{'()' if evaluate else ''}")

    def macro(self, macro_name):
        return _Text("REQUIRED" if macro_name == "gin.REQUIRED" else f"%{macro_name}")


def scan_macros(files: Sequence[str], extra_search_paths: Sequence[str] = ()) -> list[GinMacro]:
    """The top-level macros (`NAME = value`) of gin `files` and of the files they `include`,
    later assignments winning as in gin, read as text: no module is imported and nothing is
    bound, so this is fast and works before the configurables exist. Raises FileNotFoundError
    for a file found nowhere and SyntaxError (gin's) for a file gin cannot parse."""
    search = search_paths(extra_search_paths)
    found: dict[str, GinMacro] = {}
    seen: set[str] = set()

    def scan(name: str) -> None:
        path = find_file(name, search)
        key = os.path.realpath(path)
        if key in seen:
            return
        seen.add(key)
        with open(path) as f:
            text = f.read()
        for statement in config_parser.ConfigParser(text, _TextDelegate()):
            if isinstance(statement, config_parser.IncludeStatement):
                scan(statement.filename)
            elif isinstance(statement, config_parser.BindingStatement) \
                    and not statement.arg_name and not statement.scope:
                found[statement.selector] = GinMacro(statement.selector,
                                                     repr(statement.value), name)

    for name in files:
        scan(name)
    return list(found.values())


CONFIG_GIN = "config.gin"


def write_config_gin(model_dir: str, text: str) -> str | None:
    """Writes `text` (a run's `gin.config_str()`) to `model_dir/config.gin`, as T5X does when a
    run starts. An identical file is left alone; a different one is kept as `config.gin.<n>`
    (the lowest free n, so a higher n is a later configuration), whose path is returned."""
    path = os.path.join(model_dir, CONFIG_GIN)
    try:
        with open(path) as f:
            if f.read() == text:
                return None
        n = 1
        while os.path.exists(f"{path}.{n}"):
            n += 1
        moved = f"{path}.{n}"
        os.replace(path, moved)
    except FileNotFoundError:
        moved = None
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return moved
