"""A second SIGTERM while the preemption checkpoint is being written exits at once (status 75),
even when the main thread is held in a wait the signal does not interrupt; the previous
checkpoint stays intact, the partial one is ignored, and the next run resumes from the previous
one on the same curve. The watcher alone: a first signal waits for the main thread, a second
one does not."""

import re
import signal
import sys
import time

from moetx.trainer import checkpoints, preemption
from tests.conftest import train_losses
from tests.reliability.train_processes import Process, start_train, stop_all, train_args

# Runs the train command with every checkpoint save after the first one held mid-write: the
# Orbax item writer announces itself in the file named by argv[1], blocks SIGTERM in the main
# thread (as a native wait that retries on signals would) and sleeps there.
SLOW_SAVE = """
import signal, sys, time
import orbax.checkpoint as ocp
from moetx.cli import train

marker = sys.argv.pop(1)
calls = []
real_save = ocp.JsonCheckpointHandler.async_save

async def held_save(self, directory, *args, **kwargs):
    calls.append(str(directory))
    if len(calls) > 1:
        with open(marker, "w") as f:
            f.write(str(directory))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        time.sleep(600)
    return await real_save(self, directory, *args, **kwargs)

ocp.JsonCheckpointHandler.async_save = held_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_second_sigterm_during_the_save_exits_at_once_and_keeps_the_previous_checkpoint(
        tmp_path):
    md = tmp_path / "run"
    marker = tmp_path / "saving"
    proc = start_train([str(marker), *train_args(md, 100000, 2)], wrapper=SLOW_SAVE)
    try:
        proc.wait_for(r"\[train\] step [3-9]/")
        assert checkpoints.verify(md, 2) is None and (md / "checkpoint_2").is_dir()
        proc.send(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.log[-3000:]
            time.sleep(0.02)
        held = int(re.search(r"checkpoint_(\d+)\.", marker.read_text()).group(1))
        time.sleep(0.5)
        second = proc.send(signal.SIGTERM)
        code = proc.wait(timeout=60)
        waited = proc.exited_at - second
    finally:
        stop_all([proc])
    log = proc.log
    assert code == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
    assert waited < 10, waited
    assert "moetx: SIGTERM received" in log and "moetx: SIGTERM again: exiting now" in log
    assert held >= 3 and max(train_losses(log)) == held
    assert checkpoints.check_all(md) == [("checkpoint_2", "intact")]
    assert checkpoints.latest_step(md) == 2
    assert list(md.glob(f"checkpoint_{held}.orbax-checkpoint-tmp*"))  # left incomplete

    steps = held + 2
    restart = start_train(train_args(md, steps))
    try:
        assert restart.wait(timeout=300) == 0, restart.log[-3000:]
    finally:
        stop_all([restart])
    assert "Restored checkpoint_2 from" in restart.log, restart.log[-3000:]
    assert "taking over the stale lock" in restart.log  # the exited run could not release it
    first, resumed = train_losses(log), train_losses(restart.log)
    assert sorted(resumed) == list(range(3, steps + 1))
    for step in range(3, held + 1):
        assert resumed[step] == first[step], (step, resumed[step], first[step])
    assert checkpoints.check_all(md)[0] == (f"checkpoint_{steps}", "intact")


# A process that holds a PreemptionWatcher while its main thread sleeps with SIGTERM blocked
# (only another thread can take the signal, and the Python handler cannot run until the sleep
# ends); it prints "ready" once watching.
BLOCKED_MAIN = """
import signal, sys, time
from moetx.trainer import preemption

with preemption.PreemptionWatcher() as watcher:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))
print("slept", watcher.signal_name, flush=True)
"""


def _blocked_main(seconds: float) -> Process:
    proc = Process([sys.executable, "-c", BLOCKED_MAIN, str(seconds)])
    proc.wait_for(r"ready", timeout=120)
    return proc


def test_second_signal_reaches_a_main_thread_stuck_in_native_code():
    proc = _blocked_main(600)
    try:
        proc.send(signal.SIGTERM)
        time.sleep(1)
        assert proc.proc.poll() is None  # the first signal only asks for a clean stop
        second = proc.send(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        stop_all([proc])
    assert code == preemption.PREEMPTED_EXIT_CODE, proc.log
    assert proc.exited_at - second < 5
    assert "SIGTERM again: exiting now" in proc.log


def test_one_signal_is_handled_when_the_main_thread_is_back():
    proc = _blocked_main(3)
    try:
        proc.send(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        stop_all([proc])
    assert code == 0, proc.log
    assert "SIGTERM received" in proc.log and "slept SIGTERM" in proc.log
