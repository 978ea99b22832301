"""Checkpoints with Orbax: `MODEL_DIR/checkpoint_<step>/{state,dataset}`.

* `state` holds the train state as a nested dict (`step`, `params`, `opt_state`), each array
  stored once with its global shape, so it restores onto any mesh (pass the target shardings).
* `dataset` holds the data iterator position as JSON.
* Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  run killed mid-save leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import flax.serialization
import gin
import jax
import orbax.checkpoint as ocp


class CheckpointDirError(ValueError):
    """The model directory cannot hold checkpoints."""


def check_writable(directory: str) -> None:
    """Fails early (before any training) if checkpoints could not be written to `directory`."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".moetx_write_test"):
            pass
    except OSError as e:
        raise CheckpointDirError(
            f"Model directory {directory!r} is not writable ({e.strerror or e}). Choose another "
            f"--gin.MODEL_DIR or fix its permissions.") from None


@gin.configurable
class Checkpointer:
    """Periodic, atomic, keep-N checkpointing of the train state and data position.

    Attributes:
      directory: the run's model directory.
      save_interval_steps: save when `step % save_interval_steps == 0` (and at the end).
      keep: how many checkpoints to keep (None keeps all).
    """

    def __init__(self, directory: str, save_interval_steps: int = 1000, keep: int | None = 3):
        if save_interval_steps <= 0:
            raise ValueError(f"save_interval_steps must be positive, got {save_interval_steps}.")
        check_writable(directory)
        self.directory = os.path.abspath(directory)
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, step_prefix="checkpoint", create=True,
            enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "dataset": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, data_state: dict) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            dataset=ocp.args.JsonSave(data_state)))
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` into the structure, dtypes and shardings of `abstract_state`
        (a tree of `jax.ShapeDtypeStruct` with `sharding`)."""
        target = flax.serialization.to_state_dict(abstract_state)
        # Checkpoints written before TrainState had `model_state`/`ema` lack those parts; when
        # the run keeps none (empty dicts, as every LM run does) they restore as empty.
        absent = [k for k in self._absent_parts(step, target) if target[k] == {}]
        target = {k: v for k, v in target.items() if k not in absent}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), dataset=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises several types for mismatched trees/shapes.
            raise ValueError(
                f"Could not restore checkpoint_{step} in {self.directory}: {e}. The checkpoint "
                f"does not match the configured model/optimizer; use another MODEL_DIR or the "
                f"same gin config it was written with.") from e
        state = flax.serialization.from_state_dict(
            abstract_state, {**restored["state"], **{k: {} for k in absent}})
        return state, dict(restored["dataset"] or {})

    def _absent_parts(self, step: int, target: dict) -> list[str]:
        """Top-level parts of `target` that checkpoint_<step>'s saved state does not have."""
        path = os.path.join(self.directory, f"checkpoint_{step}", "state")
        try:
            saved = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
        except Exception:  # Unreadable metadata: let restore report the real problem.
            return []
        return [k for k in target if k not in saved]

    def close(self) -> None:
        self._manager.close()


def latest_step(directory: str) -> int | None:
    """The newest complete `checkpoint_<step>` in `directory` (temporary dirs are ignored)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Model directory {directory!r} does not exist.")
    steps = []
    for name in os.listdir(directory):
        m = re.fullmatch(r"checkpoint_(\d+)", name)
        if m and os.path.isdir(os.path.join(directory, name, "state")):
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def _restore_partial(directory: str, step: int | None, target: dict[str, Any], what: str
                     ) -> tuple[dict[str, Any], int]:
    """The top-level parts of `target` (state dicts of abstract arrays) restored from
    `checkpoint_<step>` (latest when None) onto their shardings; `what` names them in errors."""
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint_<step> in {directory!r}; train first.")
    path = os.path.join(os.path.abspath(directory), f"checkpoint_{step}", "state")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist.")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # Mismatched trees or shapes surface as several exception types.
        raise ValueError(f"Could not restore {what} from {path}: {e}") from e
    return restored, step


def restore_params(directory: str, step: int | None, abstract_params: Any) -> tuple[Any, int]:
    """Restores only the parameters of `checkpoint_<step>` (latest when None) onto the
    shardings of `abstract_params`, whatever optimizer wrote it (for eval and infer)."""
    target = {"params": flax.serialization.to_state_dict(abstract_params)}
    restored, step = _restore_partial(directory, step, target, "params")
    return flax.serialization.from_state_dict(abstract_params, restored["params"]), step


def restore_subtrees(directory: str, step: int | None, abstract: dict[str, Any]
                     ) -> tuple[dict[str, Any], int]:
    """Restores the named top-level parts of the train state (e.g. `params`, `model_state`,
    `ema`) of `checkpoint_<step>` (latest when None) onto the shardings of `abstract`."""
    target = {k: flax.serialization.to_state_dict(v) for k, v in abstract.items()}
    restored, step = _restore_partial(directory, step, target, str(sorted(abstract)))
    return {k: flax.serialization.from_state_dict(v, restored[k])
            for k, v in abstract.items()}, step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
