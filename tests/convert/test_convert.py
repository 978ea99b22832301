"""moetx.convert.formats: the real T5X fixture through moetx to Hugging Face (transformers' logits),
exact T5X <-> moetx round trips with Adafactor slots, HF -> moetx -> HF for T5, Switch, Llama and
Mixtral with logits parity at each hop, strictness with DST left absent, dtype casts, and the
upcycling tool. The CLI runs once as a subprocess; everything else calls `convert()`."""

import dataclasses
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers

from moetx.lm import models, transformer
from moetx.moe import layers as moe_layers
from moetx.convert import formats as convert, hf, t5x_format
from moetx.convert.formats import ModelSpec, model_from_config
from moetx.convert.hf import families
from moetx.trainer import checkpoints, optimizers, partitioning
from moetx.trainer import trainer as trainer_lib
from moetx.util import trees
from tests.convert.conftest import (
    LLAMA_CFG, MIXTRAL_CFG, REPO_ROOT, T5X_FIXTURES, hf_llama, hf_llama_logits, hf_mixtral,
    hf_switch, hf_switch_logits, hf_t5, hf_t5_logits, llama_ids, moetx_logits, random_params,
    switch_batch, switch_cfg, t5_batch, t5_cfg, t5x_checkpoint_with_slots,
)

TC = transformer.TransformerConfig
FIXTURE = str(T5X_FIXTURES / "test_t5_tiny.checkpoint_0")
FIXTURE_GIN = """include 'models/t5_tiny.gin'
TransformerConfig.vocab_size = 32128
TransformerConfig.emb_dim = 8
TransformerConfig.num_heads = 4
TransformerConfig.head_dim = 3
TransformerConfig.mlp_dim = 16
"""
FIXTURE_CFG = TC(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                 num_encoder_layers=2, num_decoder_layers=2, mlp_activations=("gelu", "linear"))
# d_model = d_ff = 128: moetx's (and T5X's) Adafactor factors these kernels, so v_row / v_col
# are real arrays, not [1] placeholders.
FACTORED_CFG = TC(vocab_size=160, emb_dim=128, num_heads=2, head_dim=8, mlp_dim=128,
                  num_encoder_layers=1, num_decoder_layers=1, relative_attention_num_buckets=8)


def _assert_trees_identical(a, b):
    fa, fb = trees.flatten(a), trees.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


def _restore_train_state(model, model_dir):
    """What `train` does on resume: restore the latest checkpoint into a Trainer's state."""
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, partitioning.make_mesh(),
                                  partitioning.standard_logical_axis_rules(),
                                  _shapes(model))
    ckpt = checkpoints.Checkpointer(model_dir)
    state, _ = ckpt.restore(ckpt.latest_step(), trainer.abstract_state_with_shardings())
    ckpt.close()
    return state


def _shapes(model):
    if model.config.num_encoder_layers:
        return model.input_shapes(8, {"inputs": 8, "targets": 8})
    return model.input_shapes(8, 8)


# --------------------------------------------------------------------------- the T5X fixture


