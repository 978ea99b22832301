"""Decoder blocks written as instruction programs: the language of the Primer-style search.

A block keeps T5.1.1's skeleton, x + attention(norm(x)) then x + ffn(norm(x)), with a softmax
attention core over the mask and relative-position bias the `Decoder` passes in. Four
straight-line programs over a small register file fill it in:

  q, k, v   each applied to its projected tensor `[batch, length, heads*d_kv]` after the
            `query`/`key`/`value` projection and before the head split (an empty path is the
            identity);
  ffn       from the normed input to the MLP output; it must end in `dense_down` (d_model).

A path starts with its input in `r0`; an instruction `rD=op(rS)` or `rD=op(rA,rB)` writes one
register; the path's output is the register the last instruction writes. Operations:

  dense        a bias-free projection to the same width
  dense_up     a projection to d_ff
  dense_down   a projection to the base width (d_model in the ffn, heads*d_kv in q/k/v)
  dconv1..7    causal depthwise convolution over length of that width (zero fill, never wraps,
               never reads across packed segments; taps 0.5 then 0.5/width, Primer's init)
  norm         RMS normalisation with a learned scale
  unary        identity neg relu gelu swish sigmoid tanh square abs softplus
  binary       add sub mul max (both operands of the same width)

Every value has a symbolic width, `base` or `ff`, so a program is checked once for any model
size (`BlockProgram.validate`: registers read before they are written, binary ops of different
widths, a q/k/v output of width d_ff, an ffn not ending in dense_down, too many instructions, a
register outside the file, a conv width outside 1..7). Dead instructions are checked for form
only, since they never run. Nothing of Primer is a switch: squared ReLU is `relu` then
`square`, multi-dconv-head attention is `dconv3` on each of q, k, v. The text form is one line
per non-empty path, in the order q, k, v, ffn:

    q: r1=dconv3(r0)
    ffn: r1=dense_up(r0); r2=relu(r1); r3=square(r2); r4=dense_down(r3)

and `parse_program(str(p)) == p`, `str(parse_program(text)) == text` for canonical text.

Parameters are named from the program's *live* instructions (those the output depends on; dead
ones create nothing and compute nothing) by family: in the ffn (module `mlp`) `wi` for
dense_up, `wo` for the final dense_down, `wd` for other dense_downs, `wm` for dense, `dconv`,
`norm`; in q/k/v (module `self_attention`) `{query,key,value}_{up,down,dense,dconv,norm}`. A
family with one member has the bare name, several are numbered `_0, _1, ...` (T5's `wi_0`,
`wi_1`). So `SEED_PROGRAM` (T5.1.1's gated-GELU block) has exactly the parameter tree of
`transformer.DecoderLayer`, and `PRIMER_EZ_PROGRAM` that of moetx's Primer-EZ layer
(`mlp_activations=('squared_relu',)`, `primer_dconv=True`), with equal initial values.

`ProgramDecoderLayer` is the Flax interpreter, a drop-in for `transformer.DecoderLayer`
(`TransformerConfig.decoder_program` selects it). It decodes with caches (each conv keeps its
last inputs), trains with dropout where T5.1.1 has it (residual branches, attention weights, the
input of the ffn's final projection); cross-attention is not supported.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.lm import attention
from moetx.nn import layers

Array = jax.Array

PATHS = ("q", "k", "v", "ffn")
ATTENTION_PATH_PREFIX = {"q": "query", "k": "key", "v": "value"}
UNARY_FUNCTIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "neg": jnp.negative,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # moetx's / T5.1.1's gelu
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "square": jnp.square,
    "abs": jnp.abs,
    "softplus": jax.nn.softplus,
}
BINARY_FUNCTIONS: dict[str, Callable[[Array, Array], Array]] = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "max": jnp.maximum,
}
DENSE_OPS = ("dense", "dense_up", "dense_down")
CONV_WIDTHS = tuple(range(1, 8))
NORM_OP = "norm"
# Limits of `BlockProgram.validate` (the search space uses smaller ones).
MAX_INSTRUCTIONS = 24
NUM_REGISTERS = 32
BASE, FF = "base", "ff"

SEED_PROGRAM = ("ffn: r1=dense_up(r0); r2=gelu(r1); r3=dense_up(r0); r4=mul(r2,r3); "
                "r5=dense_down(r4)")
PRIMER_EZ_PROGRAM = ("q: r1=dconv3(r0)\n"
                     "k: r1=dconv3(r0)\n"
                     "v: r1=dconv3(r0)\n"
                     "ffn: r1=dense_up(r0); r2=relu(r1); r3=square(r2); r4=dense_down(r3)")

_CONV_RE = re.compile(r"dconv(\d+)$")
_INSTR_RE = re.compile(r"^r(\d+)\s*=\s*([a-z_][a-z_0-9]*)\s*\(\s*([^()]*?)\s*\)$")
_REG_RE = re.compile(r"^r(\d+)$")


def conv_width(op: str) -> int | None:
    """The width of a `dconv<w>` op name, else None."""
    m = _CONV_RE.match(op)
    return int(m.group(1)) if m else None


def op_arity(op: str) -> int:
    """Number of source registers of `op`; ValueError for an unknown op."""
    if op in BINARY_FUNCTIONS:
        return 2
    if op in UNARY_FUNCTIONS or op in DENSE_OPS or op == NORM_OP or conv_width(op) is not None:
        return 1
    raise ValueError(f"Unknown op {op!r}; expected one of {sorted(UNARY_FUNCTIONS)}, "
                     f"{sorted(BINARY_FUNCTIONS)}, {list(DENSE_OPS)}, {NORM_OP!r} or "
                     f"dconv1..dconv{CONV_WIDTHS[-1]}.")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """`r{dst} = op(r{srcs[0]}[, r{srcs[1]}])`."""

    op: str
    dst: int
    srcs: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "srcs", tuple(int(s) for s in self.srcs))
        if op_arity(self.op) != len(self.srcs):
            raise ValueError(f"{self.op} takes {op_arity(self.op)} source register(s), got "
                             f"{len(self.srcs)} in {self}.")

    def __str__(self) -> str:
        return f"r{self.dst}={self.op}({','.join(f'r{s}' for s in self.srcs)})"


Path = tuple[Instruction, ...]


def path_output(path: Path) -> int:
    """The register holding a path's result: the last instruction's destination (r0 if empty)."""
    return path[-1].dst if path else 0


def live_positions(path: Path) -> list[int]:
    """Indices of the instructions the path's output depends on, in program order."""
    needed = {path_output(path)}
    keep = []
    for i in reversed(range(len(path))):
        ins = path[i]
        if ins.dst in needed:
            needed.discard(ins.dst)
            needed.update(ins.srcs)
            keep.append(i)
    return keep[::-1]


