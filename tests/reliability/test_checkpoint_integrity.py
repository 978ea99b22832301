"""Checkpoint integrity: a manifest written last, damaged checkpoints moved aside (never
deleted) on resume, and the newest intact one used."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moetx.trainer import checkpoints


def _state(step):
    return {"w": jnp.full((64,), float(step)), "step": jnp.asarray(step)}


def _abstract():
    sharding = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("d",)),
                             PartitionSpec())
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))


def _run_dir(tmp_path, steps=(4, 8)):
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=4, keep=None)
    for step in steps:
        ckpt.save(step, _state(step), {"batches_consumed": step})
    ckpt.close()
    return str(tmp_path)


def _largest_file(ckpt_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(ckpt_dir) for f in fs
             if f != checkpoints.MANIFEST]
    return max(files, key=os.path.getsize)


def _damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "overwrite":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[size // 2] ^= 0xFF
            f.seek(0)
            f.write(data)


def test_a_saved_checkpoint_verifies_and_lists_every_file(tmp_path):
    d = _run_dir(tmp_path)
    assert checkpoints.verify(d, 4) is None and checkpoints.verify(d, 8) is None
    assert os.path.exists(os.path.join(d, "checkpoint_8", checkpoints.MANIFEST))


@pytest.mark.parametrize("how", ["truncate", "overwrite", "delete_metadata", "empty"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, how,
                                                                               capsys):
    d = _run_dir(tmp_path)
    latest = os.path.join(d, "checkpoint_8")
    if how in ("truncate", "overwrite"):
        _damage(_largest_file(latest), how)
    elif how == "delete_metadata":
        for root, _, files in os.walk(latest):
            for f in files:
                if "metadata" in f.lower():
                    os.remove(os.path.join(root, f))
    else:
        for root, dirs, files in os.walk(latest, topdown=False):
            for f in files:
                os.remove(os.path.join(root, f))
            for sub in dirs:
                os.rmdir(os.path.join(root, sub))
    problem = checkpoints.verify(d, 8)
    assert problem, how
    ckpt = checkpoints.Checkpointer(d, save_interval_steps=4, keep=None)
    assert ckpt.latest_intact_step() == 4
    err = capsys.readouterr().err
    assert "checkpoint_8 is damaged" in err and len(err.strip().splitlines()) == 1, err
    moved = [n for n in os.listdir(d) if n.startswith("checkpoint_8.corrupt-")]
    assert len(moved) == 1 and not os.path.exists(latest)
    state, data = ckpt.restore(4, _abstract())
    assert float(state["w"][0]) == 4.0 and data == {"batches_consumed": 4}
    # The run goes on: step 8 is saved again, beside the damaged copy.
    ckpt.save(8, _state(8), {"batches_consumed": 8})
    assert ckpt.latest_intact_step() == 8 and checkpoints.verify(d, 8) is None
    ckpt.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    d = _run_dir(tmp_path, steps=(4,))
    _damage(_largest_file(os.path.join(d, "checkpoint_4")), "truncate")
    ckpt = checkpoints.Checkpointer(d, save_interval_steps=4, keep=None)
    with pytest.raises(ValueError, match="No intact checkpoint"):
        ckpt.latest_intact_step()
    assert any(n.startswith("checkpoint_4.corrupt-") for n in os.listdir(d))


def test_the_check_command_reports_each_checkpoint(tmp_path, capsys):
    from moetx.cli import check_checkpoint

    d = _run_dir(tmp_path)
    assert check_checkpoint.main([d]) == 0
    assert capsys.readouterr().out.splitlines() == ["checkpoint_8: intact", "checkpoint_4: intact"]
    _damage(_largest_file(os.path.join(d, "checkpoint_8")), "overwrite")
    assert check_checkpoint.main([d]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("checkpoint_8: damaged:") and "CRC-32" in out[0]
    assert check_checkpoint.main([d, "--size-only"]) == 0  # same size: only checksums see it
    capsys.readouterr()
    assert check_checkpoint.main([str(tmp_path / "nope")]) == 2


def test_eval_infer_and_convert_refuse_a_damaged_checkpoint(tmp_path):
    """They find checkpoints through resolve_checkpoint, which checks the manifest's sizes."""
    d = _run_dir(tmp_path)
    assert checkpoints.resolve_checkpoint(d) == (d, 8)
    _damage(_largest_file(os.path.join(d, "checkpoint_8")), "truncate")
    with pytest.raises(ValueError, match="checkpoint_8 .* is damaged .*moetx-check-checkpoint"):
        checkpoints.resolve_checkpoint(d)
    with pytest.raises(ValueError, match="is damaged"):
        checkpoints.resolve_checkpoint(os.path.join(d, "checkpoint_8"))
    assert checkpoints.resolve_checkpoint(d, 4) == (d, 4)


def test_a_checkpoint_of_another_model_names_the_first_difference(tmp_path):
    import jax
    import jax.numpy as jnp

    from moetx.trainer import checkpoints

    ckpt = checkpoints.Checkpointer(str(tmp_path), 1)
    ckpt.save(1, {"step": jnp.asarray(1), "params": {"dense": {"kernel": jnp.ones((4, 8))},
                                                     "norm": {"scale": jnp.ones(4)}}}, {})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(shape, extra=False):
        params = {"dense": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32,
                                                           sharding=sharding)},
                  "norm": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}}
        if extra:
            params["head"] = {"kernel": jax.ShapeDtypeStruct((8,), jnp.float32,
                                                             sharding=sharding)}
        return {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
                "params": params}

    with pytest.raises(ValueError) as e:
        ckpt.restore(1, abstract((4, 16)))
    assert str(e.value).startswith(f"checkpoint_1 in {tmp_path} was written by another model")
    assert "params/dense/kernel has shape (4, 8) in the checkpoint, (4, 16) in the configured " \
           "model." in str(e.value)
    assert "strict" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="params/head/kernel is not in the checkpoint"):
        ckpt.restore(1, abstract((4, 8), extra=True))


def test_a_checkpoint_without_its_manifest_is_used_unverified(tmp_path):
    """Written before manifests (or by another tool): used when its train state is there,
    reported as unverified; without the state, it is damaged."""
    d = _run_dir(tmp_path)
    os.remove(os.path.join(d, "checkpoint_8", checkpoints.MANIFEST))
    ckpt = checkpoints.Checkpointer(d, save_interval_steps=4, keep=None)
    assert ckpt.latest_intact_step() == 8
    assert checkpoints.check_all(d)[0] == ("checkpoint_8", "unverified (no manifest)")
    state, _ = ckpt.restore(8, _abstract())
    assert float(state["w"][0]) == 8.0
    import shutil

    shutil.rmtree(os.path.join(d, "checkpoint_8", "state"))
    assert checkpoints.verify(d, 8) == "no manifest and no train state"
    ckpt.close()
