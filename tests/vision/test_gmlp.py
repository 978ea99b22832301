"""gMLP: parameter counts equal timm's, the spatial gating unit is the identity on u at init,
the causal mask removes every dependence on later tokens, and timm's gmlp_s16 logits are
reproduced after converting its (randomised) weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.vision.models import common, gmlp
from tests.conftest import slow_form_dots
from tests.vision import conftest as timm_utils


@pytest.mark.parametrize("variant,timm_name,expected", [
    ("ti", "gmlp_ti16_224", 5_867_328),
    ("s", "gmlp_s16_224", 19_422_656),
    ("b", "gmlp_b16_224", 73_075_392),
])
def test_param_count_equals_timm(variant, timm_name, expected):
    """Trainable params at 224x224, 1000 classes (gMLP has no other state) == timm == the published count."""
    shapes = common.param_shapes(gmlp.create(variant, 1000), (1, 224, 224, 3))
    assert common.count_params(shapes["params"]) == expected
    assert timm_utils.timm_param_count(timm_name) == expected


def _init_and_apply(module, z):
    """(output, variables) of `module` freshly initialised on z, in one compiled call."""
    return jax.jit(module.init_with_output)(jax.random.key(1), z)


def test_sgu_is_identity_on_u_at_init():
    """W_s ~ N(0, 1e-6), b_s = 1: SGU(z) = u * (W_s LN(v) + 1) equals u within 1e-5 (relative).

    The gate's deviation from 1 is N(0, 1e-12 * N) for N tokens; N = 4 here (a 2x2 patch grid).
    """
    z = jax.random.normal(jax.random.key(0), (2, 4, 64))
    out, _ = _init_and_apply(gmlp.SpatialGatingUnit(), z)
    np.testing.assert_allclose(np.asarray(out), np.asarray(z[..., :32]), atol=0, rtol=1e-5)
    # The check can fail: with a normal-size W_s the output moves far away from u.
    out_big, _ = _init_and_apply(gmlp.SpatialGatingUnit(init_std=0.5), z)
    assert np.abs(np.asarray(out_big - z[..., :32])).max() > 0.1


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask_blocks_future_tokens(causal):
    """Perturbing input token s changes output token t only if s <= t with causal=True (and for
    every t without the mask). Batch row 0 is z, row 1 + s is z with token s perturbed."""
    n, f = 6, 8
    z = jax.random.normal(jax.random.key(0), (1, n, f))
    bumps = jnp.eye(n)[:, :, None] * jax.random.normal(jax.random.key(2), (n, 1, f))
    sgu, zs = gmlp.SpatialGatingUnit(causal=causal), jnp.concatenate([z, z + bumps])
    # Random N(0, 1) weights everywhere (numpy, no RNG compile): every entry of W_s is non-zero.
    shapes = jax.eval_shape(lambda: sgu.init(jax.random.key(0), zs))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    out = np.asarray(jax.jit(sgu.apply)(variables, zs))
    changed = np.abs(out[1:] - out[:1]).max(axis=-1) > 1e-6  # Shape: [s (perturbed), t]
    future = np.tril(np.ones((n, n), bool), k=-1)  # t < s: an earlier output, a later input
    if causal:
        assert not changed[future].any()
        assert changed[~future].all()
    else:
        assert changed.all()


@pytest.mark.parametrize("causal", [False, True])
def test_sgu_mixes_tokens_as_the_einsum_and_its_gradient_takes_the_fast_path(causal):
    """The SGU mixes tokens with tokens last (a [.., N] x [N, M] matmul) and transposes around
    it, so that its matmuls, forward and backward, are in the form XLA's CPU backend runs on
    YNNPACK. It is the same function as einsum('bnc,nm->bmc') over LN(v) (random weights), and
    the compiled gradient of a gMLP block has no dot in the slow form (`slow_form_dots`; the
    einsum over the middle axis compiled to 2 of them per block)."""
    z = jax.random.normal(jax.random.key(0), (3, 5, 8))
    sgu = gmlp.SpatialGatingUnit(causal=causal)
    shapes = jax.eval_shape(lambda: sgu.init(jax.random.key(0), z))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    p = variables["params"]
    out, state = sgu.apply(variables, z, capture_intermediates=True)
    u, v = z[..., :4], state["intermediates"]["norm"]["__call__"][0]  # v = LN(second half)
    w = p["kernel"] * (np.triu(np.ones((5, 5))) if causal else 1.0)
    want = u * (jnp.einsum("bnc,nm->bmc", v, w) + p["bias"][None, :, None])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    block = gmlp.GmlpBlock(ffn_dim=16, causal=causal)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = block.init(jax.random.key(2), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2), argnums=(0, 1)))
    assert not slow_form_dots(grad.lower(params, x).compile().as_text())


def test_logits_match_timm_gmlp_s16():
    """timm gmlp_s16 (img_size 32 -> 4 tokens, 30 blocks) with every weight randomised, eval mode:
    the converted Flax model gives the same logits for 2 images."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tm = pytest.importorskip("timm").create_model("gmlp_s16_224", img_size=32, num_classes=10).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("gate.proj.weight"):
                p.normal_(0.0, 0.5)  # far from timm's 1e-6 init, so the token map matters
            elif p.ndim > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.02)
            else:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = timm_utils.timm_logits(tm, x)
    model = gmlp.create("s", 10)
    variables = gmlp.from_timm(tm.state_dict())
    logits, out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x))
    timm_utils.assert_logits_match(logits, ref)
    assert out["stem"].shape == (2, 2, 2, 256) and out["pre_logits"].shape == (2, 256)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="known"):
        gmlp.create("xl", 10)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        jax.eval_shape(lambda: gmlp.create("tiny", 10).init(jax.random.key(0),
                                                            jnp.zeros((1, 30, 32, 3))))
