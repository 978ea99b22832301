"""moetx <-> Hugging Face conversion: logits parity with transformers' own T5 and Llama modules,
exact round trips, strictness, and save/load through `from_pretrained` without network.

Every Hugging Face model here is built from a config with seeded random weights (no hub
downloads), in float32 and eval mode (the builders are in conftest.py, which also switches
huggingface_hub offline before it is imported).
"""

import dataclasses
import os

import flax.linen as nn
import huggingface_hub.constants
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from moetx.lm import models
from moetx.convert import hf
from tests.convert.conftest import (
    ATOL, LLAMA_CFG, TC, abstract_params, assert_tree_is_the_models, hf_llama, hf_llama_logits,
    hf_t5, hf_t5_logits, llama_ids, model_and_shapes, t5_batch, t5_cfg,
)

T5_TIED_COPIES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


# ------------------------------------------------------------------------------------ helpers


def _moetx_t5_logits(cfg, params, enc, targets, dec_in) -> np.ndarray:
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
             "decoder_input_tokens": dec_in}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    return np.asarray(models.EncoderDecoderModel(cfg).logits(params, batch))


def _moetx_llama_logits(cfg, params, ids) -> np.ndarray:
    # Non-zero targets: moetx reads padding off the targets, and this batch has none.
    batch = {"decoder_input_tokens": jnp.asarray(ids, jnp.int32),
             "decoder_target_tokens": jnp.ones(ids.shape, jnp.int32)}
    return np.asarray(models.DecoderOnlyModel(cfg).logits(params, batch))


def _moetx_init(cfg: TC, seed: int = 0):
    """Fresh moetx params, with norm scales moved off 1 so a swapped norm would show."""
    m, shapes = model_and_shapes(cfg)
    params = nn.unbox(m.get_initial_variables(jax.random.PRNGKey(seed), shapes)["params"])
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(x) + (0.2 * rng.randn(*x.shape).astype(np.float32)
                                      if jax.tree_util.keystr(p).endswith("['scale']") else 0),
        params)


def _zeros_tree(cfg: TC):
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))


def _assert_same_weights(converted: dict, original: dict, absent: set[str]) -> None:
    """Every converted tensor equals the original bit for bit; only `absent` are left out."""
    assert set(original) - set(converted) == absent
    assert set(converted) <= set(original)
    for k, v in converted.items():
        ref = original[k].numpy() if hasattr(original[k], "numpy") else original[k]
        assert v.dtype == ref.dtype and v.shape == ref.shape, k
        assert np.array_equal(v, ref), k


# ---------------------------------------------------------------------- HF -> moetx parity


@pytest.mark.parametrize("gated,tied", [(True, False), (False, True), (True, True),
                                        (False, False)],
                         ids=["gated-untied", "relu-tied", "gated-tied", "relu-untied"])
def test_t5_from_hf_matches_hf_logits_and_round_trips_exactly(gated, tied):
    cfg = t5_cfg(gated, tied)
    model = hf_t5(cfg)
    sd = model.state_dict()
    params = hf.hf_t5_to_moetx(sd, cfg)
    assert_tree_is_the_models(params, cfg)

    enc, targets, dec_in = t5_batch(model)
    ref = hf_t5_logits(model, enc, dec_in)
    err = np.abs(_moetx_t5_logits(cfg, params, enc, targets, dec_in) - ref).max()
    print(f"\nHF T5 -> moetx ({'gated-gelu' if gated else 'relu'}, "
          f"{'tied' if tied else 'untied'}): max |logit diff| {err:.2e} "
          f"(max |logit| {np.abs(ref).max():.1f})")
    assert err < ATOL

    back = hf.moetx_to_hf_t5(params)
    _assert_same_weights(back, sd, T5_TIED_COPIES | ({"lm_head.weight"} if tied else set()))
    assert hf.moetx_to_hf_t5(params, cfg=cfg).keys() == back.keys()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_from_hf_matches_hf_logits_and_round_trips_exactly(tied):
    cfg = dataclasses.replace(LLAMA_CFG, logits_via_embedding=tied)
    model = hf_llama(cfg)
    sd = model.state_dict()
    params = hf.hf_llama_to_moetx(sd, cfg)
    assert_tree_is_the_models(params, cfg)

    ids = llama_ids()
    ref = hf_llama_logits(model, ids)
    err = np.abs(_moetx_llama_logits(cfg, params, ids) - ref).max()
    print(f"\nHF Llama -> moetx ({'tied' if tied else 'untied'}): max |logit diff| {err:.2e} "
          f"(max |logit| {np.abs(ref).max():.1f})")
    assert err < ATOL

    back = hf.moetx_to_hf_llama(params)
    _assert_same_weights(back, sd, {"lm_head.weight"} if tied else set())


