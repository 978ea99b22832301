"""Bad input: a wrong type, an unknown name or an out-of-range number in the configuration is
one `moetx: error:` line naming the binding, exit status 2, and nothing in MODEL_DIR; users'
text files that are not UTF-8 or have huge lines are read with a bound and reported once with
the counts; an empty split, a task whose examples are all filtered out and a vocabulary larger
than the model's embedding are errors before the first step."""

import os
from types import SimpleNamespace

import pytest
import seqio
import tensorflow as tf

from moetx import tasks
from moetx.cli import train as cli_train
from moetx.datasets import textfiles, vocab
from moetx.lm import models
from moetx.tasks import pretraining
from moetx.trainer import data, optimizers

BASE = ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=1"]


def _run(tmp_path, capsys, *extra):
    """Runs the train command in-process; returns (exit status, stderr, MODEL_DIR)."""
    model_dir = tmp_path / "m"
    code = cli_train.main([*BASE, f"--gin.MODEL_DIR='{model_dir}'", *extra])
    return code, capsys.readouterr().err, model_dir


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("moetx: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _nothing_written(model_dir) -> bool:
    return not model_dir.exists() or not any(model_dir.iterdir())


@pytest.mark.usefixtures("clean_gin")
class TestConfigurationErrors:
    @pytest.mark.parametrize("binding, expected", [
        # A float, a string or a bool where an int is needed (by the annotation).
        ("--gin.TRAIN_STEPS=2.5", "train.train_steps = %TRAIN_STEPS = 2.5: train_steps takes "
                                  "an int or None, not a float"),
        ("--gin.train.log_every='10'", "train.log_every = '10': log_every takes an int, not a "
                                       "string"),
        ("--gin.SEED=1.5", "train/DatasetConfig.seed = %SEED = 1.5: seed takes an int or "
                           "None, not a float"),
        ("--gin.TransformerConfig.num_heads=True", "TransformerConfig.num_heads = True: "
                                                   "num_heads takes an int, not a bool"),
        # A list of pairs where a dict is needed; a string where a tuple of names is.
        ("--gin.TASK_FEATURE_LENGTHS=[('targets', 32)]",
         "train/DatasetConfig.task_feature_lengths = %TASK_FEATURE_LENGTHS = [('targets', "
         "32)]: task_feature_lengths takes a dict, not a list or tuple"),
        ("--gin.TransformerConfig.mlp_activations=('relu')",
         "TransformerConfig.mlp_activations = 'relu': mlp_activations takes a list or tuple, "
         "not a string"),
        # Inside a value the constructors check.
        ("--gin.TASK_FEATURE_LENGTHS={'targets': 32.5}",
         "Feature length TASK_FEATURE_LENGTHS['targets'] must be an int, got 32.5"),
        # Unknown names.
        ("--gin.ACTIVATION_DTYPE='float33'", "TransformerConfig.dtype (ACTIVATION_DTYPE) must "
                                             "be a floating-point dtype"),
        # Out-of-range numbers.
        ("--gin.DecoderOnlyModel.z_loss=-1", "DecoderOnlyModel.z_loss must be a number >= 0"),
        ("--gin.DecoderOnlyModel.label_smoothing=1.5",
         "DecoderOnlyModel.label_smoothing must be in [0, 1), got 1.5"),
        ("--gin.rsqrt_schedule.base_learning_rate=-1.0",
         "rsqrt_schedule.base_learning_rate must be a finite number > 0, got -1.0"),
    ])
    def test_is_one_line_naming_the_binding(self, tmp_path, capsys, binding, expected):
        code, err, model_dir = _run(tmp_path, capsys, binding)
        assert code == 2 and expected in _error_line(err)
        assert "Traceback" not in err
        assert _nothing_written(model_dir)

    def test_a_binary_file_as_text_is_refused(self, tmp_path, capsys):
        path = tmp_path / "data.bin"
        path.write_bytes(b"\xff\xfe\x80 \xc3\n" * 300)
        code, err, model_dir = _run(
            tmp_path, capsys, "--gin.MIXTURE_OR_TASK_NAME=@text_files_task()",
            "--gin.text_files_task.name='user_binary'",
            f"--gin.text_files_task.train_files='{path}'")
        line = _error_line(err)
        assert code == 2 and "no line of" in line and "data.bin" in line
        assert "is valid UTF-8 text (300 lines, 1,800 bytes)" in line
        assert _nothing_written(model_dir)

    def test_max_line_bytes_must_be_positive(self, tmp_path, capsys):
        path = tmp_path / "ok.txt"
        path.write_text("some text\n")
        code, err, model_dir = _run(
            tmp_path, capsys, "--gin.MIXTURE_OR_TASK_NAME=@text_files_task()",
            "--gin.text_files_task.name='user_mlb'",
            f"--gin.text_files_task.train_files='{path}'",
            "--gin.text_files_task.max_line_bytes=0")
        assert code == 2 and "max_line_bytes must be a positive int" in _error_line(err)
        assert _nothing_written(model_dir)


def test_every_shipped_model_passes_the_type_check(clean_gin):
    """The binding check refuses nothing moetx's own model and pretraining gin files bind."""
    import gin

    from moetx.cli import flags
    from moetx.util import gin_files

    for name in sorted(os.listdir(os.path.join(gin_files.GIN_DIR, "models"))):
        gin.clear_config(clear_constants=False)
        gin_files.parse_files([f"models/{name}", "runs/pretrain.gin"])
        flags.check_binding_types()


@pytest.mark.parametrize("make, expected", [
    (lambda: data.DatasetConfig("t", [("targets", 32)]), "must be a dict"),
    (lambda: data.DatasetConfig("t", {"targets": "32"}), "must be an int, got '32'"),
    (lambda: data.DatasetConfig("t", {"targets": 32}, batch_size=8.0), "must be an int"),
    (lambda: models.transformer.TransformerConfig(emb_dim=32.0), "emb_dim must be an int"),
    (lambda: models.transformer.TransformerConfig(mlp_activations="relu"),
     r"e.g. \('relu',\) \(note the comma\)"),
    (lambda: models.transformer.TransformerConfig(dtype="int8"), "floating-point dtype"),
])
def test_constructors_check_what_gin_cannot(make, expected):
    """Library callers (no gin, or values inside a dict) get the same errors."""
    with pytest.raises(ValueError, match=expected):
        make()


def test_optimizers_take_a_number_as_a_constant_learning_rate():
    assert float(optimizers.adamw(1e-3).schedule(7)) == pytest.approx(1e-3)
    assert float(optimizers.make_optimizer(optimizers.adamw, 2e-3).schedule(0)) \
        == pytest.approx(2e-3)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="adamw.schedule must be a finite number > 0"):
            optimizers.adamw(bad)
    with pytest.raises(ValueError, match="warmup_cosine_schedule.peak_learning_rate"):
        optimizers.warmup_cosine_schedule(0.0)


