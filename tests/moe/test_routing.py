"""Routing: the published load-balancing and router z-loss identities (Switch, ST-MoE), capacity
and priority toys, and the masked and scatter paths checked against one plain loop reference
(MaxText's moe_test pattern)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.moe import routing

# ------------------------------------------------------------------------------------------------
# A plain, obviously-correct reference: one Python loop over slots in priority order.
# ------------------------------------------------------------------------------------------------


def reference_tokens_choose(probs, k, capacity, bpr=False, renormalize=False, keep_second=None):
    """flaxformer semantics, token by token: (expert_index, buffer_position, combine_weights).
    keep_second: optional <bool>[G, T], the second-expert policy's verdict (k = 2)."""
    probs = np.asarray(probs, np.float64)
    num_groups, tokens, num_experts = probs.shape
    index = np.zeros((num_groups, tokens, k), np.int64)
    position = np.full((num_groups, tokens, k), capacity, np.int64)
    weights = np.zeros((num_groups, tokens, k))
    for g in range(num_groups):
        choices = [np.argsort(-probs[g, t], kind="stable")[:k] for t in range(tokens)]
        index[g] = np.stack(choices)
        order = range(tokens)
        if bpr:
            order = sorted(range(tokens), key=lambda t: -probs[g, t].max())
        filled = [0] * num_experts
        for j in range(k):  # every top-1 choice before any top-2 choice
            for t in order:
                expert = choices[t][j]
                if j == 1 and keep_second is not None and not keep_second[g, t]:
                    continue
                gates = probs[g, t, choices[t]]
                if renormalize:
                    gates = gates / gates.sum()
                if filled[expert] < capacity:
                    position[g, t, j] = filled[expert]
                    weights[g, t, j] = gates[j]
                    filled[expert] += 1
    return index, position, weights


def reference_masks(index, position, weights, num_experts, capacity):
    """Loop conversion of indices to [G, T, E, C] dispatch and combine tensors."""
    num_groups, tokens, k = index.shape
    dispatch = np.zeros((num_groups, tokens, num_experts, capacity), bool)
    combine = np.zeros((num_groups, tokens, num_experts, capacity))
    for g, t, j in np.ndindex(num_groups, tokens, k):
        if position[g, t, j] < capacity:
            dispatch[g, t, index[g, t, j], position[g, t, j]] = True
            combine[g, t, index[g, t, j], position[g, t, j]] = weights[g, t, j]
    return dispatch, combine


def random_router(seed, shape=(2, 16, 4), scale=1.5):
    logits = scale * jax.random.normal(jax.random.key(seed), shape)
    return logits, jax.nn.softmax(logits, axis=-1)


def jitted(route, **kwargs):
    """`route` with these keyword arguments as one jitted program (one compilation beats
    hundreds of eager op dispatches)."""
    return jax.jit(functools.partial(route, **kwargs))


def route_both(probs, logits, **kwargs):
    """Both implementations, jitted."""
    masked = jitted(routing.tokens_choose_masked, **kwargs)(probs, logits)
    scatter = jitted(routing.tokens_choose_scatter, **kwargs)(probs, logits)
    return masked, scatter


# ------------------------------------------------------------------------------------------------
# Losses and capacity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,expected", [(8, 4.324077), (64, 17.296309)])
def test_router_z_loss_of_zero_logits_is_log_e_squared(num_experts, expected):
    loss = routing.router_z_loss(jnp.zeros((3, 5, num_experts)))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, atol=1e-5)
    np.testing.assert_allclose(expected, math.log(num_experts) ** 2, atol=1e-5)


def test_router_z_loss_padding_mask_averages_over_real_tokens():
    logits = jnp.zeros((1, 4, 8)).at[0, 3].set(10.0)  # the padding token has huge logits
    padding = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(routing.router_z_loss(logits, padding), math.log(8) ** 2, rtol=1e-6)
    assert routing.router_z_loss(logits) > math.log(8) ** 2


