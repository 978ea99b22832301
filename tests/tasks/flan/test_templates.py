"""The FLAN template table: ten patterns per dataset, placeholders drawn from the record's
fields, golden formatting with options, and Python/TensorFlow formatting parity."""

import pytest
import tensorflow as tf

from moetx.datasets import flan_sources as sources
from moetx.tasks.flan import tasks, templates

# One raw record per offline dataset, shaped like `sources.load_records` output.
RAW = {
    "fortunes_topic": {"text": "Never trust a computer you can't throw out a window.",
                       "label": "computers"},
    "language_id": {"text": "Wer zuletzt lacht, lacht am besten.", "label": "German"},
    "spam": {"text": "Subject: You won! Claim your prize now.", "label": "spam"},
    "sotu_party": {"text": "We must balance the budget.", "label": "Republican"},
    "wordnet_nli": {"premise": "There is a dog in the picture.",
                    "hypothesis": "There is an animal in the picture.", "label": "entailment"},
    "wordnet_define": {"definition": "a young dog", "pos": "noun", "word": "puppy"},
    "wordnet_antonyms": {"word": "hot", "antonym": "cold"},
    "analogies": {"a": "Athens", "b": "Greece", "c": "Paris", "d": "France",
                  "relation": "capital-common-countries"},
    "trivia_qa": {"question": "What is the capital of Peru?", "answer": "Lima",
                  "category": "america"},
}


def _tfds_example(spec: tasks.TfdsSpec) -> dict:
    ex = {v: tf.constant(f"<{v}>") for v in spec.fields.values()}
    if spec.template_key == "copa":
        ex.update(choice1=tf.constant("It rained."), choice2=tf.constant("It was sunny."),
                  question=tf.constant("cause"))
    ex[spec.label_key] = tf.constant(1, tf.int64)
    return ex


def _normalized_tfds(spec: tasks.TfdsSpec) -> dict:
    ds = tf.data.Dataset.from_tensors(_tfds_example(spec))
    (record,) = list(tasks.normalize_tfds(ds, spec).as_numpy_iterator())
    return {k: ([o.decode() for o in v] if k == "options" else v.decode())
            for k, v in record.items()}


def _all_normalized() -> dict[str, dict]:
    out = {name: tasks.normalize_offline(name, raw) for name, raw in RAW.items()}
    for name, spec in tasks.TFDS_DATASETS.items():
        out[name] = _normalized_tfds(spec)
    return out


NORMALIZED = _all_normalized()


def test_every_dataset_has_ten_templates():
    assert set(RAW) == set(sources.DATASETS)
    keys = set(sources.DATASETS) | {s.template_key for s in tasks.TFDS_DATASETS.values()}
    assert set(templates.PATTERNS) == keys == set(templates.FIELDS)
    for name, patterns in templates.PATTERNS.items():
        assert len(patterns) == 10, name
        assert len(set(patterns)) == 10, f"{name} repeats a template"
        assert all(isinstance(p, tuple) and len(p) == 2 for p in patterns)


@pytest.mark.parametrize("name", sorted(NORMALIZED))
def test_placeholders_are_record_fields(name):
    record = NORMALIZED[name]
    key = tasks.TFDS_DATASETS[name].template_key if name in tasks.TFDS_DATASETS else name
    assert set(record) - {"options"} == set(templates.FIELDS[key])
    allowed = set(record) - {"options"} | ({"options_"} if "options" in record else set())
    for p_in, p_tgt in templates.PATTERNS[key]:
        for pattern in (p_in, p_tgt):
            assert set(templates.placeholders(pattern)) <= allowed, (name, pattern)
        # A target never lists the options, and every input references some field.
        assert "options_" not in templates.placeholders(p_tgt)
        assert templates.placeholders(p_in)
    if name in sources.LABELS or name in tasks.TFDS_DATASETS:
        assert record["answer"] in record["options"]
        assert templates.scoring_templates(key), name


def test_known_record_formats_to_golden_string():
    record = NORMALIZED["spam"]
    inputs, targets = templates.format_example(templates.PATTERNS["spam"][0], record)
    assert inputs == ("Is this email spam?\n\nSubject: You won! Claim your prize now.\n\n"
                      "OPTIONS:\n- not spam\n- spam")
    assert targets == "spam"
    rte = {"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.",
           "answer": "yes", "options": ["yes", "no"]}
    inputs, targets = templates.format_example(templates.PATTERNS["rte"][0], rte)
    assert inputs == ("The cat sat on the mat.\n\nBased on the paragraph above, can we conclude "
                      "that \"A cat is sitting.\"?\n\nOPTIONS:\n- yes\n- no")
    assert targets == "yes"
    # An inverted template asks for the text given the label.
    inputs, targets = templates.format_example(templates.PATTERNS["fortunes_topic"][8],
                                               NORMALIZED["fortunes_topic"])
    assert (inputs, targets) == ("Write a witty quote about computers.",
                                 "Never trust a computer you can't throw out a window.")
    assert templates.is_inverted(templates.PATTERNS["fortunes_topic"][8])
    assert 8 not in templates.scoring_templates("fortunes_topic")


def test_format_options():
    assert templates.format_options(["a", "b c"]) == "OPTIONS:\n- a\n- b c"


def test_tfds_normalization_maps_labels():
    # Label 1 of each TFDS ClassLabel, in the dataset's own order.
    assert NORMALIZED["rte"]["answer"] == "no"  # not_entailment
    assert NORMALIZED["cb"]["answer"] == "no"  # contradiction
    assert NORMALIZED["mnli_matched"]["answer"] == "it is not possible to tell"  # neutral
    assert NORMALIZED["boolq"]["answer"] == "yes"  # True
    assert NORMALIZED["trec"]["answer"] == "entity"  # ENTY
    assert NORMALIZED["copa"]["options"] == ["It rained.", "It was sunny."]
    assert NORMALIZED["copa"]["answer"] == "It was sunny."
    assert NORMALIZED["copa"]["connector"] == "because"


def test_python_and_tensorflow_formatting_agree():
    for name, record in NORMALIZED.items():
        key = tasks.TFDS_DATASETS[name].template_key if name in tasks.TFDS_DATASETS else name
        features = {k: tf.constant(v) for k, v in record.items()}
        for template in templates.PATTERNS[key]:
            expected = templates.format_example(template, record)
            got = tuple(templates.tf_format(p, features).numpy().decode() for p in template)
            assert got == expected, (name, template)


def test_bad_patterns_and_records_raise():
    with pytest.raises(ValueError, match="format spec"):
        templates.format_example(("{text:>10}", "{answer}"), {"text": "x", "answer": "y"})
    with pytest.raises(KeyError, match="needs field 'text'"):
        templates.format_example(("{text}", "{answer}"), {"answer": "y"})
    with pytest.raises(KeyError, match="no options"):
        templates.format_example(("{options_}", "{answer}"), {"answer": "y"})
