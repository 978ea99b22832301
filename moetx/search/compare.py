"""Comparing what a search found against baselines on a larger run: named arms (gin bindings) of
one base configuration, trained for the same steps or the same training FLOPs, over seeds.

`compare()` (gin name `compare`) trains every arm and seed as an ordinary moetx run (in this
process, one after the other, each in `OUTPUT_DIR/<arm>/seed_<s>`; a run resumes from its own
checkpoints, so a killed comparison resumes; a run that diverges is recorded as a failure of its
arm), then writes:

- `curves.json`: per arm and seed, the validation loss (and training loss) against steps and
  FLOPs, the final values and the FLOPs per step;
- `summary.json`: per arm the final validation and training loss (mean, spread over seeds), and
  the speed-up to equal loss against the first arm (the baseline): the baseline's steps (or
  FLOPs) to its final validation loss divided by the arm's steps (or FLOPs) to reach the same
  loss, interpolated on the eval curve; below 1 when the arm never gets there (then None);
- `eval_loss.png` and `train_loss.png` (with matplotlib).

    python -m moetx.search.run_compare --gin_file=search/nos_transfer.gin \\
        --gin.OUTPUT_DIR="'runs/nos_transfer'"

The pieces are public for the richer runner of `moetx.experiments` (arms with their own model
gin files, resume by finished run, wall-time curves, mean and spread over seeds):
`matched_steps` (the steps a FLOPs budget buys), `train_run` (one run, divergence as a result),
`run_losses` (a run's loss curves from its scalars), `steps_to_reach`, `speedup` and
`mean_spread`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Mapping, Sequence

import gin

from moetx.search import fitness as fitness_lib, report
from moetx.trainer import train as train_lib


def loss_tag(tags: Mapping[str, Any]) -> str:
    """The loss scalar of a run: `cross_ent_loss` when the model reports it (a language model's
    loss without its z-loss), else `loss`."""
    return "cross_ent_loss" if "cross_ent_loss" in tags else "loss"


def steps_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first x at which the (x, loss) curve reaches `target`, linearly interpolated between
    the point before and the first point at or below it; None when it never does."""
    prev = None
    for x, y in curve:
        if y <= target:
            if prev is None or prev[1] == y:
                return float(x)
            (x0, y0) = prev
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
        prev = (x, y)
    return None


def speedup(baseline: Sequence[tuple[float, float]], arm: Sequence[tuple[float, float]],
            target: float) -> float | None:
    """The baseline's x (steps, FLOPs or seconds) to reach `target` divided by the arm's; None
    when either curve never reaches it (or the arm reaches it at x = 0)."""
    ref, got = steps_to_reach(baseline, target), steps_to_reach(arm, target)
    return None if ref is None or not got else ref / got


def mean_spread(values: Sequence[float]) -> dict[str, Any]:
    """{'mean', 'spread' (half the range; 0 for one value), 'values'}."""
    return {"mean": statistics.fmean(values),
            "spread": (max(values) - min(values)) / 2 if len(values) > 1 else 0.0,
            "values": list(values)}


