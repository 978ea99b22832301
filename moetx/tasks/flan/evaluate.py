"""Zero-/few-shot FLAN evaluation of a checkpoint with `seqio.Evaluator`.

    python -m moetx.tasks.flan.evaluate --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_eval.gin --gin.CHECKPOINT_DIR="'runs/flan_no_tc'" \\
      --gin.MIXTURE_OR_TASK_NAME="'flan_offline_text_classification_eval'"

Classification tasks (`flan_<d>_scoring`) are scored by rank classification: every
(example, option) row gets the model's log-likelihood of the option (`model.score_batch`), the
best option per example is the prediction (`metrics.rank_classification`). Generation tasks are
decoded greedily and scored by exact match and token F1. seqio's loggers write TensorBoard
events and JSONL under `<OUTPUT_DIR>`; a summary (per task and the mean over tasks of each
metric) goes to `<OUTPUT_DIR>/flan_eval_results.json`. Encoder-decoder models only.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moetx.trainer import xla_env  # noqa: E402  (jax-free; must run before jax is imported)

xla_env.configure_cpu_defaults()

if __name__ == "__main__":
    from moetx.tasks.flan.evaluate import console_main

    console_main()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moetx.trainer import checkpoints, cli, optimizers, partitioning  # noqa: E402
from moetx.trainer import trainer as trainer_lib  # noqa: E402

__all__ = ["batched", "evaluate_flan", "make_model_fns"]


def batched(dataset: Iterable, batch_size: int) -> Iterable[tuple[list[int], dict]]:
    """Groups seqio's enumerated `(index, features)` pairs into padded numpy batches."""
    indices, rows = [], []
    for index, features in dataset:
        indices.append(int(index))
        rows.append(features)
        if len(rows) == batch_size:
            yield indices, _stack(rows, batch_size)
            indices, rows = [], []
    if rows:
        yield indices, _stack(rows, batch_size)


def _stack(rows: list[Mapping], batch_size: int) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        arr = np.stack([np.asarray(r[k]) for r in rows])
        if len(rows) < batch_size:
            arr = np.concatenate([arr, np.zeros((batch_size - len(rows),) + arr.shape[1:],
                                                arr.dtype)])
        out[k] = arr
    return out


def make_model_fns(model, params, mesh, rules, batch_size: int, eos_id: int,
                   max_decode_length: int) -> tuple[Callable, Callable]:
    """(score_fn, predict_fn) in `seqio.Evaluator`'s signatures, for an encoder-decoder."""
    score = jax.jit(model.score_batch)
    predict = jax.jit(model.predict_batch, static_argnames=("max_decode_length", "eos_id"))
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights")

    def score_fn(dataset, model_feature_shapes=None):
        del model_feature_shapes
        out, t0, n = [], time.perf_counter(), 0
        with mesh, nn.logical_axis_rules(rules):
            for indices, batch in batched(dataset.as_numpy_iterator(), batch_size):
                scores = np.asarray(score(params, {k: jnp.asarray(batch[k]) for k in keys
                                                   if k in batch}))
                out.extend(zip(indices, scores[:len(indices)].tolist()))
                n += len(indices)
        _log(f"scored {n} rows in {time.perf_counter() - t0:.1f}s")
        return out

    def predict_fn(dataset, model_feature_shapes=None):
        del model_feature_shapes
        out = []
        with mesh, nn.logical_axis_rules(rules):
            for indices, batch in batched(dataset.as_numpy_iterator(), batch_size):
                tokens = np.asarray(predict(params, jnp.asarray(batch["encoder_input_tokens"]),
                                            max_decode_length=max_decode_length,
                                            rng=jax.random.PRNGKey(0), eos_id=eos_id))
                # Fixed-length rows (zeros after EOS): seqio stacks them into one array and
                # its vocabulary's decode stops at EOS.
                out.extend((index, tokens[i].tolist()) for i, index in enumerate(indices))
        return out

    return score_fn, predict_fn


