"""Grouped-query and multi-query attention <-> Hugging Face `num_key_value_heads` < heads, with
transformers' own LlamaForCausalLM and MixtralForCausalLM as the independent implementation:
configs round trip, imported weights give HF's logits, exported weights are HF's state dict
bit for bit, and the shipped GQA gin has HF's parameter count."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from moetx.convert import hf
from tests.conftest import count_params_from_shapes
from tests.convert.conftest import (
    ATOL, LLAMA_CFG, MIXTRAL_CFG, assert_tree_is_the_models, hf_llama, hf_llama_logits,
    hf_mixtral, llama_ids, moetx_logits, t5_cfg,
)

# 4 query heads of d_kv 6 (heads*d_kv = 24 != d_model = 16, so a missed transpose fails) over
# 2 K/V heads (GQA) or 1 (MQA).
GQA = dataclasses.replace(LLAMA_CFG, num_heads=4, num_kv_heads=2, head_dim=6)
MQA = dataclasses.replace(GQA, num_kv_heads=1)
MIXTRAL_GQA = dataclasses.replace(MIXTRAL_CFG, num_heads=4, num_kv_heads=2, head_dim=6)


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _swap_kv_heads(params, layer: int = 0):
    """The same tree with layer `layer`'s two K/V heads exchanged (a wrong grouping)."""
    attn = params["decoder"][f"layers_{layer}"]["self_attention"]
    swapped = {k: {"kernel": np.roll(np.asarray(attn[k]["kernel"]), 6, axis=1)}
               for k in ("key", "value")}
    layer_tree = dict(params["decoder"][f"layers_{layer}"],
                      self_attention=dict(attn, **swapped))
    return dict(params, decoder=dict(params["decoder"], **{f"layers_{layer}": layer_tree}))


@pytest.mark.parametrize("cfg", [GQA, MQA], ids=["gqa", "mqa"])
def test_llama_with_fewer_kv_heads_imports_and_exports_exactly(cfg):
    hf_cfg = hf.llama_config_to_hf(cfg)
    assert (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads) == (4, cfg.num_kv_heads)
    assert hf.hf_llama_config_to_moetx(hf_cfg) == cfg
    model = hf_llama(cfg)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (cfg.num_kv_heads * 6, 16)
    state = _numpy_state(model)
    params = hf.hf_llama_to_moetx(state, cfg)
    assert_tree_is_the_models(params, cfg)
    ids = llama_ids()
    want = hf_llama_logits(model, ids)
    np.testing.assert_allclose(moetx_logits(cfg, params, ids=ids), want, atol=ATOL)
    if cfg.num_kv_heads > 1:  # not vacuous: which K/V head a query group reads matters
        assert np.abs(moetx_logits(cfg, _swap_kv_heads(params), ids=ids) - want).max() > 1e-2
    # Export, with the config and with the dims read off the tree: HF's state dict, exactly.
    for exported in (hf.moetx_to_hf_llama(params, cfg), hf.moetx_to_hf_llama(params)):
        assert sorted(exported) == sorted(state)
        for k, v in state.items():
            np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_mixtral_with_fewer_kv_heads_imports_and_exports_exactly(tmp_path):
    hf_cfg = hf.mixtral_config_to_hf(MIXTRAL_GQA)
    assert hf_cfg.num_key_value_heads == 2
    assert hf.hf_mixtral_config_to_moetx(hf_cfg) == MIXTRAL_GQA
    model = hf_mixtral(MIXTRAL_GQA)
    fused = _numpy_state(model)  # transformers >= 5's in-memory keys
    params = hf.hf_mixtral_to_moetx(fused, MIXTRAL_GQA)
    assert_tree_is_the_models(params, MIXTRAL_GQA)
    ids = llama_ids(1)
    want = hf_llama_logits(model, ids)
    np.testing.assert_allclose(moetx_logits(MIXTRAL_GQA, params, ids=ids), want, atol=ATOL)
    assert np.abs(moetx_logits(MIXTRAL_GQA, _swap_kv_heads(params), ids=ids)
                  - want).max() > 1e-2
    # Export writes save_pretrained's per-expert keys; transformers loads them into the same
    # state dict, bit for bit.
    exported = hf.moetx_to_hf_mixtral(params, MIXTRAL_GQA)
    assert exported["model.layers.0.self_attn.v_proj.weight"].shape == (12, 16)
    for k in fused:
        if ".self_attn." in k:
            np.testing.assert_array_equal(exported[k], fused[k], err_msg=k)
    hf.save_hf(exported, hf_cfg, str(tmp_path))
    loaded = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.num_key_value_heads == 2
    for k, v in loaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), fused[k], err_msg=k)


def test_kv_heads_not_dividing_heads_and_t5_with_gqa_are_refused():
    hf_cfg = hf.llama_config_to_hf(GQA)
    hf_cfg.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3 does not divide "
                                         "num_attention_heads=4"):
        hf.hf_llama_config_to_moetx(hf_cfg)
    t5 = dataclasses.replace(t5_cfg(True, False), num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads=1; HF T5 has no grouped-query"):
        hf.t5_config_to_hf(t5)


def test_llama_gqa_tiny_gin_has_hf_llamas_parameter_count(parse):
    model = parse("llama_gqa_tiny")
    hf_cfg = hf.llama_config_to_hf(model.config)
    assert hf_cfg.num_key_value_heads == 2
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.LlamaForCausalLM(hf_cfg).parameters())
    ours = count_params_from_shapes(model)
    plain = count_params_from_shapes(dataclasses.replace(
        model, config=dataclasses.replace(model.config, num_kv_heads=None)))
    assert ours == theirs
    # Each layer's K and V projections lose half their columns: 2 * 2 * d_model * 2 * d_kv.
    assert plain - ours == model.config.num_decoder_layers * 2 * 32 * 2 * 8
