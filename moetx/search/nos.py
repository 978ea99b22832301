"""Neural Optimizer Search (Bello et al. 2017): the update-rule language, its optax runtime and its
PyGlove search space.

An update rule is a small program over per-element *operands* of the gradient g, the parameter w
and running statistics, built from unary and binary functions:

    rule    := binary(unary(operand), unary(operand))
    operand := NAME | rule            (an operand may itself be a binary: nesting)

It gives a direction d, and the parameter moves by -lr(t) * d (so SGD is d = g). The symbolic
classes are `Unary(fn, x)` and `Binary(fn, left, right)` (PyGlove `pg.Object`s; `x` is an operand
name or a `Binary`, a Binary's arguments are always `Unary`s). A rule is a `Binary`.

Text form (`parse_rule`, `Binary.text()`, `str(rule)`): calls with comma-separated arguments, e.g.
`mul(exp(mul(sign_g, sign_m)), g)`. `identity` is implied for a binary's argument written without
a unary and is not printed, so `mul(identity(g), one)` and `mul(g, one)` parse to the same rule,
which prints as `mul(g, one)`; a unary's argument is an operand or a binary, never a unary.

Operands (`OPERANDS`; hats are bias-corrected running averages, as Adam's):

    g, g2, g3        the gradient, g^2, g^3
    m, v, y          m-hat (of g, beta1 = 0.9), v-hat (of g^2, beta2 = 0.999),
                     gamma-hat (of g^3, beta3 = 0.999)
    sign_g, sign_m   sign(g), sign(m-hat)
    one, two         the constants 1 and 2
    noise            eps ~ N(0, 0.01) per element (variance 0.01, standard deviation 0.1), fresh at
                     every step from a seeded key carried in the optimizer state
    wd1 .. wd4       10^-1 w .. 10^-4 w (w: the parameter)
    adam             m-hat / (sqrt(v-hat) + 1e-8)
    rmsprop          g / (sqrt(v-hat) + 1e-8)
    ld, cd, rd       the sign decays of the step: linear, cyclical (cosine) and restart
                     (`moetx.trainer.optimizers.linear_sign_decay / cosine_sign_decay /
                     restart_sign_decay` over `decay_steps`), evaluated at the number of updates
                     already made (0 at the first update), as the PowerSign optimizer does

Unary functions (`UNARIES`): identity, neg (-x), exp, log_abs (log|x|), sqrt_abs (sqrt|x|),
clip3 / clip4 / clip5 (x clipped into [-10^-k, 10^-k]), drop10 / drop30 / drop50 (each element is
zeroed with probability 0.1 / 0.3 / 0.5 by a fresh seeded Bernoulli mask; the kept elements are NOT
rescaled by 1/(1-p), so the expected direction shrinks by 1-p), sign.

Binary functions (`BINARIES`): add (x+y), sub (x-y), mul (x*y), div (x / (y + 1e-8)), pow (x**y as
written: NaN for a negative base and a non-integer exponent), keep_left (x).

The optimizer state holds the update count plus only the slots the rule reads: m for m / sign_m /
adam, v for v / adam / rmsprop, y for y, and a PRNG key for noise and the drop functions.

Known programs, as text: `SGD`, `MOMENTUM` (m-hat: the bias-corrected EMA), `ADAM`, `RMSPROP`
(bias-corrected v, eps outside the root, as the paper's operand), `POWERSIGN` (e^(sign(g) sign(m))
g), `ADDSIGN` ((1 + sign(g) sign(m)) g) and the sign-decayed `POWERSIGN_LD/CD/RD` and
`ADDSIGN_LD/CD/RD` (the decay multiplies the sign agreement); `NAMED_RULES` maps names to them. The
PowerSign/AddSign programs compute exactly what `moetx.trainer.optimizers.powersign / addsign`
compute (sign(m-hat) = sign(m)).

Selecting a rule by gin:

    import moetx.search.nos
    make_optimizer.optimizer_fn = @rule_optimizer
    rule_optimizer.rule = 'mul(exp(mul(sign_g, sign_m)), g)'

Search space (`rule_space`): depth 1 is binary(unary(op), unary(op)); at depth d an operand may also
be a rule of depth d-1 (one more choice in each operand's `pg.oneof`). The depth of a rule is the
longest chain of nested binaries: SGD/Adam/... have depth 1, PowerSign depth 2, AddSign and the
decayed PowerSigns depth 3 (`mul(add(one, mul(sign_g, sign_m)), g)`: the agreement sits inside the
add inside the mul), the decayed AddSigns depth 4. The default `max_depth` is 3 so that PowerSign,
AddSign and the decayed PowerSigns are reachable; pass `max_depth=4` for the decayed AddSigns.
(AddSign-like rules also exist lower down: `add(g, mul(sign_m, sqrt_abs(g2)))` = g + sign(m)|g|
computes AddSign's direction, up to rounding, at depth 2.)

Candidate protocol (for `moetx.search.evolution`): a materialised rule has `validate()`,
`gin_bindings()`, `fingerprint()` and `text()`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any, Callable, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyglove as pg

from moetx.trainer import optimizers

Array = jax.Array

# ------------------------------------------------------------------------------ vocabulary
OPERANDS: tuple[str, ...] = (
    "g", "g2", "g3", "m", "v", "y", "sign_g", "sign_m", "one", "two", "noise",
    "wd1", "wd2", "wd3", "wd4", "adam", "rmsprop", "ld", "cd", "rd")
UNARIES: tuple[str, ...] = (
    "identity", "neg", "exp", "log_abs", "sqrt_abs", "clip3", "clip4", "clip5",
    "drop10", "drop30", "drop50", "sign")
BINARIES: tuple[str, ...] = ("add", "sub", "mul", "div", "pow", "keep_left")

# Operands computed from the gradient (directly or through its running averages).
GRADIENT_OPERANDS: frozenset[str] = frozenset(
    {"g", "g2", "g3", "m", "v", "y", "sign_g", "sign_m", "adam", "rmsprop"})
DECAY_OPERANDS: tuple[str, ...] = ("ld", "cd", "rd")
_NEEDS_M = frozenset({"m", "sign_m", "adam"})
_NEEDS_V = frozenset({"v", "adam", "rmsprop"})
_NEEDS_PARAMS = frozenset({"wd1", "wd2", "wd3", "wd4"})
_DROP_PROB = {"drop10": 0.1, "drop30": 0.3, "drop50": 0.5}
_CLIP = {"clip3": 1e-3, "clip4": 1e-4, "clip5": 1e-5}
NOISE_STDDEV = 0.1  # N(0, 0.01): variance 0.01.
DIV_EPS = 1e-8
ADAM_EPS = 1e-8

_UNARY_FNS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "neg": lambda x: -x,
    "exp": jnp.exp,
    "log_abs": lambda x: jnp.log(jnp.abs(x)),
    "sqrt_abs": lambda x: jnp.sqrt(jnp.abs(x)),
    **{name: (lambda c: lambda x: jnp.clip(x, -c, c))(c) for name, c in _CLIP.items()},
    "sign": jnp.sign,
}
_BINARY_FNS: dict[str, Callable[[Array, Array], Array]] = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / (y + DIV_EPS),
    "pow": jnp.power,
    "keep_left": lambda x, y: x,
}


def _is_hyper(value: Any) -> bool:
    return isinstance(value, pg.hyper.HyperValue)


# ------------------------------------------------------------------------ symbolic classes
class Expr(pg.Object):
    """A node of an update rule (`Unary` or `Binary`)."""

    def text(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        if not pg.is_deterministic(self):
            return self.format(compact=True)
        return self.text()


@pg.members([
    ("fn", pg.typing.Str(), f"The unary function, one of {', '.join(UNARIES)}."),
    ("x", pg.typing.Union([pg.typing.Str(), pg.typing.Object(Expr)]),
     "An operand name or a `Binary`."),
])
class Unary(Expr):
    """fn(x): a unary function of an operand or of a binary sub-rule."""

    def _on_bound(self):
        super()._on_bound()
        if not _is_hyper(self.fn) and self.fn not in UNARIES:
            raise ValueError(f"Unknown unary function {self.fn!r}; expected one of "
                             f"{', '.join(UNARIES)}.")
        if isinstance(self.x, str) and self.x not in OPERANDS:
            raise ValueError(f"Unknown operand {self.x!r}; expected one of {', '.join(OPERANDS)}.")
        if isinstance(self.x, Unary):
            raise ValueError("A unary function applies to an operand or a binary function, not to "
                             f"another unary function ({self.x.fn!r}).")

    def text(self) -> str:
        inner = self.x if isinstance(self.x, str) else self.x.text()
        return inner if self.fn == "identity" else f"{self.fn}({inner})"


@pg.members([
    ("fn", pg.typing.Str(), f"The binary function, one of {', '.join(BINARIES)}."),
    ("left", pg.typing.Object(Unary), "The first argument."),
    ("right", pg.typing.Object(Unary), "The second argument."),
])
class Binary(Expr):
    """fn(left, right): an update rule (at the top) or a nested operand.

    Candidate protocol: `validate()`, `gin_bindings()`, `fingerprint()`, `text()`; the optimizer
    is `to_optax(...)` (direction only) or `rule_optimizer(rule=text, ...)` (with the learning
    rate)."""

    def _on_bound(self):
        super()._on_bound()
        if not _is_hyper(self.fn) and self.fn not in BINARIES:
            raise ValueError(f"Unknown binary function {self.fn!r}; expected one of "
                             f"{', '.join(BINARIES)}.")

    # ----- structure
    def text(self) -> str:
        """The canonical program text (identity unaries omitted); `parse_rule` reads it back."""
        return f"{self.fn}({self.left.text()}, {self.right.text()})"

    def depth(self) -> int:
        """Longest chain of nested binaries (1 for binary(unary(op), unary(op)))."""
        return 1 + max((u.x.depth() for u in (self.left, self.right) if isinstance(u.x, Binary)),
                       default=0)

    def operands(self) -> frozenset[str]:
        """The operand names the rule reads."""
        out: set[str] = set()
        for u in (self.left, self.right):
            out |= {u.x} if isinstance(u.x, str) else u.x.operands()
        return frozenset(out)

    def unary_nodes(self) -> list[Unary]:
        """The Unary nodes in a fixed (pre-)order; their index seeds the drop masks."""
        out: list[Unary] = []
        for u in (self.left, self.right):
            out.append(u)
            if isinstance(u.x, Binary):
                out.extend(u.x.unary_nodes())
        return out

    def depends_on_gradient(self) -> bool:
        """Statically: does a gradient-derived operand reach the output? (`keep_left` drops its
        right argument; every other function keeps both.)"""
        args = (self.left,) if self.fn == "keep_left" else (self.left, self.right)
        return any(u.x in GRADIENT_OPERANDS if isinstance(u.x, str) else u.x.depends_on_gradient()
                   for u in args)

    def _require_concrete(self) -> None:
        if not pg.is_deterministic(self):
            raise ValueError(f"The rule still contains choices (a search space, not a rule): "
                             f"{self.format(compact=True)}")

    # ----- runtime
    def to_optax(self, beta1: float = 0.9, beta2: float = 0.999, beta3: float = 0.999,
                 decay_steps: int | None = None, cosine_periods: float = 0.5,
                 restart_periods: float = 1.0, seed: int = 0) -> optax.GradientTransformation:
        """The transformation from gradients to the direction d (the update is -lr * d: chain
        `optax.scale_by_learning_rate`). `decay_steps` is required when the rule reads ld, cd or
        rd; `cosine_periods` / `restart_periods` are the periods of cd / rd over it."""
        return rule_transformation(self, beta1=beta1, beta2=beta2, beta3=beta3,
                                   decay_steps=decay_steps, cosine_periods=cosine_periods,
                                   restart_periods=restart_periods, seed=seed)

    # ----- candidate protocol
    def validate(self) -> None:
        """Raises ValueError with the reason when the rule cannot train: it still has choices, no
        gradient-derived operand reaches its output, its direction is not finite on the probe
        gradients, or its direction does not change when the probe gradients do."""
        self._require_concrete()
        if not self.depends_on_gradient():
            dropped = " (keep_left drops its right argument)" if self.fn == "keep_left" else ""
            names = ", ".join(o for o in OPERANDS if o in GRADIENT_OPERANDS)
            raise ValueError(f"{self.text()}: the update does not depend on the gradient: no "
                             f"gradient operand ({names}) reaches the output{dropped}.")
        text = self.text()
        first = _probe_directions(text, 0)
        bad = [i for i, step in enumerate(first) if not all(np.isfinite(d).all() for d in step)]
        if bad:
            raise ValueError(f"{text}: the update is not finite (NaN or inf) on the probe "
                             f"gradients (first at step {bad[0] + 1}).")
        second = _probe_directions(text, 1)
        if all(np.array_equal(a, b) for s1, s2 in zip(first, second) for a, b in zip(s1, s2)):
            raise ValueError(f"{text}: the update is the same for different gradients (it cannot "
                             f"follow the loss).")

    def gin_bindings(self) -> list[str]:
        """Gin lines that make an ordinary moetx run train with this rule."""
        self._require_concrete()
        return ["import moetx.search.nos",
                "make_optimizer.optimizer_fn = @rule_optimizer",
                f"rule_optimizer.rule = '{self.text()}'"]

    def fingerprint(self) -> str:
        """sha1 of the directions the rule computes on a fixed seeded probe (two small parameter
        tensors, 6 steps of seeded gradients whose signs flip after step 3, decay_steps 8),
        rounded to 5 significant digits; NaN and inf are hashed as such."""
        self._require_concrete()
        h = hashlib.sha1()
        for step in _probe_directions(self.text(), 0):
            for d in step:
                h.update(_round_text(d).encode())
                h.update(b";")
            h.update(b"|")
        return h.hexdigest()


# ----------------------------------------------------------------------------------- parser
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([(),]))")


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            start = len(text) - len(text[pos:].lstrip())
            raise ValueError(f"Unexpected character {text[start]!r} at position {start} in "
                             f"{text!r}.")
        tokens.append((match.group(1) or match.group(2), match.start(match.lastindex)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, message: str) -> ValueError:
        pos = self.tokens[self.i][1] if self.i < len(self.tokens) else len(self.text)
        return ValueError(f"{message} (at position {pos} in {self.text!r})")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise self.error("Unexpected end of the rule" + (
                f": expected {expected!r}" if expected else ""))
        if expected is not None and tok != expected:
            raise self.error(f"Expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def term(self) -> str | Unary | Binary:
        name = self.take()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            self.i -= 1
            raise self.error(f"Expected an operand or a function, got {name!r}")
        if self.peek() != "(":
            if name in OPERANDS:
                return name
            if name in UNARIES or name in BINARIES:
                self.i -= 1
                raise self.error(f"{name!r} is a function: write {name}(...)")
            self.i -= 1
            raise self.error(f"Unknown operand {name!r}; operands are {', '.join(OPERANDS)}")
        if name in OPERANDS:
            self.i -= 1
            raise self.error(f"Operand {name!r} takes no arguments")
        if name not in UNARIES and name not in BINARIES:
            self.i -= 1
            raise self.error(f"Unknown function {name!r}; unary: {', '.join(UNARIES)}; "
                             f"binary: {', '.join(BINARIES)}")
        start = self.i - 1
        self.take("(")
        args = [self.term()]
        while self.peek() == ",":
            self.take(",")
            args.append(self.term())
        self.take(")")
        arity = 1 if name in UNARIES else 2
        if len(args) != arity:
            self.i = start
            raise self.error(f"{name!r} takes {arity} argument{'s' * (arity > 1)}, got "
                             f"{len(args)}")
        if name in UNARIES:
            if isinstance(args[0], Unary):
                self.i = start
                raise self.error(f"The argument of {name!r} must be an operand or a binary "
                                 f"function, not the unary {args[0].fn!r}")
            return Unary(name, args[0])
        left, right = (a if isinstance(a, Unary) else Unary("identity", a) for a in args)
        return Binary(name, left, right)


def parse_rule(text: str) -> Binary:
    """Parses the text form of a rule (see the module docstring) into its canonical `Binary`.

    Raises ValueError for unknown names, wrong arity, a rule that is not a binary at the top,
    or text left over after the rule."""
    if not isinstance(text, str):
        raise ValueError(f"A rule's text must be a string, got {type(text).__name__}.")
    parser = _Parser(text)
    if not parser.tokens:
        raise ValueError("Empty rule text.")
    node = parser.term()
    if parser.peek() is not None:
        raise parser.error("Trailing text after the rule")
    if not isinstance(node, Binary):
        shown = node if isinstance(node, str) else node.text()
        raise ValueError(f"A rule is a binary function at the top, e.g. keep_left({shown}, one); "
                         f"got {text!r}.")
    return node


def as_rule(rule: str | Binary) -> Binary:
    """A rule from its text or itself."""
    if isinstance(rule, Binary):
        rule._require_concrete()
        return rule
    return parse_rule(rule)


# --------------------------------------------------------------------------- known programs
SGD = "keep_left(g, one)"
MOMENTUM = "keep_left(m, one)"
ADAM = "keep_left(adam, one)"
RMSPROP = "keep_left(rmsprop, one)"
POWERSIGN = "mul(exp(mul(sign_g, sign_m)), g)"
ADDSIGN = "mul(add(one, mul(sign_g, sign_m)), g)"
POWERSIGN_LD = "mul(exp(mul(ld, mul(sign_g, sign_m))), g)"
POWERSIGN_CD = "mul(exp(mul(cd, mul(sign_g, sign_m))), g)"
POWERSIGN_RD = "mul(exp(mul(rd, mul(sign_g, sign_m))), g)"
ADDSIGN_LD = "mul(add(one, mul(ld, mul(sign_g, sign_m))), g)"
ADDSIGN_CD = "mul(add(one, mul(cd, mul(sign_g, sign_m))), g)"
ADDSIGN_RD = "mul(add(one, mul(rd, mul(sign_g, sign_m))), g)"
NAMED_RULES: dict[str, str] = {
    "sgd": SGD, "momentum": MOMENTUM, "adam": ADAM, "rmsprop": RMSPROP,
    "powersign": POWERSIGN, "addsign": ADDSIGN,
    "powersign_ld": POWERSIGN_LD, "powersign_cd": POWERSIGN_CD, "powersign_rd": POWERSIGN_RD,
    "addsign_ld": ADDSIGN_LD, "addsign_cd": ADDSIGN_CD, "addsign_rd": ADDSIGN_RD,
}


# -------------------------------------------------------------------------------- runtime
class RuleState(NamedTuple):
    """Updates made so far and the slots the rule reads (None when unused)."""

    count: Array
    m: Any = None
    v: Any = None
    y: Any = None
    key: Array | None = None


def _check_beta(name: str, beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}.")


def rule_transformation(rule: str | Binary, beta1: float = 0.9, beta2: float = 0.999,
                        beta3: float = 0.999, decay_steps: int | None = None,
                        cosine_periods: float = 0.5, restart_periods: float = 1.0,
                        seed: int = 0) -> optax.GradientTransformation:
    """The optax transformation computing a rule's direction d (see `Binary.to_optax`)."""
    rule = as_rule(rule)
    for name, beta in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        _check_beta(name, beta)
    used = rule.operands()
    unary_nodes = rule.unary_nodes()
    drop_index = {id(u): i for i, u in enumerate(unary_nodes) if u.fn in _DROP_PROB}
    need_m, need_v, need_y = bool(used & _NEEDS_M), bool(used & _NEEDS_V), "y" in used
    need_key = "noise" in used or bool(drop_index)
    need_params = bool(used & _NEEDS_PARAMS)
    decays: dict[str, optimizers.SignDecay] = {}
    if used & set(DECAY_OPERANDS):
        if decay_steps is None:
            raise ValueError(f"{rule.text()} reads a sign decay (ld/cd/rd): set decay_steps "
                             f"(e.g. rule_optimizer.decay_steps = the run's training steps).")
        decays = {"ld": optimizers.linear_sign_decay(decay_steps),
                  "cd": optimizers.cosine_sign_decay(decay_steps, cosine_periods),
                  "rd": optimizers.restart_sign_decay(decay_steps, restart_periods)}

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        return RuleState(count=jnp.zeros([], jnp.int32),
                         m=zeros() if need_m else None, v=zeros() if need_v else None,
                         y=zeros() if need_y else None,
                         key=jax.random.PRNGKey(seed) if need_key else None)

    def update(grads, state, params=None):
        if need_params and params is None:
            raise ValueError(f"{rule.text()} reads the parameters (wd1..wd4): pass params to "
                             f"update().")
        count = optax.safe_increment(state.count)
        m = optax.tree.update_moment(grads, state.m, beta1, 1) if need_m else None
        v = optax.tree.update_moment_per_elem_norm(grads, state.v, beta2, 2) if need_v else None
        y = optax.tree.update_moment(grads, state.y, beta3, 3) if need_y else None
        m_hat = optax.tree.bias_correction(m, beta1, count) if need_m else None
        v_hat = optax.tree.bias_correction(v, beta2, count) if need_v else None
        y_hat = optax.tree.bias_correction(y, beta3, count) if need_y else None
        key, step_key = jax.random.split(state.key) if need_key else (None, None)
        f = {name: decay(state.count) for name, decay in decays.items() if name in used}

        leaves, treedef = jax.tree_util.tree_flatten(grads)

        def leaves_of(tree):
            return treedef.flatten_up_to(tree) if tree is not None else [None] * len(leaves)

        outs = []
        for i, (g, p, mh, vh, yh) in enumerate(zip(
                leaves, leaves_of(params if need_params else None), leaves_of(m_hat),
                leaves_of(v_hat), leaves_of(y_hat))):
            leaf_key = jax.random.fold_in(step_key, i) if need_key else None
            values = _operand_values(used, g, p, mh, vh, yh, f, leaf_key)
            d = _evaluate(rule, values, leaf_key, drop_index)
            outs.append(jnp.broadcast_to(d, g.shape).astype(g.dtype))
        return (jax.tree_util.tree_unflatten(treedef, outs),
                RuleState(count=count, m=m, v=v, y=y, key=key))

    return optax.GradientTransformation(init, update)


