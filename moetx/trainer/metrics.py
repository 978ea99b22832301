"""Training metrics: throughput, model FLOPs and MFU, metric writers and a console line.

Where scalars go is chosen by gin: `MetricWriter.writers` lists writers by name —
`'tensorboard'` (the default: TensorBoard event files through clu), `'jsonl'`
(`<logdir>/metrics.jsonl`, one `{"step": ..., "<name>": value, ...}` object per write) and `'csv'`
(`<logdir>/metrics.csv`, rows of step, name, value) — or as a callable `logdir -> writer`, e.g.
a gin reference to any `clu.metric_writers` writer (anything with `write_scalars(step, dict)`,
`flush()` and `close()`).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def matmul_params(params: Any, expert_fraction: float = 1.0) -> float:
    """Parameters that take part in matmuls: every kernel except the input embedding gather
    (and bias-like 1-D vectors such as norm scales or the relative-position table). Expert
    kernels count with `expert_fraction` (k / E: each token meets k of the E experts), so the
    result is the *active* parameter count of an MoE."""
    total = 0.0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "embedding" in name or x.ndim < 2:
            continue
        total += int(np.prod(x.shape)) * (expert_fraction if "['expert']" in name else 1.0)
    return total


def model_flops_per_token(params: Any, num_layers: int, attn_width: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N + 12 L (heads * d_kv) S."""
    return 6.0 * matmul_params(params) + 12.0 * num_layers * attn_width * seq_len


@functools.lru_cache(maxsize=None)
def measured_peak_flops_per_device(n: int = 1024, reps: int = 8) -> float:
    """Float32 matmul FLOP/s of one device, measured here (the MFU denominator on CPU, where no
    datasheet peak applies)."""
    dev = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * n ** 3 / best


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class JsonlWriter:
    """Scalars as JSON lines in `<logdir>/metrics.jsonl` (appended: a resumed run continues
    the file)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, "metrics.jsonl")
        self._file = open(self.path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvWriter:
    """Scalars as `step,name,value` rows of `<logdir>/metrics.csv` (appended)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, "metrics.csv")
        new = not os.path.exists(self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "name", "value"])

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._csv.writerow([int(step), name, repr(float(value))])

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _tensorboard(logdir: str):
    from clu import metric_writers

    return metric_writers.SummaryWriter(logdir)


WRITERS: dict[str, Callable[[str], Any]] = {
    "tensorboard": _tensorboard, "jsonl": JsonlWriter, "csv": CsvWriter}


def make_writer(kind: str | Callable[[str], Any], logdir: str):
    """The writer named `kind` (a key of `WRITERS`) or made by the callable `kind(logdir)`."""
    if callable(kind):
        return kind(logdir)
    if kind not in WRITERS:
        raise ValueError(f"MetricWriter.writers: unknown writer {kind!r}; choose from "
                         f"{', '.join(sorted(WRITERS))}, or give a callable logdir -> writer.")
    return WRITERS[kind](logdir)


@gin.configurable
class MetricWriter:
    """Scalars to the chosen writers (process 0 only; see the module docstring) plus a console
    progress line."""

    def __init__(self, logdir: str | None, total_steps: int, prefix: str = "train",
                 writers: Sequence[str | Callable[[str], Any]] = ("tensorboard",)):
        if isinstance(writers, str) or callable(writers):
            writers = (writers,)
        for kind in writers:
            if not callable(kind) and kind not in WRITERS:
                make_writer(kind, "")  # raises, naming the choices
        self.total_steps = total_steps
        self.prefix = prefix
        self._writers = []
        if logdir and jax.process_index() == 0:
            self._writers = [make_writer(kind, logdir) for kind in writers]

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        for writer in self._writers:
            writer.write_scalars(step, values)
            writer.flush()

    def progress(self, step: int, scalars: Mapping[str, float], eta_seconds: float) -> None:
        """`[train] step 10/100 (10%) | loss 2.3456 | acc 0.123 | 1.23 steps/s |
        4,567 tokens/s | MFU 1.2% | lr 1.00e-02 | ETA 1m05s`: the scalars present among these,
        every `<unit>_per_sec` rate as `<unit>/s`."""
        if jax.process_index() != 0:
            return
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"[{self.prefix}] step {step}/{self.total_steps} ({pct:.0f}%)"]
        for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"),
                         ("steps_per_sec", "{:.2f} steps/s")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        for key, value in scalars.items():
            if key.endswith("_per_sec") and key != "steps_per_sec":
                parts.append(f"{value:,.0f} {key.removesuffix('_per_sec')}/s")
        for key, fmt in (("mfu", "MFU {:.1%}"), ("learning_rate", "lr {:.2e}")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        if scalars.get("skipped_updates"):
            parts.append(f"skipped {scalars['skipped_updates']:,.0f}")
        parts.append(f"ETA {format_duration(eta_seconds)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
