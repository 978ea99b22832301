"""What a sharded training step will hold on each device: the plan, and the compiled program.

The plan comes from the trainer's shardings alone (nothing is allocated): for every array of
the train state, the shape of one device's shard, times its item size. The compiled figure is
XLA's own account of the train step's arguments after SPMD partitioning
(`Compiled.memory_analysis()`), compiled from abstract inputs, so a 269B-parameter model can be
checked on a laptop with `--xla_force_host_platform_device_count=256`. The two agree when every
array is laid out as the logical axis rules say; a weight the rules leave replicated by accident
(an expert kernel, an embedding) shows up as the largest entries of `replicated`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass
class ShardingPlan:
    """Per-device bytes of a train state as planned, and what the compiled step reports.

    Attributes:
      devices: the mesh's device count.
      mesh: the mesh shape by axis name.
      total_param_bytes: all parameters, unsharded.
      param_bytes, opt_bytes, other_state_bytes: one device's shard of the parameters, of the
        optimizer state, and of the rest (step, model state, EMA), as the shardings plan them.
      batch_bytes: one device's shard of the batch.
      replicated: (path, bytes) of the largest arrays held whole on every device.
      compiled_state_bytes: one device's shard of the train state under the shardings the
        compiled step takes its state in (XLA may change a layout the plan left open).
      compiled_argument_bytes: XLA's argument size per device: the state and the batch
        features the step reads (jit drops unused inputs, e.g. positions a model ignores).
      compile_seconds: lowering + compilation time.
    """

    devices: int
    mesh: dict[str, int]
    total_param_bytes: int
    param_bytes: int
    opt_bytes: int
    other_state_bytes: int
    batch_bytes: int
    replicated: list[tuple[str, int]]
    compiled_state_bytes: int | None = None
    compiled_argument_bytes: int | None = None
    compile_seconds: float | None = None

    @property
    def planned_state_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes + self.other_state_bytes

    def matches(self) -> bool:
        """The compiled step holds the state as planned, and its arguments are that state plus
        at most the planned batch shard."""
        return (self.compiled_state_bytes == self.planned_state_bytes and
                self.planned_state_bytes <= self.compiled_argument_bytes
                <= self.planned_state_bytes + self.batch_bytes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["planned_state_bytes"] = self.planned_state_bytes
        if self.compiled_argument_bytes is not None:
            out["matches_plan"] = self.matches()
        return out


def shard_bytes(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding) -> int:
    """Bytes of the largest shard of an array of `shape` under `sharding` on one device."""
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def _tree_shard_bytes(abstract: Any, shardings: Any) -> int:
    leaves = jax.tree_util.tree_leaves(abstract)
    specs = jax.tree_util.tree_leaves(shardings)
    return sum(shard_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, specs, strict=True))


def plan(trainer, batch_shapes: dict[str, jax.ShapeDtypeStruct], top: int = 5) -> ShardingPlan:
    """The per-device bytes the trainer's shardings plan for its state and `batch_shapes`."""
    state, shardings = trainer.abstract_state, trainer.state_shardings
    params = _tree_shard_bytes(state.params, shardings.params)
    opt = _tree_shard_bytes(state.opt_state, shardings.opt_state)
    other = sum(_tree_shard_bytes(getattr(state, f), getattr(shardings, f))
                for f in ("step", "model_state", "ema"))
    batch = sum(shard_bytes(x.shape, x.dtype, trainer.batch_shardings[k])
                for k, x in batch_shapes.items())
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                for x in jax.tree_util.tree_leaves(state.params))
    replicated = []
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for (path, x), s in zip(flat, jax.tree_util.tree_leaves(shardings.params), strict=True):
        if s.is_fully_replicated and len(trainer.mesh.devices.flat) > 1:
            replicated.append((jax.tree_util.keystr(path, simple=True, separator="/"),
                               math.prod(x.shape) * np.dtype(x.dtype).itemsize))
    replicated.sort(key=lambda e: -e[1])
    return ShardingPlan(devices=trainer.mesh.devices.size, mesh=dict(trainer.mesh.shape),
                        total_param_bytes=total, param_bytes=params, opt_bytes=opt,
                        other_state_bytes=other, batch_bytes=batch, replicated=replicated[:top])


def compile_train_step(trainer, batch_shapes: dict[str, jax.ShapeDtypeStruct],
                       top: int = 5) -> ShardingPlan:
    """`plan`, plus the compiled train step's own per-device argument size (abstract inputs:
    nothing is allocated)."""
    result = plan(trainer, batch_shapes, top)
    start = time.perf_counter()
    compiled = trainer.lower_train_step(batch_shapes).compile()
    result.compile_seconds = time.perf_counter() - start
    result.compiled_argument_bytes = int(compiled.memory_analysis().argument_size_in_bytes)
    state_shardings = compiled.input_shardings[0][0]
    result.compiled_state_bytes = _tree_shard_bytes(trainer.abstract_state, state_shardings)
    return result