# ------------------------------------------------- moetx -> HF, through save_hf + from_pretrained


@pytest.mark.parametrize("family", ["t5-gated-untied", "t5-relu-tied", "llama"])
def test_moetx_init_exported_with_save_hf_loads_offline_with_the_same_logits(
        family, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if family == "llama":
        cfg = LLAMA_CFG
        sd, hf_cfg = hf.moetx_to_hf_llama(params := _moetx_init(cfg)), hf.llama_config_to_hf(cfg)
        auto = transformers.AutoModelForCausalLM
    else:
        cfg = t5_cfg(gated=family == "t5-gated-untied", tied=family == "t5-relu-tied")
        sd, hf_cfg = hf.moetx_to_hf_t5(params := _moetx_init(cfg)), hf.t5_config_to_hf(cfg)
        auto = transformers.AutoModelForSeq2SeqLM
    hf.save_hf(sd, hf_cfg, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json",
                                            "model.safetensors"]

    model, info = auto.from_pretrained(str(tmp_path), local_files_only=True,
                                       output_loading_info=True)
    model.eval()
    assert type(model).__name__ == hf_cfg.architectures[0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if family == "llama":
        ids = llama_ids(1)
        ours, ref = _moetx_llama_logits(cfg, params, ids), hf_llama_logits(model, ids)
    else:
        # An untied head must come back untied (transformers >= 5 otherwise ties T5's head).
        assert (model.lm_head.weight is model.shared.weight) == cfg.logits_via_embedding
        enc, targets, dec_in = t5_batch(model, seed=1)
        ours = _moetx_t5_logits(cfg, params, enc, targets, dec_in)
        ref = hf_t5_logits(model, enc, dec_in)
    err = np.abs(ours - ref).max()
    print(f"\nmoetx init -> HF {family}: max |logit diff| {err:.2e} "
          f"(max |logit| {np.abs(ref).max():.1f})")
    assert err < ATOL

    # load_hf reads back exactly what was written, and the config maps back to the moetx one.
    sd2, hf_cfg2 = hf.load_hf(str(tmp_path))
    _assert_same_weights(sd2, sd, set())
    to_moetx = hf.hf_llama_config_to_moetx if family == "llama" else hf.hf_t5_config_to_moetx
    assert to_moetx(hf_cfg2) == cfg


def test_save_hf_shards_large_checkpoints_and_refuses_to_mix_with_old_files(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = LLAMA_CFG
    sd = hf.moetx_to_hf_llama(_moetx_init(cfg))
    out = str(tmp_path)
    written = hf.save_hf(sd, hf.llama_config_to_hf(cfg), out, max_shard_bytes=8_000)
    shards = [p for p in written if p.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(os.path.join(out, hf.SAFE_WEIGHTS_INDEX_NAME))
    sd2, _ = hf.load_hf(out)
    _assert_same_weights(sd2, sd, set())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    _assert_same_weights({k: v.numpy() for k, v in model.state_dict().items()}, sd, set())

    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_hf(sd, hf.llama_config_to_hf(cfg), out)
    hf.save_hf(sd, hf.llama_config_to_hf(cfg), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]


def test_bfloat16_torch_tensors_convert_bit_exactly():
    sd = {k: v.to(torch.bfloat16) for k, v in hf_llama(LLAMA_CFG).state_dict().items()}
    params = hf.hf_llama_to_moetx(sd, LLAMA_CFG)  # moetx keeps float32 parameters
    emb = params["decoder"]["token_embedder"]["embedding"]
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, sd["model.embed_tokens.weight"].float().numpy())
    back = hf.moetx_to_hf_llama(params, dtype=ml_dtypes.bfloat16)
    for k, v in back.items():
        assert v.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(v.view(np.int16), sd[k].view(torch.int16).numpy())


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("cfg", [
    t5_cfg(True, False), t5_cfg(False, True),
    dataclasses.replace(t5_cfg(True, False), mlp_activations=("silu", "linear"),
                        dropout_rate=0.1, norm_epsilon=1e-5, relative_attention_max_distance=64),
], ids=["t5.1.1", "t5.1.0", "gated-silu"])
def test_t5_config_round_trips(cfg):
    hf_cfg = hf.t5_config_to_hf(cfg)
    assert hf_cfg.scale_decoder_outputs == cfg.logits_via_embedding
    assert hf.hf_t5_config_to_moetx(hf_cfg) == cfg


def test_published_t5_configs_map_to_the_right_moetx_options():
    v11 = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    cfg = hf.hf_t5_config_to_moetx(v11)
    assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
    v10 = transformers.T5Config()  # t5-small: ReLU, tied and rescaled logits
    cfg = hf.hf_t5_config_to_moetx(v10)
    assert cfg.mlp_activations == ("relu",) and cfg.logits_via_embedding
    assert cfg.tied_logits_rescale
    # HF's plain 'gelu' is the exact erf GELU, not moetx's tanh 'gelu'.
    assert hf.hf_t5_config_to_moetx(
        transformers.T5Config(feed_forward_proj="gelu")).mlp_activations == ("gelu_exact",)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_config_round_trips(tied):
    cfg = dataclasses.replace(LLAMA_CFG, logits_via_embedding=tied)
    assert hf.hf_llama_config_to_moetx(hf.llama_config_to_hf(cfg)) == cfg


T5 = t5_cfg(True, False)


@pytest.mark.parametrize("convert,cfg,needle", [
    (hf.t5_config_to_hf, dataclasses.replace(T5, position_embedding="rope"), "rope"),
    (hf.t5_config_to_hf, dataclasses.replace(T5, num_encoder_layers=0), "needs an encoder"),
    (hf.t5_config_to_hf, dataclasses.replace(T5, primer_dconv=True), "primer_dconv"),
    (hf.t5_config_to_hf, dataclasses.replace(T5, scale_attention_logits=True), "run time"),
    (hf.t5_config_to_hf, dataclasses.replace(T5, mlp_activations=("gelu_exact", "linear")),
     "feed_forward_proj"),
    (hf.t5_config_to_hf, dataclasses.replace(T5, logits_via_embedding=True,
                                             tied_logits_rescale=False), "rescale"),
    (hf.llama_config_to_hf, dataclasses.replace(LLAMA_CFG, position_embedding="relative"),
     "relative position bias"),
    (hf.llama_config_to_hf, dataclasses.replace(LLAMA_CFG, mlp_activations=("gelu", "linear")),
     "SwiGLU"),
    (hf.llama_config_to_hf, dataclasses.replace(LLAMA_CFG, scale_attention_logits=False),
     "scale_attention_logits=True"),
    (hf.llama_config_to_hf, dataclasses.replace(LLAMA_CFG, logits_via_embedding=True,
                                                tied_logits_rescale=True), "rescale"),
    (hf.llama_config_to_hf, T5, "encoder-decoder"),
])
def test_configs_the_target_cannot_express_are_refused(convert, cfg, needle):
    with pytest.raises(ValueError, match="cannot be expressed") as e:
        convert(cfg)
    assert needle in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_key_value_heads=3), "does not divide num_attention_heads=2"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "RoPE scaling"),
    (dict(attention_bias=True), "bias-free"),
])
def test_llama_configs_moetx_cannot_hold_are_refused(kw, needle):
    hf_cfg = hf.llama_config_to_hf(LLAMA_CFG)
    for k, v in kw.items():
        setattr(hf_cfg, k, v)
    with pytest.raises(ValueError, match=needle):
        hf.hf_llama_config_to_moetx(hf_cfg)