def test_a_vocabulary_larger_than_the_embedding_is_refused_for_every_feature():
    model = models.DecoderOnlyModel(config=models.transformer.TransformerConfig(
        vocab_size=128, emb_dim=8, num_heads=1, head_dim=8, mlp_dim=8, num_decoder_layers=1))

    def feature(size):
        return SimpleNamespace(rank=1, vocabulary=SimpleNamespace(vocab_size=size))

    task = SimpleNamespace(name="t", output_features={"inputs": feature(300),
                                                      "targets": feature(100)})
    with pytest.raises(ValueError, match="'inputs' vocabulary has 300 ids but the model's "
                                         "embedding only 128; raise TransformerConfig"):
        model.check_task(task, {"inputs": 8, "targets": 8})


# ------------------------------------------------------------------------------ text files
def test_random_bytes_warn_once_with_the_share_and_read_with_replacements(tmp_path, capsys):
    path = tmp_path / "random.txt"
    path.write_bytes(b"a fine line\n" + b"bad \xff\xfe bytes\n" * 3)
    task = tasks.register_text_files_task("user_random_bytes", str(path))
    tasks.register_text_files_task("user_random_bytes", str(path))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("moetx: warning:")]
    assert len(warnings) == 1
    assert "3 of 4 lines (76.5% of the bytes) are not valid UTF-8" in warnings[0]
    assert "mostly undecodable" in warnings[0] and "random.txt" in warnings[0]
    lines = list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert lines == [b"a fine line"] + ["bad \ufffd\ufffd bytes".encode()] * 3


