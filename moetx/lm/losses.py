"""The language models' token losses: cross entropy with logit z-loss, label smoothing and loss
normalization (`moetx.lm.models` computes its loss weights and metrics with them).

Conventions follow T5X `losses.py`:
  loss_t = -sum_v y_v log softmax(z)_v + z_loss * (log sum_v exp z_v)^2
with a custom VJP whose logits gradient is (1 + 2 z_loss log Z) softmax(z) - y. Label smoothing
subtracts the entropy of the smoothed target distribution so that a perfect model has loss 0.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def cross_entropy_with_logits(logits: Array, targets: Array, z_loss: float) -> tuple[Array, Array]:
    """Softmax cross entropy plus the PaLM/T5X logit z-loss.

    Args:
      logits: <float32>[batch, length, vocab].
      targets: <float32>[batch, length, vocab] (one-hot or smoothed) target distribution.
      z_loss: coefficient of (log Z)^2.
    Returns:
      (total loss, z-loss part), each <float32>[batch, length].
    """
    return _cross_entropy_fwd(logits, targets, z_loss)[0]


def _cross_entropy_fwd(logits, targets, z_loss):
    max_logit = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    shifted = logits - max_logit
    exp_shifted = jnp.exp(shifted)
    sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
    log_softmax = shifted - jnp.log(sum_exp)
    loss = -jnp.sum(targets * log_softmax, axis=-1)
    log_z = jnp.squeeze(jnp.log(sum_exp) + max_logit, axis=-1)
    total_z_loss = z_loss * jnp.square(log_z)
    loss = loss + total_z_loss
    return (loss, total_z_loss), (logits, targets, z_loss, exp_shifted, sum_exp, log_softmax,
                                  log_z)


def _cross_entropy_bwd(res, g):
    logits, targets, z_loss, exp_shifted, sum_exp, log_softmax, log_z = res
    g_loss = g[0]  # The z-loss output is a metric; gradients flow through the total only.
    softmax = exp_shifted / sum_exp
    deriv = jnp.expand_dims(1 + 2 * z_loss * log_z, -1) * softmax - targets
    g_logits = jnp.expand_dims(g_loss, -1) * deriv
    g_targets = -jnp.expand_dims(g_loss, -1) * log_softmax
    return (g_logits.astype(logits.dtype), g_targets.astype(targets.dtype),
            jnp.zeros_like(z_loss))


cross_entropy_with_logits.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@jax.custom_vjp
def cross_entropy_with_integer_targets(logits: Array, targets: Array,
                                       z_loss: float) -> tuple[Array, Array]:
    """`cross_entropy_with_logits` with one-hot targets given as ids: the same values and
    gradient (to the last bit: the one-hot sum there adds only zeros), without the
    [batch, length, vocab] one-hot. On CPU that array is written, saved for the backward pass
    and read twice; here the target logit is gathered and the gradient subtracts 1 where an
    iota equals the target id, inside the softmax's elementwise pass.

    Args:
      logits: <float32>[batch, length, vocab].
      targets: <int32>[batch, length] target ids.
      z_loss: coefficient of (log Z)^2.
    Returns:
      (total loss, z-loss part), each <float32>[batch, length].
    """
    return _integer_targets_fwd(logits, targets, z_loss)[0]


def _integer_targets_fwd(logits, targets, z_loss):
    max_logit = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    shifted = logits - max_logit
    exp_shifted = jnp.exp(shifted)
    sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
    log_sum_exp = jnp.log(sum_exp)
    # -log_softmax at the target: log(sum exp) - shifted_target, as -(shifted - log(sum exp)).
    shifted_target = jnp.take_along_axis(shifted, targets[..., None], axis=-1)
    loss = jnp.squeeze(log_sum_exp - shifted_target, axis=-1)
    log_z = jnp.squeeze(log_sum_exp + max_logit, axis=-1)
    total_z_loss = z_loss * jnp.square(log_z)
    loss = loss + total_z_loss
    return (loss, total_z_loss), (targets, z_loss, exp_shifted, sum_exp, log_z)


def _integer_targets_bwd(res, g):
    targets, z_loss, exp_shifted, sum_exp, log_z = res
    softmax = exp_shifted / sum_exp
    scaled = jnp.expand_dims(1 + 2 * z_loss * log_z, -1) * softmax
    # Shape: [batch, length, vocab]; the one-hot is a comparison, fused, never stored.
    is_target = jax.lax.broadcasted_iota(targets.dtype, scaled.shape, 2) == targets[..., None]
    deriv = jnp.where(is_target, scaled - 1.0, scaled)
    g_logits = jnp.expand_dims(g[0], -1) * deriv
    return g_logits.astype(exp_shifted.dtype), None, jnp.zeros_like(z_loss)


cross_entropy_with_integer_targets.defvjp(_integer_targets_fwd, _integer_targets_bwd)


class LossNormalization(enum.Enum):
    """How the summed token loss is divided (T5X `SpecialLossNormalizingFactor`).

    NUM_REAL_TARGET_TOKENS: by the number of non-padding target tokens (sum of loss weights).
    NUM_TOTAL_TARGET_TOKENS: by batch * length, padding included.
    AVERAGE_PER_SEQUENCE: each sequence's loss is its token mean; the batch loss is their sum
      (packing-aware: a packed segment counts as a sequence).
    """

    NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
    NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
    AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"


def parse_loss_normalizing_factor(value) -> LossNormalization | float | None:
    """Accepts None (sum), a positive float, or a `LossNormalization` name (string or enum)."""
    if value is None or isinstance(value, LossNormalization):
        return value
    if isinstance(value, str):
        try:
            return LossNormalization[value]
        except KeyError:
            raise ValueError(
                f"Unknown loss_normalizing_factor {value!r}; expected None, a float, or one of "
                f"{[m.name for m in LossNormalization]}."
            ) from None
    value = float(value)
    if value <= 0:
        raise ValueError(f"loss_normalizing_factor must be positive, got {value}.")
    return value


def loss_weights_and_factor(
    batch: dict[str, Array], normalization: LossNormalization | float | None
) -> tuple[Array, Array | None]:
    """Per-token weights and the scalar divisor for a (full, not micro-) batch.

    Computing the divisor over the whole batch before splitting it into microbatches is what
    makes gradient accumulation give the full-batch update exactly.

    Returns:
      weights: <float32>[batch, length].
      factor: <float32>[] divisor, or None to sum.
    """
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = batch["decoder_target_tokens"] > 0
    weights = weights.astype(jnp.float32)
    if normalization is None:
        return weights, None
    if isinstance(normalization, float):
        return weights, jnp.asarray(normalization, jnp.float32)
    if normalization is LossNormalization.NUM_REAL_TARGET_TOKENS:
        return weights, jnp.maximum(jnp.sum(weights), 1.0)
    if normalization is LossNormalization.NUM_TOTAL_TARGET_TOKENS:
        return weights, jnp.asarray(weights.size, jnp.float32)
    if normalization is LossNormalization.AVERAGE_PER_SEQUENCE:
        segments = batch.get("decoder_segment_ids")
        if segments is None:
            segments = (weights > 0).astype(jnp.int32)
        # Each token is weighted by 1 / (tokens in its segment); the factor is then 1.
        same = segments[:, :, None] == segments[:, None, :]
        per_segment = jnp.sum(same * weights[:, None, :], axis=-1)
        weights = jnp.where(weights > 0, weights / jnp.maximum(per_segment, 1.0), 0.0)
        return weights, jnp.asarray(1.0, jnp.float32)
    raise ValueError(f"Unhandled loss normalization {normalization!r}.")


def compute_weighted_cross_entropy(
    logits: Array,
    targets: Array,
    weights: Array,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
) -> tuple[Array, Array, Array]:
    """Summed weighted cross entropy.

    Args:
      logits: <float32>[batch, length, vocab].
      targets: <int32>[batch, length] target ids.
      weights: <float32>[batch, length] per-token weights (0 on padding).
      label_smoothing: mass spread uniformly over the vocabulary.
      z_loss: logit z-loss coefficient (T5X default 1e-4).
    Returns:
      (summed loss, summed z-loss, summed per-token cross entropy without z-loss), each [].
    """
    if logits.ndim != targets.ndim + 1:
        raise ValueError(f"logits {logits.shape} must have one more axis than targets "
                         f"{targets.shape}.")
    vocab = logits.shape[-1]
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0.0:
        # One-hot targets: the same loss without materialising them (the normalizing constant
        # below is then 0).
        total, z = cross_entropy_with_integer_targets(logits.astype(jnp.float32), targets,
                                                      z_loss)
        return jnp.sum(total * weights), jnp.sum(z * weights), jnp.sum((total - z) * weights)
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (vocab - 1)
    # Entropy of the smoothed distribution, so that the optimum is a loss of 0.
    normalizing_constant = -(
        confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20)
    )
    soft_targets = jax.nn.one_hot(targets, vocab, dtype=jnp.float32) * (confidence - low) + low
    total, z = cross_entropy_with_logits(logits.astype(jnp.float32), soft_targets, z_loss)
    total = total - normalizing_constant
    return jnp.sum(total * weights), jnp.sum(z * weights), jnp.sum((total - z) * weights)
