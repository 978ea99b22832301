"""LambdaNetworks (Bello 2021, "LambdaNetworks: Modeling Long-Range Interactions Without
Attention"): the lambda layer and LambdaResNet, NHWC, Flax Linen.

A lambda layer summarises the context into small linear maps ("lambdas") and applies them to
each query, instead of attending query by query:

    Q = BN(X W_q)  [n, h, k]     K = X W_k  [m, k, u]     V = BN(X W_v)  [m, v, u]
    K_bar = softmax of K over the m context positions (per key channel)
    content lambda   lambda_c    = sum_m K_bar_m^T V_m         [k, v]   (shared by all queries)
    position lambdas lambda_p(n) = sum_m E_{n,m}^T V_m         [k, v]   (one per query n)
    y_n(head) = (lambda_c + lambda_p(n))^T q_n(head)           [v], output width h * v

Multi-query heads: the h query heads share one set of keys and values, so v = d / h. u is the
intra-depth. Position embeddings E_{n,m} depend only on the offset m - n, which makes the
position lambdas translation equivariant. Two forms:
- global relative embeddings (`conv_size=None`): a table of (2H-1) x (2W-1) offsets, sized by the
  feature map at init;
- the "lambda convolution" (`conv_size=r`): E is an r x r kernel, zero outside it, computed as a 3-D
  convolution over (H, W, v) with u input and k output channels ("SAME" zero padding).
The content lambda is a sum over context positions, hence invariant to permuting them.

LambdaResNet: the ResNet skeleton of `resnet_rs.py` with every bottleneck 3x3 conv replaced by a
lambda layer (then a 2x2 average pool in strided blocks, BN, ReLU), no squeeze-excite — the
paper's Table 3 setting ("LambdaResNet-50": k=16, h=4, u=1, r=23; 15.0M parameters; u=4, r=7:
16.0M). The skeleton's ResNet-D stem differs from the paper's plain ResNet-50 stem (+56k
parameters, 0.4%). timm's `lambda_resnet50ts` / `lambda_resnet26t` are not this network (lambda
layers interleaved in a few blocks of stages 2-4 only, r=9, tiered stem + max-pool, SiLU;
21.5M / 11.0M parameters), so the comparable timm figure is per layer: a `LambdaLayer` here has
timm's `LambdaLayer` count minus the k biases of timm's lambda conv, and the same outputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.vision.models import common, resnet_rs

Array = jax.Array

# Paper Table 3 (ResNet-50 with all bottleneck 3x3 convs replaced) and a smoke-test size.
VARIANTS: dict[str, dict[str, Any]] = {
    "50": dict(depths=(3, 4, 6, 3), key_dim=16, heads=4, intra_depth=1, conv_size=23),
    "50-u4": dict(depths=(3, 4, 6, 3), key_dim=16, heads=4, intra_depth=4, conv_size=7),
    "tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                 key_dim=8, heads=4, intra_depth=1, conv_size=5),
}


def content_lambda(keys: Array, values: Array) -> Array:
    """lambda_c = sum_m K_bar_m^T V_m.

    Args:
      keys: <float>[B, M, K, U], already normalised over M.
      values: <float>[B, M, V, U].
    Returns:
      <float>[B, K, V].
    """
    return jnp.einsum("bmku,bmvu->bkv", keys, values)


def relative_embeddings(table: Array, height: int, width: int) -> Array:
    """E[n, m] = table[y_m - y_n + H - 1, x_m - x_n + W - 1] for row-major positions n, m.

    table: <float>[2H-1, 2W-1, K, U] -> <float>[H*W, H*W, K, U].
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[None, :] - ys[:, None] + height - 1  # Shape: [N (query), M (context)]
    dx = xs[None, :] - xs[:, None] + width - 1
    return table[dy, dx]


def apply_lambdas(queries: Array, content: Array, position: Array | None) -> Array:
    """y_n(head) = (lambda_c + lambda_p(n))^T q_n(head).

    Args:
      queries: <float>[B, N, heads, K].
      content: <float>[B, K, V].
      position: <float>[B, N, K, V] or None.
    Returns:
      <float>[B, N, heads, V].
    """
    y = jnp.einsum("bnhk,bkv->bnhv", queries, content)
    if position is not None:
        y = y + jnp.einsum("bnhk,bnkv->bnhv", queries, position)
    return y


