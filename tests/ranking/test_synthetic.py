"""On a synthetic task whose ideal order is known (items sorted by their first feature),
seq2slate learns that order with either objective, trained by moetx's Trainer."""

import jax
import numpy as np
import pytest

from moetx.ranking import model as ranking_model, objectives
from moetx.trainer import optimizers, partitioning, trainer as trainer_lib

N, F, BATCH = 5, 4, 32


def synthetic_slates(batch: int, rng: np.random.RandomState) -> dict:
    """Slates of N random items; the label of an item is its rank by feature 0 (0 .. N-1), so
    the ideal order is by decreasing feature 0. 'clicks' are 8^label: at every step the weak
    supervision target is (almost) one-hot on the best remaining item."""
    x = rng.randn(batch, N, F).astype(np.float32)
    labels = np.argsort(np.argsort(x[..., 0], axis=1), axis=1).astype(np.float32)
    return {"features": x, "item_mask": np.ones((batch, N), np.float32), "labels": labels,
            "clicks": (8.0 ** labels).astype(np.float32)}


def _train(model, steps: int, peak_lr: float) -> tuple[float, float]:
    """Trains on fresh synthetic slates; (fraction of 256 held-out slates whose greedy order is
    the ideal one, their mean NDCG)."""
    # One device: learning does not depend on the layout (data parallelism is exact, see
    # tests/trainer), and on 8 simulated CPU devices each of the hundreds of small steps
    # costs ~6x more.
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(
        model, lambda param_axes: optimizers.adamw(
            optimizers.warmup_cosine_schedule(peak_lr, 20, steps, 0.05), param_axes, b2=0.999,
            weight_decay=0.0),
        mesh, partitioning.standard_logical_axis_rules(),
        model.input_shapes(BATCH, {"features": (N, F)}), seed=0)
    state = trainer.init_state()
    rng = np.random.RandomState(0)
    previous = None
    for _ in range(steps):
        state, sums = trainer.train_step(state, trainer.to_global(synthetic_slates(BATCH, rng)))
        # Two steps in flight at most, as `trainer.run_training_loop` keeps them (queued further
        # ahead, XLA:CPU with 8 simulated devices can starve its thread pool and abort).
        if previous is not None:
            jax.block_until_ready(previous)
        previous = sums
    test = synthetic_slates(256, np.random.RandomState(1))
    rank = jax.jit(lambda p, x, m: model.rank(p, x, m))
    slate = np.asarray(rank(state.params, test["features"], test["item_mask"] > 0))
    ideal = np.argsort(-test["features"][..., 0], axis=1)
    ndcg = objectives.slate_ndcg(slate, test["labels"], test["item_mask"])
    return float((slate == ideal).all(1).mean()), float(np.mean(ndcg))


def test_weak_supervision_learns_the_ideal_order():
    model = ranking_model.Seq2SlateModel(encoder="lstm", hidden_dim=32,
                                         objective="weak_supervision")
    exact, ndcg = _train(model, 300, 1e-2)
    assert exact >= 0.9 and ndcg > 0.99, (exact, ndcg)


@pytest.mark.parametrize("encoder", ["transformer"])
def test_reinforce_learns_the_ideal_order(encoder):
    """REINFORCE on the NDCG against the labels (moving-average baseline, 4 samples a slate)."""
    model = ranking_model.Seq2SlateModel(encoder=encoder, hidden_dim=32, num_layers=1,
                                         mlp_dim=64, objective="reinforce", reward="labels",
                                         num_samples=4)
    exact, ndcg = _train(model, 400, 1e-2)
    # A random order is the ideal one for 1/120 of the slates, with mean NDCG 0.718.
    assert exact >= 0.7 and ndcg > 0.97, (exact, ndcg)
