"""The indexed input pipeline: a task's split materialised once, then read by batch index.

`DatasetConfig.pipeline = 'indexed'` replaces the SeqIO stream of `moetx.trainer.data` by random
access, so that resuming at batch N costs what starting at batch 0 does, and a run may resume
on a different number of processes with the same global batch order.

How it works:

1. **Materialise once.** The task's split goes through the SeqIO pipeline once (one epoch,
   shuffled with the config's seed when `shuffle`, packed and feature-converted by the model's
   feature converter), and every output row is written to `<index_dir>/<name>.<split>.<key>/`:
   one raw file per feature, read back as a numpy memmap, and `meta.json`. The key hashes
   everything the rows depend on (task, split, feature lengths, feature converter and its
   settings, shuffle, seed, use_cached, the task's output features, its preprocessors and its
   source files' sizes and times, the format). The folder is written under a temporary name
   and renamed into place, so a reader never sees a half-written store; every process
   materialises it when missing (on one machine the first rename wins, the others discard
   theirs; hosts without a shared disk each write the same rows, the pipeline being
   deterministic).
2. **Global example order.** With `grain`, global example g is row `order[g]` of the store:
   `MapDataset.range(rows).shuffle(seed).repeat()` permutes each epoch differently and
   deterministically from (seed, epoch), in O(1) per index; without `shuffle` the rows come in
   their stored order, epoch after epoch.
3. **Batches.** Batch b of the run is global examples [b*B, (b+1)*B) (B the global batch size);
   a process reads only its rows of it (`Trainer.local_rows`). The iterator's state is the
   number of batches consumed, as for the SeqIO path, and starting at batch N reads batch N
   directly (about 30 us a row for the index lookup, plus the memmap read).

Trade-offs against the SeqIO path (which stays the default):

- The split must be finite and fit `max_store_bytes()` on disk: an infinitely repeating or
  streaming source, or a corpus such as C4, cannot be materialised (the error says so; use
  the SeqIO path). Mixtures are refused: their rates sample from repeated tasks, which one
  stored epoch cannot represent.
- The first use pays one pass over the split (about as long as one epoch of the SeqIO path);
  later runs with the same key reuse the store.
- Rows are packed once: every epoch shows the same packed rows (and the same random choices of
  random preprocessors) in a new order, while SeqIO re-shuffles examples (in a buffer) before
  packing each epoch and packs across epoch boundaries. Shuffled training batches therefore
  differ from the SeqIO path's; unshuffled reading gives the same batches (evaluation, and at
  least the first epoch of unshuffled training).
- The SeqIO path gives each process a different shard of the source, so its order depends on
  the number of processes; here it does not.
- A change the key cannot see (a task's preprocessor code changed under the same name and
  arguments, a vocabulary file rewritten at the same path) needs the store deleted (or another
  `index_dir`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import gin
import numpy as np

from moetx.trainer import data

#: Bumped whenever the store's layout or the meaning of its key changes.
STORE_FORMAT = 1
_META = "meta.json"
# Rows read from the SeqIO pipeline at a time while materialising.
_CHUNK_ROWS = 1024


class IndexingError(ValueError):
    """A task or config that the indexed pipeline cannot serve (use pipeline='seqio')."""


@gin.configurable(module="moetx.trainer.indexed_data")
def index_dir(path: str | None = None) -> Path:
    """Where indexed stores live: `path`, else `$MOETX_DATA/indexed`, else
    `~/.cache/moetx/indexed`."""
    if path:
        return Path(path).expanduser()
    root = os.environ.get("MOETX_DATA") or "~/.cache/moetx"
    return Path(root).expanduser() / "indexed"


@gin.configurable(module="moetx.trainer.indexed_data")
def max_store_bytes(value: int = 64 << 30) -> int:
    """The largest store materialised (default 64 GiB); a larger split is refused."""
    return int(value)


# --------------------------------------------------------------------------- the store's key


def _is_plain(value: Any) -> bool:
    """A scalar (not None), or a list, tuple or dict of plain values."""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        return True
    if isinstance(value, Mapping):
        return all(_is_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able, address-free description of `obj` for the store key: plain values as they
    are, functions by qualified name, partials with their arguments, other objects by class and
    (two levels deep) their attributes.

    Of an object's attributes, private ones count only when they hold plain values and None
    counts as absent: a lazily loaded cache (e.g. a model file read at first use) must not
    change the key between two calls."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth)
                for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth) for v in obj]
    if isinstance(obj, functools.partial):
        return {"partial": describe(obj.func, depth), "args": describe(obj.args, depth + 1),
                "keywords": describe(obj.keywords, depth + 1)}
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if isinstance(obj, np.dtype):
        return obj.str
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth >= 2 or not hasattr(obj, "__dict__"):
        return kind
    out = {"class": kind}
    if isinstance(getattr(obj, "name", None), str):  # e.g. a dtype, whose state is not in vars
        out["name"] = obj.name
    for name, value in sorted(vars(obj).items()):
        if value is None or name.startswith("__") or (
                callable(value) and not isinstance(value, functools.partial)):
            continue
        if name.startswith("_") and not _is_plain(value):
            continue
        out[name] = describe(value, depth + 1)
    return out


def _source_files(task, split: str) -> list:
    """(path, size, mtime) of the task's source files for `split`, when it lists local files."""
    try:
        shards = list(task.source.list_shards(split))
    except Exception:  # e.g. a TFDS source not prepared here: its name stands for it.
        return [type(task.source).__qualname__]
    out = []
    for shard in shards:
        shard = str(shard)
        if os.path.isfile(shard):
            st = os.stat(shard)
            out.append([shard, st.st_size, st.st_mtime_ns])
        else:
            out.append(shard)
    return out


