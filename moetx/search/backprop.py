"""Backprop Evolution (Alber et al. 2018): a search over the backward rules of a model's dense and
convolution layers, on the search machinery of `moetx.search.evolution`.

The rule language and its wiring are a model part, `moetx.nn.backward` (read its docstring for
the exact semantics: a rule turns the gradient g of a layer's output into g', which then flows
through the layer's usual transposes to its input and weights). This module holds:

- `BackwardRuleModel` (gin configurable): any moetx model (a `moetx.trainer.model.Model`) whose
  training gradient uses `dense_rule` for its dense layers and `conv_rule` for its
  convolutions. It delegates everything to the inner model and runs the inner `loss_fn` inside
  `backward.backward_rules(...)`, so the trainer stays model-agnostic and evaluation is plain:

      MODEL = @BackwardRuleModel()
      BackwardRuleModel.model = @ImageClassificationModel()
      BackwardRuleModel.conv_rule = 'add(g, noise)'

- The PyGlove side: symbolic `Unary` / `Binary` mirroring the rule AST (their `text()` is the
  rule's text), `rule_space` (binary(unary(op), unary(op)), deeper with `max_depth`), and
  `BackpropCandidate(dense=<rule>, conv=<rule>)`, the search's candidate, one rule per layer
  kind (None: that kind is left plain), with the candidate protocol:

      validate()      rejects (ValueError with the reason) a rule through which no gradient
                      operand (g, bn_g, ln_g) reaches g', whose g' is not finite on the probe,
                      or whose g' does not change when the probe's g does
      gin_bindings()  `BackwardRuleModel.dense_rule = '...'`, `BackwardRuleModel.conv_rule = ...`
      fingerprint()   sha1 of each rule's g' on fixed probe inputs (a dense layer's for the dense
                      rule, a convolution's for the conv rule; fixed key), rounded to 5
                      significant digits: rules computing the same g' (`keep_left(g, y)`,
                      `max(g, g)`, plain) are one function and trained once
      text()          `dense=<rule>; conv=<rule>` (`plain` for None); `parse_candidate` reads it

  `backprop_space()` is the space of candidates; `encode_backprop` encodes seeds written as
  text (the search starts from plain backprop: `search.seeds`).

- The fitness: `AccuracyFitness`, a `TrainingFitness` whose reward is an eval metric to maximise
  (default the validation `accuracy`), with the same budget and hurdle stages. The search's
  data is `fashion_mnist_holdout` (`register_holdout_task`): Fashion-MNIST's training set split
  into 50,000 training and 10,000 validation images (the last 10,000), plus the official test
  set as `test`, so the search never sees the test set.

- `accuracy_summary(output_dir)`: the final eval accuracy per arm (mean and spread over seeds) of
  a `compare` run, which itself summarises losses.

    python -m moetx.search.run --gin_file=search/backprop_proxy.gin \\
        --gin.SEARCH_DIR="'runs/search/backprop'"
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import statistics
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pyglove as pg

from moetx.nn import backward
from moetx.search import evolution, fitness as fitness_lib, report
from moetx.search.evolution import DONE
from moetx.trainer import model as model_lib

KINDS = backward.LAYER_KINDS
PLAIN = "plain"


def _is_hyper(value: Any) -> bool:
    return isinstance(value, pg.hyper.HyperValue)


# ------------------------------------------------------------------------ symbolic classes
class Expr(pg.Object):
    """A node of a backward rule (`Unary` or `Binary`)."""

    def text(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        if not pg.is_deterministic(self):
            return self.format(compact=True)
        return self.text()


@pg.members([
    ("fn", pg.typing.Str(), f"The unary function, one of {', '.join(backward.UNARIES)}."),
    ("x", pg.typing.Union([pg.typing.Str(), pg.typing.Object(Expr)]),
     "An operand (a name or a number literal) or a `Binary`."),
])
class Unary(Expr):
    """fn(x), symbolic (see `moetx.nn.backward.Unary`)."""

    def _on_bound(self):
        super()._on_bound()
        if not _is_hyper(self.fn) and self.fn not in backward.UNARIES:
            raise ValueError(f"Unknown unary function {self.fn!r}; expected one of "
                             f"{', '.join(backward.UNARIES)}.")
        if isinstance(self.x, str) and self.x not in backward.OPERANDS \
                and not backward.is_literal(self.x):
            raise ValueError(f"Unknown operand {self.x!r}; expected one of "
                             f"{', '.join(backward.OPERANDS)} or a number.")
        if isinstance(self.x, Unary):
            raise ValueError("A unary function applies to an operand or a binary function, not "
                             f"to another unary function ({self.x.fn!r}).")

    def text(self) -> str:
        inner = self.x if isinstance(self.x, str) else self.x.text()
        return inner if self.fn == "identity" else f"{self.fn}({inner})"


@pg.members([
    ("fn", pg.typing.Str(), f"The binary function, one of {', '.join(backward.BINARIES)}."),
    ("left", pg.typing.Object(Unary), "The first argument."),
    ("right", pg.typing.Object(Unary), "The second argument."),
])
class Binary(Expr):
    """fn(left, right), symbolic: a backward rule at the top (see `moetx.nn.backward`)."""

    def _on_bound(self):
        super()._on_bound()
        if not _is_hyper(self.fn) and self.fn not in backward.BINARIES:
            raise ValueError(f"Unknown binary function {self.fn!r}; expected one of "
                             f"{', '.join(backward.BINARIES)}.")

    def text(self) -> str:
        """The canonical rule text; `moetx.nn.backward.parse_rule` reads it back."""
        return f"{self.fn}({self.left.text()}, {self.right.text()})"

    def to_rule(self) -> backward.Binary:
        """The rule as the interpreter's AST."""
        if not pg.is_deterministic(self):
            raise ValueError(f"The rule still contains choices (a search space, not a rule): "
                             f"{self.format(compact=True)}")
        return backward.parse_rule(self.text())


