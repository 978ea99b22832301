"""MoeLayer: dispatch paths agree, capacity drops give exactly zero, expert parallelism is exact,
sparse layouts and router metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moetx.lm import models, transformer
from moetx.moe import layers as moe_layers
from moetx.trainer import partitioning
from moetx.util import platform as platform_lib
from tests.conftest import make_trainer, packed_batch


def _layer(dispatch="masked", **kw):
    cfg = dict(num_experts=4, num_selected_experts=2, dispatch=dispatch, group_size=16,
               train_capacity_factor=4.0, eval_capacity_factor=4.0, sparse_every=1)
    cfg.update(kw)
    return moe_layers.MoeLayer(moe_layers.MoeConfig(**cfg), 8, 16, ("gelu", "linear"))


def _init(layer, x):
    return layer.init({"params": jax.random.PRNGKey(0)}, x)["params"]


@pytest.fixture(scope="module")
def layer_input_and_params():
    """One input and one initialisation for both k (the parameters do not depend on k)."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 8), jnp.float32)
    return x, _init(_layer(), x)


@pytest.mark.parametrize("k", [1, 2])
def test_masked_scatter_dropless_agree_without_drops(k, layer_input_and_params):
    x, params = layer_input_and_params
    # The output and its gradient from one jitted program per path (op by op, every primitive
    # is compiled on its own: several times slower).
    outs, grads = [], []
    for dispatch in ("masked", "scatter", "dropless"):
        layer = _layer(dispatch, num_selected_experts=k)

        def f(p, x, layer=layer):
            y = layer.apply({"params": p}, x)
            return jnp.sum(jnp.sin(y)), y

        (_, out), grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
        outs.append(out)
        grads.append(grad)
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)
    for g in grads[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                               g, grads[0])


def test_auto_dispatch_is_scatter_on_cpus_and_masked_elsewhere(layer_input_and_params):
    """The default `dispatch='auto'` runs the scatter path when traced for CPUs and the masked
    one for TPUs and GPUs (`moetx.util.platform.trace_for`) and under experts-choose routing; explicit
    values are kept; the two traces compute the same output."""
    x, params = layer_input_and_params
    cfg = moe_layers.MoeConfig()
    assert cfg.dispatch == "auto"
    resolve = moe_layers.resolve_dispatch
    assert [resolve(cfg, p) for p in ("cpu", "gpu", "tpu")] == ["scatter", "masked", "masked"]
    experts_choose = moe_layers.MoeConfig(router_type="experts_choose")
    assert resolve(experts_choose, "cpu") == "masked"
    for d in ("masked", "scatter", "dropless"):
        assert resolve(moe_layers.MoeConfig(dispatch=d), "tpu") == d
    assert jax.default_backend() == "cpu" and resolve(cfg) == "scatter"
    with platform_lib.trace_for("tpu"):
        assert resolve(cfg) == "masked"
    assert resolve(cfg) == "scatter"

    layer = _layer("auto")
    traced, outs = {}, {}
    for platform in ("cpu", "tpu"):
        # A new function per platform: JAX's trace cache does not key on the platform set.
        apply = lambda p, x: layer.apply({"params": p}, x)  # noqa: E731
        with platform_lib.trace_for(platform):
            traced[platform] = str(jax.make_jaxpr(apply)(params, x))
            outs[platform] = jax.jit(apply)(params, x)
    assert "scatter-add" in traced["cpu"] and "scatter-add" not in traced["tpu"]
    np.testing.assert_allclose(outs["cpu"], outs["tpu"], atol=1e-5)
    with pytest.raises(ValueError, match="'auto', 'masked', 'scatter', 'dropless'"):
        moe_layers.MoeConfig(dispatch="einsum")
    with pytest.raises(ValueError, match="only the masked"):
        moe_layers.MoeConfig(router_type="experts_choose", dispatch="scatter")


