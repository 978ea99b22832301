"""The loss language of Evolving RL (Co-Reyes et al. 2021): a value-based RL loss as a typed DAG.

A program reads six *inputs*, per transition (s_tm1, a_tm1, r_t, s_t) of a batch of B:

    q_tm1      LIST    Q(s_tm1, .) of the online network, <float32>[B, A]
    a_tm1      ACTION  the action taken, <int32>[B]
    r_t        FLOAT   the reward, <float32>[B]
    discount   FLOAT   gamma * (1 - terminated), <float32>[B] (the paper's gamma input, zero at a
                       terminal step so a loss cannot bootstrap past the end of an episode)
    qtarg_t    LIST    Q_target(s_t, .) of the target network, <float32>[B, A]
    q_t        LIST    Q(s_t, .) of the online network, <float32>[B, A]

and computes a sequence of nodes `v<i> = op(args)`, each reading inputs or earlier nodes; the
last node is the per-transition loss (a FLOAT), averaged over the batch. Values have one of four
types: FLOAT (a real per transition), LIST (a vector over actions), PROB (a distribution over
actions) and ACTION (an action index). Each op has a list of signatures (`SIGNATURES`); a program
is well typed when every node's argument types match one of its op's signatures, the last node
is a FLOAT, and the loss depends differentiably on `q_tm1` (otherwise no gradient reaches the
network). `LossProgram.check` returns the node types or raises `LossTypeError` with the reason.

`l2dist` is the reference's "L2 distance": 0.5 * mean squared difference (so on FLOATs
0.5 * (x - y)^2), reproduced faithfully because it fixes the 0.1 * Q regulariser's weight in
DQNReg. Unsafe ops are made total as in the reference: `log` is log(|x| + 1e-6), `div` divides by
max(|y|, 1e-6) with y's sign, `exp` clips its input at 20.

Programs run two ways:
- `evaluate(program, inputs)`: op by op in JAX (probes, fingerprints, tests);
- `interpret(arrays, inputs)`: a fixed-size interpreter over `program_arrays(program)` (op codes
  and argument registers as int32 arrays) with `lax.switch`, so one compiled DQN serves every
  program of up to `MAX_NODES` nodes and a search does not recompile per candidate. Every value is
  held as a [B, A] array there: a FLOAT repeated over the actions, an ACTION as its one-hot. Each
  op is written so that on this layout it computes the same as on the typed values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT, LIST, PROB, ACTION = "FLOAT", "LIST", "PROB", "ACTION"
INPUTS: tuple[tuple[str, str], ...] = (
    ("q_tm1", LIST), ("a_tm1", ACTION), ("r_t", FLOAT), ("discount", FLOAT),
    ("qtarg_t", LIST), ("q_t", LIST))
INPUT_NAMES = tuple(n for n, _ in INPUTS)
NUM_INPUTS = len(INPUTS)
MAX_NODES = 16
EPS = 1e-6

_ARITH = [((FLOAT, FLOAT), FLOAT), ((LIST, LIST), LIST), ((FLOAT, LIST), LIST),
          ((LIST, FLOAT), LIST)]
_ELEMWISE = [((FLOAT,), FLOAT), ((LIST,), LIST)]
# Op -> its signatures [(argument types, result type)].
SIGNATURES: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "add": _ARITH, "sub": _ARITH, "mul": _ARITH,
    "max": _ARITH, "min": _ARITH,
    "div": [((FLOAT, FLOAT), FLOAT), ((LIST, LIST), LIST), ((LIST, FLOAT), LIST)],
    "l2dist": [((FLOAT, FLOAT), FLOAT), ((LIST, LIST), FLOAT)],
    "dot": [((LIST, LIST), FLOAT), ((PROB, LIST), FLOAT), ((LIST, PROB), FLOAT)],
    "select": [((LIST, ACTION), FLOAT), ((PROB, ACTION), FLOAT)],
    "max_list": [((LIST,), FLOAT)], "min_list": [((LIST,), FLOAT)],
    "mean_list": [((LIST,), FLOAT)], "logsumexp": [((LIST,), FLOAT)],
    "argmax": [((LIST,), ACTION)],
    "softmax": [((LIST,), PROB)],
    "entropy": [((PROB,), FLOAT)],
    "kl": [((PROB, PROB), FLOAT)],
    "log": _ELEMWISE, "exp": _ELEMWISE, "abs": _ELEMWISE, "neg": _ELEMWISE,
    "mul_tenth": _ELEMWISE,
}
OPS = tuple(SIGNATURES)
ARITY = {op: len(sigs[0][0]) for op, sigs in SIGNATURES.items()}
# Ops through which no gradient flows (the result is piecewise constant).
NON_DIFFERENTIABLE = frozenset({"argmax"})


class LossTypeError(ValueError):
    """An ill-typed loss program; the message says which node and why."""


@dataclasses.dataclass(frozen=True)
class Node:
    """v = op(args): `args` are register numbers (inputs 0..5, then the nodes in order)."""

    op: str
    args: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LossProgram:
    """A loss as a straight-line program over registers; node i writes register 6 + i."""

    nodes: tuple[Node, ...]

    def register_name(self, r: int) -> str:
        return INPUT_NAMES[r] if r < NUM_INPUTS else f"v{r - NUM_INPUTS}"

    def text(self) -> str:
        return "; ".join(
            f"v{i} = {n.op}({', '.join(self.register_name(a) for a in n.args)})"
            for i, n in enumerate(self.nodes))

    def check(self) -> list[str]:
        """The type of every register; raises LossTypeError with the reason when ill typed."""
        if not self.nodes:
            raise LossTypeError("the program has no nodes; the last node is the loss.")
        types = [t for _, t in INPUTS]
        grad = [name == "q_tm1" for name in INPUT_NAMES]  # depends differentiably on q_tm1
        for i, node in enumerate(self.nodes):
            where = f"node v{i} = {node.op}(...)"
            if node.op not in SIGNATURES:
                raise LossTypeError(f"{where}: unknown op {node.op!r}; known: {', '.join(OPS)}.")
            if len(node.args) != ARITY[node.op]:
                raise LossTypeError(f"{where}: takes {ARITY[node.op]} argument(s), got "
                                    f"{len(node.args)}.")
            for a in node.args:
                if not 0 <= a < len(types):
                    raise LossTypeError(f"{where}: reads register {a}, which is not an input "
                                        f"or an earlier node (0..{len(types) - 1}).")
            found = tuple(types[a] for a in node.args)
            out = [res for sig, res in SIGNATURES[node.op] if sig == found]
            if not out:
                allowed = " or ".join(f"({', '.join(s)})" for s, _ in SIGNATURES[node.op])
                raise LossTypeError(f"{where}: arguments of types ({', '.join(found)}) but "
                                    f"{node.op} takes {allowed}.")
            types.append(out[0])
            grad.append(node.op not in NON_DIFFERENTIABLE and any(grad[a] for a in node.args))
        if types[-1] != FLOAT:
            raise LossTypeError(f"the last node (the loss) must be a FLOAT per transition, "
                                f"found {types[-1]}.")
        if not grad[-1]:
            raise LossTypeError("the loss does not depend differentiably on q_tm1: no gradient "
                                "would reach the Q-network.")
        return types

    def live(self) -> tuple[Node, ...]:
        """The nodes the loss reads (dead ones dropped, registers renumbered)."""
        used = {NUM_INPUTS + len(self.nodes) - 1}
        for i in range(len(self.nodes) - 1, -1, -1):
            if NUM_INPUTS + i in used:
                used.update(self.nodes[i].args)
        keep = [i for i in range(len(self.nodes)) if NUM_INPUTS + i in used]
        renum = {r: r for r in range(NUM_INPUTS)}
        renum.update({NUM_INPUTS + i: NUM_INPUTS + k for k, i in enumerate(keep)})
        return tuple(Node(self.nodes[i].op, tuple(renum[a] for a in self.nodes[i].args))
                     for i in keep)


_NODE_RE = re.compile(r"^\s*(v\d+)\s*=\s*(\w+)\s*\(([^)]*)\)\s*$")


def parse(text: str) -> LossProgram:
    """The program of `text` ("v0 = max_list(qtarg_t); v1 = mul(discount, v0); ...")."""
    names = {n: i for i, n in enumerate(INPUT_NAMES)}
    nodes = []
    for part in [p for p in text.replace("\n", ";").split(";") if p.strip()]:
        m = _NODE_RE.match(part)
        if not m:
            raise ValueError(f"cannot parse {part.strip()!r}: expected 'v<i> = op(arg, ...)'.")
        dst, op, args = m.groups()
        if dst != f"v{len(nodes)}":
            raise ValueError(f"{part.strip()!r}: nodes must be numbered in order, expected "
                             f"v{len(nodes)}.")
        regs = []
        for a in [a.strip() for a in args.split(",") if a.strip()]:
            if a not in names:
                raise ValueError(f"{part.strip()!r}: unknown register {a!r}.")
            regs.append(names[a])
        nodes.append(Node(op, tuple(regs)))
        names[dst] = NUM_INPUTS + len(nodes) - 1
    return LossProgram(tuple(nodes))


# ------------------------------------------------------------------ the reference programs
_TD_TARGET = "v0 = max_list(qtarg_t); v1 = mul(discount, v0); v2 = add(r_t, v1); " \
             "v3 = select(q_tm1, a_tm1)"
PROGRAMS = {
    # 0.5 * (Q(s,a) - (r + gamma * max_a' Q_targ(s',a')))^2
    "dqn": _TD_TARGET + "; v4 = l2dist(v3, v2)",
    # The target network evaluates the online network's greedy action at s'.
    "double_dqn": "v0 = argmax(q_t); v1 = select(qtarg_t, v0); v2 = mul(discount, v1); "
                  "v3 = add(r_t, v2); v4 = select(q_tm1, a_tm1); v5 = l2dist(v4, v3)",
    # DQNReg: 0.5 * delta^2 + 0.1 * Q(s,a).
    "dqn_reg": _TD_TARGET + "; v4 = l2dist(v3, v2); v5 = mul_tenth(v3); v6 = add(v4, v5)",
    # DQNClipped (paper eq. 2): max(Q(s,a), delta^2 + Y) + max(Q(s,a) - Y, gamma*(max Q_targ)^2)
    # with Y the TD target, delta^2 written as the language's l2dist (0.5 * delta^2).
    "dqn_clipped": _TD_TARGET + "; v4 = l2dist(v3, v2); v5 = add(v4, v2); v6 = max(v3, v5); "
                   "v7 = sub(v3, v2); v8 = mul(v0, v0); v9 = mul(discount, v8); "
                   "v10 = max(v7, v9); v11 = add(v6, v10)",
    # CQL(H): the DQN loss plus logsumexp_a Q(s,a) - Q(s,a) (alpha = 1).
    "cql": _TD_TARGET + "; v4 = l2dist(v3, v2); v5 = logsumexp(q_tm1); v6 = sub(v5, v3); "
           "v7 = add(v4, v6)",
}


def program(name: str) -> LossProgram:
    """A reference program by name (`PROGRAMS`)."""
    if name not in PROGRAMS:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(PROGRAMS)}.")
    return parse(PROGRAMS[name])


# ------------------------------------------------------------------------- op by op in JAX
def _safe_div(x, y):
    return x / jnp.where(jnp.abs(y) < EPS, jnp.where(y < 0, -EPS, EPS), y)


def _typed_op(op: str, args: Sequence[jax.Array], types: Sequence[str]) -> jax.Array:
    """`op` on typed values: FLOAT [B], LIST/PROB [B, A], ACTION int [B]."""
    def lift(x, t, other):  # a FLOAT beside a LIST broadcasts over the actions
        return x[:, None] if t == FLOAT and other == LIST else x

    if op in ("add", "sub", "mul", "max", "min", "div"):
        x, y = lift(args[0], types[0], types[1]), lift(args[1], types[1], types[0])
        fn = {"add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "max": jnp.maximum,
              "min": jnp.minimum, "div": _safe_div}[op]
        return fn(x, y)
    x = args[0]
    if op == "l2dist":
        d = jnp.square(x - args[1])
        return 0.5 * (d if types[0] == FLOAT else jnp.mean(d, -1))
    if op == "dot":
        return jnp.sum(x * args[1], -1)
    if op == "select":
        return jnp.take_along_axis(x, args[1][:, None].astype(jnp.int32), -1)[:, 0]
    if op == "kl":
        return jnp.sum(x * (jnp.log(x + EPS) - jnp.log(args[1] + EPS)), -1)
    return _UNARY[op](x)


_UNARY: dict[str, Callable[[jax.Array], jax.Array]] = {
    "max_list": lambda x: jnp.max(x, -1), "min_list": lambda x: jnp.min(x, -1),
    "mean_list": lambda x: jnp.mean(x, -1),
    "logsumexp": lambda x: jax.nn.logsumexp(x, -1),
    "argmax": lambda x: jnp.argmax(x, -1).astype(jnp.int32),
    "softmax": lambda x: jax.nn.softmax(x, -1),
    "entropy": lambda p: -jnp.sum(p * jnp.log(p + EPS), -1),
    "log": lambda x: jnp.log(jnp.abs(x) + EPS), "exp": lambda x: jnp.exp(jnp.minimum(x, 20.0)),
    "abs": jnp.abs, "neg": jnp.negative, "mul_tenth": lambda x: 0.1 * x,
}


def evaluate(prog: LossProgram, inputs: dict[str, jax.Array]) -> jax.Array:
    """The per-transition loss <float32>[B] of a well-typed program on `inputs` (`INPUTS`)."""
    types = prog.check()
    regs = [inputs[n] for n in INPUT_NAMES]
    for node in prog.nodes:
        regs.append(_typed_op(node.op, [regs[a] for a in node.args],
                              [types[a] for a in node.args]))
    return regs[-1]


# ----------------------------------------------------------- the fixed-size array interpreter
def program_arrays(prog: LossProgram, max_nodes: int = MAX_NODES) -> dict[str, np.ndarray]:
    """The program as arrays for `interpret`: its live nodes, then padding that copies the loss.

    Returns {'ops': <int32>[max_nodes], 'args': <int32>[max_nodes, 2]}; the loss is the last
    register.
    """
    prog.check()
    nodes = prog.live()
    if len(nodes) > max_nodes:
        raise LossTypeError(f"the program has {len(nodes)} live nodes; at most {max_nodes} run.")
    ops = np.full([max_nodes], len(OPS), np.int32)  # len(OPS): copy the previous register
    args = np.zeros([max_nodes, 2], np.int32)
    for i, n in enumerate(nodes):
        ops[i] = OPS.index(n.op)
        args[i, :len(n.args)] = n.args
    for i in range(len(nodes), max_nodes):
        args[i, 0] = NUM_INPUTS + i - 1
    return {"ops": ops, "args": args}


def _dense_branch(op: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`op` on the [B, A] layout (FLOAT repeated over actions, ACTION one-hot)."""
    def fn(x, y):
        def reduce(v):  # a per-transition value back onto the layout
            return jnp.broadcast_to(v[:, None], x.shape)

        if op in ("add", "sub", "mul", "max", "min", "div"):
            return {"add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply,
                    "max": jnp.maximum, "min": jnp.minimum, "div": _safe_div}[op](x, y)
        if op == "l2dist":  # a FLOAT pair is constant over actions: the mean is 0.5*(x-y)^2
            return reduce(0.5 * jnp.mean(jnp.square(x - y), -1))
        if op in ("dot", "select"):
            return reduce(jnp.sum(x * y, -1))
        if op == "kl":
            return reduce(jnp.sum(x * (jnp.log(x + EPS) - jnp.log(y + EPS)), -1))
        if op == "argmax":
            return jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=x.dtype)
        if op in ("softmax", "log", "exp", "abs", "neg", "mul_tenth"):
            return _UNARY[op](x)
        return reduce(_UNARY[op](x))

    return fn


