"""`MoeConfig.router_dtype`: 'float32' (the default) computes the router logits exactly as the
float32 projection always did; 'bfloat16' (the ST-MoE paper's "bfloat16 router" ablation) rounds
them by a small, nonzero amount, while the softmax and the losses stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.moe import layers as moe_layers, routing

E, D = 8, 64


def _inputs():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, D), jnp.float32)
    kernel = jnp.asarray(np.random.RandomState(1).randn(D, E) * 0.5, jnp.float32)
    return x, {"params": {"router_weights": {"w": {"kernel": kernel}}}}, kernel


def test_float32_router_logits_are_the_float32_projection_bit_for_bit():
    x, params, kernel = _inputs()
    logits, probs = jax.jit(routing.Router(num_experts=E).apply)(params, x)
    explicit, _ = jax.jit(routing.Router(num_experts=E, logits_dtype=jnp.float32).apply)(
        params, x)
    reference = jax.jit(lambda a, w: jnp.einsum("...i,io->...o", a, w))(x, kernel)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference))
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(jax.nn.softmax(reference)))


def test_bfloat16_router_rounds_the_logits_a_little_and_keeps_float32_probabilities():
    x, params, _ = _inputs()
    f32, _ = routing.Router(num_experts=E).apply(params, x)
    bf16, probs = routing.Router(num_experts=E, logits_dtype=jnp.bfloat16).apply(params, x)
    assert bf16.dtype == jnp.float32 and probs.dtype == jnp.float32
    diff = np.abs(np.asarray(bf16) - np.asarray(f32))
    scale = float(np.max(np.abs(np.asarray(f32))))
    # bfloat16 keeps 8 significant bits: the error is about 2^-8 of the logits' size.
    assert diff.max() > 0
    assert diff.max() < 2e-2 * scale
    # The logits are the bfloat16 matmul's result (inputs and kernel rounded), cast to float32.
    bf16_ref = jnp.einsum("...i,io->...o", x.astype(jnp.bfloat16),
                          params["params"]["router_weights"]["w"]["kernel"].astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(bf16_ref.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(bf16)), rtol=1e-6)


def _layer(router_dtype=None):
    kw = {} if router_dtype is None else {"router_dtype": router_dtype}
    cfg = moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, group_size=16,
                               train_capacity_factor=4.0, eval_capacity_factor=4.0,
                               sparse_every=1, **kw)
    return moe_layers.MoeLayer(cfg, 8, 16, ("gelu", "linear"))


def test_the_moe_layer_passes_router_dtype_to_its_router():
    x = jnp.asarray(np.random.RandomState(2).randn(2, 16, 8), jnp.float32)
    params = jax.jit(_layer().init)(jax.random.PRNGKey(0), x)
    today = jax.jit(_layer().apply)(params, x)
    f32 = jax.jit(_layer("float32").apply)(params, x)
    bf16 = jax.jit(_layer("bfloat16").apply)(params, x)
    np.testing.assert_array_equal(np.asarray(f32), np.asarray(today))
    assert not np.array_equal(np.asarray(bf16), np.asarray(today))
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(today), atol=5e-2)


def test_an_unknown_router_dtype_is_refused():
    with pytest.raises(ValueError, match="router_dtype must be one of float32, bfloat16"):
        moe_layers.MoeConfig(router_dtype="float16")
