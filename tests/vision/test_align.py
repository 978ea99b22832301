"""ALIGN-style dual encoder: the contrastive loss's exact values (ln B for identical
embeddings, i2t == t2i for symmetric logits), its independence of how the batch is sharded
(GSPMD and the explicit all-gather formulation), padding masks, and a tiny run on the shared
trainer pairing digit images with their names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moetx.trainer import optimizers, partitioning, trainer as trainer_lib
from moetx.vision import align, data


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_identical_embeddings_give_ln_b():
    z = jnp.tile(_unit(jnp.arange(1.0, 5.0))[None], (8, 1))
    for ls in (0.0, 0.1):
        loss, i2t, t2i = align.contrastive_loss(z, z, jnp.log(10.0), ls)
        np.testing.assert_allclose(loss, math.log(8), rtol=1e-6)
        np.testing.assert_allclose(float(loss), 2.0794, atol=1e-4)


def test_symmetric_logits_give_equal_directions_and_the_expected_value():
    z = _unit(jax.random.normal(jax.random.PRNGKey(0), (6, 5)))
    loss, i2t, t2i = align.contrastive_loss(z, z, jnp.log(5.0), 0.1)
    np.testing.assert_allclose(i2t, t2i, rtol=1e-6)
    # Independent value: row-wise smoothed cross entropy in numpy float64.
    logits = np.asarray(z, np.float64) @ np.asarray(z, np.float64).T * 5.0
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    targets = np.eye(6) * 0.9 + 0.1 / 6
    np.testing.assert_allclose(i2t, -(targets * logp).sum(1), rtol=1e-5)
    # Non-symmetric logits: the two directions differ.
    w = _unit(jax.random.normal(jax.random.PRNGKey(1), (6, 5)))
    _, a, b = align.contrastive_loss(z, w, jnp.log(5.0), 0.1)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_padding_rows_are_neither_queries_nor_negatives():
    zi = _unit(jax.random.normal(jax.random.PRNGKey(2), (4, 5)))
    zt = _unit(jax.random.normal(jax.random.PRNGKey(3), (4, 5)))
    ref, _, _ = align.contrastive_loss(zi, zt, jnp.log(7.0), 0.1)
    junk = jax.random.normal(jax.random.PRNGKey(4), (3, 5))
    pad = lambda z: jnp.concatenate([z, _unit(junk)])  # noqa: E731
    loss, _, _ = align.contrastive_loss(pad(zi), pad(zt), jnp.log(7.0), 0.1,
                                        mask=jnp.array([1, 1, 1, 1, 0, 0, 0]))
    np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_loss_is_the_same_sharded_or_not():
    zi = _unit(jax.random.normal(jax.random.PRNGKey(5), (16, 8)))
    zt = _unit(jax.random.normal(jax.random.PRNGKey(6), (16, 8)))
    t = jnp.log(10.0)
    ref = float(align.contrastive_loss(zi, zt, t, 0.1)[0])
    mesh = partitioning.make_mesh((8, 1, 1))
    sharded = NamedSharding(mesh, P("data"))
    zi_s, zt_s = jax.device_put(zi, sharded), jax.device_put(zt, sharded)
    gspmd = jax.jit(lambda a, b: align.contrastive_loss(a, b, t, 0.1)[0])(zi_s, zt_s)
    gathered = jax.jit(lambda a, b: align.sharded_contrastive_loss(a, b, t, mesh))(zi_s, zt_s)
    np.testing.assert_allclose(float(gspmd), ref, rtol=1e-6)
    np.testing.assert_allclose(float(gathered), ref, rtol=1e-6)
    # Gradients too (the all-gather's transpose is a reduce-scatter).
    g_ref = jax.grad(lambda a: align.contrastive_loss(a, zt, t, 0.1)[0])(zi)
    g_sh = jax.jit(jax.grad(lambda a: align.sharded_contrastive_loss(a, zt_s, t, mesh)))(zi_s)
    np.testing.assert_allclose(g_sh, g_ref, rtol=1e-5, atol=1e-7)


def test_dual_encoder_trains_on_digit_captions():
    """Digits paired with their names ("the number seven", ...): 80 steps of the shared
    trainer on a 2-device mesh lift image->text retrieval (right digit named) far above
    chance."""
    model = align.DualEncoderModel(image_model_name="tiny/s", vocab_size=len(
        data.CAPTION_VOCAB), embed_dim=32, text_width=32, text_depth=1, retrieval_by_label=True)
    mesh = partitioning.make_mesh((2, 1, 1), devices=jax.devices()[:2])
    shapes = model.input_shapes(32, {"image": (8, 8, 1), "text": 8})
    trainer = trainer_lib.Trainer(
        model, lambda param_axes: optimizers.adamw(optimizers.warmup_cosine_schedule(
            3e-3, 10, 80), weight_decay=1e-4), mesh, partitioning.standard_logical_axis_rules(),
        shapes, ema_decay=None)
    images, text, labels = data.digit_captions("train")
    rng = np.random.RandomState(0)
    state = trainer.init_state()
    eval_batch = {"image": images[:32], "text": text[:32], "label": labels[:32],
                  "mask": np.ones(32, np.float32)}
    before = trainer.evaluate(state.params, iter([eval_batch]), model_state=state.model_state)
    for _ in range(80):
        idx = rng.randint(0, len(images), 32)
        batch = {"image": images[idx], "text": text[idx], "label": labels[idx],
                 "mask": np.ones(32, np.float32)}
        state, sums = trainer.train_step(state, trainer.to_global(batch))
    after = trainer.evaluate(state.params, iter([eval_batch]), model_state=state.model_state)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["pairs"] == 32.0 and "perplexity" not in after
    # Chance of naming the right digit is about 10%.
    assert before["accuracy"] < 0.35 and after["accuracy"] > 0.7, (before, after)
    # The temperature was learnt.
    assert abs(float(jnp.exp(-state.params["t"])) - 0.1) > 1e-3
    with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
        model.input_shapes(4, {"image": (8, 8, 1)})
