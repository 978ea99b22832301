"""Stand-alone self-attention (SASA; Ramachandran et al. 2019, "Stand-Alone Self-Attention in
Vision Models"): local k x k self-attention and the SASA ResNet, NHWC, Flax Linen.

For each pixel (i, j) and each of G groups (heads), attention runs over the k x k window
centred on it:

    y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij . k_ab + q_ij . r_{a-i, b-j} ) v_ab

with q, k, v 1x1 projections (no bias). The relative embedding r_{a-i,b-j} concatenates a
row-offset embedding r_{a-i} (first half of the channels) and a column-offset embedding r_{b-j}
(second half); with the channels split into groups, the first groups see row offsets and the
last ones column offsets, as in the paper. Pixels of the window that fall outside the image are
masked out of the softmax (they are *not* zero keys: a zero key would still get weight exp(q.r)).
There is no 1/sqrt(d) logit scaling in the paper's formula; none is applied here.

SASA ResNet: the `resnet_rs.py` skeleton with every bottleneck 3x3 conv replaced by this layer
(k=7, 8 groups) followed, in strided blocks, by a 2x2 average pool, then BN and ReLU; conv stem,
no squeeze-excite. The paper's full-attention ResNet-50 has 18.0M parameters (its stem is the
spatially-aware attention stem, not reproduced: this module keeps the skeleton's conv stem).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.vision.models import common, resnet_rs
from moetx.vision.models.lambda_networks import avg_pool_ceil

Array = jax.Array

NEG_INF = -1e9

VARIANTS: dict[str, dict[str, Any]] = {
    "50": dict(depths=(3, 4, 6, 3), window=7, groups=8),
    "tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                 window=3, groups=4),
}


def extract_windows(x: Array, window: int) -> tuple[Array, Array]:
    """All k x k neighbourhoods of every pixel, zero padded, with a validity mask.

    Args:
      x: <float>[B, H, W, C].
      window: k (odd).
    Returns:
      (patches <float>[B, H, W, k*k, C], valid <bool>[H, W, k*k]); window entry a*k + b holds
      the pixel at offset (a - k//2, b - k//2) from the centre.
    """
    _, h, w, _ = x.shape
    p = window // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    # One gather instead of k*k slices: entry n of pixel (i, j) is padded pixel
    # (i + n // k, j + n % k). Index and mask arrays are static (numpy).
    offsets = np.arange(window * window)
    rows = np.arange(h)[:, None, None] + (offsets // window)[None, None, :]  # [H, 1, k*k]
    cols = np.arange(w)[None, :, None] + (offsets % window)[None, None, :]  # [1, W, k*k]
    rows, cols = np.broadcast_to(rows, (h, w, window * window)), np.broadcast_to(
        cols, (h, w, window * window))
    valid = (rows >= p) & (rows < h + p) & (cols >= p) & (cols < w + p)
    return padded[:, rows, cols], jnp.asarray(valid)


def local_attention(q: Array, k: Array, v: Array, rel: Array, window: int) -> Array:
    """Windowed attention with relative logits, out-of-image window entries masked.

    Args:
      q, k: <float>[B, H, W, G, D]; v: <float>[B, H, W, G, Dv].
      rel: <float>[k*k, G, D], the relative embedding of each window offset.
      window: k.
    Returns:
      <float>[B, H, W, G, Dv].
    """
    b, h, w, g, d = k.shape
    k_win, valid = extract_windows(k.reshape(b, h, w, g * d), window)
    v_win, _ = extract_windows(v.reshape(b, h, w, -1), window)
    k_win = k_win.reshape(b, h, w, window * window, g, d)
    v_win = v_win.reshape(b, h, w, window * window, g, -1)
    logits = jnp.einsum("bhwgd,bhwngd->bhwgn", q, k_win + rel)
    logits = jnp.where(valid[None, :, :, None, :], logits, NEG_INF)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhwgn,bhwngd->bhwgd", attn, v_win)


class LocalSelfAttention(nn.Module):
    """SASA layer: k x k windowed multi-group self-attention with row/column relative embeddings.

    Attributes:
      features: output width (= query/key/value width), divisible by `groups` and even.
      window: k, the (odd) window side.
      groups: number of attention groups (heads).
    """

    features: int
    window: int = 7
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, H, W, features]."""
        del train
        f, g, kk = self.features, self.groups, self.window
        if f % g or f % 2 or kk % 2 == 0:
            raise ValueError(f"LocalSelfAttention needs features divisible by groups and by 2 and "
                             f"an odd window; got features={f}, groups={g}, window={kk}.")
        b, h, w, _ = x.shape
        dense = lambda name: common.pointwise(f, name, use_bias=False)  # noqa: E731
        q, k, v = (dense(n)(x).reshape(b, h, w, g, f // g) for n in ("query", "key", "value"))
        init = nn.initializers.normal((f // g) ** -0.5)
        rel_row = self.param("rel_row", init, (kk, f // 2))  # offset a - i = index - k//2
        rel_col = self.param("rel_col", init, (kk, f // 2))
        rel = jnp.concatenate([jnp.repeat(rel_row, kk, axis=0), jnp.tile(rel_col, (kk, 1))], -1)
        rel = rel.reshape(kk * kk, g, f // g)  # window entry a*k + b -> (r_row[a], r_col[b])
        y = local_attention(q, k, v, rel, kk)
        return y.reshape(b, h, w, f)


class SasaMixer(nn.Module):
    """Bottleneck spatial mixer: local self-attention -> 2x2 avg pool if strided -> BN -> ReLU."""

    features: int
    strides: int = 1
    window: int = 7
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, ceil(H/s), ceil(W/s), features]."""
        y = LocalSelfAttention(self.features, window=self.window, groups=self.groups,
                               name="attention")(x)
        y = avg_pool_ceil(y, self.strides)
        return nn.relu(common.batch_norm(train, 0.9, 1e-5, name="bn")(y))


def create(variant: str, num_classes: int, **overrides: Any) -> resnet_rs.ResNet:
    """SASA ResNet by name ('50', 'tiny'); `overrides` may set window, groups or ResNet fields."""
    return resnet_rs.create_with_mixer("SASA ResNet", VARIANTS, variant, num_classes, overrides,
                                       SasaMixer, ("window", "groups"))
