"""Assignment-map restore: name mapping with regex groups and drops, strict and non-strict diffs,
restoring a checkpoint written on one mesh onto another (8 simulated devices), and continued
training from an upcycled checkpoint through `train.init_from` in gin, and parameters resized
by the resizers the trained model declares."""

import re

import jax
import numpy as np
import pytest

from moetx.convert import formats as convert, restore
from moetx.convert.errors import ConversionError
from moetx.trainer import checkpoints
from moetx.trainer import trainer as trainer_lib
from moetx.util import trees
from tests.convert.conftest import random_params
from tests import conftest as helpers

SRC = {"encoder/layers_0/mlp/wi/kernel": np.ones((4, 8), np.float32),
       "encoder/layers_0/mlp/wo/kernel": np.full((8, 4), 2.0, np.float32),
       "decoder/logits_dense/kernel": np.zeros((4, 10), np.float32)}


def _abstract(shapes):
    return trees.unflatten({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()})


def test_map_renames_with_groups_and_drops_on_both_sides():
    target = {"encoder/block_0/ffn/wi/kernel": (4, 8), "encoder/block_0/ffn/wo/kernel": (8, 4),
              "decoder/new_head/kernel": (4, 10)}
    amap = [(r"encoder/block_(\d+)/ffn/(.*)", r"encoder/layers_\1/mlp/\2"),
            (r"decoder/new_head/kernel", None), (r"decoder/logits_dense/.*", None)]
    init = trees.unflatten({k: np.full(s, 7.0, np.float32) for k, s in target.items()})
    params, report = restore.restore_params(SRC, _abstract(target), init, amap, strict=True)
    assert report.exact and report.dropped == ["decoder/logits_dense/kernel"]
    assert report.restored == {"encoder/block_0/ffn/wi/kernel": "encoder/layers_0/mlp/wi/kernel",
                               "encoder/block_0/ffn/wo/kernel": "encoder/layers_0/mlp/wo/kernel"}
    np.testing.assert_array_equal(params["encoder"]["block_0"]["ffn"]["wo"]["kernel"], 2.0)
    np.testing.assert_array_equal(params["decoder"]["new_head"]["kernel"], 7.0)  # its init


