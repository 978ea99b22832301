"""On-device image augmentation in JAX: resize, pad-and-crop, flip, RandAugment and mixup.

Augmentation runs inside the model wrapper's jitted `loss_fn`, per example, from the step's
rng: it is deterministic (a resumed run sees the same augmented images), sharded with the
batch over the devices, and costs no host-side pipeline. Images are float32 in [0, 1] with
shape [..., H, W, C]; a clip [T, H, W, C] gets one transformation for all its frames.

RandAugment (Cubuk et al. 2020) follows TensorFlow's `autoaugment.py` op set and magnitude scale
(magnitude in [0, 10] is the fraction of each op's maximum; EfficientNetV2 uses up to 15).
Where TensorFlow's level maps make an op *weaker* with higher magnitude (posterize, solarize)
or never negative (color, contrast, brightness, sharpness), the "increasing" variants that timm
uses are taken instead, so that a larger magnitude is always stronger regularisation:

  rotate     ±30°·m/10       shear_x/y    ±0.3·m/10          translate_x/y ±0.45·size·m/10
  color, contrast, brightness, sharpness: blend factor 1 ± 0.9·m/10
  posterize  keep 8 − ⌊4·m/10⌋ bits      solarize  invert pixels above 1 − m/10
  autocontrast, equalize, invert, identity: no magnitude
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- basics
def to_float(images: Array) -> Array:
    """uint8 [0, 255] (or float already in [0, 1]) -> float32 [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def resize(images: Array, size: int | Sequence[int]) -> Array:
    """Bilinear (antialiased when shrinking) resize of the H, W axes (-3, -2) to `size`."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if images.shape[-3:-1] == (h, w):
        return images
    shape = images.shape[:-3] + (h, w, images.shape[-1])
    return jax.image.resize(images, shape, "bilinear", antialias=True)


def flip_left_right(image: Array) -> Array:
    return image[..., ::-1, :]


def random_flip(rng: Array, image: Array) -> Array:
    """Horizontal flip with probability 1/2."""
    return jnp.where(jax.random.bernoulli(rng), flip_left_right(image), image)


def random_crop(rng: Array, image: Array, padding: int, fill: float = 0.0) -> Array:
    """Pads H and W by `padding` on each side with `fill` and crops the original size back at a
    uniformly random offset (the CIFAR recipe)."""
    if padding <= 0:
        return image
    h, w = image.shape[-3:-1]
    pad = [(0, 0)] * (image.ndim - 3) + [(padding, padding), (padding, padding), (0, 0)]
    padded = jnp.pad(image, pad, constant_values=fill)
    dy, dx = jax.random.randint(rng, (2,), 0, 2 * padding + 1)
    start = (0,) * (image.ndim - 3) + (dy, dx, 0)
    return jax.lax.dynamic_slice(padded, start, image.shape[:-3] + (h, w, image.shape[-1]))


def mixup(rng: Array, images: Array, targets: Array, alpha: float) -> tuple[Array, Array, Array]:
    """Mixup (Zhang et al. 2018) as big_vision does it: one ratio r ~ Beta(alpha, alpha) per
    batch, kept >= 1/2, each example mixed with its neighbour (the batch rolled by one).

    Returns (mixed images, mixed target distributions, r)."""
    r = jax.random.beta(rng, alpha, alpha)
    r = jnp.maximum(r, 1.0 - r)
    mix = lambda x: r * x + (1.0 - r) * jnp.roll(x, 1, axis=0)  # noqa: E731
    return mix(images), mix(targets), r


# ------------------------------------------------------------------------ RandAugment ops
def _blend(degenerate: Array, image: Array, factor: Array) -> Array:
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _grayscale(image: Array) -> Array:
    if image.shape[-1] == 1:
        return image
    g = image[..., 0] * 0.2989 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return jnp.broadcast_to(g[..., None], image.shape)


def affine(image: Array, matrix: Array, offset: Array, fill: float) -> Array:
    """Output pixel p (row, col; centred) samples the input at `matrix @ p + offset` (bilinear,
    `fill` outside) for an [H, W, C] image."""
    h, w = image.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                          jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
    src_y = matrix[0, 0] * yy + matrix[0, 1] * xx + offset[0] + cy
    src_x = matrix[1, 0] * yy + matrix[1, 1] * xx + offset[1] + cx
    sample = lambda ch: jax.scipy.ndimage.map_coordinates(  # noqa: E731
        ch, [src_y, src_x], order=1, mode="constant", cval=fill)
    return jnp.stack([sample(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def rotate(image, level, sign, fill):
    a = jnp.deg2rad(30.0 * level * sign)
    m = jnp.array([[jnp.cos(a), -jnp.sin(a)], [jnp.sin(a), jnp.cos(a)]])
    return affine(image, m, jnp.zeros(2), fill)


def shear_x(image, level, sign, fill):
    m = jnp.array([[1.0, 0.0], [0.3 * level * sign, 1.0]])
    return affine(image, m, jnp.zeros(2), fill)


def shear_y(image, level, sign, fill):
    m = jnp.array([[1.0, 0.3 * level * sign], [0.0, 1.0]])
    return affine(image, m, jnp.zeros(2), fill)


def translate_x(image, level, sign, fill):
    dx = 0.45 * image.shape[1] * level * sign
    return affine(image, jnp.eye(2), jnp.stack([0.0, -dx]), fill)


def translate_y(image, level, sign, fill):
    dy = 0.45 * image.shape[0] * level * sign
    return affine(image, jnp.eye(2), jnp.stack([-dy, 0.0]), fill)


def identity(image, level, sign, fill):
    return image


def invert(image, level, sign, fill):
    return 1.0 - image


def autocontrast(image, level, sign, fill):
    lo = jnp.min(image, axis=(0, 1), keepdims=True)
    hi = jnp.max(image, axis=(0, 1), keepdims=True)
    scaled = (image - lo) / jnp.where(hi > lo, hi - lo, 1.0)
    return jnp.where(hi > lo, scaled, image)


def equalize(image, level, sign, fill):
    """Histogram equalisation per channel on 256 levels (TensorFlow's algorithm)."""
    def one(ch):
        q = jnp.clip(jnp.round(ch * 255.0), 0, 255).astype(jnp.int32)
        hist = jnp.bincount(q.ravel(), length=256)
        last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), -1))]
        step = (jnp.sum(hist) - last) // 255
        lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
        lut = jnp.clip(jnp.concatenate([jnp.zeros((1,), lut.dtype), lut[:-1]]), 0, 255)
        return jnp.where(step == 0, ch, lut[q].astype(jnp.float32) / 255.0)
    return jnp.stack([one(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def posterize(image, level, sign, fill):
    shift = jnp.floor(4.0 * jnp.minimum(level, 1.0)).astype(jnp.int32)  # bits dropped
    q = jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)
    q = jnp.left_shift(jnp.right_shift(q, shift), shift)
    return q.astype(jnp.float32) / 255.0


def solarize(image, level, sign, fill):
    threshold = 1.0 - jnp.minimum(level, 1.0)
    return jnp.where(image >= threshold, 1.0 - image, image)


def color(image, level, sign, fill):
    return _blend(_grayscale(image), image, 1.0 + 0.9 * level * sign)


def contrast(image, level, sign, fill):
    mean = jnp.mean(_grayscale(image))
    return _blend(jnp.full_like(image, mean), image, 1.0 + 0.9 * level * sign)


def brightness(image, level, sign, fill):
    return _blend(jnp.zeros_like(image), image, 1.0 + 0.9 * level * sign)


def sharpness(image, level, sign, fill):
    """Blend with the image smoothed by PIL's 3x3 SMOOTH kernel (borders kept)."""
    k = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = jnp.stack([jax.scipy.signal.convolve2d(image[..., c], k, mode="same")
                        for c in range(image.shape[-1])], axis=-1)
    h, w = image.shape[:2]
    inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return _blend(jnp.where(inner, smooth, image), image, 1.0 + 0.9 * level * sign)


#: RandAugment's op set, by name (TensorFlow's list minus cutout and solarize_add).
RANDAUGMENT_OPS: dict[str, Callable] = {
    "identity": identity, "autocontrast": autocontrast, "equalize": equalize,
    "invert": invert, "rotate": rotate, "posterize": posterize, "solarize": solarize,
    "color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y,
}


def randaugment(rng: Array, image: Array, num_layers: int = 2, magnitude: float = 10.0,
                prob: float = 0.5, ops: Sequence[str] = tuple(RANDAUGMENT_OPS),
                fill: float = 0.5) -> Array:
    """`num_layers` ops drawn uniformly from `ops`, each applied with probability `prob` at
    strength `magnitude` / 10 (with a random sign where the op has one), to one [H, W, C]
    image."""
    unknown = [o for o in ops if o not in RANDAUGMENT_OPS]
    if unknown:
        raise ValueError(f"Unknown RandAugment ops {unknown}; known: {sorted(RANDAUGMENT_OPS)}.")
    level = magnitude / 10.0
    branches = [functools.partial(RANDAUGMENT_OPS[o], level=level, fill=fill) for o in ops]
    for layer_rng in jax.random.split(rng, num_layers):
        k_op, k_apply, k_sign = jax.random.split(layer_rng, 3)
        idx = jax.random.randint(k_op, (), 0, len(branches))
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        new = jax.lax.switch(idx, [lambda x, b=b: b(x, sign=sign) for b in branches], image)
        image = jnp.where(jax.random.bernoulli(k_apply, prob), new, image)
    return image


# ------------------------------------------------------------------------------ pipeline
@gin.configurable
@dataclasses.dataclass(frozen=True)
class Augment:
    """Train-time augmentation of a batch, applied per example: pad-and-crop, horizontal flip,
    then RandAugment (each piece off by default).

    Attributes:
      crop_padding: pad H, W by this many pixels and randomly crop back (0: off).
      flip: random horizontal flips.
      randaugment_layers: number of RandAugment ops per image (0: off).
      randaugment_magnitude: RandAugment strength (10 = each op's maximum; may exceed 10).
      randaugment_prob: probability of applying each drawn op.
      randaugment_ops: op names (default all of `RANDAUGMENT_OPS`).
      fill: value of pixels brought in by padding and geometric ops (images in [0, 1]).
    """

    crop_padding: int = 0
    flip: bool = False
    randaugment_layers: int = 0
    randaugment_magnitude: float = 10.0
    randaugment_prob: float = 0.5
    randaugment_ops: tuple[str, ...] = tuple(RANDAUGMENT_OPS)
    fill: float = 0.0

    def replace(self, **changes) -> "Augment":
        return dataclasses.replace(self, **changes)

    def _one(self, rng: Array, image: Array) -> Array:
        k_crop, k_flip, k_ra = jax.random.split(rng, 3)
        image = random_crop(k_crop, image, self.crop_padding, self.fill)
        if self.flip:
            image = random_flip(k_flip, image)
        if self.randaugment_layers:
            ra = functools.partial(
                randaugment, num_layers=self.randaugment_layers,
                magnitude=self.randaugment_magnitude, prob=self.randaugment_prob,
                ops=self.randaugment_ops, fill=self.fill)
            if image.ndim == 4:  # A clip: the same ops on every frame.
                image = jax.vmap(ra, in_axes=(None, 0))(k_ra, image)
            else:
                image = ra(k_ra, image)
        return image

    def __call__(self, rng: Array, images: Array) -> Array:
        """images float32 [B, (T,) H, W, C] in [0, 1] -> augmented, same shape."""
        if not (self.crop_padding or self.flip or self.randaugment_layers):
            return images
        return jax.vmap(self._one)(jax.random.split(rng, images.shape[0]), images)