def live_instructions(path: Path) -> Path:
    """The instructions the path's output depends on, in program order (dead code removed)."""
    return tuple(path[i] for i in live_positions(path))


def _widths(path: Path, positions: Sequence[int] | None = None
            ) -> tuple[list[str], list[str]]:
    """(problems, width of each instruction's result) of a path run in order from r0 (base
    width); `positions` numbers the instructions in messages (default 0, 1, ...)."""
    problems: list[str] = []
    regs: dict[int, str] = {0: BASE}
    out_widths = []
    for i, ins in zip(positions if positions is not None else range(len(path)), path):
        ws = []
        for s in ins.srcs:
            if s not in regs:
                problems.append(f"instruction {i + 1} ({ins}) reads r{s} before it is written")
                ws.append(None)
            else:
                ws.append(regs[s])
        w = ws[0]
        if ins.op == "dense_up":
            w = FF
        elif ins.op == "dense_down":
            w = BASE
        elif ins.op in BINARY_FUNCTIONS:
            if None not in ws and ws[0] != ws[1]:
                problems.append(f"instruction {i + 1} ({ins}): shape mismatch, {ins.op} of a "
                                f"{_width_name(ws[0])} and a {_width_name(ws[1])} register")
            w = ws[0] if ws[0] is not None else ws[1]
        regs[ins.dst] = w if w is not None else BASE
        out_widths.append(regs[ins.dst])
    return problems, out_widths


