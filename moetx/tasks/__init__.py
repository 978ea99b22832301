"""SeqIO tasks for moetx. Importing this package registers nothing: `register_all()` registers
every language task and mixture (the command lines call it through `moetx.cli.flags`; a program
using moetx as a library calls it before naming a task). Registration touches no network and no
file; the data is fetched beforehand by `python -m moetx.cli.data` (`moetx.datasets`).

Tasks registered by `register_default_tasks()` (objectives in `moetx.tasks.pretraining`):

- `moetx_en_causal_lm`, `moetx_en_prefix_lm` (decoder-only) and `moetx_en_span_corruption` (T5
  span corruption, for `seqio.EncDecFeatureConverter`; T5 feature lengths {'inputs': 512,
  'targets': 114}): the bundled offline English corpus (Shakespeare, the King James Bible, a
  Wikipedia sample; splits 'train' and 'validation') with the default 8k SentencePiece
  vocabulary (plus 100 sentinel ids for span corruption). The corpus and the vocabulary must
  first be built by `python -m moetx.cli.data`.
- `c4_causal_lm`, `c4_prefix_lm`, `c4_span_corruption`: TFDS `c4/en:3.0.1` (splits 'train',
  'validation'), for users who have prepared C4 in their TFDS data dir; same vocabularies.

FLAN instruction-tuning tasks and mixtures (`flan_*`) are registered by
`moetx.tasks.flan.register_flan_tasks()` and `register_flan_mixtures()`; `register_all()` calls
both.

Your own text files (one example per line) become a task with `register_text_files_task`, or
from gin with `MIXTURE_OR_TASK_NAME = @moetx.tasks.text_files_task()` and bindings such as
`moetx.tasks.text_files_task.name = 'my_lm'` and `...train_files = ['/data/train.txt']`.
Each line is read up to `max_line_bytes` (1 MiB; the rest of a longer line is skipped) and bytes
that are not UTF-8 become U+FFFD; registration says so once, with the counts, in a
`moetx: warning:` line, and refuses files with no UTF-8 line at all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

if "tensorflow" not in sys.modules:
    # Set before SeqIO pulls in TensorFlow, to silence its startup log noise (users' own
    # settings win).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import gin  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from moetx.datasets import corpora, paths, textfiles, vocab  # noqa: E402
# Gin knows the vocabulary as `moetx.tasks.get_vocabulary`; Python finds it under that name too.
from moetx.datasets.vocab import VocabularyError, get_vocabulary  # noqa: E402
from moetx.tasks import pretraining  # noqa: E402
from moetx.tasks.pretraining import OBJECTIVES  # noqa: E402

__all__ = [
    "BUNDLED_TASKS",
    "C4_TASKS",
    "C4_TFDS_NAME",
    "OBJECTIVES",
    "BundledCorpusSource",
    "TextFilesSource",
    "VocabularyError",
    "get_vocabulary",
    "register_all",
    "register_default_tasks",
    "register_text_files_task",
    "text_files_task",
]

# Task name -> objective: one of `pretraining.OBJECTIVES` (decoder-only) or "span_corruption".
BUNDLED_TASKS = {
    "moetx_en_causal_lm": "causal_lm",
    "moetx_en_prefix_lm": "prefix_lm",
    "moetx_en_span_corruption": "span_corruption",
}
C4_TASKS = {
    "c4_causal_lm": "causal_lm",
    "c4_prefix_lm": "prefix_lm",
    "c4_span_corruption": "span_corruption",
}
C4_TFDS_NAME = "c4/en:3.0.1"
_SPLITS = ("train", "validation")


class BundledCorpusSource(seqio.TextLineDataSource):
    """The bundled corpus (one paragraph a line), with its files looked up only when read.

    Registration therefore works before the corpus exists; reading it before
    `python -m moetx.cli.data` has run raises a `FetchError` that says so.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None):
        self._data_dir = data_dir
        root = paths.corpus_dir(data_dir)
        super().__init__({split: str(root / f"{split}.txt") for split in _SPLITS})

    def list_shards(self, split: str) -> Sequence[str]:
        if split not in _SPLITS:
            raise ValueError(
                f"The moetx corpus has splits {list(_SPLITS)}, not {split!r}. "
                "Fix: ask for 'train' or 'validation'."
            )
        return [corpora.corpus_files(self._data_dir)[split]]


