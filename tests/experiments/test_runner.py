"""The experiment runner on tiny budgets: the same seed gives the same curve, a finished run is
never trained again (a killed experiment goes on from where it stopped), an arm can start from
another arm's checkpoint (sparse upcycling), a diverged run is a recorded result, and the
outputs are written."""

import io
import json
import os
import subprocess
import sys

import pytest

from moetx.experiments import experiment, runner
from moetx.search import compare

SHARED = ("MIXTURE_OR_TASK_NAME = 'moetx_en_causal_lm'", "TASK_FEATURE_LENGTHS = {'targets': 16}",
          "BATCH_SIZE = 8", "EVAL_STEPS = 1", "LOG_EVERY = 1", "train.eval_at_start = False")
DENSE_FPS = 218628096.0  # models/decoder_tiny.gin on 8 x 16 tokens (tests/experiments/test_plan)
TINY = {"gin_files": ["models/decoder_tiny.gin"]}
UPCYCLED = {"gin_files": ["models/decoder_tiny.gin", "models/moe_common.gin"],
            "start_from": "base",
            "bindings": ["InitFromCheckpoint.upcycle = True", "MoeConfig.num_experts = 4",
                         "MoeConfig.num_selected_experts = 2", "MoeConfig.sparse_every = 2",
                         "MoeConfig.renormalize_top_k_gates = True",
                         "MoeConfig.eval_capacity_factor = 4.0", "train.eval_at_start = True"]}


def tiny(out, arms, **kw):
    args = dict(name="tiny", output_dir=str(out), arms=arms, gin_files=["runs/pretrain.gin"],
                bindings=SHARED, budget=2.5 * DENSE_FPS, seeds=(0,), evals_per_run=2,
                compilation_cache=False)
    args.update(kw)
    return experiment.Experiment(**args)


