"""CoAtNet (Dai et al. 2021, "CoAtNet: Marrying Convolution and Attention"), NHWC, Flax Linen.

Five stages S0..S4, each halving the resolution (output strides /2, /4, /8, /16, /32), in the
paper's C-C-T-T layout:

- S0 (stem): conv 3x3 stride 2 -> BN -> GELU -> conv 3x3.
- S1, S2: MBConv blocks with pre-norm BN: BN -> 1x1 expand to 4x the *output* width -> BN-GELU
  -> depthwise 3x3 (carrying the stride) -> BN-GELU -> squeeze-excite (reduced width 0.25 x
  output, SiLU) -> 1x1 projection (with bias).
- S3, S4: pre-LN Transformer blocks with relative attention. The attention logit between
  positions i and j is q_i . k_j / sqrt(32) + w_h[i - j], where w_h is a learned table of
  (2H-1)(2W-1) entries per head, added before the softmax (input independent). Head dim 32.
  MLP ratio 4, GELU.
- Downsampling blocks (the first of each stage) pool the shortcut with a 2x2 average pool and,
  when the width changes, project it with a 1x1 conv; Transformer blocks also pool the
  normalised input of the attention.
- Head: global average pool -> LN -> hidden FC (width = last stage width) with tanh -> classifier.

The variants are timm's "paper-like" `coatnet_{0..3}_224` configs (not the `_rw` ones) and
reproduce their parameter counts exactly at 224x224 with 1000 classes: 25,036,820 / 42,225,776 /
74,684,744 / 166,966,264 trainable parameters (paper: 25M / 42M / 75M / 168M). Batch-norm
running statistics are extra, in 'batch_stats'. The relative-bias tables are sized by the
feature map seen at init. To fine-tune at another resolution, as the paper does, the tables are
resized bilinearly (`resize_relative_position_bias`); `InitFromCheckpoint` does it with
`resize_position_tables=True`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.nn.layers import Dense, gelu_exact
from moetx.vision.models import common

Array = jax.Array

# timm maxxvit `model_cfgs['coatnet_N']` (paper Table 3 sizes). Stochastic depth grows with model
# size; 0.2 / 0.3 / 0.5 / 0.7 are the paper's ImageNet-1K rates as we recall them (appendix
# hyper-parameter table; check before relying on them). Override with stochastic_depth=...
VARIANTS: dict[str, dict[str, Any]] = {
    "0": dict(stem_width=64, widths=(96, 192, 384, 768), depths=(2, 3, 5, 2),
              head_hidden=768, stochastic_depth=0.2),
    "1": dict(stem_width=64, widths=(96, 192, 384, 768), depths=(2, 6, 14, 2),
              head_hidden=768, stochastic_depth=0.3),
    "2": dict(stem_width=128, widths=(128, 256, 512, 1024), depths=(2, 6, 14, 2),
              head_hidden=1024, stochastic_depth=0.5),
    "3": dict(stem_width=192, widths=(192, 384, 768, 1536), depths=(2, 6, 14, 2),
              head_hidden=1536, stochastic_depth=0.7),
    # A smoke-test size; not from the paper.
    "tiny": dict(stem_width=16, widths=(16, 32, 64, 64), depths=(1, 1, 1, 1),
                 head_hidden=64, stochastic_depth=0.0),
}

BLOCK_TYPES = ("C", "C", "T", "T")
HEAD_DIM = 32
_BN_EPS = 1e-5  # timm's BatchNorm2d default
_LN_EPS = 1e-6  # timm's transformer cfg


def avg_pool2(x: Array) -> Array:
    """2x2 average pool, stride 2, ceil mode (an odd side keeps its last row/column, averaged over
    the pixels present): <[B, H, W, C]> -> <[B, ceil(H/2), ceil(W/2), C]>, matching the
    depthwise conv's stride-2 output. Equal to timm's floor-mode pool on even sides."""
    pad = [(0, x.shape[1] % 2), (0, x.shape[2] % 2)]
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)


class MBConvBlock(nn.Module):
    """Pre-norm MBConv with squeeze-excite; `stride` 2 downsamples (shortcut: 2x2 avg pool, then a
    1x1 conv with bias when the width changes).

    Attributes:
      features: output width.
      stride: 1 or 2 (carried by the depthwise conv).
      expand_ratio: hidden width = expand_ratio * features (expansion from the *output* width).
      se_ratio: squeeze-excite reduced width = se_ratio * features.
      drop_path_rate: stochastic-depth rate.
    """

    features: int
    stride: int = 1
    expand_ratio: float = 4.0
    se_ratio: float = 0.25
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C_in] -> <float>[B, H/stride, W/stride, features]."""
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=_BN_EPS)
        shortcut = x
        if self.stride == 2:
            shortcut = avg_pool2(shortcut)
        if x.shape[-1] != self.features:
            shortcut = common.pointwise(self.features, "shortcut")(shortcut)
        mid = int(self.features * self.expand_ratio)
        y = bn(name="pre_norm")(x)
        y = common.conv(mid, 1, name="conv1")(y)
        y = gelu_exact(bn(name="norm1")(y))
        y = common.conv(mid, 3, self.stride, groups=mid, name="conv2")(y)
        y = gelu_exact(bn(name="norm2")(y))
        y = common.SqueezeExcite(int(self.se_ratio * self.features), act="silu", name="se")(y)
        y = common.conv(self.features, 1, use_bias=True, name="conv3")(y)
        return shortcut + common.DropPath(self.drop_path_rate)(y, train=train)


