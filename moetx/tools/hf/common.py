"""Pieces every Hugging Face converter shares: `ConversionError`, parameter-tree flattening,
layout entries, the strict key and shape checks, activation names, and the safetensors checkpoint
writer and reader (`save_hf`, `load_hf`).

The conventions the converters follow are in the `moetx.tools.hf` package docstring.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from moetx.tools import torch_env
from moetx.lm.transformer import TransformerConfig


StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

# At most this many keys per category are spelled out in a ConversionError message.
_MAX_LISTED = 12
_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM",
                  "switch_transformers": "SwitchTransformersForConditionalGeneration",
                  "mixtral": "MixtralForCausalLM"}
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A source tree or state dict does not match the target layout.

    Attributes:
      unexpected: source keys nothing maps to, with their shapes.
      missing: expected keys absent from the source, with their expected shapes.
      mismatched: keys present with the wrong shape, as (expected, found).
      conflicts: other problems by key, e.g. a tied copy that differs from its source.
    """

    def __init__(self, what: str, *, unexpected: Mapping[str, tuple] | None = None,
                 missing: Mapping[str, tuple] | None = None,
                 mismatched: Mapping[str, tuple[tuple, tuple]] | None = None,
                 conflicts: Mapping[str, str] | None = None, hints: Sequence[str] = (),
                 fix: str = ""):
        self.unexpected = dict(unexpected or {})
        self.missing = dict(missing or {})
        self.mismatched = dict(mismatched or {})
        self.conflicts = dict(conflicts or {})
        lines = [what]
        lines += _listing("unexpected key(s) (in the source, nothing maps them)",
                          {k: _shape_str(s) for k, s in self.unexpected.items()})
        lines += _listing("missing key(s) (expected, not in the source)",
                          {k: f"expected {_shape_str(s)}" for k, s in self.missing.items()})
        lines += _listing("wrong shape(s)",
                          {k: f"expected {_shape_str(e)}, found {_shape_str(f)}"
                           for k, (e, f) in self.mismatched.items()})
        lines += _listing("conflict(s)", self.conflicts)
        lines += [f"  hint: {h}" for h in dict.fromkeys(hints)]
        if fix:
            lines.append(f"  fix: {fix}")
        super().__init__("\n".join(lines))


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _listing(title: str, items: Mapping[str, str]) -> list[str]:
    if not items:
        return []
    keys = sorted(items)
    out = [f"  {len(keys)} {title}:"]
    out += [f"    {k}: {items[k]}" if items[k] else f"    {k}" for k in keys[:_MAX_LISTED]]
    if len(keys) > _MAX_LISTED:
        out.append(f"    ... and {len(keys) - _MAX_LISTED} more")
    return out


# ----------------------------------------------------------------------------------- arrays


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view or copy of a jax array, numpy array, flax box or torch tensor.

    torch bfloat16 has no numpy dtype; it becomes `ml_dtypes.bfloat16` bit for bit.
    """
    if hasattr(x, "unbox"):  # flax LogicallyPartitioned / Partitioned
        x = x.unbox()
    if hasattr(x, "detach"):  # a torch tensor; handled without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            torch = torch_env.import_torch()

            return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested params -> {'encoder/layers_0/attention/query/kernel': array}."""
    if not isinstance(params, Mapping):
        raise TypeError(f"Expected a nested mapping of parameters, found {type(params).__name__}.")
    if set(params) == {"params"}:
        raise ConversionError(
            "Got a variables dict {'params': ...} where a parameter tree was expected.",
            fix="pass variables['params'] (unboxed with flax.linen.unbox if needed).")
    flat: dict[str, np.ndarray] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(value, path)
            else:
                flat[path] = _to_numpy(value)

    visit(params, "")
    return flat


def _unflatten(flat: Mapping[str, Any]) -> Params:
    """{'a/b/c': leaf} -> nested dicts (the inverse of `_flatten_params`)."""
    out: Params = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    # Always a fresh C-contiguous array: the result must not alias the source (a torch
    # parameter, a jax buffer), and a transposed view must become contiguous for safetensors.
    return np.array(x, dtype=dtype, order="C", copy=True)


# ----------------------------------------------------------------------------------- layouts


class _Dims(NamedTuple):
    """The shape-determining hyperparameters of a layout."""

    vocab: int
    embed: int
    joined: int  # heads * d_kv
    heads: int
    buckets: int
    mlp: int
    mlp_names: tuple[str, ...]  # ('wi',) or ('wi_0', 'wi_1')
    enc_layers: int
    dec_layers: int
    tied: bool


