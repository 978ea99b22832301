#!/usr/bin/env python
"""The two op families of the encoder-decoder step that issue 16 names for restructuring,
timed alone (forward and backward) in their ways of computing the same thing, beside torch.

Attention (scores, bias, softmax, weighted values; no projections), at the three shapes of a
T5.1.1 encoder-decoder step (by default T5.1.1-small's: batch 8, 6 heads x 64, inputs 512 ->
targets 114): the encoder's self-attention (512 x 512, a per-head position bias), the
cross-attention (114 x 512, a padding-mask bias shared by the heads) and the decoder's
self-attention (114 x 114, position bias plus the causal mask). The gradient is taken with
respect to Q, K, V and the self-attentions' bias. That bias is the one both moetx's and HF's
steps build once per stack and share across its layers: [batch, heads, q, k], mask plus the
trained position bias, so each layer's bias gradient is an array of that shape (the stack's
sum over the batch into the [1, heads, q, k] position bias happens once, outside the layers).
The cross-attention's bias is the padding mask, [batch, 1, 1, k], and has no gradient.

  einsum             moetx's attention today (`MultiHeadDotProductAttention._attend`): float32
                     logits by einsum over [batch, length, heads, d_kv] operands, bias added,
                     softmax, einsum with V;
  heads_major        the same with Q, K, V transposed to [batch, heads, length, d_kv] first (the
                     layout torch's matmuls use);
  query_chunks       queries in chunks of `--chunk`, each chunk rematerialised in the backward
                     pass, so only one chunk's [batch, heads, chunk, keys] scores are live (a
                     blocked attention over queries);
  key_blocks         flash attention's order in JAX: keys in blocks of `--chunk`, an online
                     softmax (running max and sum) carried from block to block, each block
                     rematerialised in the backward pass;
  query_chunks_scan  the same chunks under `lax.map` (one compiled body);
  per_example        one batch row at a time under `lax.map` ([heads, q, k] scores per row);
  jax_sdpa           `jax.nn.dot_product_attention` (its only CPU implementation is 'xla');
  torch_matmul       Hugging Face eager T5's formula in torch (matmul, + bias, softmax, matmul);
  torch_sdpa         `torch.nn.functional.scaled_dot_product_attention` with the bias as its
                     float mask (its CPU flash kernel).

The logits head and loss, at the decoder's tokens (batch x targets = 912 by default, d_model
512, vocab 32128): logits = x W, cross entropy plus 1e-4 (log Z)^2, summed; the gradient with
respect to x and W.

  full               moetx today: the [tokens, vocab] logits whole, then
                     `moetx.lm.losses.cross_entropy_with_integer_targets` (its own VJP);
  chunked            tokens in chunks of `--loss_chunk`, each chunk's logits and loss
                     rematerialised in the backward pass, so the whole logits never exist;
  torch              torch's F.linear and logsumexp / gather (the objective of the torch side of
                     the throughput benchmarks).

Each variant is checked against the first of its family (the largest difference of the outputs
and gradients, relative to the largest magnitude, is recorded and must stay below 1e-4), then
all variants of a shape are timed round-robin (`--steps` calls each, medians). `per_step_ms` is
the median times the number of layers that run the shape in one step (`--layers` per stack; the
loss head runs once). Prints one JSON line (`step_ops`), which `readme_table.py` turns into the
README's table between `<!-- ops-table:start -->` and `<!-- ops-table:end -->`; progress goes to
stderr.

  .venv/bin/python benchmarks/step_ops.py                                # T5.1.1-small shape
  .venv/bin/python benchmarks/step_ops.py --batch 2 --heads 2 --head_dim 16 --input_length 64 \\
      --target_length 16 --d_model 32 --vocab 512 --chunk 16 --loss_chunk 8 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from encdec_throughput import add_t5_small_shape_flags, require_positive
from train_throughput import (CpuLoad, add_cpu_flags, environment_fields, finish_json_benchmark,
                              start_json_benchmark, time_round_robin)

ATTENTION_VARIANTS = ("einsum", "heads_major", "query_chunks", "query_chunks_scan",
                      "key_blocks", "per_example", "jax_sdpa", "torch_matmul", "torch_sdpa")
LOSS_VARIANTS = ("full", "chunked", "torch")
Z_LOSS = 1e-4
TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_t5_small_shape_flags(p)
    p.add_argument("--chunk", type=int, default=128,
                   help="queries per chunk (query_chunks*), keys per block (key_blocks)")
    p.add_argument("--loss_chunk", type=int, default=128, help="tokens per chunk (chunked)")
    p.add_argument("--steps", type=int, default=10, help="timed calls of each variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles)")
    add_cpu_flags(p)
    args = p.parse_args(argv)
    require_positive(p, args, "chunk", "loss_chunk", "steps", "warmup", "threads")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[step_ops {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- JAX attention
def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(n) in pieces of `size` (the last may be shorter)."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def jax_attention_variants(jax, jnp, chunk: int) -> dict:
    """name -> f(q, k, v, bias) -> out, q/k/v <f32>[batch, length, heads, d_kv], bias
    <f32>[batch or 1, heads or 1, q, k]."""

    def einsum(q, k, v, bias):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    def heads_major(q, k, v, bias):
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)

    def bias_rows(bias, lq, i, j):
        return bias if bias.shape[2] == 1 and lq != 1 else bias[:, :, i:j]

    def query_chunks(q, k, v, bias):
        lq = q.shape[1]
        block = jax.checkpoint(einsum)
        return jnp.concatenate([block(q[:, i:j], k, v, bias_rows(bias, lq, i, j))
                                for i, j in chunks(lq, chunk)], axis=1)

    def query_chunks_scan(q, k, v, bias):
        b, lq, h, d = q.shape
        if lq % chunk:  # lax.map needs equal chunks; the ragged case is query_chunks'
            return query_chunks(q, k, v, bias)
        n = lq // chunk
        qc = q.reshape(b, n, chunk, h, d).swapaxes(0, 1)
        if bias.shape[2] == 1:
            out = jax.lax.map(lambda qi: jax.checkpoint(einsum)(qi, k, v, bias), qc)
        else:
            bc = bias.reshape(*bias.shape[:2], n, chunk, bias.shape[-1]).transpose(2, 0, 1, 3, 4)
            out = jax.lax.map(lambda a: jax.checkpoint(einsum)(a[0], k, v, a[1]), (qc, bc))
        return out.swapaxes(0, 1).reshape(b, lq, h, d)

    def key_blocks(q, k, v, bias):
        b, lq, h, d = q.shape
        top = jnp.full((b, h, lq), -jnp.inf, jnp.float32)  # running max of the logits
        total = jnp.zeros((b, h, lq), jnp.float32)  # running sum of exp(logit - max)
        acc = jnp.zeros((b, h, lq, d), jnp.float32)  # running sum of exp(...) V

        @jax.checkpoint
        def block(carry, kj, vj, bj):
            top, total, acc = carry
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, kj) + bj
            new_top = jnp.maximum(top, logits.max(-1))
            p = jnp.exp(logits - new_top[..., None])
            scale = jnp.exp(top - new_top)
            return (new_top, total * scale + p.sum(-1),
                    acc * scale[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, vj))

        carry = (top, total, acc)
        for i, j in chunks(k.shape[1], chunk):
            carry = block(carry, k[:, i:j], v[:, i:j], bias[..., i:j])
        _, total, acc = carry
        return (acc / total[..., None]).transpose(0, 2, 1, 3)

    def per_example(q, k, v, bias):
        if bias.shape[0] == 1:
            return jax.lax.map(lambda a: einsum(a[0][None], a[1][None], a[2][None], bias)[0],
                               (q, k, v))
        return jax.lax.map(lambda a: einsum(*(x[None] for x in a))[0], (q, k, v, bias))

    def jax_sdpa(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation="xla")

    return {"einsum": einsum, "heads_major": heads_major, "query_chunks": query_chunks,
            "query_chunks_scan": query_chunks_scan, "key_blocks": key_blocks,
            "per_example": per_example,
            "jax_sdpa": jax_sdpa}


def attention_shapes(args) -> dict:
    """name -> (query length, key length, bias heads (heads or 1), causal, bias trained,
    layers). A trained bias is the stack's [batch, heads, q, k] one (mask plus position bias,
    built once per stack and shared by its layers, in moetx's step and in HF's); an untrained
    one the cross-attention's padding mask [batch, 1, 1, k]."""
    return {
        "encoder_self": (args.input_length, args.input_length, args.heads, False, True,
                         args.layers),
        "cross": (args.target_length, args.input_length, 1, False, False, args.layers),
        "decoder_self": (args.target_length, args.target_length, args.heads, True, True,
                         args.layers),
    }


