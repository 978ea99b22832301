#!/usr/bin/env python
"""Encoder-decoder (T5.1.1) throughput of moetx against Hugging Face transformers (torch, CPU).

Two measurements in one run, on the same T5.1.1-style encoder-decoder (RMSNorm, per-stack
relative position bias, gated-GELU MLP, no biases, untied logits; by default the
`make demo MODEL=t5` model of moetx/gin/models/t5_demo.gin):

1. Training step (forward, backward, optimizer) on a batch of random ids, `--input_length`
   encoder and `--target_length` decoder tokens per row:
     moetx  `moetx.trainer.trainer.Trainer.train_step` (jitted) of `EncoderDecoderModel`, one
            device.
     HF     `transformers.T5ForConditionalGeneration` built from
            `moetx.convert.hf.t5_config_to_hf(cfg)`, its lm_head untied from `shared` (transformers
            5 ties it in memory even for an untied config), loaded with moetx's initial weights;
            trained eagerly and under `torch.compile`, each its own copy (`--peer`).
   `--optimizer` adafactor (T5X-default Adafactor vs HF's Adafactor, lr 1e-2) or adamw (the same
   AdamW on both sides); see train_throughput.py, whose docstring also describes the peer
   variants, the `peer` choice, the f32/bf16 matmul peaks and `--memory`. Both minimise token
   cross entropy + 1e-4 logit z-loss (mean over target tokens). Tokens/s counts encoder plus
   decoder tokens; MFU uses `EncoderDecoderModel.flops_per_step`.

2. Greedy decoding with the KV cache of `--target_length` tokens for `--batch` encoder inputs of
   `--input_length` ids, with the same weights on both sides (moetx's initial parameters,
   converted with `moetx.convert.hf.moetx_to_hf_t5` and `load_state_dict`-ed into HF):
     moetx  jitted `EncoderDecoderModel.predict_batch(..., temperature=0)`.
     HF     `model.generate(..., do_sample=False, num_beams=1, max_new_tokens=T,
            min_new_tokens=T, use_cache=True)` under `torch.inference_mode()`.
   Both sides are given an EOS id outside the vocabulary (moetx `eos_id`, HF `eos_token_id`),
   so every row decodes all T tokens on both sides and nothing is suppressed on either (HF's
   min_new_tokens would otherwise mask HF's EOS id 1, which moetx could still pick). Each timed
   call includes encoding the inputs. `same_tokens` is the fraction of generated tokens that agree;
   float differences between XLA and torch can flip an argmax, after which the row diverges.
   Where a call's time goes: both sides also decode one token in the same round-robin
   (`*_one_token_s`: encoding, set-up and one step); the rest of a call, over its T - 1 further
   steps, is the cost of one cached decoder step (`*_per_token_step_ms`). With `--memory`,
   each side also decodes alone in a child process (`--only_decode moetx|hf`, from its own
   initial weights, 1 + 1 calls) for its peak RSS (`moetx_peak_rss_mb`, `hf_peak_rss_mb`).

Steps/calls are timed round-robin (one moetx, one of each HF variant, ...) after `--warmup`
untimed ones per side, median of `--steps`. The f32 and bf16 matmul rates are measured in the
same run (JAX and torch, 1024^2 and 2048^2); the fastest f32 rate is the MFU denominator for
every side, as in train_throughput.py.

Prints two JSON lines on stdout, `encdec_train_throughput` then `encdec_decode_throughput`
(only the first with `--skip_decode`), each self-contained; progress goes to stderr. Examples:

  .venv/bin/python benchmarks/encdec_throughput.py               # tuned XLA CPU flags (default)
  .venv/bin/python benchmarks/encdec_throughput.py --no_xla_tuning
  .venv/bin/python benchmarks/encdec_throughput.py --d_model 512 --d_ff 1024 --layers 8 \\
      --heads 6 --vocab 32128 --batch 8 --input_length 512 --target_length 114 --steps 6 \\
      --warmup 1 --optimizer adamw --skip_decode --memory        # T5.1.1-small's shape
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

# Sibling module: the side-by-side helpers (flags, optimizers, HF variants, round-robin timing,
# matmul peaks, memory children) are shared with the decoder-only benchmark (importing it
# imports neither jax nor torch).
from train_throughput import (CpuLoad, add_side_by_side_flags, best_time, check_finite,
                              check_side_by_side_flags, compile_info, environment_fields,
                              hf_param_count, hf_variants, import_side_libraries, matmul_fields,
                              measure_matmuls, measure_read_bandwidth, memory_child_line,
                              moetx_optimizer_factory, optimizer_settings, peak_rss_mb,
                              reserve_stdout_for_json,
                              run_memory, run_memory_child, side_by_side_fields,
                              time_round_robin, token_loss)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: the `make demo MODEL=t5` model (moetx/gin/models/t5_demo.gin).
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="encoder layers = decoder layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input_length", type=int, default=128)
    p.add_argument("--target_length", type=int, default=32)
    p.add_argument("--steps", type=int, default=20,
                   help="timed train steps, and timed decode calls, per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps/calls per side (compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    p.add_argument("--skip_decode", action="store_true",
                   help="time the training step only (print only the first JSON line)")
    p.add_argument("--only_decode", choices=("moetx", "hf"),
                   help="a memory child of the decode measurement: this side's greedy decoding "
                        "alone (its weights, 1 + 1 calls), its peak RSS line")
    add_side_by_side_flags(p)
    args = p.parse_args(argv)
    if args.only_decode and (args.only_side or args.memory or args.skip_decode):
        p.error("--only_decode is a memory child of its own: no --only_side, --memory or "
                "--skip_decode with it")
    for name in ("d_model", "layers", "heads", "head_dim", "d_ff", "vocab", "batch",
                 "input_length", "target_length", "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    if args.vocab < 3:
        p.error("--vocab must be at least 3")
    check_side_by_side_flags(p, args)
    return args


# T5.1.1-small's shape on span-corruption lengths (issue 16): the defaults of the scripts that
# study one enc-dec step at that shape (profile_step.py, means.py, remat.py).
T5_SMALL_SHAPE = {"d_model": 512, "layers": 8, "heads": 6, "head_dim": 64, "d_ff": 1024,
                  "vocab": 32128, "batch": 8, "input_length": 512, "target_length": 114}


def add_t5_small_shape_flags(p: argparse.ArgumentParser) -> None:
    """`--d_model ... --target_length`, defaulting to T5_SMALL_SHAPE (`--layers` is the depth
    of each stack)."""
    for name, default in T5_SMALL_SHAPE.items():
        p.add_argument(f"--{name}", type=int, default=default,
                       help="encoder layers = decoder layers" if name == "layers" else None)


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exits with a usage error unless the shape flags and `names` are all positive."""
    for name in (*T5_SMALL_SHAPE, *names):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[encdec_throughput {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


def encdec_batch(np, vocab: int, b: int, n: int, t: int) -> dict:
    """One segment per row of random ids in [2, vocab) (0 is padding/BOS, 1 is T5's EOS); shared
    with moe_throughput.py."""
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab, size=(b, n), dtype=np.int32)
    targets = rng.integers(2, vocab, size=(b, t), dtype=np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
    ones = lambda k: np.ones((b, k), np.int32)  # noqa: E731
    pos = lambda k: np.broadcast_to(np.arange(k, dtype=np.int32), (b, k)).copy()  # noqa: E731
    return {
        "encoder_input_tokens": enc, "encoder_segment_ids": ones(n), "encoder_positions": pos(n),
        "decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
        "decoder_loss_weights": ones(t), "decoder_segment_ids": ones(t),
        "decoder_positions": pos(t),
    }


def make_batch(np, args) -> dict:
    return encdec_batch(np, args.vocab, args.batch, args.input_length, args.target_length)


def moetx_config(args):
    from moetx.lm import transformer

    # As moetx/gin/models/t5_tiny.gin + t5_demo.gin (with the flags' sizes).
    return transformer.TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
        head_dim=args.head_dim, mlp_dim=args.d_ff, num_encoder_layers=args.layers,
        num_decoder_layers=args.layers, dropout_rate=0.0, mlp_activations=("gelu", "linear"),
        logits_via_embedding=False, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dtype="float32")


def moetx_encdec_model(args, cfg):
    """moetx's enc-dec model of config `cfg` with the benchmarks' objective (z-loss 1e-4, loss
    per real target token) and its input shapes at the flags' batch and lengths."""
    from moetx.lm import models

    model = models.EncoderDecoderModel(config=cfg, z_loss=1e-4,
                                       loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    return model, model.input_shapes(args.batch, {"inputs": args.input_length,
                                                  "targets": args.target_length})


def moetx_trainer(jax, model, input_shapes, optimizer_factory, **trainer_kwargs):
    """A `Trainer` of `model` on the first device alone (a (1, 1, 1) mesh, standard rules);
    `trainer_kwargs` go to `Trainer`."""
    from moetx.trainer import partitioning, trainer as trainer_lib

    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return trainer_lib.Trainer(model, optimizer_factory, mesh,
                               partitioning.standard_logical_axis_rules(), input_shapes,
                               **trainer_kwargs)


def build_hf(torch, cfg, params_np, train: bool):
    """T5ForConditionalGeneration from the equivalent config, untied head, moetx's weights
    `params_np` (None: HF's own initialisation, for the memory child)."""
    import transformers
    from moetx.convert import hf

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf.t5_config_to_hf(cfg))
    # transformers >= 5 ties T5's lm_head to `shared` in memory even for an untied (T5.1.1)
    # config (see moetx/convert/hf/); give it its own parameter, as the `hf_t5` helper of
    # tests/convert/conftest.py does.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    if params_np is None:
        return model.train(train)
    sd = hf.moetx_to_hf_t5(params_np, cfg=cfg)
    # The embed_tokens of both stacks are the `shared` module itself; load them as its copies.
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd[k] = sd["shared.weight"]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight
    return model.train(train)


def decode_step_bytes(cfg, batch: int, input_length: int, target_length: int) -> dict:
    """The float32 bytes one cached greedy decoder step of `cfg` must read, whoever runs it:
    the decoder layers' weights (self-attention, the cross-attention's query and output
    projections, the MLP; the cross-attention keys and values are projected once, before the
    loop), the logits head ([d, vocab]), the cached cross-attention keys and values of the
    encoder's `input_length` positions, and the self-attention cache at its mean filled length
    over the `target_length` steps. Norms, position biases and the embedding rows looked up are
    left out (under 0.1%)."""
    d, heads, dk, f = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    kv_heads = cfg.num_kv_heads or heads
    layers, n_wi = cfg.num_decoder_layers, len(cfg.mlp_activations)
    per_layer = (2 * d * heads * dk + 2 * d * kv_heads * dk  # self-attention q, o; k, v
                 + 2 * d * heads * dk  # cross-attention q, o
                 + (n_wi + 1) * d * f)  # MLP
    mean_filled = (target_length + 1) / 2
    parts = {"decoder_weights": layers * per_layer, "logits_head": d * cfg.vocab_size,
             "cross_kv_cache": layers * 2 * batch * kv_heads * input_length * dk,
             "self_kv_cache": layers * 2 * batch * kv_heads * mean_filled * dk}
    out = {k: 4.0 * v for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def decode_step_matmuls(jax, jnp, np, cfg, batch: int, input_length: int,
                        target_length: int):
    """The matmuls of one cached greedy decoder step of `cfg`, bare, as one jitted function and
    its arguments: per decoder layer the self-attention's q, k, v and o projections and its two
    batched matrix-vector products over the self-attention cache (at its mean filled length,
    rounded), the cross-attention's q and o and its two over the cached cross-attention keys
    and values, the MLP's kernels; then the logits head; `batch` rows each, float32 weights of
    the model's shapes, each array its own argument. No softmax, norm or argmax: what XLA's
    matmul kernels alone need for a step, whoever schedules them. The arguments hold the bytes
    `decode_step_bytes` counts (the self cache rounded as here)."""
    d, heads, dk, f = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    kv = cfg.num_kv_heads or heads
    filled = max(1, round((target_length + 1) / 2))
    rng = np.random.default_rng(0)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    layers = [dict(q=w(d, heads * dk), k=w(d, kv * dk), v=w(d, kv * dk), o=w(heads * dk, d),
                   self_k=w(batch, kv, filled, dk), self_v=w(batch, kv, filled, dk),
                   cq=w(d, heads * dk), co=w(heads * dk, d),
                   cross_k=w(batch, kv, input_length, dk), cross_v=w(batch, kv, input_length, dk),
                   wi=[w(d, f) for _ in cfg.mlp_activations], wo=w(f, d))
              for _ in range(cfg.num_decoder_layers)]
    head, x = w(d, cfg.vocab_size), w(batch, d)

    def attend(q, keys, values):  # [batch, heads * dk] -> the same; grouped when kv < heads
        q = q.reshape(batch, kv, heads // kv, dk)
        scores = jnp.einsum("bgrk,bgsk->bgrs", q, keys)
        return jnp.einsum("bgrs,bgsk->bgrk", scores, values).reshape(batch, heads * dk)

    def step(x, layers, head):
        for p in layers:
            new_kv = jnp.sum(x @ p["k"] + x @ p["v"], axis=-1, keepdims=True)  # kept live
            x = x + attend(x @ p["q"], p["self_k"], p["self_v"]) @ p["o"] + new_kv
            x = x + attend(x @ p["cq"], p["cross_k"], p["cross_v"]) @ p["co"]
            h = functools.reduce(lambda a, b: a * b, [x @ k for k in p["wi"]])
            x = x + h @ p["wo"]
        return x @ head

    return jax.jit(step), (x, layers, head)


def measure_decode_matmuls(jax, jnp, np, cfg, batch: int, input_length: int,
                           target_length: int) -> float:
    """Milliseconds of one call of `decode_step_matmuls` (best of 5 rounds of 10 calls)."""
    fn, args = decode_step_matmuls(jax, jnp, np, cfg, batch, input_length, target_length)
    jax.block_until_ready(fn(*args))
    return best_time(lambda: jax.block_until_ready(fn(*args)), 10) * 1e3


def decode_floor_fields(step_bytes: dict, bandwidth: dict, hf_call_s: float,
                        moetx_one_s: float, moetx_step_ms: float, hf_step_ms: float,
                        target_length: int, matmuls_ms: float | None = None) -> dict:
    """What bounds cached decoding on this machine: the per-step floor (`step_bytes` read at
    the faster measured read bandwidth), each side's measured step over it, the step time
    moetx would need for 2x `generate` with its measured encoding and first token, and (given
    `matmuls_ms`, from `measure_decode_matmuls`) the time XLA's kernels take for the step's
    matmuls alone."""
    best = max(bandwidth.values())
    floor_ms = step_bytes["total"] / best * 1e3
    needed_ms = (hf_call_s / 2 - moetx_one_s) / max(target_length - 1, 1) * 1e3
    return {
        "decode_step_bytes": step_bytes,
        "read_bandwidth_gbs": {k: round(v / 1e9, 2) for k, v in bandwidth.items()},
        "per_token_step_floor_ms": floor_ms,
        "moetx_per_token_step_over_floor": moetx_step_ms / floor_ms,
        "hf_per_token_step_over_floor": hf_step_ms / floor_ms,
        # <= 0: 2x is out of reach even if every further step took no time.
        "per_token_step_ms_for_2x_generate": needed_ms,
        **({} if matmuls_ms is None else {
            "per_token_step_matmuls_ms": matmuls_ms,
            "moetx_per_token_step_over_matmuls": moetx_step_ms / matmuls_ms}),
    }


def moetx_decoder(jax, np, model, params, enc_np, length: int, eos_id: int):
    """moetx's cached greedy decoding of `enc_np` (a function of the length; `length` tokens
    by default), stopping only at `eos_id`."""
    enc = jax.device_put(enc_np, jax.devices()[0])
    predict = jax.jit(model.predict_batch,
                      static_argnames=("max_decode_length", "eos_id", "temperature"))
    rng = jax.random.PRNGKey(0)

    def decode(n: int = length):
        out = predict(params, enc, max_decode_length=n, rng=rng, eos_id=eos_id, temperature=0.0)
        return np.asarray(jax.block_until_ready(out))

    return decode


def hf_decoder(torch, hf_eval, enc_np, length: int, eos_id: int):
    """HF `generate`, greedy with its KV cache, exactly `length` new tokens (a function of the
    length, like `moetx_decoder`)."""
    enc = torch.from_numpy(enc_np.astype("int64"))
    mask = torch.ones_like(enc)

    def decode(n: int = length):
        with torch.inference_mode():
            out = hf_eval.generate(
                input_ids=enc, attention_mask=mask, do_sample=False, num_beams=1,
                max_new_tokens=n, min_new_tokens=n, use_cache=True, eos_token_id=eos_id,
                pad_token_id=0, decoder_start_token_id=0)
        return out.numpy()

    return decode


def decoder_of(side: str, args, jax, np, torch, cfg, model, input_shapes, batch_np):
    """`--only_decode`: one side's decoding alone, from its own initial weights (moetx's
    initialisation; HF's), for its peak RSS. The call returns the number of tokens it
    produced (what the memory line records in place of a loss)."""
    enc_np, n = batch_np["encoder_input_tokens"], args.target_length
    if side == "moetx":
        params = jax.jit(lambda r: model.get_initial_variables(r, input_shapes))(
            jax.random.PRNGKey(0))["params"]
        decode = moetx_decoder(jax, np, model, params, enc_np, n, args.vocab)
    else:
        decode = hf_decoder(torch, build_hf(torch, cfg, None, train=False), enc_np, n,
                            args.vocab)
    return lambda: float(decode().size)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    xla_flags_before = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    json_out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from moetx.trainer import metrics

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
        f"torch {torch.__version__} ({args.threads} threads), transformers "
        f"{transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"optimizer {args.optimizer}, peer {args.peer}"
        + (f", only {args.only_side}" if args.only_side else ""))

    mm = mm_load = None
    if not (args.only_side or args.only_decode):
        log("measuring f32 and bf16 matmul FLOP/s")
        with CpuLoad() as mm_load:
            mm = measure_matmuls(jax, jnp, torch)

    b, n_in, n_tg = args.batch, args.input_length, args.target_length
    common = {
        "model": {"d_model": args.d_model, "encoder_layers": args.layers,
                  "decoder_layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                  "d_ff": args.d_ff, "vocab": args.vocab, "mlp": "gated-gelu",
                  "logits": "untied", "relative_buckets": 32, "relative_max_distance": 128,
                  "dtype": "float32"},
        "batch": b, "input_length": n_in, "target_length": n_tg,
        "steps": args.steps, "warmup": args.warmup,
    }

    def emit(result: dict) -> None:
        json_out.write(json.dumps(result) + "\n")
        json_out.flush()

    # ------------------------------------------------------------------ 1. training step
    cfg = moetx_config(args)
    model, input_shapes = moetx_encdec_model(args, cfg)
    batch_np = make_batch(np, args)
    if args.only_decode:
        import_side_libraries()
        emit(run_memory_child(args.only_decode, lambda: decoder_of(
            args.only_decode, args, jax, np, torch, cfg, model, input_shapes, batch_np),
            args.steps, args.warmup, log))
        json_out.close()
        return 0
    tokens = b * (n_in + n_tg)
    import_side_libraries()
    baseline_mb = peak_rss_mb()

    steps, fallbacks = {}, {}
    params = flops_per_step = hf_params = attn_impl = params_np = None
    if args.only_side != "hf":
        log("building moetx")
        tr = moetx_trainer(jax, model, input_shapes, moetx_optimizer_factory(args.optimizer))
        state = tr.init_state()
        if not args.only_side:
            # A host copy of the initial weights (the train step donates `state`): the HF
            # models start from them, and the decode benchmark uses them on both sides.
            params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))
        batch = tr.to_global(batch_np)
        params = metrics.count_params(state.params)
        flops_per_step = model.flops_per_step(state.params, input_shapes)

        def moetx_step() -> float:
            nonlocal state
            state, sums = tr.train_step(state, batch)
            return float(jax.block_until_ready(sums)["loss"])

        steps["moetx"] = moetx_step

    if args.only_side != "moetx":
        log(f"building HF T5ForConditionalGeneration (train, {args.peer})")
        enc_t = torch.from_numpy(batch_np["encoder_input_tokens"].astype(np.int64))
        dec_in_t = torch.from_numpy(batch_np["decoder_input_tokens"].astype(np.int64))
        targets_t = torch.from_numpy(batch_np["decoder_target_tokens"].astype(np.int64))

        def loss_of(hf_model):
            # No attention mask: no input id is padding, so HF's default all-ones mask is exact.
            logits = hf_model(input_ids=enc_t, decoder_input_ids=dec_in_t, use_cache=False).logits
            return token_loss(torch, logits, targets_t)

        hf_steps, fallbacks = hf_variants(
            torch, lambda: build_hf(torch, cfg, params_np, train=True), loss_of, args.optimizer,
            args.peer)
        steps.update(hf_steps)
        hf_model = next(iter(hf_steps.values())).model
        hf_params = hf_param_count(hf_model)
        attn_impl = hf_model.config._attn_implementation
        del hf_model
        if params is not None and hf_params != params:
            log(f"WARNING: parameter counts differ: moetx {params:,} vs HF {hf_params:,}")

    train = time_round_robin(steps, args.steps, args.warmup, log, "train steps",
                             fallbacks=fallbacks)
    if args.only_side:  # a memory child: losses recorded, not checked (train_throughput's doc)
        emit(memory_child_line(args.only_side, args.peer if args.only_side == "hf" else None,
                               baseline_mb, train))
        json_out.close()
        return 0
    check_finite(train)

    mmf = matmul_fields(mm)
    result = {
        "benchmark": "encdec_train_throughput",
        **common,
        "tokens_per_step": tokens,
        "optimizer": optimizer_settings(args.optimizer),
        "peer_modes": args.peer,
        "params": params,
        "hf_params": hf_params,
        "params_match": hf_params == params,
        "weights_shared": True,
        "model_flops_per_step": flops_per_step,
        **mmf,
        # Same initial weights and batch: the first losses agree to float rounding. The last
        # ones agree as long as the two optimizers do: with Adafactor on the demo model they
        # follow the same trajectory; at d_model 32 they did not (plausibly because T5X leaves
        # matrices with no dimension >= 128 unfactored, where HF factors every matrix).
        **side_by_side_fields(train, tokens, flops_per_step, mmf),
        "hf_attn_implementation": attn_impl,
    }
    if "hf_compile" in steps:
        result["hf_compile"] = compile_info(torch)
    result.update(environment_fields(args, jax, torch, xla_flags_before))
    result.update({
        # CPU use (in cores) of other processes while timing: anything well above 0 means the
        # run shared the cores. own_cpu_cores: this process.
        "background_cpu_cores": {"matmul": mm_load.cores, "steps": train.load.cores},
        "steal_cpu_cores": {"matmul": mm_load.steal_cores, "steps": train.load.steal_cores},
        "own_cpu_cores": train.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    log(f"train: moetx {result['moetx_tokens_per_sec']:,.0f} tok/s, peer {result['peer']} "
        f"{result['peer_tokens_per_sec']:,.0f} tok/s, ratio {result['ratio_moetx_over_peer']:.2f}")
    steps.clear()  # free the training models (the children and the decode measure their own)
    fallbacks.clear()
    del state, tr, batch
    if args.memory:
        run_memory(result, args, argv, os.path.abspath(__file__), xla_flags_before, log)
    emit(result)
    if args.skip_decode:
        json_out.close()
        return 0

    # -------------------------------------------------------------------- 2. greedy decode
    eos_id = args.vocab  # outside the vocabulary: no row can stop early, on either side
    enc_np = batch_np["encoder_input_tokens"]
    params_dev = jax.device_put(params_np, jax.devices()[0])
    moetx_decode = moetx_decoder(jax, np, model, params_dev, enc_np, n_tg, eos_id)
    log("building HF T5ForConditionalGeneration (eval) with the same weights")
    hf_eval = build_hf(torch, cfg, params_np, train=False)
    enc_long = torch.from_numpy(enc_np.astype(np.int64))
    attention_mask = torch.ones_like(enc_long)
    hf_decode = hf_decoder(torch, hf_eval, enc_np, n_tg, eos_id)

    dec = time_round_robin({"moetx": moetx_decode, "hf": hf_decode,
                            "moetx_one": lambda: moetx_decode(1), "hf_one": lambda: hf_decode(1)},
                           args.steps, args.warmup, log, "decodes")
    mx_tokens, hf_out = dec.first_out["moetx"], dec.first_out["hf"]

    # Every row decodes all target_length tokens: moetx's loop stops only when every row has
    # emitted eos_id (never, it is out of the vocabulary); HF returns [start] + new tokens.
    assert mx_tokens.shape == (b, n_tg), mx_tokens.shape
    assert hf_out.shape == (b, n_tg + 1), hf_out.shape
    assert (hf_out[:, 0] == 0).all()
    hf_tokens = hf_out[:, 1:]
    all_decoded = bool(not (mx_tokens == eos_id).any() and not (hf_tokens == eos_id).any())

    mx_dt, hf_dt, mx_one, hf_one = (statistics.median(dec.times[k])
                                    for k in ("moetx", "hf", "moetx_one", "hf_one"))
    per_token_ms = {side: (full - one) / max(n_tg - 1, 1) * 1e3
                    for side, full, one in (("moetx", mx_dt, mx_one), ("hf", hf_dt, hf_one))}
    generated = b * n_tg

    # Agreement, and why it fails where it does: the teacher-forced logits of both models on
    # moetx's output, and moetx's top-1 - top-2 logit margin where the two first diverge.
    same = mx_tokens == hf_tokens
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), mx_tokens[:, :-1]], axis=1)
    tf_batch = {"encoder_input_tokens": jnp.asarray(enc_np), "decoder_input_tokens":
                jnp.asarray(dec_in), "decoder_target_tokens": jnp.asarray(mx_tokens)}
    mx_logits = np.asarray(model.logits(params_dev, tf_batch))
    with torch.inference_mode():
        hf_logits = hf_eval(input_ids=enc_long, attention_mask=attention_mask,
                            decoder_input_ids=torch.from_numpy(dec_in.astype(np.int64))
                            ).logits.numpy()
    tf_argmax_same = float((mx_logits.argmax(-1) == mx_tokens).mean())
    first_div = {}
    for r in range(b):
        bad = np.flatnonzero(~same[r])
        if bad.size:
            p = int(bad[0])
            top2 = np.sort(mx_logits[r, p])[-2:]
            first_div[r] = {"position": p, "moetx_top2_margin": float(top2[1] - top2[0]),
                            "logit_diff_there": float(np.abs(mx_logits[r, p]
                                                             - hf_logits[r, p]).max())}
    decode_line = {
        "benchmark": "encdec_decode_throughput",
        **common,
        "decode": "greedy, KV cache",
        "eos_id": eos_id,
        "generated_tokens_per_call": generated,
        "params": params,
        "moetx_time_s": mx_dt,
        "moetx_generated_tokens_per_sec": generated / mx_dt,
        "moetx_first_call_s": dec.first["moetx"],
        "hf_time_s": hf_dt,
        "hf_generated_tokens_per_sec": generated / hf_dt,
        "hf_first_call_s": dec.first["hf"],
        "ratio_moetx_over_hf": hf_dt / mx_dt,
        "moetx_one_token_s": mx_one,
        "hf_one_token_s": hf_one,
        "moetx_per_token_step_ms": per_token_ms["moetx"],
        "hf_per_token_step_ms": per_token_ms["hf"],
        **decode_floor_fields(decode_step_bytes(cfg, b, args.input_length, n_tg),
                              measure_read_bandwidth(jax, jnp, torch), hf_dt, mx_one,
                              per_token_ms["moetx"], per_token_ms["hf"], n_tg,
                              measure_decode_matmuls(jax, jnp, np, cfg, b, args.input_length,
                                                     n_tg)),
        "all_rows_decoded_full_length": all_decoded,
        "same_tokens": float(same.mean()),
        "same_rows": float(same.all(axis=1).mean()),
        "first_divergence": first_div,
        # moetx's teacher-forced argmax reproduces its own cached greedy decode (cache check).
        "moetx_teacher_forced_argmax_same": tf_argmax_same,
        "teacher_forced_max_abs_logit_diff": float(np.abs(mx_logits - hf_logits).max()),
        "max_abs_logit": float(np.abs(hf_logits).max()),
        "distinct_tokens_generated": int(np.unique(mx_tokens).size),
        "hf_attn_implementation": hf_eval.config._attn_implementation,
        **mmf,
        **environment_fields(args, jax, torch, xla_flags_before),
        "background_cpu_cores": {"matmul": mm_load.cores, "decode": dec.load.cores},
        "steal_cpu_cores": {"matmul": mm_load.steal_cores, "decode": dec.load.steal_cores},
        "own_cpu_cores": dec.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if args.memory:
        del params_dev, hf_eval, moetx_decode, hf_decode, dec
        run_memory(decode_line, args, argv, os.path.abspath(__file__), xla_flags_before, log,
                   children=[(side, ["--only_decode", side]) for side in ("moetx", "hf")])
    emit(decode_line)
    log(f"decode: moetx {generated / mx_dt:,.0f} tok/s ({mx_dt * 1e3:.0f} ms/call), HF "
        f"{generated / hf_dt:,.0f} tok/s ({hf_dt * 1e3:.0f} ms/call), ratio {hf_dt / mx_dt:.2f}; "
        f"one token: moetx {mx_one * 1e3:.0f} ms, HF {hf_one * 1e3:.0f} ms; a further step: moetx "
        f"{per_token_ms['moetx']:.1f} ms, HF {per_token_ms['hf']:.1f} ms; "
        f"same tokens {same.mean():.3f}")
    sys.stderr.flush()
    json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
