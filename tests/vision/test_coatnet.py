"""CoAtNet: parameter counts equal timm's paper-like `coatnet_{0..3}_224`, the five stages have
output strides 2..32, the relative bias is indexed by the offset, and timm's logits are
reproduced after weight conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.vision.models import coatnet, common
from tests.vision import timm_utils


@pytest.mark.parametrize("variant,expected", [
    ("0", 25_036_820), ("1", 42_225_776), ("2", 74_684_744), ("3", 166_966_264),
])
def test_param_count_equals_timm(variant, expected):
    """Trainable params ('params'; BN statistics excluded) at 224x224, 1000 classes."""
    shapes = common.param_shapes(coatnet.create(variant, 1000), (1, 224, 224, 3))
    assert common.count_params(shapes["params"]) == expected
    assert timm_utils.timm_param_count(f"coatnet_{variant}_224") == expected


def test_output_strides():
    """S0..S4 of CoAtNet-0 at 224: /2, /4, /8, /16, /32 with widths 64, 96, 192, 384, 768."""
    model = coatnet.create("0", 1000)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = common.param_shapes(model, x.shape)
    logits, out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    expected = {"stem": (112, 64), "stage1": (56, 96), "stage2": (28, 192),
                "stage3": (14, 384), "stage4": (7, 768)}
    for name, (side, width) in expected.items():
        assert out[name].shape == (2, side, side, width), name
    assert logits.shape == (2, 1000) and out["pre_logits"].shape == (2, 768)
    # Relative tables: (2H-1)(2W-1) rows per head, head dim 32.
    stage3 = variables["params"]["stage3_block1"]["attn"]["relative_position_bias"]
    stage4 = variables["params"]["stage4_block0"]["attn"]["relative_position_bias"]
    assert stage3.shape == (27, 27, 384 // 32) and stage4.shape == (13, 13, 768 // 32)


def test_relative_position_index_is_the_offset():
    """index[i, j] addresses table[y_i - y_j + H - 1, x_i - x_j + W - 1] (flattened)."""
    h, w = 3, 4
    index = coatnet.relative_position_index(h, w)
    for i in range(h * w):
        for j in range(h * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            assert index[i, j] == (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)


def test_logits_match_timm():
    """timm coatnet_0_224 shortened to depths (1, 2, 1, 2) at 64x64 (so every block kind, with
    and without downsampling, is covered), all weights and BN statistics random, eval mode."""
    torch = timm_utils.torch
    tm = timm_utils.randomized_timm_model("coatnet_0_224", depths=(1, 2, 1, 2), img_size=64,
                                          num_classes=10)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("norm.weight"):
                p.normal_(0.0 if "table" in name else 1.0, 0.5)  # not timm's ~0 / 1 init
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ref = timm_utils.timm_logits(tm, x)
    model = coatnet.create("0", 10, depths=(1, 2, 1, 2))
    variables = coatnet.from_timm(tm.state_dict())
    logits, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x))
    timm_utils.assert_logits_match(logits, ref)


def test_odd_sizes_and_bad_variant():
    """28x28 grayscale (Fashion-MNIST) runs: sides 14, 7, 4, 2, 1 (ceil at odd sides, where the
    pooled shortcut and the strided conv agree)."""
    model = coatnet.create("tiny", 10)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    _, out = jax.eval_shape(lambda v, x: model.apply(v, x), common.param_shapes(model, x.shape), x)
    assert [out[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == [
        14, 7, 4, 2, 1]
    with pytest.raises(ValueError, match="known"):
        coatnet.create("7", 10)
