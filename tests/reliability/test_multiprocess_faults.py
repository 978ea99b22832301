"""Two local processes of one run (the real train command, gloo collectives): a SIGTERM to one
of them stops both after the same step with one checkpoint written jointly (exit 75); when one
dies, the other ends at once with one line (exit 69), or, when it falls silent, within
--heartbeat_timeout_seconds; restarting both resumes exactly (the steps redone after the last
checkpoint have the losses the first pair logged for them)."""

import re
import signal

import pytest

from moetx.trainer import checkpoints, preemption
from tests.conftest import train_losses
from tests.reliability.train_processes import start_pair, stop_all, train_args, wait_all

LONG = 100000  # a run that only a signal or a fault ends
LOST_LINE = "lost contact with another process of this run"


def _checkpoint_steps(model_dir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in model_dir.glob("checkpoint_*")
                  if re.fullmatch(r"checkpoint_\d+", p.name))


def _step_at_least(n: int) -> str:
    """A pattern for a progress line of step n or later (up to 10n)."""
    return r"\[train\] step (" + "|".join(str(k) for k in range(n, 10 * n)) + r")/"


def test_two_processes_stop_together_end_together_and_resume_exactly(tmp_path):
    """One run of two processes, three times:
    1. SIGTERM to process 1 only: the flags shared every step make process 0 stop after the
       same step, both write checkpoint_<step> together and exit 75;
    2. the restarted pair continues from that very step; SIGKILL to process 1 mid-run: process
       0's next collective fails and it exits 69 with one line, within seconds (not after the
       coordination service's timeout, and without a traceback);
    3. the restarted pair resumes from the last checkpoint and recomputes the steps the killed
       pair had done after it with exactly the same losses."""
    md = tmp_path / "run"
    procs = start_pair(train_args(md, LONG, 4))
    try:
        procs[0].wait_for(r"\[train\] step [2-9]/")
        procs[1].send(signal.SIGTERM)
        codes = wait_all(procs)
    finally:
        stop_all(procs)
    log0, log1 = procs[0].log, procs[1].log
    assert codes == [preemption.PREEMPTED_EXIT_CODE] * 2, (log0[-2000:], log1[-2000:])
    assert "mesh {'data': 2, 'expert': 1, 'model': 1}; 2 process(es), 2 device(s)" in log0
    assert "[train] step" not in log1  # process 0 reports for the run
    assert "moetx: SIGTERM received" in log1 and "SIGTERM" not in log0
    stopped = int(re.search(r"stopped by a signal on another process after step (\d+)",
                            log0).group(1))
    assert max(train_losses(log0)) == stopped  # process 0 ran no step past it
    assert _checkpoint_steps(md)[-1] == stopped
    assert checkpoints.verify(md, stopped) is None
    assert not (md / ".moetx_run.lock").exists()

    next_save = (stopped // 4 + 1) * 4
    procs = start_pair(train_args(md, LONG, 4))
    try:
        procs[0].wait_for(_step_at_least(next_save + 2))
        killed_at = procs[1].send(signal.SIGKILL)
        code = procs[0].wait(timeout=60)
    finally:
        stop_all(procs)
    log = procs[0].log
    assert f"Restored checkpoint_{stopped} from" in log, log[-3000:]
    assert code == preemption.PEER_LOST_EXIT_CODE, log[-3000:]
    assert procs[0].exited_at - killed_at < 15, procs[0].exited_at - killed_at
    assert [line for line in log.splitlines() if LOST_LINE in line][0].startswith(
        "moetx: error: process 0 " + LOST_LINE)
    assert "Traceback" not in log, log[-3000:]
    assert not (md / ".moetx_run.lock").exists()
    before_kill = train_losses(log)
    assert min(before_kill) == stopped + 1
    saved = _checkpoint_steps(md)
    assert all(checkpoints.verify(md, s) is None for s in saved)
    last = saved[-1]
    assert next_save <= last < max(before_kill), (saved, max(before_kill))

    end = max(before_kill)
    procs = start_pair(train_args(md, end))
    try:
        codes = wait_all(procs)
    finally:
        stop_all(procs)
    assert codes == [0, 0], procs[0].log[-3000:]
    assert f"Restored checkpoint_{last} from" in procs[0].log
    redone = train_losses(procs[0].log)
    assert sorted(redone) == list(range(last + 1, end + 1))
    for step, loss in redone.items():
        assert loss == before_kill[step], (step, loss, before_kill[step])


@pytest.mark.slow
def test_a_silent_process_ends_the_other_within_the_heartbeat_timeout(tmp_path):
    """SIGSTOP to process 1 (a lost machine: no connection is closed): process 0 waits in its
    collective until the coordination service declares process 1 dead after
    --heartbeat_timeout_seconds, which ends process 0 with a message (status SIGABRT)."""
    timeout = 10
    procs = start_pair(train_args(tmp_path / "run", LONG),
                       f"--heartbeat_timeout_seconds={timeout}")
    try:
        procs[0].wait_for(r"\[train\] step [3-9]/")
        stopped_at = procs[1].send(signal.SIGSTOP)
        code = procs[0].wait(timeout=120)
        waited = procs[0].exited_at - stopped_at
    finally:
        stop_all(procs)
    log = procs[0].log
    assert code != 0, log[-3000:]
    assert timeout / 2 <= waited < timeout + 30, waited
    assert "another task died" in log or LOST_LINE in log, log[-3000:]


GLOO_RESET = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
              "Read error [127.0.0.1]:61587: Connection reset by peer\n  In call to "
              "configurable 'train'")
