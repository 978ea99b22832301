"""Vision model registry (big_vision style): one module per family, chosen by name.

    model = moetx.vision.models.create("resnet_rs/50", num_classes=1000)
    logits, out = model.apply(variables, images, train=False)

Each family module `moetx/vision/models/<family>.py` defines `VARIANTS` (name -> config) and
`create(variant, num_classes, **overrides) -> nn.Module`; the module's
`__call__(images, *, train=False)` returns `(logits, out)` with `out` a dict of named
intermediates ('stem', 'stage1', ..., 'pre_logits'). Images are float32 [B, H, W, C]
(video: [B, T, H, W, C]). Batch norm statistics live in the 'batch_stats' collection; dropout
and stochastic depth use the 'dropout' rng.
"""

from __future__ import annotations

import importlib
import pkgutil

import flax.linen as nn

#: Modules of this package that are not model families (shared layers, convolution fast paths).
_NOT_FAMILIES = frozenset({"common", "conv_ops"})


def families() -> list[str]:
    """Names of the model families available in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_FAMILIES and not m.name.startswith("_"))


def get_family(family: str):
    """The family's module (`moetx.vision.models.<family>`), with a clear error if unknown."""
    if family not in families():
        raise ValueError(f"Unknown vision model family {family!r}; known families: "
                         f"{', '.join(families())}.")
    return importlib.import_module(f"{__name__}.{family}")


def variants(family: str) -> list[str]:
    return list(get_family(family).VARIANTS)


def create(name: str, num_classes: int, **overrides) -> nn.Module:
    """Builds model `name` = "family/variant" (e.g. "resnet_rs/50", "efficientnet_v2/s") with a
    `num_classes`-way head; `overrides` replace fields of the variant's config."""
    family, sep, variant = name.partition("/")
    if not sep or not family or not variant:
        raise ValueError(f"Vision model names are 'family/variant' (e.g. 'resnet_rs/50'), got "
                         f"{name!r}; families: {', '.join(families())}.")
    return get_family(family).create(variant, num_classes, **overrides)
