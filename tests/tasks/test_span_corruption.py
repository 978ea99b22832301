"""T5 span corruption: noise masks, sentinels, chunk lengths, and the registered tasks."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

import moetx.tasks as tasks
from moetx.datasets import corpora, vocab
from moetx.tasks import pretraining
from moetx.trainer import data as data_lib

EOS = 1
EXTRA_IDS = pretraining.SPAN_CORRUPTION_EXTRA_IDS
T5_LENGTHS = {"inputs": 512, "targets": 114}
SMALL_LENGTHS = {"inputs": 64, "targets": 16}


@pytest.fixture(scope="module")
def sentinel_vocab(default_vocab):
    return vocab.get_vocabulary(str(default_vocab), extra_ids=EXTRA_IDS)


def _random_docs(rng, num_docs, max_length, low=3, high=8000):
    """Random token documents (ids of the base vocabulary) with lengths in [1, max_length]."""
    lengths = rng.integers(1, max_length + 1, size=num_docs)
    return [rng.integers(low, high, size=n).astype(np.int32) for n in lengths]


def _docs_dataset(docs):
    flat = np.concatenate(docs) if docs else np.zeros([0], np.int32)
    ragged = tf.RaggedTensor.from_row_lengths(flat, [len(d) for d in docs])
    return tf.data.Dataset.from_tensor_slices({"targets": ragged})


def _corrupt(docs, lengths, vocabulary, seed):
    """span_corruption's own output (no EOS appended yet, nothing trimmed), as numpy."""
    features = pretraining.span_corruption_output_features(vocabulary)
    with seqio.map_seed_manager(seed):
        ds = pretraining.span_corruption(_docs_dataset(docs), lengths, features)
    return list(ds.as_numpy_iterator())


def _expected_chunks(docs, chunk_length):
    """The chunks span_corruption must corrupt: per document, `chunk_length` at a time, >= 2."""
    chunks = []
    for doc in docs:
        for start in range(0, len(doc), chunk_length):
            chunk = doc[start : start + chunk_length]
            if len(chunk) >= 2:
                chunks.append(chunk)
    return chunks


def _rebuild(inputs, targets, vocab_size):
    """Puts the targets' spans back at the inputs' sentinels, checking the layout on the way.

    Returns (the original token list, the noise mask of it).
    """
    inputs, targets = [int(t) for t in inputs], [int(t) for t in targets]
    first_sentinel = vocab_size - EXTRA_IDS
    in_sentinels = [t for t in inputs if t >= first_sentinel]
    expected = [vocab_size - 1 - i for i in range(len(in_sentinels))]
    assert in_sentinels == expected, "inputs' sentinels must be vocab_size-1, -2, ... in order"
    assert in_sentinels, "every chunk has at least one noise span"
    # T5's interleaving: a real token first, noise last, never two sentinels in a row.
    assert inputs[0] < first_sentinel and inputs[-1] >= first_sentinel
    assert all(a < first_sentinel or b < first_sentinel for a, b in zip(inputs, inputs[1:]))
    spans: dict[int, list[int]] = {}
    assert targets[0] >= first_sentinel, "targets start with a sentinel"
    for t in targets:
        if t >= first_sentinel:
            spans[t] = []
            current = t
        else:
            spans[current].append(t)
    assert list(spans) == expected, "targets' sentinels must match the inputs' ones, in order"
    assert all(spans.values()), "every noise span is non-empty"
    tokens, mask = [], []
    for t in inputs:
        span = spans[t] if t >= first_sentinel else [t]
        tokens.extend(span)
        mask.extend([t >= first_sentinel] * len(span))
    return tokens, np.array(mask)


@pytest.mark.parametrize("lengths", [T5_LENGTHS, SMALL_LENGTHS], ids=["512-114", "64-16"])
def test_targets_reinserted_at_sentinels_rebuild_the_chunks(sentinel_vocab, lengths):
    chunk_length, _ = pretraining.span_corruption_chunk_length(lengths["inputs"])
    rng = np.random.default_rng(lengths["inputs"])
    # Lengths from 1 (dropped) to several chunks, so last chunks of every size occur.
    docs = _random_docs(rng, num_docs=150, max_length=3 * chunk_length + 5)
    examples = _corrupt(docs, lengths, sentinel_vocab, seed=11)
    chunks = _expected_chunks(docs, chunk_length)
    assert len(examples) == len(chunks) > 150
    for ex, chunk in zip(examples, chunks, strict=True):
        tokens, mask = _rebuild(ex["inputs"], ex["targets"], sentinel_vocab.vocab_size)
        np.testing.assert_array_equal(tokens, chunk)
        # The exact T5 counts: round(n * 0.15) noise tokens in round(noise / 3) spans.
        assert pretraining.corrupted_lengths(len(chunk)) == (
            len(ex["inputs"]) + 1,
            len(ex["targets"]) + 1,
        )
        assert mask.sum() == min(max(round(len(chunk) * 0.15), 1), len(chunk) - 1)