def test_strict_restore_lists_missing_unused_and_wrong_shapes():
    target = {"encoder/layers_0/mlp/wi/kernel": (4, 16),  # wrong shape
              "encoder/layers_0/mlp/wo/kernel": (8, 4),
              "encoder/layers_0/mlp/router/kernel": (4, 2)}  # missing
    with pytest.raises(ConversionError) as e:
        restore.restore_params(SRC, _abstract(target), None, strict=True)
    msg = str(e.value)
    assert re.search(r"encoder/layers_0/mlp/wi/kernel: from 'encoder/layers_0/mlp/wi/kernel': "
                     r"expected \[4, 16\], found \[4, 8\]", msg), msg
    assert re.search(r"1 target parameter\(s\) missing from the source:\n\s+"
                     r"encoder/layers_0/mlp/router/kernel: looked up as .*expected \[4, 2\]", msg)
    assert re.search(r"1 unused source parameter\(s\):\n\s+decoder/logits_dense/kernel: "
                     r"\[4, 10\]", msg)

    # Non-strict: what matches is restored, the rest keeps its initialisation, same diff.
    init = trees.unflatten({k: np.full(s, 7.0, np.float32) for k, s in target.items()})
    params, report = restore.restore_params(SRC, _abstract(target), init, strict=False)
    assert not report.exact and list(report.restored) == ["encoder/layers_0/mlp/wo/kernel"]
    assert sorted(report.from_init) == ["encoder/layers_0/mlp/router/kernel",
                                        "encoder/layers_0/mlp/wi/kernel"]
    np.testing.assert_array_equal(params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"], 7.0)
    np.testing.assert_array_equal(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"], 2.0)
    assert "decoder/logits_dense/kernel: [4, 10]" in report.diff()
    with pytest.raises(ConversionError, match="no init_params"):
        restore.restore_params(SRC, _abstract(target), None, strict=False)


def test_restore_onto_another_mesh_with_renamed_layers(tmp_path):
    """A checkpoint written from a (8, 1, 1) data-parallel run restores, with its two layers
    swapped by the map, onto a (2, 1, 4) model-parallel mesh in the target's shardings."""
    model = helpers.tiny_model()
    src_trainer = helpers.make_trainer(model, mesh_shape=(8, 1, 1))
    state = src_trainer.init_state()
    written = convert.write_moetx(str(tmp_path / "run"), convert.Checkpoint(
        params=jax.device_get(state.params), step=11), convert.abstract_model(model))
    assert restore.source_format(written) == "moetx"

    dst = helpers.make_trainer(model, mesh_shape=(2, 1, 4))
    abstract = dst.abstract_state_with_shardings().params
    swap = [(r"decoder/layers_0/(.*)", r"decoder/layers_1/\1"),
            (r"decoder/layers_1/(.*)", r"decoder/layers_0/\1")]
    params, report = restore.restore_params(written, abstract, None, swap, strict=True)
    assert report.exact and len(report.restored) == len(jax.tree_util.tree_leaves(abstract))
    src = trees.flatten(jax.device_get(state.params))
    got = trees.flatten(params)
    want_sh = trees.flatten(abstract)
    model_sharded = 0
    for k, v in got.items():
        source_key = k.replace("layers_0", "@").replace("layers_1", "layers_0").replace(
            "@", "layers_1")
        np.testing.assert_array_equal(np.asarray(v), src[source_key])
        assert v.sharding == want_sh[k].sharding, k
        model_sharded += "model" in str(v.sharding.spec)
    assert model_sharded > 0  # the target mesh really shards some parameters over 'model'


@pytest.mark.usefixtures("clean_gin")
def test_training_continues_from_an_upcycled_checkpoint_via_gin(tmp_path, capsys):
    from moetx.cli import train as cli_train

    dense_model = convert.load_model("models/llama_tiny.gin").model
    dense = random_params(dense_model, 5)
    dense_dir = convert.write_moetx(str(tmp_path / "dense"), convert.Checkpoint(dense, step=40),
                                    convert.abstract_model(dense_model))
    import gin

    gin.clear_config(clear_constants=False)
    (tmp_path / "moe.gin").write_text(f"""
include 'models/llama_tiny.gin'
import moetx.moe.layers
import moetx.convert.restore
TransformerConfig.moe = @MoeConfig()
MoeConfig.num_experts = 4
MoeConfig.num_selected_experts = 2
MoeConfig.sparse_every = 2
MoeConfig.renormalize_top_k_gates = True
MoeConfig.dispatch = 'dropless'
train.init_from = @InitFromCheckpoint()
InitFromCheckpoint.path = '{dense_dir}'
InitFromCheckpoint.upcycle = True
""")
    md = tmp_path / "moe_run"
    argv = [f"--gin_file={tmp_path / 'moe.gin'}", "--gin_file=runs/pretrain.gin",
            f"--gin.MODEL_DIR='{md}'", "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=8", "--gin.LOG_EVERY=1", "--gin.WARMUP_STEPS=1000",
            "--gin.MESH_SHAPE=(2, 4, 1)", "--gin_bindings=train.eval_dataset_cfg = None"]
    code = cli_train.main(argv)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    steps_logged = re.findall(r"\[train\] step (\d+)/\d+ .*?\| loss [\d.]+", err)
    assert "(upcycled): restored" in err and sorted(map(int, steps_logged)) == [1, 2]
    final = convert.read_moetx(str(md))
    assert final.step == 2
    got = trees.flatten(final.params)
    d = trees.flatten(dense)
    # Continued from the dense weights (two small Adafactor steps away), experts tiled from the
    # dense MLP: nothing was re-initialised.
    for k in ("decoder/token_embedder/embedding", "decoder/layers_0/mlp/wi_0/kernel"):
        assert np.linalg.norm(got[k] - d[k]) < 0.2 * np.linalg.norm(d[k]), k
    experts = got["decoder/layers_1/mlp/expert/wo/kernel"]
    assert experts.shape[0] == 4
    for e in range(4):
        dense_wo = d["decoder/layers_1/mlp/wo/kernel"]
        assert np.linalg.norm(experts[e] - dense_wo) < 0.2 * np.linalg.norm(dense_wo)


# ------------------------------------------------------------------------ injected resizing

TABLE = "stage_1/block_0/attention/relative_position_bias"


def _resize_by_tiling(table, shape):
    """A stand-in for a model's resizer: tiles the source and crops to `shape` (not how CoAtNet
    resizes; the point is that restore calls what the model declares)."""
    reps = [-(-want // have) for want, have in zip(shape, table.shape)]
    return np.tile(table, reps)[tuple(slice(0, n) for n in shape)]


def test_resize_parameters_calls_the_models_resizer_on_matching_shapes_that_differ():
    src = {TABLE: np.arange(18, dtype=np.float32).reshape(3, 3, 2),
           "stage_1/block_0/other_bias": np.ones((3, 3, 2), np.float32),
           "stage_1/block_1/relative_position_bias": np.ones((5, 5, 2), np.float32)}
    target = _abstract({TABLE: (5, 5, 2), "stage_1/block_0/other_bias": (5, 5, 2),
                        "stage_1/block_1/relative_position_bias": (5, 5, 2)})
    calls = []

    def resizer(table, shape):
        calls.append((table.shape, shape))
        return _resize_by_tiling(table, shape)

    flat, resized = restore.resize_parameters(src, target, {r"relative_position_bias$": resizer})
    assert resized == [TABLE] and calls == [((3, 3, 2), (5, 5, 2))]  # same shape: not called
    np.testing.assert_array_equal(flat[TABLE], _resize_by_tiling(src[TABLE], (5, 5, 2)))
    assert flat["stage_1/block_0/other_bias"].shape == (3, 3, 2)  # no regex matches it
    # ... so the strict restore still names it, and only it.
    with pytest.raises(ConversionError, match=r"other_bias: from .*expected \[5, 5, 2\]") as e:
        restore.restore_params(flat, target)
    assert list(e.value.mismatched) == ["stage_1/block_0/other_bias"]

    # The regex is matched against the target name; the source is found through the map.
    renamed = {"old/table": src[TABLE]}
    flat, resized = restore.resize_parameters(
        renamed, _abstract({TABLE: (5, 5, 2)}), {r"relative_position_bias$": resizer},
        [(r"stage_1/block_0/attention/relative_position_bias", "old/table")])
    assert resized == ["old/table"] and flat["old/table"].shape == (5, 5, 2)
    with pytest.raises(ValueError, match="resizer regex '\\(' is invalid"):
        restore.resize_parameters(src, target, {"(": resizer})


class _Trainer:
    """What InitFromCheckpoint uses of a Trainer: its model and the abstract state."""

    def __init__(self, model, abstract_params):
        self.model = model
        self._abstract = abstract_params

    def abstract_state_with_shardings(self):
        return trainer_lib.TrainState(step=0, params=self._abstract, opt_state=None)


class _Model:
    def __init__(self, resizers=None):
        if resizers is not None:
            self.parameter_resizers = lambda: resizers


def test_init_from_checkpoint_takes_its_resizers_from_the_model(tmp_path, capsys):
    small = {TABLE: np.arange(18, dtype=np.float32).reshape(3, 3, 2),
             "head/kernel": np.full((4, 2), 3.0, np.float32)}
    ck = checkpoints.Checkpointer(str(tmp_path / "pre"), save_interval_steps=1, keep=None)
    ck.save(5, {"step": np.int32(5), "params": trees.unflatten(small)}, {"batches_consumed": 0})
    ck.close()
    shapes = {TABLE: (5, 5, 2), "head/kernel": (4, 2)}
    fresh = trainer_lib.TrainState(step=0, params=trees.unflatten(
        {k: np.zeros(s, np.float32) for k, s in shapes.items()}), opt_state=None)
    hook = restore.InitFromCheckpoint(path=str(tmp_path / "pre"), resize_position_tables=True)

    # Models that declare no resizer (no method, or {}) get none: the strict restore names
    # the table.
    for model in (_Model(), _Model({})):
        with pytest.raises(ConversionError, match=r"relative_position_bias: from .*"
                                                  r"expected \[5, 5, 2\], found \[3, 3, 2\]"):
            hook(_Trainer(model, _abstract(shapes)), fresh)

    model = _Model({r"relative_position_bias$": _resize_by_tiling})
    new = hook(_Trainer(model, _abstract(shapes)), fresh)
    assert "1 position table(s) resized" in capsys.readouterr().err
    got = trees.flatten(new.params)
    np.testing.assert_array_equal(got[TABLE], _resize_by_tiling(small[TABLE], (5, 5, 2)))
    np.testing.assert_array_equal(got["head/kernel"], 3.0)
    # Without the flag the model's resizers are not used.
    with pytest.raises(ConversionError, match="relative_position_bias"):
        restore.InitFromCheckpoint(path=str(tmp_path / "pre"))(
            _Trainer(model, _abstract(shapes)), fresh)
