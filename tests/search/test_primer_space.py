"""The Primer-style search space (moetx.search.primer): DNA <-> program round trips, sampled
programs that run or are rejected with a reason, the seed and Primer-EZ in the space, and the
functional fingerprint."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pyglove as pg
import pytest

from moetx.lm import attention, programs, transformer
from moetx.search import primer
from moetx.util import gin_files

SAMPLED = 30


@pytest.fixture(scope="module")
def space():
    return primer.block_space()


def _reads_an_empty_slot(cand) -> bool:
    """Whether some slot (or the ffn's final projection) reads the register of an empty slot."""
    for name in ("q", "k", "v", "ffn"):
        slots = getattr(cand, name)
        empty = {i + 1 for i, s in enumerate(slots) if isinstance(s, primer.Nop)}
        reads = [r for s in slots for r in (
            (s.a, s.b) if isinstance(s, primer.Binary) else
            (s.src,) if isinstance(s, primer.Unary) else ())]
        if name == "ffn":
            reads.append(cand.ffn_output)
        if empty & set(reads):
            return True
    return False


# Both cases of the last assertion occur: seeds 6, 8 and 10 of the small space read an empty
# slot's register and the others not; every program of the large space reads one.
@pytest.mark.parametrize("sizes,count,cases", [((3, 1), 20, {True, False}), ((8, 2), 8, {True})])
def test_dna_program_text_round_trips(sizes, count, cases):
    space = primer.block_space(*sizes)
    spec = pg.dna_spec(space)
    reads_empty = set()
    for seed in range(count):
        dna = pg.random_dna(spec, random.Random(seed))
        cand = pg.materialize(space, dna)
        assert primer.encode(space, cand) == dna
        text = cand.text()
        assert str(programs.parse_program(text)) == text
        back = primer.candidate_from_program(text, *sizes)
        assert back.text() == text
        again = pg.materialize(space, primer.encode(space, text))
        assert pg.eq(again, back) and again.text() == text
        # The DNA itself comes back unless a slot reads an empty slot's register (the text
        # names the register that slot passed along: another DNA of the same program).
        reads = _reads_an_empty_slot(cand)
        reads_empty.add(reads)
        assert (primer.encode(space, back) == dna) == (not reads)
    assert reads_empty == cases


def test_candidates_survive_pyglove_json(space):
    cand = pg.materialize(space, pg.random_dna(pg.dna_spec(space), random.Random(3)))
    again = pg.from_json_str(pg.to_json_str(cand))
    assert isinstance(again, primer.BlockCandidate) and again.text() == cand.text()


@pytest.mark.parametrize("text", [programs.SEED_PROGRAM, programs.PRIMER_EZ_PROGRAM])
def test_seed_and_primer_ez_are_points_of_the_space(space, text):
    dna = primer.encode(space, text)
    cand = pg.materialize(space, dna)
    assert cand.text() == text
    cand.validate()
    assert f"TransformerConfig.decoder_program = {text!r}" in cand.gin_bindings()


def test_sampled_programs_run_or_are_rejected_with_a_reason(space):
    """Each sampled program either passes `validate()` and then runs forward and backward with
    finite values (at the probe's dims and another parameter seed, so the check is not the
    probe itself), or `validate()` rejects it with the reason."""
    spec = pg.dna_spec(space)
    dims, length = primer.PROBE_DIMS, primer.PROBE_LENGTH
    x = jnp.asarray(np.random.RandomState(5).randn(2, length, dims["emb_dim"]), jnp.float32)
    seg = jnp.asarray([[1] * 5 + [2] * (length - 5), [1] * length])
    bias = attention.mask_to_bias(attention.make_decoder_mask(jnp.ones_like(seg), seg))
    ran, rejected = 0, []
    for seed in range(SAMPLED):
        cand = pg.materialize(space, pg.random_dna(spec, random.Random(1000 + seed)))
        try:
            cand.validate()
        except ValueError as e:
            assert str(e).startswith(("Invalid block program: ", "The program's output")), e
            rejected.append(str(e))
            continue
        cfg = transformer.TransformerConfig(**dims, decoder_program=cand.text())
        layer = programs.ProgramDecoderLayer(cfg)
        variables = layer.init(jax.random.PRNGKey(seed + 1), x, bias, True, False,
                               segment_ids=seg)
        loss = lambda v: jnp.mean(jnp.square(  # noqa: E731
            layer.apply(v, x, bias, True, False, segment_ids=seg)))
        value, grads = jax.value_and_grad(loss)(variables)
        assert np.isfinite(float(value)), cand.text()
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)), cand.text()
        ran += 1
    assert ran >= SAMPLED * 2 // 3, rejected
    assert ran + len(rejected) == SAMPLED


