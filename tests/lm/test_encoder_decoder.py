"""T5.1.1 encoder-decoder: the real T5X fixture's parameter tree, masking, cached decoding."""

import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import models, transformer
from tests.conftest import REPO_ROOT

FIXTURE = os.path.join(REPO_ROOT, "..", "shared", "fixtures", "t5x", "test_t5_tiny.checkpoint_0")
# The fixture's config: d_model 8, 4 heads of 3, d_ff 16 gated-GELU, 2+2 layers, untied logits.
FIXTURE_CFG = transformer.TransformerConfig(
    vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16, num_encoder_layers=2,
    num_decoder_layers=2, mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _shapes(tree):
    return {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _small(**kw):
    cfg = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
               num_encoder_layers=2, num_decoder_layers=2)
    cfg.update(kw)
    m = models.EncoderDecoderModel(transformer.TransformerConfig(**cfg))
    v = m.get_initial_variables(jax.random.PRNGKey(0),
                                m.input_shapes(2, {"inputs": 10, "targets": 8}))
    return m, nn.unbox(v["params"])


@pytest.fixture(scope="module")
def t5x_fixture_params():
    if not os.path.exists(FIXTURE):
        pytest.fail(f"T5X fixture missing at {FIXTURE} (../shared/fixtures must sit beside the "
                    "repo)")
    with open(FIXTURE, "rb") as f:
        state = flax.serialization.msgpack_restore(f.read())
    return state["optimizer"]["target"]


def test_t5x_fixture_tree_loads_without_renaming(t5x_fixture_params):
    model = models.EncoderDecoderModel(FIXTURE_CFG)
    shapes = model.input_shapes(2, {"inputs": 8, "targets": 6})
    ours = jax.eval_shape(lambda: nn.unbox(model.get_initial_variables(
        jax.random.PRNGKey(0), shapes)["params"]))
    assert _shapes(ours) == _shapes(t5x_fixture_params)
    params = jax.tree_util.tree_map(jnp.asarray, t5x_fixture_params)
    rng = np.random.RandomState(0)
    batch = {"encoder_input_tokens": jnp.asarray(rng.randint(2, 32000, (2, 8))),
             "decoder_target_tokens": jnp.asarray(rng.randint(2, 32000, (2, 6)))}
    batch["decoder_input_tokens"] = jnp.concatenate(
        [jnp.zeros((2, 1), jnp.int32), batch["decoder_target_tokens"][:, :-1]], 1)
    logits = jax.jit(model.logits)(params, batch)  # one program, not op by op
    assert logits.shape == (2, 6, 32128) and bool(jnp.isfinite(logits).all())


def test_parameter_names_follow_t5x():
    _, params = _small()
    names = set(_shapes(params))
    for k in ["['token_embedder']['embedding']", "['encoder']['relpos_bias']['rel_embedding']",
              "['encoder']['layers_1']['attention']['query']['kernel']",
              "['encoder']['encoder_norm']['scale']",
              "['decoder']['layers_0']['encoder_decoder_attention']['out']['kernel']",
              "['decoder']['layers_0']['pre_cross_attention_layer_norm']['scale']",
              "['decoder']['logits_dense']['kernel']"]:
        assert k in names, k


def _batch(seed=0, b=2, enc=10, dec=8):
    rng = np.random.RandomState(seed)
    t = rng.randint(2, 64, (b, dec)).astype(np.int32)
    return {"encoder_input_tokens": jnp.asarray(rng.randint(2, 64, (b, enc)), jnp.int32),
            "decoder_target_tokens": jnp.asarray(t),
            "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((b, 1), np.int32),
                                                                t[:, :-1]], 1))}


@pytest.mark.parametrize("activations", [("gelu", "linear"), ("relu",)])
def test_cached_decoding_equals_teacher_forcing(activations):
    m, params = _small(mlp_activations=activations)
    batch = _batch()
    full = m.logits(params, batch)
    encoded = m.encode(params, batch["encoder_input_tokens"])
    cache = m.init_cache(params, batch["encoder_input_tokens"], 8)
    step = jax.jit(m.decode_step)
    got = []
    for i in range(8):
        lg, cache = step(params, encoded, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"][:, i:i + 1], jnp.int32(i), cache)
        got.append(lg)
    np.testing.assert_allclose(jnp.stack(got, 1), full, atol=1e-5)


def test_encoder_is_bidirectional_and_decoder_causal():
    m, params = _small()
    batch = _batch(1)
    base = m.logits(params, batch)
    pert = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"].at[:, -1].set(5))
    assert not np.allclose(base[:, 0], m.logits(params, pert)[:, 0])  # first target sees all
    t2 = batch["decoder_target_tokens"].at[:, 5].set(7)
    pert = dict(batch, decoder_target_tokens=t2,
                decoder_input_tokens=batch["decoder_input_tokens"].at[:, 6].set(7))
    np.testing.assert_allclose(base[:, :6], m.logits(params, pert)[:, :6], atol=1e-6)


def test_packed_encoder_decoder_segments_are_isolated():
    m, params = _small()
    enc = np.array([[5, 6, 7, 1, 9, 10, 11, 12, 1, 0]], np.int32)
    enc_seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]], np.int32)
    dec = np.array([[20, 21, 1, 30, 31, 32, 1, 0]], np.int32)
    dec_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    dec_in = np.array([[0, 20, 21, 0, 30, 31, 32, 0]], np.int32)

    def logits(e):
        return m.logits(params, {
            "encoder_input_tokens": jnp.asarray(e), "encoder_segment_ids": jnp.asarray(enc_seg),
            "decoder_target_tokens": jnp.asarray(dec), "decoder_input_tokens": jnp.asarray(dec_in),
            "decoder_segment_ids": jnp.asarray(dec_seg)})

    base = logits(enc)
    e2 = enc.copy()
    e2[0, :3] = [40, 41, 42]  # change the first example's inputs only
    pert = logits(e2)
    np.testing.assert_allclose(base[0, 3:7], pert[0, 3:7], atol=1e-6)
    assert not np.allclose(base[0, :3], pert[0, :3])