def from_rule(rule: "str | backward.Binary") -> Binary:
    """The symbolic `Binary` of a rule (its text or its AST)."""
    rule = backward.as_rule(rule)

    def unary(u: backward.Unary) -> Unary:
        return Unary(u.fn, u.x if isinstance(u.x, str) else binary(u.x))

    def binary(b: backward.Binary) -> Binary:
        return Binary(b.fn, unary(b.left), unary(b.right))

    return binary(rule)


# ---------------------------------------------------------------------------------- probes
PROBE_GRAD_SCALE = 1e-2
FINGERPRINT_DIGITS = 5


@functools.lru_cache(maxsize=8)
def probe_inputs(kind: str, stream: int = 0) -> dict[str, np.ndarray]:
    """Fixed inputs of one layer call: {'x', 'kernel', 'y', 'g'} of a dense layer (x [8, 6],
    kernel [6, 5], with a bias) or of a 3x3 convolution (x [2, 5, 5, 3], kernel [3, 3, 3, 4],
    SAME padding). g ~ N(0, 1e-2^2), a gradient's scale; `stream` 1 draws another g for the
    same x, kernel and y."""
    rng = np.random.RandomState(2018)
    if kind == "dense":
        x = rng.normal(size=(8, 6))
        kernel = rng.normal(size=(6, 5)) / np.sqrt(6)
        y = x @ kernel + 0.1 * rng.normal(size=(5,))
    elif kind == "conv":
        x = rng.normal(size=(2, 5, 5, 3))
        kernel = rng.normal(size=(3, 3, 3, 4)) / np.sqrt(27)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = np.zeros((2, 5, 5, 4))
        for i in range(3):
            for j in range(3):
                y += padded[:, i:i + 5, j:j + 5, :] @ kernel[i, j]
        y += 0.1 * rng.normal(size=(4,))
    else:
        raise ValueError(f"Unknown layer kind {kind!r}; expected one of {', '.join(KINDS)}.")
    g = PROBE_GRAD_SCALE * np.random.RandomState(7 + stream).normal(size=y.shape)
    return {k: v.astype(np.float32) for k, v in dict(x=x, kernel=kernel, y=y, g=g).items()}


@functools.lru_cache(maxsize=4096)
def probe_output(rule_text: str, kind: str, stream: int = 0) -> np.ndarray:
    """g' of the rule on the probe of `kind` (eagerly, with a fixed key)."""
    p = probe_inputs(kind, stream)
    with np.errstate(all="ignore"):
        out = backward.rule_output(rule_text, jnp.asarray(p["g"]), jnp.asarray(p["x"]),
                                   jnp.asarray(p["y"]), jnp.asarray(p["kernel"]),
                                   jax.random.PRNGKey(0))
    return np.asarray(out, np.float64)


def _rounded_text(values: np.ndarray) -> str:
    parts = []
    for v in np.asarray(values, np.float64).ravel():
        if np.isnan(v):
            parts.append("nan")
        elif np.isinf(v):
            parts.append("inf" if v > 0 else "-inf")
        else:
            parts.append(f"{float(v) + 0.0:.{FINGERPRINT_DIGITS - 1}e}")
    return ",".join(parts)


