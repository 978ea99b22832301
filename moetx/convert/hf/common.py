"""The toolkit every Hugging Face family converter is built from: the `Family` record each family
module fills in, array and tree helpers, layout entries (one moetx parameter <-> one HF key), the
strict converters over a layout, hint tables for their errors, and activation names.

The conventions the converters follow are in the `moetx.convert.hf` package docstring; the
safetensors files are read and written by `moetx.convert.hf.files`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from moetx.util import torch_env, trees
from moetx.lm import scan
from moetx.lm.transformer import TransformerConfig
from moetx.convert.errors import ConversionError, check_keys, hints, missing_hf_extra

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model family and the functions that convert it, both ways.

    Attributes:
      model_type: the HF config's `model_type` ('t5', 'llama', ...).
      architecture: the transformers class of its checkpoints, written into config.json.
      config_to_moetx: HF config -> moetx `TransformerConfig`.
      config_to_hf: moetx config -> HF config; raises ValueError naming every option the
        family cannot express.
      to_moetx: (HF state dict, moetx config) -> moetx parameter tree.
      to_hf: (moetx parameter tree, moetx config) -> HF state dict.
      accepts: whether a moetx config is of this family's kind (encoder-decoder or decoder-only,
        dense or MoE), i.e. which family a moetx model is exported as.
    """

    model_type: str
    architecture: str
    config_to_moetx: Callable[[Any], TransformerConfig]
    config_to_hf: Callable[[TransformerConfig], Any]
    to_moetx: Callable[[Mapping[str, Any], TransformerConfig], Params]
    to_hf: Callable[[Mapping[str, Any], TransformerConfig], StateDict]
    accepts: Callable[[TransformerConfig], bool]


# ------------------------------------------------------------------------- optional imports


def import_transformers():
    """`import transformers` (after torch_env's triton guard); MissingDependencyError, one line
    naming `pip install 'moetx[hf]'`, when it is not installed."""
    try:
        return torch_env.import_transformers()
    except ImportError as e:
        raise missing_hf_extra("transformers", e) from None


def import_safetensors_numpy():
    """`safetensors.numpy`; MissingDependencyError naming the `hf` extra when it is missing."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise missing_hf_extra("safetensors", e) from None
    return safetensors.numpy


def require_hf_libraries() -> None:
    """Imports transformers and safetensors, so a conversion fails before it reads anything
    when the `hf` extra is missing."""
    import_transformers()
    import_safetensors_numpy()


# ----------------------------------------------------------------------------------- arrays


def to_numpy(x: Any) -> np.ndarray:
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


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested params -> {'encoder/layers_0/attention/query/kernel': numpy array} (flax boxes
    unboxed, torch tensors and jax arrays as numpy; scanned layer stacks unscanned, see
    `moetx.lm.scan`).

    Raises:
      TypeError: `params` is not a mapping.
      ConversionError: `params` is a variables dict `{'params': ...}`.
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        raise ConversionError(
            "Got a variables dict {'params': ...} where a parameter tree was expected.",
            fix="pass variables['params'] (unboxed with flax.linen.unbox if needed).")
    flat = {k: to_numpy(v) for k, v in trees.flatten(params).items()}
    return trees.flatten(scan.unscan_params(trees.unflatten(flat)))


def cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    """`x` as a fresh C-contiguous array of `dtype` (None keeps x's): the result must not alias
    the source (a torch parameter, a jax buffer), and a transposed view must become contiguous
    for safetensors."""
    return np.array(x, dtype=dtype, order="C", copy=True)


# ----------------------------------------------------------------------------------- layouts


class Dims(NamedTuple):
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


class Entry(NamedTuple):
    """One parameter: moetx path, HF key, moetx shape, and whether HF stores it transposed."""

    moetx: str
    hf: str
    shape: tuple[int, ...]
    transpose: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


class ExpertEntry(NamedTuple):
    """A stacked expert kernel: moetx `[E, in, out]` <-> E HF weights `[out, in]`, one per
    expert, under `hf.format(e=expert)`."""

    moetx: str
    hf: str  # with an `{e}` field
    shape: tuple[int, int, int]

    def hf_keys(self) -> dict[str, tuple[int, int]]:
        return {self.hf.format(e=i): self.shape[:0:-1] for i in range(self.shape[0])}


def mlp_names(activations: Sequence[str]) -> tuple[str, ...]:
    """MlpBlock's input projection names: 'wi' for one activation, else 'wi_0', 'wi_1', ..."""
    n = len(activations)
    return ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))


