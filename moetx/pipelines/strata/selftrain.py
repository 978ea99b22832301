"""STraTA self-training (Vu et al. 2021, §3; `google-research/STraTA/selftraining.py`).

Iteration 0 finetunes the auxiliary model on the few labeled examples. Every later iteration
**restarts from the auxiliary model** (not from the previous iteration's model) and trains on
the labeled examples plus the pseudo-labeled set of the previous iteration. After training, the
iteration's model:

1. scores the dev set: accuracy `acc = correct / num_dev`;
2. pseudo-labels *all* N unlabeled examples with hard labels (its argmax class);
3. keeps the `floor(acc * N)` most confident of them (probability of the argmax class), computed
   as `correct * N // num_dev` so no float rounding changes the count;
4. shuffles them (seeded) and writes them to `iter_<k>/pseudo_labeled.tsv`.

Iteration k+1 registers its SeqIO task from the files on disk: the labeled file plus
`iter_<k>/pseudo_labeled.tsv`. The loop stops after `patience` iterations without a dev
improvement of more than `min_delta`, or after `max_iterations` iterations (iteration 0
included); the reported model is the one with the best dev accuracy.

Finetuning and prediction are injected (`FinetuneFn`, `PredictFn`): the trainer-backed ones are
in `moetx.pipelines.strata.backend`, and a stub makes the loop testable in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections.abc import Callable, Sequence

import numpy as np

from moetx.pipelines.strata import data

#: (init_checkpoint, task_name, model_dir) -> the finetuned checkpoint (directory).
FinetuneFn = Callable[[str, str, str], str]
#: (checkpoint, inputs) -> <float>[len(inputs), num_classes] class probabilities.
PredictFn = Callable[[str, Sequence[str]], np.ndarray]


@dataclasses.dataclass
class IterationResult:
    """One self-training iteration.

    Attributes:
      iteration: 0 for the labeled-only finetune.
      init_checkpoint: what the finetune started from (always the auxiliary model).
      checkpoint: the finetuned model.
      task_name: the SeqIO task it was trained on.
      train_files: the files of that task's train split.
      num_pseudo_labeled: pseudo-labeled examples in its training data.
      dev_accuracy, test_accuracy: of the finetuned model (test None without a test set).
      num_kept: pseudo-labels it produced for the next iteration (floor(dev_acc * N)).
      pseudo_labeled_file: where they were written.
    """

    iteration: int
    init_checkpoint: str
    checkpoint: str
    task_name: str
    train_files: list[str]
    num_pseudo_labeled: int
    dev_accuracy: float
    test_accuracy: float | None
    num_kept: int
    pseudo_labeled_file: str


@dataclasses.dataclass
class SelfTrainingResult:
    iterations: list[IterationResult]
    best_iteration: int
    stop_reason: str

    @property
    def best(self) -> IterationResult:
        return self.iterations[self.best_iteration]


def accuracy_counts(probs: np.ndarray, gold: Sequence[int]) -> int:
    """Number of rows whose argmax is the gold class index."""
    return int(np.sum(np.asarray(probs).argmax(-1) == np.asarray(gold)))


def num_to_keep(correct: int, num_dev: int, num_unlabeled: int) -> int:
    """floor(acc * N) with acc = correct / num_dev, in exact integer arithmetic."""
    return correct * num_unlabeled // num_dev


def select_pseudo_labels(probs: np.ndarray, num_keep: int) -> list[tuple[int, int, float]]:
    """The `num_keep` most confident hard pseudo-labels.

    Args:
      probs: <float>[N, num_classes] class probabilities of the unlabeled examples.
      num_keep: how many to keep.

    Returns:
      (example index, argmax class, its probability) by decreasing probability; ties keep the
      lower index first.
    """
    probs = np.asarray(probs)
    labels = probs.argmax(-1)
    conf = probs[np.arange(len(probs)), labels]
    order = np.argsort(-conf, kind="stable")[:num_keep]
    return [(int(i), int(labels[i]), float(conf[i])) for i in order]


def self_train(
    labeled: Sequence[data.Example],
    unlabeled_inputs: Sequence[str],
    dev: Sequence[data.Example],
    options: Sequence[str],
    aux_checkpoint: str,
    work_dir: str,
    finetune_fn: FinetuneFn,
    predict_fn: PredictFn,
    test: Sequence[data.Example] = (),
    task_prefix: str = "strata",
    max_iterations: int = 100,
    patience: int = 3,
    min_delta: float = 0.0,
    seed: int = 0,
    vocabulary=None,
    log: Callable[[str], None] | None = None,
) -> SelfTrainingResult:
    """Runs the STraTA self-training loop; see the module docstring.

    Args:
      labeled, dev, test: (inputs, target) examples; every target must be one of `options`.
      unlabeled_inputs: the unlabeled pool (model inputs).
      options: the class label strings, in the order of `predict_fn`'s columns.
      aux_checkpoint: the auxiliary model every iteration starts from.
      work_dir: gets `labeled.tsv`, `dev.tsv`, and `iter_<k>/{model, pseudo_labeled.tsv}`.
      finetune_fn, predict_fn: see `FinetuneFn`, `PredictFn`.
      task_prefix: iteration k's SeqIO task is `<task_prefix>_iter<k>`.
      max_iterations: at most this many iterations (iteration 0 included).
      patience: stop after this many iterations without a dev improvement > `min_delta`.
      seed: shuffles the pseudo-labeled files.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    options = list(options)
    for name, split in (("labeled", labeled), ("dev", dev), ("test", test)):
        bad = sorted({t for _, t in split if t not in options})
        if bad:
            raise ValueError(f"{name} examples have targets {bad} that are not among the "
                             f"options {options}.")
    if not labeled or not dev:
        raise ValueError(f"Self-training needs labeled and dev examples; got {len(labeled)} "
                         f"labeled and {len(dev)} dev.")
    if max_iterations < 1 or patience < 1:
        raise ValueError(f"max_iterations and patience must be >= 1, got {max_iterations} and "
                         f"{patience}.")
    os.makedirs(work_dir, exist_ok=True)
    labeled_file = os.path.join(work_dir, "labeled.tsv")
    dev_file = os.path.join(work_dir, "dev.tsv")
    data.write_examples(labeled_file, labeled)
    data.write_examples(dev_file, dev)
    dev_gold = [options.index(t) for _, t in dev]
    test_gold = [options.index(t) for _, t in test]
    unlabeled_inputs = list(unlabeled_inputs)
    n_dev, n_unl = len(dev), len(unlabeled_inputs)

    results: list[IterationResult] = []
    best, since_best, stop_reason = -1.0, 0, "max_iterations"
    previous_pseudo: str | None = None
    for it in range(max_iterations):
        iter_dir = os.path.join(work_dir, f"iter_{it}")
        os.makedirs(iter_dir, exist_ok=True)
        train_files = [labeled_file] + ([previous_pseudo] if previous_pseudo else [])
        task_name = f"{task_prefix}_iter{it}"
        data.register_examples_task(task_name, {"train": train_files, "validation": dev_file},
                                    vocabulary)
        num_pseudo = len(data.read_examples(previous_pseudo)) if previous_pseudo else 0
        checkpoint = finetune_fn(aux_checkpoint, task_name, os.path.join(iter_dir, "model"))

        # One prediction call for dev, unlabeled and test: the model is loaded once.
        inputs = [x for x, _ in dev] + unlabeled_inputs + [x for x, _ in test]
        probs = np.asarray(predict_fn(checkpoint, inputs))
        if probs.shape != (len(inputs), len(options)):
            raise ValueError(f"predict_fn returned shape {probs.shape}; expected "
                             f"{(len(inputs), len(options))}.")
        dev_probs, unl_probs = probs[:n_dev], probs[n_dev:n_dev + n_unl]
        correct = accuracy_counts(dev_probs, dev_gold)
        dev_acc = correct / n_dev
        test_acc = (accuracy_counts(probs[n_dev + n_unl:], test_gold) / len(test)
                    if test else None)

        keep = num_to_keep(correct, n_dev, n_unl)
        chosen = select_pseudo_labels(unl_probs, keep)
        pseudo = [(unlabeled_inputs[i], options[c]) for i, c, _ in chosen]
        random.Random(seed + it).shuffle(pseudo)
        pseudo_file = os.path.join(iter_dir, "pseudo_labeled.tsv")
        data.write_examples(pseudo_file, pseudo)

        results.append(IterationResult(it, aux_checkpoint, checkpoint, task_name, train_files,
                                       num_pseudo, dev_acc, test_acc, keep, pseudo_file))
        with open(os.path.join(iter_dir, "result.json"), "w") as f:
            json.dump(dataclasses.asdict(results[-1]), f, indent=2)
        log(f"[strata] iteration {it}: trained on {len(labeled)} labeled + {num_pseudo} "
            f"pseudo-labeled | dev acc {dev_acc:.4f}"
            + (f" | test acc {test_acc:.4f}" if test_acc is not None else "")
            + f" | kept {keep}/{n_unl} pseudo-labels")

        if dev_acc > best + min_delta:
            best, since_best = dev_acc, 0
        else:
            since_best += 1
            if since_best >= patience:
                stop_reason = "patience"
                break
        previous_pseudo = pseudo_file
        if keep == 0:
            # Nothing to add: the next iteration would repeat iteration 0's training data.
            stop_reason = "no_pseudo_labels"
            break

    best_iteration = max(range(len(results)), key=lambda i: (results[i].dev_accuracy, -i))
    return SelfTrainingResult(results, best_iteration, stop_reason)
