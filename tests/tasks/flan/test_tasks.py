"""FLAN SeqIO tasks: TFDS registrations offline (read only through mock data), a real offline
task tokenized by SeqIO, and rank classification through seqio.Evaluator."""

import numpy as np
import seqio
import tensorflow_datasets as tfds

import moetx.tasks.flan  # noqa: F401
from moetx.tasks.flan import metrics, tasks
from moetx.datasets import flan_sources as sources

LENGTHS = {"inputs": 256, "targets": 16}


def test_tfds_registrations_are_constructible_offline():
    names = tasks.register_flan_tasks()  # constructs every source; reads nothing
    for d, spec in tasks.TFDS_DATASETS.items():
        for name in (tasks.task_name(d), tasks.task_name(d, scoring=True)):
            assert name in names
            task = seqio.get_mixture_or_task(name)
            assert isinstance(task.source, seqio.TfdsDataSource)
            assert task.source.tfds_dataset.name == spec.tfds_name
            assert set(task.source.splits) == {"train", "validation"}
    assert len([d for d in tasks.TFDS_DATASETS]) >= 14


def test_tfds_tasks_read_mock_data():
    with tfds.testing.mock_data(num_examples=20):
        task = seqio.get_mixture_or_task("flan_rte")
        # Mock data has no split metadata, so SeqIO's size lookup for its cache is skipped.
        out = list(task.get_dataset(LENGTHS, split="validation", shuffle=False,
                                    try_in_mem_cache=False).as_numpy_iterator())
        assert len(out) == 20  # two groups of ten templates
        assert out[0]["inputs_pretokenized"].decode().endswith("OPTIONS:\n- yes\n- no")
        assert out[0]["targets_pretokenized"].decode() in ("yes", "no")
        copa = seqio.get_mixture_or_task("flan_copa_scoring")
        rows = list(copa.get_dataset(LENGTHS, split="validation", shuffle=False,
                                     try_in_mem_cache=False).as_numpy_iterator())
        assert len(rows) % 2 == 0 and rows[0]["idx"].tolist() == [0, 0]
        assert sum(bool(r["is_correct"]) for r in rows) == len(rows) // 2


def test_real_offline_task_produces_tokenized_examples():
    task = seqio.get_mixture_or_task("flan_wordnet_nli_scoring")
    vocab = task.output_features["inputs"].vocabulary
    rows = list(task.get_dataset(LENGTHS, split="validation", shuffle=False).take(6)
                .as_numpy_iterator())
    assert [r["idx"].tolist() for r in rows] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    for r in rows:
        assert r["inputs"].dtype == np.int32 and r["inputs"][-1] == vocab.eos_id
        # The vocabulary (like T5's) turns newlines into spaces.
        assert vocab.decode(r["inputs"].tolist()) == " ".join(
            r["inputs_pretokenized"].decode().split())
        assert r["inputs_pretokenized"].decode().endswith(
            "OPTIONS:\n- yes\n- it is not possible to tell\n- no")
    record = sources.load_records("wordnet_nli")["validation"][0]
    assert record["premise"] in rows[0]["inputs_pretokenized"].decode()
    assert sum(bool(r["is_correct"]) for r in rows[:3]) == 1


def test_seqio_evaluator_rank_classification_with_fixed_scorer():
    """A scorer that always prefers 'not spam' scores exactly the share of ham emails."""
    task = seqio.get_mixture_or_task("flan_spam_scoring")
    vocab = task.output_features["targets"].vocabulary
    not_spam = list(vocab.encode("not spam"))
    rows = 2 * 42  # the first 42 examples (two option rows each)
    evaluator = seqio.Evaluator("flan_spam_scoring", seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation", sequence_length=LENGTHS,
                                num_examples=rows, async_compute_metrics=False)

    def score_fn(dataset, model_feature_shapes=None):
        out = []
        for index, features in dataset.as_numpy_iterator():
            tokens = features["decoder_target_tokens"]
            out.append((int(index), 1.0 if tokens[:len(not_spam)].tolist() == not_spam else 0.0))
        return out

    future, _ = evaluator.evaluate(compute_metrics=True, step=0, score_fn=score_fn)
    result = future.result()["flan_spam_scoring"]
    n = rows // 2
    records = sources.load_records("spam")["validation"][:n]
    expected = 100.0 * sum(r["label"] == "not spam" for r in records) / n
    assert result["num_examples"] == n
    assert abs(result["accuracy"] - expected) < 1e-9
    assert metrics.rank_classification in task.metric_fns