# ---------------------------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def t5_state():
    cfg = t5_cfg(True, False)
    return cfg, {k: v.numpy() for k, v in hf_t5(cfg).state_dict().items()}


def test_hf_to_moetx_names_an_extra_key(t5_state):
    cfg, sd = t5_state
    key = "encoder.block.0.layer.0.SelfAttention.q.bias"
    with pytest.raises(hf.ConversionError, match=r"SelfAttention\.q\.bias: \[12\]") as e:
        hf.hf_t5_to_moetx({**sd, key: np.zeros(12, np.float32)}, cfg)
    assert e.value.unexpected == {key: (12,)} and not e.value.missing
    assert "bias-free" in str(e.value)


def test_hf_to_moetx_names_a_missing_key(t5_state):
    cfg, sd = t5_state
    key = "decoder.block.2.layer.2.DenseReluDense.wo.weight"
    partial = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(hf.ConversionError, match=r"wo\.weight: expected \[16, 24\]") as e:
        hf.hf_t5_to_moetx(partial, cfg)
    assert e.value.missing == {key: (16, 24)} and not e.value.unexpected


def test_hf_to_moetx_names_a_wrong_shape(t5_state):
    cfg, sd = t5_state
    key = "decoder.final_layer_norm.weight"
    with pytest.raises(hf.ConversionError,
                       match=r"final_layer_norm\.weight: expected \[16\], found \[17\]") as e:
        hf.hf_t5_to_moetx({**sd, key: np.ones(17, np.float32)}, cfg)
    assert e.value.mismatched == {key: ((16,), (17,))}


