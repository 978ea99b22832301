"""CoAtNet: parameter counts equal timm's paper-like `coatnet_{0..3}_224`, the five stages have
output strides 2..32, the relative bias is indexed by the offset, and timm's logits are
reproduced after weight conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.vision.models import coatnet, common
from tests.vision import conftest as timm_utils


@pytest.mark.parametrize("variant,expected", [
    ("0", 25_036_820), ("1", 42_225_776), ("2", 74_684_744), ("3", 166_966_264),
])
def test_param_count_equals_timm(variant, expected):
    """Trainable params ('params'; BN statistics excluded) at 224x224, 1000 classes."""
    shapes = common.param_shapes(coatnet.create(variant, 1000), (1, 224, 224, 3))
    assert common.count_params(shapes["params"]) == expected
    assert timm_utils.timm_param_count(f"coatnet_{variant}_224") == expected


def test_output_strides():
    """S0..S4 of CoAtNet-0 at 224: /2, /4, /8, /16, /32 with widths 64, 96, 192, 384, 768."""
    model = coatnet.create("0", 1000)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = common.param_shapes(model, x.shape)
    logits, out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    expected = {"stem": (112, 64), "stage1": (56, 96), "stage2": (28, 192),
                "stage3": (14, 384), "stage4": (7, 768)}
    for name, (side, width) in expected.items():
        assert out[name].shape == (2, side, side, width), name
    assert logits.shape == (2, 1000) and out["pre_logits"].shape == (2, 768)
    # Relative tables: (2H-1)(2W-1) rows per head, head dim 32.
    stage3 = variables["params"]["stage3_block1"]["attn"]["relative_position_bias"]
    stage4 = variables["params"]["stage4_block0"]["attn"]["relative_position_bias"]
    assert stage3.shape == (27, 27, 384 // 32) and stage4.shape == (13, 13, 768 // 32)


def test_relative_position_index_is_the_offset():
    """index[i, j] addresses table[y_i - y_j + H - 1, x_i - x_j + W - 1] (flattened)."""
    h, w = 3, 4
    index = coatnet.relative_position_index(h, w)
    for i in range(h * w):
        for j in range(h * w):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            assert index[i, j] == (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)


def test_logits_match_timm():
    """timm coatnet_0_224 shortened to depths (1, 2, 1, 2) at 64x64 (so every block kind, with
    and without downsampling, is covered), all weights and BN statistics random, eval mode."""
    torch = pytest.importorskip("torch")
    tm = timm_utils.randomized_timm_model("coatnet_0_224", depths=(1, 2, 1, 2), img_size=64,
                                          num_classes=10)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("norm.weight"):
                p.normal_(0.0 if "table" in name else 1.0, 0.5)  # not timm's ~0 / 1 init
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ref = timm_utils.timm_logits(tm, x)
    model = coatnet.create("0", 10, depths=(1, 2, 1, 2))
    variables = coatnet.from_timm(tm.state_dict())
    logits, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x))
    timm_utils.assert_logits_match(logits, ref)


def test_odd_sizes_and_bad_variant():
    """28x28 grayscale (Fashion-MNIST) runs: sides 14, 7, 4, 2, 1 (ceil at odd sides, where the
    pooled shortcut and the strided conv agree)."""
    model = coatnet.create("tiny", 10)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    _, out = jax.eval_shape(lambda v, x: model.apply(v, x), common.param_shapes(model, x.shape), x)
    assert [out[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == [
        14, 7, 4, 2, 1]
    with pytest.raises(ValueError, match="known"):
        coatnet.create("7", 10)


def test_resize_relative_position_bias_is_bilinear_in_the_offset():
    """Same size: unchanged. An affine table a*dy + b*dx + c per head stays affine, with offsets
    rescaled so the largest ones align; a constant stays constant."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 7, 2)).astype(np.float32)  # a 4x4 map
    np.testing.assert_array_equal(coatnet.resize_relative_position_bias(table, (4, 4)), table)
    dy, dx = np.meshgrid(np.arange(-3, 4), np.arange(-3, 4), indexing="ij")
    affine = np.stack([0.5 * dy - 2.0 * dx + 1.0, -dy + 0.25 * dx], axis=-1).astype(np.float32)
    got = coatnet.resize_relative_position_bias(affine, (7, 5))  # -> [13, 9, 2]
    assert got.shape == (13, 9, 2)
    ny, nx = np.meshgrid(np.arange(-6, 7) * 3 / 6, np.arange(-4, 5) * 3 / 4, indexing="ij")
    want = np.stack([0.5 * ny - 2.0 * nx + 1.0, -ny + 0.25 * nx], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Down-sizing keeps the corner (largest-offset) entries exactly.
    small = coatnet.resize_relative_position_bias(table, (2, 3))
    assert small.shape == (3, 5, 2)
    np.testing.assert_array_equal(small[[0, 0, -1, -1], [0, -1, 0, -1]],
                                  table[[0, 0, -1, -1], [0, -1, 0, -1]])
    const = np.full((5, 5, 3), 0.7, np.float32)
    np.testing.assert_allclose(coatnet.resize_relative_position_bias(const, (6, 2)), 0.7,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="2h-1"):
        coatnet.resize_relative_position_bias(np.zeros((6, 7, 2)), (4, 4))


def test_finetune_at_another_resolution_resizes_the_tables(tmp_path, capsys):
    """A CoAtNet checkpoint trained at 32x32 initialises a 64x64 run through InitFromCheckpoint:
    without resize_position_tables the strict restore names the bias tables; with it, every
    table is the bilinear resize of the source's, every other parameter and the batch-norm
    statistics are restored as is, the run's EMA starts from them, and the 64x64 model runs."""
    import jax

    from moetx.convert import restore
    from moetx.convert.errors import ConversionError
    from moetx.trainer import checkpoints, optimizers, partitioning
    from moetx.trainer import trainer as trainer_lib
    from moetx.util import trees
    from moetx.vision import model as vision_model

    def make(size, seed, **kw):
        """A Trainer at size x size and a state of its exact structure, shapes and shardings.
        The values are random instead of `init_state()`'s (whose XLA compilation costs ~10 s a
        size): weights N(0, 0.1), batch-norm statistics (and everything else) U(0.5, 1.5),
        unlike a fresh init's mean 0 / var 1 so that restoring them is visible; the step 0."""
        m = vision_model.ImageClassificationModel(model_name="coatnet/tiny", num_classes=10)
        mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        tr = trainer_lib.Trainer(
            m, lambda param_axes: optimizers.sgd_momentum(optimizers.constant_schedule(0.1)),
            mesh, partitioning.standard_logical_axis_rules(),
            m.input_shapes(2, {"image": (size, size, 3)}), seed=seed, **kw)
        rng = np.random.default_rng(seed)

        def fill(path, a):
            if not np.issubdtype(a.dtype, np.floating):
                value = np.zeros(a.shape, a.dtype)
            elif path[0].name == "params":
                value = 0.1 * rng.standard_normal(a.shape)
            else:
                value = rng.uniform(0.5, 1.5, a.shape)
            return jax.device_put(np.asarray(value, a.dtype), a.sharding)

        return tr, jax.tree_util.tree_map_with_path(fill, tr.abstract_state_with_shardings())

    small_tr, small_state = make(32, seed=0)
    ck = checkpoints.Checkpointer(str(tmp_path / "pre"), save_interval_steps=1, keep=None)
    ck.save(7, small_state, {"batches_consumed": 0})
    ck.close()
    src = trees.flatten(jax.device_get(small_state.params))
    tables = sorted(k for k in src if k.endswith("relative_position_bias"))
    assert len(tables) == 2  # the two Transformer stages of 'tiny'

    big_tr, big_state = make(64, seed=1, ema_decay=0.999, ema_warmup=False)
    with pytest.raises(ConversionError, match="relative_position_bias"):
        restore.InitFromCheckpoint(path=str(tmp_path / "pre"))(big_tr, big_state)
    new = restore.InitFromCheckpoint(path=str(tmp_path / "pre"),
                                     resize_position_tables=True)(big_tr, big_state)
    assert "2 position table(s) resized" in capsys.readouterr().err
    got = trees.flatten(jax.device_get(new.params))
    assert set(got) == set(src)
    for k, v in src.items():
        if k in tables:
            side = (got[k].shape[0] + 1) // 2
            assert got[k].shape != v.shape and side == 2 * ((v.shape[0] + 1) // 2)
            np.testing.assert_allclose(
                got[k], coatnet.resize_relative_position_bias(v, (side, side)), rtol=1e-6)
        else:
            np.testing.assert_array_equal(got[k], v)
    stats = trees.flatten(jax.device_get(small_state.model_state))
    got_stats = trees.flatten(jax.device_get(new.model_state))
    assert stats and set(got_stats) == set(stats)
    for k, v in stats.items():
        np.testing.assert_array_equal(got_stats[k], v)
    # The EMA starts from the restored weights and statistics, not the 64x64 run's fresh init.
    for tree, want in ((new.ema["params"], got), (new.ema["model_state"], got_stats)):
        flat = trees.flatten(jax.device_get(tree))
        assert set(flat) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(flat[k], v)
    logits, _ = jax.jit(big_tr.model.module.apply)(
        {"params": new.params, "batch_stats": new.model_state["batch_stats"]},
        np.zeros((1, 64, 64, 3), np.float32))
    assert logits.shape == (1, 10) and np.all(np.isfinite(np.asarray(logits)))
