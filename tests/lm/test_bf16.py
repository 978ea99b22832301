"""bfloat16 activations (ACTIVATION_DTYPE / TransformerConfig.dtype) with float32 parameters and
float32 loss: the loss curve on the bundled corpus stays within a stated band of float32's."""

import jax
import numpy as np
import pytest

from moetx.trainer import data
from tests.conftest import TINY, make_trainer

STEPS = 30
#: The band: bfloat16's loss within this fraction of float32's at every step, and its mean over
#: the last 10 steps within `FINAL_BAND` (measured here over 30 steps of
#: batch 8 x 64, loss 8.91 -> 6.81: at most 0.8% at a step, 0.2% over the last 10).
STEP_BAND = 0.02
FINAL_BAND = 0.01


def _corpus_batches(model, n: int, batch_size: int = 8, length: int = 64) -> list[dict]:
    cfg = data.DatasetConfig("moetx_en_causal_lm", {"targets": length}, batch_size=batch_size,
                             seed=0)
    ds = data.get_dataset(cfg, model.feature_converter, 0, 1, batch_size, num_epochs=None)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


@pytest.mark.usefixtures("registered_tasks")
def test_bfloat16_activations_follow_the_float32_loss_curve():
    from moetx.lm import models, transformer

    curves = {}
    batches = None
    for dtype in ("float32", "bfloat16"):
        cfg = transformer.TransformerConfig(**{**TINY, "vocab_size": 8192, "dtype": dtype})
        model = models.DecoderOnlyModel(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
        batches = batches or _corpus_batches(model, STEPS)
        trainer = make_trainer(model, batch_size=8, length=64)
        state = trainer.init_state()
        assert jax.tree.leaves(state.params)[0].dtype == np.float32  # parameters stay f32
        losses = []
        for batch in batches:
            state, m = trainer.train_step(state, trainer.to_global(batch))
            losses.append(float(m["loss"]))
        curves[dtype] = np.asarray(losses)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    assert f32[-10:].mean() < f32[:5].mean() - 1.5  # it learns
    assert not np.array_equal(f32, bf16)  # bfloat16 really ran
    np.testing.assert_array_less(np.abs(bf16 - f32) / f32, STEP_BAND)
    assert abs(bf16[-10:].mean() - f32[-10:].mean()) / f32[-10:].mean() < FINAL_BAND
