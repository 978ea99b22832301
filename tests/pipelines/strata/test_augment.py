"""STraTA task augmentation: input formats, over-generation, and the consistency + confidence
filter, with stub generators and a fixed stub classifier."""

import numpy as np
import pytest
import seqio

from moetx.pipelines.strata import augment, data
from moetx.pipelines.strata.augment import Candidate

LABELS = augment.NLI_LABELS


def test_input_formats():
    assert augment.generator_input("entailment", "A dog\truns.\n") == \
        "nli generate entailment premise: A dog runs."
    assert augment.classifier_input("A dog runs.", "An animal\nmoves.") == \
        "nli hypothesis: An animal moves. premise: A dog runs."
    record = {"premise": "P.", "hypothesis": "H.", "label": "neutral"}
    assert augment.generator_examples([record]) == [("nli generate neutral premise: P.", "H.")]
    assert augment.classifier_examples([dict(record, label=2)]) == [
        ("nli hypothesis: H. premise: P.", "contradiction")]
    with pytest.raises(ValueError, match="Unknown NLI label"):
        augment.nli_label("maybe")


def test_generate_candidates_asks_every_premise_label_and_sample():
    asked = []

    def sample_fn(inputs):
        asked.extend(inputs)
        # Per (premise, label): sample 0 a real hypothesis, sample 1 a repeat of it, sample 2
        # empty for 'neutral' and a copy of the premise for 'contradiction'.
        out = []
        for i, x in enumerate(inputs):
            premise = x.split("premise: ")[1]
            label = x.split()[2]
            s = i % 3
            out.append(f"{label} of {premise}" if s < 2 or label == "entailment"
                       else ("" if label == "neutral" else premise))
        return out

    cands = augment.generate_candidates(["P one.", "P two."], sample_fn, LABELS, num_samples=3)
    assert asked == [augment.generator_input(lab, p) for p in ["P one.", "P two."]
                     for lab in LABELS for _ in range(3)]
    assert cands == [Candidate(p, lab, f"{lab} of {p}") for p in ["P one.", "P two."]
                     for lab in LABELS]


def test_filter_keeps_consistent_and_confident_candidates_only():
    cands = [Candidate("p", "entailment", "h0"),     # consistent, confident -> kept
             Candidate("p", "neutral", "h1"),        # consistent, at threshold -> kept
             Candidate("p", "contradiction", "h2"),  # consistent, not confident -> dropped
             Candidate("p", "entailment", "h3"),     # confident but inconsistent -> dropped
             Candidate("p", "contradiction", "h4")]  # consistent, confident -> kept
    table = {"h0": [0.95, 0.03, 0.02], "h1": [0.05, 0.9, 0.05], "h2": [0.2, 0.2, 0.6],
             "h3": [0.01, 0.98, 0.01], "h4": [0.0, 0.05, 0.95]}
    seen = []

    def classify_fn(inputs, options):
        assert options == list(LABELS)
        seen.extend(inputs)
        return np.array([table[x.split()[2]] for x in inputs])

    kept, probs = augment.filter_candidates(cands, classify_fn, threshold=0.9)
    assert [c.hypothesis for c in kept] == ["h0", "h1", "h4"]
    assert seen == [augment.classifier_input(c.premise, c.hypothesis) for c in cands]
    np.testing.assert_allclose(probs[3], table["h3"])
    kept, _ = augment.filter_candidates(cands, classify_fn, threshold=0.5)
    assert [c.hypothesis for c in kept] == ["h0", "h1", "h2", "h4"]


def test_synthesize_writes_the_kept_examples_as_a_seqio_task(tmp_path):
    def sample_fn(inputs):
        return [f"hyp {i}" for i in range(len(inputs))]

    def classify_fn(inputs, options):
        # Hypothesis i is classified as label i % 3 with probability 0.7 + 0.01 * (i % 30).
        out = np.full((len(inputs), 3), 0.0)
        for r, x in enumerate(inputs):
            i = int(x.split()[3])
            out[r, i % 3] = 0.7 + 0.01 * (i % 30)
            out[r, (i + 1) % 3] = 1 - out[r, i % 3]
        return out

    texts = [f"Sentence number {i} here." for i in range(10)]
    synth = augment.synthesize(texts, sample_fn, classify_fn, str(tmp_path), "strata_test_syn",
                               num_premises=4, num_samples=2, threshold=0.8,
                               validation_fraction=0.25, vocabulary=seqio.ByteVocabulary())
    # 4 premises * 3 labels * 2 samples = 24 candidates; candidate i has label (i // 2) % 3 and
    # is classified i % 3 with probability >= 0.8 iff i % 30 >= 10.
    expected = [i for i in range(24) if (i // 2) % 3 == i % 3 and i % 30 >= 10]
    assert (synth.num_premises, synth.num_candidates, synth.num_kept) == (4, 24, len(expected))
    train = data.read_examples(synth.files["train"])
    val = data.read_examples(synth.files["validation"])
    assert sorted(int(x.split()[3]) for x, _ in train + val) == expected
    assert len(val) == round(len(expected) * 0.25)
    assert all(t == LABELS[int(x.split()[3]) % 3] for x, t in train + val)
    ds = seqio.get_mixture_or_task("strata_test_syn").get_dataset(
        {"inputs": 128, "targets": 16}, split="train", shuffle=False)
    assert len(list(ds.as_numpy_iterator())) == len(train)
