"""Evaluation entry point: teacher-forced loss, accuracy and perplexity of a checkpoint.

    python -m moetx.trainer.eval --gin_file=models/decoder_small.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_DIR="'runs/demo'" --gin.MIXTURE_OR_TASK_NAME="'moetx_en_causal_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"

Writes `<OUTPUT_DIR>/eval_results.json` and TensorBoard scalars under `<OUTPUT_DIR>/eval`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moetx.trainer import xla_env  # noqa: E402  (jax-free; must run before jax is imported)

xla_env.configure_cpu_defaults()

if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so gin registers each
    # configurable once (as `moetx.trainer.eval.*`).
    from moetx.trainer.eval import console_main

    console_main()

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402

from moetx.trainer import checkpoints, cli, data, metrics as metrics_lib, partitioning  # noqa: E402
from moetx.trainer import train as train_lib  # noqa: E402


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
    """Evaluates the checkpoint (latest unless `checkpoint_step`) on `dataset_cfg`'s split;
    with `use_ema`, the EMA of the weights the run kept (train.ema_decay)."""
    trainer = train_lib.build_trainer(model, dataset_cfg, mesh_fn, rules_fn)
    abstract = trainer.abstract_state_with_shardings()
    model_state = None
    if use_ema:
        ema = {"params": abstract.params, "model_state": abstract.model_state}
        try:
            parts, step = checkpoints.restore_subtrees(checkpoint_dir, checkpoint_step,
                                                       {"ema": ema})
        except ValueError as e:
            raise ValueError(f"{e}\nDid the run keep an EMA (train.ema_decay)? If not, drop "
                             f"use_ema.") from None
        params, model_state = parts["ema"]["params"], parts["ema"]["model_state"]
    elif trainer.state_collections:
        parts, step = checkpoints.restore_subtrees(
            checkpoint_dir, checkpoint_step,
            {"params": abstract.params, "model_state": abstract.model_state})
        params, model_state = parts["params"], parts["model_state"]
    else:
        params, step = checkpoints.restore_params(checkpoint_dir, checkpoint_step,
                                                  abstract.params)
    m = trainer.evaluate(params, train_lib.evaluation_batches(trainer, dataset_cfg), eval_steps,
                         model_state=model_state)
    m["step"] = step
    output_dir = output_dir or checkpoint_dir
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        writer = metrics_lib.MetricWriter(os.path.join(output_dir, "eval"), step, "eval")
        writer.write_scalars(step, {k: v for k, v in m.items() if k != "step"})
        writer.close()
        with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
            json.dump({"task": dataset_cfg.mixture_or_task_name, "split": dataset_cfg.split,
                       **m}, f, indent=2)
        print(f"[eval] checkpoint_{step} on {dataset_cfg.mixture_or_task_name}/"
              f"{dataset_cfg.split}: loss {m['cross_ent_loss']:.4f} | acc {m['accuracy']:.3f} | "
              f"perplexity {m['perplexity']:.2f} ({int(m['tokens']):,} "
              f"{getattr(model, 'metric_unit', 'tokens')})", flush=True)
    return m


def main(args) -> None:
    del args
    evaluate()


def console_main() -> None:
    sys.exit(cli.run(main, module_imports=("moetx.lm.models", "moetx.tasks")))

