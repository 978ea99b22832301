"""Routers for sparse mixture-of-experts layers: which token goes to which expert, with what weight.

Read top to bottom:
  1. The two router losses: `router_z_loss` (ST-MoE) and `load_balancing_loss` (Switch,
     generalised to top-k).
  2. `expert_capacity`: the static number of buffer slots each expert has per routing group.
  3. Tokens-choose top-k routing, in two representations that make identical decisions:
     `tokens_choose_masked` -> `RouterMask` (one-hot dispatch/combine tensors for einsums) and
     `tokens_choose_scatter` -> `RouterIndices` (expert index and buffer position per choice).
  4. `experts_choose_masked`: each expert picks its tokens (encoders only).
  5. `sort_tokens_by_expert`: the dropless path, feeding `jax.lax.ragged_dot`.
  6. Flax modules: `Router` (float32 logits, bfloat16 as an ablation; optional input jitter)
     and the three routers that pair it with one routing function.

Tokens are routed in groups (`num_groups` G, `tokens_per_group` T). Each expert owns a buffer of
`capacity` C slots per group; choices beyond it are dropped, which makes the dropped token's MoE
output exactly zero (the residual connection carries the token on).

Conventions are flaxformer's unless a docstring says otherwise: the load-balancing density takes
the max over a token's k one-hots, combine weights are the raw softmax probabilities, all top-1
choices take buffer slots before any top-2 choice, capacity = max(round(CF·T/E), 4) without a
factor k. Mesh-TF's top-2 conventions (gates renormalised over the top 2, the second-expert
policy) are options, for parity with checkpoints trained that way.

Masked or scatter? The masked form moves tokens with einsums against one-hot tensors of size
G·T·E·C: dense matmuls that TPUs (and GSPMD's all-to-all) like, paid for with memory and FLOPs
that grow with E·C. The scatter form keeps indices of size G·T·k and moves tokens with gathers
and scatters: far less memory, and the better choice on CPU and GPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moetx.nn.layers import DenseGeneral

Array = jax.Array
Initializer = Callable[..., Array]

SECOND_EXPERT_POLICIES = ("all", "none", "threshold", "random")
ROUTER_TYPES = ("tokens_choose_masked", "tokens_choose_scatter", "experts_choose_masked")
# Families accepted by `check_router_allowed` besides the concrete router types.
ROUTER_FAMILIES = ("tokens_choose", "experts_choose")


# ---- Losses --------------------------------------------------------------------------------------


def router_z_loss(router_logits: Array, padding_mask: Array | None = None) -> Array:
    """ST-MoE router z-loss: the mean over tokens of (logsumexp of the raw router logits)².

    It keeps the logits small, so the float32 router softmax stays in its precise range.

    Args:
      router_logits: <float32>[num_groups, tokens_per_group, num_experts], raw (before softmax).
      padding_mask: optional <float32>[num_groups, tokens_per_group], 1 for real tokens. Given,
        the mean runs over real tokens only (Mesh-TF); absent, over all G·T tokens (flaxformer).

    Returns:
      <float32>[] loss; (ln E)² for all-zero logits.
    """
    z_squared = jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1))
    if padding_mask is None:
        return jnp.mean(z_squared)
    mask = padding_mask.astype(jnp.float32)
    return jnp.sum(z_squared * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(
    router_probs: Array, expert_mask: Array, padding_mask: Array | None = None
) -> Array:
    """Switch load-balancing loss generalised to top-k: E² · mean over groups and experts of f·P.

    f[g, e] is the fraction of the group's tokens whose top-k includes expert e and P[g, e] the
    mean router probability of e. Convention (flaxformer): a token counts once for each expert in
    its top-k (the max over its k one-hots), so a perfectly balanced top-k router scores k; Mesh-TF
    top-2 gating counts only top-1 choices and would score 1. Gradients flow through P only.

    Args:
      router_probs: <float32>[num_groups, tokens_per_group, num_experts], softmax of the logits.
      expert_mask: <bool|float32>[num_groups, tokens_per_group, num_experts] (1 where the token
        chose the expert), or <bool|int32>[G, T, k, E] one-hots, reduced here by a max over k.
      padding_mask: optional <float32>[num_groups, tokens_per_group]; multiplies the probabilities
        (and the mask) first, so padding tokens count in neither f nor P.

    Returns:
      <float32>[] loss: 1 for balanced top-1 with uniform probabilities, E when every token goes
      to one expert with probability 1.
    """
    probs = router_probs.astype(jnp.float32)
    mask = expert_mask.astype(jnp.float32)
    if mask.ndim == 4:
        mask = jnp.max(mask, axis=-2)
    if mask.shape != probs.shape:
        raise ValueError(
            f"load_balancing_loss: expected expert_mask of shape {probs.shape} (or [G, T, k, E]), "
            f"found {expert_mask.shape}. Fix: one-hot the expert indices over num_experts."
        )
    if padding_mask is not None:
        real = padding_mask.astype(jnp.float32)[..., None]
        probs, mask = probs * real, mask * real
    num_experts = probs.shape[-1]
    # Shape: [G, T, E] -> [G, E]
    token_fraction = jnp.mean(mask, axis=-2)
    prob_fraction = jnp.mean(probs, axis=-2)
    return num_experts**2 * jnp.mean(token_fraction * prob_fraction)


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    capacity_factor: float,
    min_expert_capacity: int = 4,
) -> int:
    """Buffer slots per expert per group: max(round(CF · T / E), min_expert_capacity).

    Not multiplied by k (flaxformer, ST-MoE): top-2 routing with CF 1.25 already drops choices.
    Python's `round` is used (half to even), as in flaxformer. Not capped at T, so with the
    minimum of 4 a tiny group can have more slots than tokens.
    """
    if tokens_per_group < 1 or num_experts < 1 or capacity_factor <= 0:
        raise ValueError(
            "expert_capacity: expected tokens_per_group >= 1, num_experts >= 1 and "
            f"capacity_factor > 0, found {tokens_per_group}, {num_experts}, {capacity_factor}. "
            "Fix: check the group size and the train/eval capacity factors."
        )
    return max(int(round(capacity_factor * tokens_per_group / num_experts)), min_expert_capacity)


# ---- Router outputs ------------------------------------------------------------------------------


@struct.dataclass
class RouterMetrics:
    """Scalars for TensorBoard, each <float32>[] and without gradient."""

    expert_usage: Array  # filled fraction of the G·E·C expert buffer slots
    fraction_tokens_left_behind: Array  # real tokens dispatched to no expert at all
    router_confidence: Array  # mean combine weight of a dispatched (token, expert) pair


@struct.dataclass
class RouterMask:
    """Masked routing, for einsum dispatch: expert_inputs = einsum('gtd,gtec->gecd', x, dispatch).

    dispatch_mask: <bool>[num_groups, tokens_per_group, num_experts, capacity].
    combine_array: <float32>[num_groups, tokens_per_group, num_experts, capacity], the combine
      weight on the dispatched slot and 0 elsewhere.
    auxiliary_loss, router_z_loss: <float32>[].
    """

    dispatch_mask: Array
    combine_array: Array
    auxiliary_loss: Array
    router_z_loss: Array
    metrics: RouterMetrics


@struct.dataclass
class RouterIndices:
    """Scatter routing, for gathers: choice j of token t goes to slot buffer_position[g, t, j] of
    expert expert_index[g, t, j].

    expert_index: <int32>[num_groups, tokens_per_group, k], the chosen experts (kept as chosen
      even when the choice is dropped).
    buffer_position: <int32>[num_groups, tokens_per_group, k], in [0, capacity) for a dispatched
      choice and exactly `capacity` for a dropped one (out of bounds: use mode='drop' scatters).
    combine_weights: <float32>[num_groups, tokens_per_group, k], 0 for a dropped choice.
    auxiliary_loss, router_z_loss: <float32>[].
    """

    expert_index: Array
    buffer_position: Array
    combine_weights: Array
    auxiliary_loss: Array
    router_z_loss: Array
    metrics: RouterMetrics


RouterOutput = RouterMask | RouterIndices


def indices_to_masks(
    routing: RouterIndices, num_experts: int, capacity: int
) -> tuple[Array, Array]:
    """The masked form of scatter routing: (<bool>[G, T, E, C] dispatch, <float32>[G, T, E, C]
    combine). A dropped choice (position == capacity) one-hots to all zeros."""
    # Shape: [G, T, k] -> [G, T, k, E, C]
    slots = jax.nn.one_hot(routing.expert_index, num_experts)[..., None] * jax.nn.one_hot(
        routing.buffer_position, capacity
    )[..., None, :]
    dispatch = jnp.sum(slots, axis=2) > 0
    combine = jnp.einsum("gtk,gtkec->gtec", routing.combine_weights, slots)
    return dispatch, combine


# ---- Tokens choose: shared steps -----------------------------------------------------------------


@struct.dataclass
class _TokenChoices:
    """What both tokens-choose implementations start from, before any buffer slot is given."""

    expert_index: Array  # <int32>[G, T, k], each token's top-k experts
    gates: Array  # <float32>[G, T, k], their combine weights if dispatched
    selected: Array  # <bool>[G, T, k], false where the policy or padding refuses the choice
    order: Array  # <int32>[G, T], the order in which tokens claim slots (see `_priority_order`)
    auxiliary_loss: Array  # <float32>[]
    router_z_loss: Array  # <float32>[]


def _choose_top_k(
    router_probs: Array, router_logits: Array, num_selected_experts: int, capacity: int,
    batch_prioritized_routing: bool, renormalize_top_k_gates: bool, second_expert_policy: str,
    second_expert_threshold: float, rng: Array | None, padding_mask: Array | None,
) -> _TokenChoices:
    """Validates the arguments, picks each token's top-k experts and gates, and applies padding
    and the second-expert policy (arguments as for `tokens_choose_masked`).

    Mesh-TF order: gates are renormalised over the k chosen experts *before* the policy and the
    capacity drop, never afterwards, so a token whose second choice is dropped keeps
    gate_1 / (gate_1 + gate_2) < 1. The policy always judges the renormalised gate_2, whether or
    not the combine weights are renormalised. The load-balancing density counts the top-k
    choices before the policy and capacity drop any of them.
    """
    policy, k = second_expert_policy, num_selected_experts
    _require(router_probs.ndim == 3, "router_probs <float32>[G, T, E]",
             f"shape {router_probs.shape}", "reshape the tokens into routing groups")
    num_experts = router_probs.shape[-1]
    _require(1 <= k <= num_experts, f"1 <= num_selected_experts <= num_experts={num_experts}",
             str(k), "lower num_selected_experts")
    _require(capacity >= 1, "capacity >= 1", str(capacity), "compute it with expert_capacity")
    _require(policy in SECOND_EXPERT_POLICIES, f"second_expert_policy in {SECOND_EXPERT_POLICIES}",
             repr(policy), "pick one of those")
    _require(policy == "all" or k == 2, f"num_selected_experts=2 for the top-2 policy {policy!r}",
             str(k), "use second_expert_policy='all'")
    _require(policy != "random" or rng is not None, "an rng for second_expert_policy='random'",
             "None", "pass rng= (the Flax routers draw it from the 'jitter' stream), or use "
             "'threshold' where no rng exists")

    if padding_mask is not None:
        router_probs = router_probs * padding_mask[..., None]
    top_probs, expert_index = jax.lax.top_k(router_probs, k)
    normalized = top_probs / (jnp.sum(top_probs, axis=-1, keepdims=True) + 1e-9)
    selected = jnp.ones(expert_index.shape, dtype=bool)
    if policy != "all":
        gate_2 = jax.lax.stop_gradient(normalized[..., 1])
        if policy == "none":
            keep_second = jnp.zeros_like(gate_2, dtype=bool)
        elif policy == "threshold":
            keep_second = gate_2 > second_expert_threshold  # strict, as in Mesh-TF
        else:  # 'random': keep with probability min(1, gate_2 / threshold)
            uniform = jax.random.uniform(rng, gate_2.shape, jnp.float32)
            keep_second = uniform < gate_2 / max(second_expert_threshold, 1e-9)
        selected = selected.at[..., 1].set(keep_second)
    if padding_mask is not None:
        selected = selected & (padding_mask[..., None] > 0)
    top_k_mask = jax.nn.one_hot(expert_index, router_probs.shape[-1], dtype=jnp.float32)
    return _TokenChoices(
        expert_index=expert_index.astype(jnp.int32),
        gates=normalized if renormalize_top_k_gates else top_probs,
        selected=selected,
        order=_priority_order(router_probs, batch_prioritized_routing),
        auxiliary_loss=load_balancing_loss(router_probs, top_k_mask, padding_mask),
        router_z_loss=router_z_loss(router_logits, padding_mask),
    )


def _require(ok: bool, expected: str, found: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"tokens-choose routing: expected {expected}, found {found}. Fix: {fix}.")


def _priority_order(router_probs: Array, batch_prioritized_routing: bool) -> Array:
    """<int32>[G, T]: the order in which each group's tokens claim buffer slots.

    Without BPR this is token order, so early tokens win; with BPR, descending top-1 probability,
    so confident tokens win (Riquelme et al. 2021). BPR must stay off in causal decoders: the
    order depends on the confidence of *later* tokens, so whether token t is dropped (and its
    output) depends on the future, and training no longer matches step-by-step decoding.
    """
    num_groups, tokens_per_group, _ = router_probs.shape
    if not batch_prioritized_routing:
        order = jnp.arange(tokens_per_group, dtype=jnp.int32)
        return jnp.broadcast_to(order, (num_groups, tokens_per_group))
    top_1 = jnp.max(jax.lax.stop_gradient(router_probs), axis=-1)
    return jnp.argsort(-top_1, axis=-1, stable=True).astype(jnp.int32)


def _routing_metrics(
    token_dispatched: Array, num_dispatched: Array, weight_sum: Array, num_slots: int,
    padding_mask: Array | None,
) -> RouterMetrics:
    """token_dispatched: <bool>[G, T], whether the token reached any expert; num_dispatched and
    weight_sum: <float32>[], dispatched (token, expert) pairs and their summed combine weights."""
    real = jnp.ones(token_dispatched.shape) if padding_mask is None else padding_mask
    real = real.astype(jnp.float32)
    reached = jnp.sum(token_dispatched.astype(jnp.float32) * real)
    num_dispatched = jax.lax.stop_gradient(num_dispatched.astype(jnp.float32))
    return RouterMetrics(
        expert_usage=num_dispatched / num_slots,
        fraction_tokens_left_behind=1.0 - reached / jnp.maximum(jnp.sum(real), 1.0),
        router_confidence=jax.lax.stop_gradient(weight_sum) / jnp.maximum(num_dispatched, 1.0),
    )


# ---- Tokens choose: masked (one-hot) implementation ----------------------------------------------


def _buffer_positions_by_cumsum(
    expert_index: Array, selected: Array, order: Array, num_experts: int
) -> Array:
    """Slot claimed by each choice: an exclusive cumsum of one-hots over the priority order.

    Returns <int32>[G, T, k, E]: one-hot over E times the position in that expert's buffer,
    -1 where the choice was not made (unselected choices claim nothing).
    """
    num_groups, tokens_per_group, k = expert_index.shape
    claims = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
    claims = claims * selected[..., None].astype(jnp.int32)
    claims = jnp.take_along_axis(claims, order[:, :, None, None], axis=1)
    # Shape: [G, T, k, E] -> [G, k·T, E], choice-major: every top-1 choice precedes every top-2.
    claims = jnp.swapaxes(claims, 1, 2).reshape(num_groups, k * tokens_per_group, num_experts)
    position = jnp.cumsum(claims, axis=1) - claims
    position = jnp.where(claims > 0, position, -1)
    # Shape: [G, k·T, E] -> [G, T, k, E], then back from priority order to token order.
    position = jnp.swapaxes(position.reshape(num_groups, k, tokens_per_group, num_experts), 1, 2)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(position, inverse[:, :, None, None], axis=1)


def tokens_choose_masked(
    router_probs: Array,
    router_logits: Array,
    *,
    num_selected_experts: int,
    capacity: int,
    batch_prioritized_routing: bool = False,
    renormalize_top_k_gates: bool = False,
    second_expert_policy: str = "all",
    second_expert_threshold: float = 0.2,
    rng: Array | None = None,
    padding_mask: Array | None = None,
) -> RouterMask:
    """Tokens-choose top-k routing as one-hot dispatch and combine tensors.

    Args:
      router_probs: <float32>[num_groups, tokens_per_group, num_experts], softmax of the logits.
      router_logits: <float32>[num_groups, tokens_per_group, num_experts], raw, for the z-loss.
      num_selected_experts: k, experts per token (1 for Switch, 2 for ST-MoE).
      capacity: buffer slots per expert per group (see `expert_capacity`).
      batch_prioritized_routing: claim slots in descending top-1 probability instead of token
        order (see `_priority_order`: never in a causal decoder).
      renormalize_top_k_gates: combine weights renormalised over the k chosen experts (Mesh-TF,
        Mixtral) instead of the raw probabilities (flaxformer). With k=1 the gate becomes 1 and
        the router learns from the auxiliary losses alone.
      second_expert_policy: Mesh-TF's filter on second choices (k=2 only): 'all' keeps them,
        'none' drops them, 'threshold' keeps those with renormalised gate_2 > threshold,
        'random' keeps them with probability min(1, gate_2 / threshold) and needs `rng`.
        Refused second choices claim no slot.
      second_expert_threshold: the policy's threshold (Mesh-TF default 0.2).
      rng: PRNG key, used only by the 'random' policy.
      padding_mask: optional <float32>[num_groups, tokens_per_group], 1 for real tokens; padding
        tokens get probability 0, claim no slot and are left out of both losses.

    Returns:
      RouterMask with dispatch_mask <bool>[G, T, E, C] and combine_array <float32>[G, T, E, C].
    """
    choices = _choose_top_k(
        router_probs, router_logits, num_selected_experts, capacity, batch_prioritized_routing,
        renormalize_top_k_gates, second_expert_policy, second_expert_threshold, rng, padding_mask,
    )
    num_groups, _, num_experts = router_probs.shape
    position = _buffer_positions_by_cumsum(
        choices.expert_index, choices.selected, choices.order, num_experts
    )
    kept = (position >= 0) & (position < capacity)
    # A token picks each expert at most once, so summing over k merges disjoint one-hots.
    # Shape: [G, T, k, E] -> [G, T, E]
    expert_position = jnp.sum(jnp.where(kept, position, 0), axis=2)
    expert_gate = jnp.einsum("gtk,gtke->gte", choices.gates, kept.astype(jnp.float32))
    # Shape: [G, T, E] -> [G, T, E, C]
    dispatch_mask = jax.nn.one_hot(expert_position, capacity, dtype=bool)
    dispatch_mask = dispatch_mask & jnp.any(kept, axis=2)[..., None]
    combine_array = expert_gate[..., None] * dispatch_mask
    metrics = _routing_metrics(
        jnp.any(dispatch_mask, axis=(2, 3)), jnp.sum(dispatch_mask), jnp.sum(combine_array),
        num_groups * num_experts * capacity, padding_mask,
    )
    return RouterMask(dispatch_mask, combine_array, choices.auxiliary_loss,
                      choices.router_z_loss, metrics)


# ---- Tokens choose: scatter (indices) implementation ---------------------------------------------


def _rank_within_expert(keys: Array, num_keys: int) -> Array:
    """<int32>[n] -> <int32>[n]: how many earlier entries share each entry's key, via a stable
    sort (no [n, E] one-hot)."""
    sort = jnp.argsort(keys, stable=True)
    counts = jnp.zeros(num_keys, jnp.int32).at[keys].add(1)
    first_of_key = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(keys.shape[0], dtype=jnp.int32) - first_of_key[keys[sort]]
    return jnp.zeros_like(keys).at[sort].set(rank_sorted)


def _buffer_positions_by_sort(
    expert_index: Array, selected: Array, order: Array, num_experts: int
) -> Array:
    """<int32>[G, T, k]: each choice's position in its expert's buffer, in the priority order of
    `_buffer_positions_by_cumsum` but computed by ranking within a stable sort by expert."""
    num_groups, tokens_per_group, k = expert_index.shape
    # Unselected choices get the sentinel key E: they sort last and never count against a buffer.
    keys = jnp.where(selected, expert_index, num_experts)
    keys = jnp.take_along_axis(keys, order[:, :, None], axis=1)
    # Shape: [G, T, k] -> [G, k·T], choice-major: every top-1 choice precedes every top-2.
    keys = jnp.swapaxes(keys, 1, 2).reshape(num_groups, k * tokens_per_group)
    rank = jax.vmap(functools.partial(_rank_within_expert, num_keys=num_experts + 1))(keys)
    # Shape: [G, k·T] -> [G, T, k], then back from priority order to token order.
    rank = jnp.swapaxes(rank.reshape(num_groups, k, tokens_per_group), 1, 2)
    return jnp.take_along_axis(rank, jnp.argsort(order, axis=-1)[:, :, None], axis=1)


def tokens_choose_scatter(
    router_probs: Array,
    router_logits: Array,
    *,
    num_selected_experts: int,
    capacity: int,
    batch_prioritized_routing: bool = False,
    renormalize_top_k_gates: bool = False,
    second_expert_policy: str = "all",
    second_expert_threshold: float = 0.2,
    rng: Array | None = None,
    padding_mask: Array | None = None,
) -> RouterIndices:
    """Tokens-choose top-k routing as indices; the same decisions as `tokens_choose_masked`.

    Arguments as for `tokens_choose_masked`. With capacity >= tokens_per_group nothing can drop
    (a token picks an expert at most once), which makes this the routing of the dropless path.

    Returns:
      RouterIndices with expert_index, buffer_position (== capacity when dropped) and
      combine_weights (0 when dropped), each [G, T, k].
    """
    choices = _choose_top_k(
        router_probs, router_logits, num_selected_experts, capacity, batch_prioritized_routing,
        renormalize_top_k_gates, second_expert_policy, second_expert_threshold, rng, padding_mask,
    )
    num_groups, _, num_experts = router_probs.shape
    position = _buffer_positions_by_sort(
        choices.expert_index, choices.selected, choices.order, num_experts
    )
    kept = choices.selected & (position < capacity)
    combine_weights = jnp.where(kept, choices.gates, 0.0)
    metrics = _routing_metrics(
        jnp.any(kept, axis=-1), jnp.sum(kept), jnp.sum(combine_weights),
        num_groups * num_experts * capacity, padding_mask,
    )
    buffer_position = jnp.where(kept, position, capacity).astype(jnp.int32)
    return RouterIndices(choices.expert_index, buffer_position, combine_weights,
                         choices.auxiliary_loss, choices.router_z_loss, metrics)


# ---- Experts choose ------------------------------------------------------------------------------


def experts_choose_masked(
    router_probs: Array,
    router_logits: Array,
    capacity: int,
    padding_mask: Array | None = None,
) -> RouterMask:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    Every buffer is full by construction, so there is no load-balancing loss (returned as 0); a
    token may be picked by several experts or by none. An expert ranks the whole group, future
    tokens included, so a token's output depends on later tokens: this breaks causality, and a
    causal decoder must refuse it (`check_router_allowed`). Use it in encoders only.

    Args:
      router_probs: <float32>[num_groups, tokens_per_group, num_experts].
      router_logits: <float32>[num_groups, tokens_per_group, num_experts], for the z-loss.
      capacity: tokens per expert per group, at most tokens_per_group.
      padding_mask: optional <float32>[num_groups, tokens_per_group]; padding tokens get
        probability 0, so they are picked last and, when picked, get combine weight 0.

    Returns:
      RouterMask with dispatch_mask <bool>[G, T, E, C] and combine_array <float32>[G, T, E, C].
    """
    tokens_per_group = router_probs.shape[1]
    if not 1 <= capacity <= tokens_per_group:
        raise ValueError(
            f"experts_choose_masked: expected 1 <= capacity <= tokens_per_group "
            f"({tokens_per_group}), found {capacity}. Fix: lower the capacity factor or "
            "min_expert_capacity, or use larger groups."
        )
    if padding_mask is not None:
        router_probs = router_probs * padding_mask[..., None]
    # Shape: [G, T, E] -> [G, E, T]: each expert ranks the tokens of its group.
    expert_gate, token_index = jax.lax.top_k(jnp.swapaxes(router_probs, 1, 2), capacity)
    # Shape: [G, E, C] -> [G, E, C, T] -> [G, T, E, C]
    dispatch_mask = jnp.transpose(jax.nn.one_hot(token_index, tokens_per_group, dtype=bool),
                                  (0, 3, 1, 2))
    combine_array = expert_gate[:, None, :, :] * dispatch_mask
    metrics = _routing_metrics(
        jnp.any(dispatch_mask, axis=(2, 3)), jnp.sum(dispatch_mask), jnp.sum(combine_array),
        dispatch_mask.size // tokens_per_group, padding_mask,
    )
    return RouterMask(dispatch_mask, combine_array, jnp.zeros((), jnp.float32),
                      router_z_loss(router_logits, padding_mask), metrics)


