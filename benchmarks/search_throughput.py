#!/usr/bin/env python
"""Search throughput: trials per hour on a proxy task, one worker against two, and where a
trial's time goes (compilation, training steps, everything else).

Two measurements per proxy (`--proxy nos` = search/nos_proxy.gin's update-rule search on the tiny
decoder; `--proxy primer` = search/primer_proxy.gin's block-program search):

1. Where the time goes: `--trials` trials of the proxy's space, run one after the other in this
   process with `TrainingFitness` (no hurdle, so every trial trains its full budget), with JAX's
   compile-time events summed (`jax.monitoring`: tracing, lowering, XLA compilation) and the
   steady training rate read from each trial's TensorBoard (`timing/steps_per_second` of the
   windows after the first, which holds the compilation). `training` = steps / steady rate;
   `other` = the rest (data pipeline start, eval, checkpoint, bookkeeping). Done with and
   without the persistent compilation cache (`TrainingFitness.compilation_cache`) that lets a
   trial's two stages, and trials with equal programs, share compiled code.
2. Trials per hour: the proxy's own search (hurdles and all) for `--trials` trials with
   `num_workers` 1 and 2 (`parallel_trials` 2 both times, so both run the same trials).

Prints one JSON line (`search_throughput`); progress goes to stderr. Example:

  .venv/bin/python benchmarks/search_throughput.py --proxy nos --trials 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import moetx.cli  # noqa: F401  (XLA's CPU flags before JAX starts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proxy", choices=("nos", "primer"), default="nos")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="override the proxy's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_workers", action="store_true")
    return p.parse_args(argv)


def configure(proxy: str, search_dir: str, extra=()):
    import gin

    from moetx.util import gin_files

    gin.clear_config()
    gin_files.parse_files([f"search/{proxy}_proxy.gin"],
                          [f"SEARCH_DIR = {search_dir!r}", "search.verbose = False",
                           "search.plot = False", *extra])


def breakdown(args, cache: bool) -> dict:
    import gin
    import pyglove as pg
    from jax import monitoring

    from moetx.search import evolution, fitness as fitness_lib, report

    compile_s = {"total": 0.0}

    def listener(name, secs, **kw):
        if name.startswith("/jax/core/compile/"):
            compile_s["total"] += secs

    monitoring.register_event_duration_secs_listener(listener)
    root = tempfile.mkdtemp(prefix="search_bench_")
    configure(args.proxy, root)
    search = evolution.Search()
    fit = search.fitness
    steps = args.steps or fit.train_steps
    budget = {"train_steps": steps} if steps else {"train_flops": fit.train_flops}
    log_every = max((steps or 200) // 4, 1)
    fit = fitness_lib.TrainingFitness(
        gin_files=fit.gin_files, bindings=(*fit.bindings, f"LOG_EVERY = {log_every}"),
        hurdle_fraction=None, compilation_cache=cache, **budget)
    spec = pg.dna_spec(search.space)
    rng = random.Random(args.seed)
    rows = []
    while len(rows) < args.trials:
        cand = pg.materialize(search.space, pg.random_dna(spec, rng))
        try:
            getattr(cand, "validate", lambda: None)()
        except ValueError:
            continue
        trial_dir = os.path.join(root, "trials", f"{len(rows):05d}")
        before = compile_s["total"]
        t0 = time.perf_counter()
        try:
            status = fit(cand, trial_dir, None).status
        except FloatingPointError:  # a rule that diverges: the search records it as failed
            status = "failed"
        wall = time.perf_counter() - t0
        scalars = report.read_scalars(os.path.join(trial_dir, "train"))
        # T5X's name since the scalars follow T5X (`steps_per_sec` before).
        logged = scalars.get("timing/steps_per_second") or scalars.get("steps_per_sec", [])
        rates = [v for _, v in logged][1:]
        trained = logged[-1][0] if logged else 0  # the last step logged (where a NaN stopped it)
        training = trained / statistics.median(rates) if rates else 0.0
        rows.append({"wall_s": wall, "compile_s": compile_s["total"] - before,
                     "training_s": training, "status": status})
        print(f"[bench] cache={cache} trial {len(rows)}: {wall:.1f}s, compile "
              f"{rows[-1]['compile_s']:.1f}s, training {training:.1f}s ({status})",
              file=sys.stderr, flush=True)
    gin.clear_config()
    tot = {k: sum(r[k] for r in rows) for k in ("wall_s", "compile_s", "training_s")}
    return {"trials": len(rows), "steps": steps, "flops": budget.get("train_flops"),
            "seconds_per_trial": tot["wall_s"] / len(rows),
            "fraction_compile": tot["compile_s"] / tot["wall_s"],
            "fraction_training_steps": tot["training_s"] / tot["wall_s"],
            "fraction_outside_training": 1.0 - tot["training_s"] / tot["wall_s"],
            "trials_per_hour_in_process": 3600.0 * len(rows) / tot["wall_s"]}


def workers_rate(args, num_workers: int) -> dict:
    from moetx.search import evolution

    root = tempfile.mkdtemp(prefix="search_bench_w_")
    extra = [f"search.num_workers = {num_workers}", "search.parallel_trials = 2",
             f"search.num_trials = {args.trials}", f"search.seed = {args.seed}"]
    if args.steps:
        extra += [f"TrainingFitness.train_steps = {args.steps}", "TrainingFitness.train_flops = None"]
    configure(args.proxy, root, extra)
    t0 = time.perf_counter()
    summary = evolution.Search().run()
    wall = time.perf_counter() - t0
    print(f"[bench] {num_workers} worker(s): {args.trials} trials in {wall:.0f}s "
          f"{summary['counts']}", file=sys.stderr, flush=True)
    return {"num_workers": num_workers, "trials": args.trials, "seconds": wall,
            "trials_per_hour": 3600.0 * args.trials / wall, "counts": summary["counts"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from moetx.search import fitness as fitness_lib

    fitness_lib.register_tasks()
    load = os.getloadavg()[0]
    result = {"benchmark": "search_throughput", "proxy": args.proxy,
              "load_average_at_start": load}
    result["in_process_no_cache"] = breakdown(args, cache=False)
    result["in_process_cache"] = breakdown(args, cache=True)
    if not args.skip_workers:
        result["workers"] = [workers_rate(args, n) for n in (1, 2)]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
