"""XLA CPU settings that make moetx faster on CPU, applied before JAX starts.

Call `configure_cpu_defaults()` at the very top of an entry point, before anything imports
jax (XLA reads `XLA_FLAGS` once, when the first backend is created). It only *adds* flags: a
flag already named in the user's `XLA_FLAGS` is left as the user set it, and everything else in
`XLA_FLAGS` (e.g. `--xla_force_host_platform_device_count=8` from the tests) is kept.

What jaxlib 0.10.2 does by default on CPU: f32 dots already go to YNNPACK (`__ynn_fusion`,
default fusion types `dot`, `individual_dot`, `reduce`), multi-threaded over all cores. A bare
1024^2 / 2048^2 f32 matmul runs at ~500 GFLOP/s on the 2-core AMD EPYC (AVX-512) dev machine,
about 2.2x torch 2.13's (MKL, ~215 GFLOP/s on 2 threads; MKL does not use AVX-512 on AMD),
also with `--xla_force_host_platform_device_count=8`. An earlier "JAX matmul at 40% of torch"
reading did not reproduce; note that this machine's 2 cores are often shared, and with another
process busy on one core JAX's matmul drops to ~250 GFLOP/s. No flag makes the bare matmul
faster (all dots on Eigen instead of YNNPACK: about the same, 470 vs 468 GFLOP/s).

The one setting that helps (measured 2026-11-22, jax/jaxlib 0.10.2; in-process A/B of
executables compiled with and without it, alternating steps on an idle machine; see
benchmarks/README.md):

  --xla_cpu_experimental_ynn_fusion_type=+eltwise
      Also hand elementwise fusions (activations, softmax pieces, Adafactor's update math) to
      YNNPACK, which runs them multi-threaded and vectorised instead of XLA's single-threaded
      loop fusions. moetx train step, batch 16 x 128, f32:
        demo model (d 256, 4 layers, vocab 8k)   540 -> 485 ms  (1.11-1.13x)
        tiny model (d 32, 2 layers, vocab 8k)    200 -> 151 ms  (1.33x)
        d 512, d_ff 1024, 4 layers, batch 8      549 -> 502 ms  (1.09x)
      Greedy decode 1.17x faster, eval step unchanged (within noise). Losses match the
      default to 1e-7 over 5 steps, and a sharded (4, 1, 2) mesh on 8 host devices gives the
      same losses.
      Not for the vision classifiers: their train step is faster without it (2026-12-06, one
      process per model, the same lowered step compiled both ways, 10 alternating steps,
      medians, batch 16): EfficientNetV2-B0 at 96² 253 -> 175 ms, CoAtNet-0 at 64² 473 -> 347,
      gMLP-S 280 -> 239, ResNet-RS-50 360 -> 346. Their many small feature maps make many
      small elementwise fusions, where YNNPACK's per-call cost outweighs its threads. A model
      says so with `xla_cpu_elementwise_fusion = False` (moetx.trainer.model), and the Trainer
      compiles its steps with `without_elementwise_fusion()`. (At T5.1.1-small's shape the
      language model's step is now neutral to it: 5.53 against 5.45 s, same A/B.)

Tried and not adopted (no gain, within +-2% on the train step, unless noted):
  --xla_cpu_enable_fast_math=true, --xla_cpu_prefer_vector_width=512,
  --xla_cpu_use_onednn=true, --xla_cpu_experimental_onednn_fusion_type=... and
  --xla_cpu_experimental_xnn_fusion_type=... (nothing gets fused: no-ops in this build),
  --xla_cpu_use_xnnpack=true, --xla_cpu_experimental_xnn_graph_fusion_mode=..._GREEDY,
  --xla_cpu_enable_concurrency_optimized_scheduler=true,
  --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME (0.96x),
  --xla_cpu_multi_thread_eigen=false (0.98x; Eigen only runs the few dots YNNPACK declines),
  --xla_cpu_experimental_ynn_fusion_type=-individual_dot (dots to Eigen: 0.98x on the step),
  jax_default_matmul_precision=bfloat16 (no change: the f32 YNNPACK
  dots ignore it). --xla_cpu_use_thunk_runtime is still accepted but is a no-op (it is no
  longer a compile option), and there is no intra-op thread count flag in this jaxlib
  (`--xla_cpu_intra_op_parallelism_threads` aborts as unknown): XLA sizes its pool to the
  CPU count.

The flag names are experimental and an unknown flag in `XLA_FLAGS` aborts the process, so the
flags are added only for the jaxlib versions they were checked on (`_TESTED_JAXLIB`) and on
x86-64, where they were measured. Set `MOETX_XLA_CPU_DEFAULTS=0` to opt out.

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
process keeps its peak heap instead of returning it. Skipped when the user set any `MALLOC_*`
variable or `GLIBC_TUNABLES`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys

# jaxlib versions on which every flag below exists and was measured (prefix match).
_TESTED_JAXLIB: tuple[str, ...] = ("0.10.",)

# (flag name, value). See the module docstring for the measurements.
_XLA_CPU_FLAGS: tuple[tuple[str, str], ...] = (
    # +11-33% moetx train-step throughput (YNNPACK runs elementwise fusions multi-threaded).
    ("xla_cpu_experimental_ynn_fusion_type", "+eltwise"),
)

OPT_OUT_ENV = "MOETX_XLA_CPU_DEFAULTS"


def _flag_names(xla_flags: str) -> set[str]:
    """Names of the flags in an `XLA_FLAGS` string (`--name=value` or `--name`)."""
    names = set()
    for token in xla_flags.split():
        if token.startswith("-"):
            names.add(token.lstrip("-").split("=", 1)[0])
    return names


def cpu_flags_to_add(xla_flags: str, jaxlib_version: str | None,
                     machine: str | None = None) -> list[str]:
    """The `--flag=value` strings `configure_cpu_defaults` would append to `xla_flags`."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return []
    if jaxlib_version is None or not jaxlib_version.startswith(_TESTED_JAXLIB):
        return []
    have = _flag_names(xla_flags)
    return [f"--{name}={value}" for name, value in _XLA_CPU_FLAGS if name not in have]


