"""benchmarks/profile_vision.py's op families: the moetx side from HLO metadata (the Flax module
path and Python stack of each instruction), the timm side from module types, so that both sides
count the same work in the same family."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_vision as pv  # noqa: E402

STEP = "jit(_train_step_impl)"


@pytest.mark.parametrize("op_name, stack, family", [
    (f"{STEP}/transpose(jvp(CoAtNet))/stage3_block1/attn/qkv/conv_general_dilated", (),
     "attention"),
    (f"{STEP}/jvp(CoAtNet)/stage3_block2/attn/bqhd,bkhd->bhqk/dot_general", (), "attention"),
    (f"{STEP}/jvp(Gmlp)/blocks_3/gate/norm/mul", (), "attention"),  # gMLP's gating unit whole
    (f"{STEP}/jvp(CoAtNet)/stage2_block1/se/reduce/dot_general", (), "squeeze_excite"),
    (f"{STEP}/transpose(jvp(EfficientNetV2))/stem/bn/reduce_sum", (), "norm"),
    (f"{STEP}/jvp(CoAtNet)/stage2_block2/norm2/div", (), "norm"),
    (f"{STEP}/jvp(EfficientNetV2)/stage5_block4/depthwise/conv/mul",
     ("conv_ops.py:depthwise_conv", "conv_ops.py:conv_general_dilated"), "depthwise_conv"),
    (f"{STEP}/jvp(ResNet)/stage4_block0/conv2/conv/dot_general",
     ("conv_ops.py:patches_conv",), "conv"),
    (f"{STEP}/jvp(EfficientNetV2)/stage2_block1/expand/conv/conv_general_dilated", (), "conv"),
    (f"{STEP}/transpose(jvp(CoAtNet))/stage1_block0/conv1/conv/transpose",
     ("layers.py:dense_contract", "conv_ops.py:pointwise_conv"), "conv"),  # a 1x1 conv
    (f"{STEP}/jvp(CoAtNet)/stage4_block0/mlp_fc1/...i,io->...o/dot_general",
     ("conv_ops.py:pointwise_conv",), "conv"),
    (f"{STEP}/transpose(jvp(CoAtNet))/stage2_block0/conv3/reduce_sum", (), "conv"),  # bias
    (f"{STEP}/jvp(CoAtNet)/head/dot_general", (), "dense"),
    (f"{STEP}/jvp(CoAtNet)/stage4_block0/DropPath_1/jit(_bernoulli)/jit(_uniform)/xor", (),
     "drop_path"),
    (f"{STEP}/jvp()/jit(_threefry_split)/ImageClassificationModel.loss_fn/xor", (), "drop_path"),
    (f"{STEP}/jvp(jit(log_softmax))/exp", (), "loss"),
    (f"{STEP}/transpose(jvp())/mul", (), "loss"),
    (f"{STEP}/add", ("transform.py:update_fn", "optimizers.py:sgd_momentum"), "optimizer"),
    (f"{STEP}/reduce_sum", (), "optimizer"),  # the gradient norm, after the gradient
    (f"{STEP}/jvp(CoAtNet)/stage3_block0/erfc", (), "other"),  # GELU
    ("reduce_sum", (), "other"),
    ("", (), None),
])
def test_moetx_instructions_fall_in_their_family(op_name, stack, family):
    assert pv.classify_vision(op_name, stack) == family


def test_timm_modules_fall_in_the_same_families_and_count_whole_inside_attention():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attention2d(nn.Module):  # named as timm's; its 1x1 qkv conv counts as attention
        def __init__(self):
            super().__init__()
            self.qkv = nn.Conv2d(8, 24, 1)
            self.proj = nn.Linear(8, 8)

    class SEModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Conv2d(8, 2, 1)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 16, 3, groups=2), Attention2d(), SEModule(),
                          nn.Linear(8, 4), nn.GELU(), nn.Dropout(0.1))
    assert [pv.timm_family(m) for m in model] == [
        "conv", "depthwise_conv", "norm", "conv", "attention", "squeeze_excite", "dense", None,
        "drop_path"]
    handles = pv.timm_family_hooks(torch, model)
    # Two hooks per ranged module: the 8 above, not the three layers inside attention and SE.
    assert len(handles) == 2 * 8
    for h in handles:
        h.remove()


HLO = """HloModule step

%fused_computation.1 (param_0.1: f32[4,3,3,8], param_1.1: f32[4,3,3,8]) -> f32[3,3,8,8] {
  %param_0.1 = f32[4,3,3,8]{3,2,1,0} parameter(0)
  %param_1.1 = f32[4,3,3,8]{3,2,1,0} parameter(1)
  ROOT %convolution.7 = f32[3,3,8,8]{3,2,1,0} convolution(%param_0.1, %param_1.1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

ENTRY %main (a: f32[4,3,3,8], b: f32[4,3,3,8]) -> f32[3,3,8,8] {
  %a = f32[4,3,3,8]{3,2,1,0} parameter(0)
  %b = f32[4,3,3,8]{3,2,1,0} parameter(1)
  %multiply.2 = f32[4,3,3,8]{3,2,1,0} multiply(%a, %b), metadata={op_name="jit(_train_step_impl)/jvp(ResNet)/stage1_block0/conv1/bn/mul"}
  ROOT %ynn_fusion.3 = f32[3,3,8,8]{3,2,1,0} fusion(%multiply.2, %b), kind=kCustom, calls=%fused_computation.1
}
"""


def test_a_fusion_without_metadata_counts_for_the_family_of_its_opcode():
    import profile_step as ps

    instrs, comps = ps.parse_hlo(HLO)
    assert instrs["ynn_fusion.3"][3] == "fusion" and instrs["convolution.7"][3] == "convolution"
    family = lambda name, by_opcode: ps.instruction_family(  # noqa: E731
        name, instrs, comps, pv.classify_vision, by_opcode=by_opcode)
    # XLA's weight-gradient convolution keeps no op_name: without the opcode rule it is "other".
    assert family("ynn_fusion.3", None) == "other"
    assert family("ynn_fusion.3", pv.BY_OPCODE) == "conv"
    assert family("multiply.2", pv.BY_OPCODE) == "norm"  # metadata comes first


def test_thunk_time_per_primitive_is_the_last_part_of_the_op_name():
    import collections

    import profile_step as ps

    instrs, _ = ps.parse_hlo(HLO)
    per_op = collections.Counter({"multiply.2": 3.0, "ynn_fusion.3": 5.0, "copy.9": 1.0})
    assert ps.primitives(per_op, instrs) == {"mul": 3.0, "?": 6.0}
