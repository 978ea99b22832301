"""STraTA task augmentation: synthesize in-domain NLI data for the auxiliary model.

Vu et al. (2021), §2: an NLI data generator, an encoder-decoder finetuned to map
"label + premise -> hypothesis", reads unlabeled sentences of the target task as premises and,
for every NLI label, samples hypotheses with top-k sampling. The generator over-generates
(`num_samples` hypotheses per premise and label); an NLI classifier then keeps only the
candidates it labels *consistently* (its argmax label is the label the hypothesis was generated
for) and *confidently* (that label's probability is at least `threshold`). The kept triples are
written as text-to-text NLI examples and registered as a SeqIO task; the auxiliary model is the
pretrained model finetuned on it (`moetx.pipelines.strata.run`).

The generator and the classifier are plain functions here (`SampleFn`, `ClassifyFn`), so the
formatting and the filter are tested with stubs; `moetx.pipelines.strata.backend` provides the
trainer-backed ones (top-k decoding and rank classification of a checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from moetx.pipelines.strata import data

#: NLI labels, in the order of the classifier's probability columns.
NLI_LABELS = ("entailment", "neutral", "contradiction")

#: inputs -> one sampled output string per input (a generator checkpoint with top-k sampling).
SampleFn = Callable[[Sequence[str]], list[str]]
#: (inputs, options) -> <float>[len(inputs), len(options)] probabilities (rows sum to 1).
ClassifyFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def generator_input(label: str, premise: str) -> str:
    """Input of the NLI data generator: the label to realise, then the premise."""
    return f"nli generate {label} premise: {data.clean_text(premise)}"


def classifier_input(premise: str, hypothesis: str) -> str:
    """Input of the text-to-text NLI classifier (T5's MNLI order: hypothesis first, so a long
    premise is what truncation cuts)."""
    return f"nli hypothesis: {data.clean_text(hypothesis)} premise: {data.clean_text(premise)}"


def generator_examples(records: Sequence[dict]) -> list[data.Example]:
    """Generator training pairs (label + premise -> hypothesis) from NLI records with
    'premise', 'hypothesis' and 'label' (a name in NLI_LABELS or its index)."""
    return [(generator_input(nli_label(r["label"]), r["premise"]), r["hypothesis"])
            for r in records]


def classifier_examples(records: Sequence[dict]) -> list[data.Example]:
    """Classifier training pairs (premise + hypothesis -> label name) from NLI records."""
    return [(classifier_input(r["premise"], r["hypothesis"]), nli_label(r["label"]))
            for r in records]


def nli_label(label: str | int) -> str:
    """The label name of an NLI record's label (a name, or an index into NLI_LABELS)."""
    if isinstance(label, (int, np.integer)) and 0 <= int(label) < len(NLI_LABELS):
        return NLI_LABELS[int(label)]
    if isinstance(label, str) and label in NLI_LABELS:
        return label
    raise ValueError(f"Unknown NLI label {label!r}; expected one of {list(NLI_LABELS)} or its "
                     "index 0..2.")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A generated NLI example: the hypothesis sampled for (premise, label)."""

    premise: str
    label: str
    hypothesis: str


def generate_candidates(premises: Sequence[str], sample_fn: SampleFn,
                        labels: Sequence[str] = NLI_LABELS, num_samples: int = 4
                        ) -> list[Candidate]:
    """Over-generates: `num_samples` sampled hypotheses for every premise and label.

    The generator is asked `len(premises) * len(labels) * num_samples` times, in the order
    premise, label, sample. Empty outputs, copies of the premise and repeats of a
    (premise, label, hypothesis) triple are dropped.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    keys = [(p, lab) for p in premises for lab in labels for _ in range(num_samples)]
    outputs = sample_fn([generator_input(lab, p) for p, lab in keys])
    if len(outputs) != len(keys):
        raise ValueError(f"The generator returned {len(outputs)} outputs for {len(keys)} "
                         "inputs; a SampleFn must return one output per input.")
    seen, out = set(), []
    for (premise, label), hyp in zip(keys, outputs):
        hyp = data.clean_text(hyp)
        key = (premise, label, hyp)
        if not hyp or hyp == data.clean_text(premise) or key in seen:
            continue
        seen.add(key)
        out.append(Candidate(premise, label, hyp))
    return out


