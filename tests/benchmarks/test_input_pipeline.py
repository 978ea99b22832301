"""benchmarks/input_pipeline.py: what it counts in a batch and reads from a run's log windows,
and the README tables it becomes."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import input_pipeline  # noqa: E402


def test_count_batch_counts_loss_tokens_and_filled_positions():
    batch = {"decoder_target_tokens": np.array([[5, 6, 1, 0], [7, 1, 8, 1]]),
             "decoder_loss_weights": np.array([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "encoder_input_tokens": np.array([[3, 1, 0, 0, 0, 0], [4, 4, 4, 1, 0, 0]])}
    got = input_pipeline.count_batch(batch)
    assert got == {"loss_tokens": 7.0, "decoder_filled": 7 / 8, "encoder_filled": 6 / 12}
    del batch["encoder_input_tokens"]
    assert "encoder_filled" not in input_pipeline.count_batch(batch)


def test_window_figures_drop_the_first_window(tmp_path):
    import tensorflow as tf

    # Windows of 10 steps: the first (compilation) slow, then 0.2 s and 0.3 s a step.
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step, rate, inputs, other in ((10, 0.5, 3.0, 0.9), (20, 5.0, 0.1, 0.1),
                                          (30, 1 / 0.3, 0.3, 0.3)):
            tf.summary.scalar("timing/steps_per_second", rate, step=step)
            tf.summary.scalar("timing/input_seconds", inputs, step=step)
            tf.summary.scalar("host/other_cpu_cores", other, step=step)
    got = input_pipeline.window_figures(str(tmp_path), 10)
    assert got["windows"] == 2
    assert got["seconds_per_step"] == pytest.approx(0.25)
    assert got["input_seconds_per_step"] == pytest.approx(0.02)
    assert got["other_cpu_cores"] == pytest.approx(0.2)


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        input_pipeline.parse_args(["--steps", "15", "--log_every", "10"])
    assert "twice --log_every" in capsys.readouterr().err
