"""Train step semantics: gradient accumulation, loss normalization, dropout determinism."""

import jax
import numpy as np
import pytest

from moetx.trainer import losses
from tests.trainer.helpers import make_trainer, packed_batch, tiny_model


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


def test_dropout_is_deterministic_per_step_and_active():
    from moetx.lm import models, transformer
    from tests.trainer.helpers import TINY

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
    w, f = losses.loss_weights_and_factor(b, model.loss_normalization)
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
    with pytest.raises(ValueError, match="Could not restore checkpoint_0"):
        ckpt.restore(0, with_ema.abstract_state_with_shardings())
