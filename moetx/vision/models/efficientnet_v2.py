"""EfficientNetV2 (Tan & Le 2021), Flax Linen, NHWC: Fused-MBConv and MBConv stages, and the
progressive-learning schedule.

Architecture as in the official `google/automl/efficientnetv2` (`effnetv2_configs.py`), whose
block strings are copied verbatim below (`r{repeats}_k{kernel}_s{stride}_e{expand}_i{in}_o{out}
[_se{ratio}][_c1 = fused]`). Layout and names follow timm's `tf_efficientnetv2_*` port, so
`from_timm` converts its weights one to one and the trainable parameter counts are equal
(V2-S 21,458,488; B0 7,139,704 with 1000 classes).

Blocks (x: [B, H, W, C_in] -> [B, H/s, W/s, C_out]):
  - Fused-MBConv, expand 1: k×k conv (stride s) -> BN -> SiLU.
  - Fused-MBConv, expand e: k×k conv to e·C_in (stride s) -> BN -> SiLU -> 1×1 conv -> BN.
  - MBConv: 1×1 conv to e·C_in -> BN -> SiLU -> k×k depthwise (stride s) -> BN -> SiLU ->
    squeeze-excite -> 1×1 conv -> BN.
  A residual (with stochastic depth) is added when s == 1 and C_in == C_out.
Details that matter: SE width = se_ratio × the block *input* channels (not the expanded ones);
stochastic-depth drop rate grows linearly over all blocks, `drop_path_rate·i/N` (automl: survival
probability decaying linearly to 0.8, i.e. drop_path_rate 0.2); BN eps 1e-3 and Flax momentum
0.9 (TF 0.9 in automl's hparams); SiLU; TensorFlow 'SAME' padding (asymmetric for stride 2,
which is what timm's `tf_` models reproduce). Width/depth multipliers (B1-B3): channels
rounded to multiples of 8 without the 0.9 floor (automl `round_filters`), repeats ceil(d·r).

Progressive learning: `progressive_schedule` follows the automl repo (`main.py`): stage i of n
trains up to step int((i+1)/n·total) at image size int(ibase + (train_size − ibase)·(i+1)/n),
ibase 128, with RandAugment magnitude linspace(5, ram, n), mixup alpha linspace(0, mix, n) and
dropout linspace(0, dropout, n), where (train_size, ram, mix, dropout) are the repo's per-variant
values (S: 300, 10, 0, 0.2). This is the repo's range, not the paper's Table 6 (S: RandAug 5→15,
dropout 0.1→0.3). Note the repo computes the dropout list but its `main.py` does not apply it
(the line is commented out); we return it for trainers that want to.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.nn.layers import Dense
from moetx.vision.models import common

# google/automl efficientnetv2/effnetv2_configs.py.
_BLOCKS = {
    "base": ["r1_k3_s1_e1_i32_o16_c1", "r2_k3_s2_e4_i16_o32_c1", "r2_k3_s2_e4_i32_o48_c1",
             "r3_k3_s2_e4_i48_o96_se0.25", "r5_k3_s1_e6_i96_o112_se0.25",
             "r8_k3_s2_e6_i112_o192_se0.25"],
    "s": ["r2_k3_s1_e1_i24_o24_c1", "r4_k3_s2_e4_i24_o48_c1", "r4_k3_s2_e4_i48_o64_c1",
          "r6_k3_s2_e4_i64_o128_se0.25", "r9_k3_s1_e6_i128_o160_se0.25",
          "r15_k3_s2_e6_i160_o256_se0.25"],
    "m": ["r3_k3_s1_e1_i24_o24_c1", "r5_k3_s2_e4_i24_o48_c1", "r5_k3_s2_e4_i48_o80_c1",
          "r7_k3_s2_e4_i80_o160_se0.25", "r14_k3_s1_e6_i160_o176_se0.25",
          "r18_k3_s2_e6_i176_o304_se0.25", "r5_k3_s1_e6_i304_o512_se0.25"],
    "l": ["r4_k3_s1_e1_i32_o32_c1", "r7_k3_s2_e4_i32_o64_c1", "r7_k3_s2_e4_i64_o96_c1",
          "r10_k3_s2_e4_i96_o192_se0.25", "r19_k3_s1_e6_i192_o224_se0.25",
          "r25_k3_s2_e6_i224_o384_se0.25", "r7_k3_s1_e6_i384_o640_se0.25"],
    # Not in automl: a 4-stage toy for 28×28 Fashion-MNIST on CPU (0.11M params, 10 classes).
    "tiny": ["r1_k3_s1_e1_i16_o16_c1", "r2_k3_s2_e4_i16_o24_c1",
             "r2_k3_s2_e4_i24_o40_se0.25", "r1_k3_s1_e4_i40_o64_se0.25"],
}


def _v(blocks, width, depth, train_size, eval_size, dropout, randaug, mixup, aug, head=1280):
    return dict(blocks=blocks, width_mult=width, depth_mult=depth, train_size=train_size,
                eval_size=eval_size, dropout_rate=dropout, randaug=randaug, mixup=mixup, aug=aug,
                head_features=head)


# automl efficientnetv2_params: (block, width, depth, train_size, eval_size, dropout, randaug,
# mixup, aug).
VARIANTS: dict[str, dict] = {
    "s": _v("s", 1.0, 1.0, 300, 384, 0.2, 10, 0.0, "randaug"),
    "m": _v("m", 1.0, 1.0, 384, 480, 0.3, 15, 0.2, "randaug"),
    "l": _v("l", 1.0, 1.0, 384, 480, 0.4, 20, 0.5, "randaug"),
    "b0": _v("base", 1.0, 1.0, 192, 224, 0.2, 0, 0.0, "effnetv1_autoaug"),
    "b1": _v("base", 1.0, 1.1, 192, 240, 0.2, 0, 0.0, "effnetv1_autoaug"),
    "b2": _v("base", 1.1, 1.2, 208, 260, 0.3, 0, 0.0, "effnetv1_autoaug"),
    "b3": _v("base", 1.2, 1.4, 240, 300, 0.3, 0, 0.0, "effnetv1_autoaug"),
    "tiny": _v("tiny", 1.0, 1.0, 28, 28, 0.0, 5, 0.0, "randaug", head=256),
}
_MODEL_FIELDS = ("blocks", "width_mult", "depth_mult", "dropout_rate", "head_features")


class BlockSpec(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_features: int
    out_features: int
    se_ratio: float | None
    fused: bool


def decode_block(s: str) -> BlockSpec:
    """Parse an automl block string, e.g. 'r4_k3_s2_e4_i24_o48_c1'."""
    opts = {}
    for op in s.split("_"):
        m = re.fullmatch(r"([a-z]+)(\d.*)", op)
        if not m:
            raise ValueError(f"bad block string {s!r}: cannot parse {op!r}")
        opts[m.group(1)] = m.group(2)
    return BlockSpec(int(opts["r"]), int(opts["k"]), int(opts["s"]), int(opts["e"]),
                     int(opts["i"]), int(opts["o"]),
                     float(opts["se"]) if "se" in opts else None, opts.get("c") == "1")


def round_filters(features: int, width_mult: float) -> int:
    """automl `round_filters`: nearest multiple of 8 (no 0.9 floor), at least 8."""
    if width_mult == 1.0:
        return features
    return common.make_divisible(features * width_mult, 8, round_limit=0.0)


class MBConv(nn.Module):
    """Fused-MBConv or MBConv block (see the module docstring). x: [B, H, W, C_in]."""
    spec: BlockSpec  # in/out already width-scaled; stride of this repeat
    in_features: int
    drop_path_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        s = self.spec
        cba = dict(act="silu", padding="SAME", bn_momentum=self.bn_momentum,
                   bn_epsilon=self.bn_epsilon)
        mid = self.in_features * s.expand
        y = x
        if s.fused and s.expand == 1:
            y = common.ConvBNAct(s.out_features, s.kernel, s.stride, **cba, name="conv")(
                y, train=train)
        elif s.fused:
            y = common.ConvBNAct(mid, s.kernel, s.stride, **cba, name="expand")(y, train=train)
            y = common.ConvBNAct(s.out_features, 1, **dict(cba, act=None), name="project")(
                y, train=train)
        else:
            y = common.ConvBNAct(mid, 1, **cba, name="expand")(y, train=train)
            y = common.ConvBNAct(mid, s.kernel, s.stride, groups=mid, **cba,
                                 name="depthwise")(y, train=train)
            if s.se_ratio:
                y = common.SqueezeExcite(max(1, int(self.in_features * s.se_ratio)), act="silu",
                                         name="se")(y)
            y = common.ConvBNAct(s.out_features, 1, **dict(cba, act=None), name="project")(
                y, train=train)
        if s.stride == 1 and self.in_features == s.out_features:
            y = common.DropPath(self.drop_path_rate)(y, train=train) + x
        return y


class EfficientNetV2(nn.Module):
    """EfficientNetV2 classifier.

    __call__(images [B, H, W, C], *, train=False) -> (logits [B, num_classes], out) with out
    holding 'stem', 'stage1'..'stageN' and 'pre_logits' [B, head_features].
    """
    num_classes: int
    blocks: str | Sequence[str] = "s"  # a key of _BLOCKS or a list of block strings
    width_mult: float = 1.0
    depth_mult: float = 1.0
    head_features: int = 1280
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.2  # automl survival_prob 0.8
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3

    def stage_specs(self) -> list[list[BlockSpec]]:
        """Per stage, the width/depth-scaled spec of every repeat (stride on the first only)."""
        strings = _BLOCKS[self.blocks] if isinstance(self.blocks, str) else self.blocks
        stages = []
        for spec in map(decode_block, strings):
            spec = spec._replace(in_features=round_filters(spec.in_features, self.width_mult),
                                 out_features=round_filters(spec.out_features, self.width_mult),
                                 repeats=int(math.ceil(self.depth_mult * spec.repeats)))
            stages.append([spec._replace(stride=spec.stride if j == 0 else 1)
                           for j in range(spec.repeats)])
        return stages

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if images.ndim != 4:
            raise ValueError(f"EfficientNetV2 expects images [B, H, W, C], got {images.shape}")
        cba = dict(act="silu", padding="SAME", bn_momentum=self.bn_momentum,
                   bn_epsilon=self.bn_epsilon)
        stages = self.stage_specs()
        out = {}
        x = common.ConvBNAct(stages[0][0].in_features, 3, 2, **cba, name="stem")(
            images, train=train)
        out["stem"] = x
        total = sum(len(s) for s in stages)
        idx = 0
        for i, stage in enumerate(stages):
            for j, spec in enumerate(stage):
                x = MBConv(spec, in_features=x.shape[-1],
                           drop_path_rate=self.drop_path_rate * idx / total,
                           bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                           name=f"stage{i + 1}_block{j}")(x, train=train)
                idx += 1
            out[f"stage{i + 1}"] = x
        x = common.ConvBNAct(round_filters(self.head_features, self.width_mult), 1, **cba,
                             name="head_conv")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return Dense(self.num_classes, name="head")(x), out


def create(variant: str, num_classes: int, **overrides: Any) -> EfficientNetV2:
    """EfficientNetV2 by variant ('s', 'm', 'l', 'b0'..'b3', 'tiny'); overrides set any field."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNetV2 variant {variant!r}; known: {sorted(VARIANTS)}")
    cfg = {k: VARIANTS[variant][k] for k in _MODEL_FIELDS}
    return EfficientNetV2(num_classes=num_classes, **{**cfg, **overrides})


