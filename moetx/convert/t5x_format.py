"""Read and write T5X checkpoints without t5x or TensorFlow.

A legacy T5X checkpoint (`Checkpointer`, VERSION 3) is a directory `checkpoint_<step>/` holding a
msgpack file `checkpoint` with the tree

    {'version': 3, 'optimizer': {'target': <params>, 'state': {'step': ..., 'param_states': ...}}}

whose leaves are either inline arrays (msgpack extension types, the encoding of
`flax.serialization`) or tensorstore spec dicts pointing at zarr v2 arrays stored next to the file
under relative paths (`target.encoder.layers_0.attention.query.kernel/`). Orbax-era T5X
checkpoints (`checkpoint_<step>/state/` with `_METADATA`, or the older Orbax layout whose msgpack
leaves are `PLACEHOLDER://` strings) are read through orbax-checkpoint.

Reading is a stream: `iter_arrays` yields one `(key_path, np.ndarray)` at a time and keeps no
reference to what it yielded, so memory is bounded by a small multiple of the largest array (an
inline array briefly exists as its msgpack payload too). Writing goes into a temporary sibling
directory that is renamed into place only when everything is on disk.

    ckpt = read_checkpoint('model_dir/checkpoint_1000')   # format detected: 'msgpack' | 'orbax'
    write_checkpoint('out/checkpoint_1000', ckpt.params, ckpt.step, ckpt.opt_state)
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import ml_dtypes
import msgpack
import numpy as np

from moetx.util import trees

VERSION = 3
# flax.serialization's msgpack extension type codes.
_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3
# flax splits arrays above 2**30 bytes into flat chunks under this marker key (msgpack objects
# are limited to 2**31 - 1 bytes).
_CHUNKED_KEY = "__msgpack_chunked_array__"
_FLAX_MAX_CHUNK_BYTES = 2**30
_MSGPACK_MAX_BUFFER = 2**31 - 1
# T5X `_DESIRED_CHUNK_SIZE_BYTES`: zarr chunks are at most this large.
DESIRED_CHUNK_BYTES = 64 * 1024 * 1024
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
_STEP_DIR = re.compile(r"^(?:checkpoint_)?(\d+)$")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class T5xCheckpoint:
    """A T5X checkpoint in memory.

    Attributes:
      step: the training step (`optimizer/state/step`).
      params: nested dict of np.ndarray with T5X names, the `optimizer/target` subtree.
      opt_state: the `optimizer/state/param_states` subtree as stored. For T5X Adafactor it mirrors
        `params` and each leaf position holds a dict of slot arrays (`v_row`, `v_col`, `v`, `m`);
        None when absent or not loaded.
      format: 'msgpack' (legacy T5X Checkpointer) or 'orbax'.
      extra: other top-level subtrees holding arrays (e.g. `flax_mutables`).
    """

    step: int
    params: dict
    opt_state: dict | None
    format: str
    extra: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Inline arrays: flax's msgpack extension types.
# --------------------------------------------------------------------------------------------


def _dtype_from_name(name: str) -> np.dtype:
    """numpy dtype for a flax/tensorstore dtype name; ml_dtypes supplies bfloat16 and float8."""
    extended = getattr(ml_dtypes, name, None)
    if isinstance(extended, type):
        try:
            return np.dtype(extended)
        except TypeError:
            pass
    return np.dtype(name)


def _decode_ndarray(data: bytes) -> np.ndarray:
    # Payload: msgpack [shape, dtype_name, raw C-order bytes]. raw=True keeps the buffer as bytes
    # even in files written without the bin type.
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii")
    array = np.frombuffer(buffer, dtype=_dtype_from_name(dtype_name))
    # frombuffer is read-only and aliases the payload; a copy gives callers an ordinary array.
    return array.reshape(shape, order="C").copy()


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        # Scalars (ext 3) become 0-d arrays: every numeric leaf this module returns is an ndarray.
        return _decode_ndarray(data)
    if code == _EXT_NATIVE_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return np.asarray(complex(real, imag))
    raise ValueError(f"unknown msgpack extension type {code}; expected flax's ndarray (1), "
                     "complex (2) or numpy scalar (3)")


def _encode_ndarray(array: np.ndarray) -> bytes:
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise TypeError(f"cannot serialize dtype {array.dtype}; expected a numeric dtype")
    return msgpack.packb([list(array.shape), array.dtype.name,
                          np.ascontiguousarray(array).tobytes("C")], use_bin_type=True)


def _inline_value(array: np.ndarray) -> Any:
    """msgpack value for an inline array: ext 1, or flax's chunked dict above 2**30 bytes."""
    if array.nbytes <= _FLAX_MAX_CHUNK_BYTES:
        return msgpack.ExtType(_EXT_NDARRAY, _encode_ndarray(array))
    per_chunk = max(1, _FLAX_MAX_CHUNK_BYTES // array.dtype.itemsize)
    flat = array.reshape(-1)
    chunks = [flat[i:i + per_chunk] for i in range(0, flat.size, per_chunk)]
    return {_CHUNKED_KEY: True,
            "shape": {str(i): int(d) for i, d in enumerate(array.shape)},
            "chunks": {str(i): msgpack.ExtType(_EXT_NDARRAY, _encode_ndarray(c))
                       for i, c in enumerate(chunks)}}


def _unchunk(node: dict, path: tuple[str, ...]) -> np.ndarray:
    try:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{'/'.join(path)}: malformed flax chunked array ({e!r})") from e
    return np.concatenate(chunks).reshape(shape)


# --------------------------------------------------------------------------------------------
# Tensorstore specs.
# --------------------------------------------------------------------------------------------


def is_ts_spec(node: Any) -> bool:
    """Whether a msgpack map is a serialized tensorstore spec (T5X's test, plus the `path` form)."""
    return (isinstance(node, dict) and "driver" in node and "metadata" in node
            and ("kvstore" in node or "path" in node))


def resolve_ts_spec(spec: dict, checkpoint_dir: str) -> dict:
    """Spec as stored in the msgpack file -> spec tensorstore can open, with an absolute path.

    Stored specs carry a path relative to the checkpoint directory, either in `kvstore.path` or
    (tensorstore < 0.1.14) in a top-level `path`. The kvstore driver recorded at write time
    (`file`, `gfile`, `gcs`) is replaced by the one that reaches `checkpoint_dir` now, as T5X
    does when a checkpoint is copied between GCS and a local disk: a local directory is read
    with the `file` driver, `gs://bucket/dir` with tensorstore's `gcs` driver on `bucket`.

    Args:
      spec: the stored spec dict.
      checkpoint_dir: directory holding the `checkpoint` file (local path or gs:// URL).

    Returns:
      A new spec dict with `kvstore = {'driver': 'file'|'gcs', ['bucket'], 'path': absolute}`.
    """
    if not is_ts_spec(spec):
        raise ValueError(f"not a tensorstore spec (expected keys driver, metadata and kvstore or "
                         f"path): {spec!r}")
    spec = copy.deepcopy(spec)
    kvstore = spec.pop("kvstore", None) or {}
    if isinstance(kvstore, str):
        raise ValueError(f"kvstore given as URL {kvstore!r}; expected a kvstore dict as T5X "
                         "writes it ({'driver': 'file', 'path': 'target.<name>'})")
    kvstore = dict(kvstore)
    driver = kvstore.pop("driver", "file")
    if driver not in ("file", "gfile", "gcs"):
        raise ValueError(f"unsupported kvstore driver {driver!r}; T5X checkpoints use 'file', "
                         "'gfile' or 'gcs'")
    relative = kvstore.pop("path", "") or ""
    if "path" in spec:
        top = spec.pop("path")
        relative = posixpath.join(relative, top) if relative else top
    if not relative:
        raise ValueError(f"tensorstore spec has no path: {spec!r}")
    kvstore.pop("bucket", None)
    match = re.fullmatch(r"gs://([^/]+)/?(.*)", checkpoint_dir, re.DOTALL)
    if match:
        extra = kvstore if driver == "gcs" else {}
        spec["kvstore"] = {**extra, "driver": "gcs", "bucket": match.group(1),
                           "path": posixpath.join(match.group(2), relative)}
    elif "://" in checkpoint_dir:
        raise ValueError(f"unsupported checkpoint location {checkpoint_dir!r}; expected a local "
                         "directory or gs://bucket/path")
    else:
        # Absolute: tensorstore's file driver refuses a relative path ("Invalid file path").
        spec["kvstore"] = {"driver": "file",
                           "path": os.path.join(os.path.abspath(checkpoint_dir), relative)}
    return spec


def _ts_dtype(spec: dict) -> str | None:
    return spec.get("dtype") or spec.get("metadata", {}).get("dtype")


def _check_local_chunks(spec: dict, shape: tuple[int, ...], path: tuple[str, ...]) -> None:
    """Fail on missing zarr chunk files; tensorstore would silently read them as zeros."""
    directory = spec["kvstore"]["path"]
    metadata = spec.get("metadata", {})
    chunks = metadata.get("chunks") or list(shape)
    separator = metadata.get("dimension_separator", ".")
    zarray = os.path.join(directory, ".zarray")
    if os.path.exists(zarray):
        with open(zarray) as f:
            stored = json.load(f)
        chunks, separator = stored.get("chunks", chunks), stored.get("dimension_separator", ".")
    grid = [range(math.ceil(n / c)) if c else range(1) for n, c in zip(shape, chunks)]
    expected = ([separator.join(str(i) for i in idx) for idx in np.ndindex(*map(len, grid))]
                if shape else ["0"])
    missing = [k for k in expected if not os.path.exists(os.path.join(directory, k))]
    if missing:
        raise ValueError(f"{'/'.join(path)}: {len(missing)} of {len(expected)} zarr chunk files "
                         f"missing under {directory} (first: {missing[0]!r}); the checkpoint is "
                         "incomplete (copy it again with all files)")


def read_ts_array(spec: dict, checkpoint_dir: str, path: tuple[str, ...] = ()) -> np.ndarray:
    """Reads the array a stored tensorstore spec points at.

    When the zarr `.zarray` metadata file is missing (a copy that dropped dot files) but the spec
    carries the full metadata, as T5X's specs do, the array is opened from the spec alone.
    """
    import tensorstore as ts

    abs_spec = resolve_ts_spec(spec, checkpoint_dir)
    name = "/".join(path) or abs_spec["kvstore"]["path"]
    local = abs_spec["kvstore"]["driver"] == "file"
    if local and not os.path.isdir(abs_spec["kvstore"]["path"]):
        raise FileNotFoundError(f"{name}: array directory {abs_spec['kvstore']['path']} does not "
                                "exist; the checkpoint is incomplete")
    try:
        store = ts.open(abs_spec, open=True, read=True).result()
    except ValueError as e:
        metadata = abs_spec.get("metadata", {})
        if "NOT_FOUND" not in str(e) or "shape" not in metadata or not _ts_dtype(abs_spec):
            raise ValueError(f"{name}: cannot open tensorstore array: {e}") from e
        log.warning("%s: zarr metadata file missing, opening from the spec in the checkpoint "
                    "file", name)
        store = ts.open(abs_spec, open=True, read=True, assume_metadata=True).result()
    if local:
        _check_local_chunks(abs_spec, tuple(store.shape), path)
    return np.asarray(store.read().result())


# --------------------------------------------------------------------------------------------
# Locating a checkpoint and telling the formats apart.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Located:
    format: str
    directory: str  # the checkpoint_N directory (holds `checkpoint` and the array dirs)
    msgpack_file: str | None  # the `checkpoint` file, when there is one
    orbax_dir: str | None  # the directory orbax-checkpoint restores from


def _is_orbax_dir(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, m)) for m in _ORBAX_MARKERS)


