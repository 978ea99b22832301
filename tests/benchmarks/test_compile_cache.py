"""benchmarks/compile_cache.py's training commands are ones the train command accepts: each
setup's flags parse through the CLI's own parser and gin checks (nothing is trained here; the
benchmark's runs take minutes)."""

import pathlib
import sys

import gin
import pytest

from moetx.cli import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import compile_cache  # noqa: E402


@pytest.mark.parametrize("setup", sorted(compile_cache.SETUPS))
def test_each_setup_is_a_command_the_trainer_accepts(setup, clean_gin, tmp_path):
    cmd = compile_cache.train_command(setup, str(tmp_path / "run"), steps=2)
    assert cmd[1:3] == ["-m", "moetx.cli.train"]
    args = flags.parse_flags(cmd[3:])
    flags.parse_gin(args, ["moetx.trainer.train"])
    gin_file, task, lengths, batch = compile_cache.SETUPS[setup]
    assert gin.query_parameter("%TRAIN_STEPS") == 2
    assert gin.query_parameter("%BATCH_SIZE") == batch
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == lengths
    assert gin.query_parameter("MetricWriter.writers") == ["jsonl"]
    assert gin.query_parameter("train.eval_at_start") is False
