"""The import hook that serves `t5x.*` and `flaxformer.*` from moetx (see the package
docstring), and the T5X script functions of `__main__`.

Each served module is a plain module object whose attributes are taken from a moetx module
when it is first imported: `MODULES[name] = (provider module, attribute names)`; a name with
no provider is a package (its sub-modules are served too). A module under a served root that
is not in the table fails with an ImportError saying what is served.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from moetx.compat.errors import CompatError

_MODEL = "moetx.compat.t5x_model"
_RUN = "moetx.compat.t5x_run"
_FF = "moetx.compat.flaxformer"

# Served module -> (moetx module providing its attributes, their names); (None, ()) = package.
MODULES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "t5x": (None, ()),
    "t5x.examples": (None, ()),
    "t5x.examples.t5": (None, ()),
    "t5x.examples.t5.network": (_MODEL, ("T5Config", "Transformer")),
    "t5x.models": (_MODEL, ("EncoderDecoderModel",)),
    "t5x.adafactor": (_MODEL, ("Adafactor", "standard_logical_factor_rules")),
    "t5x.utils": (_RUN, ("DatasetConfig", "SaveCheckpointConfig", "RestoreCheckpointConfig",
                         "CheckpointConfig", "create_learning_rate_scheduler")),
    "t5x.partitioning": (_RUN, ("PjitPartitioner", "standard_logical_axis_rules")),
    "t5x.trainer": (_RUN, ("Trainer",)),
    "t5x.gin_utils": (_RUN, ("summarize_gin_config",)),
    "t5x.contrib": (None, ()),
    "t5x.contrib.moe": (None, ()),
    "t5x.contrib.moe.models": (_MODEL, ("MoeEncoderDecoderModel",)),
    "t5x.contrib.moe.adafactor_utils": (_MODEL, ("logical_factor_rules",)),
    "t5x.contrib.moe.partitioning": (_RUN, ("MoePjitPartitioner",
                                            "compute_num_model_partitions")),
    "t5x.contrib.moe.trainer": (_RUN, ("MoeTrainer",)),
    "flaxformer": (None, ()),
    "flaxformer.architectures": (None, ()),
    "flaxformer.architectures.t5": (None, ()),
    "flaxformer.architectures.t5.t5_architecture": (
        _FF, ("EncoderDecoder", "EncoderLayer", "DecoderLayer")),
    "flaxformer.architectures.moe": (None, ()),
    "flaxformer.architectures.moe.moe_architecture": (
        _FF, ("SparseEncoder", "SparseDecoder", "SparseEncoderLayer", "SparseDecoderLayer")),
    "flaxformer.architectures.moe.moe_layers": (_FF, ("MoeLayer",)),
    "flaxformer.architectures.moe.moe_enums": (_FF, ("LayerLayout",)),
    "flaxformer.architectures.moe.routing": (
        _FF, ("TokensChooseMaskedRouter", "TokensChooseScatterRouter",
              "ExpertsChooseMaskedRouter", "RouterWeights")),
    "flaxformer.components": (None, ()),
    "flaxformer.components.attention": (None, ()),
    "flaxformer.components.attention.dense_attention": (
        _FF, ("MultiHeadDotProductAttention",)),
    "flaxformer.components.dense": (_FF, ("MlpBlock", "DenseGeneral")),
    "flaxformer.components.embedding": (_FF, ("Embed",)),
    "flaxformer.components.layer_norm": (_FF, ("T5LayerNorm",)),
    "flaxformer.components.relative_position_biases": (_FF, ("RelativePositionBiases",)),
}
ROOTS = ("t5x", "flaxformer")

# The T5X scripts' functions, as the run files name them (`import __main__ as train_script`).
SCRIPT_FUNCTIONS = ("train", "evaluate", "infer")
# moetx command (its `prog`) -> the T5X script function it runs.
COMMANDS = {"moetx-train": "train", "moetx-eval": "evaluate", "moetx-infer": "infer"}
_COMMAND_OF = {v: k.replace("moetx-", "python -m moetx.cli.") for k, v in COMMANDS.items()}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        provider, names = MODULES[module.__name__]
        module.__doc__ = (f"{module.__name__} as served by moetx's T5X compatibility layer "
                          f"(moetx.compat).")
        if provider is not None:
            source = importlib.import_module(provider)
            for name in names:
                setattr(module, name, getattr(source, name))
            if module.__name__ == "flaxformer.architectures.moe.moe_enums":
                source.register_layout_constants()


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.roots:
            return None
        if fullname not in MODULES:
            served = sorted(n for n, (p, _) in MODULES.items()
                            if p and n.split(".")[0] == fullname.split(".")[0])
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: moetx's T5X compatibility layer serves only "
                f"{', '.join(served)} (no real {fullname.split('.')[0]} is installed).",
                name=fullname)
        is_package = MODULES[fullname][0] is None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=is_package)


_FINDER: _Finder | None = None
_INJECTED: list[tuple[str, types.ModuleType | None]] = []


def _real_importable(root: str) -> bool:
    """Whether a real `root` package is importable (looked up before the hook is installed)."""
    module = sys.modules.get(root)
    if module is not None:
        return getattr(module, "__spec__", None) is None \
            or not isinstance(module.__spec__.loader, _Loader)
    try:
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):
        return False


def activate() -> tuple[str, ...]:
    """Installs the hook for the roots (`t5x`, `flaxformer`) that have no real installation
    and gives `__main__` the T5X script functions it lacks. Idempotent; returns the served
    roots."""
    global _FINDER
    if _FINDER is None:
        roots = tuple(r for r in ROOTS if not _real_importable(r))
        _FINDER = _Finder(roots)
        sys.meta_path.insert(0, _FINDER)
    main = sys.modules.get("__main__")
    if main is not None:
        from moetx.compat import scripts

        for name in SCRIPT_FUNCTIONS:
            # A script's own function of that name wins, as in T5X; a module does not (a
            # script that did `from moetx.cli import train`).
            if isinstance(getattr(main, name, None), (types.ModuleType, type(None))):
                _INJECTED.append((name, getattr(main, name, None)))
                setattr(main, name, getattr(scripts, name))
    return _FINDER.roots


def deactivate() -> None:
    """Removes the hook, the served modules, the gin configurables registered under their
    names and the functions given to `__main__` (tests, or a program that parses T5X gin files
    and then moetx's: while T5X's `t5x.models.EncoderDecoderModel` is registered, moetx's gin
    files' short `EncoderDecoderModel` would be ambiguous)."""
    global _FINDER
    if _FINDER is not None:
        sys.meta_path.remove(_FINDER)
        for name in [n for n in sys.modules if n.split(".")[0] in _FINDER.roots]:
            del sys.modules[name]
        _forget_configurables(_FINDER.roots)
        _FINDER = None
    main = sys.modules.get("__main__")
    while _INJECTED:
        name, before = _INJECTED.pop()
        if main is None:
            continue
        if before is None:
            if hasattr(main, name):
                delattr(main, name)
        else:
            setattr(main, name, before)


def _forget_configurables(roots: tuple[str, ...]) -> None:
    """Drops the gin registrations made under the served roots' module names (gin has no
    public call for this; its registry is a selector map keyed by `module.name`)."""
    import gin.config

    registry, inverse = gin.config._REGISTRY, gin.config._INVERSE_REGISTRY  # noqa: SLF001
    prefixes = tuple(f"{r}." for r in roots)

    def served(c) -> bool:
        # Under a served module's name, or a shim object under any alias (`import __main__ as
        # train_script` registers `train_script.train`).
        return c.selector.startswith(prefixes) or getattr(
            c.wrapped, "__module__", "").startswith("moetx.compat")

    for selector in [s for s, c in registry.items() if served(c)]:
        registry.pop(selector)
    # The reverse map too, or a later activation would find the old registrations there and
    # not register the names again.
    for fn_or_cls in [k for k, c in inverse.items() if served(c)]:
        del inverse[fn_or_cls]


def _bound(function: str) -> bool:
    """Whether the parsed gin configuration binds T5X script function `function` (every T5X
    run file binds its `model`), under whatever alias the file imported `__main__` as."""
    import gin

    from moetx.compat import scripts

    try:
        return "model" in gin.get_bindings(getattr(scripts, function),
                                           resolve_references=False)
    except (ValueError, KeyError, TypeError):  # never registered: no T5X run file
        return False


def entry_point(prog: str | None):
    """The T5X script function the parsed gin files configure for command `prog`
    ('moetx-train', ...), as a no-argument callable; None when the files are not a T5X run
    file. Raises CompatError when they configure another command's function."""
    if _FINDER is None:
        return None
    import gin

    bound = [f for f in SCRIPT_FUNCTIONS if _bound(f)]
    if not bound:
        return None
    wanted = COMMANDS.get(prog or "")
    if wanted is None and len(bound) == 1:
        wanted = bound[0]
    if wanted in bound:
        # The gin-wrapped function (calling the plain one would apply no binding).
        from moetx.compat import scripts

        return gin.get_configurable(getattr(scripts, wanted))
    raise CompatError(f"the gin files configure T5X's {bound[0]}() (a T5X "
                      f"{'eval' if bound[0] == 'evaluate' else bound[0]} run file), which "
                      f"{prog or 'this command'} does not run; use {_COMMAND_OF[bound[0]]}.")


__all__ = ["COMMANDS", "MODULES", "ROOTS", "activate", "deactivate", "entry_point"]
