"""moetx <-> Hugging Face SwitchTransformers: logits parity with transformers' own module, exact
round trips, strictness on expert keys, and refusal of configs HF cannot express.

The Hugging Face model is built from a config with seeded random weights re-randomised to O(1)
scale (no hub downloads), float32, eval mode, no router jitter, and an `expert_capacity` of the
whole sequence; moetx routes one sequence per group with an eval capacity that also holds a
whole group, so nothing is dropped on either side.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from moetx.lm import models
from moetx.convert import hf
from tests.convert.conftest import (
    ATOL, SWITCH_EXPERTS, SWITCH_LENGTH, SWITCH_VOCAB, hf_switch, hf_switch_logits, randomize_,
    switch_batch, switch_cfg,
)

TIED_COPIES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def _moetx_logits(cfg, params, enc, targets, dec_in):
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
             "decoder_input_tokens": dec_in}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    return np.asarray(models.EncoderDecoderModel(cfg).logits(params, batch))


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tied_model():
    cfg = switch_cfg(tied=True)
    return cfg, hf_switch(cfg)


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_hf_and_round_trip_is_exact(tied, tied_model):
    cfg, model = tied_model if tied else (switch_cfg(tied=False),
                                          hf_switch(switch_cfg(tied=False), 1))
    # The config read back from HF is the one the model was built from (with the capacity
    # mapped for groups of SWITCH_LENGTH tokens).
    back = hf.hf_switch_config_to_moetx(model.config, group_size=SWITCH_LENGTH)
    assert back.moe.sparse_every == 2 and back.moe.num_selected_experts == 1
    assert dataclasses.replace(back, moe=cfg.moe) == cfg
    sd = _state_dict(model)
    params = hf.hf_switch_to_moetx(sd, back)
    enc, targets, dec_in = switch_batch(model)
    theirs, out = hf_switch_logits(model, enc, dec_in)
    ours = _moetx_logits(back, params, enc, targets, dec_in)
    assert ours.shape == theirs.shape == (3, SWITCH_LENGTH, SWITCH_VOCAB)
    assert np.abs(theirs).max() > 1.0  # O(1) logits: a wrong mapping cannot hide in 1e-4
    print(f"max |moetx - HF| logit difference (tied={tied}): {np.abs(ours - theirs).max():.3g}")
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    # The routing is not degenerate: every sparse layer sends tokens to every expert.
    layers = out.encoder_router_logits + out.decoder_router_logits
    assert len(layers) == 4
    for layer in layers:
        assert len(torch.unique(layer.reshape(-1, SWITCH_EXPERTS).argmax(-1))) == SWITCH_EXPERTS
    # Back to HF: every tensor bit-exact, nothing extra, only the tied copies left out.
    again = hf.moetx_to_hf_switch(params, cfg)
    expected = set(sd) - TIED_COPIES - ({"lm_head.weight"} if tied else set())
    assert set(again) == expected
    for k, v in again.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
        assert np.array_equal(v, sd[k]), k
    # And a fresh HF model loads the result (plus the tied copies) strictly, to the same logits.
    fresh = transformers.SwitchTransformersForConditionalGeneration(model.config).eval()
    copies = TIED_COPIES | ({"lm_head.weight"} if tied else set())
    full = {**again, **{k: again["shared.weight"] for k in copies}}
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()}, strict=True)
    np.testing.assert_array_equal(hf_switch_logits(fresh, enc, dec_in)[0], theirs)


def test_capacity_mapping_matches_hf_token_dropping():
    """With a small HF `expert_capacity` tokens are dropped; hf_switch_config_to_moetx with
    group_size = sequence length gives moetx the same per-sequence capacity, and sequence-order
    priority drops the same tokens (their MoE output is zero on both sides)."""
    cfg = switch_cfg(tied=True)
    torch.manual_seed(2)
    model = transformers.SwitchTransformersForConditionalGeneration(
        hf.switch_config_to_hf(cfg, expert_capacity=2))
    randomize_(model, 2)
    model.eval()
    back = hf.hf_switch_config_to_moetx(model.config, group_size=SWITCH_LENGTH)
    assert back.moe.eval_capacity_factor == 2 * SWITCH_EXPERTS / SWITCH_LENGTH
    enc, targets, dec_in = switch_batch(model, seed=2)
    theirs, out = hf_switch_logits(model, enc, dec_in)
    # Some sparse layer really drops: more than 2 tokens of a sequence chose one expert.
    counts = [torch.nn.functional.one_hot(x.argmax(-1), SWITCH_EXPERTS).sum(1).max().item()
              for x in out.encoder_router_logits + out.decoder_router_logits]
    assert max(counts) > 2
    ours = _moetx_logits(back, hf.hf_switch_to_moetx(_state_dict(model), back), enc, targets,
                         dec_in)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    # The default capacity (CF 2.0 per group: 6 slots) drops fewer tokens: not HF's function.
    loose = dataclasses.replace(back, moe=dataclasses.replace(
        back.moe, eval_capacity_factor=2.0, min_expert_capacity=4))
    loose_logits = _moetx_logits(loose, hf.hf_switch_to_moetx(_state_dict(model), loose), enc,
                                 targets, dec_in)
    assert np.abs(loose_logits - theirs).max() > 1e-2


def test_expert_kernels_are_per_expert_transposes(tied_model):
    cfg, model = tied_model
    params = hf.hf_switch_to_moetx(_state_dict(model), cfg)
    mlp = params["decoder"]["layers_3"]["mlp"]
    assert mlp["router"]["router_weights"]["w"]["kernel"].shape == (16, SWITCH_EXPERTS)
    assert mlp["expert"]["wi"]["kernel"].shape == (SWITCH_EXPERTS, 16, 32)
    assert mlp["expert"]["wo"]["kernel"].shape == (SWITCH_EXPERTS, 32, 16)
    w = model.decoder.block[3].layer[2].mlp.experts["expert_2"].wi.weight.detach().numpy()
    assert np.array_equal(mlp["expert"]["wi"]["kernel"][2], w.T)
    # Dense layers stay dense: moetx layers 0, 2 have plain wi/wo, as HF's blocks 0, 2.
    assert set(params["encoder"]["layers_2"]["mlp"]) == {"wi", "wo"}
    assert set(params["encoder"]["layers_1"]["mlp"]) == {"router", "expert"}


def test_save_and_from_pretrained(tied_model, tmp_path):
    cfg, model = tied_model
    params = hf.hf_switch_to_moetx(_state_dict(model), cfg)
    hf.save_hf(hf.moetx_to_hf_switch(params, cfg),
               hf.switch_config_to_hf(cfg, expert_capacity=SWITCH_LENGTH), str(tmp_path))
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "SwitchTransformersForConditionalGeneration"
    enc, _, dec_in = switch_batch(model)
    np.testing.assert_array_equal(hf_switch_logits(loaded, enc, dec_in)[0],
                                  hf_switch_logits(model, enc, dec_in)[0])
    sd, hf_cfg = hf.load_hf(str(tmp_path))
    back_cfg = hf.hf_switch_config_to_moetx(hf_cfg, group_size=SWITCH_LENGTH)
    again = hf.hf_switch_to_moetx(sd, back_cfg)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(again), _leaves(params), strict=True))


def _leaves(tree, prefix=""):
    for k in sorted(tree):
        v = tree[k]
        yield from (_leaves(v, f"{prefix}/{k}") if isinstance(v, dict) else [v])


# ------------------------------------------------------------------------------- strictness

EXPERT_KEY = "encoder.block.1.layer.1.mlp.experts.expert_{}.wi.weight"


def test_extra_expert_key_is_named(tied_model):
    cfg, model = tied_model
    sd = _state_dict(model)
    extra = EXPERT_KEY.format(SWITCH_EXPERTS)
    sd[extra] = np.zeros((32, 16), np.float32)
    with pytest.raises(hf.ConversionError, match=r"expert_4\.wi\.weight") as e:
        hf.hf_switch_to_moetx(sd, cfg)
    assert set(e.value.unexpected) == {extra} and not e.value.missing
    assert "expert count" in str(e.value)


def test_missing_expert_key_is_named(tied_model):
    cfg, model = tied_model
    sd = _state_dict(model)
    gone = "decoder.block.3.layer.2.mlp.experts.expert_2.wo.weight"
    del sd[gone]
    with pytest.raises(hf.ConversionError, match=r"expert_2\.wo\.weight") as e:
        hf.hf_switch_to_moetx(sd, cfg)
    assert e.value.missing == {gone: (16, 32)} and not e.value.unexpected


def test_misshaped_expert_key_is_named(tied_model):
    cfg, model = tied_model
    sd = _state_dict(model)
    bad = EXPERT_KEY.format(1)
    sd[bad] = np.zeros((31, 16), np.float32)
    with pytest.raises(hf.ConversionError, match=r"expert_1\.wi\.weight.*\[32, 16\].*\[31, 16\]"):
        hf.hf_switch_to_moetx(sd, cfg)


def test_fewer_experts_in_the_config_is_refused(tied_model):
    cfg, model = tied_model
    three = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=3))
    with pytest.raises(hf.ConversionError) as e:
        hf.hf_switch_to_moetx(_state_dict(model), three)
    assert any("expert_3" in k for k in e.value.unexpected)
    assert any(k.endswith("router.classifier.weight") for k in e.value.mismatched)


def test_moetx_side_expert_problems_are_named(tied_model):
    cfg, model = tied_model
    params = hf.hf_switch_to_moetx(_state_dict(model), cfg)
    kernel = params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"] = kernel[:3]
    params["decoder"]["layers_1"]["mlp"]["expert"]["wi_1"] = {"kernel": kernel}
    del params["decoder"]["layers_3"]["mlp"]["expert"]["wo"]
    with pytest.raises(hf.ConversionError) as e:
        hf.moetx_to_hf_switch(params, cfg)
    assert e.value.mismatched == {"encoder/layers_1/mlp/expert/wi/kernel": ((4, 16, 32),
                                                                            (3, 16, 32))}
    assert set(e.value.unexpected) == {"decoder/layers_1/mlp/expert/wi_1/kernel"}
    assert set(e.value.missing) == {"decoder/layers_3/mlp/expert/wo/kernel"}


@pytest.mark.parametrize("change,match", [
    (dict(sparse_every=4), r"sparse_every=4 makes encoder layers \[3\].*HF layers 1, 5"),
    (dict(num_selected_experts=2), r"top-1 only"),
    (dict(extra_mlp=True), r"extra_mlp"),
    (dict(batch_prioritized_routing=True), r"no BPR"),
])
def test_inexpressible_moe_configs_raise(change, match, tied_model):
    cfg, model = tied_model
    bad = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change))
    for fn in (lambda: hf.switch_config_to_hf(bad),
               lambda: hf.moetx_to_hf_switch({}, bad),
               lambda: hf.hf_switch_to_moetx(_state_dict(model), bad)):
        with pytest.raises(ValueError, match=match) as e:
            fn()
        assert not isinstance(e.value, hf.ConversionError)
        assert "SwitchTransformersForConditionalGeneration" in str(e.value)


def test_gated_experts_and_dense_models_raise():
    with pytest.raises(ValueError, match=r"ungated"):
        hf.switch_config_to_hf(dataclasses.replace(switch_cfg(),
                                                   mlp_activations=("gelu", "linear")))
    with pytest.raises(ValueError, match=r"moe=None.*t5_config_to_hf"):
        hf.switch_config_to_hf(dataclasses.replace(switch_cfg(), moe=None))


def test_hf_placements_moetx_cannot_express_raise():
    # 8 layers, 2 sparse: HF step 4 puts them at 1 and 5; moetx's every-4th is 3 and 7.
    hf_cfg = transformers.SwitchTransformersConfig(
        vocab_size=SWITCH_VOCAB, d_model=16, d_kv=8, d_ff=32, num_heads=2,
        num_experts=SWITCH_EXPERTS, num_layers=8, num_sparse_encoder_layers=2,
        num_decoder_layers=8, num_sparse_decoder_layers=4)
    with pytest.raises(ValueError, match=r"sparse encoder layers \[1, 5\]"):
        hf.hf_switch_config_to_moetx(hf_cfg)
    # Every 2nd layer in both stacks maps; sparse_every 1 (all sparse) too.
    hf_cfg.num_sparse_encoder_layers, hf_cfg.encoder_sparse_step = 4, 2
    assert hf.hf_switch_config_to_moetx(hf_cfg).moe.sparse_every == 2
    hf_cfg.num_sparse_encoder_layers, hf_cfg.encoder_sparse_step = 8, 1
    hf_cfg.num_sparse_decoder_layers, hf_cfg.decoder_sparse_step = 8, 1
    assert hf.hf_switch_config_to_moetx(hf_cfg).moe.sparse_every == 1
    with pytest.raises(ValueError, match=r"model_type 'switch_transformers'"):
        hf.hf_switch_config_to_moetx(transformers.T5Config())
