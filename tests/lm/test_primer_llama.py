"""Primer (multi-dconv-head attention, squared ReLU) and Llama-style options (RoPE, SwiGLU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import attention, models, transformer
from moetx.nn import layers
from tests.lm.conftest import assert_cached_decoding_matches_teacher_forcing

BASE = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_decoder_layers=2)


def _model(**kw):
    m = models.DecoderOnlyModel(transformer.TransformerConfig(**{**BASE, **kw}))
    v = m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(2, 16))
    return m, nn.unbox(v["params"])


def _shift(t):
    return jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)


def test_fresh_dconv_on_ones_gives_the_published_ramp():
    conv = attention.DepthwiseConv()
    x = jnp.ones((1, 6, 4))
    v = conv.init(jax.random.PRNGKey(0), x)
    y = conv.apply(v, x)
    np.testing.assert_allclose(y[0, :, 0], [0.5, 0.6667, 0.8333, 0.8333, 0.8333, 0.8333],
                               atol=1e-4)


def test_dconv_is_causal():
    conv = attention.DepthwiseConv()
    x = jnp.asarray(np.random.RandomState(0).randn(1, 8, 3), jnp.float32)
    v = conv.init(jax.random.PRNGKey(0), x)
    jac = jax.jacobian(lambda z: conv.apply(v, z)[0, 3])(x)  # output at t=3
    assert np.all(np.asarray(jac)[..., 4:, :] == 0)  # no gradient from t > 3
    assert np.any(np.asarray(jac)[..., 1:4, :] != 0)


def test_dconv_does_not_cross_packed_segments():
    conv = attention.DepthwiseConv()
    x = jnp.ones((1, 6, 2))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2]])
    v = conv.init(jax.random.PRNGKey(0), x)
    y = conv.apply(v, x, seg)
    np.testing.assert_allclose(y[0, :, 0], [0.5, 0.6667, 0.8333, 0.5, 0.6667, 0.8333], atol=1e-4)


def test_primer_adds_nine_heads_dkv_params_per_layer():
    _, plain = _model()
    _, primer = _model(primer_dconv=True)
    count = lambda p: sum(x.size for x in jax.tree_util.tree_leaves(p))  # noqa: E731
    assert count(primer) - count(plain) == 9 * 2 * 8 * BASE["num_decoder_layers"]
    k = primer["decoder"]["layers_0"]["self_attention"]["query_dconv"]["kernel"]
    np.testing.assert_allclose(k[:, 0], [0.5, 0.5 / 3, 0.5 / 3])


def test_squared_relu():
    f = layers.get_activation("squared_relu")
    np.testing.assert_allclose(f(jnp.array([-1.0, 0.0, 2.0])), [0.0, 0.0, 4.0])


@pytest.mark.parametrize("kw", [
    dict(primer_dconv=True, mlp_activations=("squared_relu",)),
    dict(position_embedding="rope", scale_attention_logits=True,
         mlp_activations=("silu", "linear")),
    dict(position_embedding="rope", primer_dconv=True, logits_via_embedding=True,
         tied_logits_rescale=False),
])
def test_cached_decoding_equals_teacher_forcing(kw):
    m, params = _model(**kw)
    assert_cached_decoding_matches_teacher_forcing(m, params)


@pytest.mark.parametrize("kw", [dict(primer_dconv=True), dict(position_embedding="rope")])
def test_packing_and_causality_hold_for_primer_and_rope(kw):
    m, params = _model(**kw)
    rng = np.random.RandomState(0)
    t = rng.randint(3, 64, (1, 16)).astype(np.int32)
    seg = np.array([[1] * 8 + [2] * 8], np.int32)
    pos = np.array([list(range(8)) * 2], np.int32)
    inp = np.where(pos == 0, 0, np.roll(t, 1, axis=1))

    def logits(tt, ii):
        return m.logits(params, {"decoder_input_tokens": jnp.asarray(ii),
                                 "decoder_target_tokens": jnp.asarray(tt),
                                 "decoder_segment_ids": jnp.asarray(seg),
                                 "decoder_positions": jnp.asarray(pos)})

    base = logits(t, inp)
    t2, i2 = t.copy(), inp.copy()
    t2[0, 3:8] = (t2[0, 3:8] + 5) % 60 + 3
    i2[0, 4:8] = t2[0, 3:7]
    pert = logits(t2, i2)
    np.testing.assert_allclose(base[0, 8:], pert[0, 8:], atol=1e-6)  # other segment unchanged
    np.testing.assert_allclose(base[0, :4], pert[0, :4], atol=1e-6)  # earlier positions too
    # A packed second example equals the same example alone in its own row (RoPE positions
    # restart with the segment; the dconv does not see the previous example).
    alone = m.logits(params, {"decoder_input_tokens": jnp.asarray(inp[:, 8:]),
                              "decoder_target_tokens": jnp.asarray(t[:, 8:])})
    np.testing.assert_allclose(base[0, 8:], alone[0], atol=1e-5)


def test_rope_rotation_preserves_norm_and_relative_angle():
    x = jnp.asarray(np.random.RandomState(0).randn(1, 4, 1, 8), jnp.float32)
    pos = jnp.arange(4)[None]
    y = attention.rotary_embedding(x, pos)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    # <R(p)q, R(p+k)v> depends only on k.
    q, v = x[:, :1], x[:, 1:2]
    dot = lambda a, b: float(jnp.sum(a * b))  # noqa: E731
    d1 = dot(attention.rotary_embedding(q, jnp.array([[2]])),
             attention.rotary_embedding(v, jnp.array([[5]])))
    d2 = dot(attention.rotary_embedding(q, jnp.array([[10]])),
             attention.rotary_embedding(v, jnp.array([[13]])))
    assert abs(d1 - d2) < 1e-4


FULL_PRIMER = dict(primer_dconv=True, primer_share_qk=True, norm_type="primer",
                   ffn_post_norm=True, mlp_activations=("squared_relu",))


def test_full_primer_parameters_and_cached_decoding():
    m, params = _model(**FULL_PRIMER)
    layer = params["decoder"]["layers_0"]
    attn = layer["self_attention"]
    assert set(attn) == {"query", "query_dconv", "q_solo_project", "value", "value_dconv", "out"}
    assert set(layer) == {"pre_self_attention_layer_norm", "self_attention", "mlp",
                          "post_mlp_layer_norm"}
    assert set(layer["post_mlp_layer_norm"]) == {"scale", "bias"}
    assert_cached_decoding_matches_teacher_forcing(m, params, seed=5)


def test_primer_norm_is_mean_centred_pseudo_variance():
    x = jnp.asarray(np.random.RandomState(0).randn(3, 8) * 2 + 1, jnp.float32)
    norm = layers.PrimerNorm()
    v = norm.init(jax.random.PRNGKey(0), x)
    v["params"]["scale"] = nn.LogicallyPartitioned(jnp.full((8,), 2.0), ("embed",))
    v["params"]["bias"] = nn.LogicallyPartitioned(jnp.full((8,), 0.5), ("embed",))
    y = norm.apply(v, x)
    xn = np.asarray(x)
    c = xn - xn.mean(-1, keepdims=True)
    ref = c / np.sqrt((xn * c).mean(-1, keepdims=True) + 1e-6) * 2.0 + 0.5
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6)


def test_full_primer_ffn_normalises_its_output():
    """x + norm(mlp(x)): scaling the MLP's output kernel leaves the block output unchanged
    (the norm removes the scale), unlike pre-norm x + mlp(norm(x))."""
    for post, same in ((True, True), (False, False)):
        kw = dict(FULL_PRIMER, ffn_post_norm=post)
        m, params = _model(**kw)
        t = jnp.asarray(np.random.RandomState(6).randint(3, 64, (1, 8)), jnp.int32)
        b = {"decoder_input_tokens": _shift(t), "decoder_target_tokens": t}
        base = m.logits(params, b)
        p2 = jax.tree_util.tree_map(lambda a: a, params)
        for i in range(2):
            wo = p2["decoder"][f"layers_{i}"]["mlp"]["wo"]["kernel"]
            p2["decoder"][f"layers_{i}"]["mlp"]["wo"]["kernel"] = wo * 3.0
        assert np.allclose(base, m.logits(params=p2, batch=b), atol=1e-4) == same