def check_rule(rule: "str | backward.Binary", kind: str) -> None:
    """Raises ValueError with the reason when `rule` cannot train a `kind` layer: no gradient
    operand reaches g', g' is not finite on the probe, or g' ignores the probe's g."""
    rule = backward.as_rule(rule)
    text = rule.text()
    if not rule.depends_on_gradient():
        dropped = " (keep_left drops its right argument)" if rule.fn == "keep_left" else ""
        names = ", ".join(sorted(backward.GRADIENT_OPERANDS))
        raise ValueError(f"{kind} rule {text}: the backward pass does not depend on the "
                         f"gradient: no gradient operand ({names}) reaches g'{dropped}.")
    first = probe_output(text, kind, 0)
    if not np.isfinite(first).all():
        raise ValueError(f"{kind} rule {text}: g' is not finite (NaN or inf) on the probe.")
    if np.array_equal(first, probe_output(text, kind, 1)):
        raise ValueError(f"{kind} rule {text}: g' is the same for different gradients (it "
                         f"cannot follow the loss).")


def rule_fingerprint(rule: "str | backward.Binary | None", kind: str) -> str:
    """sha1 of the rule's g' on the probe of `kind` (None: plain backprop)."""
    text = backward.as_rule(rule if rule is not None else backward.BACKPROP).text()
    return hashlib.sha1(_rounded_text(probe_output(text, kind, 0)).encode()).hexdigest()


# ------------------------------------------------------------------------------ candidates
@pg.members([
    ("dense", pg.typing.Object(Binary).noneable(),
     "The rule of dense layers (flax Dense, moetx DenseGeneral); None: plain."),
    ("conv", pg.typing.Object(Binary).noneable(), "The rule of convolutions; None: plain."),
])
class BackpropCandidate(pg.Object):
    """One backward rule per layer kind: the search's candidate (see the module docstring)."""

    def rules(self) -> dict[str, backward.Binary | None]:
        return {kind: None if getattr(self, kind) is None else getattr(self, kind).to_rule()
                for kind in KINDS}

    def text(self) -> str:
        return "; ".join(f"{kind}={PLAIN if r is None else r.text()}"
                         for kind, r in self.rules().items())

    def __str__(self) -> str:
        return self.text() if pg.is_deterministic(self) else self.format(compact=True)

    def validate(self) -> None:
        for kind, rule in self.rules().items():
            if rule is not None:
                check_rule(rule, kind)

    def gin_bindings(self) -> list[str]:
        out = ["import moetx.search.backprop"]
        for kind, rule in self.rules().items():
            value = "None" if rule is None else repr(rule.text())
            out.append(f"BackwardRuleModel.{kind}_rule = {value}")
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for kind, rule in self.rules().items():
            h.update(f"{kind}:{rule_fingerprint(rule, kind)};".encode())
        return h.hexdigest()


def parse_candidate(text: str) -> BackpropCandidate:
    """The inverse of `BackpropCandidate.text()`: `dense=<rule>; conv=<rule>` (`plain` for no
    rule; a kind not written is plain)."""
    found: dict[str, Binary | None] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        kind, sep, rule = part.partition("=")
        kind, rule = kind.strip(), rule.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"{part!r} in {text!r}: expected '<kind>=<rule>' with kind one of "
                             f"{', '.join(KINDS)}.")
        if kind in found:
            raise ValueError(f"{text!r} gives the {kind} rule twice.")
        found[kind] = None if rule == PLAIN else from_rule(rule)
    return BackpropCandidate(**{kind: found.get(kind) for kind in KINDS})


# ---------------------------------------------------------------------------- search space
def _check_vocabulary(operands, unaries, binaries) -> None:
    for kind, names, known in (("operands", operands, backward.OPERANDS),
                               ("unaries", unaries, backward.UNARIES),
                               ("binaries", binaries, backward.BINARIES)):
        if not names:
            raise ValueError(f"The space needs at least one of {kind}.")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"Unknown {kind} {unknown}; expected some of {', '.join(known)}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Repeated {kind} in {list(names)}.")


