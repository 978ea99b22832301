"""Start a FLAN finetuning run from a pretrained checkpoint.

    python -m moetx.cli.flan_finetune --init_checkpoint=runs/demo_t5/checkpoint_400 \\
      --model_dir=runs/flan_no_tc
    python -m moetx.cli.train --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_finetune.gin --gin.MODEL_DIR="'runs/flan_no_tc'"

The trainer resumes from the latest checkpoint of its MODEL_DIR, so finetuning starts by copying
the pretrained checkpoint (parameters, optimizer state and step, as T5X finetuning continues the
pretraining step count) into the new model directory. The copy's data-iterator position is
reset to 0: it counted batches of the pretraining task, not of the FLAN mixture. The source
checkpoint is only read.
"""

from __future__ import annotations

import json
import os
import shutil

__all__ = ["init_model_dir"]


def init_model_dir(init_checkpoint: str, model_dir: str) -> str:
    """Copies `.../checkpoint_<step>` into `model_dir` with its data position reset; returns
    the copy's path. Refuses to overwrite a model directory that already has checkpoints."""
    from moetx.trainer import checkpoints  # jax and Orbax: loaded only when copying

    src = os.path.abspath(init_checkpoint.rstrip("/") or "/")
    try:
        src_dir, step = checkpoints.resolve_checkpoint(src)
    except (FileNotFoundError, ValueError):
        src_dir, step = None, None
    if step is None or os.path.dirname(checkpoints.state_dir(src_dir, step)) != src:
        raise ValueError(f"--init_checkpoint={init_checkpoint!r} is not a moetx checkpoint; "
                         "expected a `checkpoint_<step>` directory with a `state` folder, e.g. "
                         "runs/demo_t5/checkpoint_400.")
    os.makedirs(model_dir, exist_ok=True)
    existing = checkpoints.latest_step(model_dir)
    if existing is not None:
        raise ValueError(f"{model_dir!r} already has checkpoint_{existing}; the trainer would "
                         "resume from it. Fix: choose a new --model_dir (or delete its "
                         "checkpoints).")
    dst = os.path.join(os.path.abspath(model_dir), os.path.basename(src))
    shutil.copytree(src, dst)
    meta = os.path.join(dst, "dataset", "metadata")
    if os.path.exists(meta):
        with open(meta, "w") as f:
            json.dump({"batches_consumed": 0}, f)
    _add_missing_state_fields(os.path.join(dst, "state"))
    return dst


def _add_missing_state_fields(state_dir: str) -> None:
    """Checkpoints written before TrainState gained `model_state` and `ema` lack them; the
    trainer's restore needs them, so the copy gets them (empty, as the trainer writes them for
    a stateless model without EMA)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.restore(state_dir)
    missing = [k for k in ("model_state", "ema") if k not in tree]
    if not missing:
        return
    for k in missing:
        tree[k] = {}
    tmp = state_dir + ".upgrade"
    checkpointer.save(tmp, tree)
    checkpointer.wait_until_finished()
    shutil.rmtree(state_dir)
    os.rename(tmp, state_dir)
