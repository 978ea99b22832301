"""Matched budgets: each arm trains floor(budget / its own FLOPs per step) steps, so its compute
is within 1% of the budget, and the FLOPs per step are the model's: counted by hand here for a
dense decoder, Switch and top-2 MoE decoders (active experts only), a Primer-EZ decoder (its
depthwise convolutions included) and an encoder-decoder."""

import math

import pytest

from moetx.experiments import experiment

SHARED = ("MIXTURE_OR_TASK_NAME = 'moetx_en_causal_lm'", "TASK_FEATURE_LENGTHS = {'targets': 16}",
          "BATCH_SIZE = 8")
MOE = ("models/decoder_tiny.gin", "models/moe_common.gin")
MOE_LAYOUT = ["MoeConfig.num_experts = 4", "MoeConfig.sparse_every = 2"]

# decoder_tiny.gin: d 32, 2 heads x 16, gated-GELU d_ff 64, 2 layers, untied 8192-way logits.
D, HD, F, L, V = 32, 32, 64, 2, 8192
TOKENS = 8 * 16
ATTN = 4 * D * HD                        # query, key, value, out
GATED_MLP = 3 * D * F                    # wi_0, wi_1, wo
ATTENTION_FLOPS = 12 * L * HD * 16       # per token: QK^T and AV, forward and backward


def per_step(matmul_params, attention=ATTENTION_FLOPS, tokens=TOKENS):
    return tokens * (6 * matmul_params + attention)


DENSE = per_step(L * (ATTN + GATED_MLP) + D * V)
# One sparse layer of 4 experts (layer 1 of 2): the router [d, E] plus k of the E expert MLPs.
TOP1 = per_step(L * (ATTN + GATED_MLP) + D * V + D * 4)
TOP2 = per_step(L * (ATTN + GATED_MLP) + D * V + D * 4 + GATED_MLP)
# Squared ReLU: one input matrix; dconv: a [3, heads x d_kv] kernel after each of Q, K and V.
PRIMER_EZ = per_step(L * (ATTN + 2 * D * F + 3 * 3 * HD) + D * V)
# t5_tiny.gin, inputs 16 -> targets 8: encoder layers (self-attention, MLP) on 16 tokens, decoder
# layers (self- and cross-attention, MLP) and the logits on 8, attending to 8 + 16 positions.
ENC_DEC = 8 * (16 * (6 * L * (ATTN + GATED_MLP) + 12 * L * HD * 16)
               + 8 * (6 * (L * (2 * ATTN + GATED_MLP) + D * V) + 12 * L * HD * (8 + 16)))

ARMS = {
    "dense": {"gin_files": ["models/decoder_tiny.gin"]},
    "switch": {"gin_files": MOE, "bindings": MOE_LAYOUT + ["MoeConfig.num_selected_experts = 1"]},
    "top2": {"gin_files": MOE, "bindings": MOE_LAYOUT + ["MoeConfig.num_selected_experts = 2"]},
    "primer_ez": {"gin_files": ["models/primer_ez_tiny.gin"]},
    "enc_dec": {"gin_files": ["models/t5_tiny.gin"],
                "bindings": ["TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}"]},
}
HAND = {"dense": DENSE, "switch": TOP1, "top2": TOP2, "primer_ez": PRIMER_EZ,
        "enc_dec": ENC_DEC}


def test_every_arm_trains_the_budget_with_its_own_flops_per_step(tmp_path, clean_gin):
    budget = 2000.5 * DENSE
    exp = experiment.Experiment(name="plan", output_dir=str(tmp_path), arms=ARMS,
                                gin_files=["runs/pretrain.gin"], bindings=SHARED, budget=budget,
                                seeds=(0,), compilation_cache=False)
    plans = experiment.plan(exp)
    assert list(plans) == list(ARMS)
    for name, p in plans.items():
        assert p.flops_per_step == HAND[name], name
        assert p.steps == math.floor(budget / HAND[name]), name
        assert p.flops == p.steps * HAND[name]
        assert -0.01 < p.deviation <= 0, name
        assert p.start_step == 0 and p.eval_every == math.ceil(p.steps / exp.evals_per_run)
    # Equal budgets, unequal steps: top-2 meets two experts per token, so it trains fewer steps;
    # Switch adds only the router to the dense model.
    assert plans["top2"].steps < plans["switch"].steps < plans["dense"].steps
    assert TOP1 - DENSE == TOKENS * 6 * D * 4
    table = experiment.format_plan(exp, plans)
    for name, p in plans.items():
        assert f"{p.steps:>7d}" in table and name in table


def test_an_arm_started_from_another_goes_on_from_its_last_step(tmp_path, clean_gin):
    arms = {"base": {"gin_files": ["models/decoder_tiny.gin"], "budget": 10.5 * DENSE},
            "more": {"gin_files": ["models/decoder_tiny.gin"], "start_from": "base"},
            "up": {"gin_files": MOE, "start_from": "base",
                   "bindings": MOE_LAYOUT + ["InitFromCheckpoint.upcycle = True",
                                             "MoeConfig.num_selected_experts = 2"]}}
    exp = experiment.Experiment(name="chain", output_dir=str(tmp_path), arms=arms,
                                gin_files=["runs/pretrain.gin"], bindings=SHARED,
                                budget=4.2 * DENSE, seeds=(3,), compilation_cache=False)
    plans = experiment.plan(exp)
    assert plans["base"].steps == 10 and plans["base"].start_step == 0
    assert (plans["more"].start_step, plans["more"].steps) == (10, 4)
    up_steps = math.floor(4.2 * DENSE / TOP2)
    assert (plans["up"].start_step, plans["up"].steps) == (10, up_steps)
    assert plans["up"].last_step == 10 + up_steps
    bindings = experiment.run_bindings(exp, plans["up"], 3)
    assert f"InitFromCheckpoint.path = {str(tmp_path / 'base' / 'seed_3')!r}" in bindings
    assert "InitFromCheckpoint.continue_step = True" in bindings
    assert bindings.index("InitFromCheckpoint.continue_step = True") < bindings.index(
        "InitFromCheckpoint.upcycle = True")
    assert "SEED = 3" in bindings


def test_macros_reach_every_run():
    exp = experiment.Experiment(name="m", output_dir="x", arms={"a": {}}, budget=1.0,
                                macros={"LR": 0.5, "NAME": "big"}, bindings=["B = %LR"])
    assert exp.shared_bindings == ("LR = 0.5", "NAME = 'big'", "B = %LR")


@pytest.mark.parametrize("kwargs, message", [
    (dict(arms={}), "at least one arm"),
    (dict(arms={"a": {"gin_file": []}}), "unknown keys"),
    (dict(arms={"a": {"start_from": "b"}, "b": {}}), "not an arm listed before it"),
    (dict(arms={"a": {}}, budget=None), "has no budget"),
    (dict(arms={"a": {}}, baseline="z"), "baseline 'z' is not an arm"),
    (dict(arms={"a": {}}, seeds=(1, 1)), "distinct"),
    (dict(arms={"a": {}}, budget=-1.0), "positive"),
])
def test_bad_definitions_are_refused_with_the_reason(kwargs, message):
    args = dict(name="bad", output_dir="x", budget=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        experiment.Experiment(**args)
