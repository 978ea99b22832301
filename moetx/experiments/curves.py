"""Pure functions from a run's scalars to its record, and from the records of an arm's seeds to
its curves and summary (no training, no files: the runner reads and writes).

A run's record (`run_record`) holds its evaluation points, each with the step, the FLOPs trained
since the run's start (steps past `start_step` x the arm's FLOPs per step) and the wall time:
the seconds of the training loop up to that step, i.e. the sum of the trainer's `timing/seconds`
windows less the train step's compilation (`timing/compilation_seconds`, a one-off that a
compilation cache shared by the seeds changes from run to run), interpolated linearly between
the logged steps. It includes the in-loop evaluations (the same number per run, each EVAL_STEPS
batches) and checkpoint saves, not the start-up nor a resumed run's restarts. It also holds the
counts an experiment reports: loss spikes (a logged training loss above `spike_factor` times the
mean of the `spike_window` logged losses before it, the rule of
`moetx.trainer.divergence.Monitor`), rewinds, and the MoE dropped-token fraction
(`moe_fraction_dropped`: the mean over the logged training steps at the training capacity
factor, and the final evaluation's at the eval capacity factor), and the CPU the run lost, in
cores (`host_cpu_cores`: the trainer's `host/other_cpu_cores` and `host/steal_cpu_cores`, the
machine's other processes with the hypervisor's steal and the steal alone, averaged over the
logged windows weighted by their seconds): wall-time figures of a run that lost much are slow
because of the machine, not the model; and the host's input time per step
(`input_seconds_per_step`, from `timing/input_seconds`).

An arm's mean curve (`arm_curve`) aggregates its seeds at common x points: every seed's (step,
loss) and (step, seconds) curves are interpolated linearly at the union of the seeds' eval steps
(all seeds of an arm evaluate at the same steps, so this is exact unless a seed stopped early),
and at each step the loss is the mean over the seeds that reach that step, with the spread
(half the range, max - min over 2), min and max; the FLOPs are the step's, the seconds the mean
over the seeds. Diverged seeds are left out of the mean curve (their own curves are kept).

Speed-up to equal quality (`summarize`), per seed s: the baseline arm's seed s reaches its final
eval loss L after x_b (steps, FLOPs or seconds since its start); the arm reaches L after x_a
(interpolated on its eval curve); the speed-up is x_b / x_a (above 1: the arm needs less), None
when the arm never reaches L. An arm's mean speed-up is the mean over the seeds when every seed
reaches L (else None, with the count that did); `of_mean_curves` is the same ratio on the mean
curves. Speed-ups compare arms that start from the same point (the same `start_from`).
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping, Sequence

from moetx.search import compare
from moetx.trainer import divergence

Curve = Sequence[tuple[float, float]]
SPEEDUP_AXES = ("steps", "flops", "seconds")


def interpolate(curve: Curve, x: float) -> float | None:
    """The (x, y) curve (sorted by x) at `x`, linearly interpolated; None outside its range."""
    if not curve or x < curve[0][0] or x > curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return float(y0) if x1 == x0 else float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(curve[-1][1])


def aggregate(curves: Iterable[Curve], xs: Sequence[float] | None = None) -> list[dict]:
    """Mean and spread of several (x, y) curves at common x points.

    Each curve (sorted by x) is interpolated linearly at every x of `xs` (default: the sorted
    union of the curves' x values) within its own range. At each x that at least one curve
    covers: {'x', 'mean', 'spread' (half the range: (max - min) / 2), 'min', 'max', 'n' (the
    number of curves covering x)}.
    """
    curves = [list(c) for c in curves if c]
    if xs is None:
        xs = sorted({float(x) for c in curves for x, _ in c})
    out = []
    for x in xs:
        ys = [y for y in (interpolate(c, x) for c in curves) if y is not None]
        if ys:
            out.append({"x": float(x), "mean": statistics.fmean(ys),
                        "spread": (max(ys) - min(ys)) / 2, "min": min(ys), "max": max(ys),
                        "n": len(ys)})
    return out


def wall_clock(train_scalars: Mapping[str, Curve], start_step: int) -> list[tuple[int, float]]:
    """[(step, seconds of the training loop up to it)] from the cumulative `timing/seconds`
    windows at the logged steps less the compilations logged with them, starting at
    (start_step, 0); [] without timing scalars."""
    windows = [(s, v) for s, v in train_scalars.get("timing/seconds", []) if s > start_step]
    if not windows:
        return []
    compiled = dict(train_scalars.get("timing/compilation_seconds", []))
    out, total = [(int(start_step), 0.0)], 0.0
    for step, seconds in windows:
        total += max(float(seconds) - float(compiled.get(step, 0.0)), 0.0)
        out.append((int(step), total))
    return out


def seconds_per_step(train_scalars: Mapping[str, Curve], start_step: int) -> float | None:
    """The median seconds per training step over the logged windows, leaving out the windows
    that hold a compilation (the first of each session, marked by `timing/compilation_seconds`)."""
    compiled = {s for s, _ in train_scalars.get("timing/compilation_seconds", [])}
    prev, rates = start_step, []
    for step, seconds in train_scalars.get("timing/seconds", []):
        if step <= start_step:
            continue
        if step not in compiled and step > prev:
            rates.append(float(seconds) / (step - prev))
        prev = step
    return statistics.median(rates) if rates else None


def time_weighted_mean(train_scalars: Mapping[str, Curve], tag: str,
                       start_step: int) -> float | None:
    """The scalar `tag` of the logged windows past `start_step`, averaged with each window's
    `timing/seconds` as its weight; None when the run did not log it."""
    seconds = dict(train_scalars.get("timing/seconds", []))
    pairs = [(float(v), float(seconds[s])) for s, v in train_scalars.get(tag, [])
             if s > start_step and s in seconds]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def input_seconds_per_step(train_scalars: Mapping[str, Curve], start_step: int) -> float | None:
    """The host's time getting and placing a batch (`timing/input_seconds`), per step past
    `start_step`; None when the run did not log it."""
    windows = [(int(s), float(v)) for s, v in train_scalars.get("timing/input_seconds", [])
               if s > start_step]
    if not windows:
        return None
    return sum(v for _, v in windows) / (windows[-1][0] - start_step)


def loss_spikes(losses: Curve, spike_factor: float, spike_window: int) -> list[int]:
    """The steps whose logged loss is a spike or not finite, by `divergence.Monitor`'s rule
    over the logged losses (a spike is not added to the running mean it is compared with)."""
    monitor = divergence.Monitor(spike_factor, spike_window)
    steps = []
    for step, loss in losses:
        try:
            monitor.observe(int(step), float(loss), 0.0)
        except divergence.Diverged:
            steps.append(int(step))
    return steps


def _last(curve: Curve) -> float | None:
    return float(curve[-1][1]) if curve else None


def run_record(eval_scalars: Mapping[str, Curve], train_scalars: Mapping[str, Curve], *,
               flops_per_step: float, start_step: int, failure: str | None,
               spike_factor: float, spike_window: int) -> dict[str, Any]:
    """A run's record (module docstring) from its eval and train scalars ({tag: [(step,
    value)]}, as `moetx.search.report.read_scalars` returns them)."""
    eval_loss = eval_scalars.get(compare.loss_tag(eval_scalars), [])
    train_loss = train_scalars.get(compare.loss_tag(train_scalars), [])
    wall = wall_clock(train_scalars, start_step)
    points = [{"step": int(s), "flops": (s - start_step) * flops_per_step,
               "seconds": interpolate(wall, s), "loss": float(y)} for s, y in eval_loss]
    dropped = train_scalars.get("moe_fraction_dropped", [])
    return {
        "eval": points,
        "train_loss": [(int(s), float(y)) for s, y in train_loss],
        "final_eval_loss": None if failure else _last(eval_loss),
        "final_train_loss": None if failure else _last(train_loss),
        "failure": failure,
        "seconds": wall[-1][1] if wall else None,
        "seconds_per_step": seconds_per_step(train_scalars, start_step),
        "compilation_seconds": sum(v for _, v in train_scalars.get(
            "timing/compilation_seconds", [])) or None,
        "loss_spikes": loss_spikes(train_scalars.get("loss", []), spike_factor, spike_window),
        "rewinds": len(train_scalars.get("rewound_from_step", [])),
        "train_fraction_dropped": statistics.fmean(v for _, v in dropped) if dropped else None,
        "eval_fraction_dropped": _last(eval_scalars.get("moe_fraction_dropped", [])),
        "host_cpu_cores": {
            kind: time_weighted_mean(train_scalars, f"host/{kind}_cpu_cores", start_step)
            for kind in ("other", "steal")},
        "input_seconds_per_step": input_seconds_per_step(train_scalars, start_step),
    }


def arm_curve(seeds: Mapping[str, Mapping[str, Any]], flops_per_step: float,
              start_step: int) -> list[dict]:
    """The arm's mean curve over its seeds that did not fail (module docstring): per eval step
    {'step', 'flops', 'seconds', 'loss', 'spread', 'min', 'max', 'n'}."""
    runs = [r for r in seeds.values() if not r.get("failure") and r["eval"]]
    losses = aggregate([(p["step"], p["loss"]) for p in r["eval"]] for r in runs)
    seconds = {a["x"]: a["mean"] for a in aggregate(
        [(p["step"], p["seconds"]) for p in r["eval"] if p["seconds"] is not None]
        for r in runs)}
    return [{"step": int(a["x"]), "flops": (a["x"] - start_step) * flops_per_step,
             "seconds": seconds.get(a["x"]), "loss": a["mean"], "spread": a["spread"],
             "min": a["min"], "max": a["max"], "n": a["n"]} for a in losses]


def _axis(points: Sequence[Mapping[str, Any]], axis: str, start_step: int) -> list:
    """(x, loss) of eval points on a speed-up axis: steps since the start, FLOPs or seconds."""
    if axis == "steps":
        return [(p["step"] - start_step, p["loss"]) for p in points]
    return [(p[axis], p["loss"]) for p in points if p[axis] is not None]


def _speedups(arm: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for axis in SPEEDUP_AXES:
        per_seed: dict[str, float | None] = {}
        for seed, run in arm["seeds"].items():
            ref = base["seeds"].get(seed)
            if ref is None or ref["final_eval_loss"] is None or run.get("failure"):
                per_seed[seed] = None
                continue
            per_seed[seed] = compare.speedup(_axis(ref["eval"], axis, base["start_step"]),
                                             _axis(run["eval"], axis, arm["start_step"]),
                                             ref["final_eval_loss"])
        reached = [v for v in per_seed.values() if v is not None]
        of_mean = None
        if base["mean"] and arm["mean"]:
            of_mean = compare.speedup(_axis(base["mean"], axis, base["start_step"]),
                                      _axis(arm["mean"], axis, arm["start_step"]),
                                      base["mean"][-1]["loss"])
        out[axis] = {"per_seed": per_seed,
                     "mean": statistics.fmean(reached) if per_seed and len(reached) == len(
                         per_seed) else None,
                     "reached": f"{len(reached)}/{len(per_seed)}", "of_mean_curves": of_mean}
    return out


def _stats(values: Iterable[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    return compare.mean_spread(values) if values else None


def summarize(curves: Mapping[str, Mapping[str, Any]], baseline: str) -> dict[str, Any]:
    """Per arm: the budget, final losses (mean, spread, values), failures, speed-ups to the
    baseline's final loss (module docstring), loss spikes, rewinds, seconds per step and the
    dropped-token fractions. `curves` is curves.json's content: arm -> {'flops_per_step',
    'steps', 'start_step', 'start_from', 'budget', 'seeds': {seed: run record}, 'mean': the
    arm's mean curve}."""
    base = curves[baseline]
    arms = {}
    for name, c in curves.items():
        runs = c["seeds"]
        same_start = c.get("start_from") == base.get("start_from")
        arms[name] = {
            "budget": c["budget"], "steps": c["steps"], "start_step": c["start_step"],
            "start_from": c.get("start_from"), "flops_per_step": c["flops_per_step"],
            "final_eval_loss": _stats(r["final_eval_loss"] for r in runs.values()),
            "final_train_loss": _stats(r["final_train_loss"] for r in runs.values()),
            "failures": {s: r["failure"] for s, r in runs.items() if r.get("failure")},
            "speedup": _speedups(c, base) if same_start else None,
            "loss_spikes": {s: len(r["loss_spikes"]) for s, r in runs.items()},
            "rewinds": sum(r["rewinds"] for r in runs.values()),
            "seconds_per_step": _stats(r["seconds_per_step"] for r in runs.values()),
            "train_fraction_dropped": _stats(r["train_fraction_dropped"] for r in runs.values()),
            "eval_fraction_dropped": _stats(r["eval_fraction_dropped"] for r in runs.values()),
            "host_cpu_cores": {kind: _stats(r.get("host_cpu_cores", {}).get(kind)
                                            for r in runs.values())
                               for kind in ("other", "steal")},
            "other_cpu_cores_per_seed": {s: r.get("host_cpu_cores", {}).get("other")
                                         for s, r in runs.items()},
        }
    return {"baseline": baseline, "arms": arms}


