"""Grouped-query and multi-query attention (`TransformerConfig.num_kv_heads`).

Pinned properties: num_kv_heads == num_heads is the plain multi-head model (same parameters,
same logical axes, same logits); GQA/MQA equal a reference that repeats each K/V head over its
group of query heads explicitly (NumPy for the attention core, and a multi-head model whose K/V
kernels are the repeated GQA kernels for whole stacks, with RoPE, relative position bias, Primer
dconv, a block program, an encoder-decoder); causality; cached decoding stores only the K/V heads
and equals teacher forcing and uncached greedy decoding; a 2x1x4 mesh (K/V heads fewer than the
model axis: replicated) gives the single-device loss; a bad head count is a one-line error.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import attention, models, programs, transformer
from tests.conftest import make_trainer, packed_batch
from tests.lm.conftest import assert_cached_decoding_matches_teacher_forcing

BASE = dict(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=32,
            num_decoder_layers=2)
LLAMA = dict(position_embedding="rope", scale_attention_logits=True,
             mlp_activations=("silu", "linear"), tied_logits_rescale=False)


def _cfg(**kw) -> transformer.TransformerConfig:
    return transformer.TransformerConfig(**{**BASE, **kw})


def _params(model, seed: int = 0):
    """Random parameters of the model's tree (norm scales near 1), from shapes only: nothing of
    the init is compiled."""
    shapes = (model.input_shapes(2, {"inputs": 8, "targets": 8})
              if model.config.num_encoder_layers else model.input_shapes(2, 8))
    abstract = jax.eval_shape(lambda: nn.unbox(
        model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]))
    rng = np.random.RandomState(seed)

    def fill(path, x):
        y = rng.normal(0.0, 0.3, x.shape)
        return jnp.asarray(y + 1.0 if "scale" in jax.tree_util.keystr(path) else y, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _tokens(seed: int = 0, shape=(2, 12)) -> jnp.ndarray:
    return jnp.asarray(np.random.RandomState(seed).randint(2, 64, shape), jnp.int32)


def _logits(model, params, batch):
    """Teacher-forced logits."""
    return jax.jit(model.logits)(params, batch)


def _decoder_batch(t):
    inp = jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
    return {"decoder_input_tokens": inp, "decoder_target_tokens": t}


def _repeat_kv_kernels(tree, groups: int):
    """A GQA parameter tree -> the multi-head tree computing the same function: every
    `key`/`value` (and their dconv) kernel `[in, kv_heads*d_kv]` has each head's columns
    repeated for the `groups` query heads that share it (query head h uses K/V head h//groups)."""
    d = BASE["head_dim"]

    def expand(path, x):
        names = {getattr(p, "key", None) for p in path}
        if not names & {"key", "value", "key_dconv", "value_dconv"}:
            return x
        heads = x.shape[-1] // d
        # Shape: [..., kv_heads, d_kv] -> [..., kv_heads * groups, d_kv]
        y = jnp.repeat(x.reshape(*x.shape[:-1], heads, d), groups, axis=-2)
        return y.reshape(*x.shape[:-1], heads * groups * d)

    return jax.tree_util.tree_map_with_path(expand, tree)


# -------------------------------------------------------------------- num_kv_heads == num_heads
def test_num_kv_heads_equal_to_num_heads_is_the_multi_head_model():
    plain = models.DecoderOnlyModel(_cfg())
    same = models.DecoderOnlyModel(_cfg(num_kv_heads=4))
    p0, p1 = (jax.eval_shape(lambda m=m: m.get_initial_variables(
        jax.random.PRNGKey(0), m.input_shapes(2, 4))) for m in (plain, same))
    # The same names, shapes and logical axes (the multi-head ones: K/V sharded like Q).
    assert jax.tree_util.tree_structure(p0) == jax.tree_util.tree_structure(p1)
    assert nn.get_partition_spec(p0) == nn.get_partition_spec(p1)
    kernel_axes = nn.get_partition_spec(p0)["params"]["decoder"]["layers_0"]["self_attention"]
    assert tuple(kernel_axes["key"]["kernel"]) == ("embed", "joined_kv")
    assert nn.unbox(p0)["params"]["decoder"]["layers_0"]["self_attention"]["key"][
        "kernel"].shape == (32, 32)
    params = _params(plain)
    batch = _decoder_batch(_tokens())
    np.testing.assert_array_equal(_logits(same, params, batch), _logits(plain, params, batch))


# --------------------------------------------------------------- the attention core, in NumPy
def _numpy_attention(x, params, bias, num_heads, kv_heads, d, positions, theta):
    """Reference attention: project, rotate, repeat K/V heads, softmax, project out."""
    def heads(kernel, n):
        return (x @ np.asarray(kernel)).reshape(*x.shape[:2], n, d)

    q = heads(params["query"]["kernel"], num_heads)
    k = heads(params["key"]["kernel"], kv_heads)
    v = heads(params["value"]["kernel"], kv_heads)
    q = np.asarray(attention.rotary_embedding(jnp.asarray(q), positions, theta)) * d ** -0.5
    k = np.asarray(attention.rotary_embedding(jnp.asarray(k), positions, theta))
    k = np.repeat(k, num_heads // kv_heads, axis=2)  # query head h reads K/V head h // groups
    v = np.repeat(v, num_heads // kv_heads, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(*x.shape[:2], num_heads * d)
    return out @ np.asarray(params["out"]["kernel"])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_attention_equals_repeated_kv_reference(kv_heads):
    b, length, embed, heads, d = 2, 6, 16, 4, 8
    rng = np.random.RandomState(kv_heads)
    x = rng.normal(size=(b, length, embed)).astype(np.float32)
    # A distinct additive bias per query head (as the relative position bias is) and a mask.
    causal = np.tril(np.ones((length, length), bool))
    bias = rng.normal(size=(1, heads, length, length)).astype(np.float32)
    bias = np.where(causal, bias, attention.NEG_INF).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    module = attention.MultiHeadDotProductAttention(heads, d, rope_theta=100.0,
                                                    scale_logits=True, num_kv_heads=kv_heads)
    params = nn.unbox(module.init(jax.random.PRNGKey(0), x, x, bias,
                                  positions=positions)["params"])
    assert params["key"]["kernel"].shape == (embed, kv_heads * d)
    assert params["query"]["kernel"].shape == (embed, heads * d)
    got = module.apply({"params": params}, x, x, bias, positions=positions)
    want = _numpy_attention(x, params, bias, heads, kv_heads, d, positions, 100.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Not vacuous: which K/V head a query head reads matters (a different grouping differs).
    swapped = dict(params, key={"kernel": jnp.roll(params["key"]["kernel"], d, axis=1)})
    if kv_heads > 1:
        assert not np.allclose(module.apply({"params": swapped}, x, x, bias,
                                            positions=positions), want, atol=1e-3)


# ----------------------------------------------------------- whole stacks vs repeated K/V heads
STACKS = {
    "relpos": dict(),
    "llama_mqa": dict(LLAMA, num_kv_heads=1),
    "llama_gqa": dict(LLAMA),
    "primer_dconv": dict(primer_dconv=True),
    # Primer-EZ as a block program: its k and v paths' convs act on the K/V heads only.
    "program": dict(LLAMA, decoder_program=programs.PRIMER_EZ_PROGRAM),
}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stack_equals_multi_head_model_with_repeated_kv(name):
    kw = {"num_kv_heads": 2, **STACKS[name]}
    gqa = models.DecoderOnlyModel(_cfg(**kw))
    mha = models.DecoderOnlyModel(_cfg(**dict(kw, num_kv_heads=None)))
    params = _params(gqa)
    groups = 4 // kw["num_kv_heads"]
    batch = _decoder_batch(_tokens())
    want = _logits(mha, _repeat_kv_kernels(params, groups), batch)
    # Up to float reassociation (~1e-5 on logits of order 1); a wrong grouping is off by ~0.1.
    np.testing.assert_allclose(_logits(gqa, params, batch), want, rtol=1e-4, atol=1e-4)
    # The GQA model really has fewer K/V parameters.
    layer = params["decoder"]["layers_0"]["self_attention"]
    assert layer["key"]["kernel"].shape[-1] == kw["num_kv_heads"] * 8
    assert layer["value"]["kernel"].shape[-1] == kw["num_kv_heads"] * 8


def test_encoder_decoder_uses_kv_heads_everywhere_and_matches_reference():
    kw = dict(num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=2)
    gqa = models.EncoderDecoderModel(_cfg(**kw))
    mha = models.EncoderDecoderModel(_cfg(**dict(kw, num_kv_heads=None)))
    params = _params(gqa)
    for attn in (params["encoder"]["layers_0"]["attention"],
                 params["decoder"]["layers_0"]["self_attention"],
                 params["decoder"]["layers_0"]["encoder_decoder_attention"]):
        assert attn["key"]["kernel"].shape == (32, 16) and attn["query"]["kernel"].shape == (32, 32)
    t = _tokens(1, (2, 8))
    batch = {"encoder_input_tokens": _tokens(2, (2, 10)), **_decoder_batch(t)}
    want = _logits(mha, _repeat_kv_kernels(params, 2), batch)
    np.testing.assert_allclose(_logits(gqa, params, batch), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ causality, decoding
@pytest.mark.parametrize("kw", [dict(num_kv_heads=1), dict(LLAMA, num_kv_heads=2)])
def test_causality(kw):
    m = models.DecoderOnlyModel(_cfg(**kw))
    params = _params(m)
    t = _tokens(3)
    t2 = t.at[:, 7:].set((t[:, 7:] + 5) % 60 + 2)
    a, b = _logits(m, params, _decoder_batch(t)), _logits(m, params, _decoder_batch(t2))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("kw", [dict(num_kv_heads=1), dict(LLAMA, num_kv_heads=2),
                                dict(num_kv_heads=2, primer_dconv=True)],
                         ids=["mqa_relpos", "gqa_rope", "gqa_dconv"])
def test_cache_holds_kv_heads_and_cached_decoding_equals_teacher_forcing(kw):
    m = models.DecoderOnlyModel(_cfg(**kw))
    params = _params(m)
    cache = m.init_cache(params, 2, 16)
    attn_cache = cache["decoder"]["layers_0"]["self_attention"]
    assert attn_cache["cached_key"].shape == (2, kw["num_kv_heads"], 16, 8)
    assert attn_cache["cached_value"].shape == (2, kw["num_kv_heads"], 16, 8)
    if kw.get("primer_dconv"):
        assert attn_cache["key_dconv"]["prev"].shape == (2, 2, kw["num_kv_heads"] * 8)
    assert_cached_decoding_matches_teacher_forcing(m, params)


def test_cached_greedy_decoding_equals_uncached_greedy():
    m = models.DecoderOnlyModel(_cfg(**LLAMA, num_kv_heads=1))
    params = _params(m)
    prompts = jnp.asarray([[5, 6, 7] + [0] * 9, [9, 10] + [0] * 10], jnp.int32)
    lengths = jnp.asarray([3, 2], jnp.int32)
    cached = np.asarray(jax.jit(lambda p: m.predict_batch(
        p, prompts, lengths, jax.random.PRNGKey(0), eos_id=-1))(params))

    # Uncached: the whole prefix through the teacher-forced model at every step.
    forward = jax.jit(lambda p, seq: m.logits(p, {
        "decoder_input_tokens": jnp.concatenate([jnp.zeros_like(seq[:, :1]), seq[:, :-1]], 1),
        "decoder_target_tokens": jnp.ones_like(seq)}))
    seq = np.zeros(prompts.shape, np.int32)
    for i in range(prompts.shape[1]):
        greedy = np.asarray(forward(params, jnp.asarray(seq))[:, i].argmax(-1))
        seq[:, i] = np.where(i < np.asarray(lengths), np.asarray(prompts)[:, i], greedy)
    np.testing.assert_array_equal(cached, seq)
    assert len(set(seq[0, 3:].tolist())) > 1  # a real continuation, not a constant


# --------------------------------------------------------------------------------- sharding
def test_2x1x4_mesh_gives_the_unsharded_loss():
    """2 K/V heads on a 4-way model axis: the K/V kernels are replicated over it while Q stays
    split by head, and the loss on the 8-device mesh is the unsharded one."""
    model = models.DecoderOnlyModel(_cfg(**LLAMA, num_kv_heads=2, vocab_size=128),
                                    loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    sharded = make_trainer(model, mesh_shape=(2, 1, 4), batch_size=8, length=16)
    params = _params(model)
    params_on_mesh = jax.device_put(params, sharded.state_shardings.params)
    attn = params_on_mesh["decoder"]["layers_0"]["self_attention"]
    assert attn["key"]["kernel"].sharding.is_fully_replicated
    assert attn["query"]["kernel"].addressable_shards[0].data.shape == (32, 8)  # heads split
    batch = packed_batch(8, 16)
    got = sharded.eval_step(params_on_mesh, sharded.to_global(batch))
    unsharded = jax.jit(model.eval_fn)(params, model.complete_batch(
        batch, model.input_shapes(8, 16)))
    assert float(got["weight"]) > 0
    np.testing.assert_allclose(float(got["cross_ent_sum"]), float(unsharded["cross_ent_sum"]),
                               rtol=1e-5)


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [3, 0, -2, 8, 2.0])
def test_num_kv_heads_not_dividing_num_heads_is_a_one_line_error(bad):
    with pytest.raises(ValueError) as e:
        _cfg(num_kv_heads=bad)
    first, *rest = str(e.value).splitlines()
    assert first == (f"TransformerConfig.num_kv_heads must be a positive divisor of "
                     f"num_heads=4 (or None), got {bad!r}.")
    assert all("In call to configurable" in line for line in rest)  # gin's own addition


def test_attention_module_checks_num_kv_heads_and_shared_qk():
    x = jnp.ones((1, 3, 16))
    with pytest.raises(ValueError, match="positive divisor of num_heads=4"):
        attention.MultiHeadDotProductAttention(4, 8, num_kv_heads=3).init(
            jax.random.PRNGKey(0), x, x, None)
    with pytest.raises(ValueError, match="primer_share_qk"):
        _cfg(primer_share_qk=True, primer_dconv=True, num_kv_heads=2)


def test_llama_gqa_tiny_gin_builds_a_gqa_model(parse):
    model = parse("llama_gqa_tiny")
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.position_embedding) == (4, 2, "rope")
    attn = jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), model.input_shapes(1, 8)))["params"]["decoder"]["layers_0"][
        "self_attention"]
    assert attn["key"]["kernel"].value.shape == (32, 16)
    assert attn["query"]["kernel"].value.shape == (32, 32)
