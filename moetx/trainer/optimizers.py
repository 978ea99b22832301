"""Optimizers and learning-rate schedules.

`adafactor` reimplements T5X's Adafactor (Shazeer & Stern 2018) with T5X's defaults:
decay_rate 0.8 (beta2_t = 1 - (t+1)^-0.8), factored second moments, no momentum, update clipping
at RMS 1.0, epsilon1 1e-30, parameter-scale multiplication floored at epsilon2 1e-3, and factoring
only dims >= 128. Which axes are factored comes from the parameters' *logical* axis names, as in
T5X's factor rules: `embed` is the ROW axis, `mlp`/`heads`/`kv`/`joined_kv`/`vocab`/`expert_mlp`
the COLUMN axis, and `layers`/`stack`/`expert` are BATCH axes (never averaged over), so an expert
kernel `[expert, embed, mlp]` keeps one factored moment per expert. Slots are named like T5X's
(`v_row`, `v_col`, `v`) so that T5X optimizer state maps over.

Every optimizer here is an `optax.GradientTransformation` paired with a function giving the
logical axes of its state, so the trainer can shard optimizer state like the parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

Array = jax.Array
Schedule = Callable[[Array], Array]

ROW, COLUMN, BATCH = "row", "column", "batch"
FACTOR_RULES: dict[str, str] = {
    "embed": ROW, "mlp_embed": ROW,
    "mlp": COLUMN, "heads": COLUMN, "kv": COLUMN, "joined_kv": COLUMN, "vocab": COLUMN,
    "expert_mlp": COLUMN,
    "layers": BATCH, "stack": BATCH, "expert": BATCH, "expert_group": BATCH,
}


# ------------------------------------------------------------------------------ schedules
@gin.configurable
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10000) -> Schedule:
    """T5X `constant * rsqrt_decay`: lr = base / sqrt(max(step, warmup_steps))."""
    _check_learning_rate("rsqrt_schedule.base_learning_rate", base_learning_rate)
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}.")

    def schedule(step):
        return base_learning_rate / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32),
                                                         warmup_steps))
    return schedule


@gin.configurable
def warmup_cosine_schedule(peak_learning_rate: float = 1e-3, warmup_steps: int = 1000,
                           decay_steps: int = 100000, end_fraction: float = 0.1) -> Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to `end_fraction` of it."""
    _check_learning_rate("warmup_cosine_schedule.peak_learning_rate", peak_learning_rate)
    if not 0.0 <= end_fraction <= 1.0:
        raise ValueError(f"warmup_cosine_schedule.end_fraction must be in [0, 1], got "
                         f"{end_fraction!r}.")
    if warmup_steps < 0 or decay_steps <= 0:
        raise ValueError(f"warmup_cosine_schedule needs warmup_steps >= 0 and decay_steps > 0, "
                         f"got {warmup_steps} and {decay_steps}.")
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_learning_rate, warmup_steps, max(decay_steps, warmup_steps + 1),
        peak_learning_rate * end_fraction)


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
    """lr = `learning_rate` at every step (0 freezes the parameters)."""
    _check_learning_rate("constant_schedule.learning_rate", learning_rate, allow_zero=True)
    return lambda step: jnp.asarray(learning_rate, jnp.float32)


def as_schedule(schedule, name: str) -> Schedule:
    """`schedule`, or for a number a constant schedule of it (checked as a learning rate)."""
    if callable(schedule):
        return schedule
    _check_learning_rate(name, schedule)
    return constant_schedule(schedule)


def _check_learning_rate(name: str, value, allow_zero: bool = False) -> None:
    """A learning rate is a finite number > 0 (>= 0 with `allow_zero`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")


# ----------------------------------------------------------------------------- optimizer API
@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and how to lay out its state.

    Attributes:
      tx: the gradient transformation (its `update` needs `params`).
      state_axes: maps the parameters' logical axes (a tree of `PartitionSpec` of names) and the
        abstract state to a tree of logical `PartitionSpec`s matching the state.
      schedule: learning rate as a function of the step, for logging.
    """

    tx: optax.GradientTransformation
    state_axes: Callable[[Any, Any], Any]
    schedule: Schedule


