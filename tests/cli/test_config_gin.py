"""`MODEL_DIR/config.gin`: a training run writes its gin configuration when it starts; it
parses back to the same bindings; a resumed run keeps an unchanged file and moves a different
earlier one to `config.gin.<n>`; a run refused by its configuration writes nothing; a
directory in use by another trainer is not touched."""

import json
import os
import socket

import gin
import pytest

from moetx.trainer import run_lock
from moetx.util import gin_files

ARGS = ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
        "--gin.train.eval_dataset_cfg=None", "--gin.train.eval_at_start=False"]


def _train(model_dir, steps, capsys, *extra):
    from moetx.cli import train as cli_train

    code = cli_train.main([*ARGS, f"--gin.MODEL_DIR='{model_dir}'",
                           f"--gin.TRAIN_STEPS={steps}", *extra])
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("clean_gin")
def test_written_at_start_parses_back_and_is_kept_or_rotated_on_resume(tmp_path, capsys):
    md = tmp_path / "run"
    code, err = _train(md, 1, capsys, "--gin.SEED=7")
    assert code == 0, err[-3000:]
    text = (md / "config.gin").read_text()
    assert "MODEL_DIR = " in text and "train.model_dir = %MODEL_DIR" in text

    # Round trip: the file alone (with the modules it imports) gives the run's configuration.
    gin.clear_config(clear_constants=False)
    gin.parse_config_file(str(md / "config.gin"))
    assert gin.config_str() == text
    assert gin.query_parameter("%MODEL_DIR") == str(md)
    assert gin.query_parameter("%TRAIN_STEPS") == 1 and gin.query_parameter("%SEED") == 7
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"targets": 32}
    assert gin.query_parameter("train.eval_at_start") is False
    assert gin.query_parameter("TransformerConfig.emb_dim") == 32
    gin.clear_config(clear_constants=False)

    # Resumed with the same configuration: the file is left alone.
    code, err = _train(md, 1, capsys, "--gin.SEED=7")
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in md.glob("config.gin*")) == ["config.gin"]
    assert (md / "config.gin").read_text() == text
    gin.clear_config(clear_constants=False)

    # Resumed with another configuration: the earlier file is kept as config.gin.1.
    code, err = _train(md, 1, capsys, "--gin.SEED=7", "--gin.LOG_EVERY=5")
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in md.glob("config.gin*")) == ["config.gin", "config.gin.1"]
    assert (md / "config.gin.1").read_text() == text
    assert "LOG_EVERY = 5" in (md / "config.gin").read_text()
    assert "config.gin.1" in err
    assert (md / "checkpoint_1").is_dir() and not (md / run_lock.LOCK_NAME).exists()


@pytest.mark.usefixtures("clean_gin")
def test_a_run_refused_before_it_starts_leaves_no_config_gin(tmp_path, capsys):
    md = tmp_path / "run"
    code, err = _train(md, 1, capsys, "--gin.MIXTURE_OR_TASK_NAME='no_such_task'")
    assert code == 2 and "no_such_task" in err
    assert not md.exists()


def test_config_gin_is_kept_when_unchanged_and_rotated_when_not(tmp_path):
    md = str(tmp_path)
    assert gin_files.write_config_gin(md, "A = 1\n") is None
    assert gin_files.write_config_gin(md, "A = 1\n") is None
    assert sorted(os.listdir(md)) == ["config.gin"]
    for n, text in ((1, "A = 2\n"), (2, "A = 3\n")):
        assert gin_files.write_config_gin(md, text) == os.path.join(md, f"config.gin.{n}")
    assert [(tmp_path / f).read_text() for f in ("config.gin.1", "config.gin.2", "config.gin")
            ] == ["A = 1\n", "A = 2\n", "A = 3\n"]


@pytest.mark.usefixtures("clean_gin")
def test_a_model_dir_in_use_by_another_trainer_is_not_touched(tmp_path, capsys):
    md = tmp_path / "run"
    md.mkdir()
    (md / "config.gin").write_text("A = 1\n")
    (md / run_lock.LOCK_NAME).write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getppid(), "start_time": 0.0, "argv": []}))
    code, err = _train(md, 1, capsys)
    assert code == 2 and "in use by another trainer" in err
    assert sorted(os.listdir(md)) == [run_lock.LOCK_NAME, "config.gin"]
    assert (md / "config.gin").read_text() == "A = 1\n"
