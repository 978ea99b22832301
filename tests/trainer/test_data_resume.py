"""The indexed input pipeline (`moetx.trainer.indexed_data`): resuming at batch N gives exactly
the batches a run from batch 0 gives from N on, at a cost that does not grow with N, and the
global batch order does not depend on the number of processes reading it; and the data settings
around both pipelines: packing on and off, prefetching."""

import dataclasses
import time
import types

import numpy as np
import pytest

from moetx.trainer import data, indexed_data
from moetx.trainer import train as train_lib
from moetx.trainer.train import evaluation_batches, make_batches
from tests.conftest import register_integer_lm_task

TASK = "moetx_test_indexed_tiny"
LENGTH = 16
BATCH = 8


@pytest.fixture(scope="module")
def tiny_task():
    """A packed LM-style task over 300 seeded integer sequences of 2..20 ids (no file read)."""
    import seqio

    register_integer_lm_task(TASK, 300, 240, max_len=21, min_len=2)
    yield TASK
    seqio.TaskRegistry.remove(TASK)


@pytest.fixture
def index_root(tmp_path, clean_gin):
    import gin

    gin.bind_parameter("moetx.trainer.indexed_data.index_dir.path", str(tmp_path / "indexed"))
    return tmp_path / "indexed"


def _cfg(pipeline="indexed", **kw):
    kw = {"split": "train", "batch_size": BATCH, "shuffle": True, "seed": 3, **kw}
    return data.DatasetConfig(TASK, {"targets": LENGTH}, pipeline=pipeline, **kw)


def _trainer(rows: slice):
    """What `make_batches` needs of a Trainer: the process's rows and the feature converter.
    Rows [i*B/P, (i+1)*B/P) stand for process i of P."""
    import seqio

    model = types.SimpleNamespace(feature_converter=seqio.DecoderFeatureConverter(pack=True))
    return types.SimpleNamespace(model=model, local_rows=lambda global_bs: rows)