# ------------------------------------------------------------------------------ Adafactor
class FactorSpec(NamedTuple):
    """Which axis of a parameter is reduced for each factored moment (None: not factored), and
    which axes hold independent copies (BATCH: scanned layers, stacked experts) that the
    parameter scale and the update clipping must not average over."""

    row_axis: int | None  # averaged out of v_col... see `_factor_spec`.
    col_axis: int | None
    batch_axes: tuple[int, ...] = ()

    def rms(self, x: jax.Array) -> jax.Array:
        """Root mean square over every axis but the batch axes (kept as size-1 axes)."""
        axes = tuple(i for i in range(x.ndim) if i not in self.batch_axes)
        return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=bool(self.batch_axes)))


def _factor_spec(shape: tuple[int, ...], axes: tuple[str | None, ...] | None,
                 min_dim_size_to_factor: int) -> FactorSpec:
    """Picks the (row, column) axes to factor, from logical names when known.

    `v_row` averages the gradient square over the column axis (it has the row axis) and
    `v_col` averages over the row axis. Without usable names, the two largest dims are used
    (row = the second largest), as T5X's heuristic does.
    """
    batch, kinds = (), None
    if axes is not None and len(axes) == len(shape):
        kinds = [FACTOR_RULES.get(a) if a is not None else None for a in axes]
        # As T5X: BATCH axes are excluded from the parameter scale's and the clipping's means,
        # so a scanned stack or a stack of experts is updated as its unstacked layers would be.
        batch = tuple(i for i, k in enumerate(kinds) if k == BATCH)
    if len(shape) - len(batch) < 2:
        return FactorSpec(None, None, batch)
    row = col = None
    if kinds is not None:
        rows = [i for i, k in enumerate(kinds) if k == ROW]
        cols = [i for i, k in enumerate(kinds) if k == COLUMN]
        if len(rows) == 1 and len(cols) == 1:
            row, col = rows[0], cols[0]
        elif len(rows) + len(cols) == 0 and all(k == BATCH for k in kinds):
            return FactorSpec(None, None, batch)
    if row is None:
        free = [i for i in range(len(shape)) if i not in batch]
        order = sorted(free, key=lambda i: shape[i])  # stable: equal sizes keep their order
        row, col = order[-2], order[-1]
    if shape[row] < min_dim_size_to_factor or shape[col] < min_dim_size_to_factor:
        return FactorSpec(None, None, batch)
    return FactorSpec(row, col, batch)


class AdafactorState(NamedTuple):
    count: Array
    v_row: Any
    v_col: Any
    v: Any


