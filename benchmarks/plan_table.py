"""docs/scaling_plan.md: T5.1.1-XXL and ST-MoE-32B planned on TPU v4 / v5e / v5p and H100 slices
by `moetx.tools.plan` (the library), beside the published figures of comparable runs.

    .venv/bin/python benchmarks/plan_table.py > docs/scaling_plan.md             # ~1 min
    .venv/bin/python benchmarks/plan_table.py --compile > docs/scaling_plan.md   # ~15 min
    .venv/bin/python benchmarks/plan_table.py --compile --readme README.md > docs/scaling_plan.md

With `--readme`, the plan table (and the compiled comparison, with `--compile`) is also written
into that file between `<!-- plan-table:start -->` and `<!-- plan-table:end -->`.

Every row is the pretraining step (batch 2048, span corruption 512 -> 114, bf16 activations,
float32 parameters, T5X's Adafactor) of the model's own gin file, on a realistic mesh. The
number of microbatches is the smallest power of two whose estimated per-device memory fits in
90% of the device's HBM (gradient accumulation, as T5X's `num_microbatches`). With `--compile`
each distinct (model, mesh) is also lowered and compiled from abstract inputs on simulated CPU
devices, and the collectives of the compiled program are set beside the plan's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

MAX_DEVICES = 1024
MAX_COMPILED = 512  # larger meshes are planned, not compiled (minutes each)

# (model label, gin file, device kind, slice name, chips, mesh (data, expert, model), FSDP)
ROWS = [
    ("T5.1.1-XXL", "models/t5_1_1_xxl.gin", "tpu-v4", "v4-512", 256, (32, 1, 8), True),
    ("T5.1.1-XXL", "models/t5_1_1_xxl.gin", "tpu-v5e", "v5e-256", 256, (32, 1, 8), True),
    ("T5.1.1-XXL", "models/t5_1_1_xxl.gin", "tpu-v5p", "v5p-512", 256, (32, 1, 8), True),
    ("T5.1.1-XXL", "models/t5_1_1_xxl.gin", "h100", "32 x 8 H100", 256, (32, 1, 8), True),
    ("T5.1.1-XXL", "models/t5_1_1_xxl.gin", "tpu-v5p", "v5p-512", 256, (16, 1, 16), False),
    ("ST-MoE-32B", "models/st_moe_32b.gin", "tpu-v5p", "v5p-1024", 512, (8, 64, 1), True),
    ("ST-MoE-32B", "models/st_moe_32b.gin", "tpu-v4", "v4-1024", 512, (8, 64, 1), True),
    ("ST-MoE-32B", "models/st_moe_32b.gin", "tpu-v5p", "v5p-1024", 512, (1, 64, 8), False),
    ("ST-MoE-32B", "models/st_moe_32b.gin", "h100", "64 x 8 H100", 512, (8, 8, 8), False),
    # The published layout (64-way expert/data x 16-way model) on 1024 v4 chips.
    ("ST-MoE-32B", "models/st_moe_32b.gin", "tpu-v4", "v4-2048", 1024, (1, 64, 16), False),
]
BATCH, LENGTHS = 2048, {"inputs": 512, "targets": 114}


def _model(gin_file: str):
    import gin

    from moetx.util import gin_files

    gin.clear_config()
    gin_files.parse_files([gin_file], ["ACTIVATION_DTYPE = 'bfloat16'"])
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def _microbatches(result, costs, device, data_shards: int) -> int:
    """The smallest power of two m (dividing the per-shard batch) with the estimated memory
    (parameters, optimizer state, activations / m) in 90% of HBM; the largest tried if none."""
    rows = BATCH // data_shards
    m = 1
    while m < rows:
        if result.param_bytes + result.opt_bytes + costs.activation_bytes / m \
                <= 0.9 * device.hbm_bytes:
            break
        m *= 2
    return m


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:,.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true",
                        help="also compile each (model, mesh) on simulated devices")
    parser.add_argument("--readme", metavar="README",
                        help="also write the tables into this file between the plan-table "
                             "markers")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={MAX_DEVICES}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import moetx.cli  # noqa: F401  (process preamble)
    import jax

    import moetx.lm.models  # noqa: F401  (gin configurables)
    from moetx.tools import plan as plan_tool
    from moetx.trainer import step_plan

    started = time.perf_counter()
    rows, compiled_rows, compiled_cache = [], [], {}
    for label, gin_file, kind, slice_name, chips, mesh, fsdp in ROWS:
        model = _model(gin_file)
        device = step_plan.device_spec(kind, chips)
        devices = jax.devices()[:chips]
        first, costs = plan_tool.plan(model, mesh, BATCH, LENGTHS, device, fsdp=fsdp,
                                      devices=devices)
        data_shards = mesh[0] * mesh[1]
        m = _microbatches(first, costs, device, data_shards)
        result, costs = (first, costs) if m == 1 else plan_tool.plan(
            model, mesh, BATCH, LENGTHS, device, fsdp=fsdp, num_microbatches=m,
            devices=devices)
        totals = step_plan.totals_by_kind(result.collectives)
        rows.append((label, slice_name, chips, kind, mesh, fsdp, m, result, totals))
        print(f"planned {label} on {slice_name} {mesh} fsdp={fsdp} m={m} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        key = (gin_file, mesh, fsdp)
        if args.compile and key not in compiled_cache and chips <= MAX_COMPILED:
            t0 = time.perf_counter()
            compiled, _ = plan_tool.plan(model, mesh, BATCH, LENGTHS, device, fsdp=fsdp,
                                         num_microbatches=m, compile=True, devices=devices)
            compiled_cache[key] = compiled
            compiled_rows.append((label, mesh, fsdp, m, result, compiled,
                                  time.perf_counter() - t0))
            print(f"  compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    out = [HEADER.format(date=datetime.date.today().isoformat(), jax=jax.__version__)]
    first_table = len(out)
    out.append("| model | slice (chips) | mesh (data, expert, model) | FSDP | micro-batches "
               "| params + opt. state / device (GB) | activations / device, est. (GB) "
               "| TFLOP / step | gradient reduction + FSDP (GB / device) "
               "| tensor-parallel all-reduce (GB) | MoE all-to-all (GB) "
               "| est. step time (s), overlapped .. serial | est. MFU |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, slice_name, chips, kind, mesh, fsdp, m, r, t in rows:
        grad = (t[step_plan.DATA_PARALLEL_REDUCE] + t[step_plan.FSDP_ALL_GATHER]
                + t[step_plan.FSDP_REDUCE_SCATTER])
        fits = "" if r.memory_bytes <= r.device.hbm_bytes else " (over HBM)"
        out.append(
            f"| {label} | {slice_name} ({chips} x {kind}) | {mesh} | {'yes' if fsdp else 'no'} "
            f"| {m} | {_gb(r.param_bytes + r.opt_bytes)} | {_gb(r.activation_bytes)}{fits} "
            f"| {r.flops_per_step / 1e12:,.0f} | {_gb(grad)} "
            f"| {_gb(t[step_plan.MODEL_PARALLEL_ALL_REDUCE])} | {_gb(t[step_plan.ALL_TO_ALL])} "
            f"| {r.overlapped_seconds:.2f} .. {r.serial_seconds:.2f} "
            f"| {100 * r.mfu(r.overlapped_seconds):.0f}% .. {100 * r.mfu(r.serial_seconds):.0f}% |")
    plan_lines = out[first_table:]
    out.append(PUBLISHED.rstrip("\n"))
    out.append(_t5x_gpu_row(plan_tool, step_plan))
    if compiled_rows:
        out.append(COMPILED_HEADER)
        out.append("| model | mesh | FSDP | micro-batches | compile (s) "
                   "| gradient reduction + FSDP: plan / compiled (GB) "
                   "| tensor-parallel: plan / compiled (GB) | all-to-all: plan / compiled (GB) "
                   "| other collectives, compiled (GB) | activations: plan / XLA temp (GB) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        compiled_first = len(out) - 2
        for label, mesh, fsdp, m, r, c, seconds in compiled_rows:
            a = step_plan.totals_by_kind(r.collectives)
            h = step_plan.totals_by_kind(c.compiled_collectives)
            grad = lambda t: (t[step_plan.DATA_PARALLEL_REDUCE]  # noqa: E731
                              + t[step_plan.FSDP_ALL_GATHER] + t[step_plan.FSDP_REDUCE_SCATTER])
            out.append(
                f"| {label} | {mesh} | {'yes' if fsdp else 'no'} | {m} | {seconds:.0f} "
                f"| {_gb(grad(a))} / {_gb(grad(h))} "
                f"| {_gb(a[step_plan.MODEL_PARALLEL_ALL_REDUCE])} / "
                f"{_gb(h[step_plan.MODEL_PARALLEL_ALL_REDUCE])} "
                f"| {_gb(a[step_plan.ALL_TO_ALL])} / {_gb(h[step_plan.ALL_TO_ALL])} "
                f"| {_gb(h[step_plan.OTHER])} | {_gb(r.activation_bytes)} / "
                f"{_gb(c.activation_bytes)} |")
        compiled_lines = out[compiled_first:]
        out.append(COMPILED_NOTES)
    out.append(NOTES)
    print("\n".join(out))
    if args.readme:
        write_readme(args.readme, plan_lines, compiled_lines if compiled_rows else [],
                     jax.__version__)


README_START, README_END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def write_readme(path: str, plan_lines: list[str], compiled_lines: list[str],
                 jax_version: str) -> None:
    """Rewrites `path` between the plan-table markers with the plan table, its caption and,
    when given, the compiled comparison."""
    from moetx.util import markdown

    text = [*plan_lines, "",
            f"Generated by `benchmarks/plan_table.py` ({datetime.date.today().isoformat()}, jax "
            f"{jax_version}) from `moetx.tools.plan`: the pretraining step (batch {BATCH}, "
            f"span corruption {LENGTHS['inputs']} → {LENGTHS['targets']}, bf16 activations, "
            f"T5X's Adafactor) of each model's own gin file. Parameter, optimizer-state bytes "
            f"and FLOPs are exact; activations and collective bytes are analytic; step time and "
            f"MFU are estimates from vendor peaks at an assumed 75% matmul efficiency, bracketed "
            f"by full and no overlap of communication. The published anchors and how each "
            f"figure is made are in [docs/scaling_plan.md](docs/scaling_plan.md)."]
    if compiled_lines:
        text += ["", "The same steps compiled on simulated CPU devices (nothing allocated), "
                 "collective bytes per device read from XLA's program beside the plan's:", "",
                 *[ln for ln in compiled_lines if ln.strip()]]
    with open(path) as f:
        old = f.read()
    new = markdown.replace_between(old, README_START, README_END, "\n".join(text), path)
    if new != old:
        with open(path, "w") as f:
            f.write(new)
    print(f"{path}: plan table {'rewritten' if new != old else 'unchanged'}", file=sys.stderr)


def _t5x_gpu_row(plan_tool, step_plan) -> str:
    """NVIDIA's published T5X throughput for T5.1.1-XXL on 512 A100s, as an MFU by moetx's
    own FLOP count of that step (inputs 512, targets 128)."""
    model = _model("models/t5_1_1_xxl.gin")
    device = step_plan.DEVICES["a100"]
    import jax

    result, _ = plan_tool.plan(model, (8, 1, 1), 8, {"inputs": 512, "targets": 128}, device,
                               devices=jax.devices()[:8])
    per_sequence = result.flops_per_step / 8
    mfu = 1346 * per_sequence / (512 * device.peak_flops)
    return (f"| T5.1.1-XXL | 512 x A100 80GB, TP 8 (T5X on GPU, The Pile, inputs 512 -> "
            f"targets 128, batch 2048-2304) | ~1,346 sequences/s published | "
            f"{100 * mfu:.0f}% (derived here: moetx's FLOP count of that sequence, "
            f"{per_sequence / 1e12:.1f} TFLOP, over 512 x 312 TFLOP/s) |\n")


HEADER = """# Scaling on paper: T5.1.1-XXL and ST-MoE-32B on TPU and GPU slices

