"""Evaluation of a checkpoint on a dataset split: the model's teacher-forced eval metrics and,
as T5X's eval does, the task's own metric functions run by a seqio.Evaluator on the model's
predictions and scores (`metrics.InferenceEvaluator`).

The command line is `python -m moetx.cli.eval` (`moetx-eval`):

    python -m moetx.cli.eval --gin_file=models/decoder_small.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"

Writes `<OUTPUT_DIR>/eval_results.json`, the teacher-forced scalars under `<OUTPUT_DIR>/eval`
and the task metrics as T5X lays them out, `<OUTPUT_DIR>/inference_eval/<task>` with the scalars
`eval/<metric>`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax

from moetx.trainer import checkpoints, data, metrics as metrics_lib, partitioning
from moetx.trainer import train as train_lib
from moetx.util import compile_cache


@gin.configurable
def evaluate(
    model: Any = gin.REQUIRED,
    checkpoint_dir: str = gin.REQUIRED,
    dataset_cfg: data.DatasetConfig = gin.REQUIRED,
    output_dir: str | None = None,
    checkpoint_step: int | None = None,
    eval_steps: int | None = None,
    use_ema: bool = False,
    mesh_fn: Callable = partitioning.make_mesh,
    rules_fn: Callable = partitioning.standard_logical_axis_rules,
    seqio_eval: bool | None = None,
    seqio_eval_examples: int | None = None,
    compilation_cache: bool | str = True,
) -> dict[str, float]:
    """Evaluates a checkpoint on `dataset_cfg`'s split and returns the summarized metrics
    (plus `step`, and the task metrics as `'<task>/<metric>'`).

    Args:
      model: the model wrapper (gin `MODEL`).
      checkpoint_dir: a model directory or one of its `checkpoint_<step>` directories.
      dataset_cfg: the split, feature lengths and batch size to evaluate on.
      output_dir: where results go (default: the model directory).
      checkpoint_step: which checkpoint of the model directory (default the newest).
      eval_steps: evaluate at most this many batches (None: the whole split).
      use_ema: evaluate the EMA of the weights the run kept (train.ema_decay).
      seqio_eval: run the task's metric functions through a seqio.Evaluator (T5X's eval);
        None: when the model has inference functions and the task metric functions (the
        console says when it is skipped); True: always (an error when it cannot).
      seqio_eval_examples: the seqio evaluation reads the first this many examples of each
        task (None: all).
      compilation_cache: JAX's persistent compilation cache, as `train.compilation_cache`.
    """
    compile_cache.enable(compilation_cache)
    train_lib.check_data(model, dataset_cfg)
    model_dir, step = checkpoints.resolve_checkpoint(checkpoint_dir, checkpoint_step)
    # The Trainer owns the compiled eval step and the batch layout; the parameters are restored
    # for the model alone (no optimizer state is read).
    trainer = train_lib.build_trainer(model, dataset_cfg, mesh_fn, rules_fn)
    params, model_state, step = checkpoints.restore_for_model(
        model, model_dir, mesh=trainer.mesh, rules=trainer.rules,
        input_shapes=trainer.input_shapes, step=step, use_ema=use_ema)
    m = trainer.evaluate(params, train_lib.evaluation_batches(trainer, dataset_cfg), eval_steps,
                         model_state=model_state)
    output_dir = output_dir or model_dir
    task_metrics: dict[str, float] = {}
    if _wants_seqio_eval(model, dataset_cfg, seqio_eval):
        evaluator = metrics_lib.InferenceEvaluator(
            model, dataset_cfg, os.path.join(output_dir, "inference_eval")
            if jax.process_index() == 0 else None, seqio_eval_examples)
        task_metrics = evaluator.evaluate(params, model_state, trainer.mesh, trainer.rules, step)
        if jax.process_index() == 0:
            print(f"[inference_eval] checkpoint_{step}: " + " | ".join(
                f"{k} {v:.4g}" for k, v in sorted(task_metrics.items())), flush=True)
    teacher_forced = dict(m)
    m.update(task_metrics)
    m["step"] = step
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        writer = metrics_lib.MetricWriter(os.path.join(output_dir, "eval"), step, "eval")
        writer.write_scalars(step, teacher_forced)
        writer.close()
        with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
            json.dump({"task": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split,
                       **m}, f, indent=2)
        print(f"[eval] checkpoint_{step} on {dataset_cfg.mixture_or_task_name}/"
              f"{dataset_cfg.split}: {model.headline(m)}", flush=True)
    return m


def _wants_seqio_eval(model: Any, dataset_cfg: data.DatasetConfig, seqio_eval: bool | None
                      ) -> bool:
    """Whether `evaluate` runs the task's metric functions: `seqio_eval` when given, else
    when the model has inference functions and some task of the mixture metric functions."""
    if seqio_eval is not None:
        return bool(seqio_eval)
    task = data.get_task(dataset_cfg.mixture_or_task_name)
    tasks = getattr(task, "tasks", None) or [task]
    with_metrics = any(getattr(t, "metric_objs", None) for t in tasks)
    if getattr(model, "inference_feature_converter", None) is None or not with_metrics:
        why = ("the task has no metric functions" if not with_metrics
               else "the model has no inference functions")
        if jax.process_index() == 0:
            print(f"[eval] no seqio evaluation: {why}.", flush=True)
        return False
    return True