def _operand_values(used, g, p, m_hat, v_hat, y_hat, f, key) -> dict[str, Array]:
    full = lambda c: jnp.full_like(g, c)  # noqa: E731
    makers: dict[str, Callable[[], Array]] = {
        "g": lambda: g, "g2": lambda: g * g, "g3": lambda: g * g * g,
        "m": lambda: m_hat, "v": lambda: v_hat, "y": lambda: y_hat,
        "sign_g": lambda: jnp.sign(g), "sign_m": lambda: jnp.sign(m_hat),
        "one": lambda: full(1.0), "two": lambda: full(2.0),
        "noise": lambda: NOISE_STDDEV * jax.random.normal(jax.random.fold_in(key, 0), g.shape,
                                                          g.dtype),
        "adam": lambda: m_hat / (jnp.sqrt(v_hat) + ADAM_EPS),
        "rmsprop": lambda: g / (jnp.sqrt(v_hat) + ADAM_EPS),
        **{f"wd{k}": (lambda k: lambda: (10.0 ** -k) * p)(k) for k in range(1, 5)},
        **{name: (lambda name: lambda: full(f[name]))(name) for name in DECAY_OPERANDS},
    }
    return {name: makers[name]() for name in used}


def _evaluate(node: Binary, values: dict[str, Array], key, drop_index: dict[int, int]) -> Array:
    args = []
    for u in (node.left, node.right):
        x = values[u.x] if isinstance(u.x, str) else _evaluate(u.x, values, key, drop_index)
        if u.fn in _DROP_PROB:
            keep = jax.random.bernoulli(jax.random.fold_in(key, 1 + drop_index[id(u)]),
                                        1.0 - _DROP_PROB[u.fn], x.shape)
            x = jnp.where(keep, x, jnp.zeros_like(x))
        else:
            x = _UNARY_FNS[u.fn](x)
        args.append(x)
    return _BINARY_FNS[node.fn](*args)


