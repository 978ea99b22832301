"""Checkpoint conversion between T5X, moetx and Hugging Face, with sparse upcycling.

    python -m moetx.tools.convert --from t5x --to hf --model models/t5_1_1_small.gin \\
        t5x_run/checkpoint_1000000 hf_out
    python -m moetx.tools.convert --from hf --to moetx hf_llama_dir moetx_run   # --model: HF's
    python -m moetx.tools.convert --from moetx --to moetx --upcycle --model models/my_moe.gin \\
        dense_run moe_run                                 # dense -> MoE (Komatsuzaki et al.)

Formats:
  t5x    a T5X checkpoint directory `checkpoint_<step>` (legacy msgpack + tensorstore, or the
         Orbax-era layout), read and written by `moetx.tools.t5x_format`; DST is the
         `checkpoint_<step>` directory to create.
  moetx  a moetx model directory holding `checkpoint_<step>/{state,dataset}` (Orbax), what
         `moetx.trainer.train` resumes from and `eval`/`infer` restore; SRC may also name one
         `checkpoint_<step>` (else the latest is read); DST is the model directory to create.
  hf     a Hugging Face directory (`config.json` + safetensors) for T5ForConditionalGeneration,
         SwitchTransformersForConditionalGeneration, LlamaForCausalLM or MixtralForCausalLM
         (chosen from the moetx config: encoder-decoder or decoder-only, dense or MoE).

`--model` is a moetx gin file defining `MODEL` (searched in moetx's `gin/` directory too) or a
Hugging Face config (a directory holding config.json, or the json file). From `hf` it defaults to
SRC's own config.

Every conversion is strict: the source must hold exactly the model's parameters (names and
shapes), every target key is produced, and anything else fails with a `ConversionError` listing
the unexpected, missing and wrong-shape keys. Nothing is written until the whole checkpoint is
converted and checked, and DST appears only complete (written under a temporary name and renamed);
an existing DST is never touched.

Optimizer state: T5X's Adafactor slots (`v_row`, `v_col`, `v`; `m` only as the [1] placeholder
T5X keeps when momentum is off) and moetx's Adafactor state (`count`, `v_row`, `v_col`, `v` trees)
carry over both ways, checked against the shapes moetx's Adafactor gives the target model.
Hugging Face checkpoints hold none: converting a source that has optimizer state to `hf`, or one
whose state moetx's optimizer cannot hold (momentum, other factoring), needs
`--drop_optimizer_state`. A moetx checkpoint always holds a complete train state, so one without a
carried optimizer state gets the configured optimizer's fresh state (`optimizer.init(params)`).

`--dtype` casts the parameters (not the optimizer state). `--upcycle` reads SRC as the dense model
(`--dense_model`, by default `--model`'s config without MoE), tiles each sparse layer's experts from
its dense MLP, initialises fresh routers (`--seed`) and drops the optimizer state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moetx.trainer import xla_env  # noqa: E402  (jax-free; must run before jax is imported)

xla_env.configure_cpu_defaults()

if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy, so gin registers each configurable
    # once (as `moetx.tools.convert.*`).
    from moetx.tools.convert import console_main

    console_main()

import gin  # noqa: E402
import numpy as np  # noqa: E402

from moetx.tools import torch_env  # noqa: E402
from moetx.tools.hf import ConversionError, _check  # noqa: E402
from moetx.tools.hf.common import _unflatten  # noqa: E402

FORMATS = ("t5x", "moetx", "hf")
ADAFACTOR_SLOTS = ("v_row", "v_col", "v")
_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16"}


# ------------------------------------------------------------------------------------- model


@gin.configurable
def configured_model(model: Any = gin.REQUIRED) -> Any:
    """Returns the gin-built model (bound to `%MODEL` by `load_model`)."""
    return model


@dataclasses.dataclass
class ModelSpec:
    """A moetx model wrapper and, when it came from one, the Hugging Face config it mirrors."""

    model: Any
    hf_config: Any = None

    @property
    def config(self):
        return self.model.config


def model_from_config(cfg) -> Any:
    from moetx.lm import models

    return (models.EncoderDecoderModel(cfg) if cfg.num_encoder_layers
            else models.DecoderOnlyModel(cfg))


def hf_config_to_moetx(hf_cfg):
    """Any supported transformers config -> moetx TransformerConfig."""
    from moetx.tools import hf

    convert = {"t5": hf.hf_t5_config_to_moetx, "llama": hf.hf_llama_config_to_moetx,
               "switch_transformers": hf.hf_switch_config_to_moetx,
               "mixtral": hf.hf_mixtral_config_to_moetx}
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in convert:
        raise ValueError(f"Hugging Face model_type {model_type!r} has no moetx counterpart; "
                         f"supported: {sorted(convert)}.")
    return convert[model_type](hf_cfg)


def load_hf_config(path: str):
    torch_env.block_triton_after_tensorflow()
    import transformers

    if os.path.isfile(path):
        with open(path) as f:
            fields = json.load(f)
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type'; expected a Hugging Face config.json.")
        return transformers.AutoConfig.for_model(**fields)
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def load_model(spec: str, gin_bindings: Sequence[str] = (),
               gin_search_paths: Sequence[str] = ()) -> ModelSpec:
    """`spec`: a gin file defining MODEL (parsed into the current gin config; bindings apply on
    top), or a Hugging Face config directory / config.json."""
    if spec.endswith(".gin"):
        from moetx.trainer import cli

        search = list(gin_search_paths) + [cli.GIN_DIR, os.getcwd()]
        for p in search:
            gin.add_config_file_search_path(p)
        # gin logs an ERROR for every search path an include misses; try moetx's dirs first.
        prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
        prefixes.sort(key=lambda p: 0 if p in search else 1)
        path = spec if os.path.exists(spec) else next(
            (os.path.join(p, spec) for p in search if os.path.exists(os.path.join(p, spec))), None)
        if path is None:
            raise FileNotFoundError(f"gin file {spec!r} not found (searched: {search}).")
        gin.parse_config_files_and_bindings(
            [path], list(gin_bindings) + ["moetx.tools.convert.configured_model.model = %MODEL"],
            finalize_config=False)
        return ModelSpec(configured_model())
    if os.path.isdir(spec) or spec.endswith(".json"):
        hf_cfg = load_hf_config(spec)
        return ModelSpec(model_from_config(hf_config_to_moetx(hf_cfg)), hf_cfg)
    raise ValueError(f"--model {spec!r}: expected a gin file (*.gin) defining MODEL, or a Hugging "
                     "Face config (a directory holding config.json, or the json file).")


def _input_shapes(model) -> dict:
    if model.config.num_encoder_layers:
        return model.input_shapes(1, {"inputs": 8, "targets": 8})
    return model.input_shapes(1, 8)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}. Leaves are anything that is not a Mapping."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


@dataclasses.dataclass
class _Abstract:
    """What the model and its configured optimizer hold, without materialising anything."""

    params: dict[str, tuple]  # flat path -> shape
    param_axes: Any
    optimizer: Any
    opt_state: Any  # abstract optimizer state (jax.ShapeDtypeStruct leaves)


def _abstract(model) -> _Abstract:
    import flax.linen as nn
    import jax

    from moetx.trainer import optimizers, partitioning

    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0),
                                                               _input_shapes(model)))
    axes = partitioning.params_logical_axes(boxed["params"])
    params = nn.unbox(boxed["params"])
    optimizer = optimizers.make_optimizer(param_axes=axes)
    opt = jax.eval_shape(optimizer.tx.init, params)
    return _Abstract({k: tuple(v.shape) for k, v in _flatten(params).items()}, axes, optimizer,
                     opt)


def init_params(model, seed: int = 0) -> dict:
    """Freshly initialised parameters as a nested dict of numpy arrays."""
    import flax.linen as nn
    import jax

    v = model.get_initial_variables(jax.random.PRNGKey(seed), _input_shapes(model))
    return jax.tree_util.tree_map(np.asarray, nn.unbox(v["params"]))


# ------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class Checkpoint:
    """A format-neutral checkpoint: T5X-named parameters and optional Adafactor slots.

    Attributes:
      params: nested dict of numpy arrays with T5X names.
      step: the training step.
      slots: {flat param path: {slot name: array}} (Adafactor), or None.
      raw_opt_state: a moetx optimizer state that is not Adafactor (e.g. AdamW), as stored.
      model_state: a moetx model state (batch-norm statistics), as stored; read, not written.
    """

    params: dict
    step: int = 0
    slots: dict[str, dict[str, np.ndarray]] | None = None
    raw_opt_state: Any = None
    model_state: dict = dataclasses.field(default_factory=dict)

    @property
    def has_optimizer_state(self) -> bool:
        return self.slots is not None or self.raw_opt_state is not None


def _what(fmt: str, path: str) -> str:
    return f"{fmt} checkpoint {path}"


def check_params(params: Mapping[str, Any], expected: Mapping[str, tuple], what: str) -> None:
    """Raises ConversionError unless the tree has exactly the expected names and shapes."""
    _check(f"{what}: the parameters do not match the model.",
           {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}, expected,
           [(r"/(mlp|extra_mlp)/|pre_extra_mlp", "MLP or MoE layers differ: check the gin's "
             "MoeConfig (num_experts, sparse_every, extra_mlp) and mlp_activations."),
            (r"relpos_bias|logits_dense|token_embedder", "embedding, position or head options "
             "differ (logits_via_embedding, position_embedding).")],
           "pass the --model the checkpoint was trained with (or --dense_model with --upcycle).")


def moetx_state_dir(path: str, step: int | None = None) -> str:
    """SRC (model dir, checkpoint_<step> dir or its state dir) -> the Orbax `state` directory."""
    from moetx.trainer import checkpoints

    path = os.path.abspath(path)
    if os.path.basename(path) == "state" and os.path.isdir(path):
        return path
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    if step is None:
        step = checkpoints.latest_step(path)
        if step is None:
            raise FileNotFoundError(f"No checkpoint_<step>/state in {path!r}; expected a moetx "
                                    "model directory or one of its checkpoint_<step> dirs.")
    state = os.path.join(path, f"checkpoint_{step}", "state")
    if not os.path.isdir(state):
        raise FileNotFoundError(f"{state} does not exist.")
    return state


def read_moetx(path: str, *, load_optimizer: bool = True, step: int | None = None) -> Checkpoint:
    """A moetx train state (`checkpoint_<step>/state`, latest unless `step`) as numpy arrays;
    an Adafactor state becomes per-parameter slots, any other optimizer state stays raw."""
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointer().restore(moetx_state_dir(path, step))
    if not isinstance(state, dict) or "params" not in state:
        raise ValueError(f"{path}: not a moetx train state (top-level keys "
                         f"{sorted(state) if isinstance(state, dict) else type(state)}).")
    ckpt = Checkpoint(params=state["params"], step=int(np.asarray(state.get("step", 0))),
                      model_state=dict(state.get("model_state") or {}))
    opt = state.get("opt_state") if load_optimizer else None
    if opt is None:
        return ckpt
    if isinstance(opt, dict) and set(opt) == {"count", *ADAFACTOR_SLOTS}:
        flats = {s: _flatten(opt[s]) for s in ADAFACTOR_SLOTS}
        ckpt.slots = {p: {s: np.asarray(flats[s][p]) for s in ADAFACTOR_SLOTS if p in flats[s]}
                      for p in _flatten(ckpt.params)}
    else:
        ckpt.raw_opt_state = opt
    return ckpt


def read_t5x(path: str, *, load_optimizer: bool = True) -> Checkpoint:
    """A T5X checkpoint (either format); `param_states` must mirror the parameters with one
    dict of slot arrays per parameter (T5X Adafactor), else ConversionError."""
    from moetx.tools import t5x_format

    t = t5x_format.read_checkpoint(path, load_optimizer=load_optimizer)
    ckpt = Checkpoint(params=t.params, step=int(t.step))
    if t.opt_state:
        flat_params = _flatten(t.params)
        slots, problems = {}, {}
        for p in flat_params:
            node: Any = t.opt_state
            for k in p.split("/"):
                node = node.get(k) if isinstance(node, Mapping) else None
            if isinstance(node, Mapping) and node and all(
                    not isinstance(v, Mapping) for v in node.values()):
                slots[p] = {k: np.asarray(v) for k, v in node.items()}
            else:
                problems[f"optimizer/state/param_states/{p}"] = "no per-parameter slots"
        leftover = {k: "" for k in _flatten(t.opt_state)
                    if "/".join(k.split("/")[:-1]) not in flat_params}
        if problems or leftover:
            raise ConversionError(
                f"{_what('t5x', path)}: the optimizer state does not mirror the parameters "
                "(expected T5X Adafactor param_states).", unexpected={k: () for k in leftover},
                conflicts=problems, fix="pass --drop_optimizer_state to convert parameters only.")
        ckpt.slots = slots
    return ckpt


def read_hf(path: str, spec: ModelSpec) -> Checkpoint:
    """A Hugging Face directory converted (strictly) to moetx names for `spec`'s config."""
    from moetx.tools import hf

    torch_env.block_triton_after_tensorflow()
    state_dict, hf_cfg = hf.load_hf(path)
    cfg = spec.config
    convert = {"t5": hf.hf_t5_to_moetx, "llama": hf.hf_llama_to_moetx,
               "switch_transformers": hf.hf_switch_to_moetx, "mixtral": hf.hf_mixtral_to_moetx}
    if hf_cfg.model_type not in convert:
        raise ValueError(f"{path}: Hugging Face model_type {hf_cfg.model_type!r} is not one of "
                         f"{sorted(convert)}.")
    return Checkpoint(params=convert[hf_cfg.model_type](state_dict, cfg))


