"""SeqIO tasks of the ranking track: fixed-size slates for re-ranking. Importing this module
registers nothing; a run file names a task through the gin function `mslr_task()` (which
registers it and returns its name), a program calls `register_default_tasks()` or
`register_slate_task()`.

Every task yields one example per slate (an impression), with the features

  features    <float32>[k, F]  item features in the base ranker's order (transformed, see
                               `slates.FeatureTransform`), zero on padding
  item_mask   <float32>[k]     1 for real items, 0 for padding (slates are padded at the end)
  labels      <float32>[k]     graded relevance (evaluation, and the 'labels' reward)
  clicks      <float32>[k]     simulated clicks on the slate as the base ranker showed it

TASK_FEATURE_LENGTHS gives the slate shape: `{'features': (k, F)}`, e.g. (10, 136).

MSLR tasks (`mslr_task`): the rankeval sample of MSLR-WEB30K (`moetx.datasets.mslr`; splits
'train' and 'test', 43 queries each). The base ranker (`slates.BaseRanker`, ridge regression
on the training split's labels) orders each candidate pool, its top k form the slate, and
`slates.ClickModel(click_model)` clicks on it. Session 0 of every query pools all its
documents; `*_sessions_per_query - 1` more sessions pool `pool_size` random ones. The sample has
no validation split: evaluation is on 'test'.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Mapping, Sequence

if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import gin  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from moetx.datasets import mslr  # noqa: E402
from moetx.ranking import slates  # noqa: E402

FEATURES = ("features", "item_mask", "labels", "clicks")
SPLITS = ("train", "test")
DEFAULT_TASKS = {"mslr_position": "position", "mslr_diversity": "diversity"}


class SlateFeatureConverter(seqio.PassThroughFeatureConverter):
    """Keeps the slate features (`FEATURES`) of each example."""

    def __init__(self, features: Sequence[str] = FEATURES, **unused_kwargs):
        super().__init__()
        self.features = tuple(features)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
        del task_feature_lengths
        missing = [f for f in self.features if f not in ds.element_spec]
        if missing:
            raise ValueError(f"The task's examples have features {sorted(ds.element_spec)} but "
                             f"the ranking model needs {list(self.features)} (missing {missing}).")
        return ds.map(lambda ex: {k: ex[k] for k in self.features},
                      num_parallel_calls=tf.data.AUTOTUNE)


def _passthrough(rank: int) -> seqio.Feature:
    return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.float32,
                         rank=rank)


def register_slate_task(name: str, load: Callable[[str], Mapping[str, np.ndarray]],
                        splits: Sequence[str] = SPLITS, shuffle_buffer_size: int = 10000
                        ) -> seqio.Task:
    """Registers (replacing any task of that name) a task over in-memory slates:
    `load(split)` -> {feature: array [S, ...]} with at least `FEATURES` (as
    `slates.make_slates` returns them; other arrays are dropped), called when a dataset is
    first built."""
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed  # Examples are shuffled by the Task (seeded).
        arrays = load(split)
        missing = [f for f in FEATURES if f not in arrays]
        if missing:
            raise ValueError(f"The slates of task {name!r} lack {missing}; build them with "
                             "moetx.ranking.slates.make_slates.")
        return tf.data.Dataset.from_tensor_slices(
            {k: np.asarray(arrays[k], np.float32) for k in FEATURES})

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
        output_features={k: _passthrough(2 if k == "features" else 1) for k in FEATURES},
        preprocessors=[], shuffle_buffer_size=shuffle_buffer_size)


@functools.lru_cache(maxsize=2)
def base_ranker(data_dir: str | None = None, l2: float = 1.0
                ) -> tuple[slates.FeatureTransform, slates.BaseRanker]:
    """The feature transform and the base ranker, both fitted on the MSLR training split."""
    train = mslr.load_mslr("train", data_dir)
    transform = slates.FeatureTransform.fit(train.features)
    return transform, slates.BaseRanker.fit(transform(train.features), train.labels, l2)


@functools.lru_cache(maxsize=16)
def mslr_slates(split: str, click_model: str = "position", slate_size: int = 10,
                pool_size: int | None = 30, train_sessions_per_query: int = 64,
                test_sessions_per_query: int = 8, seed: int = 0, data_dir: str | None = None
                ) -> dict[str, np.ndarray]:
    """The slates of an MSLR split (see the module docstring): the arrays of
    `slates.build_slates` (features, item_mask, labels, clicks, base_scores, query_index)."""
    transform, ranker = base_ranker(data_dir)
    sessions = train_sessions_per_query if split == "train" else test_sessions_per_query
    # Different click and pool draws for the two splits.
    arrays, dropped = slates.build_slates(
        mslr.load_mslr(split, data_dir), transform, ranker, slates.ClickModel(click_model),
        slate_size, pool_size, sessions, seed=2 * seed + (split == "test"))
    if dropped:
        print(f"[moetx.ranking.tasks] mslr/{split}: dropped {dropped} single-document "
              "queries", file=sys.stderr)
    return arrays


def register_mslr_task(click_model: str = "position", slate_size: int = 10,
                       pool_size: int | None = 30, train_sessions_per_query: int = 64,
                       test_sessions_per_query: int = 8, seed: int = 0,
                       data_dir: str | None = None, name: str | None = None) -> str:
    """Registers the MSLR re-ranking task with these settings and returns its name (gin:
    `MIXTURE_OR_TASK_NAME = @mslr_task()`). The default name says the settings,
    e.g. 'mslr_position_k10_p30_s64x8_seed0'. Reads no data until a dataset is built."""
    if click_model not in slates.CLICK_MODELS:
        raise ValueError(f"click_model must be one of {slates.CLICK_MODELS}, got "
                         f"{click_model!r}.")
    name = name or (f"mslr_{click_model}_k{slate_size}_p{pool_size}_s{train_sessions_per_query}"
                    f"x{test_sessions_per_query}_seed{seed}")
    settings = (click_model, slate_size, pool_size, train_sessions_per_query,
                test_sessions_per_query, seed, data_dir)
    register_slate_task(name, lambda split: mslr_slates(split, *settings))
    return name


#: `register_mslr_task` as the gin configurable `mslr_task` (the plain function stays free of
#: gin bindings).
mslr_task = gin.external_configurable(register_mslr_task, "mslr_task",
                                      module="moetx.ranking.tasks")


def register_default_tasks() -> list[str]:
    """Registers 'mslr_position' and 'mslr_diversity' (the default settings of `mslr_task`).
    Idempotent; reads no data."""
    return [register_mslr_task(click_model=kind, name=name)
            for name, kind in DEFAULT_TASKS.items()]
