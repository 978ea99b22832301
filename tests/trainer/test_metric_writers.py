"""Metric writers chosen by gin: TensorBoard (default), JSON lines, CSV, or any callable."""

import csv
import json

import gin
import pytest

from moetx.trainer import metrics
from tests.conftest import event_tags


def _write(writer):
    writer.write_scalars(1, {"loss": 2.5, "accuracy": 0.25})
    writer.write_scalars(2, {"loss": 2.0})
    writer.close()


def test_jsonl_csv_and_tensorboard_together(tmp_path):
    _write(metrics.MetricWriter(str(tmp_path), 2, writers=("tensorboard", "jsonl", "csv")))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "accuracy": 0.25}, {"step": 2, "loss": 2.0}]
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.reader(f))
    assert table == [["step", "name", "value"], ["1", "loss", "2.5"], ["1", "accuracy", "0.25"],
                     ["2", "loss", "2.0"]]
    assert event_tags(tmp_path) == {"loss", "accuracy"}


def test_a_resumed_run_appends(tmp_path):
    _write(metrics.MetricWriter(str(tmp_path), 2, writers=("jsonl", "csv")))
    _write(metrics.MetricWriter(str(tmp_path), 2, writers=("jsonl", "csv")))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "metrics.csv").read_text().count("step,name,value") == 1


def test_any_callable_writer_and_the_default(tmp_path):
    seen = []

    class Recorder:
        def __init__(self, logdir):
            seen.append(("open", logdir))

        def write_scalars(self, step, scalars):
            seen.append((step, dict(scalars)))

        def flush(self):
            pass

        def close(self):
            seen.append("closed")

    _write(metrics.MetricWriter(str(tmp_path / "a"), 2, writers=(Recorder,)))
    assert seen == [("open", str(tmp_path / "a")), (1, {"loss": 2.5, "accuracy": 0.25}),
                    (2, {"loss": 2.0}), "closed"]
    _write(metrics.MetricWriter(str(tmp_path / "b"), 2))
    assert event_tags(tmp_path / "b") == {"loss", "accuracy"}
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.usefixtures("clean_gin")
def test_chosen_by_gin_and_unknown_names_refused(tmp_path):
    gin.parse_config("MetricWriter.writers = ['jsonl']")
    _write(metrics.MetricWriter(str(tmp_path), 2))
    assert (tmp_path / "metrics.jsonl").exists() and not list(tmp_path.glob("events.*"))
    with pytest.raises(ValueError, match="unknown writer 'wandb'; choose from csv, jsonl, "
                                         "tensorboard"):
        metrics.MetricWriter(str(tmp_path), 2, writers=("wandb",))