def attention_inputs(np, args, lq: int, lk: int, trained_bias: bool, causal: bool) -> dict:
    rng = np.random.default_rng(0)
    b, h, d = args.batch, args.heads, args.head_dim
    shape = {"q": (b, lq, h, d), "k": (b, lk, h, d), "v": (b, lk, h, d), "w": (b, lq, h, d)}
    x = {n: (rng.standard_normal(s) * (d ** -0.25 if n in "qk" else 1.0)).astype(np.float32)
         for n, s in shape.items()}
    if trained_bias:  # a position bias per head, the same for every example
        bias = np.broadcast_to(rng.standard_normal((1, h, lq, lk)), (b, h, lq, lk)).copy()
    else:  # padding mask: the last eighth of each row's keys are padding
        bias = np.zeros((b, 1, 1, lk))
        bias[..., lk - lk // 8:] = -1e9
    if causal:
        bias = bias + np.triu(np.full((lq, lk), -1e9), 1)
    x["bias"] = bias.astype(np.float32)
    return x


def jax_grad_fn(jax, jnp, f, w, trained: int | None = None):
    """jit(value_and_grad(sum(f(*inputs) * w))) over the first `trained` inputs (all: None)."""
    def loss(*inputs):
        return jnp.sum(f(*inputs) * w)

    def run(*inputs):
        n = len(inputs) if trained is None else trained
        return jax.value_and_grad(loss, argnums=tuple(range(n)))(*inputs)

    return jax.jit(run)


# -------------------------------------------------------------------------- torch attention
def torch_attention_variants(torch) -> dict:
    """name -> f(q, k, v, bias) on [batch, heads, length, d_kv] operands (torch's layout)."""
    def torch_matmul(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v

    def torch_sdpa(q, k, v, bias):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                                scale=1.0)

    return {"torch_matmul": torch_matmul, "torch_sdpa": torch_sdpa}


def torch_grad_fn(torch, f, inputs: list, w):
    """A no-argument step: forward, sum(out * w), backward into the .grad of each input that
    requires one; returns (value, those grads) as numpy."""
    def step():
        for t in inputs:
            t.grad = None
        value = (f(*inputs) * w).sum()
        value.backward()
        return value.item(), [t.grad.numpy() for t in inputs if t.requires_grad]

    return step


# ------------------------------------------------------------------------------- loss head
def jax_loss_variants(jax, jnp, loss_chunk: int) -> dict:
    """name -> f(x <f32>[tokens, embed], kernel <f32>[embed, vocab], targets <int32>[tokens])
    -> the summed loss."""
    from moetx.lm.losses import cross_entropy_with_integer_targets

    def full(x, kernel, targets):
        # Shape: [1, tokens, vocab] (the loss takes [batch, length, vocab] logits)
        loss, _ = cross_entropy_with_integer_targets((x @ kernel)[None], targets[None], Z_LOSS)
        return jnp.sum(loss)

    def chunked(x, kernel, targets):
        block = jax.checkpoint(full)
        return sum(block(x[i:j], kernel, targets[i:j]) for i, j in chunks(x.shape[0], loss_chunk))

    return {"full": full, "chunked": chunked}


def torch_loss(torch):
    def loss(x, kernel, targets):
        logits = torch.nn.functional.linear(x, kernel)
        log_z = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (log_z - target_logit + Z_LOSS * log_z.square()).sum()

    return loss


# ------------------------------------------------------------------------------------ run
def relative_error(np, got, want) -> float:
    """max |got - want| / max |want| over the output and every gradient."""
    (gv, gg), (wv, wg) = got, want
    err = abs(float(gv) - float(wv)) / max(abs(float(wv)), 1e-30)
    for a, b in zip(gg, wg):
        a, b = np.asarray(a), np.asarray(b)
        err = max(err, float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30))
    return err


