"""benchmarks/encdec_throughput.py's decoding floor: the bytes one cached decoder step must read
are the model's own (its decoder weights, logits head and caches, from its parameter and cache
shapes), and the floor fields follow from them and the measured bandwidth."""

import argparse
import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import encdec_throughput as et  # noqa: E402


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_step_bytes_are_the_models_weights_and_caches():
    shape = argparse.Namespace(d_model=16, layers=2, heads=2, head_dim=4, d_ff=24, vocab=40,
                               batch=3, input_length=8, target_length=5)
    cfg = et.moetx_config(shape)
    model, input_shapes = et.moetx_encdec_model(shape, cfg)
    params = nn.unbox(jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), input_shapes))["params"])
    got = et.decode_step_bytes(cfg, shape.batch, shape.input_length, shape.target_length)

    # Read every step: the decoder's kernels but the cross-attention key and value projections
    # (applied once, before the loop); norms and the position-bias table are left out.
    flat = jax.tree_util.tree_flatten_with_path(params["decoder"])[0]
    per_step = {jax.tree_util.keystr(p): x for p, x in flat
                if p[-1].key == "kernel" and not ("encoder_decoder_attention" in str(p)
                                                  and p[-2].key in ("key", "value"))}
    head = per_step.pop("['logits_dense']['kernel']")
    assert got["logits_head"] == _nbytes(head)
    assert got["decoder_weights"] == _nbytes(per_step)

    enc = jax.ShapeDtypeStruct((shape.batch, shape.input_length), np.int32)
    cache = jax.eval_shape(lambda p, e: model.init_cache(p, e, shape.target_length), params, enc)
    encoded = jax.ShapeDtypeStruct((shape.batch, shape.input_length, 16), np.float32)
    cross = jax.eval_shape(model.cross_kv, params, encoded, enc, cache)
    assert got["cross_kv_cache"] == _nbytes(cross)
    # The full-length self-attention K/V cache, read at its mean filled length.
    kv = [x for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]
          if p[-1].key in ("cached_key", "cached_value")]
    assert len(kv) == 2 * shape.layers
    mean_filled = (shape.target_length + 1) / 2
    assert got["self_kv_cache"] == pytest.approx(_nbytes(kv) * mean_filled / shape.target_length)
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))


def test_floor_fields():
    step = {"total": 2e8}
    fields = et.decode_floor_fields(step, {"jax": 1e10, "torch": 2e10}, hf_call_s=6.0,
                                    moetx_one_s=1.0, moetx_step_ms=30.0, hf_step_ms=40.0,
                                    target_length=101)
    assert fields["per_token_step_floor_ms"] == pytest.approx(10.0)  # at the faster 20 GB/s
    assert fields["moetx_per_token_step_over_floor"] == pytest.approx(3.0)
    assert fields["hf_per_token_step_over_floor"] == pytest.approx(4.0)
    # 2x generate: a 3 s call, 1 s of it the first token: 2 s over 100 further steps.
    assert fields["per_token_step_ms_for_2x_generate"] == pytest.approx(20.0)
    assert fields["read_bandwidth_gbs"] == {"jax": 10.0, "torch": 20.0}


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_step_matmuls_read_the_step_bytes_and_compute_its_matmuls(kv_heads):
    shape = argparse.Namespace(d_model=16, layers=2, heads=2, head_dim=4, d_ff=24, vocab=40,
                               batch=3, input_length=8, target_length=5)
    cfg = dataclasses.replace(et.moetx_config(shape), num_kv_heads=kv_heads)
    fn, args = et.decode_step_matmuls(jax, jax.numpy, np, cfg, shape.batch, shape.input_length,
                                      shape.target_length)
    # (5 + 1) / 2 = 3 filled positions: the same bytes decode_step_bytes counts, no more.
    want = et.decode_step_bytes(cfg, shape.batch, shape.input_length, shape.target_length)
    assert _nbytes(args) - _nbytes(args[0]) == want["total"]
    assert fn(*args).shape == (shape.batch, shape.vocab)
    # Every product of the step is computed (none removed as unused): XLA's FLOP count is 2 x
    # batch x (each kernel's elements and each cached key and value's elements, self-attention
    # at 3 filled positions), plus the few elementwise adds and products.
    d, h, k, f = shape.d_model, shape.heads, shape.head_dim, shape.d_ff
    kv = kv_heads or h
    kernels = 4 * d * h * k + 2 * d * kv * k + 3 * d * f  # q, o, cross q, o; k, v; MLP
    cached = 2 * h * k * (3 + shape.input_length)  # each query head reads its group's K and V
    per_row = shape.layers * (kernels + cached) + d * shape.vocab
    flops = fn.lower(*args).cost_analysis()["flops"]
    assert 2 * shape.batch * per_row <= flops < 2 * shape.batch * per_row * 1.1


def test_floor_fields_with_the_matmuls_time():
    fields = et.decode_floor_fields({"total": 2e8}, {"jax": 2e10}, hf_call_s=6.0,
                                    moetx_one_s=1.0, moetx_step_ms=30.0, hf_step_ms=40.0,
                                    target_length=101, matmuls_ms=24.0)
    assert fields["per_token_step_matmuls_ms"] == 24.0
    assert fields["moetx_per_token_step_over_matmuls"] == pytest.approx(1.25)
    assert "per_token_step_matmuls_ms" not in et.decode_floor_fields(
        {"total": 2e8}, {"jax": 2e10}, 6.0, 1.0, 30.0, 40.0, 101)
