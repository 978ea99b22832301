"""Restoring parameters from another checkpoint with an assignment map, onto any mesh.

An assignment map is a list of `(regex, replacement)` pairs over '/'-joined parameter names
(`encoder/layers_0/mlp/wi_0/kernel`), tried in order as in T5X's `RestoreCheckpointConfig`:

* The first regex that fully matches a *target* name decides where it comes from:
  `replacement` (a `re` template, `\\1` refers to groups) names the source parameter; None
  means "not restored": the target keeps its fresh initialisation.
* A regex with replacement None also marks the *source* names it fully matches as
  intentionally dropped.
* Names no regex matches map to themselves.

Strict mode requires an exact correspondence: every target parameter not mapped to None is found
in the source with the right shape, and every source parameter is used or dropped. Otherwise
`restore_params` raises a `ConversionError` whose message is the diff (missing, unused and
wrong-shape names with their shapes). Non-strict mode restores what matches, keeps the fresh
initialisation for the rest, and returns (and logs) the same diff as a `RestoreReport`.

The source is a moetx model directory / `checkpoint_<step>` (Orbax) or a T5X checkpoint (legacy
msgpack + tensorstore, or Orbax-era), told apart by `load_params`. The target is a tree of
`jax.ShapeDtypeStruct` with shardings (e.g. `Trainer.abstract_state_with_shardings().params`),
so the restored arrays land sharded on whatever mesh the target uses.

`InitFromCheckpoint` wires this into training: `train.init_from = @InitFromCheckpoint()` starts
a new run (no checkpoint in MODEL_DIR yet) from another checkpoint's parameters, optionally
upcycled from dense to MoE, with a fresh optimizer state and step 0 (or, with `continue_step`,
the source's step and, when it matches, its optimizer state, as T5X fine-tuning does). A
parameter whose shape
depends on the input size (CoAtNet's relative-position tables) can be resized to the new run's
shape by the resizers the model declares (`parameter_resizers`, see `resize_parameters`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import numpy as np

from moetx.util import trees
from moetx.lm import scan
from moetx.convert import formats
from moetx.convert.errors import ConversionError, listing, shape_str

log = logging.getLogger(__name__)

AssignmentMap = Sequence[tuple[str, "str | None"]]
# fn(source array, target shape) -> the array at the target shape.
Resizer = Callable[[np.ndarray, tuple[int, ...]], Any]


# ------------------------------------------------------------------------------------ source


def source_format(path: str) -> str:
    """'moetx' for a moetx model / checkpoint directory, 't5x' for a T5X checkpoint."""
    try:
        state = formats.moetx_state_dir(path)
    except FileNotFoundError:
        return "t5x"
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().metadata(state).item_metadata.tree
    return "moetx" if isinstance(tree, Mapping) and {"step", "params"} <= set(tree) else "t5x"


def _read(path: str, step: int | None = None):
    """The `formats.Checkpoint` (no optimizer state) of a moetx or T5X checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if source_format(path) == "moetx":
        return formats.read_moetx(path, load_optimizer=False, step=step)
    return formats.read_t5x(path, load_optimizer=False)