def test_hf_to_moetx_rejects_a_tied_copy_that_differs(t5_state):
    cfg, sd = t5_state
    bad = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"] + 1}
    with pytest.raises(hf.ConversionError, match="differs from shared.weight") as e:
        hf.hf_t5_to_moetx(bad, cfg)
    assert list(e.value.conflicts) == ["encoder.embed_tokens.weight"]
    tied_cfg = dataclasses.replace(cfg, logits_via_embedding=True)  # but sd has its own head
    with pytest.raises(hf.ConversionError, match="lm_head.weight"):
        hf.hf_t5_to_moetx(sd, tied_cfg)


def test_hf_to_moetx_with_the_wrong_config_lists_everything(t5_state):
    cfg, sd = t5_state
    with pytest.raises(hf.ConversionError) as e:
        hf.hf_t5_to_moetx(sd, dataclasses.replace(cfg, num_decoder_layers=2, mlp_dim=32))
    err = e.value
    assert "decoder.block.2.layer.0.SelfAttention.q.weight" in err.unexpected
    assert err.mismatched["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == ((16, 32),
                                                                                  (16, 24))
    assert "more" in str(err)  # long listings are cut, with a count of the rest


def test_untied_t5_without_lm_head_reads_it_as_transformers_does(t5_state):
    # transformers >= 5 ties T5's head to `shared` whenever the checkpoint omits lm_head.
    cfg, sd = t5_state
    partial = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    params = hf.hf_t5_to_moetx(partial, cfg)
    np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                  sd["shared.weight"].T)


def test_moetx_to_hf_names_leftover_parameters():
    primer = dataclasses.replace(LLAMA_CFG, primer_dconv=True)
    with pytest.raises(hf.ConversionError, match="query_dconv/kernel: \\[3, 24\\]") as e:
        hf.moetx_to_hf_llama(_zeros_tree(primer))
    assert len(e.value.unexpected) == 3 * primer.num_decoder_layers
    assert "Primer" in str(e.value)
    relative = dataclasses.replace(LLAMA_CFG, position_embedding="relative")
    with pytest.raises(hf.ConversionError, match="relpos_bias/rel_embedding"):
        hf.moetx_to_hf_llama(_zeros_tree(relative))
    with pytest.raises(ValueError, match="primer_dconv"):
        hf.moetx_to_hf_llama(_zeros_tree(primer), cfg=primer)


def test_moetx_to_hf_names_wrong_shapes_and_the_wrong_family():
    cfg = t5_cfg(True, False)
    tree = _zeros_tree(cfg)
    tree["decoder"]["layers_1"]["mlp"]["wo"]["kernel"] = np.zeros((25, 16), np.float32)
    with pytest.raises(hf.ConversionError, match=r"layers_1/mlp/wo/kernel: expected \[24, 16\]"):
        hf.moetx_to_hf_t5(tree)
    with pytest.raises(hf.ConversionError, match="cannot infer"):
        hf.moetx_to_hf_llama(_zeros_tree(cfg))
    with pytest.raises(hf.ConversionError, match="variables\\['params'\\]"):
        hf.moetx_to_hf_t5({"params": _zeros_tree(cfg)})
    # A config that disagrees with the tree (plain vs gated MLP) is caught too.
    with pytest.raises(hf.ConversionError, match="mlp_activations"):
        hf.moetx_to_hf_t5(_zeros_tree(cfg), cfg=dataclasses.replace(cfg, mlp_activations=("relu",)))