Generated by `benchmarks/plan_table.py` ({date}, jax {jax}) from `moetx.tools.plan`, the library
behind `python -m moetx.tools.plan`. **Every figure in the first table is an estimate**: the
parameter and optimizer-state bytes follow exactly from moetx's shardings and the FLOPs are the
model's own count, but the activation memory is a per-layer analytic estimate, the collective
bytes are derived analytically from the shardings and shapes (checked against XLA's compiled
programs on simulated devices in `tests/tools/test_plan.py` and in the last table), and the
step time and MFU come from vendor peak figures, an assumed 75% matmul efficiency and ring
collectives over the per-chip interconnect bandwidth. The step time is bracketed by perfect
overlap of communication with compute and by none. The same time model on this machine's CPU
(`--devices=cpu:1`: the measured f32 2048^2 matmul rate, an efficiency of 0.4, within the
31-50% measured for decoder-only and encoder-decoder LMs of 2-8 layers) put a small
decoder-only LM's train step at 0.86x of the measured one; `tests/tools/test_plan.py` holds
it to 2x.

The step: batch 2048 sequences, span corruption 512 -> 114 tokens (T5's pretraining batch of
2^20 input tokens), bf16 activations, float32 parameters, T5X's Adafactor, no
rematerialisation; micro-batches (gradient accumulation) as many as the estimated memory needs
to fit in 90% of HBM. Meshes are `(data, expert, model)`: FSDP shards parameters over the
batch axes (`data` x `expert`), `model` is Megatron-style tensor parallelism kept inside one
NVLink node on H100 (8 GPUs) and inside the slice on TPU; on H100 the MoE's `expert` axis is
the node (all-to-all over NVLink) and `data` spans the nodes (InfiniBand).