def register_default_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """(Re-)registers the bundled-corpus and C4 tasks; returns their names. Idempotent.

    Args:
      data_dir: cache root of the corpus and vocabulary; default `$MOETX_DATA` or
        `~/.cache/moetx`, resolved now so that every task agrees on one vocabulary.
    """
    root = paths.data_dir(data_dir)
    vocabulary = vocab.lazy_default_vocabulary(data_dir=root)
    # Span corruption's sentinels are extra ids appended after the 8k pieces.
    sentinel_vocabulary = vocab.lazy_default_vocabulary(
        extra_ids=pretraining.SPAN_CORRUPTION_EXTRA_IDS, data_dir=root
    )

    def add(name: str, source: seqio.DataSource, objective: str) -> None:
        if objective == "span_corruption":
            pretraining.add_span_corruption_task(name, source, sentinel_vocabulary)
        else:
            pretraining.add_lm_task(name, source, vocabulary, objective)

    source = BundledCorpusSource(root)
    for name, objective in BUNDLED_TASKS.items():
        add(name, source, objective)
    # read_only: never trigger TFDS's (huge) C4 download/preparation from a training run.
    c4 = seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME, splits=_SPLITS, read_only=True)
    for name, objective in C4_TASKS.items():
        add(name, c4, objective)
    return [*BUNDLED_TASKS, *C4_TASKS]


