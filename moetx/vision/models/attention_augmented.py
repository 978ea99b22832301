"""Attention-augmented convolution (Bello et al. 2019, "Attention Augmented Convolutional
Networks") and AA-ResNet, NHWC, Flax Linen.

    AAConv(X) = concat[ Conv(X) with F_out - d_v channels,  MHA(X) with d_v channels ]

MHA runs over all H*W positions with N_h heads. Queries, keys and values come from one 1x1
projection (d_k, d_k, d_v channels), the per-head outputs are concatenated and mixed by a 1x1
conv W^O (d_v x d_v). The logits carry 2-D relative position terms:

    l_{ij} = q_i . (k_j + r^W_{x_j - x_i} + r^H_{y_j - y_i}) / sqrt(d_k / N_h)

with width and height embedding tables of 2W-1 and 2H-1 rows (shared by the heads), computed
with the "rel-to-abs" skew trick: the [L, 2L-1] matrix of query-by-offset logits is padded,
flattened and re-cut so that row i, column j lands on offset j - i, which avoids materialising
an [L, L, d] embedding tensor.

d_k = kappa * F_out and d_v = upsilon * F_out, rounded to multiples of N_h, where F_out is the
output width of the conv being augmented (for a bottleneck, its 3x3 conv: the block width w);
`min_head_key_dim` raises d_k to at least N_h * that. With upsilon = 0 there are no attention
channels and the layer *is* the plain convolution (same parameters, same output). A strided
AAConv strides the conv and feeds the attention a 2x2 average-pooled input.

AA-ResNet (Bello et al. 2019, Sec. 3.2 and 4): the `resnet_rs.py` skeleton with bottleneck 3x3
convs replaced by AAConv (then BN, ReLU), no squeeze-excite. Settings of the paper's ResNets:
kappa = 2 upsilon = 0.2, N_h = 8, and "a minimum of 20 dimensions per head for the keys" (quoted
by the paper for its Wide-ResNet; we apply it to the ImageNet ResNet too, see below). Because
attention costs O(N_h (HW)^2) memory, the paper augments "starting from the last layer (with
smallest spatial dimension) until we hit memory constraints". Our reading for '50' is
`attention_stages` = (2, 3, 4), the 28x28, 14x14 and 7x7 stages, with plain 3x3 convs in the
56x56 stage (augmenting all four stages instead adds 62,664 parameters, +0.24%).

Parameter count, and why the key minimum is needed. Per augmented conv (k x k, F_in -> F_out,
feature map s x s, d_k^h = d_k / N_h), relative to the plain conv:

    delta = -k^2 F_in d_v + F_in (2 d_k + d_v) + d_v^2 + 2 (2 s - 1) d_k^h

(conv filters handed to attention, qkv projection, W^O, the two relative tables). With
d_k = 2 d_v = 0.2 F_out and k = 3 the first two terms give F_in F_out (2 kappa + (1 - k^2) upsilon)
= -0.4 F_in F_out < 0: attention-augmenting 3x3 convs *removes* parameters, so AA-ResNet-50
would be 25,170,174 here (stages 2-4; 25,165,554 with all four), 2.4% *below* the paper's 25.8M,
which is itself above its 25.6M baseline. No choice of stages or d_v rounding closes that gap.
With d_k = max(0.2 F_out, 160) (20 per head x 8 heads), the per-block deltas (w, s, d_k, d_v) =
(128, 28, 160, 16): +27,032; (256, 14, 160, 24): +34,424; (512, 7, 160, 48): -29,944 sum over
the 4 + 6 + 3 blocks of stages 2-4 to +224,840, so AA-ResNet-50 has 25,838,096 trainable
parameters: +0.15% against the paper's 25.8M (its ImageNet ResNet table: ResNet-50 25.6M,
SE-ResNet-50 28.1M, AA-ResNet-50 25.8M; the figure is also quoted in later comparison tables).
The skeleton's ResNet-D stem (three 3x3 convs, then a stride-2 3x3 conv instead of the max-pool)
carries 56,224 parameters more than the paper's 7x7 stem; with that stem the count would be
25,781,872 (-0.07%).
The same construction with depths (3, 4, 23, 3) gives 45,415,432 against the paper's 45.4M for
AA-ResNet-101 (vs 44.5M plain), evidence that the key minimum belongs to the paper's ResNet
setting (without it every AA-ResNet would have fewer parameters than its baseline).
Not modelled: the paper's TF code uses conv biases (tf.layers.conv2d default), a few thousand
parameters in all; here every conv is bias-free because BN follows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.vision.models import common, resnet_rs
from moetx.vision.models.lambda_networks import avg_pool_ceil

Array = jax.Array

# '50': the paper's ResNet setting (module docstring); stages are numbered 1-4 as in `stage<i>`.
VARIANTS: dict[str, dict[str, Any]] = {
    "50": dict(depths=(3, 4, 6, 3), key_ratio=0.2, value_ratio=0.1, heads=8,
               min_head_key_dim=20, attention_stages=(2, 3, 4)),
    "tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                 key_ratio=0.25, value_ratio=0.25, heads=2, min_head_key_dim=0,
                 attention_stages=(1, 2, 3, 4)),
}
_AA_FIELDS = ("key_ratio", "value_ratio", "heads", "min_head_key_dim")


def rel_to_abs(x: Array) -> Array:
    """Skew relative logits to absolute ones: out[..., i, j] = x[..., i, j - i + L - 1].

    x: <float>[..., L, 2L-1] (column m = relative offset m - (L - 1)) -> <float>[..., L, L].
    """
    *lead, length, span = x.shape
    if span != 2 * length - 1:
        raise ValueError(f"rel_to_abs expects [..., L, 2L-1] relative logits, got {x.shape}.")
    x = jnp.concatenate([x, jnp.zeros((*lead, length, 1), x.dtype)], axis=-1)  # [..., L, 2L]
    x = x.reshape(*lead, 2 * length * length)
    x = jnp.concatenate([x, jnp.zeros((*lead, length - 1), x.dtype)], axis=-1)
    x = x.reshape(*lead, length + 1, 2 * length - 1)  # row i is shifted left by i
    return x[..., :length, length - 1:]


def relative_logits(q: Array, rel_height: Array, rel_width: Array) -> Array:
    """2-D relative logits q_i . (r^W_{x_j - x_i} + r^H_{y_j - y_i}) via the skew trick.

    Args:
      q: <float>[B, H, W, heads, d].
      rel_height: <float>[2H-1, d]; rel_width: <float>[2W-1, d].
    Returns:
      <float>[B, heads, H*W, H*W] (query, key positions row-major).
    """
    b, h, w, n, _ = q.shape
    # Width: per query row y, [W queries, 2W-1 offsets] -> [W, W] over key columns.
    lw = rel_to_abs(jnp.einsum("byxnd,md->bnyxm", q, rel_width))  # [B, n, H, W, W]
    # Height: per query column x, [H queries, 2H-1 offsets] -> [H, H] over key rows.
    lh = rel_to_abs(jnp.einsum("byxnd,md->bnxym", q, rel_height))  # [B, n, W, H, H]
    # Shape: [B, n, y_q, x_q, y_k, x_k].
    logits = lw[:, :, :, :, None, :] + jnp.transpose(lh, (0, 1, 3, 2, 4))[:, :, :, :, :, None]
    return logits.reshape(b, n, h * w, h * w)


def relative_attention_2d(q: Array, k: Array, v: Array, rel_height: Array | None,
                          rel_width: Array | None) -> Array:
    """Multi-head attention over all positions with optional 2-D relative logits.

    Args:
      q, k: <float>[B, H, W, heads, dk]; q already scaled by dk**-0.5.
      v: <float>[B, H, W, heads, dv].
      rel_height, rel_width: tables for `relative_logits`, or None (no position term).
    Returns:
      <float>[B, H, W, heads, dv].
    """
    b, h, w, n, dk = q.shape
    logits = jnp.einsum("bind,bjnd->bnij", q.reshape(b, h * w, n, dk), k.reshape(b, h * w, n, dk))
    if rel_height is not None:
        logits = logits + relative_logits(q, rel_height, rel_width)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bnij,bjnd->bind", attn, v.reshape(b, h * w, n, -1))
    return out.reshape(b, h, w, n, -1)


def _round_to_heads(ratio: float, features: int, heads: int) -> int:
    """ratio * features rounded to a multiple of `heads` (at least `heads` when ratio > 0)."""
    if ratio <= 0:
        return 0
    return heads * max(1, round(ratio * features / heads))


class AugmentedConv(nn.Module):
    """Attention-augmented convolution (see the module docstring).

    Attributes:
      features: F_out.
      kernel_size: conv kernel side.
      strides: 1 or 2 (conv stride; the attention input is average pooled).
      key_ratio: kappa = d_k / F_out.
      value_ratio: upsilon = d_v / F_out (0: plain convolution).
      heads: N_h.
      min_head_key_dim: lower bound on d_k / N_h (the paper's ResNets: 20).
      relative: add the 2-D relative logits.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    key_ratio: float = 0.2
    value_ratio: float = 0.1
    heads: int = 8
    min_head_key_dim: int = 0
    relative: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, ceil(H/s), ceil(W/s), features]."""
        dk = _round_to_heads(self.key_ratio, self.features, self.heads)
        dk = max(dk, self.heads * self.min_head_key_dim)
        dv = _round_to_heads(self.value_ratio, self.features, self.heads)
        if dv >= self.features or (dv and not dk):
            raise ValueError(f"AugmentedConv: d_v={dv} must be below F_out={self.features} and "
                             f"d_k={dk} positive when d_v is; lower value_ratio or raise "
                             "key_ratio.")
        y = common.conv(self.features - dv, self.kernel_size, self.strides, name="conv")(x)
        if not dv:
            return y
        a = avg_pool_ceil(x, self.strides)
        b, h, w, _ = a.shape
        n = self.heads
        qkv = common.pointwise(2 * dk + dv, "qkv", use_bias=False)(a)
        q, k, v = jnp.split(qkv, [dk, 2 * dk], axis=-1)
        q = q.reshape(b, h, w, n, dk // n) * (dk // n) ** -0.5
        k, v = k.reshape(b, h, w, n, dk // n), v.reshape(b, h, w, n, dv // n)
        rel_h = rel_w = None
        if self.relative:
            init = nn.initializers.normal((dk // n) ** -0.5)
            rel_h = self.param("rel_height", init, (2 * h - 1, dk // n))
            rel_w = self.param("rel_width", init, (2 * w - 1, dk // n))
        o = relative_attention_2d(q, k, v, rel_h, rel_w).reshape(b, h, w, dv)
        o = common.pointwise(dv, "attn_out", use_bias=False)(o)
        return jnp.concatenate([y, o], axis=-1)


class AugmentedConvMixer(nn.Module):
    """Bottleneck spatial mixer: AAConv 3x3 (carrying the stride) -> BN -> ReLU."""

    features: int
    strides: int = 1
    key_ratio: float = 0.2
    value_ratio: float = 0.1
    heads: int = 8
    min_head_key_dim: int = 0

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, ceil(H/s), ceil(W/s), features]."""
        y = AugmentedConv(self.features, 3, self.strides, key_ratio=self.key_ratio,
                          value_ratio=self.value_ratio, heads=self.heads,
                          min_head_key_dim=self.min_head_key_dim, name="aaconv")(x)
        return nn.relu(common.batch_norm(train, 0.9, 1e-5, name="bn")(y))


