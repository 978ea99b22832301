"""Where moetx keeps its offline data: the cache root and the versioned corpus/vocab folders.

Kept free of heavy imports (no TensorFlow, no SeqIO) so that every module of `moetx.datasets`,
the fetch command included, can resolve paths cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the cache root.
DATA_ENV_VAR = "MOETX_DATA"
#: Bumped whenever the corpus text changes (cleaning rules, sources), so old caches stay valid.
CORPUS_VERSION = "v1"
#: Bumped whenever the default vocabulary's training recipe changes.
VOCAB_VERSION = "v1"
DEFAULT_VOCAB_NAME = "moetx_en_8k"


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns the cache root: `data_dir` if given, else `$MOETX_DATA`, else `~/.cache/moetx`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/moetx").expanduser()


def corpus_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """Returns `<cache>/corpus/<CORPUS_VERSION>`, the folder of the split text files."""
    return data_dir(data_dir_) / "corpus" / CORPUS_VERSION


def downloads_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """Returns `<cache>/downloads`, where the registry archives are kept."""
    return data_dir(data_dir_) / "downloads"


def vocab_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """Returns `<cache>/vocab/<VOCAB_VERSION>`, the folder of the default vocabulary."""
    return data_dir(data_dir_) / "vocab" / VOCAB_VERSION
