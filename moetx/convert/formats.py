"""Checkpoint conversion between T5X, moetx and Hugging Face, with sparse upcycling.

    python -m moetx.cli.convert --from t5x --to hf --model models/t5_1_1_small.gin \\
        t5x_run/checkpoint_1000000 hf_out
    python -m moetx.cli.convert --from hf --to moetx hf_llama_dir moetx_run   # --model: HF's
    python -m moetx.cli.convert --from moetx --to moetx --upcycle --model models/my_moe.gin \\
        dense_run moe_run                                 # dense -> MoE (Komatsuzaki et al.)

Formats:
  t5x    a T5X checkpoint directory `checkpoint_<step>` (legacy msgpack + tensorstore, or the
         Orbax-era layout), read and written by `moetx.convert.t5x_format`; DST is the
         `checkpoint_<step>` directory to create.
  moetx  a moetx model directory holding `checkpoint_<step>/{state,dataset}` (Orbax), what
         `moetx.trainer.train` resumes from and `eval`/`infer` restore; SRC may also name one
         `checkpoint_<step>` (else the latest is read); DST is the model directory to create.
  hf     a Hugging Face directory (`config.json` + safetensors) for T5ForConditionalGeneration,
         SwitchTransformersForConditionalGeneration, LlamaForCausalLM or MixtralForCausalLM
         (chosen from the moetx config: encoder-decoder or decoder-only, dense or MoE; the
         families are the records of `moetx.convert.hf.families`).

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
Hugging Face checkpoints hold weights only: converting to `hf` never reads the source's optimizer
state and prints one line saying it was not exported (`--drop_optimizer_state` is not needed).
Converting a source whose state moetx's optimizer cannot hold (momentum, other factoring) to
`moetx` or `t5x` needs `--drop_optimizer_state`. A moetx checkpoint always holds a complete train
state, so one without a carried optimizer state gets the configured optimizer's fresh state
(`optimizer.init(params)`).

Hugging Face exports are usable as they are: config.json (with the weights' `dtype`),
generation_config.json, the weights, and the tokenizer of the task's SentencePiece vocabulary
(spiece.model, tokenizer.json, tokenizer_config.json; `moetx.convert.hf.tokenizer`), so that
`AutoTokenizer` and `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` encode, generate and decode
the ids SeqIO does. The vocabulary is `--vocabulary` (a SentencePiece `.model`, default moetx's
default vocabulary) with `--extra_ids` sentinels (default 100, as T5 and moetx's span-corruption
and FLAN tasks), or the vocabulary of a registered task (`--task`); `--vocabulary=none` writes no
tokenizer. Exporting needs the `hf` extra (`pip install 'moetx[hf]'`: transformers, safetensors).

`--dtype` casts the parameters (not the optimizer state). `--upcycle` reads SRC as the dense model
(`--dense_model`, by default `--model`'s config without MoE), tiles each sparse layer's experts from
its dense MLP, initialises fresh routers (`--seed`) and drops the optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import gin
import numpy as np

from moetx.util import gin_files, torch_env, trees
from moetx.convert.errors import ConversionError, check_keys

FORMATS = ("t5x", "moetx", "hf")
ADAFACTOR_SLOTS = ("v_row", "v_col", "v")
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16"}
# `vocabulary=` value meaning moetx's default vocabulary (with DEFAULT_EXTRA_IDS sentinels).
DEFAULT_VOCABULARY = "default"


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
    """The moetx model wrapper of a TransformerConfig (encoder-decoder or decoder-only)."""
    from moetx.lm import models

    return (models.EncoderDecoderModel(cfg) if cfg.num_encoder_layers
            else models.DecoderOnlyModel(cfg))


def hf_config_to_moetx(hf_cfg):
    """Any supported transformers config -> moetx TransformerConfig (by its family's record)."""
    from moetx.convert.hf import families

    model_type = getattr(hf_cfg, "model_type", None)
    family = families.BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(f"Hugging Face model_type {model_type!r} has no moetx counterpart; "
                         f"supported: {sorted(families.BY_MODEL_TYPE)}.")
    return family.config_to_moetx(hf_cfg)


def load_hf_config(path: str):
    """A transformers config from a directory holding config.json, or from the json file."""
    from moetx.convert.hf import common

    transformers = common.import_transformers()
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
        gin_files.parse_files([spec], list(gin_bindings) + [
            "moetx.convert.formats.configured_model.model = %MODEL"], gin_search_paths)
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


@dataclasses.dataclass
class AbstractModel:
    """What the model and its configured optimizer hold, without materialising anything.

    Attributes:
      params: {flat parameter path: shape}.
      param_axes: the parameters' logical axis names (as `partitioning.params_logical_axes`).
      optimizer: the configured optimizer (`optimizers.make_optimizer`).
      opt_state: its state for these parameters, abstract (`jax.ShapeDtypeStruct` leaves).
    """

    params: dict[str, tuple]
    param_axes: Any
    optimizer: Any
    opt_state: Any


def abstract_model(model) -> AbstractModel:
    """The parameter shapes and optimizer state of `model` under the current gin config, by
    `jax.eval_shape` (nothing is initialised)."""
    import flax.linen as nn
    import jax

    from moetx.trainer import optimizers, partitioning

    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0),
                                                               _input_shapes(model)))
    axes = partitioning.params_logical_axes(boxed["params"])
    params = nn.unbox(boxed["params"])
    optimizer = optimizers.make_optimizer(param_axes=axes)
    opt = jax.eval_shape(optimizer.tx.init, params)
    return AbstractModel({k: tuple(v.shape) for k, v in trees.flatten(params).items()}, axes,
                         optimizer, opt)


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
    """How errors name a source or destination."""
    return f"{fmt} checkpoint {path}"


