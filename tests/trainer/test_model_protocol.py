"""The trainer is model-agnostic: a toy linear regression (no tokens, no images; its own feature
names, metric names, count unit and a 'mean'-reduced metric) trains through `Trainer` with two
microbatches on a sharded mesh, and everything the trainer logs or returns comes from the model
protocol of `moetx.trainer.model`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moetx.trainer import metrics as metrics_lib, optimizers, partitioning
from moetx.trainer import trainer as trainer_lib
from moetx.trainer.model import BaseModel, Model, check_model, reduce_metrics

D = 8  # input width
BATCH = 8
MICRO = 2


class LinearRegression(BaseModel):
    """pred = x . kernel + bias, trained on the weighted squared error.

    Features: `x` [B, D], `y` [B] and the row weight `w` [B], which `complete_batch` sets to 1
    when the data has none. Metric sums: `sq_err_sum`, `n` (the weight) and the per-step mean
    `mean_prediction`; summarized: `mse`, `mean_prediction` and the count of `points`.
    """

    count_unit = "points"
    loss_metric = "mse"
    feature_converter = None

    def __init__(self):
        self.completed = 0  # batches `complete_batch` has filled

    def input_shapes(self, batch_size, task_feature_lengths):
        del task_feature_lengths
        return {"x": (batch_size, D), "y": (batch_size,), "w": (batch_size,)}

    def get_initial_variables(self, rng, input_shapes):
        kernel = 0.1 * jax.random.normal(rng, (input_shapes["x"][1],))
        return {"params": {"kernel": nn.LogicallyPartitioned(kernel, ("mlp",)),
                           "bias": nn.LogicallyPartitioned(jnp.zeros(()), ())}}

    def complete_batch(self, batch, input_shapes):
        feats = {k: np.asarray(batch[k], np.float32) for k in ("x", "y")}
        w = batch.get("w")
        feats["w"] = (np.ones(len(feats["y"]), np.float32) if w is None
                      else np.asarray(w, np.float32))
        self.completed += 1
        return feats

    def loss_weights_and_factor(self, batch):
        return batch["w"], jnp.maximum(jnp.sum(batch["w"]), 1.0)

    def _sums(self, params, batch, weights):
        pred = batch["x"] @ params["kernel"] + params["bias"]
        n = jnp.sum(weights)
        return {"sq_err_sum": jnp.sum(weights * jnp.square(pred - batch["y"])), "n": n,
                "mean_prediction": jnp.sum(weights * pred) / jnp.maximum(n, 1.0)}

    def loss_fn(self, params, batch, dropout_rng, weights, factor, num_microbatches=1,
                model_state=None):
        del dropout_rng, num_microbatches
        sums = self._sums(params, batch, weights)
        return sums["sq_err_sum"] / factor, (sums, model_state)

    def eval_fn(self, params, batch, model_state=None):
        del model_state
        return self._sums(params, batch, batch["w"])

    def metric_reduction(self, name):
        return "mean" if name == "mean_prediction" else "sum"

    def summarize_metrics(self, sums):
        return {"mse": float(sums["sq_err_sum"]) / max(float(sums["n"]), 1.0),
                "mean_prediction": float(sums["mean_prediction"]), "points": float(sums["n"])}


def _data(n, seed):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, D).astype(np.float32)
    y = (x @ np.linspace(-1.0, 1.0, D) + 0.5).astype(np.float32)
    return x, y


def _numpy_sums(params, x, y, w):
    """The metric sums of one (micro)batch, in float64 numpy."""
    pred = x.astype(np.float64) @ np.asarray(params["kernel"], np.float64) + float(
        params["bias"])
    n = w.sum()
    return {"sq_err_sum": float((w * (pred - y) ** 2).sum()), "n": float(n),
            "mean_prediction": float((w * pred).sum() / max(n, 1.0))}


def _copy(trainer, state):
    """A device copy of `state` (a train step donates the state it is given)."""
    return jax.device_put(jax.device_get(state), trainer.state_shardings)


def _trainer(model, mesh_shape=(2, 1, 2), num_microbatches=MICRO):
    mesh = partitioning.make_mesh(mesh_shape,
                                  devices=jax.devices()[:int(np.prod(mesh_shape))])
    return trainer_lib.Trainer(
        model, lambda param_axes: optimizers.sgd_momentum(optimizers.constant_schedule(0.05)),
        mesh, partitioning.standard_logical_axis_rules(), model.input_shapes(BATCH, None),
        num_microbatches=num_microbatches, seed=0)


@pytest.fixture(scope="module")
def trained():
    """A toy model trained 40 steps on a (data 2, model 2) mesh with 2 microbatches; the
    losses of every step and the final state."""
    model = LinearRegression()
    assert isinstance(model, Model)
    trainer = _trainer(model)
    x, y = _data(64, seed=0)
    state = trainer.init_state()
    losses = []
    for step in range(40):
        rows = slice((step % 8) * BATCH, (step % 8 + 1) * BATCH)
        state, sums = trainer.train_step(state, trainer.to_global({"x": x[rows], "y": y[rows]}))
        sums = {k: v for k, v in jax.device_get(sums).items()
                if k not in trainer_lib.TRAINER_METRICS}
        losses.append(model.summarize_metrics(reduce_metrics(model, sums, MICRO))["mse"])
    return model, trainer, state, losses


def test_the_loss_falls_and_parameters_are_sharded_by_their_logical_axes(trained):
    model, trainer, state, losses = trained
    assert losses[-1] < 0.05 * losses[0], losses
    assert state.params["kernel"].sharding.spec == P("model")
    assert {s.data.shape for s in state.params["kernel"].addressable_shards} == {(D // 2,)}
    assert model.completed >= 40  # every batch went through the model's complete_batch


def test_reduced_metrics_equal_a_numpy_computation(trained):
    model, trainer, state, _ = trained
    x, y = _data(BATCH, seed=1)
    w = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)  # padding rows in both microbatches
    params = jax.device_get(state.params)
    _, sums = trainer.train_step(_copy(trainer, state),
                                 trainer.to_global({"x": x, "y": y, "w": w}))
    sums = {k: v for k, v in jax.device_get(sums).items()
            if k not in trainer_lib.TRAINER_METRICS}
    got = reduce_metrics(model, sums, trainer.num_microbatches)
    # Microbatch i holds rows i, i + MICRO, ...: sums add up, the mean metric is averaged.
    micro = [_numpy_sums(params, x[i::MICRO], y[i::MICRO], w[i::MICRO]) for i in range(MICRO)]
    want = {"sq_err_sum": sum(m["sq_err_sum"] for m in micro),
            "n": sum(m["n"] for m in micro),
            "mean_prediction": np.mean([m["mean_prediction"] for m in micro])}
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    summary = model.summarize_metrics(got)
    np.testing.assert_allclose(summary["mse"], want["sq_err_sum"] / 6.0, rtol=1e-5)
    assert summary["points"] == 6.0


def test_evaluate_returns_the_models_summarized_metrics(trained):
    model, trainer, state, _ = trained
    x, y = _data(3 * BATCH, seed=2)
    w_last = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)  # a final, padded batch
    batches = [{"x": x[:8], "y": y[:8]}, {"x": x[8:16], "y": y[8:16]},
               {"x": x[16:], "y": y[16:], "w": w_last}]
    before = model.completed
    m = trainer.evaluate(state.params, iter(batches))
    assert model.completed == before + 3
    params = jax.device_get(state.params)
    per_batch = [_numpy_sums(params, b["x"], b["y"], b.get("w", np.ones(8, np.float32)))
                 for b in batches]
    sq = sum(p["sq_err_sum"] for p in per_batch)
    assert set(m) == {"mse", "mean_prediction", "points"}
    np.testing.assert_allclose(m["mse"], sq / 21.0, rtol=1e-5)
    np.testing.assert_allclose(m["mean_prediction"],
                               np.mean([p["mean_prediction"] for p in per_batch]), rtol=1e-5)
    assert m["points"] == 21.0
    assert model.headline(m) == f"loss {m['mse']:.4f} | (21 points)"
    # max_batches stops early; the 'mean' metric is then averaged over the batches seen.
    one = trainer.evaluate(state.params, iter(batches), max_batches=1)
    np.testing.assert_allclose(one["mean_prediction"], per_batch[0]["mean_prediction"],
                               rtol=1e-5)


class _Recorder(metrics_lib.MetricWriter):
    def __init__(self, total_steps):
        super().__init__(None, total_steps)
        self.logged = {}

    def write_scalars(self, step, scalars):
        self.logged[step] = dict(scalars)


def test_the_training_loop_logs_what_the_model_summarizes(trained, capsys):
    model, trainer, state, _ = trained
    x, y = _data(64, seed=3)
    batches = iter([{"x": x[i:i + BATCH], "y": y[i:i + BATCH]} for i in range(0, 64, BATCH)])
    start = int(jax.device_get(state.step))
    writer = _Recorder(start + 4)
    trainer_lib.run_training_loop(trainer, _copy(trainer, state), batches, start + 4, writer,
                                  log_every=2,
                                  count_per_batch=model.count_per_batch(trainer.input_shapes))
    assert sorted(writer.logged) == [start + 2, start + 4]
    scalars = writer.logged[start + 4]
    assert set(scalars) == {"mse", "mean_prediction", "loss", "learning_rate", "grad_norm",
                            "timing/seconds", "timing/steps_per_second", "timing/seqs",
                            "timing/seqs_per_second", "timing/seqs_per_second_per_core",
                            "timing/uptime", "timing/points_per_second",
                            "timing/points_per_second_per_core", "timing/input_seconds"} | (
        {"host/other_cpu_cores", "host/steal_cpu_cores", "host/own_cpu_cores"}
        if metrics_lib.read_cpu_times() is not None else set())  # Linux
    assert scalars["loss"] == scalars["mse"]
    np.testing.assert_allclose(scalars["timing/points_per_second"],
                               BATCH * scalars["timing/steps_per_second"], rtol=1e-6)
    assert " points/s" in capsys.readouterr().err


def test_the_protocol_is_enforced():
    class NoEval:
        state_collections = ()

    with pytest.raises(TypeError, match=r"lacks \[.*'eval_fn'.*\].*BaseModel"):
        check_model(NoEval())

    class BadReduction(LinearRegression):
        def metric_reduction(self, name):
            return "max"

    with pytest.raises(ValueError, match="'max'; expected 'sum' or 'mean'"):
        reduce_metrics(BadReduction(), {"n": 1.0}, 1)

    class WrongFeatures(LinearRegression):
        def complete_batch(self, batch, input_shapes):
            return {"x": np.asarray(batch["x"])}

    trainer = _trainer(WrongFeatures(), (1, 1, 1), num_microbatches=1)
    x, y = _data(BATCH, seed=4)
    with pytest.raises(ValueError, match=r"complete_batch returned \['x'\]; expected exactly"):
        trainer.to_global({"x": x, "y": y})

    class ClaimsTheLearningRate(LinearRegression):
        def loss_fn(self, *args, **kw):
            loss, (sums, state) = super().loss_fn(*args, **kw)
            return loss, ({**sums, "learning_rate": loss}, state)

    trainer = _trainer(ClaimsTheLearningRate(), (1, 1, 1), num_microbatches=1)
    with pytest.raises(ValueError, match="learning_rate.*which the trainer adds itself"):
        trainer.train_step(trainer.init_state(), trainer.to_global({"x": x, "y": y}))


def test_base_model_defaults():
    model = LinearRegression()
    assert model.state_collections == () and model.parameter_resizers() == {}
    assert model.count_per_batch(model.input_shapes(4, None)) == 4
    assert model.flops_per_step(None, {}) == 0.0 and model.check_task(object()) is None
    with pytest.raises(ValueError, match=r"lacks the feature\(s\) \['y', 'w'\]"):
        BaseModel.complete_batch(model, {"x": np.zeros((2, D))}, model.input_shapes(2, None))
