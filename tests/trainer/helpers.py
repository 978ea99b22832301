"""Shared fixtures for trainer tests: a tiny model and deterministic packed batches."""

import numpy as np

from moetx.lm import models, transformer
from moetx.trainer import optimizers, partitioning, trainer as trainer_lib

TINY = dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_decoder_layers=2)


def tiny_model(**kw) -> models.DecoderOnlyModel:
    kw = {"loss_normalizing_factor": "NUM_REAL_TARGET_TOKENS", **kw}
    return models.DecoderOnlyModel(transformer.TransformerConfig(**TINY), **kw)


def packed_batch(batch_size: int, length: int, seed: int = 0, vocab: int = 128) -> dict:
    """Rows of two or three packed segments with trailing padding, as SeqIO packs them."""
    rng = np.random.RandomState(seed)
    out = {k: np.zeros((batch_size, length), np.int32) for k in (
        "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
        "decoder_positions")}
    out["decoder_loss_weights"] = np.zeros((batch_size, length), np.float32)
    for r in range(batch_size):
        pos = 0
        for seg in range(1, 4):
            n = int(rng.randint(3, length // 2))
            if pos + n > length - 2:
                break
            toks = rng.randint(2, vocab, n)
            toks[-1] = 1  # EOS
            sl = slice(pos, pos + n)
            out["decoder_target_tokens"][r, sl] = toks
            out["decoder_input_tokens"][r, sl] = np.concatenate([[0], toks[:-1]])
            out["decoder_segment_ids"][r, sl] = seg
            out["decoder_positions"][r, sl] = np.arange(n)
            out["decoder_loss_weights"][r, sl] = 1.0
            pos += n
    return out


def make_trainer(model, mesh_shape=(1, 1, 1), batch_size=8, length=32, num_microbatches=1,
                 fsdp=False, optimizer=None, devices=None, ema_decay=None):
    import jax

    devices = devices if devices is not None else jax.devices()[:int(np.prod(mesh_shape))]
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.standard_logical_axis_rules(fsdp=fsdp)
    factory = optimizer or (lambda param_axes: optimizers.adafactor(
        optimizers.rsqrt_schedule(1.0, 100), param_axes=param_axes))
    return trainer_lib.Trainer(model, factory, mesh, rules,
                               model.input_shapes(batch_size, length),
                               num_microbatches=num_microbatches, seed=0, ema_decay=ema_decay)
