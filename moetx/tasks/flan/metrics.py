"""FLAN evaluation metrics, in `seqio.Evaluator`'s metric-function signatures.

- Classification: **rank classification**. The scoring task has one row per (example, option)
  with `targets` = the option; the model scores each row (sum of target log-likelihoods) and
  the option with the highest score is the prediction. `rank_classification(targets, scores)`
  takes the rows' postprocessed targets, `((example, option), is_correct)`, and their scores.
- Generation: `exact_match` and token `f1` (SQuAD-style normalization: lowercase, no
  punctuation or articles, single spaces) via `generation_metrics(targets, predictions)`.

All values are percentages, like the T5/FLAN metrics. `seqio.Evaluator` logs them to
TensorBoard and JSON (see `moetx.pipelines.flan_eval`).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "exact_match",
    "f1",
    "generation_metrics",
    "normalize_answer",
    "rank_classification",
    "rank_classification_postprocessor",
    "rank_classify",
]


def rank_classification(targets: Sequence, scores: Sequence[float]) -> dict[str, float]:
    """Accuracy (%) of picking, per example, the option row with the highest score.

    Args:
      targets: per row `((example_index, option_index), is_correct)`.
      scores: per row model score (higher is better), same order.

    Ties go to the lowest option index. Examples with no correct option count as wrong.
    """
    if len(targets) != len(scores):
        raise ValueError(f"rank_classification got {len(targets)} targets but {len(scores)} "
                         "scores; expected one score per (example, option) row.")
    best: dict[int, tuple[float, int, bool]] = {}
    for (idx, is_correct), score in zip(targets, scores):
        example, option = int(idx[0]), int(idx[1])
        score = float(score)
        current = best.get(example)
        if current is None or score > current[0] or (score == current[0] and option < current[1]):
            best[example] = (score, option, bool(is_correct))
    if not best:
        return {"accuracy": 0.0, "num_examples": 0.0}
    correct = sum(1 for _, _, ok in best.values() if ok)
    return {"accuracy": 100.0 * correct / len(best), "num_examples": float(len(best))}


def rank_classify(score_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
                  inputs: Sequence[str], options: Sequence[Sequence[str]]) -> list[int]:
    """Index of the best-scoring option for each input (`score_fn(inputs, targets)` scores
    many (input, option) pairs at once)."""
    flat_inputs = [x for x, opts in zip(inputs, options) for _ in opts]
    flat_targets = [o for opts in options for o in opts]
    scores = np.asarray(score_fn(flat_inputs, flat_targets), dtype=np.float64)
    out, start = [], 0
    for opts in options:
        out.append(int(np.argmax(scores[start:start + len(opts)])))
        start += len(opts)
    return out


def rank_classification_postprocessor(output, example: Mapping | None = None,
                                      is_target: bool = False):
    """Targets of a scoring task become `((example, option), is_correct)`; predictions pass."""
    if is_target:
        if example is None:
            raise ValueError("rank_classification_postprocessor needs the example for targets.")
        return (tuple(int(v) for v in example["idx"]), bool(example["is_correct"]))
    return output


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse spaces (SQuAD normalization)."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(target: str, prediction: str) -> float:
    return float(normalize_answer(target) == normalize_answer(prediction))


def f1(target: str, prediction: str) -> float:
    """Token-overlap F1 of the normalized strings (1.0 when both are empty)."""
    t, p = normalize_answer(target).split(), normalize_answer(prediction).split()
    if not t or not p:
        return float(t == p)
    common = sum((collections.Counter(t) & collections.Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{'exact_match': %, 'f1': %} averaged over examples."""
    if len(targets) != len(predictions):
        raise ValueError(f"Got {len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        return {"exact_match": 0.0, "f1": 0.0}
    return {"exact_match": 100.0 * float(np.mean([exact_match(t, p) for t, p in
                                                  zip(targets, predictions)])),
            "f1": 100.0 * float(np.mean([f1(t, p) for t, p in zip(targets, predictions)]))}
