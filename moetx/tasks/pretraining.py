"""SeqIO preprocessors and task builders for language-model pretraining on raw text.

Two objectives for decoder-only models, both reading one document per example (the third,
T5 span corruption for encoder-decoder models, is described further down):

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

**Span corruption** (T5's pretraining objective, `seqio.EncDecFeatureConverter`): each document
is tokenized (no EOS) and cut into chunks of `span_corruption_chunk_length(L_in)` tokens, the
longest chunk whose corrupted form fits `sequence_length['inputs'] = L_in`. In each chunk about
15% of the tokens, in spans of mean length 3, are noise (`random_spans_noise_mask`); `inputs` is
the chunk with each noise span replaced by one sentinel id, `targets` lists each sentinel followed
by the span it replaced, and both end in EOS:

    chunk    a b c d e f g h           (noise: c d, g)
    inputs   a b <S0> e f <S1> h </s>   with <S0> = vocab_size - 1, <S1> = vocab_size - 2, ...
    targets  <S0> c d <S1> g </s>

Sentinels are the vocabulary's extra ids (`get_vocabulary(path, extra_ids=100)`), so they never
collide with real tokens. Unlike T5, chunks never straddle two documents (T5 concatenates
documents without a separator first); short documents give short examples, which the
feature converter packs.

All preprocessors are pure tf.data functions; randomness comes from SeqIO's seeded
`map_over_dataset(num_seeds=...)`, so `get_dataset(seed=...)` is reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

__all__ = [
    "OBJECTIVES",
    "SPAN_CORRUPTION_EXTRA_IDS",
    "SPAN_CORRUPTION_FEATURE_LENGTHS",
    "add_lm_task",
    "add_span_corruption_task",
    "causal_lm_output_features",
    "corrupted_lengths",
    "drop_empty_text",
    "lm_preprocessors",
    "noise_span_to_unique_sentinel",
    "nonnoise_span_to_unique_sentinel",
    "prefix_lm_output_features",
    "random_prefix_split",
    "random_spans_noise_mask",
    "span_corruption",
    "span_corruption_chunk_length",
    "span_corruption_output_features",
    "span_corruption_preprocessors",
    "split_tokens",
    "split_tokens_to_targets_length",
    "to_targets",
]

# Decoder-only objectives of `add_lm_task`; span corruption has its own `add_span_corruption_task`
# (it needs a vocabulary with sentinel ids and feeds an encoder-decoder).
OBJECTIVES = ("causal_lm", "prefix_lm")
# T5's choices: 100 sentinel ids, and the feature lengths of its span-corruption pretraining
# (512 corrupted input tokens come from 568-token chunks, whose targets need 114 tokens).
SPAN_CORRUPTION_EXTRA_IDS = 100
SPAN_CORRUPTION_FEATURE_LENGTHS = {"inputs": 512, "targets": 114}


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


# ---------------------------------------------------------------------------------------------
# Span corruption (T5's encoder-decoder pretraining objective)
# ---------------------------------------------------------------------------------------------


def _check_noise_args(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(
            f"noise_density must be in (0, 1) (the fraction of tokens to mask), got "
            f"{noise_density!r}. Fix: use e.g. T5's 0.15."
        )
    if not mean_noise_span_length >= 1.0:
        raise ValueError(
            f"mean_noise_span_length must be >= 1 (every span has at least one token), got "
            f"{mean_noise_span_length!r}. Fix: use e.g. T5's 3.0."
        )


def _noise_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(number of noise tokens, number of noise spans) in a chunk of `length` tokens.

    The Python twin of the counts in `random_spans_noise_mask`: the same float64 products and
    round-half-to-even (Python's `round`, `tf.round`), so the lengths planned from it are exactly
    the lengths the TF code produces.
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    # Every span, noise or not, must be non-empty, so there can be no more spans than tokens of
    # either kind (only binding for extreme densities).
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)
    return num_noise, num_spans


def corrupted_lengths(
    tokens_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(inputs length, targets length), EOS included, of a span-corrupted `tokens_length` chunk.

    inputs = the non-noise tokens + one sentinel per noise span + EOS;
    targets = the noise tokens + one sentinel per noise span + EOS.
    """
    _check_noise_args(noise_density, mean_noise_span_length)
    num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_chunk_length(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """The longest chunk whose span-corrupted inputs fit `inputs_length`, and its targets length.

    Derivation: a chunk of n tokens has k = round(n·d) noise tokens in s = round(k/m) spans and
    becomes inputs of (n - k) + s + 1 tokens (d = noise_density, m = mean_noise_span_length).
    Without the rounding that is n·(1 - d + d/m) + 1, so n ≈ (inputs_length - 1) / (1 - d + d/m):
    567.8 for T5's 512 inputs, d = 0.15, m = 3. The rounding moves the exact answer by a token
    or so, and it must be exact (one token too many and SeqIO silently trims the EOS off), so it
    is found by search: as k <= n·d + 1, the inputs have at least n·(1 - d) + 1 tokens, hence no
    n above (inputs_length - 1) / (1 - d) fits, and scanning down from there the first n that
    fits is the longest. (For d = 0.15, m = 3: 512 -> 568 tokens and 114 targets, T5's pair;
    64 -> 70 tokens and 14 targets.)

    Args:
      inputs_length: `sequence_length['inputs']`, EOS included.
      noise_density: fraction of the chunk's tokens that are noise.
      mean_noise_span_length: mean number of tokens of a noise span.

    Returns:
      (chunk_length, targets_length): the pre-corruption chunk length, and the targets length
      (EOS included) of such a chunk, the longest targets any chunk of the task gets.

    Raises:
      ValueError: the arguments are out of range, or `inputs_length` < 3 (the shortest
        corruptible chunk, 2 tokens, needs a token, a sentinel and EOS).
    """
    _check_noise_args(noise_density, mean_noise_span_length)
    upper = int((inputs_length - 1) / (1.0 - noise_density)) + 1
    for n in range(upper, 1, -1):
        inputs, targets = corrupted_lengths(n, noise_density, mean_noise_span_length)
        if inputs <= inputs_length:
            return n, targets
    raise ValueError(
        f"sequence_length['inputs'] = {inputs_length} is too short for span corruption: expected "
        "at least 3 (a token, a sentinel and EOS). Fix: use a longer inputs length, e.g. 512."
    )


def _random_segment_lengths(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
    """Lengths (int32 [num_segments], each >= 1, summing to num_items) of a random segmentation.

    Cuts go into num_segments - 1 of the num_items - 1 gaps between neighbouring items; taking
    the gaps with the highest i.i.d. uniform scores picks that subset uniformly at random, so
    every segmentation into non-empty segments is equally likely. Needs
    1 <= num_segments <= num_items.
    """
    scores = tf.random.stateless_uniform(tf.reshape(num_items - 1, [1]), seed=seed)
    _, gaps = tf.math.top_k(scores, k=num_segments - 1, sorted=False)
    cuts = tf.sort(gaps + 1)  # a cut in gap g falls between items g and g + 1
    bounds = tf.concat(
        [tf.zeros([1], tf.int32), tf.cast(cuts, tf.int32), tf.reshape(num_items, [1])], axis=0
    )
    return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(
    length: int | tf.Tensor,
    noise_density: float,
    mean_noise_span_length: float,
    seeds: tf.Tensor,
) -> tf.Tensor:
    """T5's noise mask: which tokens of a `length`-token chunk are noise, in random spans.

    num_noise = round(length · noise_density), clamped to [1, length - 1], and
    num_spans = round(num_noise / mean_noise_span_length), at least 1 (and at most the number of
    non-noise tokens). The noise tokens and the non-noise tokens are each cut into num_spans
    non-empty runs at random, and the runs alternate starting with a non-noise one, so the
    chunk always starts with a real token and ends with noise. Rounding is half-to-even, as
    in `corrupted_lengths`.

    Args:
      length: int32 scalar, the number of tokens.
      noise_density: fraction of noise tokens, in (0, 1).
      mean_noise_span_length: mean noise span length, >= 1.
      seeds: int32/int64 [2, 2], two stateless seeds (noise runs, non-noise runs), e.g. from
        `seqio.map_over_dataset(num_seeds=2)`; the same seeds give the same mask.

    Returns:
      bool [length], True at noise tokens. All False when length < 2 (nothing to corrupt).
    """
    _check_noise_args(noise_density, mean_noise_span_length)
    static_length = length if isinstance(length, int) else None
    length = tf.cast(length, tf.int32)
    seeds = tf.convert_to_tensor(seeds)
    seeds.shape.assert_is_compatible_with([2, 2])

    def _mask() -> tf.Tensor:
        # float64 and tf.round (half to even) reproduce Python's `round` in `_noise_counts`.
        num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
        num_noise = tf.clip_by_value(num_noise, 1, length - 1)
        num_spans = tf.cast(
            tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32
        )
        num_spans = tf.clip_by_value(num_spans, 1, length - num_noise)
        noise_runs = _random_segment_lengths(num_noise, num_spans, seeds[0])
        clean_runs = _random_segment_lengths(length - num_noise, num_spans, seeds[1])
        runs = tf.reshape(tf.stack([clean_runs, noise_runs], axis=1), [-1])  # clean, noise, ...
        flags = tf.tile(tf.constant([False, True]), tf.reshape(num_spans, [1]))
        return tf.repeat(flags, runs)

    mask = tf.cond(length >= 2, _mask, lambda: tf.zeros([length], tf.bool))
    return tf.reshape(mask, [static_length if static_length is not None else -1])


def _spans_to_sentinels(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary, keep_noise: bool
) -> tf.Tensor:
    """Shared body of the two sentinel functions: one sentinel per noise span, kept tokens."""
    extra_ids = vocabulary.extra_ids
    if not extra_ids:
        raise ValueError(
            f"Span corruption needs sentinel ids, but the vocabulary {vocabulary!r} has "
            "extra_ids=0, so sentinels would overwrite real tokens. Fix: use a vocabulary with "
            "extra ids, e.g. moetx.tasks.get_vocabulary(path, extra_ids=100)."
        )
    tokens = tf.convert_to_tensor(tokens)
    noise_mask = tf.convert_to_tensor(noise_mask, tf.bool)
    previous = tf.concat([[False], noise_mask], axis=0)[:-1]
    span_starts = tf.logical_and(noise_mask, tf.logical_not(previous))
    span_index = tf.cumsum(tf.cast(span_starts, tokens.dtype)) - 1
    sentinels = tf.cast(vocabulary.vocab_size - 1, tokens.dtype) - span_index
    num_spans = tf.reduce_sum(tf.cast(span_starts, tf.int32))
    checks = [
        tf.debugging.assert_equal(
            tf.size(tokens),
            tf.size(noise_mask),
            message="Span corruption: tokens and noise_mask must have the same length.",
        ),
        tf.debugging.assert_less_equal(
            num_spans,
            extra_ids,
            message=(
                f"Span corruption: more noise spans than the vocabulary's {extra_ids} sentinel "
                "ids. Fix: more extra_ids, or shorter sequences / fewer spans."
            ),
        ),
    ]
    keep_token = noise_mask if keep_noise else tf.logical_not(noise_mask)
    # Each position offers [its span's sentinel, its token]; keeping the sentinel only where a
    # span starts and the token only where wanted, then flattening, emits both in order.
    candidates = tf.reshape(tf.stack([sentinels, tokens], axis=1), [-1])
    keep = tf.reshape(tf.stack([span_starts, keep_token], axis=1), [-1])
    with tf.control_dependencies(checks):
        return tf.boolean_mask(candidates, keep)


def noise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
    """The encoder inputs: each run of noise tokens replaced by one sentinel.

    Args:
      tokens: int [n] token ids.
      noise_mask: bool [n], True at noise tokens.
      vocabulary: supplies the sentinels, its last ids: the i-th noise span (from 0) becomes
        `vocab_size - 1 - i`; it needs at least as many extra ids as there are spans.

    Returns:
      int [n - num_noise + num_spans], same dtype as `tokens`.
    """
    return _spans_to_sentinels(tokens, noise_mask, vocabulary, keep_noise=False)


def nonnoise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
    """The decoder targets: each noise span preceded by the sentinel that replaced it.

    The inverse of `noise_span_to_unique_sentinel`: non-noise tokens are dropped and the i-th
    noise span is introduced by `vocab_size - 1 - i`. For masks starting with a non-noise token
    (all of `random_spans_noise_mask`'s) this is T5's "each non-noise span becomes a sentinel".

    Args:
      tokens: int [n] token ids.
      noise_mask: bool [n], True at noise tokens.
      vocabulary: supplies the sentinels (see `noise_span_to_unique_sentinel`).

    Returns:
      int [num_noise + num_spans], same dtype as `tokens`.
    """
    return _spans_to_sentinels(tokens, noise_mask, vocabulary, keep_noise=True)


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(
    ex: Mapping[str, tf.Tensor],
    seeds: tf.Tensor,
    *,
    feature_key: str,
    noise_density: float,
    mean_noise_span_length: float,
    vocabulary: seqio.Vocabulary,
) -> dict[str, tf.Tensor]:
    """One chunk (int32 [n] under `feature_key`) -> {'inputs', 'targets'}; `seeds` int [2, 2]."""
    tokens = ex[feature_key]
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seeds)
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, mask, vocabulary),
        "targets": nonnoise_span_to_unique_sentinel(tokens, mask, vocabulary),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    feature_key: str = "targets",
) -> tf.data.Dataset:
    """T5 span corruption, a SeqIO preprocessor (after tokenizing, before appending EOS).

    Each example's `feature_key` tokens (int32 [n], no EOS) are cut into chunks of
    `span_corruption_chunk_length(sequence_length['inputs'])` tokens (the last one shorter),
    chunks of fewer than 2 tokens are dropped (nothing to corrupt), and each chunk gets a seeded
    `random_spans_noise_mask`. `seqio.preprocessors.append_eos_after_trim` must follow: the chunk
    length is planned so that inputs + EOS fit `sequence_length['inputs']` exactly, with no trim.

    Args:
      dataset: tokenized examples with int32 [n] `feature_key`.
      sequence_length: needs 'inputs'; 'targets', when given, is checked to hold the targets.
      output_features: 'inputs' and 'targets', one vocabulary with extra ids (the sentinels).
      noise_density: fraction of noise tokens (T5: 0.15).
      mean_noise_span_length: mean length of a noise span (T5: 3).
      feature_key: the token feature to corrupt.

    Returns:
      {'inputs': int32 [<= L_in - 1], 'targets': int32 [<= L_tgt - 1]} examples (EOS not yet
      appended); other features are dropped.

    Raises:
      ValueError: no inputs length, a targets length too short for the planned chunks, or a
        vocabulary without enough sentinel ids.
    """
    _check_noise_args(noise_density, mean_noise_span_length)
    lengths = dict(sequence_length or {})
    if lengths.get("inputs") is None:
        raise ValueError(
            "Span corruption needs sequence_length['inputs'] to size its chunks, found "
            f"sequence_length={sequence_length!r}. Fix: pass e.g. "
            f"{SPAN_CORRUPTION_FEATURE_LENGTHS} to get_dataset."
        )
    chunk_length, targets_length = span_corruption_chunk_length(
        int(lengths["inputs"]), noise_density, mean_noise_span_length
    )
    if lengths.get("targets") is not None and targets_length > int(lengths["targets"]):
        raise ValueError(
            f"With sequence_length['inputs'] = {lengths['inputs']} span corruption makes chunks "
            f"of {chunk_length} tokens, whose targets need {targets_length} tokens (with EOS), "
            f"but sequence_length['targets'] = {lengths['targets']}; they would be cut short. "
            f"Fix: set sequence_length['targets'] >= {targets_length}."
        )
    missing = {"inputs", "targets"} - set(output_features)
    if missing:
        raise ValueError(
            f"Span corruption writes 'inputs' and 'targets', but the task's output features are "
            f"{sorted(output_features)} (missing {sorted(missing)}). Fix: use "
            "span_corruption_output_features(vocabulary)."
        )
    vocabulary = output_features["inputs"].vocabulary
    if output_features["targets"].vocabulary != vocabulary:
        raise ValueError(
            "Span corruption needs one vocabulary for 'inputs' and 'targets' (their sentinels "
            f"must agree), found {vocabulary!r} and {output_features['targets'].vocabulary!r}. "
            "Fix: give both features the same vocabulary."
        )
    max_spans = max(
        _noise_counts(n, noise_density, mean_noise_span_length)[1]
        for n in range(2, chunk_length + 1)
    )
    if vocabulary.extra_ids < max_spans:
        raise ValueError(
            f"Chunks of {chunk_length} tokens get up to {max_spans} noise spans, one sentinel "
            f"each, but the vocabulary has extra_ids={vocabulary.extra_ids}. Fix: use "
            f"moetx.tasks.get_vocabulary(path, extra_ids={SPAN_CORRUPTION_EXTRA_IDS}) (or more "
            "extra ids), or a shorter inputs length."
        )
    dataset = split_tokens(dataset, chunk_length, feature_key=feature_key)
    dataset = dataset.filter(lambda ex: tf.size(ex[feature_key]) >= 2)
    return _corrupt_spans(
        dataset,
        feature_key=feature_key,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        vocabulary=vocabulary,
    )