def test_t5x_fixture_via_cli_to_moetx_then_hf_matches_transformers_and_back_exactly(tmp_path):
    gin_file = tmp_path / "fixture.gin"
    gin_file.write_text(FIXTURE_GIN)
    moetx_dir = tmp_path / "moetx"
    # The console entry point, once, as a user runs it.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "moetx.cli.convert", "--from", "t5x", "--to", "moetx",
         "--model", str(gin_file), FIXTURE, str(moetx_dir)],
        cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (moetx_dir / "checkpoint_0" / "state").is_dir()

    fixture = t5x_format.read_checkpoint(FIXTURE)
    model = models.EncoderDecoderModel(FIXTURE_CFG)
    state = _restore_train_state(model, str(moetx_dir))  # train/eval can restore it
    _assert_trees_identical(jax.device_get(state.params), fixture.params)
    v = trees.flatten(jax.device_get(state.opt_state.v))
    assert sorted(v) == sorted(trees.flatten(fixture.params))
    for k, arr in v.items():
        slots = fixture.opt_state
        for part in k.split("/"):
            slots = slots[part]
        np.testing.assert_array_equal(arr, slots["v"])

    # moetx -> T5X: the same tree and the same bytes (parameters, slots, step).
    spec = ModelSpec(model)
    back = convert.convert("moetx", "t5x", str(moetx_dir), str(tmp_path / "t5x"), spec)
    again = t5x_format.read_checkpoint(back)
    assert again.step == fixture.step
    _assert_trees_identical(again.params, fixture.params)
    _assert_trees_identical(again.opt_state, fixture.opt_state)

    # moetx -> HF T5: transformers' logits equal moetx's on the same inputs. HF holds weights
    # only, so the optimizer state is left behind without --drop_optimizer_state (the tokenizer
    # is tests/convert/test_hf_export_fit.py's).
    convert.convert("moetx", "hf", str(moetx_dir), str(tmp_path / "hf"), spec, vocabulary=None)
    pt = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "hf")).eval()
    rng = np.random.RandomState(0)
    enc = rng.randint(2, 32000, (2, 9))
    enc[1, 6:] = 0
    targets = rng.randint(2, 32000, (2, 7))
    dec_in = np.concatenate([np.zeros((2, 1), int), targets[:, :-1]], 1)
    ours = moetx_logits(FIXTURE_CFG, jax.device_get(state.params), enc, targets, dec_in)
    theirs = hf_t5_logits(pt, enc, dec_in)
    assert np.abs(ours).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def _factored_t5x(tmp_path, seed=0):
    """A T5X checkpoint of FACTORED_CFG with random parameters and Adafactor slots."""
    model = model_from_config(FACTORED_CFG)
    path, _ = t5x_checkpoint_with_slots(tmp_path / "checkpoint_7", model, 7, seed)
    return model, path


