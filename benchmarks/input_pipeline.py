#!/usr/bin/env python
"""The input pipeline's means of issue 16, measured one by one: sequence packing and prefetching.

packing   For each pretraining objective on the bundled corpus (causal LM 128 tokens, prefix LM
          128 + 128, span corruption 512 -> 114: T5.1.1-small's lengths), the first `--batches`
          batches of `--batch` rows of the shuffled train split, read through the trainer's
          input pipeline (`moetx.trainer.train.make_batches`) with the language models' own
          feature converters, once packed (`DatasetConfig.pack = True`, the default) and once
          not. Counted per batch: the target tokens that carry a loss, and the share of the
          decoder's (and encoder's) positions that hold a token. A step costs the same either
          way (the shapes are the same), so the ratio of loss tokens per batch is packing's
          speed-up in trained tokens per second.
prefetch  Short training runs through `train()` on the bundled corpus, at `make demo`'s settings
          (the MoE-Primer decoder, 16 x 128 tokens; and `make demo MODEL=t5`'s encoder-decoder
          on span corruption, 16 x (128 -> 32)), with `DatasetConfig.prefetch` 0 (as shipped)
          and 2, `--repeats` times each in orders that alternate (0, 2, then 2, 0, ...), so
          neither a drift of the machine's speed nor the first run of a process (the slowest)
          favours one setting; `order` in the line records them. From each run's TensorBoard scalars, past the first log window (it
          holds the compilation): the host's time getting and placing a batch per step
          (`timing/input_seconds`), the wall time per step (from `timing/steps_per_second`),
          and the other processes' CPU use (`host/other_cpu_cores`). The loop already prepares
          step n+1's batch while step n runs, so prefetching can only gain where that
          preparation is longer than a step, and on this 2-core machine tf.data's background
          threads share the cores with XLA's.

Prints one JSON line (`input_pipeline`); `readme_table.py` renders it. Progress goes to stderr.

  .venv/bin/python benchmarks/input_pipeline.py
  .venv/bin/python benchmarks/input_pipeline.py --batches 4 --steps 20 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

from train_throughput import (add_cpu_flags, environment_fields, finish_json_benchmark,
                              start_json_benchmark)

# objective -> (task, feature lengths, the LM model's feature converter class name in seqio).
PACKING = {
    "causal_lm": ("moetx_en_causal_lm", {"targets": 128}, "DecoderFeatureConverter"),
    "prefix_lm": ("moetx_en_prefix_lm", {"inputs": 128, "targets": 128},
                  "PrefixLMFeatureConverter"),
    "span_corruption": ("moetx_en_span_corruption", {"inputs": 512, "targets": 114},
                        "EncDecFeatureConverter"),
}

# setup -> (model gin file, task, feature lengths): `make demo`'s jobs.
PREFETCH = {
    "demo_moe_primer": ("models/moe_primer_small.gin", "moetx_en_causal_lm", {"targets": 128}),
    "demo_t5": ("models/t5_demo.gin", "moetx_en_span_corruption", {"inputs": 128, "targets": 32}),
}
PREFETCH_VALUES = (0, 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=50, help="batches counted per packing setting")
    p.add_argument("--batch", type=int, default=8, help="rows per batch in the packing count")
    p.add_argument("--steps", type=int, default=60, help="training steps per prefetch run")
    p.add_argument("--log_every", type=int, default=10, help="steps per log window")
    p.add_argument("--repeats", type=int, default=2, help="runs per prefetch value and setup")
    p.add_argument("--only", choices=("packing", "prefetch"), help="measure only this part")
    add_cpu_flags(p)
    args = p.parse_args(argv)
    for name in ("batches", "batch", "steps", "log_every", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.steps < 2 * args.log_every:
        p.error("--steps must be at least twice --log_every (the first window is dropped)")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[input_pipeline {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr,
          flush=True)


def count_batch(batch) -> dict:
    """Loss tokens and filled positions of one batch of model features."""
    import numpy as np

    out = {"loss_tokens": float(np.sum(batch["decoder_loss_weights"] > 0)),
           "decoder_filled": float(np.mean(batch["decoder_target_tokens"] > 0))}
    if "encoder_input_tokens" in batch:
        out["encoder_filled"] = float(np.mean(batch["encoder_input_tokens"] > 0))
    return out


def measure_packing(args) -> dict:
    """packing -> objective -> {'packed', 'unpacked': mean counts per batch, 'loss_tokens_ratio'}."""
    import seqio

    from moetx.trainer import data
    from moetx.trainer.train import make_batches

    out = {}
    for objective, (task, lengths, converter) in PACKING.items():
        model = types.SimpleNamespace(feature_converter=getattr(seqio, converter)(pack=True))
        trainer = types.SimpleNamespace(model=model,
                                        local_rows=lambda global_bs: slice(0, global_bs))
        row = {}
        for pack in (True, False):
            cfg = data.DatasetConfig(task, lengths, batch_size=args.batch, pack=pack, seed=0)
            it, _ = make_batches(trainer, cfg, 0, None)
            counts = [count_batch(next(it)) for _ in range(args.batches)]
            row["packed" if pack else "unpacked"] = {
                k: statistics.fmean(c[k] for c in counts) for k in counts[0]}
        row["loss_tokens_ratio"] = (row["packed"]["loss_tokens"]
                                    / row["unpacked"]["loss_tokens"])
        row.update(task=task, feature_lengths=lengths, converter=converter)
        log(f"packing {objective}: {row['packed']['loss_tokens']:.0f} vs "
            f"{row['unpacked']['loss_tokens']:.0f} loss tokens a batch packed / not "
            f"({row['loss_tokens_ratio']:.2f}x)")
        out[objective] = row
    return out


def window_figures(train_dir: str, log_every: int) -> dict:
    """Per-step figures of a run's log windows past the first."""
    from moetx.search import report

    scalars = report.read_scalars(train_dir)
    first = min(s for s, _ in scalars["timing/steps_per_second"])

    def later(tag):
        return [v for s, v in scalars.get(tag, []) if s > first]

    rates = later("timing/steps_per_second")
    inputs = later("timing/input_seconds")
    return {"seconds_per_step": statistics.fmean(1.0 / r for r in rates),
            "input_seconds_per_step": sum(inputs) / (len(inputs) * log_every),
            "other_cpu_cores": statistics.fmean(later("host/other_cpu_cores") or [0.0]),
            "windows": len(rates)}