def _pm(stats: Mapping[str, Any] | None, fmt: str = ".4f") -> str:
    return "-" if stats is None else f"{stats['mean']:{fmt}} ± {stats['spread']:{fmt}}"


def _speedup_cell(speedup: Mapping[str, Any] | None, axis: str) -> str:
    if speedup is None:
        return "n/a"
    s = speedup[axis]
    if s["mean"] is None:
        return f"- ({s['reached']} seeds reach it)"
    values = [v for v in s["per_seed"].values()]
    return f"{s['mean']:.2f}× ({min(values):.2f}–{max(values):.2f})"


def summary_markdown(name: str, summary: Mapping[str, Any], budget_note: str = "") -> str:
    """A Markdown table of the summary: one row per arm."""
    arms = summary["arms"]
    moe = any(a["train_fraction_dropped"] is not None for a in arms.values())
    lost = {arm: a.get("other_cpu_cores_per_seed") or {} for arm, a in arms.items()}
    recorded = any(v is not None for per_seed in lost.values() for v in per_seed.values())
    head = ["arm", "steps", "FLOPs/step", "final eval loss", "speed-up (FLOPs)",
            "speed-up (wall)", "diverged", "loss spikes"] + (
        ["dropped tokens (train / eval)"] if moe else []) + (
        ["CPU lost to other work (cores)"] if recorded else [])
    rows = []
    for arm, a in arms.items():
        spikes = ", ".join(str(n) for n in a["loss_spikes"].values())
        row = [arm, str(a["steps"]), f"{a['flops_per_step']:.3g}", _pm(a["final_eval_loss"]),
               _speedup_cell(a["speedup"], "flops"), _speedup_cell(a["speedup"], "seconds"),
               f"{len(a['failures'])}/{len(a['loss_spikes'])}", spikes]
        if moe:
            row.append(f"{_pm(a['train_fraction_dropped'], '.3f')} / "
                       f"{_pm(a['eval_fraction_dropped'], '.3f')}")
        if recorded:
            row.append(", ".join("-" if v is None else f"{v:.2f}" for v in lost[arm].values())
                       or "-")
        rows.append(row)
    lines = [f"# {name}", "", budget_note, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Mean ± spread over seeds (spread: half the range). Speed-up: the compute the "
              f"baseline ({summary['baseline']}) needs to reach its final eval loss divided by "
              f"the arm's, per seed; the mean over seeds (min–max in brackets), '-' when a seed "
              f"never reaches it, 'n/a' for arms that start elsewhere. Loss spikes per seed."
              + (" CPU lost: per seed, the cores the machine's other processes and its "
                 "hypervisor took while the run trained (mean over its training), which slows "
                 "its wall time, not its steps ('-': not recorded)." if recorded else ""), ""]
    return "\n".join(lines)