def test_predict_batch_greedy_matches_argmax():
    m, params = _small()
    batch = _batch(2)
    out = np.asarray(m.predict_batch(params, batch["encoder_input_tokens"], 8,
                                     jax.random.PRNGKey(0), eos_id=1))
    for r in range(2):
        row = out[r].tolist()
        n = next((i for i, x in enumerate(row) if x in (0, 1)), len(row))
        seq = jnp.asarray(out[r:r + 1, :max(n, 1)])
        b = {"encoder_input_tokens": batch["encoder_input_tokens"][r:r + 1],
             "decoder_target_tokens": seq,
             "decoder_input_tokens": jnp.concatenate([jnp.zeros((1, 1), jnp.int32),
                                                      seq[:, :-1]], 1)}
        lg = m.logits(params, b)
        for pos in range(n):
            assert int(jnp.argmax(lg[0, pos])) == row[pos]


def _dot_generals(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("kw", [{}, dict(num_kv_heads=1)], ids=["mha", "mqa"])
def test_decode_steps_read_the_cross_attention_kv_projected_once(kw):
    m, params = _small(**kw)
    enc = _batch(2)["encoder_input_tokens"]
    encoded = m.encode(params, enc)
    cache = m.init_cache(params, enc, 8)
    cross = m.cross_kv(params, encoded, enc, cache)
    kv_heads = kw.get("num_kv_heads", 2)
    for i in range(2):
        layer = cross["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
        # Heads-major [batch, kv_heads, enc_length, d_kv], the layout the step's matmuls read.
        assert layer["key"].shape == layer["value"].shape == (2, kv_heads, 10, 8)
    tokens = jnp.asarray([[0], [0]], jnp.int32)
    pos = jnp.array(0, jnp.int32)

    def step(c):
        return m.decode_step(params, encoded, enc, tokens, pos, cache, c)[0]

    np.testing.assert_allclose(step(cross), step(None), rtol=1e-5, atol=1e-5)
    # Read, not recomputed: other K/V give other logits, and each layer's step has two
    # projections fewer (key and value of the encoder output).
    other = jax.tree_util.tree_map(lambda x: x[::-1], cross)  # the two examples swapped
    assert not np.allclose(step(other), step(cross), atol=1e-4)
    assert _dot_generals(step, None) - _dot_generals(step, cross) == 2 * 2


def test_beam_search_one_beam_equals_greedy_and_four_beams_score_higher():
    m, params = _small()
    enc = _batch(3)["encoder_input_tokens"]
    greedy = np.asarray(m.predict_batch(params, enc, 8, jax.random.PRNGKey(0), eos_id=1))
    beam1 = np.asarray(m.predict_batch(params, enc, 8, jax.random.PRNGKey(0), eos_id=64,
                                       num_beams=1, alpha=0.0))
    greedy_no_eos = np.asarray(m.predict_batch(params, enc, 8, jax.random.PRNGKey(0), eos_id=64))
    np.testing.assert_array_equal(beam1, greedy_no_eos)
    beam4 = np.asarray(m.predict_batch(params, enc, 8, jax.random.PRNGKey(0), eos_id=64,
                                       num_beams=4, alpha=0.0))

    def loglik(seq):
        seq = jnp.asarray(seq)
        b = {"encoder_input_tokens": enc, "decoder_target_tokens": seq,
             "decoder_input_tokens": jnp.concatenate([jnp.zeros((2, 1), jnp.int32),
                                                      seq[:, :-1]], 1)}
        return np.asarray(m.score_batch(params, b))

    assert np.all(loglik(beam4) >= loglik(beam1) - 1e-5)
    assert greedy.shape == (2, 8)
