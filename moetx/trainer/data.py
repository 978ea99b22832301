"""Input pipeline: a SeqIO task or mixture -> packed, batched numpy -> global sharded arrays.

The iterator's position is the number of batches it has produced. The pipeline is a pure
function of (task, split, feature lengths, seed, shard), so a restored run rebuilds it and skips
that many batches: it then continues exactly where the interrupted run stopped. (TF's own
iterator checkpoints would also work, but would tie checkpoints to TensorFlow's internals.)

That skip replays the pipeline, so resuming costs time in proportion to the batches already
read, and each process reads its own shard of the source, so the order depends on the number
of processes. `DatasetConfig.pipeline = 'indexed'` (`moetx.trainer.indexed_data`) instead
materialises the split once and reads batch N directly, in an order that does not depend on the
number of processes; it serves finite single tasks only (see its docstring for the trade-offs).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterator, Mapping

import gin
import numpy as np

# SeqIO pulls in TensorFlow; it is imported lazily so that model-only code stays light.

#: `DatasetConfig.pipeline` values: the SeqIO stream, or `moetx.trainer.indexed_data`.
PIPELINES = ("seqio", "indexed")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to read and how to batch it (T5X `utils.DatasetConfig`).

    Attributes:
      mixture_or_task_name: a registered SeqIO task or mixture.
      task_feature_lengths: e.g. {'targets': 512} (and 'inputs' for prefix LM / enc-dec); for
        a multi-dimensional feature its shape, e.g. {'image': (28, 28, 1)}.
      split: dataset split.
      batch_size: global batch size (all processes together).
      shuffle: shuffle examples (training).
      seed: shuffle seed; also fixes the packing order.
      pack: pack several examples per row (segment ids and positions), for models whose
        feature converter can pack (the language models'); False gives one example per row,
        padded. Pass-through converters (vision, ranking) never pack.
      use_cached: read SeqIO's offline-cached version of the task.
      pipeline: 'seqio' (stream the task; resuming replays the batches already read) or
        'indexed' (materialise the split once, then read any batch directly; a resumed run may
        have another number of processes; finite single tasks only; see
        `moetx.trainer.indexed_data`).
      prefetch: batches the 'seqio' pipeline prepares ahead, in tf.data's background threads,
        while the host waits for the devices (tf.data's `prefetch`; -1: tf.data chooses; 0:
        none, each batch is made when the trainer asks for it). The order of the batches and
        the resume position do not depend on it. The 'indexed' pipeline reads stored rows and
        has nothing to prepare ahead; it ignores this.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 42
    pack: bool = True
    use_cached: bool = False
    pipeline: str = "seqio"
    prefetch: int = 0

    def __post_init__(self):
        if not isinstance(self.mixture_or_task_name, str) or not self.mixture_or_task_name:
            raise ValueError(f"mixture_or_task_name must be a task or mixture name, got "
                             f"{self.mixture_or_task_name!r}.")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a split name such as 'train', got {self.split!r}.")
        if not _is_int(self.batch_size):
            raise ValueError(f"batch_size (BATCH_SIZE) must be an int, got {self.batch_size!r}.")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
        if not isinstance(self.task_feature_lengths, Mapping):
            raise ValueError(
                f"task_feature_lengths (TASK_FEATURE_LENGTHS) must be a dict of feature name to "
                f"length, e.g. {{'targets': 256}}, got {self.task_feature_lengths!r}.")
        if not self.task_feature_lengths:
            raise ValueError("task_feature_lengths is empty; set e.g. {'targets': 256}.")
        for k, v in dict(self.task_feature_lengths).items():
            _check_feature_length(k, v)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {list(PIPELINES)}, got {self.pipeline!r}.")
        if not _is_int(self.prefetch) or self.prefetch < -1:
            raise ValueError(f"prefetch must be a number of batches (0: none, -1: tf.data "
                             f"chooses), got {self.prefetch!r}.")


def _is_int(value) -> bool:
    """An int, and not a bool (True is an int to Python, not a length)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_feature_length(name: str, value) -> None:
    """A feature length is a positive int, or for a multi-dimensional feature a non-empty tuple
    (or list) of positive ints."""
    where = f"TASK_FEATURE_LENGTHS['{name}']"
    if isinstance(value, (tuple, list)):
        if not value or not all(_is_int(d) for d in value):
            raise ValueError(f"Feature shape {where} = {value!r} must be a tuple of ints.")
        if any(d < 1 for d in value):
            raise ValueError(f"Feature shape {name}={tuple(value)} must have positive sizes.")
        return
    if not _is_int(value):
        raise ValueError(f"Feature length {where} must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"Feature length {name}={value} must be positive; set {where} (the "
                         f"model may need more).")


def get_task(name: str):
    """The registered SeqIO task or mixture `name`.

    Raises ValueError listing the closest registered names when there is none.
    """
    import seqio

    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"Did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"No SeqIO task or mixture is registered as {name!r}. {hint}"
            f"({len(names)} are registered.) Fix: check the spelling, import the module that "
            "registers it (moetx's own are registered by `moetx.tasks.register_all()`, which the "
            "command lines call), or register text files with "
            "`moetx.tasks.register_text_files_task`."
        )
    return seqio.get_mixture_or_task(name)


