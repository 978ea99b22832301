"""Preemption: SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) ends a run cleanly.

While `PreemptionWatcher` is active (`train()` holds one for the run), the first SIGTERM or
SIGINT only sets a flag: the trainer finishes the step in progress, writes a checkpoint of it,
flushes its writers and raises `Preempted`; the command line turns that into exit status
`PREEMPTED_EXIT_CODE` (75, "temporary failure, run again"), and running the same command again
resumes from that checkpoint with the same curve. A second signal while that happens exits at
once with the same status: a checkpoint being written is left as a temporary directory, which
the next run ignores, and the previous checkpoints are untouched.

On several processes the decision is collective: every `check_every` steps the processes share
their flags (an all-gather over the hosts), and all of them stop after the same step if any of
them was signalled, so they write the same checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np

PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint_{step} "
                         f"is saved: run the same command again to resume.")
        self.step = step
        self.signal_name = signal_name


class PreemptionWatcher:
    """Installs the handlers of `SIGNALS` for a `with` block (main thread only; elsewhere it
    watches nothing) and answers `should_stop(step)` (see the module docstring)."""

    def __init__(self, check_every: int = 10):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}.")
        self.check_every = check_every
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            print(f"moetx: {name} again: exiting now (the checkpoint being written, if any, is "
                  f"left incomplete and will be ignored).", file=sys.stderr, flush=True)
            os._exit(PREEMPTED_EXIT_CODE)
        self.signal_name = name
        print(f"moetx: {name} received: finishing this step, saving a checkpoint, then exiting "
              f"(send it again to exit at once).", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
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