def _shard(i: int, p: int) -> slice:
    return slice(i * BATCH // p, (i + 1) * BATCH // p)


def _batches(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.usefixtures("tiny_task")
def test_starting_at_batch_n_gives_the_batches_of_a_run_from_zero(index_root):
    it, local_bs = make_batches(_trainer(_shard(0, 1)), _cfg(), 0, num_epochs=None)
    assert isinstance(it, indexed_data.IndexedBatches) and local_bs == BATCH
    per_epoch = it.store.num_rows // BATCH
    assert per_epoch >= 10, it.store.num_rows  # several epochs are crossed below
    reference = _batches(it, 3 * per_epoch + 6)
    assert it.get_state() == {"batches_consumed": 3 * per_epoch + 6}
    for n in (1, per_epoch - 1, per_epoch, 2 * per_epoch + 3):
        resumed, _ = make_batches(_trainer(_shard(0, 1)), _cfg(), n, num_epochs=None)
        for j, batch in enumerate(_batches(resumed, 3)):
            _assert_same(batch, reference[n + j])
    # Each epoch is a new permutation of the stored rows, every row once.
    rows = it.store.num_rows
    order = indexed_data.example_order(rows, True, 3, None)
    epochs = [[order[e * rows + i] for i in range(rows)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(rows))
    assert epochs[0] != epochs[1]


@pytest.mark.usefixtures("tiny_task")
def test_first_batch_at_a_large_n_costs_what_it_costs_at_zero(index_root):
    make_batches(_trainer(_shard(0, 1)), _cfg(), 0, num_epochs=None)  # materialise once

    def first_batch_seconds(n: int) -> float:
        start = time.perf_counter()
        it, _ = make_batches(_trainer(_shard(0, 1)), _cfg(), n, num_epochs=None)
        next(it)
        return time.perf_counter() - start

    at_zero = min(first_batch_seconds(0) for _ in range(3))
    at_large = min(first_batch_seconds(1_000_000) for _ in range(3))
    # A replay of a million batches would take minutes; reading batch N is one lookup.
    assert at_large < at_zero + 0.5, (at_zero, at_large)


@pytest.mark.usefixtures("tiny_task")
def test_global_batches_do_not_depend_on_the_number_of_processes(index_root):
    one, _ = make_batches(_trainer(_shard(0, 1)), _cfg(), 0, num_epochs=None)
    reference = _batches(one, 40)
    for p in (2, 4):
        shards = [make_batches(_trainer(_shard(i, p)), _cfg(), 0, num_epochs=None)
                  for i in range(p)]
        assert all(local_bs == BATCH // p for _, local_bs in shards)
        for b in range(40):
            _assert_same(_concat([next(it) for it, _ in shards]), reference[b])


@pytest.mark.usefixtures("tiny_task")
def test_a_run_of_two_processes_resumes_on_one_with_the_same_batch_order(index_root):
    """Two processes read 7 batches and save their state; one process resumes from it."""
    uninterrupted, _ = make_batches(_trainer(_shard(0, 1)), _cfg(), 0, num_epochs=None)
    reference = _batches(uninterrupted, 12)
    pair = [make_batches(_trainer(_shard(i, 2)), _cfg(), 0, num_epochs=None)[0]
            for i in range(2)]
    for b in range(7):
        _assert_same(_concat([next(it) for it in pair]), reference[b])
    states = [it.get_state() for it in pair]
    assert states[0] == states[1] == {"batches_consumed": 7}
    resumed, _ = make_batches(_trainer(_shard(0, 1)), _cfg(), states[0]["batches_consumed"],
                              num_epochs=None)
    for b in range(7, 12):
        _assert_same(next(resumed), reference[b])


@pytest.mark.usefixtures("tiny_task")
def test_unshuffled_evaluation_gives_the_seqio_paths_batches(index_root):
    seqio_cfg, indexed_cfg = (_cfg(p, split="validation", shuffle=False, seed=0)
                              for p in ("seqio", "indexed"))
    streamed = list(evaluation_batches(_trainer(_shard(0, 1)), seqio_cfg))
    indexed = list(evaluation_batches(_trainer(_shard(0, 1)), indexed_cfg))
    assert len(streamed) == len(indexed) >= 2
    for a, b in zip(streamed, indexed):
        _assert_same(a, b)
    # Two processes: the same global batches, the last one padded on both.
    halves = [list(evaluation_batches(_trainer(_shard(i, 2)), indexed_cfg)) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(indexed)
    for a, b, whole in zip(*halves, indexed):
        _assert_same(_concat([a, b]), whole)


@pytest.mark.usefixtures("tiny_task")
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_evaluation_of_a_run_reads_the_same_batches(monkeypatch, shuffle):
    """A run's evaluations share one SeqIO pipeline when it is unshuffled (built once, read from
    its start each time); a shuffled one, which tf.data would reorder between passes, is built
    for each evaluation. Either way every pass gives `evaluation_batches`' batches."""
    cfg = _cfg("seqio", split="validation", shuffle=shuffle, seed=0)
    built = []
    real = train_lib.make_batches
    monkeypatch.setattr(train_lib, "make_batches",
                        lambda *a, **k: built.append(1) or real(*a, **k))
    reference = list(evaluation_batches(_trainer(_shard(1, 2)), cfg))
    built.clear()
    batches = train_lib.EvaluationBatches(_trainer(_shard(1, 2)), cfg)
    passes = [list(batches) for _ in range(3)]
    assert len(built) == (3 if shuffle else 1)
    assert len(reference) >= 2 and all(len(p) == len(reference) for p in passes)
    for p in passes:
        for a, b in zip(p, reference):
            _assert_same(a, b)
    # A pass stopped early (an evaluation of eval_steps batches) leaves the next one whole.
    next(iter(batches))
    assert len(list(batches)) == len(reference)


@pytest.mark.usefixtures("tiny_task")
def test_the_store_is_reused_and_keyed_by_what_its_rows_depend_on(index_root):
    import seqio

    fc = seqio.DecoderFeatureConverter(pack=True)
    path = indexed_data.materialize(_cfg(), fc)
    written = (path / "meta.json").stat().st_mtime_ns
    assert indexed_data.materialize(_cfg(), seqio.DecoderFeatureConverter(pack=True)) == path
    assert (path / "meta.json").stat().st_mtime_ns == written
    others = {indexed_data.store_path(_cfg(seed=4), fc),
              indexed_data.store_path(_cfg(shuffle=False), fc),
              indexed_data.store_path(_cfg(split="validation"), fc),
              indexed_data.store_path(_cfg(), seqio.DecoderFeatureConverter(pack=False)),
              indexed_data.store_path(data.DatasetConfig(TASK, {"targets": 32}, seed=3), fc)}
    assert path not in others and len(others) == 5
    assert [p.name for p in index_root.iterdir()] == [path.name]  # no temporary left


def test_the_key_ignores_a_lazily_loaded_cache_but_not_a_setting():
    """A vocabulary-like object loads its model at first use: the store key must not move."""

    class Lazy:
        def __init__(self, path, extra):
            self._path, self._extra, self._model = path, extra, None

    before = indexed_data.describe({"f": Lazy("/v.model", 0)})
    loaded = Lazy("/v.model", 0)
    loaded._model = (object(), Lazy("/x", 1))
    assert indexed_data.describe({"f": loaded}) == before
    assert indexed_data.describe({"f": Lazy("/v.model", 100)}) != before
    assert indexed_data.describe({"f": Lazy("/w.model", 0)}) != before


@pytest.mark.usefixtures("tiny_task")
def test_what_cannot_be_indexed_is_refused_with_the_fix(index_root):
    import seqio

    with pytest.raises(ValueError, match="pipeline must be one of"):
        _cfg("tfdata")
    with pytest.raises(indexed_data.IndexingError, match="needs a seed"):
        indexed_data.check_indexable(_cfg(seed=None))
    seqio.MixtureRegistry.remove("moetx_test_indexed_mix")
    seqio.MixtureRegistry.add("moetx_test_indexed_mix", [(TASK, 1.0)])
    try:
        with pytest.raises(indexed_data.IndexingError, match="mixture.*pipeline = 'seqio'"):
            indexed_data.check_indexable(
                data.DatasetConfig("moetx_test_indexed_mix", {"targets": LENGTH},
                                   pipeline="indexed"))
    finally:
        seqio.MixtureRegistry.remove("moetx_test_indexed_mix")
    import gin

    gin.bind_parameter("moetx.trainer.indexed_data.max_store_bytes.value", 1000)
    with pytest.raises(indexed_data.IndexingError, match="larger than 1,000 bytes"):
        indexed_data.materialize(_cfg(), seqio.DecoderFeatureConverter(pack=True))
    assert not index_root.exists() or not list(index_root.iterdir())


@pytest.mark.slow  # four train processes: 3.5 min on the shared 2-core machine (load 9)
def test_a_real_two_process_run_resumes_on_one_process(tmp_path, corpus_dir, default_vocab):
    """The train command with the indexed pipeline: two processes run steps 1-4 and save; one
    process resumes for steps 5-8. Every step's loss is the uninterrupted one-process run's
    (to the printed 4 decimals, give or take one: 2 devices sum in another order than 1). The
    one test of a real change of the process count; the cheap tests above pin the same order
    at the `make_batches` level."""
    from tests.conftest import train_losses
    from tests.reliability.train_processes import (start_pair, start_train, stop_all,
                                                   train_args, wait_all)

    lines = (corpus_dir / "validation.txt").read_text().splitlines()[:60]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    extra = ["--gin.MIXTURE_OR_TASK_NAME=@moetx.tasks.text_files_task()",
             "--gin.moetx.tasks.text_files_task.name='moetx_test_resume_text'",
             f"--gin.moetx.tasks.text_files_task.train_files=['{text}']",
             f"--gin.moetx.tasks.text_files_task.vocabulary_path='{default_vocab}'",
             "--gin.train/DatasetConfig.pipeline='indexed'",
             f"--gin.moetx.trainer.indexed_data.index_dir.path='{tmp_path / 'indexed'}'"]
    runs = {}
    procs = [start_train(train_args(tmp_path / "reference", 8, 100, *extra)),
             *start_pair(train_args(tmp_path / "resumed", 4, 4, *extra))]
    try:
        codes = wait_all(procs)
        assert codes == [0, 0, 0], [p.log[-2000:] for p in procs]
        runs["reference"], runs["pair"] = train_losses(procs[0].log), train_losses(procs[1].log)
        assert "2 process(es)" in procs[1].log
        one = start_train(train_args(tmp_path / "resumed", 8, 4, *extra))
        procs.append(one)
        assert one.wait() == 0, one.log[-2000:]
        assert "Restored checkpoint_4" in one.log and "1 process(es)" in one.log
        runs["resumed"] = train_losses(one.log)
    finally:
        stop_all(procs)
    assert sorted(runs["pair"]) == [1, 2, 3, 4] and sorted(runs["resumed"]) == [5, 6, 7, 8]
    for step, loss in {**runs["pair"], **runs["resumed"]}.items():
        assert abs(float(loss) - float(runs["reference"][step])) <= 1.5e-4, (step, runs)


@pytest.mark.usefixtures("tiny_task")
@pytest.mark.parametrize("pipeline", ["seqio", "indexed"])
def test_pack_false_gives_one_example_per_row_and_true_packs(index_root, pipeline):
    # The model's converter packs; DatasetConfig.pack decides (it was once ignored).
    def tokens_per_row(pack: bool):
        it, _ = make_batches(_trainer(_shard(0, 1)), _cfg(pipeline, pack=pack), 0, None)
        batch = _concat(_batches(it, 4))
        return batch, (batch["decoder_target_tokens"] > 0).sum(axis=1)

    packed, packed_tokens = tokens_per_row(True)
    assert packed["decoder_segment_ids"].max() >= 2  # several examples share rows
    unpacked, unpacked_tokens = tokens_per_row(False)
    assert "decoder_segment_ids" not in unpacked or unpacked["decoder_segment_ids"].max() <= 1
    # One sequence of 1..LENGTH ids (EOS included) per row, padded after it.
    assert (unpacked_tokens >= 1).all() and (unpacked_tokens <= LENGTH).all()
    for row, n in zip(unpacked["decoder_target_tokens"], unpacked_tokens):
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    assert packed_tokens.mean() > 1.2 * unpacked_tokens.mean()


def test_feature_converter_for_keeps_the_settings_and_leaves_pass_through_alone():
    import seqio

    packing = seqio.DecoderFeatureConverter(pack=True, loss_on_targets_only=False, bos_id=3)
    cfg = data.DatasetConfig(TASK, {"targets": LENGTH}, pack=False)
    unpacking = data.feature_converter_for(cfg, packing)
    assert type(unpacking) is seqio.DecoderFeatureConverter
    assert unpacking.pack is False and packing.pack is True  # a new one; the model's untouched
    # Its inner converters (what DecoderFeatureConverter dispatches to) are unpacked too, and
    # the other settings carried over.
    assert unpacking.strictlm_feature_converter.pack is False
    assert unpacking.prefixlm_feature_converter.pack is False
    assert unpacking._loss_on_targets_only is False and unpacking.bos_id == 3
    assert data.feature_converter_for(dataclasses.replace(cfg, pack=True), packing) is packing
    enc_dec = data.feature_converter_for(cfg, seqio.EncDecFeatureConverter(pack=True))
    assert type(enc_dec) is seqio.EncDecFeatureConverter and enc_dec.pack is False
    through = seqio.PassThroughFeatureConverter()
    assert data.feature_converter_for(cfg, through) is through


@pytest.mark.usefixtures("tiny_task")
@pytest.mark.parametrize("prefetch", [2, -1])
def test_prefetch_gives_the_same_batches_and_resume_position(prefetch):
    trainer = _trainer(_shard(0, 1))
    plain, _ = make_batches(trainer, _cfg("seqio"), 0, None)
    ahead, _ = make_batches(trainer, _cfg("seqio", prefetch=prefetch), 0, None)
    for a, b in zip(_batches(plain, 5), _batches(ahead, 5)):
        _assert_same(a, b)
    assert ahead.get_state() == {"batches_consumed": 5}  # what was read, not what was made
    resumed, _ = make_batches(trainer, _cfg("seqio", prefetch=prefetch), 5, None)
    _assert_same(next(resumed), next(plain))


@pytest.mark.parametrize("bad", [-2, 1.5, "2", True])
def test_a_bad_prefetch_is_refused(bad):
    with pytest.raises(ValueError, match="prefetch must be a number of batches"):
        data.DatasetConfig(TASK, {"targets": LENGTH}, prefetch=bad)
