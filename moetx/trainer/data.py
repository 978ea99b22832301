"""Input pipeline: a SeqIO task or mixture -> packed, batched numpy -> global sharded arrays.

The iterator's position is the number of batches it has produced. The pipeline is a pure
function of (task, split, feature lengths, seed, shard), so a restored run rebuilds it and skips
that many batches: it then continues exactly where the interrupted run stopped. (TF's own
iterator checkpoints would also work, but would tie checkpoints to TensorFlow's internals.)
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterator, Mapping

import gin
import numpy as np

# SeqIO pulls in TensorFlow; it is imported lazily so that model-only code stays light.


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
      pack: pack several examples per row (segment ids and positions).
      use_cached: read SeqIO's offline-cached version of the task.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 42
    pack: bool = True
    use_cached: bool = False

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
        if not self.task_feature_lengths:
            raise ValueError("task_feature_lengths is empty; set e.g. {'targets': 256}.")
        for k, v in dict(self.task_feature_lengths).items():
            if isinstance(v, (tuple, list)):
                if not v or any(int(d) < 1 for d in v):
                    raise ValueError(f"Feature shape {k}={tuple(v)} must have positive sizes.")
                continue
            if int(v) < 1:
                raise ValueError(f"Feature length {k}={v} must be positive; set "
                                 f"TASK_FEATURE_LENGTHS['{k}'] (the model may need more).")


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
    return ds.batch(local_batch_size, drop_remainder=num_epochs is None)


class DataIterator:
    """Numpy batches with a resumable position (`batches_consumed`)."""

    def __init__(self, dataset, batches_consumed: int = 0):
        self._dataset = dataset
        self.batches_consumed = int(batches_consumed)
        self._it = iter(dataset.skip(self.batches_consumed).as_numpy_iterator())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.batches_consumed += 1
        return batch

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