def _width_name(w: str) -> str:
    return "d_ff-wide" if w == FF else "base-width"


@dataclasses.dataclass(frozen=True)
class BlockProgram:
    """The four paths of a decoder block (see the module docstring)."""

    q: Path = ()
    k: Path = ()
    v: Path = ()
    ffn: Path = ()

    def __post_init__(self):
        for name in PATHS:
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def paths(self) -> dict[str, Path]:
        return {name: getattr(self, name) for name in PATHS}

    def __str__(self) -> str:
        lines = [f"{name}: " + "; ".join(str(i) for i in path)
                 for name, path in self.paths().items() if path]
        return "\n".join(lines)

    def problems(self, max_instructions: int = MAX_INSTRUCTIONS,
                 num_registers: int = NUM_REGISTERS) -> list[str]:
        """Every reason the program cannot run (empty when it can). Every instruction must be
        well formed; reads and shapes are checked on the live instructions, since dead ones are
        never run."""
        out: list[str] = []
        for name, path in self.paths().items():
            where = f"{name} path"
            if len(path) > max_instructions:
                out.append(f"{where}: too many instructions ({len(path)} > {max_instructions})")
            for i, ins in enumerate(path):
                for r in (ins.dst, *ins.srcs):
                    if not 0 <= r < num_registers:
                        out.append(f"{where}: instruction {i + 1} ({ins}) uses r{r}, outside "
                                   f"the register file r0..r{num_registers - 1}")
                w = conv_width(ins.op)
                if w is not None and w not in CONV_WIDTHS:
                    out.append(f"{where}: instruction {i + 1} ({ins}): conv width {w} out of "
                               f"range {CONV_WIDTHS[0]}..{CONV_WIDTHS[-1]}")
            pos = live_positions(path)
            problems, widths = _widths(tuple(path[i] for i in pos), pos)
            out.extend(f"{where}: {p}" for p in problems)
            if name == "ffn":
                if not path:
                    out.append("ffn path: empty; it must end in dense_down to d_model")
                elif path[-1].op != "dense_down":
                    out.append(f"ffn path: must end in dense_down to d_model, ends in "
                               f"{path[-1]}")
            elif widths and widths[-1] != BASE:
                out.append(f"{where}: the output r{path_output(path)} is d_ff wide; it must "
                           f"have the projection's width heads*d_kv")
        return out

    def validate(self, max_instructions: int = MAX_INSTRUCTIONS,
                 num_registers: int = NUM_REGISTERS) -> None:
        """Raises ValueError listing every problem (undefined registers, shape mismatches, an
        ffn not ending in a projection to d_model, too many instructions, a conv width out of
        range, a register outside the file)."""
        problems = self.problems(max_instructions, num_registers)
        if problems:
            raise ValueError("Invalid block program: " + "; ".join(problems) + ".")

    def live(self) -> BlockProgram:
        """The program without dead instructions."""
        return BlockProgram(**{n: live_instructions(p) for n, p in self.paths().items()})


def parse_program(text: str) -> BlockProgram:
    """Parses the text form (one `name: instr; instr; ...` line per path; paths may also be
    separated by `|`). Missing paths are empty. Raises ValueError on a syntax error, an unknown
    path or op, a wrong number of operands, or a path given twice. Shapes are checked by
    `BlockProgram.validate`, not here."""
    if not isinstance(text, str):
        raise ValueError(f"A block program is text, got {type(text).__name__}.")
    paths: dict[str, list[Instruction]] = {}
    for raw in re.split(r"[\n|]", text):
        line = raw.strip()
        if not line:
            continue
        name, sep, body = line.partition(":")
        name = name.strip()
        if not sep or name not in PATHS:
            raise ValueError(f"Cannot parse {line!r}: each line is '<path>: instructions' with "
                             f"path one of {list(PATHS)}.")
        if name in paths:
            raise ValueError(f"The {name} path is given twice.")
        instrs = []
        for part in body.split(";"):
            part = part.strip()
            if not part:
                continue
            m = _INSTR_RE.match(part)
            if not m:
                raise ValueError(f"Cannot parse instruction {part!r} in the {name} path: "
                                 f"expected 'rD=op(rS)' or 'rD=op(rA,rB)'.")
            srcs = []
            for arg in m.group(3).split(","):
                rm = _REG_RE.match(arg.strip())
                if not rm:
                    raise ValueError(f"Cannot parse operand {arg.strip()!r} of {part!r} in the "
                                     f"{name} path: operands are registers r0, r1, ...")
                srcs.append(int(rm.group(1)))
            instrs.append(Instruction(m.group(2), int(m.group(1)), tuple(srcs)))
        paths[name] = instrs
    return BlockProgram(**paths)