class _Entry(NamedTuple):
    """One parameter: moetx path, HF key, moetx shape, and whether HF stores it transposed."""

    moetx: str
    hf: str
    shape: tuple[int, ...]
    transpose: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


class _ExpertEntry(NamedTuple):
    """A stacked expert kernel: moetx `[E, in, out]` <-> E HF weights `[out, in]`, one per
    expert, under `hf.format(e=expert)`."""

    moetx: str
    hf: str  # with an `{e}` field
    shape: tuple[int, int, int]

    def hf_keys(self) -> dict[str, tuple[int, int]]:
        return {self.hf.format(e=i): self.shape[:0:-1] for i in range(self.shape[0])}


def _mlp_names(activations: Sequence[str]) -> tuple[str, ...]:
    # MlpBlock names its input projections 'wi' for one activation, else 'wi_0', 'wi_1', ...
    n = len(activations)
    return ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))


def _dims_from_config(cfg: TransformerConfig) -> _Dims:
    return _Dims(cfg.vocab_size, cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads,
                 cfg.relative_attention_num_buckets, cfg.mlp_dim, _mlp_names(cfg.mlp_activations),
                 cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.logits_via_embedding)


# Hints for source keys that no target layout can hold.
_MOETX_HINTS = [
    (r"_dconv/", "Primer's multi-dconv-head attention ({q,k,v}_dconv) has no Hugging Face "
                 "T5 or Llama counterpart."),
    (r"relpos_bias", "relative position bias: T5 has it, Llama uses RoPE instead."),
    (r"^(encoder|token_embedder)/", "an encoder-decoder tree: use moetx_to_hf_t5."),
    (r"/mlp/wi(_\d+)?/kernel$", "the MLP's projections (wi vs wi_0/wi_1) differ from the "
                                "config's mlp_activations (gated vs plain)."),
    (r"/mlp/(router|expert)/", "MoE layers have no dense T5/Llama counterpart."),
    (r"logits_dense", "untied logits in the tree, tied in the config (logits_via_embedding)."),
]
_HF_HINTS = [
    (r"^lm_head\.weight$", "an untied lm_head in the checkpoint, tied logits in the config."),
    (r"DenseReluDense\.wi(_\d)?\.weight$|mlp\.(gate|up)_proj", "gated vs plain MLP differs "
                                                               "between checkpoint and config."),
    (r"relative_attention_bias", "T5 keeps the bias table in block 0 only (per-layer tables, "
                                 "as in UMT5, are not supported)."),
    (r"\.bias$", "the checkpoint has biases; moetx layers are bias-free."),
    (r"block_sparse_moe\.experts\.", "expert count differs between checkpoint and config "
                                       "(num_local_experts)."),
    (r"\.mlp\.(router|experts)\.", "sparse-layer placement or expert count differs between "
                                   "checkpoint and config (num_sparse_*_layers, num_experts)."),
]
_SWITCH_MOETX_HINTS = [h for h in _MOETX_HINTS if "router|expert" not in h[0]] + [
    (r"/mlp/(router|expert)/|/mlp/w[io]/kernel$", "sparse-layer placement or expert count "
                                                  "differs between tree and config "
                                                  "(moe.sparse_every, moe.num_experts)."),
]


def _hints(keys: Iterable[str], table: list[tuple[str, str]]) -> list[str]:
    return [text for pattern, text in table if any(re.search(pattern, k) for k in keys)]


def _check(what: str, found: Mapping[str, tuple], expected: Mapping[str, tuple],
           hint_table: list[tuple[str, str]], fix: str,
           conflicts: Mapping[str, str] | None = None) -> None:
    """Raises ConversionError unless `found` has exactly the keys and shapes of `expected`."""
    unexpected = {k: s for k, s in found.items() if k not in expected}
    missing = {k: s for k, s in expected.items() if k not in found}
    mismatched = {k: (expected[k], tuple(s)) for k, s in found.items()
                  if k in expected and tuple(s) != tuple(expected[k])}
    if unexpected or missing or mismatched or conflicts:
        keys = list(unexpected) + list(missing) + list(mismatched)
        raise ConversionError(what, unexpected=unexpected, missing=missing,
                              mismatched=mismatched, conflicts=conflicts,
                              hints=_hints(keys, hint_table), fix=fix)