def test_load_balancing_loss_identities():
    num_experts, tokens = 8, 32
    uniform = jnp.full((2, tokens, num_experts), 1.0 / num_experts)
    balanced_top1 = jax.nn.one_hot(jnp.arange(tokens) % num_experts, num_experts)[None].repeat(2, 0)
    np.testing.assert_allclose(routing.load_balancing_loss(uniform, balanced_top1), 1.0, rtol=1e-6)

    collapsed = jax.nn.one_hot(jnp.zeros((2, tokens), jnp.int32), num_experts)
    np.testing.assert_allclose(
        routing.load_balancing_loss(collapsed, collapsed), num_experts, rtol=1e-6
    )

    # Top-2, balanced, uniform: flaxformer's max-over-k density gives k = 2 (Mesh-TF would say 1).
    first = jnp.arange(tokens) % num_experts
    top2 = jnp.stack([first, (first + 1) % num_experts], axis=-1)
    one_hots = jax.nn.one_hot(top2, num_experts)[None].repeat(2, 0)  # [G, T, 2, E]
    np.testing.assert_allclose(routing.load_balancing_loss(uniform, one_hots), 2.0, rtol=1e-6)
    np.testing.assert_allclose(
        routing.load_balancing_loss(uniform, one_hots.max(axis=2)), 2.0, rtol=1e-6
    )
    with pytest.raises(ValueError, match="expected expert_mask"):
        routing.load_balancing_loss(uniform, one_hots[..., :4])


def test_load_balancing_loss_ignores_padding_tokens():
    probs = jnp.full((1, 4, 2), 0.5)
    mask = jax.nn.one_hot(jnp.array([[0, 1, 0, 0]]), 2)
    padding = jnp.array([[1.0, 1.0, 0.0, 0.0]])
    # Real tokens: f = (1/4, 1/4), P = (1/4, 1/4) -> 4 * mean(1/16) = 1/4.
    np.testing.assert_allclose(routing.load_balancing_loss(probs, mask, padding), 0.25, rtol=1e-6)


def test_expert_capacity():
    assert routing.expert_capacity(8, 4, 1.0, min_expert_capacity=1) == 2
    assert routing.expert_capacity(8, 4, 1.0) == 4  # the default minimum of 4 wins
    assert routing.expert_capacity(4096, 64, 1.25) == 80  # not multiplied by k
    assert routing.expert_capacity(4096, 64, 2.0) == 128
    assert routing.expert_capacity(7, 2, 1.0, min_expert_capacity=1) == 4  # round(3.5), not floor
    assert routing.expert_capacity(4096, 64, 1.3) == 83
    with pytest.raises(ValueError, match="capacity_factor > 0"):
        routing.expert_capacity(8, 4, 0.0)


# ------------------------------------------------------------------------------------------------
# Capacity and priority toys
# ------------------------------------------------------------------------------------------------


def all_prefer_expert_0():
    """One group of 8 tokens, 4 experts, every token's top-1 is expert 0; tokens 5 and 2 are the
    most confident."""
    confidence = jnp.array([0.4, 0.5, 0.8, 0.45, 0.41, 0.9, 0.43, 0.42])
    rest = (1.0 - confidence) / 3
    probs = jnp.concatenate([confidence[:, None], jnp.repeat(rest[:, None], 3, axis=1)], axis=1)
    return probs[None], jnp.log(probs[None])


