"""conv_ops.conv_general_dilated equals lax.conv_general_dilated (values and gradients) on the
paths it replaces, and hands everything else to lax unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from moetx.vision.models import common, conv_ops
from tests.conftest import slow_form_dots


def _numbers(nd):
    return conv_ops.channels_last_numbers(nd)


def _both(x, w, strides, padding, groups):
    dn = _numbers(x.ndim - 2)
    ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)
    ours = lambda x, w: conv_ops.conv_general_dilated(  # noqa: E731
        x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)
    return ref, ours


def _uses_lax_conv(fn, *args) -> bool:
    return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def _is_dense_path(fn, *args) -> bool:
    """lax's convolution inside a custom gradient: `dense_conv`."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "conv_general_dilated" in jaxpr and "custom_vjp_call" in jaxpr


CASES = [
    # (input shape, kernel shape, strides, padding, groups, expected path)
    ((2, 9, 9, 6), (3, 3, 1, 6), (1, 1), ((1, 1), (1, 1)), 6, "depthwise"),
    ((2, 8, 8, 6), (3, 3, 1, 6), (2, 2), "SAME", 6, "depthwise"),
    ((2, 7, 6, 4), (5, 5, 1, 4), (2, 2), ((2, 2), (2, 2)), 4, "depthwise"),
    ((2, 3, 5, 5, 4), (3, 3, 3, 1, 4), (1, 2, 2), "SAME", 4, "depthwise"),
    # pads wider than the kernel: the input gradient's spread crops (negative pads)
    ((2, 4, 4, 4), (3, 3, 1, 4), (1, 1), ((1, 3), (3, 0)), 4, "depthwise"),
    # stride leaves the last input rows unread
    ((2, 8, 7, 4), (3, 3, 1, 4), (3, 2), ((0, 0), (0, 0)), 4, "depthwise"),
    ((2, 2, 2, 8), (3, 3, 8, 5), (1, 1), ((1, 1), (1, 1)), 1, "patches"),
    ((2, 4, 4, 8), (3, 3, 8, 5), (2, 2), ((1, 1), (1, 1)), 1, "patches"),
    ((2, 3, 4, 8), (3, 3, 8, 5), (2, 1), "SAME", 1, "patches"),
    ((2, 1, 1, 8), (3, 3, 8, 5), (1, 1), ((1, 1), (1, 1)), 1, "patches"),
    ((2, 3, 2, 2, 4), (3, 3, 3, 4, 5), (1, 1, 1), "SAME", 1, "patches"),
    ((2, 9, 9, 8), (3, 3, 8, 5), (1, 1), ((1, 1), (1, 1)), 1, "lax"),   # large map, few outputs
    # large maps with MIN_PATCH_GRAD_FEATURES outputs or more: the patches' kernel gradient
    ((2, 9, 9, 8), (3, 3, 8, 32), (1, 1), ((1, 1), (1, 1)), 1, "dense"),
    ((2, 9, 8, 4), (3, 3, 4, 32), (2, 2), "SAME", 1, "dense"),
    ((2, 8, 7, 4), (3, 3, 4, 32), (3, 2), "VALID", 1, "dense"),          # last rows unread
    ((2, 9, 9, 4), (5, 3, 4, 40), (1, 1), ((2, 1), (0, 3)), 1, "dense"),
    ((2, 6, 7, 7, 3), (3, 3, 3, 3, 32), (1, 2, 2), "SAME", 1, "dense"),
    ((2, 11, 4), (3, 4, 32), (2,), "SAME", 1, "dense"),
    ((2, 16, 16, 3), (8, 8, 3, 32), (8, 8), "VALID", 1, "dense"),         # patch embedding
    # negative pads crop the input: lax's, on every path that would pad it
    ((2, 9, 9, 4), (3, 3, 4, 32), (1, 1), ((-1, 1), (1, 1)), 1, "lax"),
    ((2, 9, 9, 4), (3, 3, 1, 4), (1, 1), ((-1, 1), (1, 1)), 4, "lax"),
    ((2, 3, 3, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, -1)), 1, "lax"),
    ((2, 4, 4, 8), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 2, "lax"),   # grouped
    ((2, 4, 4, 4), (3, 3, 1, 8), (1, 1), ((1, 1), (1, 1)), 4, "lax"),   # channel multiplier
    ((2, 3, 3, 8), (1, 1, 8, 5), (1, 1), "VALID", 1, "pointwise"),
    ((2, 5, 4, 8), (1, 1, 8, 5), (2, 2), "SAME", 1, "pointwise"),      # odd side, strided
    ((2, 3, 5, 4, 8), (1, 1, 1, 8, 5), (1, 2, 2), "SAME", 1, "pointwise"),
    ((2, 3, 3, 8), (1, 1, 4, 6), (1, 1), "VALID", 2, "lax"),            # 1x1 grouped
    ((2, 3, 3, 8), (1, 1, 8, 5), (1, 1), ((1, 0), (0, 1)), 1, "lax"),   # 1x1 padded
]


