"""`moetx.tools.plan` and `moetx.trainer.step_plan`: a train step planned on paper agrees with
the model's own counts, with the collectives XLA compiles, and with a step measured here.

The collective checks compile tiny models on 8 simulated devices and read the program's
collectives (`step_plan.hlo_collectives`, loop trip counts applied). At these toy sizes XLA's
partitioner sometimes prefers moving activations to the planned pattern: on a (2, 2, 2) mesh a
MoE layer's expert activations are gathered across `data` (instead of all-reducing the expert
gradients there) and its groups re-laid with collective-permutes, so that case is held to the
total only; a (1, 4, 2) mesh shows the planned all-to-all and reductions kind by kind.
"""

import dataclasses
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import models, transformer
from moetx.moe import layers as moe_layers
from moetx.lm import costs as transformer_costs
from moetx.tools import plan as plan_tool
from moetx.trainer import metrics, partitioning, sharding_plan, step_plan
from moetx.util import platform as platform_lib
from tests.conftest import count_params_from_shapes, make_trainer

V5P = step_plan.DEVICES["tpu-v5p"]


def _decoder(scan_layers=False, moe=None, **kw):
    cfg = transformer.TransformerConfig(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                                        mlp_dim=64, num_decoder_layers=2, moe=moe,
                                        scan_layers=scan_layers, **kw)
    return models.DecoderOnlyModel(cfg)


def _moe():
    return moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, sparse_every=2,
                                group_size=16)


def _batch(trainer):
    return {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in trainer.input_shapes.items()}


def _compiled_plan(model, mesh_shape, batch_size, length, num_microbatches=1, fsdp=False):
    trainer = make_trainer(model, mesh_shape, batch_size=batch_size, length=length,
                           num_microbatches=num_microbatches, fsdp=fsdp)
    costs = transformer_costs.activation_costs(model, dict(trainer.mesh.shape), trainer.rules,
                                               trainer.input_shapes, num_microbatches,
                                               V5P.platform)
    with platform_lib.trace_for(V5P.platform):  # as the tool: traced for the TPU
        result = step_plan.plan_step(trainer, _batch(trainer), V5P, costs.collectives,
                                     costs.activation_bytes, compile=True)
    assert result.unknown_trip_counts == 0
    return (step_plan.totals_by_kind(result.collectives),
            step_plan.totals_by_kind(result.compiled_collectives), result)


def test_parameter_count_and_flops_are_the_models_own():
    """The plan counts the parameters `eval_shape` of the model's init gives and the FLOPs of
    the model's own `flops_per_step`; for a MoE encoder-decoder, so expert kernels count
    whole in parameters and by k/E in FLOPs."""
    moe = moe_layers.MoeConfig(num_experts=4, num_selected_experts=2, sparse_every=2,
                               group_size=32, extra_mlp=True)
    cfg = transformer.TransformerConfig(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                                        mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                                        moe=moe)
    model = models.EncoderDecoderModel(cfg)
    lengths = {"inputs": 32, "targets": 16}
    result, costs = plan_tool.plan(model, (2, 2, 2), 8, lengths, V5P)
    shapes = model.input_shapes(8, lengths)
    params = nn.unbox(jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), shapes))["params"])
    assert result.params == count_params_from_shapes(model)
    assert result.params == metrics.count_params(params)
    assert result.flops_per_step == model.flops_per_step(params, shapes) > 0
    dense_flops = 6.0 * 8 * (32 * metrics.matmul_params(params["encoder"])
                             + 16 * metrics.matmul_params(params["decoder"]))
    assert result.flops_per_step < dense_flops  # experts count by k/E = 1/2 in the FLOPs
    assert costs is not None and costs.activation_bytes > 0


