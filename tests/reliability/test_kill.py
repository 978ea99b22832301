"""Runs killed (SIGKILL) or preempted (SIGTERM) at various points resume with exactly the loss
curve of an uninterrupted run."""

import random
import re
import signal
import subprocess
import sys
import time

import pytest

from moetx.trainer import checkpoints
from tests.conftest import REPO_ROOT, one_device_env, train_losses

STEPS = 12


def _train_args(model_dir, steps, *extra):
    return ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", f"--gin.TRAIN_STEPS={steps}",
            "--gin.BATCH_SIZE=8", "--gin.EVAL_STEPS=2", "--gin.LOG_EVERY=1", *extra]


def _cli(args):
    return subprocess.run([sys.executable, "-m", "moetx.cli.train", *args], cwd=REPO_ROOT,
                          env=one_device_env(), capture_output=True, text=True, timeout=600)


def _start(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "moetx.cli.train", *args], cwd=REPO_ROOT,
                            env=one_device_env(), **kwargs)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """{step: loss} of an uninterrupted 12-step run."""
    ref = _cli(_train_args(tmp_path_factory.mktemp("ref") / "ref", STEPS, "--gin.SAVE_EVERY=4"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    losses = train_losses(ref.stderr)
    assert len(losses) == STEPS
    return losses


def _finish_and_compare(md, reference_losses, after: int | None = None):
    """Runs the same command to the end; its losses must be the reference's."""
    restart = _cli(_train_args(md, STEPS, "--gin.SAVE_EVERY=2"))
    assert restart.returncode == 0, restart.stderr[-3000:]
    resumed = train_losses(restart.stderr)
    assert resumed and max(resumed) == STEPS
    if after is not None:
        assert min(resumed) == after + 1, (min(resumed), after)
    for step, loss in resumed.items():
        assert loss == reference_losses[step], (step, loss, reference_losses[step])
    assert not (md / ".moetx_run.lock").exists()
    return restart.stderr


@pytest.mark.slow  # `make test` covers a kill and exact resume in test_multiprocess_faults
def test_killed_during_a_checkpoint_write_resumes_exactly(tmp_path, reference_losses):
    """SIGKILL while checkpoint_4 is being written: it is left as Orbax's temporary directory,
    the next run resumes from checkpoint_2 (taking over the dead run's lock)."""
    md = tmp_path / "killed"
    proc = _start(_train_args(md, 100000, "--gin.SAVE_EVERY=2"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(md.glob("checkpoint_4.orbax-checkpoint-tmp*")):
        assert proc.poll() is None and time.time() < deadline, "training died early"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(int(p.name.split("_")[1]) for p in md.glob("checkpoint_*")
                      if "." not in p.name)
    assert complete and max(complete) in (2, 4), complete
    err = _finish_and_compare(md, reference_losses, after=max(complete))
    assert "taking over the stale lock" in err


def test_sigterm_saves_the_step_in_progress_and_the_run_resumes_exactly(tmp_path,
                                                                       reference_losses):
    """A preemption notice (SIGTERM) mid-run: the trainer finishes its step, saves it (no
    periodic save is due), exits with status 75, and the same command continues the curve."""
    md = tmp_path / "preempted"
    proc = _start(_train_args(md, 100000, "--gin.SAVE_EVERY=100000"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"\[train\] step [2-9]/", line):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[1]
    err = "".join(seen) + rest
    assert proc.returncode == 75, err[-3000:]
    saved = sorted(p.name for p in md.glob("checkpoint_*"))
    assert len(saved) == 1, saved
    stopped = int(saved[0].split("_")[1])
    assert 2 <= stopped < STEPS and f"after step {stopped}" in err, err[-2000:]
    assert checkpoints.verify(str(md), stopped) is None
    assert not (md / ".moetx_run.lock").exists()
    _finish_and_compare(md, reference_losses, after=stopped)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_kills_during_compile_steps_eval_and_saves_resume_exactly(tmp_path, seed,
                                                                         reference_losses):
    """SIGKILLs at random moments of a run that evaluates every 4 steps and saves every 2 (so
    the kills land in compilation, steps, evaluation and checkpoint writes), then the run to
    the end: every step any of the runs logged has the uninterrupted run's loss."""
    rng = random.Random(seed)
    md = tmp_path / "killed"
    args = _train_args(md, STEPS, "--gin.SAVE_EVERY=2", "--gin.train.eval_every=4")
    killed = 0
    logged = []
    for _ in range(3):
        proc = _start(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            err = proc.communicate(timeout=rng.uniform(5.0, 30.0))[1]
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            err = proc.communicate()[1]
            killed += 1
        logged.append(train_losses(err))
    final = _cli(args)
    assert final.returncode == 0, final.stderr[-3000:]
    logged.append(train_losses(final.stderr))
    assert killed >= 1 and (md / f"checkpoint_{STEPS}").is_dir()
    for losses in logged:
        for step, loss in losses.items():
            assert loss == reference_losses[step], (step, loss, reference_losses[step])
