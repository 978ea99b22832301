"""Backward rules (Backprop Evolution, Alber et al. 2018): a small language for the gradient a
dense or convolution layer passes back, and the Flax wiring that makes any model's layers use it
without editing the model.

**Semantics.** A layer computes y = f(x, W) (+ b), linear in x and in W (`flax.linen.Dense`,
`flax.linen.Conv`, `moetx.nn.layers.DenseGeneral`). Plain backprop receives g = dL/dy and passes
dx = g·Wᵀ to the input (the transpose of f in x), dW = xᵀ·g to the kernel (the transpose of f in
W) and db = Σ g to the bias. A rule replaces g by a modified gradient g' of the same shape,
computed element-wise from operands that live in the output's shape, and g' then flows through
the *usual* transposes:

    g'  = rule(g, y, x, W, noise)        (the shape of y)
    dx  = g'·Wᵀ        dW = xᵀ·g'        db = Σ g'

so one rule changes both what the layer's weights learn and what reaches the layers below. The
rule `keep_left(g, one)` (g' = g) is plain backprop, bit for bit. The forward pass is never
changed (the layer's output is computed by exactly the same operations).

Relation to the paper: the project's reference notes (seeds.md) give the paper's form, g' =
binary(unary(op1), unary(op2)) per layer with operands from the back-propagated gradient, the
forward activations, the weights, noise and normalised variants, and its unary/binary function
families; the paper's full operand table could not be checked here. The choices made above are
this module's: g' lives in the output's shape and replaces g before both transposes; x and W,
whose shapes cannot meet g element-wise, enter as per-example / per-unit RMS operands (and
through the transposes); noise and the normalisations keep the gradient's scale. Operands that change the transpose
itself (sign-symmetric or random feedback matrices, as in feedback alignment) are not in the
language.

**Rule text.** `rule := binary(unary(operand), unary(operand))`; an operand may itself be a
binary (nesting) and, in hand-written rules, a number literal. Calls take comma-separated
arguments, e.g. `add(g, mul(0.1, noise))` or `mul(g, exp(sub(ln_y, one)))`. An argument of a binary
written without a unary has the implied unary `identity`, which is not printed, so
`keep_left(identity(g), one)` parses to the rule that prints as `keep_left(g, one)`. A unary's
argument is an operand or a binary, never another unary. `parse_rule` reads the text;
`str(rule)` / `rule.text()` print it back (parse and print round-trip).

Operands (`OPERANDS`), each of the shape of g or broadcast to it:

    g         the back-propagated gradient dL/dy (of the layer's output)
    y         the layer's forward output (with the bias)
    bn_g bn_y g or y normalised batch-norm-like: mean 0 and variance 1 over the batch axes (every
              axis but the last, the features: batch, sequence positions, image positions),
              then scaled by the RMS of the whole tensor
    ln_g ln_y g or y normalised layer-norm-like: mean 0 and variance 1 over the feature (last)
              axis, then scaled by the RMS of the whole tensor
    x_rms     the layer's forward input x, summarised to g's shape: its root mean square over
              all but the leading (batch) axis, one value per example ([B, 1, ..., 1]). x has
              the input's width (and, after a strided convolution, other positions), so it
              cannot meet g element-wise; it also enters through dW = xᵀ·g'.
    w_rms     the layer's weights W, summarised to g's shape: the root mean square of the kernel
              over all but its last (output-feature) axis, one value per output unit ([F]).
              W also enters through dx = g'·Wᵀ.
    noise     Gaussian noise at the gradient's scale: N(0, 1) per element times the RMS of g
              over the whole tensor; fresh at every step and for every layer call
    one       the constant 1

Unary functions (`UNARIES`): identity, neg (-x), abs, square, sign, sqrt_abs (sqrt|x|), log_abs
(log(|x| + 1e-8)), exp, clip2 / clip3 / clip4 (x clipped into [-10^-k, 10^-k]), bn and ln (the
normalisations above applied to any value), drop10 / drop30 (each element zeroed with probability
0.1 / 0.3, by a fresh seeded Bernoulli mask, not rescaled).

Binary functions (`BINARIES`): add, sub, mul, div (x / y with |y| raised to at least 1e-8,
keeping its sign: safe), max, min, keep_left (x).

Normalisations keep the tensor's overall scale (its root mean square over all elements): they
equalise the statistics across rows or features but not the magnitude, so a normalised gradient
is still of the gradient's size and the run's learning rate keeps its meaning (a unit-variance
gradient would be ~100x larger than backprop's and diverge). Their variance epsilon is 1e-12
(gradients are small: a larger epsilon would not normalise them).

**Wiring.** `backward_rules(dense=..., conv=..., rng=...)` is a context manager: while it is
active, every call of a `flax.linen.Dense` or moetx `DenseGeneral` (kind 'dense') and of a
`flax.linen.Conv` (kind 'conv') outside initialisation is intercepted (`flax.linen.
intercept_methods`) and computed by a `jax.custom_vjp` function of (parameters, x) whose forward
runs the module's own `__call__` and whose backward is the rule followed by the layer's vjp at
g'. A kind without a rule (None) is left alone. It only has to be active while the loss is
traced: `with backward_rules(...): loss = model.apply(...)` inside the function that `jax.grad`
differentiates. `rng` seeds the operand `noise` and the drop functions (folded with each layer's
path and call count); without it a fixed key is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import zlib
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.nn import layers

Array = jax.Array

# ------------------------------------------------------------------------------ vocabulary
OPERANDS: tuple[str, ...] = ("g", "bn_g", "ln_g", "y", "bn_y", "ln_y", "x_rms", "w_rms",
                             "noise", "one")
GRADIENT_OPERANDS: frozenset[str] = frozenset({"g", "bn_g", "ln_g"})
UNARIES: tuple[str, ...] = ("identity", "neg", "abs", "square", "sign", "sqrt_abs", "log_abs",
                            "exp", "clip2", "clip3", "clip4", "bn", "ln", "drop10", "drop30")
BINARIES: tuple[str, ...] = ("add", "sub", "mul", "div", "max", "min", "keep_left")
LAYER_KINDS: tuple[str, ...] = ("dense", "conv")

#: Plain backprop as a rule: g' = g.
BACKPROP = "keep_left(g, one)"

NORM_EPS = 1e-12
LOG_EPS = 1e-8
DIV_EPS = 1e-8
_DROP_PROB = {"drop10": 0.1, "drop30": 0.3}
_Y_OPERANDS = frozenset({"y", "bn_y", "ln_y"})
_KEY_SALT = 0x6270  # separates the rule's noise from the model's own use of the step key


def _normalize(t: Array, axes: tuple[int, ...]) -> Array:
    if not axes:
        return jnp.zeros_like(t)
    mean = jnp.mean(t, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(t - mean), axis=axes, keepdims=True)
    return (t - mean) * jax.lax.rsqrt(var + NORM_EPS) * jnp.sqrt(jnp.mean(jnp.square(t)))


def batch_normalize(t: Array) -> Array:
    """Mean 0 and variance 1 over every axis but the last (the batch and position axes), times
    the RMS of the whole tensor."""
    return _normalize(t, tuple(range(t.ndim - 1)))


def layer_normalize(t: Array) -> Array:
    """Mean 0 and variance 1 over the last (feature) axis, times the RMS of the whole tensor."""
    return _normalize(t, (t.ndim - 1,) if t.ndim else ())


def _safe_div(x: Array, y: Array) -> Array:
    sign = jnp.where(y < 0, -1.0, 1.0).astype(y.dtype)
    return x / (sign * jnp.maximum(jnp.abs(y), DIV_EPS))


_UNARY_FNS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "neg": lambda x: -x,
    "abs": jnp.abs,
    "square": jnp.square,
    "sign": jnp.sign,
    "sqrt_abs": lambda x: jnp.sqrt(jnp.abs(x)),
    "log_abs": lambda x: jnp.log(jnp.abs(x) + LOG_EPS),
    "exp": jnp.exp,
    "clip2": lambda x: jnp.clip(x, -1e-2, 1e-2),
    "clip3": lambda x: jnp.clip(x, -1e-3, 1e-3),
    "clip4": lambda x: jnp.clip(x, -1e-4, 1e-4),
    "bn": batch_normalize,
    "ln": layer_normalize,
}
_BINARY_FNS: dict[str, Callable[[Array, Array], Array]] = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": _safe_div,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "keep_left": lambda x, y: x,
}

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def is_literal(operand: str) -> bool:
    """Is `operand` a number literal (e.g. '0.1', '2.0', '-1e-3')?"""
    return bool(_NUMBER.fullmatch(operand))


def literal_text(value: float) -> str:
    """The canonical text of a number literal: `repr(float(value))` ('0.1', '2.0')."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"A rule's number literal must be finite, got {value}.")
    return repr(value + 0.0)


