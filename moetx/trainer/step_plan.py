"""A training step planned on paper: memory per device, FLOPs, the bytes each collective moves,
and the step time and MFU they imply on a given accelerator.

Nothing is allocated. The parts, and where each figure comes from:

* Memory: the parameter and optimizer-state bytes each device holds, from the trainer's
  shardings (`sharding_plan.plan`); activations either from XLA (the compiled step's
  `memory_analysis()` temp bytes, which also hold the gradients and optimizer temporaries) or
  from a model-specific analytic estimate passed in (`activation_bytes`); `activation_source`
  says which.
* FLOPs: the model's own `flops_per_step`.
* Collectives: the data-parallel gradient reduction and the FSDP parameter gathers and gradient
  reduce-scatters follow from the parameter shardings alone (`parameter_collectives`); the
  activation collectives (tensor-parallel all-reduces, the expert all-to-all) depend on the
  model and are passed in by the caller. `hlo_collectives` reads the same quantities from a
  compiled program, so the analytic figures can be checked against XLA's.
* Time: compute = FLOPs / (peak x an assumed efficiency); each collective's wire bytes (ring
  algorithms: an all-reduce moves 2(n-1)/n of its operand per device, an all-gather (n-1) times
  its shard, a reduce-scatter and an all-to-all (n-1)/n of theirs) over the link its group
  uses: the fast one (TPU ICI, NVLink) when the group stays inside one domain of
  `domain_size` consecutive devices, the slow one (DCN, InfiniBand) when it spans domains. The
  step time is bracketed by perfect overlap, max(compute, communication), and none,
  compute + communication; MFU follows from each.

Bytes of a collective are its operand bytes on one device per step (an all-gather's operand is
the shard it contributes, a reduce-scatter's the whole buffer it reduces), summed over every
time it runs (loop bodies times their trip counts; the gradient reduction once per
microbatch, as the compiled step does it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from moetx.trainer import metrics as metrics_lib, sharding_plan

# The kinds of collective a plan names, with what each moves.
DATA_PARALLEL_REDUCE = "data_parallel_reduce"  # gradients summed over batch replicas
FSDP_ALL_GATHER = "fsdp_all_gather"  # parameter shards gathered for the forward and backward
FSDP_REDUCE_SCATTER = "fsdp_reduce_scatter"  # gradients summed and scattered to their shards
MODEL_PARALLEL_ALL_REDUCE = "model_parallel_all_reduce"  # partial sums over the `model` axis
ALL_TO_ALL = "all_to_all"  # re-layouts between batch and expert sharding (and back)
OTHER = "other"  # anything else XLA emits (softmax statistics, norms, optimizer scalars)
KINDS = (DATA_PARALLEL_REDUCE, FSDP_ALL_GATHER, FSDP_REDUCE_SCATTER, MODEL_PARALLEL_ALL_REDUCE,
         ALL_TO_ALL, OTHER)


# ----------------------------------------------------------------------------------- devices
@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak figures of one accelerator (per chip / GPU).

    Attributes:
      kind: the name given on the command line (`tpu-v5p`, `h100`, `cpu`, ...).
      peak_flops: dense bf16 matmul FLOP/s (on `cpu`: a measured f32 matmul).
      hbm_bytes: device memory.
      hbm_bandwidth: device memory bandwidth, bytes/s.
      link_bandwidth: bytes/s one device sends (one direction) over the fast interconnect (TPU
        ICI, NVLink) to the devices of its domain.
      domain_size: devices one fast interconnect joins (a TPU slice, an 8-GPU NVLink node).
      dcn_bandwidth: bytes/s per device between domains (TPU DCN, InfiniBand); None where no
        per-device figure is published (a plan whose groups span domains then needs
        `--dcn_bandwidth`).
      compute_efficiency: the assumed fraction of `peak_flops` the model's matmuls sustain.
    """

    kind: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    link_bandwidth: float
    domain_size: int
    dcn_bandwidth: float | None
    compute_efficiency: float

    @property
    def platform(self) -> str:
        """JAX's platform name for this kind: 'cpu', 'tpu' or 'gpu'."""
        return "cpu" if self.kind == CPU else "tpu" if self.kind.startswith("tpu") else "gpu"


GiB = 2 ** 30

