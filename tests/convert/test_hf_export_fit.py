"""A Hugging Face export a HF user can use as is: every family loads through `AutoTokenizer` and
`AutoModelForSeq2SeqLM` / `AutoModelForCausalLM`, the tokenizer encodes id for id as SeqIO does
(non-ASCII text included), `generate` continues greedily as moetx's own logits say and its output
decodes; config.json carries `dtype` and generation_config.json the token ids; an export needs no
`--drop_optimizer_state` (one line says the slots were not exported); a missing `transformers`, a
vocabulary that does not fit and a `decoder_program` are one-line refusals.

One export per family (module fixture) with moetx's default vocabulary (`default_vocab`, the
session fixture) and tiny models of 8192 embedding rows, as moetx's tiny gins have. The T5 export
runs the command line from a T5X checkpoint that holds Adafactor slots.
"""

import contextlib
import dataclasses
import io
import json
import os
import sys

import gin
import numpy as np
import pytest
import seqio
import torch
import transformers

from moetx.cli import convert as convert_cli
from moetx.convert import formats, hf
from moetx.convert.formats import Checkpoint, ModelSpec, model_from_config
from moetx.convert.hf import tokenizer as hf_tokenizer
from moetx.lm import programs
from tests.convert.conftest import (
    LLAMA_CFG, MIXTRAL_CFG, TC, moetx_logits, random_params, switch_cfg,
    t5x_checkpoint_with_slots,
)

EXTRA_IDS = 100
VOCAB_ROWS = 8192  # 8000 pieces + 100 sentinels fit, as in models/t5_tiny.gin
# models/t5_tiny.gin's config, which the command line builds from that gin.
T5_TINY = TC(vocab_size=VOCAB_ROWS, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
             num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
             mlp_activations=("gelu", "linear"), logits_via_embedding=False)
CONFIGS = {
    "t5": T5_TINY,
    "switch": dataclasses.replace(switch_cfg(tied=True), vocab_size=VOCAB_ROWS),
    "llama": dataclasses.replace(LLAMA_CFG, vocab_size=VOCAB_ROWS),
    "mixtral": dataclasses.replace(MIXTRAL_CFG, vocab_size=VOCAB_ROWS),
}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve façade — “quoted” 東京 and ümlaut ß, 3.14 ☃",  # unk pieces included
    "  several   spaces\tand a\nnewline ",
    "I like <extra_id_0> sandwiches <extra_id_7> and more",  # sentinels between words
]
PROMPT = "The quick brown fox"  # short: the Switch encoder fits one expert's capacity (12)


@pytest.fixture(scope="module")
def seqio_vocab(default_vocab):
    return seqio.SentencePieceVocabulary(str(default_vocab), extra_ids=EXTRA_IDS)


def _t5x_with_slots(path, model, seed=0):
    """A T5X checkpoint of `model` at step 3 with Adafactor slots; returns its parameters."""
    return t5x_checkpoint_with_slots(path, model, 3, seed, use_tensorstore=False)[1]


def _cli(argv):
    """`moetx-convert` in this process: (exit status, stderr)."""
    err = io.StringIO()
    gin.clear_config(clear_constants=False)
    try:
        with contextlib.redirect_stderr(err):
            status = convert_cli.console_main(argv)
    finally:
        gin.clear_config(clear_constants=False)
    return status, err.getvalue()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, default_vocab):
    """{family: (config, params, export dir, stderr of the export)}."""
    root = tmp_path_factory.mktemp("hf_exports")
    out = {}
    # T5: the command line, from a T5X checkpoint holding optimizer slots, without
    # --drop_optimizer_state.
    model = model_from_config(T5_TINY)
    src = str(root / "t5x" / "checkpoint_3")
    params = _t5x_with_slots(src, model)
    status, err = _cli(["--from", "t5x", "--to", "hf", "--model", "models/t5_tiny.gin",
                        f"--vocabulary={default_vocab}", f"--extra_ids={EXTRA_IDS}", src,
                        str(root / "t5")])
    assert status == 0, err
    out["t5"] = (T5_TINY, params, str(root / "t5"), err)
    for family in ("switch", "llama", "mixtral"):
        cfg = CONFIGS[family]
        model = model_from_config(cfg)
        params = random_params(model, seed=1)
        formats.write_hf(str(root / family), Checkpoint(params), ModelSpec(model),
                         hf.Vocabulary(str(default_vocab), EXTRA_IDS))
        out[family] = (cfg, params, str(root / family), "")
    return out


# ------------------------------------------------------------------------ the Auto* round trip


