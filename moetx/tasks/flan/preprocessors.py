"""FLAN preprocessors: round-robin template application, rank-classification rows, few-shot.

- `batch_apply_template` (FLAN's `batch_apply_template`): examples are taken in groups of
  N = len(templates) (the last, incomplete group is dropped), template i is applied to the i-th
  example of each group, and the groups are flattened again. Every example gets exactly one
  template, deterministically: 25 examples and 10 templates give 20 examples with templates
  0..9, 0..9.
- `rank_classification_rows`: one row per option (`targets` = the option) with
  `idx = [example index, option index]` and `is_correct`, for scoring every option with the
  model and picking the best (`metrics.rank_classification`).
- `assemble_fewshot` / `fewshot_examples`: k exemplars (from the train split, formatted with
  the same template as the example) before the example's inputs, at most `max_shots` (16) and
  pruned so the assembled inputs stay within a token budget (960 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

from moetx.tasks.flan import templates as templates_lib

__all__ = [
    "DEFAULT_MAX_SHOTS",
    "DEFAULT_TOKEN_BUDGET",
    "FewShotFormat",
    "apply_templates_round_robin",
    "assemble_fewshot",
    "batch_apply_template",
    "fewshot_examples",
    "rank_classification_rows",
    "select_features",
]

DEFAULT_MAX_SHOTS = 16
DEFAULT_TOKEN_BUDGET = 960


def batch_apply_template(dataset: tf.data.Dataset, templates: Sequence[tuple[str, str]],
                         passthrough: Sequence[str] = ()) -> tf.data.Dataset:
    """Applies `templates` round-robin; returns {'inputs', 'targets', 'template_idx', ...}.

    Args:
      dataset: normalized records (dicts of tf.string scalars; 'options' a tf.string [k]).
      templates: (inputs pattern, targets pattern) pairs.
      passthrough: record features copied to the output (e.g. 'options', 'answer').
    """
    n = len(templates)
    if n == 0:
        raise ValueError("batch_apply_template needs at least one template, got none.")

    def fmt(batch):
        inputs, targets = [], []
        for i, (p_in, p_tgt) in enumerate(templates):
            example = {k: v[i] for k, v in batch.items()}
            inputs.append(templates_lib.tf_format(p_in, example))
            targets.append(templates_lib.tf_format(p_tgt, example))
        out = {"inputs": tf.stack(inputs), "targets": tf.stack(targets),
               "template_idx": tf.range(n, dtype=tf.int32)}
        for k in passthrough:
            out[k] = batch[k]
        return out

    return dataset.batch(n, drop_remainder=True).map(
        fmt, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def apply_templates_round_robin(records: Sequence[Mapping], templates: Sequence[tuple[str, str]]
                                ) -> list[dict]:
    """Python twin of `batch_apply_template` (same assignment, same strings)."""
    n = len(templates)
    out = []
    for j in range(len(records) // n * n):
        i = j % n
        inputs, targets = templates_lib.format_example(templates[i], records[j])
        out.append({"inputs": inputs, "targets": targets, "template_idx": i,
                    "record": records[j]})
    return out


def select_features(dataset: tf.data.Dataset, keys: Sequence[str]) -> tf.data.Dataset:
    """Keeps only `keys` of each example."""
    keys = tuple(keys)
    return dataset.map(lambda ex: {k: ex[k] for k in keys},
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def rank_classification_rows(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """One row per option of each example (needs 'inputs', 'options', 'answer').

    Output rows: {'inputs', 'targets' (the option), 'idx' int32 [2] = [example, option],
    'is_correct' bool}; the k rows of one example are consecutive.
    """

    def expand(i, ex):
        k = tf.shape(ex["options"])[0]
        rows = {
            "inputs": tf.fill([k], ex["inputs"]),
            "targets": ex["options"],
            "idx": tf.stack([tf.fill([k], tf.cast(i, tf.int32)), tf.range(k, dtype=tf.int32)],
                            axis=1),
            "is_correct": tf.equal(ex["options"], ex["answer"]),
        }
        return tf.data.Dataset.from_tensor_slices(rows)

    return dataset.enumerate().flat_map(expand)


@dataclasses.dataclass(frozen=True)
class FewShotFormat:
    """How exemplars are joined (FLAN used inputs_prefix='0 ', targets_prefix='1 ',
    x_y_delimiter=' X ', example_separator=' X ', markers for its dialog tokens)."""

    inputs_prefix: str = ""
    targets_prefix: str = ""
    x_y_delimiter: str = "\n"
    example_separator: str = "\n\n"

    def exemplar(self, inputs: str, targets: str) -> str:
        return f"{self.inputs_prefix}{inputs}{self.x_y_delimiter}{self.targets_prefix}{targets}"

    def query(self, inputs: str) -> str:
        tail = f"{self.x_y_delimiter}{self.targets_prefix}".rstrip() if self.targets_prefix \
            else ""
        return f"{self.inputs_prefix}{inputs}{tail}"


def assemble_fewshot(exemplars: Sequence[tuple[str, str]], inputs: str,
                     count_tokens: Callable[[str], int],
                     max_shots: int = DEFAULT_MAX_SHOTS,
                     token_budget: int = DEFAULT_TOKEN_BUDGET,
                     fmt: FewShotFormat = FewShotFormat()) -> tuple[str, int]:
    """Prepends exemplars to `inputs`; returns (assembled inputs, number of shots used).

    Exemplars are taken in order, at most `max_shots`, and only while the whole assembled
    input stays within `token_budget` tokens (`count_tokens`); the first exemplar that would
    overflow stops the list. With no room for any, the zero-shot input is returned unchanged.
    """
    if max_shots < 0 or max_shots > DEFAULT_MAX_SHOTS:
        raise ValueError(f"max_shots must be in [0, {DEFAULT_MAX_SHOTS}], got {max_shots}.")
    query = fmt.query(inputs)
    parts: list[str] = []
    for ex_inputs, ex_targets in list(exemplars)[:max_shots]:
        candidate = fmt.example_separator.join([*parts, fmt.exemplar(ex_inputs, ex_targets),
                                                query])
        if count_tokens(candidate) > token_budget:
            break
        parts.append(fmt.exemplar(ex_inputs, ex_targets))
    return fmt.example_separator.join([*parts, query]), len(parts)


def fewshot_examples(records: Sequence[Mapping], train_records: Sequence[Mapping],
                     templates: Sequence[tuple[str, str]], count_tokens: Callable[[str], int],
                     num_shots: int = DEFAULT_MAX_SHOTS,
                     token_budget: int = DEFAULT_TOKEN_BUDGET,
                     fmt: FewShotFormat = FewShotFormat()) -> list[dict]:
    """Few-shot versions of `records` (normalized), templates assigned round-robin.

    Example j (template i = j mod N) gets the train records j*num_shots, j*num_shots + 1, ...
    (cyclically) as exemplars, formatted with the same template i. Returns dicts with
    'inputs', 'targets', 'template_idx', 'num_shots' and the record's 'options'/'answer' when
    present.
    """
    if not train_records and num_shots:
        raise ValueError("Few-shot assembly needs train records for the exemplars; got none.")
    out = []
    for j, ex in enumerate(apply_templates_round_robin(records, templates)):
        template = templates[ex["template_idx"]]
        exemplars = [templates_lib.format_example(
            template, train_records[(j * num_shots + s) % len(train_records)])
            for s in range(num_shots)]
        inputs, shots = assemble_fewshot(exemplars, ex["inputs"], count_tokens, num_shots,
                                         token_budget, fmt)
        row = {"inputs": inputs, "targets": ex["targets"], "template_idx": ex["template_idx"],
               "num_shots": shots}
        for k in ("options", "answer"):
            if k in ex["record"]:
                row[k] = ex["record"][k]
        out.append(row)
    return out
