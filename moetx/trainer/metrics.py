"""Training metrics: throughput, model FLOPs and MFU, TensorBoard (clu) and a console line."""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Mapping

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


class MetricWriter:
    """TensorBoard scalars through clu (process 0 only) plus a console progress line."""

    def __init__(self, logdir: str | None, total_steps: int, prefix: str = "train"):
        self.total_steps = total_steps
        self.prefix = prefix
        self._writer = None
        if logdir and jax.process_index() == 0:
            from clu import metric_writers

            self._writer = metric_writers.SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is not None:
            self._writer.write_scalars(step, {k: float(v) for k, v in scalars.items()})
            self._writer.flush()

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
        if self._writer is not None:
            self._writer.close()