def check_router_allowed(
    router_type: str, causal: bool, batch_prioritized_routing: bool = False
) -> None:
    """Raises if `router_type` (one of ROUTER_TYPES or ROUTER_FAMILIES) would leak the future
    into a causal stack: experts-choose routing and batch-prioritized routing both do."""
    known = ROUTER_TYPES + ROUTER_FAMILIES
    if router_type not in known:
        raise ValueError(f"router_type: expected one of {known}, found {router_type!r}.")
    if causal and router_type.startswith("experts_choose"):
        raise ValueError(
            f"router_type={router_type!r} in a causal decoder: experts-choose routing ranks the "
            "whole group, future tokens included, so it breaks causality. Expected a "
            "tokens_choose router in causal stacks. Fix: use tokens_choose in the decoder and "
            "keep experts-choose to encoders (as flaxformer's experts_choose gins do)."
        )
    if causal and batch_prioritized_routing:
        raise ValueError(
            "batch_prioritized_routing=True in a causal decoder: slots go to the most confident "
            "tokens of the group, future ones included, so it breaks causality. Expected False "
            "in causal stacks. Fix: set batch_prioritized_routing=False for decoder routers."
        )


# ---- Dropless: grouped matrix products -----------------------------------------------------------


def sort_tokens_by_expert(expert_index: Array, num_experts: int) -> tuple[Array, Array]:
    """Orders (token, choice) assignments by expert for `jax.lax.ragged_dot`: no capacity, no drop.

    `jax.lax.ragged_dot(lhs <[m, d]>, rhs <[E, d, f]>, group_sizes <int32>[E]) -> [m, f]`
    multiplies consecutive row blocks of lhs by one expert each. Usage:

        order, group_sizes = sort_tokens_by_expert(expert_index, num_experts)
        # Shape: [N, d] -> [N·k, d], rows grouped by expert.
        y = jax.lax.ragged_dot(x[order // k], kernel, group_sizes)
        # Shape: [N·k, f] -> [N, k, f], back in assignment order.
        y = jnp.zeros_like(y).at[order].set(y).reshape(N, k, -1)
        out = jnp.einsum('nkf,nk->nf', y, combine_weights)

    Shapes stay static (N·k rows), but each expert's block is as large as its load: no tokens
    are dropped, at the price of uneven per-expert work and, under expert parallelism, uneven
    all-to-all traffic.

    Args:
      expert_index: <int32>[num_tokens, k], entries in [0, num_experts).

    Returns:
      order <int32>[num_tokens·k], indices into the flattened assignments, stable (token order
      within an expert); group_sizes <int32>[num_experts], summing to num_tokens·k.
    """
    # Shape: [N, k] -> [N·k]
    flat = expert_index.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    return order, group_sizes


