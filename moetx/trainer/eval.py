"""Teacher-forced evaluation of a checkpoint: the model's eval metrics on a dataset split.

The command line is `python -m moetx.cli.eval` (`moetx-eval`):

    python -m moetx.cli.eval --gin_file=models/decoder_small.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"

Writes `<OUTPUT_DIR>/eval_results.json` and TensorBoard scalars under `<OUTPUT_DIR>/eval`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax

from moetx.trainer import checkpoints, data, metrics as metrics_lib, partitioning
from moetx.trainer import train as train_lib


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
) -> dict[str, float]:
    """Evaluates a checkpoint on `dataset_cfg`'s split and returns the summarized metrics
    (plus `step`).

    Args:
      model: the model wrapper (gin `MODEL`).
      checkpoint_dir: a model directory or one of its `checkpoint_<step>` directories.
      dataset_cfg: the split, feature lengths and batch size to evaluate on.
      output_dir: where results go (default: the model directory).
      checkpoint_step: which checkpoint of the model directory (default the newest).
      eval_steps: evaluate at most this many batches (None: the whole split).
      use_ema: evaluate the EMA of the weights the run kept (train.ema_decay).
    """
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
    m["step"] = step
    output_dir = output_dir or model_dir
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        writer = metrics_lib.MetricWriter(os.path.join(output_dir, "eval"), step, "eval")
        writer.write_scalars(step, {k: v for k, v in m.items() if k != "step"})
        writer.close()
        with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
            json.dump({"task": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split,
                       **m}, f, indent=2)
        print(f"[eval] checkpoint_{step} on {dataset_cfg.mixture_or_task_name}/"
              f"{dataset_cfg.split}: {model.headline(m)}", flush=True)
    return m
