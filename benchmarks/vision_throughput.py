#!/usr/bin/env python
"""Training throughput (images/s) of a moetx vision model against the same timm model (torch,
CPU), same run.

Both sides train the same architecture on the same random batch with SGD (Nesterov momentum
0.9, constant learning rate 0.1, no weight decay) and softmax cross entropy, in training mode
(BatchNorm batch statistics, the variant's dropout and stochastic depth):

  moetx  `moetx.trainer.trainer.Trainer.train_step` (jitted) on one device, with
         `moetx.vision.model.ImageClassificationModel` (no augmentation, no label smoothing)
         and `optimizers.sgd_momentum`.
  timm   `timm.create_model(<timm name>)` (`resnetrs<depth>`, `tf_efficientnetv2_<v>`,
         `coatnet_<v>_224` or `gmlp_<v>16_224`, the last two built at `--image_size`) with
         `torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)`.

The trainable parameter counts must match (`params_match`). Steps are timed alternately (one
moetx step, one timm step, ...) after `--warmup` untimed steps each, and each side's step time
is the median, so a change in background load hits both alike. `background_cpu_cores` is the
CPU other processes used while timing (`steal_cpu_cores`: the part the hypervisor took): this
machine's two cores are shared, so discard runs where it is well above 0. Under such load
torch's OpenMP threads oversubscribe badly: measured on this machine with ~1.5 cores busy
elsewhere, a tf_efficientnetv2_b0 step (64^2, batch 16) took 2.3 s with `--threads 2` and
0.34 s with `--threads 1`, so compare the two sides with `--threads 1` unless the machine is
idle.

MFU: the step's FLOPs as XLA counts them in moetx's train step before optimisation
(`Lowered.cost_analysis()`: the forward and backward convolutions and matmuls, elementwise work
and the update, as written), which both sides compute, over the fastest f32 matmul rate either
library reaches in the same run (`peak_flops_f32_matmul`).

`--memory`: after timing, each side trains 2 steps again in a child process of its own (`--only_side
moetx|timm`, which builds that side alone, after importing what both sides import) and reports
its peak RSS (Linux's VmHWM): `moetx_peak_rss_mb`, `timm_peak_rss_mb`, and each over the
child's RSS after the imports (`*_rss_over_baseline_mb`), as train_throughput.py's children do.

Prints exactly one JSON line on stdout; progress goes to stderr. Examples:

  .venv/bin/python benchmarks/vision_throughput.py                      # ResNet-RS-50, 64x64
  .venv/bin/python benchmarks/vision_throughput.py --model efficientnet_v2/b0 --image_size 96
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import (  # noqa: E402  (same directory; no heavy imports)
    CpuLoad, matmul_fields, measure_matmuls, reserve_stdout_for_json, run_memory,
    run_memory_child, time_round_robin, versions)

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[vision_throughput {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_rs/50",
                   help="resnet_rs/<50..420>, efficientnet_v2/<s,m,l,b0..b3>, coatnet/<0..3> "
                        "or gmlp/<ti,s,b>")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compile)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no_xla_tuning", action="store_true",
                   help="do not call moetx.util.xla_env.configure_cpu_defaults()")
    p.add_argument("--skip_timm", action="store_true", help="time moetx only (no peer)")
    p.add_argument("--memory", action="store_true",
                   help="also measure each side's peak RSS in a child process of its own")
    p.add_argument("--only_side", choices=("moetx", "timm"),
                   help="(what --memory runs) build and train one side only, 2 steps, and print "
                        "its peak RSS line")
    args = p.parse_args(argv)
    if args.memory and args.only_side:
        p.error("--memory starts the --only_side children itself; pass one of them, not both")
    if args.memory and args.skip_timm:
        p.error("--memory measures both sides; drop --skip_timm")
    for name in ("image_size", "batch", "num_classes", "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step compiles)")
    family, _, variant = args.model.partition("/")
    # timm models that take the image size at construction (relative-position tables, token MLPs).
    args.timm_kwargs = {}
    if family == "resnet_rs" and variant.isdigit():
        args.timm_name = f"resnetrs{variant}"
    elif family == "efficientnet_v2" and variant in ("s", "m", "l", "b0", "b1", "b2", "b3"):
        args.timm_name = f"tf_efficientnetv2_{variant}"
    elif family == "coatnet" and variant in ("0", "1", "2", "3"):
        args.timm_name = f"coatnet_{variant}_224"
        args.timm_kwargs = {"img_size": args.image_size}
    elif family == "gmlp" and variant in ("ti", "s", "b"):
        args.timm_name = f"gmlp_{variant}16_224"
        args.timm_kwargs = {"img_size": args.image_size}
    else:
        p.error(f"--model must be resnet_rs/<depth>, efficientnet_v2/<s|m|l|b0..b3>, "
                f"coatnet/<0..3> or gmlp/<ti|s|b> (models timm has too), got {args.model!r}")
    return args


def regularisation(args) -> tuple[dict, float, float]:
    """(moetx model overrides, dropout, drop_path) of the moetx variant; the same dropout and
    drop-path rates go to timm."""
    from moetx.vision.models import get_family

    family, _, variant = args.model.partition("/")
    cfg = get_family(family).VARIANTS[variant]
    if family in ("coatnet", "gmlp"):  # CoAtNet/gMLP name their rates differently
        drop_path = float(cfg.get("stochastic_depth", 0.0))
        dropout = float(cfg.get("dropout", 0.0))
        overrides = {"stochastic_depth": drop_path}
        if family == "coatnet":
            overrides["dropout"] = dropout
        return overrides, dropout, drop_path
    drop_path = float(cfg.get("drop_path_rate", 0.2 if family == "efficientnet_v2" else 0.0))
    dropout = float(cfg["dropout_rate"])
    return {"dropout_rate": dropout, "drop_path_rate": drop_path}, dropout, drop_path


def build_moetx(args, jax, np, images, labels, overrides):
    from moetx.trainer import metrics, optimizers, partitioning, trainer as trainer_lib
    from moetx.vision import model as vision_model

    model = vision_model.ImageClassificationModel(
        model_name=args.model, num_classes=args.num_classes,
        model_overrides=overrides,
        mean=(0.0,), std=(1.0,))
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shapes = model.input_shapes(args.batch, {"image": (args.image_size, args.image_size, 3)})
    tr = trainer_lib.Trainer(
        model, lambda param_axes: optimizers.sgd_momentum(optimizers.constant_schedule(0.1)),
        mesh, partitioning.standard_logical_axis_rules(), shapes, seed=0)
    state = tr.init_state()
    # Float images are passed through preprocess's to_float unchanged (already in [0, 1]).
    batch = tr.to_global({"image": images, "label": labels,
                          "mask": np.ones(args.batch, np.float32)})
    return tr, state, batch, metrics.count_params(state.params)


def build_timm(args, torch, images, labels, dropout, drop_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.timm_name, pretrained=False, num_classes=args.num_classes,
                              drop_rate=dropout, drop_path_rate=drop_path, **args.timm_kwargs)
    model.train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype("int64"))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, params


def memory_child(args, out, jax, np, torch, images, labels, overrides, dropout,
                 drop_path) -> int:
    """`--only_side`: builds and trains one side alone (1 + 1 steps) and prints its peak RSS
    line. Both sides' libraries are imported first, so the baseline is the same for both."""
    import timm  # noqa: F401

    import moetx.trainer.trainer  # noqa: F401
    import moetx.vision.model  # noqa: F401

    def build():
        if args.only_side == "moetx":
            tr, state, batch, _ = build_moetx(args, jax, np, images, labels, overrides)

            def step():
                nonlocal state
                state, sums = tr.train_step(state, batch)
                return float(jax.block_until_ready(sums)["loss"])
            return step
        timm_step, _ = build_timm(args, torch, images, labels, dropout, drop_path)
        return lambda: float(timm_step())

    line = run_memory_child(args.only_side, build, args.steps, args.warmup, log)
    out.write(json.dumps(line) + "\n")
    return 0


