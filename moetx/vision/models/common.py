"""Blocks shared by the convolutional vision families: conv-BN-act, squeeze-excite, stochastic
depth, channel rounding, parameter counting and the strict timm state_dict reader.

Everything is channels-last and rank-agnostic where it can be: a "spatial" axis is any axis
between the batch axis and the channel axis, so the same blocks serve images [B, H, W, C] and
video clips [B, T, H, W, C].

Padding: `conv` takes `padding='SYMMETRIC'` (k//2 on both sides: timm's default and the TF1
"fixed padding" of the ResNet-RS code for odd kernels) or `'SAME'` (TensorFlow's SAME, which pads
the extra pixel at the end for stride 2 on even inputs: timm's `tf_*` models and automl's
EfficientNetV2). The two differ only for strided convolutions, and only that difference makes
converted weights give the same logits or not.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moetx.nn.layers import Dense
from moetx.vision.models import conv_ops

# timm/torchvision initialise convolutions with kaiming_normal(fan_out, relu).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by name ('relu', 'silu'/'swish', 'gelu')."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going below `round_limit`·value.

    The EfficientNet/timm channel-rounding rule (`round_filters` in automl with round_limit 0.9).
    """
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return int(new_value)


def _tuple(v: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (v,) * ndim if isinstance(v, int) else tuple(v)


def conv(features: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1, *,
         ndim: int = 2, padding: str = "SYMMETRIC", groups: int = 1, use_bias: bool = False,
         name: str | None = None) -> nn.Conv:
    """An `nn.Conv` with the padding conventions described in the module docstring.

    The convolution itself is `conv_ops.conv_general_dilated`: the same variables and result as
    lax's, but depthwise convs and dense convs on tiny maps avoid XLA CPU's slow paths.

    Args:
      features: output channels.
      kernel_size: int (same on every spatial axis) or one int per spatial axis.
      strides: int or one int per spatial axis.
      ndim: number of spatial axes (2 for images, 3 for video).
      padding: 'SYMMETRIC' (k//2 each side) or 'SAME' (TensorFlow SAME).
      groups: feature groups (groups == channels gives a depthwise conv).
    """
    ks = _tuple(kernel_size, ndim)
    if padding == "SYMMETRIC":
        pad: Any = [(k // 2, k // 2) for k in ks]
    elif padding == "SAME":
        pad = "SAME"
    else:
        raise ValueError(f"padding must be 'SYMMETRIC' or 'SAME', got {padding!r}")
    return nn.Conv(features, ks, _tuple(strides, ndim), padding=pad,
                   feature_group_count=groups, use_bias=use_bias,
                   kernel_init=conv_kernel_init, name=name,
                   conv_general_dilated=conv_ops.conv_general_dilated)


def pointwise(features: int, name: str | None = None, *, use_bias: bool = True) -> nn.Conv:
    """A 2D 1x1 `nn.Conv` (flax's default init) computed as a matmul over channels
    (`conv_ops.pointwise_conv`): the projections of the attention and MLP blocks."""
    return nn.Conv(features, (1, 1), use_bias=use_bias, name=name,
                   conv_general_dilated=conv_ops.conv_general_dilated)


def batch_norm(train: bool, momentum: float, epsilon: float, *, zero_init: bool = False,
               name: str | None = None) -> nn.BatchNorm:
    """Flax BatchNorm over the channel axis; `momentum` is Flax's (= 1 - torch's momentum)."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
                        name=name)


class ConvBNAct(nn.Module):
    """conv -> BatchNorm -> activation (activation None: no activation).

    Sub-module names are 'conv' and 'bn'. Input [B, *spatial, C_in] -> [B, *spatial', features].
    """
    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    groups: int = 1
    act: str | None = "relu"
    padding: str = "SYMMETRIC"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        ndim = x.ndim - 2
        x = conv(self.features, self.kernel_size, self.strides, ndim=ndim, padding=self.padding,
                 groups=self.groups, name="conv")(x)
        x = batch_norm(train, self.bn_momentum, self.bn_epsilon, zero_init=self.zero_init_bn,
                       name="bn")(x)
        return activation(self.act)(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 act(W1 mean_spatial(x) + b1) + b2).

    `reduced_features` is the bottleneck width, computed by the caller (the families disagree on
    the base: ResNet-RS uses 0.25 × block output, EfficientNetV2 0.25 × block input).
    Sub-modules 'reduce' and 'expand' are Dense layers (= timm's 1×1 convs with bias).
    x: [B, *spatial, C] -> same shape.
    """
    reduced_features: int
    act: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        s = activation(self.act)(Dense(self.reduced_features, name="reduce")(s))
        s = Dense(x.shape[-1], name="expand")(s)
        return x * nn.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per example with probability `rate`, scaling the
    kept ones by 1/(1 - rate). Identity when not training or rate == 0. Uses the 'dropout' rng.
    """
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def param_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """Variable shapes of `model` for an input of `input_shape`, without materialising weights."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))


# ----------------------------------------------------------------------------------------------
# timm state_dict conversion.


class StateDictReader:
    """Consumes a torch state_dict key by key and converts layouts to Flax's.

    Every read is checked against the expected Flax shape; `finish()` raises if any key was not
    consumed (BN's `num_batches_tracked` counters are ignored), listing the leftovers, so a
    converter that silently drops weights cannot pass.
    """

    def __init__(self, state_dict: Mapping[str, Any]):
        self._sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                    for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        self._used: set[str] = set()

    def _take(self, key: str) -> np.ndarray:
        if key not in self._sd:
            near = sorted(k for k in self._sd if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])
            raise KeyError(f"timm state_dict has no key {key!r} (same prefix: {near or 'none'}); "
                           "is this the state_dict of the variant you created?")
        if key in self._used:
            raise KeyError(f"timm key {key!r} consumed twice: converter bug")
        self._used.add(key)
        return self._sd[key]

    @staticmethod
    def _check(key: str, arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{key}: converted shape {tuple(arr.shape)} != Flax shape "
                             f"{tuple(shape)}")
        return arr

    def conv(self, key: str, shape: Sequence[int]) -> np.ndarray:
        """torch conv weight [O, I/g, *k] -> Flax [*k, I/g, O]; shape is the Flax kernel shape.

        A 2D torch kernel fills a 3D Flax kernel with temporal extent 1 (inflation)."""
        w = self._take(key)
        w = np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))
        if len(shape) == w.ndim + 1:
            w = w[None]
        return self._check(key, w, shape)

    def dense(self, key: str, shape: Sequence[int]) -> np.ndarray:
        """torch Linear [O, I] or 1×1 conv [O, I, 1, 1] -> Flax Dense [I, O]."""
        w = self._take(key)
        w = w.reshape(w.shape[0], -1).T
        return self._check(key, w, shape)

    def vector(self, key: str, shape: Sequence[int]) -> np.ndarray:
        return self._check(key, self._take(key), shape)

    def batch_norm(self, prefix: str, channels: int) -> tuple[dict, dict]:
        """(params {'scale','bias'}, batch_stats {'mean','var'}) of torch BatchNorm `prefix`."""
        c = (channels,)
        params = {"scale": self.vector(f"{prefix}.weight", c),
                  "bias": self.vector(f"{prefix}.bias", c)}
        stats = {"mean": self.vector(f"{prefix}.running_mean", c),
                 "var": self.vector(f"{prefix}.running_var", c)}
        return params, stats

    def finish(self) -> None:
        left = sorted(set(self._sd) - self._used)
        if left:
            more = f", ... ({len(left)} in all)" if len(left) > 20 else ""
            shown = ", ".join(left[:20]) + more
            raise ValueError(f"timm state_dict keys not consumed by the converter: {shown}. The "
                             "state_dict does not match the Flax model (variant or options "
                             "differ).")


def convert_tree(reader: StateDictReader, shapes: Mapping[str, Any],
                 rule: Callable[[tuple[str, ...]], tuple[str, str] | None]) -> dict:
    """Fill the Flax 'params' and 'batch_stats' trees from a torch state_dict.

    Walks the Flax variable shapes (from `param_shapes`). For each BatchNorm (a 'params' leaf
    pair scale/bias with matching mean/var stats) and each kernel/bias leaf, `rule(path)` maps the
    Flax module path (tuple of names, without the leaf name) to (torch_prefix, kind) with kind in
    {'conv', 'dense', 'bn'}; it returns None for a path it does not know (an error).

    Returns {'params': ..., 'batch_stats': ...} of numpy arrays; calls `reader.finish()`.
    """
    params_flat = traverse_util.flatten_dict(shapes["params"])
    stats_flat = traverse_util.flatten_dict(shapes.get("batch_stats", {}))
    out_p: dict = {}
    out_s: dict = {}
    modules = sorted({path[:-1] for path in params_flat})
    for mod in modules:
        mapped = rule(mod)
        if mapped is None:
            raise ValueError(f"no timm key for Flax module {'/'.join(mod)}: converter bug")
        prefix, kind = mapped
        if kind == "bn":
            c = params_flat[mod + ("scale",)].shape[0]
            p, s = reader.batch_norm(prefix, c)
            out_p[mod + ("scale",)], out_p[mod + ("bias",)] = p["scale"], p["bias"]
            out_s[mod + ("mean",)], out_s[mod + ("var",)] = s["mean"], s["var"]
            continue
        kernel_shape = params_flat[mod + ("kernel",)].shape
        take = reader.conv if kind == "conv" else reader.dense
        out_p[mod + ("kernel",)] = take(f"{prefix}.weight", kernel_shape)
        if mod + ("bias",) in params_flat:
            out_p[mod + ("bias",)] = reader.vector(f"{prefix}.bias",
                                                   params_flat[mod + ("bias",)].shape)
    missing = set(stats_flat) - set(out_s)
    if missing:
        raise ValueError(f"batch_stats not filled: {sorted(missing)[:5]}")
    reader.finish()
    return {"params": traverse_util.unflatten_dict(out_p),
            "batch_stats": traverse_util.unflatten_dict(out_s)}
