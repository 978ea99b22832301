"""Checkpoints with Orbax: `MODEL_DIR/checkpoint_<step>/{state,dataset}`.

* `state` holds the train state as a nested dict (`step`, `params`, `opt_state`), each array
  stored once with its global shape, so it restores onto any mesh (pass the target shardings).
* `dataset` holds the data iterator position as JSON.
* Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  run killed mid-save leaves the previous checkpoint as the latest valid one.

Integrity: after a checkpoint is complete, `MANIFEST` (`checkpoint_<step>/moetx_manifest.json`)
is written last, listing every file of the checkpoint with its size and CRC-32. `verify`
checks a checkpoint against it. On resume, `Checkpointer.latest_intact_step` takes the newest
checkpoint that verifies; one that does not (a truncated or overwritten array file, deleted
metadata, an empty directory) is renamed `checkpoint_<step>.corrupt-<time>` (never deleted) with
a one-line warning, and the next newest is tried. A checkpoint without a manifest (written
before manifests, or by another tool) is accepted as unverified when it has its `state` folder.

`resolve_checkpoint` (which evaluation, inference, conversion and the restore hook go through)
refuses a checkpoint that fails its manifest's size check with one line.

Resources: a save that fails because the disk is full or the directory cannot be written
removes its partial (temporary) directory and raises `CheckpointWriteError`, one line, with the
earlier checkpoints untouched; before each save, a disk with less free space than twice the last
checkpoint's size gets a one-time warning. A run that rewinds (`moetx.trainer.divergence`)
moves the checkpoints after its target aside as `checkpoint_<step>.rewound-<time>`.

`resolve_checkpoint` and `state_dir` are the one place that knows how checkpoints sit in a model
directory. `restore_for_model` is the one way to load a checkpoint for evaluation or prediction:
"restore these parameters (and model state) for this model on this mesh", with no optimizer and
no Trainer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from typing import Any, Mapping

import flax.serialization
import gin
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moetx.trainer import model as model_lib, partitioning


class CheckpointDirError(ValueError):
    """The model directory cannot hold checkpoints."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, directory not writable)."""


# What a failed write says, in TensorStore's and the OS's words, and how moetx says it.
_WRITE_FAILURES = (
    (errno.ENOSPC, "No space left on device", "the disk is full"),
    (errno.EDQUOT, "Disk quota exceeded", "the disk quota is exceeded"),
    (errno.EROFS, "Read-only file system", "the file system is read-only"),
    (errno.EACCES, "Permission denied", "permission denied"),
)


def write_failure(e: BaseException) -> str | None:
    """What stopped a checkpoint write, when `e` is a disk-full or permission error (as an
    OSError or as the text of the error Orbax/TensorStore raise), else None."""
    for code, text, why in _WRITE_FAILURES:
        if (isinstance(e, OSError) and e.errno == code) or text in str(e) \
                or f"os_error_code='{code}'" in str(e):
            return why
    return None