def _mask_fn(index, length):
    # Distinct stateless seeds per example, derived from its index.
    seeds = tf.stack([tf.stack([index, 0]), tf.stack([index, 1])])
    return pretraining.random_spans_noise_mask(length, 0.15, 3.0, seeds)


def _masks(lengths):
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(lengths, np.int32)).enumerate()
    return list(ds.map(_mask_fn).as_numpy_iterator())


def _span_lengths(mask):
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return edges[1::2] - edges[::2]  # (end - start) of each run of True


def test_noise_density_and_mean_span_length_average_to_t5_values():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 601, size=2000)
    masks = _masks(lengths)
    assert [len(m) for m in masks] == lengths.tolist()
    noise = sum(int(m.sum()) for m in masks)
    spans = np.concatenate([_span_lengths(m) for m in masks])
    density, mean_span = noise / lengths.sum(), spans.mean()
    # Tolerances: each mask has exactly round(0.15 n) noise tokens and round(noise / 3) spans,
    # so the only error is rounding, at most half a token (or span) per example, of random sign
    # across lengths: over 2000 examples of ~350 tokens it averages out to ~2e-5 in density and
    # ~1e-3 in mean span length. A systematic half-unit bias (floor/ceil instead of round) moves
    # the density by ~0.0014 and the mean span by ~0.09, beyond the 0.001 / 0.03 allowed here.
    assert abs(density - 0.15) < 0.001, density
    assert abs(mean_span - 3.0) < 0.03, mean_span
    # Spans are random, not fixed-size: lengths spread out (about a third are single tokens).
    assert 0.2 < np.mean(spans == 1) < 0.45 and spans.max() >= 10


def test_noise_is_spread_over_the_whole_chunk():
    masks = np.stack(_masks([100] * 2000))
    rate = masks.mean(axis=0)
    assert rate[0] == 0.0 and rate[-1] == 1.0  # starts with a real token, ends with noise
    # Interior positions are all noise at a similar rate (~0.13 with 2000 samples, binomial
    # std ~0.008); a mask that clumps noise anywhere would push some position out of range.
    assert rate[5:90].min() > 0.09 and rate[5:90].max() < 0.18, rate
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_masks_of_degenerate_lengths():
    seeds = tf.constant([[1, 2], [3, 4]])
    assert pretraining.random_spans_noise_mask(0, 0.15, 3.0, seeds).numpy().tolist() == []
    assert pretraining.random_spans_noise_mask(1, 0.15, 3.0, seeds).numpy().tolist() == [False]
    assert pretraining.random_spans_noise_mask(2, 0.15, 3.0, seeds).numpy().tolist() == [
        False,
        True,
    ]
    with pytest.raises(ValueError, match="noise_density"):
        pretraining.random_spans_noise_mask(10, 1.5, 3.0, seeds)
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        pretraining.random_spans_noise_mask(10, 0.15, 0.5, seeds)


def test_same_seeds_same_mask_different_seeds_different_mask():
    def mask(seeds):
        return pretraining.random_spans_noise_mask(300, 0.15, 3.0, tf.constant(seeds)).numpy()

    np.testing.assert_array_equal(mask([[1, 2], [3, 4]]), mask([[1, 2], [3, 4]]))
    assert not np.array_equal(mask([[1, 2], [3, 4]]), mask([[1, 2], [3, 5]]))
    assert not np.array_equal(mask([[1, 2], [3, 4]]), mask([[9, 2], [3, 4]]))


def test_sentinel_functions_on_a_hand_made_mask(sentinel_vocab):
    v = sentinel_vocab.vocab_size
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17])
    mask = tf.constant([False, False, True, True, False, False, True, False])
    inputs = pretraining.noise_span_to_unique_sentinel(tokens, mask, sentinel_vocab)
    targets = pretraining.nonnoise_span_to_unique_sentinel(tokens, mask, sentinel_vocab)
    assert inputs.numpy().tolist() == [10, 11, v - 1, 14, 15, v - 2, 17]
    assert targets.numpy().tolist() == [v - 1, 12, 13, v - 2, 16]