def _flat_numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flat or nested tree -> {'/'-joined name: numpy array}."""
    return {k: np.asarray(v) for k, v in trees.flatten(tree).items()}


def load_params(path: str, step: int | None = None) -> dict[str, np.ndarray]:
    """The flat {name: numpy array} parameters of a moetx or T5X checkpoint (no optimizer)."""
    return _flat_numpy(_read(path, step).params)


# ------------------------------------------------------------------------------------ mapping


@dataclasses.dataclass
class RestoreReport:
    """What an assignment-map restore did, per target / source name.

    Attributes:
      restored: {target name: source name}.
      from_init: target names kept at their initialisation (mapped to None, or, non-strict,
        missing or wrong-shape).
      missing: {target name: (source name it was looked up as, expected shape)}.
      mismatched: {target name: (source name, expected shape, found shape)}.
      unused: {source name: shape} neither restored nor dropped.
      dropped: source names a None entry dropped.
    """

    restored: dict[str, str] = dataclasses.field(default_factory=dict)
    from_init: list[str] = dataclasses.field(default_factory=list)
    missing: dict[str, tuple[str, tuple]] = dataclasses.field(default_factory=dict)
    mismatched: dict[str, tuple[str, tuple, tuple]] = dataclasses.field(default_factory=dict)
    unused: dict[str, tuple] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.mismatched or self.unused)

    def diff(self) -> str:
        lines = [f"restored {len(self.restored)} parameter(s); {len(self.from_init)} kept their "
                 f"initialisation; {len(self.dropped)} source parameter(s) dropped by the map"]
        lines += listing("target parameter(s) missing from the source", {
            t: f"looked up as {s!r}, expected {shape_str(shape)}"
            for t, (s, shape) in self.missing.items()})
        lines += listing("wrong shape(s)", {
            t: f"from {s!r}: expected {shape_str(e)}, found {shape_str(f)}"
            for t, (s, e, f) in self.mismatched.items()})
        lines += listing("unused source parameter(s)", {
            s: shape_str(shape) for s, shape in self.unused.items()})
        return "\n".join(lines)


def map_names(target_names: Sequence[str], assignment_map: AssignmentMap
              ) -> tuple[dict[str, str | None], list[tuple[re.Pattern, str | None]]]:
    """{target name: source name or None} under `assignment_map` (see the module docstring)."""
    compiled = []
    for entry in assignment_map:
        if len(entry) != 2:
            raise ValueError(f"assignment_map entries are (regex, replacement or None) pairs, "
                             f"found {entry!r}.")
        pattern, repl = entry
        try:
            compiled.append((re.compile(pattern), repl))
        except re.error as e:
            raise ValueError(f"assignment_map regex {pattern!r} is invalid: {e}.") from None
    out: dict[str, str | None] = {}
    for name in target_names:
        out[name] = name
        for rx, repl in compiled:
            m = rx.fullmatch(name)
            if m:
                out[name] = None if repl is None else m.expand(repl)
                break
    return out, compiled


def plan_restore(source_shapes: Mapping[str, tuple], target_shapes: Mapping[str, tuple],
                 assignment_map: AssignmentMap = ()) -> RestoreReport:
    """The restore `assignment_map` implies, checked name by name and shape by shape."""
    mapping, compiled = map_names(list(target_shapes), assignment_map)
    report = RestoreReport()
    used: set[str] = set()
    for t, s in mapping.items():
        want = tuple(target_shapes[t])
        if s is None:
            report.from_init.append(t)
        elif s not in source_shapes:
            report.missing[t] = (s, want)
        elif tuple(source_shapes[s]) != want:
            report.mismatched[t] = (s, want, tuple(source_shapes[s]))
            used.add(s)
        else:
            report.restored[t] = s
            used.add(s)
    drops = [rx for rx, repl in compiled if repl is None]
    for s, shape in source_shapes.items():
        if s in used:
            continue
        if any(rx.fullmatch(s) for rx in drops):
            report.dropped.append(s)
        else:
            report.unused[s] = tuple(shape)
    return report


def restore_params(source: Mapping[str, Any] | str, abstract_params: Any,
                   init_params: Any = None, assignment_map: AssignmentMap = (),
                   strict: bool = True) -> tuple[Any, RestoreReport]:
    """Restores `source` into the structure, dtypes and shardings of `abstract_params`.

    Args:
      source: a checkpoint path (moetx or T5X) or a flat / nested tree of arrays.
      abstract_params: the target tree of `jax.ShapeDtypeStruct` (with `.sharding` to place the
        result on a mesh; without, arrays stay on the default device).
      init_params: a tree like the target holding the values of parameters not restored (fresh
        initialisation); needed whenever any parameter is not restored.
      assignment_map: (regex, replacement or None) pairs, see the module docstring.
      strict: raise unless the correspondence is exact; else restore what matches.
    Returns:
      (params as a tree like `abstract_params` of jax arrays, RestoreReport).
    Raises:
      ConversionError: strict and the map leaves missing, unused or wrong-shape names, or a
        parameter would need `init_params` that was not given. Its message is the diff.
    """
    if isinstance(source, str):
        source = load_params(source)
    flat_src = trees.flatten(source)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    names = [_leaf_name(path) for path, _ in leaves]
    targets = dict(zip(names, (x for _, x in leaves)))
    report = plan_restore({k: np.shape(v) for k, v in flat_src.items()},
                          {k: tuple(v.shape) for k, v in targets.items()}, assignment_map)
    if strict and not report.exact:
        raise ConversionError(
            "Strict restore: the source does not match the target under the assignment map.\n"
            + report.diff(), missing={t: e for t, (_, e) in report.missing.items()},
            mismatched={t: (e, f) for t, (_, e, f) in report.mismatched.items()},
            unexpected=report.unused,
            fix="add assignment_map entries (regex -> source name, or None to keep the "
                "initialisation / drop a source parameter), or restore with strict=False.")
    if not strict:
        report.from_init += list(report.missing) + list(report.mismatched)
    flat_init = None
    if report.from_init:
        if init_params is None:
            raise ConversionError(
                f"{len(report.from_init)} parameter(s) are not restored but no init_params were "
                "given to fill them: " + ", ".join(sorted(report.from_init)[:8]),
                fix="pass init_params (e.g. the fresh train state's params).")
        init_leaves = jax.tree_util.tree_leaves(init_params)
        flat_init = dict(zip(names, init_leaves))
    out = []
    for name in names:
        x = targets[name]
        value = (flat_src[report.restored[name]] if name in report.restored
                 else flat_init[name])
        out.append(_place(value, x))
    if not strict and not report.exact:
        log.warning("Non-strict restore:\n%s", report.diff())
        print("moetx: non-strict restore:\n" + report.diff(), file=sys.stderr, flush=True)
    return jax.tree_util.tree_unflatten(treedef, out), report


def _leaf_name(path: Sequence[Any]) -> str:
    """'/'-joined name of a pytree leaf from its `tree_flatten_with_path` key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _place(value: Any, target: Any) -> jax.Array:
    """`value` as a jax array with the target's dtype and (if any) sharding."""
    sharding = getattr(target, "sharding", None)
    if isinstance(value, jax.Array) and sharding is not None and value.sharding == sharding \
            and value.dtype == target.dtype:
        return value
    arr = np.asarray(jax.device_get(value)).astype(target.dtype)
    if sharding is None:
        return jax.numpy.asarray(arr)
    # Every process passes the full array and keeps the shards its devices own.
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def resize_parameters(source: Mapping[str, Any], abstract_params: Any,
                      resizers: Mapping[str, Resizer], assignment_map: AssignmentMap = ()
                      ) -> tuple[dict[str, Any], list[str]]:
    """`source` (flat or nested) with the parameters the target holds at another shape resized
    to the target's shape by the model's resizers; returns (flat source, resized source names).

    `resizers` maps a regex over '/'-joined target names to `fn(source array, target shape)`
    (a model's `parameter_resizers()`). For every target parameter whose name matches a regex
    (`re.search`; the first that matches decides), whose source (after the assignment map)
    exists and whose shape differs from the target's, the source becomes `fn(source, target
    shape)`. Everything else is left for `restore_params` to match or report, including a
    resizer's result of the wrong shape.
    """
    compiled = []
    for pattern, fn in resizers.items():
        try:
            compiled.append((re.compile(pattern), fn))
        except re.error as e:
            raise ValueError(f"parameter resizer regex {pattern!r} is invalid: {e}.") from None
    flat = trees.flatten(source)
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    targets = {_leaf_name(path): x for path, x in leaves}
    mapping, _ = map_names(list(targets), assignment_map)
    resized = []
    for t, s in mapping.items():
        fn = next((fn for rx, fn in compiled if rx.search(t)), None)
        if fn is None or s is None or s not in flat:
            continue
        want = tuple(targets[t].shape)
        if tuple(np.shape(flat[s])) != want:
            flat[s] = fn(np.asarray(flat[s]), want)
            resized.append(s)
    return flat, resized


