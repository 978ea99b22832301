"""The trainer-backed STraTA functions on a tiny random encoder-decoder: starting a finetune from
a checkpoint's parameters, the generator's top-k sampling call path, and rank classification."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.convert import restore
from moetx.lm import models, transformer
from moetx.pipelines.strata import augment, backend
from moetx.trainer import checkpoints, data as data_lib, partitioning, train as train_lib

LENGTHS = {"inputs": 24, "targets": 6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random encoder-decoder (8k vocabulary + 100 sentinels) saved at step 3."""
    model = models.EncoderDecoderModel(transformer.TransformerConfig(
        vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
        num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))
    cfg = data_lib.DatasetConfig("unused", LENGTHS, batch_size=8)

    def one_device_mesh():  # compiles faster than the 8 simulated devices, same semantics
        return partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])

    trainer = train_lib.build_trainer(model, cfg, mesh_fn=one_device_mesh)
    state = trainer.init_state()
    src = str(tmp_path_factory.mktemp("tiny") / "src")
    ckpt = checkpoints.Checkpointer(src, save_interval_steps=1, keep=1)
    ckpt.save(3, state, {"batches_consumed": 7})
    ckpt.close()
    be = backend.TrainerBackend(model=model, feature_lengths=LENGTHS, infer_batch_size=8,
                                mesh_fn=one_device_mesh)
    return model, trainer, state, os.path.join(src, "checkpoint_3"), be


def _files(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


def test_finetune_starts_from_the_checkpoint_parameters_with_a_fresh_state(tiny, tmp_path,
                                                                           monkeypatch):
    model, trainer, state, src, be = tiny
    before = _files(os.path.dirname(src))
    dst = tmp_path / "ft"
    (dst / "checkpoint_9").mkdir(parents=True)  # a stale run there is replaced, not resumed
    calls = []

    def fake_train(**kw):
        calls.append((kw, sorted(os.listdir(kw["model_dir"])) if os.path.exists(
            kw["model_dir"]) else None))

    monkeypatch.setattr(train_lib, "train", fake_train)
    assert be.finetune(os.path.dirname(src), "some_task", str(dst), seed=1, train_steps=7) \
        == str(dst)
    [(kw, listing)] = calls
    assert listing is None  # train starts in an empty model directory: step 0, data position 0
    assert kw["model_dir"] == str(dst) and kw["train_steps"] == 7 and kw["seed"] == 1
    assert kw["train_dataset_cfg"].mixture_or_task_name == "some_task"
    assert kw["train_dataset_cfg"].split == "train"
    init = kw["init_from"]
    assert isinstance(init, restore.InitFromCheckpoint) and init.path == src and init.step == 3

    # What train does with it: its fresh state (seed 1) gets the source's parameters (seed 0);
    # the step and the optimizer state stay fresh.
    fresh_trainer = train_lib.build_trainer(model, data_lib.DatasetConfig("unused", LENGTHS,
                                                                          batch_size=8),
                                            mesh_fn=be.mesh_fn, seed=1)
    fresh = fresh_trainer.init_state()
    started = init(fresh_trainer, fresh)
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(fresh.params),
                                                         leaves(state.params)))
    for a, b in zip(leaves(started.params), leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(started.opt_state), leaves(fresh.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(started.step) == 0
    assert _files(os.path.dirname(src)) == before  # the source is never modified
    with pytest.raises(FileNotFoundError, match="No checkpoint_<step>"):
        be.finetune(str(tmp_path), "some_task", str(tmp_path / "other"))


def test_generator_top_k_sampling_call_path(tiny, default_vocab):
    _, _, _, src, be = tiny
    asked = []

    def sampler(**kw):
        def sample_fn(inputs):
            asked.append(list(inputs))
            return be.sample(src, inputs, max_length=4, **kw)
        return sample_fn

    premises = ["A dog runs in the park."]
    cands = augment.generate_candidates(premises, sampler(topk=50, temperature=1.0, seed=0),
                                        num_samples=4)
    assert asked[0] == [augment.generator_input(lab, premises[0])
                        for lab in augment.NLI_LABELS for _ in range(4)]
    # Top-50 sampling of a random model: the 4 samples per label differ...
    for lab in augment.NLI_LABELS:
        assert len({c.hypothesis for c in cands if c.label == lab}) >= 2
    # ...while top-1 sampling at temperature 1 (greedy) repeats itself: the top-k value
    # reaches the sampler.
    top1 = be.sample(src, asked[0], topk=1, temperature=1.0, max_length=4, seed=0)
    for i in range(0, len(top1), 4):
        assert len(set(top1[i:i + 4])) == 1
    assert len(set(top1)) == 3  # the label is part of what the model reads


def test_rank_classification_is_the_softmax_of_option_log_likelihoods(tiny, default_vocab):
    model, trainer, state, src, be = tiny
    inputs, options = ["is this spam? buy now", "a short note"], ["spam", "not spam"]
    probs = be.classify(src, inputs, options)
    vocab = be.vocabulary
    enc = np.zeros((8, LENGTHS["inputs"]), np.int32)
    tgt = np.zeros((8, 4), np.int32)
    for r, (x, o) in enumerate((x, o) for x in inputs for o in options):
        ids, t = list(vocab.encode(x)) + [1], list(vocab.encode(o)) + [1]
        enc[r, :len(ids)], tgt[r, :len(t)] = ids, t
    dec_in = np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], 1)
    scores = np.asarray(jax.jit(model.score_batch)(state.params, {
        "encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(tgt),
        "decoder_input_tokens": jnp.asarray(dec_in)}))[:4].reshape(2, 2)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-5)


def test_truncate_to_tokens(default_vocab):
    from moetx.datasets import vocab as vocab_lib

    vocab = vocab_lib.get_vocabulary(None, extra_ids=100)
    text = "And God said, Let there be light: and there was light. " * 5
    cut = backend.truncate_to_tokens(text, vocab, 10)
    assert len(vocab.encode(cut)) <= 10 and text.startswith(cut) and len(cut) > 20
    assert backend.truncate_to_tokens("short", vocab, 10) == "short"
