"""The tokenizer of a Hugging Face export: the task's SentencePiece vocabulary, as `AutoTokenizer`
loads it, encoding and decoding the same ids as SeqIO.

A moetx (SeqIO) vocabulary is a SentencePiece `.model` (pad 0, EOS 1, unk 2, no BOS) plus
`extra_ids` sentinels appended after its pieces, `<extra_id_0>` the highest id (SeqIO's
`reverse_extra_ids`). `save_tokenizer` writes, beside config.json:

    spiece.model           the SentencePiece model itself (without the extra ids, as T5's)
    tokenizer.json         the `tokenizers` pipeline: SentencePiece's normaliser, the unigram
                           pieces, the extra ids as special tokens, and what encoding adds
    tokenizer_config.json  the class `AutoTokenizer` builds and the special tokens

Encoder-decoders (T5, SwitchTransformers) get `T5Tokenizer`, which appends EOS to every text as
SeqIO's encoder features do (`add_eos=True`): `tok(text).input_ids == vocab.encode(text) + [1]`.
Decoder-only models (Llama, Mixtral) get the generic `TokenizersBackend` (`PreTrainedTokenizerFast`)
with a pipeline that prepends moetx's BOS (id 0, the `<pad>` piece) and appends nothing, which is
what moetx's decoder is fed for a prompt: `tok(text).input_ids == [0] + vocab.encode(text)`, and
`generate` continues the prompt as moetx's `Predictor.generate` does. `LlamaTokenizer` is not
used: it is a byte-fallback BPE with a `<s>` BOS, while moetx vocabularies are unigram models.
Decoding with `skip_special_tokens=True` drops pad, EOS, unk and the sentinels.

A known difference (it is the `tokenizers` library's, and HF's own T5 tokenizers have it): a
sentinel written directly before punctuation (`<extra_id_0>.`) encodes with an extra `▁` piece
before the punctuation; sentinels between words encode as SeqIO does.

Building the pipeline needs `sentencepiece` and `protobuf` (moetx dependencies); loading the
export needs only `transformers` and `tokenizers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from moetx.datasets import paths
from moetx.convert.hf import common

SPIECE_NAME = "spiece.model"
TOKENIZER_FILES = (SPIECE_NAME, "tokenizer.json", "tokenizer_config.json")
# T5's, and what moetx's span-corruption and FLAN tasks use.
DEFAULT_EXTRA_IDS = 100
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A SeqIO SentencePiece vocabulary, by what defines it.

    Attributes:
      path: the SentencePiece `.model` file.
      extra_ids: sentinels appended after its pieces.
    """

    path: str
    extra_ids: int = DEFAULT_EXTRA_IDS


def default_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> Vocabulary:
    """moetx's default vocabulary (`moetx.datasets.vocab.default_vocabulary_path`; built by
    `python -m moetx.cli.data`)."""
    return Vocabulary(str(paths.vocab_dir() / f"{paths.DEFAULT_VOCAB_NAME}.model"), extra_ids)


def vocabulary_of(seqio_vocabulary: Any, what: str) -> Vocabulary:
    """The `Vocabulary` of a `seqio.SentencePieceVocabulary`; ValueError for any other kind."""
    path = getattr(seqio_vocabulary, "sentencepiece_model_file", None)
    if not path:
        raise ValueError(f"{what} has a {type(seqio_vocabulary).__name__}, not a SentencePiece "
                         "vocabulary; a Hugging Face tokenizer can be written for SentencePiece "
                         "vocabularies only (pass --vocabulary=none to export the weights alone).")
    return Vocabulary(str(path), int(seqio_vocabulary.extra_ids))


def vocabulary_of_task(name: str) -> Vocabulary:
    """The targets vocabulary of the registered SeqIO task or mixture `name` (register moetx's
    tasks first, as the command lines do)."""
    import seqio

    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise ValueError(f"--task {name!r} is not a registered SeqIO task or mixture ({e}).") \
            from None
    features = task.output_features
    feature = features.get("targets") or next(iter(features.values()), None)
    if feature is None:
        raise ValueError(f"Task {name!r} has no output features to take a vocabulary from.")
    return vocabulary_of(feature.vocabulary, f"Task {name!r}")