def relative_position_index(height: int, width: int) -> np.ndarray:
    """<int>[H*W, H*W] index into a flattened (2H-1) x (2W-1) table for offset (query - key).

    Entry [i, j] = (y_i - y_j + H - 1) * (2W - 1) + (x_i - x_j + W - 1), positions row-major.
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + height - 1
    dx = xs[:, None] - xs[None, :] + width - 1
    return dy * (2 * width - 1) + dx


def resize_relative_position_bias(table: Any, size: Sequence[int]) -> np.ndarray:
    """Resizes a relative-bias table [2h-1, 2w-1, heads] to [2H-1, 2W-1, heads] for an H x W map.

    Bilinear in the offset, with the largest offsets aligned: new offset d along an axis reads the
    old table at offset d * (h-1) / (H-1) (separable linear interpolation, float32). A table
    that is affine in the offsets therefore stays affine, constants stay constant, and the same
    size returns the table unchanged. For a 1-pixel map the single entry is kept (broadcast).
    """
    table = np.asarray(table, np.float32)
    if table.ndim != 3:
        raise ValueError(f"expected a [2h-1, 2w-1, heads] table, got shape {table.shape}")
    out = table
    for axis, n in enumerate(size):
        if n < 1:
            raise ValueError(f"feature-map size must be positive, got {tuple(size)}")
        src, dst = out.shape[axis], 2 * n - 1
        if src % 2 == 0:
            raise ValueError(f"table axis {axis} has even length {src}; not a 2h-1 table")
        if src == dst:
            continue
        new_pos = (np.linspace(0.0, src - 1.0, dst) if dst > 1
                   else np.array([(src - 1) / 2.0]))
        lo = np.clip(np.floor(new_pos).astype(int), 0, src - 1)
        hi = np.clip(lo + 1, 0, src - 1)
        frac = (new_pos - lo).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = dst
        frac = frac.reshape(shape)
        out = (np.take(out, lo, axis=axis) * (1.0 - frac) + np.take(out, hi, axis=axis) * frac)
    return out.astype(np.float32)


class RelativeAttention(nn.Module):
    """Multi-head self-attention over all H*W positions with a pre-softmax relative bias.

    logits[h, i, j] = q_ih . k_jh / sqrt(head_dim) + table[y_i - y_j, x_i - x_j, h].

    Attributes:
      features: output width (also the attention width: `features / head_dim` heads).
      head_dim: per-head width (32 in the paper).
    """

    features: int
    head_dim: int = HEAD_DIM

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: <float>[B, H, W, C] -> <float>[B, H, W, features]."""
        b, h, w, _ = x.shape
        if self.features % self.head_dim:
            raise ValueError(f"attention width {self.features} is not a multiple of head_dim "
                             f"{self.head_dim}; pick widths divisible by {self.head_dim}.")
        heads = self.features // self.head_dim
        qkv = common.pointwise(3 * self.features, "qkv")(x)
        # Shape: [B, N, heads, 3, head_dim] -- timm's "head first" channel order.
        qkv = qkv.reshape(b, h * w, heads, 3, self.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        table = self.param("relative_position_bias", nn.initializers.truncated_normal(0.02),
                           (2 * h - 1, 2 * w - 1, heads))
        index = relative_position_index(h, w)
        bias = table.reshape(-1, heads)[index]  # Shape: [N, N, heads]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * self.head_dim**-0.5, k)
        logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, h, w, self.features)
        return common.pointwise(self.features, "proj")(y)