@gin.configurable
def rule_optimizer(schedule: optimizers.Schedule = gin.REQUIRED, param_axes: Any = None,
                   rule: str | Binary = gin.REQUIRED, beta1: float = 0.9, beta2: float = 0.999,
                   beta3: float = 0.999, decay_steps: int | None = None,
                   cosine_periods: float = 0.5, restart_periods: float = 1.0,
                   grad_clip_norm: float | None = None, seed: int = 0) -> optimizers.Optimizer:
    """An update rule of the search language as a moetx optimizer: p -= lr(t) * d, with d the
    rule's direction (optionally after global-norm clipping of the gradients). Its state (count,
    the rule's running averages, the noise key) shards like the parameters.

    `make_optimizer.optimizer_fn = @rule_optimizer`, `rule_optimizer.rule = 'mul(exp(mul(sign_g,
    sign_m)), g)'`; rules that read ld/cd/rd need `rule_optimizer.decay_steps`."""
    del param_axes
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(rule_transformation(rule, beta1=beta1, beta2=beta2, beta3=beta3,
                                     decay_steps=decay_steps, cosine_periods=cosine_periods,
                                     restart_periods=restart_periods, seed=seed))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    return optimizers.Optimizer(tx, optimizers.like_params_state_axes(tx), schedule)


