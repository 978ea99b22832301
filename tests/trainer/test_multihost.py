"""Two local processes with `jax.distributed` (gloo CPU collectives) train on one global mesh
and report the same losses as one process with the same global batch. (The train command as
two processes, with a joint checkpoint, preemption and a lost process, is tested in
tests/reliability/test_multiprocess_faults.py.)"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(port), "2", str(i), str(outs[i])],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    single = tmp_path / "single.json"
    r = subprocess.run([sys.executable, WORKER, "0", "1", "0", str(single)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p0, p1, ref = (json.loads(f.read_text()) for f in (*outs, single))
    assert p0["processes"] == 2 and p0["devices"] == 4 and ref["processes"] == 1
    assert p0["rows"] == [0, 4] and p1["rows"] == [4, 8]  # each process feeds half the batch
    assert p0["losses"] == p1["losses"]  # one global computation
    np.testing.assert_allclose(p0["losses"], ref["losses"], rtol=1e-5)
    assert p0["losses"][-1] < p0["losses"][0]
