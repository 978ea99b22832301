"""The model gin files shipped in moetx/gin/models: each parses, and its parameter count (from
shapes only, nothing materialised) equals the Hugging Face count of the same architecture."""

import dataclasses
import os

import gin
import jax
import numpy as np
import pytest
import torch
import transformers

from moetx.lm import models, transformer
from moetx.convert import hf
from tests.conftest import REPO_ROOT, count_params_from_shapes

GIN_DIR = os.path.join(REPO_ROOT, "moetx", "gin")

# Published T5.1.1 shapes (d_model, heads, d_kv, d_ff, layers per stack) and the parameter counts
# of the google/t5-v1_1-* checkpoints (untied lm_head included).
T5_1_1 = {
    "small": ((512, 6, 64, 1024, 8), 76_961_152, 77e6),
    "base": ((768, 12, 64, 2048, 12), 247_577_856, 248e6),
    "large": ((1024, 16, 64, 2816, 24), 783_150_080, 783e6),
    "xl": ((2048, 32, 64, 5120, 24), 2_849_757_184, 2.85e9),
    "xxl": ((4096, 64, 64, 10240, 24), 11_135_332_352, 11.1e9),
}


def _hf_t5_count(cfg: transformer.TransformerConfig) -> int:
    with torch.device("meta"):  # no weights materialised
        model = transformers.T5ForConditionalGeneration(hf.t5_config_to_hf(cfg))
        if not cfg.logits_via_embedding:
            # transformers >= 5 ties T5's lm_head to `shared` in memory even when untied;
            # T5.1.1 checkpoints have their own head, as moetx's logits_dense.
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    return sum(p.numel() for p in model.parameters())  # tied parameters counted once


def _hf_llama_count(cfg: transformer.TransformerConfig) -> int:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf.llama_config_to_hf(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", list(T5_1_1))
def test_t5_1_1_configs_match_the_published_models(parse, size):
    model = parse(f"t5_1_1_{size}")
    cfg = model.config
    assert isinstance(model, models.EncoderDecoderModel)
    (d, heads, d_kv, d_ff, layers), published, approx = T5_1_1[size]
    assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_encoder_layers,
            cfg.num_decoder_layers) == (d, heads, d_kv, d_ff, layers, layers)
    assert cfg.vocab_size == 32128 and cfg.mlp_activations == ("gelu", "linear")
    assert not cfg.logits_via_embedding and cfg.dropout_rate == 0.0
    assert model.z_loss == 1e-4
    ours, theirs = count_params_from_shapes(model), _hf_t5_count(cfg)
    print(f"\nt5_1_1_{size}: moetx {ours:,} HF {theirs:,}")
    assert ours == theirs == published
    assert abs(ours - approx) / approx < 0.01


def test_llama_tiny_matches_hf_llama(parse):
    model = parse("llama_tiny")
    cfg = model.config
    assert isinstance(model, models.DecoderOnlyModel)
    assert cfg.position_embedding == "rope" and cfg.scale_attention_logits
    ours, theirs = count_params_from_shapes(model), _hf_llama_count(cfg)
    print(f"\nllama_tiny: moetx {ours:,} HF {theirs:,}")
    assert ours == theirs


@pytest.mark.parametrize("primer,baseline", [("primer_ez_base", "decoder_base"),
                                             ("primer_ez_tiny", None)])
def test_primer_ez_adds_nine_heads_dkv_per_layer(parse, primer, baseline):
    model = parse(primer)
    cfg = model.config
    assert cfg.primer_dconv and cfg.mlp_activations == ("squared_relu",)
    if baseline is None:
        # The same decoder without the two Primer-EZ changes (the MLP stays un-gated).
        base = models.DecoderOnlyModel(dataclasses.replace(cfg, primer_dconv=False))
    else:
        gin.clear_config(clear_constants=False)
        base = parse(baseline)
        assert base.config == dataclasses.replace(cfg, primer_dconv=False,
                                                  mlp_activations=("relu",))
    ours, plain = count_params_from_shapes(model), count_params_from_shapes(base)
    extra = 9 * cfg.num_heads * cfg.head_dim * cfg.num_decoder_layers
    print(f"\n{primer}: {ours:,} = {plain:,} + {extra:,}")
    assert ours == plain + extra
    if baseline is not None:  # "medium_primer_ez", 110M at T5-base dims
        assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim,
                cfg.num_decoder_layers) == (768, 12, 64, 3072, 12)
        assert abs(ours - 110e6) / 110e6 < 0.01


def test_t5_1_1_common_parses_and_leaves_the_dims_to_the_size_files(parse):
    model = parse("t5_1_1_common")
    assert isinstance(model, models.EncoderDecoderModel)
    assert model.config.vocab_size == 32128 and model.loss_normalizing_factor is None


def test_full_primer_config_parameter_count(parse):
    """Full Primer vs its Primer-EZ base: per layer the key kernel [d, J] and key dconv [3, J] go,
    q_solo_project [J, J] comes, and the two norms gain a bias (d each); plus the final norm's
    bias. At T5-base dims (d = J = 768) the square projection replaces the key kernel exactly,
    so the difference is 12 * (2 * 768 - 3 * 768) + 768 = -8,448."""
    model = parse("primer_base")
    cfg = model.config
    assert cfg.primer_share_qk and cfg.norm_type == "primer" and cfg.ffn_post_norm
    gin.clear_config(clear_constants=False)
    ez = parse("primer_ez_base")
    d, j, n = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_decoder_layers
    extra = n * (j * j - d * j - 3 * j + 2 * d) + d
    assert count_params_from_shapes(model) == count_params_from_shapes(ez) + extra
    assert extra == -8448