@pytest.mark.parametrize("bpr,winners", [(False, [0, 1]), (True, [5, 2])])
def test_capacity_toy_drops_all_but_two(bpr, winners):
    probs, logits = all_prefer_expert_0()
    capacity = routing.expert_capacity(8, 4, 1.0, min_expert_capacity=1)
    assert capacity == 2
    masked, scatter = route_both(
        probs, logits, num_selected_experts=1, capacity=capacity, batch_prioritized_routing=bpr
    )
    dispatched = np.flatnonzero(np.asarray(masked.dispatch_mask).any(axis=(2, 3))[0])
    assert sorted(dispatched) == sorted(winners)
    assert int(masked.dispatch_mask.sum()) == 2
    zero_rows = np.asarray(masked.combine_array).reshape(8, -1).sum(axis=1) == 0
    assert zero_rows.sum() == 6
    np.testing.assert_array_equal(np.flatnonzero(~zero_rows), sorted(winners))
    kept = np.asarray(scatter.buffer_position[0, :, 0]) < capacity
    np.testing.assert_array_equal(np.flatnonzero(kept), sorted(winners))
    assert (np.asarray(scatter.combine_weights[0, ~kept, 0]) == 0).all()
    # Winners take slots in priority order.
    assert [int(scatter.buffer_position[0, t, 0]) for t in winners] == [0, 1]
    np.testing.assert_allclose(masked.metrics.fraction_tokens_left_behind, 0.75, rtol=1e-6)
    np.testing.assert_allclose(masked.metrics.expert_usage, 2 / (4 * 2))

    # Identity experts with gate 1 (renormalised top-1) return routed tokens unchanged and dropped
    # tokens as exact zeros.
    x = jax.random.normal(jax.random.key(1), (1, 8, 3))
    gate_one = routing.tokens_choose_masked(
        probs, logits, num_selected_experts=1, capacity=capacity, batch_prioritized_routing=bpr,
        renormalize_top_k_gates=True,
    )
    expert_inputs = jnp.einsum("gtd,gtec->gecd", x, gate_one.dispatch_mask.astype(jnp.float32))
    out = jnp.einsum("gecd,gtec->gtd", expert_inputs, gate_one.combine_array)
    np.testing.assert_allclose(out[0, winners], x[0, winners], rtol=1e-6)
    assert (out[0, ~np.isin(np.arange(8), winners)] == 0).all()


