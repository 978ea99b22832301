#!/usr/bin/env python
"""Training-step throughput of moetx against Hugging Face transformers (torch, CPU), same run.

Both sides train the same decoder-only model on the same batch of random token ids from the same
initial weights (moetx's initialisation, copied into the HF model), with the same optimizer and
a cross entropy + 1e-4 logit z-loss objective (mean over tokens):

  --arch t5     T5.1.1-style: RMSNorm, shared relative position bias, gated-GELU MLP, no biases,
                untied logits. HF: `transformers.models.t5.modeling_t5.T5Stack(is_decoder=True)`
                without its cross-attention sublayers, plus an untied `lm_head`.
  --arch llama  the Llama option set (moetx/gin/models/llama_tiny.gin): RoPE (theta 1e4),
                SwiGLU, RMSNorm (eps 1e-5), 1/sqrt(d_kv) attention scaling, untied logits.
                HF: `LlamaForCausalLM` from `moetx.convert.hf.llama_config_to_hf`, weights by
                `moetx_to_hf_llama` (as tests/convert check logit parity).

`--optimizer adafactor`: moetx's T5X-default Adafactor (lr 1e-2 from the rsqrt schedule) against
`transformers.optimization.Adafactor(lr=1e-2, scale_parameter=True, relative_step=False,
warmup_init=False)`. `--optimizer adamw`: `moetx.trainer.optimizers.adamw` (global-norm clipping,
then optax.adamw) against `clip_grad_norm_` + `torch.optim.AdamW(fused=True)`, the settings in
`ADAMW` on both sides (they are stated in the JSON line).

The peer (`--peer`, default both): the HF model trained eagerly, and under `torch.compile`
(inductor on the CPU, default mode: the forward pass and the loss are compiled, the backward by
AOTAutograd, the optimizer step stays eager), each with its own copy of the model and optimizer.
moetx and every HF variant are timed round-robin (one step of each, repeated) after `--warmup`
untimed steps each, so a change in background load hits all alike; each step time is a median.
The faster HF variant is the `peer`; `ratio_moetx_over_peer` is moetx's tokens/s over the
peer's. The compile variant's first step holds its compilation (`hf_compile_first_step_s`). If
torch.compile fails, its exception is reported (`hf_compile_error`) and eager is the peer.

The f32 and bf16 matmul rates (n x n, n = 1024 and 2048) of JAX and torch are measured in the
same run; the MFU denominator is the fastest f32 rate either library reached
(`peak_flops_f32_matmul`), `*_mfu_bf16_peak` uses the fastest bf16 rate. FLOPs per step are the
model's `flops_per_step` (6 N per token plus attention, PaLM appendix B).

`--memory`: after timing, each side trains 2 steps again in its own child process (this script
with `--only_side moetx`, `--only_side hf --peer eager|compile`; the HF child uses HF's own
initialisation, which costs the same memory; a child records its losses, `final_losses`, without
refusing a non-finite one: from HF's own initialisation Adafactor at lr 1e-2 can reach NaN
within the 2 steps, on the same memory; the losses are checked in the timed run) and reports its
peak RSS (`VmHWM`, see `peak_rss_mb`):
`moetx_peak_rss_mb`, `hf_eager_peak_rss_mb`, `hf_compile_peak_rss_mb`, `hf_peak_rss_mb` (the
peer's). Every child first imports the libraries of both sides (`import_side_libraries`: jax,
torch, transformers, moetx with TensorFlow via SeqIO), so `rss_baseline_mb` (the peak before any
model is built) is the same for all and `*_rss_over_baseline_mb` is each side's own.

This module also holds the helpers the other side-by-side benchmarks share (flags, optimizers,
the HF variants, round-robin timing, matmul peaks, memory children). Prints exactly one JSON
line on stdout; progress goes to stderr. Examples:

  .venv/bin/python benchmarks/train_throughput.py                # demo shape, tuned XLA flags
  .venv/bin/python benchmarks/train_throughput.py --arch llama --optimizer adamw --memory
  .venv/bin/python benchmarks/train_throughput.py --d_model 512 --d_ff 1024 --layers 8 \\
      --heads 6 --vocab 32128 --batch 8 --length 512 --steps 6 --warmup 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple, TextIO

# The peers run torch on the CPU. Triton, which torch imports lazily, segfaults when it loads
# after TensorFlow (which moetx imports); torch on the CPU never needs it, and inductor's CPU
# backend generates C++ without it. The other benchmarks import this module, so this covers
# them too. See moetx/util/torch_env.py.
from moetx.util import torch_env

torch_env.block_triton_after_tensorflow(force=True)

ARCHS = ("t5", "llama")
OPTIMIZERS = ("adafactor", "adamw")
PEER_MODES = ("eager", "compile", "both")
SIDES = ("moetx", "hf")

# AdamW on both sides: moetx.trainer.optimizers.adamw's defaults (MaxText's) at a constant
# learning rate. optax.adamw and torch.optim.AdamW both decouple the decay (p -= lr * wd * p),
# add eps outside the square root and correct both moments' bias.
ADAMW = {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
         "grad_clip_norm": 1.0}
ADAFACTOR = {
    "lr": 1e-2,
    "moetx": "moetx.trainer.optimizers.adafactor, T5X defaults (decay_rate 0.8, factored dims "
             ">= 128, update clipping 1.0, parameter scale), rsqrt schedule: lr 1e-2 below "
             "step 10000",
    "hf": "transformers.optimization.Adafactor(lr=1e-2, scale_parameter=True, "
          "relative_step=False, warmup_init=False)",
}


# ------------------------------------------------------------------------------------ flags
def add_side_by_side_flags(p: argparse.ArgumentParser) -> None:
    """The flags every moetx-vs-HF training benchmark takes (see this module's docstring)."""
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adafactor",
                   help="the optimizer on both sides")
    p.add_argument("--peer", choices=PEER_MODES, default="both",
                   help="HF variants timed: eager, torch.compile, or both (the faster is the peer)")
    p.add_argument("--memory", action="store_true",
                   help="also measure each side's peak RSS in its own child process (2 steps)")
    p.add_argument("--only_side", choices=SIDES,
                   help="(what --memory runs) build and train one side only, 2 steps, and print "
                        "its peak RSS instead of the timing line")


