"""Primer-style architecture search: a PyGlove space over decoder-block programs.

The language is `moetx.lm.programs` (straight-line programs over registers for the q, k, v paths
and the ffn of a T5.1.1 decoder block). The space fixes a number of instruction *slots* per path
(`max_path_instructions` for each of q, k, v; `max_ffn_instructions` for the ffn). Slot i writes
register r{i+1} from registers r0..r{i}, so every program is in single-assignment form and the
register file is small (one register per slot and the input r0). A slot is one of

    Nop()              empty: r{i+1} is r{i} passed along (it emits no instruction)
    Unary(op, src)     r{i+1} = op(r{src}): an activation (identity neg relu gelu swish sigmoid
                       tanh square abs softplus), dense / dense_up / dense_down, dconv1..dconv7,
                       or norm
    Binary(op, a, b)   r{i+1} = op(r{a}, r{b}): add sub mul max

a `pg.oneof` of these symbolic classes with `pg.oneof` fields, so a mutation changes one op or
one operand, or empties / fills one slot (the registers of later slots stay defined). A q, k or
v path's output is its last register; the ffn ends in a fixed projection to d_model,
`dense_down(r{ffn_output})`, from a chosen register. So a random program can fail only on shapes
(a binary op of a d_ff-wide and a d_model-wide register, a d_ff-wide q/k/v output) or overflow.
Any straight-line program fits after renaming its registers (`candidate_from_program`), so the
space restricts only the length: T5.1.1's block (`programs.SEED_PROGRAM`) and Primer-EZ
(`programs.PRIMER_EZ_PROGRAM`: a width-3 conv on each of q, k, v; relu then square in the ffn)
are points of the default space, and nothing of Primer is a switch of it.

A materialised space is a `BlockCandidate`, which implements the search's candidate protocol:

  validate()      the program's problems (`programs.BlockProgram.validate`) and, when it is well
                  formed, a probe forward pass whose output must be finite; raises ValueError
                  with the reasons
  gin_bindings()  `TransformerConfig.decoder_program = '<text>'`
  fingerprint()   a hash of one `ProgramDecoderLayer`'s output (tiny dims, seeded parameters and
                  inputs, two packed segments in a row) rounded to 4 decimals, with no
                  compilation (well under a second): programs that compute the same function
                  (dead instructions, empty slots, renamed registers) share it
  text()          the program text; `candidate_from_program(text)` gives the candidate back
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pyglove as pg

from moetx.lm import attention, programs, transformer

DEFAULT_MAX_FFN_INSTRUCTIONS = 8
DEFAULT_MAX_PATH_INSTRUCTIONS = 2
# The probe of `fingerprint()` / `validate()`: one decoder block at tiny dims.
PROBE_DIMS = dict(vocab_size=8, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                  num_decoder_layers=1)
PROBE_LENGTH = 12
FINGERPRINT_DECIMALS = 4


# --------------------------------------------------------------------------- the slot types
class Slot(pg.Object):
    """One instruction slot (see the module docstring)."""

    def instruction(self, dst: int, resolve: Callable[[int], int]
                    ) -> programs.Instruction | None:
        """The slot's instruction writing r{dst}, reading `resolve(src)` for each source; None
        for an empty slot."""
        raise NotImplementedError


class Nop(Slot):
    """An empty slot: its register is the previous one."""

    def instruction(self, dst, resolve):
        return None


@pg.members([("op", pg.typing.Str()), ("src", pg.typing.Int(min_value=0))])
class Unary(Slot):
    """r{dst} = op(r{src}): an activation, a dense projection, a conv or a norm."""

    def instruction(self, dst, resolve):
        return programs.Instruction(self.op, dst, (resolve(self.src),))


@pg.members([("op", pg.typing.Str()), ("a", pg.typing.Int(min_value=0)),
             ("b", pg.typing.Int(min_value=0))])
class Binary(Slot):
    """r{dst} = op(r{a}, r{b})."""

    def instruction(self, dst, resolve):
        return programs.Instruction(self.op, dst, (resolve(self.a), resolve(self.b)))


def _slot_from_instruction(ins: programs.Instruction) -> Slot:
    if len(ins.srcs) == 2:
        return Binary(op=ins.op, a=ins.srcs[0], b=ins.srcs[1])
    return Unary(op=ins.op, src=ins.srcs[0])


def _path_instructions(slots: Sequence[Slot]
                       ) -> tuple[list[programs.Instruction], dict[int, int]]:
    """(instructions, register -> the register really holding its value) of a list of slots:
    an empty slot passes its input along, so reads of its register go to that one."""
    alias: dict[int, int] = {0: 0}
    instrs = []
    for i, slot in enumerate(slots):
        ins = slot.instruction(i + 1, lambda r: alias[r])
        if ins is None:
            alias[i + 1] = alias[i]
        else:
            alias[i + 1] = i + 1
            instrs.append(ins)
    return instrs, alias


# ------------------------------------------------------------------------------ candidates
@functools.lru_cache(maxsize=2048)
def probe_output(text: str) -> np.ndarray:
    """One `ProgramDecoderLayer` running `text` at `PROBE_DIMS`, parameters from PRNGKey(0), on
    seeded normal inputs [2, PROBE_LENGTH, emb] (row 0 packs two segments): the output, eagerly
    (no compilation)."""
    cfg = transformer.TransformerConfig(**PROBE_DIMS, decoder_program=text)
    layer = programs.ProgramDecoderLayer(cfg)
    x = jnp.asarray(np.random.RandomState(0).randn(2, PROBE_LENGTH, cfg.emb_dim), jnp.float32)
    split = PROBE_LENGTH // 3
    segments = jnp.asarray([[1] * split + [2] * (PROBE_LENGTH - split), [1] * PROBE_LENGTH],
                           jnp.int32)
    bias = attention.mask_to_bias(attention.make_decoder_mask(jnp.ones_like(segments), segments))
    variables = layer.init(jax.random.PRNGKey(0), x, bias, True, False, segment_ids=segments)
    return np.asarray(layer.apply(variables, x, bias, True, False, segment_ids=segments))


@pg.members([
    ("q", pg.typing.List(pg.typing.Object(Slot)), "Slots of the query path."),
    ("k", pg.typing.List(pg.typing.Object(Slot)), "Slots of the key path."),
    ("v", pg.typing.List(pg.typing.Object(Slot)), "Slots of the value path."),
    ("ffn", pg.typing.List(pg.typing.Object(Slot)), "Slots of the feed-forward path."),
    ("ffn_output", pg.typing.Int(min_value=0),
     "The register the ffn's final projection to d_model reads."),
])
class BlockCandidate(pg.Object):
    """A decoder-block program as slots (see the module docstring); the search's candidate."""

    def program(self) -> programs.BlockProgram:
        """The program: slot i of a path writes r{i+1} (an empty slot passes r{i} along); the
        ffn ends in `dense_down` of `ffn_output`. ValueError for a slot reading a register
        after its own."""
        paths = {}
        try:
            for name in ("q", "k", "v"):
                paths[name] = tuple(_path_instructions(getattr(self, name))[0])
            instrs, alias = _path_instructions(self.ffn)
            last = max((ins.dst for ins in instrs), default=0)
            instrs.append(programs.Instruction("dense_down", last + 1,
                                               (alias[self.ffn_output],)))
        except KeyError as e:
            raise ValueError(f"A slot reads r{e.args[0]}, which is not written before it.")
        paths["ffn"] = tuple(instrs)
        return programs.BlockProgram(**paths)

    def text(self) -> str:
        return str(self.program())

    def validate(self) -> None:
        """Raises ValueError with the reasons when the program cannot be trained: its static
        problems, else a non-finite output on the probe inputs."""
        program = self.program()
        program.validate()
        out = probe_output(str(program))
        if not np.all(np.isfinite(out)):
            raise ValueError("The program's output on the probe inputs is not finite (it "
                             "overflows at initialisation).")

    def gin_bindings(self) -> list[str]:
        return ["import moetx.lm.transformer",
                f"TransformerConfig.decoder_program = {self.text()!r}"]

    def fingerprint(self) -> str:
        """sha1 of the probe output rounded to `FINGERPRINT_DECIMALS` (see `probe_output`)."""
        out = np.round(probe_output(str(self.program().live())), FINGERPRINT_DECIMALS)
        out = (out + 0.0).astype(np.float32)  # -0.0 and 0.0 hash alike
        return hashlib.sha1(str(out.shape).encode() + out.tobytes()).hexdigest()


