"""The model protocol: everything the trainer, evaluation and checkpoint restore know about a model.

The trainer is model-agnostic: it never reads a feature or metric by name. A model (a language
model in `moetx.lm.models`, an image classifier in `moetx.vision.model`, or your own) is any
object with the members of `Model`; subclassing `BaseModel` supplies the optional ones with
their defaults. T5X's `BaseModel` plays the same role there.

Batches are dicts of arrays whose names and shapes the model declares (`input_shapes`);
`complete_batch` turns what the data pipeline yields into exactly those features.

Metrics are *sums*: `loss_fn` and `eval_fn` return `{name: scalar}` that the trainer adds over
microbatches (training) or batches (evaluation). `reduce_metrics` then divides the metrics whose
`metric_reduction` is 'mean' (per-step means, such as a language model's router statistics) by
the number of steps added, and `summarize_metrics` turns the result into the scalars that are
logged, e.g. a sum of losses and an example count -> a mean loss. Its output always holds the
count under the key `count_unit` ('tokens', 'examples', ...): `Trainer.evaluate` returns it,
`eval_results.json` stores it, and the console prints it through `headline`. The training log
reports the count as a rate instead, `timing/<count_unit>_per_second`, from `count_per_batch`,
and writes the model's `loss_metric` as `loss` (T5X: the optimised loss, which the trainer checks
for NaN).

Inference evaluation (a seqio.Evaluator running the task's metric functions, see
`moetx.trainer.metrics.InferenceEvaluator`) is optional: a model that supports it gives an
`inference_feature_converter` and `inference_fns` (predict / score functions over the
evaluator's dataset); `BaseModel`'s defaults say it does not.

A minimal model (see tests/trainer/test_model_protocol.py for one trained end to end):

    class Regression(BaseModel):
        count_unit = "examples"
        feature_converter = None  # batches come from elsewhere
        def input_shapes(self, batch_size, lengths): return {"x": (batch_size, 3), ...}
        def get_initial_variables(self, rng, shapes): return {"params": ...}
        def loss_weights_and_factor(self, batch): return batch["w"], jnp.sum(batch["w"])
        def loss_fn(self, params, batch, dropout_rng, weights, factor, num_microbatches=1,
                    model_state=None): return loss, ({"sq_err_sum": ..., "n": ...}, model_state)
        def eval_fn(self, params, batch, model_state=None): return {"sq_err_sum": ..., ...}
        def summarize_metrics(self, sums): return {"loss": ..., "examples": sums["n"]}
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, Literal, Mapping, Protocol, runtime_checkable

import flax.linen as nn
import jax
import numpy as np

from moetx.trainer import partitioning

Array = jax.Array
Batch = Mapping[str, Array]
Shapes = Mapping[str, tuple[int, ...]]
Reduction = Literal["sum", "mean"]
Resizer = Callable[[Any, tuple[int, ...]], Any]


@runtime_checkable
class Model(Protocol):
    """What a model gives the trainer.

    Attributes:
      state_collections: mutable variable collections the trainer carries in
        `TrainState.model_state` and checkpoints (e.g. `('batch_stats',)`); `()` for none.
      count_unit: what the model's count counts ('tokens', 'examples', 'pairs', ...): the key
        of the count in `summarize_metrics` and the prefix of the `<count_unit>_per_sec` rate.
      loss_metric: the summarized training metric that is the loss the model optimises (checked
        for NaN and logged as `loss` during training, as T5X's `loss`).
    """

    state_collections: tuple[str, ...]
    count_unit: str
    loss_metric: str

    @property
    def feature_converter(self) -> Any:
        """The SeqIO feature converter from task features to model features."""

    def input_shapes(self, batch_size: int, task_feature_lengths: Any) -> dict[str, tuple]:
        """Global shapes of the model's batch features. Raises ValueError for lengths the model
        cannot use."""

    def get_initial_variables(self, rng: Array, input_shapes: Shapes) -> Mapping[str, Any]:
        """Variables (boxed with logical axes): 'params' plus the `state_collections`."""

    def loss_weights_and_factor(self, batch: Batch) -> tuple[Array, Array | None]:
        """Loss weights of a whole batch (leading axis: the batch rows, so that they split into
        microbatches with it) and the loss divisor (None: sum). Computed before the batch is
        split, which makes gradient accumulation give the full-batch update."""

    def loss_fn(self, params: Any, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state: Any = None
                ) -> tuple[Array, tuple[dict[str, Array], Any]]:
        """(loss to differentiate, (metric sums, new model state)) of one (micro)batch.

        `model_state` is `{collection: tree}` for the `state_collections` (`{}` when there are
        none); a stateless model returns it unchanged."""

    def eval_fn(self, params: Any, batch: Batch, model_state: Any = None) -> dict[str, Array]:
        """Metric sums of one evaluation batch (padding rows must add nothing)."""

    def metric_reduction(self, name: str) -> Reduction:
        """'sum' for metrics that add up over steps, 'mean' for per-step means."""

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Reduced metric sums -> the scalars to log, including the count under `count_unit`."""

    def headline(self, scalars: Mapping[str, float]) -> str:
        """A one-line summary of summarized eval metrics for the console."""

    def complete_batch(self, batch: Mapping[str, np.ndarray], input_shapes: Shapes
                       ) -> dict[str, np.ndarray]:
        """A host's numpy batch -> exactly the features of `input_shapes`, filling any the data
        lacks (the batch holds this host's rows; the shapes are global)."""

    def count_per_batch(self, input_shapes: Shapes) -> int:
        """How many `count_unit` one batch of `input_shapes` feeds, for throughput (0: none)."""

    def flops_per_step(self, params: Any, input_shapes: Shapes) -> float:
        """Training FLOPs of one step (0 when unknown)."""

    def check_task(self, task: Any, task_feature_lengths: Mapping[str, Any] | None = None
                   ) -> None:
        """Raises ValueError when the SeqIO task or mixture cannot feed this model (at
        `task_feature_lengths`, when given)."""

    @property
    def inference_feature_converter(self) -> Any:
        """Optional. The SeqIO feature converter of inference evaluation (unpacked rows), or
        None when the model has no `inference_fns`."""

    def inference_fns(self, params: Any, model_state: Any = None, *, mesh: Any, rules: Any,
                      batch_size: int, output_features: Mapping[str, Any]
                      ) -> Mapping[str, Callable]:
        """Optional. seqio.Evaluator's model functions with these variables: `{'predict':
        fn, 'score': fn}` (either may be absent), each `fn(dataset, model_feature_shapes=None)
        -> [(index, output)]` over the evaluator's enumerated dataset of
        `inference_feature_converter` features; predictions are token ids the task's
        `output_features['targets']` vocabulary decodes, scores floats. `mesh`, `rules`: where
        `params` live; `batch_size`: rows per compiled call."""

    def parameter_resizers(self) -> Mapping[str, Resizer]:
        """How to adapt a parameter restored from a checkpoint where it has another shape:
        `{regex: fn}`. For every target parameter whose '/'-joined path matches `regex` (with
        `re.search`), whose source exists and whose shape differs, restore calls
        `fn(source_array, target_shape)` and uses its result (returning the source unchanged
        leaves the mismatch to be reported)."""


class BaseModel(abc.ABC):
    """`Model` with defaults for its optional members; subclasses implement the abstract ones.

    Defaults: no state; the count is of 'examples'; the training loss is the summarized
    'loss'; every metric is a sum; batches must carry every feature; the count per batch is
    the batch size; FLOPs unknown; every task accepted; nothing resized on restore; no
    inference evaluation.
    """

    state_collections: tuple[str, ...] = ()
    count_unit: str = "examples"
    loss_metric: str = "loss"

    @property
    @abc.abstractmethod
    def feature_converter(self) -> Any:
        ...

    @abc.abstractmethod
    def input_shapes(self, batch_size: int, task_feature_lengths: Any) -> dict[str, tuple]:
        ...

    @abc.abstractmethod
    def get_initial_variables(self, rng: Array, input_shapes: Shapes) -> Mapping[str, Any]:
        ...

    @abc.abstractmethod
    def loss_weights_and_factor(self, batch: Batch) -> tuple[Array, Array | None]:
        ...

    @abc.abstractmethod
    def loss_fn(self, params: Any, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state: Any = None
                ) -> tuple[Array, tuple[dict[str, Array], Any]]:
        ...

    @abc.abstractmethod
    def eval_fn(self, params: Any, batch: Batch, model_state: Any = None) -> dict[str, Array]:
        ...

    @abc.abstractmethod
    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        ...

    def metric_reduction(self, name: str) -> Reduction:
        del name
        return "sum"

    def headline(self, scalars: Mapping[str, float]) -> str:
        """`loss 0.4189 | accuracy 0.872 | (10,000 examples)`: the loss metric, the accuracy
        when there is one, and the count."""
        parts = [f"loss {scalars[self.loss_metric]:.4f}"] if self.loss_metric in scalars else []
        if "accuracy" in scalars:
            parts.append(f"accuracy {scalars['accuracy']:.3f}")
        if self.count_unit in scalars:
            parts.append(f"({int(scalars[self.count_unit]):,} {self.count_unit})")
        return " | ".join(parts)

    def complete_batch(self, batch: Mapping[str, np.ndarray], input_shapes: Shapes
                       ) -> dict[str, np.ndarray]:
        missing = [k for k in input_shapes if k not in batch]
        if missing:
            raise ValueError(
                f"The batch lacks the feature(s) {missing} of {type(self).__name__}; it has "
                f"{sorted(batch)}. Fix: make the task (or its feature converter) produce them, or "
                f"override {type(self).__name__}.complete_batch to fill them.")
        return {k: np.asarray(batch[k]) for k in input_shapes}

    def count_per_batch(self, input_shapes: Shapes) -> int:
        return int(next(iter(input_shapes.values()))[0]) if input_shapes else 0

    def flops_per_step(self, params: Any, input_shapes: Shapes) -> float:
        del params, input_shapes
        return 0.0

    def check_task(self, task: Any, task_feature_lengths: Mapping[str, Any] | None = None
                   ) -> None:
        del task, task_feature_lengths

    def parameter_resizers(self) -> Mapping[str, Resizer]:
        return {}

    @property
    def inference_feature_converter(self) -> Any:
        return None

    def inference_fns(self, params: Any, model_state: Any = None, *, mesh: Any, rules: Any,
                      batch_size: int, output_features: Mapping[str, Any]
                      ) -> Mapping[str, Callable]:
        raise ValueError(f"{type(self).__name__} has no inference functions, so it cannot be "
                         f"evaluated with the task's metrics (seqio.Evaluator); use the "
                         f"teacher-forced evaluation instead.")


#: Members of `Model` a model may lack (whoever uses them checks for them).
OPTIONAL_MEMBERS = ("inference_feature_converter", "inference_fns")


def protocol_members() -> list[str]:
    """The names every `Model` has (attributes and methods), the optional ones excluded."""
    names = set(Model.__annotations__)
    names.update(k for k, v in vars(Model).items()
                 if not k.startswith("_") and (callable(v) or isinstance(v, property)))
    return sorted(names - set(OPTIONAL_MEMBERS))


def check_model(model: Any) -> None:
    """Raises TypeError naming the `Model` members `model` lacks (looked up without running
    properties such as `feature_converter`, which may import a data pipeline)."""
    absent = object()
    missing = [name for name in protocol_members()
               if inspect.getattr_static(model, name, absent) is absent]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a moetx model: it lacks {missing}. Fix: subclass "
            f"moetx.trainer.model.BaseModel (which supplies the optional members) and implement "
            f"the rest.")