def remove_partial(directory: str, step: int) -> bool:
    """Removes what an interrupted save of `step` left (Orbax's temporary directory); returns
    whether there was any. A complete `checkpoint_<step>` is never touched."""
    removed = False
    for name in os.listdir(directory):
        if name.startswith(f"checkpoint_{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed = True
    return removed


def checkpoint_size(directory: str, step: int) -> int:
    """The bytes of `checkpoint_<step>` (from its manifest when it has one)."""
    ckpt_dir = os.path.join(os.path.abspath(directory), f"checkpoint_{step}")
    try:
        with open(os.path.join(ckpt_dir, MANIFEST)) as f:
            return sum(size for size, _ in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(os.path.getsize(p) for p in _checkpoint_files(ckpt_dir).values())


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
        self._warned_space = False
        _write_small_arrays_whole()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "dataset": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint that passes `verify`; the ones above it that fail are moved
        aside (`move_aside`) with a warning. Only process 0 moves; the others wait for it."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        moved = False
        found = None
        for step in steps:
            problem = verify(self.directory, step)
            if problem is None:
                found = step
                break
            if jax.process_index() == 0:
                where = move_aside(self.directory, step)
                print(f"moetx: warning: checkpoint_{step} is damaged ({problem}); moved to "
                      f"{os.path.basename(where)}, trying the one before.", file=sys.stderr,
                      flush=True)
            moved = True
        if moved:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("moetx_checkpoint_move_aside")
            self._manager.reload()
            if found is None and steps:
                raise ValueError(f"No intact checkpoint in {self.directory}: every one failed "
                                 f"its check and was moved aside (checkpoint_*.corrupt-*).")
        return found

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Writes `checkpoint_<step>` (then its manifest). When the disk is full or the
        directory cannot be written, removes the partial checkpoint and raises
        `CheckpointWriteError` (one line); the previous checkpoints are untouched. Warns first
        when the free space is less than twice the last checkpoint's size."""
        if step in self._manager.all_steps():
            return
        if jax.process_index() == 0:
            self._warn_if_short_of_space()
        # Orbax logs a failed write with a traceback from its writer thread before raising; the
        # error raised here says it in one line instead.
        try:
            with _quiet_orbax(logging.CRITICAL):
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                    dataset=ocp.args.JsonSave(data_state)))
                self._manager.wait_until_finished()
        except Exception as e:  # Orbax and TensorStore report OS errors as several types.
            why = write_failure(e)
            if why is None:
                raise
            removed = remove_partial(self.directory, step)
            previous = [s for s in self._manager.all_steps() if s != step]
            kept = (f"checkpoint_{max(previous)} (the newest before it) is intact" if previous
                    else "there is no earlier checkpoint")
            raise CheckpointWriteError(
                f"Could not write checkpoint_{step} in {self.directory}: {why}. "
                f"{'The partial checkpoint was removed; ' if removed else ''}{kept}. Free space "
                f"(or fix the directory), then run the same command again to resume.") from None
        if jax.process_index() == 0:
            try:
                write_manifest(self.directory, step)
            except OSError as e:
                raise CheckpointWriteError(
                    f"checkpoint_{step} in {self.directory} was written but its manifest could "
                    f"not be: {write_failure(e) or e.strerror or e}. It will be used unverified; "
                    f"free space, then run the same command again to resume.") from None

    def _warn_if_short_of_space(self) -> None:
        """One warning per run when the disk has less free space than two checkpoints."""
        if self._warned_space:
            return
        previous = self._manager.all_steps()
        if not previous:
            return
        size = checkpoint_size(self.directory, max(previous))
        free = shutil.disk_usage(self.directory).free
        if size and free < 2 * size:
            self._warned_space = True
            print(f"moetx: warning: {free / 2**20:,.1f} MiB free in {self.directory}, and the "
                  f"last checkpoint took {size / 2**20:,.1f} MiB: the next saves may fail. Free "
                  f"space or lower train.keep_checkpoints.", file=sys.stderr, flush=True)

    def set_aside_after(self, step: int) -> list[str]:
        """Moves the checkpoints after `step` aside (`checkpoint_<s>.rewound-<time>`), e.g.
        when a run goes back to `step`; returns their new paths. Process 0 moves, the others
        wait for it."""
        moved = []
        for s in sorted(self._manager.all_steps()):
            if s > step and jax.process_index() == 0:
                moved.append(move_aside(self.directory, s, "rewound"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("moetx_checkpoint_set_aside")
        self._manager.reload()
        return moved

    def latest_intact_step_before(self, step: int) -> int | None:
        """The newest intact checkpoint with a step below `step` (damaged ones are moved aside,
        as by `latest_intact_step`)."""
        self.set_aside_after(step - 1)
        return self.latest_intact_step()

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
            saved = _saved_tree(state_dir(self.directory, step))
            difference = describe_difference(saved, target) if saved is not None else None
            if difference:
                raise ValueError(
                    f"checkpoint_{step} in {self.directory} was written by another model or "
                    f"optimizer: {difference}. Use another MODEL_DIR, or the gin config it was "
                    f"written with.") from e
            first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"Could not restore checkpoint_{step} in {self.directory} "
                             f"({type(e).__name__}: {first}).") from e
        state = flax.serialization.from_state_dict(
            abstract_state, {**restored["state"], **{k: {} for k in absent}})
        return state, dict(restored["dataset"] or {})

    def _absent_parts(self, step: int, target: dict) -> list[str]:
        """Top-level parts of `target` that checkpoint_<step>'s saved state does not have."""
        saved = _saved_tree(state_dir(self.directory, step))
        if saved is None:  # Unreadable metadata: let restore report the real problem.
            return []
        return [k for k in target if k not in saved]

    def close(self) -> None:
        self._manager.close()


MANIFEST = "moetx_manifest.json"
_CHUNK = 1 << 22


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checkpoint_files(ckpt_dir: str) -> dict[str, str]:
    """{relative path: absolute path} of every file of a checkpoint but its manifest."""
    out = {}
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                out[rel] = full
    return out


def write_manifest(directory: str, step: int) -> str:
    """Writes `checkpoint_<step>/moetx_manifest.json` ({file: [size, crc32]}), atomically."""
    ckpt_dir = os.path.join(os.path.abspath(directory), f"checkpoint_{step}")
    files = {rel: [os.path.getsize(full), _crc32(full)]
             for rel, full in sorted(_checkpoint_files(ckpt_dir).items())}
    path = os.path.join(ckpt_dir, MANIFEST)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": 1, "step": step, "files": files}, f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def verify(directory: str, step: int, checksums: bool = True) -> str | None:
    """None when `checkpoint_<step>` of `directory` is intact, else what is wrong (one line):
    a file of its manifest missing, of another size or (with `checksums`) another CRC-32; or,
    without a manifest, no `state` folder."""
    ckpt_dir = os.path.join(os.path.abspath(directory), f"checkpoint_{step}")
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.exists(path):
        if not os.path.isdir(os.path.join(ckpt_dir, "state")):
            return "no manifest and no train state"
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for rel, (size, crc) in files.items():
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full):,} bytes, {size:,} were written"
        if checksums and _crc32(full) != crc:
            return f"{rel} has changed since it was written (CRC-32 mismatch)"
    return None


