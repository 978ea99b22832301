"""Every global name a function uses is defined in its module.

Python finds an unbound global only when the function runs, and some functions run only on a
long path: a benchmark's memory child (`--only_model`) once called a helper its script had not
imported, and the first sign was a failed child at the end of a 40-minute row. This checks all
sources statically (the symbol tables the compiler builds), with no import and no run.
"""

import builtins
import pathlib
import symtable

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE_NAMES = {"__file__", "__name__", "__doc__", "__path__", "__spec__", "__package__"}


def unbound_globals(source: str, filename: str) -> set[str]:
    """Names that a function (at any depth) reads as globals but the module never binds."""
    top = symtable.symtable(source, filename, "exec")
    bound = set(top.get_identifiers()) | set(dir(builtins)) | MODULE_NAMES
    missing: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        for child in table.get_children():
            if child.get_type() == "function":
                missing.update(s.get_name() for s in child.get_symbols()
                               if s.is_global() and s.is_referenced()
                               and s.get_name() not in bound)
            visit(child)

    visit(top)
    return missing


FILES = sorted(p for d in ("moetx", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))


def test_the_check_finds_a_helper_that_was_not_imported():
    source = ("from helpers import run_memory\n\n"
              "def child():\n    return run_memory_child(run_memory)\n")
    assert unbound_globals(source, "script.py") == {"run_memory_child"}


def test_every_global_a_function_reads_is_bound():
    unbound = {str(p.relative_to(ROOT)): names for p in FILES
               if (names := unbound_globals(p.read_text(), str(p)))}
    assert len(FILES) > 100 and unbound == {}
