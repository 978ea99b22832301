"""Training entry point.

    python -m moetx.trainer.train \\
      --gin_file=models/decoder_small.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}" --gin.TRAIN_STEPS=600

Resumes from the latest checkpoint in MODEL_DIR when there is one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moetx.trainer import xla_env  # noqa: E402  (jax-free; must run before jax is imported)

xla_env.configure_cpu_defaults()

if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so gin registers each
    # configurable once (as `moetx.trainer.train.*`).
    from moetx.trainer.train import console_main

    console_main()

import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from moetx.trainer import (  # noqa: E402
    checkpoints, cli, data, metrics as metrics_lib, optimizers, partitioning, trainer as trainer_lib,
)


def build_trainer(model, dataset_cfg: data.DatasetConfig, mesh_fn: Callable = partitioning.make_mesh,
                  rules_fn: Callable = partitioning.standard_logical_axis_rules,
                  optimizer_factory: Callable = optimizers.make_optimizer,
                  num_microbatches: int = 1, seed: int = 0, ema_decay: float | None = None,
                  ema_model_state: bool = True) -> trainer_lib.Trainer:
    shapes = model.input_shapes(dataset_cfg.batch_size, dict(dataset_cfg.task_feature_lengths))
    return trainer_lib.Trainer(model, optimizer_factory, mesh_fn(), rules_fn(), shapes,
                               num_microbatches=num_microbatches, seed=seed,
                               ema_decay=ema_decay, ema_model_state=ema_model_state)


def make_batches(trainer: trainer_lib.Trainer, cfg: data.DatasetConfig, batches_consumed: int,
                 num_epochs: int | None):
    rows = trainer.local_rows(cfg.batch_size)
    local_bs = rows.stop - rows.start
    num_shards = cfg.batch_size // local_bs
    ds = data.get_dataset(cfg, trainer.model.feature_converter, rows.start // local_bs,
                          num_shards, local_bs, num_epochs)
    return data.DataIterator(ds, batches_consumed), local_bs


def evaluation_batches(trainer, cfg: data.DatasetConfig):
    it, local_bs = make_batches(trainer, cfg, 0, num_epochs=1)
    for batch in it:
        yield data.pad_batch(batch, local_bs)


@gin.configurable
def train(
    model: Any = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    train_dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
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
) -> dict[str, Any]:
    """Trains `model` on `train_dataset_cfg` for `train_steps` steps in `model_dir`.

    Saves `checkpoint_<step>` every `save_every` steps and at the end, keeping
    `keep_checkpoints`; evaluates on `eval_dataset_cfg` every `eval_every` steps (and at the
    start/end); writes TensorBoard events to `model_dir/train` and `model_dir/eval`.
    Returns the final eval metrics (if any) and the last step.

    `ema_decay` keeps an EMA of the weights (and, with `ema_model_state`, of the batch norm
    statistics); with `eval_with_ema` evaluation uses it.

    `init_from` (e.g. `@moetx.tools.restore.InitFromCheckpoint()`) maps the Trainer and the
    fresh state to the state a new run starts from (another checkpoint's parameters, possibly
    upcycled); it is not used when MODEL_DIR already holds a checkpoint to resume.
    """
    if train_steps <= 0:
        raise ValueError(f"TRAIN_STEPS must be positive, got {train_steps}.")
    _check_vocab(model, train_dataset_cfg)
    checkpoints.check_writable(model_dir)
    trainer = build_trainer(model, train_dataset_cfg, mesh_fn, rules_fn, optimizer_factory,
                            num_microbatches, seed, ema_decay, ema_model_state)
    ckpt = checkpoints.Checkpointer(model_dir, save_every, keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, trainer.abstract_state_with_shardings())
        _log(f"Restored checkpoint_{latest} from {model_dir}.")
    else:
        state, data_state = trainer.init_state(), {}
        if init_from is not None:
            state = init_from(trainer, state)
    n_params = metrics_lib.count_params(state.params)
    _log(f"Model: {n_params:,} parameters; mesh {dict(trainer.mesh.shape)}; "
         f"{jax.process_count()} process(es), {jax.device_count()} device(s).")

    batches, _ = make_batches(trainer, train_dataset_cfg,
                              data_state.get("batches_consumed", 0), num_epochs=None)
    tokens_per_batch = sum(int(np.prod(s)) for k, s in trainer.input_shapes.items()
                           if k in ("encoder_input_tokens", "decoder_target_tokens"))
    flops_per_step = model.flops_per_step(state.params, trainer.input_shapes)
    peak = metrics_lib.measured_peak_flops_per_device() * jax.device_count()

    writer = metrics_lib.MetricWriter(os.path.join(model_dir, "train"), train_steps)
    eval_writer = metrics_lib.MetricWriter(os.path.join(model_dir, "eval"), train_steps, "eval")
    results: dict[str, Any] = {}

    def run_eval(step: int, st, label: str) -> dict[str, float]:
        params, model_state = trainer.eval_variables(st, eval_with_ema)
        m = trainer.evaluate(params, evaluation_batches(trainer, eval_dataset_cfg), eval_steps,
                             model_state=model_state)
        eval_writer.write_scalars(step, m)
        _log(f"[eval] {label} step {step}: loss {m['cross_ent_loss']:.4f} | acc "
             f"{m['accuracy']:.3f} | perplexity {m['perplexity']:.2f} "
             f"({int(m['tokens']):,} {getattr(model, 'metric_unit', 'tokens')})")
        return m

    start_step = int(jax.device_get(state.step))
    if eval_dataset_cfg is not None and eval_at_start and start_step < train_steps:
        results["eval_start"] = run_eval(start_step, state, "before training,")

    def on_step_end(step: int, st) -> None:
        if ckpt.should_save(step) or step == train_steps:
            ckpt.save(step, st, batches.get_state())
        if eval_dataset_cfg is not None and eval_every and step % eval_every == 0 \
                and step != train_steps:
            run_eval(step, st, "")

    state = trainer_lib.run_training_loop(
        trainer, state, batches, train_steps, writer, log_every, on_step_end, tokens_per_batch,
        flops_per_step, peak)
    if eval_dataset_cfg is not None:
        results["eval"] = run_eval(train_steps, state, "after training,")
    writer.close()
    eval_writer.close()
    ckpt.close()
    results["step"] = train_steps
    results["params"] = n_params
    return results


def _check_vocab(model, cfg: data.DatasetConfig) -> None:
    task = data.get_task(cfg.mixture_or_task_name)
    if not hasattr(getattr(model, "config", None), "vocab_size") \
            or "targets" not in task.output_features:
        return  # Not a token model (e.g. an image classifier).
    vocab = task.output_features["targets"].vocabulary
    if vocab.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"The task's vocabulary has {vocab.vocab_size} ids but the model's embedding only "
            f"{model.config.vocab_size}; raise TransformerConfig.vocab_size.")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def main(args) -> None:
    del args
    train()


def console_main() -> None:
    sys.exit(cli.run(main, module_imports=("moetx.lm.models", "moetx.tasks")))

