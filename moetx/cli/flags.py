"""The one implementation of moetx's command-line flags: T5X-style gin flags, clear one-line
errors, task registration and multi-host initialisation, shared by every `moetx.cli` command.

Flags (as in T5X):
  --gin_file=F             (repeatable) a gin file; looked up in --gin_search_paths and in
                           moetx's own `gin/` directory.
  --gin_search_paths=A,B   extra directories for gin files and includes.
  --gin_bindings='X = V'   (repeatable) a raw gin binding.
  --gin.NAME=VALUE         rewritten to the binding `NAME = VALUE` (macros and configurables).
  --coordinator_address=H:P, --process_count=N, --process_index=I
                           start `jax.distributed` on that address (also read from
                           MOETX_COORDINATOR_ADDRESS, MOETX_PROCESS_COUNT, MOETX_PROCESS_INDEX).
  --multiprocess           without --coordinator_address: start `jax.distributed` through
                           JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, GKE).
  --heartbeat_timeout_seconds=S
                           a process silent for S seconds is declared dead and the others end
                           (default 60; also MOETX_HEARTBEAT_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import argparse
import collections.abc
import difflib
import inspect
import os
import re
import sys
import tokenize
import types
import typing
from typing import Callable, Sequence

import gin

from moetx.datasets.registry import FetchError
from moetx.trainer import preemption
from moetx.util import gin_files

GIN_DIR = gin_files.GIN_DIR


# What gin raises for bad files and bindings (its parser reports syntax errors as SyntaxError).
_GIN_ERRORS = (ValueError, KeyError, SyntaxError, ImportError, TypeError, tokenize.TokenError)
_NUMBER_TYPES = (int, float)


# Modules whose gin configurables every command knows without an `import` in the gin files.
DEFAULT_IMPORTS = ("moetx.lm.models",)


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
    parser.add_argument("--heartbeat_timeout_seconds", type=int,
                        default=_env_int("MOETX_HEARTBEAT_TIMEOUT_SECONDS")
                        or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS)
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


DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when running as one of several processes: on
    --coordinator_address with --process_count and --process_index, or, with --multiprocess
    alone, through JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, GKE), which finds
    the address, the count and this process's index itself. CPU collectives go through gloo.
    A process that sends no heartbeat for --heartbeat_timeout_seconds is declared dead and the
    coordination service ends the others (see `moetx.trainer.preemption`)."""
    if not (args.multiprocess or args.coordinator_address):
        return
    import jax

    if args.heartbeat_timeout_seconds < 1:
        raise UserError(f"--heartbeat_timeout_seconds must be >= 1, got "
                        f"{args.heartbeat_timeout_seconds}.")
    where = {}
    if args.coordinator_address:
        if not (args.process_count and args.process_index is not None):
            raise UserError("Multi-process runs with --coordinator_address need --process_count "
                            "and --process_index too (or MOETX_COORDINATOR_ADDRESS/_PROCESS_COUNT/"
                            "_INDEX); or use --multiprocess alone on a cluster JAX detects.")
        where = dict(coordinator_address=args.coordinator_address,
                     num_processes=args.process_count, process_id=args.process_index)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**where,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout_seconds)
    except ValueError as e:
        if where:
            raise
        raise UserError(f"--multiprocess without --coordinator_address relies on JAX's cluster "
                        f"auto-detection (SLURM, Open MPI, Cloud TPU, GKE), which found no "
                        f"cluster here ({_one_line(e)}). Pass --coordinator_address, "
                        f"--process_count and --process_index.") from None


def parse_gin(args: argparse.Namespace, module_imports: Sequence[str] = ()) -> None:
    """Parses gin files and bindings; unknown macros, unknown configurables and required macros
    left unset are reported as `UserError`s naming the binding and the fix."""
    for mod in module_imports:
        __import__(mod)
    try:
        gin_files.parse_files(args.gin_file, args.gin_bindings,
                              args.gin_search_paths.split(","))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except _GIN_ERRORS as e:
        raise UserError(f"bad gin config: {_one_line(e)}") from None
    defined_macros = gin_files.macro_names()
    for name, value in args.gin_dot:
        if "." not in name and "/" not in name and name not in defined_macros:
            close = difflib.get_close_matches(name, sorted(defined_macros), n=1)
            hint = f" Did you mean --gin.{close[0]}?" if close else ""
            raise UserError(f"--gin.{name}: no such gin macro in the given gin files.{hint}")
        before = _macro_value(name)
        try:
            gin.parse_config(f"{name} = {value}")
        except _GIN_ERRORS as e:
            raise UserError(f"bad binding --gin.{name}={value}: {_one_line(e)}") from None
        _check_same_kind(name, value, before, _macro_value(name))
    missing = sorted(n for n in gin_files.macro_names() if gin_files.is_required(n))
    if missing:
        raise UserError("missing required gin binding(s): " + ", ".join(missing)
                        + " (set them with " + " ".join(f"--gin.{n}=..." for n in missing) + ").")
    check_binding_types()
    gin.finalize()


def _macro_value(name: str):
    """The parsed value of macro `name`, or None when it is not a plain macro."""
    if "." in name or "/" in name:
        return None
    try:
        return gin.query_parameter(f"%{name}")
    except (ValueError, KeyError):
        return None