def store_description(cfg: data.DatasetConfig, feature_converter) -> dict:
    """Everything the materialised rows of `cfg` depend on (hashed into the store's key)."""
    task = data.get_task(cfg.mixture_or_task_name)
    return {
        "format": STORE_FORMAT,
        "task": cfg.mixture_or_task_name,
        "split": cfg.split,
        "feature_lengths": describe(dict(cfg.task_feature_lengths)),
        "feature_converter": describe(feature_converter),
        "shuffle": cfg.shuffle,
        "seed": cfg.seed,
        "use_cached": cfg.use_cached,
        "output_features": describe(dict(getattr(task, "output_features", {}) or {})),
        "preprocessors": describe(list(getattr(task, "preprocessors", ()) or ())),
        "source_files": _source_files(task, cfg.split),
    }


def store_path(cfg: data.DatasetConfig, feature_converter, root: Path | None = None) -> Path:
    """The folder of `cfg`'s store under `root` (default `index_dir()`)."""
    desc = store_description(cfg, feature_converter)
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in cfg.mixture_or_task_name)
    return (root or index_dir()) / f"{safe}.{cfg.split}.{key}"


# --------------------------------------------------------------------------- materialising


def check_indexable(cfg: data.DatasetConfig) -> None:
    """Raises IndexingError when `cfg` cannot use the indexed pipeline (before any reading)."""
    import seqio

    task = data.get_task(cfg.mixture_or_task_name)
    if isinstance(task, seqio.Mixture):
        raise IndexingError(
            f"{cfg.mixture_or_task_name!r} is a mixture; the indexed pipeline serves single tasks "
            f"only (a mixture samples by rates from repeated tasks). Fix: set "
            f"DatasetConfig.pipeline = 'seqio'.")
    if cfg.shuffle and cfg.seed is None:
        raise IndexingError(
            "pipeline='indexed' with shuffle=True needs a seed (the order is a function of "
            "it); DatasetConfig.seed is None. Fix: set DatasetConfig.seed (e.g. %SEED).")


def materialize(cfg: data.DatasetConfig, feature_converter, root: Path | None = None) -> Path:
    """The store of `cfg`'s rows, written now when it does not exist yet; returns its folder.

    Raises:
      IndexingError: a mixture, a shuffle without a seed, a feature whose shape varies between
        rows, an empty split, or a split larger than `max_store_bytes()`.
    """
    check_indexable(cfg)
    path = store_path(cfg, feature_converter, root)
    if (path / _META).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.monotonic()
    print(f"moetx: indexing the {cfg.split!r} split of {cfg.mixture_or_task_name!r} into {path} "
          f"(once; later runs reuse it)...", file=sys.stderr, flush=True)
    try:
        num_rows, features = _write_rows(cfg, feature_converter, tmp)
        meta = {"num_rows": num_rows, "features": features,
                "description": store_description(cfg, feature_converter)}
        with open(tmp / _META, "w") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / _META).is_file():  # not another process's store: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"moetx: indexed {num_rows:,} rows in {time.monotonic() - start:.1f} s.",
          file=sys.stderr, flush=True)
    return path