# ---------------------------------------------------------------------------------- space
def _slot_choices(i: int, unary: Sequence[str], binary: Sequence[str]) -> Any:
    def src():
        return pg.oneof(list(range(i + 1))) if i > 0 else 0

    choices: list[Any] = [Nop()]
    if unary:
        choices.append(Unary(op=pg.oneof(list(unary)), src=src()))
    if binary:
        choices.append(Binary(op=pg.oneof(list(binary)), a=src(), b=src()))
    return pg.oneof(choices)


def _check_ops(ops: Sequence[str], arity: int, what: str) -> tuple[str, ...]:
    for op in ops:
        try:
            ok = programs.op_arity(op) == arity
        except ValueError:
            ok = False
        w = programs.conv_width(op)
        if not ok or (w is not None and w not in programs.CONV_WIDTHS):
            raise ValueError(f"{what}: {op!r} is not a {arity}-input op of moetx.lm.programs.")
    return tuple(ops)


UNARY_OPS = (tuple(programs.UNARY_FUNCTIONS) + programs.DENSE_OPS
             + tuple(f"dconv{w}" for w in programs.CONV_WIDTHS) + (programs.NORM_OP,))
PATH_UNARY_OPS = tuple(op for op in UNARY_OPS if op not in ("dense_up", "dense_down"))
BINARY_OPS = tuple(programs.BINARY_FUNCTIONS)


