"""Model wrappers: what the trainer calls (loss, eval metrics, scoring, prediction).

A model wrapper owns a Flax module and knows its batch features; the trainer never looks inside.
The contract (shared with the vision track):

  get_initial_variables(rng, input_shapes) -> boxed variables (with logical axes)
  loss_fn(params, batch, dropout_rng, weights, factor) -> (loss, metric sums)
  eval_fn(params, batch) -> metric sums
  score_batch(params, batch) -> per-sequence log-likelihood
  predict_batch(params, batch, rng, ...) -> decoded token ids

Metric sums are additive over microbatches and hosts: `loss`, `cross_ent_loss`, `z_loss`,
`correct` (argmax hits) and `weight` (number of real target tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import seqio

from moetx.lm import decoding, transformer
from moetx.trainer import losses

Array = jax.Array
Batch = Mapping[str, Array]


def _num_correct(logits: Array, targets: Array, weights: Array) -> Array:
    """Weighted count of positions whose target has the top logit.

    Comparing the target's logit with the row max avoids a (single-threaded on CPU) argmax over
    the vocabulary; on an exact tie both count as correct.
    """
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((target_logit >= jnp.max(logits, axis=-1)) * weights)


@gin.configurable
@dataclasses.dataclass
class DecoderOnlyModel:
    """A decoder-only language model (causal LM, or prefix LM when the batch carries
    `decoder_causal_attention`).

    Attributes:
      config: the Transformer hyperparameters.
      z_loss: logit z-loss coefficient (T5X `Z_LOSS`, 1e-4).
      label_smoothing: label smoothing mass.
      loss_normalizing_factor: None (sum), a float, or a `LossNormalization` name.
      prefix_lm: use SeqIO's PrefixLMFeatureConverter (inputs attend bidirectionally).
    """

    config: transformer.TransformerConfig = dataclasses.field(
        default_factory=transformer.TransformerConfig)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: Any = None
    prefix_lm: bool = False

    def __post_init__(self):
        self.module = transformer.DecoderOnly(self.config)
        self.loss_normalization = losses.parse_loss_normalizing_factor(
            self.loss_normalizing_factor)

    # ----------------------------------------------------------------------------- features
    @property
    def feature_converter(self) -> seqio.FeatureConverter:
        cls = seqio.PrefixLMFeatureConverter if self.prefix_lm else seqio.DecoderFeatureConverter
        return cls(pack=True)

    def input_shapes(self, batch_size: int, length: int) -> dict[str, tuple[int, ...]]:
        shapes = {k: (batch_size, length) for k in (
            "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")}
        if self.prefix_lm:
            shapes["decoder_causal_attention"] = (batch_size, length)
        return shapes

    # ---------------------------------------------------------------------------- forward
    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        shape = input_shapes["decoder_input_tokens"]
        ones = jnp.ones(shape, jnp.int32)
        return self.module.init(
            {"params": rng, "dropout": rng}, ones, ones,
            decoder_causal_attention=ones if self.prefix_lm else None, enable_dropout=False)

    def logits(self, params, batch: Batch, dropout_rng: Array | None = None) -> Array:
        """<float32>[batch, length, vocab] next-token logits for a packed batch."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_causal_attention=batch.get("decoder_causal_attention"),
            enable_dropout=dropout_rng is not None,
            rngs=rngs,
        )

    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None) -> tuple[Array, dict[str, Array]]:
        """Loss to differentiate and additive metric sums.

        Args:
          weights: <float32>[batch, length] loss weights from `losses.loss_weights_and_factor`.
          factor: scalar divisor computed over the whole (not micro-) batch, or None to sum.
        """
        logits = self.logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        loss, z_loss, cross_ent = losses.compute_weighted_cross_entropy(
            logits, targets, weights, self.label_smoothing, self.z_loss)
        if factor is not None:
            loss = loss / factor
        real = (batch.get("decoder_loss_weights", targets > 0)).astype(jnp.float32)
        correct = _num_correct(logits, targets, real)
        metrics = {"loss": loss, "z_loss_sum": z_loss, "cross_ent_sum": cross_ent,
                   "correct": correct, "weight": jnp.sum(real)}
        return loss, metrics

    def eval_fn(self, params, batch: Batch) -> dict[str, Array]:
        """Teacher-forced metric sums over real target tokens (unnormalised, no smoothing)."""
        logits = self.logits(params, batch)
        targets = batch["decoder_target_tokens"]
        real = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        _, z_loss, cross_ent = losses.compute_weighted_cross_entropy(
            logits, targets, real, 0.0, self.z_loss)
        correct = _num_correct(logits, targets, real)
        return {"cross_ent_sum": cross_ent, "z_loss_sum": z_loss, "correct": correct,
                "weight": jnp.sum(real)}

    def score_batch(self, params, batch: Batch) -> Array:
        """<float32>[batch] sum of target-token log-likelihoods of each row."""
        logits = self.logits(params, batch)
        targets = batch["decoder_target_tokens"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        real = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        return jnp.sum(token_logp * real, axis=-1)

    # --------------------------------------------------------------------------- decoding
    def init_cache(self, params, batch_size: int, max_length: int) -> dict:
        shape = (batch_size, max_length)
        variables = self.module.init(
            jax.random.PRNGKey(0), jnp.ones(shape, jnp.int32), jnp.ones(shape, jnp.int32),
            decode=True)
        del params  # Shapes only: the cache does not depend on parameter values.
        return jax.tree_util.tree_map(jnp.zeros_like, variables["cache"])

    def decode_step(self, params, tokens: Array, position: Array, cache: dict):
        """One cached step: tokens <int32>[batch, 1] at `position` -> logits [batch, vocab]."""
        logits, mutated = self.module.apply(
            {"params": params, "cache": cache}, tokens, decode=True, decode_position=position,
            mutable=["cache"])
        return logits[:, 0], mutated["cache"]

    def predict_batch(self, params, prompts: Array, prompt_lengths: Array, rng: Array,
                      eos_id: int, temperature: float = 0.0, topk: int = 0) -> Array:
        """Greedy (temperature 0) or sampled continuation of left-aligned prompts.

        Returns <int32>[batch, max_length]: prompt, then generated tokens, then zeros.
        """
        batch_size, max_length = prompts.shape
        cache = self.init_cache(params, batch_size, max_length)

        def step_fn(tokens, position, cache):
            return self.decode_step(params, tokens, position, cache)

        return decoding.temperature_sample(step_fn, cache, prompts, prompt_lengths, rng, eos_id,
                                           temperature, topk)
