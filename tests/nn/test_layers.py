"""Shared layers: the relative position bias's two lookups, and the exact GELU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.nn import layers
from moetx.util import platform as platform_lib
from tests.conftest import slow_form_dots


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


def test_relative_position_bias_default_lookup_follows_the_traced_platform():
    """`one_hot=None` takes the gather when traced for CPUs and the one-hot contraction when
    traced for TPUs or GPUs (`trace_for`: what the plan tool traces), same values either way."""
    q = k = jnp.arange(9)
    layer = layers.RelativePositionBiases(num_buckets=8, max_distance=10, num_heads=2)
    params = layer.init(jax.random.PRNGKey(0), q, k, True)
    traced = {}
    for platform in ("cpu", "tpu"):
        # A new function per platform: JAX's trace cache does not key on the platform set.
        apply = lambda p: layer.apply(p, q, k, True)  # noqa: E731
        with platform_lib.trace_for(platform):
            traced[platform] = (str(jax.make_jaxpr(apply)(params)), apply(params))
    assert "gather" in traced["cpu"][0] and "dot_general" not in traced["cpu"][0]
    assert "dot_general" in traced["tpu"][0] and "gather" not in traced["tpu"][0]
    np.testing.assert_allclose(traced["cpu"][1], traced["tpu"][1], rtol=1e-6)


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


def _dense_vjp(platform, x, kernel, g, batch_dims):
    """`dense_contract`'s output, its (x, kernel) cotangents for `g`, and the backward's jaxpr,
    traced for `platform`."""
    f = functools.partial(layers.dense_contract, batch_dims=batch_dims)
    with platform_lib.trace_for(platform):
        y, vjp = jax.vjp(f, x, kernel)
        text = str(jax.make_jaxpr(lambda x, k: jax.vjp(f, x, k)[1](g))(x, kernel))
        return y, vjp(g), text


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch_dims, x_shape, k_shape, numpy_dk", [
    (0, (2, 5, 12), (12, 7), "bti,bto->io"),  # DenseGeneral: x [batch, length, in]
    (1, (3, 5, 12), (3, 12, 7), "eti,eto->eio"),  # MoE experts: x [experts, tokens, in]
])
def test_dense_contract_cpu_backward_equals_autodiffs(dtype, tol, batch_dims, x_shape, k_shape,
                                                      numpy_dk):
    """On CPUs `dense_contract` computes its kernel gradient from a materialised xᵀ; the output
    and both gradients equal autodiff's einsum (what TPUs and GPUs run), in each dtype, with
    and without a leading batch (expert) axis."""
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(ks[0], x_shape).astype(dtype)
    kernel = jax.random.normal(ks[1], k_shape).astype(dtype)
    g = jax.random.normal(ks[2], x_shape[:-1] + k_shape[-1:]).astype(dtype)
    y_cpu, (dx_cpu, dk_cpu), text_cpu = _dense_vjp("cpu", x, kernel, g, batch_dims)
    y_tpu, (dx_tpu, dk_tpu), text_tpu = _dense_vjp("tpu", x, kernel, g, batch_dims)
    assert "optimization_barrier" in text_cpu and "optimization_barrier" not in text_tpu
    np.testing.assert_array_equal(y_cpu, y_tpu)
    assert (dx_cpu.dtype, dk_cpu.dtype) == (dtype, dtype)
    assert (dx_cpu.shape, dk_cpu.shape) == (x.shape, kernel.shape)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(dx_cpu), f32(dx_tpu), rtol=tol, atol=tol)
    np.testing.assert_allclose(f32(dk_cpu), f32(dk_tpu), rtol=tol, atol=tol)
    # Against numpy: dk = Σ_tokens x ⊗ g.
    np.testing.assert_allclose(f32(dk_cpu), np.einsum(numpy_dk, f32(x), f32(g)),
                               rtol=tol, atol=tol * 4)


def test_dense_contract_rejects_shapes_that_do_not_match_its_batch_axes():
    with pytest.raises(ValueError, match=r"kernel \[\*B, in, out\]; got \(3, 4\) and \(2, 4, 5\)"):
        layers.dense_contract(jnp.ones((3, 4)), jnp.ones((2, 4, 5)))


@pytest.mark.parametrize("batch_dims, x_shape, k_shape", [
    (0, (64, 32), (32, 48)),
    (1, (4, 64, 32), (4, 32, 48)),
])
def test_dense_contract_cpu_kernel_gradient_contracts_the_left_operands_last_axis(
        batch_dims, x_shape, k_shape):
    """What the CPU path is for: in the compiled backward no dot contracts an axis of its left
    operand other than the last (the form XLA's CPU backend sends to Eigen instead of
    YNNPACK). Autodiff's einsum, traced for TPUs and compiled here, has one: the kernel
    gradient."""
    x, kernel = jnp.ones(x_shape), jnp.ones(k_shape)
    f = functools.partial(layers.dense_contract, batch_dims=batch_dims)

    def eigen_dots(platform):
        with platform_lib.trace_for(platform):
            grad = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), argnums=(0, 1)))
            return slow_form_dots(grad.lower(x, kernel).compile().as_text())

    assert eigen_dots("tpu")
    assert not eigen_dots("cpu")


def test_dense_is_flax_dense_with_the_fast_kernel_gradient():
    """`layers.Dense` (the vision models' dense layer) has flax nn.Dense's variables, output and
    gradients; only its compiled CPU gradient differs: no dot in the slow form
    (`slow_form_dots`), where nn.Dense's kernel gradient has one."""
    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    ours, plain = layers.Dense(6, name="fc"), nn.Dense(6, name="fc")
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (8, 6), "bias": (6,)}}
    ref = plain.init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["params"]["kernel"], ref["params"]["kernel"])

    def grad(module):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.tanh(module.apply(v, x))),
                                argnums=(0, 1)))

    np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad(ours)(variables, x)),
                    jax.tree.leaves(grad(plain)(variables, x))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    compiled = lambda m: grad(m).lower(variables, x).compile().as_text()  # noqa: E731
    assert not slow_form_dots(compiled(ours))
    assert slow_form_dots(compiled(plain))


def test_dense_dot_general_hands_other_contractions_to_lax():
    """Only Dense's own contraction (last axis with the kernel's first, default precision and
    type) takes `dense_contract`; anything else is `lax.dot_general` itself."""
    x, k = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(layers.dense_dot_general(x, k, batched),
                                  jax.lax.dot_general(x, k, batched))
    plain = (((2,), (0,)), ((), ()))
    for kw in ({"precision": jax.lax.Precision.HIGHEST},
               {"preferred_element_type": jnp.float32}):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(
            layers.dense_dot_general(x, k[0], plain, **kw))))(x))
        assert "optimization_barrier" not in jaxpr
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(
        layers.dense_dot_general(x, k, plain))))(k[0]))
    assert "optimization_barrier" in jaxpr  # traced on this CPU: dense_contract's CPU path
