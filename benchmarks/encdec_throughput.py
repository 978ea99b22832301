#!/usr/bin/env python
"""Encoder-decoder (T5.1.1) throughput of moetx against Hugging Face transformers (torch, CPU).

Two measurements in one run, on the same T5.1.1-style encoder-decoder (RMSNorm, per-stack
relative position bias, gated-GELU MLP, no biases, untied logits; by default the
`make demo MODEL=t5` model of moetx/gin/models/t5_demo.gin):

1. Training step (forward, backward, Adafactor) on a batch of random ids, `--input_length`
   encoder and `--target_length` decoder tokens per row:
     moetx  `moetx.trainer.trainer.Trainer.train_step` (jitted, T5X-default Adafactor, lr 1e-2
            from the rsqrt schedule) of `EncoderDecoderModel`, one device.
     HF     `transformers.T5ForConditionalGeneration` built from
            `moetx.convert.hf.t5_config_to_hf(cfg)`, its lm_head untied from `shared` (transformers
            5 ties it in memory even for an untied config), loaded with moetx's initial weights,
            trained with `transformers.optimization.Adafactor(lr=1e-2, scale_parameter=True,
            relative_step=False, warmup_init=False)`.
   Both minimise token cross entropy + 1e-4 logit z-loss (mean over target tokens). Tokens/s
   counts encoder plus decoder tokens; MFU uses `EncoderDecoderModel.flops_per_step`.

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

Each pair of steps/calls is timed alternately (one moetx, one HF, ...) after `--warmup` untimed
ones per side, median of `--steps`. The f32 matmul rate is measured in the same run (JAX and torch,
1024^2 and 2048^2); JAX's best is the MFU denominator for both sides, as in train_throughput.py.

Prints exactly two JSON lines on stdout, `encdec_train_throughput` then
`encdec_decode_throughput`, each self-contained; progress goes to stderr. Example:

  .venv/bin/python benchmarks/encdec_throughput.py               # tuned XLA CPU flags (default)
  .venv/bin/python benchmarks/encdec_throughput.py --no_xla_tuning
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Sibling module: the background-load meter and the matmul peak are shared with the
# decoder-only benchmark (importing it imports neither jax nor torch).
from train_throughput import CpuLoad, measure_matmuls, reserve_stdout_for_json, time_round_robin


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
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "head_dim", "d_ff", "vocab", "batch",
                 "input_length", "target_length", "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    if args.vocab < 3:
        p.error("--vocab must be at least 3")
    return args


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


def build_hf(torch, cfg, params_np, train: bool):
    """T5ForConditionalGeneration from the equivalent config, untied head, moetx's weights."""
    import transformers
    from moetx.convert import hf

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf.t5_config_to_hf(cfg))
    # transformers >= 5 ties T5's lm_head to `shared` in memory even for an untied (T5.1.1)
    # config (see moetx/convert/hf/); give it its own parameter, as the `hf_t5` helper of tests/convert/conftest.py does.
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    sd = hf.moetx_to_hf_t5(params_np, cfg=cfg)
    # The embed_tokens of both stacks are the `shared` module itself; load them as its copies.
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd[k] = sd["shared.weight"]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight
    return model.train(train)


def hf_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters counted once