@pytest.mark.parametrize("family", list(CONFIGS))
def test_auto_classes_encode_generate_and_decode_as_seqio_and_moetx(family, exports,
                                                                     seqio_vocab):
    cfg, params, path, _ = exports[family]
    enc_dec = bool(cfg.num_encoder_layers)
    assert sorted(os.listdir(path)) == sorted(["config.json", "generation_config.json",
                                               "model.safetensors",
                                               *hf_tokenizer.TOKENIZER_FILES])
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    assert tok_cfg["tokenizer_class"] == ("T5Tokenizer" if enc_dec else "TokenizersBackend")
    assert "is_local" not in tok_cfg and "local_files_only" not in tok_cfg
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (1, 0)
    assert gen["decoder_start_token_id" if enc_dec else "bos_token_id"] == 0

    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    auto = transformers.AutoModelForSeq2SeqLM if enc_dec else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True).eval()
    assert len(tok) == seqio_vocab.vocab_size == 8100

    # Encoding: SeqIO's ids plus what moetx adds for this kind of model (EOS after an encoder
    # input, BOS 0 before a decoder-only prompt).
    for text in SENTENCES:
        ids = [int(i) for i in seqio_vocab.encode(text)]
        assert tok(text).input_ids == (ids + [1] if enc_dec else [0] + ids), text
        if all(2 < i < 8000 for i in ids):  # SeqIO spells unk (' ⁇ ') and sentinels out, HF
            # skips them as special tokens
            assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == (
                seqio_vocab.decode(ids)), text

    # Greedy generation, checked against moetx's own logits over the generated sequence: each
    # generated token is moetx's argmax after the tokens before it.
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False).numpy()
    start = 1 if enc_dec else inputs.input_ids.shape[1]
    generated = out[0, start:]
    assert len(generated) >= 1
    dec_in, ones = out[:, :-1], np.ones_like(out[:, :-1])
    if enc_dec:
        logits = moetx_logits(cfg, params, inputs.input_ids.numpy(), ones, dec_in)
    else:
        logits = moetx_logits(cfg, params, ids=dec_in)
    np.testing.assert_array_equal(logits[0, start - 1:].argmax(-1), generated)
    # ... and the generated ids decode as SeqIO decodes them (pieces only: SeqIO spells
    # specials out, HF skips them).
    pieces = [int(i) for i in generated if 2 < i < 8000]
    assert tok.decode(generated, skip_special_tokens=True) == seqio_vocab.decode(pieces)
    print(f"\n{family}: {PROMPT!r} -> {generated.tolist()} "
          f"{tok.decode(generated, skip_special_tokens=True)!r}")


def test_export_from_a_checkpoint_with_slots_prints_one_line_and_drop_flag_silences_it(
        exports, tmp_path, default_vocab):
    notes = [line for line in exports["t5"][3].splitlines() if "optimizer" in line]
    assert len(notes) == 1 and "were not exported" in notes[0], exports["t5"][3]
    src = str(tmp_path / "checkpoint_3")
    _t5x_with_slots(src, model_from_config(T5_TINY))
    status, err = _cli(["--from", "t5x", "--to", "hf", "--model", "models/t5_tiny.gin",
                        "--drop_optimizer_state", "--vocabulary=none", src,
                        str(tmp_path / "hf")])
    assert status == 0, err
    assert "optimizer" not in err
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json",
                                                   "model.safetensors"]
    # moetx and T5X targets keep the slots (and the flag still drops them).
    formats.convert("t5x", "moetx", src, str(tmp_path / "m"), ModelSpec(model_from_config(T5_TINY)))
    assert formats.read_moetx(str(tmp_path / "m")).slots is not None


def test_bfloat16_export_records_its_dtype_and_loads_as_bfloat16(tmp_path, default_vocab):
    cfg = CONFIGS["llama"]
    model = model_from_config(cfg)
    formats.write_hf(str(tmp_path / "src"), Checkpoint(random_params(model)), ModelSpec(model),
                     vocabulary=None)
    formats.convert("hf", "hf", str(tmp_path / "src"), str(tmp_path / "bf16"), ModelSpec(model),
                    dtype="bfloat16", vocabulary=hf.Vocabulary(str(default_vocab), 0))
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bf16"))
    assert len(tok) == 8000  # extra_ids=0: no sentinels


# ----------------------------------------------------------------------------------- refusals


def test_missing_transformers_is_one_line_naming_the_hf_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    status, err = _cli(["--from", "t5x", "--to", "hf", "--model", "models/t5_tiny.gin",
                        str(tmp_path / "no_such_checkpoint"), str(tmp_path / "hf")])
    assert status == 2
    assert err.count("\n") == 1 and "pip install 'moetx[hf]'" in err, err
    assert "MissingDependencyError" in err and not (tmp_path / "hf").exists()
    print(f"\n{err}")
    with pytest.raises(hf.MissingDependencyError, match=r"moetx\[hf\]"):
        hf.llama_config_to_hf(LLAMA_CFG)


def test_a_vocabulary_larger_than_the_embedding_is_refused_before_reading(tmp_path,
                                                                           default_vocab):
    small = dataclasses.replace(LLAMA_CFG, vocab_size=8050)
    with pytest.raises(ValueError, match=r"8100 ids \(8000 pieces \+ 100 extra ids\).*"
                                         r"vocab_size=8050") as e:
        formats.convert("moetx", "hf", str(tmp_path / "missing"), str(tmp_path / "hf"),
                        ModelSpec(model_from_config(small)),
                        vocabulary=hf.Vocabulary(str(default_vocab), 100))
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match="does not exist"):
        hf_tokenizer.check_vocabulary(hf.Vocabulary(str(tmp_path / "none.model")), 9000)


def test_a_decoder_program_is_refused_in_one_line():
    cfg = dataclasses.replace(LLAMA_CFG, decoder_program=programs.SEED_PROGRAM)
    with pytest.raises(ValueError, match="decoder_program is set") as e:
        formats.check_hf_target(ModelSpec(model_from_config(cfg)), vocabulary=None)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="decoder_program"):
        hf.moetx_to_hf_llama({}, cfg)


def test_task_vocabularies_carry_their_extra_ids(default_vocab):
    span = hf_tokenizer.vocabulary_of_task("moetx_en_span_corruption")
    causal = hf_tokenizer.vocabulary_of_task("moetx_en_causal_lm")
    assert (span.extra_ids, causal.extra_ids) == (100, 0)
    assert convert_cli.DEFAULT_EXTRA_IDS == hf_tokenizer.DEFAULT_EXTRA_IDS == span.extra_ids
    assert span.path == causal.path == str(default_vocab)
    with pytest.raises(ValueError, match="not a registered"):
        hf_tokenizer.vocabulary_of_task("no_such_task")
