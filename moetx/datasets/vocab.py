"""SentencePiece vocabularies: train a T5-convention model, or load and validate a `.model` file.

T5 convention (what SeqIO and the T5X models assume): id 0 = `<pad>`, id 1 = `</s>` (EOS),
id 2 = `<unk>`, no BOS. The default vocabulary is an 8k unigram model trained on the train split
of the bundled corpus (`python -m moetx.cli.data` builds it).
"""

from __future__ import annotations

import os
import shutil
import string
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import gin
import sentencepiece as spm
import seqio
from sentencepiece import sentencepiece_model_pb2

from moetx.datasets import paths

__all__ = [
    "VocabularyError",
    "default_vocabulary_path",
    "get_vocabulary",
    "lazy_default_vocabulary",
    "train_sentencepiece",
    "validate_sentencepiece_model",
]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PRINTABLE_ASCII = string.ascii_letters + string.digits + string.punctuation
DEFAULT_VOCAB_SIZE = 8000
# SentencePiece's random seed is process-global: serialise training so a seed stays in force.
_SPM_TRAIN_LOCK = threading.Lock()


class VocabularyError(ValueError):
    """A vocabulary file is missing, unreadable, or breaks the pad=0/eos=1 convention."""


def default_vocabulary_path(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns `<cache>/vocab/v1/moetx_en_8k.model` (which may not exist yet)."""
    return paths.vocab_dir(data_dir) / f"{paths.DEFAULT_VOCAB_NAME}.model"


def train_sentencepiece(
    text_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    required_chars: str = PRINTABLE_ASCII,
    input_sentence_size: int = 2_000_000,
    seed: int = 42,
    num_threads: int = 2,
    max_sentence_length: int = 8192,
    quiet: bool = True,
) -> Path:
    """Trains a T5-convention SentencePiece model; returns the path of `<model_prefix>.model`.

    Args:
      text_files: UTF-8 text files, one sentence/paragraph per line.
      model_prefix: output path without extension; `<prefix>.model` and `<prefix>.vocab` are
        written atomically (trained in a temporary folder, then renamed into place).
      vocab_size: target number of pieces. `hard_vocab_limit=False` lets a small corpus yield
        fewer pieces instead of failing.
      model_type: 'unigram' (T5) or 'bpe'.
      character_coverage: fraction of characters covered; rarer ones map to `<unk>`.
      required_chars: characters always given a piece whatever their frequency; by default
        every printable ASCII character, so English text and code round-trip exactly.
      input_sentence_size: at most this many lines are sampled from the input.
      seed: seed of SentencePiece's sampling/shuffling, fixed so training is reproducible.
      num_threads: training threads.
      max_sentence_length: longest line in bytes that is used for training.
      quiet: silence SentencePiece's training log.

    Returns:
      Path of the written `.model` file.
    """
    files = [str(f) for f in text_files]
    for f in files:
        if not os.path.isfile(f) or os.path.getsize(f) == 0:
            raise FileNotFoundError(
                f"SentencePiece training input {f!r} is missing or empty; expected a UTF-8 text "
                "file with one sentence per line. Fix: pass existing, non-empty files."
            )
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.tmp-", dir=prefix.parent))
    try:
        with _SPM_TRAIN_LOCK:
            spm.set_random_generator_seed(seed)
            spm.SentencePieceTrainer.train(
                input=files,
                model_prefix=str(tmp / prefix.name),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                required_chars=required_chars,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                hard_vocab_limit=False,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                max_sentence_length=max_sentence_length,
                minloglevel=2 if quiet else 0,
            )
        # The model records its training prefix; point it at the final path instead of the
        # temporary folder, so the same inputs give a byte-identical file.
        model_file = tmp / f"{prefix.name}.model"
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
        proto.trainer_spec.model_prefix = str(prefix)
        model_file.write_bytes(proto.SerializeToString())
        for ext in (".vocab", ".model"):  # .model last: its presence means "done"
            os.replace(tmp / f"{prefix.name}{ext}", prefix.with_name(prefix.name + ext))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prefix.with_name(prefix.name + ".model")


def validate_sentencepiece_model(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Loads `path` with sentencepiece and checks the T5 convention; returns the processor.

    Raises VocabularyError saying what was expected, what was found, and the fix.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VocabularyError(
            f"SentencePiece model {path!r} does not exist. Fix: pass the path of an existing "
            "`.model` file, or leave the path unset to use the default moetx vocabulary."
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError depending on the build
        raise VocabularyError(
            f"{path!r} is not a SentencePiece model (sentencepiece could not load it: {e}). "
            "Fix: pass a `.model` file written by SentencePiece training (not the `.vocab` "
            "text file), e.g. one from `moetx.datasets.vocab.train_sentencepiece`."
        ) from e
    if sp.pad_id() != PAD_ID or sp.eos_id() != EOS_ID:
        raise VocabularyError(
            f"SentencePiece model {path!r} has pad_id={sp.pad_id()} and eos_id={sp.eos_id()}; "
            f"moetx (like T5/SeqIO) needs pad_id={PAD_ID} and eos_id={EOS_ID}, since SeqIO pads "
            "with 0 and ends sequences with 1. Fix: retrain it with `pad_id=0, eos_id=1, "
            "unk_id=2, bos_id=-1` (see `moetx.datasets.vocab.train_sentencepiece`)."
        )
    return sp


class _CheckedSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A SeqIO SentencePiece vocabulary that validates its file when first loaded.

    Construction touches no file, so tasks can be registered before the vocabulary exists;
    the first encode/decode then fails with the fix instead of a bare file-not-found.
    """

    def _model_context(self):
        if self._model is None:
            path = self._sentencepiece_model_file
            if not os.path.isfile(path):
                raise VocabularyError(
                    f"The moetx vocabulary {path!r} does not exist yet. Fix: run "
                    "`python -m moetx.cli.data` once (it fetches the corpus and trains the "
                    "vocabulary), or pass your own SentencePiece `.model` path."
                )
            validate_sentencepiece_model(path)
        return super()._model_context()


_CACHE: dict[tuple[str, int], seqio.SentencePieceVocabulary] = {}
_CACHE_LOCK = threading.Lock()


def lazy_default_vocabulary(
    extra_ids: int = 0, data_dir: str | os.PathLike | None = None
) -> seqio.SentencePieceVocabulary:
    """Returns the default vocabulary without requiring it to exist yet (checked at first use)."""
    path = os.path.abspath(default_vocabulary_path(data_dir))
    with _CACHE_LOCK:
        key = (path, extra_ids)
        if key not in _CACHE:
            _CACHE[key] = _CheckedSentencePieceVocabulary(path, extra_ids=extra_ids)
        return _CACHE[key]


@gin.configurable(module="moetx.tasks")
def get_vocabulary(path: str | None = None, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
    """Returns a `seqio.SentencePieceVocabulary` for `path` (cached by (path, extra_ids)).

    Args:
      path: a SentencePiece `.model` file using pad=0/eos=1, or None for the default moetx
        vocabulary (`<cache>/vocab/v1/moetx_en_8k.model`), which must have been built.
      extra_ids: number of sentinel ids appended to the vocabulary (T5 span corruption uses 100).

    Raises:
      VocabularyError: the file is missing, not a SentencePiece model, or uses other ids.
    """
    if path is None:
        default = default_vocabulary_path()
        if not default.exists():
            raise VocabularyError(
                f"The default moetx vocabulary {str(default)!r} has not been built yet. Fix: run "
                "`python -m moetx.cli.data` (fetches the corpus, trains the vocabulary), "
                "or pass the path of your own SentencePiece `.model` file."
            )
        path = str(default)
    path = os.path.abspath(os.path.expanduser(str(path)))
    key = (path, int(extra_ids))
    with _CACHE_LOCK:
        if key in _CACHE and _CACHE[key]._model is not None:  # loaded, hence already validated
            return _CACHE[key]
    validate_sentencepiece_model(path)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _CheckedSentencePieceVocabulary(path, extra_ids=int(extra_ids))
        vocab = _CACHE[key]
    vocab.load_model()
    return vocab