def _check_operand(operand: str) -> None:
    if operand not in OPERANDS and not is_literal(operand):
        raise ValueError(f"Unknown operand {operand!r}; operands are {', '.join(OPERANDS)} "
                         f"or a number.")


# --------------------------------------------------------------------------------- the AST
@dataclasses.dataclass(frozen=True)
class Unary:
    """fn(x): a unary function of an operand (a name or a number literal's text) or of a
    binary sub-rule."""

    fn: str
    x: "str | Binary"

    def __post_init__(self):
        if self.fn not in UNARIES:
            raise ValueError(f"Unknown unary function {self.fn!r}; expected one of "
                             f"{', '.join(UNARIES)}.")
        if isinstance(self.x, Unary):
            raise ValueError("A unary function applies to an operand or a binary function, not "
                             f"to another unary function ({self.x.fn!r}).")
        if isinstance(self.x, str):
            _check_operand(self.x)
            if is_literal(self.x):
                object.__setattr__(self, "x", literal_text(float(self.x)))
        elif not isinstance(self.x, Binary):
            raise ValueError(f"A unary's argument is an operand name or a Binary, got "
                             f"{type(self.x).__name__}.")

    def text(self) -> str:
        inner = self.x if isinstance(self.x, str) else self.x.text()
        return inner if self.fn == "identity" else f"{self.fn}({inner})"


