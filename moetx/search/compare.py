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


def _loss_tag(tags: Mapping[str, Any]) -> str:
    return "cross_ent_loss" if "cross_ent_loss" in tags else "loss"


def _steps_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first x at which the (x, loss) curve reaches `target`, linearly interpolated."""
    prev = None
    for x, y in curve:
        if y <= target:
            if prev is None or prev[1] == y:
                return float(x)
            (x0, y0) = prev
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
        prev = (x, y)
    return None


def _mean_spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "spread": (max(values) - min(values)) / 2 if len(values) > 1 else 0.0,
            "values": list(values)}


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
        probe_dir = os.path.join(output_dir, arm)
        base.parse(arm_bindings, probe_dir, 1)
        fps = base.planned_flops_per_step()
        steps = train_steps if train_steps is not None else int(train_flops // fps)
        if steps < 1:
            raise ValueError(f"Arm {arm!r}: the FLOPs budget buys no step ({fps:.3g} per step).")
        curves[arm] = {"flops_per_step": fps, "steps": steps, "seeds": {}}
        for seed in seeds:
            run_dir = os.path.join(output_dir, arm, f"seed_{seed}")
            print(f"[compare] {arm} seed {seed}: {steps} steps of {fps:.3g} FLOPs",
                  file=sys.stderr, flush=True)
            base.parse([*arm_bindings, f"SEED = {seed}"], run_dir, steps)
            try:
                train_lib.train()
                failure = None
            except FloatingPointError as e:  # a diverged arm is a result, not an error
                failure = str(e).splitlines()[0]
                print(f"[compare] {arm} seed {seed}: {failure}", file=sys.stderr, flush=True)
            ev, tr = (report.read_scalars(os.path.join(run_dir, d)) for d in ("eval", "train"))
            ev_curve = ev.get(_loss_tag(ev), [])
            tr_curve = tr.get(_loss_tag(tr), [])
            curves[arm]["seeds"][str(seed)] = {
                "eval_loss": ev_curve, "train_loss": tr_curve,
                "final_eval_loss": ev_curve[-1][1] if ev_curve else None,
                "final_train_loss": tr_curve[-1][1] if tr_curve else None,
                "failure": failure}
            if failure:
                run = curves[arm]["seeds"][str(seed)]
                run["final_eval_loss"] = run["final_train_loss"] = None
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
            target = ref["final_eval_loss"]
            ref_flops = _steps_to_reach(
                [(s * baseline["flops_per_step"], y) for s, y in ref["eval_loss"]], target)
            arm_flops = _steps_to_reach(
                [(s * c["flops_per_step"], y) for s, y in run["eval_loss"]], target)
            speedups.append(None if arm_flops is None or not arm_flops else
                            ref_flops / arm_flops)
        out[arm] = {"steps": c["steps"], "flops_per_step": c["flops_per_step"],
                    "failures": [r["failure"] for r in runs if r.get("failure")],
                    "final_eval_loss": _mean_spread(finals) if finals else None,
                    "final_train_loss": _mean_spread(trains) if trains else None,
                    "flops_speedup_to_baseline_loss": speedups}
    return out
