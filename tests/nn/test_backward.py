"""Backward rules (moetx.nn.backward): the rule language, and its wiring into Flax layers through
method interceptors and custom_vjp (the identity rule is backprop bit for bit; a rule changes
the backward pass only)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.nn import backward, layers


class _Net(nn.Module):
    """A convolution (with bias, strided), a moetx DenseGeneral (bias-free, boxed kernel) and a
    flax Dense (with bias): every intercepted layer type in one model."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=(2, 2), name="conv")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = layers.DenseGeneral(6, ("embed", "mlp"), name="dense_general")(x)
        return nn.Dense(3, name="dense")(jnp.tanh(x))


@pytest.fixture(scope="module")
def net():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 6, 2))
    params = nn.unbox(_Net().init(jax.random.PRNGKey(2), x)["params"])
    return params, x


def _grads(params, x, dense=None, conv=None):
    """(output, (d params, d x)) of sum(out * c), jitted, under the given rules."""
    c = jnp.linspace(-1.0, 1.0, 3)

    def loss(p, x):
        with backward.backward_rules(dense=dense, conv=conv, rng=jax.random.PRNGKey(3)):
            out = _Net().apply({"params": p}, x)
        return jnp.sum(out * c), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads


def _equal(a, b):
    return jax.tree_util.tree_map(lambda u, v: bool(np.array_equal(u, v)), a, b)


def test_the_identity_rule_is_backprop_exactly_for_dense_dense_general_and_conv(net):
    params, x = net
    out, grads = _grads(params, x)
    out_r, grads_r = _grads(params, x, dense=backward.BACKPROP, conv=backward.BACKPROP)
    assert np.array_equal(out, out_r)
    # Every parameter (conv kernel and bias, DenseGeneral kernel, Dense kernel and bias) and the
    # input gradient, bit for bit.
    flags = _equal(grads, grads_r)
    assert all(jax.tree_util.tree_leaves(flags)), flags
    assert set(grads[0]) == {"conv", "dense_general", "dense"}


@pytest.mark.parametrize("dense,conv", [("add(g, noise)", None), (None, "mul(bn_g, w_rms)"),
                                        ("max(drop10(g), ln_y)", "div(g, x_rms)")])
def test_a_rule_changes_the_backward_pass_only(net, dense, conv):
    params, x = net
    out, grads = _grads(params, x)
    out_r, grads_r = _grads(params, x, dense=dense, conv=conv)
    assert np.array_equal(out, out_r)  # the forward pass is untouched
    flags = _equal(grads, grads_r)
    if conv is None:
        # Only the dense layers' rule: the conv layer's own g' is plain, but it receives the
        # modified gradient from above; the head's bias gradient is sum(g').
        assert not flags[0]["dense"]["kernel"] and not flags[0]["conv"]["kernel"]
    else:
        assert not flags[0]["conv"]["kernel"] and not flags[1]
    if dense is None:
        # The layers above the convolution back-propagate plainly.
        assert flags[0]["dense"]["kernel"] and flags[0]["dense_general"]["kernel"]


