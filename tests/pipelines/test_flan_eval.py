"""FLAN evaluation's model functions on a tiny random encoder-decoder: `score_fn` gives every
seqio row the teacher-forced log-likelihood `score_batch` gives it, `predict_fn` the fixed-length
greedy decode `predict_batch` gives it, whatever the batching."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.lm import models, predict, transformer
from moetx.pipelines import flan_eval
from moetx.trainer import partitioning

EOS = 1
LENGTHS = {"inputs": 10, "targets": 6}


class _IdVocabulary:
    """Enough of a SeqIO vocabulary for id rows: EOS 1, ids written as numbers."""

    eos_id = EOS

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(int(t)) for t in ids)


class _Dataset:
    """What `seqio.Evaluator` hands the model functions: enumerated feature dicts."""

    def __init__(self, rows):
        self.rows = rows

    def as_numpy_iterator(self):
        return iter(self.rows)


def _seqio_rows(n, seed=0):
    """Unpacked EncDecFeatureConverter rows: ids ending in EOS, zero padded, and the decoder
    inputs / loss weights seqio derives from the targets."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        enc = np.zeros(LENGTHS["inputs"], np.int32)
        tgt = np.zeros(LENGTHS["targets"], np.int32)
        k, m = rng.randint(1, LENGTHS["inputs"]), rng.randint(1, LENGTHS["targets"])
        enc[:k], enc[k] = rng.randint(2, 64, k), EOS
        tgt[:m], tgt[m] = rng.randint(2, 64, m), EOS
        rows.append((10 + i, {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
                              "decoder_input_tokens": np.concatenate([[0], tgt[:-1]]),
                              "decoder_loss_weights": (tgt > 0).astype(np.int32)}))
    return rows


def test_score_and_predict_fns_match_the_model():
    model = models.EncoderDecoderModel(transformer.TransformerConfig(
        vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
        num_decoder_layers=1))
    params = jax.jit(lambda: nn.unbox(model.get_initial_variables(
        jax.random.PRNGKey(0), model.input_shapes(2, LENGTHS))["params"]))()
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    predictor = predict.Predictor(model, params, _IdVocabulary(), mesh,
                                  partitioning.standard_logical_axis_rules(), batch_size=4,
                                  max_length=LENGTHS["targets"],
                                  max_input_length=LENGTHS["inputs"])
    score_fn, predict_fn = flan_eval.make_model_fns(predictor)
    rows = _seqio_rows(6)
    batch = {k: jnp.asarray(np.stack([r[k] for _, r in rows])) for k in rows[0][1]}

    scores = score_fn(_Dataset(rows))
    assert [i for i, _ in scores] == [i for i, _ in rows]
    np.testing.assert_allclose([s for _, s in scores],
                               np.asarray(jax.jit(model.score_batch)(params, batch)), rtol=1e-5)

    predictions = predict_fn(_Dataset(rows))
    assert [i for i, _ in predictions] == [i for i, _ in rows]
    want = np.asarray(jax.jit(model.predict_batch, static_argnames=(
        "max_decode_length", "eos_id"))(params, batch["encoder_input_tokens"],
                                        max_decode_length=LENGTHS["targets"],
                                        rng=jax.random.PRNGKey(0), eos_id=EOS))
    assert [p for _, p in predictions] == want.tolist()