def check_params(params: Mapping[str, Any], expected: Mapping[str, tuple], what: str) -> None:
    """Raises ConversionError unless the tree has exactly the expected names and shapes."""
    check_keys(f"{what}: the parameters do not match the model.",
               {k: tuple(np.shape(v)) for k, v in trees.flatten(params).items()}, expected,
               [(r"/(mlp|extra_mlp)/|pre_extra_mlp", "MLP or MoE layers differ: check the gin's "
                 "MoeConfig (num_experts, sparse_every, extra_mlp) and mlp_activations."),
                (r"relpos_bias|logits_dense|token_embedder", "embedding, position or head "
                 "options differ (logits_via_embedding, position_embedding).")],
               "pass the --model the checkpoint was trained with (or --dense_model with "
               "--upcycle).")


def moetx_state_dir(path: str, step: int | None = None) -> str:
    """SRC (a model dir, one of its checkpoint_<step> dirs, or that dir's `state`) -> the Orbax
    `state` directory (of checkpoint `step`, else the one `path` names, else the latest).

    Raises:
      FileNotFoundError: no such checkpoint (as `checkpoints.resolve_checkpoint`).
      ValueError: `path` names another step than `step`.
    """
    from moetx.trainer import checkpoints

    path = os.path.abspath(path)
    if os.path.basename(path) == "state" and os.path.isdir(path):
        path = os.path.dirname(path)
    model_dir, step = checkpoints.resolve_checkpoint(path, step)
    return checkpoints.state_dir(model_dir, step)


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
        flats = {s: trees.flatten(opt[s]) for s in ADAFACTOR_SLOTS}
        ckpt.slots = {p: {s: np.asarray(flats[s][p]) for s in ADAFACTOR_SLOTS if p in flats[s]}
                      for p in trees.flatten(ckpt.params)}
    else:
        ckpt.raw_opt_state = opt
    return ckpt


def read_t5x(path: str, *, load_optimizer: bool = True) -> Checkpoint:
    """A T5X checkpoint (either format); `param_states` must mirror the parameters with one
    dict of slot arrays per parameter (T5X Adafactor), else ConversionError."""
    from moetx.convert import t5x_format

    t = t5x_format.read_checkpoint(path, load_optimizer=load_optimizer)
    ckpt = Checkpoint(params=t.params, step=int(t.step))
    if t.opt_state:
        flat_params = trees.flatten(t.params)
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
        leftover = {k: "" for k in trees.flatten(t.opt_state)
                    if "/".join(k.split("/")[:-1]) not in flat_params}
        if problems or leftover:
            raise ConversionError(
                f"{_what('t5x', path)}: the optimizer state does not mirror the parameters "
                "(expected T5X Adafactor param_states).", unexpected={k: () for k in leftover},
                conflicts=problems, fix="pass --drop_optimizer_state to convert parameters only.")
        ckpt.slots = slots
    return ckpt