def test_sentinels_come_from_the_end_and_never_collide(sentinel_vocab, default_vocab):
    base = vocab.get_vocabulary(str(default_vocab))
    v = sentinel_vocab.vocab_size
    assert v == base.vocab_size + EXTRA_IDS
    sentinels = [v - 1 - i for i in range(EXTRA_IDS)]
    assert min(sentinels) == base.vocab_size  # the first id past the real pieces
    # The vocabulary itself agrees: vocab_size - 1 - i is <extra_id_i>.
    assert sentinel_vocab.decode([v - 1]) == "<extra_id_0>"
    assert sentinel_vocab.decode([v - 2]) == "<extra_id_1>"
    # Real text only ever gets base ids.
    with open(corpora.corpus_files()["validation"], encoding="utf-8") as f:
        ids = np.concatenate([sentinel_vocab.encode(line) for line in f.read().splitlines()])
    assert ids.max() < base.vocab_size


def test_chunk_length_is_the_largest_that_fits():
    assert pretraining.span_corruption_chunk_length(512) == (568, 114)  # T5's pair
    assert pretraining.span_corruption_chunk_length(64) == (70, 14)
    for inputs_length in [3, 4, 5, 16, 64, 100, 128, 255, 512, 1000, 2048]:
        n, targets = pretraining.span_corruption_chunk_length(inputs_length)
        fitted_inputs, fitted_targets = pretraining.corrupted_lengths(n)
        assert fitted_inputs <= inputs_length and fitted_targets == targets
        # No longer chunk fits (brute force well past any possible answer).
        assert all(
            pretraining.corrupted_lengths(m)[0] > inputs_length
            for m in range(n + 1, 2 * inputs_length + 10)
        ), inputs_length
    with pytest.raises(ValueError, match="at least 3"):
        pretraining.span_corruption_chunk_length(2)


@pytest.mark.parametrize("lengths", [T5_LENGTHS, SMALL_LENGTHS], ids=["512-114", "64-16"])
def test_outputs_fit_the_feature_lengths(sentinel_vocab, lengths):
    n, _ = pretraining.span_corruption_chunk_length(lengths["inputs"])
    rng = np.random.default_rng(1)
    # Whole chunks (the longest outputs) and every kind of remainder.
    docs = [rng.integers(3, 8000, size=k).astype(np.int32) for k in [n, 2 * n, n + 2, n - 1, 2]]
    docs += _random_docs(rng, 60, 2 * n)
    examples = _corrupt(docs, lengths, sentinel_vocab, seed=0)
    in_lengths = [len(ex["inputs"]) + 1 for ex in examples]  # + the EOS appended next
    tgt_lengths = [len(ex["targets"]) + 1 for ex in examples]
    assert max(in_lengths) == lengths["inputs"]  # full chunks fill the inputs exactly
    assert max(tgt_lengths) <= lengths["targets"]


def test_span_corruption_rejects_bad_lengths_and_vocabularies(sentinel_vocab, default_vocab):
    ds = _docs_dataset([np.arange(3, 40, dtype=np.int32)])
    features = pretraining.span_corruption_output_features(sentinel_vocab)
    with pytest.raises(ValueError, match=r"sequence_length\['targets'\] >= 114"):
        pretraining.span_corruption(ds, {"inputs": 512, "targets": 100}, features)
    with pytest.raises(ValueError, match=r"needs sequence_length\['inputs'\]"):
        pretraining.span_corruption(ds, None, features)
    no_sentinels = pretraining.span_corruption_output_features(
        vocab.get_vocabulary(str(default_vocab))
    )
    with pytest.raises(ValueError, match="extra_ids=0"):
        pretraining.span_corruption(ds, SMALL_LENGTHS, no_sentinels)
    with pytest.raises(ValueError, match="extra_ids=100"):
        pretraining.add_span_corruption_task(
            "bad_span_task",
            seqio.TextLineDataSource({"train": "x"}),
            no_sentinels["inputs"].vocabulary,
        )
    assert "bad_span_task" not in seqio.TaskRegistry.names()


def _task_examples(lengths, seed, split="validation"):
    ds = seqio.get_mixture_or_task("moetx_en_span_corruption").get_dataset(
        lengths, split=split, shuffle=False, seed=seed, trim_output_features=False
    )
    return list(ds.as_numpy_iterator())