SILENT = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1")


@pytest.mark.parametrize("error", [RuntimeError(GLOO_RESET), ValueError(GLOO_RESET),
                                   RuntimeError(SILENT)])
def test_collective_and_coordination_errors_say_a_peer_is_lost(error):
    assert preemption.lost_peer(error) == str(error).splitlines()[0]
    wrapped = ValueError("Could not restore checkpoint_4")
    wrapped.__cause__ = error
    assert preemption.lost_peer(wrapped) == str(error).splitlines()[0]


@pytest.mark.parametrize("error", [ValueError("TRAIN_STEPS must be positive, got 0."),
                                   FloatingPointError("The loss is not finite at step 3"),
                                   RuntimeError("RESOURCE_EXHAUSTED: Out of memory"),
                                   OSError("Connection refused: the registry is unavailable")])
def test_ordinary_errors_are_not_a_lost_peer(error):
    assert preemption.lost_peer(error) is None


class _Exited(Exception):
    pass


@pytest.fixture
def as_process_of_two(monkeypatch):
    """`preemption` behaving as in a multi-process run, with `os._exit` recorded."""
    monkeypatch.setattr(preemption, "multiprocess", lambda: True)

    def exit_now(code):
        raise _Exited(code)

    monkeypatch.setattr(preemption.os, "_exit", exit_now)


def _fails(error):
    """A command whose run raises `error`."""
    def run():
        raise error
    return lambda: preemption.raising_peer_lost(run)


def test_a_lost_peer_ends_a_process_of_several_at_once_with_one_line(as_process_of_two,
                                                                    capsys):
    with pytest.raises(_Exited) as exited:
        preemption.run_command(_fails(ValueError(GLOO_RESET)))
    assert exited.value.args == (preemption.PEER_LOST_EXIT_CODE,)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("moetx: error: process 0 " + LOST_LINE)
    assert "Restart all the processes" in err[0]


def test_other_failures_of_a_process_of_several_end_it_at_once(as_process_of_two, capsys):
    with pytest.raises(_Exited) as exited:
        preemption.run_command(_fails(KeyError("a bug")))
    assert exited.value.args == (1,) and "Traceback" in capsys.readouterr().err
    with pytest.raises(_Exited) as exited:
        preemption.run_command(lambda: 2)  # a configuration error, already reported
    assert exited.value.args == (2,)
    for code in (0, preemption.PREEMPTED_EXIT_CODE):  # all processes end together
        assert preemption.run_command(lambda: code) == code


def test_a_single_process_is_left_alone():
    with pytest.raises(ValueError, match="Gloo"):
        preemption.run_command(_fails(ValueError(GLOO_RESET)))
    assert preemption.run_command(lambda: 2) == 2