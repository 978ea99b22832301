"""Image (and clip) classification model wrapper: what the trainer calls for vision models.

`ImageBatchMixin` implements the trainer's model protocol (`moetx.trainer.model.Model`) for the
vision wrappers (classification here, `align.DualEncoderModel`, `must.MultiTaskModel`):

  state_collections = ('batch_stats',)   carried by the trainer in TrainState.model_state
  loss_weights_and_factor(batch)         per-example weights (the `mask`) and their sum
  metric sums                            `loss_sum` (the loss summed over real examples),
                                         `correct` (top-1 hits), `count` (real examples), and
                                         in training `loss` (the differentiated loss)
  summarized metrics                     `loss`, `accuracy` and the count under `count_unit`
                                         ('examples' here)
  parameter_resizers()                   relative-position tables restored at another image size

The batch holds raw images (uint8 [B, (T,) H, W, C] as the task stores them), `label` [B] and
`mask` [B]. Preprocessing runs on device inside the step: scale to [0, 1], resize to
`image_size`, at train time `augment` (pad-crop, flip, RandAugment) and mixup, then normalise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from moetx.trainer.model import BaseModel, Resizer
from moetx.vision import augment as augment_lib
from moetx.vision import models
from moetx.vision.models import coatnet

Array = jax.Array
Batch = Mapping[str, Array]


def soft_targets(labels: Array, num_classes: int, label_smoothing: float) -> Array:
    """One-hot targets with `label_smoothing` of the mass spread uniformly over all classes."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def resize_position_table(table: Any, target_shape: tuple[int, ...]) -> Any:
    """A relative-position bias table [2h-1, 2w-1, heads] resized (bilinearly, by
    `coatnet.resize_relative_position_bias`) to `target_shape` [2H-1, 2W-1, heads]. Anything
    else (another rank, another number of heads) comes back unchanged, for the restore to
    report as a mismatch."""
    have, want = tuple(np.shape(table)), tuple(target_shape)
    if len(have) != 3 or len(want) != 3 or have[-1] != want[-1] or have == want:
        return table
    return coatnet.resize_relative_position_bias(table, ((want[0] + 1) // 2,
                                                        (want[1] + 1) // 2))


class ImageBatchMixin(BaseModel):
    """The model protocol shared by the vision wrappers (classification, ALIGN, MuST): the
    batch carries raw `image`s and a per-example `mask`; the wrapper has the fields
    `image_size`, `augment`, `mean` and `std`, and its metric sums `loss_sum`, `correct` and
    `count` (see the module docstring)."""

    image_size: int | None
    augment: augment_lib.Augment | None
    mean: Sequence[float]
    std: Sequence[float]

    state_collections = ("batch_stats",)

    def loss_weights_and_factor(self, batch: Batch) -> tuple[Array, Array]:
        """Per-example loss weights (the batch's `mask`) and their sum, at least 1."""
        weights = batch["mask"].astype(jnp.float32)
        return weights, jnp.maximum(jnp.sum(weights), 1.0)

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """`loss` (mean over the real examples), `accuracy` and the number of examples under
        `count_unit`."""
        n = float(sums["count"])
        return {"loss": float(sums["loss_sum"]) / max(n, 1.0),
                "accuracy": float(sums["correct"]) / max(n, 1.0), self.count_unit: n}

    def parameter_resizers(self) -> Mapping[str, Resizer]:
        """Relative-position bias tables (CoAtNet's `relative_position_bias`) restored from a
        checkpoint trained at another image size are resized to this model's size."""
        return {r"relative_position_bias$": resize_position_table}

    def preprocess(self, images: Array, rng: Array | None = None, train: bool = False) -> Array:
        """Raw images -> normalised float32 network inputs (augmented when `train` and an rng
        is given)."""
        x = augment_lib.to_float(images)
        if self.image_size is not None:
            x = augment_lib.resize(x, self.image_size)
        if train and rng is not None and self.augment is not None:
            x = self.augment(rng, x)
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)


def softmax_cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-example -sum_k targets_k log softmax(logits)_k, in float32."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


@gin.configurable
@dataclasses.dataclass
class ImageClassificationModel(ImageBatchMixin):
    """A `moetx.vision.models` classifier trained with softmax cross entropy.

    Attributes:
      model_name: registry name "family/variant" (e.g. "resnet_rs/tiny").
      num_classes: classifier width.
      image_size: side the images are resized to on device (None: as stored).
      model_overrides: config overrides passed to the family's `create`.
      dropout_rate: overrides the variant's head dropout when set (progressive learning).
      label_smoothing: mass spread uniformly over the classes in the training targets.
      mixup_alpha: mixup Beta(alpha, alpha) (0: off).
      augment: train-time `augment.Augment` (None: off).
      mean, std: per-channel normalisation of the [0, 1] images.
    """

    model_name: str = "resnet_rs/tiny"
    num_classes: int = 10
    image_size: int | None = None
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dropout_rate: float | None = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    augment: augment_lib.Augment | None = None
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    count_unit = "examples"

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 disables mixup), got "
                             f"{self.mixup_alpha}.")
        overrides = dict(self.model_overrides)
        if self.dropout_rate is not None:
            overrides["dropout_rate"] = self.dropout_rate
        self.module = models.create(self.model_name, self.num_classes, **overrides)

    # ----------------------------------------------------------------------------- features
    @property
    def feature_converter(self):
        from moetx.vision import tasks

        return tasks.VisionFeatureConverter(("image", "label"))

    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, Any]
                     ) -> dict[str, tuple[int, ...]]:
        """{'image': (B, *image shape), 'label': (B,), 'mask': (B,)}; the image shape is
        TASK_FEATURE_LENGTHS['image'], e.g. (28, 28, 1) or (8, 32, 32, 1) for clips."""
        shape = task_feature_lengths.get("image") if isinstance(task_feature_lengths,
                                                               Mapping) else None
        if not isinstance(shape, (tuple, list)) or len(shape) not in (3, 4):
            raise ValueError(
                f"Vision models need TASK_FEATURE_LENGTHS = {{'image': (H, W, C)}} (or "
                f"(T, H, W, C) for clips), got {task_feature_lengths!r}.")
        return {"image": (batch_size,) + tuple(int(d) for d in shape), "label": (batch_size,),
                "mask": (batch_size,)}

    # ------------------------------------------------------------------------------ forward
    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        """Variables {'params', 'batch_stats'} (batch_stats empty for models without BN)."""
        dummy = self.preprocess(jnp.zeros((1,) + tuple(input_shapes["image"][1:]), jnp.uint8))
        variables = dict(self.module.init({"params": rng, "dropout": rng}, dummy, train=False))
        variables.setdefault("batch_stats", {})
        return variables

    def apply(self, params, model_state, images: Array, train: bool, rng: Array | None = None):
        """(logits, out, new model state) for preprocessed `images`."""
        variables = {"params": params, **(model_state or {"batch_stats": {}})}
        if not train:
            logits, out = self.module.apply(variables, images, train=False)
            return logits, out, model_state
        rngs = {"dropout": rng if rng is not None else jax.random.PRNGKey(0)}
        (logits, out), mutated = self.module.apply(variables, images, train=True, rngs=rngs,
                                                   mutable=list(self.state_collections))
        return logits, out, {c: mutated.get(c, {}) for c in self.state_collections}

    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state=None):
        """Mean (over the full batch's real examples) cross entropy against smoothed, mixed
        targets; metrics count top-1 hits against the unmixed labels. Returns
        (loss, (metric sums, new model state))."""
        del num_microbatches
        if dropout_rng is not None:
            k_aug, k_mix, k_drop = jax.random.split(dropout_rng, 3)
        else:
            k_aug = k_mix = k_drop = None
        x = self.preprocess(batch["image"], k_aug, train=True)
        labels = batch["label"]
        targets = soft_targets(labels, self.num_classes, self.label_smoothing)
        if self.mixup_alpha > 0 and k_mix is not None:
            x, targets, _ = augment_lib.mixup(k_mix, x, targets, self.mixup_alpha)
        logits, _, new_state = self.apply(params, model_state, x, True, k_drop)
        ce = softmax_cross_entropy(logits, targets)
        total = jnp.sum(ce * weights)
        loss = total / factor if factor is not None else total
        metrics = {"loss": loss, "loss_sum": total,
                   "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
                   "count": jnp.sum(weights)}
        return loss, (metrics, new_state)

    def eval_fn(self, params, batch: Batch, model_state=None) -> dict[str, Array]:
        """Cross entropy (no smoothing) and top-1 hits over the real (`mask`) examples."""
        logits = self.predict(params, batch["image"], model_state)
        mask = batch["mask"].astype(jnp.float32)
        ce = softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], self.num_classes))
        return {"loss_sum": jnp.sum(ce * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
                "count": jnp.sum(mask)}

    def predict(self, params, images: Array, model_state=None) -> Array:
        """Eval-mode logits [B, num_classes] of raw images."""
        return self.apply(params, model_state, self.preprocess(images), False)[0]

    def flops_per_step(self, params, input_shapes) -> float:
        """3x the forward FLOPs XLA counts for the batch (forward + backward), 0 if unknown."""
        try:
            b = input_shapes["image"][0]
            x = jax.ShapeDtypeStruct((1,) + tuple(input_shapes["image"][1:]), jnp.uint8)
            stats = jax.eval_shape(lambda: self.get_initial_variables(
                jax.random.PRNGKey(0), input_shapes))["batch_stats"]
            lowered = jax.jit(lambda p, s, im: self.predict(p, im, {"batch_stats": s})).lower(
                params, stats, x)
            cost = lowered.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return 3.0 * b * float(cost.get("flops", 0.0))
        except Exception:  # pylint: disable=broad-except  (FLOPs are only reported)
            return 0.0