def _hf_family(cfg) -> str:
    if cfg.num_encoder_layers:
        return "switch_transformers" if cfg.moe is not None else "t5"
    return "mixtral" if cfg.moe is not None else "llama"


@contextlib.contextmanager
def _atomic_dir(dst: str) -> Iterator[str]:
    """Yields a temporary sibling of `dst` to fill; renames it to `dst` on success and removes
    it on any error, so `dst` exists only complete."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} already exists; choose a new destination (conversion never "
                              "overwrites).")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}-{int(time.time() * 1e3)}"
    try:
        yield tmp
        os.rename(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _cast_params(params: dict, dtype: Any) -> dict:
    if dtype is None:
        return params
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return _unflatten({k: np.asarray(v).astype(dt) if np.issubdtype(np.asarray(v).dtype,
                                                                    np.floating)
                       or np.asarray(v).dtype == ml_dtypes.bfloat16 else v
                       for k, v in _flatten(params).items()})


def _moetx_opt_state(ckpt: Checkpoint, ab: _Abstract) -> Any:
    """The moetx optimizer state for the target: carried Adafactor slots checked against the
    configured optimizer's shapes, a carried raw state, or the optimizer's fresh state."""
    import flax.serialization
    import jax

    from moetx.trainer import optimizers

    if ckpt.slots is not None:
        if not isinstance(ab.opt_state, optimizers.AdafactorState):
            raise ConversionError(
                "The source holds Adafactor slots but the configured optimizer is "
                f"{type(ab.opt_state).__name__}.", fix="pass --drop_optimizer_state, or configure "
                "make_optimizer.optimizer_fn = @adafactor in the gin.")
        trees, found, expected, conflicts = {}, {}, {}, {}
        for slot in ADAFACTOR_SLOTS:
            want = {k: tuple(v.shape) for k, v in _flatten(getattr(ab.opt_state, slot)).items()}
            have = {}
            for p, s in ckpt.slots.items():
                if slot in s:
                    have[p] = np.asarray(s[slot], np.float32)
            found.update({f"{slot}/{k}": v.shape for k, v in have.items()})
            expected.update({f"{slot}/{k}": v for k, v in want.items()})
            trees[slot] = _unflatten(have)
        for p, s in ckpt.slots.items():
            m = s.get("m")
            if m is not None and (m.size != 1 or np.any(m)):
                conflicts[f"m/{p}"] = (f"momentum slot of shape {list(m.shape)}; moetx's "
                                       "Adafactor keeps none")
            for k in set(s) - {"m", *ADAFACTOR_SLOTS}:
                conflicts[f"{k}/{p}"] = "not an Adafactor slot"
        _check("The optimizer state does not fit the target model's Adafactor (T5X may have "
               "factored other axes).", found, expected, [], "pass --drop_optimizer_state to "
               "start the target with a fresh optimizer.", conflicts)
        state = optimizers.AdafactorState(np.asarray(ckpt.step, np.int32), trees["v_row"],
                                          trees["v_col"], trees["v"])
        return flax.serialization.to_state_dict(state)
    if ckpt.raw_opt_state is not None:
        want = flax.serialization.to_state_dict(ab.opt_state)
        _check("The source's optimizer state does not match the configured optimizer.",
               {k: np.shape(v) for k, v in _flatten(ckpt.raw_opt_state).items()},
               {k: tuple(v.shape) for k, v in _flatten(want).items()}, [],
               "configure the same optimizer, or pass --drop_optimizer_state.")
        return ckpt.raw_opt_state
    fresh = jax.device_get(ab.optimizer.tx.init(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), ckpt.params)))
    return flax.serialization.to_state_dict(fresh)


def write_moetx(dst: str, ckpt: Checkpoint, ab: _Abstract) -> str:
    """Writes the model directory `dst` with `checkpoint_<step>/{state,dataset}` as the trainer
    saves it (the data position at 0 batches), atomically."""
    from moetx.trainer import checkpoints, trainer

    # The trainer's own TrainState (other fields at their defaults), so that the tree is
    # exactly the one `train` restores.
    state = trainer.TrainState(step=np.asarray(ckpt.step, np.int32), params=ckpt.params,
                               opt_state=_moetx_opt_state(ckpt, ab))
    with _atomic_dir(dst) as tmp:
        ckpter = checkpoints.Checkpointer(tmp, save_interval_steps=1, keep=None)
        ckpter.save(ckpt.step, state, {"batches_consumed": 0})
        ckpter.close()
    return os.path.abspath(dst)


def write_t5x(dst: str, ckpt: Checkpoint, use_tensorstore: bool = True) -> str:
    """Writes the T5X `checkpoint_<step>` directory `dst` (atomic, by t5x_format)."""
    from moetx.tools import t5x_format

    if ckpt.raw_opt_state is not None:
        raise ConversionError("The source's optimizer state is not Adafactor; T5X checkpoints "
                              "here hold Adafactor slots only.",
                              fix="pass --drop_optimizer_state.")
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} already exists; choose a new destination (conversion never "
                              "overwrites).")
    opt = None
    if ckpt.slots is not None:
        # T5X's Adafactor state always has all four slots; `m` is a [1] zero without momentum.
        opt = _unflatten({p: {"m": np.zeros((1,), np.float32), **s}
                          for p, s in ckpt.slots.items()})
    return t5x_format.write_checkpoint(dst, ckpt.params, ckpt.step, opt,
                                       use_tensorstore=use_tensorstore)


def write_hf(dst: str, ckpt: Checkpoint, spec: ModelSpec) -> str:
    """Writes config.json + safetensors for the HF family of `spec`'s config, atomically. The
    HF config is `spec.hf_config` when it is of that family (keeps its other fields), else
    derived from the moetx config."""
    from moetx.tools import hf

    torch_env.block_triton_after_tensorflow()
    cfg = spec.config
    family = _hf_family(cfg)
    to_hf = {"t5": (hf.moetx_to_hf_t5, hf.t5_config_to_hf),
             "llama": (hf.moetx_to_hf_llama, hf.llama_config_to_hf),
             "switch_transformers": (hf.moetx_to_hf_switch, hf.switch_config_to_hf),
             "mixtral": (hf.moetx_to_hf_mixtral, hf.mixtral_config_to_hf)}[family]
    hf_cfg = spec.hf_config
    if hf_cfg is None or hf_cfg.model_type != family:
        hf_cfg = to_hf[1](cfg)
    state_dict = to_hf[0](ckpt.params, cfg)
    with _atomic_dir(dst) as tmp:
        hf.save_hf(state_dict, hf_cfg, tmp)
    return os.path.abspath(dst)


# --------------------------------------------------------------------------------- convert


def convert(src_format: str, dst_format: str, src: str, dst: str, spec: ModelSpec, *,
            dtype: Any = None, drop_optimizer_state: bool = False, upcycle: bool = False,
            dense_spec: ModelSpec | None = None, seed: int = 0, step: int | None = None,
            use_tensorstore: bool = True) -> str:
    """Converts SRC (in `src_format`) to DST (in `dst_format`) for the model `spec`.

    Args:
      spec: the (target) model. With `upcycle`, the MoE model; SRC holds `dense_spec`'s model
        (default: `spec`'s config with moe=None).
      dtype: None, 'float32' or 'bfloat16': cast of the parameters.
      drop_optimizer_state: write parameters only (moetx gets a fresh optimizer state).
      seed: router initialisation seed for `upcycle`.
      step: which moetx checkpoint_<step> to read (default latest).
      use_tensorstore: T5X output with zarr arrays (else all inline in msgpack).
    Returns:
      The absolute path written.
    Raises:
      ConversionError: names every leftover, missing or wrong-shape key; DST is not created.
    """
    for name, fmt in (("--from", src_format), ("--to", dst_format)):
        if fmt not in FORMATS:
            raise ValueError(f"{name} {fmt!r}: expected one of {FORMATS}.")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}.")
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} already exists; choose a new destination (conversion never "
                              "overwrites).")
    source_spec = spec
    if upcycle:
        if spec.config.moe is None:
            raise ValueError("--upcycle needs an MoE target --model (TransformerConfig.moe set).")
        source_spec = dense_spec or ModelSpec(model_from_config(dataclasses.replace(
            spec.config, moe=None, encoder_moe=None)))
        drop_optimizer_state = True  # the upcycled model starts with a fresh optimizer
    load_opt = not drop_optimizer_state
    if src_format == "t5x":
        ckpt = read_t5x(src, load_optimizer=load_opt)
    elif src_format == "moetx":
        ckpt = read_moetx(src, load_optimizer=load_opt, step=step)
    else:
        ckpt = read_hf(src, source_spec)
    abstract_source = _abstract(source_spec.model)
    check_params(ckpt.params, abstract_source.params, _what(src_format, src))
    if upcycle:
        from moetx.tools.upcycle import upcycle_params

        ckpt = Checkpoint(params=upcycle_params(ckpt.params, init_params(spec.model, seed)),
                          step=ckpt.step)
    if ckpt.has_optimizer_state and dst_format == "hf":
        raise ConversionError(f"{_what(src_format, src)} holds optimizer state and Hugging Face "
                              "checkpoints cannot.", fix="pass --drop_optimizer_state.")
    ckpt.params = _cast_params(ckpt.params, _DTYPES.get(dtype))
    if dst_format == "moetx":
        return write_moetx(dst, ckpt, abstract_source if source_spec is spec
                           else _abstract(spec.model))
    if dst_format == "t5x":
        return write_t5x(dst, ckpt, use_tensorstore)
    return write_hf(dst, ckpt, spec)


# ------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moetx-convert", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS)
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("--model", default=None, help="gin file defining MODEL, or a Hugging Face "
                   "config dir / config.json (default from --from hf: SRC's config)")
    p.add_argument("--dense_model", default=None, help="with --upcycle: SRC's dense model "
                   "(default: --model without MoE)")
    p.add_argument("--gin_bindings", action="append", default=[])
    p.add_argument("--gin_search_paths", default="")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--drop_optimizer_state", action="store_true")
    p.add_argument("--upcycle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--t5x_inline", action="store_true",
                   help="T5X output with every array inline in msgpack (no tensorstore)")
    p.add_argument("src")
    p.add_argument("dst")
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> str:
    args = parse_args(argv)
    search = [s for s in args.gin_search_paths.split(",") if s]
    model = args.model or (args.src if args.src_format == "hf" else None)
    if model is None:
        raise ValueError(f"--model is required with --from {args.src_format}: a gin file "
                         "defining MODEL or a Hugging Face config.")
    spec = load_model(model, args.gin_bindings, search)
    dense = load_model(args.dense_model, (), search) if args.dense_model else None
    out = convert(args.src_format, args.dst_format, args.src, args.dst, spec,
                  dtype=args.dtype, drop_optimizer_state=args.drop_optimizer_state,
                  upcycle=args.upcycle, dense_spec=dense, seed=args.seed, step=args.step,
                  use_tensorstore=not args.t5x_inline)
    print(f"moetx-convert: wrote {args.dst_format} checkpoint {out}", file=sys.stderr)
    return out


def console_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `moetx-convert` and `python -m moetx.tools.convert`; errors are reported
    in full (the key listings are the point) with exit status 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("MOETX_TRACEBACK"):
            raise
        print(f"moetx-convert: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


__all__ = ["Checkpoint", "ModelSpec", "convert", "load_model", "read_moetx", "read_t5x",
           "write_moetx", "write_t5x", "write_hf", "console_main"]
