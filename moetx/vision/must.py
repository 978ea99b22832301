"""MuST mechanics (Ghiasi et al. 2021, "Multi-Task Self-Training"): specialised teachers
pseudo-label one shared image set; the labels go to an on-disk store; a multi-task student with
one head per task trains on all of them at once with per-task loss masks.

  specs = [TaskSpec("digit", "classification", 10), TaskSpec("ink", "regression", 1)]
  labels = {"digit": label_with_teacher(digit_teacher, images, threshold=0.5), ...}
  write_store(directory, images, specs, labels)          # images.npy, <task>.npz, manifest
  register_store_task("must_digits", directory)           # a SeqIO task for the trainer
  MultiTaskModel(backbone_name="resnet_rs/tiny", tasks=specs)   # the student wrapper

A teacher is any function `images uint8 [B, ...] -> outputs [B, K]` (logits for
classification, values for regression), e.g. `ImageClassificationModel.predict` with trained
variables. A label may be missing (a teacher not confident enough, or a task whose teacher did
not see that image): its mask is 0 and it adds nothing to the loss, as MuST's thresholded
pseudo-labels do. The student's loss is

  L = sum_t w_t * (sum_i m_ti * L_t(x_i)) / max(sum_i m_ti, 1),

softmax cross entropy against the teacher's (soft) distribution for classification tasks and
mean squared error for regression tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from moetx.nn.layers import Dense
from moetx.vision import augment as augment_lib
from moetx.vision import models
from moetx.vision.model import ImageBatchMixin, softmax_cross_entropy

Array = jax.Array
KINDS = ("classification", "regression")
MANIFEST = "manifest.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One pseudo-labelled task: its name, `kind` ('classification' or 'regression'), output
    width, and loss weight w_t."""

    name: str
    kind: str
    num_outputs: int
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got "
                             f"{self.kind!r}.")
        if self.num_outputs < 1:
            raise ValueError(f"Task {self.name!r}: num_outputs must be >= 1.")


