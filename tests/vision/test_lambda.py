"""Lambda layer and LambdaResNet: one query's output equals the brute-force sum, the content
lambda ignores the order of the context, the position lambdas are translation equivariant,
timm's LambdaLayer gives the same outputs, and LambdaResNet-50 has the paper's 15.0M params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.vision.models import common
from moetx.vision.models import lambda_networks as ln
from tests.vision import conftest as timm_utils


def _run(layer, x, variables=None):
    """(y, intermediates, variables) of a LambdaLayer in eval mode (random variables unless
    given)."""
    if variables is None:
        variables = timm_utils.random_variables(layer, x)
    y, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"]))(variables, x)
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    return np.asarray(y), inter, variables


@pytest.mark.parametrize("conv_size", [3, None])
def test_one_query_equals_brute_force(conv_size):
    """y_n = sum_m sum_{k,u} q_n[h,k] (K_bar_m[k,u] + E_{n,m}[k,u]) V_m[:,u] for one query n, with
    E read off the lambda-conv kernel (zero outside the r x r window) or the relative table."""
    h, w, heads, kdim, u = 5, 6, 2, 4, 2
    layer = ln.LambdaLayer(8, key_dim=kdim, heads=heads, intra_depth=u, conv_size=conv_size)
    x = jax.random.normal(jax.random.key(1), (2, h, w, 3))
    y, inter, variables = _run(layer, x)
    q, keys, values = inter["queries"], inter["keys"], inter["values"]
    np.testing.assert_allclose(keys.sum(axis=1), 1.0, rtol=1e-5)  # softmax over positions
    params = variables["params"]
    for b, (yn, xn) in [(0, (0, 0)), (1, (2, 3)), (1, (4, 5))]:
        n = yn * w + xn
        out = np.zeros((heads, values.shape[2]))
        for m in range(h * w):
            ym, xm = divmod(m, w)
            if conv_size is None:
                emb = np.asarray(params["relative_embeddings"])[ym - yn + h - 1, xm - xn + w - 1]
            elif max(abs(ym - yn), abs(xm - xn)) <= conv_size // 2:
                r = conv_size // 2
                emb = np.asarray(params["lambda_conv"]["kernel"])[ym - yn + r, xm - xn + r, 0].T
            else:
                emb = np.zeros((kdim, u))
            lam = np.einsum("ku,vu->kv", keys[b, m] + emb, values[b, m])
            out += np.einsum("hk,kv->hv", q[b, n], lam)
        np.testing.assert_allclose(y[b, yn, xn], out.reshape(-1), atol=1e-5, rtol=1e-5)


def test_content_lambda_is_permutation_invariant():
    """lambda_c(K[perm], V[perm]) == lambda_c(K, V); a content-only layer is therefore
    permutation equivariant: permuting the pixels permutes the outputs the same way."""
    rng = np.random.default_rng(0)
    keys = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 20, 4, 2)), jnp.float32), axis=1)
    values = jnp.asarray(rng.normal(size=(2, 20, 3, 2)), jnp.float32)
    perm = rng.permutation(20)
    np.testing.assert_allclose(ln.content_lambda(keys[:, perm], values[:, perm]),
                               ln.content_lambda(keys, values), atol=1e-6)

    layer = ln.LambdaLayer(8, key_dim=4, heads=2, use_position=False)
    x = rng.normal(size=(1, 20, 3)).astype(np.float32)
    pix = rng.permutation(20)
    both = jnp.asarray(np.concatenate([x, x[:, pix]]).reshape(2, 4, 5, 3))  # batch: x, permuted
    y, _, _ = _run(layer, both)
    y = y.reshape(2, 20, 8)
    np.testing.assert_allclose(y[1], y[0][pix], atol=1e-5)


@pytest.mark.parametrize("conv_size", [5, None])
def test_position_lambdas_are_translation_equivariant(conv_size):
    """An object on a zero canvas, moved by (3, 2): every output moves with it (the content
    lambda is unchanged, E depends only on m - n). Absolute embeddings would break this."""
    obj = jax.random.normal(jax.random.key(2), (4, 4, 3))
    canvas = jnp.zeros((1, 11, 10, 3))
    x1 = canvas.at[0, 1:5, 2:6].set(obj)
    x2 = canvas.at[0, 4:8, 4:8].set(obj)
    layer = ln.LambdaLayer(8, key_dim=4, heads=2, intra_depth=2, conv_size=conv_size)
    y, inter, _ = _run(layer, jnp.concatenate([x1, x2]))  # batch rows are independent (eval BN)
    np.testing.assert_allclose(y[1, 3:, 2:], y[0, :-3, :-2], atol=1e-5)
    # The position lambdas themselves move (and are not trivially zero).
    p = inter["position_lambdas"].reshape(2, 11, 10, -1)
    np.testing.assert_allclose(p[1, 3:, 2:], p[0, :-3, :-2], atol=1e-5)
    assert np.abs(p).max() > 0.1


def test_layer_matches_timm_lambda_layer():
    """timm's LambdaLayer (u = 1, lambda conv r = 5, bias zeroed, random BN statistics, eval)
    and ours with the same weights give the same output."""
    torch = pytest.importorskip("torch")
    from timm.layers.lambda_layer import LambdaLayer as TimmLambda

    torch.manual_seed(0)
    tl = TimmLambda(16, 16, num_heads=4, dim_head=4, r=5).eval()
    with torch.no_grad():
        tl.conv_lambda.bias.zero_()
        for bn in (tl.norm_q, tl.norm_v):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
    sd = {k: v.numpy() for k, v in tl.state_dict().items()}
    qkv = sd["qkv.weight"][:, :, 0, 0].T  # [16, 16 + 4 + 4]
    bn = lambda p: {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}  # noqa: E731
    stats = lambda p: {"mean": sd[f"{p}.running_mean"], "var": sd[f"{p}.running_var"]}  # noqa
    variables = {
        "params": {"query": {"kernel": qkv[None, None, :, :16]},
                   "key": {"kernel": qkv[None, None, :, 16:20]},
                   "value": {"kernel": qkv[None, None, :, 20:]},
                   "norm_q": bn("norm_q"), "norm_v": bn("norm_v"),
                   "lambda_conv": {"kernel": sd["conv_lambda.weight"].transpose(2, 3, 4, 1, 0)}},
        "batch_stats": {"norm_q": stats("norm_q"), "norm_v": stats("norm_v")},
    }
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 16)).astype(np.float32)
    with torch.no_grad():
        ref = tl(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    layer = ln.LambdaLayer(16, key_dim=4, heads=4, conv_size=5)
    y, _, _ = _run(layer, jnp.asarray(x), jax.tree.map(jnp.asarray, variables))
    np.testing.assert_allclose(y, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_param_counts():
    """LambdaResNet-50 (all bottleneck 3x3 convs -> lambda layers, k16 h4 u1 r23) is within 1%
    of the paper's 15.0M, and the u4 r7 variant of 16.0M. A single layer has timm's
    LambdaLayer count minus the bias of timm's lambda conv (k = 16 numbers)."""
    for variant, paper in [("50", 15.0e6), ("50-u4", 16.0e6)]:
        ours = common.count_params(
            common.param_shapes(ln.create(variant, 1000), (1, 224, 224, 3))["params"])
        assert abs(ours - paper) / paper < 0.01, (variant, ours)
    layer = common.count_params(
        common.param_shapes(ln.LambdaLayer(256), (1, 14, 14, 256))["params"])
    torch = pytest.importorskip("torch")
    from timm.layers.lambda_layer import LambdaLayer as TimmLambda
    with torch.device("meta"):
        tl = TimmLambda(256, 256, num_heads=4, dim_head=16, r=23)
    assert layer == sum(p.numel() for p in tl.parameters()) - 16


def test_lambda_resnet_shapes_and_errors():
    """Every stage of the tiny LambdaResNet has the skeleton's strides (shape-only check)."""
    model = ln.create("tiny", 10)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = common.param_shapes(model, x.shape)
    logits, out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert logits.shape == (2, 10)
    assert [out[f"stage{i}"].shape[1] for i in range(1, 5)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="known"):
        ln.create("101", 10)
    with pytest.raises(ValueError, match="odd"):
        common.param_shapes(ln.LambdaLayer(8, key_dim=4, heads=2, conv_size=4), (1, 5, 5, 3))
