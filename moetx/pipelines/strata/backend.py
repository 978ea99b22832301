"""The trainer-backed finetune, classify and sample functions STraTA's stages call.

Nothing here trains or decodes on its own: finetuning is `moetx.trainer.train.train`, rank
classification is `moetx.lm.predict.Predictor.score` (one row per input and option), and sampling
is `Predictor.generate` with top-k, all in process.

Finetuning from a checkpoint: `train` starts a fresh model directory with
`init_from=InitFromCheckpoint(...)`: the start checkpoint's parameters, a freshly initialised
optimizer state, step 0 and data position 0, then `train_steps` steps. Only the parameters are
used, so any checkpoint of the same model can be the start, whatever optimizer or train-state
layout wrote it, and the start checkpoint is never modified.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any, Callable

import gin
import numpy as np

from moetx.convert import restore
from moetx.lm import predict as predict_lib
from moetx.pipelines.strata import data
# Imported now (not lazily): they register gin configurables, which must exist before gin locks.
from moetx.trainer import checkpoints, data as data_lib, optimizers, partitioning
from moetx.trainer import train as train_lib


def truncate_to_tokens(text: str, vocabulary, max_tokens: int) -> str:
    """The longest prefix of `text` (cut at a token boundary) that encodes to at most
    `max_tokens` tokens."""
    ids = list(vocabulary.encode(text))
    n = max_tokens
    while len(ids) > max_tokens:
        # Re-encoding a decoded prefix can merge pieces differently: shorten until it fits.
        text = vocabulary.decode(ids[:n])
        ids, n = list(vocabulary.encode(text)), n - 1
    return text


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    z = scores - scores.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@gin.configurable(module="moetx.pipelines.strata")
@dataclasses.dataclass
class TrainerBackend:
    """Finetune / classify / sample with moetx's trainer, for one encoder-decoder model.

    Attributes:
      model: an `EncoderDecoderModel` (gin: %MODEL).
      feature_lengths: {'inputs', 'targets'} of finetuning; inputs longer than
        `feature_lengths['inputs']` are truncated before scoring and sampling.
      train_steps: steps of each finetune.
      batch_size: finetuning batch size.
      infer_batch_size: batch size of scoring and sampling.
      vocabulary_extra_ids: sentinel ids of the model's vocabulary (100 for T5 span corruption).
      optimizer_factory: optimizer of finetuning (default: gin's `make_optimizer`).
      log_every: training log interval.
      mesh_fn: the device mesh of training and inference (default: gin's `make_mesh`).
    """

    model: Any = gin.REQUIRED
    feature_lengths: dict = dataclasses.field(
        default_factory=lambda: {"inputs": 128, "targets": 32})
    train_steps: int = 200
    batch_size: int = 16
    infer_batch_size: int = 32
    vocabulary_extra_ids: int = data.DEFAULT_EXTRA_IDS
    optimizer_factory: Callable | None = None
    log_every: int = 50
    mesh_fn: Callable | None = None

    def _mesh_kw(self) -> dict:
        return {"mesh_fn": self.mesh_fn} if self.mesh_fn is not None else {}

    @property
    def vocabulary(self):
        from moetx.datasets import vocab

        return vocab.get_vocabulary(None, extra_ids=self.vocabulary_extra_ids)

    def fit_inputs(self, inputs: Sequence[str]) -> list[str]:
        """Inputs cut to fit `feature_lengths['inputs']` with EOS."""
        n = int(self.feature_lengths["inputs"]) - 1
        return [truncate_to_tokens(data.clean_text(x), self.vocabulary, n) for x in inputs]

    # ------------------------------------------------------------------------------ finetune
    def finetune(self, init_checkpoint: str, task_name: str, model_dir: str, seed: int = 0,
                 train_steps: int | None = None) -> str:
        """Finetunes `init_checkpoint` (a model directory's newest checkpoint or a
        `checkpoint_<step>` directory) on `task_name`'s train split for `train_steps` (default
        `self.train_steps`) steps in `model_dir` (replaced); returns `model_dir`."""
        steps = int(train_steps or self.train_steps)
        src_dir, step = checkpoints.resolve_checkpoint(init_checkpoint)
        start = restore.InitFromCheckpoint(
            path=os.path.dirname(checkpoints.state_dir(src_dir, step)), step=step)
        cfg = data_lib.DatasetConfig(task_name, dict(self.feature_lengths), "train",
                                     self.batch_size, shuffle=True, seed=seed)
        if os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        train_lib.train(
            model=self.model, model_dir=model_dir, train_dataset_cfg=cfg,
            train_steps=steps, eval_dataset_cfg=None, save_every=steps, keep_checkpoints=1,
            log_every=self.log_every, seed=seed,
            optimizer_factory=self.optimizer_factory or optimizers.make_optimizer,
            init_from=start, **self._mesh_kw())
        return model_dir

    # ------------------------------------------------------------------------------ predict
    def predictor(self, checkpoint: str, max_length: int | None = None
                  ) -> predict_lib.Predictor:
        """A Predictor with the parameters of `checkpoint` (a model directory's newest
        checkpoint or a `checkpoint_<step>` directory), in batches of `infer_batch_size`,
        inputs up to `feature_lengths['inputs']` tokens and targets up to `max_length`
        (default `feature_lengths['targets']`)."""
        return predict_lib.Predictor.from_checkpoint(
            self.model, checkpoint, vocabulary=self.vocabulary,
            batch_size=self.infer_batch_size,
            max_length=int(max_length or self.feature_lengths["targets"]),
            max_input_length=int(self.feature_lengths["inputs"]),
            mesh=(self.mesh_fn or partitioning.make_mesh)(),
            rules=partitioning.standard_logical_axis_rules())

    def classify(self, checkpoint: str, inputs: Sequence[str], options: Sequence[str]
                 ) -> np.ndarray:
        """Rank classification: <float>[len(inputs), len(options)] probabilities, the softmax
        over options of each option's log-likelihood log p(option | input)."""
        inputs = self.fit_inputs(inputs)
        options = [data.clean_text(o) for o in options]
        target_len = max(len(self.vocabulary.encode(o)) for o in options) + 1
        scores = self.predictor(checkpoint, max_length=target_len).score(
            [x for x in inputs for _ in options], [o for _ in inputs for o in options])
        return softmax(scores.astype(np.float64).reshape(len(inputs), len(options)))

    def sample(self, checkpoint: str, inputs: Sequence[str], topk: int = 40,
               temperature: float = 1.0, max_length: int | None = None, seed: int = 0
               ) -> list[str]:
        """One top-k sample (at `temperature`) per input, up to `max_length` tokens (default
        `feature_lengths['targets']`)."""
        generations = self.predictor(checkpoint, max_length=max_length).generate(
            self.fit_inputs(inputs), topk=int(topk), temperature=float(temperature), seed=seed)
        return [g.text for g in generations]