@gin.configurable
def evaluate_flan(
    model: Any = gin.REQUIRED,
    checkpoint_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    split: str = "validation",
    batch_size: int = 32,
    output_dir: str | None = None,
    checkpoint_step: int | None = None,
    mesh_fn: Callable = partitioning.make_mesh,
    rules_fn: Callable = partitioning.standard_logical_axis_rules,
) -> dict[str, dict[str, float]]:
    """Evaluates a checkpoint on a FLAN task or (eval) mixture; returns {task: metrics}.

    Args:
      model: an encoder-decoder model wrapper (gin `MODEL`).
      checkpoint_dir: directory with `checkpoint_<step>` folders.
      mixture_or_task_name: e.g. 'flan_offline_text_classification_eval'.
      task_feature_lengths: {'inputs': L_in, 'targets': L_tgt}; longer inputs are truncated.
      split: 'validation' or 'test'.
      batch_size: rows per scoring / decoding batch.
      output_dir: where the loggers and the summary write (default `<checkpoint_dir>/flan_eval`).
      checkpoint_step: the step to load (latest when None).
    """
    import seqio

    import moetx.tasks  # noqa: F401  (registers the tasks)
    import moetx.tasks.flan  # noqa: F401

    if not getattr(model, "is_encoder_decoder", False):
        raise ValueError("moetx.tasks.flan.evaluate scores encoder-decoder models; got "
                         f"{type(model).__name__}. Fix: use an encoder-decoder model gin "
                         "(e.g. models/t5_demo.gin).")
    lengths = dict(task_feature_lengths)
    mesh, rules = mesh_fn(), tuple(rules_fn())
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh, rules,
                                  model.input_shapes(batch_size, lengths))
    abstract = trainer.abstract_state_with_shardings().params
    params, step = checkpoints.restore_params(checkpoint_dir, checkpoint_step, abstract)
    output_dir = output_dir or os.path.join(checkpoint_dir, "flan_eval")
    task = seqio.get_mixture_or_task(mixture_or_task_name)
    vocabulary = (task.tasks[0] if hasattr(task, "tasks") else task).output_features[
        "targets"].vocabulary
    evaluator = seqio.Evaluator(
        mixture_or_task_name, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
        sequence_length=lengths, logger_cls=[seqio.TensorBoardLogger, seqio.JSONLogger],
        log_dir=output_dir, async_compute_metrics=False)
    score_fn, predict_fn = make_model_fns(model, params, mesh, rules, batch_size,
                                          int(vocabulary.eos_id), lengths["targets"])
    t0 = time.perf_counter()
    future, _ = evaluator.evaluate(compute_metrics=True, step=step, score_fn=score_fn,
                                   predict_fn=predict_fn)
    results = {name: {k: float(v) for k, v in m.items()} for name, m in future.result().items()}
    summary = {"checkpoint_dir": os.path.abspath(checkpoint_dir), "step": step,
               "mixture_or_task": mixture_or_task_name, "split": split, "tasks": results,
               "mean": _means(results), "seconds": round(time.perf_counter() - t0, 1)}
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "flan_eval_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        for name, m in sorted(results.items()):
            print(f"[flan eval] checkpoint_{step} {name}/{split}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(m.items())), flush=True)
        print(f"[flan eval] mean: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                 sorted(summary["mean"].items())), flush=True)
    return results


def _means(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = {k for m in results.values() for k in m if k != "num_examples"}
    return {k: float(np.mean([m[k] for m in results.values() if k in m])) for k in sorted(keys)}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[flan eval] {msg}", file=sys.stderr, flush=True)


def main(args) -> None:
    del args
    evaluate_flan()


def console_main() -> None:
    sys.exit(cli.run(main, module_imports=("moetx.lm.models", "moetx.tasks",
                                           "moetx.tasks.flan")))
