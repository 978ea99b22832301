"""T5X's script functions as its run files configure them (`__main__.train`, `evaluate`,
`infer`, with T5X's parameter names), each calling moetx's library function.

`train` maps T5X's arguments onto `moetx.trainer.train.train`:

    total_steps / relative_steps         train_steps / train_steps_relative
    eval_period, eval_steps              eval_every, eval_steps (teacher-forced train_eval)
    infer_eval_dataset_cfg               infer_eval_dataset_cfg, seqio_eval_every = eval_period
    stats_period (default eval_period)   log_every
    checkpoint_cfg.save period / keep    save_every / keep_checkpoints
    checkpoint_cfg.restore path          init_from = InitFromCheckpoint(path,
                                           continue_step=True) (T5X continues the step count)
    partitioner                          mesh_fn, rules_fn
    trainer_cls(): num_microbatches,     num_microbatches, optimizer_factory (the model's
      learning_rate_fn                     Adafactor with that schedule)
    random_seed (None: 0)                seed
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

from moetx.compat import t5x_model, t5x_run
from moetx.compat.errors import CompatError, refuse, warn
# Imported here, before gin parses and locks the configuration (`activate` imports this
# module): each registers gin configurables, which cannot be added to a locked configuration.
from moetx.convert import restore as restore_lib
from moetx.lm import infer as infer_lib
from moetx.trainer import data, optimizers, preemption
from moetx.trainer import eval as eval_lib
from moetx.trainer import train as train_lib


def _unpack(model) -> t5x_model.T5XModel:
    if not isinstance(model, t5x_model.T5XModel):
        raise refuse(f"a MODEL of type {type(model).__module__}.{type(model).__name__} in a "
                     f"T5X run file", "T5X run files need a T5X model file (models."
                     "EncoderDecoderModel) or moetx's own runs/*.gin")
    return model


def _dataset(cfg, what: str):
    if cfg is None:
        return None
    if not isinstance(cfg, t5x_run.DatasetConfig):
        raise CompatError(f"{what} must be a utils.DatasetConfig, got {type(cfg).__name__}.")
    return cfg.to_moetx(what)


def _check_vocabulary(t5x: t5x_model.T5XModel, dataset_cfg) -> None:
    """T5X refuses a task whose vocabulary is not the model's. moetx trains on the task's
    token ids (they must fit in the model's vocab_size: moetx checks that), so a different
    vocabulary is announced, not refused: it only matters to decoding."""
    if t5x.vocabulary is None or dataset_cfg is None:
        return
    task = data.get_task(dataset_cfg.mixture_or_task_name)
    feature = task.output_features.get("targets")
    if feature is None:
        return
    if t5x_model.vocab_key(feature.vocabulary) != t5x_model.vocab_key(t5x.vocabulary):
        warn(f"the model's vocabulary ({t5x_model.vocab_key(t5x.vocabulary)[1]}) is not task "
             f"{dataset_cfg.mixture_or_task_name!r}'s; moetx trains on the task's token ids "
             f"(T5X would refuse the pair).")


def _has_metric_fns(name: str) -> bool:
    """Whether task or mixture `name` has a task with metric functions."""
    task = data.get_task(name)
    return any(getattr(t, "metric_objs", None) for t in getattr(task, "tasks", None) or [task])


def _optimizer_factory(t5x: t5x_model.T5XModel, learning_rate_fn):
    optimizer = t5x.optimizer
    if optimizer is None:
        optimizer_fn = optimizers.adafactor
    elif isinstance(optimizer, t5x_model.Adafactor):
        optimizer_fn = optimizer.optimizer_fn()
    else:
        raise refuse(f"optimizer_def = {type(optimizer).__name__}",
                     "moetx maps T5X's adafactor.Adafactor; for others set "
                     "make_optimizer.optimizer_fn in a moetx run file")
    if learning_rate_fn is None:
        raise CompatError("trainer.Trainer.learning_rate_fn is not set (T5X's run files set "
                          "@utils.create_learning_rate_scheduler()).")
    return functools.partial(optimizers.make_optimizer, optimizer_fn=optimizer_fn,
                             schedule=learning_rate_fn)


def _partitioning(partitioner) -> t5x_run.Partitioning:
    if partitioner is None:
        return t5x_run.PjitPartitioner()
    if not isinstance(partitioner, t5x_run.Partitioning):
        raise CompatError(f"partitioner must be a partitioning.PjitPartitioner, got "
                          f"{type(partitioner).__name__}.")
    return partitioner


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(inspect.unwrap(fn)).parameters


def _init_from(restore: t5x_run.RestoreCheckpointConfig | None, continue_step: bool):
    """InitFromCheckpoint for a T5X restore config with a path (None without one)."""
    if restore is None:
        return None
    path = restore.single_path("moetx's InitFromCheckpoint")
    if not path:
        return None
    kwargs: dict[str, Any] = {"path": path, "strict": restore.strict}
    if restore.assignment_map:
        kwargs["assignment_map"] = [tuple(e) for e in restore.assignment_map]
    if continue_step:
        if not _accepts(restore_lib.InitFromCheckpoint.__init__, "continue_step"):
            raise refuse("continuing a restored checkpoint's step count (T5X's finetune)",
                         "this moetx's InitFromCheckpoint has no continue_step yet")
        kwargs["continue_step"] = True
    return restore_lib.InitFromCheckpoint(**kwargs)


def train(*, model: Any = None, train_dataset_cfg: Any = None,
          train_eval_dataset_cfg: Any = None, infer_eval_dataset_cfg: Any = None,
          checkpoint_cfg: Any = None, partitioner: Any = None, trainer_cls: Any = None,
          model_dir: str | None = None, total_steps: int | None = None, eval_steps: int = 20,
          eval_period: int = 1000, relative_steps: int | None = None,
          stats_period: int | None = None, random_seed: int | None = None,
          use_hardware_rng: bool = False, summarize_config_fn: Any = None,
          inference_evaluator_cls: Any = None, get_dataset_fn: Any = None,
          concurrent_metrics: bool = True, actions: Any = None,
          train_eval_get_dataset_fn: Any = None, run_eval_before_training: bool = False,
          train_state_initializer_cls: Any = None, use_orbax: bool = True,
          verify_matching_vocabs_fn: Any = None, gc_period: int = 0) -> dict:
    """T5X's `train` (t5x/train.py's arguments) -> `moetx.trainer.train.train`."""
    del use_hardware_rng, summarize_config_fn, concurrent_metrics, use_orbax, gc_period
    del verify_matching_vocabs_fn, inference_evaluator_cls
    for name, value in (("get_dataset_fn", get_dataset_fn), ("actions", actions),
                        ("train_eval_get_dataset_fn", train_eval_get_dataset_fn),
                        ("train_state_initializer_cls", train_state_initializer_cls)):
        if value is not None:
            raise refuse(f"train.{name}", "moetx's train() reads SeqIO tasks itself "
                                          "(moetx.trainer.data) and has no actions")
    t5x = _unpack(model)
    train_cfg = _dataset(train_dataset_cfg, "train/utils.DatasetConfig")
    eval_cfg = _dataset(train_eval_dataset_cfg, "train_eval/utils.DatasetConfig")
    infer_cfg = None
    if infer_eval_dataset_cfg is not None:
        if not _accepts(train_lib.train, "infer_eval_dataset_cfg"):
            warn("T5X's inference evaluation during training (infer_eval_dataset_cfg, "
                 "seqio.Evaluator) is not run by this moetx; the teacher-forced train_eval is.")
        else:
            if infer_eval_dataset_cfg.task_feature_lengths is None:
                # T5X pads to the longest example; moetx batches have fixed lengths.
                infer_eval_dataset_cfg = dataclasses.replace(
                    infer_eval_dataset_cfg,
                    task_feature_lengths=train_dataset_cfg.task_feature_lengths)
            infer_cfg = _dataset(infer_eval_dataset_cfg, "infer_eval/utils.DatasetConfig")
            if not _has_metric_fns(infer_cfg.mixture_or_task_name):
                # seqio.Evaluator skips such a task in T5X (it logs and goes on).
                warn(f"no inference evaluation: {infer_cfg.mixture_or_task_name!r} has no task "
                     f"with metric functions (T5X's seqio.Evaluator skips it too).")
                infer_cfg = None
    _check_vocabulary(t5x, train_cfg)
    trainer = trainer_cls() if trainer_cls is not None else t5x_run.Trainer()
    ckpt = checkpoint_cfg or t5x_run.CheckpointConfig()
    save = ckpt.save or t5x_run.SaveCheckpointConfig()
    restore = ckpt.restore
    if restore is not None and restore.dtype not in (None, "float32"):
        raise refuse(f"utils.RestoreCheckpointConfig.dtype = {restore.dtype!r} for training",
                     "moetx trains float32 parameters")
    if total_steps is None and relative_steps is None:
        raise CompatError("Set TRAIN_STEPS (or TRAIN_STEPS_RELATIVE).")
    parts = _partitioning(partitioner)
    kwargs: dict[str, Any] = dict(
        model=t5x.model, model_dir=model_dir, train_dataset_cfg=train_cfg,
        eval_dataset_cfg=eval_cfg, eval_every=eval_period if eval_cfg is not None else 0,
        eval_steps=eval_steps, eval_at_start=run_eval_before_training,
        save_every=save.period or total_steps or relative_steps, keep_checkpoints=save.keep,
        log_every=stats_period or eval_period, num_microbatches=trainer.num_microbatches or 1,
        seed=0 if random_seed is None else random_seed,
        optimizer_factory=_optimizer_factory(t5x, trainer.learning_rate_fn),
        mesh_fn=parts.mesh_fn, rules_fn=parts.rules_fn,
        init_from=_init_from(restore, continue_step=True),
        train_steps=total_steps)
    if infer_cfg is not None:
        kwargs.update(infer_eval_dataset_cfg=infer_cfg, seqio_eval_every=eval_period)
    if relative_steps is not None:
        if not _accepts(train_lib.train, "train_steps_relative"):
            raise refuse("TRAIN_STEPS_RELATIVE", "this moetx's train() has no "
                         "train_steps_relative yet; set TRAIN_STEPS")
        kwargs.update(train_steps=None, train_steps_relative=relative_steps)  # T5X: it wins
    return preemption.raising_peer_lost(lambda: train_lib.train(**kwargs))


def evaluate(*, model: Any = None, dataset_cfg: Any = None,
             restore_checkpoint_cfg: Any = None, partitioner: Any = None,
             output_dir: str | None = None, inference_evaluator_cls: Any = None,
             training_evaluator_cls: Any = None, summarize_config_fn: Any = None,
             train_state_initializer_cls: Any = None, train_eval_get_dataset_fn: Any = None,
             fallback_init_rng: int | None = None, use_orbax: bool = True) -> dict:
    """T5X's `evaluate` (t5x/eval.py) -> `moetx.trainer.eval.evaluate`: moetx evaluates with
    teacher forcing (loss, accuracy, perplexity), which it announces: T5X's seqio.Evaluator
    decodes and scores the task's metric functions."""
    del summarize_config_fn, use_orbax, inference_evaluator_cls, training_evaluator_cls
    for name, value in (("train_state_initializer_cls", train_state_initializer_cls),
                        ("train_eval_get_dataset_fn", train_eval_get_dataset_fn),
                        ("fallback_init_rng", fallback_init_rng)):
        if value is not None:
            raise refuse(f"evaluate.{name}", "moetx evaluates a saved checkpoint")
    t5x = _unpack(model)
    cfg = _dataset(dataset_cfg, "utils.DatasetConfig")
    restore = restore_checkpoint_cfg or t5x_run.RestoreCheckpointConfig()
    path = restore.single_path("moetx's evaluate")
    if not path:
        raise CompatError("Set CHECKPOINT_PATH (utils.RestoreCheckpointConfig.path).")
    if not _accepts(eval_lib.evaluate, "seqio_eval"):
        warn("moetx evaluates with teacher forcing (loss, accuracy, perplexity); the task's "
             "metric functions on decoded outputs (T5X's seqio.Evaluator) are not computed.")
    parts = _partitioning(partitioner)
    return eval_lib.evaluate(model=t5x.model, checkpoint_dir=path, dataset_cfg=cfg,
                             output_dir=output_dir, mesh_fn=parts.mesh_fn,
                             rules_fn=parts.rules_fn)