# ---- Flax modules --------------------------------------------------------------------------------


class RouterWeights(nn.Module):
    """The router's projection, kernel `w/kernel <float32>[embed, num_experts]`, no bias.

    Logical axes ('embed', 'unmodeled'): the kernel is small and its expert axis is not
    sharded over the mesh's `expert` axis, so every device routes its own tokens. `dtype` is
    the computation dtype: the input and the (float32-stored) kernel are cast to it.
    """

    num_experts: int
    kernel_init: Initializer = nn.initializers.normal(stddev=2e-2)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_inputs: Array) -> Array:
        """token_inputs: <float32>[G, T, d] -> logits <dtype>[G, T, num_experts]."""
        dense = DenseGeneral(self.num_experts, ("embed", "unmodeled"), dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=self.kernel_init, name="w")
        return dense(token_inputs)


class Router(nn.Module):
    """Float32 router logits and probabilities, with optional multiplicative input jitter.

    Everything runs in float32 whatever the activation dtype ("selective precision", ST-MoE):
    bfloat16 logits round enough to change top-k choices. Jitter (Switch) multiplies the router
    *inputs* by U(1 - eps, 1 + eps), drawn from the 'jitter' rng stream, only when
    deterministic=False and eps > 0. A training step that asks for jitter without passing a
    'jitter' rng raises instead of silently routing without noise (T5X's trainer passes only
    'dropout', which is why flaxformer's gins had to set the noise to 0). During `init` a missing
    rng is tolerated: parameter shapes do not depend on it.

    `logits_dtype` bfloat16 is the one exception, the ST-MoE paper's ablation: the logits
    matmul (input and kernel) runs in bfloat16, and its result is cast back to float32 before
    the softmax, so the probabilities and losses are float32 math on bfloat16-rounded logits.

    Attributes:
      num_experts: E.
      jitter_noise: eps; 0 disables jitter.
      kernel_init: router kernel initialiser, normal(stddev=0.02) as in flaxformer's gins.
      logits_dtype: the dtype of the logits computation (float32, or bfloat16 for the ablation).
    """

    num_experts: int
    jitter_noise: float = 0.0
    kernel_init: Initializer = nn.initializers.normal(stddev=2e-2)
    logits_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.router_weights = RouterWeights(self.num_experts, self.kernel_init,
                                            self.logits_dtype)

    def __call__(self, token_inputs: Array, deterministic: bool = True) -> tuple[Array, Array]:
        """token_inputs: <any float>[G, T, d] -> (logits, probs), both <float32>[G, T, E]."""
        return self.logits_and_probs(token_inputs, deterministic)

    def logits_and_probs(self, token_inputs: Array, deterministic: bool) -> tuple[Array, Array]:
        x = token_inputs.astype(jnp.float32)
        if self.jitter_noise > 0 and not deterministic:
            key = self._router_rng("router jitter (jitter_noise > 0, deterministic=False)")
            if key is not None:
                eps = self.jitter_noise
                x = x * jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
        logits = self.router_weights(x).astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    def _router_rng(self, purpose: str) -> Array | None:
        """A key from the 'jitter' stream; None while initialising without one; else raises."""
        if self.has_rng("jitter"):
            return self.make_rng("jitter")
        if self.is_initializing():
            return None
        raise ValueError(
            f"{purpose} needs the 'jitter' rng stream: expected apply(..., rngs={{'jitter': key, "
            "...}}), found no 'jitter' rng. Fix: pass a 'jitter' key in training steps (moetx's "
            "trainer does), or set jitter_noise=0 / deterministic=True."
        )


