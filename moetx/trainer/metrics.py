"""Training metrics: throughput, model FLOPs and MFU, T5X's timing scalars, metric writers, a
console line, and inference evaluation with the task's metric functions (`InferenceEvaluator`).

The training scalars carry T5X's names: `loss` (the optimised loss, the model's `loss_metric`),
the model's own metrics (a language model's `cross_ent_loss`, `z_loss`, `accuracy`, ...),
`learning_rate`, and `timing/*` (`timing_scalars`, plus `timing/compilation_seconds` once and
`timing/init_or_restore_seconds` at the start); moetx adds `timing/input_seconds` (host time
getting and placing batches), `grad_norm`, `mfu` and, on Linux,
`host/other_cpu_cores`, `host/steal_cpu_cores` and `host/own_cpu_cores` (`HostCpuMeter`: the
CPU the window lost to the machine's other processes and to the hypervisor, so a slow window can
be told from a slow step, and the CPU the run itself used).

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
from typing import Any, Callable, Mapping, NamedTuple, Sequence

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


def timing_scalars(steps: int, seconds: float, batch_size: int, num_devices: int,
                   uptime: float, counts_per_step: Mapping[str, float] | None = None
                   ) -> dict[str, float]:
    """T5X's `timing/*` training scalars of a window of `steps` steps that took `seconds`:
    `seconds`, `steps_per_second`, `seqs` (batch rows in the window), `seqs_per_second`,
    `seqs_per_second_per_core`, `uptime` (seconds since the trainer was made) and, for each
    `{unit: count per step}` in `counts_per_step`, `<unit>_per_second` and its `_per_core`."""
    seconds = max(float(seconds), 1e-9)
    seqs = float(steps * batch_size)
    out = {"timing/seconds": seconds, "timing/steps_per_second": steps / seconds,
           "timing/seqs": seqs, "timing/seqs_per_second": seqs / seconds,
           "timing/seqs_per_second_per_core": seqs / seconds / num_devices,
           "timing/uptime": float(uptime)}
    for unit, count in (counts_per_step or {}).items():
        out[f"timing/{unit}_per_second"] = steps * count / seconds
        out[f"timing/{unit}_per_second_per_core"] = steps * count / seconds / num_devices
    return out


class CpuTimes(NamedTuple):
    """The machine's CPU seconds since boot, summed over cores (Linux `/proc/stat`)."""

    busy: float  # user, nice, system, irq, softirq and steal: everything but idle and iowait
    steal: float  # time the hypervisor gave this virtual machine's cores to another machine


def read_cpu_times() -> CpuTimes | None:
    """The machine's `CpuTimes` now, or None where `/proc/stat` cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    vals = [int(x) for x in fields[1:9]] + [0] * (9 - len(fields))
    idle = vals[3] + vals[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return CpuTimes(busy=(sum(vals[:8]) - idle) / tick, steal=vals[7] / tick)


class HostCpuMeter:
    """The CPU a window of time lost, in cores (CPU seconds per second of wall time): used by
    the machine's *other* processes and the hypervisor's steal (`other_cpu_cores`, this
    process's own time taken out), and the steal alone (`steal_cpu_cores`); with this
    process's own use (`own_cpu_cores`). On a shared or virtual machine the first two explain
    a slow window; both are 0 on a quiet dedicated one.

    `window()` returns the figures since the meter was made or last read, and starts the next
    window; `{}` where the machine's CPU times cannot be read.
    """

    def __init__(self):
        self._start()

    def _start(self) -> None:
        self._cpu = read_cpu_times()
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def window(self) -> dict[str, float]:
        cpu, own, wall = read_cpu_times(), time.process_time(), time.perf_counter()
        before, own0, wall0 = self._cpu, self._own, self._wall
        self._cpu, self._own, self._wall = cpu, own, wall
        if cpu is None or before is None or wall <= wall0:
            return {}
        seconds = wall - wall0
        other = cpu.busy - before.busy - (own - own0)
        return {"other_cpu_cores": max(0.0, other / seconds),
                "steal_cpu_cores": max(0.0, (cpu.steal - before.steal) / seconds),
                "own_cpu_cores": (own - own0) / seconds}


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
        every `timing/<unit>_per_second` rate (but seqs and the per-core ones) as `<unit>/s`."""
        if jax.process_index() != 0:
            return
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"[{self.prefix}] step {step}/{self.total_steps} ({pct:.0f}%)"]
        for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"),
                         ("timing/steps_per_second", "{:.2f} steps/s")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        for key, value in scalars.items():
            unit = key.removeprefix("timing/").removesuffix("_per_second")
            if key.startswith("timing/") and key.endswith("_per_second") \
                    and unit not in ("steps", "seqs"):
                parts.append(f"{value:,.0f} {unit}/s")
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


