"""SeqIO tasks of the vision track. Importing this module registers nothing:
`register_default_tasks()` registers the tasks below (the command lines call it through
`moetx.cli.flags`), and their data is read only when a dataset is first built.

  fashion_mnist    image uint8 [28, 28, 1], label; splits train (60,000) / test (10,000)
  digits           image uint8 [8, 8, 1], label; splits train (1,500) / test (297)
  digit_clips      image uint8 [8, 32, 32, 1] (a clip), label; splits as digits
  digit_captions   image [8, 8, 1], text int32 [8] (word ids), label; splits as digits

Features pass through untouched (`seqio.PassThroughVocabulary`); the model wrapper's
`VisionFeatureConverter` keeps the features it needs and adds `mask` (1 for real examples, 0 for
the padding rows of a final eval batch). TASK_FEATURE_LENGTHS gives the image shape, e.g.
`{'image': (28, 28, 1)}`; it only sets the model's input shapes (labels need no length).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from moetx.vision import data  # noqa: E402

SPLITS = ("train", "test")


def passthrough_feature(dtype, rank: int) -> seqio.Feature:
    return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=dtype,
                         rank=rank)


class VisionFeatureConverter(seqio.PassThroughFeatureConverter):
    """Keeps `features` of each example and adds `mask` = 1.0 (padding rows get 0)."""

    def __init__(self, features: Sequence[str] = ("image", "label"), **unused_kwargs):
        super().__init__()
        self.features = tuple(features)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
        del task_feature_lengths
        missing = [f for f in self.features if f not in ds.element_spec]
        if missing:
            raise ValueError(f"The task's examples have features {sorted(ds.element_spec)} but "
                             f"the model needs {list(self.features)} (missing {missing}).")

        def convert(ex):
            out = {k: ex[k] for k in self.features}
            out["mask"] = tf.constant(1.0, tf.float32)
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def register_array_task(name: str, load: Callable[[str], dict[str, np.ndarray]],
                        splits: Sequence[str] = SPLITS, shuffle_buffer_size: int = 10000,
                        ) -> seqio.Task:
    """Registers (replacing any task of that name) a task reading in-memory arrays:
    `load(split)` -> {feature: array [N, ...]}, called when a dataset is first built."""
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed  # Examples are shuffled by the Task (seeded).
        return tf.data.Dataset.from_tensor_slices(dict(load(split)))

    # Output feature dtypes and ranks, from a tiny probe that does not load the data:
    sample = _FEATURE_SPECS.get(name)
    if sample is None:
        arrays = load(splits[0])
        sample = {k: (tf.as_dtype(v.dtype), v.ndim - 1) for k, v in arrays.items()}
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
        output_features={k: passthrough_feature(d, r) for k, (d, r) in sample.items()},
        preprocessors=[], shuffle_buffer_size=shuffle_buffer_size)


# Feature specs of the built-in tasks, so registering them reads no data.
_FEATURE_SPECS = {
    "fashion_mnist": {"image": (tf.uint8, 3), "label": (tf.int32, 0)},
    "digits": {"image": (tf.uint8, 3), "label": (tf.int32, 0)},
    "digit_clips": {"image": (tf.uint8, 4), "label": (tf.int32, 0)},
    "digit_captions": {"image": (tf.uint8, 3), "text": (tf.int32, 1), "label": (tf.int32, 0)},
}


def _as_dict(images, labels):
    return {"image": images, "label": labels}


def _captions(split):
    images, text, labels = data.digit_captions(split)
    return {"image": images, "text": text, "label": labels}


def register_default_tasks() -> None:
    """(Re-)registers `fashion_mnist`, `digits`, `digit_clips` and `digit_captions`. Idempotent;
    reads no data (Fashion-MNIST is fetched, if it is not cached, when first read)."""
    register_array_task("fashion_mnist", lambda s: _as_dict(*data.load_fashion_mnist(s)))
    register_array_task("digits", lambda s: _as_dict(*data.load_digits(s)))
    register_array_task("digit_clips", lambda s: _as_dict(*data.digit_clips(s)))
    register_array_task("digit_captions", _captions)

