"""Train step semantics: gradient accumulation, loss normalization, dropout determinism."""

import jax
import numpy as np
import pytest

from moetx.trainer import metrics as metrics_lib, trainer as trainer_lib
from tests.conftest import make_trainer, packed_batch, tiny_model


@pytest.mark.parametrize("normalization", ["NUM_REAL_TARGET_TOKENS", None,
                                           "AVERAGE_PER_SEQUENCE"])
def test_four_microbatches_give_the_full_batch_update(normalization):
    model = tiny_model(loss_normalizing_factor=normalization)
    batch = packed_batch(8, 32, seed=3)
    out = []
    for m in (1, 4):
        trainer = make_trainer(model, (2, 1, 1), num_microbatches=m)
        state = trainer.init_state()
        for _ in range(2):  # two steps: also exercises the optimizer state
            state, sums = trainer.train_step(state, trainer.to_global(batch))
        out.append((jax.device_get(sums), jax.device_get(state.params)))
    (s1, p1), (s4, p4) = out
    for k in ("loss", "cross_ent_sum", "weight", "correct"):
        np.testing.assert_allclose(s1[k], s4[k], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           p1, p4)


def test_microbatches_must_divide_the_batch():
    with pytest.raises(ValueError, match="num_microbatches"):
        make_trainer(tiny_model(), (1, 1, 1), batch_size=8, num_microbatches=3)


def test_loss_decreases_on_a_repeated_batch():
    trainer = make_trainer(tiny_model(), (1, 1, 1))
    state = trainer.init_state()
    batch = trainer.to_global(packed_batch(8, 32, seed=4))
    first = None
    for _ in range(15):
        state, sums = trainer.train_step(state, batch)
        first = first if first is not None else float(sums["loss"])
    assert float(sums["loss"]) < first - 0.5


def test_the_train_step_donates_the_state_unless_told_not_to():
    batch = packed_batch(8, 32, seed=4)
    results = {}
    for donate in (True, False):
        trainer = make_trainer(tiny_model(), (1, 1, 1), donate_state=donate)
        state = trainer.init_state()
        leaves = jax.tree_util.tree_leaves(state.params)
        new, sums = trainer.train_step(state, trainer.to_global(batch))
        jax.block_until_ready(new)
        # Donated: XLA took the input buffers for the output. Not donated: they are intact.
        assert all(x.is_deleted() for x in leaves) is donate
        assert not any(x.is_deleted() for x in leaves) is not donate
        results[donate] = (float(sums["loss"]), jax.device_get(new.params))
    assert results[True][0] == results[False][0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, results[True][1], results[False][1])


def test_dropout_is_deterministic_per_step_and_active():
    from moetx.lm import models, transformer
    from tests.conftest import TINY

    model = models.DecoderOnlyModel(transformer.TransformerConfig(**TINY, dropout_rate=0.3))
    batch = packed_batch(8, 32, seed=5)
    losses_ = []
    for _ in range(2):
        trainer = make_trainer(model, (1, 1, 1))
        state = trainer.init_state()
        _, sums = trainer.train_step(state, trainer.to_global(batch))
        losses_.append(float(sums["loss"]))
    assert losses_[0] == losses_[1]
    params = trainer.init_state().params
    b = trainer.to_global(batch)
    w, f = model.loss_weights_and_factor(b)
    a = model.loss_fn(params, b, jax.random.PRNGKey(1), w, f)[0]
    c = model.loss_fn(params, b, jax.random.PRNGKey(2), w, f)[0]
    assert float(a) != float(c)


def test_checkpoints_from_before_model_state_and_ema_still_restore(tmp_path):
    """A checkpoint saved as {step, params, opt_state} (before TrainState had `model_state` and
    `ema`) restores into a run that keeps neither; a run that keeps an EMA gets a clear error."""
    import flax

    from moetx.trainer import checkpoints

    trainer = make_trainer(tiny_model(), (1, 1, 1))
    state = trainer.init_state()
    legacy = {k: v for k, v in flax.serialization.to_state_dict(state).items()
              if k in ("step", "params", "opt_state")}
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1)
    ckpt.save(0, legacy, {"batches": 0})
    restored, data_state = ckpt.restore(0, trainer.abstract_state_with_shardings())
    assert restored.model_state == {} and restored.ema == {}
    assert data_state == {"batches": 0}
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored.params),
                           jax.device_get(state.params))

    with_ema = make_trainer(tiny_model(), (1, 1, 1), ema_decay=0.9)
    with pytest.raises(ValueError, match="checkpoint_0 in .* was written by another model or "
                                         "optimizer: ema/params/.* is not in the checkpoint"):
        ckpt.restore(0, with_ema.abstract_state_with_shardings())