def _check_text_files(
    files: str | os.PathLike | Sequence[str | os.PathLike], arg: str
) -> list[str]:
    """Returns absolute paths of `files`, each an existing file with some non-blank text."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = list(files)
    if not files:
        raise ValueError(
            f"{arg} is empty; expected one or more text files with one example per line. "
            f"Fix: pass {arg}=['/path/to/file.txt']."
        )
    out = []
    for f in files:
        path = os.path.abspath(os.path.expanduser(os.fspath(f)))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{arg}: text file {path!r} does not exist; expected a UTF-8 file with one "
                "example per line. Fix: check the path (relative paths resolve against the "
                f"current directory, {os.getcwd()!r})."
            )
        if not _has_text(path):
            raise ValueError(
                f"{arg}: text file {path!r} is empty (no non-blank line); expected one example "
                "per line. Fix: point to a file with text in it."
            )
        out.append(path)
    return out


def _has_text(path: str, block: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            if chunk.strip():
                return True
    return False


class TextFilesSource(seqio.FileDataSource):
    """Users' text files, one example per line, each line read with a bound: at most
    `max_line_bytes` of it (the rest of a longer line is skipped), bytes that are not UTF-8
    replaced by U+FFFD (see `moetx.datasets.textfiles`). Files shard and shuffle as with
    `seqio.TextLineDataSource`."""

    def __init__(self, split_to_files: dict[str, list[str]],
                 max_line_bytes: int = textfiles.MAX_LINE_BYTES):
        textfiles.check_max_line_bytes(max_line_bytes)
        self.max_line_bytes = max_line_bytes

        def read_file_fn(path: tf.Tensor) -> tf.data.Dataset:
            return tf.data.Dataset.from_generator(
                lambda p: textfiles.read_lines(p.decode(), max_line_bytes), args=(path,),
                output_signature=tf.TensorSpec([], tf.string))

        super().__init__(read_file_fn=read_file_fn, split_to_filepattern=split_to_files)

    def list_shards(self, split: str) -> Sequence[str]:
        if split not in self.splits:
            raise ValueError(
                f"These text files have splits {list(self.splits)}, not {split!r}. Fix: ask "
                f"for one of those (e.g. EVAL_SPLIT), or pass validation_files.")
        return super().list_shards(split)


# Text files already reported (path, size, mtime, max_line_bytes): gin builds a task once per
# reference, and the warning is said once.
_REPORTED: set[tuple] = set()


def _check_text_content(name: str, files: Sequence[str], max_line_bytes: int) -> None:
    """Warns once (one `moetx: warning:` line with the counts) about lines that are not UTF-8
    or longer than `max_line_bytes` in `files`; raises ValueError when no line is text."""
    key = tuple((f, os.path.getsize(f), os.path.getmtime(f), max_line_bytes) for f in files)
    if key in _REPORTED:
        return
    stats = textfiles.scan_files(files, max_line_bytes)
    if stats.bad_lines and not stats.text_lines and stats.scanned_all:
        raise ValueError(
            f"Task {name!r}: no line of {_file_list(files)} is valid UTF-8 text "
            f"({stats.bad_lines:,} lines, {stats.bytes:,} bytes); is it a binary file? Fix: "
            f"point the task at UTF-8 text with one example per line.")
    _REPORTED.add(key)
    problem = textfiles.describe(stats, max_line_bytes)
    if problem:
        print(f"moetx: warning: task {name!r} ({_file_list(files)}): {problem}.",
              file=sys.stderr, flush=True)


def _file_list(files: Sequence[str]) -> str:
    shown = ", ".join(files[:3])
    return shown + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


@gin.configurable(module="moetx.tasks")
def register_text_files_task(
    name: str,
    train_files: str | Sequence[str],
    validation_files: str | Sequence[str] | None = None,
    vocabulary_path: str | None = None,
    objective: str = "causal_lm",
    max_line_bytes: int = textfiles.MAX_LINE_BYTES,
) -> seqio.Task:
    """Registers an LM task over your own text files (one example per line); returns it.

    The files are scanned first: lines that are not UTF-8 (read with U+FFFD replacements) and
    lines longer than `max_line_bytes` (cut to it) are reported in one `moetx: warning:` line
    with their counts.

    Args:
      name: task name (an existing task of that name is replaced).
      train_files: path or paths of the 'train' split.
      validation_files: optional path or paths of the 'validation' split.
      vocabulary_path: a SentencePiece `.model` (pad=0, eos=1); None for the default vocabulary.
      objective: 'causal_lm' or 'prefix_lm' (see `moetx.tasks.pretraining`).
      max_line_bytes: at most this many bytes of a line are read (default 1 MiB), which bounds
        the memory and tokenisation time of a line.

    Raises:
      FileNotFoundError: a file does not exist. ValueError: a file is empty or holds no UTF-8
      text, or the objective is unknown. VocabularyError: the vocabulary file is unusable.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"Unknown objective {objective!r} for task {name!r}; expected one of "
            f"{list(OBJECTIVES)}. Fix: pass objective='causal_lm' or 'prefix_lm'."
        )
    textfiles.check_max_line_bytes(max_line_bytes)
    splits = {"train": _check_text_files(train_files, "train_files")}
    if validation_files:
        splits["validation"] = _check_text_files(validation_files, "validation_files")
    _check_text_content(name, [f for files in splits.values() for f in files], max_line_bytes)
    vocabulary = (
        vocab.lazy_default_vocabulary()
        if vocabulary_path is None
        else vocab.get_vocabulary(vocabulary_path)
    )
    source = TextFilesSource(splits, max_line_bytes)
    return pretraining.add_lm_task(name, source, vocabulary, objective)


@gin.configurable(module="moetx.tasks")
def text_files_task(
    name: str,
    train_files: str | Sequence[str],
    validation_files: str | Sequence[str] | None = None,
    vocabulary_path: str | None = None,
    objective: str = "causal_lm",
    max_line_bytes: int = textfiles.MAX_LINE_BYTES,
) -> str:
    """`register_text_files_task` that returns the task name, for gin: `@text_files_task()`."""
    register_text_files_task(name, train_files, validation_files, vocabulary_path, objective,
                             max_line_bytes)
    return name


def register_all(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Registers every moetx language task and mixture: the bundled corpus and C4 tasks and the
    FLAN tasks and mixtures. Idempotent; reads no data. The command lines call it; a program that
    uses moetx as a library calls it before naming a moetx task."""
    from moetx.tasks import flan

    return [*register_default_tasks(data_dir), *flan.register_flan_tasks(),
            *flan.register_flan_mixtures()]