def _is_checkpoint_dir(directory: str) -> bool:
    return (os.path.isfile(os.path.join(directory, "checkpoint")) or _is_orbax_dir(directory)
            or _is_orbax_dir(os.path.join(directory, "state")))


def _latest_step_dir(parent: str) -> str | None:
    steps = []
    for name in os.listdir(parent):
        m = _STEP_DIR.match(name)
        full = os.path.join(parent, name)
        if m and os.path.isdir(full) and _is_checkpoint_dir(full):
            steps.append((int(m.group(1)), full))
    return max(steps)[1] if steps else None


def _open_file(path: str) -> BinaryIO:
    match = re.fullmatch(r"gs://([^/]+)/(.*)", path, re.DOTALL)
    if not match:
        return open(path, "rb")
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "gcs", "bucket": match.group(1)}).result()
    result = store.read(match.group(2)).result()
    if result.state != "value":
        raise FileNotFoundError(f"{path} does not exist")
    return io.BytesIO(bytes(result.value))


def _unpacker(fp: BinaryIO, ext_hook=_ext_hook) -> msgpack.Unpacker:
    return msgpack.Unpacker(fp, ext_hook=ext_hook, raw=False, strict_map_key=False,
                            max_buffer_size=_MSGPACK_MAX_BUFFER)


