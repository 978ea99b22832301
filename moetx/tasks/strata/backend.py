"""The trainer-backed finetune, classify and sample functions STraTA's stages call.

Nothing here trains or decodes on its own: finetuning is `moetx.trainer.train.train` started from
a copy of a checkpoint, rank classification is `moetx.trainer.infer.infer` in `score` mode (one
row per input and option), and sampling is `infer` in `predict` mode with top-k.

Finetuning from a checkpoint: `train` resumes from the newest checkpoint of its model directory,
so the start checkpoint's parameters are written into a fresh directory as `checkpoint_0`, with a
freshly initialised optimizer state and data position 0, and training runs `train_steps` steps
from there. Reading only the parameters means any checkpoint of the same model can be the start,
whatever optimizer or train-state layout wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Callable

import gin
import numpy as np

from moetx.tasks.strata import data
# Imported now (not lazily): they register gin configurables, which must exist before gin locks.
from moetx.trainer import checkpoints, data as data_lib, infer as infer_lib, optimizers
from moetx.trainer import train as train_lib


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """`(model_dir, step)` of a `.../checkpoint_<step>` directory or of a model directory's
    newest checkpoint."""
    path = os.path.abspath(path)
    m = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(path.rstrip("/")))
    if m:
        if not os.path.isdir(os.path.join(path, "state")):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no 'state' folder).")
        return os.path.dirname(path), int(m.group(1))
    step = checkpoints.latest_step(path)
    if step is None:
        raise FileNotFoundError(f"No checkpoint_<step> in {path!r}; pass a model directory "
                                "with a checkpoint or a checkpoint_<step> directory.")
    return path, step


def init_from_checkpoint(src: str, model_dir: str, trainer) -> None:
    """Writes `model_dir/checkpoint_0`: the parameters of checkpoint `src` (see
    `resolve_checkpoint`) with a fresh optimizer state and data position 0, so that `train`
    resumes from it. `src` itself is never modified; whatever optimizer (or train-state layout)
    wrote it, only its parameters are read."""
    src_dir, step = resolve_checkpoint(src)
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    params, _ = checkpoints.restore_params(
        src_dir, step, trainer.abstract_state_with_shardings().params)
    state = trainer.init_state().replace(params=params)
    ckpt = checkpoints.Checkpointer(model_dir, save_interval_steps=1, keep=1)
    ckpt.save(0, state, {"batches_consumed": 0})
    ckpt.close()


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


@gin.configurable(module="moetx.tasks.strata")
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
        from moetx.tasks import vocab

        return vocab.get_vocabulary(None, extra_ids=self.vocabulary_extra_ids)

    def fit_inputs(self, inputs: Sequence[str]) -> list[str]:
        """Inputs cut to fit `feature_lengths['inputs']` with EOS."""
        n = int(self.feature_lengths["inputs"]) - 1
        return [truncate_to_tokens(data.clean_text(x), self.vocabulary, n) for x in inputs]

    # ------------------------------------------------------------------------------ finetune
    def finetune(self, init_checkpoint: str, task_name: str, model_dir: str, seed: int = 0,
                 train_steps: int | None = None) -> str:
        """Finetunes `init_checkpoint` on `task_name`'s train split for `train_steps` (default
        `self.train_steps`) steps in `model_dir` (replaced); returns `model_dir`."""
        steps = int(train_steps or self.train_steps)
        cfg = data_lib.DatasetConfig(task_name, dict(self.feature_lengths), "train",
                                     self.batch_size, shuffle=True, seed=seed)
        optimizer_factory = self.optimizer_factory or optimizers.make_optimizer
        trainer = train_lib.build_trainer(self.model, cfg, optimizer_factory=optimizer_factory,
                                          seed=seed, **self._mesh_kw())
        init_from_checkpoint(init_checkpoint, model_dir, trainer)
        del trainer
        train_lib.train(
            model=self.model, model_dir=model_dir, train_dataset_cfg=cfg,
            train_steps=steps, eval_dataset_cfg=None, save_every=steps, keep_checkpoints=1,
            log_every=self.log_every, seed=seed, optimizer_factory=optimizer_factory,
            **self._mesh_kw())
        return model_dir

    # ------------------------------------------------------------------------------ infer
    def _infer(self, checkpoint: str, rows: list[dict], **kw) -> list[dict]:
        model_dir, step = resolve_checkpoint(checkpoint)
        with tempfile.TemporaryDirectory(prefix="strata_infer_") as tmp:
            prompts = os.path.join(tmp, "prompts.jsonl")
            with open(prompts, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            return infer_lib.infer(
                model=self.model, checkpoint_dir=model_dir, checkpoint_step=step,
                prompts_file=prompts, output_file=os.path.join(tmp, "out.jsonl"),
                vocabulary_extra_ids=self.vocabulary_extra_ids,
                max_input_length=int(self.feature_lengths["inputs"]),
                batch_size=self.infer_batch_size, **self._mesh_kw(), **kw)

    def classify(self, checkpoint: str, inputs: Sequence[str], options: Sequence[str]
                 ) -> np.ndarray:
        """Rank classification: <float>[len(inputs), len(options)] probabilities, the softmax
        over options of each option's log-likelihood log p(option | input)."""
        inputs = self.fit_inputs(inputs)
        options = [data.clean_text(o) for o in options]
        rows = [{"inputs": x, "targets": o} for x in inputs for o in options]
        target_len = max(len(self.vocabulary.encode(o)) for o in options) + 1
        out = self._infer(checkpoint, rows, mode="score", max_length=target_len)
        scores = np.array([r["score"] for r in out], np.float64).reshape(len(inputs),
                                                                         len(options))
        return softmax(scores)

    def sample(self, checkpoint: str, inputs: Sequence[str], topk: int = 40,
               temperature: float = 1.0, max_length: int | None = None, seed: int = 0
               ) -> list[str]:
        """One top-k sample (at `temperature`) per input, up to `max_length` tokens (default
        `feature_lengths['targets']`)."""
        rows = [{"inputs": x} for x in self.fit_inputs(inputs)]
        out = self._infer(checkpoint, rows, mode="predict", topk=int(topk),
                          temperature=float(temperature),
                          max_length=int(max_length or self.feature_lengths["targets"]),
                          seed=seed)
        return [r["output"] for r in out]