def abstract_variables(model: Model, input_shapes: Shapes, seed: int = 0
                       ) -> tuple[Any, Any, dict[str, Any]]:
    """`(params logical axes, abstract params, abstract model state)` of `model` at
    `input_shapes`, from `jax.eval_shape` of its `get_initial_variables` (nothing allocated).

    The model state is `{collection: tree}` for each of the model's `state_collections`; a
    declared collection that `get_initial_variables` does not return is a ValueError.
    """
    rng = jax.random.PRNGKey(seed)
    boxed = jax.eval_shape(lambda: model.get_initial_variables(rng, dict(input_shapes)))
    collections = tuple(model.state_collections)
    missing = [c for c in collections if c not in boxed]
    if missing:
        raise ValueError(f"The model declares state collections {missing} that its "
                         f"get_initial_variables does not return (it has {sorted(boxed)}).")
    return (partitioning.params_logical_axes(boxed["params"]), nn.unbox(boxed["params"]),
            {c: nn.unbox(boxed[c]) for c in collections})


def reduce_metrics(model: Model, totals: Mapping[str, float], num_steps: int
                   ) -> dict[str, float]:
    """Metric sums over `num_steps` steps -> the model's reductions: 'mean' metrics divided by
    the number of steps, 'sum' metrics as they are."""
    n = max(int(num_steps), 1)
    out = {}
    for k, v in totals.items():
        how = model.metric_reduction(k)
        if how not in ("sum", "mean"):
            raise ValueError(f"{type(model).__name__}.metric_reduction({k!r}) returned "
                             f"{how!r}; expected 'sum' or 'mean'.")
        out[k] = float(v) / n if how == "mean" else float(v)
    return out