def test_collective_bytes_match_the_compiled_program_dense():
    """A scanned dense decoder on a (2, 2, 2) mesh with 2 microbatches (two nested loops,
    their trip counts applied): the data-parallel gradient reduction (once per microbatch)
    and the tensor-parallel all-reduces XLA emits equal the analytic ones within 2%. What is
    left: the softmax statistics over the vocab-sharded logits (reduced over `model`) and the
    optimizer's scalars (over the batch axes), which the plan does not count. No FSDP gather
    and no all-to-all on either side."""
    analytic, compiled, result = _compiled_plan(_decoder(scan_layers=True), (2, 2, 2), 16, 32,
                                                num_microbatches=2)
    for kind in (step_plan.DATA_PARALLEL_REDUCE, step_plan.MODEL_PARALLEL_ALL_REDUCE):
        assert analytic[kind] > 0
        assert compiled[kind] == pytest.approx(analytic[kind], rel=0.02), (kind, compiled)
    for kind in (step_plan.FSDP_ALL_GATHER, step_plan.FSDP_REDUCE_SCATTER, step_plan.ALL_TO_ALL):
        assert analytic[kind] == compiled[kind] == 0
    assert result.activation_source == "compiled temp" and result.activation_bytes > 0


def test_fsdp_compiles_to_the_planned_traffic():
    """Under FSDP (parameters' `embed` over the batch axes) on a (4, 1, 2) mesh the compiled
    step gathers the weights and reduces their gradients as planned: the gradient reductions
    (XLA:CPU emits FSDP's reduce-scatter as an all-reduce) within 5% of the plan's data-parallel
    reduction plus reduce-scatter, the weight gathers at most the plan's forward + backward
    gathers (XLA keeps the forward's gathered weights for the backward), the tensor-parallel
    all-reduces within 2%. When the activation constraints were skipped (steps traced under
    `with mesh:` alone, before `partitioning.use_mesh`), XLA re-laid the batch out along
    `embed` instead: 5.6x the plan's bytes for `models/decoder_small.gin` at batch 16 x 512."""
    analytic, compiled, _ = _compiled_plan(_decoder(), (4, 1, 2), 16, 32, fsdp=True)
    planned_reduction = (analytic[step_plan.DATA_PARALLEL_REDUCE]
                         + analytic[step_plan.FSDP_REDUCE_SCATTER])
    compiled_reduction = (compiled[step_plan.DATA_PARALLEL_REDUCE]
                          + compiled[step_plan.FSDP_REDUCE_SCATTER])
    assert analytic[step_plan.FSDP_REDUCE_SCATTER] > 0
    assert compiled_reduction == pytest.approx(planned_reduction, rel=0.05), compiled
    assert 0 < compiled[step_plan.FSDP_ALL_GATHER] <= analytic[step_plan.FSDP_ALL_GATHER]
    assert compiled[step_plan.MODEL_PARALLEL_ALL_REDUCE] == pytest.approx(
        analytic[step_plan.MODEL_PARALLEL_ALL_REDUCE], rel=0.02)
    assert compiled[step_plan.ALL_TO_ALL] == 0


def test_collective_bytes_match_the_compiled_program_moe():
    """A MoE decoder (4 experts, top-2, every 2nd layer) on a (1, 4, 2) mesh: the expert
    all-to-all (dispatch and combine, forward and backward), the gradient reduction and the
    tensor-parallel all-reduces match XLA's kind by kind. The all-to-all is 15% over the plan
    here: XLA also re-lays two small router-side gradients (the combine weights) between the
    layouts, <float32>[groups, group size, experts] tensors the plan leaves out (at ST-MoE's
    sizes they are under 1% of the expert buffers)."""
    analytic, compiled, _ = _compiled_plan(_decoder(moe=_moe()), (1, 4, 2), 8, 16)
    assert analytic[step_plan.ALL_TO_ALL] > 0
    assert compiled[step_plan.ALL_TO_ALL] == pytest.approx(analytic[step_plan.ALL_TO_ALL],
                                                           rel=0.2)
    assert compiled[step_plan.DATA_PARALLEL_REDUCE] == pytest.approx(
        analytic[step_plan.DATA_PARALLEL_REDUCE], rel=0.05)
    assert compiled[step_plan.MODEL_PARALLEL_ALL_REDUCE] == pytest.approx(
        analytic[step_plan.MODEL_PARALLEL_ALL_REDUCE], rel=0.05)
    # All-gathers over the batch axes of a run without FSDP: only the router's top-k inputs.
    assert compiled[step_plan.FSDP_ALL_GATHER] < 0.05 * sum(compiled.values())