def _moetx_to_hf(flat: Mapping[str, np.ndarray], layout: list[_Entry], what: str,
                 dtype: Any) -> StateDict:
    _check(f"{what}: the parameter tree does not match the expected layout.",
           {k: v.shape for k, v in flat.items()}, {e.moetx: e.shape for e in layout},
           _MOETX_HINTS, "pass the TransformerConfig the tree was built with (cfg=...), and "
           "check the model family (T5 vs Llama).")
    return {e.hf: _cast(flat[e.moetx].T if e.transpose else flat[e.moetx], dtype)
            for e in layout}


def _hf_to_moetx(state_dict: Mapping[str, Any], layout: list[_Entry], what: str,
                 tied_copies: Mapping[str, str], fill_missing: Mapping[str, str],
                 param_dtype: Any) -> Params:
    """Strict HF -> moetx conversion.

    Args:
      tied_copies: {copy key: source key}; a copy is accepted only if it equals its source
        exactly, and is then dropped.
      fill_missing: {key: source key}; an absent key is taken from its source (how
        transformers itself resolves a tied weight the checkpoint omits).
    """
    sd = _checked_hf(state_dict, {e.hf: e.hf_shape for e in layout}, what, tied_copies,
                     fill_missing)
    return _unflatten({e.moetx: _cast(sd[e.hf].T if e.transpose else sd[e.hf], param_dtype)
                       for e in layout})


def _moetx_to_hf_experts(flat: Mapping[str, np.ndarray], plain: list[_Entry],
                         experts: list[_ExpertEntry], what: str, fix: str,
                         dtype: Any) -> StateDict:
    """`_moetx_to_hf` for a layout with stacked experts (each expert gets its own HF keys)."""
    expected = {x.moetx: x.shape for x in plain}
    expected.update({x.moetx: x.shape for x in experts})
    _check(f"{what}: the parameter tree does not match the expected layout.",
           {k: v.shape for k, v in flat.items()}, expected, _SWITCH_MOETX_HINTS, fix)
    out = {x.hf: _cast(flat[x.moetx].T if x.transpose else flat[x.moetx], dtype) for x in plain}
    for x in experts:
        for i in range(x.shape[0]):
            out[x.hf.format(e=i)] = _cast(flat[x.moetx][i].T, dtype)
    return out


def _hf_to_moetx_experts(state_dict: Mapping[str, Any], plain: list[_Entry],
                         experts: list[_ExpertEntry], what: str,
                         tied_copies: Mapping[str, str], param_dtype: Any) -> Params:
    """`_hf_to_moetx` for a layout with stacked experts (the per-expert HF weights are stacked
    on a leading axis)."""
    expected = {x.hf: x.hf_shape for x in plain}
    for x in experts:
        expected.update(x.hf_keys())
    sd = _checked_hf(state_dict, expected, what, tied_copies, {})
    flat = {x.moetx: _cast(sd[x.hf].T if x.transpose else sd[x.hf], param_dtype)
            for x in plain}
    for x in experts:
        flat[x.moetx] = _cast(np.stack([sd[x.hf.format(e=i)].T for i in range(x.shape[0])]),
                              param_dtype)
    return _unflatten(flat)


def _checked_hf(state_dict: Mapping[str, Any], expected: Mapping[str, tuple], what: str,
                tied_copies: Mapping[str, str], fill_missing: Mapping[str, str]) -> StateDict:
    """The state dict as numpy, tied copies dropped and fills applied, checked against
    `expected` {HF key: shape}; raises ConversionError otherwise."""
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    conflicts = {}
    for copy_key, source in tied_copies.items():
        if copy_key not in sd:
            continue
        a, b = sd[copy_key], sd.get(source)
        if b is None or a.shape != b.shape or not np.array_equal(a, b):
            conflicts[copy_key] = (f"present but differs from {source}, which the config ties "
                                   "it to")
        else:
            del sd[copy_key]
    for key, source in fill_missing.items():
        if key not in sd and source in sd:
            sd[key] = sd[source]
    _check(f"{what}: the state dict does not match the config's layout.",
           {k: v.shape for k, v in sd.items()}, expected,
           _HF_HINTS, "build the config from the checkpoint's own config.json "
           "(hf_t5_config_to_moetx / hf_llama_config_to_moetx / hf_switch_config_to_moetx / "
           "hf_mixtral_config_to_moetx on load_hf's config).", conflicts)
    return sd


