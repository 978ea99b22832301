"""The per-device bytes a train step holds: the plan from the shardings equals what XLA compiles,
and a weight left replicated by the rules shows up. The 256-device lowering of T5.1.1-XXL and
ST-MoE-32B runs `benchmarks/sharding_plan.py` (slow)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from moetx.lm import models, transformer
from moetx.moe import layers as moe_layers
from moetx.trainer import sharding_plan
from tests.conftest import make_trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny_moe():
    moe = moe_layers.MoeConfig(num_experts=8, num_selected_experts=2, sparse_every=2,
                               group_size=32)
    cfg = transformer.TransformerConfig(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                                        mlp_dim=64, num_decoder_layers=2, moe=moe)
    return models.DecoderOnlyModel(cfg)


def _batch(trainer):
    return {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in trainer.input_shapes.items()}


def test_compiled_argument_bytes_equal_the_plan_on_a_data_expert_model_mesh():
    trainer = make_trainer(_tiny_moe(), (2, 2, 2), fsdp=True)
    result = sharding_plan.compile_train_step(trainer, _batch(trainer))
    assert result.compiled_state_bytes == result.planned_state_bytes
    assert result.matches(), result
    # Experts over `expert`, their embed over `data` (FSDP), their mlp over `model`: 1/8 each.
    wi = trainer.abstract_state.params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
    sharding = trainer.state_shardings.params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"][
        "kernel"]
    assert sharding_plan.shard_bytes(wi.shape, wi.dtype, sharding) == wi.size * 4 // 8
    assert all(nbytes < 4096 for _, nbytes in result.replicated), result.replicated


def test_a_weight_the_rules_leave_replicated_is_reported():
    """Without the `expert` rule the expert kernels are held whole on every expert shard: the
    planned bytes grow and the kernels head the `replicated` list."""
    trainer = make_trainer(_tiny_moe(), (1, 8, 1))
    good = sharding_plan.plan(trainer, _batch(trainer))
    trainer.state_shardings = jax.tree_util.tree_map(
        lambda s: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()),
        trainer.state_shardings)
    bad = sharding_plan.plan(trainer, _batch(trainer))
    assert bad.param_bytes == bad.total_param_bytes > good.param_bytes
    assert bad.replicated[0][0].endswith("kernel") and "expert" in bad.replicated[0][0] or (
        "token_embedder" in bad.replicated[0][0]), bad.replicated


@pytest.mark.slow
@pytest.mark.parametrize("gin_file,mesh", [("models/t5_1_1_xxl.gin", "16,1,16"),
                                           ("models/st_moe_32b.gin", "4,64,1")])
def test_large_models_lower_on_256_simulated_devices_as_planned(gin_file, mesh):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sharding_plan.py"), f"--gin_file={gin_file}",
         f"--mesh={mesh}", "--fsdp"],
        capture_output=True, text=True, cwd=ROOT, timeout=3000,
        env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 256
    assert result["compiled_state_bytes"] == result["planned_state_bytes"]
    assert result["matches_plan"], result
    # Fully sharded: each device holds 1/256 of the parameters (to the small relative-position
    # tables, the only arrays held whole), no expert or embedding weight replicated.
    assert result["param_bytes"] <= 1.001 * result["total_param_bytes"] / 256
    assert all(nbytes <= 64 * 1024 for _, nbytes in result["replicated"]), result["replicated"]
