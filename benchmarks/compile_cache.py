#!/usr/bin/env python
"""Time to the first training step with JAX's persistent compilation cache, cold and then warm.

For each setup, `--repeats` pairs of runs of the training command (`python -m moetx.cli.train`,
a process of its own each, as a user starts it), each pair with a new, empty cache directory
(`$MOETX_COMPILATION_CACHE`) and every run in a new `MODEL_DIR`: the first run of a pair
compiles and fills the cache (cold), the second loads what the first stored (warm). A run
trains `--steps` steps on the bundled corpus with no evaluation. From its metrics
(`MetricWriter.writers = ['jsonl']`): `timing/init_or_restore_seconds` (building and
initialising the state, its programs included) and `timing/compilation_seconds` (the first
train step's call, which compiles it); and the whole command's wall time, imports and data
pipeline included.

setups  demo      `make demo`'s job: the MoE-Primer decoder (`models/moe_primer_small.gin`),
                  16 x 128 tokens of causal LM;
        t5_small  T5.1.1-small (`models/t5_1_1_small.gin`, scanned layers), 8 x (512 -> 114)
                  of span corruption.

Prints one JSON line (`compile_cache`); `readme_table.py` renders it. Progress goes to stderr.

  .venv/bin/python benchmarks/compile_cache.py
  .venv/bin/python benchmarks/compile_cache.py --only demo --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from train_throughput import (CpuLoad, add_cpu_flags, environment_fields, finish_json_benchmark,
                              start_json_benchmark)

# setup -> (model gin file, task, feature lengths, batch size).
SETUPS = {
    "demo": ("models/moe_primer_small.gin", "moetx_en_causal_lm", {"targets": 128}, 16),
    "t5_small": ("models/t5_1_1_small.gin", "moetx_en_span_corruption",
                 {"inputs": 512, "targets": 114}, 8),
}
TIMINGS = ("timing/init_or_restore_seconds", "timing/compilation_seconds")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=tuple(SETUPS), action="append",
                   help="measure only this setup (repeatable)")
    p.add_argument("--steps", type=int, default=2, help="training steps per run")
    p.add_argument("--repeats", type=int, default=2, help="cold/warm pairs per setup")
    add_cpu_flags(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1")
    args.only = args.only or list(SETUPS)
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[compile_cache {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr,
          flush=True)


def train_command(setup: str, model_dir: str, steps: int) -> list[str]:
    gin_file, task, lengths, batch = SETUPS[setup]
    return [sys.executable, "-m", "moetx.cli.train", f"--gin_file={gin_file}",
            "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir!r}",
            f"--gin.MIXTURE_OR_TASK_NAME={task!r}", f"--gin.TASK_FEATURE_LENGTHS={lengths!r}",
            f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch}", "--gin.LOG_EVERY=1",
            "--gin.SAVE_EVERY=100000", "--gin.train.eval_dataset_cfg=None",
            "--gin.train.eval_at_start=False", "--gin.MetricWriter.writers=['jsonl']"]


def run_once(setup: str, cache_dir: str, root: str, steps: int, env: dict) -> dict:
    """One training command; its timing scalars, wall time and the machine's other load."""
    model_dir = os.path.join(root, f"run_{time.monotonic_ns()}")
    cmd = train_command(setup, model_dir, steps)
    with CpuLoad() as load:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "MOETX_COMPILATION_CACHE": cache_dir})
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{setup}: the training command exited {proc.returncode}: "
                           + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    scalars: dict[str, float] = {}
    with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
        for line in f:
            for key, value in json.loads(line).items():
                scalars.setdefault(key, value)  # the first value of each (they are logged once)
    missing = [k for k in TIMINGS if k not in scalars]
    if missing:
        raise RuntimeError(f"{setup}: the run logged no {', '.join(missing)}")
    shutil.rmtree(model_dir, ignore_errors=True)
    return {"init_or_restore_s": scalars[TIMINGS[0]], "compilation_s": scalars[TIMINGS[1]],
            "command_s": wall, "command_cpu_cores": load.children_cores,
            "other_cpu_cores": load.cores}


def measure(setup: str, args, env: dict) -> dict:
    runs: dict[str, list] = {"cold": [], "warm": []}
    root = tempfile.mkdtemp(prefix="moetx_compile_cache_")
    try:
        for r in range(args.repeats):
            cache_dir = os.path.join(root, f"cache_{r}")
            for kind in ("cold", "warm"):
                res = run_once(setup, cache_dir, root, args.steps, env)
                runs[kind].append(res)
                log(f"{setup} {kind} (pair {r + 1}/{args.repeats}): init "
                    f"{res['init_or_restore_s']:.1f} s + first step {res['compilation_s']:.1f} s,"
                    f" command {res['command_s']:.1f} s")
            runs.setdefault("cache_mb", []).append(sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir)
                for f in fs) / 2**20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gin_file, task, lengths, batch = SETUPS[setup]
    mean = {kind: {k: statistics.fmean(x[k] for x in runs[kind])
                   for k in ("init_or_restore_s", "compilation_s", "command_s")}
            for kind in ("cold", "warm")}
    return {"gin_file": gin_file, "task": task, "feature_lengths": lengths, "batch": batch,
            "runs": runs, "mean": mean,
            "first_step_speedup": ((mean["cold"]["init_or_restore_s"]
                                    + mean["cold"]["compilation_s"])
                                   / (mean["warm"]["init_or_restore_s"]
                                      + mean["warm"]["compilation_s"]))}


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, xla_flags_before = start_json_benchmark(args)

    import jax
    import torch

    # The commands tune XLA themselves, from the user's flags as they were.
    env = {**os.environ, "XLA_FLAGS": xla_flags_before}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the cache under test is the command's own
    record = {"benchmark": "compile_cache", "steps": args.steps, "repeats": args.repeats,
              "setups": {s: measure(s, args, env) for s in args.only}}
    return finish_json_benchmark(json_out, {
        **record, **environment_fields(args, jax, torch, xla_flags_before)})


if __name__ == "__main__":
    sys.exit(main())
