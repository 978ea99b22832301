#!/usr/bin/env python
"""Convolution gradient step on CPU: `lax.conv_general_dilated`, moetx's `conv_ops` fast paths
and torch (oneDNN), same shapes, same run.

Each row times value-and-grad of sum(conv(x, w)^2) with respect to x and w (batch 16, NHWC for
JAX, NCHW for torch), median of `--steps` round-robin calls. The shapes are the kinds
`moetx.vision.models.conv_ops` replaces (depthwise convs; dense convs on maps no larger than the
kernel plus one; 1x1 convs, a matmul over channels; other dense convs with 32 or more outputs,
whose kernel gradient is a matmul over the patches) and one that stays on lax. `path` says which
implementation `conv_ops` picks.
Depthwise rows also time `autodiff_bwd`: conv_ops' forward with the gradient autodiff derives
from it, in place of the written-out one.

Prints one JSON line on stdout; progress goes to stderr.

  .venv/bin/python benchmarks/conv_ops.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import reserve_stdout_for_json, time_round_robin  # noqa: E402

_T0 = time.perf_counter()

# (name, kernel side, spatial, input channels, output channels, stride, depthwise)
SHAPES = [
    ("depthwise 3x3 56x56x144", 3, 56, 144, 144, 1, True),
    ("depthwise 3x3 16x16x128 /2", 3, 16, 128, 128, 2, True),
    ("depthwise 3x3 2x2x1536", 3, 2, 1536, 1536, 1, True),
    ("dense 3x3 2x2x512", 3, 2, 512, 512, 1, False),
    ("dense 3x3 4x4x512 /2", 3, 4, 512, 512, 2, False),
    ("dense 3x3 8x8x128 /2", 3, 8, 128, 128, 2, False),
    # Larger maps: CoAtNet-0's second stem conv at 64², EfficientNetV2-B0's stage 2 at 96², and
    # its stage 1 conv, whose 16 outputs stay on lax.
    ("dense 3x3 32x32x64", 3, 32, 64, 64, 1, False),
    ("dense 3x3 24x24x32 -> 128", 3, 24, 32, 128, 1, False),
    ("dense 3x3 48x48x32 -> 16", 3, 48, 32, 16, 1, False),
    # 1x1: CoAtNet-0's MBConv expansion and last MLP at 64², a ResNet bottleneck's reduction.
    ("pointwise 1x1 32x32x64 -> 384", 1, 32, 64, 384, 1, False),
    ("pointwise 1x1 2x2x3072 -> 768", 1, 2, 3072, 768, 1, False),
    ("pointwise 1x1 16x16x256 -> 64", 1, 16, 256, 64, 1, False),
]


def log(msg: str) -> None:
    print(f"[conv_ops {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    json_out = reserve_stdout_for_json()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax import lax

    from moetx.vision.models import conv_ops

    torch.set_num_threads(args.threads)
    dn = conv_ops.channels_last_numbers(2)
    rows = []
    rng = np.random.default_rng(0)
    for name, k, hw, c, c_out, stride, depthwise in SHAPES:
        groups = c if depthwise else 1
        x = rng.standard_normal((args.batch, hw, hw, c), np.float32)
        w = rng.standard_normal((k, k, 1 if depthwise else c, c_out), np.float32) * 0.05
        pad = ((k // 2, k // 2),) * 2

        def jax_step(conv):
            def loss(x, w):
                return jnp.sum(conv(x, w, (stride, stride), pad, dimension_numbers=dn,
                                    feature_group_count=groups) ** 2)

            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            return lambda: jax.block_until_ready(f(xj, wj))

        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)

        def torch_step():
            xt.grad = wt.grad = None
            y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=k // 2, groups=groups)
            (y ** 2).sum().backward()
            return xt.grad

        steps = {"lax": jax_step(lax.conv_general_dilated),
                 "conv_ops": jax_step(conv_ops.conv_general_dilated), "torch": torch_step}
        if depthwise:  # the same forward, its gradient by autodiff (k*k padded cotangents)
            steps["autodiff_bwd"] = jax_step(
                lambda x, w, strides, pads, **_: conv_ops.shifted_sum(x, w, strides, pads))
        rr = time_round_robin(steps, args.steps, 2, log)
        ms = {k: statistics.median(v) * 1e3 for k, v in rr.times.items()}
        jaxpr = str(jax.make_jaxpr(
            lambda x, w: conv_ops.conv_general_dilated(
                x, w, (stride, stride), pad, dimension_numbers=dn,
                feature_group_count=groups))(x, w))
        if "conv_general_dilated" in jaxpr:  # lax's forward, with conv_ops' gradient or lax's
            path = "dense" if "custom_vjp_call" in jaxpr else "lax"
        else:
            path = "depthwise" if depthwise else "pointwise" if k == 1 else "patches"
        rows.append({"shape": name, "path": path, "lax_ms": round(ms["lax"], 2),
                     "conv_ops_ms": round(ms["conv_ops"], 2), "torch_ms": round(ms["torch"], 2),
                     "speedup_over_lax": round(ms["lax"] / ms["conv_ops"], 2),
                     "conv_ops_over_torch_time": round(ms["conv_ops"] / ms["torch"], 2),
                     "autodiff_bwd_ms": round(ms["autodiff_bwd"], 2) if depthwise else None,
                     "background_cpu_cores": round(rr.load.cores, 2)})
        log(json.dumps(rows[-1]))
    out = {"benchmark": "conv_ops", "batch": args.batch, "steps": args.steps,
           "torch_threads": args.threads, "jax": jax.__version__, "torch": torch.__version__,
           "rows": rows}
    json_out.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