def check_side_by_side_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.memory and args.only_side:
        p.error("--memory starts the --only_side children itself; pass one of them, not both")


def optimizer_settings(name: str) -> dict:
    """What the JSON line states about the optimizer both sides use."""
    if name == "adafactor":
        return {"name": "adafactor", **ADAFACTOR}
    return {"name": "adamw", **ADAMW,
            "moetx": "moetx.trainer.optimizers.adamw: optax.clip_by_global_norm + optax.adamw",
            "hf": "torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW(fused=True)"}


def moetx_optimizer_factory(name: str) -> Callable:
    """`param_axes -> Optimizer` for `Trainer`: moetx's gin-default Adafactor, or AdamW."""
    from moetx.trainer import optimizers

    if name == "adafactor":
        return optimizers.make_optimizer
    s = ADAMW
    adamw = functools.partial(optimizers.adamw, b1=s["b1"], b2=s["b2"], eps=s["eps"],
                              weight_decay=s["weight_decay"], grad_clip_norm=s["grad_clip_norm"])
    return functools.partial(optimizers.make_optimizer, adamw, s["lr"])


def torch_optimizer(torch, name: str, params: list):
    """(optimizer, global-norm clip or None) matching `moetx_optimizer_factory(name)`."""
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=ADAFACTOR["lr"], scale_parameter=True, relative_step=False,
                         warmup_init=False), None
    s = ADAMW
    # fused: one C++ kernel per parameter, torch's fastest AdamW on the CPU.
    return torch.optim.AdamW(params, lr=s["lr"], betas=(s["b1"], s["b2"]), eps=s["eps"],
                             weight_decay=s["weight_decay"], fused=True), s["grad_clip_norm"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: the `make demo` model (moetx/gin/models/decoder_small.gin) with the 8k vocab.
    p.add_argument("--arch", choices=ARCHS, default="t5")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side (compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    p.add_argument("--skip_hf", action="store_true", help="time moetx only (no peer)")
    add_side_by_side_flags(p)
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "head_dim", "d_ff", "vocab", "batch", "length",
                 "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    if args.vocab < 2:
        p.error("--vocab must be at least 2 (id 0 is the BOS input)")
    check_side_by_side_flags(p, args)
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[train_throughput {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


def reserve_stdout_for_json(xla_tuning: bool = True) -> TextIO:
    """Starts a benchmark process; call before importing jax.

    The JSON line(s) are the only stdout output, so C-level and library prints must stay off
    it: returns a line-buffered text stream on the original stdout and points fd 1 and
    `sys.stdout` at stderr. Also quietens TensorFlow's startup log and, with `xla_tuning`,
    applies `moetx.util.xla_env.configure_cpu_defaults()`.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if xla_tuning:
        from moetx.util import xla_env

        xla_env.configure_cpu_defaults()
    return out


def add_cpu_flags(p: argparse.ArgumentParser) -> None:
    """`--threads` (torch's intra-op threads) and `--no_xla_tuning`."""
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")


def start_json_benchmark(args: argparse.Namespace) -> tuple[TextIO, str]:
    """Starts a one-JSON-line benchmark before jax is imported: torch and TensorFlow offline
    and without oneDNN's start-up rewrites, stdout reserved for the JSON
    (`reserve_stdout_for_json`). Returns that stream and the user's XLA_FLAGS as they were."""
    xla_flags_before = os.environ.get("XLA_FLAGS", "")
    for name, value in (("TF_ENABLE_ONEDNN_OPTS", "0"), ("HF_HUB_OFFLINE", "1"),
                        ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    return reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning), xla_flags_before


def finish_json_benchmark(out: TextIO, record: dict) -> int:
    """Writes `record`, dated now, as the benchmark's one JSON line to `out` (from
    `start_json_benchmark`) and closes it; returns the exit status 0."""
    out.write(json.dumps({**record, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    out.close()
    return 0


def versions(jax, torch) -> dict:
    import importlib.metadata as md

    out = {"jax": jax.__version__, "torch": torch.__version__}
    for pkg in ("jaxlib", "flax", "optax", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------- timing
class CpuLoad:
    """CPU time used by *other* processes (and, on a virtual machine, taken by the hypervisor's
    steal) while a section runs, in cores: a noise indicator, since this machine's cores are
    shared with other work. None where the machine's CPU times cannot be read (not Linux).
    The CPU of child processes the section started and waited for (a command it times) is
    counted apart, in `children_cores`, not as other processes'."""

    def __init__(self):
        self.cores = None  # other processes and steal
        self.steal_cores = None  # steal alone
        self.own_cores = None  # this process
        self.children_cores = None  # the section's waited-for child processes

    def __enter__(self):
        # Imported here, not at the top: the benchmarks set XLA's flags before jax is imported.
        from moetx.trainer.metrics import HostCpuMeter

        self._children = self._children_cpu()
        self._wall = time.perf_counter()
        self._meter = HostCpuMeter()
        return self

    @staticmethod
    def _children_cpu() -> float:
        t = os.times()
        return t.children_user + t.children_system

    def __exit__(self, *exc):
        window = self._meter.window()
        wall = max(time.perf_counter() - self._wall, 1e-9)
        self.children_cores = (self._children_cpu() - self._children) / wall
        other = window.get("other_cpu_cores")
        self.cores = None if other is None else max(0.0, other - self.children_cores)
        self.steal_cores = window.get("steal_cpu_cores")
        self.own_cores = window.get("own_cpu_cores")
        return False


class RoundRobin(NamedTuple):
    """What `time_round_robin` measured, each a dict keyed by the step's name."""

    first: dict  # seconds of the first (compiling) call
    times: dict  # seconds of each timed call, in order
    load: CpuLoad  # CPU load over the timed calls
    first_out: dict  # return value of the first call
    last_out: dict  # return value of the latest call
    failed: dict = {}  # name -> "ExceptionType: message" of a step that failed while warming up


def time_round_robin(steps: dict, n: int, warmup: int, log, what: str = "steps",
                     fallbacks: dict | None = None) -> RoundRobin:
    """Times each of `steps` (name -> no-argument callable) `n` times, round-robin.

    Each callable in turn is first called once, timed alone (it compiles), then `warmup - 1`
    more times untimed; then `n` rounds call each once in order, each call timed, so a change
    in background load hits every step alike. `log` is the calling script's progress logger.

    `fallbacks` ({name: (replacement name, no-argument factory of the replacement step)}) lists
    the steps allowed to fail while warming up (e.g. a torch.compile variant): the exception is
    recorded in `failed`, the step is dropped, and its replacement is built and warmed up in its
    place unless a step of that name is already timed.
    """
    fallbacks = fallbacks or {}
    first, first_out, last_out, failed = {}, {}, {}, {}
    timed_steps = {}
    queue = list(steps.items())
    while queue:
        name, fn = queue.pop(0)
        try:
            t0 = time.perf_counter()
            first_out[name] = last_out[name] = fn()
            first[name] = time.perf_counter() - t0
            log(f"{name}: first call (compile) {first[name]:.2f}s")
            for _ in range(warmup - 1):
                last_out[name] = fn()
        except Exception as e:  # noqa: BLE001 (only steps listed in `fallbacks` get here)
            if name not in fallbacks:
                raise
            failed[name] = f"{type(e).__name__}: {e}"[:2000]
            for d in (first, first_out, last_out):
                d.pop(name, None)
            log(f"{name} FAILED ({failed[name][:300]}); falling back")
            replacement, make = fallbacks[name]
            if replacement not in steps and replacement not in timed_steps:
                queue.insert(0, (replacement, make()))
            continue
        timed_steps[name] = fn
    times = {name: [] for name in timed_steps}
    log(f"timing {n} {what} of each of {list(timed_steps)} (round-robin)")
    with CpuLoad() as load:
        for _ in range(n):
            for name, fn in timed_steps.items():
                t0 = time.perf_counter()
                last_out[name] = fn()
                times[name].append(time.perf_counter() - t0)
    return RoundRobin(first, times, load, first_out, last_out, failed)


def best_time(fn, reps: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure_matmuls(jax, jnp, torch) -> dict[str, float]:
    """n x n matmul FLOP/s (best of a few timed rounds) in JAX and torch, f32 and bf16 (bf16
    inputs and output; the accumulation is the library's), keyed `{lib}_{dtype}_{n}`.

    A kernel whose single call takes over half a second is timed by that one call, and not at
    the larger size: torch's bf16 matmul on a CPU without native bf16 (AVX-512 BF16 / AMX) runs
    at about 1 GFLOP/s, where the rounds would take 7 minutes and it is nobody's peak."""
    out, slow = {}, set()
    for n in (1024, 2048):
        reps = 8 if n == 1024 else 3
        for dtype, jdt, tdt in (("f32", jnp.float32, torch.float32),
                                ("bf16", jnp.bfloat16, torch.bfloat16)):
            a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jdt)
            b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jdt)
            f = jax.jit(lambda x, y: x @ y)
            ta, tb = torch.randn(n, n, dtype=tdt), torch.randn(n, n, dtype=tdt)
            for lib, call in (("jax", lambda: f(a, b).block_until_ready()),
                              ("torch", lambda: ta @ tb)):
                if (lib, dtype) in slow:
                    continue
                call()  # warm-up (JAX compiles)
                t0 = time.perf_counter()
                call()
                seconds = time.perf_counter() - t0
                if seconds > 0.5:
                    slow.add((lib, dtype))
                else:
                    seconds = best_time(call, reps)
                out[f"{lib}_{dtype}_{n}"] = 2.0 * n ** 3 / seconds
    return out


def measure_read_bandwidth(jax, jnp, torch, nbytes: int = 256 * 2 ** 20) -> dict[str, float]:
    """Bytes/s at which a jitted JAX sum and torch's sum read a float32 array of `nbytes` (far
    larger than the caches; best of 5 rounds of 5): what a memory-bound step streams at best."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    t.sum()
    return {"jax": nbytes / best_time(lambda: f(x).block_until_ready(), 5),
            "torch": nbytes / best_time(lambda: t.sum(), 5)}


def matmul_fields(mm: dict[str, float]) -> dict:
    """The JSON fields of a `measure_matmuls` result: the MFU denominators (the fastest rate
    either library reached, per dtype), each library's best, and every rate in GFLOP/s."""
    best = {f"{lib}_{dt}": max(v for k, v in mm.items() if k.startswith(f"{lib}_{dt}_"))
            for lib in ("jax", "torch") for dt in ("f32", "bf16")}
    return {
        "peak_flops_f32_matmul": max(best["jax_f32"], best["torch_f32"]),
        "peak_flops_bf16_matmul": max(best["jax_bf16"], best["torch_bf16"]),
        "peak_flops_matmul_by_library": best,
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in mm.items()},
    }


# ------------------------------------------------------------------------- the HF variants
def hf_train_step(torch, model, loss_of: Callable, optimizer: str, compiled: bool) -> Callable:
    """One training step of an HF model: `loss_of(model)` (forward and loss, compiled with
    `torch.compile` when `compiled`), backward, optional clipping, optimizer step; the step
    returns the loss as a float."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, clip = torch_optimizer(torch, optimizer, params)
    forward = functools.partial(loss_of, model)
    if compiled:
        forward = torch.compile(forward)  # inductor, default mode; compiles on the first call

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss.detach())

    step.model = model
    return step


def hf_variants(torch, make_model: Callable, loss_of: Callable, optimizer: str, peer: str
                ) -> tuple[dict, dict]:
    """(steps, fallbacks) for `time_round_robin`: `hf_eager` and/or `hf_compile` as `peer`
    asks, each training its own `make_model()` (a fresh model with the benchmark's initial
    weights); `hf_compile` falls back to eager if torch.compile fails."""
    modes = ("eager", "compile") if peer == "both" else (peer,)
    steps = {f"hf_{m}": hf_train_step(torch, make_model(), loss_of, optimizer, m == "compile")
             for m in modes}
    fallback = ("hf_eager", lambda: hf_train_step(torch, make_model(), loss_of, optimizer, False))
    return steps, {"hf_compile": fallback}


def compile_info(torch) -> dict:
    """What torch.compile did in this process: graphs, graph breaks, inductor cache hits (a
    warm FX-graph cache shortens `hf_compile_first_step_s`)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
            "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
            "backend": "inductor", "mode": "default",
            "scope": "forward + loss compiled (backward via AOTAutograd); optimizer step eager"}


def side_by_side_fields(timed: RoundRobin, tokens: int, flops_per_step: float, mm_fields: dict,
                        ours: str = "moetx") -> dict:
    """Per-variant fields (`{name}_step_time_s`, `_tokens_per_sec`, `_mfu`, `_mfu_bf16_peak`,
    `_first_step_s`, `_loss_first`, `_loss_last`), the faster HF variant as `peer` with its
    figures under `peer_*`, and `ratio_{ours}_over_{peer, each variant}` (tokens/s ratios). Every
    step's output is its loss."""
    out: dict = {}
    med = {}
    for name, ts in timed.times.items():
        t = med[name] = statistics.median(ts)
        out.update({
            f"{name}_step_time_s": t,
            f"{name}_tokens_per_sec": tokens / t,
            f"{name}_mfu": flops_per_step / t / mm_fields["peak_flops_f32_matmul"],
            f"{name}_mfu_bf16_peak": flops_per_step / t / mm_fields["peak_flops_bf16_matmul"],
            f"{name}_first_step_s": timed.first[name],
            f"{name}_loss_first": float(timed.first_out[name]),
            f"{name}_loss_last": float(timed.last_out[name]),
        })
    for name, err in timed.failed.items():
        out[f"{name}_error"] = err
    hf = [name for name in med if name.startswith("hf_")]
    if hf and ours in med:
        peer = min(hf, key=med.get)
        out["peer"] = peer
        for field in ("step_time_s", "tokens_per_sec", "mfu", "first_step_s"):
            out[f"peer_{field}"] = out[f"{peer}_{field}"]
        out[f"ratio_{ours}_over_peer"] = med[peer] / med[ours]
        for name in hf:
            out[f"ratio_{ours}_over_{name}"] = med[name] / med[ours]
    return out


def check_finite(timed: RoundRobin) -> None:
    import math

    for name, loss in timed.last_out.items():
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"{name} loss is {loss}")


# ----------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux's `VmHWM` (/proc/self/status), the high-water mark of this program's own address
    space. Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries the RSS of the forked copy of
    the parent into it across `execve`, so a child started by a 2 GB parent reports at least
    2 GB whatever it does (seen here). `ru_maxrss` is the fallback where /proc is missing.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (`VmRSS`; 0 where /proc is missing)."""
    return _proc_status_mb("VmRSS") or 0.0


def _proc_status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status (e.g. `VmHWM`) in MiB; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Gives the heap's free pages back to the kernel (glibc `malloc_trim`; nothing elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def import_side_libraries() -> None:
    """Imports what either side's build imports: moetx's models (which bring TensorFlow
    through SeqIO, ~0.8 GB of RSS here), trainer and converters, and transformers' T5, Llama and
    Switch models. Called before `rss_baseline_mb` is read, so that the baseline is the same
    whichever side a memory child builds and the peak over it is the side's own."""
    import importlib

    for module in ("moetx.convert.hf", "moetx.lm.models", "moetx.trainer.trainer",
                   "transformers.optimization", "transformers.models.t5.modeling_t5",
                   "transformers.models.llama.modeling_llama",
                   "transformers.models.switch_transformers.modeling_switch_transformers"):
        importlib.import_module(module)


def memory_child_line(side: str, peer: str | None, baseline_mb: float, timed: RoundRobin) -> dict:
    """The JSON line an `--only_side` child prints."""
    peak = peak_rss_mb()
    return {"benchmark": "peak_rss", "side": side, "peer_mode": peer,
            "peak_rss_mb": peak, "rss_baseline_mb": baseline_mb,
            "rss_over_baseline_mb": peak - baseline_mb,
            "steps_run": {k: 1 + len(v) for k, v in timed.times.items()},
            "final_losses": {k: float(v) for k, v in timed.last_out.items()},
            "failed": timed.failed}


# The moetx memory child run once more with the allocator as glibc ships it: a `MALLOC_*`
# variable makes `xla_env.configure_cpu_allocator` stand aside (it keeps freed heap blocks for
# reuse, which makes the step faster and the peak RSS higher).
ALLOCATOR_OFF_CHILD = ("moetx_malloc_arena_max_8", ["--only_side", "moetx"],
                       {"MALLOC_ARENA_MAX": "8"})


def measure_memory(script: str, argv: list[str], hf_modes: list[str], xla_flags_user: str,
                   log, children: list[tuple] | None = None) -> dict:
    """Runs `script argv --only_side ...` once for moetx, once for moetx with the allocator
    setting off (`ALLOCATOR_OFF_CHILD`) and once per HF mode in `hf_modes`, one child at a
    time, each training 2 steps, and returns `{name}_peak_rss_mb` and
    `{name}_rss_over_baseline_mb` for `moetx`, `moetx_malloc_arena_max_8` and `hf_{mode}`,
    `rss_baseline_mb` and any `memory_error`. `children` ([(name, extra flags[, extra
    environment])]) replaces those children (e.g. moetx and timm)."""
    base = [a for a in argv if a != "--memory"] + ["--steps", "1", "--warmup", "1"]
    if children is None:
        children = [("moetx", ["--only_side", "moetx"]), ALLOCATOR_OFF_CHILD]
        children += [(f"hf_{m}", ["--only_side", "hf", "--peer", m]) for m in hf_modes]
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags_user  # the child applies the same tuning itself
    out: dict = {"rss_baseline_mb": {}}
    errors = {}
    for name, extra, *child_env in children:
        cmd = [sys.executable, script, *base, *extra]
        extra_env = child_env[0] if child_env else {}
        log(f"memory: {name} child ({' '.join(extra)}"
            + "".join(f", {k}={v}" for k, v in extra_env.items()) + ")")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, **extra_env})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            errors[name] = (f"exit {proc.returncode}: "
                            + " | ".join(proc.stderr.strip().splitlines()[-3:]))[:1000]
            log(f"memory: {name} child failed: {errors[name]}")
            continue
        child = json.loads(lines[-1])
        if child.get("failed"):
            errors[name] = child["failed"]
            continue
        out[f"{name}_peak_rss_mb"] = child["peak_rss_mb"]
        out[f"{name}_rss_over_baseline_mb"] = child["rss_over_baseline_mb"]
        out["rss_baseline_mb"][name] = child["rss_baseline_mb"]
        log(f"memory: {name} peak RSS {child['peak_rss_mb']:,.0f} MiB "
            f"(baseline {child['rss_baseline_mb']:,.0f})")
    if errors:
        out["memory_error"] = errors
    return out


def peer_memory(result: dict) -> None:
    """Adds `hf_peak_rss_mb` (and `hf_rss_over_baseline_mb`): the HF variant that is the peer."""
    for field in ("peak_rss_mb", "rss_over_baseline_mb"):
        key = f"{result.get('peer')}_{field}"
        if key in result:
            result[f"hf_{field}"] = result[key]


def run_memory(result: dict, args, argv: list[str], script: str, xla_flags_user: str,
               log, children: list[tuple[str, list[str]]] | None = None) -> None:
    """`--memory`: measure moetx's and each successfully timed HF variant's peak RSS (or, with
    `children`, those children's; see `measure_memory`). The caller drops its own references to
    the timed models first.

    Returns this process's freed memory to the system first: the allocator setting keeps
    freed blocks, and the timed models' ~10 GB at T5.1.1-small's shape beside a child's made
    the kernel kill this process (24 GiB machine, decoder AdamW row)."""
    import gc

    gc.collect()
    release_freed_memory()
    log(f"memory: this process holds {current_rss_mb():,.0f} MiB while the children run")
    modes = [k[len("hf_"):-len("_step_time_s")] for k in result
             if k.startswith("hf_") and k.endswith("_step_time_s")]
    result.update(measure_memory(script, argv, modes, xla_flags_user, log, children=children))
    if children is None:
        peer_memory(result)


def run_memory_child(name: str, build, steps: int, warmup: int, log) -> dict:
    """The body of a memory child (`--only_side`, `--only_model`): reads the RSS baseline,
    calls `build()` for one side's step function (no arguments, returns the loss), trains it
    `warmup` + `steps` steps alone and returns its `memory_child_line`. The caller imports
    every side's libraries before, so that the baseline is the same whichever side is built."""
    baseline = peak_rss_mb()
    timed = time_round_robin({name: build()}, steps, warmup, log)
    line = memory_child_line(name, None, baseline, timed)
    log(f"memory child {name}: peak RSS {line['peak_rss_mb']:,.0f} MiB "
        f"(baseline {baseline:,.0f})")
    return line


def environment_fields(args, jax, torch, xla_flags_user: str) -> dict:
    return {
        "xla_tuning": not args.no_xla_tuning,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_user": xla_flags_user,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "versions": versions(jax, torch),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }


# ------------------------------------------------------------------------------- the model
def make_batch(np, vocab: int, batch: int, length: int) -> dict:
    """One packed segment per row of random ids (never 0, which is padding/BOS)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(1, vocab, size=(batch, length), dtype=np.int32)
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((batch, length), np.int32),
        "decoder_segment_ids": np.ones((batch, length), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                             (batch, length)).copy(),
    }


def moetx_config(args):
    from moetx.lm import transformer

    common = dict(vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
                  head_dim=args.head_dim, mlp_dim=args.d_ff, num_decoder_layers=args.layers,
                  dropout_rate=0.0, logits_via_embedding=False, dtype="float32")
    if args.arch == "llama":  # llama_tiny.gin's options
        return transformer.TransformerConfig(
            **common, position_embedding="rope", rope_theta=10000.0,
            scale_attention_logits=True, mlp_activations=("silu", "linear"),
            tied_logits_rescale=False, norm_epsilon=1e-5)
    # decoder_small.gin's options
    return transformer.TransformerConfig(
        **common, mlp_activations=("gelu", "linear"), relative_attention_num_buckets=32,
        relative_attention_max_distance=128)


def build_moetx(args, jax, cfg, batch_np):
    from moetx.lm import models
    from moetx.trainer import metrics, partitioning, trainer as trainer_lib

    # As moetx/gin/models/decoder_tiny.gin: z-loss 1e-4, mean over real target tokens.
    model = models.DecoderOnlyModel(config=cfg, z_loss=1e-4,
                                    loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    shapes = model.input_shapes(args.batch, args.length)
    # Single device even if the user asked XLA for several host devices.
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tr = trainer_lib.Trainer(model, moetx_optimizer_factory(args.optimizer), mesh,
                             partitioning.standard_logical_axis_rules(), shapes)
    state = tr.init_state()
    return (tr, state, tr.to_global(batch_np), metrics.count_params(state.params),
            float(model.flops_per_step(state.params, shapes)))


def moetx_to_hf_t5_decoder(params_np: dict, layers: int) -> dict:
    """moetx T5.1.1 DecoderOnly parameters -> the state dict of `build_hf_model`'s T5 module
    (`decoder` = T5Stack without cross-attention, so the MLP is sublayer 1; `lm_head`).
    Kernels `[in, out]` become torch `[out, in]`; the bias table `[heads, buckets]` becomes
    `[buckets, heads]`."""
    from moetx.util import trees

    flat = trees.flatten(params_np)
    sd = {"decoder.embed_tokens.weight": flat.pop("decoder/token_embedder/embedding"),
          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
              flat.pop("decoder/relpos_bias/rel_embedding").T,
          "decoder.final_layer_norm.weight": flat.pop("decoder/decoder_norm/scale"),
          "lm_head.weight": flat.pop("decoder/logits_dense/kernel").T}
    for i in range(layers):
        m, h = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
        sd[f"{h}.0.layer_norm.weight"] = flat.pop(f"{m}/pre_self_attention_layer_norm/scale")
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            sd[f"{h}.0.SelfAttention.{theirs}.weight"] = flat.pop(
                f"{m}/self_attention/{ours}/kernel").T
        sd[f"{h}.1.layer_norm.weight"] = flat.pop(f"{m}/pre_mlp_layer_norm/scale")
        for name in ("wi_0", "wi_1", "wo"):
            sd[f"{h}.1.DenseReluDense.{name}.weight"] = flat.pop(f"{m}/mlp/{name}/kernel").T
    if flat:
        raise ValueError(f"moetx parameters with no HF T5 decoder counterpart: {sorted(flat)}")
    return sd


def build_hf_model(args, torch, cfg, params_np):
    """The HF model of `args.arch` in train mode, with moetx's initial weights `params_np`
    (None: HF's own initialisation, for the memory child)."""
    import numpy as np

    torch.manual_seed(0)
    if args.arch == "llama":
        import transformers

        from moetx.convert import hf

        model = transformers.LlamaForCausalLM(hf.llama_config_to_hf(cfg))
        # HF gives the pad id (0, moetx's BOS input here) an embedding row that never gets a
        # gradient; moetx trains every row, so train this one too.
        model.model.embed_tokens.padding_idx = None
        sd = None if params_np is None else hf.moetx_to_hf_llama(params_np, cfg)
    else:
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5Stack

        config = T5Config(
            vocab_size=args.vocab, d_model=args.d_model, d_kv=args.head_dim, d_ff=args.d_ff,
            num_layers=args.layers, num_heads=args.heads, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", is_decoder=True, is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False)
        stack = T5Stack(config)
        # A decoder T5Block is [self-attention, cross-attention, MLP]. With no encoder the
        # cross-attention is never run (T5Block skips it when encoder_hidden_states is None) but
        # its q/k/v/o and layer norm would still count as (and be updated as) parameters, so
        # drop the sublayer: the block then calls layer[0] and layer[-1] only. The strict load
        # and the parameter count check confirm nothing of it is left.
        for block in stack.block:
            if len(block.layer) == 3 and isinstance(block.layer[1], T5LayerCrossAttention):
                del block.layer[1]
            assert not any(isinstance(m, T5LayerCrossAttention) for m in block.layer)
        model = torch.nn.ModuleDict({
            "decoder": stack, "lm_head": torch.nn.Linear(args.d_model, args.vocab, bias=False)})
        sd = None if params_np is None else moetx_to_hf_t5_decoder(params_np, args.layers)
    if sd is not None:
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in sd.items()}, strict=True)
    return model.train()


def hf_loss_fn(args, torch, batch_np) -> Callable:
    """`loss_of(model)`: token cross entropy + 1e-4 (log Z)^2, mean over tokens (moetx's
    objective), of the HF model on the benchmark batch."""
    inputs = torch.from_numpy(batch_np["decoder_input_tokens"].astype("int64"))
    targets = torch.from_numpy(batch_np["decoder_target_tokens"].astype("int64"))

    def loss_of(model):
        if args.arch == "llama":
            logits = model(input_ids=inputs, use_cache=False).logits
        else:
            logits = model["lm_head"](model["decoder"](input_ids=inputs).last_hidden_state)
        return token_loss(torch, logits, targets)

    return loss_of


def token_loss(torch, logits, targets, z_loss: float = 1e-4):
    """Cross entropy + z_loss * (log Z)^2, mean over the target tokens (moetx's objective)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (log_z - target_logit + z_loss * log_z.square()).mean()


def hf_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters counted once


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    xla_flags_before = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
        f"torch {torch.__version__} ({args.threads} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; arch {args.arch}, optimizer "
        f"{args.optimizer}, peer {args.peer}" + (f", only {args.only_side}"
                                                 if args.only_side else ""))

    mm = mm_load = None
    if not args.only_side:
        log("measuring f32 and bf16 matmul FLOP/s")
        with CpuLoad() as mm_load:
            mm = measure_matmuls(jax, jnp, torch)

    cfg = moetx_config(args)
    batch_np = make_batch(np, args.vocab, args.batch, args.length)
    tokens = args.batch * args.length
    import_side_libraries()
    baseline_mb = peak_rss_mb()

    steps, fallbacks = {}, {}
    params = flops_per_step = hf_params = attn_impl = None
    params_np = None
    if args.only_side != "hf":
        log(f"building moetx ({args.arch})")
        tr, state, batch, params, flops_per_step = build_moetx(args, jax, cfg, batch_np)
        if not args.only_side and not args.skip_hf:
            # A host copy of the initial weights (the train step donates `state`) for HF.
            params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))

        def moetx_step() -> float:
            nonlocal state
            state, sums = tr.train_step(state, batch)
            return float(jax.block_until_ready(sums)["loss"])

        steps["moetx"] = moetx_step
    if args.only_side != "moetx" and not args.skip_hf:
        log(f"building HF ({'LlamaForCausalLM' if args.arch == 'llama' else 'T5Stack decoder'}"
            f", {args.peer})")
        make_model = functools.partial(build_hf_model, args, torch, cfg, params_np)
        hf_steps, fallbacks = hf_variants(torch, make_model, hf_loss_fn(args, torch, batch_np),
                                          args.optimizer, args.peer)
        steps.update(hf_steps)
        model = next(iter(hf_steps.values())).model
        hf_params = hf_param_count(model)
        attn_impl = (model.config if args.arch == "llama"
                     else model["decoder"].config)._attn_implementation
        del model
        if params is not None and hf_params != params:
            log(f"WARNING: parameter counts differ: moetx {params:,} vs HF {hf_params:,}")

    timed = time_round_robin(steps, args.steps, args.warmup, log, fallbacks=fallbacks)
    if args.only_side:  # a memory child: its losses are recorded, not checked (module doc)
        out.write(json.dumps(memory_child_line(args.only_side, args.peer if args.only_side == "hf"
                                               else None, baseline_mb, timed)) + "\n")
        return 0
    check_finite(timed)

    mmf = matmul_fields(mm)
    result = {
        "benchmark": "train_throughput",
        "arch": args.arch,
        "model": {"arch": args.arch, "d_model": args.d_model, "layers": args.layers,
                  "heads": args.heads, "head_dim": args.head_dim, "d_ff": args.d_ff,
                  "vocab": args.vocab,
                  "mlp": "swiglu" if args.arch == "llama" else "gated-gelu",
                  "position": "rope" if args.arch == "llama" else "relative_bias",
                  "logits": "untied", "dtype": "float32"},
        "batch": args.batch, "length": args.length, "tokens_per_step": tokens,
        "steps": args.steps, "warmup": args.warmup,
        "optimizer": optimizer_settings(args.optimizer),
        "peer_modes": args.peer,
        "params": params,
        "hf_params": hf_params,
        "params_match": None if hf_params is None else hf_params == params,
        "weights_shared": not args.skip_hf,
        "model_flops_per_step": flops_per_step,
        **mmf,
        **side_by_side_fields(timed, tokens, flops_per_step, mmf),
        "hf_attn_implementation": attn_impl,
    }
    if "hf_compile" in steps:
        result["hf_compile"] = compile_info(torch)
    result.update(environment_fields(args, jax, torch, xla_flags_before))
    result.update({
        # CPU use (in cores) of other processes during the timed sections (a noise indicator:
        # anything well above 0 means the run shared the cores), and of this process.
        "background_cpu_cores": {"matmul": mm_load.cores, "steps": timed.load.cores},
        "steal_cpu_cores": {"matmul": mm_load.steal_cores, "steps": timed.load.steal_cores},
        "own_cpu_cores_steps": timed.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    log(f"moetx {result['moetx_tokens_per_sec']:,.0f} tok/s"
        + "".join(f", {n} {result[f'{n}_tokens_per_sec']:,.0f} tok/s" for n in ("hf_eager",
                                                                               "hf_compile")
                  if f"{n}_tokens_per_sec" in result)
        + (f"; peer {result['peer']}, ratio {result['ratio_moetx_over_peer']:.2f}"
           if "peer" in result else ""))
    if args.memory:
        steps.clear()  # free the models before the children run
        fallbacks.clear()
        state = tr = batch = params_np = None  # noqa: F841 (the moetx step's own references)
        run_memory(result, args, argv, os.path.abspath(__file__), xla_flags_before, log)
    sys.stdout.flush()
    sys.stderr.flush()
    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