@gin.configurable
def adafactor(
    schedule: Schedule = gin.REQUIRED,
    param_axes: Any = None,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    factored: bool = True,
    weight_decay_rate: float | None = None,
) -> Optimizer:
    """T5X-default Adafactor. `param_axes` (a tree of logical `PartitionSpec`s like the params)
    chooses the factored axes; the trainer fills it in. `schedule` may be a number (a constant
    learning rate)."""
    schedule = as_schedule(schedule, "adafactor.schedule")

    def specs_for(params):
        flat_axes = None
        if param_axes is not None:
            flat_axes = jax.tree_util.tree_leaves(
                param_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if flat_axes is not None and len(flat_axes) != len(leaves):
            raise ValueError(f"param_axes has {len(flat_axes)} leaves, params {len(leaves)}.")
        specs = [
            _factor_spec(tuple(p.shape), tuple(flat_axes[i]) if flat_axes else None,
                         min_dim_size_to_factor) if factored else FactorSpec(None, None, ())
            for i, p in enumerate(leaves)
        ]
        return specs, leaves, treedef

    def init(params):
        specs, leaves, treedef = specs_for(params)
        v_row, v_col, v = [], [], []
        for spec, p in zip(specs, leaves):
            if spec.row_axis is not None:
                v_row.append(jnp.zeros(_drop(p.shape, spec.col_axis), jnp.float32))
                v_col.append(jnp.zeros(_drop(p.shape, spec.row_axis), jnp.float32))
                v.append(jnp.zeros((1,), jnp.float32))
            else:
                v_row.append(jnp.zeros((1,), jnp.float32))
                v_col.append(jnp.zeros((1,), jnp.float32))
                v.append(jnp.zeros(p.shape, jnp.float32))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return AdafactorState(jnp.zeros([], jnp.int32), unflat(v_row), unflat(v_col), unflat(v))

    def update(grads, state, params):
        if params is None:
            raise ValueError("adafactor needs params in update() (parameter scaling).")
        specs, p_leaves, treedef = specs_for(params)
        g_leaves = treedef.flatten_up_to(grads)
        vr_leaves = treedef.flatten_up_to(state.v_row)
        vc_leaves = treedef.flatten_up_to(state.v_col)
        v_leaves = treedef.flatten_up_to(state.v)
        step = state.count
        lr = schedule(step)
        t = step.astype(jnp.float32) + 1.0
        beta2 = 1.0 - t ** (-decay_rate)
        out_u, out_vr, out_vc, out_v = [], [], [], []
        for spec, p, g, vr, vc, v in zip(specs, p_leaves, g_leaves, vr_leaves, vc_leaves,
                                          v_leaves):
            g = g.astype(jnp.float32)
            p32 = p.astype(jnp.float32)
            g_sq = jnp.square(g) + epsilon1
            if spec.row_axis is not None:
                new_vr = beta2 * vr + (1 - beta2) * jnp.mean(g_sq, axis=spec.col_axis)
                new_vc = beta2 * vc + (1 - beta2) * jnp.mean(g_sq, axis=spec.row_axis)
                # Row axis index within v_row (col axis removed).
                r_in_vr = spec.row_axis - (spec.col_axis < spec.row_axis)
                row_mean = jnp.mean(new_vr, axis=r_in_vr, keepdims=True)
                row_factor = jax.lax.rsqrt(new_vr / row_mean)
                col_factor = jax.lax.rsqrt(new_vc)
                y = (g * jnp.expand_dims(row_factor, spec.col_axis)
                     * jnp.expand_dims(col_factor, spec.row_axis))
                new_v = v
            else:
                new_v = beta2 * v + (1 - beta2) * g_sq
                y = g * jax.lax.rsqrt(new_v)
                new_vr, new_vc = vr, vc
            if clipping_threshold is not None:
                denom = jnp.maximum(1.0, spec.rms(y) / clipping_threshold)
                y = y / denom
            step_size = lr
            if multiply_by_parameter_scale:
                step_size = step_size * jnp.maximum(spec.rms(p32), epsilon2)
            u = -step_size * y
            if weight_decay_rate is not None:
                u = u - weight_decay_rate * lr * p32
            out_u.append(u.astype(p.dtype))
            out_vr.append(new_vr)
            out_vc.append(new_vc)
            out_v.append(new_v)
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(out_u), AdafactorState(step + 1, unflat(out_vr), unflat(out_vc),
                                             unflat(out_v))

    def state_axes(axes_tree, abstract_params):
        specs, leaves, treedef = specs_for(abstract_params)
        flat_axes = jax.tree_util.tree_leaves(axes_tree,
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))
        vr, vc, v = [], [], []
        for spec, ax in zip(specs, flat_axes):
            ax = tuple(ax)
            if spec.row_axis is not None:
                vr.append(PartitionSpec(*_drop(ax, spec.col_axis)))
                vc.append(PartitionSpec(*_drop(ax, spec.row_axis)))
                v.append(PartitionSpec(None))
            else:
                vr.append(PartitionSpec(None))
                vc.append(PartitionSpec(None))
                v.append(PartitionSpec(*ax))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return AdafactorState(PartitionSpec(), unflat(vr), unflat(vc), unflat(v))

    return Optimizer(optax.GradientTransformation(init, update), state_axes, schedule)


def _drop(seq, i):
    return tuple(x for j, x in enumerate(seq) if j != i)


