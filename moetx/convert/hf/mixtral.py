"""moetx DecoderOnly MoE (Llama's options, top-k renormalised gates, dropless, every layer
sparse) <-> transformers MixtralForCausalLM. Grouped-query attention (Mixtral 8x7B has 8 K/V
heads for 32 query heads) maps as in `llama`: `num_kv_heads` is `num_key_value_heads`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from moetx.lm.transformer import TransformerConfig
from moetx.convert.hf.common import Entry, ExpertEntry, Params, StateDict
from moetx.convert.hf import common, llama

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"


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
    problems = llama.config_problems(cfg, "Mixtral")
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
    """moetx decoder-only MoE config -> `transformers.MixtralConfig` (no sliding window;
    `num_key_value_heads` is `num_kv_heads`, or `num_heads` when None). The load-balancing
    coefficient and router jitter carry over; Mixtral has no router z-loss (a training-only
    term, left out).

    Raises:
      ValueError: naming every option Mixtral cannot express (dense layers between sparse ones,
        un-renormalised gates, capacity-limited dispatch, ST-MoE extra MLPs, and Llama's list).
    """
    common.require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    transformers = common.import_transformers()

    moe = cfg.moe
    return transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.logits_via_embedding, attention_dropout=0.0,
        sliding_window=None, num_experts_per_tok=moe.num_selected_experts,
        num_local_experts=moe.num_experts, router_aux_loss_coef=float(moe.aux_loss_factor),
        router_jitter_noise=float(moe.jitter_noise), output_router_logits=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=1,
        architectures=[ARCHITECTURE])


def hf_mixtral_config_to_moetx(hf_cfg, moe_overrides: Mapping[str, Any] | None = None,
                               **overrides) -> TransformerConfig:
    """`transformers.MixtralConfig` -> moetx decoder-only MoE config: Llama's fields plus
    top-k tokens-choose routing with renormalised gates, dropless dispatch, every layer sparse.

    Raises:
      ValueError: K/V heads not dividing the query heads, a sliding window, RoPE scaling or
        another activation.
    """
    from moetx.moe.layers import MoeConfig

    model_type = getattr(hf_cfg, "model_type", None)
    if model_type != "mixtral":
        raise ValueError(f"Expected a Mixtral config (model_type 'mixtral'), found "
                         f"{model_type!r}.")
    problems = llama.llama_like_problems(hf_cfg)
    if getattr(hf_cfg, "sliding_window", None) is not None:
        problems.append(f"sliding_window={hf_cfg.sliding_window} (moetx attends to the whole "
                        "prefix; set sliding_window=null when every sequence is shorter)")
    if getattr(hf_cfg, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={hf_cfg.attention_dropout}")
    try:
        theta = llama.rope_theta(hf_cfg)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
    common.require(problems, "This Mixtral config has no moetx DecoderOnly counterpart")
    moe_fields: dict[str, Any] = dict(
        num_experts=hf_cfg.num_local_experts, num_selected_experts=hf_cfg.num_experts_per_tok,
        router_type="tokens_choose", dispatch="dropless", renormalize_top_k_gates=True,
        second_expert_policy="all", batch_prioritized_routing=False,
        jitter_noise=float(hf_cfg.router_jitter_noise),
        aux_loss_factor=float(hf_cfg.router_aux_loss_coef), router_z_loss_factor=0.0,
        sparse_every=1, extra_mlp=False)
    moe_fields.update(moe_overrides or {})
    fields = llama.llama_like_fields(hf_cfg, theta)
    fields["moe"] = MoeConfig(**moe_fields)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _mixtral_layout(cfg: TransformerConfig) -> tuple[list[Entry], list[ExpertEntry]]:
    """Llama's layout with each layer's `mlp.{gate,up,down}_proj` replaced by the router and the
    stacked experts (moetx wi_0 / wi_1 / wo = HF w1 (gate) / w3 (up) / w2 (down))."""
    d = common.dims_from_config(cfg)
    n_exp = cfg.moe.num_experts
    plain = [x for x in llama.layout(d, llama.kv_joined(cfg)) if ".mlp." not in x.hf]
    experts = []
    for i in range(d.dec_layers):
        m, h = f"decoder/layers_{i}/mlp", f"model.layers.{i}.block_sparse_moe"
        plain.append(Entry(f"{m}/router/router_weights/w/kernel", f"{h}.gate.weight",
                           (d.embed, n_exp), True))
        for ours, theirs, shape in (("wi_0", "w1", (n_exp, d.embed, d.mlp)),
                                    ("wi_1", "w3", (n_exp, d.embed, d.mlp)),
                                    ("wo", "w2", (n_exp, d.mlp, d.embed))):
            experts.append(ExpertEntry(f"{m}/expert/{ours}/kernel",
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
        x = common.to_numpy(value)
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
    common.require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    flat = common.flatten_params(params)
    plain, experts = _mixtral_layout(cfg)
    return common.moetx_to_hf_experts(
        flat, plain, experts, "moetx -> HF Mixtral",
        "pass the TransformerConfig the tree was built with (moe.num_experts, mlp_dim).", dtype)


def hf_mixtral_to_moetx(state_dict: Mapping[str, Any], cfg: TransformerConfig,
                        param_dtype: Any = np.float32) -> Params:
    """MixtralForCausalLM state dict (per-expert checkpoint keys, or transformers >= 5's fused
    in-memory ones) -> moetx decoder-only MoE params, experts stacked on a leading axis.

    Raises:
      ValueError: `cfg` is not expressible as Mixtral.
      ConversionError: unexpected (e.g. an extra expert), missing or wrong-shape keys.
    """
    common.require(_mixtral_problems(cfg), _NOT_MIXTRAL)
    plain, experts = _mixtral_layout(cfg)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.logits_via_embedding else {}
    return common.hf_to_moetx_experts(_unfuse_mixtral(state_dict, cfg.mlp_dim), plain, experts,
                                      "HF Mixtral -> moetx", tied, param_dtype)


def _is_mixtral(cfg: TransformerConfig) -> bool:
    """A decoder-only model with MoE layers."""
    return not cfg.num_encoder_layers and cfg.moe is not None


FAMILY = common.Family(model_type=MODEL_TYPE, architecture=ARCHITECTURE,
                       config_to_moetx=hf_mixtral_config_to_moetx,
                       config_to_hf=mixtral_config_to_hf, to_moetx=hf_mixtral_to_moetx,
                       to_hf=moetx_to_hf_mixtral, accepts=_is_mixtral)
