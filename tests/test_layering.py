"""The package plan holds: imports point down the layers of ARCHITECTURE.md, no module cycle
hides in function-local imports, and the trainer names no language-model or MoE feature.

Every `import` in moetx's sources counts, at any depth (function-local ones included), so a
lazy import cannot hide an upward dependency or a cycle.
"""

import ast
import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "moetx"

# Sub-package -> the sub-packages it may import (besides itself). Keep ARCHITECTURE.md in step.
LOWER = {
    "util": set(),
    "nn": {"util"},
    "datasets": {"util"},
    "trainer": {"util"},
    "moe": {"util", "nn"},
    "tasks": {"util", "datasets"},
    "lm": {"util", "nn", "moe", "trainer", "datasets"},
    "vision": {"util", "nn", "trainer", "datasets"},
    "ranking": {"util", "nn", "trainer", "datasets"},
    "convert": {"util", "nn", "moe", "lm", "trainer", "datasets"},
    "rl": set(),
}
_BELOW_EXPERIMENTS = set().union(*LOWER.values(), LOWER)
LOWER["pipelines"] = set(_BELOW_EXPERIMENTS)
LOWER["search"] = set(_BELOW_EXPERIMENTS)
LOWER["experiments"] = set(_BELOW_EXPERIMENTS) | {"search"}
LOWER["compat"] = set(_BELOW_EXPERIMENTS) | {"pipelines", "search", "experiments"}
LOWER["cli"] = set(LOWER) - {"cli"}
LOWER["tools"] = set(LOWER) - {"tools"}  # command-line level: may import everything


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every moetx module `path` imports (`from a import b` counts a.b when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moetx"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("moetx"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


SOURCES = sorted(PKG.rglob("*.py"))
MODULES = {_module_name(p): p for p in SOURCES}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


# Command lines that live beside their library (the command's name is part of its interface)
# and count as `cli`: they may import anything and nothing imports them.
COMMAND_MODULES = {"moetx.search.run", "moetx.search.run_compare", "moetx.experiments.run"}


def _layer(module: str) -> str | None:
    if module in COMMAND_MODULES:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LOWER else None


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")} - {"gin"}
    assert subpackages == set(LOWER), "add the new sub-package to LOWER and ARCHITECTURE.md"
    top_modules = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert not top_modules, f"modules belong in a sub-package: {sorted(top_modules)}"


def test_imports_point_down():
    bad = []
    for module, imported in GRAPH.items():
        src = _layer(module)
        for target in imported:
            dst = _layer(target)
            if src is None or dst is None:
                if target not in ("moetx",) and module != "moetx":
                    bad.append(f"{module} -> {target} (no layer)")
                continue
            if dst != src and dst not in LOWER[src]:
                bad.append(f"{module} -> {target} ({src} may not import {dst})")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(sorted(bad))


def test_nothing_imports_a_command_module():
    users = sorted(m for m, ts in GRAPH.items() for t in ts if t in COMMAND_MODULES)
    assert not users, f"command modules are entry points only: {users}"


def test_the_root_package_imports_nothing_of_moetx():
    assert GRAPH["moetx"] == set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_cycles():
    # A package's __init__ importing its own submodules is a re-export, not a cycle.
    graph = {m: {t for t in ts if not (m == t.rpartition(".")[0] or t == m)}
             for m, ts in GRAPH.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_the_layering_check_finds_violations():
    """The checks above are not vacuous: a planted upward import and a planted cycle fail."""
    assert "moetx.cli.flags" in GRAPH["moetx.cli.train"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _layer("moetx.trainer.trainer") == "trainer" and "lm" not in LOWER["trainer"]


# Words that belong to language models or MoE; the trainer's code (docstrings aside) must not
# use them: models declare their features and metrics through `moetx.trainer.model.Model`.
_LM_WORDS = re.compile(r"\b(decoder_\w+|encoder_\w+|moe(_\w+)?\b|vocab_size|vocabular\w+|perplexity|"
                       r"cross_ent\w*|z_loss\w*|tokens?)\b", re.I)


def _code_words(tree: ast.AST) -> set[str]:
    """Names, attributes and string constants of `tree`, docstrings excluded."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant):
            docstrings.add(id(node.body[0].value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words.add(node.value)
    return words


@pytest.mark.parametrize("path", sorted((PKG / "trainer").glob("*.py")), ids=lambda p: p.name)
def test_trainer_code_names_no_language_model_feature(path):
    words = _code_words(ast.parse(path.read_text()))
    hits = sorted({m.group(0) for w in words for m in _LM_WORDS.finditer(w)})
    assert not hits, f"{path.name} names language-model features: {hits}"


def test_the_feature_check_finds_language_model_names():
    code = '"""moe in a docstring"""\nx = batch["decoder_target_tokens"]\ny = metrics.moe_aux\n'
    hits = {m.group(0) for w in _code_words(ast.parse(code)) for m in _LM_WORDS.finditer(w)}
    assert hits == {"decoder_target_tokens", "moe_aux"}


TESTS = pathlib.Path(__file__).resolve().parent


def _private_uses(path: pathlib.Path) -> list[str]:
    """`_private` names of other moetx modules that `path` imports or reads as attributes."""
    tree = ast.parse(path.read_text(), str(path))
    own = _module_name(path) if PKG in path.parents else None
    aliases, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("moetx") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("moetx"):
            for a in node.names:
                if a.name.startswith("_") and node.module != own:
                    out.append(f"from {node.module} import {a.name}")
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__") and aliases[node.value.id] != own:
            out.append(f"{aliases[node.value.id]}.{node.attr}")
    return sorted(set(out))


def test_modules_and_tests_use_public_names_only():
    files = SOURCES + sorted(TESTS.rglob("*.py"))
    bad = {str(p.relative_to(PKG.parent)): uses for p in files if (uses := _private_uses(p))}
    assert not bad, f"private names used across modules: {bad}"


def test_tests_do_not_import_other_test_modules():
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in _imports_any(path):
            if name.startswith("tests.") and not name.endswith("conftest") \
                    and name.split(".")[-1].startswith("test_"):
                bad.append(f"{path.relative_to(TESTS)} imports {name}")
    assert not bad, "shared test helpers belong in a conftest.py:\n  " + "\n  ".join(bad)


def _imports_any(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_private_name_check_finds_uses(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from moetx.convert import formats\nfrom moetx.trainer.trainer import _x\n"
                       "formats._flatten({})\nformats.convert\n")
    assert _private_uses(planted) == ["from moetx.trainer.trainer import _x",
                                      "moetx.convert.formats._flatten"]
