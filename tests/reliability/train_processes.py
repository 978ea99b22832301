"""Test helpers: the real train command line as one or two local processes, with their stderr
read line by line as it comes (to signal or kill a process at a chosen step) and timed."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import REPO_ROOT, one_device_env

TRAIN = ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
         "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
         "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
         "--gin.LOG_EVERY=1", "--gin.train.eval_dataset_cfg=None",
         "--gin.train.preemption_check_every=1"]


def train_args(model_dir: Path, steps: int, save_every: int = 100000, *extra: str) -> list[str]:
    return [*TRAIN, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.SAVE_EVERY={save_every}", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**one_device_env(), "PYTHONUNBUFFERED": "1"}  # one CPU device, as a user's run has


class Process:
    """One running command with its stderr (and stdout) collected as lines with their times."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.exited_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
        self.proc.wait()
        self.exited_at = time.monotonic()

    @property
    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first match of `pattern` in the log, waiting for it (fails if the process ends
        or `timeout` passes first)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log)
            if m:
                return m
            assert self.exited_at is None, \
                f"exited ({self.proc.returncode}) before {pattern!r}:\n{self.log[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in time:\n{self.log[-3000:]}"
            time.sleep(0.02)

    def send(self, sig: signal.Signals) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code


def start_train(argv: list[str], wrapper: str | None = None) -> Process:
    """`python -m moetx.cli.train argv`, or `python -c wrapper argv` (a script that patches
    something, then runs the command)."""
    head = ["-c", wrapper] if wrapper else ["-m", "moetx.cli.train"]
    return Process([sys.executable, *head, *argv])


def start_pair(argv: list[str], *extra: str) -> list[Process]:
    """The train command as processes 0 and 1 of one run (a local coordinator)."""
    where = [f"--coordinator_address=127.0.0.1:{free_port()}", "--process_count=2", *extra]
    return [start_train([*argv, *where, f"--process_index={i}"]) for i in range(2)]


def wait_all(procs: list[Process], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]


def stop_all(procs: list[Process]) -> None:
    """Kills whatever is still running (a failed test must leave no process behind)."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
