"""The classification wrapper (loss with label smoothing against optax, padding-masked eval,
FLOPs), the model registry, and a tiny model trained on Fashion-MNIST through the gin run
files and the shared trainer, reaching accuracy far above chance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moetx.vision import model as vision_model
from moetx.vision import models


def _batch(n=4, seed=0, size=8):
    rng = np.random.RandomState(seed)
    return {"image": jnp.asarray(rng.randint(0, 256, (n, size, size, 1)), jnp.uint8),
            "label": jnp.asarray(rng.randint(0, 10, n), jnp.int32),
            "mask": jnp.ones((n,), jnp.float32)}


@pytest.fixture(scope="module")
def wrapper():
    m = vision_model.ImageClassificationModel(model_name="tiny/s", label_smoothing=0.1,
                                              image_size=12)
    variables = m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(4, {
        "image": (8, 8, 1)}))
    # A non-trivial head, so that the loss is not just log(10).
    variables["params"]["head"]["kernel"] = jax.random.normal(
        jax.random.PRNGKey(1), variables["params"]["head"]["kernel"].shape)
    return m, variables


def test_loss_is_smoothed_cross_entropy_and_updates_batch_stats(wrapper):
    m, variables = wrapper
    batch = _batch()
    weights, factor = m.loss_weights_and_factor(batch)
    loss, (sums, new_state) = m.loss_fn(variables["params"], batch, None, weights, factor,
                                        model_state={"batch_stats": variables["batch_stats"]})
    x = m.preprocess(batch["image"])
    assert x.shape == (4, 12, 12, 1)
    (logits, _), _ = m.module.apply(variables, x, train=True, mutable=["batch_stats"])
    ref = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(batch["label"], 10), 0.1))
    np.testing.assert_allclose(loss, ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_sum"], ref.sum(), rtol=1e-5)
    assert float(sums["count"]) == 4.0
    assert float(sums["correct"]) == float(jnp.sum(jnp.argmax(logits, -1) == batch["label"]))
    old = variables["batch_stats"]["bn0"]["mean"]
    assert float(jnp.abs(new_state["batch_stats"]["bn0"]["mean"] - old).max()) > 0


def test_eval_ignores_padding_rows(wrapper):
    m, variables = wrapper
    state = {"batch_stats": variables["batch_stats"]}
    real = _batch(4, seed=2)
    padded = {k: jnp.concatenate([v, jnp.zeros_like(v)]) for k, v in real.items()}
    a = m.eval_fn(variables["params"], real, model_state=state)
    b = m.eval_fn(variables["params"], padded, model_state=state)
    for k in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert float(b["count"]) == 4.0
    assert m.flops_per_step(variables["params"], m.input_shapes(4, {"image": (8, 8, 1)})) > 0


def test_registry_builds_by_name_with_clear_errors():
    net = models.create("tiny/s", 7, dropout_rate=0.5)
    assert net.num_classes == 7 and net.dropout_rate == 0.5
    assert {"tiny", "resnet_rs"} <= set(models.families())
    with pytest.raises(ValueError, match="known families: .*tiny"):
        models.create("nope/1", 10)
    with pytest.raises(ValueError, match="family/variant"):
        models.create("tiny", 10)
    with pytest.raises(ValueError, match="known"):
        models.create("tiny/xl", 10)
    with pytest.raises(ValueError, match="label_smoothing"):
        vision_model.ImageClassificationModel(model_name="tiny/s", label_smoothing=1.0)


@pytest.mark.usefixtures("clean_gin")
def test_tiny_model_trains_on_fashion_mnist(tmp_path):
    """300 steps of a 24k-parameter CNN through `vision/fashion_mnist.gin`: test accuracy on
    512 test images far above the 10% of chance."""
    import gin

    from moetx.cli import flags as cli
    from moetx.trainer import train
    from moetx.trainer import eval as eval_lib  # registers `evaluate` before gin is locked

    args = cli.parse_flags([
        "--gin_file=vision/fashion_mnist.gin", f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.MODEL_NAME='tiny/s'", "--gin.TRAIN_STEPS=300", "--gin.BATCH_SIZE=64",
        "--gin.LEARNING_RATE=0.1", "--gin.WARMUP_STEPS=30", "--gin.EVAL_STEPS=8",
        "--gin.LOG_EVERY=100", "--gin.SAVE_EVERY=300", "--gin.EMA_DECAY=0.99"])
    cli.parse_gin(args)
    results = train.train()
    assert results["eval"]["examples"] == 512.0
    assert results["eval"]["accuracy"] > 0.65, results["eval"]

    # The eval command on the run file plus vision/eval.gin (no MODEL_DIR / TRAIN_STEPS needed)
    # reproduces the end-of-training evaluation exactly: same EMA weights, split and batches.
    gin.clear_config(clear_constants=False)
    args = cli.parse_flags([
        "--gin_file=vision/fashion_mnist.gin", "--gin_file=vision/eval.gin",
        f"--gin.CHECKPOINT_DIR='{tmp_path}'", "--gin.MODEL_NAME='tiny/s'",
        "--gin.BATCH_SIZE=64", "--gin.EVAL_STEPS=8"])
    cli.parse_gin(args)
    again = eval_lib.evaluate()
    assert again["examples"] == 512.0
    assert again["accuracy"] == results["eval"]["accuracy"], (again, results["eval"])


def test_image_metrics_and_eval_line(wrapper):
    """Image models report loss, accuracy and their example count (no perplexity)."""
    m, variables = wrapper
    sums = m.eval_fn(variables["params"], _batch(4, seed=3),
                     model_state={"batch_stats": variables["batch_stats"]})
    assert set(sums) == {"loss_sum", "correct", "count"}
    out = m.summarize_metrics({"loss_sum": 8.0, "correct": 3.0, "count": 4.0})
    assert out == {"loss": 2.0, "accuracy": 0.75, "examples": 4.0}
    big = {"loss": 0.41891, "accuracy": 0.8723, "examples": 10000.0}
    assert m.headline(big) == "loss 0.4189 | accuracy 0.872 | (10,000 examples)"


def test_relative_position_tables_are_resized_on_restore():
    """`parameter_resizers` resizes CoAtNet's [2h-1, 2w-1, heads] tables to the target size (as
    `coatnet.resize_relative_position_bias`) and hands anything else back unchanged."""
    import re

    from moetx.vision.models import coatnet

    resizers = vision_model.ImageClassificationModel(model_name="tiny/s").parameter_resizers()
    assert list(resizers) == [r"relative_position_bias$"]
    (pattern, fn), = resizers.items()
    assert re.search(pattern, "stage_3/block_0/attention/relative_position_bias")
    assert not re.search(pattern, "stage_3/block_0/attention/relative_position_bias/kernel")
    table = np.random.RandomState(0).randn(7, 7, 2).astype(np.float32)
    np.testing.assert_array_equal(fn(table, (11, 11, 2)),
                                  coatnet.resize_relative_position_bias(table, (6, 6)))
    assert fn(table, (11, 11, 2)).shape == (11, 11, 2)
    for other in ((11, 11, 3), (11, 11), (7, 7, 2)):  # heads differ, rank differs, same shape
        assert fn(table, other) is table
