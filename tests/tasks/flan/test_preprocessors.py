"""Round-robin template assignment, rank-classification rows and few-shot assembly."""

import pytest
import tensorflow as tf

from moetx.tasks.flan import preprocessors

TEMPLATES = [(f"T{i}: {{text}}", f"{{answer}}/{i}") for i in range(10)]


def _records(n):
    return [{"text": f"r{j}", "answer": f"a{j}"} for j in range(n)]


def _dataset(records):
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant([r[k] for r in records]) for k in records[0]})


def test_round_robin_25_examples_10_templates():
    out = list(preprocessors.batch_apply_template(_dataset(_records(25)), TEMPLATES)
               .as_numpy_iterator())
    assert len(out) == 20  # the last 5 (an incomplete group) are dropped
    assert [int(ex["template_idx"]) for ex in out] == list(range(10)) * 2
    for j, ex in enumerate(out):
        assert ex["inputs"].decode() == f"T{j % 10}: r{j}"
        assert ex["targets"].decode() == f"a{j}/{j % 10}"
    py = preprocessors.apply_templates_round_robin(_records(25), TEMPLATES)
    assert [(r["inputs"], r["targets"], r["template_idx"]) for r in py] == [
        (ex["inputs"].decode(), ex["targets"].decode(), int(ex["template_idx"])) for ex in out]


def test_rank_classification_rows():
    ds = tf.data.Dataset.from_tensor_slices({
        "inputs": ["q0", "q1"], "answer": ["b", "c"],
        "options": [["a", "b", "c"], ["a", "b", "c"]]})
    rows = list(preprocessors.rank_classification_rows(ds).as_numpy_iterator())
    assert [(r["inputs"].decode(), r["targets"].decode(), r["idx"].tolist(),
             bool(r["is_correct"])) for r in rows] == [
        ("q0", "a", [0, 0], False), ("q0", "b", [0, 1], True), ("q0", "c", [0, 2], False),
        ("q1", "a", [1, 0], False), ("q1", "b", [1, 1], False), ("q1", "c", [1, 2], True)]


def _words(s):
    return len(s.split())


def test_fewshot_golden_string_and_budget():
    exemplars = [("Capital of France?", "Paris"), ("Capital of Peru?", "Lima"),
                 ("Capital of Chad?", "N'Djamena")]
    inputs, shots = preprocessors.assemble_fewshot(exemplars, "Capital of Italy?", _words,
                                                   max_shots=2)
    assert shots == 2
    assert inputs == ("Capital of France?\nParis\n\nCapital of Peru?\nLima\n\n"
                      "Capital of Italy?")
    # Each exemplar is 4 words and the query 3: a budget of 11 fits two, 10 only one.
    for budget, expected in ((11, 2), (10, 1), (7, 1), (6, 0), (2, 0)):
        inputs, shots = preprocessors.assemble_fewshot(exemplars, "Capital of Italy?", _words,
                                                       token_budget=budget)
        assert shots == expected, budget
        assert inputs.endswith("Capital of Italy?")
        assert _words(inputs) <= budget or shots == 0
    flan = preprocessors.FewShotFormat("0 ", "1 ", " X ", " X ")
    inputs, _ = preprocessors.assemble_fewshot(exemplars[:1], "Capital of Italy?", _words,
                                               fmt=flan)
    assert inputs == "0 Capital of France? X 1 Paris X 0 Capital of Italy? X 1"
    with pytest.raises(ValueError, match="max_shots"):
        preprocessors.assemble_fewshot(exemplars, "q", _words, max_shots=17)


def test_fewshot_examples_draw_exemplars_from_train_with_same_template():
    records = _records(10)
    train = [{"text": f"t{j}", "answer": f"b{j}"} for j in range(5)]
    rows = preprocessors.fewshot_examples(records, train, TEMPLATES, _words, num_shots=2,
                                          token_budget=960)
    assert len(rows) == 10 and [r["num_shots"] for r in rows] == [2] * 10
    # Example 1 uses template 1 and train records 2 and 3 (cyclic), formatted with template 1.
    assert rows[1]["inputs"] == "T1: t2\nb2/1\n\nT1: t3\nb3/1\n\nT1: r1"
    assert rows[1]["targets"] == "a1/1"
    # Example 3 wraps around: train records 6 % 5 = 1 and 2.
    assert rows[3]["inputs"].startswith("T3: t1\nb1/3\n\nT3: t2")
    # The budget holds for every example (16 shots of 3 words would not fit in 20).
    rows = preprocessors.fewshot_examples(records, train, TEMPLATES, _words, num_shots=16,
                                          token_budget=20)
    assert all(_words(r["inputs"]) <= 20 for r in rows)
    assert {r["num_shots"] for r in rows} == {6}  # 6 exemplars * 3 words + 2 words = 20