def model_resizers(model: Any) -> dict[str, Resizer]:
    """The model's `parameter_resizers()` ({regex: fn}); {} for a model without the method."""
    get = getattr(model, "parameter_resizers", None)
    return dict(get()) if get is not None else {}


# ------------------------------------------------------------------------------------ training


@gin.configurable
class InitFromCheckpoint:
    """Initial parameters for a new training run from another checkpoint.

    `train.init_from = @InitFromCheckpoint()` (with `import moetx.convert.restore` in the gin)
    is called only when MODEL_DIR has no checkpoint yet (a resumed run restores its own). By
    default the optimizer state stays fresh and the step 0.

    With `continue_step` the run starts at the source checkpoint's step, as T5X fine-tuning
    does (T5X and moetx checkpoints both record it), so `train.train_steps` (TRAIN_STEPS) is
    the absolute last step and `train.train_steps_relative` counts from the source's step; the
    learning-rate schedule goes on from that step too. The optimizer state is restored as well
    when the source is a moetx checkpoint whose parameters map one to one, by name and shape,
    onto the run's (no upcycling, renaming, resizing or fresh initialisation) and whose saved
    optimizer state has exactly the run's structure and shapes (the same optimizer and
    settings). Otherwise it starts fresh and the console says why; a T5X checkpoint's optimizer
    state (T5X's own `param_states` layout) is never mapped onto moetx's optax state.

    Attributes:
      path: a moetx model directory / checkpoint_<step> or a T5X checkpoint.
      assignment_map: (regex, replacement or None) pairs (module docstring).
      strict: require an exact correspondence (default) or restore what matches.
      upcycle: the source is the dense version of the (MoE) model being trained: its MLPs are
        tiled into each sparse layer's experts and the routers keep their fresh initialisation
        (Komatsuzaki et al.); the assignment map then applies to the upcycled tree.
      step: which moetx checkpoint_<step> (default latest).
      resize_position_tables: fine-tuning at another input size: parameters whose shape follows
        the input size (CoAtNet's relative-position bias tables, [2h-1, 2w-1, heads]) and whose
        source shape differs from the target's are resized to it by the resizers the trained
        model declares (`trainer.model.parameter_resizers()`, see `resize_parameters`; the
        image models resize the tables bilinearly) instead of being reported as wrong-shape.
        A model that declares none gets no resizing.
      restore_model_state: when both the run and a moetx source keep model state (batch-norm
        statistics), restore it too, under the same `strict` rule (names are not remapped).
        Otherwise, and for T5X sources, the run's fresh model state is kept.
      continue_step: start at the source's step (and restore its optimizer state when it
        matches) instead of step 0; see above.

    A weight EMA kept by the run starts from the restored parameters (and model state), not
    from the fresh initialisation the run was created with.
    """

    def __init__(self, path: str = gin.REQUIRED, assignment_map: AssignmentMap = (),
                 strict: bool = True, upcycle: bool = False, step: int | None = None,
                 resize_position_tables: bool = False, restore_model_state: bool = True,
                 continue_step: bool = False):
        self.path = path
        self.continue_step = bool(continue_step)
        self.assignment_map = [tuple(e) for e in assignment_map]
        self.strict = strict
        self.upcycle = upcycle
        self.step = step
        self.resize_position_tables = resize_position_tables
        self.restore_model_state = restore_model_state

    def __call__(self, trainer, state):
        """(Trainer, fresh TrainState) -> TrainState with restored params."""
        ckpt = _read(self.path, self.step)
        fresh = state.params
        # Layer stacks saved scanned or unscanned restore into either layout (moetx.lm.scan).
        source: Mapping[str, Any] = _flat_numpy(scan.match_layout(ckpt.params, fresh))
        if self.upcycle:
            from moetx.convert.upcycle import upcycle_params

            template = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), fresh)
            source = _flat_numpy(scan.match_layout(upcycle_params(
                scan.unscan_params(ckpt.params), scan.unscan_params(template)), fresh))
        abstract = trainer.abstract_state_with_shardings().params
        resized = []
        if self.resize_position_tables:
            source, resized = resize_parameters(source, abstract, model_resizers(trainer.model),
                                                self.assignment_map)
        params, report = restore_params(source, abstract, fresh, self.assignment_map,
                                        self.strict)
        model_state, ms_note = state.model_state, ""
        if self.restore_model_state and jax.tree_util.tree_leaves(state.model_state):
            if jax.tree_util.tree_leaves(ckpt.model_state):
                model_state, ms_report = restore_params(
                    ckpt.model_state, trainer.abstract_state_with_shardings().model_state,
                    state.model_state, strict=self.strict)
                ms_note = f"; model state: {ms_report.diff().splitlines()[0]}"
            else:
                ms_note = "; model state: none in the source, kept fresh"
        print(f"moetx: initialised from {self.path}"
              f"{' (upcycled)' if self.upcycle else ''}"
              f"{f' ({len(resized)} position table(s) resized)' if resized else ''}: "
              f"{report.diff().splitlines()[0]}{ms_note}", file=sys.stderr, flush=True)
        ema = state.ema
        if ema:
            ema = {"params": params, "model_state": model_state if ema["model_state"] else {}}
        state = state.replace(params=params, model_state=model_state, ema=ema)
        if self.continue_step:
            state = self._continue(trainer, state, ckpt.step,
                                   one_to_one=not (self.upcycle or resized or report.from_init)
                                   and all(t == s for t, s in report.restored.items()))
        return state

    def _continue(self, trainer, state, step: int, one_to_one: bool):
        """`state` at the source's `step`, with the source's optimizer state when it is a
        moetx checkpoint that matches the run (`one_to_one`: every parameter came from the
        source parameter of the same name)."""
        from moetx.trainer import checkpoints

        abstract = trainer.abstract_state_with_shardings()
        opt_state, why = state.opt_state, ""
        if source_format(self.path) != "moetx":
            why = "a T5X checkpoint's optimizer state is not mapped onto moetx's"
        elif not one_to_one:
            why = "the parameters are not restored one to one by name"
        else:
            import orbax.checkpoint as ocp

            model_dir, src_step = checkpoints.resolve_checkpoint(self.path, self.step)
            saved = ocp.PyTreeCheckpointer().metadata(checkpoints.state_dir(
                model_dir, src_step)).item_metadata.tree
            difference = (None if isinstance(saved, Mapping) and "opt_state" in saved else
                          "the source has no optimizer state")
            if difference is None:
                difference = checkpoints.describe_difference(
                    saved["opt_state"], _state_dict(abstract.opt_state))
            if difference is None:
                restored, _ = checkpoints.restore_subtrees(model_dir, src_step,
                                                           {"opt_state": abstract.opt_state})
                opt_state = restored["opt_state"]
            else:
                why = f"the run's optimizer differs ({difference})"
        step_array = _place(np.asarray(step, np.int32), abstract.step)
        print(f"moetx: continuing at step {step} of {self.path} with "
              f"{'its optimizer state' if not why else f'a fresh optimizer state ({why})'}.",
              file=sys.stderr, flush=True)
        return state.replace(step=step_array, opt_state=opt_state)


def _state_dict(tree: Any) -> Any:
    """`tree` as the nested dicts Orbax saves it as (flax's state-dict form)."""
    import flax

    return flax.serialization.to_state_dict(tree)


__all__ = ["AssignmentMap", "InitFromCheckpoint", "Resizer", "RestoreReport", "load_params",
           "map_names", "model_resizers", "plan_restore", "resize_parameters", "restore_params",
           "source_format"]
