"""Sharded training on 8 simulated CPU devices equals single-device training, and parameters
are laid out as the logical axis rules say."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetx.trainer import partitioning
from tests.conftest import make_trainer, packed_batch, tiny_model


def _loss_and_grads(trainer, batch):
    model = trainer.model

    def f(params, b):
        with nn.logical_axis_rules(trainer.rules):
            w, factor = model.loss_weights_and_factor(b)
            return jax.value_and_grad(lambda p: model.loss_fn(p, b, None, w, factor)[0])(params)

    state = trainer.init_state()
    with trainer.mesh:
        fn = jax.jit(f, in_shardings=(trainer.state_shardings.params, trainer.batch_shardings))
        return jax.device_get(fn(state.params, trainer.to_global(batch))), state


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "tests/conftest.py must set 8 simulated devices"
    model = tiny_model()
    batch = packed_batch(8, 32, seed=1)
    (loss, grads), _ = _loss_and_grads(make_trainer(model, (1, 1, 1)), batch)
    return model, batch, loss, grads


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 1, 4), (1, 1, 8), (2, 2, 2)])
def test_loss_and_grads_match_single_device(reference, mesh_shape):
    model, batch, ref_loss, ref_grads = reference
    (loss, grads), _ = _loss_and_grads(make_trainer(model, mesh_shape), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                           grads, ref_grads)


def test_parameters_are_sharded_by_the_rules():
    trainer = make_trainer(tiny_model(), (2, 1, 4))
    state = trainer.init_state()
    layer = state.params["decoder"]["layers_0"]
    wi = layer["mlp"]["wi_0"]["kernel"]  # logical (embed, mlp): mlp -> model
    assert wi.sharding.spec == P(None, "model")
    assert {s.data.shape for s in wi.addressable_shards} == {(32, 16)}
    q = layer["self_attention"]["query"]["kernel"]  # (embed, joined_kv)
    assert {s.data.shape for s in q.addressable_shards} == {(32, 8)}
    emb = state.params["decoder"]["token_embedder"]["embedding"]  # (vocab, embed)
    assert emb.sharding.spec == P("model", None)
    norm = layer["pre_mlp_layer_norm"]["scale"]
    assert norm.sharding.is_fully_replicated
    # Batches are split over the data (and expert) axes.
    b = trainer.to_global(packed_batch(8, 32))
    assert {s.data.shape for s in b["decoder_target_tokens"].addressable_shards} == {(4, 32)}


def test_fsdp_rules_shard_embed_over_data():
    trainer = make_trainer(tiny_model(), (2, 1, 4), fsdp=True)
    state = trainer.init_state()
    wi = state.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    # embed over every batch-parallel axis (data x expert; expert has size 1 here).
    assert wi.sharding.spec == P(("data", "expert"), "model")
    assert {s.data.shape for s in wi.addressable_shards} == {(16, 16)}
    embed_rules = [v for k, v in partitioning.standard_logical_axis_rules(fsdp=True)
                   if k == "embed"]
    assert embed_rules == [("data", "expert"), "data"]
    # An expert kernel's `expert` dimension takes that axis: its embed falls back to `data`.
    spec = nn.logical_to_mesh_axes(
        ("expert", "embed", "expert_mlp"), partitioning.standard_logical_axis_rules(fsdp=True))
    assert spec == P("expert", "data", "model")
    # Activations keep their batch sharding: embed finds no free axis there.
    assert nn.logical_to_mesh_axes(
        ("batch", "length", "embed"), partitioning.standard_logical_axis_rules(fsdp=True)) == P(
        ("data", "expert"), None, None)


def test_train_step_matches_across_meshes():
    model = tiny_model()
    batch = packed_batch(8, 32, seed=2)
    results = []
    for shape in [(1, 1, 1), (2, 1, 4)]:
        trainer = make_trainer(model, shape)
        state = trainer.init_state()
        state, sums = trainer.train_step(state, trainer.to_global(batch))
        results.append((float(sums["loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           results[0][1], results[1][1])


def test_batch_not_divisible_by_data_shards_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        make_trainer(tiny_model(), (8, 1, 1), batch_size=4)


def test_optimizer_state_is_sharded_like_its_parameter():
    trainer = make_trainer(tiny_model(), (2, 1, 4))
    shardings = trainer.state_shardings.opt_state
    v = shardings.v["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # unfactored (dims < 128)
    assert isinstance(v, NamedSharding) and v.spec == P(None, "model")
