"""`python -m moetx.tools.plan`: a training step of any model config on any mesh, on paper.

    python -m moetx.tools.plan --gin_file=models/t5_1_1_xxl.gin \\
        --gin.MESH_SHAPE='(16, 1, 16)' --gin.FSDP=True --gin.BATCH_SIZE=2048 \\
        --gin.ACTIVATION_DTYPE="'bfloat16'" --devices=tpu-v5p:256 --no_compile

Prints, per device: parameter, optimizer-state and activation memory; the model's FLOPs per
step; the bytes each kind of collective moves (data-parallel gradient reduction, FSDP gathers
and reduce-scatters, tensor-parallel all-reduces, the MoE all-to-all); and the step time and
MFU they imply on `--devices=<kind>:<count>` (kinds: tpu-v4, tpu-v5e, tpu-v5p, h100, a100,
cpu), bracketed by perfect overlap of communication with compute and none. Then one JSON line
with everything. Every device figure can be overridden (--peak_flops, --hbm_bytes,
--link_bandwidth, ...). The library is `moetx.trainer.step_plan` (generic) and
`moetx.lm.costs` (the Transformer's activation side).

The run is read from gin like a training run: the model gin, optionally a run gin, and the
macros MESH_SHAPE, BATCH_SIZE (default 128), TASK_FEATURE_LENGTHS (default: T5's 512 -> 114
for an encoder-decoder, 512 otherwise), FSDP and NUM_MICROBATCHES. The process simulates
`<count>` CPU devices (set before JAX starts); without `--no_compile` the train step is also
lowered and compiled from abstract inputs on them (nothing is allocated), which adds XLA's
activation (temp) bytes and the collectives of the compiled program beside the analytic ones.
Compiling takes seconds to minutes on hundreds of devices; `--no_compile` is the practical
mode for thousands.

Exit status 0, or 2 with one `moetx: error:` line for bad input (an unknown device kind, a
mesh whose size is not the device count, a batch the data axes cannot split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import moetx.cli  # noqa: F401  (process preamble before JAX starts)
from moetx.cli import flags

PROG = "python -m moetx.tools.plan"
DEVICE_KINDS = ("tpu-v4", "tpu-v5e", "tpu-v5p", "h100", "a100", "cpu")

# Macros the plan reads; defined here so a model gin alone is enough (a run gin given after it
# overrides them).
DEFAULT_MACROS = """
MESH_SHAPE = (-1, 1, 1)
BATCH_SIZE = 128
TASK_FEATURE_LENGTHS = None
FSDP = False
NUM_MICROBATCHES = 1
"""
PLAN_MACROS = ("MODEL", "MESH_SHAPE", "BATCH_SIZE", "TASK_FEATURE_LENGTHS", "FSDP",
               "NUM_MICROBATCHES")


def tool_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False,
                                description="device and planning flags")
    p.add_argument("--devices", metavar="KIND:COUNT",
                   help=f"accelerator kind ({', '.join(DEVICE_KINDS)}) and device count, "
                        f"e.g. tpu-v5p:256 (required)")
    p.add_argument("--no_compile", action="store_true",
                   help="analytic only: do not lower and compile the step")
    figures = p.add_argument_group("device figures (override the table)")
    figures.add_argument("--peak_flops", type=float, help="peak matmul FLOP/s per device")
    figures.add_argument("--hbm_bytes", type=float, help="device memory, bytes")
    figures.add_argument("--hbm_bandwidth", type=float, help="device memory bytes/s")
    figures.add_argument("--link_bandwidth", type=float,
                         help="bytes/s one device sends over the fast interconnect (ICI/NVLink)")
    figures.add_argument("--domain_size", type=int,
                         help="devices one fast interconnect joins (TPU slice, NVLink node)")
    figures.add_argument("--dcn_bandwidth", type=float,
                         help="bytes/s per device between domains (DCN/InfiniBand)")
    figures.add_argument("--compute_efficiency", type=float,
                         help="assumed fraction of the peak the matmuls sustain")
    return p


def parse_devices(text: str | None) -> tuple[str, int]:
    """`<kind>:<count>` -> (kind, count); raises flags.UserError (one line) when malformed."""
    if not text:
        raise flags.UserError(f"--devices=<kind>:<count> is required, e.g. --devices=tpu-v5p:256 "
                              f"(kinds: {', '.join(DEVICE_KINDS)}).")
    m = re.fullmatch(r"([\w.\-]+):(\d+)", text.strip())
    if not m or int(m.group(2)) < 1:
        raise flags.UserError(f"--devices={text}: expected <kind>:<count> with a positive count, "
                              f"e.g. tpu-v5p:256.")
    if m.group(1) not in DEVICE_KINDS:
        raise flags.UserError(f"--devices={text}: unknown device kind {m.group(1)!r}; known: "
                              f"{', '.join(DEVICE_KINDS)}.")
    return m.group(1), int(m.group(2))


def simulate_devices(count: int) -> None:
    """Asks XLA for `count` CPU devices (only effective before JAX starts); raises UserError
    when JAX already runs with fewer."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < count:
            raise flags.UserError(f"this process already runs JAX with {jax.device_count()} "
                                  f"devices; planning {count} needs a fresh process.")
        return
    flag = f"--xla_force_host_platform_device_count={count}"
    current = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (current + " " + flag).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # the plan runs on simulated CPU devices anywhere