def infer(*, mode: str = "predict", model: Any = None, dataset_cfg: Any = None,
          restore_checkpoint_cfg: Any = None, partitioner: Any = None,
          output_dir: str | None = None, checkpoint_period: int = 100, shard_id: int = 0,
          num_shards: int = 1, **others) -> list:
    """T5X's `infer` (t5x/infer.py): decodes the `inputs` of a SeqIO task split with
    `moetx.lm.infer.infer`, writing `<output_dir>/<task>-<mode>.jsonl`. The inputs are
    taken as text (`inputs_pretokenized`) and encoded with the task's vocabulary."""
    del checkpoint_period, others
    if mode not in ("predict", "score"):
        raise refuse(f"infer.mode = {mode!r}", "moetx's infer has modes 'predict' and "
                                               "'score'")
    if num_shards != 1 or shard_id != 0:
        raise refuse("infer.num_shards / shard_id", "moetx's infer runs the whole split")
    t5x = _unpack(model)
    cfg = dataset_cfg
    if not isinstance(cfg, t5x_run.DatasetConfig):
        raise CompatError("infer.dataset_cfg must be a utils.DatasetConfig.")
    restore = restore_checkpoint_cfg or t5x_run.RestoreCheckpointConfig()
    path = restore.single_path("moetx's infer")
    if not path or not output_dir:
        raise CompatError("Set CHECKPOINT_PATH and INFER_OUTPUT_DIR.")
    if restore.dtype not in (None, "float32"):
        warn(f"moetx decodes with the checkpoint's float32 parameters, not "
             f"RestoreCheckpointConfig.dtype = {restore.dtype!r}.")
    prompts, vocab_path, extra_ids = _task_prompts(cfg, output_dir, mode)
    name = getattr(cfg.mixture_or_task_name, "name", cfg.mixture_or_task_name)
    parts = _partitioning(partitioner)
    lengths = dict(cfg.task_feature_lengths or {})
    kwargs: dict[str, Any] = {}
    if "inputs" in lengths:
        # The inputs are re-encoded from text: moetx adds EOS, and the pieces may differ a
        # little from the task's own (trimmed) tokens.
        kwargs["max_input_length"] = lengths["inputs"] + lengths["inputs"] // 4 + 1
    if "targets" in lengths:
        kwargs["max_length"] = lengths["targets"]
    return infer_lib.infer(
        model=t5x.model, checkpoint_dir=path, prompts_file=prompts,
        output_file=os.path.join(output_dir, f"{name}-{mode}.jsonl"),
        vocabulary_path=vocab_path, vocabulary_extra_ids=extra_ids, mode=mode,
        batch_size=cfg.batch_size, mesh_fn=parts.mesh_fn, rules_fn=parts.rules_fn, **kwargs)


