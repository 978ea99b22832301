"""Language-model wrappers: what the trainer calls (loss, eval metrics, scoring, prediction).

A model wrapper owns a Flax module and knows its batch features; the trainer never looks inside.
`BaseTransformerModel` implements the trainer's model protocol (`moetx.trainer.model.Model`) for
token sequences:

  features      decoder_* (and encoder_*) arrays from SeqIO's packing feature converters;
                `complete_batch` gives unpacked data one segment per row
  metric sums   `cross_ent_sum`, `z_loss_sum`, `correct` (top-logit hits), `weight` (real
                target tokens), for MoE models the router metrics `moe*`, which are per-step
                means (`metric_reduction` 'mean'); in training also the parts of the loss,
                divided like it by the loss normalizing factor: `loss`, `cross_ent_loss`,
                `z_loss` and, for MoE models, `experts/auxiliary_loss` and
                `experts/router_z_loss` (their coefficients applied)
  summarized    evaluation: per-token means cross_ent_loss, accuracy, z_loss, perplexity, the
                `moe*` means and `tokens`. Training, as T5X names them: `loss` (the optimised
                loss, the model's `loss_metric`) = cross_ent_loss + z_loss (+ the two
                `experts/*` losses), each as the loss normalizing factor divides it (with
                NUM_REAL_TARGET_TOKENS: per-token means; with None: sums over the batch, as in
                T5X), plus `loss_per_nonpadding_target_token`, per-token accuracy and perplexity
  scoring       score_batch(params, batch) -> per-sequence log-likelihood
  inference     `inference_fns`: predict and score functions over a seqio.Evaluator's
                dataset, through `moetx.lm.predict.Predictor`
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from moetx.lm import attention, decoding, losses, scan, transformer
from moetx.trainer import metrics
from moetx.trainer.model import BaseModel, Reduction, Shapes

Array = jax.Array
Batch = Mapping[str, Array]

# The training metric sums that are parts of the optimised loss, divided like it.
_TRAINING_LOSS_PARTS = ("cross_ent_loss", "z_loss", "experts/auxiliary_loss",
                        "experts/router_z_loss")


def _num_correct(logits: Array, targets: Array, weights: Array) -> Array:
    """Weighted count of positions whose target has the top logit.

    Comparing the target's logit with the row max avoids a (single-threaded on CPU) argmax over
    the vocabulary; on an exact tie both count as correct.
    """
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((target_logit >= jnp.max(logits, axis=-1)) * weights)


def _trim(row: np.ndarray) -> list[int]:
    """A zero-padded row of token ids without its trailing padding."""
    ids = np.asarray(row).reshape(-1)
    nonzero = np.flatnonzero(ids)
    return [int(t) for t in ids[:nonzero[-1] + 1]] if nonzero.size else []


def _fixed_width(ids: list[int], width: int, eos_id: int) -> np.ndarray:
    """<int32>[width]: `ids`, EOS when there is room, then zeros."""
    row = np.zeros((width,), np.int32)
    row[:len(ids)] = ids[:width]
    if len(ids) < width:
        row[len(ids)] = eos_id
    return row


def check_feature_lengths(task_feature_lengths: Mapping[str, Any]) -> None:
    """Raises ValueError for a task feature length shorter than one token and EOS."""
    for k, v in dict(task_feature_lengths).items():
        if isinstance(v, (int, np.integer)) and int(v) < 2:
            raise ValueError(
                f"Feature length {k}={v} is too short: at least 2 tokens are needed (one "
                f"token and EOS). Increase TASK_FEATURE_LENGTHS['{k}'].")


def _vocab_size(feature: Any) -> int | None:
    """The number of ids of a token feature's vocabulary (None for pass-through features)."""
    vocab = getattr(feature, "vocabulary", None)
    if vocab is None or isinstance(vocab, seqio.PassThroughVocabulary):
        return None
    return int(vocab.vocab_size)