# Vendor figures, per chip / GPU (accessed 2026):
# - TPU v4 (Cloud TPU "TPU v4" page): 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, pods of 4096
#   chips with 1.1 PB/s all-reduce bandwidth, i.e. ~268 GB/s per chip; no per-chip DCN figure.
# - TPU v5e ("TPU v5e" page): 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional
#   ICI per chip (200 GB/s each way; also 51.2 TB/s all-reduce per 256-chip pod), pods of 256
#   chips, two 100 Gb/s NICs per 8-chip host (25 Gb/s per chip over DCN).
# - TPU v5p ("TPU v5p" page): 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s
#   bidirectional ICI per chip (4800 Gb/s each way), single slices up to 6144 chips, 50 Gb/s
#   DCN per chip.
# - H100 SXM (NVIDIA datasheet): 989 TFLOP/s dense bf16 (1979 with 2:4 sparsity), 80 GB HBM3 at
#   3.35 TB/s, NVLink 900 GB/s bidirectional (450 each way) inside an 8-GPU node, one 400 Gb/s
#   InfiniBand NIC per GPU in the usual DGX/HGX layout.
# - A100 SXM 80GB (NVIDIA datasheet): 312 TFLOP/s dense bf16, 80 GB HBM2e at 2.04 TB/s,
#   NVLink 600 GB/s bidirectional (300 each way) per 8-GPU node, 200 Gb/s HDR InfiniBand per GPU.
# The compute efficiency of 0.75 is an assumption, not a vendor figure: about what the best
# published JAX trainers sustain on large matmuls (MaxText reports 64-71% MFU end to end on
# v5p, communication included).
DEVICES: dict[str, DeviceSpec] = {
    "tpu-v4": DeviceSpec("tpu-v4", 275e12, 32 * GiB, 1200e9, 1.1e15 / 4096, 4096, None, 0.75),
    "tpu-v5e": DeviceSpec("tpu-v5e", 197e12, 16e9, 819e9, 200e9, 256, 25e9 / 8, 0.75),
    "tpu-v5p": DeviceSpec("tpu-v5p", 459e12, 95 * GiB, 2765e9, 600e9, 6144, 50e9 / 8, 0.75),
    "h100": DeviceSpec("h100", 989e12, 80e9, 3.35e12, 450e9, 8, 400e9 / 8, 0.75),
    "a100": DeviceSpec("a100", 312e12, 80e9, 2.04e12, 300e9, 8, 200e9 / 8, 0.75),
}
CPU = "cpu"
# On the CPU, simulated devices share this machine's cores and memory: each gets 1/count of
# the measured matmul rate, and their collectives are memory copies. The efficiency is a train
# step's model FLOPs over the bare 2048^2 matmul rate measured in the same process (jax 0.10.2,
# 2 cores, f32). Measured 2026-12-05: 34% for the 2-layer d_model 256 decoder-only LM of
# `tests/tools/test_plan.py` (median of 3 rounds, idle), 31-50% for the T5.1.1-small-shape
# rows of `benchmarks/run_all.py` (decoder-only and encoder-decoder, 8 layers, d_model 512,
# batch 8 x 512; the MFU column of the README's benchmark table). Attention, softmax, norms and
# the optimizer update are memory-bound on CPU, so small models sit at the low end. An earlier
# 0.5 (from 41-68% measured in 2026-12 on models of 2-4 layers) left the test's model at 1.45x
# its estimate idle and near 2x beside another job.
CPU_COMPUTE_EFFICIENCY = 0.4


