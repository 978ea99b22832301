"""The in-process Predictor and `checkpoints.restore_for_model`, on tiny random models: scores equal
the teacher-forced `score_batch`, greedy generation equals step-by-step argmax decoding (and what
`infer` writes), a restore onto a (2, 1, 4) mesh equals the single-device one, and clear errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import infer as infer_lib, models, predict, transformer
from moetx.trainer import checkpoints, partitioning

TINY = dict(vocab_size=8192, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, dtype="float32")
EOS = 1
TEXTS = ["The king said", "In the beginning God created the heaven and the earth.", "Hello",
         "To be, or not to be", "A", "And there was light."]


def _one_device():
    return partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])


RULES = partitioning.standard_logical_axis_rules()


def _init(model, input_shapes):
    return jax.jit(lambda: nn.unbox(model.get_initial_variables(
        jax.random.PRNGKey(0), input_shapes)["params"]))()


def _save(directory, step, params, ema_shift=None):
    """Writes `directory/checkpoint_<step>` as training does (params, an optimizer state,
    optionally an EMA of the weights: the params shifted by `ema_shift`)."""
    ema = {}
    if ema_shift is not None:
        ema = {"params": jax.tree_util.tree_map(lambda x: x + ema_shift, params),
               "model_state": {}}
    state = {"step": jnp.asarray(step, jnp.int32), "params": params,
             "opt_state": {"count": jnp.zeros((), jnp.int32)}, "model_state": {}, "ema": ema}
    ckpt = checkpoints.Checkpointer(str(directory), save_interval_steps=1, keep=None)
    ckpt.save(step, state, {"batches_consumed": 0})
    ckpt.close()


@pytest.fixture(scope="module")
def vocab(default_vocab):
    from moetx.datasets import vocab as vocab_lib

    return vocab_lib.get_vocabulary(None)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    model = models.DecoderOnlyModel(transformer.TransformerConfig(num_decoder_layers=1, **TINY))
    directory = tmp_path_factory.mktemp("decoder")
    params = _init(model, model.input_shapes(2, 16))
    _save(directory, 5, params)
    return model, params, str(directory)


@pytest.fixture(scope="module")
def encdec(tmp_path_factory):
    model = models.EncoderDecoderModel(transformer.TransformerConfig(
        num_encoder_layers=1, num_decoder_layers=1, **TINY))
    directory = tmp_path_factory.mktemp("encdec")
    params = _init(model, model.input_shapes(2, {"inputs": 8, "targets": 8}))
    _save(directory, 3, params)
    return model, params, str(directory)


def _shift_right(tgt):
    return np.concatenate([np.zeros((tgt.shape[0], 1), np.int32), tgt[:, :-1]], 1)


def _rows(rows, length):
    arr = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return arr


# ------------------------------------------------------------------------------------ scoring
def test_decoder_only_score_equals_teacher_forced_score_batch(decoder, vocab):
    model, params, directory = decoder
    p = predict.Predictor.from_checkpoint(model, directory, vocabulary=vocab, batch_size=4,
                                          max_length=16, mesh=_one_device(), rules=RULES)
    assert p.step == 5
    got = p.score(TEXTS)
    tgt = _rows([list(vocab.encode(t)) + [EOS] for t in TEXTS], 16)
    want = np.asarray(jax.jit(model.score_batch)(params, {
        "decoder_input_tokens": jnp.asarray(_shift_right(tgt)),
        "decoder_target_tokens": jnp.asarray(tgt)}))
    assert got.shape == (len(TEXTS),) and np.all(got < 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Ids in give the same scores as strings; add_eos=False for ids that already end in EOS.
    np.testing.assert_allclose(p.score(p.encode(TEXTS)), got, rtol=1e-6)
    np.testing.assert_allclose(
        p.score([list(vocab.encode(t)) + [EOS] for t in TEXTS], add_eos=False), got, rtol=1e-6)
    assert p.decode(p.encode(TEXTS)) == TEXTS


def test_encoder_decoder_score_equals_teacher_forced_score_batch(encdec, vocab):
    model, params, directory = encdec
    p = predict.Predictor.from_checkpoint(model, directory, vocabulary=vocab, batch_size=4,
                                          max_length=8, max_input_length=16,
                                          mesh=_one_device(), rules=RULES)
    inputs = TEXTS[:5]
    targets = ["yes", "no", "The king", "maybe so", "light"]
    got = p.score(inputs, targets)
    enc = _rows([list(vocab.encode(t)) + [EOS] for t in inputs], 16)
    tgt = _rows([list(vocab.encode(t)) + [EOS] for t in targets], 8)
    want = np.asarray(jax.jit(model.score_batch)(params, {
        "encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(tgt),
        "decoder_input_tokens": jnp.asarray(_shift_right(tgt))}))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A per-call max_length (a new shape) scores the same.
    np.testing.assert_allclose(p.score(inputs, targets, max_length=5), got, rtol=1e-5)


# ------------------------------------------------------------------------------------ generation
def _greedy_decoder_only(model, params, prompt, max_length):
    """Argmax decoding by full teacher-forced forward passes (no KV cache)."""
    logits_fn = jax.jit(model.logits)
    seq = list(prompt)
    while len(seq) < max_length:
        tgt = jnp.asarray([seq + [0] * (max_length - len(seq))])
        logits = logits_fn(params, {"decoder_input_tokens": jnp.asarray(_shift_right(
            np.asarray(tgt))), "decoder_target_tokens": jnp.ones_like(tgt)})
        nxt = int(jnp.argmax(logits[0, len(seq)]))
        seq.append(nxt)
        if nxt == EOS:
            break
    gen = seq[len(prompt):]
    return gen[:gen.index(EOS)] if EOS in gen else gen


def _greedy_encoder_decoder(model, params, inputs, max_length):
    logits_fn = jax.jit(model.logits)
    enc = jnp.asarray([inputs])
    out = []
    while len(out) < max_length:
        dec = np.asarray([out + [0] * (max_length - len(out))], np.int32)
        logits = logits_fn(params, {"encoder_input_tokens": enc,
                                       "decoder_input_tokens": jnp.asarray(_shift_right(dec)),
                                       "decoder_target_tokens": jnp.ones_like(dec)})
        nxt = int(jnp.argmax(logits[0, len(out)]))
        if nxt == EOS:
            break
        out.append(nxt)
    return out


def test_decoder_only_greedy_equals_uncached_argmax_and_what_infer_writes(decoder, vocab,
                                                                           tmp_path):
    model, params, directory = decoder
    p = predict.Predictor.from_checkpoint(model, directory, vocabulary=vocab, batch_size=4,
                                          max_length=12, mesh=_one_device(), rules=RULES)
    prompts = TEXTS[:3] + ["The king said"]
    gens = p.generate(prompts)
    for prompt, g in zip(prompts, gens):
        want = _greedy_decoder_only(model, params, list(vocab.encode(prompt)), 12)
        assert g.ids == [t for t in want if t], (prompt, g.ids, want)
        assert g.text == vocab.decode(g.ids)
        assert len(g.tokens) == 12 - len(vocab.encode(prompt))
    assert gens[0].ids == gens[3].ids  # batch position does not matter
    assert [g.ids for g in p.generate(p.encode(prompts))] == [g.ids for g in gens]

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    infer_lib.infer(model=model, checkpoint_dir=directory, prompts_file=str(prompts_file),
                    output_file=str(out), max_length=12, batch_size=4, mesh_fn=_one_device)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"prompt": q, "output": g.text, "output_ids": g.ids}
                    for q, g in zip(prompts, gens)]
    infer_lib.infer(model=model, checkpoint_dir=directory, prompts_file=str(prompts_file),
                    mode="score", max_length=12, batch_size=4, mesh_fn=_one_device)
    rows = [json.loads(x) for x in
            open(os.path.join(directory, "infer_score_5.jsonl")).read().splitlines()]
    assert [r["text"] for r in rows] == prompts
    np.testing.assert_allclose([r["score"] for r in rows], p.score(prompts), rtol=1e-6)


def test_encoder_decoder_greedy_and_sampling(encdec, vocab):
    model, params, directory = encdec
    p = predict.Predictor.from_checkpoint(model, directory, vocabulary=vocab, batch_size=2,
                                          max_length=6, max_input_length=16,
                                          mesh=_one_device(), rules=RULES)
    inputs = TEXTS[:3]
    gens = p.generate(inputs)
    for x, g in zip(inputs, gens):
        want = _greedy_encoder_decoder(model, params, list(vocab.encode(x)) + [EOS], 6)
        assert g.ids == [t for t in want if t], (x, g.ids, want)
        assert g.tokens.shape == (6,)
    # Sampling is reproducible per seed, depends on it, and top-1 sampling is greedy.
    kw = dict(temperature=1.0, topk=0)
    a = [g.ids for g in p.generate(inputs * 4, seed=1, **kw)]
    assert a == [g.ids for g in p.generate(inputs * 4, seed=1, **kw)]
    assert a != [g.ids for g in p.generate(inputs * 4, seed=2, **kw)]
    assert [g.ids for g in p.generate(inputs, temperature=1.0, topk=1)] == \
        [g.ids for g in gens]
    beams = p.generate(inputs, num_beams=2)
    assert len(beams) == 3 and all(len(g.ids) <= 6 for g in beams)


# ------------------------------------------------------------------------------------ restore
def test_restore_onto_a_2x1x4_mesh_equals_the_single_device_restore(encdec, vocab):
    model, params, directory = encdec
    shapes = model.input_shapes(8, {"inputs": 16, "targets": 8})
    mesh = partitioning.make_mesh((2, 1, 4))
    sharded, state, step = checkpoints.restore_for_model(model, directory, mesh=mesh,
                                                         rules=RULES, input_shapes=shapes)
    single, _, _ = checkpoints.restore_for_model(model, directory, mesh=_one_device(),
                                                 rules=RULES, input_shapes=shapes)
    assert step == 3 and state == {}
    flat = dict(jax.tree_util.tree_leaves_with_path(sharded))
    for path, x in jax.tree_util.tree_leaves_with_path(single):
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(
            dict(jax.tree_util.tree_leaves_with_path(params))[path]))
    # Really sharded: the MLP's hidden dimension is split over the 4-way model axis.
    wi = sharded["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert len(wi.sharding.device_set) == 8
    assert wi.addressable_shards[0].data.shape[-1] == wi.shape[-1] // 4
    # A Predictor on that mesh scores as the single-device one does.
    kw = dict(vocabulary=vocab, batch_size=4, max_length=8, max_input_length=16, rules=RULES)
    on_mesh = predict.Predictor.from_checkpoint(model, directory, mesh=mesh, **kw)
    alone = predict.Predictor.from_checkpoint(model, directory, mesh=_one_device(), **kw)
    np.testing.assert_allclose(on_mesh.score(TEXTS[:3], ["a", "b", "c"]),
                               alone.score(TEXTS[:3], ["a", "b", "c"]), rtol=1e-5)


def test_restore_picks_the_checkpoint_and_the_ema(decoder, tmp_path):
    model, params, _ = decoder
    shapes = model.input_shapes(2, 16)
    _save(tmp_path, 1, params)
    p2 = jax.tree_util.tree_map(lambda x: 2.0 * x - 0.25, params)
    _save(tmp_path, 2, p2, ema_shift=0.5)
    kw = dict(mesh=_one_device(), rules=RULES, input_shapes=shapes)
    leaf = lambda tree: np.concatenate(  # noqa: E731
        [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
    latest, _, step = checkpoints.restore_for_model(model, str(tmp_path), **kw)
    assert step == 2 and np.array_equal(leaf(latest), leaf(p2))
    first, _, step = checkpoints.restore_for_model(model, str(tmp_path / "checkpoint_1"), **kw)
    assert step == 1 and not np.array_equal(leaf(first), leaf(p2))
    ema, _, _ = checkpoints.restore_for_model(model, str(tmp_path), use_ema=True, **kw)
    np.testing.assert_allclose(leaf(ema), leaf(p2) + 0.5)
    with pytest.raises(ValueError, match=r"Did the run keep an EMA \(train.ema_decay\)"):
        checkpoints.restore_for_model(model, str(tmp_path), step=1, use_ema=True, **kw)
    with pytest.raises(ValueError, match="is checkpoint 1, but step 2"):
        checkpoints.restore_for_model(model, str(tmp_path / "checkpoint_1"), step=2, **kw)


class _Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.BatchNorm(use_running_average=True)(x)


class _StatefulModel:
    """The part of the model protocol a restore uses, for a model with batch statistics."""

    state_collections = ("batch_stats",)

    def get_initial_variables(self, rng, input_shapes):
        return _Normed().init(rng, jnp.ones(input_shapes["x"]))


def test_restore_model_state_and_an_ema_with_or_without_it(tmp_path):
    model, shapes = _StatefulModel(), {"x": (2, 3)}
    variables = jax.jit(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))()
    params = nn.unbox(variables["params"])
    stats = {"batch_stats": jax.tree_util.tree_map(lambda x: x + 2.0, variables["batch_stats"])}
    shift = lambda tree, d: jax.tree_util.tree_map(lambda x: x + d, tree)  # noqa: E731
    for step, ema_state in ((1, shift(stats, 10.0)), (2, {})):
        state = {"step": jnp.asarray(step), "params": params, "opt_state": {},
                 "model_state": stats, "ema": {"params": shift(params, 1.0),
                                               "model_state": ema_state}}
        ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1, keep=None)
        ckpt.save(step, state, {})
        ckpt.close()
    kw = dict(mesh=partitioning.make_mesh((2, 1, 4)), rules=RULES, input_shapes=shapes)
    flat = lambda tree: np.concatenate(  # noqa: E731
        [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])

    p, ms, _ = checkpoints.restore_for_model(model, str(tmp_path), step=1, **kw)
    np.testing.assert_array_equal(flat(p), flat(params))
    np.testing.assert_array_equal(flat(ms), flat(stats))
    assert set(ms) == {"batch_stats"}
    # The EMA covers the statistics: both come from it.
    p, ms, _ = checkpoints.restore_for_model(model, str(tmp_path), step=1, use_ema=True, **kw)
    np.testing.assert_allclose(flat(p), flat(params) + 1.0)
    np.testing.assert_allclose(flat(ms), flat(stats) + 10.0)
    # It covers the weights only (ema_model_state=False): the live statistics are used.
    p, ms, _ = checkpoints.restore_for_model(model, str(tmp_path), step=2, use_ema=True, **kw)
    np.testing.assert_allclose(flat(p), flat(params) + 1.0)
    np.testing.assert_array_equal(flat(ms), flat(stats))


# ------------------------------------------------------------------------------------ errors
def test_clear_errors(decoder, encdec, vocab, tmp_path):
    model, _, directory = decoder
    kw = dict(vocabulary=vocab, batch_size=2, max_length=8, mesh=_one_device(), rules=RULES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.Predictor.from_checkpoint(model, str(tmp_path / "nowhere"), **kw)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint_<step> in"):
        predict.Predictor.from_checkpoint(model, str(tmp_path), **kw)
    with pytest.raises(FileNotFoundError, match="checkpoint_9"):
        predict.Predictor.from_checkpoint(model, directory, step=9, **kw)

    p = predict.Predictor.from_checkpoint(model, directory, **kw)
    long = "And God said, Let there be light: and there was light."
    with pytest.raises(ValueError, match=r"Example 1's prompt has \d+ tokens, more than the 7 "
                                         r"allowed; raise max_length"):
        p.generate(["Hi", long])
    with pytest.raises(ValueError, match=r"text has \d+ tokens, more than the 8 allowed"):
        p.score([long])
    with pytest.raises(ValueError, match="scores whole texts"):
        p.score(["a"], ["b"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        p.generate("one string")

    enc_model, _, enc_dir = encdec
    q = predict.Predictor.from_checkpoint(enc_model, enc_dir, max_input_length=6, **kw)
    with pytest.raises(ValueError, match=r"input has \d+ tokens, more than the 6 allowed; "
                                         r"raise max_input_length"):
        q.generate([long])
    with pytest.raises(ValueError, match="needs targets"):
        q.score(["a"])
    with pytest.raises(ValueError, match="2 inputs but 1 targets"):
        q.score(["a", "b"], ["c"])
