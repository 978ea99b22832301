"""The model-agnostic trainer: sharded train state, jitted train/eval steps, gradient
accumulation, and the training loop with its periodic actions (log, eval, checkpoint).

The trainer knows a model only through the protocol of `moetx.trainer.model`: it asks the model
to complete each batch, for its loss weights, loss and metric sums, how each metric is reduced
and summarized, and which unit its count is in; it never reads a feature or metric by name.

Models with mutable state (batch norm statistics) name its collections in
`model.state_collections` (e.g. `('batch_stats',)`). The trainer carries them in
`TrainState.model_state` (replicated, checkpointed; `{}` for stateless models) and passes them
to `loss_fn(..., model_state=...)`, which returns `(loss, (metric sums, new model state))`, and
to `eval_fn(params, batch, model_state=...)`.
With `ema_decay`, `TrainState.ema` holds an exponential moving average of the parameters (and,
by default, of the model state), which `eval_variables` hands to evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moetx.trainer import metrics as metrics_lib, optimizers, partitioning
from moetx.trainer import model as model_lib

Array = jax.Array

# Scalars the train step adds to the model's metric sums.
TRAINER_METRICS = ("learning_rate", "grad_norm", "skipped_update")


@flax.struct.dataclass
class TrainState:
    """Step, parameters, optimizer state, mutable model state (`{collection: tree}`, empty for
    stateless models) and the EMA (`{'params', 'model_state'}`, empty when disabled)."""

    step: Array
    params: Any
    opt_state: Any
    model_state: Any = dataclasses.field(default_factory=dict)
    ema: Any = dataclasses.field(default_factory=dict)


class Trainer:
    """Owns the sharded state layout and the compiled steps for one model on one mesh.

    Args:
      model: a `moetx.trainer.model.Model` (e.g. `moetx.lm.models.DecoderOnlyModel`).
      optimizer_factory: `param_axes -> optimizers.Optimizer` (gin's `make_optimizer`).
      mesh: the device mesh; rules: logical axis rules.
      input_shapes: global shapes of the batch features (used to initialise parameters).
      num_microbatches: split each batch into this many microbatches and accumulate gradients.
      seed: parameter-init and dropout seed.
      ema_decay: keep an exponential moving average of the parameters with this decay (None:
        no EMA). With `ema_warmup` the decay at step t is min(decay, (1 + t) / (10 + t)), as
        TensorFlow's `ExponentialMovingAverage(num_updates=t)`.
      ema_model_state: the EMA also covers the model state (batch norm statistics); otherwise
        evaluation with the EMA uses the live statistics.
      donate_state: the train step donates its input state's buffers to its output (XLA
        writes the new parameters and optimizer state in place, so one copy of the state is
        live, not two); off only to measure what donation saves (`benchmarks/means.py`): the
        caller may then keep using the state it passed in. On CPUs XLA still copies most
        donated parameters at the start of the step (gMLP-S: 274 of 306; T5.1.1-small's shape:
        187): its CPU runtime runs independent thunks concurrently, so a buffer is updated in
        place only when every read of the old value is an ancestor of the update, and a
        layer's input-gradient matmul reads its kernel without feeding that kernel's update.
        Reading the parameters for the update through a select on a predicate of the gradient
        norm removes the copies, but the steps were no faster (gMLP-S 401 against 401 ms,
        EfficientNetV2-B0 380-386 against 378-396 ms, T5.1.1-small's shape 9.8 against 9.5 s)
        and XLA's planned temporaries shrank by 68 of 3,775 MiB only (2026-12-08), so the step
        is left as it is.
    """

    def __init__(self, model, optimizer_factory: Callable[..., optimizers.Optimizer],
                 mesh: Mesh, rules, input_shapes: Mapping[str, tuple[int, ...]],
                 num_microbatches: int = 1, seed: int = 0, ema_decay: float | None = None,
                 ema_model_state: bool = True, ema_warmup: bool = True,
                 skip_nonfinite_updates: bool = False, donate_state: bool = True):
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (or None to disable), got {ema_decay}.")
        model_lib.check_model(model)
        self.model = model
        # T5X's `timing/uptime` counts from the trainer's creation.
        self.created_at = time.perf_counter()
        self.state_collections = tuple(model.state_collections)
        self.ema_decay = ema_decay
        self.ema_model_state = ema_model_state
        self.ema_warmup = ema_warmup
        # Drop an update whose loss or gradient is not finite (the step still counts and its
        # batch is consumed); the step's `skipped_update` metric is 1 then.
        self.skip_nonfinite_updates = skip_nonfinite_updates
        self.mesh = mesh
        self.rules = tuple(rules)
        self.input_shapes = dict(input_shapes)
        self.num_microbatches = int(num_microbatches or 1)
        self.seed = seed
        batch_size = next(iter(self.input_shapes.values()))[0]
        if batch_size % self.num_microbatches:
            raise ValueError(f"batch_size {batch_size} is not divisible by num_microbatches "
                             f"{self.num_microbatches}.")
        dp = partitioning.data_parallel_size(mesh, self.rules)
        if (batch_size // self.num_microbatches) % dp:
            raise ValueError(
                f"The (micro)batch size {batch_size // self.num_microbatches} is not divisible by "
                f"the {dp} data-parallel shards of mesh {dict(mesh.shape)}; change BATCH_SIZE, "
                f"num_microbatches or the mesh.")

        # Shapes and logical axes of the parameters, without materialising them.
        self.params_axes, abstract_params, abstract_model_state = model_lib.abstract_variables(
            model, self.input_shapes, seed)
        model_state_axes = jax.tree_util.tree_map(lambda _: PartitionSpec(),
                                                  abstract_model_state)
        self.optimizer = optimizer_factory(param_axes=self.params_axes)
        abstract_opt = jax.eval_shape(self.optimizer.tx.init, abstract_params)
        opt_axes = self.optimizer.state_axes(self.params_axes, abstract_params)
        abstract_ema, ema_axes = {}, {}
        if ema_decay is not None:
            abstract_ema = {"params": abstract_params,
                            "model_state": abstract_model_state if ema_model_state else {}}
            ema_axes = {"params": self.params_axes,
                        "model_state": model_state_axes if ema_model_state else {}}
        self.state_axes = TrainState(step=PartitionSpec(), params=self.params_axes,
                                     opt_state=opt_axes, model_state=model_state_axes,
                                     ema=ema_axes)
        self.abstract_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
            opt_state=abstract_opt, model_state=abstract_model_state, ema=abstract_ema)
        self.state_shardings = partitioning.logical_shardings(
            self.state_axes, mesh, self.rules, self.abstract_state)
        self.batch_shardings = {
            k: partitioning.batch_sharding(mesh, self.rules, len(s))
            for k, s in self.input_shapes.items()}
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._train_step = jax.jit(
            self._train_step_impl, in_shardings=(self.state_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, self._replicated),
            donate_argnums=(0,) if donate_state else ())
        self._eval_step = jax.jit(
            self._eval_step_impl, in_shardings=(self.state_shardings.params,
                                                self.state_shardings.model_state,
                                                self.batch_shardings),
            out_shardings=self._replicated)

    # ------------------------------------------------------------------------------ state
    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        def init():
            variables = self.model.get_initial_variables(jax.random.PRNGKey(self.seed),
                                                         self.input_shapes)
            params = nn.unbox(variables["params"])
            model_state = {c: nn.unbox(variables[c]) for c in self.state_collections}
            ema = {}
            if self.ema_decay is not None:
                ema = {"params": params,
                       "model_state": model_state if self.ema_model_state else {}}
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.optimizer.tx.init(params),
                              model_state=model_state, ema=ema)

        with partitioning.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return jax.jit(init, out_shardings=self.state_shardings)()

    def abstract_state_with_shardings(self) -> TrainState:
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_state, self.state_shardings)

    def lower_train_step(self, batch_shapes: Mapping[str, jax.ShapeDtypeStruct] | None = None):
        """The train step lowered for abstract inputs on this trainer's mesh, allocating
        nothing: the state as `abstract_state_with_shardings()` and a batch of `batch_shapes`
        (by default int32 features of `input_shapes`), each in its batch sharding. `.compile()`
        on the result gives XLA's program (`memory_analysis()`, `as_text()`); simulated CPU
        devices (`--xla_force_host_platform_device_count`) stand in for a pod."""
        if batch_shapes is None:
            batch_shapes = {k: jax.ShapeDtypeStruct(s, jnp.int32)
                            for k, s in self.input_shapes.items()}
        batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_shardings[k])
                 for k, x in batch_shapes.items()}
        with partitioning.use_mesh(self.mesh):
            return self._train_step.lower(self.abstract_state_with_shardings(), batch)

    def eval_variables(self, state: TrainState, use_ema: bool = True) -> tuple[Any, Any]:
        """(params, model_state) to evaluate: the EMA's when kept (and `use_ema`), with the live
        model state when the EMA does not cover it."""
        if use_ema and state.ema:
            return state.ema["params"], state.ema["model_state"] or state.model_state
        return state.params, state.model_state

    # ------------------------------------------------------------------------------ steps
    def _grads(self, params, model_state, batch, dropout_rng, weights, factor):
        """(grads, metric sums, new model state) of one (micro)batch."""
        grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
        (_, (sums, model_state)), grads = grad_fn(
            params, batch, dropout_rng, weights, factor, num_microbatches=self.num_microbatches,
            model_state=model_state)
        clash = sorted(set(sums) & set(TRAINER_METRICS))
        if clash:
            raise ValueError(f"{type(self.model).__name__}.loss_fn returns the metric(s) {clash}, "
                             f"which the trainer adds itself; rename them.")
        return grads, sums, model_state

    def _train_step_impl(self, state: TrainState, batch: Mapping[str, Array]):
        with nn.logical_axis_rules(self.rules):
            weights, factor = self.model.loss_weights_and_factor(batch)
            step_rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), state.step)
            m = self.num_microbatches
            model_state = state.model_state
            if m == 1:
                grads, sums, model_state = self._grads(state.params, model_state, batch,
                                                       step_rng, weights, factor)
            else:
                # Microbatch i takes rows i, i+m, i+2m, ...: every microbatch stays evenly
                # sharded over the data axis, and the full-batch normaliser is used throughout.
                def split(x):
                    x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
                    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

                micro = {k: split(v) for k, v in batch.items()}
                micro_w = split(weights)

                # The model state (batch norm statistics) is threaded through the microbatches.
                def body(carry, xs):
                    grads_acc, sums_acc, ms = carry
                    i, mb, w = xs
                    g, s, ms = self._grads(state.params, ms, mb, jax.random.fold_in(step_rng, i),
                                           w, factor)
                    add = lambda a, b: a + b  # noqa: E731
                    return (jax.tree_util.tree_map(add, grads_acc, g),
                            jax.tree_util.tree_map(add, sums_acc, s), ms), None

                zeros_g = jax.tree_util.tree_map(
                    lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
                first = jax.tree_util.tree_map(lambda x: x[0], (micro, micro_w))
                sums_shape = jax.eval_shape(
                    lambda: self._grads(state.params, model_state, first[0], step_rng, first[1],
                                        factor)[1])
                zeros_s = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                 sums_shape)
                (grads, sums, model_state), _ = jax.lax.scan(
                    body, (zeros_g, zeros_s, model_state), (jnp.arange(m), micro, micro_w))
            updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            sums = dict(sums)
            sums["learning_rate"] = self.optimizer.schedule(state.step)
            sums["grad_norm"] = optax.global_norm(grads)
            ema = state.ema
            if self.ema_decay is not None:
                ema = ema_update(ema, {"params": params, "model_state": model_state
                                       if self.ema_model_state else {}},
                                 self.ema_decay_at(state.step))
            if self.skip_nonfinite_updates:
                finite = jnp.isfinite(sums["grad_norm"])
                for leaf in jax.tree_util.tree_leaves(sums):
                    if jnp.issubdtype(leaf.dtype, jnp.floating):
                        finite &= jnp.all(jnp.isfinite(leaf))

                def keep(new, old):
                    return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

                params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
                model_state, ema = keep(model_state, state.model_state), keep(ema, state.ema)
                sums["skipped_update"] = 1.0 - finite.astype(jnp.float32)
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state, ema=ema), sums

    def ema_decay_at(self, step: Array) -> Array:
        """The EMA decay applied by the update of step `step` (0-based)."""
        decay = jnp.asarray(self.ema_decay, jnp.float32)
        if self.ema_warmup:
            t = jnp.asarray(step, jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        return decay

    def _eval_step_impl(self, params, model_state, batch):
        with nn.logical_axis_rules(self.rules):
            return self.model.eval_fn(params, batch, model_state=model_state)

    def train_step(self, state: TrainState, batch: Mapping[str, Array]):
        with partitioning.use_mesh(self.mesh):
            return self._train_step(state, batch)

    def eval_step(self, params, batch: Mapping[str, Array], model_state: Any = None):
        with partitioning.use_mesh(self.mesh):
            return self._eval_step(params, {} if model_state is None else model_state, batch)

    # ------------------------------------------------------------------------------ batches
    def local_rows(self, global_batch_size: int) -> slice:
        return partitioning.process_batch_slice(self.mesh, self.rules, global_batch_size)

    def to_global(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Host-local numpy rows -> global sharded arrays of exactly the model's features (the
        model's `complete_batch` selects them and fills any the data lacks)."""
        global_bs = next(iter(self.input_shapes.values()))[0]
        feats = self.model.complete_batch(local_batch, self.input_shapes)
        if set(feats) != set(self.input_shapes):
            raise ValueError(
                f"{type(self.model).__name__}.complete_batch returned {sorted(feats)}; expected "
                f"exactly the features of input_shapes, {sorted(self.input_shapes)}.")
        return partitioning.host_local_batch_to_global(feats, self.mesh, self.rules, global_bs)

    def evaluate(self, params, batches: Iterator[Mapping[str, np.ndarray]],
                 max_batches: int | None = None, model_state: Any = None) -> dict[str, float]:
        """The model's summarized metrics over (up to `max_batches`) batches: the eval metric
        sums added over batches, reduced (`metric_reduction`) and summarized
        (`summarize_metrics`, which includes the count under `model.count_unit`).
        `model_state`: the model's mutable collections, for models that have them."""
        totals: dict[str, float] = {}
        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            sums = jax.device_get(self.eval_step(params, self.to_global(batch), model_state))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        if not n:
            raise NoEvaluationBatches("The evaluation split produced no batches; is it empty?")
        return self.model.summarize_metrics(model_lib.reduce_metrics(self.model, totals, n))


class NoEvaluationBatches(ValueError):
    """`Trainer.evaluate` was given no batch."""


def ema_update(ema: Any, new: Any, decay: Array) -> Any:
    """decay * ema + (1 - decay) * new, leaf by leaf (in float32, cast back)."""
    return jax.tree_util.tree_map(
        lambda e, x: (decay * e.astype(jnp.float32) + (1.0 - decay) * x.astype(jnp.float32)
                      ).astype(e.dtype), ema, new)


def check_finite(step: int, value: float) -> None:
    if not np.isfinite(value):
        raise FloatingPointError(f"Loss became {value} at step {step}; lower the learning rate "
                                 f"or check the data.")


def run_training_loop(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[Mapping[str, np.ndarray]],
    train_steps: int,
    writer: metrics_lib.MetricWriter,
    log_every: int = 10,
    on_step_end: Callable[[int, TrainState], None] | None = None,
    count_per_batch: int = 0,
    flops_per_step: float = 0.0,
    peak_flops: float = 0.0,
    max_consecutive_skips: int = 10,
    observe: Callable[[int, float, float], None] | None = None,
) -> TrainState:
    """Steps from `state.step` to `train_steps`, logging every `log_every` steps (fetching
    metrics from the devices only then) and calling `on_step_end(step, state)` after each.

    The logged scalars are the model's summarized metrics of the last step (without the count,
    which is logged as the rate `timing/<count_unit>_per_second` when `count_per_batch` is
    given), `loss` (the model's `loss_metric`, which must be finite), the learning rate, the
    gradient norm, T5X's `timing/*` scalars of the window since the last log (see
    `metrics_lib.timing_scalars`), `timing/input_seconds` (the window's host time spent getting
    batches and placing them on the devices: while the device runs the step in flight, so it
    costs wall time only where it exceeds the steps), with `flops_per_step` and `peak_flops`
    the MFU, and the window's `host/other_cpu_cores`, `host/steal_cpu_cores` and
    `host/own_cpu_cores` (`metrics_lib.HostCpuMeter`).

    With `trainer.skip_nonfinite_updates`, a non-finite loss does not stop the run: updates
    with a non-finite loss or gradient are dropped and counted (`skipped_updates`, the total so
    far), and the run stops after `max_consecutive_skips` of them in a row.

    `observe(step, loss, grad_norm)`, when given, sees every step's loss and gradient norm in
    order (a step's values are fetched while the next step runs, and the last one at the end);
    it may raise to end the loop (see `moetx.trainer.divergence`).
    """
    model = trainer.model
    start = int(jax.device_get(state.step))
    t_window, s_window = time.perf_counter(), start
    t_start = t_window
    previous_sums = None
    skipping = getattr(trainer, "skip_nonfinite_updates", False)
    skipped_total = skipped_in_a_row = 0
    observed = start  # the last step `observe` has seen
    compilation_seconds = None  # logged once, with the first scalars
    host_cpu = metrics_lib.HostCpuMeter()
    input_seconds = 0.0  # in the window: getting the next batch and placing it on the devices
    for step in range(start + 1, train_steps + 1):
        t_input = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"The training data ran out at step {step}; the train split is "
                             f"empty or too small for one batch.") from None
        batch = trainer.to_global(batch)
        t_call = time.perf_counter()
        input_seconds += t_call - t_input
        state, sums = trainer.train_step(state, batch)
        if step == start + 1:  # the first call traces and compiles before it dispatches
            compilation_seconds = time.perf_counter() - t_call
        # At most two steps in flight: the host prepares step n+1's batch while step n runs,
        # but never queues further ahead. An unbounded queue holds every queued batch in
        # device memory, and on XLA:CPU with several devices, steps queued far ahead can
        # starve the runtime's thread pool (seen as an all-reduce rendezvous timeout abort).
        if previous_sums is not None:
            jax.block_until_ready(previous_sums)
            if observe is not None and observed < step - 1:
                observe(step - 1, *_loss_and_grad_norm(trainer, previous_sums))
                observed = step - 1
            if skipping:
                if float(jax.device_get(previous_sums["skipped_update"])):
                    skipped_total += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= max_consecutive_skips:
                        raise FloatingPointError(
                            f"{skipped_in_a_row} updates in a row (to step {step - 1}) had a "
                            f"non-finite loss or gradient and were skipped; lower the learning "
                            f"rate or check the data.")
                else:
                    skipped_in_a_row = 0
        previous_sums = sums
        if step % log_every == 0 or step == train_steps:
            if observe is not None:
                observe(step, *_loss_and_grad_norm(trainer, sums))
                observed = step
            sums = dict(jax.device_get(sums))
            now = time.perf_counter()
            dt = now - t_window
            steps = step - s_window
            own = {k: float(sums.pop(k)) for k in TRAINER_METRICS if k in sums}
            if skipping:
                own.pop("skipped_update", None)
                own["skipped_updates"] = float(skipped_total)
            scalars = model.summarize_metrics(
                model_lib.reduce_metrics(model, sums, trainer.num_microbatches))
            scalars.pop(model.count_unit, None)  # logged as a rate below
            if model.loss_metric not in scalars:
                raise ValueError(f"{type(model).__name__}.summarize_metrics returned "
                                 f"{sorted(scalars)}, without its loss_metric "
                                 f"{model.loss_metric!r}.")
            if not skipping and observe is None:
                check_finite(step, scalars[model.loss_metric])
            scalars["loss"] = scalars[model.loss_metric]
            scalars.update(own)
            scalars.update(metrics_lib.timing_scalars(
                steps, dt, next(iter(trainer.input_shapes.values()))[0], jax.device_count(),
                now - getattr(trainer, "created_at", t_start),
                {model.count_unit: count_per_batch} if count_per_batch else {}))
            if compilation_seconds is not None:
                scalars["timing/compilation_seconds"] = compilation_seconds
                compilation_seconds = None
            if flops_per_step and peak_flops:
                scalars["mfu"] = flops_per_step * steps / dt / peak_flops
            scalars.update({f"host/{k}": v for k, v in host_cpu.window().items()})
            scalars["timing/input_seconds"] = input_seconds
            input_seconds = 0.0
            writer.write_scalars(step, scalars)
            remaining = (train_steps - step) * (now - t_start) / max(step - start, 1)
            writer.progress(step, scalars, remaining)
            t_window, s_window = now, step
        if on_step_end is not None:
            on_step_end(step, state)
    if observe is not None and previous_sums is not None and observed < train_steps:
        observe(train_steps, *_loss_and_grad_norm(trainer, previous_sums))
    return state


def _loss_and_grad_norm(trainer: Trainer, sums: Mapping[str, Array]) -> tuple[float, float]:
    """One step's loss (the model's `loss_metric`) and gradient norm, on the host."""
    model = trainer.model
    sums = dict(jax.device_get(sums))
    grad_norm = float(sums.get("grad_norm", 0.0))
    for k in TRAINER_METRICS:
        sums.pop(k, None)
    scalars = model.summarize_metrics(
        model_lib.reduce_metrics(model, sums, trainer.num_microbatches))
    return float(scalars[model.loss_metric]), grad_norm