@gin.configurable
def block_space(max_ffn_instructions: int = DEFAULT_MAX_FFN_INSTRUCTIONS,
                max_path_instructions: int = DEFAULT_MAX_PATH_INSTRUCTIONS,
                ffn_unary_ops: Sequence[str] = UNARY_OPS,
                path_unary_ops: Sequence[str] = PATH_UNARY_OPS,
                binary_ops: Sequence[str] = BINARY_OPS) -> BlockCandidate:
    """The space of block programs with `max_path_instructions` slots on each of q, k, v (0: the
    attention is T5's) and `max_ffn_instructions` slots in the ffn before its final projection.

    The q, k, v paths leave out dense_up / dense_down by default (a d_ff-wide query helps no
    one and costs a d_ff-wide projection). Raises ValueError for an unknown op or no ffn slot.
    """
    limit = min(programs.MAX_INSTRUCTIONS, programs.NUM_REGISTERS - 1) - 1
    if not (1 <= max_ffn_instructions <= limit and 0 <= max_path_instructions <= limit):
        raise ValueError(f"block_space needs 1 <= max_ffn_instructions <= {limit} and "
                         f"0 <= max_path_instructions <= {limit} (the language's limits), got "
                         f"{max_ffn_instructions} and {max_path_instructions}.")
    ffn_unary = _check_ops(ffn_unary_ops, 1, "ffn_unary_ops")
    path_unary = _check_ops(path_unary_ops, 1, "path_unary_ops")
    binary = _check_ops(binary_ops, 2, "binary_ops")
    path = lambda n, unary: [_slot_choices(i, unary, binary)  # noqa: E731
                             for i in range(n)]
    return BlockCandidate(
        q=path(max_path_instructions, path_unary), k=path(max_path_instructions, path_unary),
        v=path(max_path_instructions, path_unary), ffn=path(max_ffn_instructions, ffn_unary),
        ffn_output=pg.oneof(list(range(max_ffn_instructions + 1))))


def _slots(path: Sequence[programs.Instruction], num_slots: int, name: str
           ) -> tuple[list[Slot], dict[int, int]]:
    """(`num_slots` slots, register of the path -> register of the slots). A path in
    single-assignment form (increasing destinations, reading only r0 and registers written
    before) keeps its register numbers (r{i} goes to slot i-1); any other is renamed to
    consecutive registers."""
    current = {0: 0}
    dsts = [ins.dst for ins in path]
    slot_form = all(d >= 1 for d in dsts) and all(a < b for a, b in zip(dsts, dsts[1:]))
    renamed = []
    for i, ins in enumerate(path):
        missing = [s for s in ins.srcs if s not in current]
        if missing:
            raise ValueError(f"The {name} path reads r{missing[0]} before writing it ({ins}); "
                             f"the space cannot express it.")
        dst = ins.dst if slot_form else i + 1
        renamed.append(programs.Instruction(ins.op, dst, tuple(current[s] for s in ins.srcs)))
        current[ins.dst] = dst
    needed = renamed[-1].dst if renamed else 0
    if needed > num_slots:
        raise ValueError(f"The {name} path needs {needed} slots; the space has {num_slots}.")
    slots: list[Slot] = [Nop() for _ in range(num_slots)]
    for ins in renamed:
        slots[ins.dst - 1] = _slot_from_instruction(ins)
    return slots, current


def candidate_from_program(program: programs.BlockProgram | str,
                           max_ffn_instructions: int = DEFAULT_MAX_FFN_INSTRUCTIONS,
                           max_path_instructions: int = DEFAULT_MAX_PATH_INSTRUCTIONS
                           ) -> BlockCandidate:
    """The candidate of a program (or its text) in a `block_space` of these sizes: the inverse
    of `BlockCandidate.text`. The ffn's last instruction must be its `dense_down` to d_model.
    Raises ValueError when the program does not fit."""
    if isinstance(program, str):
        program = programs.parse_program(program)
    ffn = program.ffn
    if not ffn or ffn[-1].op != "dense_down":
        raise ValueError("The space's ffn ends in dense_down to d_model; this one ends in "
                         f"{ffn[-1] if ffn else 'nothing'}.")
    fields: dict[str, Any] = {
        name: _slots(getattr(program, name), max_path_instructions, name)[0]
        for name in ("q", "k", "v")}
    fields["ffn"], regs = _slots(ffn[:-1], max_ffn_instructions, "ffn")
    src = ffn[-1].srcs[0]
    if src not in regs:
        raise ValueError(f"The ffn's final projection reads r{src}, which is never written.")
    return BlockCandidate(**fields, ffn_output=regs[src])


@gin.configurable("encode_block")
def encode(space: BlockCandidate, candidate: BlockCandidate | programs.BlockProgram | str
           ) -> pg.DNA:
    """The DNA of `candidate` (a candidate, a program or its text) in `space`; ValueError when
    the space cannot express it."""
    if not isinstance(candidate, BlockCandidate):
        candidate = candidate_from_program(candidate, len(space.ffn), len(space.q))
    try:
        return pg.template(space).encode(candidate)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"The space cannot express this program: {e}") from e