def _kind(value) -> str | None:
    """'number', 'bool' or 'str' for values whose kind a command-line override must keep."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _NUMBER_TYPES):
        return "number"
    if isinstance(value, str):
        return "str"
    return None


def _check_same_kind(name: str, text: str, before, after) -> None:
    """A macro the gin files set to a number, a bool or a string must stay one: `--gin.
    BATCH_SIZE='eight'` is refused here rather than failing deep inside the run."""
    was, now = _kind(before), _kind(after)
    if was and now and was != now:
        raise UserError(f"bad binding --gin.{name}={text}: {name} is a {was} in the rest of "
                        f"the configuration ({before!r}), this makes it a {now}.")


_BINDING_LINE = re.compile(r"^([A-Za-z_][\w./]*)\.([A-Za-z_]\w*) = ", re.M)
_KIND_NAMES = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a string",
               "none": "None", "sequence": "a list or tuple", "mapping": "a dict"}


def check_binding_types() -> None:
    """Refuses a bound value whose kind the configurable's annotation rules out (a float or a
    string for an `int`, a string for a sequence of names, ...): one `UserError` naming the
    binding and the macro it came from, instead of a TypeError deep inside the run. Values that
    are references (`@fn()`) and annotations other than plain ones are not checked."""
    for selector, param in _BINDING_LINE.findall(gin.config_str()):
        allowed = _allowed_kinds(selector, param)
        if allowed is None:
            continue
        value, macros = _resolve_macros(gin.query_parameter(f"{selector}.{param}"))
        kind = _value_kind(value)
        if kind is None or kind in allowed:
            continue
        via = "".join(f" = %{m}" for m in macros)
        wanted = " or ".join(_KIND_NAMES[k] for k in sorted(allowed, key=list(_KIND_NAMES).index))
        raise UserError(f"bad binding {selector}.{param}{via} = {value!r}: {param} takes "
                        f"{wanted}, not {_KIND_NAMES[kind]}.")


def _resolve_macros(value) -> tuple[object, list[str]]:
    """`value` with macro references (`%NAME`) followed, and the macros' names."""
    macros = []
    while isinstance(value, gin.config.ConfigurableReference) and repr(value).startswith("%"):
        name = repr(value)[1:]
        if name in macros or not re.fullmatch(r"[A-Za-z_]\w*", name):
            break
        try:
            value = gin.query_parameter(f"%{name}")
        except (ValueError, KeyError):
            break
        macros.append(name)
    return value, macros


def _allowed_kinds(selector: str, param: str) -> set[str] | None:
    """The kinds of value parameter `param` of configurable `selector` accepts, from its
    annotation; None when the annotation says nothing checkable."""
    try:
        fn = gin.get_configurable(selector.split("/")[-1])
        target = inspect.unwrap(fn.__init__ if inspect.isclass(fn) else fn)
        hint = typing.get_type_hints(target).get(param)
        default = inspect.signature(target).parameters[param].default
    except Exception:  # noqa: BLE001 - unresolvable annotations are simply not checked
        return None
    kinds = _hint_kinds(hint)
    if kinds is not None and default is None:
        kinds.add("none")
    return kinds


def _hint_kinds(hint) -> set[str] | None:
    """{'int'}, {'int', 'float'}, {'sequence'}, ... for plain annotations, else None."""
    simple = {int: {"int"}, float: {"int", "float"}, bool: {"bool"}, str: {"str"},
              type(None): {"none"}}
    if hint in simple:
        return set(simple[hint])
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        for arg in typing.get_args(hint):
            sub = _hint_kinds(arg)
            if sub is None:
                return None
            kinds |= sub
        return kinds
    if origin in (tuple, list, collections.abc.Sequence):
        return {"sequence"}
    if origin in (dict, collections.abc.Mapping):
        return {"mapping"}
    return None


def _value_kind(value) -> str | None:
    """The kind of a literal gin value, or None for anything else (references, objects)."""
    for kind, types_ in (("bool", bool), ("int", int), ("float", float), ("str", str),
                         ("none", type(None)), ("sequence", (list, tuple)),
                         ("mapping", dict)):
        if isinstance(value, types_):
            return kind
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def register_tasks() -> None:
    """Registers moetx's SeqIO tasks and mixtures (language, vision, ranking); reads no data."""
    from moetx import tasks
    from moetx.ranking import tasks as ranking_tasks
    from moetx.vision import tasks as vision_tasks

    tasks.register_all()
    vision_tasks.register_default_tasks()
    ranking_tasks.register_default_tasks()


def run(main_fn: Callable[[argparse.Namespace], None], argv: Sequence[str] | None = None,
        module_imports: Sequence[str] = DEFAULT_IMPORTS) -> int:
    """Parses flags and gin, runs `main_fn`, and reports user errors as one line (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_flags(argv)
        maybe_initialize_distributed(args)
        register_tasks()
        parse_gin(args, module_imports)
        main_fn(args)
    except UserError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    except preemption.Preempted:
        return preemption.PREEMPTED_EXIT_CODE
    except (ValueError, FileNotFoundError, FloatingPointError, FetchError) as e:
        if os.environ.get("MOETX_TRACEBACK"):
            raise
        print(f"moetx: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def gin_command(fn: Callable[[], object]) -> Callable[[Sequence[str] | None], int]:
    """`main(argv) -> exit status` of a command that parses the gin flags and calls the
    gin-configured library function `fn` (e.g. `moetx.trainer.train.train`)."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run(lambda args: fn(), argv)

    main.__doc__ = f"Parses the gin flags in `argv` and runs `{fn.__module__}.{fn.__name__}`."
    return main
