"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes a Mixture-of-Experts one.

Every sparse layer's expert kernels start as copies of that layer's dense MLP kernels, tiled along
the expert axis (`mlp/wi_0/kernel [d, f]` -> `mlp/expert/wi_0/kernel [E, d, f]`); the router is
freshly initialised; every other parameter is copied unchanged. Optimizer state is not carried:
the upcycled model starts with a fresh optimizer, as T5X's `UpcycleCheckpointer` does.

Because all experts start identical, an upcycled layer with renormalised top-k gates and no
dropped tokens computes exactly the dense layer's output (tests/convert/test_upcycle.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moetx.util import trees
from moetx.convert.errors import ConversionError


def upcycle_params(dense_params: Any, moe_template: Any) -> dict:
    """Dense parameters -> MoE parameters shaped like `moe_template`.

    Args:
      dense_params: the dense model's parameter tree (arrays).
      moe_template: the MoE model's freshly initialised parameter tree (arrays; its router
        weights are kept as the fresh router).
    Returns:
      The MoE parameter tree (numpy arrays).
    Raises:
      ConversionError listing every MoE parameter that has no dense source of the right shape
      and every dense parameter left unused.
    """
    dense = trees.flatten(dense_params)
    used: set[str] = set()
    out: dict[str, Any] = {}
    missing: dict[str, tuple] = {}
    mismatched: dict[str, tuple[tuple, tuple]] = {}
    for path, target in trees.flatten(moe_template).items():
        parts = path.split("/")
        if "router" in parts:
            out[path] = np.asarray(target)  # fresh router
            continue
        if "expert" in parts:
            parts.remove("expert")  # .../mlp/expert/wi_0/kernel -> .../mlp/wi_0/kernel
            src = "/".join(parts)
            if src not in dense:
                missing[src] = tuple(target.shape[1:])
                continue
            if tuple(dense[src].shape) != tuple(target.shape[1:]):
                mismatched[src] = (tuple(target.shape[1:]), tuple(dense[src].shape))
                continue
            out[path] = np.repeat(np.asarray(dense[src])[None], target.shape[0], axis=0)
            used.add(src)
            continue
        if path not in dense:
            missing[path] = tuple(target.shape)
            continue
        if tuple(dense[path].shape) != tuple(target.shape):
            mismatched[path] = (tuple(target.shape), tuple(dense[path].shape))
            continue
        out[path] = np.asarray(dense[path])
        used.add(path)
    unused = {p: tuple(v.shape) for p, v in dense.items() if p not in used}
    if missing or mismatched or unused:
        raise ConversionError(
            "Cannot upcycle: the dense checkpoint does not match the MoE model (expert kernels "
            "are matched per expert against the dense MLP).", unexpected=unused, missing=missing,
            mismatched=mismatched,
            fix="build the MoE model from the dense model's config plus a MoeConfig.")
    return trees.unflatten(out)


__all__ = ["upcycle_params"]
