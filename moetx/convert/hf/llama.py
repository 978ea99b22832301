"""moetx DecoderOnly (RoPE, SwiGLU, run-time logit scaling) <-> transformers LlamaForCausalLM.

Config and weight converters both ways; see the `moetx.convert.hf` package docstring for the
conventions (rotate-half RoPE, unscaled tied logits). Grouped-query attention maps one to one:
moetx's `num_kv_heads` is HF's `num_key_value_heads` (`k_proj`/`v_proj` `[kv_heads*d_kv, d]`),
and both give query head h the K/V head h // (heads / kv_heads); moetx's None (as many K/V heads
as query heads) is HF's `num_key_value_heads == num_attention_heads`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moetx.lm.transformer import TransformerConfig
from moetx.convert.hf import common
from moetx.convert.hf.common import Dims, Entry, Params, StateDict

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def layout(d: Dims, kv_joined: int | None = None) -> list[Entry]:
    """Every LlamaForCausalLM weight and its moetx DecoderOnly counterpart; `kv_joined` is the
    K/V projections' width kv_heads*d_kv (None: `d.joined`, as many K/V heads as query heads)."""
    e, j, f = d.embed, d.joined, d.mlp
    kv = j if kv_joined is None else kv_joined
    out = [Entry("decoder/token_embedder/embedding", "model.embed_tokens.weight",
                 (d.vocab, e), False)]
    for i in range(d.dec_layers):
        m, h = f"decoder/layers_{i}", f"model.layers.{i}"
        out.append(Entry(f"{m}/pre_self_attention_layer_norm/scale",
                         f"{h}.input_layernorm.weight", (e,), False))
        for ours, theirs, width in (("query", "q", j), ("key", "k", kv), ("value", "v", kv)):
            out.append(Entry(f"{m}/self_attention/{ours}/kernel",
                             f"{h}.self_attn.{theirs}_proj.weight", (e, width), True))
        out.append(Entry(f"{m}/self_attention/out/kernel", f"{h}.self_attn.o_proj.weight",
                         (j, e), True))
        out.append(Entry(f"{m}/pre_mlp_layer_norm/scale",
                         f"{h}.post_attention_layernorm.weight", (e,), False))
        for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj")):
            out.append(Entry(f"{m}/mlp/{ours}/kernel", f"{h}.mlp.{theirs}.weight", (e, f), True))
        out.append(Entry(f"{m}/mlp/wo/kernel", f"{h}.mlp.down_proj.weight", (f, e), True))
    out.append(Entry("decoder/decoder_norm/scale", "model.norm.weight", (e,), False))
    if not d.tied:
        out.append(Entry("decoder/logits_dense/kernel", "lm_head.weight", (e, d.vocab), True))
    return out


def kv_joined(cfg: TransformerConfig) -> int:
    """The width kv_heads*d_kv of the K/V projections of `cfg`."""
    return (cfg.num_kv_heads or cfg.num_heads) * cfg.head_dim


def _llama_dims_from_params(flat: Mapping[str, np.ndarray]) -> tuple[Dims, int]:
    """(the layout dims, the K/V projections' width) read off a moetx tree."""
    what = "moetx -> HF Llama"
    vocab, embed = common.need(flat, "decoder/token_embedder/embedding", "vocab and d_model",
                               what).shape
    joined = common.need(flat, "decoder/layers_0/self_attention/query/kernel", "heads*d_kv",
                         what).shape[1]
    kv = common.need(flat, "decoder/layers_0/self_attention/key/kernel", "kv_heads*d_kv",
                     what).shape[1]
    mlp = common.need(flat, "decoder/layers_0/mlp/wi_0/kernel", "the SwiGLU width", what).shape[1]
    # The head split is not visible in the weights (q_proj is [heads*d_kv, d] either way); it
    # lives in the HF config, which llama_config_to_hf writes from the moetx config.
    return Dims(vocab, embed, joined, 1, 0, mlp, ("wi_0", "wi_1"), 0,
                common.num_layers(flat, "decoder"), "decoder/logits_dense/kernel" not in flat), kv


def config_problems(cfg: TransformerConfig, family: str = "Llama") -> list[str]:
    """What HF Llama (or `family`, a model built from Llama's blocks) cannot express in `cfg`."""
    problems = common.block_problems(cfg, family)
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


_NOT_LLAMA = "This moetx config cannot be expressed as a Hugging Face LlamaForCausalLM"