@dataclasses.dataclass
class BaseTransformerModel(BaseModel):
    """Loss, metrics and scoring shared by the decoder-only and encoder-decoder wrappers.

    Attributes:
      config: the Transformer hyperparameters.
      z_loss: logit z-loss coefficient (T5X `Z_LOSS`, 1e-4).
      label_smoothing: label smoothing mass.
      loss_normalizing_factor: None (sum), a float, or a `LossNormalization` name.
    """

    config: transformer.TransformerConfig = dataclasses.field(
        default_factory=transformer.TransformerConfig)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: Any = None

    count_unit = "tokens"
    loss_metric = "loss"

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.z_loss, bool) or not isinstance(self.z_loss, (int, float)) \
                or not 0.0 <= self.z_loss < math.inf:
            raise ValueError(f"{name}.z_loss must be a number >= 0 (T5X: 1e-4), got "
                             f"{self.z_loss!r}.")
        if isinstance(self.label_smoothing, bool) \
                or not isinstance(self.label_smoothing, (int, float)) \
                or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{name}.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing!r}.")
        self.loss_normalization = losses.parse_loss_normalizing_factor(
            self.loss_normalizing_factor)

    # ------------------------------------------------------------------- trainer protocol
    def loss_weights_and_factor(self, batch: Batch) -> tuple[Array, Array | None]:
        """Per-token weights <float32>[batch, length] and the divisor of the summed token loss
        (`loss_normalizing_factor`), over the whole batch."""
        return losses.loss_weights_and_factor(batch, self.loss_normalization)

    def metric_reduction(self, name: str) -> Reduction:
        """The router metrics (`moe*`) are per-step means; everything else adds up."""
        return "mean" if name.startswith("moe") else "sum"

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Per-token means: cross_ent_loss, accuracy, z_loss, perplexity (exp of the per-token
        cross entropy, capped at e^50); the `moe*` means as they are; `tokens`, the number of
        real target tokens. Training sums (those with `loss`) give T5X's training scalars
        instead: `loss`, `cross_ent_loss`, `z_loss` and `experts/*` as the loss normalizing
        factor divides them (they add up to `loss`), and `loss_per_nonpadding_target_token`."""
        w = max(float(sums["weight"]), 1.0)
        ce = float(sums["cross_ent_sum"]) / w
        out = {"cross_ent_loss": ce, "accuracy": float(sums["correct"]) / w,
               "z_loss": float(sums["z_loss_sum"]) / w,
               "perplexity": float(math.exp(min(ce, 50.0)))}
        if "loss" in sums:
            out["loss"] = float(sums["loss"])
            out["loss_per_nonpadding_target_token"] = out["loss"] / w
            out.update({k: float(sums[k]) for k in _TRAINING_LOSS_PARTS if k in sums})
        out.update({k: float(v) for k, v in sums.items() if k.startswith("moe")})
        out["tokens"] = float(sums["weight"])
        return out

    def headline(self, scalars: Mapping[str, float]) -> str:
        """`loss 2.1234 | acc 0.456 | perplexity 8.37 (12,345 tokens)`."""
        return (f"loss {scalars['cross_ent_loss']:.4f} | acc {scalars['accuracy']:.3f} | "
                f"perplexity {scalars['perplexity']:.2f} ({int(scalars['tokens']):,} tokens)")

    def complete_batch(self, batch: Mapping[str, np.ndarray], input_shapes: Shapes
                       ) -> dict[str, np.ndarray]:
        """The model's features of `batch`; unpacked data without `decoder_segment_ids` gets
        one segment per row (the non-padding targets), any other missing feature zeros."""
        if "decoder_target_tokens" not in batch:
            raise ValueError(f"The batch has {sorted(batch)}; a language model needs at least "
                             f"decoder_target_tokens (of {sorted(input_shapes)}).")
        feats = {k: np.asarray(batch[k]) for k in input_shapes if k in batch}
        first = next(iter(feats.values()))
        for k in input_shapes:
            if k not in feats:
                feats[k] = ((np.asarray(batch["decoder_target_tokens"]) > 0).astype(np.int32)
                            if k == "decoder_segment_ids" else np.zeros_like(first))
        return {k: feats[k] for k in input_shapes}

    def count_per_batch(self, input_shapes: Shapes) -> int:
        """Encoder input plus decoder target tokens (padding included) of one batch."""
        return sum(int(np.prod(s)) for k, s in input_shapes.items()
                   if k in ("encoder_input_tokens", "decoder_target_tokens"))

    def check_task(self, task: Any, task_feature_lengths: Mapping[str, Any] | None = None
                   ) -> None:
        """Every vocabulary of the task (targets, and inputs for prefix LMs and encoders) must
        fit the embedding; with `task_feature_lengths`, every text feature of the task needs a
        length of at least 2."""
        features = getattr(task, "output_features", {})
        if task_feature_lengths is not None:
            check_feature_lengths(task_feature_lengths)
            missing = {k for k, f in features.items() if f.rank > 0 and not isinstance(
                f.vocabulary, seqio.PassThroughVocabulary)} - set(task_feature_lengths)
            if missing:
                raise ValueError(
                    f"Task {getattr(task, 'name', task)!r} has features {sorted(features)} but "
                    f"task_feature_lengths is missing {sorted(missing)}.")
        for key, feature in features.items():
            size = _vocab_size(feature)
            if size is not None and size > self.config.vocab_size:
                raise ValueError(
                    f"Task {getattr(task, 'name', task)!r}: its {key!r} vocabulary has {size} "
                    f"ids but the model's embedding only {self.config.vocab_size}; raise "
                    f"TransformerConfig.vocab_size to at least {size}, or give the task the "
                    f"model's vocabulary.")

    def _apply(self, variables, batch: Batch, enable_dropout: bool, rngs, mutable):
        """The module's teacher-forced forward pass (subclasses)."""
        raise NotImplementedError

    def logits(self, params, batch: Batch, dropout_rng: Array | None = None) -> Array:
        """<float32>[batch, length, vocab] next-token logits for a packed batch."""
        return self._logits_and_moe(params, batch, dropout_rng)[0]

    def _logits_and_moe(self, params, batch: Batch, dropout_rng: Array | None
                        ) -> tuple[Array, dict[str, Array]]:
        """Logits and the sparse layers' sown router losses and metrics (empty when dense).

        Returns metrics named `moe/<layer path>/<name>` per sparse layer plus `moe_aux_loss` and
        `moe_router_z_loss` averaged over the sparse layers.
        """
        rngs = None
        if dropout_rng is not None:
            rngs = {"dropout": dropout_rng, "jitter": jax.random.fold_in(dropout_rng, 1)}
        if self.config.moe is None and self.config.encoder_moe is None:
            return self._apply({"params": params}, batch, dropout_rng is not None, rngs,
                               False), {}
        logits, state = self._apply({"params": params}, batch, dropout_rng is not None, rngs,
                                    ["intermediates"])
        moe: dict[str, Array] = {}
        per_layer: dict[str, list[Array]] = {}
        # A scanned stack sows one value per layer on a leading axis: name them per layer.
        sown = scan.unscan_params(state.get("intermediates", {}))
        for path, value in jax.tree_util.tree_leaves_with_path(sown):
            keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
            name = next(k for k in reversed(keys) if isinstance(k, str))
            where = "/".join(str(k) for k in keys if isinstance(k, str) and k != name)
            moe[f"moe/{where}/{name.removeprefix('moe_')}"] = value
            per_layer.setdefault(name, []).append(value)
        for name, values in per_layer.items():
            moe[name] = jnp.mean(jnp.stack(values))
        return logits, moe

    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state: Any = None
                ) -> tuple[Array, tuple[dict[str, Array], Any]]:
        """(loss to differentiate, (metric sums, model state)); the model has no mutable state,
        so `model_state` comes back as it was given.

        loss = token cross entropy (+ logit z-loss) / factor
               + aux_loss_factor * mean_layers(load balancing) + router_z_loss_factor *
               mean_layers(router z-loss)  (MoE only)

        Args:
          weights: <float32>[batch, length] loss weights from `loss_weights_and_factor`.
          factor: scalar divisor computed over the whole (not micro-) batch, or None to sum.
          num_microbatches: the router losses are per-microbatch means, so each microbatch adds
            1/num_microbatches of them: accumulated, they equal the full-batch means.
        """
        logits, moe = self._logits_and_moe(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        loss, z_loss, cross_ent = losses.compute_weighted_cross_entropy(
            logits, targets, weights, self.label_smoothing, self.z_loss)
        divisor = 1.0 if factor is None else factor
        # The parts of the loss as T5X logs them (they add up to `loss`).
        parts = {"cross_ent_loss": cross_ent / divisor, "z_loss": z_loss / divisor}
        loss = loss / divisor
        if moe:
            cfg = self.config.moe or self.config.encoder_moe
            parts["experts/auxiliary_loss"] = (
                cfg.aux_loss_factor * moe["moe_aux_loss"] / num_microbatches)
            parts["experts/router_z_loss"] = (
                cfg.router_z_loss_factor * moe["moe_router_z_loss"] / num_microbatches)
            loss = loss + parts["experts/auxiliary_loss"] + parts["experts/router_z_loss"]
        real = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        metrics = {"loss": loss, "z_loss_sum": z_loss, "cross_ent_sum": cross_ent,
                   "correct": _num_correct(logits, targets, real), "weight": jnp.sum(real),
                   **parts}
        metrics.update(moe)
        return loss, (metrics, model_state)

    def eval_fn(self, params, batch: Batch, model_state: Any = None) -> dict[str, Array]:
        """Teacher-forced metric sums over real target tokens (unnormalised, no smoothing)."""
        del model_state
        logits, moe = self._logits_and_moe(params, batch, None)
        targets = batch["decoder_target_tokens"]
        real = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        _, z_loss, cross_ent = losses.compute_weighted_cross_entropy(
            logits, targets, real, 0.0, self.z_loss)
        return {"cross_ent_sum": cross_ent, "z_loss_sum": z_loss,
                "correct": _num_correct(logits, targets, real), "weight": jnp.sum(real), **moe}

    def score_batch(self, params, batch: Batch) -> Array:
        """<float32>[batch] sum of target-token log-likelihoods of each row."""
        logits = self.logits(params, batch)
        targets = batch["decoder_target_tokens"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        real = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        return jnp.sum(token_logp * real, axis=-1)

    # ------------------------------------------------------------------ seqio evaluation
    @property
    def inference_feature_converter(self) -> seqio.FeatureConverter:
        """The model's feature converter without packing: one example per row, as a
        seqio.Evaluator needs."""
        return type(self.feature_converter)(pack=False)

    def inference_fns(self, params, model_state: Any = None, *, mesh, rules,
                      batch_size: int, output_features: Mapping[str, Any]
                      ) -> dict[str, Any]:
        """seqio.Evaluator's `predict_fn` (greedy decoding, `Predictor.generate`) and
        `score_fn` (log-likelihood of the targets, `Predictor.score`) with `params`.

        Each takes the evaluator's enumerated dataset of unpacked model features (rows of
        `(index, features)`) and returns `[(index, output)]`: the generated target ids, then
        EOS and padding to the decoding length (seqio stacks them into one array; the
        vocabulary's `decode` stops at EOS), or the summed log-likelihood of the target tokens
        (EOS included). A decoder-only
        model predicts from the task's inputs (a prefix LM); scoring a prefix LM's targets
        alone is not supported (`Predictor.score` scores whole texts).
        """
        del model_state
        from moetx.lm import predict

        vocabulary = output_features["targets"].vocabulary

        def predictor(ds) -> predict.Predictor:
            shapes = {k: tuple(v.shape) for k, v in ds.element_spec[1].items()}
            target_len = shapes["decoder_target_tokens"][-1]
            input_len = shapes.get("encoder_input_tokens", (target_len,))[-1]
            key = (id(mesh), batch_size, target_len, input_len, id(vocabulary))
            cache = self.__dict__.setdefault("_predictors", {})
            if key not in cache:
                cache[key] = predict.Predictor(
                    self, params, vocabulary, mesh, rules, batch_size=batch_size,
                    max_length=target_len, max_input_length=input_len)
            cache[key].params = params
            return cache[key]

        def rows(ds) -> tuple[list[int], list[dict[str, np.ndarray]]]:
            items = list(ds.as_numpy_iterator())
            return [int(i) for i, _ in items], [ex for _, ex in items]

        def predict_fn(ds, model_feature_shapes=None):
            del model_feature_shapes
            indices, examples = rows(ds)
            if self.is_encoder_decoder:
                prompts = [_trim(ex["encoder_input_tokens"]) for ex in examples]
            elif all("decoder_causal_attention" in ex for ex in examples):
                # The inputs occupy the targets' first positions: the causal-attention mask
                # covers them plus the first target position.
                prompts = [ex["decoder_target_tokens"][:int(ex["decoder_causal_attention"].sum())
                                                       - 1] for ex in examples]
            else:
                raise ValueError(f"{type(self).__name__} predicts from the task's inputs; a "
                                 f"causal LM task has none. Use a prefix LM (prefix_lm=True) "
                                 f"on a task with inputs, or score metrics only.")
            model = predictor(ds)
            generations = model.generate(prompts, add_eos=False)
            return [(i, _fixed_width(g.ids, model.max_length, model.eos_id))
                    for i, g in zip(indices, generations)]

        def score_fn(ds, model_feature_shapes=None):
            del model_feature_shapes
            indices, examples = rows(ds)
            targets = [_trim(ex["decoder_target_tokens"]) for ex in examples]
            if self.is_encoder_decoder:
                scores = predictor(ds).score([_trim(ex["encoder_input_tokens"])
                                              for ex in examples], targets, add_eos=False)
            elif getattr(self, "prefix_lm", False):
                raise ValueError("Score metrics of a prefix LM are not supported: "
                                 "Predictor.score scores whole texts, not the targets alone.")
            else:
                scores = predictor(ds).score(targets, add_eos=False)
            return [(i, float(x)) for i, x in zip(indices, scores)]

        return {"predict": predict_fn, "score": score_fn}

    def _active_params(self, params) -> float:
        moe = self.config.moe or self.config.encoder_moe
        fraction = moe.num_selected_experts / moe.num_experts if moe is not None else 1.0
        return metrics.matmul_params(params, fraction)

    def _attention_flops_per_token(self, num_layers: int, length: int) -> float:
        # Forward QK^T and AV (2 * 2 * length * heads * d_kv) times 3 for forward + backward.
        return 12.0 * num_layers * self.config.num_heads * self.config.head_dim * length


@gin.configurable
@dataclasses.dataclass
class DecoderOnlyModel(BaseTransformerModel):
    """A decoder-only language model (causal LM, or prefix LM when `prefix_lm`: the batch
    carries `decoder_causal_attention` and the inputs attend bidirectionally)."""

    prefix_lm: bool = False
    is_encoder_decoder = False

    def __post_init__(self):
        super().__post_init__()
        self.module = transformer.DecoderOnly(self.config)

    # ----------------------------------------------------------------------------- features
    @property
    def feature_converter(self) -> seqio.FeatureConverter:
        cls = seqio.PrefixLMFeatureConverter if self.prefix_lm else seqio.DecoderFeatureConverter
        return cls(pack=True)

    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int] | int
                     ) -> dict[str, tuple[int, ...]]:
        """Model feature shapes; a prefix LM's decoder holds inputs + targets. Raises
        ValueError for a task feature length below 2."""
        if isinstance(task_feature_lengths, int):
            length = task_feature_lengths
        else:
            check_feature_lengths(task_feature_lengths)
            length = (sum(task_feature_lengths.values()) if self.prefix_lm
                      else task_feature_lengths["targets"])
        shapes = {k: (batch_size, length) for k in (
            "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")}
        if self.prefix_lm:
            shapes["decoder_causal_attention"] = (batch_size, length)
        return shapes

    def flops_per_step(self, params, input_shapes) -> float:
        b, length = input_shapes["decoder_input_tokens"]
        per_token = 6.0 * self._active_params(params) + self._attention_flops_per_token(
            self.config.num_decoder_layers, length)
        return b * length * per_token

    # ---------------------------------------------------------------------------- forward
    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        ones = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(
            {"params": rng, "dropout": rng}, ones, ones,
            decoder_causal_attention=ones if self.prefix_lm else None, enable_dropout=False)

    def _apply(self, variables, batch: Batch, enable_dropout: bool, rngs, mutable):
        return self.module.apply(
            variables, batch["decoder_input_tokens"], batch["decoder_target_tokens"],
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_causal_attention=batch.get("decoder_causal_attention"),
            decoder_positions=batch.get("decoder_positions"),
            enable_dropout=enable_dropout, rngs=rngs, mutable=mutable)

    # --------------------------------------------------------------------------- decoding
    def init_cache(self, params, batch_size: int, max_length: int) -> dict:
        """A zeroed KV (and Primer dconv) cache for `max_length` positions (shapes only)."""
        del params
        shape = (batch_size, max_length)
        variables = jax.eval_shape(lambda: self.module.init(
            jax.random.PRNGKey(0), jnp.ones(shape, jnp.int32), jnp.ones(shape, jnp.int32),
            decode=True))
        return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), variables["cache"])

    def decode_step(self, params, tokens: Array, position: Array, cache: dict):
        """One cached step: tokens <int32>[batch, 1] at `position` -> logits [batch, vocab]."""
        logits, mutated = self.module.apply(
            {"params": params, "cache": cache}, tokens, decode=True, decode_position=position,
            mutable=["cache"])
        return logits[:, 0], mutated["cache"]

    def predict_batch(self, params, prompts: Array, prompt_lengths: Array, rng: Array,
                      eos_id: int, temperature: float = 0.0, topk: int = 0, topp: float = 0.0,
                      num_beams: int = 0, alpha: float = 0.6) -> Array:
        """Greedy (temperature 0), sampled (top-k / top-p) or beam-search (`num_beams` > 0,
        T5X length penalty `alpha`; the best beam is returned) continuation of left-aligned
        prompts.

        Returns <int32>[batch, max_length]: prompt, then generated tokens, then zeros.
        """
        batch_size, max_length = prompts.shape
        cache = self.init_cache(params, batch_size, max_length)

        def step_fn(tokens, position, cache):
            return self.decode_step(params, tokens, position, cache)

        if num_beams:
            seqs, _ = decoding.beam_search(step_fn, cache, prompts, prompt_lengths, eos_id,
                                           num_beams, alpha)
            return seqs[:, 0]
        return decoding.temperature_sample(step_fn, cache, prompts, prompt_lengths, rng, eos_id,
                                           temperature, topk, topp)


