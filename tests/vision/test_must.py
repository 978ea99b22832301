"""MuST mechanics: teachers pseudo-label a shared image set, the label store round-trips
exactly (and detects tampering), the masked multi-task loss matches a direct computation, and
a multi-task student trains on the store through SeqIO and the shared trainer."""

import jax
import numpy as np
import pytest

from moetx.trainer import data as trainer_data
from moetx.trainer import optimizers, partitioning, trainer as trainer_lib
from moetx.vision import data, must
from moetx.vision import model as vision_model

SPECS = [must.TaskSpec("digit", "classification", 10, 1.0),
         must.TaskSpec("ink", "regression", 1, 0.5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    images, _ = data.load_digits("train")
    images = images[:256]
    teacher = vision_model.ImageClassificationModel(model_name="tiny/s")
    variables = teacher.get_initial_variables(jax.random.PRNGKey(0), teacher.input_shapes(
        1, {"image": (8, 8, 1)}))
    predict = jax.jit(lambda im: teacher.predict(
        variables["params"], im, {"batch_stats": variables["batch_stats"]}) * 20.0)
    probs, _ = must.label_with_teacher(predict, images, batch_size=100)
    threshold = float(np.median(probs.max(-1)))
    digit = must.label_with_teacher(predict, images, threshold=threshold, batch_size=100)
    ink = must.label_with_teacher(lambda im: im.reshape(len(im), -1).mean(-1, keepdims=True)
                                  / 255.0, images, kind="regression")
    directory = tmp_path_factory.mktemp("must_store")
    must.write_store(directory, images, SPECS, {"digit": digit, "ink": ink})
    return directory, images, {"digit": digit, "ink": ink}


def test_store_round_trip_is_exact_and_tamper_evident(store, tmp_path):
    directory, images, labels = store
    images2, specs2, labels2 = must.read_store(directory)
    np.testing.assert_array_equal(images2, images)
    assert specs2 == SPECS
    for name in labels:
        for a, b in zip(labels[name], labels2[name]):
            np.testing.assert_array_equal(a, b)
    # The confidence threshold left about half of the digit labels missing.
    mask = labels2["digit"][1]
    assert 0.3 < mask.mean() < 0.7 and labels2["ink"][1].all()
    np.testing.assert_allclose(labels2["digit"][0].sum(-1), 1.0, rtol=1e-5)

    must.write_store(tmp_path, images, SPECS, labels)
    y, m = labels["ink"]
    np.savez(tmp_path / "ink.npz", labels=y + 1e-3, mask=m)
    with pytest.raises(ValueError, match="hash"):
        must.read_store(tmp_path)
    with pytest.raises(ValueError, match="No pseudo-labels"):
        must.write_store(tmp_path, images, SPECS, {"digit": labels["digit"]})


def test_masked_multitask_loss_matches_direct_computation():
    rng = np.random.RandomState(0)
    out = {"digit": rng.randn(6, 10).astype(np.float32),
           "ink": rng.randn(6, 1).astype(np.float32)}
    probs = rng.dirichlet(np.ones(10), 6).astype(np.float32)
    batch = {"digit_labels": probs, "digit_mask": np.array([1, 0, 1, 1, 0, 0], np.float32),
             "ink_labels": rng.randn(6, 1).astype(np.float32),
             "ink_mask": np.ones(6, np.float32)}
    loss, sums = must.multitask_loss(out, batch, SPECS)
    logp = out["digit"] - np.log(np.exp(out["digit"]).sum(-1, keepdims=True))
    ce = -(probs * logp).sum(-1)
    mse = ((out["ink"] - batch["ink_labels"]) ** 2).mean(-1)
    expected = ce[[0, 2, 3]].mean() + 0.5 * mse.mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(sums["digit_count"]) == 3.0
    # Labels under a zero mask do not matter; a task with no labels adds nothing.
    batch2 = dict(batch, digit_labels=np.where(batch["digit_mask"][:, None] > 0, probs, 7.0))
    np.testing.assert_allclose(must.multitask_loss(out, batch2, SPECS)[0], loss, rtol=1e-6)
    none = dict(batch, digit_mask=np.zeros(6, np.float32))
    np.testing.assert_allclose(must.multitask_loss(out, none, SPECS)[0], 0.5 * mse.mean(),
                               rtol=1e-5)


def test_student_trains_on_the_store(store):
    directory, _, _ = store
    name = must.register_store_task("must_test_digits", str(directory), holdout=64)
    model = must.MultiTaskModel(backbone_name="tiny/s", tasks=tuple(SPECS))
    cfg = trainer_data.DatasetConfig(name, {"image": (8, 8, 1)}, batch_size=32, seed=0)
    ds = trainer_data.get_dataset(cfg, model.feature_converter, 0, 1, 32, num_epochs=None)
    it = trainer_data.DataIterator(ds)
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(
        model, lambda param_axes: optimizers.adamw(optimizers.constant_schedule(3e-3),
                                                   weight_decay=0.0),
        mesh, partitioning.standard_logical_axis_rules(), model.input_shapes(32, {
            "image": (8, 8, 1)}))
    state = trainer.init_state()
    first = None
    for _ in range(40):
        state, sums = trainer.train_step(state, trainer.to_global(next(it)))
        sums = jax.device_get(sums)
        first = first if first is not None else sums
    # Both heads learn: each task's masked mean loss falls.
    for t in ("digit", "ink"):
        before = first[f"{t}_loss_sum"] / first[f"{t}_count"]
        after = sums[f"{t}_loss_sum"] / sums[f"{t}_count"]
        assert after < 0.7 * before, (t, before, after)
    assert set(state.params) == {"backbone", "head_digit", "head_ink"}


def test_student_metrics_are_per_task_means_and_their_weighted_sum():
    model = must.MultiTaskModel(backbone_name="tiny/s", tasks=tuple(SPECS))
    weights = {s.name: s.weight for s in SPECS}
    sums = {"digit_loss_sum": 6.0, "digit_count": 3.0, "ink_loss_sum": 2.0, "ink_count": 8.0,
            "correct": 2.0, "count": 8.0, "loss": 123.0}
    out = model.summarize_metrics(sums)
    assert out == {"digit_loss": 2.0, "ink_loss": 0.25,
                   "loss": weights["digit"] * 2.0 + weights["ink"] * 0.25,
                   "accuracy": 2.0 / 3.0, "images": 8.0}
    assert model.headline(out).endswith("| accuracy 0.667 | (8 images)")
