#!/usr/bin/env python
"""Scanned layers (`TransformerConfig.scan_layers`) vs unrolled: compile time and step time of
moetx's training step, same run.

Two models (`--models`, default both):
  decoder_only     `--layers` (24) decoder layers, d_model 256, 4 heads x 64, d_ff 1024 gated
                   GELU, vocab 32128 untied, relative position bias; batch 4 x 128 tokens
  encoder_decoder  `--encdec_layers` (12) encoder + 12 decoder layers of the same width;
                   batch 4, 128 input -> 128 target tokens
Each is built twice, unrolled and scanned, from one initial state (the scanned parameters are
the unrolled ones through `moetx.lm.scan.scan_params`, so the first-step losses must agree to
float rounding). The training step is `Trainer.train_step` (forward, backward, T5X-default
Adafactor) on one device, float32.

For each (model, layout):
  compile_s    lowering + XLA compilation of the jitted step
  step_s       median of `--steps` timed steps after `--warmup` untimed ones; every variant's
               steps are timed round-robin, so a change in background load hits all alike
  loss_first_step, params, background_cpu_cores (CPU use of other processes while timing)

Prints one JSON line per (model, layout) on stdout; progress goes to stderr. Examples:

  .venv/bin/python benchmarks/scan.py
  .venv/bin/python benchmarks/scan.py --models decoder_only --layers 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Sibling modules: the stdout guard and the round-robin timer (train_throughput), the random
# batches (train_throughput: decoder-only, encdec_throughput: encoder-decoder).
from encdec_throughput import encdec_batch
from train_throughput import make_batch, reserve_stdout_for_json, time_round_robin

MODELS = ("decoder_only", "encoder_decoder")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models (of {', '.join(MODELS)})")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=24, help="decoder-only depth")
    p.add_argument("--encdec_layers", type=int, default=12,
                   help="encoder layers = decoder layers of the encoder-decoder")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128,
                   help="decoder-only length; encoder-decoder input and target length")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "encdec_layers", "heads", "head_dim", "d_ff", "vocab",
                 "batch", "length", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    if args.vocab < 3:
        p.error("--vocab must be at least 3")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models {args.models}: choose from {', '.join(MODELS)}")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[scan {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def model_config(args, name: str, scanned: bool):
    from moetx.lm import transformer

    encdec = name == "encoder_decoder"
    return transformer.TransformerConfig(
        vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.heads,
        head_dim=args.head_dim, mlp_dim=args.d_ff,
        num_encoder_layers=args.encdec_layers if encdec else 0,
        num_decoder_layers=args.encdec_layers if encdec else args.layers,
        dropout_rate=0.0, mlp_activations=("gelu", "linear"), logits_via_embedding=False,
        dtype="float32", scan_layers=scanned)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    json_out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import numpy as np

    from moetx.lm import models, scan
    from moetx.trainer import metrics, optimizers, partitioning, trainer as trainer_lib

    device = jax.devices()[0]
    log(f"jax {jax.__version__} ({device.platform}, {len(jax.devices())} device(s))")
    mesh = partitioning.make_mesh((1, 1, 1), devices=[device])
    rules = partitioning.standard_logical_axis_rules()
    b, n = args.batch, args.length

    runs, results = {}, {}
    for name in args.models:
        encdec = name == "encoder_decoder"
        batch_np = (encdec_batch(np, args.vocab, b, n, n) if encdec
                    else make_batch(np, args.vocab, b, n))
        first_state = None
        for scanned in (False, True):
            cfg = model_config(args, name, scanned)
            model = (models.EncoderDecoderModel if encdec else models.DecoderOnlyModel)(
                config=cfg, z_loss=1e-4, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
            shapes = (model.input_shapes(b, {"inputs": n, "targets": n}) if encdec
                      else model.input_shapes(b, n))
            tr = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh, rules, shapes)
            variant = f"{name}/{'scanned' if scanned else 'unrolled'}"
            log(f"{variant}: initialising")
            state = tr.init_state()
            if first_state is None:
                first_state = state
            else:  # the same initial parameters, stacked, on the scanned state's shardings
                stacked = scan.scan_params(jax.device_get(first_state.params), cfg)
                state = state.replace(params=jax.tree_util.tree_map(
                    lambda x, like: jax.device_put(x, like.sharding), stacked, state.params))
                first_state = None
            batch = tr.to_global(batch_np)
            log(f"{variant}: compiling the train step")
            t0 = time.perf_counter()
            compiled = jax.jit(tr.train_step, donate_argnums=(0,)).lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            log(f"{variant}: compiled in {compile_s:.1f}s")
            results[variant] = {"model": name, "scan_layers": scanned,
                                "params": metrics.count_params(state.params),
                                "compile_s": compile_s}
            holder = {"state": state}

            def step(compiled=compiled, holder=holder, batch=batch):
                holder["state"], sums = compiled(holder["state"], batch)
                jax.block_until_ready((holder["state"], sums))
                return float(sums["loss"])

            runs[variant] = step

    timed = time_round_robin(runs, args.steps, args.warmup, log, "train steps")
    for variant, res in results.items():
        loss = timed.first_out[variant]
        if not np.isfinite(loss):
            raise FloatingPointError(f"{variant}: loss {loss}")
        cfg = model_config(args, res["model"], res["scan_layers"])
        out = {"benchmark": "scan", **res,
               "model_shape": {"d_model": args.d_model, "encoder_layers": cfg.num_encoder_layers,
                               "decoder_layers": cfg.num_decoder_layers, "heads": args.heads,
                               "head_dim": args.head_dim, "d_ff": args.d_ff,
                               "vocab": args.vocab},
               "batch": b, "length": n, "steps": args.steps, "warmup": args.warmup,
               "compile_s": round(res["compile_s"], 2),
               "step_s": round(statistics.median(timed.times[variant]), 4),
               "step_times_s": [round(t, 4) for t in timed.times[variant]],
               "loss_first_step": loss,
               "background_cpu_cores": timed.load.cores,
               "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
               "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        json_out.write(json.dumps(out) + "\n")
        log(f"{variant}: compile {out['compile_s']:.1f}s, {out['step_s']:.3f} s/step, "
            f"loss {loss:.6f}")
    json_out.flush()
    json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