def summarize(np, timed, reference: dict, layers: int) -> dict:
    """Per variant: median ms, per-step ms (x layers), speed-up over the first variant, the
    compile time and the error against the first variant's value and gradients."""
    names = list(timed.times)
    base = statistics.median(timed.times[names[0]])
    out = {}
    for name in names:
        med = statistics.median(timed.times[name])
        err = relative_error(np, timed.first_out[name], reference)
        if err > TOLERANCE:
            raise SystemExit(f"step_ops.py: {name} differs from {names[0]} by {err:.2e} "
                             f"(relative), above {TOLERANCE}")
        out[name] = {"median_ms": med * 1e3, "per_step_ms": med * 1e3 * layers,
                     "times_ms": [t * 1e3 for t in timed.times[name]],
                     "first_call_s": timed.first[name], "speedup_vs_first": base / med,
                     "relative_error": err}
    return out


def to_numpy(np, result) -> tuple:
    value, grads = result
    return float(value), [np.asarray(g) for g in grads]


def measure_attention(args, jax, jnp, np, torch) -> dict:
    shapes = {}
    jax_fns = jax_attention_variants(jax, jnp, args.chunk)
    torch_fns = torch_attention_variants(torch)
    for shape, (lq, lk, bh, causal, trained, layers) in attention_shapes(args).items():
        log(f"attention {shape}: q {lq} x k {lk}")
        x = attention_inputs(np, args, lq, lk, trained, causal)
        args_jax = [jnp.asarray(x[n]) for n in ("q", "k", "v", "bias")]
        steps = {}
        for name, f in jax_fns.items():
            g = jax_grad_fn(jax, jnp, f, jnp.asarray(x["w"]), None if trained else 3)
            steps[name] = lambda g=g: to_numpy(np, jax.block_until_ready(g(*args_jax)))
        heads_major = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3))  # noqa: E731
        t_in = [torch.tensor(heads_major(x[n]) if n != "bias" else x[n],
                             requires_grad=n != "bias" or trained)
                for n in ("q", "k", "v", "bias")]
        t_w = torch.tensor(heads_major(x["w"]))
        for name, f in torch_fns.items():
            step = torch_grad_fn(torch, f, t_in, t_w)
            # Gradients back to JAX's layout so every variant compares with einsum's.
            steps[name] = lambda step=step: (lambda v, g: (v, [heads_major(a) for a in g[:3]]
                                                           + g[3:]))(*step())
        timed = time_round_robin(steps, args.steps, args.warmup, log, what="calls")
        shapes[shape] = {"query_length": lq, "key_length": lk, "bias_heads": bh,
                         "bias_batch": args.batch, "bias_trained": trained, "causal": causal,
                         "layers": layers,
                         "variants": summarize(np, timed, timed.first_out["einsum"], layers),
                         "background_cpu_cores": timed.load.cores}
    return shapes