@dataclasses.dataclass(frozen=True)
class Binary:
    """fn(left, right): a rule (at the top) or a nested operand."""

    fn: str
    left: Unary
    right: Unary

    def __post_init__(self):
        if self.fn not in BINARIES:
            raise ValueError(f"Unknown binary function {self.fn!r}; expected one of "
                             f"{', '.join(BINARIES)}.")
        for side in (self.left, self.right):
            if not isinstance(side, Unary):
                raise ValueError(f"A binary's arguments are Unary nodes, got "
                                 f"{type(side).__name__}.")

    def text(self) -> str:
        """The canonical rule text (identity unaries omitted); `parse_rule` reads it back."""
        return f"{self.fn}({self.left.text()}, {self.right.text()})"

    def __str__(self) -> str:
        return self.text()

    def depth(self) -> int:
        """The longest chain of nested binaries (1 for binary(unary(op), unary(op)))."""
        return 1 + max((u.x.depth() for u in (self.left, self.right)
                        if isinstance(u.x, Binary)), default=0)

    def operands(self) -> frozenset[str]:
        """The operands the rule reads (names and literals)."""
        out: set[str] = set()
        for u in (self.left, self.right):
            out |= {u.x} if isinstance(u.x, str) else u.x.operands()
        return frozenset(out)

    def unary_nodes(self) -> list[Unary]:
        """The Unary nodes in pre-order; their index seeds the drop masks."""
        out: list[Unary] = []
        for u in (self.left, self.right):
            out.append(u)
            if isinstance(u.x, Binary):
                out.extend(u.x.unary_nodes())
        return out

    def depends_on_gradient(self) -> bool:
        """Statically: does a gradient operand (g, bn_g, ln_g) reach the output? (`keep_left`
        drops its right argument; every other function keeps both.)"""
        args = (self.left,) if self.fn == "keep_left" else (self.left, self.right)
        return any(u.x in GRADIENT_OPERANDS if isinstance(u.x, str)
                   else u.x.depends_on_gradient() for u in args)

    def needs_key(self) -> bool:
        """Does the rule draw random numbers (noise, drop functions)?"""
        return "noise" in self.operands() or any(u.fn in _DROP_PROB for u in self.unary_nodes())

    def needs_output(self) -> bool:
        """Does the rule read the layer's forward output y?"""
        return bool(self.operands() & _Y_OPERANDS)