def test_collective_bytes_of_a_moe_on_a_2_2_2_mesh_match_in_total():
    """On a (2, 2, 2) mesh XLA partitions the tiny MoE layer its own way (see the module
    docstring): kind by kind the figures differ by up to 2x, but the tensor-parallel
    all-reduces stay within 15% and the bytes of all collectives within 25% of the plan."""
    analytic, compiled, _ = _compiled_plan(_decoder(moe=_moe()), (2, 2, 2), 8, 16)
    assert compiled[step_plan.MODEL_PARALLEL_ALL_REDUCE] == pytest.approx(
        analytic[step_plan.MODEL_PARALLEL_ALL_REDUCE], rel=0.15)
    assert sum(compiled.values()) == pytest.approx(sum(analytic.values()), rel=0.25)


def test_auto_dispatch_is_planned_for_the_planned_device():
    """MoE's default `dispatch='auto'` is planned as the device would run it: a TPU plan holds
    the masked path's one-hot dispatch/combine tensors (its memory equals an explicit 'masked'
    config's), a CPU plan the scatter path's, though both are traced on this CPU."""
    shapes = {"decoder_input_tokens": (8, 16)}
    mesh, rules = {"data": 1, "expert": 1, "model": 1}, partitioning.standard_logical_axis_rules()

    def memory(dispatch, platform):
        model = _decoder(moe=dataclasses.replace(_moe(), dispatch=dispatch))
        return transformer_costs.activation_costs(model, mesh, rules, shapes, 1,
                                                  platform).activation_bytes

    assert _moe().dispatch == "auto"
    assert dataclasses.replace(V5P, kind=step_plan.CPU).platform == "cpu"
    assert (V5P.platform, step_plan.DEVICES["h100"].platform) == ("tpu", "gpu")
    assert memory("auto", "tpu") == memory("masked", "cpu") > memory("scatter", "tpu")
    assert memory("auto", "cpu") == memory("scatter", "tpu")


def test_the_tool_traces_auto_dispatch_for_the_planned_device(monkeypatch):
    """`plan` for a TPU, run on this CPU: every 'auto' resolution in its traces (the
    initialisation, the activation model, the compiled step) gives the TPU's masked path."""
    resolved = []

    def spy(cfg, platform=None, resolve=moe_layers.resolve_dispatch):
        resolved.append(resolve(cfg, platform))
        return resolved[-1]

    monkeypatch.setattr(moe_layers, "resolve_dispatch", spy)
    plan_tool.plan(_decoder(moe=_moe()), (1, 1, 1), 4, 16, V5P, compile=True)
    assert len(resolved) >= 3 and set(resolved) == {"masked"}, resolved


def test_one_device_moves_nothing():
    """On a 1-device mesh every collective is zero: in the plan of a MoE model, and in the
    plan and the compiled program of a dense one; the step time is the compute time."""
    result, _ = plan_tool.plan(_decoder(moe=_moe()), (1, 1, 1), 4, 16, V5P)
    assert all(v == 0 for v in step_plan.totals_by_kind(result.collectives).values())
    assert result.communication_seconds == 0
    assert result.serial_seconds == result.overlapped_seconds == result.compute_seconds > 0
    analytic, compiled, _ = _compiled_plan(_decoder(scan_layers=True), (1, 1, 1), 4, 16)
    assert all(v == 0 for v in analytic.values()), analytic
    assert all(v == 0 for v in compiled.values()), compiled


