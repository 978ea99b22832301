"""T5X checkpoint reader/writer: the real T5X fixtures, independent decoders, exact round trips."""

import inspect
import json
import os
import pathlib
import shutil
import weakref

import flax.serialization
import flax.traverse_util
import ml_dtypes
import msgpack
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from moetx.convert import t5x_format
from tests.convert.conftest import T5X_FIXTURES as FIXTURES

INLINE = FIXTURES / "test_t5_tiny.checkpoint_0"
TINY_T5 = FIXTURES / "tiny_t5" / "checkpoint_1"
TINY_ORBAX = FIXTURES / "tiny_orbax" / "1"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _raw_msgpack(path):
    """The `checkpoint` file decoded by plain msgpack: ext types left as (code, payload)."""
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False, strict_map_key=False,
                               ext_hook=lambda code, data: (code, msgpack.unpackb(data)))


def _flat(tree):
    return flax.traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def _assert_trees_identical(a, b):
    """Same keys, same dtypes, same shapes, same bytes."""
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        if fa[key] is None or fb[key] is None:
            assert fa[key] is fb[key], key
            continue
        x, y = np.asarray(fa[key]), np.asarray(fb[key])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), key


def _repair_orbax_copy(tmp_path):
    """A copy of tiny_orbax/1 with the `.zarray` files the fixture copy lost (dot files dropped).

    The zarr metadata comes from tiny_t5/checkpoint_1, the same state written by T5X's legacy
    checkpointer (its chunk payloads are byte-identical once decompressed); Orbax compressed the
    chunks with zstd.
    """
    copy = tmp_path / "tiny_orbax" / "1"
    shutil.copytree(TINY_ORBAX, copy)
    for p in [copy, *copy.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    specs = _raw_msgpack(TINY_T5 / "checkpoint")["optimizer"]["state"]
    leaves = {f"_optimizer.state.param_states.{k}": (v["dtype"], v["metadata"]["shape"])
              for k, v in specs["param_states"].items()}
    leaves["_optimizer.state.step"] = ("int32", [])
    for name, (dtype, shape) in leaves.items():
        zarray = {"chunks": shape, "compressor": {"id": "zstd", "level": 1},
                  "dtype": np.dtype(dtype).str, "fill_value": None, "filters": None,
                  "order": "C", "shape": shape, "zarr_format": 2}
        (copy / name / ".zarray").write_text(json.dumps(zarray))
    return copy


# ----------------------------------------------------------------------------- detection


def test_detect_format_on_the_three_fixtures_and_their_path_forms():
    assert t5x_format.detect_format(str(INLINE)) == "msgpack"
    for path in (TINY_T5, TINY_T5 / "checkpoint", TINY_T5.parent):  # dir, file, model dir
        assert t5x_format.detect_format(str(path)) == "msgpack"
    for path in (TINY_ORBAX, TINY_ORBAX / "checkpoint", TINY_ORBAX.parent):
        assert t5x_format.detect_format(str(path)) == "orbax"


def test_detect_format_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        t5x_format.detect_format(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="checkpoint_<step>"):
        t5x_format.detect_format(str(tmp_path))
    garbage = tmp_path / "garbage" / "checkpoint"
    garbage.parent.mkdir()
    garbage.write_bytes(b"\x81\xa7version\xc1\x00\x13")  # 0xc1 is never valid msgpack
    with pytest.raises(ValueError, match="corrupt or truncated"):
        t5x_format.detect_format(str(garbage.parent))
    truncated = tmp_path / "truncated" / "checkpoint"
    truncated.parent.mkdir()
    truncated.write_bytes(INLINE.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        t5x_format.detect_format(str(truncated))
    tf_index = tmp_path / "tf" / "checkpoint"
    tf_index.parent.mkdir()
    tf_index.write_bytes(b'model_checkpoint_path: "model.ckpt-0"\n')
    with pytest.raises(ValueError, match="TensorFlow"):
        t5x_format.detect_format(str(tf_index))
    other = tmp_path / "other" / "checkpoint"
    other.parent.mkdir()
    other.write_bytes(msgpack.packb({"params": {"w": 1}}))
    with pytest.raises(ValueError, match="not a T5X checkpoint"):
        t5x_format.detect_format(str(other))


# ----------------------------------------------------------------------------- the fixtures


def test_inline_fixture_equals_flax_msgpack_restore():
    """Every array of test_t5_tiny.checkpoint_0 as flax.serialization decodes it."""
    reference = _flat(flax.serialization.msgpack_restore(INLINE.read_bytes()))
    reference = {k: np.asarray(v) for k, v in reference.items() if k != ("version",)}
    ours = dict(t5x_format.iter_arrays(str(INLINE)))
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert (ours[key].dtype, ours[key].shape) == (value.dtype, value.shape), key
        np.testing.assert_array_equal(ours[key], value, err_msg=str(key))
    ckpt = t5x_format.read_checkpoint(str(INLINE))
    assert ckpt.format == "msgpack" and ckpt.step == int(reference[("optimizer", "state", "step")])
    assert ckpt.params["encoder"]["layers_0"]["attention"]["query"]["kernel"].shape == (8, 12)
    assert ckpt.params["token_embedder"]["embedding"].shape == (32128, 8)
    slots = ckpt.opt_state["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert sorted(slots) == ["m", "v", "v_col", "v_row"] and slots["v"].shape == (8, 12)


def test_tensorstore_fixture_reads_to_its_arrays_and_step():
    """tiny_t5/checkpoint_1 against tensorstore opened directly and the raw msgpack step."""
    raw = _raw_msgpack(TINY_T5 / "checkpoint")["optimizer"]
    code, (shape, dtype, buffer) = raw["state"]["step"]
    assert code == 3 and dtype == "int32"
    step = int(np.frombuffer(buffer, np.int32).reshape(shape))
    ckpt = t5x_format.read_checkpoint(str(TINY_T5))
    assert (ckpt.step, ckpt.step, ckpt.params, ckpt.format) == (step, 1, {}, "msgpack")
    assert sorted(ckpt.opt_state) == ["bias", "kernel", "step"]
    for name, spec in raw["state"]["param_states"].items():
        # Independent read: the spec by hand, dir joined, the fixture copy has no .zarray.
        direct = dict(spec, kvstore={"driver": "file",
                                     "path": str(TINY_T5 / spec["kvstore"]["path"])})
        expected = ts.open(direct, open=True, assume_metadata=True).result().read().result()
        got = ckpt.opt_state[name]
        assert (got.dtype, got.shape) == (np.dtype(spec["dtype"]), tuple(spec["metadata"]["shape"]))
        np.testing.assert_array_equal(got, expected)
    assert ckpt.opt_state["kernel"].dtype == np.float64 and int(ckpt.opt_state["step"]) == 1
    assert t5x_format.read_checkpoint(str(TINY_T5), load_optimizer=False).opt_state is None


def test_tensorstore_checkpoint_given_by_a_relative_path(tmp_path, monkeypatch):
    """A relative checkpoint path reads the same arrays (tensorstore's file driver refuses a
    relative path), for the fixture and for a checkpoint with zarr metadata files."""
    params, opt_state = _random_tree(np.random.default_rng(1))
    t5x_format.write_checkpoint(str(tmp_path / "checkpoint_3"), params, 3, opt_state)
    monkeypatch.chdir(tmp_path)
    ckpt = t5x_format.read_checkpoint("checkpoint_3")
    _assert_trees_identical(ckpt.params, params)
    monkeypatch.chdir(TINY_T5.parent)
    ckpt = t5x_format.read_checkpoint(TINY_T5.name)
    expected = t5x_format.read_checkpoint(str(TINY_T5))
    assert sorted(ckpt.opt_state) == sorted(expected.opt_state)
    for name, value in expected.opt_state.items():
        np.testing.assert_array_equal(ckpt.opt_state[name], value)


def test_orbax_fixture_reads_to_its_arrays_and_step(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.zarray"):
        t5x_format.read_checkpoint(str(TINY_ORBAX))  # the fixture copy lost its dot files
    repaired = _repair_orbax_copy(tmp_path)
    ckpt = t5x_format.read_checkpoint(str(repaired))
    assert (ckpt.format, ckpt.step, ckpt.params) == ("orbax", 1, {})
    legacy = t5x_format.read_checkpoint(str(TINY_T5))
    _assert_trees_identical(ckpt.opt_state, legacy.opt_state)
    # Independent read of the untouched fixture's zstd chunks through tensorstore.
    for name, value in ckpt.opt_state.items():
        spec = {"driver": "zarr", "dtype": value.dtype.name,
                "kvstore": {"driver": "file",
                            "path": str(TINY_ORBAX / f"_optimizer.state.param_states.{name}")},
                "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                             "compressor": {"id": "zstd"}}}
        direct = ts.open(spec, open=True, assume_metadata=True).result().read().result()
        np.testing.assert_array_equal(value, direct)
    keys = [k for k, _ in t5x_format.iter_arrays(str(repaired))]
    assert ("optimizer", "state", "step") in keys


def test_orbax_state_dir_layout(tmp_path):
    """checkpoint_N/state/ written by orbax-checkpoint (OCDBT), read leaf by leaf."""
    params = {"encoder": {"layers_0": {"mlp": {"wi_0": {"kernel": np.arange(12, dtype=np.float32)
                                                         .reshape(3, 4)}}},
                          "encoder_norm": {"scale": np.ones(3, BF16)}}}
    slots = {"encoder": {"layers_0": {"mlp": {"wi_0": {"kernel": {
        "v_row": np.full(3, 2.0, np.float32), "v_col": np.full(4, 3.0, np.float32),
        "v": np.zeros(1, np.float32)}}}}, "encoder_norm": {"scale": {
            "v": np.full(3, 0.5, np.float32)}}}}
    state_dir = tmp_path / "run" / "checkpoint_7" / "state"
    ocp.PyTreeCheckpointer().save(state_dir, {"target": params, "state": {
        "step": np.int32(7), "param_states": slots}})
    for path in (state_dir.parent, state_dir.parent.parent, state_dir):
        assert t5x_format.detect_format(str(path)) == "orbax"
    ckpt = t5x_format.read_checkpoint(str(tmp_path / "run"))
    assert ckpt.step == 7 and ckpt.format == "orbax"
    _assert_trees_identical(ckpt.params, params)
    _assert_trees_identical(ckpt.opt_state, slots)
    previous = None
    for key, array in t5x_format.iter_arrays(str(state_dir)):
        assert previous is None or previous() is None, key  # restored leaf by leaf
        previous = weakref.ref(array)
        del array
    names = {k for k, _ in t5x_format.iter_arrays(str(state_dir.parent), load_optimizer=False)}
    assert ("optimizer", "target", "encoder", "encoder_norm", "scale") in names
    assert not any(k[:3] == ("optimizer", "state", "param_states") for k in names)


# ----------------------------------------------------------------------------- writing


def _random_tree(rng):
    def kernel(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    params = {"token_embedder": {"embedding": kernel(32, 8)},
              "encoder": {"layers_0": {"attention": {"query": {
                  "kernel": kernel(8, 12, dtype=BF16)}},
                                       "mlp": {"expert": {"wi": {"kernel": kernel(4, 8, 16)}}}},
                          "relpos_bias": {"rel_embedding": kernel(4, 32)},
                          "encoder_norm": {"scale": np.ones(8, np.float32)}},
              "counter": np.asarray(5, np.int32)}
    opt_state = {"token_embedder": {"embedding": {"v_row": kernel(32), "v_col": kernel(8),
                                                  "v": np.zeros(1, np.float32)}},
                 "encoder": {"layers_0": {"attention": {"query": {"kernel": {
                     "v": kernel(8, 12), "v_row": np.zeros(1, np.float32),
                     "v_col": np.zeros(1, np.float32), "m": kernel(8, 12, dtype=BF16)}}},
                     "mlp": {"expert": {"wi": {"kernel": {"v": kernel(4, 8, 16)}}}}},
                     "relpos_bias": {"rel_embedding": {"v": kernel(4, 32)}},
                     "encoder_norm": {"scale": {"v": kernel(8)}}},
                 "counter": None}
    return params, opt_state


@pytest.mark.parametrize("use_tensorstore", [True, False])
def test_write_read_round_trip_is_exact(tmp_path, use_tensorstore):
    params, opt_state = _random_tree(np.random.default_rng(0))
    mutables = {"cache": {"index": np.arange(3, dtype=np.int64)}}
    out = t5x_format.write_checkpoint(str(tmp_path / "checkpoint_1000"), params, 1000, opt_state,
                                      use_tensorstore=use_tensorstore,
                                      extra={"flax_mutables": mutables})
    assert out == str(tmp_path / "checkpoint_1000")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1000"]  # no temporary left behind
    ckpt = t5x_format.read_checkpoint(out)
    assert (ckpt.step, ckpt.format) == (1000, "msgpack")
    _assert_trees_identical(ckpt.params, params)
    _assert_trees_identical(ckpt.opt_state, opt_state)
    assert ckpt.opt_state["counter"] is None  # a None slot (multi-optimizer) survives
    _assert_trees_identical(ckpt.extra, {"flax_mutables": mutables})
    raw = _raw_msgpack(os.path.join(out, "checkpoint"))
    assert raw["version"] == 3 and raw["optimizer"]["state"]["step"][0] == 3  # npscalar, as T5X
    query = raw["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    if use_tensorstore:
        # T5X's layout: relative path named after the tree, zarr dtype bfloat16, gzip chunks.
        assert query["kvstore"] == {"driver": "file",
                                    "path": "target.encoder.layers_0.attention.query.kernel"}
        zarray = json.loads(pathlib.Path(
            out, "target.encoder.layers_0.attention.query.kernel", ".zarray").read_text())
        assert (zarray["dtype"], zarray["compressor"]["id"]) == ("bfloat16", "gzip")
        for name in ("state.param_states.encoder.layers_0.attention.query.kernel.v_row",
                     "flax_mutables.cache.index"):
            assert os.path.isdir(os.path.join(out, name))
        direct = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(
            out, "target.encoder.layers_0.mlp.expert.wi.kernel")}}, open=True).result()
        expert_wi = params["encoder"]["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
        np.testing.assert_array_equal(direct.read().result(), expert_wi)
    else:
        assert query[0] == 1 and query[1][:2] == [[8, 12], "bfloat16"]
        assert sorted(os.listdir(out)) == ["checkpoint"]
        restored = flax.serialization.msgpack_restore(pathlib.Path(out, "checkpoint").read_bytes())
        _assert_trees_identical(restored["optimizer"]["target"], params)


def test_multi_chunk_arrays_and_dtype_cast(tmp_path):
    params, opt_state = _random_tree(np.random.default_rng(1))
    out = t5x_format.write_checkpoint(str(tmp_path / "checkpoint_3"), params, 3, opt_state,
                                      max_chunk_bytes=256)
    emb_dir = pathlib.Path(out, "target.token_embedder.embedding")
    chunks = json.loads((emb_dir / ".zarray").read_text())["chunks"]
    assert chunks == [8, 8] and sorted(p.name for p in emb_dir.iterdir())[1:] == [
        f"{i}.0" for i in range(4)]  # 32x8 float32 in 256-byte chunks that divide the array
    _assert_trees_identical(t5x_format.read_checkpoint(out).params, params)
    (emb_dir / "2.0").unlink()  # tensorstore alone would read the missing chunk as zeros
    with pytest.raises(ValueError, match="1 of 4 zarr chunk files missing"):
        t5x_format.read_checkpoint(out)
    out16 = t5x_format.write_checkpoint(str(tmp_path / "bf16"), params, 3, opt_state, dtype=BF16)
    ckpt = t5x_format.read_checkpoint(out16)
    assert ckpt.params["token_embedder"]["embedding"].dtype == BF16
    assert ckpt.params["counter"].dtype == np.int32  # integers are not cast
    assert ckpt.opt_state["token_embedder"]["embedding"]["v_row"].dtype == np.float32
    f32 = t5x_format.read_checkpoint(out16, dtype=np.float32)
    np.testing.assert_array_equal(
        f32.params["encoder"]["relpos_bias"]["rel_embedding"],
        params["encoder"]["relpos_bias"]["rel_embedding"].astype(BF16).astype(np.float32))


@pytest.mark.parametrize("fixture,use_tensorstore", [(INLINE, False), (INLINE, True),
                                                     (TINY_T5, True)])
def test_rewriting_a_fixture_reads_back_identical(tmp_path, fixture, use_tensorstore):
    first = t5x_format.read_checkpoint(str(fixture))
    out = t5x_format.write_checkpoint(str(tmp_path / "checkpoint_9"), first.params, first.step,
                                      first.opt_state, use_tensorstore=use_tensorstore)
    second = t5x_format.read_checkpoint(out)
    assert second.step == first.step
    _assert_trees_identical(second.params, first.params)
    _assert_trees_identical(second.opt_state, first.opt_state)
    assert (second.params == {}) == (first.params == {})  # tiny_t5 has an empty target


def test_failed_write_leaves_no_directory(tmp_path):
    params, opt_state = _random_tree(np.random.default_rng(2))
    opt_state["zz_last"] = {"v": "not an array"}  # written after every other leaf
    dest = tmp_path / "checkpoint_5"
    with pytest.raises(TypeError, match="optimizer/state/param_states/zz_last/v: str"):
        t5x_format.write_checkpoint(str(dest), params, 5, opt_state)
    assert os.listdir(tmp_path) == []  # neither the destination nor the temporary directory

    del opt_state["zz_last"]
    t5x_format.write_checkpoint(str(dest), params, 5, opt_state)
    before = t5x_format.read_checkpoint(str(dest))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        t5x_format.write_checkpoint(str(dest), params, 6, opt_state)
    broken = dict(params, bad=object())
    with pytest.raises(TypeError, match="optimizer/target/bad: object"):
        t5x_format.write_checkpoint(str(dest), broken, 6, opt_state, overwrite=True)
    assert os.listdir(tmp_path) == ["checkpoint_5"]  # the old checkpoint is untouched
    _assert_trees_identical(t5x_format.read_checkpoint(str(dest)).params, before.params)
    t5x_format.write_checkpoint(str(dest), params, 6, opt_state, overwrite=True)
    assert t5x_format.read_checkpoint(str(dest)).step == 6
    assert os.listdir(tmp_path) == ["checkpoint_5"]


def test_iter_arrays_holds_one_array_at_a_time(tmp_path):
    params, opt_state = _random_tree(np.random.default_rng(3))
    written = t5x_format.write_checkpoint(str(tmp_path / "checkpoint_1"), params, 1, opt_state)
    expected = len(_flat(params)) + sum(v is not None for v in _flat(opt_state).values()) + 1
    for path, count in ((written, expected), (str(INLINE), None)):
        stream = t5x_format.iter_arrays(path)
        assert inspect.isgenerator(stream)
        previous, n = None, 0
        for key, array in stream:
            # The generator kept no reference to what it yielded before.
            assert previous is None or previous() is None, key
            assert isinstance(key, tuple) and isinstance(array, np.ndarray)
            previous, n = weakref.ref(array), n + 1
            del array
        assert n == (count or len(_flat(flax.serialization.msgpack_restore(
            INLINE.read_bytes()))) - 1)
    # Optimizer state skipped without being read.
    keys = [k for k, _ in t5x_format.iter_arrays(written, load_optimizer=False)]
    assert len(keys) == len(_flat(params)) + 1 and ("optimizer", "state", "step") in keys


# ----------------------------------------------------------------------------- spec parsing


def test_resolve_ts_spec_forms():
    meta = {"chunks": [768, 768], "compressor": {"id": "gzip", "level": 1}, "dtype": "<f4",
            "shape": [768, 768]}
    gfile = {"driver": "zarr", "dtype": "float32", "metadata": meta,
             "kvstore": {"driver": "gfile", "path": "state.param_states.bias/"}}
    assert t5x_format.resolve_ts_spec(gfile, "/ck/checkpoint_1")["kvstore"] == {
        "driver": "file", "path": "/ck/checkpoint_1/state.param_states.bias/"}
    # tensorstore < 0.1.14: path at the top level, kvstore only names the bucket.
    older = {"driver": "zarr", "metadata": meta, "path": "target.encoder.layers_0.kernel",
             "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"},
             "transform": {"input_exclusive_max": [[768], [768]], "input_inclusive_min": [0, 0]}}
    resolved = t5x_format.resolve_ts_spec(older, "gs://test-bucket/dir1/dir2")
    assert resolved["kvstore"] == {"driver": "gcs", "bucket": "test-bucket",
                                   "path": "dir1/dir2/target.encoder.layers_0.kernel"}
    assert "path" not in resolved and resolved["transform"] == older["transform"]
    assert older["kvstore"] == {"driver": "gcs", "bucket": "t5x-dummy-bucket"}  # not mutated
    ts.Spec(resolved)  # a spec tensorstore accepts (no network: nothing is opened)
    # A GCS checkpoint copied to disk, and a local one uploaded to GCS.
    assert t5x_format.resolve_ts_spec(older, "/local/ck")["kvstore"] == {
        "driver": "file", "path": "/local/ck/target.encoder.layers_0.kernel"}
    file_spec = dict(gfile, kvstore={"driver": "file", "path": "target.x"})
    assert t5x_format.resolve_ts_spec(file_spec, "gs://b/run/checkpoint_2")["kvstore"] == {
        "driver": "gcs", "bucket": "b", "path": "run/checkpoint_2/target.x"}
    with pytest.raises(ValueError, match="unsupported kvstore driver 's3'"):
        t5x_format.resolve_ts_spec(dict(gfile, kvstore={"driver": "s3", "path": "x"}), "/d")
    with pytest.raises(ValueError, match="no path"):
        t5x_format.resolve_ts_spec(dict(gfile, kvstore={"driver": "file"}), "/d")
    assert not t5x_format.is_ts_spec({"driver": "zarr", "kvstore": {}})


def test_choose_chunk_shape_matches_t5x_rule():
    # The cases of T5X's CheckpointChunkShapeTest, in elements (itemsize 1).
    assert t5x_format.choose_chunk_shape((4096, 4096), 4096 * 4096, 1) == [4096, 4096]
    assert t5x_format.choose_chunk_shape((8192, 8192), 4096 * 4096, 1) == [4096, 4096]
    assert t5x_format.choose_chunk_shape((8192, 8193), 4096 * 4096, 1) == [4096, 2731]
    assert t5x_format.choose_chunk_shape((8192,), 4096, 1) == [4096]
    assert t5x_format.choose_chunk_shape((8193,), 4096, 1) == [2731]


def test_flax_chunked_arrays_both_ways(tmp_path, monkeypatch):
    """Arrays above flax's MAX_CHUNK_SIZE are split into flat chunks; a 64-byte limit here."""
    big = np.arange(60, dtype=np.float32).reshape(3, 20)
    tree = {"version": 3, "optimizer": {"target": {"big": big, "small": np.ones(2, np.float32)},
                                        "state": {"step": np.int32(4), "param_states": {}}}}
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    flax_dir = tmp_path / "by_flax"
    flax_dir.mkdir()
    (flax_dir / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(tree))
    assert "__msgpack_chunked_array__" in _raw_msgpack(flax_dir / "checkpoint")[
        "optimizer"]["target"]["big"]
    arrays = dict(t5x_format.iter_arrays(str(flax_dir)))
    assert sorted(arrays) == [("optimizer", "state", "step"), ("optimizer", "target", "big"),
                              ("optimizer", "target", "small")]
    np.testing.assert_array_equal(arrays[("optimizer", "target", "big")], big)

    monkeypatch.setattr(t5x_format, "_FLAX_MAX_CHUNK_BYTES", 64)
    ours = t5x_format.write_checkpoint(str(tmp_path / "ours"), tree["optimizer"]["target"], 4,
                                       use_tensorstore=False)
    raw = _raw_msgpack(os.path.join(ours, "checkpoint"))["optimizer"]["target"]["big"]
    assert len(raw["chunks"]) == 4  # 240 bytes in 64-byte chunks
    restored = flax.serialization.msgpack_restore(pathlib.Path(ours, "checkpoint").read_bytes())
    np.testing.assert_array_equal(restored["optimizer"]["target"]["big"], big)
