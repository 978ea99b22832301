"""Parameter trees as flat dicts: `flatten` turns nested mappings into `{'a/b/c': leaf}` and
`unflatten` turns such a dict back into nested dicts.

A tree is nested mappings (dicts, flax `FrozenDict`s) whose leaves are anything else: numpy or
jax arrays, `jax.ShapeDtypeStruct`s, flax `LogicallyPartitioned` boxes (kept boxed: unbox with
`flax.linen.unbox` first for the arrays), Python scalars. Keys become strings, and a leaf's name
is its keys joined by `sep`, '/' by default, the form parameter names take throughout moetx
(`encoder/layers_0/mlp/wi_0/kernel`).

An empty mapping holds no leaf, so `flatten` drops it unless `keep_empty=True`, which keeps it as
the leaf `{}`; `unflatten` then gives it back (T5X checkpoints hold such empty nodes, and their
round trips must be exact). `walk` and `build` are the same pair over `(path tuple, leaf)`
pairs, for keys that may contain the separator and for streams of leaves.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

Path = tuple[str, ...]


def walk(tree: Mapping[str, Any], keep_empty: bool = False) -> Iterator[tuple[Path, Any]]:
    """Yields `(path, leaf)` for every leaf of `tree`, depth first in the mappings' order; a
    path is the tuple of keys (as strings) from the root to the leaf.

    Raises:
      TypeError: `tree` itself is not a mapping.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"Expected a nested mapping (a parameter tree), found "
                        f"{type(tree).__name__}.")
    yield from _walk(tree, (), keep_empty)


def _walk(node: Mapping[str, Any], prefix: Path, keep_empty: bool) -> Iterator[tuple[Path, Any]]:
    for key, value in node.items():
        path = prefix + (str(key),)
        if not isinstance(value, Mapping):
            yield path, value
        elif value or not keep_empty:
            yield from _walk(value, path, keep_empty)
        else:
            yield path, {}


def flatten(tree: Mapping[str, Any], sep: str = "/", keep_empty: bool = False
            ) -> dict[str, Any]:
    """Nested mappings -> `{'a/b/c': leaf}` (see the module docstring for leaves and `keep_empty`).

    Raises:
      TypeError: `tree` itself is not a mapping.
      ValueError: two leaves get the same name (a key that contains `sep`).
    """
    out: dict[str, Any] = {}
    for path, leaf in walk(tree, keep_empty):
        name = sep.join(path)
        if name in out:
            raise ValueError(f"Two leaves of the tree are both named {name!r}: a key contains "
                             f"the separator {sep!r}; rename the key or flatten with another "
                             "sep.")
        out[name] = leaf
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """`{'a/b/c': leaf}` -> nested dicts, the inverse of `flatten`.

    Raises:
      ValueError: a name is both a leaf and the parent of another leaf ('a/b' and 'a/b/c').
    """
    return build((tuple(name.split(sep)), value) for name, value in flat.items())


def build(items: Iterable[tuple[Path, Any]]) -> dict[str, Any]:
    """Nested dicts from `(path, leaf)` pairs, the inverse of `walk` (an empty dict leaf stays
    an empty node). Takes any iterable, so a stream of leaves is assembled as it comes.

    Raises:
      ValueError: a path is both a leaf and the parent of another leaf.
    """
    out: dict[str, Any] = {}
    leaf_nodes: set[int] = set()  # ids of dicts placed as leaves (kept empty nodes)
    for path, value in items:
        *parents, last = path
        node = out
        for i, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict) or id(node) in leaf_nodes:
                raise ValueError(_clash("/".join(parents[:i + 1]), "/".join(path)))
        if last in node:
            raise ValueError(_clash("/".join(path), "/".join(path) + "/..."))
        node[last] = value
        if isinstance(value, dict):
            leaf_nodes.add(id(value))
    return out


def _clash(leaf: str, child: str) -> str:
    return (f"{leaf!r} is both a leaf and the parent of {child!r}; a flat tree names each leaf "
            "once and no leaf inside another.")


__all__ = ["Path", "build", "flatten", "unflatten", "walk"]