def test_estimated_step_time_is_within_2x_of_a_measured_step_on_cpu():
    """On `cpu:1` (this machine's measured 2048^2 matmul rate, the measured compute
    efficiency) the plan's step time is within 2x of a train step measured here, for a
    decoder-only LM of d_model 256, d_ff 512, 2 layers, batch 8 x 128 (2026-12-05, median
    rounds with the efficiency at 0.5: idle, 0.19 s measured vs 0.13 s estimated; beside a
    process multiplying matrices, 0.27 s vs 0.17 s; beside two, 0.22 s vs 0.11 s, 2.01x. At
    0.4 those estimates are 1.25x longer).

    Each round measures the matmul rate and then a step, back to back, and compares the step
    with the estimate from that round's rate; the median round counts. A rate measured in a
    quiet moment beside a step slowed by another process (the suite's other worker) made the
    ratio 2.1 once (0.227 s measured vs 0.107 s estimated)."""
    cfg = transformer.TransformerConfig(vocab_size=2048, emb_dim=256, num_heads=4, head_dim=64,
                                        mlp_dim=512, num_decoder_layers=2)
    model = models.DecoderOnlyModel(cfg)
    trainer = make_trainer(model, (1, 1, 1), batch_size=8, length=128)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    b, length = trainer.input_shapes["decoder_input_tokens"]
    batch = {"decoder_input_tokens": rng.integers(1, 2048, (b, length)),
             "decoder_target_tokens": rng.integers(1, 2048, (b, length)),
             "decoder_loss_weights": np.ones((b, length)),
             "decoder_segment_ids": np.ones((b, length)),
             "decoder_positions": np.tile(np.arange(length), (b, 1))}
    batch = trainer.to_global({k: v.astype(np.int32) for k, v in batch.items()})
    state, sums = trainer.train_step(state, batch)
    jax.block_until_ready(sums)
    device = step_plan.device_spec("cpu", 1)
    rounds = []
    for _ in range(3):
        peak = metrics.measured_peak_flops_per_device.__wrapped__(2048, 2)  # not the cached one
        start = time.perf_counter()
        state, sums = trainer.train_step(state, batch)
        jax.block_until_ready(sums)
        measured = time.perf_counter() - start
        estimated = step_plan.plan_step(trainer, _batch(trainer), dataclasses.replace(
            device, peak_flops=peak)).serial_seconds
        rounds.append((measured / estimated, measured, estimated, peak))
    ratio = sorted(rounds)[1]  # the median round
    assert 0.5 < ratio[0] < 2.0, rounds


def test_the_command_prints_a_table_and_one_json_line(capsys, clean_gin):
    status = plan_tool.main([
        "--gin_file=models/t5_tiny.gin", "--gin.MESH_SHAPE=(2, 2, 2)", "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--devices=h100:8",
        "--no_compile", "--compute_efficiency=0.5"])
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    assert any(line.startswith("per device: params") for line in out)
    result = json.loads(out[-1])
    assert result["devices"] == 8 and result["device"]["kind"] == "h100"
    assert result["device"]["compute_efficiency"] == 0.5
    assert result["collective_bytes"]["model_parallel_all_reduce"] > 0
    assert result["activation_source"] == "analytic"
    assert 0 < result["mfu_serial"] <= result["mfu_overlapped"] <= 0.5