def versions(jax, torch) -> dict:
    import importlib.metadata as md

    out = {"jax": jax.__version__, "torch": torch.__version__}
    for pkg in ("jaxlib", "flax", "optax", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
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
    from transformers.optimization import Adafactor

    from moetx.lm import models
    from moetx.trainer import metrics, optimizers, partitioning, trainer as trainer_lib

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
        f"torch {torch.__version__} ({args.threads} threads), transformers "
        f"{transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    log("measuring f32 matmul FLOP/s")
    with CpuLoad() as mm_load:
        mm = measure_matmuls(jax, jnp, torch)
    peak_jax = max(mm["jax_1024"], mm["jax_2048"])
    peak_torch = max(mm["torch_1024"], mm["torch_2048"])

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
    meta = {
        "peak_flops_f32_matmul": peak_jax,
        "peak_flops_f32_matmul_torch": peak_torch,
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in mm.items()},
        "xla_tuning": not args.no_xla_tuning,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_user": xla_flags_before,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "versions": versions(jax, torch),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }

    def emit(result: dict) -> None:
        json_out.write(json.dumps(result) + "\n")
        json_out.flush()

    # ------------------------------------------------------------------ 1. training step
    cfg = moetx_config(args)
    model = models.EncoderDecoderModel(config=cfg, z_loss=1e-4,
                                       loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    input_shapes = model.input_shapes(b, {"inputs": n_in, "targets": n_tg})
    batch_np = make_batch(np, args)
    tokens = b * (n_in + n_tg)

    log("building moetx")
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tr = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh,
                             partitioning.standard_logical_axis_rules(), input_shapes)
    state = tr.init_state()
    # A host copy of the initial weights (the train step donates `state`): the HF models start
    # from them, and the decode benchmark uses them on both sides.
    params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))
    batch = tr.to_global(batch_np)
    params = metrics.count_params(state.params)
    flops_per_step = model.flops_per_step(state.params, input_shapes)

    log("building HF T5ForConditionalGeneration (train)")
    hf_train = build_hf(torch, cfg, params_np, train=True)
    hf_params = hf_param_count(hf_train)
    if hf_params != params:
        log(f"WARNING: parameter counts differ: moetx {params:,} vs HF {hf_params:,}")
    opt = Adafactor(hf_train.parameters(), lr=1e-2, scale_parameter=True, relative_step=False,
                    warmup_init=False)
    enc_t = torch.from_numpy(batch_np["encoder_input_tokens"].astype(np.int64))
    dec_in_t = torch.from_numpy(batch_np["decoder_input_tokens"].astype(np.int64))
    targets_t = torch.from_numpy(batch_np["decoder_target_tokens"].astype(np.int64))
    z_loss = 1e-4

    def hf_step():
        opt.zero_grad(set_to_none=True)
        # No attention mask: no input id is padding, so HF's default all-ones mask is exact.
        logits = hf_train(input_ids=enc_t, decoder_input_ids=dec_in_t, use_cache=False).logits
        logits = logits.float()
        # Token cross entropy + z_loss * (log Z)^2, mean over target tokens (moetx's objective).
        log_z = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
        loss = (log_z - target_logit + z_loss * log_z.square()).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    def moetx_step():
        nonlocal state
        state, sums = tr.train_step(state, batch)
        jax.block_until_ready((state, sums))
        return sums

    train = time_round_robin({"moetx": moetx_step, "hf": hf_step}, args.steps, args.warmup, log,
                             "train steps")
    mx_loss_first = float(train.first_out["moetx"]["loss"])
    hf_loss_first = float(train.first_out["hf"])
    log(f"first losses: moetx {mx_loss_first:.4f}, HF {hf_loss_first:.4f}")
    mx_loss, hf_loss = float(train.last_out["moetx"]["loss"]), train.last_out["hf"]
    if not (np.isfinite(mx_loss) and np.isfinite(float(hf_loss))):
        raise FloatingPointError(f"loss is not finite: moetx {mx_loss}, HF {float(hf_loss)}")
    mx_t, hf_t = (statistics.median(train.times[k]) for k in ("moetx", "hf"))
    emit({
        "benchmark": "encdec_train_throughput",
        **common,
        "tokens_per_step": tokens,
        "params": params,
        "hf_params": hf_params,
        "params_match": hf_params == params,
        "model_flops_per_step": flops_per_step,
        "moetx_step_time_s": mx_t,
        "moetx_tokens_per_sec": tokens / mx_t,
        "moetx_mfu": flops_per_step / mx_t / peak_jax,
        "moetx_first_step_s": train.first["moetx"],
        "hf_step_time_s": hf_t,
        "hf_tokens_per_sec": tokens / hf_t,
        "hf_mfu": flops_per_step / hf_t / peak_jax,
        "hf_first_step_s": train.first["hf"],
        "ratio_moetx_over_hf": hf_t / mx_t,
        # Same initial weights and batch: the first losses agree to float rounding. The last
        # ones agree as long as the two Adafactors do: on the default model they follow the same
        # trajectory; at d_model 32 they did not (plausibly because T5X leaves matrices with no
        # dimension >= 128 unfactored, where HF factors every matrix).
        "moetx_loss_first": mx_loss_first,
        "hf_loss_first": hf_loss_first,
        "moetx_loss": mx_loss,
        "hf_loss": float(hf_loss),
        "hf_attn_implementation": hf_train.config._attn_implementation,
        **meta,
        # CPU use (in cores) of other processes while timing: anything well above 0 means the
        # run shared the cores. own_cpu_cores: this process.
        "background_cpu_cores": {"matmul": mm_load.cores, "steps": train.load.cores},
        "own_cpu_cores": train.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    log(f"train: moetx {tokens / mx_t:,.0f} tok/s ({mx_t * 1e3:.0f} ms/step), HF "
        f"{tokens / hf_t:,.0f} tok/s ({hf_t * 1e3:.0f} ms/step), ratio {hf_t / mx_t:.2f}")
    del state, tr, hf_train, opt, batch
    if args.skip_decode:
        json_out.close()
        return 0

    # -------------------------------------------------------------------- 2. greedy decode
    eos_id = args.vocab  # outside the vocabulary: no row can stop early, on either side
    enc_np = batch_np["encoder_input_tokens"]
    params_dev = jax.device_put(params_np, jax.devices()[0])
    enc_dev = jax.device_put(enc_np, jax.devices()[0])
    predict = jax.jit(model.predict_batch,
                      static_argnames=("max_decode_length", "eos_id", "temperature"))
    rng = jax.random.PRNGKey(0)

    def moetx_decode():
        out = predict(params_dev, enc_dev, max_decode_length=n_tg, rng=rng, eos_id=eos_id,
                      temperature=0.0)
        return np.asarray(jax.block_until_ready(out))

    log("building HF T5ForConditionalGeneration (eval) with the same weights")
    hf_eval = build_hf(torch, cfg, params_np, train=False)
    enc_long = torch.from_numpy(enc_np.astype(np.int64))
    attention_mask = torch.ones_like(enc_long)

    def hf_decode():
        with torch.inference_mode():
            out = hf_eval.generate(
                input_ids=enc_long, attention_mask=attention_mask, do_sample=False, num_beams=1,
                max_new_tokens=n_tg, min_new_tokens=n_tg, use_cache=True, eos_token_id=eos_id,
                pad_token_id=0, decoder_start_token_id=0)
        return out.numpy()

    dec = time_round_robin({"moetx": moetx_decode, "hf": hf_decode}, args.steps, args.warmup,
                           log, "decodes")
    mx_tokens, hf_out = dec.first_out["moetx"], dec.first_out["hf"]

    # Every row decodes all target_length tokens: moetx's loop stops only when every row has
    # emitted eos_id (never, it is out of the vocabulary); HF returns [start] + new tokens.
    assert mx_tokens.shape == (b, n_tg), mx_tokens.shape
    assert hf_out.shape == (b, n_tg + 1), hf_out.shape
    assert (hf_out[:, 0] == 0).all()
    hf_tokens = hf_out[:, 1:]
    all_decoded = bool(not (mx_tokens == eos_id).any() and not (hf_tokens == eos_id).any())

    mx_dt, hf_dt = (statistics.median(dec.times[k]) for k in ("moetx", "hf"))
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
    emit({
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
        **meta,
        "background_cpu_cores": {"matmul": mm_load.cores, "decode": dec.load.cores},
        "own_cpu_cores": dec.load.own_cores,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    log(f"decode: moetx {generated / mx_dt:,.0f} tok/s ({mx_dt * 1e3:.0f} ms/call), HF "
        f"{generated / hf_dt:,.0f} tok/s ({hf_dt * 1e3:.0f} ms/call), ratio {hf_dt / mx_dt:.2f}; "
        f"same tokens {same.mean():.3f}")
    sys.stderr.flush()
    json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
