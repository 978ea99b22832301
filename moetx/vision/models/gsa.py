"""Global Self-Attention networks (Shen et al. 2020, "Global Self-Attention Networks for Image
Recognition"): the GSA module and GSA-ResNet, NHWC, Flax Linen.

A GSA module sums two branches that share the queries (per head, 1x1 projections, no bias):

- Content branch (global, linear in H*W): keys are softmax-normalised over the spatial
  positions, each head summarises the image into a context matrix C = softmax(K)^T V [dk, dv],
  and every query reads it: out_c(i) = q_i C. The queries are *not* normalised.
- Positional branch (axial, relative): column attention, then batch norm, then row attention,

      col(y, x) = sum_{|y' - y| <= L} (q_yx . r^col_{y'-y}) v_{y'x}
      pos(y, x) = sum_{|x' - x| <= L} (q_yx . r^row_{x'-x}) BN(col)_{yx'}

  with relative embeddings r^col, r^row of 2L+1 rows shared across heads. As in the paper there
  is no softmax in this branch. L is the neighbourhood radius; `neighborhood=None` makes it
  global (L = H-1 for columns, W-1 for rows, tables sized at init).

The head outputs are concatenated (width heads * dv = features). GSA-ResNet replaces every
bottleneck 3x3 conv of the `resnet_rs.py` skeleton by a GSA module (then a 2x2 average pool in
strided blocks, BN and ReLU), without squeeze-excite.

Parameter count (trainable; BN statistics excluded). A module of width w at input size s with 8
heads (dk = dv = w / 8) has the qkv projection 3 w^2, the two global axial tables
2 (2 s - 1) w / 8 and the column BN 2 w, against 9 w^2 for the conv it replaces, so GSA-ResNet-50
has 18,109,080 parameters, 70.7% of the 25.6M ResNet-50 (56,224 of them are the skeleton's
ResNet-D stem's excess over a 7x7 stem). The paper's own figure is NOT checked here: the stored
copies of arXiv 2010.03019 reachable through the project's search tool (tomesphere, openreview,
the ICLR 2021 text dump) only yield the abstract, which says GSA networks use fewer parameters
than the convolutional ones. The one number found is a summary posted by the paper's first
author (github.com/dk-liang/Awesome-Visual-Transformer pull 5): GSA-Net-50 gains 1.6% top-1
over ResNet-50 "while using 50% the parameters and 70% the computation". 50% (12.8M) is below
what any ResNet-50 with only its 3x3 convs replaced can have (the rest of ResNet-50 alone is
14,239,784 of its 25,557,032), whereas 70% is this construction's ratio; the two ratios may be
swapped in that summary. The figure the project has on record for the paper is "18.xM", fewer
than ResNet-50's; the test checks the count to that precision only, and the 1% check against the
paper's table is still open.
Choices that would move it: an output 1x1 projection after the heads (lucidrains' `to_out`:
+1,257,472 over the 16 modules) or a key depth below dv.
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

VARIANTS: dict[str, dict[str, Any]] = {
    "50": dict(depths=(3, 4, 6, 3), heads=8, neighborhood=None),
    "tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                 heads=4, neighborhood=None),
}


def content_attention(q: Array, k: Array, v: Array) -> Array:
    """out_i = q_i (softmax_positions(K)^T V), per head.

    Args:
      q, k: <float>[B, N, heads, dk]; v: <float>[B, N, heads, dv].
    Returns:
      <float>[B, N, heads, dv].
    """
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(v.dtype)
    context = jnp.einsum("bnhk,bnhv->bhkv", k, v)
    return jnp.einsum("bnhk,bhkv->bnhv", q, context)


def axial_relative_embeddings(table: Array, length: int, radius: int) -> Array:
    """E[i, j] = table[j - i + radius] where |j - i| <= radius, else 0.

    table: <float>[2*radius+1, d] -> <float>[length, length, d].
    """
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
    inside = np.abs(offsets) <= radius
    emb = table[np.clip(offsets + radius, 0, 2 * radius)]
    return jnp.where(inside[:, :, None], emb, 0.0)


def axial_positional_attention(q: Array, v: Array, emb: Array, axis: str) -> Array:
    """Relative attention without softmax along one axis.

    Args:
      q: <float>[B, H, W, heads, dk]; v: <float>[B, H, W, heads, dv].
      emb: <float>[L_axis, L_axis, dk] from `axial_relative_embeddings`.
      axis: 'column' (mix along H) or 'row' (mix along W).
    Returns:
      <float>[B, H, W, heads, dv].
    """
    if axis == "column":
        logits = jnp.einsum("byxhd,yzd->byxhz", q, emb)
        return jnp.einsum("byxhz,bzxhv->byxhv", logits, v)
    if axis == "row":
        logits = jnp.einsum("byxhd,xzd->byxhz", q, emb)
        return jnp.einsum("byxhz,byzhv->byxhv", logits, v)
    raise ValueError(f"axis must be 'column' or 'row', got {axis!r}.")


class GlobalSelfAttention(nn.Module):
    """GSA module: content branch + axial relative positional branch (module docstring).

    Attributes:
      features: output width = heads * dv.
      heads: number of heads.
      key_dim: dk per head (default: features / heads).
      neighborhood: radius L of the positional branch, or None for global.
      use_position: False keeps the content branch only.
    """

    features: int
    heads: int = 8
    key_dim: int | None = None
    neighborhood: int | None = None
    use_position: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, H, W, features]."""
        if self.features % self.heads:
            raise ValueError(f"GlobalSelfAttention: features={self.features} is not divisible "
                             f"by heads={self.heads}.")
        b, h, w, _ = x.shape
        n, dv = self.heads, self.features // self.heads
        dk = self.key_dim or dv
        qkv = common.pointwise(n * (2 * dk + dv), "qkv", use_bias=False)(x)
        q, k, v = jnp.split(qkv, [n * dk, 2 * n * dk], axis=-1)
        q, k = q.reshape(b, h, w, n, dk), k.reshape(b, h, w, n, dk)
        v = v.reshape(b, h, w, n, dv)
        out = content_attention(q.reshape(b, h * w, n, dk), k.reshape(b, h * w, n, dk),
                                v.reshape(b, h * w, n, dv)).reshape(b, h, w, n, dv)
        if self.use_position:
            rad_h = h - 1 if self.neighborhood is None else self.neighborhood
            rad_w = w - 1 if self.neighborhood is None else self.neighborhood
            init = nn.initializers.normal(dk**-0.5)
            col_table = self.param("rel_column", init, (2 * rad_h + 1, dk))
            row_table = self.param("rel_row", init, (2 * rad_w + 1, dk))
            col = axial_positional_attention(
                q, v, axial_relative_embeddings(col_table, h, rad_h), "column")
            col = common.batch_norm(train, 0.9, 1e-5, name="norm_column")(
                col.reshape(b, h, w, n * dv)).reshape(b, h, w, n, dv)
            out = out + axial_positional_attention(
                q, col, axial_relative_embeddings(row_table, w, rad_w), "row")
        return out.reshape(b, h, w, n * dv)


class GsaMixer(nn.Module):
    """Bottleneck spatial mixer: GSA module -> 2x2 avg pool if strided -> BN -> ReLU."""

    features: int
    strides: int = 1
    heads: int = 8
    neighborhood: int | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, ceil(H/s), ceil(W/s), features]."""
        y = GlobalSelfAttention(self.features, heads=self.heads, neighborhood=self.neighborhood,
                                name="gsa")(x, train=train)
        y = avg_pool_ceil(y, self.strides)
        return nn.relu(common.batch_norm(train, 0.9, 1e-5, name="bn")(y))


def create(variant: str, num_classes: int, **overrides: Any) -> resnet_rs.ResNet:
    """GSA-ResNet by name ('50', 'tiny'); `overrides` may set heads, neighborhood or ResNet
    fields."""
    return resnet_rs.create_with_mixer("GSA-ResNet", VARIANTS, variant, num_classes, overrides,
                                       GsaMixer, ("heads", "neighborhood"))