# ----------------------------------------------------------------------------------- parser
_TOKEN = re.compile(r"\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)"
                    r"|([(),]))")


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        match = _TOKEN.match(text, pos)
        if not match:
            start = len(text) - len(text[pos:].lstrip())
            raise ValueError(f"Unexpected character {text[start]!r} at position {start} in "
                             f"{text!r}.")
        tokens.append((match.group(match.lastindex), match.start(match.lastindex)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, message: str, at: int | None = None) -> ValueError:
        i = self.i if at is None else at
        pos = self.tokens[i][1] if i < len(self.tokens) else len(self.text)
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
        start = self.i
        name = self.take()
        if is_literal(name):
            if self.peek() == "(":
                raise self.error(f"The number {name} takes no arguments", start)
            return literal_text(float(name))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise self.error(f"Expected an operand or a function, got {name!r}", start)
        if self.peek() != "(":
            if name in OPERANDS:
                return name
            if name in UNARIES or name in BINARIES:
                raise self.error(f"{name!r} is a function: write {name}(...)", start)
            raise self.error(f"Unknown operand {name!r}; operands are {', '.join(OPERANDS)} "
                             f"or a number", start)
        if name in OPERANDS:
            raise self.error(f"Operand {name!r} takes no arguments", start)
        if name not in UNARIES and name not in BINARIES:
            raise self.error(f"Unknown function {name!r}; unary: {', '.join(UNARIES)}; binary: "
                             f"{', '.join(BINARIES)}", start)
        self.take("(")
        args = [self.term()]
        while self.peek() == ",":
            self.take(",")
            args.append(self.term())
        self.take(")")
        arity = 1 if name in UNARIES else 2
        if len(args) != arity:
            raise self.error(f"{name!r} takes {arity} argument{'s' * (arity > 1)}, got "
                             f"{len(args)}", start)
        if name in UNARIES:
            if isinstance(args[0], Unary):
                raise self.error(f"The argument of {name!r} must be an operand or a binary "
                                 f"function, not the unary {args[0].fn!r}", start)
            return Unary(name, args[0])
        left, right = (a if isinstance(a, Unary) else Unary("identity", a) for a in args)
        return Binary(name, left, right)


def parse_rule(text: str) -> Binary:
    """Parses a rule's text (see the module docstring) into its canonical `Binary`.

    Raises ValueError naming the problem and its position: unknown names, wrong arity, a unary
    of a unary, a rule that is not a binary at the top, or text left over after the rule."""
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
        raise ValueError(f"A rule is a binary function at the top, e.g. keep_left({shown}, one);"
                         f" got {text!r}.")
    return node


def as_rule(rule: "str | Binary") -> Binary:
    """A rule from its text or itself."""
    return rule if isinstance(rule, Binary) else parse_rule(rule)


# ------------------------------------------------------------------------------ evaluation
def _rms(t: Array, axes: tuple[int, ...] | None = None) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(t), axis=axes, keepdims=axes is not None))


def rule_output(rule: "str | Binary", g: Array, x: Array, y: Array | None,
                kernel: Array | None, key: Array | None = None) -> Array:
    """g' for one layer call (in float32, of g's shape): the rule evaluated on the operands of
    g (dL/dy), the layer's input `x`, output `y` (needed only when the rule reads y) and
    `kernel` (needed only for w_rms; last axis = output features). `key` (a PRNG key) is needed
    when the rule reads noise or drops."""
    rule = as_rule(rule)
    used = rule.operands()
    g32 = jnp.asarray(g, jnp.float32)
    if used & _Y_OPERANDS and y is None:
        raise ValueError(f"{rule.text()} reads the layer's output y: pass y.")
    if "w_rms" in used and kernel is None:
        raise ValueError(f"{rule.text()} reads w_rms: pass the layer's kernel.")
    if rule.needs_key() and key is None:
        raise ValueError(f"{rule.text()} draws random numbers: pass a PRNG key.")
    y32 = None if y is None else jnp.asarray(y, jnp.float32)

    def x_rms():
        x32 = jnp.asarray(x, jnp.float32)
        if x32.ndim < 2 or g32.ndim < 2:
            return _rms(x32)
        per_example = jnp.sqrt(jnp.mean(jnp.square(x32.reshape(x32.shape[0], -1)), axis=1))
        return per_example.reshape((-1,) + (1,) * (g32.ndim - 1))

    def w_rms():
        k32 = jnp.asarray(kernel, jnp.float32)
        return _rms(k32.reshape(-1, k32.shape[-1]), (0,))[0]

    makers: dict[str, Callable[[], Array]] = {
        "g": lambda: g32, "bn_g": lambda: batch_normalize(g32),
        "ln_g": lambda: layer_normalize(g32), "y": lambda: y32,
        "bn_y": lambda: batch_normalize(y32), "ln_y": lambda: layer_normalize(y32),
        "x_rms": x_rms, "w_rms": w_rms,
        "noise": lambda: jax.random.normal(jax.random.fold_in(key, 0), g32.shape) * _rms(g32),
        "one": lambda: jnp.ones_like(g32),
    }
    values = {name: (makers[name]() if name in makers else jnp.asarray(float(name), jnp.float32))
              for name in used}
    counter = iter(range(1, 1 << 30))

    def evaluate(node: Binary) -> Array:
        args = []
        for u in (node.left, node.right):
            index = next(counter)
            v = values[u.x] if isinstance(u.x, str) else evaluate(u.x)
            if u.fn in _DROP_PROB:
                keep = jax.random.bernoulli(jax.random.fold_in(key, index),
                                            1.0 - _DROP_PROB[u.fn], jnp.shape(v))
                v = jnp.where(keep, v, jnp.zeros_like(v))
            else:
                v = _UNARY_FNS[u.fn](v)
            args.append(v)
        return _BINARY_FNS[node.fn](*args)

    return jnp.broadcast_to(evaluate(rule), g32.shape)


