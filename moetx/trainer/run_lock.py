"""One writer per model directory: a lock file that a second trainer on the same MODEL_DIR
refuses to run beside.

`RunLock(model_dir)` creates `MODEL_DIR/.moetx_run.lock` atomically (`O_CREAT | O_EXCL`) with
the holder's host, pid, start time and command line, and removes it when released (a `with`
block, or `release()`). A trainer that finds the file refuses with one line naming the holder
(`RunInUseError`), unless the lock is stale:

- the holder is a process of this host that no longer exists (a run killed with SIGKILL, a
  machine that rebooted: its pid is gone), or
- the lock file has not been touched for `stale_after` seconds (a holder on another host that
  died without releasing it; the holder touches the file every `heartbeat_every` seconds while
  it trains, through `heartbeat()`), when `stale_after` is set.

A stale lock is taken over with a one-line warning on stderr. A lock held by this very process
(a previous run of the same Python process that did not release it) is taken over silently.
Only process 0 of a multi-process run takes the lock (the other processes write nothing of
their own to MODEL_DIR's root).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import gin

LOCK_NAME = ".moetx_run.lock"


class RunInUseError(ValueError):
    """MODEL_DIR is held by another live trainer."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_holder(model_dir: str) -> dict[str, Any] | None:
    """The lock's holder record ({'host', 'pid', 'start_time', 'argv'}), or None when unlocked.
    An unreadable lock file (e.g. cut short by a crash while it was written) reads as {}."""
    path = os.path.join(model_dir, LOCK_NAME)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock file"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                            time.gmtime(float(holder.get("start_time", 0.0))))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {started}"


@gin.configurable
class RunLock:
    """The lock of one model directory (see the module docstring).

    Attributes:
      model_dir: the run's model directory.
      stale_after: seconds without a heartbeat after which a lock held on another host is
        stale (None: a lock from another host is never taken over; remove the file by hand).
      heartbeat_every: how often (seconds) `heartbeat()` touches the lock file.
      enabled: False disables the lock (e.g. for a file system without atomic create).
    """

    def __init__(self, model_dir: str, stale_after: float | None = 3600.0,
                 heartbeat_every: float = 60.0, enabled: bool = True):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_NAME)
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.enabled = enabled
        self.held = False
        self._last_beat = 0.0

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the existing lock may be taken over, or None when its holder is live."""
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                return ""
            if not _pid_alive(pid):
                return f"its process {pid} no longer runs"
            return None
        if self.stale_after is not None:
            try:
                age = time.time() - os.path.getmtime(self.path)
            except FileNotFoundError:
                return "it was just released"
            if age > self.stale_after:
                return f"it has had no heartbeat for {age:.0f} s (stale_after={self.stale_after:g})"
        return None

    def acquire(self) -> "RunLock":
        if not self.enabled or self.held:
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                  "argv": list(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.model_dir)
                if holder is None:  # released in the meantime
                    continue
                reason = self._stale_reason(holder)
                if reason is None:
                    raise RunInUseError(
                        f"{self.model_dir} is in use by another trainer ({_describe(holder)}); "
                        f"one writer per MODEL_DIR. Wait for it, choose another MODEL_DIR, or "
                        f"delete {self.path} if that run is gone.") from None
                if reason:
                    print(f"moetx: warning: taking over the stale lock of {self.model_dir} "
                          f"({_describe(holder)}): {reason}.", file=sys.stderr, flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            self._last_beat = time.monotonic()
            return self
        raise RunInUseError(f"Could not take the lock {self.path}: other trainers keep "
                            f"creating it.")

    def heartbeat(self) -> None:
        """Touches the lock file (at most every `heartbeat_every` seconds)."""
        if self.held and time.monotonic() - self._last_beat >= self.heartbeat_every:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass
            self._last_beat = time.monotonic()

    def release(self) -> None:
        if not self.held:
            return
        holder = read_holder(self.model_dir)
        if holder and holder.get("pid") == os.getpid() \
                and holder.get("host") == socket.gethostname():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
