"""Weight conversion between moetx parameter trees and Hugging Face checkpoints.

Four model families map one to one:

    moetx EncoderDecoder (T5.1.1 / T5 1.0)          <->  transformers T5ForConditionalGeneration
    moetx DecoderOnly with RoPE, SwiGLU, run-time    <->  transformers LlamaForCausalLM
      logit scaling, untied or unscaled tied logits
    moetx sparse EncoderDecoder: top-1 tokens-choose <->  transformers
      MoE every 2nd layer, ungated experts                SwitchTransformersForConditionalGeneration
    moetx DecoderOnly MoE: Llama's options, top-k   <->  transformers MixtralForCausalLM
      renormalised gates, dropless, every layer sparse

SwitchTransformers shares T5's attention, norm, embedding and head keys (the converter reuses the
T5 layout) and differs in the MLPs: dense ones are `...mlp.{wi,wo}`, sparse ones
`...mlp.router.classifier` and `...mlp.experts.expert_{e}.{wi,wo}` per expert (moetx stacks
experts on a leading axis). HF places sparse blocks at i % step == 1, moetx at
i % sparse_every == sparse_every - 1: the same only for every 2nd (or every) layer, so other
placements are refused. HF's capacity is a fixed `expert_capacity` per sequence, moetx's a factor
per routing group; `hf_switch_config_to_moetx(hf_cfg, group_size=length)` maps one to the other
(tests/tools/test_hf_switch.py checks logits, with and without dropped tokens).

The moetx side is a nested dict of arrays with T5X names (what `nn.unbox(variables['params'])`
gives; `LogicallyPartitioned` boxes and jax arrays are accepted and unboxed). The Hugging Face side
is a flat `dict[str, np.ndarray]` state dict (torch tensors are accepted on input). All conversion
is plain numpy: no model is built and `transformers` is imported only by the config and file
helpers.

Every converter is strict. It consumes every source key, produces every target key with the
expected shape, and otherwise raises `ConversionError` listing the unexpected, missing and
wrong-shape keys with their shapes. It never returns a partial result.

Typical use:

    # moetx -> HF (loadable offline by AutoModelForSeq2SeqLM.from_pretrained('out'))
    hf.save_hf(hf.moetx_to_hf_t5(params, cfg), hf.t5_config_to_hf(cfg), 'out')
    # HF -> moetx
    state_dict, hf_cfg = hf.load_hf('t5-v1_1-small')
    cfg = hf.hf_t5_config_to_moetx(hf_cfg)
    params = hf.hf_t5_to_moetx(state_dict, cfg)  # feed to EncoderDecoderModel(cfg).logits

Conventions that need no weight surgery (tests/tools/test_hf.py checks each against HF logits):
- T5 attention scales nothing at run time: both T5X and HF T5 fold 1/sqrt(d_kv) into the query
  weights. Llama scales at run time, which is moetx's `scale_attention_logits=True`.
- RoPE: moetx and HF Llama both use the "rotate half" layout (channel i pairs with i + d_kv/2) and
  inv_freq = theta^(-2i/d_kv). HF-native q/k weights need no permutation; Meta's original
  checkpoints do, but HF's own importer applies that permutation, so HF checkpoints don't.
- Tied T5 logits are rescaled by d_model^-0.5 on both sides (moetx `tied_logits_rescale=True`).
  Llama ties without rescaling (`tied_logits_rescale=False`).
- moetx 'gelu' is the tanh approximation, HF 'gelu_new'. HF T5's 'gated-gelu' also means
  gelu_new. HF's plain 'gelu' is the exact erf GELU, moetx 'gelu_exact'.

transformers >= 5 quirk (T5): `T5Config` forces `tie_word_embeddings=True` and records T5.1.1's
untied, unscaled head as `scale_decoder_outputs=False`. So a T5 built from a config keeps lm_head
tied to `shared.weight` in memory, and `save_pretrained` then omits `lm_head.weight`. Its
logits are `shared` applied without rescale. `hf_t5_to_moetx` therefore reads an untied config
whose state dict lacks `lm_head.weight` the way transformers itself loads it: the head is
`shared.weight`. Checkpoints with a real separate head (the published T5.1.1 ones) carry the key
and use it. Loading such a checkpoint (or one from `save_hf`) with `from_pretrained` prints
transformers' "both are present ... will NOT tie them" warning; that is the untied head being
kept, as intended.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

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
            import torch

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


def _unflatten(flat: Mapping[str, np.ndarray]) -> Params:
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


def _mlp_names(activations: Sequence[str]) -> tuple[str, ...]:
    # MlpBlock names its input projections 'wi' for one activation, else 'wi_0', 'wi_1', ...
    n = len(activations)
    return ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))


def _dims_from_config(cfg: TransformerConfig) -> _Dims:
    return _Dims(cfg.vocab_size, cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads,
                 cfg.relative_attention_num_buckets, cfg.mlp_dim, _mlp_names(cfg.mlp_activations),
                 cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.logits_via_embedding)


def _t5_layout(d: _Dims) -> list[_Entry]:
    """Every T5ForConditionalGeneration weight and its moetx EncoderDecoder counterpart."""
    e, j, f = d.embed, d.joined, d.mlp
    out = [_Entry("token_embedder/embedding", "shared.weight", (d.vocab, e), False)]

    def norm(path: str, key: str) -> None:
        out.append(_Entry(f"{path}/scale", key, (e,), False))

    def attn(path: str, key: str) -> None:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out.append(_Entry(f"{path}/{ours}/kernel", f"{key}.{theirs}.weight", (e, j), True))
        out.append(_Entry(f"{path}/out/kernel", f"{key}.o.weight", (j, e), True))

    def mlp(path: str, key: str) -> None:
        for name in d.mlp_names:
            out.append(_Entry(f"{path}/{name}/kernel", f"{key}.{name}.weight", (e, f), True))
        out.append(_Entry(f"{path}/wo/kernel", f"{key}.wo.weight", (f, e), True))

    for stack, n in (("encoder", d.enc_layers), ("decoder", d.dec_layers)):
        # One bias table per stack; HF keeps it in block 0 and shares it with later blocks.
        out.append(_Entry(
            f"{stack}/relpos_bias/rel_embedding",
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (d.heads, d.buckets), True))
        for i in range(n):
            m, h = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            if stack == "encoder":
                norm(f"{m}/pre_attention_layer_norm", f"{h}.0.layer_norm.weight")
                attn(f"{m}/attention", f"{h}.0.SelfAttention")
                norm(f"{m}/pre_mlp_layer_norm", f"{h}.1.layer_norm.weight")
                mlp(f"{m}/mlp", f"{h}.1.DenseReluDense")
            else:
                norm(f"{m}/pre_self_attention_layer_norm", f"{h}.0.layer_norm.weight")
                attn(f"{m}/self_attention", f"{h}.0.SelfAttention")
                norm(f"{m}/pre_cross_attention_layer_norm", f"{h}.1.layer_norm.weight")
                attn(f"{m}/encoder_decoder_attention", f"{h}.1.EncDecAttention")
                norm(f"{m}/pre_mlp_layer_norm", f"{h}.2.layer_norm.weight")
                mlp(f"{m}/mlp", f"{h}.2.DenseReluDense")
        norm(f"{stack}/{stack}_norm", f"{stack}.final_layer_norm.weight")
    if not d.tied:
        out.append(_Entry("decoder/logits_dense/kernel", "lm_head.weight", (e, d.vocab), True))
    return out


def _llama_layout(d: _Dims) -> list[_Entry]:
    """Every LlamaForCausalLM weight and its moetx DecoderOnly counterpart."""
    e, j, f = d.embed, d.joined, d.mlp
    out = [_Entry("decoder/token_embedder/embedding", "model.embed_tokens.weight",
                  (d.vocab, e), False)]
    for i in range(d.dec_layers):
        m, h = f"decoder/layers_{i}", f"model.layers.{i}"
        out.append(_Entry(f"{m}/pre_self_attention_layer_norm/scale",
                          f"{h}.input_layernorm.weight", (e,), False))
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out.append(_Entry(f"{m}/self_attention/{ours}/kernel",
                              f"{h}.self_attn.{theirs}_proj.weight", (e, j), True))
        out.append(_Entry(f"{m}/self_attention/out/kernel", f"{h}.self_attn.o_proj.weight",
                          (j, e), True))
        out.append(_Entry(f"{m}/pre_mlp_layer_norm/scale",
                          f"{h}.post_attention_layernorm.weight", (e,), False))
        for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj")):
            out.append(_Entry(f"{m}/mlp/{ours}/kernel", f"{h}.mlp.{theirs}.weight", (e, f), True))
        out.append(_Entry(f"{m}/mlp/wo/kernel", f"{h}.mlp.down_proj.weight", (f, e), True))
    out.append(_Entry("decoder/decoder_norm/scale", "model.norm.weight", (e,), False))
    if not d.tied:
        out.append(_Entry("decoder/logits_dense/kernel", "lm_head.weight", (e, d.vocab), True))
    return out


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


def _t5_dims_from_params(flat: Mapping[str, np.ndarray]) -> _Dims:
    what = "moetx -> HF T5"
    vocab, embed = _need(flat, "token_embedder/embedding", "vocab and d_model", what).shape
    heads, buckets = _need(flat, "encoder/relpos_bias/rel_embedding",
                           "heads and relative buckets", what).shape
    joined = _need(flat, "encoder/layers_0/attention/query/kernel", "heads*d_kv", what).shape[1]
    names = _mlp_names_in(flat, "encoder/layers_0")
    mlp = _need(flat, f"encoder/layers_0/mlp/{names[0]}/kernel", "d_ff", what).shape[1]
    return _Dims(vocab, embed, joined, heads, buckets, mlp, names, _num_layers(flat, "encoder"),
                 _num_layers(flat, "decoder"), "decoder/logits_dense/kernel" not in flat)


def _llama_dims_from_params(flat: Mapping[str, np.ndarray]) -> _Dims:
    what = "moetx -> HF Llama"
    vocab, embed = _need(flat, "decoder/token_embedder/embedding", "vocab and d_model",
                         what).shape
    joined = _need(flat, "decoder/layers_0/self_attention/query/kernel", "heads*d_kv",
                   what).shape[1]
    mlp = _need(flat, "decoder/layers_0/mlp/wi_0/kernel", "the SwiGLU width", what).shape[1]
    # The head split is not visible in the weights (q_proj is [heads*d_kv, d] either way); it
    # lives in the HF config, which llama_config_to_hf writes from the moetx config.
    return _Dims(vocab, embed, joined, 1, 0, mlp, ("wi_0", "wi_1"), 0,
                 _num_layers(flat, "decoder"), "decoder/logits_dense/kernel" not in flat)


# ------------------------------------------------------------------------------ activations

# moetx activation -> transformers ACT2FN name.
_MOETX_TO_HF_ACT = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu",
                    "swish": "silu", "squared_relu": "relu2"}
# transformers ACT2FN name -> moetx activation.
_HF_TO_MOETX_ACT = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                    "gelu": "gelu_exact", "silu": "silu", "swish": "silu",
                    "relu2": "squared_relu"}


def _t5_feed_forward_proj(activations: Sequence[str]) -> str:
    """moetx mlp_activations -> HF T5 `feed_forward_proj`."""
    acts = tuple(activations)
    if len(acts) == 1 and acts[0] in _MOETX_TO_HF_ACT:
        return _MOETX_TO_HF_ACT[acts[0]]
    if len(acts) == 2 and acts[1] == "linear":
        if acts[0] == "gelu":
            return "gated-gelu"  # HF maps exactly this string to the tanh gelu_new
        if acts[0] in _MOETX_TO_HF_ACT and acts[0] != "gelu_exact":
            return f"gated-{_MOETX_TO_HF_ACT[acts[0]]}"
    raise ValueError(
        f"mlp_activations={acts} has no HF T5 feed_forward_proj; expected one activation "
        f"from {sorted(_MOETX_TO_HF_ACT)} or a gated pair (act, 'linear') such as "
        "('gelu', 'linear') = 'gated-gelu' (HF cannot gate the exact-erf GELU)")


# ------------------------------------------------------------------------------------ T5


def _t5_problems(cfg: TransformerConfig) -> list[str]:
    problems = []
    if cfg.num_encoder_layers <= 0:
        problems.append("num_encoder_layers=0 is decoder-only, T5ForConditionalGeneration needs "
                        "an encoder (export decoder-only models with llama_config_to_hf)")
    if cfg.position_embedding != "relative":
        problems.append(f"position_embedding={cfg.position_embedding!r}; HF T5 has only the "
                        "relative position bias")
    if cfg.scale_attention_logits:
        problems.append("scale_attention_logits=True; HF T5 never scales logits at run time")
    if cfg.primer_dconv:
        problems.append("primer_dconv=True; HF T5 has no depthwise-conv attention")
    if cfg.logits_via_embedding and not cfg.tied_logits_rescale:
        problems.append("tied logits without the d_model**-0.5 rescale; HF T5 ties with the "
                        "rescale (tied_logits_rescale=True) or not at all")
    try:
        _t5_feed_forward_proj(cfg.mlp_activations)
    except ValueError as e:
        problems.append(str(e))
    return problems


def _require(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


_NOT_T5 = "This moetx config cannot be expressed as a Hugging Face T5ForConditionalGeneration"
_NOT_LLAMA = "This moetx config cannot be expressed as a Hugging Face LlamaForCausalLM"


def t5_config_to_hf(cfg: TransformerConfig):
    """moetx encoder-decoder config -> `transformers.T5Config`.

    Untied logits (T5.1.1) become `tie_word_embeddings=False`, which transformers >= 5 stores as
    `scale_decoder_outputs=False`. Token ids follow T5: pad 0, EOS 1, decoder start 0 (moetx's
    BOS 0 of the shifted-right targets).

    Raises:
      ValueError: naming every option T5 cannot express (RoPE, run-time scaling, Primer, ...).
    """
    _require(_t5_problems(cfg), _NOT_T5)
    import transformers

    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.norm_epsilon,
        feed_forward_proj=_t5_feed_forward_proj(cfg.mlp_activations),
        tie_word_embeddings=cfg.logits_via_embedding, is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        architectures=[_ARCHITECTURES["t5"]])


def hf_t5_config_to_moetx(hf_cfg, **overrides) -> TransformerConfig:
    """`transformers.T5Config` -> moetx encoder-decoder config.

    Args:
      hf_cfg: a T5Config (e.g. the one `load_hf` returns).
      **overrides: TransformerConfig fields to set on top, e.g. `dtype='bfloat16'`.
    """
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "t5":
        raise ValueError(f"Expected a T5 config (model_type 't5'), found {model_type!r}.")
    # transformers derives dense_act_fn / is_gated_act from feed_forward_proj, with the
    # 'gated-gelu' -> gelu_new special case; recompute them for configs that lack the fields.
    proj = hf_cfg.feed_forward_proj
    gated = getattr(hf_cfg, "is_gated_act", proj.startswith("gated-"))
    act = getattr(hf_cfg, "dense_act_fn", None) or proj.split("-")[-1]
    if proj == "gated-gelu":
        act = "gelu_new"
    if act not in _HF_TO_MOETX_ACT:
        raise ValueError(f"T5 feed_forward_proj={proj!r} (activation {act!r}) has no moetx "
                         f"activation; supported: {sorted(_HF_TO_MOETX_ACT)}.")
    acts = (_HF_TO_MOETX_ACT[act], "linear") if gated else (_HF_TO_MOETX_ACT[act],)
    # transformers >= 5 records T5.1.1's untied head as scale_decoder_outputs=False and always
    # sets tie_word_embeddings=True; older versions have only tie_word_embeddings.
    tied = bool(getattr(hf_cfg, "scale_decoder_outputs", hf_cfg.tie_word_embeddings))
    fields = dict(
        vocab_size=hf_cfg.vocab_size, emb_dim=hf_cfg.d_model, num_heads=hf_cfg.num_heads,
        head_dim=hf_cfg.d_kv, mlp_dim=hf_cfg.d_ff, num_encoder_layers=hf_cfg.num_layers,
        num_decoder_layers=hf_cfg.num_decoder_layers or hf_cfg.num_layers,
        dropout_rate=float(hf_cfg.dropout_rate), mlp_activations=acts,
        logits_via_embedding=tied, tied_logits_rescale=True, position_embedding="relative",
        relative_attention_num_buckets=hf_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=hf_cfg.relative_attention_max_distance,
        scale_attention_logits=False, primer_dconv=False,
        norm_epsilon=float(hf_cfg.layer_norm_epsilon))
    fields.update(overrides)
    return TransformerConfig(**fields)


def moetx_to_hf_t5(params: Mapping[str, Any], cfg: TransformerConfig | None = None,
                   dtype: Any = None) -> StateDict:
    """moetx EncoderDecoder params -> T5ForConditionalGeneration state dict.

    Args:
      params: the nested parameter tree (`token_embedder`, `encoder`, `decoder`).
      cfg: the config the tree was built with; checked for T5 compatibility and used for the
        expected shapes. Without it the dims are read off the tree (the activation function is
        not in the weights: pair the result with `t5_config_to_hf(cfg)`).
      dtype: output dtype (e.g. np.float16 or ml_dtypes.bfloat16); None keeps the input's.
    Returns:
      {HF key: array}: `shared.weight [vocab, d]`, kernels transposed to `[out, in]`, the two
      relative bias tables `[buckets, heads]` in block 0, and `lm_head.weight [vocab, d]` only
      when the logits are untied. The tied copies `{encoder,decoder}.embed_tokens.weight` are
      left out, as `save_pretrained` does.
    Raises:
      ConversionError: the tree has leftover, missing or wrong-shape parameters.
      ValueError: `cfg` uses options T5 cannot express.
    """
    flat = _flatten_params(params)
    if cfg is not None:
        _require(_t5_problems(cfg), _NOT_T5)
        dims = _dims_from_config(cfg)
    else:
        dims = _t5_dims_from_params(flat)
    if dims.mlp_names not in (("wi",), ("wi_0", "wi_1")):
        raise ConversionError(
            f"moetx -> HF T5: MLP projections {dims.mlp_names}; HF T5 has 'wi' or 'wi_0, wi_1'.")
    return _moetx_to_hf(flat, _t5_layout(dims), "moetx -> HF T5", dtype)


def hf_t5_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                   param_dtype: Any = np.float32) -> Params:
    """T5ForConditionalGeneration state dict -> moetx EncoderDecoder params.

    Accepts `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (and, for tied
    configs, `lm_head.weight`) only as exact copies of `shared.weight`. For an untied config a
    missing `lm_head.weight` is read as `shared.weight`, as transformers >= 5 loads it (see the
    module docstring).

    Args:
      state_dict: {HF key: array or torch tensor}.
      cfg: the matching moetx config (`hf_t5_config_to_moetx(hf_config)`).
      param_dtype: dtype of the returned params (float32, moetx's parameter dtype); None keeps
        the checkpoint's.
    Returns:
      The nested moetx parameter tree, numpy arrays.
    Raises:
      ConversionError: unexpected, missing, wrong-shape keys, or tied copies that differ.
    """
    _require(_t5_problems(cfg), _NOT_T5)
    tied_copies = {"encoder.embed_tokens.weight": "shared.weight",
                   "decoder.embed_tokens.weight": "shared.weight"}
    fill = {}
    if cfg.logits_via_embedding:
        tied_copies["lm_head.weight"] = "shared.weight"
    else:
        fill["lm_head.weight"] = "shared.weight"
    return _hf_to_moetx(state_dict, _t5_layout(_dims_from_config(cfg)), "HF T5 -> moetx",
                        tied_copies, fill, param_dtype)


# --------------------------------------------------------------------------------- Llama


def _llama_problems(cfg: TransformerConfig) -> list[str]:
    problems = []
    if cfg.num_encoder_layers > 0:
        problems.append("an encoder-decoder (num_encoder_layers > 0); Llama is decoder-only "
                        "(use t5_config_to_hf)")
    if cfg.position_embedding != "rope":
        problems.append(f"position_embedding={cfg.position_embedding!r}; Llama needs 'rope' (it "
                        "has no relative position bias)")
    if not cfg.scale_attention_logits:
        problems.append("scale_attention_logits=False; Llama scales logits by d_kv**-0.5 at "
                        "run time (set scale_attention_logits=True)")
    if cfg.primer_dconv:
        problems.append("primer_dconv=True; Llama has no depthwise-conv attention")
    if tuple(cfg.mlp_activations) not in (("silu", "linear"), ("swish", "linear")):
        problems.append(f"mlp_activations={tuple(cfg.mlp_activations)}; Llama's MLP is SwiGLU "
                        "('silu', 'linear')")
    if cfg.logits_via_embedding and cfg.tied_logits_rescale:
        problems.append("tied logits with the d_model**-0.5 rescale; Llama ties without it "
                        "(set tied_logits_rescale=False)")
    if cfg.dropout_rate:
        problems.append(f"dropout_rate={cfg.dropout_rate}; Llama has no residual or MLP dropout "
                        "(dropout does not change inference: export with "
                        "dataclasses.replace(cfg, dropout_rate=0.0))")
    if cfg.emb_dim % cfg.num_heads:
        problems.append(f"emb_dim={cfg.emb_dim} is not a multiple of num_heads={cfg.num_heads}, "
                        "which LlamaConfig requires even with an explicit head_dim")
    return problems


def llama_config_to_hf(cfg: TransformerConfig, max_position_embeddings: int = 2048):
    """moetx decoder-only config -> `transformers.LlamaConfig` (no grouped KV heads).

    Token ids follow moetx's vocabularies: pad 0, EOS 1, and BOS 0 (the first decoder input of
    the shifted-right targets). `max_position_embeddings` only sizes HF's RoPE cache; moetx's
    rotary embedding has no length limit.

    Raises:
      ValueError: naming every option Llama cannot express.
    """
    _require(_llama_problems(cfg), _NOT_LLAMA)
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.logits_via_embedding, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        architectures=[_ARCHITECTURES["llama"]])


def _llama_rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None)  # transformers >= 5
    if params is None:
        scaling = getattr(hf_cfg, "rope_scaling", None)
        params = {"rope_type": (scaling or {}).get("rope_type", "default"),
                  "rope_theta": getattr(hf_cfg, "rope_theta", 10000.0)}
    if "rope_type" not in params and "rope_theta" not in params:
        raise ValueError(f"Per-layer-type rope_parameters {params} are not supported.")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={params['rope_type']!r} (RoPE scaling) has no moetx "
                         "counterpart; moetx implements the default rotary embedding only.")
    return float(params["rope_theta"])


def hf_llama_config_to_moetx(hf_cfg, **overrides) -> TransformerConfig:
    """`transformers.LlamaConfig` -> moetx decoder-only config (RoPE, SwiGLU, run-time scaling).

    Args:
      hf_cfg: a LlamaConfig.
      **overrides: TransformerConfig fields to set on top, e.g. `dtype='bfloat16'`.
    Raises:
      ValueError: grouped KV heads, biases, RoPE scaling, another activation, or attention
        dropout, none of which moetx's decoder has.
    """
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"Expected a Llama config (model_type 'llama'), found {model_type!r}.")
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    problems = []
    if kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} != num_attention_heads={heads} "
                        "(moetx attention has no grouped KV heads)")
    if hf_cfg.hidden_act not in ("silu", "swish"):
        problems.append(f"hidden_act={hf_cfg.hidden_act!r} (moetx maps only SwiGLU 'silu')")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias (moetx layers are bias-free)")
    if getattr(hf_cfg, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={hf_cfg.attention_dropout} (moetx's dropout_rate "
                        "also drops residuals; set it through overrides instead)")
    try:
        theta = _llama_rope_theta(hf_cfg)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
    _require(problems, "This Llama config has no moetx DecoderOnly counterpart")
    fields = dict(
        vocab_size=hf_cfg.vocab_size, emb_dim=hf_cfg.hidden_size, num_heads=heads,
        head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads,
        mlp_dim=hf_cfg.intermediate_size, num_encoder_layers=0,
        num_decoder_layers=hf_cfg.num_hidden_layers, dropout_rate=0.0,
        mlp_activations=("silu", "linear"), logits_via_embedding=bool(hf_cfg.tie_word_embeddings),
        tied_logits_rescale=False, position_embedding="rope", rope_theta=theta,
        scale_attention_logits=True, primer_dconv=False, norm_epsilon=float(hf_cfg.rms_norm_eps))
    fields.update(overrides)
    return TransformerConfig(**fields)


def moetx_to_hf_llama(params: Mapping[str, Any], cfg: TransformerConfig | None = None,
                      dtype: Any = None) -> StateDict:
    """moetx DecoderOnly params -> LlamaForCausalLM state dict.

    Args:
      params: the nested tree under `decoder` (token_embedder, layers_i, decoder_norm,
        logits_dense when untied).
      cfg: the config the tree was built with (checked for Llama compatibility); without it the
        dims are read off the tree and the head split comes from `llama_config_to_hf(cfg)`.
      dtype: output dtype; None keeps the input's.
    Returns:
      {HF key: array} with kernels transposed to `[out, in]`; `lm_head.weight` only when untied.
    Raises:
      ConversionError: leftover (e.g. Primer dconv, relative bias), missing or wrong-shape keys.
    """
    flat = _flatten_params(params)
    if cfg is not None:
        _require(_llama_problems(cfg), _NOT_LLAMA)
        dims = _dims_from_config(cfg)
    else:
        dims = _llama_dims_from_params(flat)
    return _moetx_to_hf(flat, _llama_layout(dims), "moetx -> HF Llama", dtype)


def hf_llama_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                      param_dtype: Any = np.float32) -> Params:
    """LlamaForCausalLM state dict -> moetx DecoderOnly params.

    For a tied config, `lm_head.weight` is accepted only as an exact copy of
    `model.embed_tokens.weight` (as `model.state_dict()` returns it).

    Raises:
      ConversionError: unexpected (e.g. biases), missing or wrong-shape keys.
    """
    _require(_llama_problems(cfg), _NOT_LLAMA)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.logits_via_embedding else {}
    return _hf_to_moetx(state_dict, _llama_layout(_dims_from_config(cfg)), "HF Llama -> moetx",
                        tied, {}, param_dtype)


# ------------------------------------------------------------------------ SwitchTransformers


class _ExpertEntry(NamedTuple):
    """A stacked expert kernel: moetx `[E, in, out]` <-> E HF weights `[out, in]`, one per
    expert, under `hf.format(e=expert)`."""

    moetx: str
    hf: str  # with an `{e}` field
    shape: tuple[int, int, int]

    def hf_keys(self) -> dict[str, tuple[int, int]]:
        return {self.hf.format(e=i): self.shape[:0:-1] for i in range(self.shape[0])}


def _hf_sparse_layers(num_layers: int, num_sparse: int) -> set[int]:
    """The blocks `SwitchTransformersStack` makes sparse (transformers' own rule, including its
    'no sparse layers' hack, which makes layer 1 sparse once there are two or more layers)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return set()
    return {i for i in range(num_layers) if i % step == 1 or step == 1}


def _moetx_sparse_layers(cfg: TransformerConfig, num_layers: int) -> set[int]:
    return {i for i in range(num_layers) if cfg.moe is not None and cfg.moe.is_sparse(i)}


def _switch_num_sparse(cfg: TransformerConfig, num_layers: int) -> int:
    """`num_sparse_*_layers` for a stack, when HF's placement reproduces moetx's, else -1."""
    want = _moetx_sparse_layers(cfg, num_layers)
    for n in range(num_layers + 1):
        if _hf_sparse_layers(num_layers, n) == want:
            return n
    return -1


def _switch_problems(cfg: TransformerConfig) -> list[str]:
    problems = [p for p in _t5_problems(cfg) if "mlp_activations" not in p]
    for name, what in (("primer_share_qk", "Primer's shared QK attention"),
                       ("ffn_post_norm", "Primer's post-MLP normalisation")):
        if getattr(cfg, name):
            problems.append(f"{name}=True; HF SwitchTransformers has no {what}")
    if cfg.norm_type != "rms":
        problems.append(f"norm_type={cfg.norm_type!r}; HF SwitchTransformers uses T5's RMSNorm")
    acts = tuple(cfg.mlp_activations)
    if len(acts) != 1 or acts[0] not in _MOETX_TO_HF_ACT:
        problems.append(f"mlp_activations={acts}; HF SwitchTransformers' dense MLPs and experts "
                        f"are ungated (wi, act, wo): one activation from {sorted(_MOETX_TO_HF_ACT)}"
                        ", e.g. ('relu',)")
    moe = cfg.moe
    if moe is None:
        problems.append("moe=None (a dense model); export it with t5_config_to_hf")
        return problems
    if moe.num_selected_experts != 1:
        problems.append(f"num_selected_experts={moe.num_selected_experts}; HF "
                        "SwitchTransformers routes top-1 only")
    if moe.router_type != "tokens_choose":
        problems.append(f"router_type={moe.router_type!r}; HF SwitchTransformers has only "
                        "tokens-choose routing")
    if moe.batch_prioritized_routing:
        problems.append("batch_prioritized_routing=True; HF SwitchTransformers fills expert "
                        "capacity in sequence order (no BPR)")
    if moe.renormalize_top_k_gates:
        problems.append("renormalize_top_k_gates=True; HF SwitchTransformers gates with the raw "
                        "router probability")
    if moe.extra_mlp:
        problems.append("extra_mlp=True (ST-MoE's dense FFN after each sparse one); HF "
                        "SwitchTransformers has no such layer")
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        if _switch_num_sparse(cfg, n) < 0:
            problems.append(
                f"sparse_every={moe.sparse_every} makes {stack} layers "
                f"{sorted(_moetx_sparse_layers(cfg, n))} of {n} sparse (i % {moe.sparse_every} "
                f"== {moe.sparse_every - 1 if moe.sparse_every else '-'}); HF SwitchTransformers "
                "places sparse layers at i % step == 1 with step = num_layers // num_sparse, "
                "which matches only for sparse_every 2 (or 1) and a stack of two or more layers"
                " (e.g. sparse_every 4 gives moetx layers 3, 7, ... but HF layers 1, 5, ...)")
    return problems


_NOT_SWITCH = ("This moetx config cannot be expressed as a Hugging Face "
               "SwitchTransformersForConditionalGeneration")


def switch_config_to_hf(cfg: TransformerConfig, expert_capacity: int | None = None):
    """moetx sparse encoder-decoder config -> `transformers.SwitchTransformersConfig`.

    HF's `expert_capacity` is a fixed number of slots per expert per *sequence*; moetx's is
    `max(round(CF * tokens_per_group / E), min_expert_capacity)` per routing *group*. Without
    `expert_capacity` the HF capacity is moetx's evaluation capacity for one full group of
    `moe.group_size` tokens, which is the same thing when groups are sequences of that length.
    Router jitter (moetx `jitter_noise`) is training-only on both sides.

    Raises:
      ValueError: naming every option HF SwitchTransformers cannot express (top-2, gated
        experts, extra_mlp, BPR, a sparse placement other than every 2nd layer, ...).
    """
    _require(_switch_problems(cfg), _NOT_SWITCH)
    import transformers

    from moetx.moe import routing

    moe = cfg.moe
    if expert_capacity is None:
        expert_capacity = routing.expert_capacity(moe.group_size, moe.num_experts,
                                                  moe.eval_capacity_factor,
                                                  moe.min_expert_capacity)
    return transformers.SwitchTransformersConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        expert_capacity=int(expert_capacity), num_layers=cfg.num_encoder_layers,
        num_sparse_encoder_layers=_switch_num_sparse(cfg, cfg.num_encoder_layers),
        num_decoder_layers=cfg.num_decoder_layers,
        num_sparse_decoder_layers=_switch_num_sparse(cfg, cfg.num_decoder_layers),
        num_heads=cfg.num_heads, num_experts=moe.num_experts, router_bias=False,
        router_jitter_noise=float(moe.jitter_noise), router_dtype="float32",
        router_ignore_padding_tokens=False,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.norm_epsilon,
        router_z_loss_coef=float(moe.router_z_loss_factor),
        router_aux_loss_coef=float(moe.aux_loss_factor),
        dense_act_fn=_MOETX_TO_HF_ACT[cfg.mlp_activations[0]],
        tie_word_embeddings=cfg.logits_via_embedding, is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        architectures=[_ARCHITECTURES["switch_transformers"]])


def hf_switch_config_to_moetx(hf_cfg, group_size: int | None = None,
                              moe_overrides: Mapping[str, Any] | None = None,
                              **overrides) -> TransformerConfig:
    """`transformers.SwitchTransformersConfig` -> moetx sparse encoder-decoder config.

    Top-1 tokens-choose routing with raw-probability gates, no BPR, masked dispatch, one
    ungated activation, sparse every 2nd layer (or every layer) in both stacks.

    Capacity: HF gives each expert `expert_capacity` slots per sequence. With `group_size` (the
    sequence length you will run), moetx routes groups of that many tokens (one sequence per
    group when sequences are that long, as in HF) and both capacity factors are set so that
    capacity = `expert_capacity` for any group of up to `group_size` tokens
    (`min_expert_capacity = expert_capacity`, CF = expert_capacity * E / group_size). Without it
    the capacity fields keep MoeConfig's defaults (CF 1.25 / 2.0 per group); results then match
    HF only while no token is dropped on either side.

    Args:
      hf_cfg: a SwitchTransformersConfig.
      group_size: see above.
      moe_overrides: MoeConfig fields to set on top (e.g. `eval_capacity_factor`, `dispatch`).
      **overrides: TransformerConfig fields to set on top, e.g. `dtype='bfloat16'`.
    Raises:
      ValueError: a sparse placement moetx cannot reproduce (HF's `i % step == 1` with a step
        other than 1 or 2), router biases, a non-float32 router, or an unknown activation.
    """
    from moetx.moe.layers import MoeConfig

    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "switch_transformers":
        raise ValueError("Expected a SwitchTransformers config (model_type "
                         f"'switch_transformers'), found {model_type!r}.")
    problems = []
    act = hf_cfg.dense_act_fn
    if act not in _HF_TO_MOETX_ACT:
        problems.append(f"dense_act_fn={act!r} has no moetx activation (supported: "
                        f"{sorted(_HF_TO_MOETX_ACT)})")
    if hf_cfg.router_bias:
        problems.append("router_bias=True (moetx's router is bias-free)")
    if str(hf_cfg.router_dtype) != "float32":
        problems.append(f"router_dtype={hf_cfg.router_dtype!r} (moetx's router always computes "
                        "in float32)")
    enc_n = hf_cfg.num_layers
    dec_n = hf_cfg.num_decoder_layers if hf_cfg.num_decoder_layers is not None else enc_n
    enc = _hf_sparse_layers(enc_n, hf_cfg.num_sparse_encoder_layers)
    dec = _hf_sparse_layers(dec_n, hf_cfg.num_sparse_decoder_layers)
    every = [k for k in range(1, max(enc_n, dec_n) + 1)
             if enc == {i for i in range(enc_n) if i % k == k - 1}
             and dec == {i for i in range(dec_n) if i % k == k - 1}]
    if not every:
        problems.append(f"sparse encoder layers {sorted(enc)} and decoder layers {sorted(dec)} "
                        "(HF's i % step == 1) are not moetx's i % sparse_every == sparse_every - "
                        "1 for one sparse_every shared by both stacks")
    _require(problems, "This SwitchTransformers config has no moetx EncoderDecoder counterpart")
    moe_fields: dict[str, Any] = dict(
        num_experts=hf_cfg.num_experts, num_selected_experts=1, router_type="tokens_choose",
        dispatch="masked", batch_prioritized_routing=False,
        jitter_noise=float(hf_cfg.router_jitter_noise), renormalize_top_k_gates=False,
        aux_loss_factor=float(hf_cfg.router_aux_loss_coef),
        router_z_loss_factor=float(hf_cfg.router_z_loss_coef), sparse_every=every[0],
        extra_mlp=False)
    if group_size is not None:
        cf = hf_cfg.expert_capacity * hf_cfg.num_experts / group_size
        moe_fields.update(group_size=group_size, train_capacity_factor=cf,
                          eval_capacity_factor=cf, min_expert_capacity=hf_cfg.expert_capacity)
    moe_fields.update(moe_overrides or {})
    fields = dict(
        vocab_size=hf_cfg.vocab_size, emb_dim=hf_cfg.d_model, num_heads=hf_cfg.num_heads,
        head_dim=hf_cfg.d_kv, mlp_dim=hf_cfg.d_ff, num_encoder_layers=enc_n,
        num_decoder_layers=dec_n, dropout_rate=float(hf_cfg.dropout_rate),
        mlp_activations=(_HF_TO_MOETX_ACT[act],),
        logits_via_embedding=bool(hf_cfg.tie_word_embeddings), tied_logits_rescale=True,
        position_embedding="relative",
        relative_attention_num_buckets=hf_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=hf_cfg.relative_attention_max_distance,
        scale_attention_logits=False, primer_dconv=False,
        norm_epsilon=float(hf_cfg.layer_norm_epsilon), moe=MoeConfig(**moe_fields))
    fields.update(overrides)
    return TransformerConfig(**fields)


_T5_MLP_KEY = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.(layer\.\d)\.DenseReluDense\."
                         r"(wi|wo)\.weight$")


def _switch_layout(cfg: TransformerConfig) -> tuple[list[_Entry], list[_ExpertEntry]]:
    """Every SwitchTransformersForConditionalGeneration weight and its moetx counterpart: the
    T5 layout (embeddings, attention, norms, relative bias, head) with each dense
    `DenseReluDense` renamed `mlp` and each sparse layer's MLP replaced by the router and the
    stacked experts."""
    d = _dims_from_config(cfg)
    e, f, n_exp = d.embed, d.mlp, cfg.moe.num_experts
    sparse = {"encoder": _moetx_sparse_layers(cfg, d.enc_layers),
              "decoder": _moetx_sparse_layers(cfg, d.dec_layers)}
    plain: list[_Entry] = []
    experts: list[_ExpertEntry] = []
    for entry in _t5_layout(d):
        m = _T5_MLP_KEY.match(entry.hf)
        if m is None:
            plain.append(entry)
            continue
        stack, i, sub, name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        h = f"{stack}.block.{i}.{sub}.mlp"
        path = entry.moetx.rsplit("/", 2)[0]  # '<stack>/layers_i/mlp'
        if i not in sparse[stack]:
            plain.append(entry._replace(hf=f"{h}.{name}.weight"))
            continue
        if name == "wi":
            plain.append(_Entry(f"{path}/router/router_weights/w/kernel",
                                f"{h}.router.classifier.weight", (e, n_exp), True))
            experts.append(_ExpertEntry(f"{path}/expert/wi/kernel",
                                        f"{h}.experts.expert_{{e}}.wi.weight", (n_exp, e, f)))
        else:
            experts.append(_ExpertEntry(f"{path}/expert/wo/kernel",
                                        f"{h}.experts.expert_{{e}}.wo.weight", (n_exp, f, e)))
    return plain, experts


_SWITCH_FIX = ("build the config from the checkpoint's config.json with "
               "hf_switch_config_to_moetx (or pass the TransformerConfig the tree was built with)"
               ", and check that sparse layers and num_experts agree.")


def moetx_to_hf_switch(params: Mapping[str, Any], cfg: TransformerConfig,
                       dtype: Any = None) -> StateDict:
    """moetx sparse EncoderDecoder params -> SwitchTransformersForConditionalGeneration
    state dict.

    Shared keys (embedding, attention, norms, relative bias, untied head) are T5's. Dense
    layers' `mlp/{wi,wo}/kernel` become `....mlp.{wi,wo}.weight`; sparse layers'
    `mlp/router/router_weights/w/kernel [d, E]` becomes `....mlp.router.classifier.weight
    [E, d]` and `mlp/expert/{wi,wo}/kernel [E, in, out]` become one
    `....mlp.experts.expert_{e}.{wi,wo}.weight [out, in]` per expert. The tied copies
    `{encoder,decoder}.embed_tokens.weight` and a tied `lm_head.weight` are left out, as
    `save_pretrained` does.

    Raises:
      ValueError: `cfg` is not expressible as HF SwitchTransformers (see switch_config_to_hf).
      ConversionError: leftover, missing or wrong-shape parameters, with their shapes.
    """
    _require(_switch_problems(cfg), _NOT_SWITCH)
    flat = _flatten_params(params)
    plain, experts = _switch_layout(cfg)
    expected = {x.moetx: x.shape for x in plain}
    expected.update({x.moetx: x.shape for x in experts})
    _check("moetx -> HF SwitchTransformers: the parameter tree does not match the expected "
           "layout.", {k: v.shape for k, v in flat.items()}, expected, _SWITCH_MOETX_HINTS,
           _SWITCH_FIX)
    out = {x.hf: _cast(flat[x.moetx].T if x.transpose else flat[x.moetx], dtype) for x in plain}
    for x in experts:
        for i in range(x.shape[0]):
            out[x.hf.format(e=i)] = _cast(flat[x.moetx][i].T, dtype)
    return out


def hf_switch_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                       param_dtype: Any = np.float32) -> Params:
    """SwitchTransformersForConditionalGeneration state dict -> moetx sparse EncoderDecoder
    params (the inverse of `moetx_to_hf_switch`; per-expert weights are stacked on a leading
    expert axis).

    `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` and, for tied configs,
    `lm_head.weight` are accepted only as exact copies of `shared.weight`.

    Args:
      state_dict: {HF key: array or torch tensor}, e.g. `model.state_dict()`.
      cfg: the matching moetx config (`hf_switch_config_to_moetx(hf_config)`).
      param_dtype: dtype of the returned params; None keeps the checkpoint's.
    Raises:
      ValueError: `cfg` is not expressible as HF SwitchTransformers.
      ConversionError: unexpected (e.g. an extra expert), missing or wrong-shape keys.
    """
    _require(_switch_problems(cfg), _NOT_SWITCH)
    plain, experts = _switch_layout(cfg)
    tied = {"encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.logits_via_embedding:
        tied["lm_head.weight"] = "shared.weight"
    expected = {x.hf: x.hf_shape for x in plain}
    for x in experts:
        expected.update(x.hf_keys())
    sd = _checked_hf(state_dict, expected, "HF SwitchTransformers -> moetx", tied, {})
    flat = {x.moetx: _cast(sd[x.hf].T if x.transpose else sd[x.hf], param_dtype)
            for x in plain}
    for x in experts:
        flat[x.moetx] = _cast(np.stack([sd[x.hf.format(e=i)].T for i in range(x.shape[0])]),
                              param_dtype)
    return _unflatten(flat)


# ------------------------------------------------------------------------------------ Mixtral
#
# MixtralForCausalLM is Llama with every MLP replaced by a sparse block: a bias-free router
# `block_sparse_moe.gate` [E, d] and E SwiGLU experts `experts.{e}.{w1,w3,w2}` (gate, up, down).
# HF routes each token to its top-k experts by the float32 softmax over all E logits and
# renormalises the k chosen probabilities to sum to one, with no capacity limit; that is moetx's
# tokens-choose routing with `renormalize_top_k_gates=True` and the `dropless` dispatch, in every
# layer (`sparse_every=1`). Checkpoints written by `save_pretrained` use these per-expert keys;
# transformers >= 5 fuses them in memory (`mlp.experts.gate_up_proj [E, 2f, d]`,
# `mlp.experts.down_proj [E, d, f]`, `mlp.gate.weight`), which `hf_mixtral_to_moetx` also reads.

_NOT_MIXTRAL = "This moetx config cannot be expressed as a Hugging Face MixtralForCausalLM"
_MIXTRAL_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|"
                            r"experts\.down_proj)$")


def _mixtral_problems(cfg: TransformerConfig) -> list[str]:
    problems = _llama_problems(cfg)
    moe = cfg.moe
    if moe is None:
        return problems + ["moe=None (a dense model); export it with llama_config_to_hf"]
    if moe.sparse_every != 1:
        problems.append(f"sparse_every={moe.sparse_every} leaves dense layers between sparse "
                        "ones; every Mixtral layer is sparse (set MoeConfig.sparse_every=1)")
    if moe.router_type != "tokens_choose":
        problems.append(f"router_type={moe.router_type!r}; Mixtral routes tokens-choose top-k")
    if not moe.renormalize_top_k_gates:
        problems.append("renormalize_top_k_gates=False; Mixtral renormalises the k chosen "
                        "router probabilities to sum to 1 (set renormalize_top_k_gates=True)")
    if moe.second_expert_policy != "all":
        problems.append(f"second_expert_policy={moe.second_expert_policy!r}; Mixtral keeps every"
                        " chosen expert (second_expert_policy='all')")
    if moe.dispatch != "dropless":
        problems.append(f"dispatch={moe.dispatch!r} drops tokens beyond each expert's capacity "
                        "and Mixtral never does (set MoeConfig.dispatch='dropless': the "
                        "parameters are the same)")
    if moe.extra_mlp:
        problems.append("extra_mlp=True (ST-MoE's dense FFN after each sparse one); Mixtral has "
                        "no such layer")
    return problems


def mixtral_config_to_hf(cfg: TransformerConfig, max_position_embeddings: int = 2048):
    """moetx decoder-only MoE config -> `transformers.MixtralConfig` (no sliding window, no
    grouped KV heads). The load-balancing coefficient and router jitter carry over; Mixtral has
    no router z-loss (a training-only term, left out).

    Raises:
      ValueError: naming every option Mixtral cannot express (dense layers between sparse ones,
        un-renormalised gates, capacity-limited dispatch, ST-MoE extra MLPs, and Llama's list).
    """
    _require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    import transformers

    moe = cfg.moe
    return transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.logits_via_embedding, attention_dropout=0.0,
        sliding_window=None, num_experts_per_tok=moe.num_selected_experts,
        num_local_experts=moe.num_experts, router_aux_loss_coef=float(moe.aux_loss_factor),
        router_jitter_noise=float(moe.jitter_noise), output_router_logits=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=1,
        architectures=[_ARCHITECTURES["mixtral"]])


def hf_mixtral_config_to_moetx(hf_cfg, moe_overrides: Mapping[str, Any] | None = None,
                               **overrides) -> TransformerConfig:
    """`transformers.MixtralConfig` -> moetx decoder-only MoE config: Llama's fields plus
    top-k tokens-choose routing with renormalised gates, dropless dispatch, every layer sparse.

    Raises:
      ValueError: grouped KV heads, a sliding window, RoPE scaling or another activation.
    """
    from moetx.moe.layers import MoeConfig

    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "mixtral":
        raise ValueError(f"Expected a Mixtral config (model_type 'mixtral'), found "
                         f"{model_type!r}.")
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    problems = []
    if kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} != num_attention_heads={heads} "
                        "(moetx attention has no grouped KV heads)")
    if hf_cfg.hidden_act not in ("silu", "swish"):
        problems.append(f"hidden_act={hf_cfg.hidden_act!r} (moetx maps only SwiGLU 'silu')")
    if getattr(hf_cfg, "sliding_window", None) is not None:
        problems.append(f"sliding_window={hf_cfg.sliding_window} (moetx attends to the whole "
                        "prefix; set sliding_window=null when every sequence is shorter)")
    if getattr(hf_cfg, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={hf_cfg.attention_dropout}")
    try:
        theta = _llama_rope_theta(hf_cfg)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
    _require(problems, "This Mixtral config has no moetx DecoderOnly counterpart")
    moe_fields: dict[str, Any] = dict(
        num_experts=hf_cfg.num_local_experts, num_selected_experts=hf_cfg.num_experts_per_tok,
        router_type="tokens_choose", dispatch="dropless", renormalize_top_k_gates=True,
        second_expert_policy="all", batch_prioritized_routing=False,
        jitter_noise=float(hf_cfg.router_jitter_noise),
        aux_loss_factor=float(hf_cfg.router_aux_loss_coef), router_z_loss_factor=0.0,
        sparse_every=1, extra_mlp=False)
    moe_fields.update(moe_overrides or {})
    fields = dict(
        vocab_size=hf_cfg.vocab_size, emb_dim=hf_cfg.hidden_size, num_heads=heads,
        head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads,
        mlp_dim=hf_cfg.intermediate_size, num_encoder_layers=0,
        num_decoder_layers=hf_cfg.num_hidden_layers, dropout_rate=0.0,
        mlp_activations=("silu", "linear"), logits_via_embedding=bool(hf_cfg.tie_word_embeddings),
        tied_logits_rescale=False, position_embedding="rope", rope_theta=theta,
        scale_attention_logits=True, primer_dconv=False, norm_epsilon=float(hf_cfg.rms_norm_eps),
        moe=MoeConfig(**moe_fields))
    fields.update(overrides)
    return TransformerConfig(**fields)


def _mixtral_layout(cfg: TransformerConfig) -> tuple[list[_Entry], list[_ExpertEntry]]:
    """Llama's layout with each layer's `mlp.{gate,up,down}_proj` replaced by the router and the
    stacked experts (moetx wi_0 / wi_1 / wo = HF w1 (gate) / w3 (up) / w2 (down))."""
    d = _dims_from_config(cfg)
    n_exp = cfg.moe.num_experts
    plain = [x for x in _llama_layout(d) if ".mlp." not in x.hf]
    experts = []
    for i in range(d.dec_layers):
        m, h = f"decoder/layers_{i}/mlp", f"model.layers.{i}.block_sparse_moe"
        plain.append(_Entry(f"{m}/router/router_weights/w/kernel", f"{h}.gate.weight",
                            (d.embed, n_exp), True))
        for ours, theirs, shape in (("wi_0", "w1", (n_exp, d.embed, d.mlp)),
                                    ("wi_1", "w3", (n_exp, d.embed, d.mlp)),
                                    ("wo", "w2", (n_exp, d.mlp, d.embed))):
            experts.append(_ExpertEntry(f"{m}/expert/{ours}/kernel",
                                        f"{h}.experts.{{e}}.{theirs}.weight", shape))
    return plain, experts


def _unfuse_mixtral(state_dict: Mapping[str, Any], mlp_dim: int) -> dict[str, Any]:
    """transformers >= 5 in-memory keys -> the per-expert checkpoint keys. A fused tensor whose
    shape does not split as expected is left under its own key, for the strict check to name."""
    out = {}
    for key, value in state_dict.items():
        m = _MIXTRAL_FUSED.match(key)
        if m is None:
            out[key] = value
            continue
        h = f"model.layers.{m.group(1)}.block_sparse_moe"
        x = _to_numpy(value)
        if m.group(2) == "gate.weight":
            out[f"{h}.gate.weight"] = x
        elif m.group(2) == "experts.gate_up_proj" and x.ndim == 3 and x.shape[1] == 2 * mlp_dim:
            for e in range(x.shape[0]):
                out[f"{h}.experts.{e}.w1.weight"] = x[e, :mlp_dim]
                out[f"{h}.experts.{e}.w3.weight"] = x[e, mlp_dim:]
        elif m.group(2) == "experts.down_proj" and x.ndim == 3:
            for e in range(x.shape[0]):
                out[f"{h}.experts.{e}.w2.weight"] = x[e]
        else:
            out[key] = x
    return out


def moetx_to_hf_mixtral(params: Mapping[str, Any], cfg: TransformerConfig,
                        dtype: Any = None) -> StateDict:
    """moetx decoder-only MoE params -> MixtralForCausalLM state dict in `save_pretrained`'s
    per-expert layout: `mlp/router/router_weights/w/kernel [d, E]` -> `block_sparse_moe.gate.
    weight [E, d]`, `mlp/expert/{wi_0,wi_1,wo}/kernel [E, in, out]` -> one
    `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight [out, in]` per expert.

    Raises:
      ValueError: `cfg` is not expressible as Mixtral (see mixtral_config_to_hf).
      ConversionError: leftover, missing or wrong-shape parameters, with their shapes.
    """
    _require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    flat = _flatten_params(params)
    plain, experts = _mixtral_layout(cfg)
    expected = {x.moetx: x.shape for x in plain}
    expected.update({x.moetx: x.shape for x in experts})
    _check("moetx -> HF Mixtral: the parameter tree does not match the expected layout.",
           {k: v.shape for k, v in flat.items()}, expected, _SWITCH_MOETX_HINTS,
           "pass the TransformerConfig the tree was built with (moe.num_experts, mlp_dim).")
    out = {x.hf: _cast(flat[x.moetx].T if x.transpose else flat[x.moetx], dtype) for x in plain}
    for x in experts:
        for i in range(x.shape[0]):
            out[x.hf.format(e=i)] = _cast(flat[x.moetx][i].T, dtype)
    return out


def hf_mixtral_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                        param_dtype: Any = np.float32) -> Params:
    """MixtralForCausalLM state dict (per-expert checkpoint keys, or transformers >= 5's fused
    in-memory ones) -> moetx decoder-only MoE params, experts stacked on a leading axis.

    Raises:
      ValueError: `cfg` is not expressible as Mixtral.
      ConversionError: unexpected (e.g. an extra expert), missing or wrong-shape keys.
    """
    _require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    plain, experts = _mixtral_layout(cfg)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.logits_via_embedding else {}
    expected = {x.hf: x.hf_shape for x in plain}
    for x in experts:
        expected.update(x.hf_keys())
    sd = _checked_hf(_unfuse_mixtral(state_dict, cfg.mlp_dim), expected, "HF Mixtral -> moetx",
                     tied, {})
    flat = {x.moetx: _cast(sd[x.hf].T if x.transpose else sd[x.hf], param_dtype)
            for x in plain}
    for x in experts:
        flat[x.moetx] = _cast(np.stack([sd[x.hf.format(e=i)].T for i in range(x.shape[0])]),
                              param_dtype)
    return _unflatten(flat)


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
    import transformers

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
        import torch

        raw = torch.load(legacy, map_location="cpu", weights_only=True)
        return {k: _to_numpy(v) for k, v in raw.items()}, config
    raise FileNotFoundError(f"No weights in {in_dir}: expected {SAFE_WEIGHTS_NAME}, "
                            f"{SAFE_WEIGHTS_INDEX_NAME} or pytorch_model.bin; found "
                            f"{sorted(os.listdir(in_dir))}.")


__all__ = [
    "ConversionError", "hf_llama_config_to_moetx", "hf_llama_to_moetx", "hf_t5_config_to_moetx",
    "hf_t5_to_moetx", "llama_config_to_hf", "load_hf", "moetx_to_hf_llama", "moetx_to_hf_t5",
    "save_hf", "t5_config_to_hf", "switch_config_to_hf", "hf_switch_config_to_moetx",
    "moetx_to_hf_switch", "hf_switch_to_moetx", "mixtral_config_to_hf",
    "hf_mixtral_config_to_moetx", "moetx_to_hf_mixtral", "hf_mixtral_to_moetx",
]
