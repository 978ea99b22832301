"""The shipped experiments (moetx/gin/experiments) parse, run at least three seeds, and plan
budgets matched within 1% on their default setup and on the bigger one they scale to; their
arms compare what issue 20's claims name (nothing is trained here: shapes only)."""

import pytest

from moetx.experiments import experiment
from moetx.util import gin_files

NAMES = ("primer", "moe_vs_dense", "router_zloss", "capacity", "upcycling")


def load(name, tmp_path, *bindings):
    import gin

    gin.clear_config()
    gin_files.parse_files([f"experiments/{name}.gin"],
                          [f"OUTPUT_DIR = '{tmp_path / name}'", *bindings])
    return experiment.Experiment()


@pytest.mark.parametrize("setup, budget", [("experiments/lm_d256.gin", None),
                                           ("experiments/lm_d512.gin", 1e17)])
def test_the_shipped_experiments_plan_matched_budgets(setup, budget, tmp_path, clean_gin):
    plans = {}
    bigger = [f"BUDGET = {budget}", f"BASE_BUDGET = {budget}"] if budget else []
    for name in NAMES:
        exp = load(name, tmp_path, f"SETUP = '{setup}'", *bigger)
        assert exp.name == name and len(exp.seeds) >= 3
        plans[name] = experiment.plan(exp)
        for arm, p in plans[name].items():
            assert -0.01 < p.deviation <= 0 and p.steps >= 100, (name, arm)
    moe = plans["moe_vs_dense"]
    dense = moe["dense"].flops_per_step
    # Switch (top-1) matches the dense model's FLOPs per token but for its router.
    for arm in ("switch_top1_e8", "switch_top1_e16"):
        assert 0 < moe[arm].flops_per_step / dense - 1 < 0.01
    # Top-2 meets two expert MLPs per sparse layer: more FLOPs, fewer steps.
    assert moe["st_moe_top2_e8"].steps < moe["switch_top1_e8"].steps
    primer = plans["primer"]
    # PRIMER_MLP_DIM gives the squared-ReLU MLP the gated one's size: only the depthwise
    # convolutions (and full Primer's projections) differ.
    assert abs(primer["primer_ez"].flops_per_step / primer["vanilla_t5.1.1"].flops_per_step
               - 1) < 0.01
    assert primer["primer_ez"].flops_per_step > primer["vanilla_t5.1.1"].flops_per_step
    up = plans["upcycling"]
    assert up["dense_continued"].start_step == up["upcycled_top2_e8"].start_step == up[
        "dense_base"].steps
    assert len({p.steps for p in plans["capacity"].values()}) == 1  # capacity is not FLOPs


def test_the_shipped_experiments_bind_what_their_claims_name(tmp_path, clean_gin):
    capacity = load("capacity", tmp_path)
    factors = [b for a in capacity.arms.values() for b in a.bindings
               if "train_capacity_factor" in b]
    assert [f.split("= ")[1] for f in factors] == ["1.25", "1.0", "2.0"]
    assert "MoeConfig.eval_capacity_factor = 2.0" in capacity.bindings
    router = load("router_zloss", tmp_path)
    assert "ACTIVATION_DTYPE = 'bfloat16'" in router.bindings
    combos = {(next(b for b in a.bindings if "z_loss" in b).split("= ")[1],
               next(b for b in a.bindings if "router_dtype" in b).split("= ")[1])
              for a in router.arms.values()}
    assert combos == {(z, d) for z in ("0.0", "1e-3") for d in ("'float32'", "'bfloat16'")}
    upcycling = load("upcycling", tmp_path)
    assert upcycling.baseline_arm == "dense_continued"
    assert "InitFromCheckpoint.upcycle = True" in upcycling.arms["upcycled_top2_e8"].bindings
