"""How a run ends on news from outside: SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C), and,
on several processes, the loss of another process of the run.

While `PreemptionWatcher` is active (`train()` holds one for the run), the first SIGTERM or
SIGINT only sets a flag: the trainer finishes the step in progress, writes a checkpoint of it,
flushes its writers and raises `Preempted`; the command line turns that into exit status
`PREEMPTED_EXIT_CODE` (75, "temporary failure, run again"), and running the same command again
resumes from that checkpoint with the same curve. A second signal while that happens exits at
once with the same status, even when the main thread is blocked in a save or a collective (a
helper thread hears it through the signal wake-up file descriptor): a checkpoint being written
is left as a temporary directory, which the next run ignores, and the previous checkpoints are
untouched.

On several processes the decision is collective: every `check_every` steps the processes share
their flags (an all-gather over the hosts), and all of them stop after the same step if any of
them was signalled, so they write the same checkpoint.

When a process of a multi-process run dies, the others must not wait for it. `run_command` ends
a process whose command failed at once (skipping JAX's shutdown barrier, which would hold it
until the coordination service gives up on the dead one), so that its peers' next collective
fails too. A collective or coordination error (a peer's connection reset, its heartbeats
missing; `raising_peer_lost` turns it into `PeerLost`) is reported as one line and exit status
`PEER_LOST_EXIT_CODE` (69). A peer that dies
without closing its connections (a lost machine) is declared dead by JAX's coordination service
after `--heartbeat_timeout_seconds`, which then ends the others. Restarting all the processes
resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from typing import Any, Callable

import jax
import numpy as np

PREEMPTED_EXIT_CODE = 75
PEER_LOST_EXIT_CODE = 69
SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How a lost peer shows in the errors of gloo collectives and JAX's coordination service (the
# status codes in the upper case of their messages).
_PEER_LOST = re.compile(
    r"(?i:\bgloo\b|heartbeat|coordination ?service|barrier (?:has )?(?:failed|timed out))"
    r"|\b(?:UNAVAILABLE|DEADLINE_EXCEEDED):")


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint_{step} "
                         f"is saved: run the same command again to resume.")
        self.step = step
        self.signal_name = signal_name


class PreemptionWatcher:
    """Installs the handlers of `SIGNALS` for a `with` block (main thread only; elsewhere it
    watches nothing) and answers `should_stop(step)` (see the module docstring). The block may
    be entered again; a signal heard in an earlier one still counts."""

    def __init__(self, check_every: int = 10):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}.")
        self.check_every = check_every
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._wakeup: _SecondSignal | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            _exit_on_second(name)
        self.signal_name = name
        print(f"moetx: {name} received: finishing this step, saving a checkpoint, then exiting "
              f"(send it again to exit at once).", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._wakeup = _SecondSignal(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether the run stops after `step` (the same answer on every process)."""
        if jax.process_count() == 1:
            return self.signal_name is not None
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(
            np.asarray(self.signal_name is not None, np.int32))
        if np.asarray(flags).max() and self.signal_name is None:
            self.signal_name = "a signal on another process"
        return bool(np.asarray(flags).max())


def _exit_on_second(name: str) -> None:
    print(f"moetx: {name} again: exiting now (the checkpoint being written, if any, is left "
          f"incomplete and will be ignored).", file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT_CODE)


class _SecondSignal:
    """A daemon thread that reads the signal wake-up file descriptor and exits the process on a
    second watched signal. Python runs signal handlers in the main thread only, between
    bytecodes, so a main thread blocked in native code (a checkpoint barrier, a collective)
    would delay the second signal's handler; the wake-up byte arrives at once."""

    def __init__(self, watcher: PreemptionWatcher):
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        # Counted before the wake-up descriptor is set, so that no signal counts twice.
        self._heard = 1 if watcher.signal_name is not None else 0
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="moetx-second-signal",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        heard = self._heard
        watched = {int(s) for s in SIGNALS}
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            self._forward(data)
            for signum in data:
                if signum in watched:
                    heard += 1
                    if heard >= 2:
                        _exit_on_second(signal.Signals(signum).name)

    def _forward(self, data: bytes) -> None:
        """Passes the bytes on to the descriptor set before (an event loop's, say)."""
        if self._previous_fd >= 0:
            try:
                os.write(self._previous_fd, data)
            except OSError:
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)
        self._thread.join(timeout=5)
        os.close(self._read)


def multiprocess() -> bool:
    """Whether this process is one of a `jax.distributed` run."""
    return jax.distributed.is_initialized()


class PeerLost(RuntimeError):
    """Another process of this multi-process run is gone (a collective or coordination error
    said so)."""

    def __init__(self, why: str):
        super().__init__(
            f"process {jax.process_index()} lost contact with another process of this run, "
            f"which has probably died (see its log): {why}. Restart all the processes to "
            f"resume from the last checkpoint.")


def lost_peer(e: BaseException) -> str | None:
    """The first line of `e` (or of an error it came from) when it says that another process
    of the run is gone, else None. JAX raises these as several types (a collective's failure
    may come as a ValueError), so the text decides."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if _PEER_LOST.search(text):
            line = text.splitlines()[0]
            return line if len(line) <= 300 else line[:297] + "..."
        e = e.__cause__ or e.__context__
    return None


def raising_peer_lost(fn: Callable[[], Any]) -> Any:
    """`fn()`; in a multi-process run, an error of `fn` that says another process is gone is
    raised again as `PeerLost`, so that no handler of ordinary errors (a bad configuration, a
    ValueError) takes it for one."""
    try:
        return fn()
    except Exception as e:
        why = lost_peer(e) if multiprocess() else None
        if why is None:
            raise
        raise PeerLost(why) from e


def run_command(main: Callable[[], int]) -> int:
    """Runs `main` (a command returning its exit status). In a single process this is `main()`.
    In a multi-process run, a failure ends this process at once (see the module docstring): a
    lost peer (`PeerLost`) with one `moetx: error:` line and `PEER_LOST_EXIT_CODE`, another
    exception with its traceback and status 1, an error status as it is. Success and
    `PREEMPTED_EXIT_CODE` (every process stops after the same step) end normally."""
    try:
        code = main()
    except (Exception, KeyboardInterrupt) as e:
        if not multiprocess():
            raise
        code = _report(e)
    if multiprocess() and code not in (0, PREEMPTED_EXIT_CODE):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _report(e: BaseException) -> int:
    if not isinstance(e, PeerLost):
        why = lost_peer(e)
        if why is None:
            traceback.print_exception(e)
            return 1
        e = PeerLost(why)
    print(f"moetx: error: {e}", file=sys.stderr, flush=True)
    return PEER_LOST_EXIT_CODE