@gin.configurable
def rule_space(max_depth: int = 1, operands: Sequence[str] = backward.OPERANDS,
               unaries: Sequence[str] = backward.UNARIES,
               binaries: Sequence[str] = backward.BINARIES) -> Binary:
    """The PyGlove space of backward rules: binary(unary(op), unary(op)) with every choice
    independent; at depth d > 1 an operand may also be a rule of depth d-1 (the last choice of
    its `pg.oneof`). The full vocabulary gives 7 * (15 * 10)^2 = 157,500 rules at depth 1."""
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1, got {max_depth}.")
    _check_vocabulary(operands, unaries, binaries)

    def space(depth: int) -> Binary:
        def arg() -> Unary:
            choices: list[Any] = list(operands)
            if depth > 1:
                choices.append(space(depth - 1))
            return Unary(pg.oneof(list(unaries)), pg.oneof(choices))
        return Binary(pg.oneof(list(binaries)), arg(), arg())

    return space(max_depth)


@gin.configurable
def backprop_space(kinds: Sequence[str] = KINDS, max_depth: int = 1,
                   operands: Sequence[str] = backward.OPERANDS,
                   unaries: Sequence[str] = backward.UNARIES,
                   binaries: Sequence[str] = backward.BINARIES) -> BackpropCandidate:
    """The space of `BackpropCandidate`s: an independent `rule_space` for each of `kinds`;
    the other layer kinds stay plain."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}, got {list(kinds)}.")
    return BackpropCandidate(**{kind: rule_space(max_depth, operands, unaries, binaries)
                                if kind in kinds else None for kind in KINDS})


@gin.configurable
def encode_backprop(space: Any, value: Any) -> pg.DNA:
    """The DNA of a seed (candidate text such as `dense=keep_left(g, one); conv=keep_left(g,
    one)`, or a `BackpropCandidate`) in `space` (`search.seed_encoder`)."""
    candidate = parse_candidate(value) if isinstance(value, str) else value
    try:
        return pg.template(space).encode(candidate)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{candidate} is not a point of the space (is each of its functions "
                         f"and operands in the space's vocabulary?): {e}") from e


#: Plain backprop for every layer kind, as the search's seed.
BACKPROP_CANDIDATE = "; ".join(f"{kind}={backward.BACKPROP}" for kind in KINDS)


# ------------------------------------------------------------------------ the model wrapper
@gin.configurable
class BackwardRuleModel(model_lib.BaseModel):
    """`model` trained with backward rules (see the module docstring): everything is the inner
    model's, except that its training loss is traced inside `backward.backward_rules(dense=
    dense_rule, conv=conv_rule, rng=<the step's dropout key>)`. Evaluation is plain."""

    def __init__(self, model: Any = gin.REQUIRED, dense_rule: str | None = None,
                 conv_rule: str | None = None):
        if model is gin.REQUIRED or model is None:
            raise ValueError("BackwardRuleModel.model is required (the model to train).")
        model_lib.check_model(model)
        self.model = model
        # Parsed here, so that a bad rule fails when the model is built.
        self.dense_rule = None if dense_rule is None else backward.as_rule(dense_rule)
        self.conv_rule = None if conv_rule is None else backward.as_rule(conv_rule)

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the protocol (e.g. a vision model's `predict`) is the inner model's.
        if name == "model" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        rules = ", ".join(f"{k}_rule={v.text() if v is not None else None!r}"
                          for k, v in (("dense", self.dense_rule), ("conv", self.conv_rule)))
        return f"BackwardRuleModel({type(self.model).__name__}, {rules})"

    # --------------------------------------------------------------- attributes of the model
    @property
    def state_collections(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.model.state_collections

    @property
    def count_unit(self) -> str:  # type: ignore[override]
        return self.model.count_unit

    @property
    def loss_metric(self) -> str:  # type: ignore[override]
        return self.model.loss_metric

    @property
    def feature_converter(self) -> Any:
        return self.model.feature_converter

    # ------------------------------------------------------------------------- the training
    def loss_fn(self, params, batch, dropout_rng, weights, factor, num_microbatches=1,
                model_state=None):
        with backward.backward_rules(dense=self.dense_rule, conv=self.conv_rule,
                                     rng=dropout_rng):
            return self.model.loss_fn(params, batch, dropout_rng, weights, factor,
                                      num_microbatches=num_microbatches, model_state=model_state)

    # -------------------------------------------------------------------------- delegation
    def input_shapes(self, batch_size, task_feature_lengths):
        return self.model.input_shapes(batch_size, task_feature_lengths)

    def get_initial_variables(self, rng, input_shapes):
        return self.model.get_initial_variables(rng, input_shapes)

    def loss_weights_and_factor(self, batch):
        return self.model.loss_weights_and_factor(batch)

    def eval_fn(self, params, batch, model_state=None):
        return self.model.eval_fn(params, batch, model_state=model_state)

    def metric_reduction(self, name):
        return self.model.metric_reduction(name)

    def summarize_metrics(self, sums):
        return self.model.summarize_metrics(sums)

    def headline(self, scalars):
        return self.model.headline(scalars)

    def complete_batch(self, batch, input_shapes):
        return self.model.complete_batch(batch, input_shapes)

    def count_per_batch(self, input_shapes):
        return self.model.count_per_batch(input_shapes)

    def flops_per_step(self, params, input_shapes):
        return self.model.flops_per_step(params, input_shapes)

    def check_task(self, task, task_feature_lengths=None):
        return self.model.check_task(task, task_feature_lengths)

    def parameter_resizers(self):
        return self.model.parameter_resizers()


# --------------------------------------------------------------------------------- the data
HOLDOUT_TASK = "fashion_mnist_holdout"
VALIDATION_SIZE = 10_000


def holdout_split(split: str) -> dict[str, np.ndarray]:
    from moetx.vision import data

    if split == "test":
        images, labels = data.load_fashion_mnist("test")
    elif split in ("train", "validation"):
        images, labels = data.load_fashion_mnist("train")
        cut = len(images) - VALIDATION_SIZE
        part = slice(None, cut) if split == "train" else slice(cut, None)
        images, labels = images[part], labels[part]
    else:
        raise ValueError(f"{HOLDOUT_TASK} has splits train, validation and test, not {split!r}.")
    return {"image": images, "label": labels}


def register_holdout_task() -> None:
    """(Re-)registers `fashion_mnist_holdout`: 'train' = the first 50,000 of Fashion-MNIST's
    training images, 'validation' = its last 10,000, 'test' = the official test set."""
    from moetx.vision import tasks as vision_tasks

    vision_tasks.register_array_task(HOLDOUT_TASK, holdout_split,
                                     splits=("train", "validation", "test"))


# ------------------------------------------------------------------------------ the fitness
@gin.configurable
@dataclasses.dataclass(frozen=True)
class AccuracyFitness(fitness_lib.TrainingFitness):
    """`TrainingFitness` with reward = an eval metric to maximise (`metric`, default
    'accuracy'): the same budget (steps or FLOPs), hurdle stages (a candidate stops after
    `hurdle_fraction` of its budget when its early accuracy is below the search's hurdle) and
    trial directories. It registers `fashion_mnist_holdout` in the trial's process."""

    metric: str | None = "accuracy"
    maximize: bool = True

    def register(self) -> None:
        super().register()
        register_holdout_task()


# ------------------------------------------------------------------------------ reporting
def accuracy_summary(output_dir: str, tag: str = "accuracy") -> dict[str, Any]:
    """Per arm of a `compare` run in `output_dir`: the final eval `tag` of each seed and their
    mean and spread (half the range)."""
    out: dict[str, Any] = {}
    for arm_dir in sorted(glob.glob(os.path.join(output_dir, "*", ""))):
        arm = os.path.basename(os.path.dirname(arm_dir))
        finals = {}
        for run_dir in sorted(glob.glob(os.path.join(arm_dir, "seed_*"))):
            curve = report.read_scalars(os.path.join(run_dir, "eval")).get(tag, [])
            if curve:
                finals[os.path.basename(run_dir)] = float(curve[-1][1])
        if finals:
            values = list(finals.values())
            out[arm] = {"final": finals, "mean": statistics.fmean(values),
                        "spread": (max(values) - min(values)) / 2 if len(values) > 1 else 0.0}
    return out


def best_trials(search_dir: str, n: int = 5) -> list[dict[str, Any]]:
    """The `n` best fully trained (or duplicate) trials of a search, best first: id, reward,
    text, status."""
    recs = [r for r in evolution.trials(search_dir)
            if r["status"] in (DONE, evolution.DUPLICATE) and r["reward"] is not None]
    recs.sort(key=lambda r: (-r["reward"], r["id"]))
    return [{k: r[k] for k in ("id", "reward", "text", "status")} for r in recs[:n]]


__all__ = ("Unary", "Binary", "from_rule", "BackpropCandidate", "parse_candidate",
           "rule_space", "backprop_space", "encode_backprop", "BACKPROP_CANDIDATE",
           "BackwardRuleModel", "AccuracyFitness", "register_holdout_task", "holdout_split",
           "HOLDOUT_TASK",
           "check_rule", "rule_fingerprint", "probe_inputs", "probe_output",
           "accuracy_summary", "best_trials")
