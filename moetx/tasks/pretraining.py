"""SeqIO preprocessors and task builders for language-model pretraining on raw text.

Two objectives for decoder-only models, both reading one document per example:

- **causal LM** (`seqio.DecoderFeatureConverter` / `LMFeatureConverter`): text → `targets`
  tokens, EOS appended to each document, then cut into chunks of `sequence_length['targets']`
  tokens (the last chunk of a document is shorter and ends with EOS).
- **prefix LM** (`seqio.PrefixLMFeatureConverter`, or `DecoderFeatureConverter` which picks it
  when `inputs` is present): the same chunks, each cut at a random point into a non-empty
  `inputs` prefix (attended bidirectionally, no loss) and a non-empty `targets` continuation.

Length convention for the prefix LM: `sequence_length['targets']` is the length of the whole
chunk (prefix + continuation), so `inputs + targets` of one example never exceeds it, and the cut
point k is uniform in [1, min(n - 1, sequence_length['inputs'])] so nothing is ever trimmed and
`concat(inputs, targets)` is exactly the chunk. Typical use: `task_feature_lengths =
{'inputs': L, 'targets': L}`; the prefix-LM converter's decoder length is then 2L, and packing
puts two or more chunks in each row.

All preprocessors are pure tf.data functions; randomness comes from SeqIO's seeded
`map_over_dataset(num_seeds=1)`, so `get_dataset(seed=...)` is reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

__all__ = [
    "OBJECTIVES",
    "add_lm_task",
    "causal_lm_output_features",
    "drop_empty_text",
    "lm_preprocessors",
    "prefix_lm_output_features",
    "random_prefix_split",
    "split_tokens",
    "split_tokens_to_targets_length",
    "to_targets",
]

OBJECTIVES = ("causal_lm", "prefix_lm")


def to_targets(dataset: tf.data.Dataset, text_key: str = "text") -> tf.data.Dataset:
    """Maps raw text to {'targets': tf.string scalar}.

    Accepts either scalar string elements (`seqio.TextLineDataSource`) or dict elements
    (`seqio.TfdsDataSource`, e.g. C4), whose `text_key` is used and other fields dropped.
    """
    if isinstance(dataset.element_spec, Mapping):
        if text_key not in dataset.element_spec:
            raise ValueError(
                f"Expected a '{text_key}' feature in the source examples, found "
                f"{sorted(dataset.element_spec)}. Fix: pass text_key=<the text field>."
            )
        return dataset.map(
            lambda ex: {"targets": ex[text_key]}, num_parallel_calls=tf.data.AUTOTUNE
        )
    return dataset.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def drop_empty_text(dataset: tf.data.Dataset, key: str = "targets") -> tf.data.Dataset:
    """Drops examples whose `key` text is empty or whitespace only (blank lines)."""
    return dataset.filter(lambda ex: tf.strings.length(tf.strings.strip(ex[key])) > 0)


def split_tokens(
    dataset: tf.data.Dataset, max_tokens_per_segment: int, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Cuts each example's 1-D `feature_key` tokens into consecutive segments.

    Args:
      dataset: examples with an int32 `[n]` tensor under `feature_key`.
      max_tokens_per_segment: segment length L; a sequence of n tokens yields ceil(n / L)
        examples, all of length L but the last (length n - L * (ceil(n / L) - 1)).
      feature_key: the feature to split. Other features are dropped (they would no longer
        describe the segment).

    Returns:
      A dataset of {feature_key: int32 [<= L]}; empty sequences yield nothing.
    """
    if max_tokens_per_segment < 1:
        raise ValueError(
            f"max_tokens_per_segment must be >= 1, got {max_tokens_per_segment}. "
            "Fix: set a positive sequence length for the split feature."
        )

    def _segments(ex):
        tokens = ex[feature_key]
        starts = tf.range(0, tf.size(tokens, out_type=tf.int64), max_tokens_per_segment)
        ragged = tf.RaggedTensor.from_row_starts(tokens, starts)
        return tf.data.Dataset.from_tensor_slices({feature_key: ragged})

    return dataset.flat_map(_segments)