def step_flops(jax, tr, batch: dict) -> float | None:
    """FLOPs of one moetx train step as XLA counts them before optimisation (module docstring);
    None where the backend gives no cost analysis."""
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    cost = tr.lower_train_step(shapes).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    xla_flags_user = os.environ.get("XLA_FLAGS", "")  # the children tune from these themselves
    out = reserve_stdout_for_json(xla_tuning=not args.no_xla_tuning)

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    log(f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads); "
        f"{args.model} vs timm {args.timm_name}, batch {args.batch} x {args.image_size}^2")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch, args.image_size, args.image_size, 3)).astype(
        np.float32)
    labels = rng.integers(0, args.num_classes, args.batch).astype(np.int32)
    overrides, dropout, drop_path = regularisation(args)
    if args.only_side:
        return memory_child(args, out, jax, np, torch, images, labels, overrides, dropout,
                            drop_path)

    log("measuring f32 and bf16 matmul FLOP/s")
    with CpuLoad() as mm_load:
        mm = matmul_fields(measure_matmuls(jax, jax.numpy, torch))
    log("building moetx (init compiles)")
    tr, state, batch, params = build_moetx(args, jax, np, images, labels, overrides)
    flops = step_flops(jax, tr, batch)
    timm_step = timm_params = None
    if not args.skip_timm:
        log("building timm")
        timm_step, timm_params = build_timm(args, torch, images, labels, dropout, drop_path)
        if timm_params != params:
            log(f"WARNING: parameter counts differ: moetx {params:,} vs timm {timm_params:,}")

    def moetx_step():
        nonlocal state
        state, sums = tr.train_step(state, batch)
        jax.block_until_ready((state, sums))
        return sums

    steps = {"moetx": moetx_step}
    if timm_step is not None:
        steps["timm"] = timm_step
    timed = time_round_robin(steps, args.steps, args.warmup, log)
    mx_loss = float(timed.last_out["moetx"]["loss"])
    if not np.isfinite(mx_loss):
        raise FloatingPointError(f"moetx loss is {mx_loss}")

    load = timed.load
    mx_t = statistics.median(timed.times["moetx"])
    result = {
        "benchmark": "vision_throughput",
        "model": args.model, "timm_model": args.timm_name,
        "image_size": args.image_size, "batch": args.batch, "num_classes": args.num_classes,
        "dropout": dropout, "drop_path": drop_path,
        "steps": args.steps, "warmup": args.warmup, "torch_threads": args.threads,
        "params": params, "timm_params": timm_params,
        "params_match": None if timm_params is None else timm_params == params,
        "model_flops_per_step": flops,
        "moetx_step_time_s": mx_t,
        "moetx_images_per_sec": args.batch / mx_t,
        "moetx_mfu": flops / mx_t / mm["peak_flops_f32_matmul"] if flops else None,
        "moetx_first_step_s": timed.first["moetx"],
        "moetx_loss": mx_loss,
    }
    if timm_step is not None:
        tm_t = statistics.median(timed.times["timm"])
        result.update({
            "timm_step_time_s": tm_t,
            "timm_images_per_sec": args.batch / tm_t,
            "timm_mfu": flops / tm_t / mm["peak_flops_f32_matmul"] if flops else None,
            "timm_first_step_s": timed.first["timm"],
            "timm_loss": float(timed.last_out["timm"]),
            "ratio_moetx_over_timm": tm_t / mx_t,
        })
    if args.memory:
        del state, tr, batch, timm_step, steps, timed
        argv_used = sys.argv[1:] if argv is None else list(argv)
        run_memory(result, args, argv_used, os.path.abspath(__file__), xla_flags_user, log,
                   children=[("moetx", ["--only_side", "moetx"]),
                             ("timm", ["--only_side", "timm"])])
    result.update({
        "background_cpu_cores": None if load.cores is None else round(load.cores, 2),
        "steal_cpu_cores": None if load.steal_cores is None else round(load.steal_cores, 2),
        "background_cpu_cores_matmul": mm_load.cores,
        **mm,
        "xla_tuning": not args.no_xla_tuning,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(jax, torch),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
