"""Cross entropy with z-loss (T5X convention), label smoothing and loss normalization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import losses


def _reference(logits, targets, z):
    logz = jax.nn.logsumexp(logits, axis=-1)
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    return ce + z * logz ** 2


def test_value_and_custom_gradient_match_autodiff():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(2, 3, 11) * 3, jnp.float32)
    targets = jax.nn.one_hot(jnp.asarray(rng.randint(0, 11, (2, 3))), 11)
    z = 1e-2
    total, zl = losses.cross_entropy_with_logits(logits, targets, z)
    np.testing.assert_allclose(total, _reference(logits, targets, z), rtol=1e-5)
    np.testing.assert_allclose(zl, z * jax.nn.logsumexp(logits, -1) ** 2, rtol=1e-5)
    g = jax.grad(lambda x: losses.cross_entropy_with_logits(x, targets, z)[0].sum())(logits)
    g_ref = jax.grad(lambda x: _reference(x, targets, z).sum())(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    # T5X's closed form: (1 + 2 z log Z) softmax - y.
    closed = (1 + 2 * z * jax.nn.logsumexp(logits, -1, keepdims=True)) * jax.nn.softmax(logits) \
        - targets
    np.testing.assert_allclose(g, closed, rtol=1e-4, atol=1e-6)


def test_uniform_logits_give_log_vocab():
    loss, _, ce = losses.compute_weighted_cross_entropy(
        jnp.zeros((1, 4, 32)), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4)), z_loss=0.0)
    np.testing.assert_allclose(ce / 4, np.log(32), rtol=1e-6)
    np.testing.assert_allclose(loss, ce)


def test_label_smoothing_optimum_is_zero():
    vocab, eps = 10, 0.1
    target = jnp.array([[3]])
    probs = np.full(vocab, eps / (vocab - 1))
    probs[3] = 1 - eps
    logits = jnp.log(jnp.asarray(probs))[None, None]
    loss, _, _ = losses.compute_weighted_cross_entropy(logits, target, jnp.ones((1, 1)),
                                                       label_smoothing=eps, z_loss=0.0)
    assert abs(float(loss)) < 1e-5


def test_normalizing_factors():
    batch = {"decoder_target_tokens": jnp.array([[5, 6, 0, 0], [7, 8, 9, 0]]),
             "decoder_segment_ids": jnp.array([[1, 1, 0, 0], [1, 2, 2, 0]])}
    w, f = losses.loss_weights_and_factor(batch, losses.LossNormalization.NUM_REAL_TARGET_TOKENS)
    assert float(f) == 5.0 and float(w.sum()) == 5.0
    _, f = losses.loss_weights_and_factor(batch, losses.LossNormalization.NUM_TOTAL_TARGET_TOKENS)
    assert float(f) == 8.0
    w, f = losses.loss_weights_and_factor(batch, losses.LossNormalization.AVERAGE_PER_SEQUENCE)
    # Three segments (lengths 2, 1, 2): each segment's tokens sum to weight 1.
    np.testing.assert_allclose(np.asarray(w), [[.5, .5, 0, 0], [1, .5, .5, 0]])
    _, f = losses.loss_weights_and_factor(batch, None)
    assert f is None
    assert float(losses.loss_weights_and_factor(batch, 2048.0)[1]) == 2048.0


def test_bad_normalizing_factor_names_the_options():
    with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
        losses.parse_loss_normalizing_factor("NUM_REAL_TOKENS")


@pytest.mark.parametrize("z", [0.0, 1e-4])
def test_integer_targets_give_the_one_hot_loss_and_gradient(z):
    """The id form (used when there is no label smoothing) computes what the one-hot form does,
    without the [batch, length, vocab] one-hot; padding ids included."""
    rng = np.random.RandomState(1)
    logits = jnp.asarray(rng.randn(3, 5, 37) * 4, jnp.float32)
    ids = jnp.asarray(rng.randint(0, 37, (3, 5)), jnp.int32).at[0, -2:].set(0)
    weights = jnp.asarray(rng.rand(3, 5) > 0.3, jnp.float32)
    onehot = jax.nn.one_hot(ids, 37)
    total, zl = losses.cross_entropy_with_integer_targets(logits, ids, z)
    ref_total, ref_z = losses.cross_entropy_with_logits(logits, onehot, z)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zl, ref_z, rtol=1e-6, atol=1e-7)

    def weighted(fn, targets):
        return lambda x: jnp.sum(fn(x, targets, z)[0] * weights)

    g = jax.grad(weighted(losses.cross_entropy_with_integer_targets, ids))(logits)
    g_ref = jax.grad(weighted(losses.cross_entropy_with_logits, onehot))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(g).sum()) > 0


def test_compute_weighted_cross_entropy_without_smoothing_matches_the_smoothing_path():
    """label_smoothing=0 takes the id path; a tiny smoothing takes the one-hot path: the two
    agree to the smoothing's size, and the id path agrees with the reference exactly."""
    rng = np.random.RandomState(2)
    logits = jnp.asarray(rng.randn(2, 6, 19) * 2, jnp.float32)
    ids = jnp.asarray(rng.randint(0, 19, (2, 6)), jnp.int32)
    weights = jnp.asarray(rng.rand(2, 6), jnp.float32)
    loss, zl, ce = losses.compute_weighted_cross_entropy(logits, ids, weights, z_loss=1e-4)
    ref = _reference(logits, jax.nn.one_hot(ids, 19), 1e-4)
    np.testing.assert_allclose(loss, jnp.sum(ref * weights), rtol=1e-6)
    np.testing.assert_allclose(loss, zl + ce, rtol=1e-6)
    smoothed = losses.compute_weighted_cross_entropy(logits, ids, weights, z_loss=1e-4,
                                                     label_smoothing=1e-6)
    np.testing.assert_allclose(smoothed[0], loss, rtol=1e-4)
