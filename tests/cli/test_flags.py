"""The flags T5X users type are accepted with T5X's meanings: --tfds_data_dir and
--seqio_additional_cache_dirs reach SeqIO, --multiprocess_gpu starts jax.distributed like
--multiprocess, --alsologtostderr sends INFO logging to stderr, --gin_search_paths (repeatable,
comma-separated) finds files and includes without spurious 'Path not found' lines."""

import subprocess
import sys

import pytest

from moetx.cli import flags
from moetx.util import gin_files
from tests.conftest import REPO_ROOT


def test_t5x_flags_parse_with_their_meanings():
    args = flags.parse_flags([
        "--gin_file=a.gin", "--gin_search_paths=/x,/y", "--gin_search_paths=/z",
        "--tfds_data_dir=/data/tfds", "--seqio_additional_cache_dirs=/c1,/c2",
        "--seqio_additional_cache_dirs=/c3", "--multiprocess_gpu", "--alsologtostderr",
        "--coordinator_address=10.0.0.1:1234", "--process_count=2", "--process_index=1",
        "--gin.TRAIN_STEPS=3"])
    assert args.gin_file == ["a.gin"] and args.gin_search_paths == "/x,/y,/z"
    assert args.tfds_data_dir == "/data/tfds"
    assert args.seqio_additional_cache_dirs == ["/c1", "/c2", "/c3"]
    assert args.multiprocess and args.alsologtostderr
    assert (args.coordinator_address, args.process_count, args.process_index) == (
        "10.0.0.1:1234", 2, 1)
    assert args.gin_dot == [("TRAIN_STEPS", "3")]
    plain = flags.parse_flags([])
    assert not plain.multiprocess and plain.tfds_data_dir is None
    assert plain.seqio_additional_cache_dirs == [] and plain.gin_search_paths == ""


def test_an_unknown_flag_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        flags.parse_flags(["--no_such_flag=1"])
    assert e.value.code == 2 and "--no_such_flag" in capsys.readouterr().err


def test_multiprocess_gpu_starts_jax_distributed_like_multiprocess(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda name, value: None)
    flags.maybe_initialize_distributed(flags.parse_flags([
        "--multiprocess_gpu", "--coordinator_address=10.0.0.1:1234", "--process_count=4",
        "--process_index=3"]))
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                      "process_id": 3,
                      "heartbeat_timeout_seconds": flags.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS}]


def test_tfds_data_dir_and_seqio_cache_dirs_reach_seqio(monkeypatch):
    import seqio

    seen = {}
    monkeypatch.setattr(seqio, "set_tfds_data_dir_override",
                        lambda d: seen.setdefault("tfds", d))
    monkeypatch.setattr(seqio, "add_global_cache_dirs", lambda ds: seen.setdefault("cache", ds))
    flags.apply_t5x_flags(flags.parse_flags([
        "--tfds_data_dir=/data/tfds", "--seqio_additional_cache_dirs=/c1,/c2"]))
    assert seen == {"tfds": "/data/tfds", "cache": ["/c1", "/c2"]}
    seen.clear()
    flags.apply_t5x_flags(flags.parse_flags([]))
    assert seen == {}


def test_alsologtostderr_sends_info_logging_to_stderr():
    code = ("import logging, sys\n"
            "from moetx.cli import flags\n"
            "flags.apply_t5x_flags(flags.parse_flags(sys.argv[1:]))\n"
            "logging.getLogger('someone').info('an info line')\n")
    quiet = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    loud = subprocess.run([sys.executable, "-c", code, "--alsologtostderr"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-2000:]
    assert "an info line" not in quiet.stderr
    assert "an info line" in loud.stderr


def test_gin_search_paths_find_includes_without_spurious_errors(tmp_path):
    """A file and its include found through --gin_search_paths: gin's misses on the other
    paths are not reported as ERROR lines (parsed in a fresh process, where nothing else has
    touched logging), and a folder named like the include's directory in the working
    directory (a namespace package to Python, which crashed gin's package-resource check)
    is no error either."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "work" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "top.gin").write_text("include 'sub/inc.gin'\nA = 1\n")
    (tmp_path / "a" / "sub" / "inc.gin").write_text("B = 2\n")
    code = ("import sys, gin\n"
            "from moetx.util import gin_files\n"
            "gin_files.parse_files(['top.gin'], [], sys.argv[1].split(','))\n"
            "print(gin.query_parameter('%A'), gin.query_parameter('%B'))\n")
    r = subprocess.run([sys.executable, "-c", code, f"{tmp_path / 'a'},{tmp_path / 'b'}"],
                       cwd=tmp_path / "work", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "2"]
    assert "Path not found" not in r.stderr and "ERROR" not in r.stderr, r.stderr


def test_scan_macros_reads_text_only(tmp_path):
    (tmp_path / "x.gin").write_text(
        "import not_a_module_anywhere\nA = %gin.REQUIRED\nB = {'k': @f()}\nB = (1, 2)\n"
        "C = %A\nf.x = 3\n")
    macros = gin_files.scan_macros(["x.gin"], [str(tmp_path)])
    assert [(m.name, m.value, m.required) for m in macros] == [
        ("A", "REQUIRED", True), ("B", "(1, 2)", False), ("C", "%A", False)]
    assert "not_a_module_anywhere" not in sys.modules


@pytest.mark.usefixtures("clean_gin")
def test_t5x_flags_through_the_train_command(tmp_path, monkeypatch, capsys):
    """The train command with the flags T5X users type, run from a directory holding a `runs/`
    folder (as T5X users' do; gin took it for a package and crashed on `include 'runs/...'`):
    accepted, acted on, and a missing required binding is still one error line (exit 2)."""
    import seqio

    from moetx.cli import train as cli_train

    seen = {}
    monkeypatch.setattr(seqio, "set_tfds_data_dir_override",
                        lambda d: seen.setdefault("tfds", d))
    monkeypatch.setattr(seqio, "add_global_cache_dirs", lambda ds: seen.setdefault("cache", ds))
    (tmp_path / "gin").mkdir()
    (tmp_path / "gin" / "mine.gin").write_text("include 'runs/pretrain.gin'\nTRAIN_STEPS = 1\n")
    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))  # as `python -m` puts it first
    code = cli_train.main([
        "--gin_file=models/decoder_tiny.gin", "--gin_file=mine.gin",
        f"--gin_search_paths={tmp_path / 'gin'},.", f"--tfds_data_dir={tmp_path / 'tfds'}",
        f"--seqio_additional_cache_dirs={tmp_path / 'cache'}",
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
        "--gin.MIXTURE_OR_TASK_NAME='moetx_en_causal_lm'"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moetx: error:")]
    assert code == 2 and errors == [
        "moetx: error: missing required gin binding(s): MODEL_DIR (set them with "
        "--gin.MODEL_DIR=...)."], err[-3000:]
    assert seen == {"tfds": str(tmp_path / "tfds"), "cache": [str(tmp_path / "cache")]}
