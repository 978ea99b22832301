"""Helpers the conversion tests share: tiny configs of the four Hugging Face families, HF models
built from them with seeded O(1) weights, fixed batches and the logits of both sides, random
moetx parameters, and where the T5X fixtures are.

Every Hugging Face model is built from a config (no hub downloads), in float32 and eval mode;
torch and transformers are imported only by the helpers that need them.
"""

import os

# huggingface_hub reads these at import time; the tests only ever load local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import pathlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moetx.convert import formats, hf, t5x_format  # noqa: E402
from moetx.lm import models, transformer  # noqa: E402
from moetx.moe.layers import MoeConfig  # noqa: E402
from moetx.util import trees  # noqa: E402

TC = transformer.TransformerConfig
ATOL = 1e-4

# The T5X checkpoints the reader is checked against, kept beside the repository.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
T5X_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "t5x"


# ------------------------------------------------------------------------------ moetx side


def random_params(model, seed=0):
    """Random parameters in the model's names and shapes, without running its (slow to trace)
    initialiser; values are irrelevant to the conversions tested with them."""
    rng = np.random.RandomState(seed)
    return trees.unflatten({k: (rng.randn(*s) * 0.3).astype(np.float32)
                            for k, s in formats.abstract_model(model).params.items()})


def t5x_checkpoint_with_slots(path, model, step, seed=0, **write_kwargs):
    """Writes a T5X checkpoint of `model` at `path`: random parameters and random Adafactor
    slots in the shapes moetx's Adafactor gives (T5X's `m` [1] placeholders included); returns
    the checkpoint path and the parameters."""
    params = random_params(model, seed)
    opt = formats.abstract_model(model).opt_state
    rng = np.random.RandomState(seed)
    slots = {}
    for slot in ("v_row", "v_col", "v"):
        for k, x in trees.flatten(getattr(opt, slot)).items():
            slots.setdefault(k, {"m": np.zeros((1,), np.float32)})[slot] = (
                rng.rand(*x.shape).astype(np.float32))
    written = t5x_format.write_checkpoint(str(path), params, step, trees.unflatten(slots),
                                          **write_kwargs)
    return written, params


def moetx_logits(cfg, params, enc=None, targets=None, dec_in=None, ids=None) -> np.ndarray:
    """moetx logits, jitted (an eager forward pass costs several times the compilation); an
    encoder-decoder batch (enc, targets, dec_in) or decoder-only `ids`."""
    if ids is not None:  # decoder-only; non-zero targets: moetx reads no padding off them
        batch = {"decoder_input_tokens": ids, "decoder_target_tokens": np.ones_like(ids)}
    else:
        batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
                 "decoder_input_tokens": dec_in}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    return np.asarray(jax.jit(formats.model_from_config(cfg).logits)(params, batch))


def model_and_shapes(cfg: TC):
    """The moetx model of `cfg` and the input shapes of the T5 / Llama test batches."""
    if cfg.num_encoder_layers:
        m = models.EncoderDecoderModel(cfg)
        return m, m.input_shapes(2, {"inputs": 20, "targets": 18})
    m = models.DecoderOnlyModel(cfg)
    return m, m.input_shapes(2, 20)


def tree_shapes(tree) -> dict[str, tuple]:
    return {k: tuple(np.shape(v)) for k, v in trees.flatten(tree).items()}


def abstract_params(cfg: TC):
    """The parameter tree moetx's module creates for `cfg`, as `jax.ShapeDtypeStruct`s."""
    m, shapes = model_and_shapes(cfg)
    return jax.eval_shape(lambda: nn.unbox(m.get_initial_variables(jax.random.PRNGKey(0),
                                                                   shapes)["params"]))


def assert_tree_is_the_models(params, cfg: TC) -> None:
    """The converted tree has exactly the names and shapes moetx's module creates."""
    assert tree_shapes(params) == tree_shapes(abstract_params(cfg))


# ------------------------------------------------------------------------------- T5, Llama

VOCAB = 96


def t5_cfg(gated: bool, tied: bool) -> TC:
    # heads*d_kv = 12 != d_model = 16 and unequal stack depths make a missed transpose or a
    # swapped stack fail loudly; 8 buckets with max distance 12 over ~20 positions reach the
    # logarithmic buckets.
    return TC(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=24,
              num_encoder_layers=2, num_decoder_layers=3,
              mlp_activations=("gelu", "linear") if gated else ("relu",),
              logits_via_embedding=tied, relative_attention_num_buckets=8,
              relative_attention_max_distance=12)


# rope_theta 500 turns every frequency pair by a sizeable angle over 20 positions, so a RoPE
# layout mismatch (interleaved vs rotate-half) cannot hide.
LLAMA_CFG = TC(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=12, mlp_dim=40,
               num_decoder_layers=2, position_embedding="rope", rope_theta=500.0,
               scale_attention_logits=True, mlp_activations=("silu", "linear"),
               tied_logits_rescale=False, norm_epsilon=1e-5)