def test_the_modified_gradient_flows_through_the_layers_transposes():
    # Dense: g' = 2 g gives exactly twice backprop's dx, dW and db.
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    dense = nn.Dense(3)
    params = dense.init(jax.random.PRNGKey(1), x)["params"]

    def grads(rule):
        def loss(p, x):
            with backward.backward_rules(dense=rule):
                return jnp.sum(jnp.sin(dense.apply({"params": p}, x)))
        return jax.grad(loss, argnums=(0, 1))(params, x)

    plain, doubled = grads(None), grads("add(g, g)")
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(doubled)):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
    # g' = sign(g): dW = x^T sign(g), db = sum sign(g).
    g = jnp.cos(dense.apply({"params": params}, x))
    signed = grads("keep_left(sign(g), one)")
    np.testing.assert_allclose(signed[0]["kernel"], x.T @ jnp.sign(g), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(signed[0]["bias"], jnp.sign(g).sum(0), rtol=1e-6)
    np.testing.assert_allclose(signed[1], jnp.sign(g) @ params["kernel"].T, rtol=1e-5,
                               atol=1e-6)


def test_operands_and_normalisations():
    rng = np.random.RandomState(0)
    g = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    out = lambda text: backward.rule_output(text, g, x, g * 3.0, kernel,  # noqa: E731
                                            jax.random.PRNGKey(0))
    # Normalised over the batch and position axes (per feature) or over the features (per
    # row), then scaled by the tensor's RMS: the gradient's scale is kept.
    rms_g = float(jnp.sqrt(jnp.mean(g ** 2)))
    bn = out("keep_left(bn_g, one)")
    np.testing.assert_allclose(bn.mean((0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(bn.var((0, 1)), rms_g ** 2, rtol=1e-4)
    ln = out("keep_left(ln_y, one)")
    np.testing.assert_allclose(ln.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ln.var(-1), (3 * rms_g) ** 2, rtol=1e-4)
    x_rms = out("keep_left(x_rms, one)")
    np.testing.assert_allclose(x_rms[:, 0, 0], np.sqrt((np.asarray(x) ** 2).mean((1, 2))),
                               rtol=1e-5)
    assert np.all(x_rms == x_rms[:, :1, :1])
    w_rms = out("keep_left(w_rms, one)")
    np.testing.assert_allclose(w_rms[0, 0], np.sqrt((np.asarray(kernel) ** 2).mean(0)),
                               rtol=1e-5)
    noise = out("keep_left(noise, one)")
    np.testing.assert_array_equal(noise, out("keep_left(noise, one)"))  # seeded by the key
    assert 0.8 < float(jnp.sqrt(jnp.mean(noise ** 2)) / jnp.sqrt(jnp.mean(g ** 2))) < 1.2
    np.testing.assert_allclose(out("div(g, 0.0)"), g / 1e-8, rtol=1e-6)  # safe division
    assert np.isfinite(out("keep_left(log_abs(sub(g, g)), one)")).all()
    dropped = out("keep_left(drop30(g), one)")
    assert 0.15 < float(jnp.mean(dropped == 0)) < 0.45


def test_parse_print_round_trip_and_canonical_form():
    for text in ["keep_left(g, one)", "add(g, mul(0.1, noise))", "mul(bn(g), exp(sub(ln_y, one)))",
                 "div(clip3(sub(g, y)), sqrt_abs(w_rms))", "max(drop30(g), min(x_rms, -2.0))"]:
        rule = backward.parse_rule(text)
        assert rule.text() == str(rule) == text
        assert backward.parse_rule(rule.text()) == rule
    rule = backward.parse_rule("  keep_left( identity(g) ,1 )")
    assert rule.text() == "keep_left(g, 1.0)" and rule.depth() == 1
    assert backward.parse_rule("add(g, mul(0.1, noise))").depth() == 2


@pytest.mark.parametrize("text,message", [
    ("add(g)", "'add' takes 2 arguments, got 1"),
    ("neg(g, y)", "'neg' takes 1 argument, got 2"),
    ("foo(g, y)", "Unknown function 'foo'"),
    ("add(g, z)", "Unknown operand 'z'"),
    ("add(g, y", "Unexpected end of the rule"),
    ("add(g, y) y", "Trailing text after the rule"),
    ("add(g; y)", "Unexpected character ';'"),
    ("neg(g)", "A rule is a binary function at the top"),
    ("add(neg(abs(g)), y)", "not the unary 'abs'"),
    ("add(g(), y)", "Operand 'g' takes no arguments"),
    ("add(exp, y)", "'exp' is a function"),
    ("", "Empty rule text"),
])
def test_bad_rules_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backward.parse_rule(text)


def test_static_properties():
    assert not backward.parse_rule("keep_left(y, g)").depends_on_gradient()
    assert backward.parse_rule("add(y, bn_g)").depends_on_gradient()
    assert backward.parse_rule("mul(exp(add(y, ln_g)), one)").depends_on_gradient()
    assert backward.parse_rule("add(g, noise)").needs_key()
    assert not backward.parse_rule("add(g, y)").needs_key()
    assert backward.parse_rule("add(g, bn_y)").needs_output()
    assert backward.layer_kind(nn.Conv(2, (3, 3))) == "conv"
    assert backward.layer_kind(layers.DenseGeneral(2, ("a", "b"))) == "dense"
    assert backward.layer_kind(nn.LayerNorm()) is None