def test_span_corruption_tasks_are_registered(sentinel_vocab):
    for name, source_type in [
        ("moetx_en_span_corruption", tasks.BundledCorpusSource),
        ("c4_span_corruption", seqio.TfdsDataSource),
    ]:
        task = data_lib.get_task(name)
        assert isinstance(task.source, source_type)
        assert set(task.output_features) == {"inputs", "targets"}
        for feature in task.output_features.values():
            assert feature.vocabulary.extra_ids == EXTRA_IDS and feature.add_eos
    assert data_lib.get_task("c4_span_corruption").source.tfds_dataset.name == (
        tasks.C4_TFDS_NAME
    )
    assert "moetx_en_span_corruption" in tasks.register_default_tasks()  # idempotent


def test_task_corrupts_the_real_corpus(sentinel_vocab):
    examples = _task_examples(SMALL_LENGTHS, seed=3)
    chunk_length, _ = pretraining.span_corruption_chunk_length(SMALL_LENGTHS["inputs"])
    with open(corpora.corpus_files()["validation"], encoding="utf-8") as f:
        docs = [np.array(sentinel_vocab.encode(x), np.int32) for x in f.read().splitlines()]
    chunks = _expected_chunks([d for d in docs if len(d)], chunk_length)
    assert len(examples) == len(chunks) > 500
    noise = 0
    for ex, chunk in zip(examples, chunks, strict=True):
        assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
        assert len(ex["inputs"]) <= SMALL_LENGTHS["inputs"]
        assert len(ex["targets"]) <= SMALL_LENGTHS["targets"]
        tokens, mask = _rebuild(ex["inputs"][:-1], ex["targets"][:-1], sentinel_vocab.vocab_size)
        np.testing.assert_array_equal(tokens, chunk)
        noise += mask.sum()
    # Exactly T5's counts per chunk; in aggregate near 0.15 (full 70-token chunks get
    # round(10.5) = 10 noise tokens, 0.143; short paragraphs' minimum of one pushes up).
    assert noise == sum(min(max(round(len(c) * 0.15), 1), len(c) - 1) for c in chunks)
    assert 0.14 <= noise / sum(len(c) for c in chunks) < 0.16
    # Reproducible under a seed, different under another.
    again = _task_examples(SMALL_LENGTHS, seed=3)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, again))
    other = _task_examples(SMALL_LENGTHS, seed=4)
    differ = sum(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, other))
    assert differ > len(examples) // 2


def test_task_packs_with_the_enc_dec_feature_converter(sentinel_vocab):
    lengths = SMALL_LENGTHS
    ds = seqio.get_mixture_or_task("moetx_en_span_corruption").get_dataset(
        lengths, split="validation", shuffle=False, seed=0
    )
    converter = seqio.EncDecFeatureConverter(pack=True)
    # Rows twice the example lengths, so that two full examples fit one row.
    packed = {"inputs": 128, "targets": 32}
    batches = list(converter(ds, packed).batch(4).take(6).as_numpy_iterator())
    batch = batches[0]
    for key, length in [
        ("encoder_input_tokens", 128),
        ("encoder_segment_ids", 128),
        ("encoder_positions", 128),
        ("decoder_target_tokens", 32),
        ("decoder_input_tokens", 32),
        ("decoder_segment_ids", 32),
        ("decoder_positions", 32),
        ("decoder_loss_weights", 32),
    ]:
        assert batch[key].shape == (4, length), key
    assert min(b["encoder_segment_ids"].max() for b in batches) >= 2  # examples share rows
    for b in batches:
        enc_seg, dec_seg = b["encoder_segment_ids"], b["decoder_segment_ids"]
        np.testing.assert_array_equal(enc_seg.max(axis=1), dec_seg.max(axis=1))
        # Decoder inputs are the targets shifted right within each packed segment (0 first).
        tgt, dec_in = b["decoder_target_tokens"], b["decoder_input_tokens"]
        pos = b["decoder_positions"]
        starts = (pos == 0) & (dec_seg > 0)
        assert (dec_in[starts] == 0).all()
        inner = pos[:, 1:] > 0
        np.testing.assert_array_equal(dec_in[:, 1:][inner], tgt[:, :-1][inner])
        # Every packed target segment starts with the first sentinel and ends in EOS.
        assert (tgt[starts] == sentinel_vocab.vocab_size - 1).all()
        ends = (dec_seg > 0) & (np.pad(dec_seg[:, 1:], [(0, 0), (0, 1)]) != dec_seg)
        assert (tgt[ends] == EOS).all() and ends.sum() == starts.sum()
