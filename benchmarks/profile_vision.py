#!/usr/bin/env python
"""Where one vision training step spends its time, per op family, moetx beside timm (torch,
CPU): the same model, batch, loss and optimizer as `vision_throughput.py` (read its docstring),
by default CoAtNet-0 at 64² (the row furthest behind timm).

moetx  One jitted `Trainer.train_step` under `jax.profiler`, each executed XLA thunk classified
       by its HLO instruction's metadata (`classify_vision`: the Flax module path in `op_name`,
       the Python stack for the optimizer and moetx's own convolution paths), as in
       `profile_step.py`, whose machinery this reuses.
timm   One step under `torch.profiler`, with a `record_function` range around each module of a
       family (`timm_family_hooks`; everything inside an attention or squeeze-excite module
       counts for it), the loss and the optimizer step; backward ops count for the family of
       the forward op that made their autograd node.

Families: convolutions (dense, 1×1 included), depthwise convolutions, normalisation (batch
and layer norms, with timm's fused activation where it has one), attention and token mixing
(CoAtNet's relative attention, gMLP's spatial gating unit: their projections included),
squeeze-excite / self-gating, dense layers (MLPs, the head), drop path (stochastic depth, its
random bits included), loss, optimizer (SGD with momentum), other (activations, residual adds,
pooling, pads, layout copies). `host`: step wall time minus the time the ops account for.

Prints one JSON line (`profile_vision`); progress goes to stderr. Examples:

  .venv/bin/python benchmarks/profile_vision.py                            # CoAtNet-0, 64²
  .venv/bin/python benchmarks/profile_vision.py --model efficientnet_v2/b0 --image_size 96
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vision_throughput as vt  # noqa: E402  (same directory; no heavy imports)
from profile_step import family_table, profile_hf, profile_moetx, range_module  # noqa: E402
from train_throughput import (CpuLoad, finish_json_benchmark, start_json_benchmark,  # noqa: E402
                              versions)

FAMILIES = ("conv", "depthwise_conv", "norm", "attention", "squeeze_excite", "dense",
            "drop_path", "loss", "optimizer", "other")

# Instructions without metadata, by their opcode: XLA computes a convolution's weight gradient
# as a convolution of its own, made in a pass that keeps no op_name.
BY_OPCODE = {"convolution": "conv"}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[profile_vision {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr,
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--top", type=int, default=15, help="slowest HLO instructions listed")
    p.add_argument("--trace_dir", default=None, help="keep the JAX trace here (default: a "
                   "temporary directory, deleted)")
    p.add_argument("--dump_hlo", default=None, help="write the compiled moetx step's HLO here")
    own, rest = p.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__, file=sys.stderr)
    # The model, batch and timing flags are vision_throughput.py's; --steps is the number of
    # unprofiled and of profiled steps per side here.
    args = vt.parse_args(["--model", "coatnet/0", "--steps", "1", "--warmup", "1", *rest])
    for k, v in vars(own).items():
        setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------ moetx side
_MODEL_SCOPE = re.compile(r"jvp\(([A-Za-z]\w*)\)")
_ATTENTION = re.compile(r"/(attn|attention|gate|sgu|lambda\w*|mixer)(_\d+)?/", re.I)
_SQUEEZE = re.compile(r"/(se|self_gating)(_\d+)?/")
_NORM = re.compile(r"/[^/]*(norm|bn)[^/]*/", re.I)
_CONV = re.compile(r"/(\w*conv\w*|shortcut|mlp_fc\d*|stem\w*)/")


def classify_vision(op_name: str, stack: tuple[str, ...]) -> str | None:
    """The family of one HLO instruction of a vision train step from its metadata: `op_name`
    (`jit(_train_step_impl)/jvp(<Model>)/<module path>/<primitive>`, or `transpose(jvp(...))`
    in the backward pass) and the Python stack; None without metadata."""
    if not op_name and not stack:
        return None
    where = " ".join(stack)
    if "optimizers.py:" in where:
        return "optimizer"
    if _MODEL_SCOPE.search(op_name) is None:  # outside the model
        if "threefry" in op_name:  # the step's rng split for dropout and drop path
            return "drop_path"
        if "jvp(" in op_name or "transpose(" in op_name:  # the rest of the loss function
            return "loss"
        # After the gradient: the gradient norm, the optimizer's update and its application.
        return "optimizer" if op_name.startswith("jit(") else "other"
    path = op_name + "/"
    if "DropPath" in path or "Dropout" in path or "threefry" in path:
        return "drop_path"
    if _ATTENTION.search(path):
        return "attention"
    if _SQUEEZE.search(path):
        return "squeeze_excite"
    if _NORM.search(path):
        return "norm"
    if "conv_ops.py:depthwise_conv" in where:
        return "depthwise_conv"
    if "conv_general_dilated" in op_name or "conv_ops.py:" in where or _CONV.search(path):
        return "conv"  # the last: a convolution module's bias and its gradient
    if "dot_general" in op_name:
        return "dense"
    return "other"


# ------------------------------------------------------------------------------- timm side
def timm_family(module) -> str | None:
    """The family of one timm module, or None for a container (its children are ranged)."""
    import torch.nn as nn

    name = type(module).__name__
    if "Attention" in name or name in ("SpatialGatingUnit", "LambdaLayer"):
        return "attention"
    if name in ("SEModule", "SqueezeExcite", "EffectiveSEModule", "GatherExcite"):
        return "squeeze_excite"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise_conv"
        return "conv"
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) or "Norm" in name:
        return "norm"
    if isinstance(module, nn.Linear):
        return "dense"
    if name == "DropPath" or isinstance(module, nn.Dropout):
        return "drop_path"
    return None


def timm_family_hooks(torch, model) -> list:
    """Ranges every module of a family (`timm_family`), but none inside an attention or
    squeeze-excite module: those count whole, as on the moetx side."""
    handles, whole = [], set()
    for module in model.modules():
        if id(module) in whole:
            continue
        family = timm_family(module)
        if family is None:
            continue
        handles += range_module(torch, module, family)
        if family in ("attention", "squeeze_excite"):
            whole.update(id(m) for m in module.modules())
    return handles


def main(argv=None) -> int:
    args = parse_args(argv)
    json_out, _ = start_json_benchmark(args)

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch, args.image_size, args.image_size, 3)).astype(
        np.float32)
    labels = rng.integers(0, args.num_classes, args.batch).astype(np.int32)
    overrides, dropout, drop_path = vt.regularisation(args)
    log(f"{args.model} vs timm {args.timm_name}, batch {args.batch} x {args.image_size}^2")
    tr, state, batch, params = vt.build_moetx(args, jax, np, images, labels, overrides)
    log("profiling the moetx step")
    with CpuLoad() as mx_load:
        mx, state = profile_moetx(jax, tr, state, batch, args, FAMILIES, classify_vision,
                                  BY_OPCODE)
    log(f"moetx: {mx['step_wall_ms']:.0f} ms/step")
    del state, tr, batch

    tm = tm_load = timm_params = None
    if not args.skip_timm:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(args.timm_name, pretrained=False,
                                  num_classes=args.num_classes, drop_rate=dropout,
                                  drop_path_rate=drop_path, **args.timm_kwargs)
        model.train()
        timm_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        timm_family_hooks(torch, model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(labels.astype("int64"))
        rf = torch.autograd.profiler.record_function

        def timm_step():  # vision_throughput.py's, with the loss and optimizer ranges
            with rf("fam:optimizer"):
                opt.zero_grad(set_to_none=True)
            logits = model(x)
            with rf("fam:loss"):
                loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            with rf("fam:optimizer"):
                opt.step()
            return loss.detach()

        log("profiling the timm step")
        with CpuLoad() as tm_load:
            tm = profile_hf(torch, timm_step, args, FAMILIES)
        log(f"timm: {tm['step_wall_ms']:.0f} ms/step")

    table = family_table(mx, tm, "timm", FAMILIES)
    return finish_json_benchmark(json_out, {
        "benchmark": "profile_vision",
        "model": args.model, "timm_model": args.timm_name, "image_size": args.image_size,
        "batch": args.batch, "num_classes": args.num_classes, "steps": args.steps,
        "params": params, "timm_params": timm_params,
        "table_ms_per_step": table,
        "moetx": mx,
        "timm": tm,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(jax, torch),
        "threads": args.threads,
        "background_cpu_cores": {"moetx": mx_load.cores,
                                 "timm": tm_load.cores if tm_load else None},
        "steal_cpu_cores": {"moetx": mx_load.steal_cores,
                            "timm": tm_load.steal_cores if tm_load else None},
    })


if __name__ == "__main__":
    sys.exit(main())
