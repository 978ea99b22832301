"""The one implementation of moetx's command-line flags: T5X-style gin flags, clear one-line
errors, task registration and multi-host initialisation, shared by every `moetx.cli` command.

Flags (as in T5X, with T5X's meanings):
  --gin_file=F             (repeatable) a gin file; looked up in --gin_search_paths and in
                           moetx's own `gin/` directory.
  --gin_search_paths=A,B   extra directories for gin files and includes (repeatable).
  --gin_bindings='X = V'   (repeatable) a raw gin binding.
  --gin.NAME=VALUE         rewritten to the binding `NAME = VALUE` (macros and configurables).
  --tfds_data_dir=D        TFDS data directory of every task (`seqio.set_tfds_data_dir_override`).
  --seqio_additional_cache_dirs=A,B
                           more directories with cached SeqIO tasks (`seqio.add_global_cache_dirs`).
  --alsologtostderr, --logtostderr
                           absl / Python logging at INFO and above to stderr.
  --coordinator_address=H:P, --process_count=N, --process_index=I
                           start `jax.distributed` on that address (also read from
                           MOETX_COORDINATOR_ADDRESS, MOETX_PROCESS_COUNT, MOETX_PROCESS_INDEX).
  --multiprocess           without --coordinator_address: start `jax.distributed` through
                           JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, GKE).
                           `--multiprocess_gpu` (T5X's name) is the same flag.
  --heartbeat_timeout_seconds=S
                           a process silent for S seconds is declared dead and the others end
                           (default 60; also MOETX_HEARTBEAT_TIMEOUT_SECONDS).
  -h, --help               the flags, then the gin macros of the --gin_file files given with it
                           (name and default, or REQUIRED), read as text: nothing heavy is
                           imported, so it prints at once.

This module imports no JAX, TensorFlow or SeqIO at import time (only gin): the commands parse
their flags (and answer --help) before they import their library (see `gin_command`).
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

from moetx.util import gin_files

GIN_DIR = gin_files.GIN_DIR


# What gin raises for bad files and bindings (its parser reports syntax errors as SyntaxError).
_GIN_ERRORS = (ValueError, KeyError, SyntaxError, ImportError, TypeError, tokenize.TokenError)
_NUMBER_TYPES = (int, float)


# Modules whose gin configurables every command knows without an `import` in the gin files.
DEFAULT_IMPORTS = ("moetx.lm.models",)



class UserError(Exception):
    """A configuration or input error reported as one line, without a traceback."""


_EPILOG = """\
gin:
  --gin.NAME=VALUE          set a gin macro or parameter (`--gin.TRAIN_STEPS=100`,
                            `--gin.MODEL_DIR="'runs/x'"`, `--gin.train.seed=1`); strings keep
                            their quotes. Same as --gin_bindings='NAME = VALUE'.
  moetx's own gin files are found by their relative names: models/, runs/, vision/,
  ranking/ and search/ under {gin_dir}.
  Give --gin_file=... together with --help to list the gin macros of those files.
