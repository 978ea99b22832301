"""Rematerialisation policies (`TransformerConfig.remat_policy`): the same parameters, loss and
gradients as no remat, the backward pass really recomputes, and the errors are one line."""

import dataclasses
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import models, programs, transformer
from moetx.moe import layers as moe_layers
from tests.conftest import TINY, make_trainer, packed_batch

# The policies that run on the CPU ('offload' needs a backend with host offload).
CPU_POLICIES = ("full", "save_dots", "save_all_dots")
DROPOUT_RNG = jax.random.PRNGKey(7)
# The decoder-only model's one layer is sparse (MoE) followed by ST-MoE's extra dense MLP; with
# dropout and router jitter on, so the recomputation must replay the same random numbers. (The
# encoder-decoder has dense layers.)
MOE = moe_layers.MoeConfig(num_experts=2, num_selected_experts=1, sparse_every=1,
                           jitter_noise=0.1, extra_mlp=True)


def _decoder_only(**kw):
    cfg = transformer.TransformerConfig(**{**TINY, "num_decoder_layers": 1, "dropout_rate": 0.1,
                                           "moe": MOE, **kw})
    return models.DecoderOnlyModel(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")


def _encoder_decoder(**kw):
    cfg = transformer.TransformerConfig(**{**TINY, "num_encoder_layers": 1,
                                           "num_decoder_layers": 1, "dropout_rate": 0.1, **kw})
    return models.EncoderDecoderModel(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")


def _batch(model):
    if not model.is_encoder_decoder:
        return {k: jnp.asarray(v) for k, v in packed_batch(2, 16).items()}
    rng = np.random.RandomState(0)
    t = rng.randint(2, 128, (2, 8)).astype(np.int32)
    t[1, 6:] = 0  # padding
    enc = rng.randint(2, 128, (2, 12)).astype(np.int32)
    enc[0, 10:] = 0
    return {"encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(t),
            "decoder_input_tokens": jnp.asarray(np.concatenate(
                [np.zeros((2, 1), np.int32), t[:, :-1]], 1)),
            "encoder_segment_ids": jnp.asarray((enc > 0).astype(np.int32)),
            "decoder_segment_ids": jnp.asarray((t > 0).astype(np.int32)),
            "decoder_loss_weights": jnp.asarray((t > 0).astype(np.float32))}


def _shapes(model):
    if model.is_encoder_decoder:
        return model.input_shapes(2, {"inputs": 12, "targets": 8})
    return model.input_shapes(2, 16)


def _param_shapes(model):
    return jax.eval_shape(lambda: nn.unbox(model.get_initial_variables(
        jax.random.PRNGKey(0), _shapes(model))["params"]))


def _params(model):
    """Random parameters of the model's tree (norm scales near 1), without compiling its init."""
    rng = np.random.RandomState(0)

    def fill(path, s):
        x = rng.normal(0.0, 0.2, s.shape)
        return jnp.asarray(x + 1.0 if "scale" in jax.tree_util.keystr(path) else x, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, _param_shapes(model))


def _grad_fn(model):
    def loss(params, batch):
        weights, factor = model.loss_weights_and_factor(batch)
        return model.loss_fn(params, batch, DROPOUT_RNG, weights, factor)[0]

    return jax.jit(jax.value_and_grad(loss))


def _with_policy(model, policy):
    return dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                 remat_policy=policy))


