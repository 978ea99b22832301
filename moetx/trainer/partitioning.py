"""Device mesh, logical axis rules, and the shardings of parameters, state and batches.

Mesh axes are `('data', 'expert', 'model')` (T5X's MoE mesh; dense runs use an expert axis of
size 1). Logical axis names on parameters and activations are mapped onto mesh axes by rules,
as T5X's `standard_logical_axis_rules` does:

  batch -> ('data', 'expert')   vocab, mlp, heads, joined_kv, expert_mlp -> 'model'
  expert -> 'expert'            embed, kv, length, relpos_buckets, layers, unmodeled -> replicated
                                kv_heads, joined_kv_heads (grouped-query K/V) -> replicated

With `fsdp=True`, `embed` also maps to ('data', 'expert') for parameters (ZeRO-3 style), or to
'data' alone where `expert` is taken (expert kernels); a rule whose mesh axes another dimension
of the same array already uses is skipped, so activations stay batch-sharded.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")
LogicalRules = Sequence[tuple[str, Any]]


@gin.configurable
def standard_logical_axis_rules(fsdp: bool = False) -> tuple[tuple[str, Any], ...]:
    """Logical -> mesh axis rules (first matching rule wins; unknown names replicate)."""
    rules = [
        ("batch", ("data", "expert")),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("expert", "expert"),
        ("expert_mlp", "model"),
        # Expert buffers after the all-to-all: groups over `data` only, experts over `expert`.
        ("expert_replicas", "data"),
        ("expert_group", None),
        ("kv", None),
        # Grouped-query K/V (fewer heads than Q): replicated over 'model', so any head count
        # works with any model axis; they are num_heads / num_kv_heads times smaller than Q.
        ("kv_heads", None),
        ("joined_kv_heads", None),
        ("length", None),
        ("relpos_buckets", None),
        # The leading axis of scanned layer stacks (`scan_layers`): every device keeps all
        # layers, as T5X does; the scan slices one layer out of it per step.
        ("layers", None),
        ("unmodeled", None),
        ("conv_window", None),
    ]
    if fsdp:
        # Over every batch-parallel device (data x expert), as T5X's MoE partitioner shards
        # over its data axis; an array whose other dimension already uses `expert` (the expert
        # kernels) falls through to the next rule and shards its embed over `data` alone.
        rules += [("embed", ("data", "expert")), ("embed", "data")]
    else:
        rules.append(("embed", None))
    return tuple(rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """The context steps are traced and run in: JAX's concrete-mesh context (`jax.set_mesh`)
    and the older `with mesh:` one. Flax's logical sharding constraints (`constrain`, i.e.
    `nn.with_logical_constraint`) read the former; under `with mesh:` alone they are silently
    skipped, and XLA's sharding propagation alone decides every activation's layout."""
    with mesh, jax.set_mesh(mesh):
        yield


@gin.configurable
def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'expert', 'model')` mesh over all (global) devices.

    One entry of `mesh_shape` may be -1 and is inferred. The devices are laid out in
    `jax.devices()` order, which groups each process's devices together, so the data axis
    spans processes (data parallelism across hosts, model parallelism within).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape)
    if len(shape) != 3:
        raise ValueError(f"mesh_shape must have 3 entries for axes {MESH_AXES}, got {shape}.")
    if shape.count(-1) > 1:
        raise ValueError(f"At most one mesh dimension may be -1, got {shape}.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh "
                             f"dimensions {shape}.")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh_shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are "
            f"available. Set --gin.make_mesh.mesh_shape so that the product matches (use -1 for "
            f"one axis to infer it).")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_to_mesh_spec(logical: PartitionSpec, rules: LogicalRules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def logical_shardings(logical_tree: Any, mesh: Mesh, rules: LogicalRules,
                      shapes: Any = None) -> Any:
    """Tree of logical `PartitionSpec`s -> tree of `NamedSharding`s on `mesh`.

    With `shapes` (a matching tree of arrays or `ShapeDtypeStruct`s), a dimension whose size
    is not divisible by the mesh axes it maps to is replicated instead (with a warning), e.g.
    4 attention heads on a model axis of 8.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if shapes is None:
        return jax.tree_util.tree_map(
            lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules)),
            logical_tree, is_leaf=is_spec)

    def one(spec, x):
        mesh_spec = list(logical_to_mesh_spec(spec, rules))
        mesh_spec += [None] * (len(x.shape) - len(mesh_spec))
        for i, axes in enumerate(mesh_spec):
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            size = math.prod(mesh.shape[a] for a in names)
            if size > 1 and x.shape[i] % size:
                logging.warning("Replicating dim %d (size %d, logical %r) of a %s array: not "
                                "divisible by mesh axes %s (size %d).", i, x.shape[i],
                                tuple(spec)[i] if i < len(spec) else None, x.shape, names, size)
                mesh_spec[i] = None
        return NamedSharding(mesh, PartitionSpec(*mesh_spec))

    return jax.tree_util.tree_map(one, logical_tree, shapes, is_leaf=is_spec)


def params_logical_axes(boxed_variables: Any) -> Any:
    """Logical `PartitionSpec` of each parameter of `nn.LogicallyPartitioned` variables."""
    return nn.get_partition_spec(boxed_variables)


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int = 2) -> NamedSharding:
    """Batches are sharded on their leading (batch) axis over the data-parallel mesh axes."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh, rules: LogicalRules) -> int:
    """Number of distinct batch shards: the product of the mesh axes `batch` maps to."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return math.prod(mesh.shape[a] for a in axes)


def process_batch_slice(mesh: Mesh, rules: LogicalRules, global_batch_size: int) -> slice:
    """The contiguous rows of the global batch that this process's devices hold.

    With the data axis spanning processes, process i of P holds rows `[i*B/P, (i+1)*B/P)`;
    when the batch is replicated across processes (e.g. a pure model-parallel mesh) every
    process holds all rows.
    """
    sharding = batch_sharding(mesh, rules, 1)
    indices = sharding.devices_indices_map((global_batch_size,))
    local = [indices[d][0] for d in mesh.devices.flat if d.process_index == jax.process_index()]
    start = min(s.start or 0 for s in local)
    stop = max(global_batch_size if s.stop is None else s.stop for s in local)
    return slice(start, stop)


def host_local_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules: LogicalRules,
                               global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's rows of the batch (see `process_batch_slice`) into global
    `jax.Array`s; with one process this is a sharded device_put."""
    out = {}
    for k, v in batch.items():
        sharding = batch_sharding(mesh, rules, v.ndim)
        out[k] = jax.make_array_from_process_local_data(
            sharding, v, (global_batch_size,) + v.shape[1:])
    return out
