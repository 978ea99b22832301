"""The STraTA pipeline's wiring (which model each finetune starts from and trains on), with a
stub backend and toy records, and its command line."""

import json
import os

import numpy as np
import pytest

from moetx.pipelines.strata import augment, run

LABELS = ["ham", "spam"]


def toy_records(name):
    if name == "nli":
        return {s: [{"premise": f"P{i}.", "hypothesis": f"H{i}.", "label": LABELS_NLI[i % 3]}
                    for i in range(6)] for s in ("train", "validation", "test")}
    rec = lambda n, tag: [{"text": f"{tag} {i} {LABELS[i % 2]} mail. It is fine here.",  # noqa
                           "label": LABELS[i % 2]} for i in range(n)]
    return {"train": rec(20, "train"), "validation": rec(8, "val"), "test": rec(8, "test"),
            "unlabeled": [{"text": f"pool {i} {LABELS[i % 2]} mail. Second sentence is here."}
                          for i in range(10)]}


LABELS_NLI = augment.NLI_LABELS


class StubBackend:
    """Records finetunes; classifies by the label word in the text (NLI: in the hypothesis);
    the generator writes '<label> hypothesis <n>'."""

    def __init__(self):
        self.finetunes = []
        self.n = 0

    def finetune(self, init, task, model_dir, seed=0, train_steps=None):
        self.finetunes.append((init, task, os.path.basename(model_dir), train_steps))
        os.makedirs(model_dir, exist_ok=True)
        return model_dir

    def classify(self, checkpoint, inputs, options):
        out = np.full((len(inputs), len(options)), 0.05 / max(len(options) - 1, 1))
        for r, x in enumerate(inputs):
            words = x.split("premise:")[0].split()
            hit = [i for i, o in enumerate(options) if o in words]
            out[r] = 1.0 / len(options) if not hit else out[r]
            if hit:
                out[r, hit[0]] = 0.95
        return out

    def sample(self, checkpoint, inputs, topk=40, temperature=1.0):
        self.n += len(inputs)
        return [f"{x.split()[2]} hypothesis {i}" for i, x in enumerate(inputs)]


def test_pipeline_wiring(tmp_path):
    be = StubBackend()
    out = run.run_pipeline(
        output_dir=str(tmp_path), pretrained_checkpoint="PRE", backend=be, target_task="toy",
        nli_task="nli", seeds=(0, 1), shots_per_class=2, dev_per_class=4, test_per_class=4,
        num_unlabeled=10, num_premises=3, num_samples=2, aux_nli_examples=4, max_iterations=3,
        patience=1, nli_steps=7, aux_steps=8, target_steps=9, load_records=toy_records)
    fts = be.finetunes
    assert fts[:3] == [("PRE", "strata_nli_generator", "generator", 7),
                       ("PRE", "strata_nli_classifier", "classifier", 7),
                       ("PRE", "strata_toy_synthetic_nli", "auxiliary", 8)]
    aux = os.path.join(str(tmp_path), "augment", "auxiliary")
    per_seed = fts[3:]
    # Seed 0: the baseline from the pretrained model, then self-training from the auxiliary
    # model; the stub classifier is perfect, so iteration 1 does not improve (patience 1).
    assert per_seed[:3] == [("PRE", "strata_toy_s0_baseline_iter0", "model", 9),
                            (aux, "strata_toy_s0_iter0", "model", 9),
                            (aux, "strata_toy_s0_iter1", "model", 9)]
    assert len(per_seed) == 6
    # 3 premises (from the pool's sentences) x 3 labels x 2 samples, all kept by the stub.
    assert be.n == 18
    assert out["augmentation"]["num_kept"] == 18
    assert out["augmentation"]["kept_per_label"] == {lab: 6 for lab in LABELS_NLI}
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["mean_test_accuracy"] == {"baseline": 1.0, "task_augmentation": 1.0,
                                           "self_training": 1.0}
    assert saved["seeds"]["1"]["self_training"]["stop_reason"] == "patience"
    # A second run reuses every finished finetune (DONE markers) and the synthetic data.
    be2 = StubBackend()
    run.run_pipeline(
        output_dir=str(tmp_path), pretrained_checkpoint="PRE", backend=be2, target_task="toy",
        nli_task="nli", seeds=(0,), shots_per_class=2, dev_per_class=4, test_per_class=4,
        num_unlabeled=10, load_records=toy_records, max_iterations=2, patience=1)
    assert be2.finetunes == [] and be2.n == 0
    # The ablation: self-training from the pretrained model continues the baseline's directory
    # (its iteration 0 is reused) and merges into results.json.
    be3 = StubBackend()
    out = run.run_pipeline(
        output_dir=str(tmp_path), pretrained_checkpoint="PRE", backend=be3, target_task="toy",
        nli_task="nli", seeds=(0,), shots_per_class=2, dev_per_class=4, test_per_class=4,
        num_unlabeled=10, load_records=toy_records, max_iterations=3, patience=1,
        stages=("selftrain_pretrained",), target_steps=9)
    assert be3.finetunes == [("PRE", "strata_toy_s0_baseline_iter1", "model", 9)]
    assert set(out["seeds"]["0"]) == {"baseline", "task_augmentation", "self_training",
                                      "self_training_without_augmentation"}
    assert set(out["seeds"]["1"]) == {"baseline", "task_augmentation", "self_training"}


def test_helpers():
    assert run.premise_sentences(["One two three four. Short. Five six seven eight!",
                                  "One two three four."]) == [
        "One two three four.", "Five six seven eight!"]
    recs = [{"label": "a"}] * 5 + [{"label": "b"}] * 2
    sample = run.balanced_sample(recs, ["a", "b"], 3, seed=0)
    assert sorted(r["label"] for r in sample) == ["a", "a", "b", "b"]


def test_command_line_reports_missing_bindings(clean_gin, capsys):
    from moetx.cli import strata as cli_strata

    rc = cli_strata.main(["--gin_file=models/t5_demo.gin", "--gin_file=runs/strata.gin"])
    assert rc == 2
    assert "missing required gin binding(s): OUTPUT_DIR, PRETRAINED_CHECKPOINT" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="add 'augment' to STAGES"):
        run.run_pipeline(output_dir="/tmp/x", pretrained_checkpoint="P", backend=StubBackend(),
                         stages=("selftrain",), load_records=toy_records)