def _assert_same_as_none(model, policies):
    """Every policy: the same parameter tree (names and shapes), and the loss and gradients of
    'none' up to float reassociation (XLA fuses the recomputed graph differently: observed
    differences are a few ulps, ~1e-6 relative, and 2e-5 on one entry that sums terms which
    cancel, 4e-7 of its leaf's largest)."""
    batch = _batch(model)
    params = _params(model)
    shapes0 = _param_shapes(model)

    def run(m):
        return _grad_fn(m)(params, batch)

    loss0, grads0 = run(model)
    flat0 = jax.tree_util.tree_leaves_with_path(grads0)
    for policy in policies:
        m = _with_policy(model, policy)
        assert _param_shapes(m) == shapes0, policy
        loss, grads = run(m)
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=policy)
        flat = jax.tree_util.tree_leaves_with_path(grads)
        assert [k for k, _ in flat] == [k for k, _ in flat0]
        for (path, g), (_, g0) in zip(flat, flat0):
            # An entry that sums terms which cancel can differ by more than 1e-5 of itself
            # (2e-5 seen in an embedding gradient): the absolute bound is 1e-6 of the leaf's
            # largest entry (and at least 1e-7).
            atol = max(1e-7, 1e-6 * float(np.abs(g0).max()))
            np.testing.assert_allclose(g, g0, rtol=1e-5, atol=atol,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")


def test_decoder_only_policies_match_none():
    _assert_same_as_none(_decoder_only(), ("full", "save_dots"))


def test_encoder_decoder_policies_match_none():
    _assert_same_as_none(_encoder_decoder(), ("full",))


def test_program_decoder_matches_none():
    model = _decoder_only(moe=None, decoder_program=programs.PRIMER_EZ_PROGRAM)
    _assert_same_as_none(model, ("full",))


def _dot_count(model) -> int:
    text = _grad_fn(model).lower(_param_shapes(model), _batch(model)).as_text()
    return len(re.findall(r"stablehlo\.dot_general", text))


def test_remat_recomputes_in_the_backward_pass():
    """In the program JAX hands to XLA, the backward pass of 'full' recomputes the layers'
    matmuls, 'save_dots' only the batched (attention) ones, 'save_all_dots' none of them. (The
    CPU compiler then removes the optimization barriers and the duplicate matmuls, so on CPU
    the compiled step does not recompute; the lowered program is the backend-independent
    observable.)"""
    model = _encoder_decoder(dropout_rate=0.0, num_encoder_layers=2, num_decoder_layers=2)
    counts = {p: _dot_count(_with_policy(model, p)) for p in ("none",) + CPU_POLICIES}
    assert counts["full"] > counts["save_dots"] > counts["none"], counts
    assert counts["save_all_dots"] == counts["none"], counts


def test_none_is_the_default_and_aliases_are_canonical():
    assert transformer.TransformerConfig().remat_policy == "none"
    for alias, name in [("dots_with_no_batch_dims", "save_dots"),
                        ("dots_saveable", "save_all_dots"), ("full", "full")]:
        assert transformer.TransformerConfig(remat_policy=alias).remat_policy == name


@pytest.mark.parametrize("bad", ["everything", "Full", None, 1])
def test_unknown_policy_is_a_one_line_error(bad):
    with pytest.raises(ValueError) as e:
        transformer.TransformerConfig(remat_policy=bad)
    msg = str(e.value).splitlines()[0]  # gin adds a line naming the configurable
    assert "\n" not in msg and "remat_policy" in msg
    for name in transformer.REMAT_POLICIES:
        assert repr(name) in msg


def test_offload_without_host_memory_is_a_one_line_error():
    assert jax.default_backend() == "cpu" and not transformer.host_offload_supported()
    model = _decoder_only(remat_policy="offload")
    with pytest.raises(ValueError) as e:
        _param_shapes(model)
    msg = str(e.value)
    assert "\n" not in msg and "'offload'" in msg and "cpu" in msg
    for name in ("none", "full", "save_dots", "save_all_dots"):
        assert repr(name) in msg


def test_offload_moves_the_saved_matmuls_to_host_memory(monkeypatch):
    """With a backend that has host offload (simulated: the CPU backend would drop the
    placement), the backward pass of 'offload' reads the residuals 'save_dots' keeps from
    pinned host memory."""
    monkeypatch.setattr(transformer, "host_offload_supported", lambda: True)
    model = _decoder_only(dropout_rate=0.0)
    params, batch = _param_shapes(model), _batch(model)

    def host_copies(policy):
        jaxpr = str(jax.make_jaxpr(_grad_fn(_with_policy(model, policy)))(params, batch))
        return len(re.findall(r"devices=\(MemorySpace\.Host,\)", jaxpr))

    assert host_copies("save_dots") == 0
    assert host_copies("offload") > 0


def test_cached_decoding_is_unchanged_by_remat():
    """Cached decoding skips remat (it is never differentiated): the decode step of 'full' is
    the very computation of 'none', and it runs."""
    model = _encoder_decoder(dropout_rate=0.0)
    params = _params(model)
    enc = _batch(model)["encoder_input_tokens"]
    encoded = jnp.asarray(np.random.RandomState(1).normal(size=(2, 12, 32)), jnp.float32)
    tokens, position = jnp.zeros((2, 1), jnp.int32), jnp.int32(0)
    steps = {}
    for policy in ("none", "full"):
        m = _with_policy(model, policy)
        cache = m.init_cache(params, enc, 6)
        steps[policy] = str(jax.make_jaxpr(m.decode_step)(params, encoded, enc, tokens,
                                                          position, cache))
    assert steps["full"] == steps["none"]
    logits, cache = jax.jit(m.decode_step)(params, encoded, enc, tokens, position, cache)
    assert logits.shape == (2, 128) and bool(jnp.isfinite(logits).all())


def test_gin_binding_trains_one_step(clean_gin):
    gin.parse_config("""
        from moetx.lm import transformer
        transformer.TransformerConfig.vocab_size = 128
        transformer.TransformerConfig.emb_dim = 32
        transformer.TransformerConfig.num_heads = 4
        transformer.TransformerConfig.head_dim = 8
        transformer.TransformerConfig.mlp_dim = 64
        transformer.TransformerConfig.num_decoder_layers = 2
        transformer.TransformerConfig.remat_policy = 'full'
    """)
    cfg = transformer.TransformerConfig()
    assert cfg.remat_policy == "full"
    model = models.DecoderOnlyModel(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    tr = make_trainer(model, batch_size=2, length=16)
    state = tr.init_state()
    state, sums = tr.train_step(state, tr.to_global(packed_batch(2, 16)))
    assert int(state.step) == 1 and np.isfinite(float(sums["loss"]))
