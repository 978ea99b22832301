"""Disk full and unwritable directories while saving: one line, the partial checkpoint removed,
the earlier ones intact; an early warning when the disk is short of space."""

import errno
import os
import subprocess
import types

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from moetx.trainer import checkpoints


def _state(n=1000):
    return {"step": jnp.asarray(0), "params": {"w": jnp.arange(n, dtype=jnp.float32)}}


def _fail_after_starting(monkeypatch, error):
    """Makes the next Orbax save create its temporary directory, then fail with `error`."""
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        os.makedirs(os.path.join(self.directory, f"checkpoint_{step}.orbax-checkpoint-tmp",
                                 "state"))
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    return real


@pytest.mark.parametrize("error, why", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']"),
     "the disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_a_failed_write_is_one_line_and_removes_the_partial_checkpoint(tmp_path, monkeypatch,
                                                                        error, why):
    ckpt = checkpoints.Checkpointer(str(tmp_path), 1, keep=None)
    ckpt.save(1, _state(), {"batches_consumed": 1})
    _fail_after_starting(monkeypatch, error)
    with pytest.raises(checkpoints.CheckpointWriteError) as e:
        ckpt.save(2, _state(), {"batches_consumed": 2})
    message = str(e.value)
    assert "\n" not in message and why in message
    assert "partial checkpoint was removed" in message and "checkpoint_1" in message
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1"]
    assert checkpoints.verify(str(tmp_path), 1) is None


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    ckpt = checkpoints.Checkpointer(str(tmp_path), 1)
    _fail_after_starting(monkeypatch, ValueError("a tree mismatch"))
    with pytest.raises(ValueError, match="a tree mismatch"):
        ckpt.save(1, _state(), {})


def test_short_of_space_warns_once_before_saving(tmp_path, monkeypatch, capsys):
    ckpt = checkpoints.Checkpointer(str(tmp_path), 1, keep=None)
    ckpt.save(1, _state(), {})
    assert "warning" not in capsys.readouterr().err
    size = checkpoints.checkpoint_size(str(tmp_path), 1)
    assert size > 4000  # the 1,000 float32 parameters at least
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda _: types.SimpleNamespace(free=size + size // 2))
    ckpt.save(2, _state(), {})
    ckpt.save(3, _state(), {})
    err = capsys.readouterr().err
    assert err.count("moetx: warning:") == 1 and "MiB free" in err and "last checkpoint" in err


@pytest.fixture
def small_filesystem(tmp_path):
    """A 5 MiB tmpfs (room for one tiny-model checkpoint, not two), where the test may mount
    one; skipped elsewhere (the injected errors above cover the logic)."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a small filesystem here")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_real_full_disk_stops_the_run_with_one_line(small_filesystem, capsys, clean_gin):
    from moetx.cli import train as cli_train

    run = small_filesystem / "run"
    code = cli_train.main([
        "--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR='{run}'", "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.TRAIN_STEPS=3",
        "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=1", "--gin.train.save_every=1",
        "--gin.train.eval_at_start=False"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("moetx: error:")]
    assert len(errors) == 1 and "Could not write checkpoint_2" in errors[0], err[-3000:]
    assert "the disk is full" in errors[0] and "checkpoint_1 (the newest before it) is intact" \
        in errors[0]
    assert "Traceback" not in err
    assert "moetx: warning:" in err and "MiB free" in err  # warned before the failing save
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_1"]
    assert checkpoints.verify(str(run), 1) is None