def _read_key_tree(fp: BinaryIO) -> dict:
    """Nested dict of the msgpack file's map keys (non-map values skipped, not decoded)."""
    unpacker = _unpacker(fp, ext_hook=lambda code, data: None)

    def walk(count: int) -> dict:
        node = {}
        for _ in range(count):
            key = unpacker.unpack()
            try:
                child_count = unpacker.read_map_header()
            except ValueError:  # not a map; the stream has not advanced
                unpacker.skip()
                node[key] = None
            else:
                node[key] = walk(child_count)
        return node

    try:
        count = unpacker.read_map_header()
    except ValueError as e:
        raise ValueError(f"top level is not a msgpack map ({e})") from e
    tree = walk(count)
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return tree
    raise ValueError("trailing data after the top-level map")


def _contains_spec(tree: dict) -> bool:
    stack = [tree]
    while stack:
        node = stack.pop()
        if is_ts_spec(node):
            return True
        stack.extend(v for v in node.values() if isinstance(v, dict))
    return False


def _classify_msgpack(file: str) -> str:
    with _open_file(file) as fp:
        if fp.read(21) == b"model_checkpoint_path":
            raise ValueError(f"{file} is a TensorFlow (Mesh TensorFlow T5) checkpoint index, not a "
                             "T5X checkpoint; convert it with T5X's "
                             "`restore_from_tf_checkpoint` first")
        fp.seek(0)
        try:
            keys = _read_key_tree(fp)
        except Exception as e:  # msgpack raises several types for corrupt input
            raise ValueError(f"{file} is not a valid T5X msgpack checkpoint file (corrupt or "
                             f"truncated: {type(e).__name__}: {e}); expected the `checkpoint` "
                             "file written by T5X") from e
    top = set(keys)
    if top & {"_optimizer", "params_axes", "flax_mutables_axes"}:
        return "orbax"  # the older Orbax layout: a TrainState's fields, leaves PLACEHOLDER://
    if "optimizer" in top or top & {"target", "state"} or _contains_spec(keys):
        return "msgpack"
    raise ValueError(f"{file} is msgpack but not a T5X checkpoint: top-level keys "
                     f"{sorted(map(str, top))}, expected 'optimizer' (and 'version')")


