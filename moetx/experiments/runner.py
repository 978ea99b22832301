"""Running an experiment: every (arm, seed) as an ordinary moetx training run, in order, then the
curves, summary and plots.

`run()` first prints the matched budgets (`experiment.format_plan`), then trains each arm's
seeds in `OUTPUT_DIR/<arm>/seed_<s>` (`moetx.search.compare.train_run`: `train()` called as a
library, in this process). A run that diverges is a result (recorded as a failure of its arm),
not an error. When a run ends, its record (curves and counts, `curves.run_record`) is written
to `done.json` in its directory; a run with a `done.json` is never trained again, and one
without resumes from its own checkpoints, so a killed experiment, started again with the same
command, goes on where it stopped. A line on stderr marks each run's start and end, with the
runs done, the time elapsed, the FLOPs per second of this session and the time left at that
rate.

Outputs in OUTPUT_DIR: `plan.json` (the matched budgets), `curves.json` (per arm: the budget and
each seed's record, and the mean curve over seeds), `summary.json` (`curves.summarize`),
`summary.md` (its table), `loss_vs_flops.png` and `loss_vs_seconds.png`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping

from moetx.experiments import curves as curves_lib, plots
from moetx.experiments.claims import LOADED_CORES
from moetx.experiments.experiment import ArmPlan, Experiment, format_plan, plan, run_bindings
from moetx.search import compare, fitness as fitness_lib, report
from moetx.trainer.metrics import format_duration

DONE = "done.json"


def log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def _write_json(path: str, obj: Any) -> None:
    """Writes `obj` to `path` atomically (a kill leaves the old file or the new one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_done(run_dir: str) -> dict | None:
    """A finished run's record, or None when the run has not finished."""
    path = os.path.join(run_dir, DONE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class Progress:
    """Runs done out of the total, elapsed time, FLOPs per second of this session's training
    and the time left at that rate (finished runs found on disk count as done)."""

    def __init__(self, total_runs: int, total_flops: float):
        self.total_runs, self.total_flops = total_runs, total_flops
        self.done_runs, self.done_flops = 0, 0.0
        self.trained_flops, self.trained_seconds = 0.0, 0.0
        self.started = time.perf_counter()

    def finished(self, flops: float, seconds: float | None = None) -> None:
        """One run done: trained now in `seconds`, or found finished (None)."""
        self.done_runs += 1
        self.done_flops += flops
        if seconds is not None:
            self.trained_flops += flops
            self.trained_seconds += seconds

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.trained_flops / self.trained_seconds if self.trained_seconds else None
        eta = ((self.total_flops - self.done_flops) / rate) if rate else float("nan")
        return (f"{self.done_runs}/{self.total_runs} runs | elapsed {format_duration(elapsed)}"
                f" | {f'{rate:.3g} FLOPs/s' if rate else 'rate ?'} | ETA {format_duration(eta)}")


def _train(exp: Experiment, p: ArmPlan, seed: int, records: Mapping[str, dict]) -> dict:
    """Trains one run (unless the run it starts from failed) and returns its record."""
    run_dir = exp.run_dir(p.name, seed)
    if p.arm.start_from is not None:
        source = records[p.arm.start_from][str(seed)]
        if source["failure"]:
            failure = f"not run: the run it starts from ({p.arm.start_from}) failed"
            return curves_lib.run_record({}, {}, flops_per_step=p.flops_per_step,
                                         start_step=p.start_step, failure=failure,
                                         spike_factor=exp.spike_factor,
                                         spike_window=exp.spike_window)
    failure = compare.train_run(p.fitness, run_bindings(exp, p, seed), run_dir, p.last_step)
    ev, tr = (report.read_scalars(os.path.join(run_dir, d)) for d in ("eval", "train"))
    return curves_lib.run_record(ev, tr, flops_per_step=p.flops_per_step,
                                 start_step=p.start_step, failure=failure,
                                 spike_factor=exp.spike_factor, spike_window=exp.spike_window)


def _check_recorded(done: dict, p: ArmPlan, run_dir: str) -> None:
    if (done["steps"], done["start_step"]) != (p.steps, p.start_step):
        raise ValueError(
            f"{run_dir} finished {done['steps']} steps from step {done['start_step']}, but the "
            f"plan now trains {p.steps} from step {p.start_step} (the budget or the model "
            f"changed); use another experiment.output_dir, or delete that run.")


def run(exp: Experiment | None = None) -> dict[str, Any]:
    """Runs `exp` (default: the gin-configured `experiment`) and returns its summary (see the
    module docstring)."""
    exp = exp if exp is not None else Experiment()
    fitness_lib.register_tasks()
    os.makedirs(exp.output_dir, exist_ok=True)
    if exp.compilation_cache:
        fitness_lib.use_compilation_cache(os.path.abspath(os.path.join(exp.output_dir,
                                                                       "jax_cache")))
    plans = plan(exp)
    print(format_plan(exp, plans), file=sys.stderr, flush=True)
    _write_json(os.path.join(exp.output_dir, "plan.json"), {
        "name": exp.name, "seeds": list(exp.seeds), "baseline": exp.baseline_arm,
        "arms": {n: {"budget": p.budget, "flops_per_step": p.flops_per_step, "steps": p.steps,
                     "flops": p.flops, "deviation": p.deviation, "start_step": p.start_step,
                     "start_from": p.arm.start_from, "eval_every": p.eval_every,
                     "gin_files": list(p.fitness.gin_files),
                     "bindings": [*p.fitness.bindings, *p.arm.bindings]}
                 for n, p in plans.items()}})
    needed = {p.arm.start_from for p in plans.values() if p.arm.start_from}
    progress = Progress(len(plans) * len(exp.seeds),
                        sum(p.flops for p in plans.values()) * len(exp.seeds))
    records: dict[str, dict[str, dict]] = {}
    for name, p in plans.items():
        records[name] = {}
        for seed in exp.seeds:
            run_dir = exp.run_dir(name, seed)
            done = read_done(run_dir)
            if done is not None:
                _check_recorded(done, p, run_dir)
                records[name][str(seed)] = done["record"]
                progress.finished(p.flops)
                log(f"{name} seed {seed}: finished earlier ({DONE}) | {progress.line()}")
                continue
            log(f"{name} seed {seed}: start, {p.steps} steps of {p.flops_per_step:.3g} FLOPs | "
                f"{progress.line()}")
            tick = time.perf_counter()
            record = _train(exp, p, seed, records)
            os.makedirs(run_dir, exist_ok=True)
            _write_json(os.path.join(run_dir, DONE), {
                "arm": name, "seed": seed, "steps": p.steps, "start_step": p.start_step,
                "flops_per_step": p.flops_per_step, "record": record})
            if not exp.keep_checkpoints and name not in needed:
                for path in glob.glob(os.path.join(run_dir, "checkpoint_*")):
                    shutil.rmtree(path, ignore_errors=True)
            records[name][str(seed)] = record
            progress.finished(p.flops, time.perf_counter() - tick)
            end = f"FAILED ({record['failure']})" if record["failure"] else (
                f"eval loss {record['final_eval_loss']:.4f}"
                if record["final_eval_loss"] is not None else "no eval")
            lost = record["host_cpu_cores"]["other"]
            if lost is not None and lost > LOADED_CORES:
                end += (f" (it lost {lost:.2f} CPU cores to other work, "
                        f"{record['host_cpu_cores']['steal'] or 0:.2f} of them to the "
                        f"hypervisor: its wall time is slower than the model's)")
            log(f"{name} seed {seed}: end, {end} | {progress.line()}")
    return write_outputs(exp, plans, records)


def write_outputs(exp: Experiment, plans: Mapping[str, ArmPlan],
                  records: Mapping[str, Mapping[str, dict]]) -> dict[str, Any]:
    """curves.json, summary.json, summary.md and the plots of finished runs' records."""
    curves = {}
    for name, p in plans.items():
        curves[name] = {"budget": p.budget, "flops_per_step": p.flops_per_step,
                        "steps": p.steps, "start_step": p.start_step,
                        "start_from": p.arm.start_from, "seeds": dict(records[name]),
                        "mean": curves_lib.arm_curve(records[name], p.flops_per_step,
                                                     p.start_step)}
    summary = curves_lib.summarize(curves, exp.baseline_arm)
    summary = {"name": exp.name, "seeds": list(exp.seeds), **summary}
    out = exp.output_dir
    _write_json(os.path.join(out, "curves.json"), curves)
    _write_json(os.path.join(out, "summary.json"), summary)
    budgets = ", ".join(sorted({f"{p.budget:.3g}" for p in plans.values()}))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(curves_lib.summary_markdown(
            exp.name, summary, f"Budget: {budgets} training FLOPs per run; seeds "
                               f"{', '.join(map(str, exp.seeds))}."))
    plotted = [plots.plot_arms(curves, axis, os.path.join(out, f"loss_vs_{axis}.png"),
                               f"{exp.name}: eval loss") for axis in ("flops", "seconds")]
    if not all(plotted):
        log("no plot written (matplotlib is not installed: pip install 'moetx[plots]', or no "
            "run has an eval curve).")
    print(json.dumps({"experiment": exp.name, "output_dir": out, "arms": {
        a: {"final_eval_loss": s["final_eval_loss"] and s["final_eval_loss"]["mean"],
            "flops_speedup": s["speedup"] and s["speedup"]["flops"]["mean"]}
        for a, s in summary["arms"].items()}}), flush=True)
    return summary
