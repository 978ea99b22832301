"""Offline FLAN sources: parsing helpers, content-hash splits, and the load_records contract
(on the real cache, which `make test` fills with `python -m moetx.cli.data`)."""

import collections

import pytest

from moetx.datasets import flan_sources as sources


def test_quiz_patterns_expand_to_their_full_form():
    assert sources.quiz_canonical("{G{eorge} }Washington") == "George Washington"
    assert sources.quiz_canonical("{I }[injure|thwart]") == "I injure"
    assert sources.quiz_canonical("Alabama|Ala|AL") == "Alabama"
    assert sources.quiz_canonical("forget{-| }me{-| }not") == "forget-me-not"


def test_email_text_uses_subject_and_plain_body():
    raw = (b"From: a@b.c\nSubject: Cheap   meds\nContent-Type: multipart/alternative; "
           b"boundary=XX\n\n--XX\nContent-Type: text/html\n\n<p>Buy <b>now</b>&amp;save</p>\n"
           b"--XX\nContent-Type: text/plain\n\nBuy now\n and save.\n--XX--\n")
    assert sources.email_text(raw) == "Subject: Cheap meds. Buy now and save."


def test_split_records_is_stable_and_deterministic():
    records = [{"text": f"sentence {i}", "label": "x"} for i in range(2000)]
    a = sources.split_records("demo", records, ("text",))
    b = sources.split_records("demo", list(reversed(records)) + records[:10], ("text",))
    assert a == b  # order of input and duplicates do not matter
    sizes = {k: len(v) for k, v in a.items()}
    assert sum(sizes.values()) == 2000
    assert 140 <= sizes["validation"] <= 260 and 140 <= sizes["test"] <= 260
    more = sources.split_records("demo", records + [{"text": "new", "label": "x"}], ("text",))
    for split in sources.SPLITS:  # adding a record never moves the others
        assert [r for r in more[split] if r["text"] != "new"] == a[split]


@pytest.mark.parametrize("name", sorted(sources.DATASETS))
def test_load_records_contract(name):
    data = sources.load_records(name)
    assert set(sources.SPLITS) <= set(data)
    assert all(len(data[s]) > 0 for s in sources.SPLITS)
    assert sources.load_records(name) == data  # deterministic
    if name in sources.LABELS:
        labels = collections.Counter(r["label"] for s in sources.SPLITS for r in data[s])
        assert set(labels) == set(sources.LABELS[name])
    if name in ("fortunes_topic", "spam", "sotu_party"):
        texts = {r["text"] for s in sources.SPLITS for r in data[s]}
        assert data["unlabeled"] and all(set(r) == {"text"} for r in data["unlabeled"])
        assert not texts & {r["text"] for r in data["unlabeled"]}
    if name == "wordnet_nli":
        assert set(data["train"][0]) == {"premise", "hypothesis", "label"}


def test_unknown_dataset_is_reported():
    with pytest.raises(ValueError, match="Unknown FLAN offline dataset 'nope'"):
        sources.load_records("nope")
