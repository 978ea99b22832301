"""moetx decoder-only MoE <-> Hugging Face MixtralForCausalLM: logits parity with transformers'
own Mixtral (top-2 of 4 experts, renormalised gates, no capacity), exact round trips through
the per-expert checkpoint keys and transformers >= 5's fused in-memory keys, strictness, and
configs Mixtral cannot express."""

import dataclasses

import numpy as np
import pytest
import transformers

from moetx.convert import hf
from moetx.util import trees
from tests.convert.conftest import (
    ATOL, assert_tree_is_the_models, hf_llama_logits, hf_mixtral, llama_ids, moetx_logits,
)
from tests.convert.conftest import MIXTRAL_CFG as CFG
from tests.convert.conftest import MIXTRAL_MOE as MOE


@pytest.fixture(scope="module")
def mixtral():
    return hf_mixtral(CFG)


def test_config_round_trips_to_the_routing_mixtral_uses():
    cfg = hf.hf_mixtral_config_to_moetx(hf.mixtral_config_to_hf(CFG))
    assert cfg.moe.renormalize_top_k_gates and cfg.moe.dispatch == "dropless"
    assert (cfg.moe.num_experts, cfg.moe.num_selected_experts, cfg.moe.sparse_every) == (4, 2, 1)
    assert dataclasses.replace(cfg, moe=None) == dataclasses.replace(CFG, moe=None)


def test_logits_match_hf_and_both_key_layouts_round_trip_exactly(mixtral, tmp_path):
    ids = llama_ids()
    fused = {k: v.numpy() for k, v in mixtral.state_dict().items()}  # transformers 5 in memory
    params = hf.hf_mixtral_to_moetx(fused, CFG)
    assert_tree_is_the_models(params, CFG)
    want = hf_llama_logits(mixtral, ids)
    np.testing.assert_allclose(moetx_logits(CFG, params, ids=ids), want, atol=ATOL)
    # A token's two experts really differ: dropping the renormalisation changes the logits.
    plain = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, renormalize_top_k_gates=False))
    assert np.abs(moetx_logits(plain, params, ids=ids) - want).max() > 1e-2

    # moetx -> HF writes save_pretrained's per-expert keys; transformers loads them offline.
    sd = hf.moetx_to_hf_mixtral(params, CFG)
    assert sd["model.layers.1.block_sparse_moe.experts.3.w3.weight"].shape == (40, 16)
    hf.save_hf(sd, hf.mixtral_config_to_hf(CFG), str(tmp_path))
    loaded = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(hf_llama_logits(loaded, ids), want, atol=ATOL)
    for k, v in loaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), fused[k], err_msg=k)
    # ... and the per-expert keys read back to the same tree, bit for bit.
    again = hf.hf_mixtral_to_moetx(hf.load_hf(str(tmp_path))[0], CFG)
    for a, b in zip(*(trees.flatten(t).items() for t in (params, again)), strict=True):
        assert a[0] == b[0] and np.array_equal(a[1], b[1]), a[0]


def test_strictness_names_the_expert_key(mixtral):
    sd = hf.moetx_to_hf_mixtral(hf.hf_mixtral_to_moetx(
        {k: v.numpy() for k, v in mixtral.state_dict().items()}, CFG), CFG)
    extra = dict(sd, **{"model.layers.0.block_sparse_moe.experts.4.w1.weight":
                        sd["model.layers.0.block_sparse_moe.experts.0.w1.weight"]})
    with pytest.raises(hf.ConversionError, match=r"experts\.4\.w1\.weight: \[40, 16\]"):
        hf.hf_mixtral_to_moetx(extra, CFG)
    missing = {k: v for k, v in sd.items() if "layers.0.block_sparse_moe.experts.2.w2" not in k}
    with pytest.raises(hf.ConversionError, match=r"1 missing.*\n.*layers\.0\..*experts\.2\.w2"):
        hf.hf_mixtral_to_moetx(missing, CFG)
    bad = dict(sd, **{"model.layers.1.block_sparse_moe.gate.weight": np.zeros((3, 16))})
    with pytest.raises(hf.ConversionError, match=r"gate\.weight: expected \[4, 16\], found"):
        hf.hf_mixtral_to_moetx(bad, CFG)


@pytest.mark.parametrize("moe,needle", [
    (dict(renormalize_top_k_gates=False), "renormalize_top_k_gates=True"),
    (dict(dispatch="masked"), "dispatch='dropless'"),
    (dict(sparse_every=2), "sparse_every=1"),
    (dict(extra_mlp=True), "extra_mlp"),
])
def test_routing_mixtral_cannot_express_is_refused(moe, needle):
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, **moe))
    with pytest.raises(ValueError, match=needle):
        hf.mixtral_config_to_hf(cfg)


def test_sliding_window_and_indivisible_kv_heads_are_refused():
    hf_cfg = hf.mixtral_config_to_hf(CFG)
    hf_cfg.sliding_window = 8
    hf_cfg.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3 does not.*sliding_window=8"):
        hf.hf_mixtral_config_to_moetx(hf_cfg)