def test_fingerprint_is_functional(space):
    seed = primer.candidate_from_program(programs.SEED_PROGRAM)
    # A dead instruction, a different register layout (gaps of empty slots) and operand order.
    dead = primer.candidate_from_program(
        "ffn: r1=dense_up(r0); r2=gelu(r1); r3=sigmoid(r2); r4=dense_up(r0); r5=mul(r2,r4); "
        "r6=dense_down(r5)")
    moved = primer.candidate_from_program(
        "ffn: r2=dense_up(r0); r4=gelu(r2); r5=dense_up(r0); r7=mul(r5,r4); r8=dense_down(r7)")
    ez = primer.candidate_from_program(programs.PRIMER_EZ_PROGRAM)
    assert len({seed.text(), dead.text(), moved.text()}) == 3
    assert seed.fingerprint() == dead.fingerprint() == moved.fingerprint()
    assert ez.fingerprint() != seed.fingerprint()
    # Swapping the two up-projections swaps the parameters they are initialised with: another
    # function of the seeded parameters, so another fingerprint.
    swapped = primer.candidate_from_program(
        "ffn: r1=dense_up(r0); r2=dense_up(r0); r3=gelu(r2); r4=mul(r3,r1); r5=dense_down(r4)")
    assert swapped.fingerprint() != seed.fingerprint()
    assert len(seed.fingerprint()) == 40


def test_gin_bindings_configure_an_ordinary_run(clean_gin, space):
    import gin

    cand = pg.materialize(space, primer.encode(space, programs.PRIMER_EZ_PROGRAM))
    gin_files.parse_files(["models/decoder_tiny.gin"], cand.gin_bindings())
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    assert model.config.decoder_program == programs.PRIMER_EZ_PROGRAM


def test_bad_spaces_and_programs_that_do_not_fit_are_refused(space):
    with pytest.raises(ValueError, match="not a 1-input op"):
        primer.block_space(ffn_unary_ops=("relu", "cube"))
    with pytest.raises(ValueError, match="not a 2-input op"):
        primer.block_space(binary_ops=("relu",))
    with pytest.raises(ValueError, match="max_ffn_instructions"):
        primer.block_space(max_ffn_instructions=0)
    long = ("ffn: " + "; ".join(f"r{i}=relu(r{i - 1})" for i in range(1, 10))
            + "; r10=dense_down(r9)")
    with pytest.raises(ValueError, match="needs 9 slots; the space has 8"):
        primer.encode(space, long)
    with pytest.raises(ValueError, match="ends in dense_down"):
        primer.candidate_from_program("ffn: r1=dense_down(r0); r2=relu(r1)")
    with pytest.raises(ValueError, match="reads r4 before writing it"):
        primer.candidate_from_program("ffn: r1=relu(r4); r2=dense_down(r1)")
    # A space without convs cannot express Primer-EZ.
    no_conv = primer.block_space(path_unary_ops=("relu",))
    with pytest.raises(ValueError, match="cannot express"):
        primer.encode(no_conv, programs.PRIMER_EZ_PROGRAM)
