"""One writer per MODEL_DIR: the run lock refuses a live holder, takes over a stale one, and
only ever removes its own lock."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from moetx.trainer import run_lock


def _write(model_dir, **record):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": 0.0, "argv": []}
    (model_dir / run_lock.LOCK_NAME).write_text(json.dumps({**base, **record}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    with run_lock.RunLock(str(tmp_path / "m")) as lock:
        holder = run_lock.read_holder(str(tmp_path / "m"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock.held
    assert run_lock.read_holder(str(tmp_path / "m")) is None


def test_a_live_holder_is_refused_with_its_name(tmp_path):
    _write(tmp_path, pid=os.getppid())
    with pytest.raises(run_lock.RunInUseError, match=f"pid {os.getppid()} on host"):
        run_lock.RunLock(str(tmp_path)).acquire()
    assert run_lock.read_holder(str(tmp_path))["pid"] == os.getppid()  # left as it was


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = _dead_pid()
    _write(tmp_path, pid=dead)
    lock = run_lock.RunLock(str(tmp_path)).acquire()
    assert f"process {dead} no longer runs" in capsys.readouterr().err
    assert run_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path, capsys):
    _write(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(run_lock.RunInUseError, match="'elsewhere'"):
        run_lock.RunLock(str(tmp_path), stale_after=60.0).acquire()
    old = time.time() - 120.0
    os.utime(tmp_path / run_lock.LOCK_NAME, (old, old))
    with pytest.raises(run_lock.RunInUseError):
        run_lock.RunLock(str(tmp_path), stale_after=None).acquire()
    run_lock.RunLock(str(tmp_path), stale_after=60.0).acquire().release()
    assert "no heartbeat for" in capsys.readouterr().err


def test_heartbeat_touches_the_lock_and_release_spares_another_holder(tmp_path):
    lock = run_lock.RunLock(str(tmp_path), heartbeat_every=0.0).acquire()
    path = tmp_path / run_lock.LOCK_NAME
    os.utime(path, (0.0, 0.0))
    lock.heartbeat()
    assert time.time() - os.path.getmtime(path) < 60.0
    _write(tmp_path, pid=os.getppid())  # someone else's lock now (e.g. taken over)
    lock.release()
    assert run_lock.read_holder(str(tmp_path))["pid"] == os.getppid()


def test_a_disabled_lock_writes_nothing(tmp_path):
    with run_lock.RunLock(str(tmp_path), enabled=False):
        assert run_lock.read_holder(str(tmp_path)) is None
