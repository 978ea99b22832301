"""The STraTA pipeline from gin: few-shot baseline, task augmentation, self-training.

    python -m moetx.cli.strata --gin_file=models/t5_demo.gin --gin_file=runs/strata.gin \\
      --gin.OUTPUT_DIR="'runs/strata_spam'" \\
      --gin.PRETRAINED_CHECKPOINT="'runs/demo_t5/checkpoint_400'" --gin.TARGET_TASK="'spam'"

Stages (every finetune starts from the parameters of a checkpoint, which is never modified):

1. `augment` (shared by all seeds): finetune an NLI data generator (label + premise ->
   hypothesis) and a text-to-text NLI classifier on the NLI task; sample hypotheses (top-k)
   for sentences of the target task's unlabeled pool; keep the consistent, confident ones
   (`augment.synthesize`); finetune the auxiliary model on them (plus some original NLI data).
2. per seed, `baseline`: finetune the pretrained model on SHOTS_PER_CLASS labels per class.
3. per seed, `selftrain`: `selftrain.self_train` from the auxiliary model; its iteration 0 is
   "+ task augmentation", its best-dev iteration "+ self-training".
4. per seed, `selftrain_pretrained` (an ablation, not in the default STAGES): self-training from
   the pretrained model, without task augmentation; its iteration 0 is the baseline's model.

Dev and test sets are class-balanced samples of the task's validation and test splits (so chance
is 1/num_classes); the unlabeled pool is the task's 'unlabeled' split. Writes
`OUTPUT_DIR/results.json` (merged with what an earlier run with other stages wrote there) and
prints the mean test accuracies. A finetune whose model
directory holds a `DONE` marker is reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os

import dataclasses
import functools
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence

import gin
import numpy as np

from moetx.pipelines.strata import augment, data, selftrain

STAGES = ("baseline", "augment", "selftrain", "selftrain_pretrained")
DEFAULT_STAGES = ("baseline", "augment", "selftrain")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_flan_records(name: str) -> dict[str, list[dict]]:
    """Records of an offline dataset of `moetx.datasets.flan_sources` (fetched on first use)."""
    # Imported only when used; the FLAN package registers gin configurables on import.
    with gin.unlock_config():
        from moetx.datasets import flan_sources as sources

    return sources.load_records(name)


def target_input(task: str, text: str) -> str:
    """Text-to-text input of the target classification task."""
    return f"{task} text: {data.clean_text(text)}"


def premise_sentences(texts: Sequence[str], min_words: int = 4, max_words: int = 40
                      ) -> list[str]:
    """Distinct sentences of `texts` with `min_words`..`max_words` words (NLI premises)."""
    seen, out = set(), []
    for text in texts:
        for s in _SENTENCE_END.split(data.clean_text(text)):
            if min_words <= len(s.split()) <= max_words and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def balanced_sample(records: Sequence[dict], labels: Sequence[str], per_class: int,
                    seed: int) -> list[dict]:
    """`per_class` records of each label (fewer if the class is smaller: then every class gets
    the smallest class's count), drawn with `seed`, in a seeded shuffled order."""
    by_label = {lab: [r for r in records if r["label"] == lab] for lab in labels}
    n = min([per_class] + [len(v) for v in by_label.values()])
    if n == 0:
        raise ValueError(f"A class has no examples: counts "
                         f"{ {k: len(v) for k, v in by_label.items()} }.")
    rng = random.Random(seed)
    out = [r for lab in labels for r in rng.sample(by_label[lab], n)]
    rng.shuffle(out)
    return out


def _finetune_once(finetune: Callable, init: str, task: str, model_dir: str, **kw) -> str:
    marker = os.path.join(model_dir, "DONE")
    if os.path.exists(marker):
        _log(f"[strata] reusing {model_dir}")
        return model_dir
    t0 = time.time()
    out = finetune(init, task, model_dir, **kw)
    with open(marker, "w") as f:
        f.write(f"{time.time() - t0:.1f}s\n")
    return out


@gin.configurable(module="moetx.pipelines.strata")
def run_pipeline(
    output_dir: str = gin.REQUIRED,
    pretrained_checkpoint: str = gin.REQUIRED,
    backend=gin.REQUIRED,
    target_task: str = "spam",
    nli_task: str = "wordnet_nli",
    stages: Sequence[str] = DEFAULT_STAGES,
    seeds: Sequence[int] = (0, 1, 2),
    shots_per_class: int = 8,
    dev_per_class: int = 100,
    test_per_class: int = 200,
    num_unlabeled: int = 400,
    nli_steps: int = 150,
    aux_steps: int = 150,
    target_steps: int = 100,
    num_premises: int = 150,
    num_samples: int = 3,
    topk: int = 40,
    temperature: float = 1.0,
    threshold: float = 0.7,
    aux_nli_examples: int = 2000,
    max_iterations: int = 3,
    patience: int = 2,
    min_delta: float = 0.0,
    load_records: Callable[[str], dict] = load_flan_records,
) -> dict:
    """Runs the STraTA stages (see the module docstring); returns and writes the results.

    Args:
      output_dir: everything goes here (models, TSV files, results.json).
      pretrained_checkpoint: a `checkpoint_<step>` directory (or a model directory).
      backend: a `TrainerBackend` (finetune / classify / sample).
      target_task, nli_task: dataset names for `load_records` (records with 'text'/'label' and
        an 'unlabeled' split; 'premise'/'hypothesis'/'label').
      stages: a subset of STAGES; 'selftrain' needs 'augment'.
      seeds: one few-shot sample and self-training run per seed.
      shots_per_class: labeled examples per class.
      dev_per_class, test_per_class: balanced dev and test sizes per class.
      num_unlabeled: size of the unlabeled pool drawn (fixed seed) from the 'unlabeled' split.
      nli_steps, aux_steps, target_steps: finetuning steps of the NLI generator and classifier,
        of the auxiliary model, and of every target-task finetune.
      num_premises, num_samples, topk, temperature, threshold: task augmentation (premises
        drawn from the unlabeled pool's sentences; hypotheses per premise and label; top-k
        sampling; the classifier's confidence threshold).
      aux_nli_examples: original NLI examples added to the synthetic data of the auxiliary model.
      max_iterations, patience, min_delta: self-training (iteration 0 included).
      load_records: name -> {'train', 'validation', 'test', 'unlabeled'} record lists.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"Unknown STraTA stage(s) {sorted(unknown)}; expected a subset of "
                         f"{list(STAGES)}.")
    if "selftrain" in stages and "augment" not in stages:
        raise ValueError("The 'selftrain' stage starts from the auxiliary model of 'augment'; "
                         "add 'augment' to STAGES.")
    os.makedirs(output_dir, exist_ok=True)
    records = load_records(target_task)
    if "unlabeled" not in records:
        raise ValueError(f"Dataset {target_task!r} has no 'unlabeled' split (splits: "
                         f"{sorted(records)}); STraTA needs an unlabeled in-domain pool.")
    labels = sorted({r["label"] for r in records["train"]})
    dev = [(target_input(target_task, r["text"]), r["label"])
           for r in balanced_sample(records["validation"], labels, dev_per_class, 1234)]
    test = [(target_input(target_task, r["text"]), r["label"])
            for r in balanced_sample(records["test"], labels, test_per_class, 5678)]
    pool = [r["text"] for r in records["unlabeled"]]
    pool = random.Random(0).sample(pool, min(num_unlabeled, len(pool)))
    unlabeled_inputs = [target_input(target_task, t) for t in pool]
    results: dict = {"seeds": {}}
    if os.path.exists(os.path.join(output_dir, "results.json")):
        with open(os.path.join(output_dir, "results.json")) as f:
            results = json.load(f)
    results.update({"target_task": target_task, "labels": labels, "num_dev": len(dev),
                    "num_test": len(test), "num_unlabeled": len(pool),
                    "pretrained_checkpoint": pretrained_checkpoint})
    _log(f"[strata] {target_task}: labels {labels}; {len(dev)} dev, {len(test)} test, "
         f"{len(pool)} unlabeled")
    finetune = functools.partial(_finetune_once, backend.finetune)

    aux_checkpoint = None
    if "augment" in stages:
        aux_checkpoint, results["augmentation"] = _task_augmentation(
            backend, finetune, pretrained_checkpoint, output_dir, target_task, nli_task, pool,
            load_records, nli_steps, aux_steps, num_premises, num_samples, topk, temperature,
            threshold, aux_nli_examples)

    for seed in seeds:
        labeled = [(target_input(target_task, r["text"]), r["label"]) for r in
                   balanced_sample(records["train"], labels, shots_per_class, seed)]
        per_seed = results["seeds"].setdefault(str(seed), {})
        run_dir = os.path.join(output_dir, f"seed_{seed}")
        common = dict(labeled=labeled, unlabeled_inputs=unlabeled_inputs, dev=dev,
                      options=labels, test=test, min_delta=min_delta, seed=seed,
                      finetune_fn=functools.partial(finetune, seed=seed,
                                                    train_steps=target_steps),
                      predict_fn=functools.partial(_classify, backend, labels))
        if "baseline" in stages:
            r = selftrain.self_train(aux_checkpoint=pretrained_checkpoint,
                                     work_dir=os.path.join(run_dir, "baseline"),
                                     task_prefix=f"strata_{target_task}_s{seed}_baseline",
                                     max_iterations=1, patience=1, **common)
            per_seed["baseline"] = _summary(r.iterations[0])
        if "selftrain_pretrained" in stages:
            # The baseline's directory and task names: its iteration 0 is the baseline's model.
            r = selftrain.self_train(aux_checkpoint=pretrained_checkpoint,
                                     work_dir=os.path.join(run_dir, "baseline"),
                                     task_prefix=f"strata_{target_task}_s{seed}_baseline",
                                     max_iterations=max_iterations, patience=patience, **common)
            per_seed["self_training_without_augmentation"] = _self_training_summary(r)
        if "selftrain" in stages:
            r = selftrain.self_train(aux_checkpoint=aux_checkpoint,
                                     work_dir=os.path.join(run_dir, "strata"),
                                     task_prefix=f"strata_{target_task}_s{seed}",
                                     max_iterations=max_iterations, patience=patience, **common)
            per_seed["task_augmentation"] = _summary(r.iterations[0])
            per_seed["self_training"] = _self_training_summary(r)
        _write(output_dir, results)

    results["mean_test_accuracy"] = {
        name: float(np.mean([s[name]["test_accuracy"] for s in results["seeds"].values()]))
        for name in ("baseline", "task_augmentation", "self_training",
                     "self_training_without_augmentation")
        if results["seeds"] and all(name in s for s in results["seeds"].values())}
    _write(output_dir, results)
    _log(f"[strata] mean test accuracy over seeds {sorted(results['seeds'], key=int)}: "
         + ", ".join(f"{k} {v:.4f}" for k, v in results["mean_test_accuracy"].items()))
    return results


def _classify(backend, labels, checkpoint, inputs):
    return backend.classify(checkpoint, inputs, labels)


def _summary(it: selftrain.IterationResult) -> dict:
    return {"iteration": it.iteration, "dev_accuracy": it.dev_accuracy,
            "test_accuracy": it.test_accuracy, "checkpoint": it.checkpoint}


def _self_training_summary(r: selftrain.SelfTrainingResult) -> dict:
    return {**_summary(r.best), "stop_reason": r.stop_reason,
            "dev_accuracy_per_iteration": [it.dev_accuracy for it in r.iterations],
            "test_accuracy_per_iteration": [it.test_accuracy for it in r.iterations]}


def _write(output_dir: str, results: dict) -> None:
    tmp = os.path.join(output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "results.json"))


def _task_augmentation(backend, finetune, pretrained, output_dir, target_task, nli_task, pool,
                       load_records, nli_steps, aux_steps, num_premises, num_samples, topk,
                       temperature, threshold, aux_nli_examples) -> tuple[str, dict]:
    """Stage 1: generator and classifier on NLI, synthetic in-domain NLI, auxiliary model."""
    aug_dir = os.path.join(output_dir, "augment")
    nli = load_records(nli_task)
    for split in ("train", "validation"):
        if split not in nli:
            raise ValueError(f"NLI dataset {nli_task!r} has no {split!r} split.")
    nli_files = {}
    for kind, make in (("generator", augment.generator_examples),
                       ("classifier", augment.classifier_examples)):
        files = {s: os.path.join(aug_dir, f"nli_{kind}_{s}.tsv") for s in ("train", "validation")}
        for s, path in files.items():
            data.write_examples(path, make(nli[s]))
        data.register_examples_task(f"strata_{nli_task}_{kind}", files)
        nli_files[kind] = files
    generator = finetune(pretrained, f"strata_{nli_task}_generator",
                         os.path.join(aug_dir, "generator"), train_steps=nli_steps)
    classifier = finetune(pretrained, f"strata_{nli_task}_classifier",
                          os.path.join(aug_dir, "classifier"), train_steps=nli_steps)
    # How good the filter is: the classifier's accuracy on (a sample of) NLI validation.
    val = data.read_examples(nli_files["classifier"]["validation"])
    val = random.Random(0).sample(val, min(300, len(val)))
    probs = backend.classify(classifier, [x for x, _ in val], list(augment.NLI_LABELS))
    nli_acc = float(np.mean(probs.argmax(-1) == [augment.NLI_LABELS.index(t) for _, t in val]))
    _log(f"[strata] NLI classifier accuracy on {len(val)} {nli_task} validation examples: "
         f"{nli_acc:.4f}")

    synth_dir = os.path.join(aug_dir, "synthetic")
    synth_summary = os.path.join(synth_dir, "summary.json")
    task_name = f"strata_{target_task}_synthetic_nli"
    if os.path.exists(synth_summary):
        _log(f"[strata] reusing the synthetic NLI data in {synth_dir}")
        with open(synth_summary) as f:
            synth = augment.SyntheticNLI(**json.load(f))
        data.register_examples_task(task_name, synth.files)
    else:
        sample_fn = functools.partial(backend.sample, generator, topk=topk,
                                      temperature=temperature)
        classify_fn = functools.partial(backend.classify, classifier)
        extra = data.read_examples(nli_files["classifier"]["train"])
        extra = random.Random(0).sample(extra, min(aux_nli_examples, len(extra)))
        synth = augment.synthesize(
            premise_sentences(pool), sample_fn, classify_fn, synth_dir, task_name,
            num_premises=num_premises, num_samples=num_samples, threshold=threshold,
            extra_train_examples=extra)
        with open(synth_summary, "w") as f:
            json.dump(dataclasses.asdict(synth), f, indent=2)
    _log(f"[strata] task augmentation: {synth.num_candidates} candidates from "
         f"{synth.num_premises} premises, kept {synth.num_kept} {synth.kept_per_label}")
    aux = finetune(pretrained, synth.task_name, os.path.join(aug_dir, "auxiliary"),
                   train_steps=aux_steps)
    summary = {"nli_classifier_accuracy": nli_acc, "num_premises": synth.num_premises,
               "num_candidates": synth.num_candidates, "num_kept": synth.num_kept,
               "kept_per_label": synth.kept_per_label, "aux_nli_examples": aux_nli_examples,
               "auxiliary_checkpoint": aux}
    return aux, summary
