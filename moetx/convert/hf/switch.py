"""moetx sparse EncoderDecoder (top-1 tokens-choose MoE every 2nd layer, ungated experts) <->
transformers SwitchTransformersForConditionalGeneration.

Reuses T5's layout for attention, norms, embeddings and head; see the `moetx.convert.hf` package
docstring for sparse-layer placement and how HF's per-sequence expert capacity maps to moetx's.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from moetx.lm.transformer import TransformerConfig
from moetx.convert.hf.common import Entry, ExpertEntry, Params, StateDict
from moetx.convert.hf import common, t5

MODEL_TYPE = "switch_transformers"
ARCHITECTURE = "SwitchTransformersForConditionalGeneration"


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
    problems = [p for p in t5.config_problems(cfg, "SwitchTransformers")
                if "mlp_activations" not in p]
    acts = tuple(cfg.mlp_activations)
    if len(acts) != 1 or acts[0] not in common.MOETX_TO_HF_ACT:
        problems.append(f"mlp_activations={acts}; HF SwitchTransformers' dense MLPs and experts "
                        "are ungated (wi, act, wo): one activation from "
                        f"{sorted(common.MOETX_TO_HF_ACT)}, e.g. ('relu',)")
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
    common.require(_switch_problems(cfg), _NOT_SWITCH)
    transformers = common.import_transformers()

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
        dense_act_fn=common.MOETX_TO_HF_ACT[cfg.mlp_activations[0]],
        tie_word_embeddings=cfg.logits_via_embedding, is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        architectures=[ARCHITECTURE])


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
    if act not in common.HF_TO_MOETX_ACT:
        problems.append(f"dense_act_fn={act!r} has no moetx activation (supported: "
                        f"{sorted(common.HF_TO_MOETX_ACT)})")
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
    common.require(problems,
                   "This SwitchTransformers config has no moetx EncoderDecoder counterpart")
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
        mlp_activations=(common.HF_TO_MOETX_ACT[act],),
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


def _switch_layout(cfg: TransformerConfig) -> tuple[list[Entry], list[ExpertEntry]]:
    """Every SwitchTransformersForConditionalGeneration weight and its moetx counterpart: the
    T5 layout (embeddings, attention, norms, relative bias, head) with each dense
    `DenseReluDense` renamed `mlp` and each sparse layer's MLP replaced by the router and the
    stacked experts."""
    d = common.dims_from_config(cfg)
    e, f, n_exp = d.embed, d.mlp, cfg.moe.num_experts
    sparse = {"encoder": _moetx_sparse_layers(cfg, d.enc_layers),
              "decoder": _moetx_sparse_layers(cfg, d.dec_layers)}
    plain: list[Entry] = []
    experts: list[ExpertEntry] = []
    for entry in t5.layout(d):
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
            plain.append(Entry(f"{path}/router/router_weights/w/kernel",
                               f"{h}.router.classifier.weight", (e, n_exp), True))
            experts.append(ExpertEntry(f"{path}/expert/wi/kernel",
                                       f"{h}.experts.expert_{{e}}.wi.weight", (n_exp, e, f)))
        else:
            experts.append(ExpertEntry(f"{path}/expert/wo/kernel",
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
    common.require(_switch_problems(cfg), _NOT_SWITCH)
    flat = common.flatten_params(params)
    plain, experts = _switch_layout(cfg)
    return common.moetx_to_hf_experts(flat, plain, experts, "moetx -> HF SwitchTransformers",
                                      _SWITCH_FIX, dtype)


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
    common.require(_switch_problems(cfg), _NOT_SWITCH)
    plain, experts = _switch_layout(cfg)
    tied = {"encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.logits_via_embedding:
        tied["lm_head.weight"] = "shared.weight"
    return common.hf_to_moetx_experts(state_dict, plain, experts, "HF SwitchTransformers -> moetx",
                                      tied, param_dtype)


def _is_switch(cfg: TransformerConfig) -> bool:
    """An encoder-decoder with MoE layers."""
    return bool(cfg.num_encoder_layers) and cfg.moe is not None


FAMILY = common.Family(model_type=MODEL_TYPE, architecture=ARCHITECTURE,
                       config_to_moetx=hf_switch_config_to_moetx,
                       config_to_hf=switch_config_to_hf, to_moetx=hf_switch_to_moetx,
                       to_hf=moetx_to_hf_switch, accepts=_is_switch)
