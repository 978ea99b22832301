"""Per-device bytes of a large model's train step on a simulated mesh: the plan and XLA's figure.

Builds the trainer of a model gin (T5.1.1-XXL, ST-MoE-32B, ...) on `--devices` simulated CPU
devices, without allocating anything: the parameter, optimizer-state and batch bytes each device
holds as the logical axis rules plan them, the largest arrays left replicated, and (unless
`--no_compile`) the train step lowered and compiled from abstract inputs with XLA's own
per-device argument size. One JSON line per run.

  .venv/bin/python benchmarks/sharding_plan.py --gin_file=models/t5_1_1_xxl.gin \
      --mesh=16,1,16 --fsdp
  .venv/bin/python benchmarks/sharding_plan.py --gin_file=models/st_moe_32b.gin \
      --mesh=4,64,1 --fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", required=True)
    p.add_argument("--gin_bindings", action="append", default=[])
    p.add_argument("--devices", type=int, default=256)
    p.add_argument("--mesh", default="16,1,16", help="data,expert,model")
    p.add_argument("--fsdp", action="store_true", help="embed -> data for parameters too")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--inputs", type=int, default=32)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--no_compile", action="store_true")
    args = p.parse_args(argv)
    # The simulated devices must be requested before JAX starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import gin
    import jax
    import jax.numpy as jnp

    import moetx.lm.models  # noqa: F401  (registers the model configurables)
    from moetx.trainer import optimizers, partitioning, sharding_plan
    from moetx.trainer import trainer as trainer_lib
    from moetx.util import gin_files

    gin_files.parse_files([args.gin_file], args.gin_bindings)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    mesh = partitioning.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    lengths = {"inputs": args.inputs, "targets": args.targets}
    start = time.perf_counter()
    shapes = model.input_shapes(args.batch, lengths)
    trainer = trainer_lib.Trainer(model, optimizers.make_optimizer, mesh,
                                  partitioning.standard_logical_axis_rules(fsdp=args.fsdp),
                                  shapes)
    build_seconds = time.perf_counter() - start
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}
    result = (sharding_plan.plan(trainer, batch) if args.no_compile
              else sharding_plan.compile_train_step(trainer, batch))
    print(json.dumps({"benchmark": "sharding_plan", "gin_file": args.gin_file,
                      "bindings": args.gin_bindings, "fsdp": args.fsdp,
                      "batch": args.batch, "lengths": lengths,
                      "trainer_build_seconds": build_seconds, **result.as_dict()}))


if __name__ == "__main__":
    main()