@functools.lru_cache(maxsize=256)
def parse_valid(text: str) -> BlockProgram:
    """`parse_program` then `validate` (cached by text)."""
    program = parse_program(text)
    program.validate()
    return program


def parameter_names(path_name: str, path: Path) -> list[str | None]:
    """The parameter (submodule) name of each *live* instruction of `path`, None for
    parameter-free ones (see the module docstring)."""
    families: list[str | None] = []
    prefix = ATTENTION_PATH_PREFIX.get(path_name)
    for i, ins in enumerate(path):
        if ins.op in DENSE_OPS:
            if prefix:
                fam = {"dense": "dense", "dense_up": "up", "dense_down": "down"}[ins.op]
            elif ins.op == "dense_down":
                fam = "wo" if i == len(path) - 1 else "wd"
            else:
                fam = {"dense": "wm", "dense_up": "wi"}[ins.op]
        elif conv_width(ins.op) is not None:
            fam = "dconv"
        elif ins.op == NORM_OP:
            fam = "norm"
        else:
            families.append(None)
            continue
        families.append(f"{prefix}_{fam}" if prefix else fam)
    counts: dict[str, int] = {}
    for f in families:
        if f is not None:
            counts[f] = counts.get(f, 0) + 1
    seen: dict[str, int] = {}
    names: list[str | None] = []
    for f in families:
        if f is None or counts[f] == 1:
            names.append(f)
        else:
            names.append(f"{f}_{seen.get(f, 0)}")
            seen[f] = seen.get(f, 0) + 1
    return names


def run_path(path_name: str, path: Path, x: Array, ff_width: int, dtype: jnp.dtype,
             segment_ids: Array | None, decode: bool,
             before_final: Callable[[Array], Array] | None = None) -> Array:
    """Interprets one path on `x` <dtype>[batch, length, base]; call it inside a compact method:
    the parameters become submodules of that module. `before_final` (e.g. dropout) is applied to
    the input of the last instruction when it is a projection."""
    live = live_instructions(path)
    names = parameter_names(path_name, live)
    base_width = x.shape[-1]
    base_axis = "joined_kv" if path_name in ATTENTION_PATH_PREFIX else "embed"
    axis = {BASE: base_axis, FF: "mlp"}
    problems, widths = _widths(live)
    if problems:
        raise ValueError(f"Invalid {path_name} path: " + "; ".join(problems) + ".")
    regs: dict[int, Array] = {0: x}
    src_widths: dict[int, str] = {0: BASE}
    for i, (ins, name) in enumerate(zip(live, names)):
        args = [regs[s] for s in ins.srcs]
        w_in = src_widths[ins.srcs[0]]
        if ins.op in DENSE_OPS:
            h = args[0]
            if before_final is not None and i == len(live) - 1:
                h = before_final(h)
            features = {"dense": None, "dense_up": ff_width, "dense_down": base_width}[ins.op]
            features = features or h.shape[-1]
            w_out = {"dense": w_in, "dense_up": FF, "dense_down": BASE}[ins.op]
            # A square kernel's input axis is `unmodeled`, as Primer's q_solo_project.
            kernel_axes = ("unmodeled" if w_out == w_in else axis[w_in], axis[w_out])
            y = layers.DenseGeneral(features, kernel_axes, dtype, name=name)(h)
        elif conv_width(ins.op) is not None:
            y = attention.DepthwiseConv(dtype, conv_width(ins.op), axis[w_in], name=name)(
                args[0], segment_ids, decode)
        elif ins.op == NORM_OP:
            y = layers.RMSNorm(dtype=dtype, axis=axis[w_in], name=name)(args[0])
        elif ins.op in BINARY_FUNCTIONS:
            y = BINARY_FUNCTIONS[ins.op](args[0], args[1])
        else:
            y = UNARY_FUNCTIONS[ins.op](args[0])
        regs[ins.dst] = y
        src_widths[ins.dst] = widths[i]
    out = regs[path_output(live)]
    if out.shape[-1] != base_width:
        raise ValueError(f"The {path_name} path gives width {out.shape[-1]}, not {base_width}.")
    return out


