"""The platform a step is traced for, where that differs from the one this process runs on.

Some layers trace a different computation per platform: MoE's `dispatch='auto'` (scatter on
CPUs, masked one-hot einsums on TPUs and GPUs), the dense layers' kernel gradient (a layout
that XLA's CPU backend runs on its fast matmul path; `moetx.nn.layers.dense_contract`) and the
relative position bias's lookup (a gather on CPUs, a one-hot contraction elsewhere). They ask
`traced_platform()`. It is JAX's default backend unless `trace_for` set another: the plan tool
traces on simulated CPU devices a step that is meant for TPUs or GPUs, and must see what those
devices would run.

JAX's trace cache does not key on the platform set here: open `trace_for` before a function is
first traced (a jitted function traced for one platform keeps that trace).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

PLATFORMS = ("cpu", "gpu", "tpu")

# Set by `trace_for`; None: JAX's default backend.
_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("moetx_traced_platform",
                                                                         default=None)


@contextlib.contextmanager
def trace_for(platform: str | None):
    """While open, `traced_platform()` is `platform` ('cpu', 'gpu', 'tpu'; None: JAX's default
    backend)."""
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS} or None")
    token = _TRACED_FOR.set(platform)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


def traced_platform() -> str:
    """The platform being traced for: the one `trace_for` set, else JAX's default backend."""
    return _TRACED_FOR.get() or jax.default_backend()
