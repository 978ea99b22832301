"""Decoder-only Transformer: T5X names, logical axes, masking invariants, KV-cache decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from moetx.lm import attention, models, transformer
from moetx.nn import layers
from tests.lm.conftest import assert_cached_decoding_matches_teacher_forcing

CFG = transformer.TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8,
                                    mlp_dim=32, num_decoder_layers=2)


def _model(prefix_lm=False, **kw):
    cfg = transformer.TransformerConfig(**{**CFG.__dict__, **kw})
    m = models.DecoderOnlyModel(cfg, prefix_lm=prefix_lm)
    v = m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(2, 16))
    return m, v


def _shift(t):
    return jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)


def test_parameter_paths_and_shapes_follow_t5x():
    _, v = _model()
    shapes = {jax.tree_util.keystr(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(v["params"]))}
    expected = {
        "['decoder']['token_embedder']['embedding']": (64, 16),
        "['decoder']['relpos_bias']['rel_embedding']": (2, 32),
        "['decoder']['layers_0']['pre_self_attention_layer_norm']['scale']": (16,),
        "['decoder']['layers_0']['self_attention']['query']['kernel']": (16, 16),
        "['decoder']['layers_1']['self_attention']['out']['kernel']": (16, 16),
        "['decoder']['layers_0']['pre_mlp_layer_norm']['scale']": (16,),
        "['decoder']['layers_0']['mlp']['wi_0']['kernel']": (16, 32),
        "['decoder']['layers_0']['mlp']['wi_1']['kernel']": (16, 32),
        "['decoder']['layers_0']['mlp']['wo']['kernel']": (32, 16),
        "['decoder']['decoder_norm']['scale']": (16,),
        "['decoder']['logits_dense']['kernel']": (16, 64),
    }
    for k, s in expected.items():
        assert shapes[k] == s, k
    assert len(shapes) == 4 + 2 * 9  # no biases anywhere


def test_every_parameter_has_logical_axes():
    _, v = _model()
    specs = nn.get_partition_spec(v["params"])
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert leaves and all(isinstance(s, PartitionSpec) and len(s) > 0 and all(s) for s in leaves)
    wi = specs["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert tuple(wi) == ("embed", "mlp")
    assert tuple(specs["decoder"]["token_embedder"]["embedding"]) == ("vocab", "embed")


def test_packed_examples_do_not_attend_across_segments():
    m, v = _model()
    params = nn.unbox(v["params"])
    rng = np.random.RandomState(0)
    targets = rng.randint(3, 64, (1, 16)).astype(np.int32)
    segs = np.array([[1] * 7 + [2] * 6 + [0] * 3], np.int32)
    targets[segs == 0] = 0
    pos = np.concatenate([np.arange(7), np.arange(6), np.zeros(3)])[None].astype(np.int32)
    inputs = np.where(pos == 0, 0, np.roll(targets, 1, axis=1))

    def logits(t, i):
        return m.logits(params, {"decoder_input_tokens": jnp.asarray(i),
                                 "decoder_target_tokens": jnp.asarray(t),
                                 "decoder_segment_ids": jnp.asarray(segs)})

    base = logits(targets, inputs)
    t2, i2 = targets.copy(), inputs.copy()
    t2[0, 2:7] = (t2[0, 2:7] + 5) % 60 + 3  # perturb the first example only
    i2[0, 3:7] = t2[0, 2:6]
    pert = logits(t2, i2)
    np.testing.assert_allclose(base[0, 7:13], pert[0, 7:13], atol=1e-6)  # second example
    assert not np.allclose(base[0, 3:7], pert[0, 3:7])  # the first one did change


def test_causality():
    m, v = _model()
    params = nn.unbox(v["params"])
    t = jnp.asarray(np.random.RandomState(1).randint(3, 64, (2, 16)), jnp.int32)
    base = m.logits(params, {"decoder_input_tokens": _shift(t), "decoder_target_tokens": t})
    t2 = t.at[:, 10].set((t[:, 10] + 7) % 60 + 3)
    pert = m.logits(params, {"decoder_input_tokens": _shift(t2), "decoder_target_tokens": t2})
    np.testing.assert_allclose(base[:, :11], pert[:, :11], atol=1e-6)  # input 10 feeds pos 11
    assert not np.allclose(base[:, 11:], pert[:, 11:])


def test_prefix_lm_inputs_are_bidirectional_targets_causal():
    m, v = _model(prefix_lm=True)
    params = nn.unbox(v["params"])
    t = jnp.asarray(np.random.RandomState(2).randint(3, 64, (1, 16)), jnp.int32)
    prefix = jnp.asarray((np.arange(16) < 8)[None].astype(np.int32))

    def logits(tt):
        return m.logits(params, {"decoder_input_tokens": _shift(tt), "decoder_target_tokens": tt,
                                 "decoder_causal_attention": prefix})

    base = logits(t)
    pert = logits(t.at[:, 5].set((t[:, 5] + 7) % 60 + 3))  # input position 6, in the prefix
    assert not np.allclose(base[:, :6], pert[:, :6])  # earlier prefix positions see it
    base2 = logits(t)
    pert2 = logits(t.at[:, 12].set((t[:, 12] + 7) % 60 + 3))  # input position 13: a target
    np.testing.assert_allclose(base2[:, :13], pert2[:, :13], atol=1e-6)


@pytest.mark.parametrize("untied", [True, False])
def test_kv_cache_decoding_equals_teacher_forcing(untied):
    m, v = _model(logits_via_embedding=not untied)
    assert_cached_decoding_matches_teacher_forcing(m, nn.unbox(v["params"]))


def test_greedy_decoding_forces_prompt_and_follows_argmax():
    m, v = _model()
    params = nn.unbox(v["params"])
    prompts = jnp.asarray([[5, 6, 7] + [0] * 9, [9, 10, 11] + [0] * 9], jnp.int32)
    lengths = jnp.asarray([3, 2], jnp.int32)
    out = np.asarray(m.predict_batch(params, prompts, lengths, jax.random.PRNGKey(0), eos_id=1))
    assert out[0, :3].tolist() == [5, 6, 7] and out[1, :2].tolist() == [9, 10]
    # Each generated token is the argmax of the teacher-forced logits of what precedes it.
    for r in range(2):
        row = out[r].tolist()
        n = next((i for i, x in enumerate(row) if x in (0, 1)), len(row))
        seq = jnp.asarray(out[r:r + 1, :n])
        lg = m.logits(params, {"decoder_input_tokens": _shift(seq), "decoder_target_tokens": seq})
        assert n > int(lengths[r])
        for pos in range(int(lengths[r]), n):
            assert int(jnp.argmax(lg[0, pos])) == int(out[r, pos])


def test_relative_position_buckets_match_t5():
    # Unidirectional: distances 0..15 are exact, larger ones logarithmic, future -> 0.
    rel = jnp.arange(-200, 5)
    b = np.asarray(layers.relative_position_bucket(rel, False, 32, 128))
    assert b[rel.tolist().index(-3)] == 3 and b[rel.tolist().index(2)] == 0
    assert b[rel.tolist().index(-200)] == 31 and b.max() == 31
    # Bidirectional: the future gets the upper half of the buckets.
    bb = np.asarray(layers.relative_position_bucket(jnp.array([-1, 1, 200]), True, 32, 128))
    assert bb.tolist() == [1, 17, 31]


def test_decoder_mask_shape_and_padding():
    tgt = jnp.asarray([[4, 5, 0]])
    mask = attention.make_decoder_mask(tgt)
    assert mask.shape == (1, 1, 3, 3)
    assert not bool(mask[0, 0, 2].any())  # padding attends nowhere
    assert bool(mask[0, 0, 1, 0]) and not bool(mask[0, 0, 0, 1])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="emb_dim"):
        transformer.TransformerConfig(emb_dim=0)
    with pytest.raises(ValueError, match="activation"):
        transformer.TransformerConfig(mlp_activations=("nope",))


def test_bfloat16_activations_keep_float32_params_and_logits():
    m32, v = _model()
    m16, _ = _model(dtype="bfloat16")
    params = nn.unbox(v["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    t = jnp.asarray(np.random.RandomState(4).randint(3, 64, (2, 16)), jnp.int32)
    b = {"decoder_input_tokens": _shift(t), "decoder_target_tokens": t}
    l32, l16 = m32.logits(params, b), m16.logits(params, b)
    assert l16.dtype == jnp.float32 and bool(jnp.isfinite(l16).all())
    np.testing.assert_allclose(l16, l32, atol=0.1)
