"""Command-line plumbing shared by train / eval / infer: T5X-style gin flags, clear one-line
errors, and multi-host initialisation.

Flags (as in T5X):
  --gin_file=F             (repeatable) a gin file; looked up in --gin_search_paths and in
                           moetx's own `gin/` directory.
  --gin_search_paths=A,B   extra directories for gin files and includes.
  --gin_bindings='X = V'   (repeatable) a raw gin binding.
  --gin.NAME=VALUE         rewritten to the binding `NAME = VALUE` (macros and configurables).
  --multiprocess, --coordinator_address=H:P, --process_count=N, --process_index=I
                           start `jax.distributed` (also read from MOETX_COORDINATOR_ADDRESS,
                           MOETX_PROCESS_COUNT, MOETX_PROCESS_INDEX).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable, Sequence

import gin

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin")


# What gin raises for bad files and bindings (its parser reports syntax errors as SyntaxError).
_GIN_ERRORS = (ValueError, KeyError, SyntaxError, ImportError, TypeError)


class UserError(Exception):
    """A configuration or input error reported as one line, without a traceback."""


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=True)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_search_paths", default="")
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument("--coordinator_address", default=os.environ.get(
        "MOETX_COORDINATOR_ADDRESS"))
    parser.add_argument("--process_count", type=int, default=_env_int("MOETX_PROCESS_COUNT"))
    parser.add_argument("--process_index", type=int, default=_env_int("MOETX_PROCESS_INDEX"))
    gin_dot = []
    rest = []
    for arg in argv:
        m = re.match(r"^--gin\.([A-Za-z_][\w./]*)=(.*)$", arg, re.S)
        if m:
            gin_dot.append((m.group(1), m.group(2)))
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    args.gin_dot = gin_dot
    return args


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when running as one of several processes."""
    if not (args.multiprocess or args.coordinator_address):
        return
    import jax

    if not (args.coordinator_address and args.process_count and args.process_index is not None):
        raise UserError("Multi-process runs need --coordinator_address, --process_count and "
                        "--process_index (or MOETX_COORDINATOR_ADDRESS/_PROCESS_COUNT/_INDEX).")
    # CPU collectives across processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.process_count, process_id=args.process_index)


def _macro_names() -> set[str]:
    """Macros defined by the parsed gin files (`NAME = value` at top level)."""
    names = set()
    for (scope, selector), _ in gin.config._CONFIG.items():  # pylint: disable=protected-access
        if selector == "gin.macro":
            names.add(scope)
    return names


def parse_gin(args: argparse.Namespace, module_imports: Sequence[str] = ()) -> None:
    """Parses gin files and bindings; unknown macros, unknown configurables and required macros
    left unset are reported as `UserError`s naming the binding and the fix."""
    for mod in module_imports:
        __import__(mod)
    search = [p for p in args.gin_search_paths.split(",") if p] + [GIN_DIR, os.getcwd()]
    for path in search:
        gin.add_config_file_search_path(path)
    # gin tries its search paths in order and logs an ERROR for each miss; looking in moetx's
    # own directories before the working directory keeps `include 'models/x.gin'` quiet.
    prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
    prefixes.sort(key=lambda p: 0 if p in search else 1)
    files = []
    for f in args.gin_file:
        found = f if os.path.exists(f) else next(
            (os.path.join(p, f) for p in search if os.path.exists(os.path.join(p, f))), None)
        if found is None:
            raise UserError(f"gin file {f!r} not found (searched: {', '.join(search)}).")
        files.append(found)
    try:
        gin.parse_config_files_and_bindings(files, args.gin_bindings, finalize_config=False)
    except _GIN_ERRORS as e:
        raise UserError(f"bad gin config: {_one_line(e)}") from None
    defined_macros = _macro_names()
    for name, value in args.gin_dot:
        if "." not in name and "/" not in name and name not in defined_macros:
            close = difflib.get_close_matches(name, sorted(defined_macros), n=1)
            hint = f" Did you mean --gin.{close[0]}?" if close else ""
            raise UserError(f"--gin.{name}: no such gin macro in the given gin files.{hint}")
        try:
            gin.parse_config(f"{name} = {value}")
        except _GIN_ERRORS as e:
            raise UserError(f"bad binding --gin.{name}={value}: {_one_line(e)}") from None
    missing = sorted(n for n in _macro_names() if _is_required(n))
    if missing:
        raise UserError("missing required gin binding(s): " + ", ".join(missing)
                        + " (set them with " + " ".join(f"--gin.{n}=..." for n in missing) + ").")
    gin.finalize()


def _is_required(macro: str) -> bool:
    try:
        return repr(gin.query_parameter(f"%{macro}")) == "%gin.REQUIRED"
    except ValueError:
        return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def run(main_fn: Callable[[argparse.Namespace], None], argv: Sequence[str] | None = None,
        module_imports: Sequence[str] = ()) -> int:
    """Parses flags and gin, runs `main_fn`, and reports user errors as one line (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_flags(argv)
        maybe_initialize_distributed(args)
        parse_gin(args, module_imports)
        main_fn(args)
    except UserError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("MOETX_TRACEBACK"):
            raise
        print(f"moetx: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