class TokensChooseMaskedRouter(Router):
    """Router + `tokens_choose_masked`. Attributes beyond `Router` mirror that function."""

    # The routing function; the scatter router differs only in this.
    _route = staticmethod(tokens_choose_masked)

    num_selected_experts: int = 1
    batch_prioritized_routing: bool = False
    renormalize_top_k_gates: bool = False
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2

    def _routing_kwargs(self) -> dict:
        rng = None
        if self.second_expert_policy == "random":
            rng = self._router_rng("second_expert_policy='random'")
            rng = jax.random.key(0) if rng is None else rng
        return dict(
            num_selected_experts=self.num_selected_experts,
            batch_prioritized_routing=self.batch_prioritized_routing,
            renormalize_top_k_gates=self.renormalize_top_k_gates,
            second_expert_policy=self.second_expert_policy,
            second_expert_threshold=self.second_expert_threshold,
            rng=rng,
        )

    def __call__(
        self, token_inputs: Array, capacity: int, deterministic: bool = True,
        padding_mask: Array | None = None,
    ) -> RouterOutput:
        """token_inputs: <any float>[G, T, d]; padding_mask: optional <float32>[G, T]."""
        logits, probs = self.logits_and_probs(token_inputs, deterministic)
        return self._route(
            probs, logits, capacity=capacity, padding_mask=padding_mask, **self._routing_kwargs()
        )


class TokensChooseScatterRouter(TokensChooseMaskedRouter):
    """Router + `tokens_choose_scatter`: the same decisions as the masked router, as indices."""

    _route = staticmethod(tokens_choose_scatter)


class ExpertsChooseMaskedRouter(Router):
    """Router + `experts_choose_masked`. Encoders only: see `check_router_allowed`."""

    def __call__(
        self, token_inputs: Array, capacity: int, deterministic: bool = True,
        padding_mask: Array | None = None,
    ) -> RouterMask:
        """token_inputs: <any float>[G, T, d]; padding_mask: optional <float32>[G, T]."""
        logits, probs = self.logits_and_probs(token_inputs, deterministic)
        return experts_choose_masked(probs, logits, capacity, padding_mask)
