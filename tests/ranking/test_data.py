"""The MSLR-WEB30K sample and the re-ranking protocol: the files load with the counts read
independently from the raw text, bad input is refused with a clear error, padding is masked,
the click models behave as documented, and the SeqIO task yields the slate features."""

import collections

import numpy as np
import pytest

from moetx.datasets import mslr
from moetx.ranking import slates, tasks


@pytest.mark.parametrize("split", ["train", "test"])
def test_mslr_sample_loads_with_the_counts_of_the_raw_file(split):
    queries = mslr.load_mslr(split)
    raw = (mslr.mslr_dir() / f"{split}.txt").read_text()
    lines = [line.split() for line in raw.splitlines() if line.strip()]
    qids = list(dict.fromkeys(int(f[1].split(":")[1]) for f in lines))
    grades = collections.Counter(int(f[0]) for f in lines)
    assert queries.num_documents == len(lines) == 5000
    assert queries.num_queries == len(qids) == 43
    assert queries.qids.tolist() == qids
    assert np.bincount(queries.labels).tolist() == [grades[g] for g in range(5)]
    per_query = collections.Counter(int(f[1].split(":")[1]) for f in lines)
    assert queries.documents_per_query().tolist() == [per_query[q] for q in qids]
    # A spot check of one value: the last feature of the last document.
    last = lines[-1]
    index, value = last[-1].split(":")
    assert index == "136" and queries.features[-1, 135] == np.float32(value)
    assert queries.features.shape == (5000, 136) and np.isfinite(queries.features).all()


def test_the_known_label_counts():
    """The sample's grade histograms (also checked against the raw text above)."""
    assert np.bincount(mslr.load_mslr("train").labels).tolist() == [2792, 1458, 665, 55, 30]
    assert np.bincount(mslr.load_mslr("test").labels).tolist() == [2847, 1442, 579, 98, 34]


@pytest.mark.parametrize("text,match", [
    ("1 qid:1 1:0.5 2:nan\n", "finite"),
    ("1 qid:1 1:0.5 7:1\n", "outside 1..3"),
    ("1 qid:1 1:0.5\n0 qid:2 1:1\n2 qid:1 1:2\n", "contiguously"),
    ("1 1:0.5\n", "qid"),
    ("1.5 qid:1 1:0.5\n", "graded"),
    ("1 qid:1 1-0.5\n", "index:value"),
    ("# only a comment\n\n", "no document"),
])
def test_parse_letor_refuses_bad_lines(text, match):
    with pytest.raises(ValueError, match=match):
        mslr.parse_letor(text, num_features=3)


def test_parse_letor_reads_sparse_lines_and_comments():
    q = mslr.parse_letor("2 qid:7 3:1.5 # doc a\r\n0 qid:7 1:-1 \n1 qid:9 2:4\n", 3)
    assert q.qids.tolist() == [7, 9] and q.offsets.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(q.features, [[0, 0, 1.5], [-1, 0, 0], [0, 4, 0]])
    assert q.labels.tolist() == [2, 0, 1]


