"""A drop-in `conv_general_dilated` for `nn.Conv` that avoids three slow paths of XLA's CPU
convolutions (jaxlib 0.10.2), with the same parameters and the same result up to float
summation order.

XLA hands most convolutions to YNNPACK, which is as fast as torch's oneDNN (a 3x3, 256 -> 256
conv on 16x16x16 runs at ~360 GFLOP/s on both, forward and backward). Two kinds fall back to
slow generic loops, and two more have a slow weight gradient:

- Depthwise convolutions (`feature_group_count == channels`), at every size. Here they are a
  sum over the k*k taps of a strided slice of the padded input times that tap's per-channel
  weights: elementwise work that XLA fuses and YNNPACK vectorises.
- Dense convolutions on feature maps no larger than the kernel plus one (a 3x3 conv on 2x2 to
  4x4 maps, as in the last stages at small image sizes). In the compiled train step of
  ResNet-RS-50 at 64x64 these appear outside YNNPACK, rewritten to a 2x2 window with batch-last
  layouts (`dim_labels=01fb_o01i->f01b`), and took 480 of its 800 ms. Here they are one
  matmul over explicit patches (the k*k shifted slices concatenated along channels), which
  goes to YNNPACK's dot.
- 1x1 convs (no feature groups, no padding), at every size. XLA computes their weight
  gradient as a convolution over the batch, which ran at 25-40 GFLOP/s in CoAtNet-0's step
  (a [16, 32, 32, 64] -> 384 one took 32 ms). Here they are a matmul over channels of the
  (stride-subsampled) input, `moetx.nn.layers.dense_contract`, whose kernel gradient is a
  YNNPACK matmul on CPUs.
- Other dense k x k convs with 32 or more output channels, on CPUs (`dense_conv`). XLA's
  forward and input gradient are fast, but it computes the kernel gradient as a convolution
  over the batch. Here that one is a matmul of the transposed patches, [k*k*C_in, B*positions],
  with the output cotangent. Kernel gradient alone, lax -> here, batch 16, medians of 10
  (2026-12-07, 2-core Zen 3, a slow day: 140 GFLOP/s f32 matmul peak): 32x32x64 -> 64
  71-108 -> 29-37 ms, 24x24x32 -> 128 19-22 -> 11-15 ms, 12x12x48 -> 192 11-12 -> 5-6 ms,
  16x16x64 -> 64 13-16 -> 8-9 ms, 48x48x16 -> 64 /2 10-11 -> 5-6 ms, 96x96x3 -> 32 /2 4.9 ->
  3.6 ms, 8x8x128 -> 128 5.6 -> 5.3-6.0 ms (a tie). With fewer outputs the matmul's few
  columns lose: 48x48x32 -> 16 8-11 ms on lax against 23-26 ms here, so those stay on lax.
  Whole train steps, both versions compiled in one process, alternating, medians of 30 steps
  (equal losses): EfficientNetV2-B0 at 96² 443 -> 422 ms, CoAtNet-0 at 64² 765 -> 710 ms,
  ResNet-RS-50 at 64² 706 -> 646 ms (12 steps), gMLP-S at 64² 405 -> 408 ms (its patch
  embedding, a 16x16 stride-16 conv, is the only one).

The depthwise conv's gradient is written out rather than left to autodiff. Autodiff of the
sum of slices pads each tap's cotangent back to the input's size and adds the k*k copies; the
input gradient is instead one more sum of shifted slices (the transposed conv), and the kernel
gradient one reduction per tap.

Measured on the 2-core dev machine (idle), batch 16, value-and-grad of sum(conv(x, w)^2) with
respect to x and w, median of 9, by `.venv/bin/python benchmarks/conv_ops.py --steps 9` (which
also times torch's oneDNN on the same shapes; "autodiff" is conv_ops' forward with autodiff's
gradient):

                                 lax      conv_ops   autodiff   torch
  depthwise 3x3   56x56x144    648 ms     88 ms      79 ms     25 ms
                  16x16x128/2   40 ms     4.1 ms     7.7 ms    2.7 ms
                   2x2x1536     42 ms     2.4 ms     3.3 ms    8.2 ms
  dense 3x3        2x2x512     283 ms     7.3 ms               7.8 ms
                   4x4x512/2   157 ms     7.1 ms               9.7 ms
                   8x8x128/2   2.9 ms    (lax)                 2.1 ms   larger maps stay on lax
  pointwise 1x1   32x32x64->384  44 ms     19 ms                28 ms
                   2x2x3072->768  19 ms    6.9 ms                13 ms
                  16x16x256->64  9.5 ms    4.1 ms               5.5 ms

At the largest shape both gradients spend most of their time in the kernel gradient's k*k
reductions over the whole batch. In whole training steps the written-out gradient is the
faster (each A/B in one process, round-robin, idle): EfficientNetV2-B0 at 96², batch 16,
292 -> 282 ms and 306 -> 292 ms a step; CoAtNet-0 at 64², 635 -> 599 and 633 -> 620 ms.
XLA hands those reductions to YNNPACK, which takes no fused producer, so each tap's slice is
written out first, with the batch norm and activation that make the conv's input recomputed
in it (130 such fusions for the 144 tap sums of B0's step). Tried on B0's step and not kept
(2026-12-08, one process, alternating steps, medians): the backward reading the input behind
an optimisation barrier, 387 against 368 ms; each tap's sum as a row of ones times the
product (a YNNPACK matrix-vector product, alone 22-26% faster at three of four B0 shapes timed,
equal at 6x6x672), 328 against 331 ms. XLA's own reductions for the whole step are much
slower (`moetx.util.xla_env`).

What did help (2026-12-08): on CPUs, when the output cotangent has at most
`MAX_FUSED_TAP_SUM_ELEMENTS` (2^19) float32 elements, all taps' sums are one variadic
reduction (`_tap_sums`). YNNPACK does not take it, so XLA runs it as one loop that reads the
input and the cotangent once, with no slice written out, but on one thread. Kernel gradient
alone, per-tap sums -> one reduction (batch 16, the input made by a SiLU in the same jit,
medians of 15, two runs): 24²x192 /2 2.5-3.1 -> 2.1-2.2 ms, 8²x384 2.2 -> 1.6, 6²x672 1.3-1.8
-> 1.1-1.6, 4²x768 1.9 -> 1.3, 3²x1152 0.65-0.72 -> 0.57, 6²x384 0.77-0.94 -> 0.60-1.00,
6²x768 1.7 -> 1.7; larger cotangents lose the second core: 8²x768 2.9-4.5 -> 5.2-7.2 ms,
8²x1152 5.1 -> 15.8, 12²x768 7.3 -> 16.9, 16²x384 7.3 -> 8.8, 16²x768 /2 6.3 -> 9.4
(32²x384 /2 11.7-13.2 -> 10.0-11.2, an exception, stays per tap). Whole steps, both compiled
in one process, alternating, medians, equal losses: EfficientNetV2-B0 at 96² 190.2 -> 182.1 ms
(30 steps) and 199.9 -> 185.5 ms (40); CoAtNet-0 at 64², whose depthwise convs are all above
the threshold (its compiled step is unchanged), 403.8 -> 410.0 (16) and 400.3 -> 398.6 ms (24),
the spread between two runs of one program. One reduction for every shape: B0 190.2 -> 180.0
and 201.3 -> 187.8 ms, but CoAtNet-0 368.0 -> 387.2 and 403.8 -> 418.1.

Routing the 1x1 convs here made whole steps 5-23% faster (2026-12-06, idle, two runs a side,
`benchmarks/vision_throughput.py --skip_timm`): CoAtNet-0 at 64², 649/685 -> 614/527 ms;
EfficientNetV2-B0 at 96², 348/339 -> 298/305 ms; ResNet-RS-50 at 64², 469/479 -> 375/435 ms.

Anything else (feature groups other than 1 or depthwise, dilation, channel-first layouts,
negative (cropping) pads, padded 1x1 kernels, dense convs with fewer than 32 outputs or traced
for GPUs and TPUs, whose convolutions need none of this) goes to `lax.conv_general_dilated`
unchanged.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from moetx.nn.layers import dense_contract
from moetx.util import platform as platform_lib

# Dense convs whose input is at most kernel + this along every spatial axis use patches.
SMALL_INPUT_MARGIN = 1
# Other dense convs with at least this many output channels take `dense_conv` on CPUs.
MIN_PATCH_GRAD_FEATURES = 32
# Depthwise kernel gradients whose output cotangent has at most this many elements are one
# variadic reduction on CPUs (`_tap_sums`).
MAX_FUSED_TAP_SUM_ELEMENTS = 1 << 19


def channels_last_numbers(nd: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of [B, *spatial, C] inputs, [*k, C_in, C_out] kernels (Flax's)."""
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1) + spatial,
                                    rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                    out_spec=(0, nd + 1) + spatial)


