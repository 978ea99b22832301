"""Tiny convolutional classifiers for tests and smoke runs (2D images and 3D clips).

Not a paper model: a plain conv-BN-ReLU stack that trains in seconds on 2 CPU cores, so the
trainer's vision path (batch norm state, EMA, augmentation, mixup) is tested on its own.
Variants:

  's'       conv16 -> conv32/2 -> conv64/2, global average pool    (24,058 params, 10 classes)
  'm'       conv32 -> conv64/2 -> conv128/2 -> conv128/2            (241,898 params)
  'video_s' 3x3x3 convs over [B, T, H, W, C] clips, widths of 's'  (70,426 params)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.nn.layers import Dense

VARIANTS: dict[str, dict[str, Any]] = {
    "s": dict(widths=(16, 32, 64), video=False),
    "m": dict(widths=(32, 64, 128, 128), video=False),
    "video_s": dict(widths=(16, 32, 64), video=True),
}


class TinyCNN(nn.Module):
    """conv-BN-ReLU stages (stride 2 from the second), global average pool, dropout, head.

    __call__(images, *, train=False) -> (logits, out) with out 'stem', 'stage1'.., 'pre_logits'.
    """

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)
    video: bool = False
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False):
        want = 5 if self.video else 4
        if images.ndim != want:
            raise ValueError(f"TinyCNN(video={self.video}) expects images of rank {want}, got "
                             f"shape {images.shape}.")
        k = (3, 3, 3) if self.video else (3, 3)
        out = {}
        x = images
        for i, w in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            strides = ((1, stride, stride) if self.video else (stride, stride))
            x = nn.Conv(w, k, strides, use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                             name=f"bn{i}")(x)
            x = nn.relu(x)
            out["stem" if i == 0 else f"stage{i}"] = x
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        out["pre_logits"] = x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = Dense(self.num_classes, name="head")(x)
        return logits, out


def create(variant: str, num_classes: int, **overrides: Any) -> TinyCNN:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown tiny variant {variant!r}; known: {sorted(VARIANTS)}.")
    return TinyCNN(num_classes=num_classes, **{**VARIANTS[variant], **overrides})