def matched_steps(flops_per_step: float, train_steps: int | None = None,
                  train_flops: float | None = None, arm: str = "") -> int:
    """The steps of a budget: `train_steps`, or floor(train_flops / flops_per_step), so arms
    of different sizes train for the same compute. Raises ValueError when the FLOPs buy no
    step."""
    if (train_steps is None) == (train_flops is None):
        raise ValueError("Give exactly one budget: train_steps or train_flops.")
    steps = int(train_steps) if train_steps is not None else int(train_flops // flops_per_step)
    if steps < 1:
        raise ValueError(f"Arm {arm!r}: the FLOPs budget {train_flops:.3g} buys no step "
                         f"({flops_per_step:.3g} FLOPs per step).")
    return steps


def train_run(fitness: fitness_lib.TrainingFitness, bindings: Sequence[str], run_dir: str,
              steps: int) -> str | None:
    """Trains one run of `fitness`'s configuration plus `bindings` to step `steps` in `run_dir`
    (resuming from its checkpoints). Returns None, or the first line of the error when the run
    diverged (a diverged run is a result of its arm, not an error of the comparison)."""
    fitness.parse(list(bindings), run_dir, steps)
    try:
        train_lib.train()
    except FloatingPointError as e:
        return str(e).splitlines()[0]
    return None


def run_losses(run_dir: str) -> tuple[list, list]:
    """(eval loss curve, train loss curve) of a run directory, each [(step, loss)]."""
    ev, tr = (report.read_scalars(os.path.join(run_dir, d)) for d in ("eval", "train"))
    return ev.get(loss_tag(ev), []), tr.get(loss_tag(tr), [])


@gin.configurable("compare")
def compare(output_dir: str = gin.REQUIRED, gin_files: Sequence[str] = gin.REQUIRED,
            arms: Mapping[str, Sequence[str]] = gin.REQUIRED, bindings: Sequence[str] = (),
            train_steps: int | None = None, train_flops: float | None = None,
            seeds: Sequence[int] = (0,), eval_every: int = 50) -> dict[str, Any]:
    """Trains each arm for each seed and summarises (see the module docstring).

    Args:
      output_dir: where the runs, curves and plots go.
      gin_files: the base run (model and run gin files, as for `TrainingFitness`).
      arms: arm name -> gin bindings; the first arm is the baseline of the speed-ups.
      bindings: bindings for every arm.
      train_steps / train_flops: the budget (FLOPs: each arm trains
        floor(train_flops / its FLOPs per step) steps).
      seeds: values of the SEED macro (initialisation and data order).
      eval_every: steps between evaluations (the eval curve's resolution).
    """
    if not arms:
        raise ValueError("compare needs at least one arm.")
    fitness_lib.register_tasks()
    os.makedirs(output_dir, exist_ok=True)
    base = fitness_lib.TrainingFitness(
        gin_files=gin_files, bindings=tuple(bindings) + (f"EVAL_EVERY = {eval_every}",),
        train_steps=train_steps, train_flops=train_flops, compilation_cache=False)
    curves: dict[str, dict] = {}
    for arm, arm_bindings in arms.items():
        arm_bindings = list(arm_bindings)
        base.parse(arm_bindings, os.path.join(output_dir, arm), 1)
        fps = base.planned_flops_per_step()
        steps = matched_steps(fps, train_steps, train_flops, arm)
        curves[arm] = {"flops_per_step": fps, "steps": steps, "seeds": {}}
        for seed in seeds:
            run_dir = os.path.join(output_dir, arm, f"seed_{seed}")
            print(f"[compare] {arm} seed {seed}: {steps} steps of {fps:.3g} FLOPs",
                  file=sys.stderr, flush=True)
            failure = train_run(base, [*arm_bindings, f"SEED = {seed}"], run_dir, steps)
            if failure:
                print(f"[compare] {arm} seed {seed}: {failure}", file=sys.stderr, flush=True)
            ev_curve, tr_curve = run_losses(run_dir)
            curves[arm]["seeds"][str(seed)] = {
                "eval_loss": ev_curve, "train_loss": tr_curve,
                "final_eval_loss": ev_curve[-1][1] if ev_curve and not failure else None,
                "final_train_loss": tr_curve[-1][1] if tr_curve and not failure else None,
                "failure": failure}
    summary = summarize(curves)
    with open(os.path.join(output_dir, "curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for kind in ("eval_loss", "train_loss"):
        lines = {}
        for arm, c in curves.items():
            for seed, run in c["seeds"].items():
                lines[f"{arm} (seed {seed})"] = [(s * c["flops_per_step"], y)
                                                 for s, y in run[kind]]
        report.plot_curves(lines, os.path.join(output_dir, f"{kind}.png"),
                           "training FLOPs", kind.replace("_", " "))
    print(json.dumps({"compare": summary}), flush=True)
    return summary


def summarize(curves: dict[str, dict]) -> dict[str, Any]:
    """Per arm: final losses (mean, spread), failures, and the FLOPs speed-up to the first
    arm's final validation loss, per seed (see the module docstring)."""
    arms = list(curves)
    baseline = curves[arms[0]]
    out = {}
    for arm in arms:
        c = curves[arm]
        runs = list(c["seeds"].values())
        finals = [r["final_eval_loss"] for r in runs if r["final_eval_loss"] is not None]
        trains = [r["final_train_loss"] for r in runs if r["final_train_loss"] is not None]
        speedups = []
        for seed, run in c["seeds"].items():
            ref = baseline["seeds"].get(seed)
            if not ref or ref["final_eval_loss"] is None:
                continue
            speedups.append(speedup(
                [(s * baseline["flops_per_step"], y) for s, y in ref["eval_loss"]],
                [(s * c["flops_per_step"], y) for s, y in run["eval_loss"]],
                ref["final_eval_loss"]))
        out[arm] = {"steps": c["steps"], "flops_per_step": c["flops_per_step"],
                    "failures": [r["failure"] for r in runs if r.get("failure")],
                    "final_eval_loss": mean_spread(finals) if finals else None,
                    "final_train_loss": mean_spread(trains) if trains else None,
                    "flops_speedup_to_baseline_loss": speedups}
    return out