def _is_channels_last(dimension_numbers: Any, lhs: jax.Array, rhs: jax.Array) -> bool:
    nd = lhs.ndim - 2
    want = channels_last_numbers(nd)
    if dimension_numbers is None:
        return False  # lax's default is channels-first
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == want
    got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return got == want


def _taps(xp: jax.Array, kernel: Sequence[int], strides: Sequence[int], first: int = 1):
    """Yield (tap, strided slice of the padded input xp) for every kernel tap, in row-major tap
    order; each slice has the output's spatial shape. The spatial axes are `first`, ...: xp is
    [B, *spatial, C] by default, [C, B, *spatial] with `first=2`."""
    nd = len(kernel)
    axes = range(first, first + nd)
    out = [(xp.shape[a] - k) // s + 1 for a, k, s in zip(axes, kernel, strides)]
    lead, trail = xp.shape[:first], xp.shape[first + nd:]
    for tap in itertools.product(*(range(k) for k in kernel)):
        start = (0,) * first + tap + (0,) * len(trail)
        limit = lead + tuple(t + (o - 1) * s + 1 for t, o, s in zip(tap, out, strides)) + trail
        yield tap, lax.slice(xp, start, limit, (1,) * first + tuple(strides) + (1,) * len(trail))


def _padded(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    """x [B, *spatial, C] padded with zeros by `pads` along the spatial axes."""
    return jnp.pad(x, [(0, 0), *pads, (0, 0)]) if any(map(any, pads)) else x


def shifted_sum(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                 pads: Sequence[tuple[int, int]]) -> jax.Array:
    """The depthwise conv's computation, x [B, *spatial, C], kernel [*k, 1, C]: the sum over
    the taps of the padded input's strided slice times that tap's weights. `depthwise_conv`
    is this with its gradient written out; differentiating this directly gives autodiff's."""
    xp = _padded(x, pads)
    out = None
    for tap, piece in _taps(xp, kernel.shape[:-2], strides):
        term = piece * kernel[tap + (0,)]
        out = term if out is None else out + term
    return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   pads: Sequence[tuple[int, int]]) -> jax.Array:
    """Depthwise conv as a sum of shifted slices. x [B, *spatial, C], kernel [*k, 1, C].

    Its gradient is written out (`_depthwise_bwd`) rather than derived by autodiff, which pads
    every tap's cotangent back to the input's size and adds the k*k copies."""
    return _depthwise(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
    return shifted_sum(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
    return shifted_sum(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    taps = kernel.shape[:-2]
    nd = len(taps)
    # Input gradient: the transposed conv, itself one sum of shifted slices. Spread dy to
    # the stride's spacing (interior padding) and pad it so that every input position's
    # window covers the outputs that read it (negative pads crop rows no output read); then
    # correlate with the flipped kernel at stride 1.
    config = [(0, 0, 0)]
    for k, (lo, _), n, o, s in zip(taps, pads, x.shape[1:-1], dy.shape[1:-1], strides):
        config.append((k - 1 - lo, n + lo - (o - 1) * s - 1, s - 1))
    config.append((0, 0, 0))
    spread = lax.pad(dy, jnp.zeros((), dy.dtype), config)
    dx = shifted_sum(spread, jnp.flip(kernel, axis=tuple(range(nd))), (1,) * nd,
                      ((0, 0),) * nd)
    dw = _tap_sums(_padded(x, pads), dy, taps, strides)
    return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)


def _add_each(a: tuple, b: tuple) -> tuple:
    return tuple(u + v for u, v in zip(a, b))


def _tap_sums(xp: jax.Array, dy: jax.Array, taps: Sequence[int],
              strides: Sequence[int]) -> jax.Array:
    """The depthwise kernel gradient, [taps, C]: per tap, the sum over batch and positions of
    the padded input's slice that tap reads times the output cotangent dy.

    On CPUs, float32 and at most `MAX_FUSED_TAP_SUM_ELEMENTS` elements in dy, all taps' sums
    are one variadic reduction, which XLA runs as one fused loop over the input and dy (one
    thread); otherwise one reduction per tap, each of which YNNPACK runs on every core from
    its own written-out slice."""
    axes = tuple(range(dy.ndim - 1))
    products = tuple(piece * dy for _, piece in _taps(xp, taps, strides))
    if (dy.dtype == jnp.float32 and dy.size <= MAX_FUSED_TAP_SUM_ELEMENTS
            and platform_lib.traced_platform() == "cpu"):
        zeros = (jnp.zeros((), dy.dtype),) * len(products)
        return jnp.stack(lax.reduce(products, zeros, _add_each, axes))
    return jnp.stack([jnp.sum(p, axis=axes) for p in products])


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def patches_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                 pads: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
    """Dense conv as one matmul over explicit patches. x [B, *spatial, C_in], kernel
    [*k, C_in, C_out]; the patches concatenate the taps in the kernel's row-major order."""
    xp = _padded(x, pads)
    cols = jnp.concatenate([piece for _, piece in _taps(xp, kernel.shape[:-2], strides)],
                           axis=-1)
    w = kernel.reshape(math.prod(kernel.shape[:-1]), kernel.shape[-1])
    return jnp.tensordot(cols, w, axes=1, precision=precision)


def dense_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               pads: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
    """Dense (ungrouped, undilated) conv, x [B, *spatial, C_in], kernel [*k, C_in, C_out]: XLA's
    convolution forward and for the input gradient, the kernel gradient one matmul over explicit
    patches (`_dense_bwd`)."""
    return _dense(x, kernel, tuple(strides), tuple(tuple(p) for p in pads), precision)


def _lax_dense(x, kernel, strides, pads, precision):
    return lax.conv_general_dilated(x, kernel, strides, pads, precision=precision,
                                    dimension_numbers=channels_last_numbers(x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, kernel, strides, pads, precision):
    return _lax_dense(x, kernel, strides, pads, precision)


def _dense_fwd(x, kernel, strides, pads, precision):
    return _lax_dense(x, kernel, strides, pads, precision), (x, kernel)


def _dense_bwd(strides, pads, precision, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_dense(x, kernel, strides, pads, precision), x)
    (dx,) = input_vjp(dy)
    # Kernel gradient: the patches transposed, [(tap, C_in), B * positions], times dy
    # [B * positions, C_out]. The input is transposed once to [C_in, B, *spatial] so that every
    # tap's slice is already in the patches' row layout; the barrier keeps XLA from folding the
    # layout back into the dot, whose left operand then contracts its last axis (YNNPACK's
    # matmul on CPUs, not a convolution over the batch).
    nd = x.ndim - 2
    xt = jnp.moveaxis(_padded(x, pads), -1, 0)
    cols = jnp.concatenate([piece for _, piece in _taps(xt, kernel.shape[:nd], strides, 2)])
    cols = lax.optimization_barrier(cols.reshape(cols.shape[0], -1))
    dkernel = jnp.matmul(cols, dy.reshape(-1, dy.shape[-1]), precision=precision)
    return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
    """A 1x1 (unpadded) conv as a matmul over channels: x [B, *spatial, C_in] subsampled by
    `strides`, kernel [1, ..., 1, C_in, C_out]."""
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    return dense_contract(x, kernel.reshape(kernel.shape[-2:]))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the fast paths described in the module docstring."""
    fallback = lambda: lax.conv_general_dilated(  # noqa: E731
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    nd = lhs.ndim - 2
    kernel = tuple(rhs.shape[:nd])
    undilated = all(d == 1 for d in (lhs_dilation or ())) and all(
        d == 1 for d in (rhs_dilation or ()))
    if (not undilated or batch_group_count != 1 or preferred_element_type is not None
            or not _is_channels_last(dimension_numbers, lhs, rhs)):
        return fallback()
    strides = tuple(window_strides)
    spatial = lhs.shape[1:-1]
    pads = (lax.padtype_to_pads(spatial, kernel, strides, padding) if isinstance(padding, str)
            else [tuple(p) for p in padding])
    if any(lo < 0 or hi < 0 for lo, hi in pads):  # cropping: lax's (the paths here pad)
        return fallback()
    if math.prod(kernel) == 1:
        if (feature_group_count == 1 and precision is None
                and all(tuple(p) == (0, 0) for p in pads)):
            return pointwise_conv(lhs, rhs, strides)
        return fallback()
    channels = lhs.shape[-1]
    if feature_group_count == channels and rhs.shape[-2:] == (1, channels):
        return depthwise_conv(lhs, rhs, strides, pads)
    if feature_group_count == 1 and all(
            n <= k + SMALL_INPUT_MARGIN for n, k in zip(spatial, kernel)):
        return patches_conv(lhs, rhs, strides, pads, precision)
    if (feature_group_count == 1 and rhs.shape[-1] >= MIN_PATCH_GRAD_FEATURES
            and platform_lib.traced_platform() == "cpu"):
        return dense_conv(lhs, rhs, strides, pads, precision)
    return fallback()
