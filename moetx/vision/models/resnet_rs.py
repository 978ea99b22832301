"""ResNet-RS (Bello et al. 2021) and 3D ResNet-RS for video (Du et al. 2021), Flax Linen, NHWC.

ResNet-RS is a bottleneck ResNet with the ResNet-D stem (three 3×3 convs, widths 32, 32, 64),
a stride-2 3×3 conv in place of the stem max-pool, ResNet-D shortcuts (2×2 average pool, then the
1×1 projection), squeeze-excite with ratio 0.25 of the block output in every bottleneck,
stochastic depth and dropout before the classifier. The layout and parameter names follow
timm's `resnetrs*` (itself a port of the TF1 `tensorflow/tpu` code that produced the released
checkpoints), so `from_timm` converts its weights one to one and the trainable parameter counts
are equal (RS-50: 35,691,912).

Activation: ReLU by default, as in the TF1 code and timm; `activation='swish'` gives the TF2
Model-Garden yaml's choice. BatchNorm: eps 1e-5, Flax momentum 0.9 by default; the released
configs use `bn_momentum: 0` (running stats = the last batch) together with a weight EMA that
also covers the BN statistics; pass `bn_momentum=0.0` to reproduce that.
Stochastic depth: stage i (0-based) drops residual branches with rate
`drop_path_rate·(i+2)/5` (TF2 Model Garden: `get_stochastic_depth_rate(init, i + 2, 5)`;
TF1 `resnet_layers.get_drop_connect_rate` has the same block_num/total_blocks form). timm
instead ramps the rate linearly per block; the two agree at rate 0 (RS-50..152's configs).

**The spatial-mixer hook** (shared with LambdaResNet / SASA / GSA / AA-ResNet).
`ResNet(spatial_mixer=factory)` replaces each bottleneck's 3×3 conv + BN + activation by
`factory(features, strides)`, where
  - `features: int` is the bottleneck width (the output channels of the op; the block's 1×1
    expansion to 4·features follows it),
  - `strides: int` is 1, or 2 in the first block of stages 2-4: the op must reduce H and W by it
    (output size ceil(H/strides); e.g. attention then 2×2 average pooling, as SASA does),
  - the returned `nn.Module` is called as `module(x, train=train)` with x: float32
    [B, H, W, C_in] (C_in == features) and returns [B, ceil(H/s), ceil(W/s), features]; it must
    include its own normalisation and activation (the default is conv → BN → ReLU),
  - its variables live under `<stage>_block<j>/mixer/...`; BatchNorm must use the
    'batch_stats' collection and randomness the 'dropout' rng, as everywhere in moetx.vision.
The factory is called inside the parent's compact scope, so it must only construct the module.
`spatial_mixer=None` keeps the 3×3 conv (sub-module 'conv2'), which is what `from_timm` expects.
The hook is for 2D networks only.

**3D ResNet-RS** (`create('3d-50', ...)`, input [B, T, H, W, C]): the same network inflated:
each bottleneck's first 1×1 conv becomes a (k_t, 1, 1) temporal conv with k_t per stage
(1, 1, 3, 3), the 3×3 convs become (1, 3, 3), the first stem conv has temporal kernel 5 and
temporal stride 2, and the last block of every stage applies self-gating (S3D-G feature gating:
x · sigmoid(W mean_{T,H,W}(x) + b)) before SE — the K400 yaml of the TF2 Model Garden
(`k400_resnet3drs_50_tpu.yaml`: SE 0.25, self-gating on, SD 0.1, dropout 0.5). Deliberate
difference from Model Garden's `ResNet3D`: we keep the 2D ResNet-RS stem pooling (stride-2 conv)
and ResNet-D shortcuts, where Model Garden uses a 3×3 max-pool and strided 1×1 shortcuts; this
keeps the 3D net an exact inflation of the 2D one (see `inflate_variables`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moetx.nn.layers import Dense
from moetx.vision.models import common

SpatialMixer = Callable[[int, int], nn.Module]

# Block counts per stage: tensorflow/tpu resnet_rs (and timm resnetrs*, Model Garden RESNET_SPECS).
# Dropout / stochastic-depth rates: the tensorflow/tpu resnet_rs configs at each depth's largest
# training resolution (resnetrs{50_i160,101_i192,152_i256,200_i256,270_i256,350_i320,420_i320}).
_RS = {
    "50": dict(depths=(3, 4, 6, 3), dropout_rate=0.25, drop_path_rate=0.0),
    "101": dict(depths=(3, 4, 23, 3), dropout_rate=0.25, drop_path_rate=0.0),
    "152": dict(depths=(3, 8, 36, 3), dropout_rate=0.25, drop_path_rate=0.0),
    "200": dict(depths=(3, 24, 36, 3), dropout_rate=0.25, drop_path_rate=0.1),
    "270": dict(depths=(4, 29, 53, 4), dropout_rate=0.25, drop_path_rate=0.1),
    "350": dict(depths=(4, 36, 72, 4), dropout_rate=0.4, drop_path_rate=0.1),
    "420": dict(depths=(4, 44, 87, 4), dropout_rate=0.4, drop_path_rate=0.1),
}
# 3D: Model Garden K400 yaml for 3D RS-50 (dropout 0.5, SD 0.1); same recipe for the others.
_VIDEO = dict(temporal_kernel_sizes=(1, 1, 3, 3), stem_temporal_kernel=5, stem_temporal_stride=2,
              self_gating=True, dropout_rate=0.5, drop_path_rate=0.1)

VARIANTS: dict[str, dict] = {
    **_RS,
    **{f"3d-{k}": dict(v, **_VIDEO) for k, v in _RS.items() if k != "420"},
    # Small enough to train on 28×28 grayscale Fashion-MNIST on 2 CPU cores in minutes:
    # 7×7 after the stem, one block per stage, 0.70M parameters (10 classes, grayscale).
    "tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                 dropout_rate=0.0, drop_path_rate=0.0),
    "3d-tiny": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_widths=(16, 16, 32),
                    **dict(_VIDEO, dropout_rate=0.0, drop_path_rate=0.0)),
}


def _avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """stride×stride average pool over H, W with ceil_mode and padding excluded from the mean
    (timm's ResNet-D shortcut pool); [B, (T,) H, W, C] -> [B, (T,) ceil(H/s), ceil(W/s), C]."""
    ndim = x.ndim - 2
    window = (1,) * (ndim - 2) + (stride, stride)
    pad = [(0, 0)] * (ndim - 2) + [(0, (-x.shape[-3]) % stride), (0, (-x.shape[-2]) % stride)]
    return nn.avg_pool(x, window, window, padding=pad, count_include_pad=False)


class SelfGating(nn.Module):
    """S3D-G feature gating: x · sigmoid(Dense(mean over all spatial/temporal axes of x)).

    Sub-module 'dense' ([C, C] kernel + bias). x: [B, *spatial, C] -> same shape."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        return x * nn.sigmoid(Dense(x.shape[-1], name="dense")(g))


class Bottleneck(nn.Module):
    """1×1 (or k_t×1×1) -> 3×3 (or the spatial mixer) -> 1×1 expansion, SE, shortcut, add, act.

    x: [B, H, W, C] or [B, T, H, W, C] -> [B, ceil(H/s), ceil(W/s), expansion·width] (T kept).
    """
    width: int
    strides: int = 1
    expansion: int = 4
    se_ratio: float = 0.25
    drop_path_rate: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    temporal_kernel: int | None = None  # None: 2D block
    self_gating: bool = False
    spatial_mixer: SpatialMixer | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        video = x.ndim == 5
        if video != (self.temporal_kernel is not None):
            raise ValueError(f"Bottleneck got a rank-{x.ndim} input but temporal_kernel="
                             f"{self.temporal_kernel}; 3D blocks need [B, T, H, W, C]")
        cba = dict(act=self.act, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        out_features = self.width * self.expansion

        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            if self.strides != 1:
                shortcut = _avg_pool_ceil(shortcut, self.strides)
            shortcut = common.ConvBNAct(out_features, 1, **dict(cba, act=None),
                                        name="shortcut")(shortcut, train=train)

        k1 = (self.temporal_kernel, 1, 1) if video else 1
        y = common.ConvBNAct(self.width, k1, **cba, name="conv1")(x, train=train)
        if self.spatial_mixer is None:
            k2, s2 = ((1, 3, 3), (1, self.strides, self.strides)) if video else (3, self.strides)
            y = common.ConvBNAct(self.width, k2, s2, **cba, name="conv2")(y, train=train)
        else:
            if video:
                raise ValueError("spatial_mixer is supported for 2D networks only")
            mixer = self.spatial_mixer(self.width, self.strides).clone(parent=self, name="mixer")
            y = mixer(y, train=train)
        # Zero-init of the last BN scale: each block starts as the identity (TF1 RS, timm).
        y = common.ConvBNAct(out_features, 1, **dict(cba, act=None), zero_init_bn=True,
                             name="conv3")(y, train=train)
        if self.self_gating:
            y = SelfGating(name="self_gating")(y)
        if self.se_ratio:
            rd = common.make_divisible(out_features * self.se_ratio, 8, round_limit=0.0)
            y = common.SqueezeExcite(rd, act=self.act, name="se")(y)
        y = common.DropPath(self.drop_path_rate)(y, train=train)
        return common.activation(self.act)(y + shortcut)


class ResNet(nn.Module):
    """ResNet-RS classifier (2D if `temporal_kernel_sizes` is None, else 3D).

    __call__(images, *, train=False) -> (logits [B, num_classes], out) with images float32
    [B, H, W, C] (2D) or [B, T, H, W, C] (3D); out holds 'stem', 'stage1'..'stage4' (feature
    maps) and 'pre_logits' [B, 4·widths[-1]].
    """
    num_classes: int
    depths: Sequence[int] = (3, 4, 6, 3)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_widths: Sequence[int] = (32, 32, 64)
    expansion: int = 4
    se_ratio: float = 0.25
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    activation: str = "relu"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    spatial_mixer: SpatialMixer | None = None
    # 3D only.
    temporal_kernel_sizes: Sequence[int] | None = None
    stem_temporal_kernel: int = 5
    stem_temporal_stride: int = 2
    self_gating: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        video = self.temporal_kernel_sizes is not None
        want = 5 if video else 4
        if images.ndim != want:
            raise ValueError(f"ResNet ({'3D' if video else '2D'}) expects images of rank {want} "
                             f"({'[B, T, H, W, C]' if video else '[B, H, W, C]'}), got shape "
                             f"{images.shape}")
        if len(self.depths) != len(self.widths) or (
                video and len(self.temporal_kernel_sizes) != len(self.depths)):
            raise ValueError(f"depths {self.depths}, widths {self.widths} and "
                             f"temporal_kernel_sizes {self.temporal_kernel_sizes} must have one "
                             "entry per stage")
        cba = dict(act=self.activation, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
        sp = (lambda k: (1, k, k)) if video else (lambda k: k)
        out = {}

        # ResNet-D stem: 3×3/2, 3×3, 3×3, then a 3×3/2 conv in place of the max-pool.
        w1, w2, w3 = self.stem_widths
        if video:
            k, s = (self.stem_temporal_kernel, 3, 3), (self.stem_temporal_stride, 2, 2)
        else:
            k, s = 3, 2
        x = common.ConvBNAct(w1, k, s, **cba, name="stem_conv1")(images, train=train)
        x = common.ConvBNAct(w2, sp(3), **cba, name="stem_conv2")(x, train=train)
        x = common.ConvBNAct(w3, sp(3), **cba, name="stem_conv3")(x, train=train)
        x = common.ConvBNAct(w3, sp(3), sp(2) if video else 2, **cba,
                             name="stem_pool")(x, train=train)
        out["stem"] = x

        n_stages = len(self.depths)
        for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
            rate = self.drop_path_rate * (i + 2) / (n_stages + 1)
            for j in range(depth):
                x = Bottleneck(
                    width, strides=2 if (i > 0 and j == 0) else 1, expansion=self.expansion,
                    se_ratio=self.se_ratio, drop_path_rate=rate, act=self.activation,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    temporal_kernel=self.temporal_kernel_sizes[i] if video else None,
                    self_gating=self.self_gating and j == depth - 1,
                    spatial_mixer=self.spatial_mixer, name=f"stage{i + 1}_block{j}",
                )(x, train=train)
            out[f"stage{i + 1}"] = x

        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        out["pre_logits"] = x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = Dense(self.num_classes, name="head")(x)
        return logits, out


def create(variant: str, num_classes: int, **overrides: Any) -> ResNet:
    """ResNet-RS by variant name ('50'..'420', 'tiny', '3d-50'..'3d-350', '3d-tiny').

    `overrides` replace any `ResNet` field (e.g. activation='swish', spatial_mixer=...)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet-RS variant {variant!r}; known: {sorted(VARIANTS)}")
    return ResNet(num_classes=num_classes, **{**VARIANTS[variant], **overrides})


def create_with_mixer(family: str, variants: Mapping[str, Mapping[str, Any]], variant: str,
                      num_classes: int, overrides: Mapping[str, Any],
                      mixer_cls: Callable[..., nn.Module], mixer_fields: Sequence[str]) -> ResNet:
    """The skeleton of the attention ResNets (GSA, SASA, LambdaResNet): variant `variant` of
    `variants` merged with `overrides`, every bottleneck 3x3 conv replaced by
    `mixer_cls(width, strides=..., **fields)`, where the `mixer_fields` are taken out of the
    merged config and the rest are `ResNet` fields; no squeeze-excite unless it sets se_ratio.
    `family` names the models in the unknown-variant error."""
    if variant not in variants:
        raise ValueError(f"Unknown {family} variant {variant!r}; known: {sorted(variants)}.")
    cfg = {**variants[variant], **overrides}
    fields = {name: cfg.pop(name) for name in mixer_fields}

    def mixer(features: int, strides: int) -> nn.Module:
        return mixer_cls(features, strides=strides, **fields)

    cfg.setdefault("se_ratio", 0.0)
    return ResNet(num_classes=num_classes, spatial_mixer=mixer, **cfg)


# ----------------------------------------------------------------------------------------------
# Weight conversion.


def _timm_key(path: tuple[str, ...]) -> tuple[str, str] | None:
    """Flax module path -> (timm state_dict prefix, kind)."""
    stem = {("stem_conv1", "conv"): ("conv1.0", "conv"), ("stem_conv1", "bn"): ("conv1.1", "bn"),
            ("stem_conv2", "conv"): ("conv1.3", "conv"), ("stem_conv2", "bn"): ("conv1.4", "bn"),
            ("stem_conv3", "conv"): ("conv1.6", "conv"), ("stem_conv3", "bn"): ("bn1", "bn"),
            ("stem_pool", "conv"): ("maxpool.0", "conv"), ("stem_pool", "bn"): ("maxpool.1", "bn"),
            ("head",): ("fc", "dense")}
    if path in stem:
        return stem[path]
    if not path[0].startswith("stage") or len(path) != 3:
        return None
    stage, block = path[0][len("stage"):].split("_block")
    base = f"layer{stage}.{block}"
    sub, leaf = path[1], path[2]
    if sub in ("conv1", "conv2", "conv3"):
        n = sub[-1]
        return (f"{base}.conv{n}", "conv") if leaf == "conv" else (f"{base}.bn{n}", "bn")
    if sub == "shortcut":
        return (f"{base}.downsample.1", "conv") if leaf == "conv" else (
            f"{base}.downsample.2", "bn")
    if sub == "se":
        return (f"{base}.se.fc1" if leaf == "reduce" else f"{base}.se.fc2"), "dense"
    return None


def from_timm(state_dict: Mapping[str, Any], model: ResNet | None = None,
              image_size: int = 64) -> dict:
    """timm `resnetrs*` state_dict -> {'params', 'batch_stats'} for the matching 2D `ResNet`.

    `model` defaults to RS-50 with the state_dict's class count. Strict: every timm key must be
    consumed and every shape must match, else an error lists what is wrong.
    """
    if model is None:
        model = create("50", int(state_dict["fc.weight"].shape[0]))
    if model.temporal_kernel_sizes is not None or model.spatial_mixer is not None:
        raise ValueError("from_timm converts 2D ResNet-RS with the default 3×3 conv only")
    shapes = common.param_shapes(model, (1, image_size, image_size, 3))
    return common.convert_tree(common.StateDictReader(state_dict), shapes, _timm_key)


def inflate_variables(variables_2d: Mapping[str, Any], model_3d: ResNet,
                      input_shape: Sequence[int]) -> dict:
    """Inflate 2D ResNet variables into a 3D ResNet: each 2D kernel goes to the central temporal
    tap of the 3D kernel, the other taps are zero ("centre" inflation), everything else is copied.

    With this, a single-frame clip (T=1) through the 3D net equals the image through the 2D net,
    for any temporal kernel sizes, provided the 2D net has the same self-gating layers (build it
    with `self_gating=True` when the 3D one has it). `input_shape` is the 3D input shape.
    """
    shapes = traverse_util.flatten_dict(
        common.param_shapes(model_3d, input_shape)["params"])
    src = traverse_util.flatten_dict(variables_2d["params"])
    if set(shapes) != set(src):
        raise ValueError(f"2D and 3D parameter trees differ: only 3D "
                         f"{sorted(set(shapes) - set(src))[:5]}, only 2D "
                         f"{sorted(set(src) - set(shapes))[:5]}")
    params = {}
    for key, target in shapes.items():
        w = np.asarray(src[key])
        if target.ndim == w.ndim + 1:  # conv kernel [kh, kw, I, O] -> [kt, kh, kw, I, O]
            full = np.zeros(target.shape, w.dtype)
            full[target.shape[0] // 2] = w
            w = full
        if w.shape != target.shape:
            raise ValueError(f"{'/'.join(key)}: 2D shape {w.shape} does not inflate to "
                             f"{target.shape}")
        params[key] = w
    return {"params": traverse_util.unflatten_dict(params),
            "batch_stats": variables_2d.get("batch_stats", {})}


def video_param_count(count_2d: int, model_3d: ResNet) -> int:
    """Trainable parameters of a 3D ResNet-RS derived from its 2D twin's count.

    Extra over 2D: the stem conv's temporal taps (k_t - 1)·9·C_in·w1, each block's first conv
    taps (k_t - 1)·C_in·width, and self-gating (C² + C, C = 4·width) in the last block of each
    stage. Assumes 3 input channels. The tests check this against `jax.eval_shape`.
    """
    m = model_3d
    extra = (m.stem_temporal_kernel - 1) * 9 * 3 * m.stem_widths[0]
    c_in = m.stem_widths[-1]
    for depth, width, kt in zip(m.depths, m.widths, m.temporal_kernel_sizes):
        for _ in range(depth):
            extra += (kt - 1) * c_in * width
            c_in = width * m.expansion
        if m.self_gating:
            extra += c_in * c_in + c_in
    return count_2d + extra


def num_params(model: ResNet, image_size: int = 64, frames: int = 4) -> int:
    """Trainable parameter count of `model` from shapes only (no weights are materialised)."""
    shape = ((1, frames) if model.temporal_kernel_sizes is not None else (1,)) + (
        image_size, image_size, 3)
    return common.count_params(common.param_shapes(model, shape)["params"])


__all__ = ["VARIANTS", "ResNet", "Bottleneck", "SelfGating", "create", "from_timm",
           "inflate_variables", "video_param_count", "num_params"]
