"""Weight conversion between moetx parameter trees and Hugging Face checkpoints.

Four model families map one to one:

    moetx EncoderDecoder (T5.1.1 / T5 1.0)          <->  transformers T5ForConditionalGeneration
    moetx DecoderOnly with RoPE, SwiGLU, run-time    <->  transformers LlamaForCausalLM
      logit scaling, untied or unscaled tied logits
    moetx sparse EncoderDecoder: top-1 tokens-choose <->  transformers
      MoE every 2nd layer, ungated experts                SwitchTransformersForConditionalGeneration
    moetx DecoderOnly MoE: Llama's options, top-k   <->  transformers MixtralForCausalLM
      renormalised gates, dropless, every layer sparse

SwitchTransformers shares T5's attention, norm, embedding and head keys (the converter reuses the
T5 layout) and differs in the MLPs: dense ones are `...mlp.{wi,wo}`, sparse ones
`...mlp.router.classifier` and `...mlp.experts.expert_{e}.{wi,wo}` per expert (moetx stacks
experts on a leading axis). HF places sparse blocks at i % step == 1, moetx at
i % sparse_every == sparse_every - 1: the same only for every 2nd (or every) layer, so other
placements are refused. HF's capacity is a fixed `expert_capacity` per sequence, moetx's a factor
per routing group; `hf_switch_config_to_moetx(hf_cfg, group_size=length)` maps one to the other
(tests/convert/test_hf_switch.py checks logits, with and without dropped tokens).

The moetx side is a nested dict of arrays with T5X names (what `nn.unbox(variables['params'])`
gives; `LogicallyPartitioned` boxes and jax arrays are accepted and unboxed). The Hugging Face side
is a flat `dict[str, np.ndarray]` state dict (torch tensors are accepted on input). All conversion
is plain numpy: no model is built and `transformers` is imported only by the config and file
helpers.

Every converter is strict. It consumes every source key, produces every target key with the
expected shape, and otherwise raises `ConversionError` listing the unexpected, missing and
wrong-shape keys with their shapes. It never returns a partial result.

Typical use:

    # moetx -> HF (loadable offline by AutoModelForSeq2SeqLM.from_pretrained('out'))
    hf.save_hf(hf.moetx_to_hf_t5(params, cfg), hf.t5_config_to_hf(cfg), 'out')
    hf.save_tokenizer('out', hf.default_vocabulary(), encoder_decoder=True,
                      model_vocab_size=cfg.vocab_size)   # ... and by AutoTokenizer
    # HF -> moetx
    state_dict, hf_cfg = hf.load_hf('t5-v1_1-small')
    cfg = hf.hf_t5_config_to_moetx(hf_cfg)
    params = hf.hf_t5_to_moetx(state_dict, cfg)  # feed to EncoderDecoderModel(cfg).logits

Conventions that need no weight surgery (tests/convert/test_hf.py checks each against HF logits):
- T5 attention scales nothing at run time: both T5X and HF T5 fold 1/sqrt(d_kv) into the query
  weights. Llama scales at run time, which is moetx's `scale_attention_logits=True`.
- RoPE: moetx and HF Llama both use the "rotate half" layout (channel i pairs with i + d_kv/2) and
  inv_freq = theta^(-2i/d_kv). HF-native q/k weights need no permutation; Meta's original
  checkpoints do, but HF's own importer applies that permutation, so HF checkpoints don't.
- Tied T5 logits are rescaled by d_model^-0.5 on both sides (moetx `tied_logits_rescale=True`).
  Llama ties without rescaling (`tied_logits_rescale=False`).
- moetx 'gelu' is the tanh approximation, HF 'gelu_new'. HF T5's 'gated-gelu' also means
  gelu_new. HF's plain 'gelu' is the exact erf GELU, moetx 'gelu_exact'.

transformers >= 5 quirk (T5): `T5Config` forces `tie_word_embeddings=True` and records T5.1.1's
untied, unscaled head as `scale_decoder_outputs=False`. So a T5 built from a config keeps lm_head
tied to `shared.weight` in memory, and `save_pretrained` then omits `lm_head.weight`. Its
logits are `shared` applied without rescale. `hf_t5_to_moetx` therefore reads an untied config
whose state dict lacks `lm_head.weight` the way transformers itself loads it: the head is
`shared.weight`. Checkpoints with a real separate head (the published T5.1.1 ones) carry the key
and use it. Loading such a checkpoint (or one from `save_hf`) with `from_pretrained` prints
transformers' "both are present ... will NOT tie them" warning; that is the untied head being
kept, as intended.

An export a Hugging Face user can use as is also holds generation_config.json (written by
`save_hf`, with config.json's `dtype` the weights') and the tokenizer of the model's SeqIO
vocabulary (`save_tokenizer`, module `tokenizer`): `AutoTokenizer` then encodes, and decodes, the
ids SeqIO does. transformers and safetensors are the `hf` extra (`pip install 'moetx[hf]'`);
without them every helper here raises `MissingDependencyError`, one line naming that command.

Modules: `t5`, `llama`, `switch` (SwitchTransformers) and `mixtral`, one per family, each ending
in its `FAMILY` record (a `common.Family` of its config and weight converters); `families`, the
registry of those records (by HF `model_type`, and which family a moetx config is written as);
`files` (`save_hf` / `load_hf`); `tokenizer` (`save_tokenizer`); `common`, the toolkit the family
modules are built from. The
converters and file helpers are re-exported here, so `from moetx.convert import hf;
hf.moetx_to_hf_t5(...)` is the way to use them.
"""

from moetx.convert.errors import MissingDependencyError
from moetx.convert.hf.common import ConversionError, Family, Params, StateDict
from moetx.convert.hf.families import FAMILIES
from moetx.convert.hf.files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, load_hf, save_hf
from moetx.convert.hf.llama import (
    hf_llama_config_to_moetx,
    hf_llama_to_moetx,
    llama_config_to_hf,
    moetx_to_hf_llama,
)
from moetx.convert.hf.mixtral import (
    hf_mixtral_config_to_moetx,
    hf_mixtral_to_moetx,
    mixtral_config_to_hf,
    moetx_to_hf_mixtral,
)
from moetx.convert.hf.switch import (
    hf_switch_config_to_moetx,
    hf_switch_to_moetx,
    moetx_to_hf_switch,
    switch_config_to_hf,
)
from moetx.convert.hf.t5 import (
    hf_t5_config_to_moetx,
    hf_t5_to_moetx,
    moetx_to_hf_t5,
    t5_config_to_hf,
)
from moetx.convert.hf.tokenizer import Vocabulary, default_vocabulary, save_tokenizer

__all__ = [
    "FAMILIES", "SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME", "ConversionError", "Family",
    "MissingDependencyError", "Params", "StateDict", "Vocabulary", "default_vocabulary",
    "hf_llama_config_to_moetx", "hf_llama_to_moetx",
    "hf_mixtral_config_to_moetx", "hf_mixtral_to_moetx", "hf_switch_config_to_moetx",
    "hf_switch_to_moetx", "hf_t5_config_to_moetx", "hf_t5_to_moetx", "llama_config_to_hf",
    "load_hf", "mixtral_config_to_hf", "moetx_to_hf_llama", "moetx_to_hf_mixtral",
    "moetx_to_hf_switch", "moetx_to_hf_t5", "save_hf", "save_tokenizer", "switch_config_to_hf",
    "t5_config_to_hf",
]
