"""PowerSign and AddSign (Neural Optimizer Search): TensorFlow's reference trajectories, the sign
decays against their formulas, and training through the trainer like any optimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moetx.trainer import optimizers
from tests.conftest import make_trainer, packed_batch, tiny_model

# TensorFlow's test recipe: p = [1, 2], g = [0.1, 0.1] for four steps then -g for three,
# lr 0.1, beta 0.9: the trajectory of p[0] after each step.
POWERSIGN_P0 = [0.972817, 0.945634, 0.918452, 0.891269, 0.894948, 0.898626, 0.925809]
ADDSIGN_P0 = [0.98, 0.96, 0.94, 0.92, 0.92, 0.92, 0.94]


def _trajectory(opt: optimizers.Optimizer, steps: int = 7) -> np.ndarray:
    params = {"p": jnp.asarray([1.0, 2.0], jnp.float32)}
    state = opt.tx.init(params)
    out = []
    for i in range(steps):
        g = {"p": jnp.asarray([0.1, 0.1], jnp.float32) * (1.0 if i < 4 else -1.0)}
        updates, state = opt.tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["p"]))
    return np.stack(out)


def _reference(rule: str, decay=lambda t: 1.0, steps: int = 7, lr=0.1, beta=0.9):
    """The update rule written out in numpy, step by step."""
    p, m, out = np.asarray([1.0, 2.0]), np.zeros(2), []
    for t in range(steps):
        g = np.full(2, 0.1) * (1.0 if t < 4 else -1.0)
        m = beta * m + (1 - beta) * g
        agree = np.sign(g) * np.sign(m)
        mult = math.e ** (decay(t) * agree) if rule == "powersign" else 1.0 + decay(t) * agree
        p = p - lr * mult * g
        out.append(p.copy())
    return np.stack(out)


def test_powersign_and_addsign_reproduce_tensorflows_trajectories():
    constant = optimizers.constant_schedule(0.1)
    ps = _trajectory(optimizers.powersign(constant))
    adds = _trajectory(optimizers.addsign(constant))
    np.testing.assert_allclose(ps[:, 0], POWERSIGN_P0, atol=1e-6)
    np.testing.assert_allclose(adds[:, 0], ADDSIGN_P0, atol=1e-6)
    np.testing.assert_allclose(ps, _reference("powersign"), atol=1e-6)
    np.testing.assert_allclose(adds, _reference("addsign"), atol=1e-6)


def test_powersign_with_linear_decay_reaches_the_reference_value():
    opt = optimizers.powersign(optimizers.constant_schedule(0.1),
                               sign_decay=optimizers.linear_sign_decay(10))
    traj = _trajectory(opt)
    assert round(float(traj[-1, 0]), 4) == 0.9323
    np.testing.assert_allclose(traj, _reference("powersign", lambda t: (10 - t) / 10), atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 3, 5, 7, 10, 12])
def test_sign_decays_follow_their_formulas(t):
    T = 10
    assert float(optimizers.linear_sign_decay(T)(t)) == pytest.approx(max(0.0, (T - min(t, T)) / T))
    for periods in (0.5, 2.0):
        expect = 0.5 * (1 + math.cos(2 * math.pi * periods * min(t, T) / T))
        assert float(optimizers.cosine_sign_decay(T, periods)(t)) == pytest.approx(expect,
                                                                                  abs=1e-6)
        expect = 0.5 * (1 + math.cos(math.pi * ((periods * min(t, T)) % T) / T))
        assert float(optimizers.restart_sign_decay(T, periods)(t)) == pytest.approx(expect,
                                                                                   abs=1e-6)
    cut = optimizers.cosine_sign_decay(T, 1.0, zero_after=0.5)(t)
    assert float(cut) == (0.0 if 2 * min(t, T) / T >= 1.0 else pytest.approx(
        0.5 * (1 + math.cos(2 * math.pi * min(t, T) / T)), abs=1e-6))
    cut = optimizers.restart_sign_decay(T, 2.0, zero_after=1.0)(t)
    assert (float(cut) == 0.0) == (2.0 * min(t, T) / T >= 1.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay_steps"):
        optimizers.linear_sign_decay(0)
    with pytest.raises(ValueError, match="beta"):
        optimizers.scale_by_sign_agreement("powersign", beta=1.0)
    with pytest.raises(ValueError, match="rule"):
        optimizers.scale_by_sign_agreement("signum")


def test_trains_a_sharded_model_with_state_laid_out_like_the_parameters():
    opt = lambda param_axes: optimizers.addsign(  # noqa: E731
        optimizers.constant_schedule(3e-3), param_axes=param_axes,
        sign_decay=optimizers.cosine_sign_decay(20))
    trainer = make_trainer(tiny_model(), mesh_shape=(2, 1, 4), optimizer=opt)
    state = trainer.init_state()
    m = state.opt_state[0].m
    kernel = jax.tree_util.tree_leaves_with_path(m)[0][1]
    assert kernel.sharding.spec == jax.tree_util.tree_leaves(
        state.params)[0].sharding.spec  # moments shard like their parameters
    batch = trainer.to_global(packed_batch(8, 32, seed=1))
    losses = []
    for _ in range(6):
        state, sums = trainer.train_step(state, batch)
        losses.append(float(sums["loss"]))
    assert int(state.opt_state[0].count) == 6
    assert losses[-1] < losses[0]


@pytest.mark.usefixtures("clean_gin")
def test_selected_by_gin_like_any_optimizer():
    import gin

    gin.parse_config(["make_optimizer.optimizer_fn = @powersign",
                      "make_optimizer.schedule = @constant_schedule()",
                      "constant_schedule.learning_rate = 0.1",
                      "powersign.sign_decay = @linear_sign_decay()",
                      "linear_sign_decay.decay_steps = 10"])
    traj = _trajectory(optimizers.make_optimizer())
    assert round(float(traj[-1, 0]), 4) == 0.9323