def _write_rows(cfg: data.DatasetConfig, feature_converter, folder: Path) -> tuple[int, dict]:
    """Streams one epoch of the SeqIO pipeline into one raw file per feature in `folder`;
    returns (rows, {feature: {'dtype', 'shape'}}) with `shape` the shape of one row."""
    ds = data.get_dataset(cfg, feature_converter, 0, 1, _CHUNK_ROWS, num_epochs=1)
    limit = max_store_bytes()
    features: dict[str, dict] = {}
    files: dict[str, Any] = {}
    num_rows = written = 0
    try:
        for chunk in ds.as_numpy_iterator():
            if not features:
                features = {k: {"dtype": np.asarray(v).dtype.str, "shape": list(v.shape[1:])}
                            for k, v in chunk.items()}
                files = {k: open(folder / f"{k}.bin", "wb") for k in chunk}
            if set(chunk) != set(features):
                raise IndexingError(f"Task {cfg.mixture_or_task_name!r} gives features "
                                    f"{sorted(chunk)} after {sorted(features)}.")
            for k, v in chunk.items():
                v = np.ascontiguousarray(v)
                if list(v.shape[1:]) != features[k]["shape"] or v.dtype.str != features[k]["dtype"]:
                    raise IndexingError(
                        f"Feature {k!r} of {cfg.mixture_or_task_name!r} changes shape or dtype "
                        f"between rows ({features[k]['shape']} {features[k]['dtype']}, then "
                        f"{list(v.shape[1:])} {v.dtype.str}); only fixed-shape rows can be "
                        f"indexed. Fix: set DatasetConfig.pipeline = 'seqio'.")
                files[k].write(v.tobytes())
                written += v.nbytes
            num_rows += len(next(iter(chunk.values())))
            if written > limit:
                raise IndexingError(
                    f"The {cfg.split!r} split of {cfg.mixture_or_task_name!r} is larger than "
                    f"{limit:,} bytes (indexed_data.max_store_bytes) once materialised, or does "
                    f"not end. Fix: set DatasetConfig.pipeline = 'seqio', or raise "
                    f"moetx.trainer.indexed_data.max_store_bytes.value.")
        for f in files.values():  # durable before the folder is renamed into place
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    if not num_rows:
        raise IndexingError(f"The {cfg.split!r} split of {cfg.mixture_or_task_name!r} gives no "
                            f"example to index.")
    return num_rows, features


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Store:
    """A materialised split: `num_rows` rows of fixed-shape features, memory-mapped."""

    path: Path
    num_rows: int
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, path: Path) -> Store:
        meta = json.loads((Path(path) / _META).read_text())
        n = int(meta["num_rows"])
        arrays = {k: np.memmap(Path(path) / f"{k}.bin", dtype=np.dtype(f["dtype"]), mode="r",
                               shape=(n, *f["shape"]))
                  for k, f in meta["features"].items()}
        return cls(Path(path), n, arrays)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` (int [k]) of every feature, as in-memory arrays [k, ...]."""
        return {k: np.asarray(v[indices]) for k, v in self.arrays.items()}


def _grain_seed(seed: int | None) -> int:
    """The grain shuffle seed derived from the config's seed (any int, into [0, 2**32))."""
    digest = hashlib.sha256(f"moetx-indexed-{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def example_order(num_rows: int, shuffle: bool, seed: int | None, num_epochs: int | None):
    """A grain `MapDataset` whose element g is the store row of global example g: a new
    permutation of the rows each epoch (from seed and epoch) with `shuffle`, else the stored
    order; `num_epochs` epochs, or without end for None."""
    import grain

    order = grain.MapDataset.range(num_rows)
    if shuffle:
        order = order.shuffle(seed=_grain_seed(seed))
    return order.repeat(num_epochs)


class IndexedBatches:
    """This process's rows of the global batches, from batch `batches_consumed` on.

    The same interface as `data.DataIterator` (iteration, `has_next`, `get_state`,
    `batches_consumed`). Batch b is global examples [b*B, (b+1)*B) of `example_order`, of which
    this process reads `rows` (a slice of [0, B)); with a finite `num_epochs` the last batch
    may be partial (fewer, possibly no, rows) and iteration then ends; without, it never ends.
    """

    def __init__(self, store: Store, global_batch_size: int, rows: slice, shuffle: bool,
                 seed: int | None, num_epochs: int | None, batches_consumed: int = 0):
        if not 0 <= rows.start < rows.stop <= global_batch_size:
            raise ValueError(f"rows {rows} must be a non-empty part of the global batch of "
                             f"{global_batch_size}.")
        self.store = store
        self.global_batch_size = global_batch_size
        self.rows_of_batch = rows
        self._order = example_order(store.num_rows, shuffle, seed, num_epochs)
        self._examples = None if num_epochs is None else store.num_rows * num_epochs
        self.num_batches = (None if self._examples is None
                            else math.ceil(self._examples / global_batch_size))
        self.batches_consumed = int(batches_consumed)

    def batch(self, b: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `b` (random access, any b)."""
        first = b * self.global_batch_size
        lo, hi = first + self.rows_of_batch.start, first + self.rows_of_batch.stop
        if self._examples is not None:
            hi = min(hi, self._examples)
        indices = np.fromiter((self._order[g] for g in range(lo, hi)), np.int64,
                              count=max(hi - lo, 0))
        return self.store.rows(indices)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.has_next():
            raise StopIteration
        out = self.batch(self.batches_consumed)
        self.batches_consumed += 1
        return out

    def has_next(self) -> bool:
        return self.num_batches is None or self.batches_consumed < self.num_batches

    def get_state(self) -> dict:
        return {"batches_consumed": self.batches_consumed}


def indexed_batches(cfg: data.DatasetConfig, feature_converter, rows: slice,
                    batches_consumed: int, num_epochs: int | None) -> IndexedBatches:
    """`cfg`'s batches through the indexed pipeline (materialising the store when missing):
    this process's `rows` of each global batch, from batch `batches_consumed` on."""
    store = Store.open(materialize(cfg, feature_converter))
    return IndexedBatches(store, cfg.batch_size, rows, cfg.shuffle, cfg.seed, num_epochs,
                          batches_consumed)