def _identity_layer(capacity_factor):
    cfg = moe_layers.MoeConfig(num_experts=4, num_selected_experts=1, group_size=8,
                               train_capacity_factor=capacity_factor,
                               eval_capacity_factor=capacity_factor, min_expert_capacity=1,
                               renormalize_top_k_gates=True, sparse_every=1)
    layer = moe_layers.MoeLayer(cfg, 4, 4, ("linear",))
    x = jnp.asarray(np.random.RandomState(1).rand(1, 8, 4) + 0.5, jnp.float32)
    params = nn.unbox(_init(layer, x))
    eye = jnp.broadcast_to(jnp.eye(4), (4, 4, 4))
    params["expert"]["wi"]["kernel"] = eye
    params["expert"]["wo"]["kernel"] = eye
    # Every token prefers expert 0 (positive inputs, a large expert-0 column).
    params["router"]["router_weights"]["w"]["kernel"] = jnp.zeros((4, 4)).at[:, 0].set(5.0)
    return layer, params, x


def test_identity_experts_return_routed_tokens_unchanged():
    layer, params, x = _identity_layer(capacity_factor=8.0)  # capacity 16: nothing drops
    np.testing.assert_allclose(layer.apply({"params": params}, x), x, rtol=1e-6)


def test_capacity_toy_drops_overflow_to_exact_zero():
    # One group of 8 tokens, 4 experts, CF 1.0 -> capacity 2; all prefer expert 0.
    layer, params, x = _identity_layer(capacity_factor=1.0)
    y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    kept = np.asarray(jnp.any(y[0] != 0, axis=-1))
    assert kept.tolist() == [True, True] + [False] * 6  # first two in token order
    np.testing.assert_allclose(y[0, :2], x[0, :2], rtol=1e-6)
    assert np.all(np.asarray(y[0, 2:]) == 0.0)
    dropped = state["intermediates"]["moe_fraction_dropped"][0]
    assert float(dropped) == pytest.approx(6 / 8)


def test_bpr_is_refused_in_a_causal_decoder_and_experts_choose_too():
    x = jnp.ones((1, 8, 8))
    with pytest.raises(ValueError, match="batch_prioritized_routing"):
        _layer(batch_prioritized_routing=True).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError):
        _layer(router_type="experts_choose").init(jax.random.PRNGKey(0), x)


def test_sparse_layout_every_kth_layer_and_extra_mlp():
    moe = moe_layers.MoeConfig(num_experts=4, sparse_every=4, extra_mlp=True)
    assert [i for i in range(12) if moe.is_sparse(i)] == [3, 7, 11]
    cfg = transformer.TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                                        mlp_dim=32, num_decoder_layers=4, moe=moe)
    m = models.DecoderOnlyModel(cfg)
    p = nn.unbox(m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(2, 8))["params"])
    layers_ = p["decoder"]
    assert "expert" in layers_["layers_3"]["mlp"] and "extra_mlp" in layers_["layers_3"]
    assert "expert" not in layers_["layers_2"]["mlp"] and "extra_mlp" not in layers_["layers_2"]
    assert layers_["layers_3"]["mlp"]["expert"]["wi_0"]["kernel"].shape == (4, 16, 32)