def create(variant: str, num_classes: int, **overrides: Any) -> resnet_rs.ResNet:
    """AA-ResNet by name ('50', 'tiny'); `overrides` may set key_ratio, value_ratio, heads,
    min_head_key_dim, attention_stages (1-based stage numbers) or any `resnet_rs.ResNet` field.

    Bottlenecks outside `attention_stages` keep a plain 3x3 conv -> BN -> ReLU (an AAConv with
    value_ratio 0, which has exactly the plain conv's parameters)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown AA-ResNet variant {variant!r}; known: {sorted(VARIANTS)}.")
    cfg = {**VARIANTS[variant], **overrides}
    aa = {name: cfg.pop(name) for name in _AA_FIELDS}
    stages = tuple(cfg.pop("attention_stages"))
    widths = tuple(cfg.get("widths", resnet_rs.ResNet.widths))
    if any(not 1 <= i <= len(widths) for i in stages):
        raise ValueError(f"attention_stages {stages} must be stage numbers 1..{len(widths)}.")
    # The hook only sees the bottleneck width, so stages are told apart by width.
    augmented = {w for i, w in enumerate(widths, 1) if i in stages}
    if augmented & {w for i, w in enumerate(widths, 1) if i not in stages}:
        raise ValueError(f"widths {widths} repeat across augmented and plain stages, so "
                         f"attention_stages {stages} cannot be told apart; use distinct widths.")

    def mixer(features: int, strides: int) -> nn.Module:
        if features in augmented:
            return AugmentedConvMixer(features, strides=strides, **aa)
        return AugmentedConvMixer(features, strides=strides, value_ratio=0.0)

    cfg.setdefault("se_ratio", 0.0)
    return resnet_rs.ResNet(num_classes=num_classes, spatial_mixer=mixer, **cfg)