# What YNNPACK takes without the `+eltwise` above (jaxlib 0.10's defaults, named as the
# per-executable compile option spells them).
_YNN_DEFAULT_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                             "LIBRARY_FUSION_TYPE_REDUCE")


def without_elementwise_fusion(platform_name: str | None = None,
                               xla_flags: str | None = None) -> dict[str, str] | None:
    """Compile options that take `+eltwise` (above) back for one program, or None (compile as
    usual): only on CPU, and only where `configure_cpu_defaults` added the flag (a value the
    user set is theirs). `platform_name` defaults to JAX's first device's."""
    if platform_name is None:
        import jax

        platform_name = jax.devices()[0].platform
    if platform_name != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    if "--xla_cpu_experimental_ynn_fusion_type=+eltwise" not in flags.split():
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": _YNN_DEFAULT_FUSION_TYPES}


def init_compile_options(platform_name: str | None = None,
                         xla_flags: str | None = None) -> dict[str, str] | None:
    """Compile options for a program that initialises parameters, or None (compile as usual).

    With `+eltwise` (above) XLA CPU hands each random initializer's elementwise chain to
    YNNPACK, which materialises its intermediates: a normal initializer of a [32128, 512]
    embedding plans 879 MiB of temporaries for its 63 MiB output (188 MiB without), and
    T5.1.1-small's initialisation, jitted alone, 4.1 GiB for 294 MiB of parameters, and it
    touches them: 5.0 GB of peak RSS, 1.2 GB when compiled with these options (jaxlib 0.10.2).
    The values differ in their last bits (the initializers' math runs in the other library),
    so `Trainer.init_state` does not use them: its initialisation, compiled under the mesh,
    peaks at 1.4-1.5 GB either way, and a run's initial parameters stay what they were. They
    are for a program that only makes parameters to use them at once (the decode benchmark's
    memory child). The options are `without_elementwise_fusion`'s."""
    return without_elementwise_fusion(platform_name, xla_flags)


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
    """Appends the measured-faster XLA CPU flags to `XLA_FLAGS`, if it still can.

    Also sets up the allocator (`configure_cpu_allocator`). Does nothing when jax (or jaxlib)
    is already imported, when `MOETX_XLA_CPU_DEFAULTS` is
    0/false/no/off, on a jaxlib or CPU architecture the flags were not checked on, or for a
    flag the user already set in `XLA_FLAGS`.
    """
    if "jax" in sys.modules or "jaxlib" in sys.modules:
        return
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    configure_cpu_allocator()
    current = os.environ.get("XLA_FLAGS", "")
    extra = cpu_flags_to_add(current, jaxlib_version)
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current.strip(), *extra]).strip()
