"""Assignment-map restore: name mapping with regex groups and drops, strict and non-strict diffs,
restoring a checkpoint written on one mesh onto another (8 simulated devices), and continued
training from an upcycled checkpoint through `train.init_from` in gin."""

import re

import jax
import numpy as np
import pytest

from moetx.tools import convert, restore
from moetx.tools.hf import ConversionError
from tests.tools.test_convert import random_params
from tests.trainer import helpers
from tests.trainer.test_cli import _losses

SRC = {"encoder/layers_0/mlp/wi/kernel": np.ones((4, 8), np.float32),
       "encoder/layers_0/mlp/wo/kernel": np.full((8, 4), 2.0, np.float32),
       "decoder/logits_dense/kernel": np.zeros((4, 10), np.float32)}


def _abstract(shapes):
    return convert._unflatten({k: jax.ShapeDtypeStruct(s, np.float32)
                               for k, s in shapes.items()})


def test_map_renames_with_groups_and_drops_on_both_sides():
    target = {"encoder/block_0/ffn/wi/kernel": (4, 8), "encoder/block_0/ffn/wo/kernel": (8, 4),
              "decoder/new_head/kernel": (4, 10)}
    amap = [(r"encoder/block_(\d+)/ffn/(.*)", r"encoder/layers_\1/mlp/\2"),
            (r"decoder/new_head/kernel", None), (r"decoder/logits_dense/.*", None)]
    init = convert._unflatten({k: np.full(s, 7.0, np.float32) for k, s in target.items()})
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
    init = convert._unflatten({k: np.full(s, 7.0, np.float32) for k, s in target.items()})
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
        params=jax.device_get(state.params), step=11), convert._abstract(model))
    assert restore.source_format(written) == "moetx"

    dst = helpers.make_trainer(model, mesh_shape=(2, 1, 4))
    abstract = dst.abstract_state_with_shardings().params
    swap = [(r"decoder/layers_0/(.*)", r"decoder/layers_1/\1"),
            (r"decoder/layers_1/(.*)", r"decoder/layers_0/\1")]
    params, report = restore.restore_params(written, abstract, None, swap, strict=True)
    assert report.exact and len(report.restored) == len(jax.tree_util.tree_leaves(abstract))
    src = convert._flatten(jax.device_get(state.params))
    got = convert._flatten(params)
    want_sh = convert._flatten(abstract)
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
    from moetx.trainer import cli, train

    dense_model = convert.load_model("models/llama_tiny.gin").model
    dense = random_params(dense_model, 5)
    dense_dir = convert.write_moetx(str(tmp_path / "dense"), convert.Checkpoint(dense, step=40),
                                    convert._abstract(dense_model))
    import gin

    gin.clear_config(clear_constants=False)
    (tmp_path / "moe.gin").write_text(f"""
include 'models/llama_tiny.gin'
import moetx.moe.layers
import moetx.tools.restore
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
    code = cli.run(train.main, argv, module_imports=("moetx.lm.models", "moetx.tasks"))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "(upcycled): restored" in err and sorted(_losses(err)) == [1, 2]
    final = convert.read_moetx(str(md))
    assert final.step == 2
    got = convert._flatten(final.params)
    d = convert._flatten(dense)
    # Continued from the dense weights (two small Adafactor steps away), experts tiled from the
    # dense MLP: nothing was re-initialised.
    for k in ("decoder/token_embedder/embedding", "decoder/layers_0/mlp/wi_0/kernel"):
        assert np.linalg.norm(got[k] - d[k]) < 0.2 * np.linalg.norm(d[k]), k
    experts = got["decoder/layers_1/mlp/expert/wo/kernel"]
    assert experts.shape[0] == 4
    for e in range(4):
        dense_wo = d["decoder/layers_1/mlp/wo/kernel"]
        assert np.linalg.norm(experts[e] - dense_wo) < 0.2 * np.linalg.norm(dense_wo)