@gin.configurable
@dataclasses.dataclass
class EncoderDecoderModel(BaseTransformerModel):
    """A T5-style encoder-decoder (span corruption pretraining, finetuning on text-to-text)."""

    is_encoder_decoder = True

    def __post_init__(self):
        super().__post_init__()
        self.module = transformer.EncoderDecoder(self.config)

    @property
    def feature_converter(self) -> seqio.FeatureConverter:
        return seqio.EncDecFeatureConverter(pack=True)

    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int]
                     ) -> dict[str, tuple[int, ...]]:
        """Encoder features of the `inputs` length, decoder features of the `targets` length.
        Raises ValueError for a length below 2."""
        check_feature_lengths(task_feature_lengths)
        enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
        shapes = {k: (batch_size, enc) for k in (
            "encoder_input_tokens", "encoder_segment_ids", "encoder_positions")}
        shapes.update({k: (batch_size, dec) for k in (
            "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")})
        return shapes

    def flops_per_step(self, params, input_shapes) -> float:
        """6N per token over encoder and decoder tokens (each stack's share of N applied to its
        own tokens), plus attention."""
        b, enc_len = input_shapes["encoder_input_tokens"]
        _, dec_len = input_shapes["decoder_input_tokens"]
        enc_params = self._active_params(params.get("encoder", {}))
        dec_params = self._active_params(params.get("decoder", {}))
        cfg = self.config
        return b * (enc_len * (6.0 * enc_params + self._attention_flops_per_token(
            cfg.num_encoder_layers, enc_len))
            + dec_len * (6.0 * dec_params + self._attention_flops_per_token(
                cfg.num_decoder_layers, dec_len + enc_len)))

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
        dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init({"params": rng, "dropout": rng}, enc, dec, dec)

    def _apply(self, variables, batch: Batch, enable_dropout: bool, rngs, mutable):
        return self.module.apply(
            variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            enable_dropout=enable_dropout, rngs=rngs, mutable=mutable)

    # --------------------------------------------------------------------------- decoding
    def encode(self, params, encoder_input_tokens: Array) -> Array:
        return self.module.apply({"params": params}, encoder_input_tokens,
                                 method=transformer.EncoderDecoder.encode)

    def init_cache(self, params, encoder_input_tokens: Array, max_decode_length: int) -> dict:
        """A zeroed decoder KV cache for `max_decode_length` positions (shapes only)."""
        del params
        b = encoder_input_tokens.shape[0]
        dec = jnp.ones((b, max_decode_length), jnp.int32)
        cache_vars = jax.eval_shape(lambda: self.module.init(
            jax.random.PRNGKey(0),
            jnp.zeros(encoder_input_tokens.shape + (self.config.emb_dim,),
                      self.config.jnp_dtype),
            encoder_input_tokens, dec, decode=True, method=transformer.EncoderDecoder.decode))
        return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), cache_vars["cache"])

    def cross_kv(self, params, encoded: Array, encoder_input_tokens: Array, cache: dict) -> dict:
        """Every decoder layer's cross-attention K/V, projected from `encoded` once
        (`moetx.lm.attention.CROSS_KV`); give them to `decode_step` so its steps skip the
        projection. `cache` is `init_cache`'s (its step here is thrown away)."""
        tokens = jnp.zeros((encoded.shape[0], 1), jnp.int32)
        _, mutated = self.module.apply(
            {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens,
            decode=True, decode_position=jnp.array(0, jnp.int32),
            mutable=["cache", attention.CROSS_KV], method=transformer.EncoderDecoder.decode)
        return mutated[attention.CROSS_KV]

    def decode_step(self, params, encoded: Array, encoder_input_tokens: Array, tokens: Array,
                    position: Array, cache: dict, cross_kv: dict | None = None):
        """One cached decoder step: logits <float32>[batch, vocab] and the updated cache. With
        `cross_kv` (from `cross_kv`), the cross-attention K/V are read rather than projected."""
        variables = {"params": params, "cache": cache}
        if cross_kv is not None:
            variables[attention.CROSS_KV] = cross_kv
        logits, mutated = self.module.apply(
            variables, encoded, encoder_input_tokens, tokens,
            decode=True, decode_position=position, mutable=["cache"],
            method=transformer.EncoderDecoder.decode)
        return logits[:, 0], mutated["cache"]

    def predict_batch(self, params, encoder_input_tokens: Array, max_decode_length: int,
                      rng: Array, eos_id: int, temperature: float = 0.0, topk: int = 0,
                      topp: float = 0.0, num_beams: int = 0, alpha: float = 0.6) -> Array:
        """Decodes targets for `encoder_input_tokens` <int32>[batch, enc_length] greedily,
        by sampling, or by beam search (`num_beams` > 0; the best beam is returned); returns
        <int32>[batch, max_decode_length] (generated tokens, zeros after EOS)."""
        encoded = self.encode(params, encoder_input_tokens)
        cache = self.init_cache(params, encoder_input_tokens, max_decode_length)
        b = encoder_input_tokens.shape[0]
        empty = jnp.zeros((b, max_decode_length), jnp.int32)
        no_prompt = jnp.zeros((b,), jnp.int32)
        cross = self.cross_kv(params, encoded, encoder_input_tokens, cache)
        if num_beams:
            # The step function runs on batch * num_beams rows: expand what it closes over.
            enc_x = decoding.expand_cache(encoded, num_beams)
            enc_t = decoding.expand_cache(encoder_input_tokens, num_beams)
            cross = decoding.expand_cache(cross, num_beams)

            def beam_step(tokens, position, cache):
                return self.decode_step(params, enc_x, enc_t, tokens, position, cache, cross)

            seqs, _ = decoding.beam_search(beam_step, cache, empty, no_prompt, eos_id,
                                           num_beams, alpha)
            return seqs[:, 0]

        def step_fn(tokens, position, cache):
            return self.decode_step(params, encoded, encoder_input_tokens, tokens, position,
                                    cache, cross)

        return decoding.temperature_sample(step_fn, cache, empty, no_prompt, rng, eos_id,
                                           temperature, topk, topp)