def test_an_over_long_line_is_cut_and_counted(tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_bytes(b"x" * 5000 + b"\nshort\n" + "é".encode() * 600 + b"\n")
    task = tasks.register_text_files_task("user_long_line", str(path), max_line_bytes=1001)
    err = capsys.readouterr().err
    assert ("moetx: warning: task 'user_long_line'" in err
            and "2 lines longer than max_line_bytes=1,001 are cut to that length" in err)
    lines = list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
    # The cut never splits a character (é is 2 bytes: 1000 of the 1001 are kept).
    assert lines == [b"x" * 1001, b"short", "é".encode() * 500]


def test_reading_a_huge_line_is_bounded(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.write(b"y" * (8 << 20) + b"\nend\n")
    assert [len(x) for x in textfiles.read_lines(path, max_line_bytes=1 << 10)] == [1 << 10, 3]
    stats = textfiles.scan(path, max_line_bytes=1 << 10)
    assert (stats.lines, stats.long_lines, stats.bad_lines) == (2, 1, 0)


def test_clean_text_says_nothing(tmp_path, capsys):
    path = tmp_path / "clean.txt"
    path.write_text("one\ntwo\n")
    tasks.register_text_files_task("user_clean", str(path))
    assert "moetx: warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------- empty data, early
def _function_task(name, lines):
    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices(tf.constant(lines, tf.string))

    source = seqio.FunctionDataSource(dataset_fn, splits=["train"])
    return pretraining.add_lm_task(name, source, vocab.lazy_default_vocabulary())


@pytest.mark.parametrize("lines, split, expected", [
    ([], "train", "The 'train' split of task 'user_no_lines' is empty"),
    (["   ", "\t", ""], "train", "Every example of the 'train' split of task 'user_blank' is "
                                "filtered out by its preprocessors"),
    (["text"], "validation", "Task 'user_no_validation' has no split 'validation'; it has "
                             "['train']"),
], ids=["empty", "all_filtered", "no_such_split"])
def test_check_not_empty(lines, split, expected, request):
    name = {"empty": "user_no_lines", "all_filtered": "user_blank",
            "no_such_split": "user_no_validation"}[request.node.callspec.id]
    _function_task(name, lines)
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        data.check_not_empty(data.DatasetConfig(name, {"targets": 16}, split=split))


def test_check_not_empty_passes_data_with_examples():
    _function_task("user_some_lines", ["", "some text"])
    data.check_not_empty(data.DatasetConfig("user_some_lines", {"targets": 16}))


def test_check_not_empty_without_the_preprocessors_reads_only_the_source():
    _function_task("user_only_blank", [" "])
    data.check_not_empty(data.DatasetConfig("user_only_blank", {"targets": 16}),
                         preprocessed=False)
    _function_task("user_nothing", [])
    with pytest.raises(ValueError, match="split of task 'user_nothing' is empty"):
        data.check_not_empty(data.DatasetConfig("user_nothing", {"targets": 16}),
                             preprocessed=False)


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("binding, expected", [
    ("--gin.LOG_EVERY=0", "train.log_every (LOG_EVERY) must be at least 1, got 0"),
    ("--gin.SAVE_EVERY=0", "train.save_every (SAVE_EVERY) must be at least 1, got 0"),
    ("--gin.KEEP_CHECKPOINTS=0", "train.keep_checkpoints (KEEP_CHECKPOINTS) must be at least 1"),
    ("--gin.EVAL_STEPS=0", "train.eval_steps (EVAL_STEPS) must be at least 1, got 0"),
    ("--gin.train.eval_every=-1", "train.eval_every (EVAL_EVERY) must be at least 0, got -1"),
    ("--gin.train.num_microbatches=0", "train.num_microbatches (NUM_MICROBATCHES) must be at "
                                       "least 1"),
    # Errors of the mesh / batch / optimizer, found while building the trainer.
    ("--gin.BATCH_SIZE=6", "not divisible by the 8 data-parallel shards"),
])
def test_run_settings_out_of_range_are_one_line_and_write_nothing(tmp_path, capsys, binding,
                                                                  expected):
    code, err, model_dir = _run(tmp_path, capsys, binding)
    assert code == 2 and expected in _error_line(err), err[-2000:]
    assert _nothing_written(model_dir)


@pytest.mark.usefixtures("clean_gin")
def test_a_train_split_whose_examples_are_all_filtered_out_stops_before_the_first_step(
        tmp_path, capsys):
    def dataset_fn(split, shuffle_files, seed=None):
        lines = [" ", "\t"] if split == "train" else ["Some text to evaluate on."]
        return tf.data.Dataset.from_tensor_slices(tf.constant(lines, tf.string))

    source = seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])
    pretraining.add_lm_task("user_filtered_train", source, vocab.lazy_default_vocabulary())
    code, err, model_dir = _run(tmp_path, capsys,
                                "--gin.MIXTURE_OR_TASK_NAME='user_filtered_train'")
    assert code == 2 and "Every example of the 'train' split of task 'user_filtered_train' is " \
                         "filtered out" in _error_line(err), err[-2000:]
    assert "[train] step" not in err and not list(model_dir.glob("checkpoint_*"))
    assert not (model_dir / ".moetx_run.lock").exists()


@pytest.mark.usefixtures("clean_gin")
def test_none_leaves_a_setting_unset_for_commands_that_do_not_use_it():
    """An eval-only gin file sets `MODEL_DIR = None` (read by `train`, which eval never calls):
    not a type error."""
    import gin

    from moetx.cli import flags
    from moetx.trainer import train  # noqa: F401  (registers `train`)

    gin.parse_config("MODEL_DIR = None\ntrain.model_dir = %MODEL_DIR\ntrain.log_every = '10'")
    with pytest.raises(flags.UserError, match="log_every takes an int, not a string"):
        flags.check_binding_types()
    gin.clear_config(clear_constants=False)
    gin.parse_config("MODEL_DIR = None\ntrain.model_dir = %MODEL_DIR")
    flags.check_binding_types()