def span_corruption_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Output features of a span-corruption task: 'inputs' and 'targets', both ending in EOS."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
    }


def span_corruption_preprocessors(
    text_key: str = "text", noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> list[Callable]:
    """The SeqIO preprocessor list of a span-corruption task reading raw text."""
    _check_noise_args(noise_density, mean_noise_span_length)
    return [
        functools.partial(to_targets, text_key=text_key),
        drop_empty_text,
        # No EOS on the document: T5 puts one EOS at the end of the corrupted inputs/targets.
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=False),
        seqio.CacheDatasetPlaceholder(),
        functools.partial(
            span_corruption,
            noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length,
        ),
        seqio.preprocessors.append_eos_after_trim,
    ]


def add_span_corruption_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    text_key: str = "text",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    shuffle_buffer_size: int | None = 10_000,
) -> seqio.Task:
    """Registers (or re-registers, replacing) a T5 span-corruption task over a raw-text source.

    Args:
      name: task name in the SeqIO registry.
      source: yields scalar strings or dicts with a `text_key` string.
      vocabulary: vocabulary of 'inputs' and 'targets', with extra ids for the sentinels
        (`moetx.tasks.get_vocabulary(path, extra_ids=100)`). Not loaded here.
      text_key: text field of dict examples.
      noise_density: fraction of noise tokens.
      mean_noise_span_length: mean noise span length.
      shuffle_buffer_size: example shuffle buffer of the task.

    Returns:
      The registered `seqio.Task`, for `seqio.EncDecFeatureConverter`; T5's feature lengths are
      `SPAN_CORRUPTION_FEATURE_LENGTHS`.
    """
    if not vocabulary.extra_ids:
        raise ValueError(
            f"Task {name!r}: span corruption needs a vocabulary with sentinel (extra) ids, found "
            f"extra_ids={vocabulary.extra_ids}. Fix: pass moetx.tasks.get_vocabulary(path, "
            f"extra_ids={SPAN_CORRUPTION_EXTRA_IDS})."
        )
    preprocessors = span_corruption_preprocessors(text_key, noise_density, mean_noise_span_length)
    seqio.TaskRegistry.remove(name)  # replacing keeps registration idempotent
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=span_corruption_output_features(vocabulary),
        preprocessors=preprocessors,
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
