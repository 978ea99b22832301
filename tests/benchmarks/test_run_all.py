"""`benchmarks/run_all.py`'s rows: every model a row names can be built on both sides."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["run_all"]
    return module


def flag(args, name):
    return int(args[args.index(f"--{name}") + 1])


@pytest.mark.parametrize("quick", [False, True])
def test_the_llama_rows_are_expressible_as_hf_llama(run_all, quick):
    """LlamaConfig ties the width to heads x head_dim; T5.1.1-small's 6 x 64 heads at d_model
    512 failed the realistic Llama row before its first step."""
    shape = run_all.TINY if quick else run_all.REALISTIC
    rows = [r for r in run_all.side_by_side_rows(shape, memory=False, quick=quick)
            if r.name.startswith("decoder_")]
    assert {r.name for r in rows} == {f"decoder_{a}_{o}" for a in ("t5", "llama")
                                      for o in ("adafactor", "adamw")}
    for r in rows:
        heads, head_dim, d_model = (flag(r.args, k) for k in ("heads", "head_dim", "d_model"))
        assert d_model == shape["d_model"] and head_dim == shape["head_dim"]
        if "llama" in r.name:
            assert heads * head_dim == d_model, r.name
        else:  # the T5.1.1 rows keep T5.1.1-small's heads
            assert heads == shape["heads"], r.name


@pytest.mark.parametrize("mode", ["realistic", "quick", "sweep"])
def test_every_row_passes_flags_its_script_accepts(run_all, mode, monkeypatch):
    """A row whose flags its script rejects fails only when `make bench` reaches it, minutes in;
    each script's own parser checks them here (the scripts import jax and torch lazily)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    rows = (run_all.sweep_rows(quick=False) if mode == "sweep" else run_all.side_by_side_rows(
        run_all.TINY if mode == "quick" else run_all.REALISTIC, memory=True,
        quick=mode == "quick"))
    assert {"means", "profile_encdec", "step_ops"} <= {r.name for r in rows} or mode == "sweep"
    for r in rows:
        script = importlib.import_module(r.script.removesuffix(".py"))
        args = script.parse_args(list(r.args))
        if "--d_model" in r.args:
            assert args.d_model == flag(r.args, "d_model"), r.name
