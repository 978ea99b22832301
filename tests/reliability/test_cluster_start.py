"""Multi-process start-up flags: --multiprocess alone leaves the address, the process count
and the index to JAX's cluster auto-detection; with no cluster around, that is one clear error
line; the explicit --coordinator_address path passes its three values; the heartbeat timeout
reaches `jax.distributed.initialize`."""

import os
import subprocess
import sys

import jax
import pytest

from moetx.cli import flags
from tests.conftest import REPO_ROOT


@pytest.fixture
def initialize_calls(monkeypatch):
    """Records `jax.distributed.initialize` calls (and the collectives chosen) instead of
    starting anything."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    return calls, updates


def test_multiprocess_alone_uses_jax_cluster_auto_detection(initialize_calls, monkeypatch):
    for name in ("MOETX_COORDINATOR_ADDRESS", "MOETX_PROCESS_COUNT", "MOETX_PROCESS_INDEX",
                 "MOETX_HEARTBEAT_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    calls, updates = initialize_calls
    flags.maybe_initialize_distributed(flags.parse_flags(["--multiprocess"]))
    assert calls == [{"heartbeat_timeout_seconds": flags.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS}]
    assert updates == [("jax_cpu_collectives_implementation", "gloo")]


def test_explicit_coordinator_and_heartbeat_timeout(initialize_calls):
    calls, _ = initialize_calls
    flags.maybe_initialize_distributed(flags.parse_flags([
        "--coordinator_address=10.0.0.1:1234", "--process_count=4", "--process_index=3",
        "--heartbeat_timeout_seconds=15"]))
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                      "process_id": 3, "heartbeat_timeout_seconds": 15}]


def test_no_multiprocess_flags_start_nothing(initialize_calls):
    calls, updates = initialize_calls
    flags.maybe_initialize_distributed(flags.parse_flags([]))
    assert calls == [] and updates == []


@pytest.mark.parametrize("argv, message", [
    (["--coordinator_address=127.0.0.1:1234"], "need --process_count and --process_index"),
    (["--multiprocess", "--heartbeat_timeout_seconds=0"], "--heartbeat_timeout_seconds must be"),
])
def test_incomplete_multiprocess_flags_are_refused(initialize_calls, argv, message):
    with pytest.raises(flags.UserError, match=message):
        flags.maybe_initialize_distributed(flags.parse_flags(argv))
    assert initialize_calls[0] == []


def test_auto_detection_without_a_cluster_is_one_error_line(tmp_path):
    """The real command with --multiprocess on a machine that is no cluster: one `moetx:
    error:` line (exit 2) saying what to pass instead, no traceback."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "MOETX_",
                                "KUBERNETES_", "TPU_", "XLA_FLAGS"))}
    r = subprocess.run([sys.executable, "-m", "moetx.cli.train", "--multiprocess",
                        "--gin_file=models/decoder_tiny.gin"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("moetx: error:")]
    assert len(errors) == 1 and "cluster auto-detection" in errors[0], r.stderr[-3000:]
    assert "--coordinator_address" in errors[0] and "Traceback" not in r.stderr
