"""The training library: `train()` (gin name `train`) runs a gin-configured model on a task,
with checkpoints, periodic evaluation and TensorBoard logs; `python -m moetx.cli.train` is its
command line.

`train()` resumes from the latest checkpoint in MODEL_DIR when there is one. It knows the model
only through `moetx.trainer.model.Model`: the model checks the task (`check_task`) and the
feature lengths (`input_shapes`) before anything is written, and prints its own eval line
(`headline`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterator

import gin
import jax
import jax.numpy as jnp
import numpy as np

from moetx.trainer import (
    checkpoints,
    data,
    divergence,
    indexed_data,
    metrics as metrics_lib,
    optimizers,
    partitioning,
    preemption,
    run_lock,
    trainer as trainer_lib,
)
from moetx.util import compile_cache, gin_files


def build_trainer(model, dataset_cfg: data.DatasetConfig,
                  mesh_fn: Callable = partitioning.make_mesh,
                  rules_fn: Callable = partitioning.standard_logical_axis_rules,
                  optimizer_factory: Callable = optimizers.make_optimizer,
                  num_microbatches: int = 1, seed: int = 0, ema_decay: float | None = None,
                  ema_model_state: bool = True, skip_nonfinite_updates: bool = False
                  ) -> trainer_lib.Trainer:
    shapes = model.input_shapes(dataset_cfg.batch_size, dict(dataset_cfg.task_feature_lengths))
    return trainer_lib.Trainer(model, optimizer_factory, mesh_fn(), rules_fn(), shapes,
                               num_microbatches=num_microbatches, seed=seed,
                               ema_decay=ema_decay, ema_model_state=ema_model_state,
                               skip_nonfinite_updates=skip_nonfinite_updates)


def make_batches(trainer: trainer_lib.Trainer, cfg: data.DatasetConfig, batches_consumed: int,
                 num_epochs: int | None):
    """This process's rows of `cfg`'s global batches from batch `batches_consumed` on, and
    their number per batch: SeqIO's stream of this process's shard (resuming replays the
    batches already read), or with `cfg.pipeline == 'indexed'` the rows `trainer.local_rows`
    of each global batch read directly (`moetx.trainer.indexed_data`), so a run resumed on
    another number of processes continues the same global batch order."""
    rows = trainer.local_rows(cfg.batch_size)
    local_bs = rows.stop - rows.start
    converter = data.feature_converter_for(cfg, trainer.model.feature_converter)
    if cfg.pipeline == "indexed":
        return indexed_data.indexed_batches(cfg, converter, rows, batches_consumed,
                                            num_epochs), local_bs
    num_shards = cfg.batch_size // local_bs
    ds = data.get_dataset(cfg, converter, rows.start // local_bs, num_shards, local_bs,
                          num_epochs)
    return data.DataIterator(ds, batches_consumed), local_bs


def evaluation_batches(trainer, cfg: data.DatasetConfig):
    it, local_bs = make_batches(trainer, cfg, 0, num_epochs=1)
    for batch in it:
        yield data.pad_batch(batch, local_bs)


class EvaluationBatches:
    """The evaluation split's batches (as `evaluation_batches`) each time this is iterated, for
    the evaluations of one run. The SeqIO pipeline is built once, on the first iteration, and
    read again from its start after that: building it traces every preprocessor into a
    tf.data graph, seconds of host time that each in-loop evaluation would otherwise spend
    again. An unshuffled pipeline gives the same batches on every pass. A shuffled one is built
    anew each time (tf.data reshuffles a pipeline between passes, and every evaluation of a run
    must see the same batches), as is the indexed pipeline, which has nothing to trace."""

    def __init__(self, trainer, cfg: data.DatasetConfig):
        self._trainer, self._cfg = trainer, cfg
        self._dataset = None
        self._local_bs = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        cfg = self._cfg
        if cfg.shuffle or cfg.pipeline == "indexed":
            yield from evaluation_batches(self._trainer, cfg)
            return
        if self._dataset is None:  # the first pass reads the iterator the pipeline came with
            batches, self._local_bs = make_batches(self._trainer, cfg, 0, num_epochs=1)
            self._dataset = batches.dataset
        else:
            batches = self._dataset.as_numpy_iterator()
        for batch in batches:
            yield data.pad_batch(batch, self._local_bs)


@gin.configurable
def train(
    model: Any = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    train_dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    train_steps: int | None = None,
    eval_dataset_cfg: data.DatasetConfig | None = None,
    eval_every: int = 0,
    eval_steps: int | None = 20,
    eval_at_start: bool = False,
    save_every: int = 1000,
    keep_checkpoints: int | None = 3,
    log_every: int = 10,
    num_microbatches: int = 1,
    seed: int = 0,
    optimizer_factory: Callable = optimizers.make_optimizer,
    mesh_fn: Callable = partitioning.make_mesh,
    rules_fn: Callable = partitioning.standard_logical_axis_rules,
    init_from: Callable | None = None,
    ema_decay: float | None = None,
    ema_model_state: bool = True,
    eval_with_ema: bool = True,
    preemption_check_every: int = 10,
    divergence_policy: str = "stop",
    max_consecutive_skips: int = 10,
    spike_factor: float | None = None,
    spike_window: int = 100,
    rewind_skip_batches: int = 200,
    max_rewinds: int = 3,
    train_steps_relative: int | None = None,
    seqio_eval_every: int = 0,
    infer_eval_dataset_cfg: data.DatasetConfig | None = None,
    seqio_eval_examples: int | None = None,
    compilation_cache: bool | str = True,
) -> dict[str, Any]:
    """Trains `model` on `train_dataset_cfg` up to step `train_steps` in `model_dir`.

    `train_steps` (TRAIN_STEPS) is the absolute last step, as in T5X: a run that starts at
    step N (resumed from MODEL_DIR, or `InitFromCheckpoint(continue_step=True)`) trains
    `train_steps - N` steps; one whose start step equals it trains none, one whose start step
    is past it is an error. `train_steps_relative` (T5X's TRAIN_STEPS_RELATIVE) instead trains
    that many steps past the start step (a relaunched run counts them from its checkpoint, as
    T5X does). Exactly one of the two is given.

    Saves `checkpoint_<step>` every `save_every` steps and at the end, keeping
    `keep_checkpoints`; evaluates on `eval_dataset_cfg` every `eval_every` steps (and at the
    start/end); writes TensorBoard events to `model_dir/train` and `model_dir/eval`.
    Returns the final eval metrics (if any) and the last step.

    With `seqio_eval_every`, every that many steps and at the end a seqio.Evaluator computes
    the task's metric functions from the model's predictions and scores (T5X's inference
    evaluation, `metrics.InferenceEvaluator`) on `infer_eval_dataset_cfg` (default
    `eval_dataset_cfg`), on its first `seqio_eval_examples` examples (None: all), written to
    `model_dir/inference_eval/<task>` as `eval/<metric>` and returned as
    `results['inference_eval']` (`{'<task>/<metric>': value}`).

    The training scalars carry T5X's names (see `moetx.trainer.metrics`): `loss` is the loss
    the model optimises, and the `timing/*` scalars are written with them.

    `ema_decay` keeps an EMA of the weights (and, with `ema_model_state`, of the batch norm
    statistics); with `eval_with_ema` evaluation uses it.

    `init_from` (e.g. `@moetx.convert.restore.InitFromCheckpoint()`) maps the Trainer and the
    fresh state to the state a new run starts from (another checkpoint's parameters, possibly
    upcycled); it is not used when MODEL_DIR already holds a checkpoint to resume.

    `compilation_cache`: JAX's persistent compilation cache (`moetx.util.compile_cache`; True:
    the default directory, `~/.cache/moetx/jax_cache`; a path; False: none), so a relaunched or
    repeated run loads its compiled steps instead of compiling them again.

    The run's gin configuration is written to `model_dir/config.gin` when it starts (as T5X
    does; `gin_files.write_config_gin` keeps a different earlier one as `config.gin.<n>`).

    SIGTERM or SIGINT during training saves a checkpoint of the step in progress and raises
    `preemption.Preempted` (the command line exits with status 75); on several processes they
    agree on the step every `preemption_check_every` steps.

    `divergence_policy` (see `moetx.trainer.divergence`): 'stop' (a non-finite loss ends the
    run with an error), 'skip' (an update whose loss or gradient is not finite is dropped and
    counted; the run stops after `max_consecutive_skips` in a row) or 'rewind' (a non-finite
    loss or gradient sends the run back to the newest intact checkpoint before it, and the run
    goes on with the data after the bad step, skipping `rewind_skip_batches` more batches; at
    most `max_rewinds` times). With `spike_factor`, a loss above `spike_factor` times the mean
    of the last `spike_window` losses counts as divergence too ('stop' or 'rewind' only). A
    checkpoint with non-finite parameters is never written.
    """
    started = time.perf_counter()
    divergence.check_policy(divergence_policy, spike_factor, spike_window, rewind_skip_batches,
                            max_rewinds)
    if (train_steps is None) == (train_steps_relative is None):
        raise ValueError(
            f"Give exactly one of train.train_steps (TRAIN_STEPS, the absolute last step) and "
            f"train.train_steps_relative (TRAIN_STEPS_RELATIVE, steps past the start step); "
            f"got {train_steps!r} and {train_steps_relative!r}.")
    steps_setting = ({"train_steps": train_steps} if train_steps is not None
                     else {"train_steps_relative": train_steps_relative})
    check_settings(**steps_setting, seqio_eval_every=seqio_eval_every,
                   save_every=save_every, log_every=log_every,
                   keep_checkpoints=keep_checkpoints, eval_every=eval_every,
                   eval_steps=eval_steps, num_microbatches=num_microbatches,
                   preemption_check_every=preemption_check_every,
                   max_consecutive_skips=max_consecutive_skips)
    compile_cache.enable(compilation_cache)
    infer_eval_dataset_cfg = infer_eval_dataset_cfg or eval_dataset_cfg
    if seqio_eval_every and infer_eval_dataset_cfg is None:
        raise ValueError("train.seqio_eval_every needs a dataset to evaluate: set "
                         "train.infer_eval_dataset_cfg or train.eval_dataset_cfg.")
    for cfg in (train_dataset_cfg, eval_dataset_cfg,
                infer_eval_dataset_cfg if seqio_eval_every else None):
        if cfg is not None:
            check_data(model, cfg)
    # Built before anything is written: a mesh, batch size or optimizer that does not fit
    # fails here with MODEL_DIR untouched.
    watcher = preemption.PreemptionWatcher(preemption_check_every)
    trainer = build_trainer(model, train_dataset_cfg, mesh_fn, rules_fn, optimizer_factory,
                            num_microbatches, seed, ema_decay, ema_model_state,
                            skip_nonfinite_updates=divergence_policy == "skip")
    checkpoints.check_writable(model_dir)
    # One writer per MODEL_DIR: a second trainer on it stops here (see `run_lock`).
    lock = run_lock.RunLock(model_dir, enabled=jax.process_index() == 0)
    lock.acquire()
    try:
        if jax.process_index() == 0:
            moved = gin_files.write_config_gin(model_dir, gin.config_str())
            if moved:
                log(f"moetx: {model_dir}/config.gin differs from this run's configuration; the "
                    f"earlier one is now {os.path.basename(moved)}.")
        ckpt = checkpoints.Checkpointer(model_dir, save_every, keep_checkpoints)
        latest = ckpt.latest_intact_step()
        if latest is not None:
            state, data_state = ckpt.restore(latest, trainer.abstract_state_with_shardings())
            log(f"Restored checkpoint_{latest} from {model_dir}.")
        else:
            state, data_state = trainer.init_state(), {}
            if init_from is not None:
                state = init_from(trainer, state)
        start_step = int(jax.device_get(state.step))
        if train_steps_relative is not None:
            train_steps = start_step + train_steps_relative
        elif train_steps < start_step:
            raise ValueError(
                f"train.train_steps (TRAIN_STEPS) = {train_steps} is the absolute last step, but "
                f"the run starts at step {start_step}; raise it, or give "
                f"train.train_steps_relative (TRAIN_STEPS_RELATIVE) instead.")
        init_or_restore_seconds = time.perf_counter() - started
        n_params = metrics_lib.count_params(state.params)
        log(f"Model: {n_params:,} parameters; mesh {dict(trainer.mesh.shape)}; "
             f"{jax.process_count()} process(es), {jax.device_count()} device(s).")

        # The MFU denominator is measured before the input pipeline starts: its preprocessing
        # threads would share the cores with the timed matmuls and halve the peak on a small
        # CPU (the MFU printed at T5.1.1-small's shape was over 100% when measured after).
        peak = metrics_lib.measured_peak_flops_per_device() * jax.device_count()
        batches, _ = make_batches(trainer, train_dataset_cfg,
                                  data_state.get("batches_consumed", 0), num_epochs=None)
        if not batches.has_next():  # say why, before the first step
            data.check_not_empty(train_dataset_cfg, preprocessed=True)
            raise ValueError(f"The {train_dataset_cfg.split!r} split of "
                             f"{train_dataset_cfg.mixture_or_task_name!r} gives no batch.")
        count_per_batch = model.count_per_batch(trainer.input_shapes)
        flops_per_step = model.flops_per_step(state.params, trainer.input_shapes)

        writer = metrics_lib.MetricWriter(os.path.join(model_dir, "train"), train_steps)
        eval_writer = metrics_lib.MetricWriter(os.path.join(model_dir, "eval"), train_steps, "eval")
        results: dict[str, Any] = {}
        if start_step < train_steps:
            writer.write_scalars(start_step, {
                "timing/init_or_restore_seconds": init_or_restore_seconds})
        inference_evaluator = None
        if seqio_eval_every:
            inference_evaluator = metrics_lib.InferenceEvaluator(
                model, infer_eval_dataset_cfg,
                os.path.join(model_dir, "inference_eval") if jax.process_index() == 0 else None,
                seqio_eval_examples)

        def run_inference_eval(step: int, st) -> dict[str, float]:
            tick = time.perf_counter()
            params, model_state = trainer.eval_variables(st, eval_with_ema)
            m = inference_evaluator.evaluate(params, model_state, trainer.mesh, trainer.rules,
                                             step)
            writer.write_scalars(step, {"timing/evaluate_seconds": time.perf_counter() - tick})
            log(f"[inference_eval] step {step}: "
                + " | ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())))
            return m

        if eval_dataset_cfg is not None:
            eval_batches = EvaluationBatches(trainer, eval_dataset_cfg)

        def run_eval(step: int, st, label: str) -> dict[str, float]:
            params, model_state = trainer.eval_variables(st, eval_with_ema)
            try:
                m = trainer.evaluate(params, iter(eval_batches), eval_steps,
                                     model_state=model_state)
            except trainer_lib.NoEvaluationBatches:
                data.check_not_empty(eval_dataset_cfg, preprocessed=True)  # says why
                raise
            eval_writer.write_scalars(step, m)
            log(f"[eval] {label} step {step}: {model.headline(m)}")
            return m

        if eval_dataset_cfg is not None and eval_at_start and start_step < train_steps:
            results["eval_start"] = run_eval(start_step, state, "before training,")

        def on_step_end(step: int, st) -> None:
            lock.heartbeat()
            stop = watcher.should_stop(step)
            if stop or ckpt.should_save(step) or step == train_steps:
                if not bool(jax.device_get(all_finite(st.params))):
                    if divergence_policy == "rewind":
                        raise divergence.Diverged(step, "the parameters are not finite")
                    raise FloatingPointError(
                        f"The parameters are not finite at step {step}; no checkpoint written "
                        f"(the last one is intact). Lower the learning rate, or set "
                        f"train.divergence_policy = 'skip'.")
                ckpt.save(step, st, batches.get_state())
            if stop:
                raise preemption.Preempted(step, watcher.signal_name)
            if eval_dataset_cfg is not None and eval_every and step % eval_every == 0 \
                    and step != train_steps:
                run_eval(step, st, "")
            if inference_evaluator is not None and step % seqio_eval_every == 0 \
                    and step != train_steps:
                run_inference_eval(step, st)

        monitor = None
        if divergence_policy == "rewind" or spike_factor is not None:
            monitor = divergence.Monitor(spike_factor, spike_window)
        rewinds = 0
        try:
            while True:
                try:
                    with watcher:
                        state = trainer_lib.run_training_loop(
                            trainer, state, batches, train_steps, writer, log_every,
                            on_step_end, count_per_batch, flops_per_step, peak,
                            max_consecutive_skips, monitor and monitor.observe)
                    break
                except divergence.Diverged as e:
                    if divergence_policy != "rewind":
                        raise FloatingPointError(
                            f"The run diverged at {e}. Lower the learning rate, check the data, "
                            f"or set train.divergence_policy = 'rewind'.") from None
                    if rewinds == max_rewinds:
                        raise FloatingPointError(
                            f"The run diverged at {e}, after {rewinds} rewinds already "
                            f"(train.max_rewinds); lower the learning rate or check the data."
                            ) from None
                    rewinds += 1
                    state = rewind(trainer, ckpt, batches, e, rewind_skip_batches, writer)
                    monitor.forget_after(int(jax.device_get(state.step)))
        except preemption.Preempted as e:
            writer.close()
            eval_writer.close()
            ckpt.close()
            log(f"Preempted: {e}")
            raise
        if eval_dataset_cfg is not None:
            results["eval"] = run_eval(train_steps, state, "after training,")
        if inference_evaluator is not None:
            results["inference_eval"] = run_inference_eval(train_steps, state)
        writer.close()
        eval_writer.close()
        ckpt.close()
        results["step"] = train_steps
        results["params"] = n_params
        results["flops_per_step"] = flops_per_step
        results["rewinds"] = rewinds
        return results
    finally:
        lock.release()


def rewind(trainer: trainer_lib.Trainer, ckpt: checkpoints.Checkpointer,
           batches: data.DataIterator, diverged: divergence.Diverged, skip_batches: int,
           writer: metrics_lib.MetricWriter) -> trainer_lib.TrainState:
    """The state of the newest intact checkpoint before `diverged.step` (later ones are moved
    aside), with `skip_batches` batches of `batches` dropped; the data position stays where the
    diverged run had taken it, so the batches since that checkpoint are not replayed."""
    target = ckpt.latest_intact_step_before(diverged.step)
    if target is None:
        raise FloatingPointError(
            f"The run diverged at {diverged} and there is no checkpoint before it to rewind to; "
            f"save more often (train.save_every) or lower the learning rate.")
    state, _ = ckpt.restore(target, trainer.abstract_state_with_shardings())
    for _ in range(skip_batches):
        next(batches)
    log(f"moetx: warning: diverged at {diverged}; rewound to checkpoint_{target} and skipped "
        f"the {skip_batches} batches after the ones already read (now at batch "
        f"{batches.get_state()['batches_consumed']}).")
    writer.write_scalars(target, {"rewound_from_step": float(diverged.step)})
    return state


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (one boolean)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_data(model, cfg: data.DatasetConfig) -> None:
    """Raises ValueError, before anything is written, when `cfg`'s task cannot feed `model`
    (`model.check_task`), its feature lengths do not suit it (`model.input_shapes`), or its
    split does not exist or has no example (`data.check_not_empty`, on the sources only: a
    split whose examples are all filtered out is reported at the first batch)."""
    lengths = dict(cfg.task_feature_lengths)
    model.check_task(data.get_task(cfg.mixture_or_task_name), lengths)
    model.input_shapes(cfg.batch_size, lengths)
    data.check_not_empty(cfg, preprocessed=False)


# train()'s settings that must be at least 1 (or 0), with the macro the run files bind them to.
_AT_LEAST = {
    "train_steps": (1, "TRAIN_STEPS"), "train_steps_relative": (1, "TRAIN_STEPS_RELATIVE"),
    "seqio_eval_every": (0, None), "save_every": (1, "SAVE_EVERY"),
    "log_every": (1, "LOG_EVERY"), "keep_checkpoints": (1, "KEEP_CHECKPOINTS"),
    "eval_every": (0, "EVAL_EVERY"), "eval_steps": (1, "EVAL_STEPS"),
    "num_microbatches": (1, "NUM_MICROBATCHES"), "preemption_check_every": (1, None),
    "max_consecutive_skips": (1, None),
}


def check_settings(**settings) -> None:
    """Raises ValueError naming the setting (and its macro) when one of train()'s counts is
    not an int or is below its minimum; `keep_checkpoints` and `eval_steps` may be None (keep
    all, evaluate the whole split)."""
    for name, value in settings.items():
        least, macro = _AT_LEAST[name]
        if value is None and name in ("keep_checkpoints", "eval_steps"):
            continue
        where = f"train.{name}" + (f" ({macro})" if macro else "")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r}.")
        if value < least:
            raise ValueError(f"{where} must be at least {least}, got {value}.")


def log(msg: str) -> None:
    """Prints `msg` to stderr on process 0 (the run's progress and results)."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