class TransformerBlock(nn.Module):
    """Pre-LN relative-attention block; `stride` 2 pools both the shortcut and the attention input.

    Attributes:
      features: output width.
      stride: 1 or 2.
      mlp_ratio: MLP hidden width / features.
      drop_path_rate: stochastic-depth rate.
    """

    features: int
    stride: int = 1
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, H, W, C_in] -> <float>[B, H/stride, W/stride, features]."""
        shortcut = x
        y = nn.LayerNorm(epsilon=_LN_EPS, name="norm1")(x)
        if self.stride == 2:
            shortcut, y = avg_pool2(shortcut), avg_pool2(y)
        if x.shape[-1] != self.features:
            shortcut = common.pointwise(self.features, "shortcut")(shortcut)
        y = RelativeAttention(self.features, name="attn")(y)
        x = shortcut + common.DropPath(self.drop_path_rate)(y, train=train)
        y = nn.LayerNorm(epsilon=_LN_EPS, name="norm2")(x)
        y = common.pointwise(int(self.features * self.mlp_ratio), "mlp_fc1")(y)
        y = common.pointwise(self.features, "mlp_fc2")(gelu_exact(y))
        return x + common.DropPath(self.drop_path_rate)(y, train=train)


class CoAtNet(nn.Module):
    """CoAtNet classifier (see the module docstring).

    Attributes:
      num_classes: classifier width (0: no classifier; logits are the pre-logits).
      stem_width: width of S0.
      widths: widths of S1..S4.
      depths: blocks per stage S1..S4.
      head_hidden: width of the tanh hidden layer of the head (0 or None: no hidden layer).
      stochastic_depth: drop rate of the last block; linear in the block index from 0.
      dropout: dropout before the classifier.
      block_types: 'C' (MBConv) or 'T' (Transformer) per stage.
    """

    num_classes: int
    stem_width: int
    widths: Sequence[int]
    depths: Sequence[int]
    head_hidden: int | None = None
    stochastic_depth: float = 0.0
    dropout: float = 0.0
    block_types: Sequence[str] = BLOCK_TYPES

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """images: <float32>[B, H, W, C] (any size; timm needs multiples of 32).

        Returns (logits <float32>[B, num_classes], out) with out['stem'] at stride 2,
        out['stage1'..'stage4'] at strides 4, 8, 16, 32 (sides rounded up), and
        out['pre_logits'].
        """
        if not (len(self.widths) == len(self.depths) == len(self.block_types)):
            raise ValueError(f"widths {self.widths}, depths {self.depths} and block_types "
                             f"{self.block_types} must have the same length.")
        out: dict[str, Array] = {}
        x = common.conv(self.stem_width, 3, 2, name="stem_conv1")(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=_BN_EPS,
                         name="stem_norm1")(x)
        x = common.conv(self.stem_width, 3, name="stem_conv2")(gelu_exact(x))
        out["stem"] = x
        total, index = sum(self.depths), 0
        for s, (width, depth, kind) in enumerate(
                zip(self.widths, self.depths, self.block_types), start=1):
            block_cls = {"C": MBConvBlock, "T": TransformerBlock}.get(kind)
            if block_cls is None:
                raise ValueError(f"block type {kind!r} of stage {s} is not 'C' or 'T'.")
            for i in range(depth):
                rate = self.stochastic_depth * index / max(total - 1, 1)
                x = block_cls(width, stride=2 if i == 0 else 1, drop_path_rate=rate,
                              name=f"stage{s}_block{i}")(x, train=train)
                index += 1
            out[f"stage{s}"] = x
        x = jnp.mean(x, axis=(1, 2))
        x = nn.LayerNorm(epsilon=_LN_EPS, name="head_norm")(x)
        if self.head_hidden:
            x = jnp.tanh(Dense(self.head_hidden, name="head_hidden")(x))
        x = out["pre_logits"] = nn.Dropout(self.dropout, deterministic=not train)(x)
        if self.num_classes:
            x = Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
        out["logits"] = x
        return x, out


def create(variant: str, num_classes: int, **overrides: Any) -> CoAtNet:
    """The named CoAtNet ('0'..'3', 'tiny'); `overrides` replace fields of the variant."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown CoAtNet variant {variant!r}; known: {sorted(VARIANTS)}.")
    return CoAtNet(num_classes=num_classes, **{**VARIANTS[variant], **overrides})


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables {'params', 'batch_stats'} from a timm `coatnet_{0..5}_224` state dict.

    Convolutions go from torch's [O, I/groups, kh, kw] to [kh, kw, I/groups, O], linear layers
    from [out, in] to [in, out], and the (2H-1)(2W-1) x heads bias table to its 3-d shape.
    """
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
          for k, v in state_dict.items()}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree: dict, path: str, value: np.ndarray) -> None:
        *parents, leaf = path.split("/")
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[leaf] = jnp.asarray(value, jnp.float32)

    def conv_w(key: str) -> np.ndarray:
        return sd[key].transpose(2, 3, 1, 0)

    def bn(src: str, dst: str) -> None:
        put(params, f"{dst}/scale", sd[f"{src}.weight"])
        put(params, f"{dst}/bias", sd[f"{src}.bias"])
        put(stats, f"{dst}/mean", sd[f"{src}.running_mean"])
        put(stats, f"{dst}/var", sd[f"{src}.running_var"])

    def ln(src: str, dst: str) -> None:
        put(params, f"{dst}/scale", sd[f"{src}.weight"])
        put(params, f"{dst}/bias", sd[f"{src}.bias"])

    def conv_b(src: str, dst: str) -> None:
        put(params, f"{dst}/kernel", conv_w(f"{src}.weight"))
        if f"{src}.bias" in sd:
            put(params, f"{dst}/bias", sd[f"{src}.bias"])

    conv_b("stem.conv1", "stem_conv1")
    bn("stem.norm1", "stem_norm1")
    conv_b("stem.conv2", "stem_conv2")
    blocks = sorted({tuple(int(t) for t in k.split(".")[1:4:2])
                     for k in sd if k.startswith("stages.")})
    for s, i in blocks:
        src, dst = f"stages.{s}.blocks.{i}", f"stage{s + 1}_block{i}"
        if f"{src}.shortcut.expand.weight" in sd:
            conv_b(f"{src}.shortcut.expand", f"{dst}/shortcut")
        if f"{src}.pre_norm.weight" in sd:  # MBConv
            bn(f"{src}.pre_norm", f"{dst}/pre_norm")
            for name in ("conv1_1x1", "conv2_kxk", "conv3_1x1"):
                conv_b(f"{src}.{name}", f"{dst}/{name[:5]}")
            bn(f"{src}.norm1", f"{dst}/norm1")
            bn(f"{src}.norm2", f"{dst}/norm2")
            for fc, name in (("fc1", "reduce"), ("fc2", "expand")):
                put(params, f"{dst}/se/{name}/kernel", sd[f"{src}.se.{fc}.weight"][:, :, 0, 0].T)
                put(params, f"{dst}/se/{name}/bias", sd[f"{src}.se.{fc}.bias"])
        else:  # Transformer
            norm1 = f"{src}.norm1.norm" if f"{src}.norm1.norm.weight" in sd else f"{src}.norm1"
            ln(norm1, f"{dst}/norm1")
            ln(f"{src}.norm2", f"{dst}/norm2")
            conv_b(f"{src}.attn.qkv", f"{dst}/attn/qkv")
            conv_b(f"{src}.attn.proj", f"{dst}/attn/proj")
            conv_b(f"{src}.mlp.fc1", f"{dst}/mlp_fc1")
            conv_b(f"{src}.mlp.fc2", f"{dst}/mlp_fc2")
            table = sd[f"{src}.attn.rel_pos.relative_position_bias_table"]
            side = int(round(np.sqrt(table.shape[0])))  # square feature maps only
            if side * side != table.shape[0]:
                raise ValueError(f"{src}: bias table of {table.shape[0]} rows is not square; "
                                 "only square feature maps are supported by this converter.")
            put(params, f"{dst}/attn/relative_position_bias", table.reshape(side, side, -1))
    ln("head.norm", "head_norm")
    if "head.pre_logits.fc.weight" in sd:
        put(params, "head_hidden/kernel", sd["head.pre_logits.fc.weight"].T)
        put(params, "head_hidden/bias", sd["head.pre_logits.fc.bias"])
    if "head.fc.weight" in sd:
        put(params, "head/kernel", sd["head.fc.weight"].T)
        put(params, "head/bias", sd["head.fc.bias"])
    return {"params": params, "batch_stats": stats}
