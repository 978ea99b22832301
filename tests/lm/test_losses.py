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
