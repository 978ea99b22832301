"""Text-to-text examples on disk and as SeqIO tasks: what every STraTA stage writes and reads.

Each stage of STraTA (the synthetic NLI data, the few labeled examples, every self-training
iteration's labeled + pseudo-labeled set) is written as tab-separated files, one
`inputs<TAB>targets` example per line, and registered as a SeqIO task over those files. The files
are the hand-off between stages: iteration k's task is built from what iteration k-1 wrote, so a
run can be inspected (or resumed) from disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import seqio

# Examples are (inputs, targets) strings.
Example = tuple[str, str]

#: Sentinel ids of the span-corruption vocabulary; the pretrained T5 demo uses it.
DEFAULT_EXTRA_IDS = 100

_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """One line of text: tabs, newlines and runs of spaces become single spaces."""
    return _SPACE.sub(" ", str(text)).strip()


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """Writes `inputs<TAB>targets` lines (atomically); returns the number written.

    Raises ValueError for an example whose inputs or targets is empty after cleaning: SeqIO
    would silently train on an empty sequence.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (inputs, targets) in enumerate(examples):
            inputs, targets = clean_text(inputs), clean_text(targets)
            if not inputs or not targets:
                raise ValueError(
                    f"Example {i} for {path!r} has an empty {'inputs' if not inputs else 'targets'}"
                    f" field ({inputs!r} -> {targets!r}); drop it before writing.")
            f.write(f"{inputs}\t{targets}\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_examples(path: str | os.PathLike) -> list[Example]:
    """The (inputs, targets) pairs of a file written by `write_examples`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Examples file {path!r} does not exist; it is written by the "
                                "previous STraTA stage (run that stage first).")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'inputs<TAB>targets', found "
                                 f"{len(parts)} tab-separated fields.")
            out.append((parts[0], parts[1]))
    return out


def _parse_tsv_line(line):
    import tensorflow as tf

    fields = tf.io.decode_csv(line, record_defaults=["", ""], field_delim="\t",
                              use_quote_delim=False)
    return {"inputs": fields[0], "targets": fields[1]}


def parse_tsv(dataset):
    """SeqIO preprocessor: `inputs<TAB>targets` lines -> {'inputs', 'targets'} strings."""
    return dataset.map(_parse_tsv_line, num_parallel_calls=2)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Encoder-decoder features: 'inputs' and 'targets', both ending in EOS (T5 finetuning)."""
    return {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
            "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True)}


def register_examples_task(
    name: str,
    split_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Registers (replacing any task of that name) a text-to-text task over TSV files.

    Args:
      name: SeqIO task name.
      split_files: split -> file or files written by `write_examples`.
      vocabulary: of both features; default the bundled 8k vocabulary with 100 sentinels (the
        pretrained T5 demo's).

    Returns:
      The registered `seqio.Task`; `seqio.get_mixture_or_task(name)` finds it.
    """
    if not split_files:
        raise ValueError(f"Task {name!r}: split_files is empty; pass e.g. "
                         "{'train': '/path/train.tsv'}.")
    splits = {}
    for split, files in split_files.items():
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"Task {name!r}, split {split!r}: file {os.fspath(f)!r}"
                                        " does not exist (write it with write_examples first).")
        splits[split] = [os.path.abspath(os.fspath(f)) for f in files]
    if vocabulary is None:
        from moetx.datasets import vocab

        vocabulary = vocab.lazy_default_vocabulary(extra_ids=DEFAULT_EXTRA_IDS)
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(splits),
        output_features=output_features(vocabulary),
        preprocessors=[parse_tsv, seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim],
        metric_fns=[],
        shuffle_buffer_size=10_000,
    )