def _moe_model(**moe_kw):
    moe = moe_layers.MoeConfig(**{**dict(num_experts=4, num_selected_experts=2, sparse_every=2,
                                         group_size=32, train_capacity_factor=1.25,
                                         eval_capacity_factor=2.0, jitter_noise=0.0), **moe_kw})
    cfg = transformer.TransformerConfig(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8,
                                        mlp_dim=64, num_decoder_layers=2, moe=moe)
    return models.DecoderOnlyModel(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")


def _loss_and_grads(trainer, params, batch):
    """Loss and gradients of `params`, placed in the trainer's parameter shardings (the layout
    `init_state` creates them in), computed under its mesh and rules; and the placed params."""
    model = trainer.model

    def f(params, b):
        with nn.logical_axis_rules(trainer.rules):
            w, factor = model.loss_weights_and_factor(b)
            return jax.value_and_grad(
                lambda p: model.loss_fn(p, b, jax.random.PRNGKey(3), w, factor)[0])(params)

    placed = jax.device_put(params, trainer.state_shardings.params)
    with trainer.mesh:
        fn = jax.jit(f, in_shardings=(trainer.state_shardings.params, trainer.batch_shardings))
        return jax.device_get(fn(placed, trainer.to_global(batch))), placed


def test_expert_parallelism_matches_single_device():
    model = _moe_model()
    batch = packed_batch(8, 32, seed=4)
    # One initialisation for both layouts (rather than two `init_state` programs to compile).
    params = nn.unbox(jax.jit(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), model.input_shapes(8, 32))["params"])())
    (ref_loss, ref_grads), _ = _loss_and_grads(make_trainer(model, (1, 1, 1)), params, batch)
    (loss, grads), placed = _loss_and_grads(make_trainer(model, (2, 4, 1)), params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                           grads, ref_grads)
    wi = placed["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
    assert wi.sharding.spec == P("expert", None, "model")  # expert_mlp -> model (size 1 here)
    assert {s.data.shape for s in wi.addressable_shards} == {(1, 32, 64)}


def test_router_losses_are_in_the_loss_and_jitter_needs_its_rng():
    model = _moe_model()
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 32, seed=5).items()}
    # Jitted (op by op, every primitive of the decoder would be compiled on its own).
    params = nn.unbox(jax.jit(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), model.input_shapes(4, 32))["params"])())
    w, f = model.loss_weights_and_factor(batch)
    loss, (sums, _) = jax.jit(
        lambda p, b, rng: model.loss_fn(p, b, rng, w, f))(params, batch, jax.random.PRNGKey(1))
    expected = (sums["cross_ent_sum"] + sums["z_loss_sum"]) / f + (
        1e-2 * sums["moe_aux_loss"] + 1e-3 * sums["moe_router_z_loss"])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert {"moe/decoder/layers_1/mlp/expert_usage", "moe_aux_loss"} <= set(sums)
    jittery = models.DecoderOnlyModel(transformer.TransformerConfig(
        **{**model.config.__dict__,
           "moe": moe_layers.MoeConfig(**{**model.config.moe.__dict__, "jitter_noise": 0.1})}),
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    jittery_loss = jax.jit(lambda p, b, rng: jittery.loss_fn(p, b, rng, w, f)[0])
    a = jittery_loss(params, batch, jax.random.PRNGKey(1))
    b = jittery_loss(params, batch, jax.random.PRNGKey(2))
    assert float(a) != float(b)  # jitter is applied in training (it has its rng stream)
    np.testing.assert_allclose(jax.jit(jittery.eval_fn)(params, batch)["cross_ent_sum"],
                               jax.jit(model.eval_fn)(params, batch)["cross_ent_sum"],
                               rtol=1e-6)


def test_rules_place_expert_buffers():
    rules = dict(partitioning.standard_logical_axis_rules())
    assert rules["expert"] == "expert" and rules["expert_replicas"] == "data"


def test_group_count_divides_or_pads_as_t5x():
    assert moe_layers.num_groups(30, 8, 1) == (5, 6)  # divides: groups of 6 (>= 8 / 2)
    assert moe_layers.num_groups(7, 4, 2) == (2, 4)  # prime: 2 groups of 4, one padding token
    assert moe_layers.num_groups(256, 32, 8) == (8, 32)


def test_fixed_grouping_cuts_consecutive_tokens_whatever_the_mesh():
    assert moe_layers.num_groups(256, 64, 1, "fixed") == (4, 64)
    assert moe_layers.num_groups(256, 64, 8, "fixed") == (8, 64)  # 4 real + 4 empty groups
    assert moe_layers.num_groups(100, 64, 2, "fixed") == (2, 64)  # the last group padded
    assert moe_layers.num_groups(20, 64, 4, "fixed") == (4, 20)
    # 'mesh' grouping of the same 256 tokens: 4 x 64 on one shard, 8 x 32 on eight.
    assert moe_layers.num_groups(256, 64, 1) == (4, 64)
    assert moe_layers.num_groups(256, 64, 8) == (8, 32)
    with pytest.raises(ValueError, match="grouping must be 'mesh' or 'fixed'"):
        moe_layers.MoeConfig(grouping="static")


def test_fixed_grouping_computes_the_same_loss_on_every_mesh():
    """256 tokens, groups of 64: under 'mesh' grouping a (2, 4, 1) mesh routes 8 x 32 and a
    (1, 1, 1) mesh 4 x 64, so capacity, drops and the router losses differ; 'fixed' routes
    4 x 64 on both (plus 4 empty groups on eight shards) and gives the same loss."""
    batch = packed_batch(8, 32, seed=4)
    losses = {}
    for grouping in ("mesh", "fixed"):
        model = _moe_model(group_size=64, grouping=grouping, train_capacity_factor=1.0)
        params = nn.unbox(jax.jit(lambda: model.get_initial_variables(
            jax.random.PRNGKey(0), model.input_shapes(8, 32))["params"])())
        losses[grouping] = [
            float(_loss_and_grads(make_trainer(model, mesh), params, batch)[0][0])
            for mesh in ((1, 1, 1), (2, 4, 1))]
    one, eight = losses["fixed"]
    np.testing.assert_allclose(eight, one, rtol=2e-6)
    one, eight = losses["mesh"]
    assert abs(eight - one) > 1e-5 * abs(one), losses  # the grouping the option removes
    np.testing.assert_allclose(losses["fixed"][0], losses["mesh"][0], rtol=2e-6)  # same groups


def test_dropless_router_confidence_leaves_padding_out():
    """7 tokens in groups of 4 (one padding slot): top-1 confidence is the mean gate of the 7
    real tokens, computed here from the router's probabilities."""
    layer = _layer("dropless", num_selected_experts=1, group_size=4)
    x = jnp.asarray(np.random.RandomState(3).randn(1, 7, 8), jnp.float32)
    params = nn.unbox(_init(layer, x))
    _, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    logits = x.reshape(7, 8) @ params["router"]["router_weights"]["w"]["kernel"]
    expected = np.mean(np.max(jax.nn.softmax(logits, axis=-1), axis=-1))
    np.testing.assert_allclose(state["intermediates"]["moe_router_confidence"][0], expected,
                               rtol=1e-5)


def test_padding_tokens_take_no_capacity():
    """7 tokens (prime) in groups of 4: one padding token. With identity experts every real
    token comes back unchanged, so the padding neither displaced nor mixed into them."""
    cfg = moe_layers.MoeConfig(num_experts=4, num_selected_experts=1, group_size=4,
                               train_capacity_factor=4.0, eval_capacity_factor=4.0,
                               min_expert_capacity=1, renormalize_top_k_gates=True,
                               sparse_every=1)
    layer = moe_layers.MoeLayer(cfg, 4, 4, ("linear",))
    x = jnp.asarray(np.random.RandomState(2).rand(1, 7, 4) + 0.5, jnp.float32)
    params = nn.unbox(_init(layer, x))
    eye = jnp.broadcast_to(jnp.eye(4), (4, 4, 4))
    params["expert"]["wi"]["kernel"] = eye
    params["expert"]["wo"]["kernel"] = eye
    y, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    np.testing.assert_allclose(y, x, rtol=1e-6)
    assert float(state["intermediates"]["moe_fraction_dropped"][0]) == 0.0


def test_encoder_moe_override_allows_experts_choose_in_the_encoder():
    dec_moe = moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, sparse_every=2,
                                   group_size=16)
    enc_moe = moe_layers.MoeConfig(num_experts=4, router_type="experts_choose",
                                   sparse_every=2, group_size=16, eval_capacity_factor=1.0)
    base = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                num_encoder_layers=2, num_decoder_layers=2)
    m = models.EncoderDecoderModel(transformer.TransformerConfig(
        **base, moe=dec_moe, encoder_moe=enc_moe))
    shapes = m.input_shapes(2, {"inputs": 8, "targets": 8})
    v = m.get_initial_variables(jax.random.PRNGKey(0), shapes)
    batch = {k: jnp.ones(s, jnp.int32) for k, s in shapes.items()}
    w, f = m.loss_weights_and_factor(batch)
    loss, (sums, _) = m.loss_fn(nn.unbox(v["params"]), batch, None, w, f)
    assert np.isfinite(float(loss)) and "moe/encoder/layers_1/mlp/aux_loss" in sums
    with pytest.raises(ValueError):  # experts-choose would break causality in the decoder
        bad = models.EncoderDecoderModel(transformer.TransformerConfig(**base, moe=enc_moe))
        bad.get_initial_variables(jax.random.PRNGKey(0), shapes)