def train_once(gin_file: str, task: str, lengths: dict, prefetch: int, args, root: str) -> dict:
    import gin

    from moetx.trainer import train as train_lib
    from moetx.util import gin_files

    model_dir = os.path.join(root, f"run_{time.monotonic_ns()}")
    gin.clear_config()
    gin_files.parse_files([gin_file, "runs/pretrain.gin"], [
        f"MODEL_DIR = {model_dir!r}", f"MIXTURE_OR_TASK_NAME = {task!r}",
        f"TASK_FEATURE_LENGTHS = {lengths!r}", f"TRAIN_STEPS = {args.steps}",
        "BATCH_SIZE = 16", "WARMUP_STEPS = 100", f"LOG_EVERY = {args.log_every}",
        "SAVE_EVERY = 100000", "train.eval_dataset_cfg = None", "train.eval_at_start = False",
        f"train/DatasetConfig.prefetch = {prefetch}"])
    gin.finalize()
    train_lib.train()
    figures = window_figures(os.path.join(model_dir, "train"), args.log_every)
    shutil.rmtree(model_dir, ignore_errors=True)
    return figures


def measure_prefetch(args) -> dict:
    """prefetch -> setup -> {'<value>': [figures of each run], 'speedup': ...}."""
    out = {}
    root = tempfile.mkdtemp(prefix="moetx_input_pipeline_")
    try:
        for setup, (gin_file, task, lengths) in PREFETCH.items():
            runs: dict[str, list] = {str(v): [] for v in PREFETCH_VALUES}
            order = []
            for r in range(args.repeats):
                values = PREFETCH_VALUES if r % 2 == 0 else PREFETCH_VALUES[::-1]
                order.extend(values)
                for v in values:
                    f = train_once(gin_file, task, lengths, v, args, root)
                    runs[str(v)].append(f)
                    log(f"prefetch {setup} = {v} (run {r + 1}/{args.repeats}): "
                        f"{f['seconds_per_step'] * 1e3:.0f} ms/step, input "
                        f"{f['input_seconds_per_step'] * 1e3:.1f} ms/step, other CPU "
                        f"{f['other_cpu_cores']:.2f} cores")
            summary = {v: {k: statistics.fmean(f[k] for f in fs)
                           for k in ("seconds_per_step", "input_seconds_per_step",
                                     "other_cpu_cores")} for v, fs in runs.items()}
            out[setup] = {
                "gin_file": gin_file, "task": task, "feature_lengths": lengths,
                "batch": 16, "order": order, "runs": runs, "mean": summary,
                "speedup": (summary[str(PREFETCH_VALUES[0])]["seconds_per_step"]
                            / summary[str(PREFETCH_VALUES[-1])]["seconds_per_step"])}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, xla_flags_before = start_json_benchmark(args)

    import jax
    import torch

    from moetx import tasks

    tasks.register_all()
    record = {"benchmark": "input_pipeline", "batches": args.batches, "batch": args.batch,
              "steps": args.steps, "log_every": args.log_every, "repeats": args.repeats}
    if args.only != "prefetch":
        record["packing"] = measure_packing(args)
    if args.only != "packing":
        record["prefetch"] = measure_prefetch(args)
    return finish_json_benchmark(json_out, {
        **record, **environment_fields(args, jax, torch, xla_flags_before)})


if __name__ == "__main__":
    sys.exit(main())