class LambdaLayer(nn.Module):
    """Multi-query lambda layer with content and position lambdas (see the module docstring).

    Attributes:
      features: output width d = heads * value_dim.
      key_dim: k, the query/key depth.
      heads: h, the number of query heads.
      intra_depth: u.
      conv_size: r, the scope of the lambda convolution (odd), or None for global relative
        embeddings.
      use_position: False drops the position lambdas (content only).
    """

    features: int
    key_dim: int = 16
    heads: int = 4
    intra_depth: int = 1
    conv_size: int | None = 23
    use_position: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, H, W, features].

        Sows 'queries' [B, N, heads, K], 'keys' [B, N, K, U] (normalised), 'values' [B, N, V, U]
        and 'position_lambdas' [B, N, K, V] into the 'intermediates' collection when it is
        mutable (tests use this; training does not).
        """
        b, height, width, _ = x.shape
        n = height * width
        k, u, h = self.key_dim, self.intra_depth, self.heads
        if self.features % h:
            raise ValueError(f"LambdaLayer: features={self.features} is not divisible by "
                             f"heads={h}; the value depth is features / heads.")
        if self.conv_size is not None and self.conv_size % 2 == 0:
            raise ValueError(f"LambdaLayer: conv_size must be odd, got {self.conv_size}.")
        v = self.features // h
        bn = lambda name: common.batch_norm(train, 0.9, 1e-5, name=name)  # noqa: E731
        dense = lambda f, name: common.pointwise(f, name, use_bias=False)  # noqa: E731
        queries = bn("norm_q")(dense(h * k, "query")(x)).reshape(b, n, h, k)
        keys = dense(k * u, "key")(x).reshape(b, n, k, u)
        values = bn("norm_v")(dense(v * u, "value")(x)).reshape(b, n, v, u)
        keys = jax.nn.softmax(keys, axis=1)  # over the context positions m
        self.sow("intermediates", "queries", queries)
        self.sow("intermediates", "keys", keys)
        self.sow("intermediates", "values", values)

        position = None
        if self.use_position:
            if self.conv_size is None:
                table = self.param("relative_embeddings", nn.initializers.normal(k**-0.5),
                                   (2 * height - 1, 2 * width - 1, k, u))
                emb = relative_embeddings(table, height, width)  # Shape: [N, M, K, U]
                position = jnp.einsum("nmku,bmvu->bnkv", emb, values)
            else:
                r = self.conv_size
                # A 3-D conv over (H, W, V): u input channels, k output channels, kernel r x r x 1.
                lambda_conv = nn.Conv(k, (r, r, 1), padding="SAME", use_bias=False,
                                      kernel_init=nn.initializers.normal(k**-0.5),
                                      name="lambda_conv")
                position = lambda_conv(values.reshape(b, height, width, v, u))  # [B,H,W,V,K]
                position = position.reshape(b, n, v, k).transpose(0, 1, 3, 2)
            self.sow("intermediates", "position_lambdas", position)
        y = apply_lambdas(queries, content_lambda(keys, values), position)
        return y.reshape(b, height, width, h * v)


def avg_pool_ceil(x: Array, strides: int) -> Array:
    """strides x strides average pool, ceil mode, padding excluded from the mean.

    <[B, H, W, C]> -> <[B, ceil(H/s), ceil(W/s), C]> (the spatial-mixer output size contract).
    """
    if strides == 1:
        return x
    pad = [(0, (-x.shape[1]) % strides), (0, (-x.shape[2]) % strides)]
    return nn.avg_pool(x, (strides, strides), (strides, strides), padding=pad,
                       count_include_pad=False)


class LambdaMixer(nn.Module):
    """Bottleneck spatial mixer: lambda layer -> 2x2 avg pool if strided -> BN -> ReLU."""

    features: int
    strides: int = 1
    key_dim: int = 16
    heads: int = 4
    intra_depth: int = 1
    conv_size: int | None = 23

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, ceil(H/s), ceil(W/s), features]."""
        y = LambdaLayer(self.features, key_dim=self.key_dim, heads=self.heads,
                        intra_depth=self.intra_depth, conv_size=self.conv_size,
                        name="lambda")(x, train=train)
        y = avg_pool_ceil(y, self.strides)
        return nn.relu(common.batch_norm(train, 0.9, 1e-5, name="bn")(y))


def create(variant: str, num_classes: int, **overrides: Any) -> resnet_rs.ResNet:
    """LambdaResNet by name ('50', '50-u4', 'tiny').

    `overrides` may set the lambda hyper-parameters (key_dim, heads, intra_depth, conv_size) or any
    field of `resnet_rs.ResNet` (depths, widths, activation, ...).
    """
    return resnet_rs.create_with_mixer("LambdaResNet", VARIANTS, variant, num_classes, overrides,
                                       LambdaMixer,
                                       ("key_dim", "heads", "intra_depth", "conv_size"))
