"""benchmarks/remat.py runs end to end at a tiny shape: a JSON line per policy, the policies
computing the same first loss from the same state, XLA's memory plan in each line, and the
policy the CPU backend cannot run ('offload') reported as an error line, not a crash."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~35 s, mostly compilations in a fresh process; `make test-all` runs it
def test_remat_benchmark_runs_each_policy_at_a_tiny_shape():
    # One layer per stack and XLA's default flags: the compilations are most of its time.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "remat.py"), "--d_model", "32",
           "--d_ff", "64", "--layers", "1", "--heads", "2", "--head_dim", "16", "--vocab", "64",
           "--batch", "2", "--input_length", "16", "--target_length", "8", "--steps", "1",
           "--policies", "none,full,offload", "--no_xla_tuning"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(ROOT / "benchmarks"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {rec["policy"]: rec for rec in map(json.loads, proc.stdout.splitlines())}
    assert set(lines) == {"none", "full", "offload"}
    assert "error" in lines["offload"]  # no host-memory offload on the CPU backend
    losses = [lines[p]["loss_first_step"] for p in ("none", "full")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for p in ("none", "full"):
        rec = lines[p]
        assert rec["benchmark"] == "remat" and rec["step_s"] > 0
        assert rec["peak_bytes_estimate"] == (rec["argument_size_in_bytes"]
                                              + rec["output_size_in_bytes"]
                                              + rec["temp_size_in_bytes"]
                                              - rec["alias_size_in_bytes"])
        assert rec["alias_size_in_bytes"] > 0  # the state is donated
        assert rec["grad_temp_size_in_bytes"] >= 0