# ---------------------------------------------------------------------------------- probe
PROBE_STEPS = 6
PROBE_DECAY_STEPS = 8
PROBE_LR = 0.01


def _probe_inputs(stream: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Fixed parameters (a vector of 5 and a 2x3 matrix) and 6 steps of seeded gradients: a
    per-element mean plus noise, with the sign flipped from step 4 on. `stream` 1 draws
    other gradients (same parameters) for the gradient-dependence check."""
    rng = np.random.RandomState(1234)
    params = {"a": rng.normal(size=(5,)).astype(np.float32),
              "b": rng.normal(size=(2, 3)).astype(np.float32)}
    rng = np.random.RandomState(4321 + stream)
    base = {k: rng.normal(size=p.shape) for k, p in params.items()}
    grads = []
    for t in range(PROBE_STEPS):
        sign = 1.0 if t < 3 else -1.0
        grads.append({k: (sign * (b + 0.5 * rng.normal(size=b.shape))).astype(np.float32)
                      for k, b in base.items()})
    return params, grads


@functools.lru_cache(maxsize=4096)
def _probe_directions(text: str, stream: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """The rule's directions on the probe (eagerly, no jit), one tuple of leaves per step."""
    tx = rule_transformation(text, decay_steps=PROBE_DECAY_STEPS, seed=0)
    params, grads = _probe_inputs(stream)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(params)
    out = []
    with np.errstate(all="ignore"):
        for g in grads:
            d, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
            params = jax.tree_util.tree_map(lambda p, u: p - PROBE_LR * u, params, d)
            out.append(tuple(np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(d)))
    return tuple(out)


def _round_text(values: np.ndarray) -> str:
    """5 significant digits per value; -0 is 0; NaN/inf by name."""
    parts = []
    for x in np.asarray(values, np.float64).ravel():
        if np.isnan(x):
            parts.append("nan")
        elif np.isinf(x):
            parts.append("inf" if x > 0 else "-inf")
        else:
            parts.append(f"{float(x) + 0.0:.4e}")
    return ",".join(parts)


# ----------------------------------------------------------------------------- search space
@gin.configurable
def rule_space(max_depth: int = 3, operands: Sequence[str] = OPERANDS,
               unaries: Sequence[str] = UNARIES, binaries: Sequence[str] = BINARIES) -> Binary:
    """The PyGlove search space of update rules (a `Binary` holding `pg.oneof`s).

    Depth 1: binary(unary(op), unary(op)), with the binary one of `binaries`, each unary one of
    `unaries` and each op one of `operands` (every choice independent). Depth d > 1: each op is
    one of `operands` or a depth-(d-1) sub-space (the last candidate of its `pg.oneof`), so the
    materialised rules have depth 1..d. With the full vocabulary (6 binaries, 12 unaries, 20
    operands) depth 1 has 6 * (12 * 20)^2 = 345,600 rules. The default depth 3 reaches PowerSign
    (depth 2), AddSign and the decayed PowerSigns (depth 3); the decayed AddSigns need depth 4.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1, got {max_depth}.")
    for kind, names, known in (("operands", operands, OPERANDS), ("unaries", unaries, UNARIES),
                               ("binaries", binaries, BINARIES)):
        if not names:
            raise ValueError(f"The space needs at least one of {kind}.")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"Unknown {kind} {unknown}; expected some of {', '.join(known)}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Repeated {kind} in {list(names)}.")

    def space(depth: int) -> Binary:
        def arg() -> Unary:
            choices: list[Any] = list(operands)
            if depth > 1:
                choices.append(space(depth - 1))
            return Unary(pg.oneof(list(unaries)), pg.oneof(choices))
        return Binary(pg.oneof(list(binaries)), arg(), arg())

    return space(max_depth)


# ------------------------------------------------------------------ rule + learning rate
@pg.members([
    ("rule", pg.typing.Object(Binary), "the update rule (its direction d)."),
    ("learning_rate", pg.typing.Float(min_value=0.0), "constant learning rate: p -= lr * d."),
])
class OptimizerCandidate(pg.Object):
    """A search candidate: an update rule and the constant learning rate it trains with.

    Rules differ in scale by orders of magnitude (sign-like rules move by about g, Adam-like
    ones by about 1), so the search picks the learning rate with the rule, as a tuned baseline
    would. Two candidates whose updates lr * d agree on the probe are the same function."""

    def validate(self) -> None:
        self.rule.validate()

    def gin_bindings(self) -> list[str]:
        return [*self.rule.gin_bindings(), "make_optimizer.schedule = @constant_schedule()",
                f"constant_schedule.learning_rate = {float(self.learning_rate)!r}"]

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for step in _probe_directions(self.rule.text(), 0):
            for d in step:
                h.update(_round_text(float(self.learning_rate) * d).encode())
                h.update(b";")
            h.update(b"|")
        return h.hexdigest()

    def text(self) -> str:
        return f"{self.rule.text()} @ lr {float(self.learning_rate):g}"


def parse_candidate(text: str) -> OptimizerCandidate:
    """The inverse of `OptimizerCandidate.text()`: `'<rule> @ lr <float>'`."""
    rule, sep, lr = text.rpartition(" @ lr ")
    if not sep:
        raise ValueError(f"{text!r}: expected '<rule> @ lr <learning rate>'.")
    return OptimizerCandidate(rule=parse_rule(rule), learning_rate=float(lr))


@gin.configurable
def optimizer_space(learning_rates: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
                    max_depth: int = 3, operands: Sequence[str] = OPERANDS,
                    unaries: Sequence[str] = UNARIES,
                    binaries: Sequence[str] = BINARIES) -> OptimizerCandidate:
    """The search space of `OptimizerCandidate`s: `rule_space(...)` and a learning rate from
    `learning_rates`."""
    if not learning_rates:
        raise ValueError("optimizer_space needs at least one learning rate.")
    lrs = [float(x) for x in learning_rates]
    return OptimizerCandidate(rule=rule_space(max_depth, operands, unaries, binaries),
                              learning_rate=pg.oneof(lrs) if len(lrs) > 1 else lrs[0])