"""

PUBLISHED = """
## Published figures of comparable runs

No one publishes MFU for T5.1.1-XXL or ST-MoE-32B themselves; these are the closest anchors
(MaxText: its README at google/maxtext@cc7478e and its MoE docs; ST-MoE: the paper and
flaxformer's `st_moe_32b.gin`; T5X on GPU: NVIDIA's `t5x/contrib/gpu` README).

| model | hardware | published | MFU |
|---|---|---|---|
| MaxText dense 16B (decoder-only) | v5e-256 | 120 TFLOP/s/chip | 61.1% |
| MaxText dense 32B | v5e-256 | 132 TFLOP/s/chip | 66.9% |
| MaxText dense 32B | v5p-128 (64 chips) | 328 TFLOP/s/chip | 71.5% |
| MaxText dense 64B | v5p-128 | 323 TFLOP/s/chip | 70.3% |
| MaxText dense 128B | v5p-256 / v5p-512 | 315 TFLOP/s/chip | 68.7% / 68.5% |
| MaxText Mixtral-8x7B (top-2 of 8) | v5p-256 | ~2,909 tokens/s/chip, sequence 4096 | 52.6% |
| ST-MoE-32B | TPU | 64 experts, top-2, every 4th FFN; 64-way data (= expert) x \
16-way model parallelism; no step time published | - |
"""

COMPILED_HEADER = """
## The plan beside XLA's compiled program (simulated devices)

