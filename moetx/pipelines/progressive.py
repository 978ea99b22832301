"""Progressive learning (EfficientNetV2, Tan & Le 2021): training in stages through the shared
trainer, each stage raising the image size and the regularisation together (RandAugment
magnitude, mixup alpha, dropout), each continuing from the previous stage's checkpoint.

    python -m moetx.cli.progressive --gin_file=vision/progressive_fashion_mnist.gin \\
      --gin.MODEL_DIR="'runs/fmnist_progressive'" --gin.TRAIN_STEPS=800

Stage i is one `moetx.trainer.train.train` call with the same MODEL_DIR and TRAIN_STEPS set to
the stage's cumulative end: it restores the latest checkpoint (model, optimizer, EMA, batch
norm statistics and data position), trains its steps with the stage's model, saves and
evaluates. The learning-rate schedule spans all stages (gin's TRAIN_STEPS). Parameters do not
depend on the image size (global pooling), so every stage restores the same state.

The stages come from `efficientnet_v2.progressive_schedule` (automl's rule: size
ibase + (train_size - ibase)·(i+1)/N, RandAugment magnitude linspace(5, m, N), mixup
linspace(0, alpha, N), dropout linspace(0, rate, N)), or are given explicitly.
"""

from __future__ import annotations

import dataclasses
import os

import sys
from typing import Any, Callable, Sequence

import gin

from moetx.trainer import train as train_lib
from moetx.vision import augment as augment_lib
from moetx.vision.models import efficientnet_v2

Stage = efficientnet_v2.ProgressiveStage


@gin.configurable
def efficientnet_v2_schedule(total_steps: int, variant: str = "s", num_stages: int = 4,
                             ibase: int = 128, train_size: int | None = None) -> list[Stage]:
    """gin wrapper of `efficientnet_v2.progressive_schedule` (e.g. `ibase = 16`,
    `train_size = 28` to scale the recipe to 28x28 images)."""
    return efficientnet_v2.progressive_schedule(variant, total_steps, num_stages, ibase,
                                                train_size)


def stage_model(model: Any, stage: Stage, randaugment_layers: int = 2) -> Any:
    """`model` (a vision wrapper dataclass) with the stage's image size, dropout, mixup and
    RandAugment magnitude (RandAugment is switched on with `randaugment_layers` ops when the
    base model has it off)."""
    changes: dict[str, Any] = {"image_size": stage.image_size, "dropout_rate": stage.dropout,
                               "mixup_alpha": stage.mixup_alpha}
    if stage.randaug_magnitude is not None:
        base = model.augment or augment_lib.Augment()
        changes["augment"] = base.replace(
            randaugment_layers=base.randaugment_layers or randaugment_layers,
            randaugment_magnitude=stage.randaug_magnitude)
    unknown = [k for k in changes if not hasattr(model, k)]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no {unknown}; progressive learning needs a "
                         f"model wrapper with image_size, dropout_rate, mixup_alpha, augment.")
    return dataclasses.replace(model, **changes)


@gin.configurable
def run(model: Any = gin.REQUIRED, train_steps: int = gin.REQUIRED,
        schedule_fn: Callable[[int], Sequence[Stage]] = efficientnet_v2_schedule,
        stages: Sequence[Stage | Sequence] | None = None, randaugment_layers: int = 2,
        train_fn: Callable[..., dict] | None = None) -> list[dict]:
    """Trains `model` in stages; returns each stage's `train` results (with its 'stage').

    Args:
      model: the base wrapper (gin's %MODEL); each stage replaces its size/regularisation.
      train_steps: total steps over all stages.
      schedule_fn: `total_steps -> stages` (default: EfficientNetV2's rule).
      stages: explicit stages instead, as `ProgressiveStage`s or tuples (image_size,
        randaug_magnitude, mixup_alpha, dropout, steps) whose steps sum to `train_steps`.
      randaugment_layers: RandAugment ops per image when the base model has none configured.
      train_fn: the training function (default `moetx.trainer.train.train`, gin-configured).
    """
    train_fn = train_fn or train_lib.train
    plan = [Stage(*s) for s in stages] if stages is not None else list(schedule_fn(train_steps))
    total = sum(s.steps for s in plan)
    if total != train_steps or any(s.steps <= 0 for s in plan):
        raise ValueError(f"The stages' steps {[s.steps for s in plan]} must be positive and sum "
                         f"to TRAIN_STEPS={train_steps}.")
    results, end = [], 0
    for i, stage in enumerate(plan):
        end += stage.steps
        train_lib.log(f"[progressive] stage {i + 1}/{len(plan)}: steps {end - stage.steps}"
                       f"-{end}, image {stage.image_size}, RandAugment {stage.randaug_magnitude}"
                       f", mixup {stage.mixup_alpha}, dropout {stage.dropout}")
        out = train_fn(model=stage_model(model, stage, randaugment_layers), train_steps=end)
        results.append({**out, "stage": stage._asdict()})
    return results