def check_not_empty(cfg: DatasetConfig, preprocessed: bool = True) -> None:
    """Raises ValueError, before training starts, when `cfg`'s split has no example: the split
    does not exist, its source is empty, or (with `preprocessed`) every example is filtered out
    by the task's preprocessors (e.g. a text file of blank lines, texts too short for the
    objective). Reads only up to the first example (all of the source when everything is
    filtered out). With `preprocessed` it builds the task's pipeline, about half a second to a
    second for a tokenized task; without, only the sources are read (milliseconds)."""
    task = get_task(cfg.mixture_or_task_name)
    for sub in _tasks_of(task):
        _check_split_exists(sub, cfg.split)
    if preprocessed and _has_example(task, cfg, preprocessed=True):
        return
    what = f"{type(task).__name__.lower()} {task.name!r}"
    if not any(_has_example(sub, cfg, preprocessed=False) for sub in _tasks_of(task)):
        raise ValueError(f"The {cfg.split!r} split of {what} is empty: its source has no "
                         f"example. Fix: point the task at data, or choose another split.")
    if preprocessed:
        raise ValueError(f"Every example of the {cfg.split!r} split of {what} is filtered out "
                         f"by its preprocessors (e.g. only blank lines, or texts too short for "
                         f"the objective), so there is nothing to train or evaluate on. Fix: "
                         f"check the data.")


def _tasks_of(task_or_mixture) -> list:
    """The tasks of a mixture, or [task]."""
    return list(getattr(task_or_mixture, "tasks", None) or [task_or_mixture])


def _check_split_exists(task, split: str) -> None:
    splits = list(getattr(task, "splits", ()) or ())
    if splits and split not in splits:
        raise ValueError(f"Task {task.name!r} has no split {split!r}; it has {splits}. Fix: "
                         f"ask for one of those (e.g. EVAL_SPLIT).")


def _has_example(task, cfg: DatasetConfig, preprocessed: bool) -> bool:
    """Whether the task's split yields an example, after the preprocessors or straight from
    its source."""
    if preprocessed:
        ds = task.get_dataset(dict(cfg.task_feature_lengths), split=cfg.split,
                              use_cached=cfg.use_cached, shuffle=False, num_epochs=1,
                              trim_output_features=False)
    else:
        ds = task.source.get_dataset(split=cfg.split, shuffle=False)
    return any(True for _ in ds.take(1).as_numpy_iterator())


def feature_converter_for(cfg: DatasetConfig, feature_converter):
    """The model's `feature_converter` packing as `cfg.pack` says: where the two differ, a new
    converter of the same class built with the same settings and `pack=cfg.pack` (SeqIO
    converters keep each constructor argument as `_<name>`, and some build inner converters
    from them, so the setting must go through the constructor); else the converter itself.
    Pass-through converters (the vision and ranking tasks) have no packing and are returned as
    they are. Raises ValueError for a packing converter whose settings cannot be read back."""
    pack = getattr(feature_converter, "_pack", None)
    if pack is None or bool(pack) == bool(cfg.pack):
        return feature_converter
    import inspect

    cls = type(feature_converter)
    kwargs = {"pack": bool(cfg.pack)}
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if name == "pack" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(feature_converter, f"_{name}"):
            value = getattr(feature_converter, f"_{name}")
            # SeqIO stores passthrough_features=None as {}; None is what it was given.
            kwargs[name] = None if param.default is None and value == {} else value
        elif param.default is param.empty:
            raise ValueError(
                f"DatasetConfig.pack = {cfg.pack} needs {cls.__name__} rebuilt with "
                f"pack={cfg.pack}, but its setting {name!r} cannot be read back; give the model "
                f"a feature converter built with pack={cfg.pack} instead.")
    return cls(**kwargs)


def get_dataset(cfg: DatasetConfig, feature_converter, shard_index: int, num_shards: int,
                local_batch_size: int, num_epochs: int | None):
    """A batched tf.data pipeline of model features for this process's shard."""
    import seqio

    task = get_task(cfg.mixture_or_task_name)
    # The lengths the feature converter trims and packs to (pass-through converters need none).
    needed = getattr(feature_converter, "TASK_FEATURES", None) or {}
    missing = set(needed) - set(cfg.task_feature_lengths)
    if missing:
        raise ValueError(
            f"Task {cfg.mixture_or_task_name!r} has features {sorted(task.output_features)} but "
            f"task_feature_lengths is missing {sorted(missing)}.")
    ds = seqio.get_dataset(
        task, dict(cfg.task_feature_lengths), feature_converter, dataset_split=cfg.split,
        use_cached=cfg.use_cached, shuffle=cfg.shuffle, num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
        verbose=False, seed=cfg.seed)
    ds = ds.batch(local_batch_size, drop_remainder=num_epochs is None)
    if cfg.prefetch:
        import tensorflow as tf

        ds = ds.prefetch(tf.data.AUTOTUNE if cfg.prefetch == -1 else cfg.prefetch)
    return ds


class DataIterator:
    """Numpy batches with a resumable position (`batches_consumed`)."""

    def __init__(self, dataset, batches_consumed: int = 0):
        self._dataset = dataset
        self.batches_consumed = int(batches_consumed)
        self._it = iter(dataset.skip(self.batches_consumed).as_numpy_iterator())
        self._ahead: list[dict[str, np.ndarray]] = []

    @property
    def dataset(self):
        """The tf.data pipeline read from (from its first batch)."""
        return self._dataset

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._ahead.pop() if self._ahead else next(self._it)
        self.batches_consumed += 1
        return batch

    def has_next(self) -> bool:
        """Whether another batch comes (read ahead and kept for `__next__`)."""
        if not self._ahead:
            try:
                self._ahead.append(next(self._it))
            except StopIteration:
                return False
        return True

    def get_state(self) -> dict:
        return {"batches_consumed": self.batches_consumed}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a final partial batch with all-zero rows (zero loss weight)."""
    out = {}
    for k, v in batch.items():
        if v.shape[0] < batch_size:
            pad = np.zeros((batch_size - v.shape[0],) + v.shape[1:], v.dtype)
            v = np.concatenate([v, pad])
        out[k] = v
    return out