def like_params_state_axes(tx: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    """State axes of a transformation whose state holds params-shaped trees (and scalars)."""
    def state_axes(axes_tree, abstract_params):
        state = jax.eval_shape(tx.init, abstract_params)
        return optax.tree_map_params(
            tx, lambda _, ax: ax, state, axes_tree,
            transform_non_params=lambda _: PartitionSpec(),
            is_leaf=lambda x: isinstance(x, PartitionSpec))
    return state_axes


# ----------------------------------------------------------------------------------- AdamW
@gin.configurable
def adamw(schedule: Schedule = gin.REQUIRED, param_axes: Any = None, b1: float = 0.9,
          b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
          grad_clip_norm: float | None = 1.0) -> Optimizer:
    """AdamW (MaxText defaults) with optional global-norm clipping; moments shard like params.
    `schedule` may be a number (a constant learning rate)."""
    del param_axes
    schedule = as_schedule(schedule, "adamw.schedule")
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"adamw.{name} must be in [0, 1), got {value!r}.")
    if not eps > 0 or weight_decay < 0:
        raise ValueError(f"adamw needs eps > 0 and weight_decay >= 0, got {eps!r} and "
                         f"{weight_decay!r}.")
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return Optimizer(tx, like_params_state_axes(tx), schedule)