class InferenceEvaluator:
    """Inference evaluation as T5X runs it: a `seqio.Evaluator` over a task's (or mixture's)
    split computes the task's metric functions from the model's predictions and scores.

    The model supplies them (`inference_feature_converter`, `inference_fns`: greedy
    predictions for predict metrics, target log-likelihoods for score metrics). Results are
    written as T5X's seqio TensorBoard logger lays them out, one directory per task,
    `<log_dir>/<task>/` with the scalars `eval/<metric>`, and returned flat as
    `{'<task>/<metric>': value}`.

    Args:
      model: a `moetx.trainer.model.Model` with inference functions.
      dataset_cfg: the task or mixture, split and feature lengths (`batch_size` is the rows per
        compiled call; packing and shuffling do not apply).
      log_dir: where results go (T5X: `<model_dir>/inference_eval`); None writes nothing.
      num_examples: evaluate the first this many examples of each task (None: all).
      writers: the `MetricWriter.writers` to use (default: gin's choice).
    """

    def __init__(self, model: Any, dataset_cfg: Any, log_dir: str | None = None,
                 num_examples: int | None = None,
                 writers: Sequence[str | Callable[[str], Any]] | None = None):
        import seqio

        converter = getattr(model, "inference_feature_converter", None)
        if converter is None:
            raise ValueError(f"{type(model).__name__} has no inference functions, so it "
                             f"cannot be evaluated with the task's metrics (seqio.Evaluator).")
        self.model = model
        self.batch_size = int(dataset_cfg.batch_size)
        self.log_dir = log_dir
        self._writers = {} if writers is None else {"writers": writers}
        self.evaluator = seqio.Evaluator(
            mixture_or_task_name=dataset_cfg.mixture_or_task_name,
            feature_converter=converter, eval_split=dataset_cfg.split,
            use_cached=dataset_cfg.use_cached,
            sequence_length=dict(dataset_cfg.task_feature_lengths), num_examples=num_examples,
            shuffle=False, async_compute_metrics=False)
        if not self.evaluator.eval_tasks:
            raise ValueError(
                f"{dataset_cfg.mixture_or_task_name!r} has no task with metric functions and a "
                f"{dataset_cfg.split!r} split; give the task metric_fns (or predict_metric_fns "
                f"/ score_metric_fns) to evaluate it with seqio.")

    def evaluate(self, params: Any, model_state: Any, mesh: Any, rules: Any, step: int
                 ) -> dict[str, float]:
        """The tasks' metrics of the model with `params` (on `mesh`), written at `step`."""
        task = self.evaluator.eval_tasks[0]
        fns = self.model.inference_fns(params, model_state, mesh=mesh, rules=rules,
                                       batch_size=self.batch_size,
                                       output_features=task.output_features)
        future, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                            predict_fn=fns.get("predict"),
                                            score_fn=fns.get("score"))
        results: dict[str, float] = {}
        for task_name, task_metrics in (future.result() or {}).items():
            scalars = {}
            for name, value in task_metrics.items():
                value = getattr(value, "value", value)  # seqio.metrics.Scalar
                if np.ndim(value) == 0 and isinstance(np.asarray(value).item(), (int, float)):
                    scalars[name] = float(np.asarray(value))
            results.update({f"{task_name}/{k}": v for k, v in scalars.items()})
            if self.log_dir:
                writer = MetricWriter(os.path.join(self.log_dir, task_name), step, "eval",
                                      **self._writers)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
                writer.close()
        return results
