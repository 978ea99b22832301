"""The STraTA self-training loop with stub finetune/predict functions (milliseconds per run)."""

import os
import re

import numpy as np
import pytest
import seqio

from moetx.pipelines.strata import data, selftrain

OPTIONS = ["neg", "pos"]
DEV = [(f"dev {i}", OPTIONS[i % 2]) for i in range(10)]
TEST = [(f"test {i}", OPTIONS[i % 2]) for i in range(4)]
LABELED = [("good one", "pos"), ("bad one", "neg")]
UNLABELED = [f"unlabeled {i}" for i in range(7)]
# Dev accuracy of iteration k's model (the stub gets exactly this many dev rows right).
DEV_ACC = [0.6, 0.8, 0.7, 0.8, 0.5, 0.9]


class Stub:
    """finetune_fn / predict_fn pair: iteration k's model has dev accuracy DEV_ACC[k] and seeded
    random probabilities on the unlabeled pool."""

    def __init__(self):
        self.finetune_calls = []

    def finetune(self, init_checkpoint, task_name, model_dir):
        self.finetune_calls.append((init_checkpoint, task_name, model_dir))
        return model_dir

    @staticmethod
    def unlabeled_probs(iteration):
        p = np.random.RandomState(iteration).uniform(0.05, 0.95, len(UNLABELED))
        return np.stack([1 - p, p], -1)

    def predict(self, checkpoint, inputs):
        k = int(re.search(r"iter_(\d+)", checkpoint).group(1))
        assert list(inputs) == [x for x, _ in DEV] + UNLABELED + [x for x, _ in TEST]
        n_right = round(DEV_ACC[k] * len(DEV))
        dev = np.array([[0.1, 0.9] if (OPTIONS.index(t) == 1) == (i < n_right) else [0.9, 0.1]
                        for i, (_, t) in enumerate(DEV)])
        test = np.tile([[0.3, 0.7]], (len(TEST), 1))
        return np.concatenate([dev, self.unlabeled_probs(k), test])


def run(tmp_path, **kw):
    stub = Stub()
    kw = {"max_iterations": 10, "patience": 2, **kw}
    result = selftrain.self_train(
        LABELED, UNLABELED, DEV, OPTIONS, "AUX", str(tmp_path), stub.finetune, stub.predict,
        test=TEST, task_prefix="strata_test", vocabulary=seqio.ByteVocabulary(),
        log=lambda m: None, **kw)
    return stub, result


def test_every_iteration_restarts_from_the_auxiliary_model(tmp_path):
    stub, result = run(tmp_path)
    assert [c[0] for c in stub.finetune_calls] == ["AUX"] * len(result.iterations)
    assert [it.init_checkpoint for it in result.iterations] == ["AUX"] * len(result.iterations)
    assert [c[1] for c in stub.finetune_calls] == [
        f"strata_test_iter{k}" for k in range(len(result.iterations))]


def test_patience_stops_after_two_iterations_without_improvement(tmp_path):
    # dev acc 0.6, 0.8 (best), 0.7, 0.8 (not better): the 2nd non-improvement is iteration 3.
    _, result = run(tmp_path, patience=2)
    assert len(result.iterations) == 4 and result.stop_reason == "patience"
    assert result.best_iteration == 1
    assert [it.dev_accuracy for it in result.iterations] == DEV_ACC[:4]
    assert result.best.test_accuracy == 0.5
    # patience 3 lets iteration 4 (0.5) run and stops there; max_iterations caps it earlier.
    _, result = run(tmp_path / "p3", patience=3)
    assert len(result.iterations) == 5
    _, result = run(tmp_path / "max", patience=5, max_iterations=3)
    assert len(result.iterations) == 3 and result.stop_reason == "max_iterations"


def test_keeps_the_floor_acc_times_n_most_confident_hard_labels(tmp_path):
    _, result = run(tmp_path)
    for it in result.iterations:
        acc = DEV_ACC[it.iteration]
        assert it.num_kept == int(np.floor(acc * len(UNLABELED) + 1e-9))  # 4, 5, 4, 5
        probs = Stub.unlabeled_probs(it.iteration)
        top = np.argsort(-probs.max(-1))[:it.num_kept]
        expected = {(UNLABELED[i], OPTIONS[int(probs[i].argmax())]) for i in top}
        written = data.read_examples(it.pseudo_labeled_file)
        assert len(written) == it.num_kept and set(written) == expected
    assert [it.num_kept for it in result.iterations] == [4, 5, 4, 5]


def test_num_to_keep_is_exact_where_float_floor_is_not():
    assert int(0.29 * 100) == 28  # the float trap int(acc * N) falls into
    assert selftrain.num_to_keep(29, 100, 100) == 29
    assert selftrain.num_to_keep(7, 10, 7) == 4


def test_select_pseudo_labels_orders_by_confidence_and_breaks_ties_by_index():
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6], [0.1, 0.9], [0.8, 0.2]])
    assert selftrain.select_pseudo_labels(probs, 3) == [(1, 0, 0.9), (3, 1, 0.9), (0, 1, 0.8)]


def test_each_iteration_trains_on_the_files_the_previous_one_wrote(tmp_path):
    _, result = run(tmp_path)
    labeled_file = str(tmp_path / "labeled.tsv")
    assert result.iterations[0].train_files == [labeled_file]
    for prev, it in zip(result.iterations, result.iterations[1:]):
        assert it.train_files == [labeled_file, prev.pseudo_labeled_file]
        assert it.num_pseudo_labeled == prev.num_kept
    for it in result.iterations:
        assert os.path.isfile(os.path.join(tmp_path, f"iter_{it.iteration}", "result.json"))

    # Iteration 2's task, read back through SeqIO: the labeled examples + iteration 1's 5
    # pseudo-labels, tokenized with EOS.
    task = seqio.get_mixture_or_task("strata_test_iter2")
    ds = task.get_dataset({"inputs": 64, "targets": 8}, split="train", shuffle=False)
    vocab = seqio.ByteVocabulary()
    got = {(vocab.decode(ex["inputs"][:-1].tolist()), vocab.decode(ex["targets"][:-1].tolist()))
           for ex in ds.as_numpy_iterator()}
    assert all(ex_eos == 1 for ex_eos in [ex["targets"][-1] for ex in ds.as_numpy_iterator()])
    assert got == set(LABELED) | set(data.read_examples(result.iterations[1].pseudo_labeled_file))
    assert len(got) == 2 + 5


def test_bad_targets_are_reported(tmp_path):
    with pytest.raises(ValueError, match="not among the options"):
        selftrain.self_train([("x", "maybe")], UNLABELED, DEV, OPTIONS, "AUX", str(tmp_path),
                             Stub().finetune, Stub().predict, vocabulary=seqio.ByteVocabulary())