def _files(path):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(path) for f in fs}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A dense arm and an arm upcycled from it, killed after the first run and started again:
    the output directory, the runs trained by the second start, the dense run's files between
    the two starts, both starts' summaries and the second start's stderr."""
    import gin

    out = tmp_path_factory.mktemp("experiment") / "exp"
    arms = {"base": TINY, "up": UPCYCLED}
    real = compare.train_run
    trained = []

    def killed_before_up(fitness, bindings, run_dir, steps):
        if os.path.basename(os.path.dirname(run_dir)) == "up":
            raise KeyboardInterrupt  # the experiment is killed here
        return real(fitness, bindings, run_dir, steps)

    def counting(fitness, bindings, run_dir, steps):
        trained.append(run_dir)
        return real(fitness, bindings, run_dir, steps)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(compare, "train_run", killed_before_up)
        with pytest.raises(KeyboardInterrupt):
            runner.run(tiny(out, arms))
        base_files = _files(out / "base" / "seed_0")
        mp.setattr(compare, "train_run", counting)
        stderr = io.StringIO()
        mp.setattr(sys, "stderr", stderr)
        summary = runner.run(tiny(out, arms))
    finally:
        mp.undo()
        gin.clear_config(clear_constants=False)
    return {"out": out, "trained": trained, "base_files": base_files, "summary": summary,
            "stderr": stderr.getvalue()}


def test_a_killed_experiment_goes_on_without_training_finished_runs_again(resumed):
    out = resumed["out"]
    assert resumed["trained"] == [str(out / "up" / "seed_0")]   # only the unfinished run
    assert _files(out / "base" / "seed_0") == resumed["base_files"]  # untouched
    err = resumed["stderr"]
    assert "base seed 0: finished earlier (done.json) | 1/2 runs" in err
    assert "up seed 0: start" in err and "up seed 0: end, eval loss" in err
    assert "2/2 runs" in err and "FLOPs/s" in err and "ETA" in err
    assert "steps x FLOPs/step" in err  # the matched budgets, printed first
    for name in ("plan.json", "curves.json", "summary.json", "summary.md", "loss_vs_flops.png",
                 "loss_vs_seconds.png"):
        assert (out / name).exists(), name
    base = json.load(open(out / "curves.json"))["base"]
    assert base["steps"] == 2
    points = base["seeds"]["0"]["eval"]
    assert [p["step"] for p in points] == [1, 2]
    assert [p["flops"] for p in points] == [DENSE_FPS, 2 * DENSE_FPS]
    assert 0 < points[0]["seconds"] < points[1]["seconds"]
    assert [p["loss"] for p in base["mean"]] == [p["loss"] for p in points]


def test_an_arm_upcycled_from_another_arms_checkpoint(resumed):
    out = resumed["out"]
    curves = json.load(open(out / "curves.json"))
    assert curves["up"]["start_step"] == 2
    up = curves["up"]["seeds"]["0"]
    assert [p["step"] for p in up["eval"]] == [2, 3, 4] and up["eval"][0]["flops"] == 0.0
    # Renormalised top-2 over identical experts, nothing dropped: the upcycled model starts
    # as the dense model it came from.
    base_final = curves["base"]["seeds"]["0"]["final_eval_loss"]
    assert up["eval"][0]["loss"] == pytest.approx(base_final, rel=1e-4)
    assert up["train_fraction_dropped"] is not None
    # The base run's checkpoint is kept for the arm that starts from it; the others go.
    assert [f for f in os.listdir(out / "base" / "seed_0") if f.startswith("checkpoint_")]
    assert not [f for f in os.listdir(out / "up" / "seed_0") if f.startswith("checkpoint_")]
    assert resumed["summary"]["arms"]["up"]["speedup"] is None  # starts after the baseline


def test_the_same_seed_gives_the_same_curve(resumed, tmp_path, clean_gin):
    runner.run(tiny(tmp_path / "again", {"base": TINY}))
    again = json.load(open(tmp_path / "again" / "curves.json"))["base"]["seeds"]["0"]
    first = json.load(open(resumed["out"] / "curves.json"))["base"]["seeds"]["0"]
    assert [p["loss"] for p in again["eval"]] == [p["loss"] for p in first["eval"]]
    assert again["train_loss"] == first["train_loss"]


def test_a_recorded_run_whose_plan_changed_is_refused(resumed, clean_gin):
    with pytest.raises(ValueError, match="the budget or the model changed"):
        runner.run(tiny(resumed["out"], {"base": TINY}, budget=5.5 * DENSE_FPS))


def test_a_diverged_run_is_a_recorded_failure_and_its_dependants_are_not_run(
        tmp_path, monkeypatch, clean_gin):
    def fake_train_run(fitness, bindings, run_dir, steps):
        os.makedirs(run_dir, exist_ok=True)
        return "The run diverged at step 2: the loss is nan" if "/b/" in run_dir else None

    monkeypatch.setattr(compare, "train_run", fake_train_run)
    out = tmp_path / "div"
    summary = runner.run(tiny(out, {"a": TINY, "b": TINY,
                                    "c": {**TINY, "start_from": "b"}}, seeds=(0, 1)))
    arms = summary["arms"]
    assert arms["b"]["failures"] == {"0": "The run diverged at step 2: the loss is nan",
                                     "1": "The run diverged at step 2: the loss is nan"}
    assert arms["b"]["final_eval_loss"] is None
    assert set(arms["c"]["failures"]) == {"0", "1"}
    assert all(f.startswith("not run: the run it starts from (b) failed")
               for f in arms["c"]["failures"].values())
    done = json.load(open(out / "b" / "seed_1" / "done.json"))
    assert done["record"]["failure"].startswith("The run diverged")
    assert "| b | 2 |" in open(out / "summary.md").read()


def test_the_command_lists_an_experiment_files_macros():
    proc = subprocess.run([sys.executable, "-m", "moetx.experiments.run",
                           "--gin_file=experiments/primer.gin", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for macro in ("BUDGET", "SEEDS", "OUTPUT_DIR", "SETUP"):
        assert macro in proc.stdout
