"""MoE gin configs: parse, layouts, and parameter counts from shapes against published figures
and Hugging Face's SwitchTransformers (built on the meta device)."""

import gin
import pytest
import torch
import transformers

from tests.conftest import count_params_from_shapes


def test_st_moe_32b_has_269b_parameters(parse):
    model = parse("st_moe_32b")
    moe = model.config.moe
    assert (moe.num_experts, moe.num_selected_experts, moe.sparse_every, moe.extra_mlp) == (
        64, 2, 4, True)
    assert moe.router_z_loss_factor == 1e-3
    count = count_params_from_shapes(model)
    print(f"\nst_moe_32b: {count:,}")
    assert abs(count - 269e9) / 269e9 < 0.005


@pytest.mark.parametrize("experts", [8, 128])
def test_switch_base_matches_hf_switch_transformers(parse, experts):
    model = parse(f"switch_base_{experts}")
    cfg = model.config
    assert cfg.moe.num_selected_experts == 1 and cfg.moe.sparse_every == 2
    hf_cfg = transformers.SwitchTransformersConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, num_experts=experts, num_sparse_encoder_layers=6,
        num_sparse_decoder_layers=6, tie_word_embeddings=True)
    with torch.device("meta"):
        hf_model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf_model.parameters())
    assert count_params_from_shapes(model) == hf_count


def test_switch_primer_and_moe_primer_small(parse):
    sp = parse("switch_primer").config
    assert sp.primer_dconv and sp.mlp_activations == ("squared_relu",)
    assert (sp.moe.num_experts, sp.moe.num_selected_experts, sp.moe.jitter_noise,
            sp.moe.train_capacity_factor) == (32, 1, 1e-2, 1.2)
    assert [i for i in range(sp.num_decoder_layers) if sp.moe.is_sparse(i)] == [3]
    gin.clear_config(clear_constants=False)
    small = parse("moe_primer_small").config
    assert small.moe.num_experts == 4 and small.primer_dconv
