"""Rank classification with a fixed scorer, and the generation metrics."""

import pytest

from moetx.tasks.flan import metrics


def test_rank_classify_picks_the_highest_scoring_option():
    fixed = {("q0", "cat"): -3.0, ("q0", "dog"): -1.0, ("q0", "cow"): -2.0,
             ("q1", "yes"): -0.5, ("q1", "no"): -0.7}
    calls = []

    def score_fn(inputs, targets):
        calls.append(len(inputs))
        return [fixed[(i, t)] for i, t in zip(inputs, targets)]

    picks = metrics.rank_classify(score_fn, ["q0", "q1"], [["cat", "dog", "cow"], ["yes", "no"]])
    assert picks == [1, 0]
    assert calls == [5]  # one batched call over all (input, option) pairs


def test_rank_classification_metric():
    # Example 0: option 1 (correct) scores best; example 1: option 0 (wrong) beats option 2
    # (correct); example 2: a tie goes to the lower option index (correct).
    targets = [((0, 0), False), ((0, 1), True), ((1, 0), False), ((1, 1), False),
               ((1, 2), True), ((2, 0), True), ((2, 1), False)]
    scores = [-2.0, -1.0, -0.1, -3.0, -0.2, -1.0, -1.0]
    assert metrics.rank_classification(targets, scores) == {"accuracy": pytest.approx(200 / 3),
                                                            "num_examples": 3.0}
    with pytest.raises(ValueError, match="one score per"):
        metrics.rank_classification(targets, scores[:-1])


def test_rank_classification_postprocessor():
    example = {"idx": [4, 2], "is_correct": True}
    assert metrics.rank_classification_postprocessor("x", example, is_target=True) == ((4, 2),
                                                                                      True)
    assert metrics.rank_classification_postprocessor("x", example) == "x"


def test_generation_metrics():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.exact_match("Paris", "paris.") == 1.0
    assert metrics.f1("new york city", "york city") == pytest.approx(0.8)
    assert metrics.f1("cat", "") == 0.0 and metrics.f1("the", "an") == 1.0  # both empty
    out = metrics.generation_metrics(["Paris", "new york city"], ["paris", "york city"])
    assert out == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0)}