@pytest.mark.parametrize("xs,ws,strides,padding,groups,path", CASES)
def test_matches_lax_values_and_gradients(xs, ws, strides, padding, groups, path):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
    ref, ours = _both(x, w, strides, padding, groups)
    assert _uses_lax_conv(ours, x, w) == (path in ("lax", "dense"))
    assert _is_dense_path(ours, x, w) == (path == "dense")
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)),
                               rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.standard_normal(ref(x, w).shape), jnp.float32)
    g_ref = jax.grad(lambda x, w: jnp.vdot(ref(x, w), cot), argnums=(0, 1))(x, w)
    g_ours = jax.grad(lambda x, w: jnp.vdot(ours(x, w), cot), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def _compiled_grad(conv, x, w, padding) -> str:
    """The compiled HLO of the gradient of sum(conv(x, w)²) with respect to x and w."""
    f = lambda x, w: jnp.sum(conv(x, w, (1, 1), padding,  # noqa: E731
                                  dimension_numbers=_numbers(2)) ** 2)
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()


def test_pointwise_gradient_is_two_fast_matmuls():
    """A 1x1 conv is a matmul over channels (`dense_contract`): its compiled gradient has no
    convolution, whose weight-gradient form XLA's CPU backend ran at 25-40 GFLOP/s in
    CoAtNet-0's step, and no dot in the slow form (`slow_form_dots`). The lax conv's has one."""
    x, w = jnp.ones((4, 8, 8, 16)), jnp.ones((1, 1, 16, 32))
    ours = _compiled_grad(conv_ops.conv_general_dilated, x, w, "VALID")
    assert " convolution(" not in ours and not slow_form_dots(ours)
    assert " convolution(" in _compiled_grad(lax.conv_general_dilated, x, w, "VALID")


def test_dense_kernel_gradient_is_a_fast_matmul():
    """A k×k conv with 32 or more outputs on a large map: XLA's convolution forward and for the
    input gradient (two in the compiled gradient, as lax's), and the kernel gradient one matmul
    over the patches in YNNPACK's form (`slow_form_dots`), where lax's gradient has a third
    convolution over the batch (the slow one on CPUs). Traced for TPUs or GPUs, lax's gradient."""
    from moetx.util import platform as platform_lib

    x, w = jnp.ones((4, 12, 12, 16)), jnp.ones((3, 3, 16, 32))
    ours = _compiled_grad(conv_ops.conv_general_dilated, x, w, "SAME")
    assert ours.count(" convolution(") == 2 and " dot(" in ours and not slow_form_dots(ours)
    assert _compiled_grad(lax.conv_general_dilated, x, w, "SAME").count(" convolution(") == 3
    for platform in ("gpu", "tpu"):
        with platform_lib.trace_for(platform):
            assert not _is_dense_path(lambda x, w: conv_ops.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=_numbers(2)), x, w)