def move_aside(directory: str, step: int, why: str = "corrupt") -> str:
    """Renames `checkpoint_<step>` to `checkpoint_<step>.<why>-<UTC time>`; returns the new
    path."""
    src = os.path.join(os.path.abspath(directory), f"checkpoint_{step}")
    dst = f"{src}.{why}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    n = 1
    while os.path.exists(dst):
        dst = f"{dst.split('~')[0]}~{n}"
        n += 1
    os.rename(src, dst)
    return dst


def check_all(directory: str, checksums: bool = True) -> list[tuple[str, str]]:
    """[(checkpoint directory name, state)] of every checkpoint in `directory`, newest first;
    state is 'intact', 'unverified (no manifest)', 'damaged: <why>' or, for the ones moved
    aside earlier, 'moved aside'."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Model directory {directory!r} does not exist.")
    rows = []
    for name in os.listdir(directory):
        m = re.fullmatch(r"checkpoint_(\d+)(\.(?:corrupt|rewound)-.*)?", name)
        if not m or not os.path.isdir(os.path.join(directory, name)):
            continue
        step = int(m.group(1))
        if m.group(2):
            rows.append((step, 1, name, "moved aside"))
            continue
        problem = verify(directory, step, checksums)
        has_manifest = os.path.exists(os.path.join(directory, name, MANIFEST))
        state = ("intact" if has_manifest else "unverified (no manifest)") if problem is None \
            else f"damaged: {problem}"
        rows.append((step, 0, name, state))
    return [(name, state) for _, _, name, state in sorted(rows, reverse=True)]


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


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """`(model_dir, step)` named by `path`: a `.../checkpoint_<step>` directory (whose step
    must agree with `step` when both are given), or a model directory (its `checkpoint_<step>`
    when `step` is given, else its newest complete checkpoint).

    The one place that knows how checkpoints sit in a model directory; raises
    FileNotFoundError naming what was expected.
    """
    path = os.path.abspath(path.rstrip("/") or "/")
    m = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(path))
    if m:
        if step is not None and int(m.group(1)) != step:
            raise ValueError(f"{path} is checkpoint {m.group(1)}, but step {step} was asked for.")
        if not os.path.isdir(os.path.join(path, "state")):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no 'state' folder).")
        _refuse_damaged(os.path.dirname(path), int(m.group(1)))
        return os.path.dirname(path), int(m.group(1))
    if step is None:
        step = latest_step(path)
        if step is None:
            raise FileNotFoundError(f"No checkpoint_<step> in {path!r}; expected a moetx model "
                                    "directory with a checkpoint, or a checkpoint_<step> "
                                    "directory.")
    if not os.path.isdir(state_dir(path, step)):
        raise FileNotFoundError(f"{state_dir(path, step)} does not exist.")
    _refuse_damaged(path, step)
    return path, step


def _refuse_damaged(model_dir: str, step: int) -> None:
    """Raises ValueError when checkpoint `step` fails its manifest's size check (the fast part
    of `verify`; a resumed run also checks the CRC-32s)."""
    problem = verify(model_dir, step, checksums=False)
    if problem is not None:
        raise ValueError(f"checkpoint_{step} in {model_dir} is damaged ({problem}); "
                         f"`moetx-check-checkpoint {model_dir}` lists the intact ones.")


def state_dir(model_dir: str, step: int) -> str:
    """Where checkpoint `step` of `model_dir` keeps its train state (an Orbax PyTree)."""
    return os.path.join(os.path.abspath(model_dir), f"checkpoint_{step}", "state")


def _restore_partial(directory: str, step: int | None, target: dict[str, Any], what: str
                     ) -> tuple[dict[str, Any], int]:
    """The top-level parts of `target` (state dicts of abstract arrays) restored from the
    checkpoint `resolve_checkpoint(directory, step)` names onto their shardings; `what` names
    them in errors."""
    directory, step = resolve_checkpoint(directory, step)
    path = state_dir(directory, step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # Mismatched trees or shapes surface as several exception types.
        raise ValueError(f"Could not restore {what} from {path}: {e}") from e
    return restored, step


def restore_params(directory: str, step: int | None, abstract_params: Any) -> tuple[Any, int]:
    """Restores only the parameters of `checkpoint_<step>` (latest when None) onto the
    shardings of `abstract_params`, whatever optimizer wrote it."""
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


def abstract_variables(model: Any, mesh: Mesh, rules: partitioning.LogicalRules,
                       input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[Any, dict[str, Any]]:
    """`(params, model_state)` of `model` as trees of `jax.ShapeDtypeStruct` that carry their
    shardings on `mesh`, without allocating anything.

    Shapes come from `jax.eval_shape(model.get_initial_variables)` at `input_shapes`;
    parameters are sharded by their logical axes under `rules` (a dimension its mesh axes do
    not divide is replicated), the model state (`{collection: tree}` for each of the model's
    `state_collections`, `{}` for none) is replicated, as the trainer keeps it.
    """
    axes, params, state = model_lib.abstract_variables(model, input_shapes)
    shardings = partitioning.logical_shardings(axes, mesh, tuple(rules), params)
    replicated = NamedSharding(mesh, PartitionSpec())
    model_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    return abstract_with_shardings(params, shardings), model_state


def restore_for_model(model: Any, checkpoint: str, *, mesh: Mesh,
                      rules: partitioning.LogicalRules,
                      input_shapes: Mapping[str, tuple[int, ...]], step: int | None = None,
                      use_ema: bool = False) -> tuple[Any, dict[str, Any], int]:
    """Restores what evaluating or predicting with `model` needs from a checkpoint, onto `mesh`.

    No optimizer state is read (whatever optimizer wrote the checkpoint) and no Trainer is
    built: the target is `abstract_variables(model, mesh, rules, input_shapes)`.

    Args:
      model: a model wrapper (`moetx.trainer.model.Model`).
      checkpoint: a model directory (its newest checkpoint, or `checkpoint_<step>`) or a
        `checkpoint_<step>` directory; see `resolve_checkpoint`.
      mesh, rules: where the arrays land and how parameters are sharded.
      input_shapes: batch feature shapes to trace `get_initial_variables` with.
      step: which checkpoint of a model directory (default the newest).
      use_ema: restore the exponential moving average of the weights the run kept
        (`train.ema_decay`) instead of the live ones; when the EMA does not cover the model
        state, the live model state is used, as training-time evaluation does.
    Returns:
      `(params, model_state, step)`; `model_state` is `{collection: tree}` for a model with
      `state_collections`, else `{}`.
    Raises:
      FileNotFoundError: no such checkpoint. ValueError: the checkpoint does not fit the model
      (or keeps no EMA when `use_ema`).
    """
    model_dir, step = resolve_checkpoint(checkpoint, step)
    params, model_state = abstract_variables(model, mesh, rules, input_shapes)
    if not use_ema and not model_state:
        return restore_params(model_dir, step, params)[0], {}, step
    if not use_ema:
        parts, _ = restore_subtrees(model_dir, step, {"params": params,
                                                      "model_state": model_state})
        return parts["params"], parts["model_state"], step
    saved = _saved_tree(state_dir(model_dir, step))
    ema_state = model_state
    if model_state and saved is not None and "ema" in saved \
            and not jax.tree_util.tree_leaves(saved["ema"].get("model_state") or {}):
        ema_state = {}  # The run's EMA covers the weights only (ema_model_state=False).
    target = {"ema": {"params": params, "model_state": ema_state}}
    if model_state and not ema_state:
        target["model_state"] = model_state
    try:
        parts, _ = restore_subtrees(model_dir, step, target)
    except ValueError as e:
        raise ValueError(f"{e}\nDid the run keep an EMA (train.ema_decay)? If not, drop "
                         f"use_ema.") from None
    return (parts["ema"]["params"], parts["ema"]["model_state"] or parts.get("model_state", {}),
            step)


def describe_difference(saved: Any, target: Any) -> str | None:
    """How the array tree `saved` (checkpoint metadata) differs from `target` (abstract
    arrays), in a few words: the first differing leaf and the number of differences, or None
    when their paths and shapes agree."""
    def leaves(tree):
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p):
                tuple(getattr(x, "shape", ()) or ())
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def order(paths):  # parameters first: they name the model's difference best
        return sorted(paths, key=lambda p: (not p.startswith("params/"), p))

    have, want = leaves(saved), leaves(target)
    problems = []
    for path in order(want.keys() - have.keys()):
        problems.append(f"{path} is not in the checkpoint")
    for path in order(have.keys() - want.keys()):
        problems.append(f"the checkpoint has {path}, the configured model does not")
    for path in order(want.keys() & have.keys()):
        if want[path] != have[path]:
            problems.append(f"{path} has shape {have[path]} in the checkpoint, "
                            f"{want[path]} in the configured model")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
    return problems[0] + more


def _saved_tree(path: str) -> Mapping[str, Any] | None:
    """The saved tree structure (array metadata at the leaves) of an Orbax state directory, or
    None when it cannot be read (restore then reports the real problem)."""
    try:
        with _quiet_orbax(logging.ERROR):  # it warns that checkpoints of managers lack a file
            tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    except Exception:  # Unreadable metadata.
        return None
    return tree if isinstance(tree, Mapping) else None


#: Below this many bytes per replica, an array replicated over devices is written whole by
#: one of them rather than split among all (see `_write_small_arrays_whole`).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _write_small_arrays_whole() -> None:
    """Orbax splits the writing of every replicated array among its replicas, each slicing out
    its part on device: one small XLA program per array shape and sharding, compiled at the
    run's first save (88 of them, 3.4 s, for a tiny MoE on 8 devices, more than its 30 steps
    took). Splitting pays off for large arrays only, so arrays whose part per replica would be
    under `MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` are written whole by one replica; larger ones
    are still split. What is written is the same either way. Orbax reads this setting from its
    process-wide handler registry, so it is set there (again if something replaced it)."""
    global _array_handler
    if _array_handler is None:
        _array_handler = ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
    if ocp.type_handlers.get_type_handler(jax.Array) is not _array_handler:
        with _quiet_orbax(logging.ERROR):  # it warns that the registration is overridden
            ocp.type_handlers.register_type_handler(jax.Array, _array_handler, override=True)


_array_handler = None


@contextlib.contextmanager
def _quiet_orbax(level: int):
    """Raises the level of the `absl` logger (which Orbax logs through) for a block."""
    logger = logging.getLogger("absl")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
