#!/usr/bin/env python
"""Rematerialisation policies (`TransformerConfig.remat_policy`): compile time, step time and
memory of the training step of a T5.1.1 encoder-decoder under each policy, same run.

The model is T5.1.1-small by default (d_model 512, d_ff 1024 gated-GELU, 8 + 8 layers, 6 heads
x 64, vocab 32128, untied logits, relative position bias), trained on a batch of 8 rows of 512
random input ids -> 114 target ids (T5's span-corruption lengths), with moetx's own training
step: `Trainer.train_step` (forward, backward, T5X-default Adafactor), one device, float32.

For each policy (`--policies`, default all):
  compile_s      lowering + XLA compilation of the jitted step
  step_s         median of `--steps` timed steps (after `--warmup` untimed ones); the policies'
                 steps are timed round-robin, so a change in background load hits all alike
  memory         `compiled.memory_analysis()`: temp_size_in_bytes (activations, residuals and
                 other scratch: what remat reduces), argument/output/alias sizes (the train
                 state and batch, donated), `peak_bytes_estimate` = argument + output + temp -
                 alias, and the host_* figures (where 'offload' puts its residuals); the
                 same figures prefixed `grad_` for the forward and backward pass alone (the
                 loss's gradient, compiled separately): the optimizer update's own temporaries
                 can set the step's peak, hiding what remat saves
  loss           of the first step (the same initial state and batch for every policy, so the
                 losses agree to float rounding)
A policy the backend cannot run ('offload' needs host-memory offload, which the CPU backend lacks)
gets a line with its one-line `error` instead.

On the CPU backend the policies save no memory: the compiled CPU program has none of the
optimization barriers JAX puts around the recomputation, and the duplicate matmuls are merged
back into the forward pass (a pure-JAX MLP of 4 or 16 checkpointed layers under `jax.grad`
compiles to the same temp size and dot count with and without `jax.checkpoint`). Measure
memory on GPU/TPU, where the barriers are what keeps the recomputation.

Prints one JSON line per policy on stdout; progress goes to stderr. Examples:

  .venv/bin/python benchmarks/remat.py                         # T5.1.1-small, all policies
  .venv/bin/python benchmarks/remat.py --batch 2 --layers 4 --steps 3
  .venv/bin/python benchmarks/remat.py --policies none,full
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# Sibling modules: the background-load meter, the round-robin timer and the stdout guard
# (train_throughput), the random encoder-decoder batch (encdec_throughput).
from encdec_throughput import (add_t5_small_shape_flags, encdec_batch, moetx_config,
                               moetx_encdec_model, moetx_trainer, require_positive)
from train_throughput import reserve_stdout_for_json, time_round_robin

POLICIES = ("none", "full", "save_dots", "save_all_dots", "offload")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: T5.1.1-small (moetx/gin/models/t5_1_1_small.gin's shape) on span-corruption
    # lengths.
    add_t5_small_shape_flags(p)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated remat policies (of {', '.join(POLICIES)})")
    p.add_argument("--steps", type=int, default=5, help="timed steps per policy")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per policy")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    args = p.parse_args(argv)
    require_positive(p, args, "steps")
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    if args.vocab < 3:
        p.error("--vocab must be at least 3")
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if not args.policies:
        p.error("--policies names no policy")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[remat {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def model_config(args, policy: str):
    """encdec_throughput's T5.1.1 config with the rematerialisation `policy`."""
    return dataclasses.replace(moetx_config(args), remat_policy=policy)


