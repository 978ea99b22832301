"""Scanned layer stacks (`TransformerConfig.scan_layers`): their layout and the conversion of
parameter trees between scanned and unscanned (T5X-named) forms.

Unscanned, a stack holds one subtree per layer, `decoder/layers_{i}/...` (T5X / flaxformer
names, which the T5X and Hugging Face converters read and write). Scanned, `flax.linen.scan`
runs one step per *block* of identical layers and the stack holds one subtree whose leaves carry
a leading block axis (logical axis name `layers`, replicated by the partitioning rules):

    dense (block of 1)    decoder/layers/<layer params>                 [num_layers, ...]
    MoE every k-th layer  decoder/layers/sublayer_{j}/<layer params>    [num_layers / k, ...]

In a block of k > 1 layers, `sublayer_{j}` of block b is layer `b * k + j`; the last sublayer
(j = k - 1) is the sparse one, as `MoeConfig.is_sparse` puts sparse layers at i % k == k - 1.
A depth that is not a multiple of k cannot be scanned (`check_scannable` raises).

The same layout applies to everything a scanned stack creates: the `cache` collection of cached
decoding (`decoder/layers/self_attention/cached_key <T>[num_layers, batch, heads, length, d_kv]`,
`cache_index <int32>[num_layers]`) and the MoE layers' sown `intermediates`.

`scan_params` and `unscan_params` are pure functions over nested mappings of arrays (numpy or
jax; jax arrays stay jax arrays, so they work inside `jit`); `to_layout` converts whichever
layout a tree is in to the one a config wants, `match_layout` to the layout of another tree.
The checkpoint tools use them at their edges: `moetx.convert.formats.convert` reads any source
in the target model's layout and always writes T5X and Hugging Face checkpoints unscanned (with
the Adafactor slots), and `InitFromCheckpoint` restores either layout into either.

Gradients are those of the unrolled stack, and the optimizers treat the stacked `layers` axis as
a batch of independent parameters (Adafactor's moments, parameter scale and update clipping are
per layer, as T5X's), so training is step for step the same in the two layouts.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The subtree name of a scanned stack and the logical axis name of its leading (block) axis.
SCANNED = "layers"
LAYER_AXIS = "layers"
STACKS = ("encoder", "decoder")
_LAYER_RE = re.compile(r"layers_(\d+)$")
_SUBLAYER_RE = re.compile(r"sublayer_(\d+)$")


def sublayer_name(j: int) -> str:
    """The name of the j-th layer inside a scanned block of several layers."""
    return f"sublayer_{j}"


def block_size(cfg: Any, stack: str) -> int:
    """Layers per scan step of `stack` ('encoder' or 'decoder') of a `TransformerConfig`: the
    MoE interval `sparse_every` when the stack has sparse layers, else 1."""
    moe = cfg.moe
    if stack == "encoder" and getattr(cfg, "encoder_moe", None) is not None:
        moe = cfg.encoder_moe
    if moe is None or moe.sparse_every <= 1:
        return 1
    return int(moe.sparse_every)


def num_layers(cfg: Any, stack: str) -> int:
    return cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers


def check_scannable(cfg: Any) -> None:
    """Raises ValueError unless every stack's depth is a multiple of its block size."""
    for stack in STACKS:
        depth, k = num_layers(cfg, stack), block_size(cfg, stack)
        if depth and depth % k:
            raise ValueError(
                f"scan_layers=True scans the {stack} in blocks of {k} layers (MoE every "
                f"{k}-th layer), but its depth {depth} is not a multiple of {k}; use a depth "
                f"that is, or scan_layers=False.")


def is_scanned(tree: Mapping[str, Any]) -> bool:
    """Whether a parameter (or cache / intermediates) tree holds a scanned stack."""
    return any(isinstance(tree.get(s), Mapping) and SCANNED in tree[s] for s in STACKS)


def _stack(leaves: list[Any]) -> Any:
    if any(isinstance(x, jax.Array) for x in leaves):
        return jnp.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])


def _stack_trees(subtrees: list[Any], where: str) -> Any:
    try:
        return jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *subtrees)
    except ValueError as e:
        raise ValueError(f"Cannot scan {where}: its layers differ in structure ({e}).") from None


def _layer_indices(stack: Mapping[str, Any], where: str) -> list[int]:
    ids = sorted(int(m.group(1)) for k in stack if (m := _LAYER_RE.match(str(k))))
    if ids != list(range(len(ids))):
        raise ValueError(f"{where} holds layers {ids}; expected layers_0 ... "
                         f"layers_{len(ids) - 1}.")
    return ids