def split_tokens_to_targets_length(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None
) -> tf.data.Dataset:
    """`split_tokens` on 'targets' with L = sequence_length['targets'].

    With no target length (e.g. `get_dataset(sequence_length=None)` for inspection) whole
    documents pass through unsplit.
    """
    length = (sequence_length or {}).get("targets")
    if length is None:
        return dataset
    return split_tokens(dataset, int(length), feature_key="targets")


@seqio.map_over_dataset(num_seeds=1)
def _cut_at_random_point(ex, seed, max_inputs_length=None):
    tokens = ex["targets"]
    upper = tf.size(tokens) - 1
    if max_inputs_length is not None:
        upper = tf.minimum(upper, max_inputs_length)
    k = tf.random.stateless_uniform([], seed=seed, minval=1, maxval=upper + 1, dtype=tf.int32)
    return {"inputs": tokens[:k], "targets": tokens[k:]}


def random_prefix_split(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None
) -> tf.data.Dataset:
    """Cuts each 'targets' chunk into a non-empty 'inputs' prefix and a non-empty 'targets' rest.

    The cut k is uniform in [1, min(n - 1, sequence_length['inputs'])] (seeded by SeqIO), so
    `concat(inputs, targets)` equals the chunk and no part is trimmed later. Chunks with fewer
    than 2 tokens cannot be split and are dropped.
    """
    max_inputs = (sequence_length or {}).get("inputs")
    if max_inputs is not None and int(max_inputs) < 1:
        raise ValueError(
            f"sequence_length['inputs'] must be >= 1 for the prefix LM, got {max_inputs}. "
            "Fix: use the same length as 'targets' (see moetx.tasks.pretraining)."
        )
    dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= 2)
    return _cut_at_random_point(
        dataset, max_inputs_length=None if max_inputs is None else int(max_inputs)
    )


def causal_lm_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Output features of a causal-LM task: 'targets' only, EOS at the end of each document."""
    return {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True)}


def prefix_lm_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Output features of a prefix-LM task: 'inputs' (prefix, no EOS) and 'targets'."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
    }


def lm_preprocessors(objective: str, text_key: str = "text") -> list[Callable]:
    """The SeqIO preprocessor list of an LM task reading raw text.

    Tokenisation happens before the cache placeholder (it needs no sequence length), the
    length-dependent splitting after it, as SeqIO requires for offline caching.
    """
    _check_objective(objective)
    steps: list[Callable] = [
        functools.partial(to_targets, text_key=text_key),
        drop_empty_text,
        # EOS goes on the whole document before chunking, so only its last chunk ends in EOS.
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=True),
        seqio.CacheDatasetPlaceholder(),
        split_tokens_to_targets_length,
    ]
    if objective == "prefix_lm":
        steps.append(random_prefix_split)
    return steps


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(
            f"Unknown LM objective {objective!r}; expected one of {list(OBJECTIVES)}. "
            "Fix: pass objective='causal_lm' (decoder-only) or 'prefix_lm'."
        )


def add_lm_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    objective: str = "causal_lm",
    text_key: str = "text",
    shuffle_buffer_size: int | None = 10_000,
) -> seqio.Task:
    """Registers (or re-registers, replacing) an LM task over a raw-text source.

    Args:
      name: task name in the SeqIO registry.
      source: yields scalar strings or dicts with a `text_key` string.
      vocabulary: vocabulary of all output features.
      objective: 'causal_lm' or 'prefix_lm'.
      text_key: text field of dict examples.
      shuffle_buffer_size: example shuffle buffer of the task.

    Returns:
      The registered `seqio.Task`.
    """
    _check_objective(objective)
    features = (
        causal_lm_output_features(vocabulary)
        if objective == "causal_lm"
        else prefix_lm_output_features(vocabulary)
    )
    # Replacing keeps registration idempotent (module re-import, a gin file evaluated twice).
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=features,
        preprocessors=lm_preprocessors(objective, text_key=text_key),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
