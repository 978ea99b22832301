"""Shared layers: the relative position bias's two lookups, and the exact GELU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.nn import layers


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_gather_equals_the_one_hot_contraction(bidirectional):
    """The gather (chosen on CPU) and T5X's one-hot contraction (chosen elsewhere) give the same
    bias and the same table gradient; the gradient is a scatter-add, so it is checked on a
    table where many (q, k) pairs share a bucket."""
    q, k = jnp.arange(13), jnp.arange(17)
    make = lambda one_hot: layers.RelativePositionBiases(  # noqa: E731
        num_buckets=8, max_distance=10, num_heads=3, one_hot=one_hot)
    params = make(True).init(jax.random.PRNGKey(0), q, k, bidirectional)
    params = jax.tree.map(lambda t: t + jnp.arange(t.size, dtype=t.dtype).reshape(t.shape), params)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 13, 17))

    def loss(p, one_hot):
        return jnp.sum(make(one_hot).apply(p, q, k, bidirectional) * cotangent)

    out_g = make(False).apply(params, q, k, bidirectional)
    out_o = make(True).apply(params, q, k, bidirectional)
    assert out_g.shape == (1, 3, 13, 17)
    np.testing.assert_array_equal(out_g, out_o)
    g_gather = jax.grad(loss)(params, False)
    g_onehot = jax.grad(loss)(params, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 g_gather, g_onehot)
    assert int(jnp.sum(jax.tree.leaves(g_gather)[0] != 0)) >= 3 * 6  # most buckets are used


def test_gelu_exact_is_x_times_the_normal_cdf_and_its_gradient_matches_jax():
    import math

    from moetx.nn.layers import ACTIVATIONS, gelu_exact

    x = jnp.linspace(-6.0, 6.0, 241, dtype=jnp.float32)
    cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(gelu_exact(x), np.asarray(x, np.float64) * cdf, atol=2e-6)
    reference = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu_exact))(x),
                               jax.vmap(jax.grad(reference))(x), atol=2e-6)
    assert ACTIVATIONS["gelu_exact"] is gelu_exact
    # Not the tanh approximation: the two differ by up to ~5e-4 near |x| = 2.
    assert float(jnp.max(jnp.abs(gelu_exact(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4
