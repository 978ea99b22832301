"""Fixtures of the moetx.tasks tests: the real corpus and default vocabulary, built once.

They live in the user's cache (`$MOETX_DATA` or `~/.cache/moetx`); `make test` runs
`python -m moetx.tasks.corpora` first, so normally nothing is fetched or trained here.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The folder of the fetched corpus (train.txt, validation.txt, manifest.json)."""
    from moetx.tasks import corpora

    return corpora.fetch_corpora()


@pytest.fixture(scope="session")
def default_vocab(corpus_dir: Path) -> Path:
    """Path of the default 8k SentencePiece model, trained from the corpus when missing."""
    from moetx.tasks import vocab

    return vocab.build_default_vocabulary()