class ProgramAttention(attention.MultiHeadDotProductAttention):
    """Self-attention whose projected Q, K and V go through the program's q, k, v paths."""

    q_path: Path = ()
    k_path: Path = ()
    v_path: Path = ()
    ff_width: int = 0

    def transform_projections(self, q: Array, k: Array, v: Array, segment_ids: Array | None,
                              decode: bool) -> tuple[Array, Array, Array]:
        run = lambda name, path, x: run_path(  # noqa: E731
            name, path, x, self.ff_width, self.dtype, segment_ids, decode)
        return run("q", self.q_path, q), run("k", self.k_path, k), run("v", self.v_path, v)


class ProgramMlp(nn.Module):
    """The ffn path as the block's `mlp`; dropout on the input of its final projection (where
    T5's MlpBlock has it)."""

    instructions: Path
    ff_width: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True, segment_ids: Array | None = None,
                 decode: bool = False) -> Array:
        dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
        out = run_path("ffn", self.instructions, x, self.ff_width, self.dtype, segment_ids, decode,
                       before_final=lambda h: dropout(h, deterministic=deterministic))
        return layers.constrain(out, ("batch", "length", "embed"))


def check_config(config: Any) -> BlockProgram:
    """The parsed, validated `config.decoder_program`; ValueError when it is invalid or the
    config asks for something a program block does not have (MoE, Primer switches, post-norm)."""
    program = parse_valid(config.decoder_program)
    clashes = [name for name in ("moe", "encoder_moe") if getattr(config, name, None)]
    clashes += [name for name in ("primer_dconv", "primer_share_qk", "ffn_post_norm")
                if getattr(config, name, False)]
    if clashes:
        raise ValueError(f"decoder_program replaces the attention paths and the MLP of every "
                         f"decoder block; it cannot be combined with {', '.join(clashes)}.")
    return program


class ProgramDecoderLayer(nn.Module):
    """A decoder block running `config.decoder_program`, with `transformer.DecoderLayer`'s
    constructor and call signature (`config` is a `TransformerConfig`)."""

    config: Any
    cross_attention: bool = False
    layer_index: int = 0

    @nn.compact
    def __call__(self, x, bias, deterministic, decode, encoded=None, cross_bias=None,
                 segment_ids=None, positions=None):
        cfg = self.config
        if self.cross_attention or encoded is not None:
            raise ValueError("decoder_program blocks have no cross-attention: use them in "
                             "decoder-only models.")
        program = check_config(cfg)
        dt = cfg.jnp_dtype
        norm_cls = layers.PrimerNorm if cfg.norm_type == "primer" else layers.RMSNorm
        drop = lambda h: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(  # noqa: E731
            h, deterministic=deterministic)
        h = norm_cls(cfg.norm_epsilon, dt, name="pre_self_attention_layer_norm")(x)
        h = ProgramAttention(
            cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dt, rope_theta=cfg.rope,
            scale_logits=cfg.scale_attention_logits, num_kv_heads=cfg.num_kv_heads,
            q_path=program.q, k_path=program.k,
            v_path=program.v, ff_width=cfg.mlp_dim, name="self_attention")(
            h, h, bias, deterministic, decode, segment_ids=segment_ids, positions=positions)
        x = x + drop(h)
        h = norm_cls(cfg.norm_epsilon, dt, name="pre_mlp_layer_norm")(x)
        h = ProgramMlp(program.ffn, cfg.mlp_dim, cfg.dropout_rate, dt, name="mlp")(
            h, deterministic, segment_ids, decode)
        return layers.constrain(x + drop(h), ("batch", "length", "embed"))
