"""T5X's run semantics in `train()`: fine-tuning with `InitFromCheckpoint(continue_step=True)`
continues the source's step, TRAIN_STEPS is the absolute last step and TRAIN_STEPS_RELATIVE
counts from the start step; the written training scalars carry T5X's names and meanings
(`loss` is the optimised loss, the sum of its written parts, and `timing/*`); and the task's
metric functions run through a seqio.Evaluator on the model's predictions and scores."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from moetx.trainer import data, metrics as metrics_lib, optimizers, partitioning
from moetx.trainer import trainer as trainer_lib
from tests.conftest import TINY, make_trainer, packed_batch, register_integer_lm_task, tiny_model

TASK = "moetx_test_t5x_lm"
SEQ2SEQ = "moetx_test_t5x_seq2seq"
LENGTH = 16
BATCH = 8


@pytest.fixture(scope="module")
def lm_task():
    """A causal-LM task over 200 seeded integer sequences (no file read)."""
    import seqio

    register_integer_lm_task(TASK, 200, 160, max_len=14, min_len=3)
    yield TASK
    seqio.TaskRegistry.remove(TASK)


@pytest.fixture
def jsonl(clean_gin):
    import gin

    gin.bind_parameter("MetricWriter.writers", ("jsonl",))


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _adamw(param_axes):
    return optimizers.adamw(1e-3, param_axes=param_axes)


def _train(model_dir, **kw):
    from moetx.trainer import train as train_lib

    cfg = data.DatasetConfig(TASK, {"targets": LENGTH}, batch_size=BATCH, seed=0)
    mesh = lambda: partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])  # noqa: E731
    kw = {"save_every": 100, "log_every": 1, "mesh_fn": mesh, "optimizer_factory": _adamw, **kw}
    return train_lib.train(model=tiny_model(), model_dir=str(model_dir), train_dataset_cfg=cfg,
                           **kw)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, lm_task):
    """A moetx run trained to step 3 (checkpoint_3), the fine-tuning source."""
    import gin

    gin.clear_config(clear_constants=False)
    src = tmp_path_factory.mktemp("t5x_semantics") / "source"
    _train(src, train_steps=3)
    gin.clear_config(clear_constants=False)
    return src


@pytest.mark.usefixtures("jsonl")
def test_continue_step_makes_train_steps_absolute_and_relative(source_run, tmp_path, capsys):
    from moetx.convert.restore import InitFromCheckpoint

    # TRAIN_STEPS is absolute: starting at the source's step 3, TRAIN_STEPS=5 trains 4 and 5.
    out = _train(tmp_path / "abs", train_steps=5,
                 init_from=InitFromCheckpoint(str(source_run), continue_step=True))
    assert out["step"] == 5
    assert [r["step"] for r in _rows(tmp_path / "abs" / "train" / "metrics.jsonl")
            if "loss" in r] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "abs").glob("checkpoint_*")) == ["checkpoint_5"]
    assert "continuing at step 3" in capsys.readouterr().err

    # TRAIN_STEPS_RELATIVE counts from the start step: 3 + 2.
    out = _train(tmp_path / "rel", train_steps_relative=2,
                 init_from=InitFromCheckpoint(str(source_run), continue_step=True))
    assert out["step"] == 5

    # The default keeps moetx's fine-tuning: step 0, TRAIN_STEPS new steps.
    out = _train(tmp_path / "fresh", train_steps=2, init_from=InitFromCheckpoint(str(source_run)))
    assert out["step"] == 2

    with pytest.raises(ValueError, match="exactly one of train.train_steps .* and "
                                         "train.train_steps_relative"):
        _train(tmp_path / "both", train_steps=5, train_steps_relative=2)
    with pytest.raises(ValueError, match=r"TRAIN_STEPS\) = 2 is the absolute last step, but the "
                                         r"run starts at step 3"):
        _train(tmp_path / "short", train_steps=2,
               init_from=InitFromCheckpoint(str(source_run), continue_step=True))


def test_continue_step_restores_a_matching_optimizer_state(source_run, tmp_path, capsys):
    """The step and the AdamW moments of checkpoint_3 come back exactly when the run has the
    source's optimizer; with another optimizer, or from a T5X checkpoint (written here from
    the same parameters at step 3), the state starts fresh (said on the console)."""
    from moetx.convert.restore import InitFromCheckpoint
    from moetx.trainer import checkpoints

    trainer = make_trainer(tiny_model(), (1, 1, 1), length=LENGTH, optimizer=_adamw)
    state = InitFromCheckpoint(str(source_run), continue_step=True)(trainer, trainer.init_state())
    saved, _ = checkpoints.Checkpointer(str(source_run)).restore(
        3, trainer.abstract_state_with_shardings())
    assert int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state),
                    jax.tree_util.tree_leaves(saved.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "with its optimizer state" in capsys.readouterr().err

    other = make_trainer(tiny_model(), (1, 1, 1), length=LENGTH)  # Adafactor
    fresh = other.init_state()
    state = InitFromCheckpoint(str(source_run), continue_step=True)(other, fresh)
    assert int(state.step) == 3
    assert "a fresh optimizer state (the run's optimizer differs" in capsys.readouterr().err

    # The same parameters and step as a T5X checkpoint: the step is continued, the optimizer
    # state is fresh (T5X's layout is not mapped onto optax's).
    from moetx.convert import formats

    t5x_dir = formats.write_t5x(str(tmp_path / "t5x"), formats.read_moetx(
        str(source_run), load_optimizer=False), use_tensorstore=False)
    state = InitFromCheckpoint(t5x_dir, continue_step=True)(trainer, trainer.init_state())
    assert int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(saved.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    err = capsys.readouterr().err
    assert "a fresh optimizer state (a T5X checkpoint's optimizer state is not mapped" in err


@pytest.mark.usefixtures("jsonl")
def test_written_loss_is_the_sum_of_its_parts_with_moe_and_z_loss(tmp_path):
    """MoE decoder, z-loss 1e-2, two microbatches: the JSONL `loss` equals cross_ent_loss +
    z_loss + experts/auxiliary_loss + experts/router_z_loss (T5X's identity) and exceeds the
    cross entropy; `learning_rate` and the `timing/*` scalars are written."""
    from moetx.lm import models, transformer
    from moetx.moe import layers as moe_layers

    moe = moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, sparse_every=2,
                               aux_loss_factor=0.1, router_z_loss_factor=0.01)
    model = models.DecoderOnlyModel(dataclasses.replace(
        transformer.TransformerConfig(**TINY), moe=moe), z_loss=1e-2,
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    trainer = make_trainer(model, (1, 1, 1), length=32, num_microbatches=2)
    writer = metrics_lib.MetricWriter(str(tmp_path), 2)
    trainer_lib.run_training_loop(trainer, trainer.init_state(),
                                  iter([packed_batch(8, 32, seed=s) for s in (1, 2)]), 2, writer,
                                  log_every=1, count_per_batch=8 * 32)
    writer.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        parts = (r["cross_ent_loss"] + r["z_loss"] + r["experts/auxiliary_loss"]
                 + r["experts/router_z_loss"])
        np.testing.assert_allclose(r["loss"], parts, rtol=1e-5)
        assert r["experts/auxiliary_loss"] > 0 and r["z_loss"] > 0
        assert r["loss"] > r["cross_ent_loss"] + 1e-3
        assert r["learning_rate"] > 0
        np.testing.assert_allclose(r["timing/steps_per_second"] * r["timing/seconds"], 1.0,
                                   rtol=1e-6)
        np.testing.assert_allclose(r["timing/seqs_per_second"],
                                   8 * r["timing/steps_per_second"], rtol=1e-6)
        np.testing.assert_allclose(r["timing/tokens_per_second"],
                                   256 * r["timing/steps_per_second"], rtol=1e-6)
        assert r["timing/seqs"] == 8 and r["timing/uptime"] > 0
    assert "timing/compilation_seconds" in rows[0] and "timing/compilation_seconds" not in rows[1]
    assert "steps_per_sec" not in rows[0]


# ---------------------------------------------------------------------- seqio evaluation
INPUTS = 6
TARGETS = 6


def _ids(x) -> list[int]:
    """Token ids without padding (0) or EOS (1)."""
    return [int(t) for t in np.asarray(x).reshape(-1) if t > 1]


def sequence_accuracy(targets, predictions):
    return {"sequence_accuracy": 100.0 * float(np.mean(
        [_ids(t) == _ids(p) for t, p in zip(targets, predictions)]))}


def mean_log_likelihood(targets, scores):
    del targets
    return {"mean_log_likelihood": float(np.mean(scores))}


def _seq2seq_model():
    from moetx.lm import models, transformer

    return models.EncoderDecoderModel(transformer.TransformerConfig(
        **{**TINY, "num_decoder_layers": 1}, num_encoder_layers=1))


def _register_seq2seq(inputs, targets):
    """The task SEQ2SEQ: `inputs` + EOS -> `targets` (no EOS), the same examples in its train
    and validation splits, scored by `sequence_accuracy` and `mean_log_likelihood`."""
    import seqio
    import tensorflow as tf

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.ragged.constant(inputs), "targets": tf.ragged.constant(targets)}).map(
            lambda x: {k: tf.cast(v, tf.int32) for k, v in x.items()})

    vocab = seqio.PassThroughVocabulary(size=128, eos_id=1)
    seqio.TaskRegistry.remove(SEQ2SEQ)
    seqio.TaskRegistry.add(
        SEQ2SEQ, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
        metric_fns=[sequence_accuracy, mean_log_likelihood])


def test_seqio_evaluator_runs_the_task_metrics_on_the_model_predictions(tmp_path, clean_gin):
    """An encoder-decoder's greedy predictions of a task whose even targets are those
    predictions and odd ones are not: the seqio sequence accuracy equals the one computed
    from `Predictor.generate` directly (50%), the score metric the mean of `Predictor.score`;
    the results are written as T5X's logger does (`<task>/` with `eval/<metric>`)."""
    import flax.linen as nn
    import gin
    import seqio

    from moetx.lm import predict

    gin.bind_parameter("MetricWriter.writers", ("jsonl",))
    model = _seq2seq_model()
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = partitioning.standard_logical_axis_rules()
    shapes = model.input_shapes(4, {"inputs": INPUTS, "targets": TARGETS})
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    vocab = seqio.PassThroughVocabulary(size=128, eos_id=1)

    rng = np.random.RandomState(1)
    inputs = [rng.randint(2, 128, rng.randint(2, INPUTS)).tolist() for _ in range(10)]
    reference = predict.Predictor(model, params, vocab, mesh, rules, batch_size=4,
                                  max_length=TARGETS, max_input_length=INPUTS)
    predicted = [g.ids for g in reference.generate(inputs)]
    targets = [p if i % 2 == 0 else rng.randint(2, 128, 4).tolist()
               for i, p in enumerate(predicted)]
    assert all(_ids(t) != _ids(p) for t, p in zip(targets[1::2], predicted[1::2]))

    _register_seq2seq(inputs, targets)
    try:
        cfg = data.DatasetConfig(SEQ2SEQ, {"inputs": INPUTS, "targets": TARGETS},
                                 split="validation", batch_size=4, shuffle=False)
        evaluator = metrics_lib.InferenceEvaluator(model, cfg, str(tmp_path / "inference_eval"))
        results = evaluator.evaluate(params, {}, mesh, rules, step=7)
    finally:
        seqio.TaskRegistry.remove(SEQ2SEQ)

    expected = 100.0 * np.mean([_ids(t) == _ids(p) for t, p in zip(targets, predicted)])
    assert expected == 50.0
    assert results[f"{SEQ2SEQ}/sequence_accuracy"] == pytest.approx(expected)
    # The task appends EOS to the inputs, not to the targets.
    scores = reference.score([x + [1] for x in inputs], targets, add_eos=False)
    assert results[f"{SEQ2SEQ}/mean_log_likelihood"] == pytest.approx(float(np.mean(scores)),
                                                                      rel=1e-5)
    rows = _rows(tmp_path / "inference_eval" / SEQ2SEQ / "metrics.jsonl")
    assert rows == [{"step": 7, "eval/sequence_accuracy": pytest.approx(expected),
                     "eval/mean_log_likelihood": pytest.approx(float(np.mean(scores)),
                                                               rel=1e-5)}]


def test_train_and_moetx_eval_run_the_seqio_evaluator(tmp_path, clean_gin):
    """`train(seqio_eval_every=...)` evaluates the task's metrics at the end of training
    (written under MODEL_DIR/inference_eval/<task>); `evaluate()` (moetx-eval) on the final
    checkpoint reports the same values next to the teacher-forced ones."""
    import gin

    from moetx.trainer import eval as eval_lib, train as train_lib

    gin.bind_parameter("MetricWriter.writers", ("jsonl",))
    rng = np.random.RandomState(2)
    inputs = [rng.randint(2, 128, rng.randint(2, INPUTS)).tolist() for _ in range(8)]
    targets = [rng.randint(2, 128, rng.randint(1, TARGETS)).tolist() for _ in range(8)]
    _register_seq2seq(inputs, targets)
    try:
        lengths = {"inputs": INPUTS, "targets": TARGETS}
        mesh = lambda: partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])  # noqa: E731
        out = train_lib.train(
            model=_seq2seq_model(), model_dir=str(tmp_path / "run"),
            train_dataset_cfg=data.DatasetConfig(SEQ2SEQ, lengths, batch_size=4),
            infer_eval_dataset_cfg=data.DatasetConfig(SEQ2SEQ, lengths, split="validation",
                                                      batch_size=4, shuffle=False),
            train_steps=2, seqio_eval_every=1, save_every=2, log_every=1, mesh_fn=mesh)
        evaluated = eval_lib.evaluate(
            model=_seq2seq_model(), checkpoint_dir=str(tmp_path / "run"),
            dataset_cfg=data.DatasetConfig(SEQ2SEQ, lengths, split="validation", batch_size=4,
                                           shuffle=False), mesh_fn=mesh)
    finally:
        import seqio

        seqio.TaskRegistry.remove(SEQ2SEQ)
    names = {f"{SEQ2SEQ}/sequence_accuracy", f"{SEQ2SEQ}/mean_log_likelihood"}
    assert set(out["inference_eval"]) == names
    rows = _rows(tmp_path / "run" / "inference_eval" / SEQ2SEQ / "metrics.jsonl")
    # train() at steps 1 and 2, then moetx-eval (writing to the model directory too) at 2.
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert rows[2] == pytest.approx(rows[1], rel=1e-5)
    for name in names:
        assert evaluated[name] == pytest.approx(out["inference_eval"][name], rel=1e-5)
    assert evaluated["step"] == 2 and evaluated["tokens"] > 0
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert names <= set(saved)