def num_params(model: EfficientNetV2, image_size: int = 64) -> int:
    """Trainable parameter count from shapes only."""
    return common.count_params(
        common.param_shapes(model, (1, image_size, image_size, 3))["params"])


# ----------------------------------------------------------------------------------------------
# Progressive learning.


class ProgressiveStage(NamedTuple):
    image_size: int
    randaug_magnitude: float | None  # None when the variant's augmentation is not RandAugment
    mixup_alpha: float
    dropout: float
    steps: int  # steps in this stage (they sum to total_steps)


def progressive_schedule(variant: str, total_steps: int, num_stages: int = 4,
                         ibase: int = 128, train_size: int | None = None
                         ) -> list[ProgressiveStage]:
    """automl's progressive-learning stages for `variant` (see the module docstring).

    `train_size` overrides the variant's final training size (e.g. 28 for Fashion-MNIST, with a
    smaller `ibase`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNetV2 variant {variant!r}; known: {sorted(VARIANTS)}")
    if num_stages < 1 or total_steps < num_stages:
        raise ValueError(f"need num_stages >= 1 and total_steps >= num_stages, got "
                         f"{num_stages}, {total_steps}")
    cfg = VARIANTS[variant]
    size = cfg["train_size"] if train_size is None else train_size
    if ibase > size:
        raise ValueError(f"ibase {ibase} is larger than the final training size {size}")
    ram = np.linspace(5, cfg["randaug"], num_stages)
    mixup = np.linspace(0, cfg["mixup"], num_stages)
    dropout = np.linspace(0, cfg["dropout_rate"], num_stages)
    stages, done = [], 0
    for i in range(num_stages):
        ratio = (i + 1) / num_stages
        end = int(ratio * total_steps)
        stages.append(ProgressiveStage(
            image_size=int(ibase + (size - ibase) * ratio),
            randaug_magnitude=float(ram[i]) if cfg["aug"] == "randaug" else None,
            mixup_alpha=float(mixup[i]), dropout=float(dropout[i]), steps=end - done))
        done = end
    return stages


# ----------------------------------------------------------------------------------------------
# Weight conversion.

_BLOCK_SUBS = {
    ("conv", "conv"): ("conv", "conv"), ("conv", "bn"): ("bn1", "bn"),
    ("depthwise", "conv"): ("conv_dw", "conv"), ("depthwise", "bn"): ("bn2", "bn"),
    ("se", "reduce"): ("se.conv_reduce", "dense"), ("se", "expand"): ("se.conv_expand", "dense"),
}


def _timm_rule(fused_by_block: Mapping[str, bool]):
    def rule(path: tuple[str, ...]) -> tuple[str, str] | None:
        top = {("stem", "conv"): ("conv_stem", "conv"), ("stem", "bn"): ("bn1", "bn"),
               ("head_conv", "conv"): ("conv_head", "conv"), ("head_conv", "bn"): ("bn2", "bn"),
               ("head",): ("classifier", "dense")}
        if path in top:
            return top[path]
        if len(path) != 3 or not path[0].startswith("stage"):
            return None
        stage, block = path[0][len("stage"):].split("_block")
        base = f"blocks.{int(stage) - 1}.{block}"
        fused = fused_by_block[path[0]]
        sub = path[1:]
        if sub[0] == "expand":
            name = ("conv_exp" if fused else "conv_pw") if sub[1] == "conv" else "bn1"
            return f"{base}.{name}", "conv" if sub[1] == "conv" else "bn"
        if sub[0] == "project":
            bn = "bn2" if fused else "bn3"
            return (f"{base}.conv_pwl", "conv") if sub[1] == "conv" else (f"{base}.{bn}", "bn")
        if sub in _BLOCK_SUBS:
            name, kind = _BLOCK_SUBS[sub]
            return f"{base}.{name}", kind
        return None
    return rule


def from_timm(state_dict: Mapping[str, Any], model: EfficientNetV2 | None = None,
              image_size: int = 64) -> dict:
    """timm `tf_efficientnetv2_*` state_dict -> {'params', 'batch_stats'} for `model`
    (default: V2-S with the state_dict's class count). Strict: every key consumed, shapes
    checked."""
    if model is None:
        model = create("s", int(state_dict["classifier.weight"].shape[0]))
    fused = {f"stage{i + 1}_block{j}": spec.fused
             for i, stage in enumerate(model.stage_specs()) for j, spec in enumerate(stage)}
    shapes = common.param_shapes(model, (1, image_size, image_size, 3))
    return common.convert_tree(common.StateDictReader(state_dict), shapes, _timm_rule(fused))
