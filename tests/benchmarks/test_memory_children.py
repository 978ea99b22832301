"""benchmarks/train_throughput.py's memory-child line: it records the child's losses, NaN
included (a child started from HF's own initialisation may diverge; its memory is still the
measurement), while the timed run's `check_finite` refuses a NaN."""

import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import train_throughput as tt  # noqa: E402


def timed(loss: float) -> tt.RoundRobin:
    return tt.RoundRobin(first={"hf_eager": 1.0}, times={"hf_eager": [0.5]}, load=None,
                         first_out={"hf_eager": 10.0}, last_out={"hf_eager": loss})


def test_child_line_records_a_nan_loss_and_the_peak():
    line = tt.memory_child_line("hf", "eager", 100.0, timed(float("nan")))
    assert math.isnan(line["final_losses"]["hf_eager"])
    assert line["steps_run"] == {"hf_eager": 2}
    assert line["peak_rss_mb"] > 0 and line["rss_over_baseline_mb"] == line["peak_rss_mb"] - 100
    with pytest.raises(FloatingPointError, match="hf_eager loss is nan"):
        tt.check_finite(timed(float("nan")))
    tt.check_finite(timed(2.5))


def test_cpu_load_counts_its_own_time_apart_from_other_work():
    with tt.CpuLoad() as load:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # this process busy on one core
            pass
    if load.cores is None:
        pytest.skip("the machine's CPU times cannot be read here (not Linux)")
    # One busy thread: up to one core of its own (less when the machine is shared), and with
    # the other work no more than the machine's cores.
    assert 0.05 < load.own_cores <= 1.05
    assert load.own_cores + load.cores <= 1.1 * os.cpu_count()
    assert 0.0 <= load.steal_cores <= load.cores + 1e-9


def test_cpu_load_counts_a_timed_child_process_apart_from_other_work():
    busy = "import time\nend = time.perf_counter() + 0.5\nwhile time.perf_counter() < end: pass"
    with tt.CpuLoad() as load:
        subprocess.run([sys.executable, "-c", busy], check=True)
    if load.cores is None:
        pytest.skip("the machine's CPU times cannot be read here (not Linux)")
    # One busy child process: up to one core, counted as the child's, not as other work.
    assert 0.3 < load.children_cores <= 1.05
    assert load.cores + load.children_cores + load.own_cores <= 1.1 * os.cpu_count()