def randomize_(model, seed: int) -> None:
    """O(1) weights everywhere. HF Llama's own init (std 0.02) gives logits so small that a
    wrong RoPE or norm mapping would hide under the tolerance; norms move away from 1 so that a
    swapped or missing norm shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif any(s in name for s in ("embed_tokens", "shared", "relative_attention_bias")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # nn.Linear weight [out, in]
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)


def hf_t5(cfg: TC, seed: int = 0):
    """A transformers T5ForConditionalGeneration of `cfg` with O(1) random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(hf.t5_config_to_hf(cfg))
    if not cfg.logits_via_embedding:
        # transformers >= 5 ties T5's lm_head to `shared` in memory even for untied (T5.1.1)
        # configs; published T5.1.1 checkpoints hold a separate head, so give it one.
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    randomize_(model, seed)
    return model.eval()


def hf_llama(cfg: TC, seed: int = 0):
    """A transformers LlamaForCausalLM of `cfg` with O(1) random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf.llama_config_to_hf(cfg))
    randomize_(model, seed)
    return model.eval()


def t5_batch(model, seed: int = 0):
    """Encoder tokens (row 1 padded), targets, and HF's own shifted-right decoder inputs."""
    import torch

    rng = np.random.RandomState(seed)
    enc = rng.randint(2, VOCAB, (2, 20))
    enc[1, 14:] = 0
    targets = rng.randint(2, VOCAB, (2, 18))
    # HF prepends decoder_start_token_id 0, which is moetx's BOS 0.
    dec_in = model._shift_right(torch.tensor(targets)).numpy()
    assert (dec_in[:, 0] == 0).all() and (dec_in[:, 1:] == targets[:, :-1]).all()
    return enc, targets, dec_in


def hf_t5_logits(model, enc, dec_in) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                     decoder_input_ids=torch.tensor(dec_in)).logits.numpy()


def llama_ids(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(2, VOCAB, (2, 20))


def hf_llama_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


# ---------------------------------------------------------------------- SwitchTransformers

SWITCH_VOCAB = 64
SWITCH_LENGTH = 12  # encoder and decoder length = moetx group size = HF expert capacity
SWITCH_EXPERTS = 4


def switch_cfg(tied: bool = True, **moe) -> TC:
    # capacity = max(round(4.0 * 12 / 4), 4) = 12 = SWITCH_LENGTH: a whole group fits in one
    # expert.
    moe_cfg = MoeConfig(**{**dict(num_experts=SWITCH_EXPERTS, num_selected_experts=1,
                                  sparse_every=2, group_size=SWITCH_LENGTH,
                                  eval_capacity_factor=4.0, train_capacity_factor=4.0,
                                  jitter_noise=0.0, router_z_loss_factor=1e-3,
                                  aux_loss_factor=1e-2), **moe})
    return TC(vocab_size=SWITCH_VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
              num_encoder_layers=4, num_decoder_layers=4, mlp_activations=("relu",),
              logits_via_embedding=tied, relative_attention_num_buckets=8,
              relative_attention_max_distance=12, moe=moe_cfg)


def hf_switch(cfg: TC, seed: int = 0):
    """A transformers SwitchTransformersForConditionalGeneration of `cfg` with O(1) random
    weights (routers spread tokens), no router jitter and a whole sequence of capacity."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = hf.switch_config_to_hf(cfg, expert_capacity=SWITCH_LENGTH)
    assert hf_cfg.router_jitter_noise == 0.0 and hf_cfg.expert_capacity >= SWITCH_LENGTH
    model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
    randomize_(model, seed)
    if not cfg.logits_via_embedding:
        # transformers >= 5 unties encoder/decoder.embed_tokens from `shared` along with the
        # head when tie_word_embeddings=False; moetx (and the original Switch checkpoints) have
        # one input embedding, so share it again.
        model.encoder.embed_tokens.weight = model.shared.weight
        model.decoder.embed_tokens.weight = model.shared.weight
    return model.float().eval()


def switch_batch(model, seed: int = 0):
    """Three sequences of SWITCH_LENGTH (row 1 padded), targets, HF's decoder inputs."""
    import torch

    rng = np.random.RandomState(seed)
    enc = rng.randint(2, SWITCH_VOCAB, (3, SWITCH_LENGTH))
    enc[1, 9:] = 0  # padding routes too (it takes capacity on both sides)
    targets = rng.randint(2, SWITCH_VOCAB, (3, SWITCH_LENGTH))
    dec_in = model._shift_right(torch.tensor(targets)).numpy()
    assert (dec_in[:, 0] == 0).all() and (dec_in[:, 1:] == targets[:, :-1]).all()
    return enc, targets, dec_in


def hf_switch_logits(model, enc, dec_in):
    """(logits, the full output with router logits)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec_in), output_router_logits=True)
    return out.logits.numpy(), out


# -------------------------------------------------------------------------------- Mixtral

MIXTRAL_MOE = MoeConfig(num_experts=4, num_selected_experts=2, dispatch="dropless",
                        renormalize_top_k_gates=True, sparse_every=1, router_z_loss_factor=0.0)
MIXTRAL_CFG = dataclasses.replace(LLAMA_CFG, moe=MIXTRAL_MOE)


def hf_mixtral(cfg: TC, seed: int = 0):
    """A transformers MixtralForCausalLM of `cfg` with O(1) random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(hf.mixtral_config_to_hf(cfg))
    randomize_(model, seed)
    # randomize_ scales by shape[1], which for the fused [E, out, in] experts is not fan-in.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[2] ** -0.5)
    return model.eval()
