"""Scanned layer stacks (`TransformerConfig.scan_layers`, `moetx.lm.scan`): the same function as
the unrolled stack (outputs, gradients and MoE metrics after unscanning the parameters), dropout
that differs per layer, cached greedy and beam decoding equal to the unrolled model's, and
checkpoints that cross between the two layouts (restore, T5X export, Hugging Face export)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.convert import formats, restore, t5x_format
from moetx.convert.hf import families
from moetx.lm import models, programs, scan, transformer
from moetx.moe import layers as moe_layers
from moetx.trainer import trainer as trainer_lib
from moetx.util import trees
from tests.conftest import TINY, packed_batch
from tests.lm.conftest import assert_cached_decoding_matches_teacher_forcing

MOE = moe_layers.MoeConfig(num_experts=2, num_selected_experts=1, sparse_every=2)
CASES = {
    "dense": dict(num_decoder_layers=3),
    "encoder_decoder": dict(num_encoder_layers=2, num_decoder_layers=2),
    "moe_every_2nd": dict(num_decoder_layers=4, moe=MOE),
    "primer_program_remat": dict(num_decoder_layers=2, remat_policy="full",
                                 decoder_program=programs.PRIMER_EZ_PROGRAM),
}


def _pair(**kw):
    """(unrolled model, scanned model) of one tiny config."""
    cfg = transformer.TransformerConfig(**{**TINY, **kw})
    make = models.EncoderDecoderModel if cfg.num_encoder_layers else models.DecoderOnlyModel
    return (make(cfg, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"),
            make(dataclasses.replace(cfg, scan_layers=True),
                 loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"))


def _batch(model):
    if not model.is_encoder_decoder:
        return {k: jnp.asarray(v) for k, v in packed_batch(2, 16).items()}
    rng = np.random.RandomState(0)
    t = rng.randint(2, 128, (2, 8)).astype(np.int32)
    t[1, 6:] = 0
    enc = rng.randint(2, 128, (2, 12)).astype(np.int32)
    return {"encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(t),
            "decoder_input_tokens": jnp.asarray(np.concatenate(
                [np.zeros((2, 1), np.int32), t[:, :-1]], 1))}


def _shapes(model):
    if model.is_encoder_decoder:
        return model.input_shapes(2, {"inputs": 12, "targets": 8})
    return model.input_shapes(2, 16)


def _init(model, seed=0):
    key = jax.random.PRNGKey(seed)
    return nn.unbox(jax.jit(lambda k: model.get_initial_variables(k, _shapes(model)))(
        key)["params"])


def _loss_and_grads(model, params, batch):
    weights, factor = model.loss_weights_and_factor(batch)

    def loss(p):
        value, (metrics, _) = model.loss_fn(p, batch, None, weights, factor)
        return value, metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, metrics, grads


def _assert_trees_close(a, b, atol=1e-5):
    fa, fb = trees.flatten(a), trees.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, rtol=1e-5,
                                   err_msg=k)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_stack_computes_the_unrolled_function_and_gradients(case):
    unrolled, scanned = _pair(**CASES[case])
    params = _init(scanned)
    layer_leaves = [x for p, x in trees.flatten(params).items() if "/layers/" in p]
    assert layer_leaves and all(x.shape[0] in (2, 3) for x in layer_leaves)
    flat = scan.unscan_params(params)
    # The unscanned tree is exactly the unrolled model's tree (names and shapes) ...
    want = jax.eval_shape(lambda: unrolled.get_initial_variables(jax.random.PRNGKey(0),
                                                                 _shapes(unrolled)))
    assert {k: v.shape for k, v in trees.flatten(flat).items()} == {
        k: v.shape for k, v in trees.flatten(nn.unbox(want["params"])).items()}
    # ... and scanning it again gives back the scanned tree bit for bit.
    again = scan.scan_params(flat, scanned.config)
    assert all(np.array_equal(trees.flatten(again)[k], v)
               for k, v in trees.flatten(params).items())

    batch = _batch(unrolled)
    loss_s, metrics_s, grads_s = _loss_and_grads(scanned, params, batch)
    loss_u, metrics_u, grads_u = _loss_and_grads(unrolled, flat, batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    _assert_trees_close(scan.unscan_params(grads_s), grads_u)
    # MoE metrics (sown inside the scan) come back per layer under the unrolled names.
    assert sorted(metrics_s) == sorted(metrics_u)
    for k in metrics_u:
        np.testing.assert_allclose(metrics_s[k], metrics_u[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if case == "moe_every_2nd":
        assert "moe/decoder/layers_3/mlp/aux_loss" in metrics_s
        assert not any("layers_2/mlp" in k for k in metrics_s if k.startswith("moe/"))


def test_scanned_parameters_carry_the_layers_logical_axis():
    _, scanned = _pair(**CASES["moe_every_2nd"])
    boxed = jax.eval_shape(lambda: scanned.get_initial_variables(jax.random.PRNGKey(0),
                                                                 _shapes(scanned)))["params"]
    axes = trees.flatten(nn.get_partition_spec(boxed))
    assert tuple(axes["decoder/layers/sublayer_1/mlp/expert/wi_0/kernel"]) == (
        "layers", "expert", "embed", "expert_mlp")
    assert tuple(axes["decoder/layers/sublayer_0/self_attention/query/kernel"]) == (
        "layers", "embed", "joined_kv")
    assert tuple(axes["decoder/token_embedder/embedding"]) == ("vocab", "embed")


def test_dropout_draws_different_masks_in_every_scanned_layer():
    _, scanned = _pair(num_decoder_layers=2, dropout_rate=0.5)
    params = _init(scanned)
    masks = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        # The residual dropout after self-attention, once per layer (scan step).
        if isinstance(context.module, nn.Dropout) \
                and tuple(context.module.path) == ("decoder", "layers", "Dropout_0"):
            jax.debug.callback(lambda m: masks.append(np.asarray(m)), out == 0)
        return out

    batch = _batch(scanned)
    with nn.intercept_methods(record):
        scanned.logits(params, batch, dropout_rng=jax.random.PRNGKey(1))
    jax.effects_barrier()
    assert len(masks) == 2
    assert 0.3 < masks[0].mean() < 0.7  # dropout is on ...
    assert not np.array_equal(masks[0], masks[1])  # ... with another mask in each layer


def test_depth_not_a_multiple_of_the_moe_interval_is_refused():
    with pytest.raises(ValueError, match="depth 3 is not a multiple of 2"):
        transformer.TransformerConfig(**{**TINY, "num_decoder_layers": 3, "moe": MOE,
                                         "scan_layers": True})
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        transformer.TransformerConfig(**{**TINY, "scan_layers": 1})


# ---------------------------------------------------------------------------------- decoding
def test_cached_greedy_and_beam_decoding_equal_the_unrolled_model():
    unrolled, scanned = _pair(num_decoder_layers=2)
    params = _init(scanned)
    flat = scan.unscan_params(params)
    prompts = jnp.asarray([[5, 9, 3, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([3, 1], jnp.int32)
    cache = scanned.init_cache(params, 2, 8)
    assert cache["decoder"]["layers"]["self_attention"]["cached_key"].shape == (2, 2, 4, 8, 8)
    for beams in (0, 2):
        def run(m, p):
            return np.asarray(jax.jit(lambda q: m.predict_batch(
                q, prompts, lengths, jax.random.PRNGKey(0), eos_id=1, num_beams=beams))(p))
        got, want = run(scanned, params), run(unrolled, flat)
        np.testing.assert_array_equal(got, want)
        assert (got[:, 3:] > 0).any()


def test_cached_decoding_of_scanned_moe_blocks_matches_teacher_forcing():
    _, scanned = _pair(num_decoder_layers=2, moe=dataclasses.replace(MOE, num_experts=1),
                       primer_dconv=True)
    assert_cached_decoding_matches_teacher_forcing(scanned, _init(scanned))


def test_encoder_decoder_greedy_decoding_equal_the_unrolled_model():
    unrolled, scanned = _pair(**CASES["encoder_decoder"])
    params = _init(scanned)
    enc = _batch(unrolled)["encoder_input_tokens"]
    def run(m, p):
        return jax.jit(lambda q: m.predict_batch(q, enc, 6, jax.random.PRNGKey(0), eos_id=1))(p)
    np.testing.assert_array_equal(run(scanned, params), run(unrolled, scan.unscan_params(params)))


# ------------------------------------------------------------------------------- checkpoints
class _Trainer:
    """What InitFromCheckpoint reads of a Trainer: the abstract state."""

    def __init__(self, model, params):
        self.model = model
        self.params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             params)

    def abstract_state_with_shardings(self):
        return trainer_lib.TrainState(step=0, params=self.params, opt_state=None)


def test_checkpoints_restore_across_layouts_and_export_the_same_t5x_and_hf(tmp_path):
    unrolled, scanned = _pair(num_encoder_layers=2, num_decoder_layers=2)
    params = _init(scanned, seed=1)
    flat = scan.unscan_params(params)
    ab_s, ab_u = formats.abstract_model(scanned), formats.abstract_model(unrolled)
    run_s = formats.write_moetx(str(tmp_path / "scanned"), formats.Checkpoint(params, step=3),
                                ab_s)
    run_u = formats.write_moetx(str(tmp_path / "unrolled"), formats.Checkpoint(flat, step=3),
                                ab_u)

    # A scanned run's checkpoint initialises an unrolled run, and the other way round.
    for path, model, want in ((run_s, unrolled, flat), (run_u, scanned, params)):
        fresh = trainer_lib.TrainState(step=0, params=jax.tree_util.tree_map(
            np.zeros_like, want), opt_state=None)
        got = restore.InitFromCheckpoint(path=path)(_Trainer(model, want), fresh).params
        _assert_trees_close(got, want, atol=0)

    # T5X export: the scanned run's equals the unrolled run's, slots included.
    t5x_s = formats.convert("moetx", "t5x", run_s, str(tmp_path / "t5x_s"),
                            formats.ModelSpec(scanned), use_tensorstore=False)
    t5x_u = formats.convert("moetx", "t5x", run_u, str(tmp_path / "t5x_u"),
                            formats.ModelSpec(unrolled), use_tensorstore=False)
    a, b = t5x_format.read_checkpoint(t5x_s), t5x_format.read_checkpoint(t5x_u)
    assert "layers_1" in a.params["decoder"]
    _assert_trees_close(a.params, b.params, atol=0)
    _assert_trees_close(a.opt_state, b.opt_state, atol=0)

    # Hugging Face export of the scanned tree is the unrolled tree's.
    family = families.for_config(scanned.config)
    hf_s, hf_u = family.to_hf(params, scanned.config), family.to_hf(flat, unrolled.config)
    assert sorted(hf_s) == sorted(hf_u)
    assert all(np.array_equal(hf_s[k], hf_u[k]) for k in hf_u)


def test_t5x_slots_round_trip_through_a_scanned_run(tmp_path):
    """T5X (random Adafactor slots, and the zero [1] placeholders T5X keeps) -> scanned moetx
    -> T5X is exact, and the scanned run holds stacked parameters and slots."""
    unrolled, scanned = _pair(**CASES["moe_every_2nd"])
    flat = scan.unscan_params(_init(scanned))
    opt = formats.abstract_model(unrolled).opt_state
    rng = np.random.RandomState(0)
    slots = {}
    for slot in ("v_row", "v_col", "v"):
        for k, x in trees.flatten(getattr(opt, slot)).items():
            slots.setdefault(k, {"m": np.zeros((1,), np.float32)})[slot] = (
                np.zeros((1,), np.float32) if x.shape == (1,)
                else rng.rand(*x.shape).astype(np.float32))
    src = t5x_format.write_checkpoint(str(tmp_path / "src"), jax.device_get(flat), 5,
                                      trees.unflatten(slots), use_tensorstore=False)
    spec = formats.ModelSpec(scanned)
    formats.convert("t5x", "moetx", src, str(tmp_path / "run"), spec)
    run = formats.read_moetx(str(tmp_path / "run"))
    wo = "decoder/layers/sublayer_1/mlp/expert/wo/kernel"
    assert run.params["decoder"]["layers"]["sublayer_1"]["mlp"]["expert"]["wo"][
        "kernel"].shape[0] == 2
    np.testing.assert_array_equal(run.slots[wo]["v"][1],
                                  slots["decoder/layers_3/mlp/expert/wo/kernel"]["v"])
    back = formats.convert("moetx", "t5x", str(tmp_path / "run"), str(tmp_path / "back"), spec,
                           use_tensorstore=False)
    original, again = t5x_format.read_checkpoint(src), t5x_format.read_checkpoint(back)
    _assert_trees_close(again.params, original.params, atol=0)
    _assert_trees_close(again.opt_state, original.opt_state, atol=0)