def memory_figures(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "alias_size_in_bytes", "generated_code_size_in_bytes", "host_temp_size_in_bytes",
             "host_argument_size_in_bytes", "host_output_size_in_bytes")
    out = {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}
    out["peak_bytes_estimate"] = (out.get("argument_size_in_bytes", 0)
                                  + out.get("output_size_in_bytes", 0)
                                  + out.get("temp_size_in_bytes", 0)
                                  - out.get("alias_size_in_bytes", 0))
    peak = getattr(stats, "peak_memory_in_bytes", None)  # reported by some backends
    if peak is not None:
        out["peak_memory_in_bytes"] = int(peak)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    json_out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import flax.linen as nn
    import jax
    import numpy as np

    from moetx.trainer import metrics, optimizers, partitioning

    unknown = [p for p in args.policies if p not in POLICIES
               and p not in ("dots_with_no_batch_dims", "dots_saveable")]
    if unknown:
        raise SystemExit(f"unknown --policies {unknown}; choose from {', '.join(POLICIES)}")
    device = jax.devices()[0]
    log(f"jax {jax.__version__} ({device.platform}, {len(jax.devices())} device(s)); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    b, n_in, n_tg = args.batch, args.input_length, args.target_length
    mesh = partitioning.make_mesh((1, 1, 1), devices=[device])
    rules = partitioning.standard_logical_axis_rules()
    batch_np = encdec_batch(np, args.vocab, b, n_in, n_tg)
    common = {
        "benchmark": "remat",
        "model": {"d_model": args.d_model, "encoder_layers": args.layers,
                  "decoder_layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                  "d_ff": args.d_ff, "vocab": args.vocab, "mlp": "gated-gelu",
                  "logits": "untied", "dtype": "float32"},
        "batch": b, "input_length": n_in, "target_length": n_tg,
        "steps": args.steps, "warmup": args.warmup,
        "platform": device.platform,
        "xla_tuning": not args.no_xla_tuning,
        "versions": versions(),
        "cpu_count": os.cpu_count(),
    }

    def trainer_for(policy: str):
        return moetx_trainer(jax, *moetx_encdec_model(args, model_config(args, policy)),
                             optimizers.make_optimizer)

    def compile_gradient(model, params):
        """The forward and backward pass alone (the loss's gradient, no optimizer): where the
        activations and the residuals remat keeps live."""
        def grads(params, batch):
            with nn.logical_axis_rules(rules):
                weights, factor = model.loss_weights_and_factor(batch)
                return jax.grad(lambda p: model.loss_fn(p, batch, None, weights, factor)[0])(
                    params)

        with jax.set_mesh(mesh):
            return jax.jit(grads).lower(params, batch).compile()

    # One initial state for every policy (the parameter tree does not depend on the policy);
    # each policy trains its own copy (the step donates it).
    log("initialising the train state")
    base = trainer_for("none")
    state0 = base.init_state()
    batch = base.to_global(batch_np)
    params = metrics.count_params(state0.params)
    log(f"{params:,} parameters")

    runs, results = {}, {}
    for policy in args.policies:
        try:
            tr = trainer_for(policy)
            state = jax.tree_util.tree_map(lambda x: x.copy(), state0)
            log(f"{policy}: compiling the train step")
            t0 = time.perf_counter()
            lowered = tr.lower_train_step(
                {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in batch.items()})
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
        except ValueError as e:  # e.g. 'offload' without host-memory offload
            msg = str(e).splitlines()[0]
            log(f"{policy}: {msg}")
            json_out.write(json.dumps({**common, "policy": policy, "error": msg}) + "\n")
            continue
        mem = memory_figures(compiled)
        grad_mem = memory_figures(compile_gradient(tr.model, state0.params))
        mem.update({f"grad_{k}": v for k, v in grad_mem.items()})
        log(f"{policy}: compiled in {compile_s:.1f}s; temp "
            f"{mem.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB, peak estimate "
            f"{mem.get('peak_bytes_estimate', 0) / 2**20:.1f} MiB; gradient alone: temp "
            f"{grad_mem.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB")
        results[policy] = {"compile_s": compile_s, "memory": mem}
        holder = {"state": state}

        def step(compiled=compiled, holder=holder):
            holder["state"], sums = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], sums))
            return float(sums["loss"])

        runs[policy] = step

    if runs:
        timed = time_round_robin(runs, args.steps, args.warmup, log, "train steps")
        for policy in runs:
            step_s = statistics.median(timed.times[policy])
            loss = timed.first_out[policy]
            if not np.isfinite(loss):
                raise FloatingPointError(f"{policy}: loss {loss}")
            result = {**common, "policy": policy, "params": params,
                      "compile_s": round(results[policy]["compile_s"], 2),
                      "step_s": round(step_s, 4),
                      "step_times_s": [round(t, 4) for t in timed.times[policy]],
                      **results[policy]["memory"],
                      "loss_first_step": loss,
                      # CPU use (in cores) of other processes while timing: well above 0 means
                      # the run shared the cores.
                      "background_cpu_cores": timed.load.cores,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            json_out.write(json.dumps(result) + "\n")
            log(f"{policy}: {step_s:.3f} s/step, temp "
                f"{result.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB, loss {loss:.6f}")
    json_out.flush()
    json_out.close()
    return 0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