def default_lengths(model: Any) -> dict[str, int]:
    """T5's span-corruption lengths for an encoder-decoder, 512 for a decoder-only LM."""
    if getattr(model, "is_encoder_decoder", False):
        return {"inputs": 512, "targets": 114}
    return {"inputs": 512, "targets": 512}


def plan(model: Any, mesh_shape: Sequence[int], batch_size: int,
         lengths: Mapping[str, int] | int | None, device: Any, fsdp: bool = False,
         num_microbatches: int = 1, compile: bool = False, devices: Sequence[Any] | None = None):
    """The `StepPlan` of `model` (a moetx model) trained on a mesh of `mesh_shape` over
    `devices` (default: the first prod(mesh_shape) of `jax.devices()`) with T5X's default
    Adafactor, and the analytic activation costs (None when the model has no analytic model;
    then activations come from compiling, or are unknown)."""
    import jax
    import jax.numpy as jnp

    from moetx.lm import costs as transformer_costs
    from moetx.trainer import optimizers, partitioning, step_plan, trainer as trainer_lib
    from moetx.util import platform as platform_lib

    if devices is None:
        devices = jax.devices() if -1 in mesh_shape else jax.devices()[:math.prod(mesh_shape)]
    mesh = partitioning.make_mesh(tuple(mesh_shape), devices=devices)
    rules = partitioning.standard_logical_axis_rules(fsdp=fsdp)
    lengths = default_lengths(model) if lengths is None else lengths
    shapes = model.input_shapes(batch_size, lengths)
    # Every trace runs on simulated CPU devices but is planned for `device`: MoE's 'auto'
    # dispatch and the dense layers' kernel gradient take that device's path (the
    # initialisation's too, though both paths hold the same parameters).
    with platform_lib.trace_for(device.platform):
        trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh, rules, shapes,
                                      num_microbatches=num_microbatches)
        try:
            costs = transformer_costs.activation_costs(model, dict(mesh.shape), rules, shapes,
                                                       num_microbatches, device.platform)
        except ValueError:
            costs = None
        batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}
        result = step_plan.plan_step(
            trainer, batch, device, costs.collectives if costs else (),
            costs.activation_bytes if costs else None, compile=compile)
    return result, costs


def _bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(result, costs=None, title: str = "") -> str:
    """A readable table of a `StepPlan`."""
    from moetx.trainer import step_plan

    d = result.device
    lines = [title] if title else []
    lines.append(f"mesh {result.mesh} on {result.devices} x {d.kind} (peak {d.peak_flops:.3g} "
                 f"FLOP/s, {_bytes(d.hbm_bytes)} HBM, link {_bytes(d.link_bandwidth)}/s, "
                 f"efficiency {d.compute_efficiency:g})")
    lines.append(f"parameters        {result.params:,}")
    lines.append(f"per device: params {_bytes(result.param_bytes)}, optimizer state "
                 f"{_bytes(result.opt_bytes)}, activations {_bytes(result.activation_bytes)} "
                 f"({result.activation_source}); total {_bytes(result.memory_bytes)} of "
                 f"{_bytes(d.hbm_bytes)}")
    if costs is not None and result.activation_source != "analytic":
        lines.append(f"                   activations, analytic estimate: "
                     f"{_bytes(costs.activation_bytes)}")
    lines.append(f"FLOPs per step    {result.flops_per_step:.4g} (model's own count)")
    analytic = step_plan.totals_by_kind(result.collectives)
    compiled = (step_plan.totals_by_kind(result.compiled_collectives)
                if result.compiled_collectives is not None else None)
    header = f"{'collective (bytes per device per step)':40s} {'analytic':>12s}"
    header += f" {'compiled HLO':>13s}" if compiled else ""
    header += f" {'seconds':>10s}"
    lines.append(header)
    for kind in step_plan.KINDS:
        if not analytic[kind] and not (compiled and compiled[kind]):
            continue
        row = f"  {kind:38s} {_bytes(analytic[kind]):>12s}"
        row += f" {_bytes(compiled[kind]):>13s}" if compiled else ""
        row += f" {result.communication_by_kind.get(kind, 0.0):10.4f}"
        lines.append(row)
    lines.append(f"compute {result.compute_seconds:.4f} s + communication "
                 f"{result.communication_seconds:.4f} s (estimated)")
    lines.append(f"step time {result.overlapped_seconds:.4f} s (overlapped) .. "
                 f"{result.serial_seconds:.4f} s (serial); MFU "
                 f"{100 * result.mfu(result.overlapped_seconds):.1f}% .. "
                 f"{100 * result.mfu(result.serial_seconds):.1f}% (estimated)")
    if costs is not None and costs.notes:
        lines.append("not modelled: " + "; ".join(costs.notes))
    return "\n".join(lines)


