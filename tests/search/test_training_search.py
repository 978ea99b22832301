"""A search end to end on a tiny real model: trials are moetx training runs (called as a
library) with hurdles, duplicates and a resume; and the comparison runner."""

import json
import os

import pytest

from moetx.search import compare, evolution, fitness, nos

# A search's trials replace this process's gin configuration and leave the last one's behind
# (an optimizer rule bound to make_optimizer): clear it before and after each test.
pytestmark = pytest.mark.usefixtures("clean_gin")

BASE = ("models/decoder_tiny.gin", "runs/pretrain.gin")
BINDINGS = ("import moetx.search.nos", "MIXTURE_OR_TASK_NAME = 'moetx_en_causal_lm'",
            "TASK_FEATURE_LENGTHS = {'targets': 16}", "BATCH_SIZE = 8", "EVAL_STEPS = 1",
            "LOG_EVERY = 100", "train.eval_at_start = False")


def small_space():
    # Four programs, two functions: keep_left(g, .) is SGD and keep_left(m, .) momentum.
    return nos.optimizer_space(learning_rates=(0.5,), max_depth=1, operands=("g", "m"),
                               unaries=("identity",), binaries=("keep_left",))


def test_a_search_of_training_runs_with_hurdles_duplicates_and_resume(tmp_path):
    fit = fitness.TrainingFitness(gin_files=BASE, bindings=BINDINGS, train_steps=2,
                                  hurdle_fraction=0.5)
    # Seed 0 proposes SGD, then momentum, so the third trial repeats one of them.
    args = dict(search_dir=str(tmp_path / "s"), space=small_space(), fitness=fit,
                population_size=2, tournament_size=2, hurdle_min_trials=1, verbose=False,
                plot=False, seed=0)
    evolution.Search(num_trials=3, **args).run()
    recs = evolution.trials(args["search_dir"])
    assert [r["text"].split("(")[1][0] for r in recs[:2]] == ["g", "m"]
    assert [r["status"] for r in recs][2] == evolution.DUPLICATE
    first, second = recs[0], recs[1]
    assert first["status"] == evolution.DONE and first["hurdle_threshold"] is None
    # The second trial met the first one's early reward as its hurdle.
    assert second["hurdle_threshold"] == first["hurdle_reward"]
    assert second["status"] == (evolution.HURDLE if second["hurdle_reward"]
                                < first["hurdle_reward"] else evolution.DONE)
    for r in recs[:2]:
        assert r["reward"] == -r["metrics"]["cross_ent_loss"] < 0
        assert r["cost"]["steps"] == (1 if r["status"] == evolution.HURDLE else 2)
        trial_dir = os.path.join(args["search_dir"], "trials", f"{r['id']:05d}")
        config = open(os.path.join(trial_dir, "config.gin")).read()
        assert f"rule_optimizer.rule = '{r['text'].split(' @ ')[0]}'" in config
        assert not [p for p in os.listdir(trial_dir) if p.startswith("checkpoint_")]
    # Resuming with a larger budget runs only the new trial (a repeat here: no training).
    evolution.Search(num_trials=4, **args).run()
    after = evolution.trials(args["search_dir"])
    assert after[:3] == recs and after[3]["status"] == evolution.DUPLICATE
    summary = json.load(open(os.path.join(args["search_dir"], "summary.json")))
    assert summary["finished"] == 4 and summary["best"]["id"] in (0, 1)


def test_a_flops_budget_buys_the_same_compute_for_every_candidate(tmp_path):
    cand = nos.parse_candidate(f"{nos.POWERSIGN} @ lr 0.5")
    fit = fitness.TrainingFitness(gin_files=BASE, bindings=BINDINGS, train_steps=2)
    fps = fit.flops_per_step(cand, str(tmp_path / "c"))
    # 8 rows of 16 tokens, 6 N per token: the logits projection alone has 32 x 8192 weights.
    assert 6 * 8 * 16 * 32 * 8192 < fps < 6 * 8 * 16 * 600_000
    by_flops = fitness.TrainingFitness(gin_files=BASE, bindings=BINDINGS,
                                       train_flops=3.5 * fps)
    assert by_flops.budget(cand, str(tmp_path / "c")) == (3, fps)


def test_compare_summarises_speedup_to_equal_loss_and_divergence():
    curves = {
        "base": {"flops_per_step": 10.0, "steps": 4, "seeds": {"0": {
            "eval_loss": [(2, 6.0), (4, 5.0)], "train_loss": [(4, 4.8)],
            "final_eval_loss": 5.0, "final_train_loss": 4.8, "failure": None}}},
        # Reaches 5.0 halfway between steps 1 (5.5) and 2 (4.5) at 20 FLOPs per step: 30 FLOPs
        # against the baseline's 40.
        "fast": {"flops_per_step": 20.0, "steps": 2, "seeds": {"0": {
            "eval_loss": [(1, 5.5), (2, 4.5)], "train_loss": [(2, 4.4)],
            "final_eval_loss": 4.5, "final_train_loss": 4.4, "failure": None}}},
        "nan": {"flops_per_step": 10.0, "steps": 4, "seeds": {"0": {
            "eval_loss": [], "train_loss": [], "final_eval_loss": None,
            "final_train_loss": None, "failure": "Loss became nan at step 2"}}},
    }
    out = compare.summarize(curves)
    assert out["base"]["flops_speedup_to_baseline_loss"] == [1.0]
    assert out["fast"]["flops_speedup_to_baseline_loss"] == [40.0 / 30.0]
    assert out["fast"]["final_eval_loss"]["mean"] == 4.5
    assert out["nan"]["final_eval_loss"] is None
    assert out["nan"]["failures"] == ["Loss became nan at step 2"]
    assert out["nan"]["flops_speedup_to_baseline_loss"] == [None]
