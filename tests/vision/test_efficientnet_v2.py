"""EfficientNetV2: parameter counts equal timm's, eval logits equal timm's after conversion,
automl's progressive-learning schedule, SE width on the block input, stochastic depth."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moetx.vision.models import efficientnet_v2 as ev
from tests.vision import conftest as timm_utils


@pytest.mark.parametrize("variant", ["s", "m", "l", "b0", "b1", "b2", "b3"])
def test_param_count_equals_timm(variant):
    """Trainable params ('params' only, no BN statistics) == timm `tf_efficientnetv2_<v>`."""
    ours = ev.num_params(ev.create(variant, 1000))
    assert ours == timm_utils.timm_param_count(f"tf_efficientnetv2_{variant}")
    expected = {"s": 21_458_488, "b0": 7_139_704}  # the published counts
    if variant in expected:
        assert ours == expected[variant]


def test_logits_match_timm_v2s():
    """timm tf_efficientnetv2_s, random BN affine params, BN statistics of the evaluated batch
    (see tests/vision/conftest.py), eval mode, 96×96, batch 2: same logits after from_timm."""
    x = np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32)
    tm = timm_utils.randomized_timm_model("tf_efficientnetv2_s", calibration_images=x,
                                          num_classes=10)
    ref = timm_utils.timm_logits(tm, x)
    model = ev.create("s", 10)
    variables = ev.from_timm(tm.state_dict(), model, image_size=96)
    logits, out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    timm_utils.assert_logits_match(logits, ref)
    assert out["stage6"].shape == (2, 3, 3, 256) and out["pre_logits"].shape == (2, 1280)


def test_from_timm_is_strict():
    tm = timm_utils.randomized_timm_model("tf_efficientnetv2_b0", num_classes=10)
    sd = dict(tm.state_dict())
    extra = dict(sd, **{"blocks.9.0.conv_pw.weight": sd["classifier.bias"]})
    with pytest.raises(ValueError, match=r"blocks\.9\.0\.conv_pw\.weight"):
        ev.from_timm(sd | extra, ev.create("b0", 10))
    with pytest.raises(ValueError, match="converted shape"):  # B1 is deeper, B2 wider: not B0
        ev.from_timm(sd, ev.create("b2", 10))


def test_progressive_schedule_v2s():
    """automl main.py with the repo's S config (train 300, RandAug 10, mixup 0, dropout 0.2)."""
    stages = ev.progressive_schedule("s", total_steps=1001)
    assert [s.image_size for s in stages] == [171, 214, 257, 300]
    np.testing.assert_allclose([s.randaug_magnitude for s in stages], [5, 20 / 3, 25 / 3, 10])
    np.testing.assert_allclose([s.dropout for s in stages], [0, 0.2 / 3, 0.4 / 3, 0.2])
    assert [s.mixup_alpha for s in stages] == [0, 0, 0, 0]
    assert [s.steps for s in stages] == [250, 250, 250, 251]  # int(ratio·total) boundaries
    l_stages = ev.progressive_schedule("l", total_steps=8)
    assert [s.image_size for s in l_stages] == [192, 256, 320, 384]
    np.testing.assert_allclose([s.mixup_alpha for s in l_stages], [0, 0.5 / 3, 1 / 3, 0.5])
    assert ev.progressive_schedule("b0", 4)[0].randaug_magnitude is None  # AutoAugment variant
    with pytest.raises(ValueError, match="ibase"):
        ev.progressive_schedule("tiny", 100)  # final size 28 < ibase 128


def test_se_width_is_quarter_of_block_input():
    """MBConv SE squeezes to 0.25 × the block *input* width, not the expanded width."""
    shapes = jax.eval_shape(ev.create("s", 10).init, jax.random.PRNGKey(0),
                            np.zeros((1, 64, 64, 3), np.float32))["params"]
    assert shapes["stage4_block0"]["se"]["reduce"]["kernel"].shape == (256, 16)  # 64·4 -> 64/4
    assert shapes["stage4_block1"]["se"]["reduce"]["kernel"].shape == (512, 32)  # 128·4 -> 128/4
    assert shapes["stage5_block1"]["se"]["reduce"]["kernel"].shape == (960, 40)  # 160·6 -> 160/4
    assert "se" not in shapes["stage2_block1"]  # Fused-MBConv stages have no SE


def test_stochastic_depth_only_in_training():
    """Drop rates 0.9·i/N (i = block index): in training two rngs give different outputs, in
    eval the rng is irrelevant and the output equals the net without stochastic depth."""
    model = ev.create("tiny", 10, drop_path_rate=0.9, dropout_rate=0.0)
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    v = timm_utils.numpy_variables(model, x)
    train = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key},
                                               mutable=["batch_stats"])[0][0])
    evaluate = jax.jit(lambda v, key: model.apply(v, x, rngs={"dropout": key})[0])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(evaluate(v, k1), evaluate(v, k2))
    plain = ev.create("tiny", 10, drop_path_rate=0.0, dropout_rate=0.0)
    np.testing.assert_allclose(evaluate(v, k1), jax.jit(plain.apply)(v, x)[0], atol=1e-6)
    assert np.abs(train(v, k1) - train(v, k2)).max() > 1e-3


def test_unknown_variant_lists_known():
    with pytest.raises(ValueError, match="known: .*'b0'.*'s'"):
        ev.create("xl", 10)
    with pytest.raises(ValueError, match="known"):
        ev.progressive_schedule("xs", 100)
