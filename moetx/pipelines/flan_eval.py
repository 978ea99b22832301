"""Zero-/few-shot FLAN evaluation of a checkpoint with `seqio.Evaluator`.

    python -m moetx.cli.flan_evaluate --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_eval.gin --gin.CHECKPOINT_DIR="'runs/flan_no_tc'" \\
      --gin.MIXTURE_OR_TASK_NAME="'flan_offline_text_classification_eval'"

Classification tasks (`flan_<d>_scoring`) are scored by rank classification: every
(example, option) row gets the model's log-likelihood of the option (`Predictor.score`), the
best option per example is the prediction (`metrics.rank_classification`). Generation tasks are
decoded greedily (`Predictor.generate`) and scored by exact match and token F1. seqio's loggers
write TensorBoard events and JSONL under `<OUTPUT_DIR>`; a summary (per task and the mean over
tasks of each metric) goes to `<OUTPUT_DIR>/flan_eval_results.json`. Encoder-decoder models
only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from moetx.lm import predict as predict_lib
from moetx.trainer import partitioning

__all__ = ["evaluate_flan", "make_model_fns"]


def _rows(dataset: Iterable[tuple[int, Mapping[str, Any]]], keys: Sequence[str]
          ) -> tuple[list[int], dict[str, list[np.ndarray]]]:
    """seqio's enumerated `(index, features)` pairs -> indices and, per feature in `keys`, each
    row's token ids with the padding after them removed."""
    indices: list[int] = []
    rows: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for index, features in dataset:
        indices.append(int(index))
        for k in keys:
            rows[k].append(np.trim_zeros(np.asarray(features[k]), "b"))
    return indices, rows


def make_model_fns(predictor: predict_lib.Predictor) -> tuple[Callable, Callable]:
    """(score_fn, predict_fn) in `seqio.Evaluator`'s signatures, for an encoder-decoder.

    The rows seqio feeds already end in EOS and fit the predictor's `max_input_length` /
    `max_length` (the task feature lengths): the predictor pads them back to those lengths and
    adds nothing. `score_fn` gives each (inputs, targets) row its log-likelihood; `predict_fn`
    decodes greedily and returns each row's fixed-length decoded targets (zeros after EOS),
    which seqio stacks into one array and decodes up to EOS.
    """

    def score_fn(dataset, model_feature_shapes=None):
        del model_feature_shapes
        t0 = time.perf_counter()
        indices, rows = _rows(dataset.as_numpy_iterator(),
                              ("encoder_input_tokens", "decoder_target_tokens"))
        scores = predictor.score(rows["encoder_input_tokens"], rows["decoder_target_tokens"],
                                 add_eos=False)
        _log(f"scored {len(indices)} rows in {time.perf_counter() - t0:.1f}s")
        return list(zip(indices, scores.tolist()))

    def predict_fn(dataset, model_feature_shapes=None):
        del model_feature_shapes
        indices, rows = _rows(dataset.as_numpy_iterator(), ("encoder_input_tokens",))
        generations = predictor.generate(rows["encoder_input_tokens"], add_eos=False)
        return [(index, g.tokens.tolist()) for index, g in zip(indices, generations)]

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
      checkpoint_dir: a model directory with `checkpoint_<step>` folders (or one of them).
      mixture_or_task_name: e.g. 'flan_offline_text_classification_eval' (registered by
        `moetx.tasks.register_all()`, which the command line calls).
      task_feature_lengths: {'inputs': L_in, 'targets': L_tgt}; longer inputs are truncated.
      split: 'validation' or 'test'.
      batch_size: rows per scoring / decoding batch.
      output_dir: where the loggers and the summary write (default `<checkpoint_dir>/flan_eval`).
      checkpoint_step: the step to load (latest when None).
    """
    import seqio

    if not getattr(model, "is_encoder_decoder", False):
        raise ValueError("moetx.pipelines.flan_eval scores encoder-decoder models; got "
                         f"{type(model).__name__}. Fix: use an encoder-decoder model gin "
                         "(e.g. models/t5_demo.gin).")
    lengths = dict(task_feature_lengths)
    task = seqio.get_mixture_or_task(mixture_or_task_name)
    vocabulary = (task.tasks[0] if hasattr(task, "tasks") else task).output_features[
        "targets"].vocabulary
    predictor = predict_lib.Predictor.from_checkpoint(
        model, checkpoint_dir, step=checkpoint_step, vocabulary=vocabulary,
        batch_size=batch_size, max_length=lengths["targets"], max_input_length=lengths["inputs"],
        mesh=mesh_fn(), rules=rules_fn())
    step = predictor.step
    output_dir = output_dir or os.path.join(checkpoint_dir, "flan_eval")
    evaluator = seqio.Evaluator(
        mixture_or_task_name, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
        sequence_length=lengths, logger_cls=[seqio.TensorBoardLogger, seqio.JSONLogger],
        log_dir=output_dir, async_compute_metrics=False)
    score_fn, predict_fn = make_model_fns(predictor)
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