def _run(args: argparse.Namespace, kind: str, count: int) -> None:
    import gin

    from moetx.trainer import step_plan

    model_ref = gin.query_parameter("%MODEL")
    model = model_ref.scoped_configurable_fn() if hasattr(
        model_ref, "scoped_configurable_fn") else model_ref
    values = {name: gin.query_parameter(f"%{name}") for name in PLAN_MACROS[1:]}
    mesh_shape = tuple(int(s) for s in values["MESH_SHAPE"])
    if -1 not in mesh_shape and math.prod(mesh_shape) != count:
        raise flags.UserError(f"MESH_SHAPE {mesh_shape} has {math.prod(mesh_shape)} devices but "
                              f"--devices asks for {count}; make their product equal.")
    overrides = {k: getattr(args, k) for k in (
        "peak_flops", "hbm_bytes", "hbm_bandwidth", "link_bandwidth", "domain_size",
        "dcn_bandwidth", "compute_efficiency")}
    device = step_plan.device_spec(kind, count, **overrides)
    import jax

    result, costs = plan(model, mesh_shape, int(values["BATCH_SIZE"]),
                         values["TASK_FEATURE_LENGTHS"], device, fsdp=bool(values["FSDP"]),
                         num_microbatches=int(values["NUM_MICROBATCHES"] or 1),
                         compile=not args.no_compile, devices=jax.devices()[:count])
    print(format_plan(result, costs, f"{type(model).__name__}: " + " ".join(args.gin_file)))
    out = {"tool": "plan", "gin_file": args.gin_file, "gin": dict(args.gin_dot),
           "batch_size": int(values["BATCH_SIZE"]),
           "task_feature_lengths": values["TASK_FEATURE_LENGTHS"] or default_lengths(model),
           "fsdp": bool(values["FSDP"]), "num_microbatches": int(values["NUM_MICROBATCHES"] or 1),
           **result.as_dict(), "activation_notes": costs.notes if costs else ["no analytic model"]}
    print(json.dumps(out, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags and prints the plan; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tool = tool_parser()
    if "-h" in argv or "--help" in argv:
        print(tool.format_help())
        flags.parse_flags(argv, PROG, __doc__)  # prints the gin flags and exits
    args, rest = tool.parse_known_args(argv)
    try:
        kind, count = parse_devices(args.devices)
        gin_args = flags.parse_flags(rest, PROG, __doc__)
        simulate_devices(count)
        _parse_gin(gin_args)
        args.gin_file, args.gin_dot = gin_args.gin_file, gin_args.gin_dot
        _run(args, kind, count)
    except flags.UserError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        text = str(e).strip().splitlines()
        print(f"moetx: error: {text[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def _parse_gin(gin_args: argparse.Namespace) -> None:
    """The model and run gins with the plan's macro defaults first; required macros the plan
    does not read (MODEL_DIR, the task, ...) are bound to None so a run gin can be given."""
    import gin

    from moetx.util import gin_files

    if not gin_args.gin_file:
        raise flags.UserError("give the model's gin file: --gin_file=models/<model>.gin")
    try:
        macros = gin_files.scan_macros(gin_args.gin_file, gin_args.gin_search_paths.split(","))
    except (OSError, SyntaxError) as e:
        raise flags.UserError(f"cannot read the gin files: {e}") from None
    unused = [m.name for m in macros if m.required and m.name not in PLAN_MACROS]
    gin_args.gin_bindings = list(gin_args.gin_bindings) + [f"{n} = None" for n in unused]
    gin.clear_config()
    gin.parse_config(DEFAULT_MACROS)
    flags.parse_gin(gin_args, flags.DEFAULT_IMPORTS)


if __name__ == "__main__":
    sys.exit(main())