@pytest.mark.parametrize("argv,message", [
    (["--devices=tpu-v9:8"], "unknown device kind 'tpu-v9'"),
    (["--devices=tpu-v5p"], "expected <kind>:<count>"),
    (["--gin.MESH_SHAPE=(2, 2, 2)", "--devices=tpu-v5p:4"], "has 8 devices but --devices"),
    (["--gin.MESH_SHAPE=(8, 1, 1)", "--gin.BATCH_SIZE=12", "--devices=tpu-v5p:8"],
     "not divisible by the 8 data-parallel shards"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys, clean_gin):
    status = plan_tool.main(["--gin_file=models/t5_tiny.gin", "--no_compile"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("moetx: error:") and message in err[0], err


def test_hlo_groups_are_read_in_every_replica_group_syntax():
    """The replica-group forms XLA prints (explicit lists, iota with a transpose, named mesh
    axes with device ids) name the same mesh axes."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2),
                             ("data", "expert", "model"))
    rules = (("batch", ("data", "expert")),)
    lines = [
        "%a = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={{0,1},{2,3},{4,5},{6,7}}",
        "%b = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups=[2,4]<=[4,2]T(1,0)",
        "%c = f32[8]{0} all-gather(f32[4]{0} %x), replica_groups=mesh['axis_0'=4,"
        "'axis_1'=2] {'axis_0'}, dimensions={0}",
        "%d = (f32[2]{0}, f32[2]{0}) all-to-all(%x, %y), replica_groups=mesh['axis_0'=2,"
        "'axis_1'=2,'axis_2'=2] {'axis_1'}",
        "%e = f32[2]{0} reduce-scatter(f32[4]{0} %x), replica_groups=mesh['axis_0'=2,"
        "'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, dimensions={0}",
    ]
    text = "ENTRY %main (x: f32[4]) -> f32[4] {\n" + "\n".join("  " + l for l in lines) + "\n}\n"
    found, unknown = step_plan.hlo_collectives(text, mesh, rules)
    got = {(c.op, c.axes): (c.operand_bytes, c.kind) for c in found}
    assert unknown == 0
    assert got == {
        ("all-reduce", ("model",)): (16, step_plan.MODEL_PARALLEL_ALL_REDUCE),
        ("all-reduce", ("data", "expert")): (16, step_plan.DATA_PARALLEL_REDUCE),
        ("all-gather", ("data", "expert")): (8, step_plan.FSDP_ALL_GATHER),
        ("all-to-all", ("expert",)): (16, step_plan.ALL_TO_ALL),
        ("reduce-scatter", ("data", "expert")): (32, step_plan.FSDP_REDUCE_SCATTER),
    }


def test_fsdp_gathers_every_sharded_parameter_but_not_the_experts_over_their_axis():
    """Under FSDP rules a dense kernel's shard is gathered over (data, expert) twice per step
    (forward and backward) and its gradient reduce-scattered there; an expert kernel sits on
    `expert` by design (the activations come to it), so it is gathered over `data` only."""
    trainer = make_trainer(_decoder(moe=_moe()), (2, 2, 2), fsdp=True, batch_size=8, length=16)
    found = {(c.kind, c.axes): c for c in step_plan.parameter_collectives(trainer)}
    experts = trainer.abstract_state.params["decoder"]["layers_1"]["mlp"]["expert"]
    expert_shardings = trainer.state_shardings.params["decoder"]["layers_1"]["mlp"]["expert"]
    expert_bytes = sum(sharding_plan.shard_bytes(x.shape, x.dtype, s) for x, s in zip(
        jax.tree_util.tree_leaves(experts), jax.tree_util.tree_leaves(expert_shardings)))
    gather_data = found[(step_plan.FSDP_ALL_GATHER, ("data",))]
    assert gather_data.operand_bytes == 2 * expert_bytes and gather_data.count == 2 * 3
    assert found[(step_plan.FSDP_REDUCE_SCATTER, ("data",))].operand_bytes == 2 * expert_bytes
    dense = found[(step_plan.FSDP_ALL_GATHER, ("data", "expert"))]
    scatter = found[(step_plan.FSDP_REDUCE_SCATTER, ("data", "expert"))]
    assert scatter.operand_bytes == 4 * dense.operand_bytes / 2  # whole gradient vs 2 shards
    assert not any(c.kind == step_plan.FSDP_ALL_GATHER and "expert" in c.axes
                   and "data" not in c.axes for c in found.values())


def test_groups_across_nodes_use_the_slow_link():
    """On 32 nodes of 8 H100s (mesh (32, 1, 8)) a reduction over `model` stays on NVLink and
    one over `data` crosses InfiniBand; a TPU v4 group beyond one 4096-chip pod needs a DCN
    figure, and says so."""
    mesh = {"data": 32, "expert": 1, "model": 8}
    h100 = step_plan.DEVICES["h100"]
    over = lambda axis, n: [step_plan.Collective(  # noqa: E731
        step_plan.DATA_PARALLEL_REDUCE, "all-reduce", (axis,), n, 1e9)]
    nvlink = step_plan.communication_seconds(over("model", 8), mesh, h100)
    infiniband = step_plan.communication_seconds(over("data", 32), mesh, h100)
    assert nvlink[step_plan.DATA_PARALLEL_REDUCE] == pytest.approx(2 * 7 / 8 * 1e9 / 450e9)
    assert infiniband[step_plan.DATA_PARALLEL_REDUCE] == pytest.approx(2 * 31 / 32 * 1e9 / 50e9)
    with pytest.raises(ValueError, match="--dcn_bandwidth"):
        step_plan.communication_seconds(over("data", 8192), {"data": 8192, "expert": 1,
                                                             "model": 1},
                                        step_plan.DEVICES["tpu-v4"])