def test_channels_first_and_dilated_go_to_lax():
    x = jnp.ones((1, 4, 3, 3))
    w = jnp.ones((5, 4, 3, 3))
    f = lambda x, w: conv_ops.conv_general_dilated(x, w, (1, 1), "SAME")  # noqa: E731
    assert _uses_lax_conv(f, x, w)  # lax's default layout is NCHW
    x, w = jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 1, 4))
    g = lambda x, w: conv_ops.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=_numbers(2),
        feature_group_count=4)
    assert _uses_lax_conv(g, x, w)
    np.testing.assert_allclose(
        g(x, w), lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                          dimension_numbers=_numbers(2),
                                          feature_group_count=4))


def test_common_conv_uses_it_with_unchanged_parameters():
    """The vision families' `common.conv` routes through conv_ops; its variables are exactly
    nn.Conv's, so checkpoints and the timm converters are unaffected."""
    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 2, 8)), jnp.float32)
    ours = common.conv(5, 3)
    plain = nn.Conv(5, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                    kernel_init=common.conv_kernel_init)
    v = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape,
                                                      plain.init(jax.random.PRNGKey(0), x))
    assert not _uses_lax_conv(lambda v, x: ours.apply(v, x), v, x)
    np.testing.assert_allclose(ours.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-5)


def test_conv_ops_is_not_a_model_family():
    from moetx.vision import models

    families = models.families()
    assert "conv_ops" not in families and "common" not in families
    assert {"resnet_rs", "coatnet", "efficientnet_v2", "gmlp"} <= set(families)
    with pytest.raises(ValueError, match="families"):
        models.create("conv_ops/tiny", 10)


def test_depthwise_input_gradient_is_one_conv():
    """The written-out backward spreads the cotangent once; autodiff of the shifted sum would
    pad each of the k*k taps' cotangents back to the input's size."""
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 1, 4))
    f = lambda x, w: jnp.sum(conv_ops.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=_numbers(2), feature_group_count=4) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w))
    assert jaxpr.count(" pad[") <= 3  # forward input, spread cotangent, kernel-grad input


DEPTHWISE_CASES = [c for c in CASES if c[-1] == "depthwise"]


@pytest.mark.parametrize("xs,ws,strides,padding,groups,path", DEPTHWISE_CASES[:3])
def test_depthwise_per_tap_kernel_gradient_matches_lax(xs, ws, strides, padding, groups, path,
                                                       monkeypatch):
    """With the fused kernel gradient off (as for large maps), the per-tap sums give lax's."""
    monkeypatch.setattr(conv_ops, "MAX_FUSED_TAP_SUM_ELEMENTS", 0)
    test_matches_lax_values_and_gradients(xs, ws, strides, padding, groups, path)


def _depthwise_kernel_grad_hlo(x, w) -> str:
    f = lambda x, w: jnp.sum(conv_ops.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=_numbers(2), feature_group_count=x.shape[-1]) ** 2)
    return jax.jit(jax.grad(f, argnums=1)).lower(x, w).as_text()


def _reduce_results(hlo: str) -> list[int]:
    """The number of results of every reduction in a lowered (StableHLO) module."""
    return [line.split("->")[-1].count("tensor<") for line in hlo.splitlines()
            if "stablehlo.reduce(" in line]


def test_depthwise_kernel_gradient_is_one_reduction_on_small_maps(monkeypatch):
    """Small cotangents (at most MAX_FUSED_TAP_SUM_ELEMENTS): the 3x3 kernel gradient is one
    reduction with 9 results, which XLA fuses into one loop over the input and the cotangent
    (EfficientNetV2-B0's step 4-7% faster on CPUs); above it, or traced for GPUs and TPUs, one
    reduction per tap."""
    from moetx.util import platform as platform_lib

    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
    assert _reduce_results(_depthwise_kernel_grad_hlo(x, w)) == [9]
    for platform in ("gpu", "tpu"):
        with platform_lib.trace_for(platform):
            assert _reduce_results(_depthwise_kernel_grad_hlo(x, w)) == [1] * 9
    monkeypatch.setattr(conv_ops, "MAX_FUSED_TAP_SUM_ELEMENTS", 2 * 8 * 8 * 4 - 1)
    assert _reduce_results(_depthwise_kernel_grad_hlo(x, w)) == [1] * 9