def read_hf(path: str, spec: ModelSpec) -> Checkpoint:
    """A Hugging Face directory converted (strictly) to moetx names for `spec`'s config, by the
    family its config's `model_type` names."""
    from moetx.convert.hf import families, files

    torch_env.block_triton_after_tensorflow()
    state_dict, hf_cfg = files.load_hf(path)
    family = families.BY_MODEL_TYPE.get(hf_cfg.model_type)
    if family is None:
        raise ValueError(f"{path}: Hugging Face model_type {hf_cfg.model_type!r} is not one of "
                         f"{sorted(families.BY_MODEL_TYPE)}.")
    return Checkpoint(params=family.to_moetx(state_dict, spec.config))


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
    """The floating-point parameters cast to `dtype` (None: unchanged); others as they are."""
    if dtype is None:
        return params
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return trees.unflatten({k: np.asarray(v).astype(dt) if np.issubdtype(np.asarray(v).dtype,
                                                                         np.floating)
                            or np.asarray(v).dtype == ml_dtypes.bfloat16 else v
                            for k, v in trees.flatten(params).items()})


def _moetx_opt_state(ckpt: Checkpoint, ab: AbstractModel) -> Any:
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
        slot_trees, found, expected, conflicts = {}, {}, {}, {}
        for slot in ADAFACTOR_SLOTS:
            want = {k: tuple(v.shape)
                    for k, v in trees.flatten(getattr(ab.opt_state, slot)).items()}
            have = {}
            for p, s in ckpt.slots.items():
                if slot in s:
                    have[p] = np.asarray(s[slot], np.float32)
            found.update({f"{slot}/{k}": v.shape for k, v in have.items()})
            expected.update({f"{slot}/{k}": v for k, v in want.items()})
            slot_trees[slot] = trees.unflatten(have)
        for p, s in ckpt.slots.items():
            m = s.get("m")
            if m is not None and (m.size != 1 or np.any(m)):
                conflicts[f"m/{p}"] = (f"momentum slot of shape {list(m.shape)}; moetx's "
                                       "Adafactor keeps none")
            for k in set(s) - {"m", *ADAFACTOR_SLOTS}:
                conflicts[f"{k}/{p}"] = "not an Adafactor slot"
        check_keys("The optimizer state does not fit the target model's Adafactor (T5X may have "
                   "factored other axes).", found, expected, [], "pass --drop_optimizer_state to "
                   "start the target with a fresh optimizer.", conflicts)
        state = optimizers.AdafactorState(np.asarray(ckpt.step, np.int32), slot_trees["v_row"],
                                          slot_trees["v_col"], slot_trees["v"])
        return flax.serialization.to_state_dict(state)
    if ckpt.raw_opt_state is not None:
        want = flax.serialization.to_state_dict(ab.opt_state)
        check_keys("The source's optimizer state does not match the configured optimizer.",
                   {k: np.shape(v) for k, v in trees.flatten(ckpt.raw_opt_state).items()},
                   {k: tuple(v.shape) for k, v in trees.flatten(want).items()}, [],
                   "configure the same optimizer, or pass --drop_optimizer_state.")
        return ckpt.raw_opt_state
    fresh = jax.device_get(ab.optimizer.tx.init(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), ckpt.params)))
    return flax.serialization.to_state_dict(fresh)


def in_layout(ckpt: Checkpoint, params: Mapping[str, Any] | None) -> Checkpoint:
    """`ckpt` with its layer stacks laid out as in `params` (a target model's tree, any leaves;
    `AbstractModel.params` too), scanned or not (`moetx.lm.scan`); None means unscanned, the
    T5X and Hugging Face names. Adafactor slots follow their parameters (a [1] placeholder slot
    stays one [1] placeholder).

    Raises:
      ConversionError: the layout changes and the source holds a non-Adafactor optimizer state
        (it is not remapped).
    """
    from moetx.lm import scan

    template = trees.unflatten(dict(params)) if params and "/" in next(iter(params)) \
        else dict(params or {})
    if scan.is_scanned(ckpt.params) == scan.is_scanned(template):
        return ckpt
    if ckpt.raw_opt_state is not None:
        raise ConversionError("The source's optimizer state is not Adafactor and is not "
                              "remapped between scanned and unscanned layers.",
                              fix="pass --drop_optimizer_state.")
    new_params = scan.match_layout(ckpt.params, template)
    slots = None
    if ckpt.slots is not None:
        before = {k: np.shape(v) for k, v in trees.flatten(ckpt.params).items()}
        after = {k: np.shape(v) for k, v in trees.flatten(new_params).items()}
        from_scanned = scan.is_scanned(ckpt.params)
        stacked = tuple(f"{stack}/{scan.SCANNED}/" for stack in scan.STACKS)
        slots = {}
        for name in sorted({n for per_param in ckpt.slots.values() for n in per_param}):
            tree = {}
            for p, per_param in ckpt.slots.items():
                if name in per_param:
                    x = np.asarray(per_param[name])
                    if from_scanned and p.startswith(stacked) and x.shape == (1,) \
                            and before[p] != (1,):
                        x = np.broadcast_to(x, (before[p][0], 1))  # one placeholder per layer
                    tree[p] = x
            for p, x in trees.flatten(scan.match_layout(trees.unflatten(tree),
                                                        template)).items():
                if not from_scanned and p.startswith(stacked) and x.shape[1:] == (1,) \
                        and after[p] != x.shape and np.all(x == x[:1]):
                    x = x[0]  # the layers' equal placeholders become one (else: wrong shape)
                slots.setdefault(p, {})[name] = x
    return dataclasses.replace(ckpt, params=new_params, slots=slots)


