"""Block programs (moetx.lm.programs): the text form, validation, and the interpreter against
moetx's own T5.1.1 and Primer-EZ decoders, causality, packing, decoding and one training step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.lm import attention, models, programs, transformer
from tests.conftest import make_trainer, packed_batch
from tests.lm.conftest import assert_cached_decoding_matches_teacher_forcing

BASE = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_decoder_layers=2)
PRIMER_EZ = dict(mlp_activations=("squared_relu",), primer_dconv=True)
# Width-7 convs on q and v and inside the ffn, width 1 on k, an RMS norm and a binary op.
CONV_PROGRAM = ("q: r1=dconv7(r0)\n"
                "k: r1=dconv1(r0); r2=norm(r1)\n"
                "v: r1=dconv7(r0); r2=add(r0,r1)\n"
                "ffn: r1=dense_up(r0); r2=dconv7(r1); r3=swish(r2); r4=mul(r1,r3); "
                "r5=dense_down(r4)")


def _model(**kw):
    m = models.DecoderOnlyModel(transformer.TransformerConfig(**{**BASE, **kw}))
    v = m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(2, 16))
    return m, nn.unbox(v["params"])


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: x.shape, tree)


# ------------------------------------------------------------------------------ text form
@pytest.mark.parametrize("text", [programs.SEED_PROGRAM, programs.PRIMER_EZ_PROGRAM,
                                  CONV_PROGRAM, "v: r3=tanh(r0); r0=max(r3,r0)\nffn: "
                                  "r2=dense(r0); r7=dense_down(r2)"])
def test_text_round_trips_exactly(text):
    program = programs.parse_program(text)
    assert str(program) == text
    assert programs.parse_program(str(program)) == program


def test_parse_accepts_bars_spaces_and_any_path_order():
    loose = ("ffn :  r1 = dense_up( r0 ); r2=relu(r1) ;r3=square(r2); r4=dense_down(r3) | "
             "v: r1=dconv3(r0) | q: r1=dconv3(r0) | k: r1=dconv3(r0)")
    assert str(programs.parse_program(loose)) == programs.PRIMER_EZ_PROGRAM
    p = programs.parse_program(programs.SEED_PROGRAM)
    assert p.q == p.k == p.v == ()
    assert p.ffn[3] == programs.Instruction("mul", 4, (2, 3))


@pytest.mark.parametrize("text,message", [
    ("ffn: r1=dense_up(r0); r2=gelu(r5); r3=dense_down(r2)", "reads r5 before it is written"),
    ("ffn: r1=dense_up(r0); r2=add(r1,r0); r3=dense_down(r2)",
     "shape mismatch, add of a d_ff-wide and a base-width register"),
    ("ffn: r1=dense_up(r0); r2=relu(r1)", "must end in dense_down to d_model"),
    ("q: r1=dconv3(r0)", "ffn path: empty"),
    ("ffn: " + "; ".join(f"r{i}=relu(r{i - 1})" for i in range(1, 25)) + "; r25=dense_down(r24)",
     "too many instructions (25 > 24)"),
    ("q: r1=dconv9(r0)\nffn: r1=dense_down(r0)", "conv width 9 out of range 1..7"),
    ("q: r1=dconv0(r0)\nffn: r1=dense_down(r0)", "conv width 0 out of range 1..7"),
    ("q: r1=dense_up(r0)\nffn: r1=dense_down(r0)", "the output r1 is d_ff wide"),
    ("ffn: r40=dense_down(r0)", "uses r40, outside the register file r0..r31"),
])
def test_validation_gives_the_reason(text, message):
    program = programs.parse_program(text)
    with pytest.raises(ValueError, match="Invalid block program") as err:
        program.validate()
    assert message in str(err.value)
    with pytest.raises(ValueError, match="Invalid block program"):
        transformer.TransformerConfig(**BASE, decoder_program=text)


@pytest.mark.parametrize("text,message", [
    ("ffn: r1=foo(r0)", "Unknown op 'foo'"),
    ("ffn: r1=add(r0)", "add takes 2 source register"),
    ("ffn: r1=relu(r0,r0)", "relu takes 1 source register"),
    ("ffn: r1 = relu r0", "Cannot parse instruction"),
    ("ffn: r1=relu(x)", "operands are registers"),
    ("mlp: r1=dense_down(r0)", "path one of"),
    ("q: r1=relu(r0)\nq: r1=relu(r0)", "given twice"),
])
def test_parse_errors_give_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        programs.parse_program(text)


def test_every_problem_is_listed_and_dead_code_is_only_checked_for_form():
    text = "q: r1=dconv3(r9)\nffn: r1=dense_up(r0); r2=add(r1,r0); r3=dense_down(r2)"
    problems = programs.parse_program(text).problems()
    assert len(problems) == 2 and problems[0].startswith("q path") \
        and problems[1].startswith("ffn path")
    # A dead instruction reading an unwritten register is never run: the program is valid.
    dead = programs.parse_program("ffn: r1=dense_up(r0); r2=gelu(r7); r3=dense_down(r1)")
    dead.validate()
    assert str(dead.live()) == "ffn: r1=dense_up(r0); r3=dense_down(r1)"


def test_config_rejects_program_with_switches_it_replaces():
    for kw in (dict(primer_dconv=True), dict(ffn_post_norm=True)):
        with pytest.raises(ValueError, match="cannot be combined with"):
            transformer.TransformerConfig(**BASE, **kw, decoder_program=programs.SEED_PROGRAM)


def test_parameter_names_follow_t5_and_number_families():
    path = programs.parse_program(CONV_PROGRAM)
    assert programs.parameter_names("q", path.q) == ["query_dconv"]
    assert programs.parameter_names("k", path.k) == ["key_dconv", "key_norm"]
    assert programs.parameter_names("ffn", path.ffn) == ["wi", "dconv", None, None, "wo"]
    two = programs.parse_program("ffn: r1=dense_up(r0); r2=dense_up(r1); r3=dense_down(r2); "
                                 "r4=dense(r3); r5=dense_down(r4)").ffn
    assert programs.parameter_names("ffn", two) == ["wi_0", "wi_1", "wd", "wm", "wo"]


# ------------------------------------------------------------------ parity with moetx blocks
@pytest.mark.parametrize("reference,text", [({}, programs.SEED_PROGRAM),
                                            (PRIMER_EZ, programs.PRIMER_EZ_PROGRAM)],
                         ids=["t5_1_1", "primer_ez"])
def test_program_equals_moetx_decoder_output_for_output(reference, text):
    """Same parameter tree (and the same initial values, since names seed the initializers);
    same logits, also with dropout on and the same dropout key; same FLOPs per step."""
    kw = dict(dropout_rate=0.1)
    ref_model, ref_params = _model(**reference, **kw)
    prog_model, prog_params = _model(decoder_program=text, **kw)
    assert _shapes(ref_params) == _shapes(prog_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ref_params, prog_params)
    # Different parameters for the program run, so equal outputs are not a coincidence of init.
    params = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), ref_params)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 16, seed=2, vocab=64).items()}
    for rng in (None, jax.random.PRNGKey(7)):
        np.testing.assert_allclose(prog_model.logits(params, batch, rng),
                                   ref_model.logits(params, batch, rng), atol=1e-6)
    shapes = ref_model.input_shapes(2, 16)
    assert prog_model.flops_per_step(params, shapes) == ref_model.flops_per_step(params, shapes)


def test_dead_instructions_create_nothing_and_change_nothing():
    dead = programs.SEED_PROGRAM.replace("r5=", "r6=tanh(r0); r7=dense_up(r2); r5=")
    m0, p0 = _model(decoder_program=programs.SEED_PROGRAM)
    m1, p1 = _model(decoder_program=dead)
    assert _shapes(p0) == _shapes(p1)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 16, seed=3, vocab=64).items()}
    np.testing.assert_array_equal(m0.logits(p0, batch), m1.logits(p0, batch))


# ------------------------------------------------------------ causality, packing, decoding
def test_width7_convs_are_causal_stay_in_their_segment_and_start_as_primer():
    cfg = transformer.TransformerConfig(**BASE, decoder_program=CONV_PROGRAM)
    layer = programs.ProgramDecoderLayer(cfg)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 32), jnp.float32)
    seg = jnp.asarray([[1] * 6 + [2] * 10, [1] * 16])  # row 0 packs two segments
    bias = attention.mask_to_bias(attention.make_decoder_mask(jnp.ones_like(seg), seg))
    variables = layer.init(jax.random.PRNGKey(0), x, bias, True, False, segment_ids=seg)
    params = nn.unbox(variables["params"])
    np.testing.assert_allclose(params["mlp"]["dconv"]["kernel"], np.broadcast_to(
        np.array([0.5] + [0.5 / 7] * 6, np.float32)[:, None], (7, 64)))
    assert params["self_attention"]["key_dconv"]["kernel"].shape == (1, 32)
    probe = jnp.asarray(np.random.RandomState(1).randn(32), jnp.float32)

    @jax.jit
    def grad_at(row, t):  # d <out[row, t], probe> / d x
        f = lambda z: layer.apply(variables, z, bias, True, False,  # noqa: E731
                                  segment_ids=seg)[row, t] @ probe
        return jax.grad(f)(x)

    def reads(row, t):  # |gradient| summed per input position of that row -> [length]
        return np.abs(np.asarray(grad_at(row, t)))[row].sum(axis=-1)

    for row, t, start in ((0, 3, 0), (0, 15, 6), (1, 15, 0)):
        jac = reads(row, t)
        assert np.all(jac[t + 1:] == 0)  # nothing from the future
        assert np.all(jac[:start] == 0)  # nothing from the previous packed segment
        assert np.all(jac[start:t + 1] > 0)


def test_conv_program_decodes_as_it_is_teacher_forced():
    m, params = _model(decoder_program=CONV_PROGRAM)
    assert_cached_decoding_matches_teacher_forcing(m, params)


def test_cross_attention_is_refused():
    cfg = transformer.TransformerConfig(**{**BASE, "num_encoder_layers": 1},
                                        decoder_program=programs.SEED_PROGRAM)
    m = models.EncoderDecoderModel(cfg)
    with pytest.raises(ValueError, match="no cross-attention"):
        m.get_initial_variables(jax.random.PRNGKey(0), m.input_shapes(1, {"inputs": 8,
                                                                           "targets": 8}))


# ------------------------------------------------------------------------- gin and training
def test_program_tiny_gin_is_decoder_tiny_with_the_seed_program(parse):
    model = parse("program_tiny")
    assert model.config.decoder_program == programs.SEED_PROGRAM
    reference = models.DecoderOnlyModel(dataclasses.replace(model.config, decoder_program=None))
    shapes = model.input_shapes(1, 8)
    init = lambda m: jax.eval_shape(  # noqa: E731
        lambda: m.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
    assert _shapes(init(model)) == _shapes(init(reference))


def test_conv_program_trains_one_step():
    model = models.DecoderOnlyModel(
        transformer.TransformerConfig(**{**BASE, "vocab_size": 128},
                                      decoder_program=CONV_PROGRAM),
        loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    trainer = make_trainer(model, batch_size=4, length=16)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    state, sums = trainer.train_step(state, trainer.to_global(packed_batch(4, 16, seed=4)))
    loss = float(sums["loss"])
    assert np.isfinite(loss) and 3.0 < loss < 7.0  # about ln(128) = 4.85 at init
    after = jax.device_get(state.params)
    moved = nn.unbox(after)["decoder"]["layers_0"]["mlp"]["dconv"]["kernel"] - \
        nn.unbox(before)["decoder"]["layers_0"]["mlp"]["dconv"]["kernel"]
    assert np.abs(moved).max() > 0