def test_replicated_arrays_are_split_among_replicas_for_writing_only_when_large(
        tmp_path, monkeypatch):
    """Orbax slices each replicated array on device to split its writing among the replicas (a
    program compiled per shape at the first save: seconds for a small model); small arrays are
    written whole, large ones still split, and both restore exactly."""
    from jax.sharding import NamedSharding, PartitionSpec

    from moetx.trainer import checkpoints

    slices = []
    real = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim",
                        lambda x, *a, **k: slices.append(x.shape) or real(x, *a, **k))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    per_replica = checkpoints.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
    small = np.arange(1024, dtype=np.float32).reshape(16, 64)  # splittable 8 ways
    large = np.arange(8 * per_replica // 4, dtype=np.float32).reshape(-1, 1024)
    state = {"small": jax.device_put(small, replicated),
             "large": jax.device_put(large, replicated)}
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1)
    ckpt.save(0, state, {"batches": 0})
    assert slices and set(slices) == {large.shape}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
                for k, v in state.items()}
    restored, _ = ckpt.restore(0, abstract)
    np.testing.assert_array_equal(np.asarray(restored["small"]), small)
    np.testing.assert_array_equal(np.asarray(restored["large"]), large)


def test_language_model_protocol_members():
    """The LM fills unpacked batches as the trainer used to (one segment per row, zeros), counts
    encoder + decoder target tokens, averages the router metrics and prints its eval line."""
    from types import SimpleNamespace

    from moetx.lm import models, transformer
    from tests.conftest import TINY

    model = tiny_model()
    shapes = model.input_shapes(8, 32)
    batch = packed_batch(8, 32)
    unpacked = {k: v for k, v in batch.items()
                if k not in ("decoder_segment_ids", "decoder_positions")}
    full = model.complete_batch({**unpacked, "extra": np.ones(8)}, shapes)
    assert list(full) == list(shapes)
    np.testing.assert_array_equal(full["decoder_segment_ids"],
                                  (batch["decoder_target_tokens"] > 0).astype(np.int32))
    assert full["decoder_segment_ids"].dtype == np.int32 and not full["decoder_positions"].any()
    with pytest.raises(ValueError, match="needs at least decoder_target_tokens"):
        model.complete_batch({"decoder_input_tokens": batch["decoder_input_tokens"]}, shapes)

    assert model.count_per_batch(shapes) == 8 * 32
    encdec = models.EncoderDecoderModel(transformer.TransformerConfig(
        **TINY, num_encoder_layers=1))
    assert encdec.count_per_batch(encdec.input_shapes(8, {"inputs": 16, "targets": 32})) \
        == 8 * (16 + 32)

    assert [model.metric_reduction(k) for k in (
        "moe_aux_loss", "moe/decoder/layers_1/mlp/expert_usage", "cross_ent_sum", "loss")] \
        == ["mean", "mean", "sum", "sum"]
    m = model.summarize_metrics({"cross_ent_sum": 20.0, "z_loss_sum": 1.0, "correct": 5.0,
                                 "weight": 10.0, "moe_aux_loss": 0.5})
    assert m == {"cross_ent_loss": 2.0, "accuracy": 0.5, "z_loss": 0.1,
                 "perplexity": pytest.approx(np.exp(2.0)), "moe_aux_loss": 0.5, "tokens": 10.0}
    assert model.headline(m) == "loss 2.0000 | acc 0.500 | perplexity 7.39 (10 tokens)"

    def task(vocab_size, *features):
        feature = SimpleNamespace(rank=1, vocabulary=SimpleNamespace(vocab_size=vocab_size))
        return SimpleNamespace(name="t", output_features={f: feature for f in features})

    model.check_task(task(128, "targets"), {"targets": 32})
    with pytest.raises(ValueError, match="vocabulary has 200 ids but the model's embedding "
                                         "only 128; raise TransformerConfig.vocab_size"):
        model.check_task(task(200, "targets"))
    with pytest.raises(ValueError, match=r"is missing \['inputs'\]"):
        model.check_task(task(128, "inputs", "targets"), {"targets": 32})
    with pytest.raises(ValueError, match=r"Feature length targets=1 is too short: at least 2 "
                                         r"tokens are needed .*TASK_FEATURE_LENGTHS\['targets'\]"):
        model.input_shapes(8, {"targets": 1})