# ----------------------------------------------------------------------------- SGD (vision)
def kernels_only(params: Any) -> Any:
    """Weight-decay mask: True for matrices and conv kernels, False for biases, norm scales and
    other vectors (EfficientNetV2 and ResNet-RS decay neither bias nor gamma/beta)."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


@gin.configurable
def sgd_momentum(schedule: Schedule = gin.REQUIRED, param_axes: Any = None,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 decay_kernels_only: bool = True,
                 grad_clip_norm: float | None = None) -> Optimizer:
    """SGD with (Nesterov) momentum (ResNet-RS trains with momentum 0.9) and decoupled weight
    decay:

        m_t = momentum * m_{t-1} + g_t;  p -= lr_t * (m_t + weight_decay * p)

    (with Nesterov, g_t + momentum * m_t replaces m_t). The decay stays out of the momentum
    buffer and follows the learning-rate schedule, as AdamW's does.
    `decay_kernels_only` skips biases and normalisation scales."""
    del param_axes
    schedule = as_schedule(schedule, "sgd_momentum.schedule")
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    if weight_decay:
        parts.append(optax.add_decayed_weights(
            weight_decay, mask=kernels_only if decay_kernels_only else None))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    return Optimizer(tx, like_params_state_axes(tx), schedule)


# ------------------------------------------------------------- PowerSign / AddSign (NOS)
# Bello et al. 2017, "Neural Optimizer Search with Reinforcement Learning": update rules found
# by searching programs, written here as TensorFlow's reference optimizers define them. With
# m_t = beta * m_{t-1} + (1 - beta) * g_t (updated before use) and the agreement
# a_t = sign(g_t) * sign(m_t) in {-1, 0, 1}:
#
#   PowerSign: p -= lr_t * base ** (f(t) * a_t) * g_t        (base e by default)
#   AddSign:   p -= lr_t * (alpha + f(t) * a_t) * g_t         (alpha 1 by default)
#
# f is an optional sign decay evaluated at the number of updates already made (0 at the first
# update), so the first update sees f(0): TensorFlow's optimizers read the global step before
# incrementing it.
SignDecay = Callable[[Array], Array]


@gin.configurable
def linear_sign_decay(decay_steps: int) -> SignDecay:
    """f(t) = max(0, (decay_steps - min(t, decay_steps)) / decay_steps): 1 down to 0."""
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be positive, got {decay_steps}.")

    def decay(step):
        t = jnp.minimum(jnp.asarray(step, jnp.int32), decay_steps)
        return jnp.maximum(0.0, (decay_steps - t).astype(jnp.float32) / decay_steps)
    return decay


@gin.configurable
def cosine_sign_decay(decay_steps: int, num_periods: float = 0.5,
                      zero_after: float | None = None) -> SignDecay:
    """f(t) = 0.5 * (1 + cos(2 pi num_periods min(t, T) / T)); 0 once 2 num_periods t / T
    reaches 2 zero_after. The default half period goes from 1 at t=0 to 0 at t=T."""
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be positive, got {decay_steps}.")

    def decay(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), decay_steps)
        fraction = 2.0 * num_periods * t / decay_steps
        out = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        if zero_after is not None:
            out = jnp.where(fraction >= 2 * zero_after, 0.0, out)
        return out
    return decay


@gin.configurable
def restart_sign_decay(decay_steps: int, num_periods: float = 1.0,
                       zero_after: float | None = None) -> SignDecay:
    """f(t) = 0.5 * (1 + cos(pi * ((num_periods * min(t, T)) mod T) / T)): cosine cycles that
    restart at 1 `num_periods` times over T steps (SGDR-like); 0 once num_periods t / T reaches
    zero_after."""
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be positive, got {decay_steps}.")

    def decay(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), decay_steps)
        fraction = jnp.mod(num_periods * t, decay_steps) / decay_steps
        out = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        if zero_after is not None:
            out = jnp.where(num_periods * t / decay_steps >= zero_after, 0.0, out)
        return out
    return decay


class SignAgreementState(NamedTuple):
    """Updates made so far and the running average m of the gradients."""

    count: Array
    m: Any


def scale_by_sign_agreement(rule: str, beta: float = 0.9, base: float = math.e,
                            alpha: float = 1.0, sign_decay: SignDecay | None = None
                            ) -> optax.GradientTransformation:
    """The PowerSign (`rule='powersign'`) or AddSign (`'addsign'`) scaling of the gradients,
    before the learning rate (see the comment above)."""
    if rule not in ("powersign", "addsign"):
        raise ValueError(f"rule must be 'powersign' or 'addsign', got {rule!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    if rule == "powersign" and base <= 0:
        raise ValueError(f"PowerSign's base must be positive, got {base}.")
    log_base = math.log(base) if rule == "powersign" else 0.0

    def init(params):
        return SignAgreementState(count=jnp.zeros((), jnp.int32),
                                  m=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        m = jax.tree_util.tree_map(lambda m, g: beta * m + (1.0 - beta) * g, state.m, grads)
        f = 1.0 if sign_decay is None else sign_decay(state.count)

        def scale(g, m):
            agree = jnp.sign(g) * jnp.sign(m)
            mult = jnp.exp(log_base * f * agree) if rule == "powersign" else alpha + f * agree
            return (mult * g).astype(g.dtype)

        updates = jax.tree_util.tree_map(scale, grads, m)
        return updates, SignAgreementState(count=state.count + 1, m=m)

    return optax.GradientTransformation(init, update)


def _sign_optimizer(rule: str, schedule: Schedule, beta: float, base: float, alpha: float,
                    sign_decay: SignDecay | None, grad_clip_norm: float | None) -> Optimizer:
    schedule = as_schedule(schedule, f"{rule}.schedule")
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(scale_by_sign_agreement(rule, beta, base, alpha, sign_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    return Optimizer(tx, like_params_state_axes(tx), schedule)


@gin.configurable
def powersign(schedule: Schedule = gin.REQUIRED, param_axes: Any = None, beta: float = 0.9,
              base: float = math.e, sign_decay: SignDecay | None = None,
              grad_clip_norm: float | None = None) -> Optimizer:
    """PowerSign: p -= lr * base ** (f(t) * sign(g) * sign(m)) * g (Bello et al. 2017).
    `make_optimizer.optimizer_fn = @powersign`; `powersign.sign_decay = @linear_sign_decay()`."""
    del param_axes
    return _sign_optimizer("powersign", schedule, beta, base, 1.0, sign_decay, grad_clip_norm)


@gin.configurable
def addsign(schedule: Schedule = gin.REQUIRED, param_axes: Any = None, beta: float = 0.9,
            alpha: float = 1.0, sign_decay: SignDecay | None = None,
            grad_clip_norm: float | None = None) -> Optimizer:
    """AddSign: p -= lr * (alpha + f(t) * sign(g) * sign(m)) * g (Bello et al. 2017).
    `make_optimizer.optimizer_fn = @addsign`; `addsign.sign_decay = @cosine_sign_decay()`."""
    del param_axes
    return _sign_optimizer("addsign", schedule, beta, math.e, alpha, sign_decay, grad_clip_norm)


@gin.configurable
def make_optimizer(optimizer_fn: Callable[..., Optimizer] = adafactor,
                   schedule: Schedule | None = None, param_axes: Any = None) -> Optimizer:
    """Builds the configured optimizer (default: T5X Adafactor with the rsqrt schedule).
    `schedule` may be a number: a constant learning rate."""
    schedule = rsqrt_schedule() if schedule is None else as_schedule(
        schedule, "make_optimizer.schedule")
    return optimizer_fn(schedule=schedule, param_axes=param_axes)
