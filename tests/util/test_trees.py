"""moetx.util.trees: flattening parameter trees to '/'-joined names and back."""

import flax.core
import flax.linen as nn
import jax
import numpy as np
import pytest

from moetx.util import trees

TREE = {"encoder": {"layers_0": {"mlp": {"wi": {"kernel": np.ones((2, 3))}},
                                 "norm": {"scale": np.zeros(3)}}},
        "step": 7}


def test_flatten_names_every_leaf_and_unflatten_inverts_it():
    flat = trees.flatten(TREE)
    assert list(flat) == ["encoder/layers_0/mlp/wi/kernel", "encoder/layers_0/norm/scale", "step"]
    assert flat["encoder/layers_0/mlp/wi/kernel"] is TREE["encoder"]["layers_0"]["mlp"]["wi"][
        "kernel"]  # leaves are the tree's own objects, not copies
    assert trees.unflatten(flat) == {"encoder": {"layers_0": {"mlp": {"wi": {
        "kernel": flat["encoder/layers_0/mlp/wi/kernel"]}}, "norm": {
        "scale": flat["encoder/layers_0/norm/scale"]}}}, "step": 7}
    assert trees.flatten(trees.unflatten(flat)) == flat
    assert trees.flatten(TREE, sep=".")["encoder.layers_0.norm.scale"] is flat[
        "encoder/layers_0/norm/scale"]
    assert trees.unflatten({"a.b": 1}, sep=".") == {"a": {"b": 1}}
    assert list(trees.walk(TREE))[-1] == (("step",), 7)


def test_empty_nodes_are_dropped_unless_kept():
    tree = {"a": {}, "b": {"c": {}, "d": 1}, "e": {"f": {"g": {}}}}
    assert trees.flatten(tree) == {"b/d": 1}
    kept = trees.flatten(tree, keep_empty=True)
    assert kept == {"a": {}, "b/c": {}, "b/d": 1, "e/f/g": {}}
    assert trees.unflatten(kept) == tree
    assert trees.flatten({}) == {} and trees.unflatten({}) == {}


def test_frozen_dicts_are_trees_and_boxes_are_leaves():
    box = nn.LogicallyPartitioned(np.ones((2, 2)), ("embed", "mlp"))
    frozen = flax.core.freeze({"dense": {"kernel": box, "bias": np.zeros(2)}})
    flat = trees.flatten(frozen)
    assert flat["dense/kernel"] is box and set(flat) == {"dense/kernel", "dense/bias"}
    assert isinstance(trees.unflatten(flat)["dense"], dict)
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
    assert trees.flatten(abstract) == {"w": abstract["w"]}
    assert trees.flatten({1: {2: "x"}}) == {"1/2": "x"}  # keys become strings


def test_a_root_that_is_not_a_mapping_is_refused():
    for bad in (np.ones(3), [{"a": 1}], None):
        with pytest.raises(TypeError, match="Expected a nested mapping"):
            trees.flatten(bad)


def test_ambiguous_names_are_refused():
    with pytest.raises(ValueError, match="both named 'a/b'"):
        trees.flatten({"a/b": 1, "a": {"b": 2}})
    with pytest.raises(ValueError, match="'a/b' is both a leaf and the parent of 'a/b/c'"):
        trees.unflatten({"a/b": 1, "a/b/c": 2})
    with pytest.raises(ValueError, match="'a/b' is both a leaf"):
        trees.unflatten({"a/b/c": 2, "a/b": 1})
    with pytest.raises(ValueError, match="'a' is both a leaf"):
        trees.unflatten({"a": {}, "a/b": 1})


def test_walk_and_build_work_on_path_tuples_and_streams():
    tree = {"optimizer": {"target": {"a/b": np.ones(2)}, "state": {"param_states": {}}}}
    pairs = list(trees.walk(tree, keep_empty=True))
    assert [p for p, _ in pairs] == [("optimizer", "target", "a/b"),
                                     ("optimizer", "state", "param_states")]
    rebuilt = trees.build(iter(pairs))  # a generator, consumed once
    assert rebuilt["optimizer"]["state"] == {"param_states": {}}
    assert rebuilt["optimizer"]["target"]["a/b"] is tree["optimizer"]["target"]["a/b"]
    with pytest.raises(ValueError, match="'x/y' is both a leaf"):
        trees.build([(("x", "y"), {}), (("x", "y", "z"), 1)])
