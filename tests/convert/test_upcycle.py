"""Sparse upcycling: experts tiled from the dense MLP, fresh router, exact equivalence at start."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import models, transformer
from moetx.moe import layers as moe_layers
from moetx.convert.errors import ConversionError
from moetx.convert.upcycle import upcycle_params

DENSE = transformer.TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                                      mlp_dim=32, num_decoder_layers=4)


def _params(model, seed):
    v = model.get_initial_variables(jax.random.PRNGKey(seed), model.input_shapes(2, 16))
    return jax.tree_util.tree_map(np.asarray, nn.unbox(v["params"]))


def test_upcycled_model_equals_the_dense_model_at_start():
    # Renormalised top-1 gates are 1 and capacity covers every token: each token's MoE output is
    # its (identical) expert's output, i.e. the dense MLP's.
    moe = moe_layers.MoeConfig(num_experts=4, num_selected_experts=1, sparse_every=2,
                               renormalize_top_k_gates=True, eval_capacity_factor=4.0,
                               group_size=32)
    dense_model = models.DecoderOnlyModel(DENSE)
    moe_model = models.DecoderOnlyModel(dataclasses.replace(DENSE, moe=moe))
    dense_p = _params(dense_model, 0)
    up = upcycle_params(dense_p, _params(moe_model, 1))
    kernel = up["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
    assert kernel.shape == (4, 16, 32)
    for e in range(4):
        np.testing.assert_array_equal(kernel[e], dense_p["decoder"]["layers_1"]["mlp"]["wi_0"]
                                      ["kernel"])
    t = jnp.asarray(np.random.RandomState(0).randint(3, 64, (2, 16)), jnp.int32)
    batch = {"decoder_target_tokens": t,
             "decoder_input_tokens": jnp.concatenate([jnp.zeros((2, 1), jnp.int32), t[:, :-1]],
                                                     1)}
    np.testing.assert_allclose(moe_model.logits(up, batch), dense_model.logits(dense_p, batch),
                               atol=1e-5)


def test_mismatched_dense_checkpoint_is_refused_with_the_keys():
    moe_model = models.DecoderOnlyModel(dataclasses.replace(
        DENSE, moe=moe_layers.MoeConfig(num_experts=2, sparse_every=2)))
    other = models.DecoderOnlyModel(dataclasses.replace(DENSE, mlp_dim=48))
    with pytest.raises(ConversionError, match="wi_0/kernel"):
        upcycle_params(_params(other, 0), _params(moe_model, 1))
