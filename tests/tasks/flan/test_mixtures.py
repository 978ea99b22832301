"""Examples-proportional mixing with both caps, and leave-one-cluster-out mixtures."""

import pytest
import seqio

import moetx.tasks.flan  # noqa: F401  (the session fixture registers the tasks and mixtures)
from moetx.tasks.flan import clusters, mixtures, tasks
from moetx.datasets import flan_sources as sources


def test_mixing_rate_is_min_of_n_and_caps():
    for n, rate in ((10, 10), (2999, 2999), (3000, 3000), (5000, 3000), (100_000, 3000)):
        assert mixtures.mixing_rate(n) == rate
    assert mixtures.mixing_rate(100_000, train_cap=1000, maximum=5000) == 1000
    assert mixtures.mixing_rate(800, train_cap=1000, maximum=500) == 500


@pytest.fixture
def fake_sizes(monkeypatch):
    """Each offline dataset gets a synthetic train split of a known size (no data read)."""
    sizes = {name: 500 + 7000 * i for i, name in enumerate(sorted(sources.DATASETS))}
    sizes["wordnet_define"] = 45_000  # above the 30,000 train cap

    def load_records(name, data_dir=None):
        raw = {"text": "t", "label": (sources.LABELS.get(name) or ["x"])[0], "premise": "p",
               "hypothesis": "h", "definition": "d", "pos": "noun", "word": "w", "antonym": "a",
               "a": "a", "b": "b", "c": "c", "d": "d", "relation": "r", "question": "q",
               "answer": "x", "category": "c"}
        if name == "wordnet_nli":
            raw["label"] = "entailment"
        return {"train": [raw] * sizes[name], "validation": [raw] * 3, "test": [raw] * 3}

    monkeypatch.setattr(sources, "load_records", load_records)
    return sizes


def test_registered_mixture_rates(fake_sizes):
    mixture = seqio.get_mixture_or_task("flan_offline_all")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == {tasks.task_name(d): float(min(n, 30_000, 3000))
                     for d, n in fake_sizes.items()}
    assert rates["flan_wordnet_define"] == 3000.0
    assert seqio.get_mixture_or_task("flan_wordnet_define").num_input_examples("train") == 30_000
    # Both caps are configurable.
    try:
        tasks.register_flan_tasks(train_cap=1000)
        mixtures.register_flan_mixtures(maximum=600)
        mixture = seqio.get_mixture_or_task("flan_offline_all")
        assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
            tasks.task_name(d): float(min(n, 1000, 600)) for d, n in fake_sizes.items()}
    finally:
        tasks.register_flan_tasks()
        mixtures.register_flan_mixtures()


@pytest.mark.parametrize("collection", ["offline", "all"])
def test_leave_one_cluster_out_holds_out_exactly_that_cluster(collection):
    cluster_map = mixtures.COLLECTIONS[collection]
    every = {tasks.task_name(d) for members in cluster_map.values() for d in members}
    assert {t.name for t in seqio.get_mixture_or_task(f"flan_{collection}_all").tasks} == every
    for cluster, members in cluster_map.items():
        train = {t.name for t in seqio.get_mixture_or_task(
            mixtures.leave_one_out_mixture(cluster, collection)).tasks}
        held = {tasks.task_name(d) for d in members}
        assert train == every - held, cluster
        evaluation = {t.name for t in seqio.get_mixture_or_task(
            mixtures.leave_one_out_mixture(cluster, collection, split="validation")).tasks}
        classification = set(tasks.classification_datasets())
        assert evaluation == {tasks.task_name(d, scoring=d in classification)
                              for d in members}
    assert mixtures.leave_one_out_mixture("nli", fewshot=True) == "flan_offline_no_nli_fewshot"
    with pytest.raises(ValueError, match="Unknown cluster"):
        mixtures.leave_one_out_mixture("sentiment", "offline")


def test_fewshot_mixtures_and_clusters():
    fewshot = {t.name for t in seqio.get_mixture_or_task(
        "flan_offline_text_classification_eval_fewshot").tasks}
    assert fewshot == {"flan_fortunes_topic_scoring_fewshot", "flan_spam_scoring_fewshot",
                       "flan_sotu_party_scoring_fewshot"}
    assert clusters.cluster_of("rte") == clusters.cluster_of("wordnet_nli") == "nli"
    offline = [d for m in clusters.OFFLINE_CLUSTERS.values() for d in m]
    assert sorted(offline) == sorted(sources.DATASETS)  # each dataset in exactly one cluster
    tfds = [d for m in clusters.TFDS_CLUSTERS.values() for d in m]
    assert sorted(tfds) == sorted(tasks.TFDS_DATASETS)
