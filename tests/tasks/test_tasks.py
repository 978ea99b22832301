"""SeqIO tasks registered by moetx.tasks: causal/prefix LM, text files, C4, name lookup."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import moetx.tasks as tasks
from moetx.datasets import corpora, vocab
from moetx.datasets.registry import FetchError
from moetx.tasks import pretraining
from moetx.trainer import data as data_lib

EOS = 1


def _examples(name, sequence_length, split="validation", seed=None, limit=None):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length, split=split, shuffle=False, seed=seed
    )
    if limit:
        ds = ds.take(limit)
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def validation_lines(corpus_dir, default_vocab):
    with open(corpora.corpus_files()["validation"], encoding="utf-8") as f:
        return f.read().splitlines()


def test_register_default_tasks_registers_all_tasks():
    for name in [*tasks.BUNDLED_TASKS, *tasks.C4_TASKS]:
        assert name in seqio.TaskRegistry.names()
    # Registration is idempotent: doing it again replaces, never raises.
    assert tasks.register_default_tasks() == [*tasks.BUNDLED_TASKS, *tasks.C4_TASKS]
    tasks.register_default_tasks()


def test_importing_registers_nothing_and_register_all_registers_every_task():
    # A fresh interpreter: this session's fixture has registered everything already.
    code = textwrap.dedent("""
        import json, seqio
        def names():
            return set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
        before = names()
        import moetx.tasks, moetx.tasks.flan, moetx.vision.tasks
        on_import = names() - before
        returned = moetx.tasks.register_all()
        moetx.vision.tasks.register_default_tasks()
        print(json.dumps({"on_import": sorted(on_import), "returned": sorted(returned),
                          "registered": sorted(names() - before)}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on_import"] == []
    assert set(out["returned"]) <= set(out["registered"])
    for name in ["moetx_en_causal_lm", "moetx_en_span_corruption", "c4_prefix_lm", "flan_spam",
                 "flan_offline_all", "fashion_mnist", "digit_clips"]:
        assert name in out["registered"], name


def test_causal_lm_chunks_documents_and_ends_each_with_eos(validation_lines):
    examples = _examples("moetx_en_causal_lm", {"targets": 64})
    lengths = [len(ex["targets"]) for ex in examples]
    assert set(examples[0]) == {"targets"}
    assert all(1 <= n <= 64 for n in lengths) and max(lengths) == 64
    # EOS closes every document exactly once, always as the last token of a chunk.
    assert sum(int(ex["targets"][-1] == EOS) for ex in examples) == len(validation_lines)
    assert all(EOS not in ex["targets"][:-1] for ex in examples)
    # Concatenating a document's chunks and decoding gives the original line back.
    stream = np.concatenate([ex["targets"] for ex in examples])
    docs = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    v = vocab.get_vocabulary()
    ascii_checked = 0
    for doc, line in zip(docs, validation_lines, strict=True):
        if line.isascii():
            assert v.decode(doc[:-1].tolist()) == line
            ascii_checked += 1
    assert ascii_checked > 50


def test_causal_lm_packs_with_the_decoder_feature_converter(validation_lines):
    ds = seqio.get_mixture_or_task("moetx_en_causal_lm").get_dataset(
        {"targets": 64}, split="validation", shuffle=False
    )
    converter = seqio.DecoderFeatureConverter(pack=True)
    batches = list(converter(ds, {"targets": 128}).batch(4).take(3).as_numpy_iterator())
    batch = batches[0]
    for key in (
        "decoder_target_tokens",
        "decoder_input_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    ):
        assert batch[key].shape == (4, 128), key
    segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    assert segments.max() >= 2  # at least two chunks share a row
    for row_seg, row_pos in zip(segments, positions, strict=True):
        starts = np.flatnonzero(np.diff(row_seg) != 0) + 1
        assert row_pos[0] == 0 and all(row_pos[s] == 0 for s in starts if row_seg[s] != 0)
    np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0, segments > 0)


def test_prefix_lm_splits_chunks_into_non_empty_halves(validation_lines):
    lengths = {"inputs": 64, "targets": 64}
    causal = [
        ex["targets"]
        for ex in _examples("moetx_en_causal_lm", {"targets": 64})
        if len(ex["targets"]) >= 2
    ]
    prefix = _examples("moetx_en_prefix_lm", lengths, seed=7)
    assert len(prefix) == len(causal)
    cuts = []
    for ex, chunk in zip(prefix, causal, strict=True):
        assert set(ex) == {"inputs", "targets"}
        assert len(ex["inputs"]) >= 1 and len(ex["targets"]) >= 1
        np.testing.assert_array_equal(np.concatenate([ex["inputs"], ex["targets"]]), chunk)
        cuts.append(len(ex["inputs"]))
    assert len(set(cuts)) > 10  # the cut point is random ...
    again = _examples("moetx_en_prefix_lm", lengths, seed=7)
    assert [len(ex["inputs"]) for ex in again] == cuts  # ... and reproducible under a seed


def test_prefix_lm_respects_a_shorter_inputs_length():
    examples = _examples("moetx_en_prefix_lm", {"inputs": 8, "targets": 64}, seed=1, limit=200)
    assert all(1 <= len(ex["inputs"]) <= 8 for ex in examples)
    assert all(len(ex["inputs"]) + len(ex["targets"]) <= 64 for ex in examples)


def test_prefix_lm_works_with_the_prefix_lm_feature_converter():
    ds = seqio.get_mixture_or_task("moetx_en_prefix_lm").get_dataset(
        {"inputs": 32, "targets": 32}, split="validation", shuffle=False, seed=3
    )
    converter = seqio.PrefixLMFeatureConverter(pack=True)
    batch = next(converter(ds, {"inputs": 32, "targets": 32}).batch(2).as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (2, 64)
    assert "decoder_causal_attention" in batch and batch["decoder_causal_attention"].sum() > 0
    # Loss only on the continuation: fewer weighted tokens than real tokens.
    assert 0 < batch["decoder_loss_weights"].sum() < (batch["decoder_target_tokens"] > 0).sum()


def test_split_tokens_cuts_into_segments_and_drops_empty():
    ds = tf.data.Dataset.from_generator(
        lambda: iter(
            [
                {"targets": np.arange(1, 8, dtype=np.int32)},
                {"targets": np.zeros([0], np.int32)},
                {"targets": np.array([5, 6], np.int32)},
            ]
        ),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    out = [ex["targets"].tolist() for ex in pretraining.split_tokens(ds, 3).as_numpy_iterator()]
    assert out == [[1, 2, 3], [4, 5, 6], [7], [5, 6]]
    with pytest.raises(ValueError, match="must be >= 1"):
        pretraining.split_tokens(ds, 0)


def test_text_files_task_from_a_tmp_file(tmp_path, default_vocab):
    train = tmp_path / "train.txt"
    train.write_text("The first example line.\n\n   \nA second, longer example line of text.\n")
    valid = tmp_path / "valid.txt"
    valid.write_text("A validation line.\n")
    task = tasks.register_text_files_task("tmp_text_causal", str(train), [str(valid)])
    assert task.splits == ("train", "validation")
    examples = _examples("tmp_text_causal", {"targets": 6}, split="train")
    v = vocab.get_vocabulary()
    stream = np.concatenate([ex["targets"] for ex in examples])
    docs = [
        v.decode(d[:-1].tolist()) for d in np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    ]
    assert docs == [
        "The first example line.",
        "A second, longer example line of text.",
    ]  # blanks dropped
    assert all(len(ex["targets"]) <= 6 for ex in examples)
    # Re-registering the same name replaces the task.
    tasks.register_text_files_task("tmp_text_causal", [str(train)], objective="prefix_lm")
    prefix = _examples("tmp_text_causal", {"inputs": 16, "targets": 16}, split="train", seed=0)
    assert all(len(ex["inputs"]) and len(ex["targets"]) for ex in prefix)


def test_text_files_task_from_gin(tmp_path, clean_gin, default_vocab):
    train = tmp_path / "gin_train.txt"
    train.write_text("Some text for a gin-registered task.\n")
    gin.parse_config(
        f"""
        moetx.tasks.text_files_task.name = 'gin_text_task'
        moetx.tasks.text_files_task.train_files = ['{train}']
        moetx.tasks.text_files_task.vocabulary_path = '{default_vocab}'
        """
    )
    assert tasks.text_files_task() == "gin_text_task"
    assert data_lib.get_task("gin_text_task").splits == ("train",)


def test_text_files_task_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tasks.register_text_files_task("bad_task", str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        tasks.register_text_files_task("bad_task", str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        tasks.register_text_files_task("bad_task", [str(blank)])
    good = tmp_path / "good.txt"
    good.write_text("text\n")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tasks.register_text_files_task(
            "bad_task", str(good), validation_files=str(tmp_path / "nope.txt")
        )
    with pytest.raises(ValueError, match="causal_lm"):
        tasks.register_text_files_task("bad_task", str(good), objective="span_corruption")
    assert "bad_task" not in seqio.TaskRegistry.names()


def test_unknown_task_name_suggests_close_names():
    with pytest.raises(ValueError, match="moetx_en_causal_lm") as info:
        data_lib.get_task("moetx_en_casual_lm")
    assert "Did you mean" in str(info.value)
    assert isinstance(data_lib.get_task("moetx_en_prefix_lm"), seqio.Task)


def test_c4_tasks_register_without_network(monkeypatch):
    def _no_network(*args, **kwargs):
        raise AssertionError("registering the C4 tasks must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    tasks.register_default_tasks()
    for name, objective in tasks.C4_TASKS.items():
        task = data_lib.get_task(name)
        assert isinstance(task.source, seqio.TfdsDataSource)
        assert task.source.tfds_dataset.name == tasks.C4_TFDS_NAME
        assert tuple(task.source.splits) == ("train", "validation")
        expected = {"targets"} if objective == "causal_lm" else {"inputs", "targets"}
        assert set(task.output_features) == expected


def test_tasks_register_before_the_corpus_exists(tmp_path):
    try:
        tasks.register_default_tasks(tmp_path)
        assert list(tmp_path.iterdir()) == []  # registration read and wrote nothing
        task = seqio.get_mixture_or_task("moetx_en_causal_lm")
        with pytest.raises(FetchError, match=r"python -m moetx\.cli\.data"):
            task.get_dataset({"targets": 32}, split="train", shuffle=False)
    finally:
        tasks.register_default_tasks()