def filter_candidates(candidates: Sequence[Candidate], classify_fn: ClassifyFn,
                      threshold: float = 0.9, labels: Sequence[str] = NLI_LABELS
                      ) -> tuple[list[Candidate], np.ndarray]:
    """Keeps the candidates the NLI classifier labels consistently and confidently.

    A candidate is kept when the classifier's most probable label is the one it was generated
    for and that probability is >= `threshold`.

    Returns:
      (kept candidates in input order, <float>[len(candidates), len(labels)] probabilities).
    """
    if not candidates:
        return [], np.zeros((0, len(labels)))
    probs = np.asarray(classify_fn([classifier_input(c.premise, c.hypothesis)
                                    for c in candidates], list(labels)), np.float64)
    if probs.shape != (len(candidates), len(labels)):
        raise ValueError(f"The classifier returned probabilities of shape {probs.shape}; "
                         f"expected {(len(candidates), len(labels))}.")
    predicted = probs.argmax(-1)
    intended = np.array([list(labels).index(c.label) for c in candidates])
    confident = probs[np.arange(len(candidates)), predicted] >= threshold
    keep = (predicted == intended) & confident
    return [c for c, k in zip(candidates, keep) if k], probs


@dataclasses.dataclass
class SyntheticNLI:
    """What `synthesize` produced: the registered task, its files and the filter's counts."""

    task_name: str
    files: dict[str, str]
    num_premises: int
    num_candidates: int
    num_kept: int
    kept_per_label: dict[str, int]


def synthesize(
    unlabeled_texts: Sequence[str],
    sample_fn: SampleFn,
    classify_fn: ClassifyFn,
    output_dir: str,
    task_name: str,
    num_premises: int = 200,
    num_samples: int = 4,
    threshold: float = 0.9,
    validation_fraction: float = 0.1,
    extra_train_examples: Sequence[data.Example] = (),
    seed: int = 0,
    vocabulary=None,
) -> SyntheticNLI:
    """Task augmentation end to end: premises -> candidates -> filter -> files -> SeqIO task.

    Args:
      unlabeled_texts: in-domain sentences of the target task; `num_premises` of them are drawn
        (seeded) as premises.
      sample_fn, classify_fn: the generator (top-k sampling) and the NLI classifier.
      output_dir: gets `candidates.tsv` (every generated triple with the classifier's
        probabilities), `train.tsv` and `validation.tsv` (the kept examples as text-to-text NLI
        classification).
      task_name: SeqIO task registered over train.tsv / validation.tsv.
      extra_train_examples: added to the train split (e.g. the original NLI data, as the paper
        trains the auxiliary model on synthetic data plus MNLI).
      validation_fraction: share of the kept examples held out as the validation split.
    """
    texts = [t for t in (data.clean_text(t) for t in unlabeled_texts) if t]
    if not texts:
        raise ValueError("Task augmentation needs unlabeled in-domain text; got none.")
    rng = random.Random(seed)
    premises = rng.sample(texts, min(num_premises, len(texts)))
    candidates = generate_candidates(premises, sample_fn, NLI_LABELS, num_samples)
    kept, probs = filter_candidates(candidates, classify_fn, threshold)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "candidates.tsv"), "w", encoding="utf-8") as f:
        f.write("premise\tlabel\thypothesis\t" + "\t".join(f"p_{lab}" for lab in NLI_LABELS)
                + "\n")
        for c, p in zip(candidates, probs):
            f.write(f"{c.premise}\t{c.label}\t{c.hypothesis}\t"
                    + "\t".join(f"{x:.4f}" for x in p) + "\n")
    if not kept and not extra_train_examples:
        raise ValueError(
            f"The NLI classifier kept none of the {len(candidates)} generated candidates at "
            f"threshold {threshold}; lower the threshold, sample more, or train the generator "
            f"and classifier longer (see {output_dir}/candidates.tsv).")
    examples = [(classifier_input(c.premise, c.hypothesis), c.label) for c in kept]
    rng.shuffle(examples)
    n_val = int(round(len(examples) * validation_fraction))
    validation, train = examples[:n_val], examples[n_val:] + list(extra_train_examples)
    rng.shuffle(train)
    files = {"train": os.path.join(output_dir, "train.tsv")}
    data.write_examples(files["train"], train)
    if validation:
        files["validation"] = os.path.join(output_dir, "validation.tsv")
        data.write_examples(files["validation"], validation)
    data.register_examples_task(task_name, files, vocabulary)
    return SyntheticNLI(task_name, files, len(premises), len(candidates), len(kept),
                        dict(Counter(c.label for c in kept)))