@functools.lru_cache(maxsize=None)
def measured_copy_bandwidth(nbytes: int = 64 * 2 ** 20) -> float:
    """Bytes/s of a large host memory copy here (best of 5): what a collective between
    simulated CPU devices of one process costs."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def device_spec(kind: str, count: int = 1, **overrides: float | int | None) -> DeviceSpec:
    """The figures of one of `count` devices of `kind` (a key of `DEVICES`, or `cpu`: measured
    here, a jitted f32 2048^2 matmul, host memory and a large copy, shared by the `count`
    simulated devices), with any field replaced by a non-None override. Raises ValueError for
    an unknown kind."""
    if kind == CPU:
        import os

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / count
        copy = measured_copy_bandwidth()
        peak = metrics_lib.measured_peak_flops_per_device(2048, 4) / count
        spec = DeviceSpec(CPU, peak, host, copy / count, copy / count, 1 << 30, None,
                          CPU_COMPUTE_EFFICIENCY)
    elif kind in DEVICES:
        spec = DEVICES[kind]
    else:
        raise ValueError(f"Unknown device kind {kind!r}; known: {', '.join(sorted(DEVICES))}, "
                         f"{CPU}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(DeviceSpec)})
    if unknown:
        raise ValueError(f"Unknown device figure(s) {unknown}.")
    return dataclasses.replace(spec, **given)


# ------------------------------------------------------------------------------- collectives
@dataclasses.dataclass
class Collective:
    """One kind of collective over one group of mesh axes, summed over a step.

    Attributes:
      kind: one of `KINDS`.
      op: the XLA op: 'all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all' or
        'collective-permute'.
      axes: the mesh axes its groups span.
      group_size: devices per group.
      operand_bytes: operand bytes on one device per step, over every occurrence.
      count: occurrences per step.
      note: what it moves (analytic entries).
    """

    kind: str
    op: str
    axes: tuple[str, ...]
    group_size: int
    operand_bytes: float
    count: int = 1
    note: str = ""

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends per step with ring algorithms (see the module docstring)."""
        n = self.group_size
        if n <= 1:
            return 0.0
        factor = {"all-reduce": 2.0 * (n - 1) / n, "all-gather": float(n - 1),
                  "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n,
                  "collective-permute": 1.0}[self.op]
        return factor * self.operand_bytes


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the logical `batch` axis maps to (data-parallel replicas)."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return tuple(spec) if isinstance(spec, tuple) else (spec,) if spec else ()


def _spec_axes(sharding) -> set[str]:
    used = set()
    for entry in sharding.spec:
        if entry is None:
            continue
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return used


def parameter_collectives(trainer, parallel_axes: Sequence[str] = ("expert",)
                          ) -> list[Collective]:
    """The collectives the parameter shardings imply for one train step.

    For each parameter, with B the batch mesh axes (size > 1) and U the axes its sharding uses:
    the gradient of its shard is all-reduced over the batch axes it is replicated on (B - U);
    over the batch axes it is sharded on (B & U: FSDP) its shard is all-gathered for the
    forward and again for the backward pass, and its gradient reduce-scattered. A dimension
    whose logical axis is in `parallel_axes` (the experts of stacked expert kernels) is laid
    out on purpose: the activations come to it, so its mesh axes count as used but not
    gathered. Gradients have the parameters' dtype (float32).

    All of it happens once per microbatch: the trainer's accumulation loop sums gradients
    that XLA has already reduced in the loop body, so with `num_microbatches` m the gradient
    reduction moves m times the bytes of one (a loop that kept the accumulator unreduced
    would need one). Model-axis reductions of parameter gradients (e.g. grouped-query K/V
    kernels replicated over `model`) are not counted here.
    """
    mesh = trainer.mesh
    axes_b = [a for a in batch_axes(trainer.rules) if mesh.shape[a] > 1]
    entries: dict[tuple[str, str, tuple[str, ...]], Collective] = {}

    def add(kind, op, axes, nbytes, count):
        key = (kind, op, tuple(axes))
        if key not in entries:
            size = math.prod(mesh.shape[a] for a in axes)
            entries[key] = Collective(kind, op, tuple(axes), size, 0.0, 0, "parameters")
        entries[key].operand_bytes += nbytes * count
        entries[key].count += count

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    logical = jax.tree_util.tree_leaves(trainer.params_axes, is_leaf=is_spec)
    leaves = jax.tree_util.tree_leaves(trainer.abstract_state.params)
    shardings = jax.tree_util.tree_leaves(trainer.state_shardings.params)
    m = trainer.num_microbatches
    for x, s, names in zip(leaves, shardings, logical, strict=True):
        shard = sharding_plan.shard_bytes(x.shape, x.dtype, s)
        laid_out = set()
        for name, entry in zip(tuple(names), tuple(s.spec)):
            if name in parallel_axes and entry is not None:
                laid_out.update(entry if isinstance(entry, tuple) else (entry,))
        used = _spec_axes(s)
        sharded = [a for a in axes_b if a in used and a not in laid_out]
        replicated = [a for a in axes_b if a not in used]
        if sharded:
            size = math.prod(mesh.shape[a] for a in sharded)
            add(FSDP_ALL_GATHER, "all-gather", sharded, shard, 2 * m)
            add(FSDP_REDUCE_SCATTER, "reduce-scatter", sharded, shard * size, m)
        if replicated:
            add(DATA_PARALLEL_REDUCE, "all-reduce", replicated, shard, m)
    return list(entries.values())


