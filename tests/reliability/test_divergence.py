"""Divergence policies on a real run: a planted NaN batch stops the run ('stop'), is dropped and
counted ('skip'), or sends the run back to its last checkpoint with the following batches
skipped ('rewind'); the spike detector's rule; settings that make no sense are refused."""

import json

import numpy as np
import pytest

from moetx.trainer import data, divergence, train as train_lib

BASE = ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
        "--gin.TRAIN_STEPS=8", "--gin.LOG_EVERY=1", "--gin.EVAL_STEPS=1",
        "--gin.train.eval_every=0", "--gin.train.save_every=2"]
POISONED = 5  # the 5th batch read (step 5's, in a run that has not rewound)


class _Recorder(data.DataIterator):
    """The real data iterator, poisoning batch number POISONED (a NaN loss weight) and
    recording which batch numbers were read."""

    read: list[int] = []

    def __next__(self):
        batch = super().__next__()
        _Recorder.read.append(self.batches_consumed)
        if self.batches_consumed == POISONED:
            batch = dict(batch)
            batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
            batch["decoder_loss_weights"][0, 0] = np.nan
        return batch


@pytest.fixture
def poisoned_data(monkeypatch, clean_gin):
    _Recorder.read = []
    real = train_lib.make_batches

    def make_batches(trainer, cfg, batches_consumed, num_epochs):
        it, local_bs = real(trainer, cfg, batches_consumed, num_epochs)
        if num_epochs is None:  # the training data, not evaluation's
            it.__class__ = _Recorder
        return it, local_bs

    monkeypatch.setattr(train_lib, "make_batches", make_batches)
    return _Recorder


def _train(tmp_path, capsys, *extra):
    from moetx.cli import train as cli_train

    code = cli_train.main([*BASE, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *extra])
    return code, capsys.readouterr().err


def _batches_consumed(run_dir, step):
    path = run_dir / f"checkpoint_{step}" / "dataset" / "metadata"
    files = [p for p in (run_dir / f"checkpoint_{step}" / "dataset").rglob("*") if p.is_file()]
    for p in [path, *files]:
        try:
            return json.loads(p.read_text())["batches_consumed"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise AssertionError(f"no data position in checkpoint_{step}")


def test_stop_ends_the_run_at_the_planted_nan(tmp_path, capsys, poisoned_data):
    code, err = _train(tmp_path, capsys)
    assert code == 2
    assert "moetx: error: FloatingPointError: Loss became nan at step 5" in err
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*")) == \
        ["checkpoint_2", "checkpoint_4"]


def test_skip_drops_the_planted_update_and_counts_it(tmp_path, capsys, poisoned_data):
    code, err = _train(tmp_path, capsys, "--gin.train.divergence_policy='skip'")
    assert code == 0, err[-2000:]
    lines = {int(line.split()[2].split("/")[0]): line for line in err.splitlines()
             if line.startswith("[train] step")}
    assert "skipped" not in lines[4] and "| skipped 1 |" in lines[8], lines
    assert poisoned_data.read == list(range(1, 9))  # no batch skipped, one update dropped
    from moetx.trainer import checkpoints

    assert checkpoints.verify(str(tmp_path / "run"), 8) is None


def test_rewind_goes_back_to_the_last_checkpoint_and_skips_batches(tmp_path, capsys,
                                                                    poisoned_data):
    # Logging every 4th step, step 5's loss is seen while step 6 runs.
    code, err = _train(tmp_path, capsys, "--gin.train.divergence_policy='rewind'",
                       "--gin.train.rewind_skip_batches=2", "--gin.LOG_EVERY=4")
    assert code == 0, err[-3000:]
    warning = [line for line in err.splitlines() if "rewound to" in line]
    assert len(warning) == 1 and "step 5: the loss is nan" in warning[0]
    assert "rewound to checkpoint_4" in warning[0]
    # Batches 1-4, the poisoned 5th, the 6th (read while step 5 ran), then 7 and 8 skipped:
    # steps 5-8 train on batches 9-12.
    assert poisoned_data.read == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    run = tmp_path / "run"
    assert _batches_consumed(run, 8) == 12
    losses = [float(line.split("| loss ")[1].split()[0]) for line in err.splitlines()
              if line.startswith("[train] step 8/8")]
    assert losses and np.isfinite(losses[-1])


def test_rewind_without_a_checkpoint_before_the_bad_step_is_one_error(tmp_path, capsys,
                                                                      poisoned_data):
    code, err = _train(tmp_path, capsys, "--gin.train.divergence_policy='rewind'",
                       "--gin.train.save_every=100")
    assert code == 2
    assert "no checkpoint before it to rewind to" in err


def test_the_spike_detector_compares_with_the_running_mean():
    m = divergence.Monitor(spike_factor=2.0, spike_window=3)
    for step, loss in enumerate([5.0, 4.0, 3.0, 7.9], start=1):  # 7.9 < 2 * mean(5, 4, 3)
        m.observe(step, loss, 1.0)
    with pytest.raises(divergence.Diverged, match="spiked to 20") as e:
        m.observe(5, 20.0, 1.0)  # mean of (4, 3, 7.9) is 4.97
    assert e.value.step == 5
    m.forget_after(2)  # back to step 2: only 5.0 and 4.0 are remembered, the window is short
    m.observe(3, 50.0, 1.0)
    with pytest.raises(divergence.Diverged, match="gradient norm is inf"):
        m.observe(4, 1.0, float("inf"))
    with pytest.raises(divergence.Diverged, match="loss is nan"):
        divergence.Monitor().observe(1, float("nan"), 1.0)


@pytest.mark.parametrize("settings, message", [
    (("explode", None, 100, 0, 1), "must be one of stop, skip, rewind"),
    (("skip", 3.0, 100, 0, 1), "spike_factor needs"),
    (("stop", 0.5, 100, 0, 1), "spike_factor must be above 1"),
    (("rewind", None, 0, 0, 1), "spike_window must be >= 1"),
    (("rewind", None, 10, -1, 1), "rewind_skip_batches must be >= 0"),
    (("rewind", None, 10, 0, 0), "max_rewinds must be >= 1"),
])
def test_bad_divergence_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        divergence.check_policy(*settings)