def test_make_slates_pads_at_the_end_and_refuses_bad_slates():
    f = [np.ones((2, 3)), 2 * np.ones((4, 3))]
    out = slates.make_slates(f, [np.array([1, 0]), np.array([0, 1, 2, 3])], 4,
                             [np.array([1, 0]), np.zeros(4)])
    assert out["features"].shape == (2, 4, 3)
    np.testing.assert_array_equal(out["item_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert np.all(out["features"][0, 2:] == 0) and np.all(out["labels"][0, 2:] == 0)
    cases = [
        (([np.ones((0, 3))], [np.zeros(0)]), "empty slate"),
        (([np.ones((2, 3)), np.ones((2, 4))], [np.zeros(2)] * 2), "ragged"),
        (([np.ones((5, 3))], [np.zeros(5)]), "more than slate_size"),
        (([np.array([[1.0, np.nan, 0.0]])], [np.zeros(1)]), "finite"),
        (([np.ones((2, 3))], [np.zeros(3)]), "labels"),
        (([], []), "No slates"),
    ]
    for (features, labels), match in cases:
        with pytest.raises(ValueError, match=match):
            slates.make_slates(features, labels, 4)


def _queries(sizes, seed=0):
    rng = np.random.RandomState(seed)
    text = "".join(f"{rng.randint(5)} qid:{q} 1:{rng.randn():.3f} 2:{rng.randn():.3f}\n"
                   for q, n in enumerate(sizes) for _ in range(n))
    return mslr.parse_letor(text, 2)


def test_build_slates_drops_single_document_queries_and_keeps_the_base_order():
    queries = _queries([5, 1, 12, 3])
    transform = slates.FeatureTransform.fit(queries.features)
    ranker = slates.BaseRanker.fit(transform(queries.features), queries.labels)
    out, dropped = slates.build_slates(queries, transform, ranker, slates.ClickModel(), 4,
                                       pool_size=6, sessions_per_query=2, seed=0)
    assert dropped == 1
    assert out["query_index"].tolist() == [0, 0, 2, 2, 3, 3]
    np.testing.assert_array_equal(out["item_mask"].sum(1), [4, 4, 4, 4, 3, 3])
    # Slates are in the base ranker's order: its scores decrease along each slate.
    scores = out["base_scores"]
    assert np.all(np.diff(np.where(np.isinf(scores), -1e9, scores), axis=1) <= 0)
    # Session 0 pools every document: its slate is the query's top-4 by the base ranker.
    features, _ = queries.query(2)
    top = np.sort(ranker(transform(features)))[::-1][:4]
    np.testing.assert_allclose(scores[2], top, rtol=1e-6)
    assert np.all(out["clicks"][out["item_mask"] == 0] == 0)
    with pytest.raises(ValueError, match="fewer than 2"):
        slates.build_slates(_queries([1, 1]), transform, ranker, slates.ClickModel(), 4)


def test_position_click_model_rates():
    """Click rate at rank r ≈ (1/r)^eta · attraction(label)."""
    model = slates.ClickModel("position", eta=1.0, noise=0.1)
    labels = np.array([4, 2, 0, 4, 1])
    rng = np.random.RandomState(0)
    rate = np.mean([model.simulate(labels, np.eye(5), rng) for _ in range(20000)], axis=0)
    expected = (1.0 / np.arange(1, 6)) * (0.1 + 0.9 * labels / 4)
    np.testing.assert_allclose(rate, expected, atol=0.012)
    with pytest.raises(ValueError, match="kind"):
        slates.ClickModel("cascade")


def test_diversity_click_model_skips_near_duplicates():
    """Items 0 and 1 are near-duplicates (cosine 0.99), item 2 is orthogonal: with the
    diversity model, 1 is never clicked when 0 was, and 2 keeps its position-model rate."""
    features = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])
    labels = np.array([4, 4, 4])
    diverse = slates.ClickModel("diversity", eta=0.0, noise=0.0, similarity_threshold=0.9)
    rng = np.random.RandomState(0)
    clicks = np.array([diverse.simulate(labels, features, rng) for _ in range(200)])
    assert np.all(clicks[:, 0] == 1) and np.all(clicks[:, 1] == 0) and np.all(clicks[:, 2] == 1)


def test_mslr_task_yields_padded_slates():
    name = tasks.register_mslr_task("diversity", slate_size=10, train_sessions_per_query=2,
                                    test_sessions_per_query=1, name="mslr_test_small")
    import seqio

    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"features": (10, 136)}, split="test", shuffle=False)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 43  # one slate per test query
    ex = examples[0]
    assert ex["features"].shape == (10, 136) and ex["item_mask"].shape == (10,)
    assert set(ex) == set(tasks.FEATURES)
    arrays = tasks.mslr_slates("test", "diversity", 10, 30, 2, 1, 0, None)
    assert arrays["item_mask"].sum() == 430  # every test query has at least 10 documents
    assert tasks.register_default_tasks() == ["mslr_position", "mslr_diversity"]