_BRANCHES = [_dense_branch(op) for op in OPS] + [lambda x, y: x]


def interpret(arrays: dict[str, jax.Array], inputs: dict[str, jax.Array]) -> jax.Array:
    """The per-transition loss <float32>[B] of `program_arrays(...)` on `inputs`, traceable
    with the program as data (`lax.switch` per node)."""
    q = inputs["q_tm1"]
    b, a = q.shape

    def layout(name, x):
        if name == "a_tm1":
            return jax.nn.one_hot(x, a, dtype=q.dtype)
        return jnp.broadcast_to(x[:, None], (b, a)) if x.ndim == 1 else x

    regs = jnp.stack([layout(n, inputs[n].astype(q.dtype) if n != "a_tm1" else inputs[n])
                      for n in INPUT_NAMES])
    max_nodes = arrays["ops"].shape[0]
    # Shape: regs [NUM_INPUTS + max_nodes, B, A], filled node by node. A scan over the nodes
    # (not a Python loop) compiles the op branches once, whatever max_nodes is.
    regs = jnp.concatenate([regs, jnp.zeros((max_nodes, b, a), q.dtype)])

    def node(regs, i):
        x, y = regs[arrays["args"][i, 0]], regs[arrays["args"][i, 1]]
        value = jax.lax.switch(arrays["ops"][i], _BRANCHES, x, y)
        return jax.lax.dynamic_update_index_in_dim(regs, value, NUM_INPUTS + i, 0), None

    regs, _ = jax.lax.scan(node, regs, jnp.arange(max_nodes))
    return regs[-1][:, 0]


