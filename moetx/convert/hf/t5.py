"""moetx EncoderDecoder (T5.1.1 / T5 1.0) <-> transformers T5ForConditionalGeneration.

Config and weight converters both ways; see the `moetx.convert.hf` package docstring for the
conventions (no run-time attention scaling, rescaled tied logits, transformers >= 5's untied head).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from moetx.lm.transformer import TransformerConfig
from moetx.convert.hf import common
from moetx.convert.hf.common import ConversionError, Dims, Entry, Params, StateDict

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"


def layout(d: Dims) -> list[Entry]:
    """Every T5ForConditionalGeneration weight and its moetx EncoderDecoder counterpart."""
    e, j, f = d.embed, d.joined, d.mlp
    out = [Entry("token_embedder/embedding", "shared.weight", (d.vocab, e), False)]

    def norm(path: str, key: str) -> None:
        out.append(Entry(f"{path}/scale", key, (e,), False))

    def attn(path: str, key: str) -> None:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out.append(Entry(f"{path}/{ours}/kernel", f"{key}.{theirs}.weight", (e, j), True))
        out.append(Entry(f"{path}/out/kernel", f"{key}.o.weight", (j, e), True))

    def mlp(path: str, key: str) -> None:
        for name in d.mlp_names:
            out.append(Entry(f"{path}/{name}/kernel", f"{key}.{name}.weight", (e, f), True))
        out.append(Entry(f"{path}/wo/kernel", f"{key}.wo.weight", (f, e), True))

    for stack, n in (("encoder", d.enc_layers), ("decoder", d.dec_layers)):
        # One bias table per stack; HF keeps it in block 0 and shares it with later blocks.
        out.append(Entry(
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
        out.append(Entry("decoder/logits_dense/kernel", "lm_head.weight", (e, d.vocab), True))
    return out


def _t5_dims_from_params(flat: Mapping[str, np.ndarray]) -> Dims:
    what = "moetx -> HF T5"
    vocab, embed = common.need(flat, "token_embedder/embedding", "vocab and d_model", what).shape
    heads, buckets = common.need(flat, "encoder/relpos_bias/rel_embedding",
                                 "heads and relative buckets", what).shape
    joined = common.need(flat, "encoder/layers_0/attention/query/kernel", "heads*d_kv",
                         what).shape[1]
    names = common.mlp_names_in(flat, "encoder/layers_0")
    mlp = common.need(flat, f"encoder/layers_0/mlp/{names[0]}/kernel", "d_ff", what).shape[1]
    return Dims(vocab, embed, joined, heads, buckets, mlp, names,
                common.num_layers(flat, "encoder"), common.num_layers(flat, "decoder"),
                "decoder/logits_dense/kernel" not in flat)


def _t5_feed_forward_proj(activations: Sequence[str]) -> str:
    """moetx mlp_activations -> HF T5 `feed_forward_proj`."""
    acts = tuple(activations)
    if len(acts) == 1 and acts[0] in common.MOETX_TO_HF_ACT:
        return common.MOETX_TO_HF_ACT[acts[0]]
    if len(acts) == 2 and acts[1] == "linear":
        if acts[0] == "gelu":
            return "gated-gelu"  # HF maps exactly this string to the tanh gelu_new
        if acts[0] in common.MOETX_TO_HF_ACT and acts[0] != "gelu_exact":
            return f"gated-{common.MOETX_TO_HF_ACT[acts[0]]}"
    raise ValueError(
        f"mlp_activations={acts} has no HF T5 feed_forward_proj; expected one activation "
        f"from {sorted(common.MOETX_TO_HF_ACT)} or a gated pair (act, 'linear') such as "
        "('gelu', 'linear') = 'gated-gelu' (HF cannot gate the exact-erf GELU)")


def config_problems(cfg: TransformerConfig, family: str = "T5") -> list[str]:
    """What HF T5 (or `family`, a model built from T5's blocks) cannot express in `cfg`."""
    problems = common.block_problems(cfg, family)
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
    if cfg.num_kv_heads not in (None, cfg.num_heads):
        problems.append(f"num_kv_heads={cfg.num_kv_heads}; HF {family} has no grouped-query "
                        "attention (K/V heads = query heads)")
    if cfg.logits_via_embedding and not cfg.tied_logits_rescale:
        problems.append("tied logits without the d_model**-0.5 rescale; HF T5 ties with the "
                        "rescale (tied_logits_rescale=True) or not at all")
    try:
        _t5_feed_forward_proj(cfg.mlp_activations)
    except ValueError as e:
        problems.append(str(e))
    return problems


_NOT_T5 = "This moetx config cannot be expressed as a Hugging Face T5ForConditionalGeneration"


def t5_config_to_hf(cfg: TransformerConfig):
    """moetx encoder-decoder config -> `transformers.T5Config`.

    Untied logits (T5.1.1) become `tie_word_embeddings=False`, which transformers >= 5 stores as
    `scale_decoder_outputs=False`. Token ids follow T5: pad 0, EOS 1, decoder start 0 (moetx's
    BOS 0 of the shifted-right targets).

    Raises:
      ValueError: naming every option T5 cannot express (RoPE, run-time scaling, Primer, ...).
    """
    common.require(config_problems(cfg), _NOT_T5)
    transformers = common.import_transformers()

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
        architectures=[ARCHITECTURE])


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
    if act not in common.HF_TO_MOETX_ACT:
        raise ValueError(f"T5 feed_forward_proj={proj!r} (activation {act!r}) has no moetx "
                         f"activation; supported: {sorted(common.HF_TO_MOETX_ACT)}.")
    acts = (common.HF_TO_MOETX_ACT[act], "linear") if gated else (common.HF_TO_MOETX_ACT[act],)
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
    flat = common.flatten_params(params)
    if cfg is not None:
        common.require(config_problems(cfg), _NOT_T5)
        dims = common.dims_from_config(cfg)
    else:
        dims = _t5_dims_from_params(flat)
    if dims.mlp_names not in (("wi",), ("wi_0", "wi_1")):
        raise ConversionError(
            f"moetx -> HF T5: MLP projections {dims.mlp_names}; HF T5 has 'wi' or 'wi_0, wi_1'.")
    return common.moetx_to_hf(flat, layout(dims), "moetx -> HF T5", dtype)


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
    common.require(config_problems(cfg), _NOT_T5)
    tied_copies = {"encoder.embed_tokens.weight": "shared.weight",
                   "decoder.embed_tokens.weight": "shared.weight"}
    fill = {}
    if cfg.logits_via_embedding:
        tied_copies["lm_head.weight"] = "shared.weight"
    else:
        fill["lm_head.weight"] = "shared.weight"
    return common.hf_to_moetx(state_dict, layout(common.dims_from_config(cfg)), "HF T5 -> moetx",
                              tied_copies, fill, param_dtype)


def _is_t5(cfg: TransformerConfig) -> bool:
    """An encoder-decoder without MoE layers."""
    return bool(cfg.num_encoder_layers) and cfg.moe is None


FAMILY = common.Family(model_type=MODEL_TYPE, architecture=ARCHITECTURE,
                       config_to_moetx=hf_t5_config_to_moetx, config_to_hf=t5_config_to_hf,
                       to_moetx=hf_t5_to_moetx, to_hf=moetx_to_hf_t5, accepts=_is_t5)
