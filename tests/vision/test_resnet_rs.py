"""ResNet-RS / 3D ResNet-RS: parameter counts equal timm's, eval logits equal timm's after weight
conversion, the 3D net is an exact inflation of the 2D one, and the spatial-mixer hook."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.vision.models import common, resnet_rs
from tests.vision import conftest as timm_utils


@pytest.mark.parametrize("variant", ["50", "101", "152", "200", "270", "350", "420"])
def test_param_count_equals_timm(variant):
    """Trainable params ('params' collection, no BN statistics) == timm `resnetrs<variant>`."""
    ours = resnet_rs.num_params(resnet_rs.create(variant, 1000))
    assert ours == timm_utils.timm_param_count(f"resnetrs{variant}")
    if variant == "50":
        assert ours == 35_691_912  # the published count


def test_logits_match_timm_rs50():
    """timm resnetrs50 (random weights and BN statistics, eval) converted with from_timm gives
    the same logits at 64×64, batch 2."""
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    tm = timm_utils.randomized_timm_model("resnetrs50", num_classes=10)
    ref = timm_utils.timm_logits(tm, x)
    model = resnet_rs.create("50", 10)
    variables = resnet_rs.from_timm(tm.state_dict(), model)
    logits, out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    timm_utils.assert_logits_match(logits, ref)
    assert out["stage4"].shape == (2, 2, 2, 2048) and out["pre_logits"].shape == (2, 2048)


def test_from_timm_is_strict():
    tm = timm_utils.randomized_timm_model("resnetrs50", num_classes=10)
    sd = dict(tm.state_dict())
    model = resnet_rs.create("50", 10)
    extra = dict(sd, **{"layer1.0.extra.weight": sd["fc.bias"]})
    with pytest.raises(ValueError, match="layer1.0.extra.weight"):
        resnet_rs.from_timm(extra, model)
    missing = {k: v for k, v in sd.items() if k != "layer2.0.se.fc1.bias"}
    with pytest.raises(KeyError, match="layer2.0.se.fc1.bias"):
        resnet_rs.from_timm(missing, model)
    with pytest.raises(ValueError, match="converted shape"):
        resnet_rs.from_timm(sd, resnet_rs.create("50", 11))


@pytest.mark.parametrize("kernels,stem_kernel", [((1, 1, 1, 1), 1), ((1, 1, 3, 3), 5)])
def test_3d_single_frame_equals_2d(kernels, stem_kernel):
    """A one-frame clip through the 3D net (2D weights on the central temporal tap) gives the 2D
    net's logits and feature maps: with all temporal kernels 1 (the inflation check of the 3D ResNet papers) and
    with the real (1, 1, 3, 3) / stem-5 kernels, where the other taps only see zero padding."""
    m2 = resnet_rs.create("tiny", 10, self_gating=True)
    m3 = resnet_rs.create("3d-tiny", 10, temporal_kernel_sizes=kernels,
                          stem_temporal_kernel=stem_kernel)
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    v2 = timm_utils.numpy_variables(m2, x)
    v3 = resnet_rs.inflate_variables(v2, m3, (2, 1, 16, 16, 3))
    l2, o2 = jax.jit(m2.apply)(v2, x)  # one compile beats op-by-op dispatch of 3D convs
    l3, o3 = jax.jit(m3.apply)(v3, x[:, None])
    np.testing.assert_allclose(np.asarray(l3), np.asarray(l2), atol=1e-5)
    for name in ("stem", "stage2", "stage4"):
        np.testing.assert_allclose(np.asarray(o3[name][:, 0]), np.asarray(o2[name]), atol=1e-5)
    assert float(jnp.abs(l2[0] - l2[1]).max()) > 1e-2


@pytest.mark.parametrize("variant", ["3d-50", "3d-tiny"])
def test_3d_param_count_derivation(variant):
    """3D count = 2D count + temporal taps of the stem and of each block's first conv + the
    self-gating dense layers (derivation written out for 3D RS-50 below)."""
    m3 = resnet_rs.create(variant, 1000)
    m2 = resnet_rs.create(variant[3:], 1000)
    count3 = resnet_rs.num_params(m3, image_size=32, frames=2)
    assert count3 == resnet_rs.video_param_count(resnet_rs.num_params(m2, image_size=32), m3)
    if variant == "3d-50":
        stem = 4 * 9 * 3 * 32  # 4 extra taps of the (5, 3, 3) stem conv, 3 -> 32: 3,456
        stage3 = 2 * 512 * 256 + 5 * 2 * 1024 * 256  # k_t 3: 2 extra taps, 6 blocks: 2,883,584
        stage4 = 2 * 1024 * 512 + 2 * 2 * 2048 * 512  # 3 blocks: 5,242,880
        gating = sum(c * c + c for c in (256, 512, 1024, 2048))  # last block per stage: 5,574,400
        assert count3 == 35_691_912 + stem + stage3 + stage4 + gating == 49_396_232


def test_3d_shapes():
    m3 = resnet_rs.create("3d-tiny", 5)
    x = jax.ShapeDtypeStruct((2, 8, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(m3.init, jax.random.PRNGKey(0), x)
    logits, out = jax.eval_shape(m3.apply, v, x)
    assert logits.shape == (2, 5)
    assert out["stem"].shape == (2, 4, 8, 8, 32)  # temporal stride 2 in the stem only
    assert out["stage4"].shape == (2, 4, 1, 1, 512)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
        m3.apply(v, jnp.ones((2, 32, 32, 3)))


def test_stochastic_depth_and_dropout_only_in_training():
    model = resnet_rs.create("tiny", 10, drop_path_rate=0.5, dropout_rate=0.5)
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    v = timm_utils.numpy_variables(model, x)  # random (non-zero) last-BN scales
    assert set(v) == {"params", "batch_stats"}

    @jax.jit
    def train_logits_(v, key):
        (logits, out), new = model.apply(v, x, train=True, rngs={"dropout": key},
                                         mutable=["batch_stats"])
        # The tiny variant on Fashion-MNIST-shaped input: 7×7 after the stem, 1×1 at the end;
        # training mutates only 'batch_stats'.
        assert out["stem"].shape == (4, 7, 7, 32) and out["stage4"].shape == (4, 1, 1, 512)
        assert set(new) == {"batch_stats"} and logits.shape == (4, 10)
        return logits

    @jax.jit
    def eval_logits_(v, key):
        return model.apply(v, x, rngs={"dropout": key})[0]

    def train_logits(v, seed):
        return np.asarray(train_logits_(v, jax.random.key(seed)))

    def eval_logits(v, seed):
        return np.asarray(eval_logits_(v, jax.random.key(seed)))

    np.testing.assert_array_equal(eval_logits(v, 1), eval_logits(v, 2))
    assert np.abs(train_logits(v, 1) - train_logits(v, 2)).max() > 1e-3
    nodrop = resnet_rs.create("tiny", 10)
    np.testing.assert_allclose(eval_logits(v, 1), jax.jit(nodrop.apply)(v, x)[0], atol=1e-6)


def test_drop_path_rescales_kept_examples():
    y = common.DropPath(0.25).apply({}, jnp.ones((4000, 3)), train=True,
                                    rngs={"dropout": jax.random.PRNGKey(0)})
    kept = np.asarray(y[:, 0]) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75)
    assert abs(kept.mean() - 0.75) < 0.03


def test_spatial_mixer_hook_calling_convention():
    """A mixer factory returning the default conv-BN-ReLU reproduces the default network when its
    weights are moved from 'conv2' to 'mixer': pins (features, strides) -> module(x, train=)."""
    calls = []

    def factory(features, strides):
        calls.append((features, strides))
        return common.ConvBNAct(features, 3, strides)

    plain = resnet_rs.create("tiny", 10)
    hooked = resnet_rs.create("tiny", 10, spatial_mixer=factory)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    v = timm_utils.numpy_variables(plain, x)
    moved = jax.tree_util.tree_map(lambda a: a, v)
    for col in moved:
        for block in moved[col]:
            if "conv2" in moved[col][block]:
                moved[col][block]["mixer"] = moved[col][block].pop("conv2")
    np.testing.assert_allclose(np.asarray(jax.jit(hooked.apply)(moved, x)[0]),
                               np.asarray(jax.jit(plain.apply)(v, x)[0]), atol=1e-5)
    assert set(calls) == {(16, 1), (32, 2), (64, 2), (128, 2)}
    hv = jax.eval_shape(hooked.init, jax.random.PRNGKey(0), x)
    assert "mixer" in hv["params"]["stage2_block0"] and "conv2" not in hv["params"]["stage2_block0"]


def test_unknown_variant_lists_known():
    with pytest.raises(ValueError, match="known: .*'50'.*'tiny'"):
        resnet_rs.create("51", 10)