def test_training_log_keeps_the_language_model_names_and_values():
    """With 2 microbatches, the logged scalars carry T5X's names: per-token means (the loss
    normalizing factor is the token count), `loss` = cross_ent_loss + z_loss (the optimised
    loss), trainer scalars and the `timing/*` rates (no token count)."""
    from moetx.trainer import metrics as metrics_lib, trainer as trainer_lib

    class Recorder(metrics_lib.MetricWriter):
        def __init__(self, total_steps):
            super().__init__(None, total_steps)
            self.logged = {}

        def write_scalars(self, step, scalars):
            self.logged[step] = dict(scalars)

    model = tiny_model()
    trainer = make_trainer(model, (2, 1, 1), num_microbatches=2)
    state = trainer.init_state()
    batch = packed_batch(8, 32, seed=6)
    # The step's metrics are those of the parameters before its update: the eval sums.
    direct = jax.device_get(trainer.eval_step(state.params, trainer.to_global(batch)))
    writer = Recorder(1)
    trainer_lib.run_training_loop(trainer, state, iter([batch]), 1, writer, log_every=1,
                                  count_per_batch=model.count_per_batch(trainer.input_shapes))
    scalars = writer.logged[1]
    timing = {"timing/seconds", "timing/steps_per_second", "timing/seqs",
              "timing/seqs_per_second", "timing/seqs_per_second_per_core", "timing/uptime",
              "timing/tokens_per_second", "timing/tokens_per_second_per_core",
              "timing/compilation_seconds", "timing/input_seconds"}
    if metrics_lib.read_cpu_times() is not None:  # Linux
        timing |= {"host/other_cpu_cores", "host/steal_cpu_cores", "host/own_cpu_cores"}
    assert set(scalars) == {"cross_ent_loss", "accuracy", "z_loss", "perplexity", "loss",
                            "loss_per_nonpadding_target_token", "learning_rate",
                            "grad_norm"} | timing
    np.testing.assert_allclose(scalars["loss"], scalars["cross_ent_loss"] + scalars["z_loss"],
                               rtol=1e-6)
    np.testing.assert_allclose(scalars["perplexity"], np.exp(scalars["cross_ent_loss"]),
                               rtol=1e-5)
    np.testing.assert_allclose(scalars["timing/tokens_per_second"],
                               8 * 32 * scalars["timing/steps_per_second"], rtol=1e-6)
    # The batch's host-to-device placement is timed, within the window.
    assert 0 < scalars["timing/input_seconds"] <= scalars["timing/seconds"]
    weight = float(np.sum(batch["decoder_loss_weights"]))
    np.testing.assert_allclose(scalars["cross_ent_loss"], direct["cross_ent_sum"] / weight,
                               rtol=1e-5)
    np.testing.assert_allclose(scalars["accuracy"], direct["correct"] / weight, rtol=1e-5)
    np.testing.assert_allclose(scalars["z_loss"], direct["z_loss_sum"] / weight, rtol=1e-5)


def test_the_training_loop_keeps_at_most_two_steps_in_flight(monkeypatch):
    """After dispatching step n, the loop waits for step n-1's results (never for step n's, so
    the host still prepares a batch while a step runs; never further back, so the queue is
    bounded)."""
    import types

    awaited, checked = [], []

    class _Stop(Exception):
        pass

    class FakeTrainer:
        model = None

        def to_global(self, batch):
            return batch

        def train_step(self, state, batch):
            return types.SimpleNamespace(step=state.step + 1), {"step": state.step + 1}

    def on_step_end(step, state):
        assert awaited == [{"step": s} for s in range(1, step)], (step, awaited)
        checked.append(step)
        if step == 5:
            raise _Stop

    monkeypatch.setattr(jax, "block_until_ready", lambda x: awaited.append(x) or x)
    with pytest.raises(_Stop):
        trainer_lib.run_training_loop(
            FakeTrainer(), types.SimpleNamespace(step=0), iter(lambda: {}, None), 100,
            writer=None, log_every=1000, on_step_end=on_step_end)
    assert checked == [1, 2, 3, 4, 5]


def _poisoned(batch):
    bad = dict(batch)
    bad["decoder_loss_weights"] = batch["decoder_loss_weights"].copy()
    bad["decoder_loss_weights"][0, 0] = np.nan
    return bad


def test_the_skip_policy_drops_a_non_finite_update_and_counts_it():
    trainer = make_trainer(tiny_model(), skip_nonfinite_updates=True)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    good = packed_batch(8, 32)
    state, sums = trainer.train_step(state, trainer.to_global(_poisoned(good)))
    assert float(sums["skipped_update"]) == 1.0 and int(state.step) == 1
    same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), before,
                                  jax.device_get(state.params))
    assert all(jax.tree_util.tree_leaves(same))
    state, sums = trainer.train_step(state, trainer.to_global(good))
    assert float(sums["skipped_update"]) == 0.0 and np.isfinite(float(sums["grad_norm"]))
    moved = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()), before,
                                   jax.device_get(state.params))
    assert any(jax.tree_util.tree_leaves(moved))


def test_the_skip_policy_stops_after_too_many_skips_in_a_row():
    from moetx.trainer import metrics as metrics_lib

    trainer = make_trainer(tiny_model(), skip_nonfinite_updates=True)
    bad = _poisoned(packed_batch(8, 32))
    with pytest.raises(FloatingPointError, match="3 updates in a row"):
        trainer_lib.run_training_loop(trainer, trainer.init_state(), iter([bad] * 10), 10,
                                      metrics_lib.MetricWriter(None, 10), log_every=100,
                                      max_consecutive_skips=3)


def test_all_finite_guards_checkpoint_writes():
    """train() saves only when this is True for the parameters."""
    import jax.numpy as jnp

    from moetx.trainer import train as train_lib

    assert bool(train_lib.all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
    assert not bool(train_lib.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
    assert not bool(train_lib.all_finite({"a": jnp.array([jnp.nan], jnp.bfloat16)}))