def _task_prompts(cfg: t5x_run.DatasetConfig, output_dir: str, mode: str):
    """Writes the split's inputs (and targets) as a JSONL prompts file; returns its path and
    the task vocabulary's SentencePiece file and extra ids."""
    import json

    if cfg.module:
        import importlib

        importlib.import_module(cfg.module)
    name = getattr(cfg.mixture_or_task_name, "name", cfg.mixture_or_task_name)
    task = data.get_task(name)
    vocabulary = task.output_features["inputs"].vocabulary \
        if "inputs" in task.output_features else task.output_features["targets"].vocabulary
    vocab_path = getattr(vocabulary, "sentencepiece_model_file", None)
    lengths = dict(cfg.task_feature_lengths) if cfg.task_feature_lengths else None
    ds = task.get_dataset(sequence_length=lengths, split=cfg.split, shuffle=False,
                          use_cached=cfg.use_cached)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}-{cfg.split}-inputs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for ex in ds.as_numpy_iterator():
            row = {"inputs": _text(ex, "inputs", vocabulary)}
            if mode == "score" and "targets" in ex:
                row["targets"] = _text(ex, "targets", vocabulary)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path, vocab_path, getattr(vocabulary, "extra_ids", 0)


def _text(example: dict, key: str, vocabulary) -> str:
    raw = example.get(f"{key}_pretokenized")
    if raw is not None:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return vocabulary.decode([int(t) for t in example[key]])
