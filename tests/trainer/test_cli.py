"""The train / eval / infer command lines: clear one-line errors that leave nothing half-done,
and end-to-end tiny runs (killed and preempted runs are in tests/reliability)."""

import json
import os
import subprocess
import sys

import pytest

from moetx.cli import flags as cli
from tests.conftest import REPO_ROOT, event_tags, one_device_env, train_losses

TINY = ["--gin_file=models/decoder_tiny.gin"]
TASK = ["--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}"]


def _train_args(model_dir, steps=4, *extra):
    return [*TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", *TASK,
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=2",
            "--gin.LOG_EVERY=1", *extra]


def _main_inprocess(module, args, capsys):
    """`moetx.cli.<module>.main(args)` in this process, with gin cleared before and after:
    the exit status and what it wrote to stderr."""
    import importlib

    import gin

    gin.clear_config(clear_constants=False)
    try:
        code = importlib.import_module(f"moetx.cli.{module}").main(args)
    finally:
        gin.clear_config(clear_constants=False)
    return code, capsys.readouterr().err


def _run_train_inprocess(argv, capsys):
    return _main_inprocess("train", argv, capsys)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("moetx: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.usefixtures("clean_gin")
class TestErrors:
    def test_missing_required_binding(self, tmp_path, capsys):
        argv = [a for a in _train_args(tmp_path / "m") if "MODEL_DIR" not in a]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 2
        assert "missing required gin binding(s): MODEL_DIR" in _error_line(err)

    def test_misspelled_macro_suggests_the_right_one(self, tmp_path, capsys):
        argv = _train_args(tmp_path / "m") + ["--gin.TRAIN_STEP=5"]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 2 and "Did you mean --gin.TRAIN_STEPS?" in _error_line(err)
        assert not (tmp_path / "m").exists()

    def test_unknown_configurable_parameter(self, tmp_path, capsys):
        argv = _train_args(tmp_path / "m") + ["--gin.train.no_such_arg=1"]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 2 and "no_such_arg" in _error_line(err)

    def test_missing_gin_file(self, tmp_path, capsys):
        code, err = _run_train_inprocess(["--gin_file=models/nope.gin"], capsys)
        assert code == 2 and "nope.gin" in _error_line(err)

    def test_unknown_task(self, tmp_path, capsys):
        argv = _train_args(tmp_path / "m") + ["--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal'"]
        code, err = _run_train_inprocess(argv, capsys)
        line = _error_line(err)
        assert code == 2 and "moetx_en_causal" in line and "moetx_en_causal_lm" in line
        assert not list((tmp_path / "m").glob("checkpoint_*"))

    def test_feature_lengths_too_short(self, tmp_path, capsys):
        argv = _train_args(tmp_path / "m") + ["--gin.TASK_FEATURE_LENGTHS={'targets': 1}"]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 2 and "too short" in _error_line(err)
        assert not (tmp_path / "m").exists()

    def test_model_dir_not_writable(self, tmp_path, capsys):
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        code, err = _run_train_inprocess(_train_args(blocker / "m"), capsys)
        assert code == 2 and "not writable" in _error_line(err)

    @pytest.mark.parametrize("binding, expected", [
        ("--gin.BATCH_SIZE=(8", "bad binding --gin.BATCH_SIZE=(8"),
        ("--gin.BATCH_SIZE='eight'", "BATCH_SIZE is a number in the rest of the configuration "
                                     "(8), this makes it a str"),
    ])
    def test_bad_gin_values_are_one_line(self, tmp_path, capsys, binding, expected):
        code, err = _run_train_inprocess([*_train_args(tmp_path / "m"), binding], capsys)
        assert code == 2 and expected in _error_line(err)
        assert not (tmp_path / "m").exists()

    def test_a_second_trainer_on_a_model_dir_in_use(self, tmp_path, capsys):
        """A live holder (here the parent process, as a duplicate launch would see the first
        trainer) makes the second trainer stop with one line naming it, writing nothing."""
        import socket

        md = tmp_path / "m"
        md.mkdir()
        lock = md / ".moetx_run.lock"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                    "start_time": 0.0, "argv": []}))
        code, err = _run_train_inprocess(_train_args(md), capsys)
        line = _error_line(err)
        assert code == 2 and "in use by another trainer" in line and f"pid {os.getppid()}" in line
        assert sorted(p.name for p in md.iterdir()) == [".moetx_run.lock"]

    @pytest.mark.parametrize("kind", ["empty", "missing"])
    def test_empty_or_missing_corpus_file(self, tmp_path, capsys, kind):
        path = tmp_path / "corpus.txt"
        if kind == "empty":
            path.write_text("\n\n")
        argv = _train_args(tmp_path / "m") + [
            "--gin.MIXTURE_OR_TASK_NAME=@text_files_task()",
            f"--gin.text_files_task.name='user_{kind}'",
            f"--gin.text_files_task.train_files='{path}'"]
        code, err = _run_train_inprocess(argv, capsys)
        line = _error_line(err)
        assert code == 2 and "corpus.txt" in line
        assert not list((tmp_path / "m").glob("checkpoint_*"))

    def test_prefix_lm_task_trains_an_encoder_decoder(self, tmp_path, capsys):
        argv = [a for a in _train_args(tmp_path / "m", 2) if "decoder_tiny" not in a
                and "TASK_FEATURE_LENGTHS" not in a and "MIXTURE" not in a] + [
            "--gin_file=models/t5_tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='moetx_en_prefix_lm'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 0, err[-2000:]
        assert (tmp_path / "m" / "checkpoint_2").is_dir()

    def test_user_text_files_train(self, tmp_path, capsys):
        path = tmp_path / "mine.txt"
        path.write_text("\n".join(f"Line number {i} of my own corpus, about ships and the sea."
                                  for i in range(200)))
        argv = _train_args(tmp_path / "m", 2) + [
            "--gin.MIXTURE_OR_TASK_NAME=@text_files_task()",
            "--gin.text_files_task.name='user_ok'",
            f"--gin.text_files_task.train_files='{path}'",
            f"--gin.text_files_task.validation_files='{path}'"]
        code, err = _run_train_inprocess(argv, capsys)
        assert code == 0, err[-2000:]
        assert (tmp_path / "m" / "checkpoint_2").is_dir()


def _cli(module, args, timeout=600):
    return subprocess.run([sys.executable, "-m", f"moetx.cli.{module}", *args], cwd=REPO_ROOT,
                          env=one_device_env(), capture_output=True, text=True, timeout=timeout)


def test_train_checkpoint_eval_infer_end_to_end(tmp_path, capsys):
    """The train command as a process of its own; eval and infer on its checkpoints in this
    one (their command lines' `main`; starting a process is what the train command shows)."""
    md = tmp_path / "run"
    r = _cli("train", _train_args(md, 6, "--gin.SAVE_EVERY=2", "--gin.KEEP_CHECKPOINTS=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in md.glob("checkpoint_*")) == ["checkpoint_4", "checkpoint_6"]
    tags = event_tags(md / "train")
    assert {"loss", "accuracy", "z_loss", "learning_rate", "timing/tokens_per_second", "mfu",
            "timing/steps_per_second", "timing/compilation_seconds"} <= tags, tags
    assert {"perplexity", "cross_ent_loss"} <= event_tags(md / "eval")
    assert "[eval] before training" in r.stderr and "[eval] after training" in r.stderr
    assert set(train_losses(r.stderr)) == set(range(1, 7))

    code, err = _main_inprocess("eval", [*TINY, "--gin_file=runs/eval.gin",
                                         f"--gin.CHECKPOINT_DIR='{md}'", *TASK,
                                         "--gin.EVAL_STEPS=2", "--gin.BATCH_SIZE=8"], capsys)
    assert code == 0, err[-3000:]
    res = json.loads((md / "eval_results.json").read_text())
    assert res["step"] == 6 and res["tokens"] > 0 and res["perplexity"] > 1

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king said\nIn the beginning\n")
    out = tmp_path / "out.jsonl"
    code, err = _main_inprocess("infer", [
        *TINY, "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_DIR='{md}'",
        f"--gin.PROMPTS_FILE='{prompts}'", f"--gin.OUTPUT_FILE='{out}'", "--gin.MAX_LENGTH=16",
        "--gin.TEMPERATURE=0.9", "--gin.TOPK=10"], capsys)
    assert code == 0, err[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == ["The king said", "In the beginning"]
    assert all(0 < len(x["output_ids"]) <= 16 for x in rows)

    code, err = _main_inprocess("infer", [
        *TINY, "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_DIR='{md}'",
        f"--gin.PROMPTS_FILE='{prompts}'", f"--gin.OUTPUT_FILE='{out}'", "--gin.MODE='score'"],
        capsys)
    assert code == 0, err[-3000:]
    scores = [json.loads(x)["score"] for x in out.read_text().splitlines()]
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_encoder_decoder_span_corruption_end_to_end(tmp_path, capsys):
    md = tmp_path / "t5"
    r = _cli("train", ["--gin_file=models/t5_tiny.gin", "--gin_file=runs/pretrain.gin",
                       f"--gin.MODEL_DIR='{md}'",
                       "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                       "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=1",
                       "--gin.LOG_EVERY=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(train_losses(r.stderr)) == {1, 2, 3} and (md / "checkpoint_3").is_dir()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"inputs": "The king <extra_id_0> said.",
                                   "targets": "<extra_id_0> of France"}) + "\n")
    common = ["--gin_file=models/t5_tiny.gin", "--gin_file=runs/infer.gin",
              f"--gin.CHECKPOINT_DIR='{md}'", f"--gin.PROMPTS_FILE='{prompts}'",
              "--gin.VOCABULARY_EXTRA_IDS=100", "--gin.MAX_LENGTH=8"]
    out = tmp_path / "pred.jsonl"
    code, err = _main_inprocess("infer", common + [f"--gin.OUTPUT_FILE='{out}'"], capsys)
    assert code == 0, err[-3000:]
    row = json.loads(out.read_text())
    assert row["prompt"] == "The king <extra_id_0> said." and len(row["output_ids"]) <= 8
    code, err = _main_inprocess("infer", common + [f"--gin.OUTPUT_FILE='{out}'",
                                                   "--gin.MODE='score'"], capsys)
    assert code == 0, err[-3000:]
    row = json.loads(out.read_text())
    assert row["targets"] == "<extra_id_0> of France" and row["score"] < 0