# --------------------------------------------------------------------------- fingerprints
def probe_inputs(batch: int = 16, num_actions: int = 4, seed: int = 0) -> dict[str, jax.Array]:
    """Fixed random inputs on which programs are compared (Q-values around typical scales)."""
    rng = np.random.default_rng(seed)
    return {"q_tm1": jnp.asarray(rng.normal(1.0, 2.0, (batch, num_actions)), jnp.float32),
            "a_tm1": jnp.asarray(rng.integers(0, num_actions, batch), jnp.int32),
            "r_t": jnp.asarray(rng.normal(0.0, 1.0, batch), jnp.float32),
            "discount": jnp.asarray(0.99 * (rng.random(batch) > 0.2), jnp.float32),
            "qtarg_t": jnp.asarray(rng.normal(1.0, 2.0, (batch, num_actions)), jnp.float32),
            "q_t": jnp.asarray(rng.normal(1.0, 2.0, (batch, num_actions)), jnp.float32)}


def fingerprint(prog: LossProgram, decimals: int = 4) -> str:
    """A hash of the program's outputs and of their gradient w.r.t. q_tm1 on `probe_inputs`,
    rounded: programs that compute the same loss (dead nodes, reordered commutative arguments,
    algebraic rewrites) share it."""
    inputs = probe_inputs()

    def total(q):
        return jnp.sum(evaluate(prog, {**inputs, "q_tm1": q}))

    out = np.asarray(evaluate(prog, inputs), np.float64)
    grad = np.asarray(jax.grad(total)(inputs["q_tm1"]), np.float64)
    data = np.concatenate([out.ravel(), grad.ravel()])
    data = np.where(np.isfinite(data), np.round(data, decimals), np.nan) + 0.0  # -0.0 -> 0.0
    return hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()[:16]