def check_vocabulary(vocabulary: Vocabulary, model_vocab_size: int) -> int:
    """Validates the SentencePiece file (T5 ids) and that its ids fit the model's embedding;
    returns the number of ids (pieces + extra ids).

    Raises:
      ValueError (VocabularyError): the file is missing, unreadable or breaks pad 0 / EOS 1, or
        the vocabulary has more ids than the model has embeddings.
    """
    from moetx.datasets import vocab as vocab_lib  # seqio, hence TensorFlow: only when used

    if vocabulary.extra_ids < 0:
        raise ValueError(f"extra_ids={vocabulary.extra_ids}: expected 0 or more.")
    sp = vocab_lib.validate_sentencepiece_model(vocabulary.path)
    size = sp.get_piece_size() + vocabulary.extra_ids
    if size > model_vocab_size:
        raise ValueError(
            f"The vocabulary {vocabulary.path} has {size} ids ({sp.get_piece_size()} pieces + "
            f"{vocabulary.extra_ids} extra ids) but the model embeds only vocab_size="
            f"{model_vocab_size}: pass the vocabulary the model was trained with (--vocabulary, "
            "--extra_ids or --task), or --vocabulary=none to export the weights alone.")
    return size


def save_tokenizer(out_dir: str, vocabulary: Vocabulary, *, encoder_decoder: bool,
                   model_vocab_size: int) -> list[str]:
    """Writes spiece.model, tokenizer.json and tokenizer_config.json of `vocabulary` into
    `out_dir` (see the module docstring for what encoding adds per kind of model).

    Args:
      out_dir: an existing directory (the export's).
      vocabulary: the SentencePiece file and its extra ids.
      encoder_decoder: T5Tokenizer (EOS appended) if true, else a decoder-only tokenizer (BOS 0
        prepended).
      model_vocab_size: the model's embedding rows; the vocabulary must fit.
    Returns:
      The paths written.
    Raises:
      ValueError: see `check_vocabulary`; MissingDependencyError without transformers.
    """
    check_vocabulary(vocabulary, model_vocab_size)
    transformers = common.import_transformers()

    spiece = os.path.join(out_dir, SPIECE_NAME)
    shutil.copyfile(vocabulary.path, spiece)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    # T5Tokenizer converts the SentencePiece model into a `tokenizers` pipeline (normaliser,
    # unigram pieces, sentinels after them); saving it writes that pipeline as tokenizer.json.
    with open(config_path, "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": vocabulary.extra_ids}, f)
    t5 = transformers.T5Tokenizer.from_pretrained(out_dir)
    if encoder_decoder:
        tok = t5
    else:
        from tokenizers import processors

        backend = t5.backend_tokenizer
        backend.post_processor = processors.TemplateProcessing(
            single=f"{PAD} $A", pair=f"{PAD} $A $B", special_tokens=[(PAD, 0)])
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
            extra_special_tokens=[f"<extra_id_{i}>" for i in range(vocabulary.extra_ids)])
    names = tok.save_pretrained(out_dir)
    # How this process loaded the files is no part of the export.
    with open(config_path) as f:
        saved = json.load(f)
    with open(config_path, "w") as f:
        json.dump({k: v for k, v in saved.items() if k not in ("is_local", "local_files_only")},
                  f, indent=2, ensure_ascii=False)
        f.write("\n")
    return sorted({spiece, *(os.path.join(out_dir, os.path.basename(str(n))) for n in names)})


__all__ = ["DEFAULT_EXTRA_IDS", "SPIECE_NAME", "TOKENIZER_FILES", "Vocabulary",
           "check_vocabulary", "default_vocabulary", "save_tokenizer", "vocabulary_of",
           "vocabulary_of_task"]
