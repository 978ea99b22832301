"""SentencePiece vocabularies: the default model, user models, and the errors for bad ones."""

import string

import gin
import pytest
import sentencepiece as spm
import seqio

from moetx.datasets import vocab

SENTENCE = "The quick brown fox jumps over the lazy dog, and Hamlet speaks to Horatio."


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    lines = [
        f"Line {i}: the cat sat on the mat while a dog ran through the park number {i % 17}."
        for i in range(400)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_default_vocab_uses_the_t5_convention(default_vocab):
    sp = spm.SentencePieceProcessor(model_file=str(default_vocab))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "</s>"
    assert sp.get_piece_size() == 8000
    ids = sp.encode(SENTENCE)
    assert sp.decode(ids) == SENTENCE
    # Every printable ASCII character has a piece, so English text and code round-trip.
    printable = string.ascii_letters + string.digits + string.punctuation + " x"
    assert sp.decode(sp.encode(printable)) == printable
    # An 8k vocabulary trained on English prose keeps common words whole.
    assert len(ids) < len(SENTENCE.split()) * 1.6


def test_default_vocab_path_is_in_the_cache(default_vocab):
    assert default_vocab == vocab.default_vocabulary_path()
    assert default_vocab.name == "moetx_en_8k.model"
    assert default_vocab.parent.parts[-2:] == ("vocab", "v1")


def test_get_vocabulary_default_is_a_cached_seqio_vocabulary(default_vocab):
    v = vocab.get_vocabulary()
    assert isinstance(v, seqio.SentencePieceVocabulary)
    assert v.vocab_size == 8000 and v.eos_id == 1 and v.pad_id == 0 and v.unk_id == 2
    assert v.decode(v.encode(SENTENCE)) == SENTENCE
    assert vocab.get_vocabulary() is v
    assert vocab.get_vocabulary(str(default_vocab)) is v
    with_sentinels = vocab.get_vocabulary(extra_ids=100)
    assert with_sentinels is not v and with_sentinels.vocab_size == 8100


def test_get_vocabulary_is_gin_configurable(tiny_corpus, tmp_path, clean_gin):
    path = vocab.train_sentencepiece([tiny_corpus], tmp_path / "gin_vocab", vocab_size=100)
    gin.bind_parameter("moetx.tasks.get_vocabulary.path", str(path))
    assert vocab.get_vocabulary().sentencepiece_model_file == str(path)


def test_missing_default_vocab_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETX_DATA", str(tmp_path))
    with pytest.raises(vocab.VocabularyError, match=r"python -m moetx\.cli\.data"):
        vocab.get_vocabulary()
    lazy = vocab.lazy_default_vocabulary(data_dir=tmp_path)  # constructing is fine ...
    with pytest.raises(vocab.VocabularyError, match=r"python -m moetx\.cli\.data"):
        lazy.encode("hello")  # ... first use explains the fix


def test_missing_user_file_is_a_clear_error(tmp_path):
    with pytest.raises(vocab.VocabularyError, match="does not exist"):
        vocab.get_vocabulary(str(tmp_path / "nope.model"))


def test_bogus_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.model"
    bogus.write_text("this is not a sentencepiece model\n")
    with pytest.raises(vocab.VocabularyError, match="not a SentencePiece model"):
        vocab.get_vocabulary(str(bogus))


def test_model_with_other_special_ids_is_rejected(tiny_corpus, tmp_path):
    prefix = tmp_path / "llama_style"
    # SentencePiece's own defaults: unk=0, bos=1, eos=2, no pad -- not usable by SeqIO.
    spm.SentencePieceTrainer.train(
        input=str(tiny_corpus),
        model_prefix=str(prefix),
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(vocab.VocabularyError, match=r"pad_id=-1 and eos_id=2.*pad_id=0"):
        vocab.get_vocabulary(f"{prefix}.model")


def test_user_model_trained_on_a_tiny_corpus_loads(tiny_corpus, tmp_path):
    path = vocab.train_sentencepiece([tiny_corpus], tmp_path / "user", vocab_size=500)
    assert path == tmp_path / "user.model" and (tmp_path / "user.vocab").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    v = vocab.get_vocabulary(str(path))
    # hard_vocab_limit=False: a tiny corpus yields fewer pieces instead of failing.
    assert 3 < v.vocab_size <= 500
    text = "the cat sat on the mat"
    assert v.decode(v.encode(text)) == text
    assert v.tokenizer.pad_id() == 0 and v.tokenizer.eos_id() == 1


def test_training_is_deterministic(tiny_corpus, tmp_path):
    first = vocab.train_sentencepiece([tiny_corpus], tmp_path / "a" / "m", vocab_size=120)
    first_bytes = first.read_bytes()
    second = vocab.train_sentencepiece([tiny_corpus], tmp_path / "a" / "m", vocab_size=120)
    assert second.read_bytes() == first_bytes


def test_training_rejects_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing or empty"):
        vocab.train_sentencepiece([tmp_path / "none.txt"], tmp_path / "m")