"""


def build_parser(prog: str | None = None, description: str | None = None
                 ) -> argparse.ArgumentParser:
    """The argument parser of the gin commands (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG.format(gin_dir=GIN_DIR))
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help (with the gin macros of the --gin_file files "
                             "given) and exit")
    gin_group = parser.add_argument_group("gin (as in T5X)")
    gin_group.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                           help="a gin file (repeatable; later files override earlier ones)")
    gin_group.add_argument("--gin_search_paths", action="append", default=[], metavar="A,B",
                           help="comma-separated directories to look gin files and includes "
                                "up in, before moetx's gin/ and the working directory")
    gin_group.add_argument("--gin_bindings", action="append", default=[], metavar="'X = V'",
                           help="a gin binding (repeatable)")
    data_group = parser.add_argument_group("data and logging (as in T5X)")
    data_group.add_argument("--tfds_data_dir", default=None, metavar="DIR",
                            help="TFDS data directory of every task "
                                 "(seqio.set_tfds_data_dir_override)")
    data_group.add_argument("--seqio_additional_cache_dirs", action="append", default=[],
                            metavar="A,B", help="comma-separated directories with cached SeqIO "
                                                "tasks, searched besides the defaults")
    data_group.add_argument("--alsologtostderr", action="store_true",
                            help="absl / Python logging at INFO and above to stderr")
    data_group.add_argument("--logtostderr", action="store_true",
                            help="the same as --alsologtostderr (there are no log files)")
    dist = parser.add_argument_group("several processes")
    dist.add_argument("--multiprocess", "--multiprocess_gpu", action="store_true",
                      dest="multiprocess",
                      help="start jax.distributed: on --coordinator_address when given, else "
                           "through JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, "
                           "GKE); --multiprocess_gpu is T5X's name for it")
    dist.add_argument("--coordinator_address", default=os.environ.get(
        "MOETX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
        help="coordinator of a multi-process run (or MOETX_COORDINATOR_ADDRESS)")
    dist.add_argument("--process_count", type=int, default=_env_int("MOETX_PROCESS_COUNT"),
                      metavar="N", help="number of processes (or MOETX_PROCESS_COUNT)")
    dist.add_argument("--process_index", type=int, default=_env_int("MOETX_PROCESS_INDEX"),
                      metavar="I", help="this process's index (or MOETX_PROCESS_INDEX)")
    dist.add_argument("--heartbeat_timeout_seconds", type=int,
                      default=_env_int("MOETX_HEARTBEAT_TIMEOUT_SECONDS")
                      or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS, metavar="S",
                      help="a process silent for S seconds is declared dead (default "
                           f"{DEFAULT_HEARTBEAT_TIMEOUT_SECONDS})")
    return parser


def parse_flags(argv: Sequence[str], prog: str | None = None,
                description: str | None = None) -> argparse.Namespace:
    """The flags of `argv`. With -h/--help, prints the help and the gin macros of the
    --gin_file files given and exits (SystemExit(0)), importing nothing heavy."""
    parser = build_parser(prog, description)
    gin_dot = []
    rest = []
    for arg in argv:
        m = re.match(r"^--gin\.([A-Za-z_][\w./]*)=(.*)$", arg, re.S)
        if m:
            gin_dot.append((m.group(1), m.group(2)))
        else:
            rest.append(arg)
    if "-h" in rest or "--help" in rest:
        args, _ = parser.parse_known_args(rest)
    else:
        args = parser.parse_args(rest)
    args.gin_dot = gin_dot
    args.gin_search_paths = ",".join(p for p in args.gin_search_paths if p)
    args.seqio_additional_cache_dirs = [
        d for v in args.seqio_additional_cache_dirs for d in v.split(",") if d]
    if args.help:
        sys.stdout.write(parser.format_help() + "\n" + gin_macros_help(args))
        sys.stdout.flush()
        raise SystemExit(0)
    return args


def gin_macros_help(args: argparse.Namespace) -> str:
    """The --help section listing the gin macros of `args.gin_file` (after the --gin.NAME
    overrides given), required ones first, read as text (`gin_files.scan_macros`)."""
    if not args.gin_file:
        return ("gin macros: give --gin_file=... with --help to list the gin macros of those "
                "files.\n")
    try:
        macros = gin_files.scan_macros(args.gin_file, args.gin_search_paths.split(","))
    except (OSError, SyntaxError, ValueError) as e:
        return f"gin macros: cannot read the gin files ({_one_line(e)}).\n"
    values = {m.name: m for m in macros}
    for name, value in args.gin_dot:
        if name in values:
            values[name] = values[name]._replace(value=value.strip(), file="--gin." + name)
    if not values:
        return f"gin macros of {', '.join(args.gin_file)}: none.\n"
    width = max(len(n) for n in values) + 2
    lines = [f"gin macros of {', '.join(args.gin_file)} (set with --gin.NAME=VALUE):"]
    for m in sorted(values.values(), key=lambda m: not m.required):
        value = m.value if len(m.value) <= 48 else m.value[:45] + "..."
        lines.append(f"  {m.name:<{width}}{value:<30} ({m.file})" if not m.required
                     else f"  {m.name:<{width}}REQUIRED")
    return "\n".join(lines) + "\n"


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
    # T5X's own gin files name `t5x.*` / `flaxformer.*` / `__main__.train`: served by
    # moetx.compat where no real T5X is installed (a no-op for moetx's gin files).
    from moetx import compat

    compat.activate()
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
    are references (`@fn()`) or None, and annotations other than plain ones, are not checked."""
    for selector, param in _BINDING_LINE.findall(gin.config_str()):
        allowed = _allowed_kinds(selector, param)
        if allowed is None:
            continue
        value, macros = _resolve_macros(gin.query_parameter(f"{selector}.{param}"))
        kind = _value_kind(value)
        # None is how gin files leave a setting unset for commands that do not use it (e.g.
        # `MODEL_DIR = None` in an eval-only file): left to the configurable to refuse.
        if kind is None or kind == "none" or kind in allowed:
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


def apply_t5x_flags(args: argparse.Namespace) -> None:
    """Acts on T5X's data and logging flags: --alsologtostderr / --logtostderr (absl and Python
    logging at INFO to stderr), --tfds_data_dir (`seqio.set_tfds_data_dir_override`) and
    --seqio_additional_cache_dirs (`seqio.add_global_cache_dirs`). SeqIO is imported only when
    one of them is given."""
    if getattr(args, "alsologtostderr", False) or getattr(args, "logtostderr", False):
        from absl import flags as absl_flags
        from absl import logging as absl_logging

        absl_flags.FLAGS([sys.argv[0] or "moetx", "--alsologtostderr"], known_only=True)
        absl_logging.use_absl_handler()
        absl_logging.set_verbosity(absl_logging.INFO)
    tfds_dir = getattr(args, "tfds_data_dir", None)
    cache_dirs = list(getattr(args, "seqio_additional_cache_dirs", ()) or ())
    if tfds_dir or cache_dirs:
        import seqio

        if tfds_dir:
            seqio.set_tfds_data_dir_override(tfds_dir)
        if cache_dirs:
            seqio.add_global_cache_dirs(cache_dirs)


def _t5x_entry_point(prog: str | None):
    """The T5X script function the gin files configure for this command, or None."""
    from moetx import compat

    try:
        return compat.entry_point(prog)
    except compat.CompatError as e:
        raise UserError(str(e)) from None


def run(main_fn: Callable[[argparse.Namespace], None], argv: Sequence[str] | None = None,
        module_imports: Sequence[str] = DEFAULT_IMPORTS, *, prog: str | None = None,
        description: str | None = None) -> int:
    """Parses flags and gin, runs `main_fn`, and reports user errors as one line (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_flags(argv, prog, description)  # --help ends here, before any heavy import
    from moetx.datasets.registry import FetchError
    from moetx.trainer import preemption

    try:
        maybe_initialize_distributed(args)
        apply_t5x_flags(args)
        register_tasks()
        parse_gin(args, module_imports)
        t5x_entry = _t5x_entry_point(prog)
        if t5x_entry is not None:  # a T5X run file: its train/evaluate/infer, onto moetx's
            t5x_entry()
        else:
            main_fn(args)
    except UserError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    except preemption.Preempted:
        return preemption.PREEMPTED_EXIT_CODE
    except (ValueError, FileNotFoundError, FloatingPointError, FetchError) as e:
        if os.environ.get("MOETX_TRACEBACK"):
            raise
        from moetx.compat import CompatError  # its message is the whole one-line story

        kind = "" if isinstance(e, CompatError) else f"{type(e).__name__}: "
        print(f"moetx: error: {kind}{_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def gin_command(load: Callable[[], Callable[[], object]], prog: str | None = None,
                description: str | None = None) -> Callable[[Sequence[str] | None], int]:
    """`main(argv) -> exit status` of a command that parses the gin flags and calls a
    gin-configured library function. `load()` imports the library and returns the function
    (e.g. `moetx.trainer.eval.evaluate`); it is called only after the flags are parsed, so
    `--help` and a bad flag are answered without importing JAX, TensorFlow or SeqIO."""

    def main(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        parse_flags(argv, prog, description)
        fn = load()
        return run(lambda args: fn(), argv, prog=prog, description=description)

    main.__doc__ = "Parses the gin flags in `argv`, then imports and runs the command's library."
    return main