def test_t5x_adafactor_slots_round_trip_through_moetx_exactly(tmp_path):
    model, src = _factored_t5x(tmp_path)
    original = t5x_format.read_checkpoint(src)
    wi = original.opt_state["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi["v_row"].shape == (128,) and wi["v_col"].shape == (128,) and wi["v"].shape == (1,)
    spec = ModelSpec(model)
    convert.convert("t5x", "moetx", src, str(tmp_path / "m"), spec)
    moetx_ckpt = convert.read_moetx(str(tmp_path / "m"))
    assert moetx_ckpt.step == 7
    np.testing.assert_array_equal(moetx_ckpt.slots["encoder/layers_0/mlp/wi_0/kernel"]["v_col"],
                                  wi["v_col"])
    out = convert.convert("moetx", "t5x", str(tmp_path / "m"), str(tmp_path / "t"), spec,
                          use_tensorstore=False)
    again = t5x_format.read_checkpoint(out)
    assert again.step == 7
    _assert_trees_identical(again.params, original.params)
    _assert_trees_identical(again.opt_state, original.opt_state)
    # bfloat16 cast of the parameters only.
    out = convert.convert("t5x", "t5x", src, str(tmp_path / "bf16"), spec, dtype="bfloat16")
    cast = t5x_format.read_checkpoint(out)
    emb = cast.params["token_embedder"]["embedding"]
    assert emb.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(emb, original.params["token_embedder"]["embedding"].astype(
        ml_dtypes.bfloat16))
    assert cast.opt_state["token_embedder"]["embedding"]["v_row"].dtype == np.float32


# ------------------------------------------------------------------------- strictness, DST


def _bad_t5x(tmp_path, change):
    model, src = _factored_t5x(tmp_path)
    t = t5x_format.read_checkpoint(src, load_optimizer=False)
    flat = trees.flatten(t.params)
    change(flat)
    path = t5x_format.write_checkpoint(str(tmp_path / "bad"), trees.unflatten(flat), 1,
                                       use_tensorstore=False)
    return ModelSpec(model), path


@pytest.mark.parametrize("change,needle", [
    (lambda f: f.pop("decoder/layers_0/mlp/wo/kernel"),
     r"1 missing key.*\n.*decoder/layers_0/mlp/wo/kernel: expected \[128, 128\]"),
    (lambda f: f.__setitem__("encoder/layers_0/extra/kernel", np.ones((3, 2), np.float32)),
     r"1 unexpected key.*\n.*encoder/layers_0/extra/kernel: \[3, 2\]"),
    (lambda f: f.__setitem__("encoder/relpos_bias/rel_embedding", np.ones((2, 9), np.float32)),
     r"encoder/relpos_bias/rel_embedding: expected \[2, 8\], found \[2, 9\]"),
], ids=["missing", "extra", "wrong-shape"])
def test_bad_source_is_refused_naming_the_key_and_dst_stays_absent(tmp_path, change, needle):
    spec, src = _bad_t5x(tmp_path, change)
    dst = tmp_path / "out"
    with pytest.raises(hf.ConversionError, match=needle):
        convert.convert("t5x", "moetx", src, str(dst), spec)
    assert not dst.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_failure_while_writing_leaves_no_destination(tmp_path, monkeypatch):
    model, src = _factored_t5x(tmp_path)

    def crash(self, step, state, data_state):
        os.makedirs(os.path.join(self.directory, "checkpoint_7", "state"))
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.Checkpointer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        convert.convert("t5x", "moetx", src, str(tmp_path / "out"), ModelSpec(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_7"]


def test_existing_destination_and_foreign_slots_are_refused(tmp_path):
    model, src = _factored_t5x(tmp_path)
    spec = ModelSpec(model)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="never overwrites"):
        convert.convert("t5x", "moetx", src, str(tmp_path / "taken"), spec)
    # T5X momentum: moetx's Adafactor has none, so it is refused unless dropped.
    t = t5x_format.read_checkpoint(src)
    t.opt_state["decoder"]["decoder_norm"]["scale"]["m"] = np.ones((128,), np.float32)
    mom = t5x_format.write_checkpoint(str(tmp_path / "mom"), t.params, 3, t.opt_state,
                                      use_tensorstore=False)
    with pytest.raises(hf.ConversionError, match=r"m/decoder/decoder_norm/scale: momentum"):
        convert.convert("t5x", "moetx", mom, str(tmp_path / "x"), spec)
    assert not (tmp_path / "x").exists()
    convert.convert("t5x", "moetx", mom, str(tmp_path / "x"), spec, drop_optimizer_state=True)
    state = _restore_train_state(model, str(tmp_path / "x"))
    assert int(state.step) == 3 and int(state.opt_state.count) == 0  # a fresh optimizer


def test_moetx_sources_are_located_as_the_trainer_lays_checkpoints_out(tmp_path):
    for step in (3, 12):
        (tmp_path / "run" / f"checkpoint_{step}" / "state").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_20").mkdir()  # no state: incomplete, never chosen
    run, latest = tmp_path / "run", str(tmp_path / "run" / "checkpoint_12" / "state")
    assert convert.moetx_state_dir(str(run)) == latest
    assert convert.moetx_state_dir(str(run / "checkpoint_12")) == latest
    assert convert.moetx_state_dir(latest) == latest
    assert convert.moetx_state_dir(str(run), step=3) == str(run / "checkpoint_3" / "state")
    with pytest.raises(ValueError, match="is checkpoint 12, but step 3"):
        convert.moetx_state_dir(str(run / "checkpoint_12"), step=3)
    with pytest.raises(FileNotFoundError, match="checkpoint_7"):
        convert.moetx_state_dir(str(run), step=7)
    with pytest.raises(FileNotFoundError, match="No checkpoint_<step>"):
        convert.moetx_state_dir(str(tmp_path))


# --------------------------------------------------------------------------- HF round trips


def _hf_t5():
    cfg = t5_cfg(gated=True, tied=False)
    return cfg, hf_t5(cfg)


def _hf_llama():
    return LLAMA_CFG, hf_llama(LLAMA_CFG)


def _hf_switch():
    cfg = dataclasses.replace(switch_cfg(tied=True), num_encoder_layers=2,
                              num_decoder_layers=2)
    return cfg, hf_switch(cfg)


def _hf_mixtral():
    return MIXTRAL_CFG, hf_mixtral(MIXTRAL_CFG)


def _logits(cfg, pt_model, params=None):
    """(HF logits, moetx logits or None) on one fixed batch."""
    if cfg.num_encoder_layers:
        if cfg.moe is not None:
            enc, targets, dec_in = switch_batch(pt_model)
            theirs = hf_switch_logits(pt_model, enc, dec_in)[0]
        else:
            enc, targets, dec_in = t5_batch(pt_model)
            theirs = hf_t5_logits(pt_model, enc, dec_in)
        ours = None if params is None else moetx_logits(cfg, params, enc, targets, dec_in)
        return theirs, ours
    ids = llama_ids()
    theirs = hf_llama_logits(pt_model, ids)
    return theirs, None if params is None else moetx_logits(cfg, params, ids=ids)


@pytest.mark.parametrize("make", [_hf_t5, _hf_switch, _hf_llama, _hf_mixtral],
                         ids=["t5", "switch", "llama", "mixtral"])
def test_hf_to_moetx_to_hf_keeps_logits_and_weights(tmp_path, make):
    cfg, pt = make()
    pt.save_pretrained(str(tmp_path / "src"))
    want, _ = _logits(cfg, pt)
    # --model defaults to SRC's own config.json, as on the command line.
    spec = convert.load_model(str(tmp_path / "src"))
    convert.convert("hf", "moetx", str(tmp_path / "src"), str(tmp_path / "moetx"), spec)
    params = convert.read_moetx(str(tmp_path / "moetx")).params
    np.testing.assert_allclose(_logits(cfg, pt, params)[1], want, atol=1e-4)
    convert.convert("moetx", "hf", str(tmp_path / "moetx"), str(tmp_path / "hf"), spec,
                    drop_optimizer_state=True, vocabulary=None)  # a 96-id toy vocabulary
    loaded = type(pt).from_pretrained(str(tmp_path / "hf")).eval()
    np.testing.assert_allclose(_logits(cfg, loaded)[0], want, atol=1e-4)
    src, out = hf.load_hf(str(tmp_path / "src"))[0], hf.load_hf(str(tmp_path / "hf"))[0]
    assert sorted(src) == sorted(out)
    for k in src:
        assert np.array_equal(src[k], out[k]), k


def test_st_moe_extra_mlp_and_every_4th_layer_have_no_hf_form(tmp_path):
    moe = moe_layers.MoeConfig(num_experts=2, num_selected_experts=1, sparse_every=2,
                               extra_mlp=True)
    cfg = dataclasses.replace(switch_cfg(), moe=moe, num_encoder_layers=2,
                              num_decoder_layers=2)
    model = model_from_config(cfg)
    params = random_params(model)
    assert "extra_mlp" in params["encoder"]["layers_1"]
    src = t5x_format.write_checkpoint(str(tmp_path / "c"), params, 0, use_tensorstore=False)
    # T5X and moetx hold the extra FFN; HF SwitchTransformers cannot.
    convert.convert("t5x", "moetx", src, str(tmp_path / "m"), ModelSpec(model))
    _assert_trees_identical(convert.read_moetx(str(tmp_path / "m")).params, params)
    with pytest.raises(ValueError, match="extra_mlp=True"):
        convert.convert("t5x", "hf", src, str(tmp_path / "h"), ModelSpec(model))
    assert not (tmp_path / "h").exists()
    # ST-MoE's every-4th layout: moetx layers 3, 7 but HF's i % step == 1 gives 1, 5.
    every4 = model_from_config(dataclasses.replace(
        cfg, num_encoder_layers=8, num_decoder_layers=8,
        moe=dataclasses.replace(moe, extra_mlp=False, sparse_every=4)))
    with pytest.raises(ValueError, match=r"sparse_every=4 makes encoder layers \[3, 7\]"):
        convert.write_hf(str(tmp_path / "h"), convert.Checkpoint(params={}), ModelSpec(every4))
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("cfg,model_type,architecture", [
    (t5_cfg(gated=True, tied=False), "t5", "T5ForConditionalGeneration"),
    (switch_cfg(), "switch_transformers", "SwitchTransformersForConditionalGeneration"),
    (LLAMA_CFG, "llama", "LlamaForCausalLM"),
    (MIXTRAL_CFG, "mixtral", "MixtralForCausalLM"),
], ids=["t5", "switch", "llama", "mixtral"])
def test_each_hf_family_is_one_record_found_by_config_and_by_model_type(cfg, model_type,
                                                                        architecture):
    family = families.for_config(cfg)
    assert (family.model_type, family.architecture) == (model_type, architecture)
    assert families.BY_MODEL_TYPE[model_type] is family and family in hf.FAMILIES
    assert [f.model_type for f in hf.FAMILIES if f.accepts(cfg)] == [model_type]
    hf_cfg = family.config_to_hf(cfg)
    assert hf_cfg.model_type == model_type and hf_cfg.architectures == [architecture]
    back = convert.hf_config_to_moetx(hf_cfg)
    assert back == family.config_to_moetx(hf_cfg)
    assert (back.num_encoder_layers, back.moe is None) == (cfg.num_encoder_layers, cfg.moe is None)
    params = random_params(model_from_config(cfg))
    again = family.to_moetx(family.to_hf(params, cfg), cfg)
    for k, v in trees.flatten(params).items():
        np.testing.assert_array_equal(trees.flatten(again)[k], v, err_msg=k)


def test_hf_model_types_without_a_family_are_refused(tmp_path):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
    gpt2.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' has no moetx counterpart; "
                                         r"supported: \['llama', 'mixtral', "
                                         r"'switch_transformers', 't5'\]"):
        convert.load_model(str(tmp_path / "config.json"))
    hf.save_hf({"wte.weight": np.zeros((16, 8), np.float32)}, gpt2, str(tmp_path / "gpt2"))
    spec = ModelSpec(model_from_config(LLAMA_CFG))
    with pytest.raises(ValueError, match=r"gpt2: Hugging Face model_type 'gpt2' is not one of "
                                         r"\['llama', 'mixtral', 'switch_transformers', 't5'\]"):
        convert.convert("hf", "moetx", str(tmp_path / "gpt2"), str(tmp_path / "out"), spec)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- upcycling


def test_upcycle_tool_tiles_experts_and_resets_the_optimizer(tmp_path):
    dense_cfg = LLAMA_CFG
    moe = moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, sparse_every=2,
                               renormalize_top_k_gates=True, dispatch="dropless")
    moe_model = model_from_config(dataclasses.replace(dense_cfg, moe=moe))
    dense_model = model_from_config(dense_cfg)
    dense = random_params(dense_model, 3)
    src = t5x_format.write_checkpoint(str(tmp_path / "d"), dense, 5, use_tensorstore=False)
    convert.convert("t5x", "moetx", src, str(tmp_path / "moe"), ModelSpec(moe_model),
                    upcycle=True)
    ckpt = convert.read_moetx(str(tmp_path / "moe"))
    up = ckpt.params
    kernel = up["decoder"]["layers_1"]["mlp"]["expert"]["wi_1"]["kernel"]
    for e in range(4):
        np.testing.assert_array_equal(kernel[e], dense["decoder"]["layers_1"]["mlp"]["wi_1"]
                                      ["kernel"])
    assert "router" not in dense["decoder"]["layers_1"]["mlp"]
    assert ckpt.step == 5 and not any(np.any(s["v"]) for s in ckpt.slots.values())
    # Identical experts, renormalised top-2 gates: the MoE model computes the dense function.
    ids = llama_ids()
    np.testing.assert_allclose(moetx_logits(moe_model.config, up, ids=ids),
                               moetx_logits(dense_cfg, dense, ids=ids), atol=1e-5)
    with pytest.raises(ValueError, match="MoE target"):
        convert.convert("t5x", "moetx", src, str(tmp_path / "x"), ModelSpec(dense_model),
                        upcycle=True)