# ----------------------------------------------------------------------- pseudo-labelling
def label_with_teacher(teacher: Callable[[np.ndarray], Array], images: np.ndarray,
                       kind: str = "classification", threshold: float | None = None,
                       hard: bool = False, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Runs `teacher` over `images` in batches.

    Classification: labels are the softmax distribution (one-hot of the argmax if `hard`);
    with `threshold`, images whose top probability is below it get mask 0.
    Regression: labels are the outputs, all masked in.
    Returns (labels float32 [N, K], mask float32 [N]).
    """
    outs = []
    for start in range(0, len(images), batch_size):
        outs.append(np.asarray(jax.device_get(teacher(images[start:start + batch_size])),
                               np.float32))
    out = np.concatenate(outs).reshape(len(images), -1)
    mask = np.ones(len(images), np.float32)
    if kind == "regression":
        return out, mask
    probs = np.asarray(jax.nn.softmax(out, axis=-1), np.float32)
    if threshold is not None:
        mask = (probs.max(-1) >= threshold).astype(np.float32)
    if hard:
        probs = np.eye(out.shape[-1], dtype=np.float32)[probs.argmax(-1)]
    return probs, mask


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_store(directory: str | Path, images: np.ndarray, specs: Sequence[TaskSpec],
                labels: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Writes the shared images and each task's (labels, mask) with a manifest holding the
    specs, shapes and content hashes. Missing tasks in `labels` are an error; a task with no
    label for an image has mask 0 there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(images)
    manifest = {"num_images": n, "images_sha256": _sha256(images), "tasks": {}}
    np.save(directory / "images.npy", images)
    for spec in specs:
        if spec.name not in labels:
            raise ValueError(f"No pseudo-labels for task {spec.name!r} (got {sorted(labels)}).")
        y, m = (np.asarray(a, np.float32) for a in labels[spec.name])
        if y.shape != (n, spec.num_outputs) or m.shape != (n,):
            raise ValueError(f"Task {spec.name!r}: expected labels [{n}, {spec.num_outputs}] "
                             f"and mask [{n}], got {y.shape} and {m.shape}.")
        np.savez(directory / f"{spec.name}.npz", labels=y, mask=m)
        manifest["tasks"][spec.name] = {**dataclasses.asdict(spec), "labels_sha256": _sha256(y),
                                        "mask_sha256": _sha256(m),
                                        "labelled": int(m.sum())}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def read_store(directory: str | Path
               ) -> tuple[np.ndarray, list[TaskSpec], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Reads a store written by `write_store`, verifying every array's hash."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise FileNotFoundError(f"{directory / MANIFEST} not found; write the store with "
                                f"moetx.vision.must.write_store first.")
    manifest = json.loads((directory / MANIFEST).read_text())
    images = np.load(directory / "images.npy")
    if _sha256(images) != manifest["images_sha256"]:
        raise ValueError(f"{directory}/images.npy does not match its manifest hash.")
    specs, labels = [], {}
    for name, info in manifest["tasks"].items():
        specs.append(TaskSpec(info["name"], info["kind"], info["num_outputs"], info["weight"]))
        with np.load(directory / f"{name}.npz") as f:
            y, m = f["labels"], f["mask"]
        if _sha256(y) != info["labels_sha256"] or _sha256(m) != info["mask_sha256"]:
            raise ValueError(f"{directory}/{name}.npz does not match its manifest hash.")
        labels[name] = (y, m)
    return images, specs, labels


def store_features(directory: str | Path) -> dict[str, np.ndarray]:
    """The store as flat example features: image, <task>_labels, <task>_mask."""
    images, specs, labels = read_store(directory)
    out = {"image": images}
    for spec in specs:
        out[f"{spec.name}_labels"], out[f"{spec.name}_mask"] = labels[spec.name]
    return out


@gin.configurable
def register_store_task(name: str, directory: str, holdout: int = 0) -> str:
    """Registers SeqIO task `name` over the store: split 'train' (all but the last `holdout`
    images) and 'validation' (the last `holdout`). Returns the name (usable as
    MIXTURE_OR_TASK_NAME = @register_store_task() in gin)."""
    from moetx.vision import tasks

    def load(split):
        feats = store_features(directory)
        n = len(feats["image"])
        sl = slice(0, n - holdout) if split == "train" else slice(n - holdout, n)
        return {k: v[sl] for k, v in feats.items()}

    tasks.register_array_task(name, load, splits=("train", "validation"))
    return name


# ---------------------------------------------------------------------------- student
class MultiTaskStudent(nn.Module):
    """A registry backbone (its `pre_logits`) with one dense head per task."""

    backbone: nn.Module
    tasks: tuple[TaskSpec, ...]

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> dict[str, Array]:
        _, out = self.backbone(images, train=train)
        feats = out["pre_logits"]
        return {t.name: Dense(t.num_outputs, kernel_init=nn.initializers.zeros,
                              name=f"head_{t.name}")(feats) for t in self.tasks}


def multitask_loss(outputs: Mapping[str, Array], batch: Mapping[str, Array],
                   specs: Sequence[TaskSpec], row_mask: Array | None = None
                   ) -> tuple[Array, dict[str, Array]]:
    """sum_t w_t * masked mean of the task loss over the examples it labels; also returns
    per-task `<task>_loss_sum` and `<task>_count` (additive metrics)."""
    total = jnp.zeros((), jnp.float32)
    sums = {}
    for spec in specs:
        out = outputs[spec.name].astype(jnp.float32)
        y = batch[f"{spec.name}_labels"].astype(jnp.float32)
        m = batch[f"{spec.name}_mask"].astype(jnp.float32)
        if row_mask is not None:
            m = m * row_mask
        if spec.kind == "classification":
            per = softmax_cross_entropy(out, y)
        else:
            per = jnp.mean(jnp.square(out - y), axis=-1)
        s, c = jnp.sum(per * m), jnp.sum(m)
        total = total + spec.weight * s / jnp.maximum(c, 1.0)
        sums[f"{spec.name}_loss_sum"], sums[f"{spec.name}_count"] = s, c
    return total, sums


@gin.configurable
@dataclasses.dataclass
class MultiTaskModel(ImageBatchMixin):
    """The MuST student wrapper for the shared trainer (batch: image, <task>_labels,
    <task>_mask, mask).

    Attributes:
      backbone_name: registry name of the backbone ("family/variant").
      tasks: the TaskSpecs (as in the store's manifest).
      image_size, augment, mean, std: image preprocessing, as for classification.

    Metrics: `loss`, the weighted multi-task loss sum_t w_t * <task>_loss over the evaluated
    images; `<task>_loss`, each task's mean loss over the images it labels; `accuracy`, the
    top-1 agreement with the first classification task's teacher on the images it labels; and
    the number of `images`. (The metric sums are `<task>_loss_sum`, `<task>_count`, `correct`
    and `count`, plus `loss` in training.)
    """

    backbone_name: str = "tiny/s"
    tasks: tuple[TaskSpec, ...] = ()
    image_size: int | None = None
    augment: augment_lib.Augment | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    count_unit = "images"

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("MultiTaskModel needs at least one TaskSpec in `tasks`.")
        self.tasks = tuple(self.tasks)
        self.module = MultiTaskStudent(models.create(self.backbone_name, 1), self.tasks)

    def _features(self) -> list[str]:
        return ["image"] + [f"{t.name}_{k}" for t in self.tasks for k in ("labels", "mask")]

    @property
    def feature_converter(self):
        from moetx.vision import tasks

        return tasks.VisionFeatureConverter(self._features())

    def input_shapes(self, batch_size: int, task_feature_lengths):
        image = task_feature_lengths.get("image")
        if not isinstance(image, (tuple, list)):
            raise ValueError(f"MultiTaskModel needs TASK_FEATURE_LENGTHS = {{'image': (H, W, "
                             f"C)}}, got {task_feature_lengths!r}.")
        shapes = {"image": (batch_size,) + tuple(image), "mask": (batch_size,)}
        for t in self.tasks:
            shapes[f"{t.name}_labels"] = (batch_size, t.num_outputs)
            shapes[f"{t.name}_mask"] = (batch_size,)
        return shapes

    def get_initial_variables(self, rng, input_shapes):
        x = self.preprocess(jnp.zeros((1,) + tuple(input_shapes["image"][1:]), jnp.uint8))
        variables = dict(self.module.init({"params": rng, "dropout": rng}, x))
        variables.setdefault("batch_stats", {})
        return variables

    def _first_classification(self) -> TaskSpec | None:
        return next((t for t in self.tasks if t.kind == "classification"), None)

    def _metrics(self, outputs, batch, sums, weights) -> dict[str, Array]:
        """The per-task sums plus `correct` (agreement with the first classification task's
        teacher on its labelled images) and `count` (real images)."""
        first = self._first_classification()
        correct = jnp.zeros(())
        if first is not None:
            m = batch[f"{first.name}_mask"] * weights
            agree = jnp.argmax(outputs[first.name], -1) == jnp.argmax(
                batch[f"{first.name}_labels"], -1)
            correct = jnp.sum(agree * m)
        return {**sums, "correct": correct, "count": jnp.sum(weights)}

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Each task's mean loss over the images it labels, their weighted sum `loss`, the
        first classification task's `accuracy` and the number of `images`."""
        out = {}
        loss = 0.0
        for t in self.tasks:
            mean = float(sums[f"{t.name}_loss_sum"]) / max(float(sums[f"{t.name}_count"]), 1.0)
            out[f"{t.name}_loss"] = mean
            loss += t.weight * mean
        out["loss"] = loss
        first = self._first_classification()
        if first is not None:
            out["accuracy"] = float(sums["correct"]) / max(float(sums[f"{first.name}_count"]),
                                                           1.0)
        out[self.count_unit] = float(sums["count"])
        return out

    def loss_fn(self, params, batch, dropout_rng, weights, factor, num_microbatches=1,
                model_state=None):
        """The masked multi-task loss (per-task means over this (micro)batch's labelled
        images; divided by the number of microbatches so that they accumulate to a mean)."""
        del factor
        k_aug, k_drop = (jax.random.split(dropout_rng) if dropout_rng is not None
                         else (None, jax.random.PRNGKey(0)))
        x = self.preprocess(batch["image"], k_aug, True)
        variables = {"params": params, **(model_state or {"batch_stats": {}})}
        outputs, mutated = self.module.apply(variables, x, train=True, rngs={"dropout": k_drop},
                                             mutable=list(self.state_collections))
        loss, sums = multitask_loss(outputs, batch, self.tasks, weights)
        loss = loss / num_microbatches
        new_state = {c: mutated.get(c, {}) for c in self.state_collections}
        return loss, ({"loss": loss, **self._metrics(outputs, batch, sums, weights)}, new_state)

    def eval_fn(self, params, batch, model_state=None):
        variables = {"params": params, **(model_state or {"batch_stats": {}})}
        outputs = self.module.apply(variables, self.preprocess(batch["image"]), train=False)
        w = batch["mask"].astype(jnp.float32)
        _, sums = multitask_loss(outputs, batch, self.tasks, w)
        return self._metrics(outputs, batch, sums, w)
