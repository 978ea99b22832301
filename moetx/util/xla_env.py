"""CPU process settings that make moetx faster, applied before JAX starts.

Call `configure_cpu_defaults()` at the very top of an entry point, before anything imports
jax. Today it sets up one thing, the allocator (below); it leaves `XLA_FLAGS` as the user set
it (e.g. `--xla_force_host_platform_device_count=8` from the tests).

What jaxlib 0.10.2 does by default on CPU: f32 dots already go to YNNPACK (`__ynn_fusion`,
default fusion types `dot`, `individual_dot`, `reduce`), multi-threaded over all cores. A bare
1024^2 / 2048^2 f32 matmul runs at ~500 GFLOP/s on the 2-core AMD EPYC (AVX-512) dev machine,
about 2.2x torch 2.13's (MKL, ~215 GFLOP/s on 2 threads; MKL does not use AVX-512 on AMD),
also with `--xla_force_host_platform_device_count=8` (on 2026-12-06 the same matmul ran at
195-217 GFLOP/s, as fast as torch's: this machine's speed varies by day). Its 2 cores are
often shared; with another process busy on one core JAX's matmul drops to ~250 GFLOP/s. No flag
makes the bare matmul faster (all dots on Eigen instead of YNNPACK: about the same, 470 vs 468
GFLOP/s).

XLA flags measured and not set (no gain, within +-2% on the train step, unless noted):

  --xla_cpu_experimental_ynn_fusion_type=+eltwise (hand elementwise fusions to YNNPACK too).
      moetx added it on CPUs from 2026-11-22, when it made the demo train step 1.11-1.13x
      faster (540 -> 485 ms at d 256, batch 16 x 128) and the tiny one 1.33x. After the
      language models' kernel-gradient change it was neutral or a loss everywhere; measured
      2026-12-06 (jaxlib 0.10.2, idle, the same lowered train step compiled with and without
      it in one process, alternating steps, medians; with -> without):
        demo model (d 256, 4 layers, vocab 8k, batch 16 x 128)    424 -> 391 ms
        tiny model (d 32, 2 layers)                                87 ->  71 ms
        decoder-only at T5.1.1-small's width, 8 x 512 tokens  5.84-5.87 -> 5.71-5.76 s (Adafactor)
        Llama-style, same size                                 6.23-6.34 -> 6.14-6.46 s (AdamW)
        T5.1.1-small's encoder-decoder                              5.53 -> 5.45 s
        EfficientNetV2-B0 at 96², batch 16                           253 -> 175 ms
        CoAtNet-0 / gMLP-S / ResNet-RS-50 at 64²       473 / 280 / 360 -> 347 / 239 / 346 ms
      (The decoder-only figures are the ranges of the steps that did not stall: 6 of the 14
      steps with the flag took ~12 s, none without it, but stalls of that kind were later seen
      without the flag too, from heap page faults; see the allocator paragraph.) Cached greedy
      decoding at T5.1.1-small's shape, separate processes: 22.2-22.7 against 19.6-22.2 ms a
      step. It also made random initialisers materialise their intermediates (a [32128, 512]
      normal initializer planned 879 MiB of temporaries, 188 without), and XLA rejected flax's
      LSTM cells' fused program under it.
  --xla_cpu_enable_fast_math=true, --xla_cpu_prefer_vector_width=512,
  --xla_cpu_use_onednn=true, --xla_cpu_experimental_onednn_fusion_type=... and
  --xla_cpu_experimental_xnn_fusion_type=... (nothing gets fused: no-ops in this build),
  --xla_cpu_use_xnnpack=true, --xla_cpu_experimental_xnn_graph_fusion_mode=..._GREEDY,
  --xla_cpu_enable_concurrency_optimized_scheduler=true,
  --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME (0.96x),
  --xla_cpu_multi_thread_eigen=false (0.98x; Eigen only runs the few dots YNNPACK declines),
  --xla_cpu_experimental_ynn_fusion_type=-individual_dot (dots to Eigen: 0.98x on the step),
  --xla_cpu_experimental_ynn_fusion_type=-reduce (reductions on XLA's own loops; as a compile
      option, LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT): much slower, gMLP-S
      354 -> 419 ms and EfficientNetV2-B0 364 -> 571 ms a step (2026-12-08, one process,
      alternating steps),
  jax_default_matmul_precision=bfloat16 (no change: the f32 YNNPACK
  dots ignore it). --xla_cpu_use_thunk_runtime is still accepted but is a no-op (it is no
  longer a compile option), and there is no intra-op thread count flag in this jaxlib
  (`--xla_cpu_intra_op_parallelism_threads` aborts as unknown): XLA sizes its pool to the
  CPU count.

The allocator (glibc malloc, Linux x86-64; `configure_cpu_allocator`): XLA's CPU runtime
allocates each step's large buffers (activations, gradients, optimizer temporaries of tens to
hundreds of MB) with malloc and frees them at the end. glibc serves any block over 32 MB, and
every block of a thread's arena, with a fresh mmap and unmaps it on free, so every step touches
new pages. At T5.1.1-small's shape (benchmarks/encdec_throughput.py, batch 8, 512 -> 114) a
moetx train step took 1.37M minor page faults and 2.6-2.8 s of kernel (sys) CPU time. One arena
(M_ARENA_MAX=1), no mmap (M_MMAP_MAX=0) and no trimming (M_TRIM_THRESHOLD=-1) keep the freed
memory in the heap for the next step: 0 page faults, 0.03 s sys per step (measured 2026-12-04
with another job on one of the 2 cores, so the wall-clock gain, -14% on a 2-layer model, is
noisy). It applies to the whole process: torch in the same process gains too. The cost: the
process keeps its peak heap instead of returning it. Not every process is spared: on
2026-12-06 one process at that shape spent 7.6 and 11.2 s of kernel time in steps 2 and 3
(~950,000 minor faults each) and none after; five other processes had no such step. Skipped
when the user set any `MALLOC_*` variable or `GLIBC_TUNABLES`, or `MOETX_XLA_CPU_DEFAULTS=0`
(the opt-out's name is older than this module's only setting being the allocator).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_OUT_ENV = "MOETX_XLA_CPU_DEFAULTS"


# glibc mallopt() parameters (malloc.h) and values; see the module docstring.
_MALLOPT: tuple[tuple[str, int, int], ...] = (
    ("M_ARENA_MAX", -8, 1),
    ("M_MMAP_MAX", -4, 0),
    ("M_TRIM_THRESHOLD", -1, -1),  # -1: never trim (mallopt(3))
    ("M_TOP_PAD", -2, 64 << 20),
)


def configure_cpu_allocator() -> bool:
    """Makes glibc malloc keep freed large blocks for reuse (no per-step page faults); returns
    whether it did. Only on Linux x86-64 with glibc and when the user set no `MALLOC_*`
    variable or `GLIBC_TUNABLES`; call before JAX starts its threads."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for _, param, value in _MALLOPT)


def configure_cpu_defaults() -> None:
    """Sets up the process for moetx on CPUs (today: `configure_cpu_allocator`), if it still can.

    Does nothing when jax (or jaxlib) is already imported (its threads may have started) or when
    `MOETX_XLA_CPU_DEFAULTS` is 0/false/no/off.
    """
    if "jax" in sys.modules or "jaxlib" in sys.modules:
        return
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    configure_cpu_allocator()