def _locate(path: str) -> _Located:
    path = os.fspath(path)
    if path.startswith("gs://"):
        file = path if path.rstrip("/").endswith("/checkpoint") else posixpath.join(
            path, "checkpoint")
        # Legacy layout only: without listing the bucket, Orbax's `state/` is not looked for.
        directory = posixpath.dirname(file)
        return _Located(_classify_msgpack(file), directory, file, directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no T5X checkpoint at {path}: the path does not exist")
    if os.path.isfile(path):
        directory = os.path.dirname(os.path.abspath(path))
        file = path
    else:
        directory = path
        if not _is_checkpoint_dir(directory):
            latest = _latest_step_dir(directory)
            if latest is None:
                raise FileNotFoundError(
                    f"no T5X checkpoint in {path}: expected a `checkpoint` msgpack file, an Orbax "
                    "`state/` directory (or `_METADATA`), or checkpoint_<step> subdirectories")
            directory = latest
        file = os.path.join(directory, "checkpoint")
        file = file if os.path.isfile(file) else None
    for candidate in (os.path.join(directory, "state"), directory):
        if os.path.isdir(candidate) and _is_orbax_dir(candidate):
            return _Located("orbax", directory, file, candidate)
    if file is None:
        raise FileNotFoundError(f"no `checkpoint` file in {directory}")
    fmt = _classify_msgpack(file)
    return _Located(fmt, directory, file, directory if fmt == "orbax" else None)


def detect_format(path: str) -> str:
    """'msgpack' (legacy T5X Checkpointer) or 'orbax' for a checkpoint.

    Args:
      path: a checkpoint_<step> directory, its `checkpoint` file, or a model directory holding
        checkpoint_<step> (or bare <step>) subdirectories, in which case the latest step is used.

    Raises:
      FileNotFoundError: nothing checkpoint-like at `path`.
      ValueError: a `checkpoint` file that is corrupt, a TensorFlow checkpoint, or not T5X's.
    """
    return _locate(path).format


# --------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------

_YIELDED = object()  # stands in a parent map for a leaf already handed to the caller


def _skipped(path: tuple[str, ...], load_optimizer: bool) -> bool:
    return not load_optimizer and path[:3] == ("optimizer", "state", "param_states")


def _iter_msgpack(loc: _Located, load_optimizer: bool) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Streams the msgpack tree: yields (path, leaf) with leaves ndarray / None / scalar / {}.

    Arrays are yielded the moment they are decoded (inline) or their spec map ends (tensorstore);
    the small non-array leaves (version, None placeholders, empty maps) are yielded at the end.
    """

    def walk(unpacker, path, count, hold):
        # `hold` is set inside a flax chunked array: its chunks are assembled, not yielded.
        node = {}
        for _ in range(count):
            key = str(unpacker.unpack())
            child = ("optimizer", key) if not path and key in ("target", "state") else path + (
                key,)  # version-0 files have no 'optimizer' level
            if not hold and _skipped(child, load_optimizer):
                unpacker.skip()
                continue
            try:
                child_count = unpacker.read_map_header()
            except ValueError:  # not a map; the stream has not advanced
                value = unpacker.unpack()
                if isinstance(value, np.ndarray) and not hold and key != _CHUNKED_KEY:
                    yield child, value
                    value = _YIELDED
            else:
                value = yield from walk(unpacker, child, child_count,
                                        hold or _CHUNKED_KEY in node)
            node[key] = value
        if hold:
            return node
        if _CHUNKED_KEY in node:
            yield path, _unchunk(node, path)
            return _YIELDED
        if is_ts_spec(node):
            yield path, read_ts_array(node, loc.directory, path)
            return _YIELDED
        return node

    def rest(node, path):
        if isinstance(node, dict):
            if not node and path:
                yield path, {}
            for key, value in node.items():
                child = ("optimizer", key) if not path and key in ("target", "state") else (
                    path + (key,))
                yield from rest(value, child)
        elif node is not _YIELDED:
            yield path, node

    with _open_file(loc.msgpack_file) as fp:
        unpacker = _unpacker(fp)
        try:
            count = unpacker.read_map_header()
        except ValueError as e:
            raise ValueError(f"{loc.msgpack_file}: top level is not a msgpack map") from e
        tree = yield from walk(unpacker, (), count, False)
    yield from rest(tree, ())


def _orbax_key(path: tuple[str, ...]) -> tuple[str, ...]:
    """Orbax tree path -> legacy T5X path ('optimizer', 'target', ...)."""
    if path and path[0] == "_optimizer":
        return ("optimizer",) + path[1:]
    if path and path[0] in ("target", "state"):
        return ("optimizer",) + path
    return path


def _iter_orbax(loc: _Located, load_optimizer: bool) -> Iterator[tuple[tuple[str, ...], Any]]:
    import orbax.checkpoint as ocp
    from etils import epath

    directory = epath.Path(loc.orbax_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = getattr(ocp.PyTreeCheckpointHandler().metadata(directory), "tree", None)
    except Exception:  # older layout without _METADATA: orbax rebuilds the tree itself
        metadata = None
    if metadata:
        # One partial restore per leaf keeps a single array in memory at a time.
        leaves = [(p, m) for p, m in trees.walk(dict(metadata), keep_empty=True)
                  if not _skipped(_orbax_key(p), load_optimizer)]
        for path, meta in leaves:
            if meta is None or meta == {}:
                yield _orbax_key(path), meta
                continue
            item = restore_args = None
            for key in reversed(path):
                item = {key: item if item is not None else 0}
                restore_args = {key: restore_args if restore_args is not None
                                else ocp.RestoreArgs(restore_type=np.ndarray)}
            restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
            for key in path:
                restored = restored[key]
            dtype = getattr(meta, "dtype", None)  # scalars come back as Python numbers
            value = np.asarray(restored, dtype=dtype) if dtype is not None else restored
            del restored
            yield _orbax_key(path), value
            del value  # before the next restore: one array alive at a time
        return
    try:
        tree = checkpointer.restore(directory)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Orbax checkpoint {loc.orbax_dir} is incomplete: {e} Orbax needs each array's "
            "`.zarray` (and `_METADATA` when present); copy the checkpoint again keeping dot "
            "files (`cp -a`, `gsutil -m cp -r`)") from e
    for path, value in trees.walk(tree, keep_empty=True):
        if _skipped(_orbax_key(path), load_optimizer):
            continue
        numeric = isinstance(value, (np.ndarray, np.generic, int, float))
        yield _orbax_key(path), np.asarray(value) if numeric else value


def _iter_leaves(path: str, load_optimizer: bool) -> tuple[str, Iterator]:
    loc = _locate(path)
    if loc.format == "orbax":
        return loc.format, _iter_orbax(loc, load_optimizer)
    return loc.format, _iter_msgpack(loc, load_optimizer)


def iter_arrays(path: str, *, load_optimizer: bool = True
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields every array of a checkpoint, one at a time, with its path in the T5X tree.

    Paths are those of the legacy tree, e.g. ('optimizer', 'target', 'encoder', 'layers_0',
    'attention', 'query', 'kernel') or ('optimizer', 'state', 'param_states', ..., 'v_row');
    Orbax trees are mapped onto the same names. Nothing yielded is retained, so peak memory is
    the largest array (plus its encoded form).

    Args:
      path: see `detect_format`.
      load_optimizer: False skips `optimizer/state/param_states` without decoding it.
    """
    _, leaves = _iter_leaves(path, load_optimizer)
    for key, value in leaves:
        if isinstance(value, np.ndarray):
            yield key, value


def _is_float(dtype: np.dtype) -> bool:
    """Floating point, counting ml_dtypes' bfloat16 and float8 types (numpy kind 'V')."""
    extended = getattr(ml_dtypes, dtype.name, None) is dtype.type
    return dtype.kind == "f" or (extended and "float" in dtype.name)


def _cast_floats(tree: Any, dtype) -> Any:
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and _is_float(tree.dtype):
        return tree.astype(dtype)
    return tree


def read_checkpoint(path: str, *, load_optimizer: bool = True, dtype=None) -> T5xCheckpoint:
    """Reads a whole T5X checkpoint (either format) into numpy arrays.

    Args:
      path: see `detect_format`.
      load_optimizer: False leaves `opt_state` None and does not read it.
      dtype: cast floating-point params to this dtype (as T5X's `restore_dtype`, params only).
    """
    fmt, leaves = _iter_leaves(path, load_optimizer)
    tree = trees.build(leaves)
    optimizer = tree.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or (
            "step" not in optimizer["state"]):
        raise ValueError(f"{path}: checkpoint has no optimizer/state/step; top-level keys "
                         f"{sorted(tree)}")
    step = optimizer["state"]["step"]
    params = optimizer.get("target", {})
    if dtype is not None:
        params = _cast_floats(params, np.dtype(dtype))
    opt_state = optimizer["state"].get("param_states") if load_optimizer else None
    extra = {k: v for k, v in tree.items()
             if k not in ("optimizer", "version") and isinstance(v, dict)}
    return T5xCheckpoint(step=int(np.asarray(step)), params=params, opt_state=opt_state,
                         format=fmt, extra=extra)


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _divisors_desc(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted(set(small + [n // i for i in small]), reverse=True)


def choose_chunk_shape(shape: tuple[int, ...], max_bytes: int, itemsize: int) -> list[int]:
    """Zarr chunk shape: divisors of each dim, largest dims shrunk first, <= max_bytes a chunk.

    The rule of T5X's `_choose_chunk_shape`; chunks that divide the array keep every chunk whole.
    """
    target = max(1, max_bytes // itemsize)
    options = [_divisors_desc(n) if n > 0 else [1] for n in shape]
    index = [0] * len(shape)
    while math.prod(o[i] for o, i in zip(options, index)) > target:
        dim = max(range(len(shape)), key=lambda d: options[d][index[d]])
        if index[dim] + 1 >= len(options[dim]):
            break
        index[dim] += 1
    return [o[i] for o, i in zip(options, index)]


def _as_array(value: Any, path: tuple[str, ...]) -> np.ndarray:
    if isinstance(value, (np.ndarray, np.generic)) or (
            hasattr(value, "__array__") and not isinstance(value, (str, bytes))):
        array = np.asarray(value)
        extended = getattr(ml_dtypes, array.dtype.name, None) is array.dtype.type
        if array.dtype.kind not in "biufc" and not extended:
            raise TypeError(f"unsupported leaf at {'/'.join(path)}: array of dtype {array.dtype}; "
                            "expected a numeric array")
        return array
    raise TypeError(f"unsupported leaf at {'/'.join(path)}: {type(value).__name__}; expected a "
                    "numpy/jax array, a nested dict of them, or None")


class _Writer:
    """Streams the msgpack tree to the `checkpoint` file, arrays to zarr as it goes."""

    def __init__(self, directory: str, fp: BinaryIO, use_tensorstore: bool, max_chunk_bytes: int):
        self.directory, self.fp = directory, fp
        self.use_tensorstore, self.max_chunk_bytes = use_tensorstore, max_chunk_bytes
        self.packer = msgpack.Packer(use_bin_type=True, strict_types=True)

    def write(self, obj: Any) -> None:
        self.fp.write(self.packer.pack(obj))

    def map(self, tree: dict, path: tuple[str, ...], cast=None) -> None:
        self.fp.write(self.packer.pack_map_header(len(tree)))
        for key, value in tree.items():
            if not isinstance(key, str):
                raise TypeError(f"non-string key {key!r} under {'/'.join(path)}; T5X trees are "
                                "keyed by strings")
            self.write(key)
            child = path + (key,)
            if isinstance(value, dict):
                self.map(value, child, cast)
            elif value is None:
                self.write(None)
            else:
                self.leaf(_as_array(value, child), child, cast)

    def leaf(self, array: np.ndarray, path: tuple[str, ...], cast) -> None:
        if cast is not None and _is_float(array.dtype):
            array = array.astype(cast)
        if not self.use_tensorstore or array.ndim == 0 or array.size == 0:
            self.write(_inline_value(array))
            return
        self.write(self.tensorstore(array, path))

    def tensorstore(self, array: np.ndarray, path: tuple[str, ...]) -> dict:
        import tensorstore as ts

        # T5X names array directories by the path below 'optimizer' with '/' -> '.'.
        name = ".".join(path[1:] if path[0] == "optimizer" else path)
        spec = {"driver": "zarr", "dtype": array.dtype.name,
                "kvstore": {"driver": "file", "path": name},
                "metadata": {"chunks": choose_chunk_shape(array.shape, self.max_chunk_bytes,
                                                          array.dtype.itemsize),
                             "compressor": {"id": "gzip", "level": 1},
                             "shape": list(array.shape)}}
        store = ts.open(resolve_ts_spec(spec, self.directory), create=True, open=False).result()
        store.write(array).result()
        return spec


def write_checkpoint(directory: str, params: dict, step: int, opt_state: dict | None = None, *,
                     use_tensorstore: bool = True, dtype=None, overwrite: bool = False,
                     max_chunk_bytes: int = DESIRED_CHUNK_BYTES,
                     extra: dict | None = None) -> str:
    """Writes a legacy-format T5X checkpoint directory that T5X's `Checkpointer` restores.

    The `checkpoint` msgpack file holds {'version': 3, 'optimizer': {'target': params, 'state':
    {'step': int32 scalar, 'param_states': opt_state}}}. With `use_tensorstore`, every array of
    rank >= 1 is a gzip zarr array in `<directory>/target.<a>.<b>` (or `state.param_states...`),
    referenced by a spec dict with that relative path; otherwise all arrays are inline. Writing
    goes to `<directory>.tmp-*` first and is renamed into place at the end; on any error the
    temporary directory is removed and `directory` is left as it was.

    Args:
      directory: the checkpoint_<step> directory to create (local).
      params: nested dict of arrays with T5X names.
      step: the training step.
      opt_state: the param_states tree (e.g. Adafactor slots), or None for an empty one.
      use_tensorstore: write arrays as zarr (True) or inline in msgpack (False).
      dtype: cast floating-point params (not optimizer state) to this dtype, as T5X's save_dtype.
      overwrite: replace an existing `directory` (only after the new one is complete).
      max_chunk_bytes: upper bound on a zarr chunk's size.
      extra: other top-level subtrees to store (e.g. {'flax_mutables': ...}).

    Returns:
      `directory`.
    """
    directory = os.fspath(directory)
    if "://" in directory:
        raise ValueError(f"{directory}: writing is supported to local directories only (an atomic "
                         "rename is not available on object stores); write locally and copy")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        cast = np.dtype(dtype) if dtype is not None else None
        with open(os.path.join(tmp, "checkpoint"), "wb") as fp:
            writer = _Writer(tmp, fp, use_tensorstore, max_chunk_bytes)
            fp.write(writer.packer.pack_map_header(2 + len(extra or {})))
            writer.write("version")
            writer.write(VERSION)
            writer.write("optimizer")
            fp.write(writer.packer.pack_map_header(2))
            writer.write("target")
            writer.map(params, ("optimizer", "target"), cast)
            writer.write("state")
            fp.write(writer.packer.pack_map_header(2))
            writer.write("step")
            step_array = np.asarray(step, np.int32)
            writer.write(msgpack.ExtType(_EXT_NPSCALAR, _encode_ndarray(step_array)))
            writer.write("param_states")
            writer.map(opt_state or {}, ("optimizer", "state", "param_states"))
            for key, value in (extra or {}).items():
                writer.write(key)
                writer.map(value, (key,))
            fp.flush()
            os.fsync(fp.fileno())
        if os.path.exists(directory):
            trash = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
            os.rename(directory, os.path.join(trash, "old"))
            os.rename(tmp, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