def dims_from_config(cfg: TransformerConfig) -> Dims:
    """The layout dimensions a moetx config gives."""
    return Dims(cfg.vocab_size, cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads,
                cfg.relative_attention_num_buckets, cfg.mlp_dim, mlp_names(cfg.mlp_activations),
                cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.logits_via_embedding)


# Hints for source keys that no target layout can hold.
MOETX_HINTS = [
    (r"_dconv/", "Primer's multi-dconv-head attention ({q,k,v}_dconv) has no Hugging Face "
                 "T5 or Llama counterpart."),
    (r"relpos_bias", "relative position bias: T5 has it, Llama uses RoPE instead."),
    (r"^(encoder|token_embedder)/", "an encoder-decoder tree: use moetx_to_hf_t5."),
    (r"/mlp/wi(_\d+)?/kernel$", "the MLP's projections (wi vs wi_0/wi_1) differ from the "
                                "config's mlp_activations (gated vs plain)."),
    (r"/mlp/(router|expert)/", "MoE layers have no dense T5/Llama counterpart."),
    (r"logits_dense", "untied logits in the tree, tied in the config (logits_via_embedding)."),
]
HF_HINTS = [
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
SWITCH_MOETX_HINTS = [h for h in MOETX_HINTS if "router|expert" not in h[0]] + [
    (r"/mlp/(router|expert)/|/mlp/w[io]/kernel$", "sparse-layer placement or expert count "
                                                  "differs between tree and config "
                                                  "(moe.sparse_every, moe.num_experts)."),
]


def moetx_to_hf(flat: Mapping[str, np.ndarray], layout: list[Entry], what: str,
                dtype: Any) -> StateDict:
    """Strict moetx -> HF conversion of a flat tree over `layout` (kernels transposed where the
    entry says so, cast to `dtype`)."""
    check_keys(f"{what}: the parameter tree does not match the expected layout.",
               {k: v.shape for k, v in flat.items()}, {e.moetx: e.shape for e in layout},
               MOETX_HINTS, "pass the TransformerConfig the tree was built with (cfg=...), and "
               "check the model family (T5 vs Llama).")
    return {e.hf: cast(flat[e.moetx].T if e.transpose else flat[e.moetx], dtype)
            for e in layout}


def hf_to_moetx(state_dict: Mapping[str, Any], layout: list[Entry], what: str,
                tied_copies: Mapping[str, str], fill_missing: Mapping[str, str],
                param_dtype: Any) -> Params:
    """Strict HF -> moetx conversion.

    Args:
      tied_copies: {copy key: source key}; a copy is accepted only if it equals its source
        exactly, and is then dropped.
      fill_missing: {key: source key}; an absent key is taken from its source (how
        transformers itself resolves a tied weight the checkpoint omits).
    """
    sd = checked_hf(state_dict, {e.hf: e.hf_shape for e in layout}, what, tied_copies,
                    fill_missing)
    return trees.unflatten({e.moetx: cast(sd[e.hf].T if e.transpose else sd[e.hf], param_dtype)
                            for e in layout})


def moetx_to_hf_experts(flat: Mapping[str, np.ndarray], plain: list[Entry],
                        experts: list[ExpertEntry], what: str, fix: str,
                        dtype: Any) -> StateDict:
    """`moetx_to_hf` for a layout with stacked experts (each expert gets its own HF keys)."""
    expected = {x.moetx: x.shape for x in plain}
    expected.update({x.moetx: x.shape for x in experts})
    check_keys(f"{what}: the parameter tree does not match the expected layout.",
               {k: v.shape for k, v in flat.items()}, expected, SWITCH_MOETX_HINTS, fix)
    out = {x.hf: cast(flat[x.moetx].T if x.transpose else flat[x.moetx], dtype) for x in plain}
    for x in experts:
        for i in range(x.shape[0]):
            out[x.hf.format(e=i)] = cast(flat[x.moetx][i].T, dtype)
    return out


def hf_to_moetx_experts(state_dict: Mapping[str, Any], plain: list[Entry],
                        experts: list[ExpertEntry], what: str,
                        tied_copies: Mapping[str, str], param_dtype: Any) -> Params:
    """`hf_to_moetx` for a layout with stacked experts (the per-expert HF weights are stacked
    on a leading axis)."""
    expected = {x.hf: x.hf_shape for x in plain}
    for x in experts:
        expected.update(x.hf_keys())
    sd = checked_hf(state_dict, expected, what, tied_copies, {})
    flat = {x.moetx: cast(sd[x.hf].T if x.transpose else sd[x.hf], param_dtype)
            for x in plain}
    for x in experts:
        flat[x.moetx] = cast(np.stack([sd[x.hf.format(e=i)].T for i in range(x.shape[0])]),
                             param_dtype)
    return trees.unflatten(flat)


def checked_hf(state_dict: Mapping[str, Any], expected: Mapping[str, tuple], what: str,
               tied_copies: Mapping[str, str], fill_missing: Mapping[str, str]) -> StateDict:
    """The state dict as numpy, tied copies dropped and fills applied, checked against
    `expected` {HF key: shape}; raises ConversionError otherwise."""
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
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
    check_keys(f"{what}: the state dict does not match the config's layout.",
               {k: v.shape for k, v in sd.items()}, expected,
               HF_HINTS, "build the config from the checkpoint's own config.json "
               "(hf_t5_config_to_moetx / hf_llama_config_to_moetx / hf_switch_config_to_moetx / "
               "hf_mixtral_config_to_moetx on load_hf's config).", conflicts)
    return sd


def block_problems(cfg: TransformerConfig, family: str) -> list[str]:
    """Options that change what a block computes without changing its parameters' names, which
    no Hugging Face family here has: a searched block program, Primer's shared QK, its norm,
    post-MLP normalisation. Exporting them would give a model that loads and computes something
    else, so every family refuses them."""
    problems = []
    if cfg.decoder_program is not None:
        problems.append(f"decoder_program is set (a searched block program, moetx.lm.programs); "
                        f"HF {family}'s blocks are fixed attention + MLP and cannot express it")
    for name, what in (("primer_share_qk", "Primer's shared QK attention"),
                       ("ffn_post_norm", "Primer's post-MLP normalisation")):
        if getattr(cfg, name):
            problems.append(f"{name}=True; HF {family} has no {what}")
    if cfg.norm_type != "rms":
        problems.append(f"norm_type={cfg.norm_type!r}; HF {family} uses RMSNorm ('rms')")
    return problems


def require(problems: list[str], what: str) -> None:
    """Raises ValueError `what: problem; problem.` when there are any problems."""
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------- inferring dims from trees


def need(flat: Mapping[str, np.ndarray], key: str, purpose: str, what: str) -> np.ndarray:
    """`flat[key]`, which `purpose` (a dimension inferred from the tree) needs; ConversionError
    when the tree lacks it (usually a tree of another model family)."""
    if key not in flat:
        top = sorted({k.split("/")[0] for k in flat})
        raise ConversionError(
            f"{what}: cannot infer {purpose}: the tree has no {key!r} (top-level keys: {top}).",
            hints=hints(flat, MOETX_HINTS),
            fix="pass cfg=... explicitly, or check that this is the right model family.")
    return flat[key]


def num_layers(flat: Mapping[str, np.ndarray], stack: str) -> int:
    """How many `{stack}/layers_<i>` the flat tree holds (highest index + 1)."""
    ids = [int(m.group(1)) for k in flat if (m := re.match(rf"{stack}/layers_(\d+)/", k))]
    return max(ids) + 1 if ids else 0


def mlp_names_in(flat: Mapping[str, np.ndarray], layer: str) -> tuple[str, ...]:
    """The MLP input projections ('wi' or 'wi_0', 'wi_1', ...) of `layer` in the flat tree."""
    names = sorted({m.group(1) for k in flat
                    if (m := re.match(rf"{layer}/mlp/(wi(?:_\d+)?)/kernel$", k))})
    return tuple(names) or ("wi",)


# ------------------------------------------------------------------------------ activations

# moetx activation -> transformers ACT2FN name.
MOETX_TO_HF_ACT = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu",
                   "swish": "silu", "squared_relu": "relu2"}
# transformers ACT2FN name -> moetx activation.
HF_TO_MOETX_ACT = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                   "gelu": "gelu_exact", "silu": "silu", "swish": "silu",
                   "relu2": "squared_relu"}


__all__ = [
    "ConversionError", "Dims", "Entry", "ExpertEntry", "Family", "HF_HINTS", "HF_TO_MOETX_ACT",
    "MOETX_HINTS", "MOETX_TO_HF_ACT", "Params", "SWITCH_MOETX_HINTS", "StateDict",
    "block_problems", "cast", "checked_hf", "dims_from_config", "flatten_params", "hf_to_moetx",
    "hf_to_moetx_experts", "import_safetensors_numpy", "import_transformers", "mlp_names",
    "mlp_names_in", "moetx_to_hf", "moetx_to_hf_experts", "need", "num_layers", "require",
    "require_hf_libraries", "to_numpy",
]