def write_moetx(dst: str, ckpt: Checkpoint, ab: AbstractModel) -> str:
    """Writes the model directory `dst` with `checkpoint_<step>/{state,dataset}` as the trainer
    saves it (the data position at 0 batches), atomically; `ab` is the target model's
    `abstract_model` (its optimizer state's shapes)."""
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
    from moetx.convert import t5x_format

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
        opt = trees.unflatten({p: {"m": np.zeros((1,), np.float32), **s}
                               for p, s in ckpt.slots.items()})
    return t5x_format.write_checkpoint(dst, ckpt.params, ckpt.step, opt,
                                       use_tensorstore=use_tensorstore)


def hf_vocabulary(vocabulary: Any):
    """`vocabulary` as a `moetx.convert.hf.tokenizer.Vocabulary`: DEFAULT_VOCABULARY is moetx's
    default one, a str a SentencePiece `.model` path (with the default extra ids), None none."""
    from moetx.convert.hf import tokenizer

    if vocabulary is None or isinstance(vocabulary, tokenizer.Vocabulary):
        return vocabulary
    if vocabulary == DEFAULT_VOCABULARY:
        return tokenizer.default_vocabulary()
    if isinstance(vocabulary, (str, os.PathLike)):
        return tokenizer.Vocabulary(os.fspath(vocabulary))
    raise TypeError(f"vocabulary={vocabulary!r}: expected {DEFAULT_VOCABULARY!r}, a path, a "
                    "moetx.convert.hf.tokenizer.Vocabulary or None.")


def check_hf_target(spec: ModelSpec, vocabulary: Any = DEFAULT_VOCABULARY):
    """What an HF export can check before reading the source: the `hf` extra is installed, the
    model has an HF family that expresses it (ValueError naming why not, e.g. a
    `decoder_program`), and the vocabulary is a valid SentencePiece model that fits the model's
    embedding. Returns (family, HF config, `Vocabulary` or None)."""
    from moetx.convert.hf import common, families, tokenizer

    common.require_hf_libraries()
    cfg = spec.config
    family = families.for_config(cfg)
    hf_cfg = spec.hf_config
    if hf_cfg is None or hf_cfg.model_type != family.model_type:
        hf_cfg = family.config_to_hf(cfg)
    vocab = hf_vocabulary(vocabulary)
    if vocab is not None:
        tokenizer.check_vocabulary(vocab, cfg.vocab_size)
    return family, hf_cfg, vocab


def write_hf(dst: str, ckpt: Checkpoint, spec: ModelSpec,
             vocabulary: Any = DEFAULT_VOCABULARY) -> str:
    """Writes config.json, generation_config.json, safetensors and the tokenizer for the HF
    family of `spec`'s config (`families.for_config`), atomically. The HF config is
    `spec.hf_config` when it is of that family (keeps its other fields), else derived from the
    moetx config.

    Args:
      vocabulary: the tokenizer's vocabulary (see `hf_vocabulary`); None writes no tokenizer.
    """
    from moetx.convert.hf import files, tokenizer

    torch_env.block_triton_after_tensorflow()
    cfg = spec.config
    family, hf_cfg, vocab = check_hf_target(spec, vocabulary)
    state_dict = family.to_hf(ckpt.params, cfg)
    with _atomic_dir(dst) as tmp:
        files.save_hf(state_dict, hf_cfg, tmp)
        if vocab is not None:
            tokenizer.save_tokenizer(tmp, vocab, encoder_decoder=bool(cfg.num_encoder_layers),
                                     model_vocab_size=cfg.vocab_size)
    return os.path.abspath(dst)