# ---------------------------------------------------------------------------------- wiring
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("moetx_backward_bypass",
                                                                default=False)


def layer_kind(module: nn.Module) -> str | None:
    """'dense' for `flax.linen.Dense` and moetx `DenseGeneral`, 'conv' for `flax.linen.Conv`,
    else None."""
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, (nn.Dense, layers.DenseGeneral)):
        return "dense"
    return None


def _key_data(key: Array) -> Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


class _RuleInterceptor:
    """The method interceptor of `backward_rules` (one per activation: it counts the calls it
    wraps to give each its own random key)."""

    def __init__(self, rules: Mapping[str, Binary], rng: Array | None):
        self.rules = dict(rules)
        self.rng = jax.random.PRNGKey(0) if rng is None else _key_data(rng)
        self.calls = 0

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        kind = layer_kind(module) if context.method_name == "__call__" else None
        rule = self.rules.get(kind) if kind else None
        if rule is None or _BYPASS.get() or module.is_initializing():
            return next_fun(*args, **kwargs)
        if "params" not in module.variables:
            return next_fun(*args, **kwargs)
        if len(args) == 1:
            x = args[0]
            call = lambda m, x: m(x, **kwargs)  # noqa: E731
        elif not args and len(kwargs) == 1:
            (name, x), = kwargs.items()
            call = lambda m, x: m(**{name: x})  # noqa: E731
        else:
            raise ValueError(f"backward_rules: {type(module).__name__} called with "
                             f"{len(args)} positional and {sorted(kwargs)} keyword arguments; "
                             f"expected its one input.")
        params = nn.meta.unbox(dict(module.variables["params"]))
        unbound = module.clone(parent=None)

        def forward(p, x):
            token = _BYPASS.set(True)
            try:
                return unbound.apply({"params": p}, x, method=call)
            finally:
                _BYPASS.reset(token)

        path = "/".join(str(p) for p in getattr(module, "path", ()) or ())
        key = jax.random.fold_in(jax.random.fold_in(
            jax.random.fold_in(self.rng, _KEY_SALT), zlib.crc32(path.encode()) & 0x7FFFFFFF),
            self.calls)
        self.calls += 1
        keep_y = rule.needs_output()

        @jax.custom_vjp
        def layer(p, x, key):
            del key
            return forward(p, x)

        def layer_fwd(p, x, key):
            y = forward(p, x)
            return y, (p, x, y if keep_y else None, key)

        def layer_bwd(res, g):
            p, x, y, key = res
            g2 = rule_output(rule, g, x, y, p.get("kernel"), key).astype(g.dtype)
            _, vjp = jax.vjp(forward, p, x)
            dp, dx = vjp(g2)
            return dp, dx, None

        layer.defvjp(layer_fwd, layer_bwd)
        return layer(params, x, key)


@contextlib.contextmanager
def backward_rules(dense: "str | Binary | None" = None, conv: "str | Binary | None" = None,
                   rng: Array | None = None) -> Iterator[None]:
    """While active, dense layers (`flax.linen.Dense`, moetx `DenseGeneral`) back-propagate with
    `dense` and convolutions (`flax.linen.Conv`) with `conv` (see the module docstring); None
    leaves a kind alone. `rng` seeds the rules' noise and drops."""
    rules = {kind: as_rule(r) for kind, r in (("dense", dense), ("conv", conv))
             if r is not None}
    if not rules:
        yield
        return
    with nn.intercept_methods(_RuleInterceptor(rules, rng)):
        yield


__all__ = ("OPERANDS", "GRADIENT_OPERANDS", "UNARIES", "BINARIES", "LAYER_KINDS", "BACKPROP",
           "Unary", "Binary", "parse_rule", "as_rule", "rule_output", "backward_rules",
           "layer_kind", "batch_normalize", "layer_normalize", "is_literal", "literal_text")