def scan_params(tree: Mapping[str, Any], cfg: Any) -> dict:
    """Unscanned -> scanned: each stack's `layers_{i}` subtrees become one `layers` subtree with
    a leading block axis (module docstring), in blocks of `block_size(cfg, stack)` (`cfg` a
    `TransformerConfig`, or a mapping {stack: block size}, as `block_sizes` gives). Everything
    else is kept as it is; a tree that is already scanned is returned unchanged.

    Raises:
      ValueError: a stack's depth is not a multiple of its block size, or its layers are not
        `layers_0 ... layers_{n-1}` of one structure.
    """
    if is_scanned(tree):
        return dict(tree)
    out = dict(tree)
    for name in STACKS:
        stack = tree.get(name)
        if not isinstance(stack, Mapping):
            continue
        ids = _layer_indices(stack, name)
        if not ids:
            continue
        k = int(cfg.get(name, 1)) if isinstance(cfg, Mapping) else block_size(cfg, name)
        if len(ids) % k:
            raise ValueError(f"Cannot scan {name}: {len(ids)} layers are not a multiple of the "
                             f"block size {k} (MoE every {k}-th layer).")
        new = {key: v for key, v in stack.items() if not _LAYER_RE.match(str(key))}
        layers = [stack[f"layers_{i}"] for i in ids]
        if k == 1:
            new[SCANNED] = _stack_trees(layers, name)
        else:
            new[SCANNED] = {sublayer_name(j): _stack_trees(layers[j::k], name)
                            for j in range(k)}
        out[name] = new
    return out


def unscan_params(tree: Mapping[str, Any]) -> dict:
    """Scanned -> unscanned (T5X names `layers_{i}`), the inverse of `scan_params`; the block
    size is read from the tree itself (its `sublayer_{j}` subtrees), so no config is needed. An
    unscanned tree is returned unchanged."""
    out = dict(tree)
    for name in STACKS:
        stack = tree.get(name)
        if not isinstance(stack, Mapping) or SCANNED not in stack:
            continue
        scanned = stack[SCANNED]
        subs = {int(m.group(1)): key for key in scanned
                if (m := _SUBLAYER_RE.match(str(key)))}
        if not subs or len(subs) != len(scanned):
            subs = {0: None}  # a block of one layer: the layer's own subtree
        # The highest sublayer is the block's last layer (the sparse one), even in a tree that
        # holds only some sublayers (the sown MoE metrics hold only the sparse one).
        k = max(subs) + 1
        blocks = {j: scanned if key is None else scanned[key] for j, key in subs.items()}
        lengths = {np.shape(x)[0] for b in blocks.values() for x in jax.tree_util.tree_leaves(b)}
        if len(lengths) > 1:
            raise ValueError(f"{name}/{SCANNED}: the leaves' leading (layer) axes differ: "
                             f"{sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        new = {key: v for key, v in stack.items() if key != SCANNED}
        for b in range(n):
            for j, block in sorted(blocks.items()):
                new[f"layers_{b * k + j}"] = jax.tree_util.tree_map(lambda x: x[b], block)
        out[name] = new
    return out


def to_layout(tree: Mapping[str, Any], cfg: Any) -> dict:
    """`tree` in the layout `cfg.scan_layers` asks for, whichever layout it is in."""
    if getattr(cfg, "scan_layers", False):
        return scan_params(tree, cfg)
    return unscan_params(tree)


def block_sizes(template: Mapping[str, Any]) -> dict[str, int]:
    """{stack: layers per scan step} of a scanned tree (its `sublayer_{j}` count, else 1)."""
    out = {}
    for name in STACKS:
        stack = template.get(name)
        if isinstance(stack, Mapping) and isinstance(stack.get(SCANNED), Mapping):
            subs = [k for k in stack[SCANNED] if _SUBLAYER_RE.match(str(k))]
            out[name] = len(subs) if subs and len(subs) == len(stack[SCANNED]) else 1
    return out


def match_layout(tree: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
    """`tree` (scanned or not) in the layout of `template` (a tree of the target model: arrays,
    shapes or boxes; only its structure is read), e.g. a checkpoint's parameters for the model
    restoring them. Trees without layer stacks are returned as they are."""
    if is_scanned(template):
        return scan_params(tree, block_sizes(template))
    return unscan_params(tree)


__all__ = ["LAYER_AXIS", "SCANNED", "STACKS", "block_size", "block_sizes", "check_scannable",
           "is_scanned", "match_layout", "num_layers", "scan_params", "sublayer_name",
           "to_layout", "unscan_params"]