# --------------------------------------------------------------------------------- convert


def convert(src_format: str, dst_format: str, src: str, dst: str, spec: ModelSpec, *,
            dtype: Any = None, drop_optimizer_state: bool = False, upcycle: bool = False,
            dense_spec: ModelSpec | None = None, seed: int = 0, step: int | None = None,
            use_tensorstore: bool = True, vocabulary: Any = DEFAULT_VOCABULARY) -> str:
    """Converts SRC (in `src_format`) to DST (in `dst_format`) for the model `spec`.

    Args:
      spec: the (target) model. With `upcycle`, the MoE model; SRC holds `dense_spec`'s model
        (default: `spec`'s config with moe=None).
      dtype: None, 'float32' or 'bfloat16': cast of the parameters.
      drop_optimizer_state: write parameters only (moetx gets a fresh optimizer state). An
        `hf` target never carries optimizer state: without this flag one line on stderr says
        the source's slots were not exported.
      seed: router initialisation seed for `upcycle`.
      step: which moetx checkpoint_<step> to read (default latest).
      use_tensorstore: T5X output with zarr arrays (else all inline in msgpack).
      vocabulary: `hf` target only: the tokenizer's vocabulary (DEFAULT_VOCABULARY, a
        SentencePiece `.model` path, a `hf.tokenizer.Vocabulary`), or None for no tokenizer.
    Returns:
      The absolute path written.
    Raises:
      ConversionError: names every leftover, missing or wrong-shape key; DST is not created.
    """
    for name, fmt in (("--from", src_format), ("--to", dst_format)):
        if fmt not in FORMATS:
            raise ValueError(f"{name} {fmt!r}: expected one of {FORMATS}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}.")
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
    if dst_format == "hf":
        # Fails before anything is read: no `hf` extra, a model HF cannot express, a bad or
        # too large vocabulary.
        check_hf_target(spec, vocabulary)
        if src_format != "hf" and not drop_optimizer_state:
            print(f"moetx-convert: note: the optimizer slots of {src} were not exported "
                  "(Hugging Face checkpoints hold weights only).", file=sys.stderr)
        drop_optimizer_state = True
    load_opt = not drop_optimizer_state
    if src_format == "t5x":
        ckpt = read_t5x(src, load_optimizer=load_opt)
    elif src_format == "moetx":
        ckpt = read_moetx(src, load_optimizer=load_opt, step=step)
    else:
        ckpt = read_hf(src, source_spec)
    abstract_source = abstract_model(source_spec.model)
    # Scanned layer stacks (moetx.lm.scan): the source is read in the model's layout, whichever
    # it was saved in; T5X and Hugging Face always get the unscanned `layers_{i}` names.
    ckpt = in_layout(ckpt, abstract_source.params)
    check_params(ckpt.params, abstract_source.params, _what(src_format, src))
    if upcycle:
        from moetx.convert.upcycle import upcycle_params

        ckpt = Checkpoint(params=upcycle_params(in_layout(ckpt, None).params,
                                                in_layout(Checkpoint(init_params(
                                                    spec.model, seed)), None).params),
                          step=ckpt.step)
    ckpt.params = _cast_params(ckpt.params, DTYPES.get(dtype))
    if dst_format == "moetx":
        target = abstract_source if source_spec is spec else abstract_model(spec.model)
        return write_moetx(dst, in_layout(ckpt, target.params), target)
    ckpt = in_layout(ckpt, None)
    if dst_format == "t5x":
        return write_t5x(dst, ckpt, use_tensorstore)
    return write_hf(dst, ckpt, spec, vocabulary)


__all__ = ["ADAFACTOR_SLOTS", "DEFAULT_VOCABULARY", "DTYPES", "FORMATS", "AbstractModel",
           "Checkpoint", "ModelSpec", "abstract_model", "check_hf_target", "check_params",
           "configured_model", "convert", "hf_config_to_moetx", "hf_vocabulary", "in_layout",
           "init_params",
           "load_hf_config", "load_model", "model_from_config", "moetx_state_dir", "read_hf",
           "read_moetx", "read_t5x", "write_hf", "write_moetx", "write_t5x"]
