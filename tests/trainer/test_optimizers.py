"""Adafactor with T5X's defaults and logical-axis factoring; schedules; AdamW state layout."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moetx.trainer import optimizers


def _numpy_adafactor_step(p, g, lr, factored_axes, batch_axes=()):
    """T5X Adafactor, first step (beta2 = 1 - 1^-0.8 = 0: the moments are g^2 + eps1). The
    parameter scale and the clipping average over every axis but the BATCH ones."""
    mean_axes = tuple(i for i in range(p.ndim) if i not in batch_axes)
    g_sq = g ** 2 + 1e-30
    if factored_axes is None:
        y = g / np.sqrt(g_sq)
    else:
        row, col = factored_axes
        v_row = g_sq.mean(axis=col)
        v_col = g_sq.mean(axis=row)
        r_axis = row - (col < row)
        row_factor = 1 / np.sqrt(v_row / v_row.mean(axis=r_axis, keepdims=True))
        y = g * np.expand_dims(row_factor, col) * np.expand_dims(1 / np.sqrt(v_col), row)
    y = y / np.maximum(1.0, np.sqrt((y ** 2).mean(axis=mean_axes, keepdims=True)) / 1.0)
    scale = np.maximum(np.sqrt((p ** 2).mean(axis=mean_axes, keepdims=True)), 1e-3)
    return p - lr * scale * y


def test_factoring_follows_logical_axes():
    params = {"wi": jnp.ones((256, 512)), "expert_wi": jnp.ones((4, 256, 512)),
              "small": jnp.ones((64, 64)), "scale": jnp.ones((256,)),
              "embedding": jnp.ones((1024, 256))}
    axes = {"wi": P("embed", "mlp"), "expert_wi": P("expert", "embed", "mlp"),
            "small": P("embed", "mlp"), "scale": P("embed"),
            "embedding": P("vocab", "embed")}
    opt = optimizers.adafactor(optimizers.constant_schedule(0.1), param_axes=axes)
    state = opt.tx.init(params)
    shapes = lambda t: {k: v.shape for k, v in t.items()}  # noqa: E731
    assert shapes(state.v_row) == {"wi": (256,), "expert_wi": (4, 256), "small": (1,),
                                   "scale": (1,), "embedding": (256,)}
    assert shapes(state.v_col) == {"wi": (512,), "expert_wi": (4, 512), "small": (1,),
                                   "scale": (1,), "embedding": (1024,)}
    assert state.v["small"].shape == (64, 64) and state.v["wi"].shape == (1,)
    # The optimizer state's logical axes mirror the factoring (expert stays a batch axis).
    st_axes = opt.state_axes(axes, params)
    assert st_axes.v_row["expert_wi"] == P("expert", "embed")
    assert st_axes.v_col["expert_wi"] == P("expert", "mlp")
    assert st_axes.v["small"] == P("embed", "mlp")


def test_a_stacked_parameter_is_updated_as_its_layers_would_be():
    """Scanned layers (`layers` axis) and stacked experts (`expert` axis): Adafactor's moments,
    parameter scale and update clipping are per slice, so the stacked update equals the updates
    of the unstacked slices (the layers differ in scale, so a whole-array mean would not)."""
    rng = np.random.RandomState(1)
    layers = [jnp.asarray(rng.randn(128, 192) * s, jnp.float32) for s in (0.01, 0.3, 3.0)]
    grads = [jnp.asarray(rng.randn(128, 192) * s, jnp.float32) for s in (1.0, 50.0, 0.02)]
    scales = [jnp.asarray(rng.rand(16) * s, jnp.float32) for s in (0.1, 1.0, 9.0)]
    scale_grads = [jnp.asarray(rng.randn(16), jnp.float32) for _ in range(3)]
    opt = optimizers.adafactor(optimizers.constant_schedule(0.01), param_axes={
        "w": P("layers", "embed", "mlp"), "scale": P("layers", "embed")})
    stacked = {"w": jnp.stack(layers), "scale": jnp.stack(scales)}
    state = opt.tx.init(stacked)
    assert state.v_row["w"].shape == (3, 128) and state.v["scale"].shape == (3, 16)
    single = optimizers.adafactor(optimizers.constant_schedule(0.01), param_axes={
        "w": P("embed", "mlp"), "scale": P("embed")})
    single_states = [single.tx.init({"w": w, "scale": s}) for w, s in zip(layers, scales)]
    for _ in range(3):
        updates, state = opt.tx.update(
            {"w": jnp.stack(grads), "scale": jnp.stack(scale_grads)}, state, stacked)
        for i in range(3):
            one, single_states[i] = single.tx.update(
                {"w": grads[i], "scale": scale_grads[i]}, single_states[i],
                {"w": stacked["w"][i], "scale": stacked["scale"][i]})
            np.testing.assert_allclose(updates["w"][i], one["w"], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(updates["scale"][i], one["scale"], rtol=1e-6, atol=1e-9)
        stacked = jax.tree_util.tree_map(lambda p, u: p + u, stacked, updates)


def test_first_step_matches_the_t5x_formula():
    rng = np.random.RandomState(0)
    params = {"wi": jnp.asarray(rng.randn(128, 256) * 0.05, jnp.float32),
              "expert_wi": jnp.asarray(rng.randn(2, 128, 256) * 0.05, jnp.float32),
              "scale": jnp.asarray(rng.rand(16), jnp.float32)}
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32),
                                   params)
    axes = {"wi": P("embed", "mlp"), "expert_wi": P("expert", "embed", "mlp"),
            "scale": P("embed")}
    lr = 0.01
    opt = optimizers.adafactor(optimizers.constant_schedule(lr), param_axes=axes)
    updates, state = opt.tx.update(grads, opt.tx.init(params), params)
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(
        new["wi"], _numpy_adafactor_step(np.asarray(params["wi"]), np.asarray(grads["wi"]), lr,
                                         (0, 1)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        new["expert_wi"], _numpy_adafactor_step(np.asarray(params["expert_wi"]),
                                                np.asarray(grads["expert_wi"]), lr, (1, 2),
                                                batch_axes=(0,)),
        rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        new["scale"], _numpy_adafactor_step(np.asarray(params["scale"]),
                                            np.asarray(grads["scale"]), lr, None),
        rtol=1e-5, atol=1e-7)
    assert int(state.count) == 1


def test_second_moment_decay_rate():
    # beta2_t = 1 - (t+1)^-0.8: at step 1 (t=1) the old moment keeps weight 1 - 2^-0.8.
    p = {"w": jnp.ones((3,))}
    opt = optimizers.adafactor(optimizers.constant_schedule(0.0), param_axes={"w": P("embed")})
    s = opt.tx.init(p)
    _, s = opt.tx.update({"w": jnp.full((3,), 2.0)}, s, p)
    _, s = opt.tx.update({"w": jnp.full((3,), 1.0)}, s, p)
    beta = 1 - 2 ** -0.8
    np.testing.assert_allclose(s.v["w"], beta * 4.0 + (1 - beta) * 1.0, rtol=1e-6)


def test_rsqrt_schedule_is_t5x_default():
    sched = optimizers.rsqrt_schedule(1.0, 10000)
    np.testing.assert_allclose([float(sched(0)), float(sched(5000))], [0.01, 0.01], rtol=1e-6)
    np.testing.assert_allclose(float(sched(40000)), 0.005)


def test_warmup_cosine_schedule():
    sched = optimizers.warmup_cosine_schedule(1e-3, 10, 110, 0.1)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)


def test_adamw_state_is_laid_out_like_params():
    params = {"wi": jnp.ones((8, 16))}
    axes = {"wi": P("embed", "mlp")}
    opt = optimizers.adamw(optimizers.constant_schedule(1e-3))
    st_axes = opt.state_axes(axes, params)
    leaves = jax.tree_util.tree_leaves(st_axes, is_leaf=lambda x: isinstance(x, P))
    assert P("embed", "mlp") in leaves  # mu and nu
    u, _ = opt.tx.update({"wi": jnp.ones((8, 16))}, opt.tx.init(params), params)
    assert u["wi"].shape == (8, 16)