def test_a_prefix_lm_predicts_from_the_task_inputs(clean_gin):
    """A decoder-only prefix LM's seqio predictions are its greedy continuations of the task's
    inputs + EOS (what `Predictor.generate` gives for them), of any length."""
    import flax.linen as nn
    import seqio
    import tensorflow as tf

    from moetx.lm import models, predict, transformer

    model = models.DecoderOnlyModel(transformer.TransformerConfig(
        **{**TINY, "num_decoder_layers": 1}), prefix_lm=True)
    rng = np.random.RandomState(0)
    inputs = [rng.randint(2, 128, rng.randint(2, 5)).tolist() for _ in range(6)]
    targets = [rng.randint(2, 128, 3).tolist() for _ in range(6)]
    seen = {}

    def record(targets, predictions):
        seen["predictions"] = predictions
        return {"n": float(len(predictions))}

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.ragged.constant(inputs), "targets": tf.ragged.constant(targets)}).map(
            lambda x: {k: tf.cast(v, tf.int32) for k, v in x.items()})

    vocab = seqio.PassThroughVocabulary(size=128, eos_id=1)
    name = "moetx_test_t5x_prefix_lm"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
        metric_fns=[record])
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = partitioning.standard_logical_axis_rules()
    lengths = {"inputs": 6, "targets": 6}
    params = nn.unbox(model.get_initial_variables(
        jax.random.PRNGKey(0), model.input_shapes(4, lengths))["params"])
    try:
        cfg = data.DatasetConfig(name, lengths, split="validation", batch_size=4, shuffle=False)
        results = metrics_lib.InferenceEvaluator(model, cfg).evaluate(params, {}, mesh, rules, 0)
    finally:
        seqio.TaskRegistry.remove(name)
    assert results == {f"{name}/n": 6.0}
    reference = predict.Predictor(model, params, vocab, mesh, rules, batch_size=4,
                                  max_length=12)
    expected = [g.ids for g in reference.generate([x + [1] for x in inputs], add_eos=False)]
    assert [_ids(p) for p in seen["predictions"]] == [_ids(e) for e in expected]
    assert len({len(_ids(e)) for e in expected}) > 1  # continuations of several lengths