Each mesh of up to 512 devices compiled once (with the micro-batches of its first row above)
on simulated CPU devices (`--xla_force_host_platform_device_count`), nothing allocated;
collective bytes per device per step read from the HLO (loop trip counts applied). XLA:CPU
computes bf16 matmuls in float32, so its tensor-parallel all-reduces and all-to-alls carry
float32: 2x the plan's bf16 bytes is agreement. XLA's temp bytes also hold
the gradients and optimizer temporaries, in float32 on CPU.

"""

COMPILED_NOTES = """
**What the compiled programs show.** Every layout compiles to the planned collectives: the
gradient reduction and FSDP traffic within 2% of the plan on all five meshes (FSDP included),
and the tensor-parallel all-reduces and MoE all-to-alls at 2x the plan's bytes, which is
agreement here (XLA:CPU carries them in float32 where an accelerator carries bf16). An earlier
version of this table, compiled before the steps ran under `jax.set_mesh`, showed FSDP at up to
two orders of magnitude over the plan: every activation sharding constraint was being skipped,
so GSPMD re-laid whole batches along `embed` instead of gathering the weights. With the
constraints active and the layers gathering their FSDP-sharded parameters at use, that is gone.
XLA's temporary bytes stay 4-7x the plan's activation estimate: on the CPU they also hold the
float32 gradients and optimizer temporaries and float32 copies of the bf16 activations, so
they bound the activation memory from above rather than measure it; peak memory per device
on an accelerator is not measured here.

With micro-batches the gradient reduction runs once per micro-batch (XLA reduces inside the
accumulation loop); the plan counts it so.
"""

NOTES = """
## What is estimated, and how

- **Exact**: parameter count, parameter and optimizer-state bytes per device (from the
  shardings; `moetx.trainer.sharding_plan` checks them against the compiled step), FLOPs per
  step (the model's own `flops_per_step`: 6 x active parameters per token plus attention; MoE
  experts count by k/E).
- **Analytic** (`moetx.trainer.step_plan`, `moetx.lm.costs`): activation memory
  (what the backward pass keeps per layer: residuals, norm outputs, Q/K/V, float32 attention
  probabilities, MLP hidden states, MoE dispatch tensors and expert buffers, float32 logits;
  about +-30%); the collective bytes (gradient all-reduce over the batch replicas, FSDP
  gathers for forward and backward of every micro-batch and gradient reduce-scatters, one
  tensor-parallel all-reduce per matmul whose contracting dimension is sharded over `model`,
  four all-to-alls of the expert buffers per sparse layer).
- **Assumed**: 75% of the peak on the model's matmuls; ring collectives at the per-chip
  interconnect bandwidth (TPU ICI: v4 ~268 GB/s from the published 1.1 PB/s pod all-reduce
  bandwidth, v5e 200 GB/s, v5p 600 GB/s each way; H100 NVLink 450 GB/s each way inside a node
  and 50 GB/s InfiniBand per GPU between nodes); no pipeline bubbles, no host or input
  stalls, no MoE load imbalance beyond the capacity factor.
- Not counted: the masked dispatch/combine einsums' FLOPs (the model's FLOP count is the
  useful work), softmax and norm statistics, optimizer scalars.

Regenerate: `.venv/bin/python benchmarks/plan_table.py --compile > docs/scaling_plan.md`.
Any other configuration: `python -m moetx.tools.plan --gin_file=... --gin.MESH_SHAPE=...
--devices=<kind>:<count>` (`--help` lists the device figures that can be overridden).
"""


if __name__ == "__main__":
    main()
