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


def test_host_cpu_meter_takes_its_own_time_out_and_reports_the_hypervisors_steal(monkeypatch):
    # Two readings of the machine's CPU seconds, 2 s of wall time and 1.5 s of this process's
    # CPU apart: busy (all but idle and iowait) grew by 3.4 s, steal by 0.8 s.
    tick = 100  # clock ticks per second in the fake /proc/stat lines below
    lines = iter([
        # cpu  user nice system idle iowait irq softirq steal guest guest_nice
        "cpu  1000 0 200 5000 50 10 10 100 0 0\n",
        "cpu  1200 0 250 5030 60 10 20 180 0 0\n",
    ])
    clock = iter([10.0, 12.0])
    own = iter([4.0, 5.5])
    monkeypatch.setattr(metrics.os, "sysconf", lambda name: tick)
    monkeypatch.setattr("builtins.open", lambda *a, **k: __import__("io").StringIO(next(lines)))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics.time, "process_time", lambda: next(own))
    meter = metrics.HostCpuMeter()
    window = meter.window()
    # busy: (1200+250+10+20+180) - (1000+200+10+10+100) = 340 ticks; own 1.5 s of it.
    assert window["other_cpu_cores"] == pytest.approx((3.4 - 1.5) / 2.0)
    assert window["steal_cpu_cores"] == pytest.approx(0.8 / 2.0)
    assert window["own_cpu_cores"] == pytest.approx(1.5 / 2.0)


def test_host_cpu_meter_is_silent_where_proc_stat_cannot_be_read(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr("builtins.open", missing)
    assert metrics.read_cpu_times() is None
    assert metrics.HostCpuMeter().window() == {}