def llama_config_to_hf(cfg: TransformerConfig, max_position_embeddings: int = 2048):
    """moetx decoder-only config -> `transformers.LlamaConfig` (`num_key_value_heads` is
    `num_kv_heads`, or `num_heads` when that is None).

    Token ids follow moetx's vocabularies: pad 0, EOS 1, and BOS 0 (the first decoder input of
    the shifted-right targets). `max_position_embeddings` only sizes HF's RoPE cache; moetx's
    rotary embedding has no length limit.

    Raises:
      ValueError: naming every option Llama cannot express.
    """
    common.require(config_problems(cfg), _NOT_LLAMA)
    transformers = common.import_transformers()

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.logits_via_embedding, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        architectures=[ARCHITECTURE])


def rope_theta(hf_cfg) -> float:
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


def llama_like_problems(hf_cfg) -> list[str]:
    """What a Llama-style HF config (Llama, Mixtral) has that moetx's decoder does not, among
    the options both families share: K/V heads that do not divide the query heads, an
    activation other than SwiGLU's."""
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    problems = []
    if kv_heads <= 0 or heads % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads} does not divide num_attention_heads="
                        f"{heads} (each K/V head must serve a whole group of query heads)")
    if hf_cfg.hidden_act not in ("silu", "swish"):
        problems.append(f"hidden_act={hf_cfg.hidden_act!r} (moetx maps only SwiGLU 'silu')")
    return problems


def llama_like_fields(hf_cfg, theta: float) -> dict[str, Any]:
    """The TransformerConfig fields of a Llama-style HF config's dense decoder (grouped-query
    attention when `num_key_value_heads` < `num_attention_heads`)."""
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    return dict(
        vocab_size=hf_cfg.vocab_size, emb_dim=hf_cfg.hidden_size, num_heads=heads,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads,
        mlp_dim=hf_cfg.intermediate_size, num_encoder_layers=0,
        num_decoder_layers=hf_cfg.num_hidden_layers, dropout_rate=0.0,
        mlp_activations=("silu", "linear"), logits_via_embedding=bool(hf_cfg.tie_word_embeddings),
        tied_logits_rescale=False, position_embedding="rope", rope_theta=theta,
        scale_attention_logits=True, primer_dconv=False, norm_epsilon=float(hf_cfg.rms_norm_eps))


def hf_llama_config_to_moetx(hf_cfg, **overrides) -> TransformerConfig:
    """`transformers.LlamaConfig` -> moetx decoder-only config (RoPE, SwiGLU, run-time scaling).

    Args:
      hf_cfg: a LlamaConfig.
      **overrides: TransformerConfig fields to set on top, e.g. `dtype='bfloat16'`.
    Raises:
      ValueError: K/V heads not dividing the query heads, biases, RoPE scaling, another
        activation, or attention dropout, none of which moetx's decoder has.
    """
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"Expected a Llama config (model_type 'llama'), found {model_type!r}.")
    problems = llama_like_problems(hf_cfg)
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias (moetx layers are bias-free)")
    if getattr(hf_cfg, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={hf_cfg.attention_dropout} (moetx's dropout_rate "
                        "also drops residuals; set it through overrides instead)")
    try:
        theta = rope_theta(hf_cfg)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
    common.require(problems, "This Llama config has no moetx DecoderOnly counterpart")
    fields = llama_like_fields(hf_cfg, theta)
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
    flat = common.flatten_params(params)
    if cfg is not None:
        common.require(config_problems(cfg), _NOT_LLAMA)
        dims, kv = common.dims_from_config(cfg), kv_joined(cfg)
    else:
        dims, kv = _llama_dims_from_params(flat)
    return common.moetx_to_hf(flat, layout(dims, kv), "moetx -> HF Llama", dtype)


def hf_llama_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                      param_dtype: Any = np.float32) -> Params:
    """LlamaForCausalLM state dict -> moetx DecoderOnly params.

    For a tied config, `lm_head.weight` is accepted only as an exact copy of
    `model.embed_tokens.weight` (as `model.state_dict()` returns it).

    Raises:
      ConversionError: unexpected (e.g. biases), missing or wrong-shape keys.
    """
    common.require(config_problems(cfg), _NOT_LLAMA)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.logits_via_embedding else {}
    return common.hf_to_moetx(state_dict, layout(common.dims_from_config(cfg), kv_joined(cfg)),
                              "HF Llama -> moetx", tied, {}, param_dtype)


def _is_llama(cfg: TransformerConfig) -> bool:
    """A decoder-only model without MoE layers."""
    return not cfg.num_encoder_layers and cfg.moe is None


FAMILY = common.Family(model_type=MODEL_TYPE, architecture=ARCHITECTURE,
                       config_to_moetx=hf_llama_config_to_moetx, config_to_hf=llama_config_to_hf,
                       to_moetx=hf_llama_to_moetx, to_hf=moetx_to_hf_llama, accepts=_is_llama)
