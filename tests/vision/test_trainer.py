"""The shared trainer with a vision model: batch norm statistics carried in the train state and
checkpointed (a restored run continues exactly), the EMA of the weights, SGD with decoupled
weight decay, and a sharded step equal to the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moetx.trainer import checkpoints, optimizers, partitioning, trainer as trainer_lib
from moetx.vision import augment, model as vision_model

SHAPES = {"image": (8, 8, 1)}


def _model(**kw):
    kw = {"model_name": "tiny/s", "label_smoothing": 0.1,
          "augment": augment.Augment(crop_padding=1, flip=True), **kw}
    return vision_model.ImageClassificationModel(**kw)


def _trainer(model, mesh_shape=(1, 1, 1), batch_size=8, ema_decay=None, ema_warmup=True,
             optimizer=None, num_microbatches=1):
    mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    factory = optimizer or (lambda param_axes: optimizers.sgd_momentum(
        optimizers.constant_schedule(0.05), weight_decay=1e-3))
    return trainer_lib.Trainer(model, factory, mesh, partitioning.standard_logical_axis_rules(),
                               model.input_shapes(batch_size, SHAPES), seed=0,
                               ema_decay=ema_decay, ema_warmup=ema_warmup,
                               num_microbatches=num_microbatches)


def _batch(seed, batch_size=8):
    rng = np.random.RandomState(seed)
    return {"image": rng.randint(0, 256, (batch_size, 8, 8, 1)).astype(np.uint8),
            "label": rng.randint(0, 10, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}


def _assert_trees_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                      np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def single():
    """One compiled single-device trainer (EMA 0.8 without warm-up) and its first 4 states."""
    trainer = _trainer(_model(), ema_decay=0.8, ema_warmup=False)
    state = trainer.init_state()
    host_states = [jax.device_get(state)]
    batches = [trainer.to_global(_batch(i)) for i in range(4)]
    for b in batches:  # (the step donates its input state: keep host copies)
        state = trainer.train_step(state, b)[0]
        host_states.append(jax.device_get(state))
    return trainer, batches, host_states


def test_batch_stats_and_ema_are_carried_checkpointed_and_resume_exactly(single, tmp_path):
    trainer, batches, host_states = single
    assert set(host_states[0].model_state) == {"batch_stats"}
    assert set(host_states[0].ema) == {"params", "model_state"}
    # The running statistics moved away from their initial values (mean 0).
    mean0 = host_states[0].model_state["batch_stats"]["bn0"]["mean"]
    assert np.abs(host_states[4].model_state["batch_stats"]["bn0"]["mean"] - mean0).max() > 1e-3

    ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1)
    ckpt.save(2, jax.device_put(host_states[2], trainer.state_shardings),
              {"batches_consumed": 2})
    restored, data_state = ckpt.restore(2, trainer.abstract_state_with_shardings())
    ckpt.close()
    assert data_state == {"batches_consumed": 2}
    _assert_trees_equal(host_states[2], jax.device_get(restored))
    for b in batches[2:]:
        restored, _ = trainer.train_step(restored, b)
    _assert_trees_equal(host_states[4], jax.device_get(restored))

    # Parts of the state restore on their own (what `eval.py` does).
    parts, step = checkpoints.restore_subtrees(
        str(tmp_path), None, {"model_state": trainer.abstract_state_with_shardings().model_state})
    assert step == 2
    _assert_trees_equal(parts["model_state"], host_states[2].model_state)


def test_ema_follows_the_recursion(single):
    trainer, _, host_states = single
    ema = {"params": host_states[0].params, "model_state": host_states[0].model_state}
    for st in host_states[1:]:
        ema = jax.tree_util.tree_map(lambda e, x: 0.8 * e + 0.2 * x, ema,
                                     {"params": st.params, "model_state": st.model_state})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           ema, host_states[4].ema)
    # Evaluation takes the EMA's weights and statistics.
    last = host_states[4]
    params, model_state = trainer.eval_variables(last)
    assert params is last.ema["params"] and model_state is last.ema["model_state"]
    assert trainer.eval_variables(last, use_ema=False)[0] is last.params


def test_ema_warmup_decay_and_validation():
    warm = _trainer(_model(), ema_decay=0.9999)
    np.testing.assert_allclose([float(warm.ema_decay_at(t)) for t in (0, 10, 10 ** 6)],
                               [1 / 10, 11 / 20, 0.9999], rtol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        _trainer(_model(), ema_decay=1.0)


def test_lm_states_stay_empty():
    from tests.conftest import make_trainer, tiny_model

    abstract = make_trainer(tiny_model(), (1, 1, 1)).abstract_state
    assert abstract.model_state == {} and abstract.ema == {}


def test_sgd_momentum_with_decoupled_weight_decay():
    opt = optimizers.sgd_momentum(optimizers.constant_schedule(0.5), momentum=0.9,
                                  nesterov=False, weight_decay=0.1)
    params = {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}
    grads = {"kernel": jnp.full((2, 2), 0.2), "bias": jnp.full((2,), 0.2)}
    st = opt.tx.init(params)
    p = params
    m = 0.0
    pk, pb = 1.0, 1.0
    for _ in range(2):
        u, st = opt.tx.update(grads, st, p)
        p = optax.apply_updates(p, u)
        m = 0.9 * m + 0.2
        pk = pk - 0.5 * (m + 0.1 * pk)  # kernels decay ...
        pb = pb - 0.5 * m               # ... biases do not.
    np.testing.assert_allclose(p["kernel"], pk, rtol=1e-6)
    np.testing.assert_allclose(p["bias"], pb, rtol=1e-6)


def test_sharded_step_equals_single_device(single):
    _, batches, host_states = single
    trainer = _trainer(_model(), (4, 1, 1), ema_decay=0.8, ema_warmup=False)
    for leaf in jax.tree_util.tree_leaves(trainer.state_shardings.model_state):
        assert leaf.is_fully_replicated
    state = trainer.init_state()
    for b in batches[:2]:
        state, _ = trainer.train_step(state, trainer.to_global(jax.device_get(b)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           host_states[2], jax.device_get(state))