def test_top1_choices_take_slots_before_top2_choices():
    # Token 0: experts (0, 1); token 1: experts (1, 0). One slot each. Token 1's later top-1 wins
    # expert 1 over token 0's earlier top-2 (token-major order would do the opposite).
    probs = jnp.array([[[0.6, 0.4], [0.3, 0.7]]])
    masked, scatter = route_both(probs, jnp.log(probs), num_selected_experts=2, capacity=1)
    np.testing.assert_array_equal(scatter.expert_index[0], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(scatter.buffer_position[0], [[0, 1], [0, 1]])  # 1 = dropped
    np.testing.assert_allclose(scatter.combine_weights[0], [[0.6, 0.0], [0.7, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(masked.dispatch_mask[0, :, :, 0], [[True, False], [False, True]])


# ------------------------------------------------------------------------------------------------
# Masked == scatter == loop reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_masked_and_scatter_match_reference(k, bpr, renormalize):
    num_experts, capacity = 4, 3  # 16 tokens x k choices over 4 x 3 slots: drops guaranteed
    logits, probs = random_router(seed=10 * k + bpr, shape=(2, 16, num_experts))
    masked, scatter = route_both(
        probs, logits, num_selected_experts=k, capacity=capacity, batch_prioritized_routing=bpr,
        renormalize_top_k_gates=renormalize,
    )
    index, position, weights = reference_tokens_choose(probs, k, capacity, bpr, renormalize)
    assert (position == capacity).any(), "the toy must drop choices"
    np.testing.assert_array_equal(scatter.expert_index, index)
    np.testing.assert_array_equal(scatter.buffer_position, position)
    np.testing.assert_allclose(scatter.combine_weights, weights, rtol=1e-5, atol=1e-7)

    dispatch, combine = reference_masks(index, position, weights, num_experts, capacity)
    np.testing.assert_array_equal(masked.dispatch_mask, dispatch)
    np.testing.assert_allclose(masked.combine_array, combine, rtol=1e-5, atol=1e-7)

    converted_dispatch, converted_combine = routing.indices_to_masks(scatter, num_experts, capacity)
    np.testing.assert_array_equal(converted_dispatch, masked.dispatch_mask)
    np.testing.assert_allclose(converted_combine, masked.combine_array, rtol=1e-6)

    for field in ("auxiliary_loss", "router_z_loss"):
        np.testing.assert_allclose(getattr(masked, field), getattr(scatter, field), rtol=1e-6)
    for field in ("expert_usage", "fraction_tokens_left_behind", "router_confidence"):
        np.testing.assert_allclose(
            getattr(masked.metrics, field), getattr(scatter.metrics, field), rtol=1e-6
        )
    top_k_mask = jax.nn.one_hot(index, num_experts)
    np.testing.assert_allclose(
        masked.auxiliary_loss, routing.load_balancing_loss(probs, top_k_mask), rtol=1e-6
    )


@pytest.mark.parametrize("k,bpr", [(1, False), (2, True)])
def test_masked_and_scatter_gradients_match(k, bpr):
    num_experts, capacity = 4, 3
    logits, _ = random_router(seed=3, shape=(2, 16, num_experts))
    probe = jax.random.normal(jax.random.key(4), (2, 16, num_experts, capacity))
    kwargs = dict(num_selected_experts=k, capacity=capacity, batch_prioritized_routing=bpr)

    def masked_objective(x):
        out = routing.tokens_choose_masked(jax.nn.softmax(x), x, **kwargs)
        return jnp.sum(out.combine_array * probe) + out.auxiliary_loss + out.router_z_loss

    def scatter_objective(x):
        out = routing.tokens_choose_scatter(jax.nn.softmax(x), x, **kwargs)
        _, combine = routing.indices_to_masks(out, num_experts, capacity)
        return jnp.sum(combine * probe) + out.auxiliary_loss + out.router_z_loss

    grad_masked = jax.jit(jax.grad(masked_objective))(logits)
    grad_scatter = jax.jit(jax.grad(scatter_objective))(logits)
    assert float(jnp.abs(grad_masked).max()) > 1e-3
    np.testing.assert_allclose(grad_masked, grad_scatter, rtol=1e-5, atol=1e-7)

    # The same with respect to the probabilities directly.
    def on_probs(route, p):
        out = route(p, logits, **kwargs)
        combine = out.combine_array if hasattr(out, "combine_array") else (
            routing.indices_to_masks(out, num_experts, capacity)[1])
        return jnp.sum(combine * probe)

    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda p: on_probs(routing.tokens_choose_masked, p)))(probs),
        jax.jit(jax.grad(lambda p: on_probs(routing.tokens_choose_scatter, p)))(probs),
        rtol=1e-5, atol=1e-7,
    )


def test_padding_tokens_are_not_routed_and_take_no_slot():
    logits, probs = random_router(seed=5, shape=(1, 8, 4))
    padding = jnp.array([[1, 1, 0, 1, 0, 1, 1, 1]], jnp.float32)
    masked, scatter = route_both(probs, logits, num_selected_experts=2, capacity=8,
                                 padding_mask=padding)
    assert not masked.dispatch_mask[0, jnp.array([2, 4])].any()
    assert (scatter.buffer_position[0, jnp.array([2, 4])] == 8).all()
    real = np.asarray(padding[0]) > 0
    assert (np.asarray(scatter.buffer_position[0, real]) < 8).all()  # ample capacity: no drops
    np.testing.assert_allclose(masked.metrics.fraction_tokens_left_behind, 0.0, atol=1e-6)


def test_scatter_with_capacity_of_a_group_is_dropless():
    probs, logits = all_prefer_expert_0()
    out = routing.tokens_choose_scatter(probs, logits, num_selected_experts=2, capacity=8)
    assert (out.buffer_position < 8).all()
    np.testing.assert_array_equal(sorted(np.asarray(out.buffer_position[0, :, 0])), range(8))


# ------------------------------------------------------------------------------------------------
# Second-expert policy and renormalised gates (Mesh-TF conventions)
# ------------------------------------------------------------------------------------------------


def test_second_expert_policies():
    logits, probs = random_router(seed=7, shape=(2, 32, 4), scale=2.0)
    common = dict(num_selected_experts=2, capacity=64, renormalize_top_k_gates=True)
    top, _ = jax.lax.top_k(probs, 2)
    gate_2 = np.asarray(top[..., 1] / top.sum(-1))

    kept_all = jitted(routing.tokens_choose_scatter, **common)(probs, logits)
    assert (kept_all.buffer_position < 64).all()
    np.testing.assert_allclose(kept_all.combine_weights.sum(-1), 1.0, rtol=1e-6)

    none = jitted(routing.tokens_choose_scatter, second_expert_policy="none", **common)(probs,
                                                                                      logits)
    assert (none.buffer_position[..., 1] == 64).all() and (none.combine_weights[..., 1] == 0).all()
    assert (none.buffer_position[..., 0] < 64).all()

    threshold = 0.3
    assert (gate_2 > threshold).any() and (gate_2 <= threshold).any()
    thresh = jitted(routing.tokens_choose_scatter, second_expert_policy="threshold",
                    second_expert_threshold=threshold, **common)(probs, logits)
    kept_second = np.asarray(thresh.buffer_position[..., 1]) < 64
    np.testing.assert_array_equal(kept_second, gate_2 > threshold)
    weights = np.asarray(thresh.combine_weights)
    np.testing.assert_allclose(weights[kept_second].sum(-1), 1.0, rtol=1e-6)
    # Mesh-TF renormalises before the policy: a lone first choice keeps g1 / (g1 + g2).
    np.testing.assert_allclose(weights[~kept_second][:, 0], 1 - gate_2[~kept_second], rtol=1e-5)

    masked = jitted(routing.tokens_choose_masked, second_expert_policy="threshold",
                    second_expert_threshold=threshold, **common)(probs, logits)
    np.testing.assert_array_equal(masked.dispatch_mask.sum((2, 3)), 1 + kept_second)

    # With tight capacity, second choices the policy refused claim no slot: the policy's verdict
    # fed to the loop reference gives the same decisions.
    tight = dict(common, capacity=12, second_expert_policy="threshold",
                 second_expert_threshold=threshold)
    masked, scatter = route_both(probs, logits, **tight)
    index, position, weights = reference_tokens_choose(
        probs, 2, 12, renormalize=True, keep_second=gate_2 > threshold
    )
    assert (position[..., 0] == 12).any() or (position[..., 1][gate_2 > threshold] == 12).any()
    np.testing.assert_array_equal(scatter.buffer_position, position)
    dispatch, _ = reference_masks(index, position, weights, 4, 12)
    np.testing.assert_array_equal(masked.dispatch_mask, dispatch)


def test_random_second_expert_policy():
    logits, probs = random_router(seed=8, shape=(8, 256, 4), scale=2.0)
    kwargs = dict(num_selected_experts=2, capacity=512, second_expert_policy="random",
                  second_expert_threshold=0.2)
    with pytest.raises(ValueError, match="expected an rng"):
        routing.tokens_choose_scatter(probs, logits, **kwargs)
    out = jitted(routing.tokens_choose_scatter, **kwargs)(probs, logits, rng=jax.random.key(0))
    top, _ = jax.lax.top_k(probs, 2)
    keep_probability = np.minimum(1.0, np.asarray(top[..., 1] / top.sum(-1)) / 0.2)
    kept = np.asarray(out.buffer_position[..., 1]) < 512
    assert abs(kept.mean() - keep_probability.mean()) < 0.03
    assert kept[keep_probability >= 1].all()


def test_policy_argument_errors():
    logits, probs = random_router(seed=9)
    with pytest.raises(ValueError, match="num_selected_experts=2"):
        routing.tokens_choose_masked(probs, logits, num_selected_experts=1, capacity=4,
                                     second_expert_policy="none")
    with pytest.raises(ValueError, match="expected second_expert_policy in"):
        routing.tokens_choose_masked(probs, logits, num_selected_experts=2, capacity=4,
                                     second_expert_policy="sometimes")
    with pytest.raises(ValueError, match="num_selected_experts <= num_experts=4"):
        routing.tokens_choose_scatter(probs, logits, num_selected_experts=5, capacity=4)


# ------------------------------------------------------------------------------------------------
# Experts choose and causality checks
# ------------------------------------------------------------------------------------------------


def test_experts_choose_fills_every_buffer():
    logits, probs = random_router(seed=11, shape=(2, 16, 4))
    out = routing.experts_choose_masked(probs, logits, capacity=5)
    dispatch = np.asarray(out.dispatch_mask)
    assert dispatch.shape == (2, 16, 4, 5)
    np.testing.assert_array_equal(dispatch.sum(axis=(1, 3)), 5)  # C tokens per expert
    np.testing.assert_array_equal(dispatch.sum(axis=1), 1)  # one token per slot
    assert float(out.auxiliary_loss) == 0.0
    np.testing.assert_allclose(out.metrics.expert_usage, 1.0)
    # Each expert's picks are its 5 most probable tokens.
    for g, e in np.ndindex(2, 4):
        picked = np.flatnonzero(dispatch[g, :, e].any(-1))
        np.testing.assert_array_equal(sorted(picked), sorted(np.argsort(-probs[g, :, e])[:5]))
    with pytest.raises(ValueError, match="capacity <= tokens_per_group"):
        routing.experts_choose_masked(probs, logits, capacity=17)


def test_check_router_allowed():
    for name in ("experts_choose", "experts_choose_masked"):
        with pytest.raises(ValueError, match="breaks causality"):
            routing.check_router_allowed(name, causal=True)
        routing.check_router_allowed(name, causal=False)
    routing.check_router_allowed("tokens_choose_scatter", causal=True)
    with pytest.raises(ValueError, match="batch_prioritized_routing"):
        routing.check_router_allowed("tokens_choose_masked", causal=True,
                                     batch_prioritized_routing=True)
    with pytest.raises(ValueError, match="expected one of"):
        routing.check_router_allowed("hash", causal=False)


# ------------------------------------------------------------------------------------------------
# Dropless: sort by expert + jax.lax.ragged_dot
# ------------------------------------------------------------------------------------------------


def test_dropless_ragged_dot_matches_masked_when_nothing_drops():
    num_experts, k, d, f = 4, 2, 3, 5
    logits, probs = random_router(seed=12, shape=(1, 16, num_experts))
    x = jax.random.normal(jax.random.key(13), (1, 16, d))
    kernel = jax.random.normal(jax.random.key(14), (num_experts, d, f))

    def masked_out(kernel):
        route = routing.tokens_choose_masked(probs, logits, num_selected_experts=k, capacity=16)
        expert_in = jnp.einsum("gtd,gtec->gecd", x, route.dispatch_mask.astype(jnp.float32))
        expert_out = jnp.einsum("gecd,edf->gecf", expert_in, kernel)
        return jnp.einsum("gecf,gtec->gtf", expert_out, route.combine_array)

    def dropless_out(kernel):
        route = routing.tokens_choose_scatter(probs, logits, num_selected_experts=k, capacity=16)
        index = route.expert_index.reshape(-1, k)
        order, group_sizes = routing.sort_tokens_by_expert(index, num_experts)
        y = jax.lax.ragged_dot(x.reshape(-1, d)[order // k], kernel, group_sizes)
        y = jnp.zeros_like(y).at[order].set(y).reshape(16, k, f)
        return jnp.einsum("nkf,nk->nf", y, route.combine_weights.reshape(16, k))[None]

    index = jax.lax.top_k(probs, k)[1].reshape(-1, k)
    order, group_sizes = routing.sort_tokens_by_expert(index, num_experts)
    np.testing.assert_array_equal(group_sizes, np.bincount(np.asarray(index).ravel(), minlength=4))
    assert (np.diff(np.asarray(index.reshape(-1)[order])) >= 0).all()  # grouped by expert
    np.testing.assert_allclose(jax.jit(dropless_out)(kernel), jax.jit(masked_out)(kernel),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda w: jnp.sum(dropless_out(w) ** 2)))(kernel),
        jax.jit(jax.grad(lambda w: jnp.sum(masked_out(w) ** 2)))(kernel),
        rtol=1e-5, atol=1e-5,
    )


# ------------------------------------------------------------------------------------------------
# Flax router modules
# ------------------------------------------------------------------------------------------------


def test_router_parameters_precision_and_init():
    router = routing.Router(num_experts=64)
    x = jnp.ones((2, 8, 256), jnp.bfloat16)
    variables = router.init(jax.random.key(0), x)
    kernel_box = variables["params"]["router_weights"]["w"]["kernel"]
    assert kernel_box.names == ("embed", "unmodeled")
    kernel = nn.unbox(variables)["params"]["router_weights"]["w"]["kernel"]
    assert kernel.shape == (256, 64) and kernel.dtype == jnp.float32
    assert abs(float(kernel.std()) - 0.02) < 1e-3 and abs(float(kernel.mean())) < 1e-3
    assert set(variables["params"]) == {"router_weights"}  # no bias
    logits, probs = router.apply(variables, x)
    assert logits.dtype == jnp.float32 and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def identity_router(jitter_noise, d=8):
    router = routing.Router(num_experts=d, jitter_noise=jitter_noise)
    params = {"params": {"router_weights": {"w": {"kernel": jnp.eye(d)}}}}
    x = 1.0 + jax.random.uniform(jax.random.key(0), (2, 4, d))
    return router, params, x


def test_router_jitter():
    eps = 0.1
    router, params, x = identity_router(eps)
    train = dict(deterministic=False)
    logits_a, _ = router.apply(params, x, rngs={"jitter": jax.random.key(1)}, **train)
    logits_b, _ = router.apply(params, x, rngs={"jitter": jax.random.key(2)}, **train)
    assert not np.allclose(logits_a, logits_b)
    ratio = np.asarray(logits_a / x)
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    assert ratio.std() > eps / 10  # noise, not a constant
    # Same rng, same noise; deterministic=True, no noise even with an rng.
    again, _ = router.apply(params, x, rngs={"jitter": jax.random.key(1)}, **train)
    np.testing.assert_array_equal(again, logits_a)
    clean, _ = router.apply(params, x, rngs={"jitter": jax.random.key(1)}, deterministic=True)
    np.testing.assert_allclose(clean, x, rtol=1e-6)
    # Jitter requested in training without a 'jitter' rng is an error, not a silent no-op.
    with pytest.raises(ValueError, match="'jitter' rng"):
        router.apply(params, x, rngs={"dropout": jax.random.key(3)}, **train)
    # eps = 0: no rng needed.
    plain, plain_params, _ = identity_router(0.0)
    np.testing.assert_allclose(plain.apply(plain_params, x, deterministic=False)[0], x, rtol=1e-6)


@pytest.mark.parametrize(
    "router_cls", [routing.TokensChooseMaskedRouter, routing.TokensChooseScatterRouter,
                   routing.ExpertsChooseMaskedRouter],
)
def test_routers_share_the_router_param_path(router_cls):
    router = router_cls(num_experts=4, jitter_noise=0.01)
    x = jax.random.normal(jax.random.key(0), (2, 8, 6), jnp.bfloat16)
    variables = router.init(jax.random.key(1), x, 4)  # init needs no 'jitter' rng
    assert jax.tree_util.tree_structure(nn.unbox(variables)) == jax.tree_util.tree_structure(
        {"params": {"router_weights": {"w": {"kernel": 0}}}}
    )
    out = router.apply(variables, x, 4, deterministic=False, rngs={"jitter": jax.random.key(2)})
    assert out.router_z_loss.dtype == jnp.float32


def test_flax_routers_agree_with_the_functions():
    kwargs = dict(num_experts=4, num_selected_experts=2, batch_prioritized_routing=True)
    masked_router = routing.TokensChooseMaskedRouter(**kwargs)
    scatter_router = routing.TokensChooseScatterRouter(**kwargs)
    x = jax.random.normal(jax.random.key(0), (2, 16, 6))
    variables = masked_router.init(jax.random.key(1), x, 3)
    masked = jax.jit(lambda v, x: masked_router.apply(v, x, 3))(variables, x)
    scatter = jax.jit(lambda v, x: scatter_router.apply(v, x, 3))(variables, x)
    dispatch, combine = routing.indices_to_masks(scatter, 4, 3)
    np.testing.assert_array_equal(dispatch, masked.dispatch_mask)
    np.testing.assert_allclose(combine, masked.combine_array, rtol=1e-6)
