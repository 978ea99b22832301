"""benchmarks/moe_throughput.py's Switch accounting: the op families its profiles sort XLA's
instructions into, and the expert rows it counts for Hugging Face's Switch model (the rows its
experts really compute, against moetx's capacity buffers)."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import moe_throughput  # noqa: E402

STEP = "jit(_train_step_impl)/transpose(jvp(EncoderDecoder))/EncoderDecoder."


@pytest.mark.parametrize("op_name, family", [
    # Scatter dispatch: the experts' matmuls, and the index moves and combine around them.
    ("encode/encoder/layers_3/mlp/mlp._scatter/mlp._experts/expert/a...o,aio->a...i/dot_general",
     "experts"),
    ("encode/encoder/layers_3/mlp/mlp._scatter/mlp._experts/transpose", "experts"),
    ("decode/decoder/layers_1/mlp/mlp._scatter/gather", "dispatch_combine"),
    ("encode/encoder/layers_1/mlp/mlp._scatter/gtkd,gtk->gtd/dot_general", "dispatch_combine"),
    # Masked dispatch's one-hot einsums.
    ("decode/decoder/layers_1/mlp/gtd,gtec->gecd/dot_general", "dispatch_combine"),
    ("encode/encoder/layers_1/mlp/router/router_weights/dot_general", "router"),
    # A tied head's logits are the embedding's attend; an untied one's are logits_dense.
    ("decode/decoder/token_embedder.attend/...d,vd->...v/dot_general", "logits_loss"),
    ("decode/decoder/logits_dense/dot_general", "logits_loss"),
    ("encode/encoder/encoder_norm/mul", "layer_norms"),
    ("encode/encoder/layers_0/mlp/wi/dot_general", "mlp"),
    ("encode/encoder/layers_0/attention/query/dot_general", "attention"),
    ("encode/encoder/token_embedder/gather", "other"),
])
def test_instructions_fall_in_their_family(op_name, family):
    assert moe_throughput.classify_moe(STEP + op_name, ()) == family


def test_no_metadata_is_no_family():
    assert moe_throughput.classify_moe("", ()) is None


def test_hf_expert_rows_are_the_kept_routed_tokens():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from moetx.lm import transformer
    from moetx.moe import layers as moe_layers

    b, n, t, experts = 2, 16, 4, 4
    moe = moe_layers.MoeConfig(num_experts=experts, num_selected_experts=1, group_size=n,
                               jitter_noise=0.0, sparse_every=2)
    cfg = transformer.TransformerConfig(
        vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=2,
        num_decoder_layers=2, dropout_rate=0.0, mlp_activations=("relu",),
        logits_via_embedding=True, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dtype="float32", moe=moe)
    batch = moe_throughput.encdec_batch(np, 64, b, n, t)
    loss_of = moe_throughput.switch_loss_fn(torch, batch, 1e-2)
    sparse_layers = 1  # per stack: layer 1 of 2

    def rows(capacity: int) -> int:
        model = moe_throughput.build_hf_switch(torch, cfg, None, capacity)
        return moe_throughput.hf_switch_expert_rows(torch, model, loss_of)

    routed = (b * n + b * t) * sparse_layers
    # A capacity no group can fill keeps every routed token.
    assert rows(capacity=n) == routed
    # One slot per expert and sequence: at most experts x sequences rows per sparse layer,
    # and at least one per sequence (its first token always fits).
    kept = rows(capacity=1)
    assert 2 * b <= kept <= 2 * b * experts < routed