# ------------------------------------------------------------------------- compiled programs
_ITEM_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|"
                         r"all-to-all|collective-permute)(-start)?\(")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) [(]")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES[dtype]
            for dtype, dims in _SHAPE.findall(text)]


def _first_group(line: str, n: int) -> list[int] | None:
    """Device indices of the first replica group of a collective (None: unparsed)."""
    m = re.search(r"replica_groups=\{\}", line)
    if m:
        return list(range(n))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return [int(v) for v in m.group(1).split(",") if v]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        ids = np.arange(n).reshape([int(v) for v in m.group(3).split(",")])
        if m.group(4):
            ids = ids.transpose([int(v) for v in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                  r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", line)
    if m:
        names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        sizes = [int(s) for _, s in names]
        ids = np.arange(n)
        if m.group(2):
            ids = ids.reshape([int(v) for v in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        ids = ids.reshape(sizes)
        group_axes = set(re.findall(r"'(\w+)'", m.group(4)))
        index = tuple(slice(None) if name in group_axes else 0 for name, _ in names)
        return ids[index].reshape(-1).tolist()
    m = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", line)
    if m:
        return [int(m.group(1)), int(m.group(2))]
    return None


def _computation_multipliers(lines: Sequence[str]) -> tuple[dict[str, int], dict[int, str], int]:
    """How many times each computation runs per call of the entry computation (while bodies
    times their known trip counts), the computation of each line, and the number of loops
    whose trip count XLA did not record (counted once)."""
    owner: dict[int, str] = {}
    edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, current, unknown = None, None, 0
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        owner[i] = current
        if line.startswith("}"):
            current = None
            continue
        callees = _CALLEE.findall(line)
        branches = _BRANCHES.search(line)
        if branches:
            callees += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
        if not callees:
            continue
        trip = _TRIP.search(line)
        is_loop = any(kind == "body" for kind, _ in callees)
        if is_loop and not trip:
            unknown += 1
        n = int(trip.group(1)) if trip else 1
        for kind, callee in callees:
            edges[current].append((callee, n if kind == "body" else n + 1 if kind == "condition"
                                   else 1))
    runs: dict[str, int] = collections.defaultdict(int)

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 64:
            return
        runs[comp] += times
        for callee, factor in edges.get(comp, ()):
            visit(callee, times * factor, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs, owner, unknown


def hlo_collectives(hlo_text: str, mesh, rules) -> tuple[list[Collective], int]:
    """The collectives of a compiled SPMD program (`compiled.as_text()`), one entry per (op,
    mesh axes), with each one's operand bytes per device per step and the loop trip counts
    applied; and the number of loops whose trip count is unknown (their collectives counted
    once). Kinds are read from op and axes: all-reduces and reduce-scatters over batch axes
    are the data-parallel reduction, all-gathers over batch axes FSDP, all-reduces over
    `model` the model-parallel ones, all-to-alls over `expert` the expert re-layout; anything
    else (mixed axes, collective-permutes) is `other`."""
    names = list(mesh.axis_names)
    shape = [mesh.shape[a] for a in names]
    n = math.prod(shape)
    lines = hlo_text.splitlines()
    runs, owner, unknown = _computation_multipliers(lines)
    axes_b = set(batch_axes(rules))
    out: dict[tuple[str, tuple[str, ...]], Collective] = {}
    for i, line in enumerate(lines):
        m = _COLLECTIVE.match(line)
        if not m:
            continue
        result, op, is_async = m.group(1), m.group(2), bool(m.group(3))
        sizes = _shape_bytes(result)
        if is_async and op in ("all-gather", "collective-permute"):
            sizes = sizes[: len(sizes) // 2]  # (operands, results, ...) of the start op
        group = _first_group(line, n)
        if group is None:
            group, axes = list(range(n)), tuple(a for a, s in zip(names, shape) if s > 1)
        else:
            coords = np.array(np.unravel_index(np.asarray(group), shape)).T
            axes = tuple(a for j, a in enumerate(names) if len(set(coords[:, j])) > 1)
        g = len(group)
        nbytes = float(sum(sizes))
        if op == "all-gather" and not is_async:
            nbytes /= g  # the result is the gathered buffer; the operand is one shard of it
        elif op == "reduce-scatter":
            nbytes *= g  # the result is one shard; the operand is the whole buffer
        if op in ("all-reduce", "reduce-scatter") and axes and set(axes) <= axes_b:
            kind = DATA_PARALLEL_REDUCE if op == "all-reduce" else FSDP_REDUCE_SCATTER
        elif op == "all-gather" and axes and set(axes) <= axes_b:
            kind = FSDP_ALL_GATHER
        elif op == "all-reduce" and axes == ("model",):
            kind = MODEL_PARALLEL_ALL_REDUCE
        elif op == "all-to-all" and axes == ("expert",):
            kind = ALL_TO_ALL
        else:
            kind = OTHER
        times = runs.get(owner.get(i, ""), 1) or 1
        key = (op, axes)
        if key not in out:
            out[key] = Collective(kind, op, axes, g, 0.0, 0)
        out[key].operand_bytes += nbytes * times
        out[key].count += times
    return list(out.values()), unknown


def totals_by_kind(collectives: Iterable[Collective]) -> dict[str, float]:
    """Operand bytes per device per step of each kind (every kind present, 0 when absent)."""
    totals = {k: 0.0 for k in KINDS}
    for c in collectives:
        totals[c.kind] += c.operand_bytes
    return totals


# ------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class StepPlan:
    """A train step on `devices` x `device.kind`, on paper.

    Attributes:
      devices, mesh: the device count and the mesh shape by axis name.
      params: parameter count; param_bytes, opt_bytes: one device's shard of the parameters and
        of the optimizer state.
      activation_bytes, activation_source: activation memory per device and where it comes
        from: 'compiled temp' (XLA's temp bytes of the compiled step: activations plus
        gradients and optimizer temporaries), 'analytic' (a per-layer estimate of what the
        backward pass keeps) or 'unknown'.
      flops_per_step: the model's own count (whole batch, all devices).
      collectives: the analytic collectives (`Collective`s); compiled_collectives: those read
        from the compiled program when it was compiled.
      device: the device figures used.
      compute_seconds, communication_seconds: the two parts of the step;
        communication_by_kind: the second by kind of collective.
      unknown_trip_counts: loops of the compiled program whose trip count XLA did not record.
      compile_seconds: lowering and compiling time, when compiled.
    """

    devices: int
    mesh: dict[str, int]
    params: int
    param_bytes: int
    opt_bytes: int
    activation_bytes: float | None
    activation_source: str
    flops_per_step: float
    collectives: list[Collective]
    device: DeviceSpec
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    communication_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)
    compiled_collectives: list[Collective] | None = None
    unknown_trip_counts: int = 0
    compile_seconds: float | None = None

    @property
    def overlapped_seconds(self) -> float:
        return max(self.compute_seconds, self.communication_seconds)

    @property
    def serial_seconds(self) -> float:
        return self.compute_seconds + self.communication_seconds

    def mfu(self, seconds: float) -> float:
        peak = self.devices * self.device.peak_flops
        return self.flops_per_step / seconds / peak if seconds > 0 and peak > 0 else 0.0

    @property
    def memory_bytes(self) -> float:
        return self.param_bytes + self.opt_bytes + (self.activation_bytes or 0.0)

    def as_dict(self) -> dict[str, Any]:
        def rows(cs):
            return [dict(dataclasses.asdict(c), wire_bytes=c.wire_bytes) for c in cs]

        out = {
            "devices": self.devices, "device": dataclasses.asdict(self.device),
            "mesh": self.mesh, "params": self.params, "param_bytes": self.param_bytes,
            "opt_bytes": self.opt_bytes, "activation_bytes": self.activation_bytes,
            "activation_source": self.activation_source, "memory_bytes": self.memory_bytes,
            "fits_in_hbm": self.memory_bytes <= self.device.hbm_bytes,
            "flops_per_step": self.flops_per_step,
            "collective_bytes": totals_by_kind(self.collectives),
            "collectives": rows(self.collectives),
            "compute_seconds": self.compute_seconds,
            "communication_seconds": self.communication_seconds,
            "communication_seconds_by_kind": self.communication_by_kind,
            "step_seconds_overlapped": self.overlapped_seconds,
            "step_seconds_serial": self.serial_seconds,
            "mfu_overlapped": self.mfu(self.overlapped_seconds),
            "mfu_serial": self.mfu(self.serial_seconds),
            "estimated": ["activation_bytes"] * (self.activation_source == "analytic") + [
                "collectives", "compute_seconds", "communication_seconds",
                "step_seconds_overlapped", "step_seconds_serial", "mfu_overlapped", "mfu_serial"],
        }
        if self.compiled_collectives is not None:
            out["compiled_collective_bytes"] = totals_by_kind(self.compiled_collectives)
            out["compiled_collectives"] = rows(self.compiled_collectives)
            out["unknown_trip_counts"] = self.unknown_trip_counts
            out["compile_seconds"] = self.compile_seconds
        return out


def crosses_domains(mesh_shape: Mapping[str, int], axes: Sequence[str], domain_size: int) -> bool:
    """Whether a group over `axes` (devices laid out in mesh order, the last axis fastest)
    spans more than one domain of `domain_size` consecutive devices."""
    names = list(mesh_shape)
    shape = [mesh_shape[a] for a in names]
    index = tuple(slice(None) if a in axes else 0 for a in names)
    members = np.arange(math.prod(shape)).reshape(shape)[index].reshape(-1)
    return len(set((members // max(domain_size, 1)).tolist())) > 1


def communication_seconds(collectives: Iterable[Collective], mesh_shape: Mapping[str, int],
                          device: DeviceSpec) -> dict[str, float]:
    """Seconds per step of each kind of collective: wire bytes over the fast link, or over the
    slow one for groups that span domains. Raises ValueError when a group spans domains and
    the device has no slow-link figure."""
    out = {k: 0.0 for k in KINDS}
    for c in collectives:
        if c.group_size <= 1 or not c.operand_bytes:
            continue
        bandwidth = device.link_bandwidth
        if crosses_domains(mesh_shape, c.axes, device.domain_size):
            if device.dcn_bandwidth is None:
                raise ValueError(
                    f"The {c.kind} over {'/'.join(c.axes)} spans more than one "
                    f"{device.domain_size}-device {device.kind} domain and no per-device DCN "
                    f"bandwidth is known for it; give --dcn_bandwidth (bytes/s per device).")
            bandwidth = device.dcn_bandwidth
        out[c.kind] += c.wire_bytes / bandwidth
    return out


def plan_step(trainer, batch_shapes: Mapping[str, jax.ShapeDtypeStruct], device: DeviceSpec,
              activation_collectives: Sequence[Collective] = (),
              activation_bytes: float | None = None, compile: bool = False) -> StepPlan:
    """The `StepPlan` of `trainer`'s train step on `batch_shapes` on `device`s (one per mesh
    device).

    `activation_collectives` and `activation_bytes` are the model-specific analytic parts (see
    `moetx.lm.costs` for moetx's Transformers). With `compile`, the step is
    lowered and compiled from abstract inputs on the trainer's mesh (simulated devices do):
    the activation memory becomes XLA's temp bytes and the compiled program's collectives are
    read beside the analytic ones.
    """
    memory = sharding_plan.plan(trainer, dict(batch_shapes))
    params = trainer.abstract_state.params
    n_params = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    flops = float(trainer.model.flops_per_step(params, trainer.input_shapes))
    collectives = parameter_collectives(trainer) + list(activation_collectives)
    result = StepPlan(
        devices=trainer.mesh.devices.size, mesh=dict(trainer.mesh.shape), params=n_params,
        param_bytes=memory.param_bytes, opt_bytes=memory.opt_bytes,
        activation_bytes=activation_bytes,
        activation_source="analytic" if activation_bytes is not None else "unknown",
        flops_per_step=flops, collectives=collectives, device=device)
    if compile:
        start = time.perf_counter()
        compiled = trainer.lower_train_step(batch_shapes).compile()
        result.compile_seconds = time.perf_counter() - start
        result.activation_bytes = float(compiled.memory_analysis().temp_size_in_bytes)
        result.activation_source = "compiled temp"
        result.compiled_collectives, result.unknown_trip_counts = hlo_collectives(
            compiled.as_text(), trainer.mesh, trainer.rules)
    result.compute_seconds = flops / result.devices / (device.peak_flops
                                                       * device.compute_efficiency)
    result.communication_by_kind = communication_seconds(collectives, result.mesh, device)
    result.communication_seconds = sum(result.communication_by_kind.values())
    return result