def _require(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------- inferring dims from trees


def _need(flat: Mapping[str, np.ndarray], key: str, purpose: str, what: str) -> np.ndarray:
    if key not in flat:
        top = sorted({k.split("/")[0] for k in flat})
        raise ConversionError(
            f"{what}: cannot infer {purpose}: the tree has no {key!r} (top-level keys: {top}).",
            hints=_hints(flat, _MOETX_HINTS),
            fix="pass cfg=... explicitly, or check that this is the right model family.")
    return flat[key]


def _num_layers(flat: Mapping[str, np.ndarray], stack: str) -> int:
    ids = [int(m.group(1)) for k in flat if (m := re.match(rf"{stack}/layers_(\d+)/", k))]
    return max(ids) + 1 if ids else 0


def _mlp_names_in(flat: Mapping[str, np.ndarray], layer: str) -> tuple[str, ...]:
    names = sorted({m.group(1) for k in flat
                    if (m := re.match(rf"{layer}/mlp/(wi(?:_\d+)?)/kernel$", k))})
    return tuple(names) or ("wi",)


# ------------------------------------------------------------------------------ activations

# moetx activation -> transformers ACT2FN name.
_MOETX_TO_HF_ACT = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu",
                    "swish": "silu", "squared_relu": "relu2"}
# transformers ACT2FN name -> moetx activation.
_HF_TO_MOETX_ACT = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                    "gelu": "gelu_exact", "silu": "silu", "swish": "silu",
                    "relu2": "squared_relu"}


# ------------------------------------------------------------------------------------ files


def _weight_files(directory: str) -> list[str]:
    names = [n for n in os.listdir(directory)
             if re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)", n)
             or n in (SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json")]
    return sorted(names)


def save_hf(state_dict: Mapping[str, Any], hf_config, out_dir: str,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[str]:
    """Writes a checkpoint `from_pretrained(out_dir)` loads: config.json plus safetensors.

    One `model.safetensors` when the weights fit in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, as
    `save_pretrained` writes them.

    Args:
      state_dict: {HF key: array} (from moetx_to_hf_t5 / moetx_to_hf_llama).
      hf_config: the matching transformers config (`architectures` is filled in when unset so
        that Auto classes pick the right head).
      out_dir: created if needed.
      max_shard_bytes: largest shard size.
      overwrite: replace weight files already in `out_dir` (otherwise refuse, so that stale
        shards never mix with new ones).
    Returns:
      The paths written.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    stale = _weight_files(out_dir)
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds weights {stale}; pass overwrite=True to "
                              "replace them or choose an empty directory.")
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    cfg = copy.deepcopy(hf_config)
    if not getattr(cfg, "architectures", None) and cfg.model_type in _ARCHITECTURES:
        cfg.architectures = [_ARCHITECTURES[cfg.model_type]]
    cfg.save_pretrained(out_dir)
    written = [os.path.join(out_dir, "config.json")]

    tensors = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        path = os.path.join(out_dir, SAFE_WEIGHTS_NAME)
        save_file(shards[0], path, metadata=metadata)
        return written + [path]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        written.append(os.path.join(out_dir, name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    path = os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME)
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return written + [path]


def load_hf(in_dir: str) -> tuple[StateDict, Any]:
    """Reads a local Hugging Face checkpoint directory: (state dict of numpy arrays, config).

    Reads `model.safetensors`, a sharded safetensors index, or (with torch installed) a legacy
    `pytorch_model.bin`. Never touches the network.
    """
    transformers = torch_env.import_transformers()

    config = transformers.AutoConfig.from_pretrained(in_dir, local_files_only=True)
    from safetensors.numpy import load_file

    single = os.path.join(in_dir, SAFE_WEIGHTS_NAME)
    index = os.path.join(in_dir, SAFE_WEIGHTS_INDEX_NAME)
    legacy = os.path.join(in_dir, "pytorch_model.bin")
    if os.path.exists(single):
        return dict(load_file(single)), config
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: StateDict = {}
        for name in files:
            state.update(load_file(os.path.join(in_dir, name)))
        return state, config
    if os.path.exists(legacy):
        torch = torch_env.import_torch()

        raw = torch.load(legacy, map_location="cpu", weights_only=True)
        return {k: _to_numpy(v) for k, v in raw.items()}, config
    raise FileNotFoundError(f"No weights in {in_dir}: expected {SAFE_WEIGHTS_NAME}, "
                            f"{SAFE_WEIGHTS_INDEX_NAME} or pytorch_model.bin; found "
                            f"{sorted(os.listdir(in_dir))}.")
