"""benchmarks/step_ops.py: every way of computing attention and the loss head that it times
computes the same values and gradients as a plain numpy reference, at shapes with ragged chunks,
a per-row padding mask and a causal mask, so a variant that drops or double-counts a block fails
here rather than being timed."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import step_ops  # noqa: E402

ARGS = step_ops.parse_args(["--batch", "2", "--heads", "2", "--head_dim", "8",
                            "--input_length", "12", "--target_length", "5", "--layers", "1",
                            "--d_model", "16", "--vocab", "40", "--chunk", "5",
                            "--loss_chunk", "4"])


def reference_attention(q, k, v, bias):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_chunks_cover_the_range_once():
    assert step_ops.chunks(12, 5) == [(0, 5), (5, 10), (10, 12)]
    assert step_ops.chunks(4, 8) == [(0, 4)]


@pytest.mark.parametrize("shape", ["encoder_self", "cross", "decoder_self"])
def test_attention_variants_agree(shape):
    lq, lk, _, causal, trained, _ = step_ops.attention_shapes(ARGS)[shape]
    x = step_ops.attention_inputs(np, ARGS, lq, lk, trained, causal)
    inputs = [x[n] for n in ("q", "k", "v", "bias")]
    want = reference_attention(*[a.astype(np.float64) for a in inputs])
    grads = {}
    for name, f in step_ops.jax_attention_variants(jax, jnp, ARGS.chunk).items():
        def out_and_grads(*a, f=f):  # one compilation: the output and sum(out * w)'s gradients
            out, vjp = jax.vjp(f, *a)
            return out, (jnp.sum(out * x["w"]), vjp(jnp.asarray(x["w"])))

        got, value_grads = jax.jit(out_and_grads)(*map(jnp.asarray, inputs))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=name)
        grads[name] = step_ops.to_numpy(np, value_grads)
    for name, g in grads.items():
        assert step_ops.relative_error(np, g, grads["einsum"]) < step_ops.TOLERANCE, name
    # A wrong gradient is caught: the bias gradient halved.
    bad = (grads["einsum"][0], [*grads["einsum"][1][:3], grads["einsum"][1][3] / 2])
    assert step_ops.relative_error(np, bad, grads["einsum"]) > 0.1


def test_loss_variants_agree_with_a_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    kernel = rng.standard_normal((16, 40)).astype(np.float32)
    targets = rng.integers(0, 40, 10).astype(np.int32)
    logits = x.astype(np.float64) @ kernel
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.sum(log_z - logits[np.arange(10), targets] + step_ops.Z_LOSS * log_z ** 2)
    results = {}
    for name, f in step_ops.jax_loss_variants(jax, jnp, ARGS.loss_chunk).items():
        results[name] = step_ops.to_numpy(np, jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
            jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(targets)))
        np.testing.assert_allclose(results[name][0], want, rtol=1e-5, err_msg=name)
    assert step_ops.relative_error(np, results["chunked"], results["full"]) < step_ops.TOLERANCE