def measure_loss(args, jax, jnp, np, torch) -> dict:
    tokens = args.batch * args.target_length
    log(f"loss head: {tokens} tokens x {args.d_model} -> vocab {args.vocab}")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, args.d_model)).astype(np.float32)
    kernel = (rng.standard_normal((args.d_model, args.vocab))
              * args.d_model ** -0.5).astype(np.float32)
    targets = rng.integers(0, args.vocab, tokens).astype(np.int32)
    steps = {}
    for name, f in jax_loss_variants(jax, jnp, args.loss_chunk).items():
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        steps[name] = lambda g=g: to_numpy(
            np, jax.block_until_ready(g(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(targets))))
    t_x = torch.tensor(x, requires_grad=True)
    t_k = torch.tensor(np.ascontiguousarray(kernel.T), requires_grad=True)  # [vocab, embed]
    t_targets = torch.tensor(targets.astype(np.int64))
    loss = torch_loss(torch)

    def torch_step():
        t_x.grad = t_k.grad = None
        value = loss(t_x, t_k, t_targets)
        value.backward()
        return value.item(), [t_x.grad.numpy(), t_k.grad.numpy().T]

    steps["torch"] = torch_step
    timed = time_round_robin(steps, args.steps, args.warmup, log, what="calls")
    return {"tokens": tokens, "d_model": args.d_model, "vocab": args.vocab,
            "variants": summarize(np, timed, timed.first_out["full"], 1),
            "background_cpu_cores": timed.load.cores}


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, xla_flags_before = start_json_benchmark(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    with CpuLoad() as load:
        attention = measure_attention(args, jax, jnp, np, torch)
        loss_head = measure_loss(args, jax, jnp, np, torch)
    return finish_json_benchmark(json_out, {
        "benchmark": "step_ops",
        "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "input_length": args.input_length, "target_length": args.target_length,
        "layers": args.layers, "chunk": args.chunk, "loss_chunk": args.loss_chunk,
        "steps": args.steps,
        "attention": attention, "loss_head": loss_head,
        **environment_fields(args, jax, torch, xla_flags_before),
        "background_cpu_cores": load.cores,
    })


if __name__ == "__main__":
    sys.exit(main())
