#!/usr/bin/env python
"""The means of issue 16, measured one by one on moetx's encoder-decoder training step.

Each variant is the T5.1.1 encoder-decoder of `encdec_throughput.py` (by default at T5.1.1-small's
shape: d_model 512, d_ff 1024 gated-GELU, 8+8 layers, 6 heads x 64, vocab 32128, batch 8 x
(512 -> 114), Adafactor) with one `TransformerConfig` field changed:

  baseline        as shipped: float32 activations, no rematerialisation, layers unrolled;
  bf16            bfloat16 activations and matmul inputs (float32 parameters, Adafactor and
                  loss; `ACTIVATION_DTYPE = 'bfloat16'` in gin);
  remat_full      every layer rematerialised in the backward pass (`remat_policy='full'`);
  remat_save_dots rematerialised except the matmul outputs (`'save_dots'`);
  scan            the layers under `flax.linen.scan` (`scan_layers=True`);
  no_donation     the train step without buffer donation (`Trainer(donate_state=False)`; the
                  trainer always donates): XLA can no longer write the new state over the old.

The variants run one after another in this process (not round-robin: each holds a compiled
T5.1.1-small step and its state), each compiled, warmed up and then timed for `--steps` steps on
the same batch from the same initial weights; the baseline runs first and again last
(`baseline_again`), so a drift of the machine's speed during the run shows as the difference
between the two. Each variant records its seconds per step (median), tokens/s, MFU against the
f32 and the bf16 matmul peaks measured first in the same run, its first (compiling) step, and
its first and last loss (the same weights and batch, so the variants' losses must agree up to
their precision; scanned layers draw their initial weights from other random streams, so the
scan variant's losses differ), and XLA's memory plan of its compiled step (`memory`: argument,
output, temporary and aliased bytes, and their `peak_bytes_estimate` = argument + output + temp -
alias; the step is compiled once, ahead of time, and that executable is the one timed). Prints one JSON line (`means`), which `readme_table.py` turns into
the README's means table; progress goes to stderr.

Means of the issue measured elsewhere (`input_pipeline.py`): input prefetching and sequence
packing (data settings, outside a step on fixed data).

  .venv/bin/python benchmarks/means.py                              # T5.1.1-small shape
  .venv/bin/python benchmarks/means.py --d_model 64 --d_ff 128 --layers 2 --heads 2 \\
      --head_dim 32 --vocab 256 --batch 2 --input_length 32 --target_length 16 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from encdec_throughput import (add_t5_small_shape_flags, make_batch, moetx_config,
                               moetx_encdec_model, moetx_trainer, require_positive)
from train_throughput import (CpuLoad, add_cpu_flags, environment_fields, finish_json_benchmark,
                              matmul_fields, measure_matmuls, moetx_optimizer_factory,
                              start_json_benchmark)
from remat import memory_figures

# name -> the TransformerConfig fields it changes.
VARIANTS = {
    "baseline": {},
    "bf16": {"dtype": "bfloat16"},
    "remat_full": {"remat_policy": "full"},
    "remat_save_dots": {"remat_policy": "save_dots"},
    "scan": {"scan_layers": True},
    "no_donation": {},
}
# name -> the Trainer arguments it changes.
TRAINER_VARIANTS = {"no_donation": {"donate_state": False}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_t5_small_shape_flags(p)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (compile)")
    p.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    p.add_argument("--only", action="append", choices=sorted(VARIANTS), metavar="VARIANT",
                   help=f"measure only these (and the baseline); of {sorted(VARIANTS)}")
    add_cpu_flags(p)  # torch's threads serve the matmul peak
    args = p.parse_args(argv)
    require_positive(p, args, "steps", "warmup", "threads")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[means {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def measure_variant(name: str, changes: dict, args, batch_np,
                    trainer_changes: dict | None = None) -> dict:
    """Builds, compiles and times one variant's training step; returns its figures."""
    import jax
    import numpy as np

    model, input_shapes = moetx_encdec_model(
        args, dataclasses.replace(moetx_config(args), **changes))
    tr = moetx_trainer(jax, model, input_shapes, moetx_optimizer_factory(args.optimizer),
                       **(trainer_changes or {}))
    state = tr.init_state()
    flops = model.flops_per_step(state.params, input_shapes)
    batch = tr.to_global(batch_np)

    t0 = time.perf_counter()
    compiled = tr.lower_train_step(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}).compile()
    memory = memory_figures(compiled)

    def step() -> float:
        nonlocal state
        state, sums = compiled(state, batch)
        return float(jax.block_until_ready(sums)["loss"])

    losses = [step()]
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        losses.append(step())
    times = []
    with CpuLoad() as load:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
    if not np.all(np.isfinite(losses)):
        raise SystemExit(f"means.py: {name}: non-finite loss {losses}")
    s = statistics.median(times)
    log(f"{name}: {s:.3f} s/step (first step {first:.1f} s), loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}, XLA's peak estimate "
        f"{memory.get('peak_bytes_estimate', 0) / 2**20:,.0f} MiB")
    return {"changes": {**changes, **(trainer_changes or {})}, "memory": memory,
            "seconds_per_step": s, "step_seconds": times,
            "first_step_s": first, "flops_per_step": flops, "loss_first": losses[0],
            "loss_last": losses[-1], "background_cpu_cores": load.cores}


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, xla_flags_before = start_json_benchmark(args)

    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    log("measuring f32 and bf16 matmul FLOP/s")
    with CpuLoad() as mm_load:
        mmf = matmul_fields(measure_matmuls(jax, jnp, torch))
    batch_np = make_batch(np, args)
    tokens = args.batch * (args.input_length + args.target_length)
    names = ["baseline", *[n for n in VARIANTS if n != "baseline"
                           and (not args.only or n in args.only)], "baseline_again"]
    variants = {}
    for i, name in enumerate(names, 1):
        log(f"variant {i}/{len(names)}: {name}")
        base_name = name.removesuffix("_again")
        v = measure_variant(name, VARIANTS[base_name], args, batch_np,
                            TRAINER_VARIANTS.get(base_name))
        v["tokens_per_sec"] = tokens / v["seconds_per_step"]
        for dt in ("f32", "bf16"):
            v[f"mfu_{dt}"] = v["flops_per_step"] / v["seconds_per_step"] / mmf[
                f"peak_flops_{dt}_matmul"]
        variants[name] = v
        gc.collect()
    base = (variants["baseline"]["seconds_per_step"]
            + variants["baseline_again"]["seconds_per_step"]) / 2
    for v in variants.values():
        v["speedup_vs_baseline"] = base / v["seconds_per_step"]
    return finish_json_benchmark(json_out, {
        "benchmark": "means",
        "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                  "head_dim": args.head_dim, "d_ff": args.d_ff, "vocab": args.vocab},
        "batch": args.batch, "input_length": args.input_length,
        "target_length": args.target_length, "tokens_per_step": tokens, "steps": args.steps,
        "optimizer": {"name": args.optimizer},
        "variants": variants,
        "baseline_drift": (variants["baseline_again"]["seconds_per_step"]
                           / variants["baseline"]["seconds_per_step"]),
        **mmf,
        **environment_fields(args, jax, torch, xla_flags_before),
        "background_cpu_cores": {"matmul": mm_load.cores,
                                 **{n: v["background_cpu_cores"] for n, v in variants.items()}},
    })


if __name__ == "__main__":
    sys.exit(main())
