"""seq2slate's objectives: the weak-supervision loss and the REINFORCE gradient against values
computed by hand on a Plackett-Luce policy (constant logits), REINFORCE's Monte-Carlo gradient
against the exact gradient by enumeration of the 3! orders, and the rax metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rax

from moetx.ranking import decoding, model as ranking_model, objectives


def _plackett_luce(scores: jnp.ndarray, slate: jnp.ndarray, n_real: int):
    """Step log-distributions [1, n, n] of a policy whose logits are `scores` at every step
    (the placed items and padding masked), along `slate` [1, n]."""
    n = scores.shape[-1]
    mask = jnp.arange(n)[None] < n_real
    placed = jnp.zeros((1, n), bool)
    rows = []
    for i in range(n):
        available = decoding.available_items(placed, mask)
        rows.append(jax.nn.log_softmax(jnp.where(available, scores, -jnp.inf), axis=-1))
        placed = placed | jax.nn.one_hot(slate[:, i], n, dtype=bool)
    return jnp.stack(rows, axis=1), mask


def test_weak_supervision_loss_by_hand():
    """Logits s = (1, 0, 2), clicks (1, 0, 1), order π = (2, 0, 1):
      step 0, R = {0, 1, 2}, target (1/2, 0, 1/2): −½(log p(0) + log p(2)) with
              log p = s − log(e + 1 + e²)  ->  ½(1.407606 + 0.407606) = 0.907606
      step 1, R = {0, 1}, target (1, 0):  −(1 − log(e + 1)) = 0.313262
      step 2, R = {1}, no click left: nothing.
    Total 1.220868 over 2 supervised steps."""
    scores = jnp.asarray([[1.0, 0.0, 2.0]])
    slate = jnp.asarray([[2, 0, 1]])
    log_probs, mask = _plackett_luce(scores, slate, 3)
    clicks = jnp.asarray([[1.0, 0.0, 1.0]])
    loss, steps = objectives.weak_supervision_loss(log_probs, slate, clicks, mask)
    np.testing.assert_allclose(loss, [0.907606 + 0.313262], rtol=1e-5)
    np.testing.assert_array_equal(steps, [2.0])
    # Each step's term is rax's softmax cross entropy with the labels normalised over the
    # remaining items.
    by_rax = 0.0
    remaining = np.ones(3, bool)
    for i in range(2):
        by_rax += rax.softmax_loss(scores, clicks, where=jnp.asarray(remaining)[None],
                                   label_fn=rax.utils.normalize_probabilities)
        remaining[int(slate[0, i])] = False
    np.testing.assert_allclose(loss, by_rax, rtol=1e-5)
    # No clicks: no target at any step.
    none, steps = objectives.weak_supervision_loss(log_probs, slate, jnp.zeros((1, 3)), mask)
    assert float(none[0]) == 0.0 and float(steps[0]) == 0.0


def test_weak_supervision_ignores_padding_and_is_differentiable():
    """A padding item with a (spurious) click adds no target; gradients are finite although
    the masked log-probabilities are -inf."""
    slate = jnp.asarray([[1, 0, 2]])

    def loss_of(scores):
        log_probs, mask = _plackett_luce(scores, slate, 2)
        return objectives.weak_supervision_loss(log_probs, slate, jnp.asarray([[0.0, 1.0, 1.0]]),
                                                mask)[0].sum()

    s = jnp.asarray([[0.3, -0.2, 5.0]])
    # Only item 1 is clicked among the real items and it is placed first: −log σ(s1 − s0).
    assert float(loss_of(s)) == pytest.approx(-math.log(1 / (1 + math.exp(0.3 + 0.2))), rel=1e-5)
    grad = jax.grad(loss_of)(s)
    assert np.all(np.isfinite(grad)) and float(grad[0, 2]) == 0.0


def test_click_order():
    clicks = jnp.asarray([[0.0, 1.0, 0.0, 1.0, 1.0]])
    mask = jnp.asarray([[1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(objectives.click_order(clicks, mask), [[1, 3, 0, 2, 4]])


def test_reinforce_gradient_by_hand():
    """Plackett-Luce logits s, order π: ∂ log p(π)/∂s_j = Σ_i [1(π_i = j) − p_i(j)] over the
    steps, p_i the softmax over the items left at step i. The surrogate −A·log p(π) has
    gradient −A times that."""
    s = np.array([0.5, -0.25, 1.0])
    slate = [1, 2, 0]
    advantage = 0.7
    expected = np.zeros(3)
    left = [0, 1, 2]
    for item in slate:
        p = np.exp(s[left]) / np.exp(s[left]).sum()
        expected[left] -= p
        expected[item] += 1.0
        left.remove(item)
    expected *= -advantage
    # By hand: step 0 p = softmax(.5, -.25, 1) = (.320401, .151347, .528252), item 1 placed;
    # step 1 p = softmax(.5, 1) over {0, 2} = (.377541, .622459), item 2 placed; step 2 adds 0.
    # ∂ log p(π) = (-.320401 - .377541, 1 - .151347, -.528252 + 1 - .622459), times -0.7:
    np.testing.assert_allclose(expected, [0.488559, -0.594057, 0.105498], atol=1e-6)

    def surrogate(scores):
        log_probs, _ = _plackett_luce(scores, jnp.asarray([slate]), 3)
        step = jnp.take_along_axis(log_probs[0], jnp.asarray(slate)[:, None], -1)[:, 0]
        return objectives.reinforce_surrogate(step.sum(), jnp.asarray(advantage))

    grad = jax.grad(surrogate)(jnp.asarray([s], jnp.float32))
    np.testing.assert_allclose(grad[0], expected, rtol=1e-5, atol=1e-6)


def test_reinforce_gradient_is_unbiased():
    """The Seq2SlateModel's REINFORCE loss on 3-item slates (reward: NDCG against labels
    (2, 0, 1), a moving-average baseline held at 0.8): its gradient averaged over 16,384
    sampled slates matches −∇E[reward] computed exactly from the 3! orders' probabilities."""
    m = ranking_model.Seq2SlateModel(hidden_dim=8, num_glimpses=1, objective="reinforce",
                                     reward="labels", baseline="moving_average",
                                     baseline_decay=0.5)
    shapes = m.input_shapes(8, {"features": (3, 4)})
    params = m.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    params = jax.tree_util.tree_map(lambda p: 2.0 * p, params)
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 3, 4))
    labels = jnp.asarray([[2.0, 0.0, 1.0]])
    mask = jnp.ones((1, 3), bool)

    orders = jnp.asarray(decoding.all_permutations(3))
    rewards = objectives.slate_ndcg(orders, jnp.repeat(labels, 6, 0), jnp.repeat(mask, 6, 0))

    def expected_reward(p):
        out = decoding.teacher_forced(m.network, p, jnp.repeat(x, 6, 0), jnp.repeat(mask, 6, 0),
                                      orders)
        return jnp.sum(jnp.exp(out.slate_log_prob) * rewards)

    exact = jax.jit(jax.grad(lambda p: -expected_reward(p)))(params)  # one program, not op by op

    draws = 16384
    batch = {"features": jnp.repeat(x, draws, 0), "item_mask": jnp.ones((draws, 3)),
             "labels": jnp.repeat(labels, draws, 0), "clicks": jnp.zeros((draws, 3))}
    weights, factor = m.loss_weights_and_factor(batch)
    # After one update of decay 0.5, the bias-corrected average is reward_mean / 0.5.
    state = {"reinforce": {"reward_mean": jnp.asarray(0.4), "num_updates": jnp.asarray(1.0)}}

    @jax.jit
    def mc_grad(p, batch, weights, state):  # the batch an argument: XLA folds no big constants
        return jax.grad(lambda p: m.loss_fn(p, batch, jax.random.PRNGKey(7), weights, factor,
                                            model_state=state)[0])(p)

    estimate = mc_grad(params, batch, weights, state)
    flat_exact = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(exact)])
    flat_mc = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(estimate)])
    assert float(jnp.linalg.norm(flat_exact)) > 1e-3
    rel = float(jnp.linalg.norm(flat_mc - flat_exact) / jnp.linalg.norm(flat_exact))
    cosine = float(flat_mc @ flat_exact / jnp.linalg.norm(flat_mc) / jnp.linalg.norm(flat_exact))
    assert rel < 0.05 and cosine > 0.999, (rel, cosine)


def test_moving_average_baseline_is_carried_in_the_model_state():
    m = ranking_model.Seq2SlateModel(hidden_dim=8, objective="reinforce", reward="labels",
                                     baseline="moving_average", baseline_decay=0.5)
    assert m.state_collections == ("reinforce",)
    shapes = m.input_shapes(8, {"features": (4, 3)})
    variables = m.get_initial_variables(jax.random.PRNGKey(0), shapes)
    batch = {"features": jax.random.normal(jax.random.PRNGKey(1), (8, 4, 3)),
             "item_mask": jnp.ones((8, 4)), "labels": jnp.tile(jnp.asarray([3.0, 0, 1, 0]),
                                                                (8, 1)),
             "clicks": jnp.zeros((8, 4))}
    weights, factor = m.loss_weights_and_factor(batch)
    state = {"reinforce": variables["reinforce"]}
    _, (sums, state) = jax.jit(lambda p, s: m.loss_fn(  # one program, not op by op
        p, batch, jax.random.PRNGKey(2), weights, factor, model_state=s))(variables["params"],
                                                                          state)
    mean_reward = float(sums["reward_sum"] / sums["count"])
    # The bias-corrected average after one update is that batch's mean reward.
    assert float(state["reinforce"]["num_updates"]) == 1.0
    np.testing.assert_allclose(state["reinforce"]["reward_mean"] / (1 - 0.5), mean_reward,
                               rtol=1e-5)
    assert float(sums["baseline_sum"]) == 0.0  # nothing to subtract at the first step


def test_ranking_metrics_are_raxs():
    scores = jnp.asarray([[0.3, 0.9, 0.1, 0.5]])
    labels = jnp.asarray([[2.0, 0.0, 1.0, 3.0]])
    mask = jnp.asarray([[1, 1, 1, 0]], bool)
    out = objectives.ranking_metrics(scores, labels, mask, (2,))
    # Order among the real items: 1, 0, 2 -> DCG@2 = 0 + 3/log2(3); ideal: 0, 2 -> 3 + 1/log2(3).
    ideal = 3.0 + 1.0 / math.log2(3)
    np.testing.assert_allclose(out["ndcg@2"], [3.0 / math.log2(3) / ideal], rtol=1e-5)
    np.testing.assert_allclose(out["mrr"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(out["map"], [(1 / 2 + 2 / 3) / 2], rtol=1e-5)


def test_approx_ndcg_loss_is_rax_ndcg_with_sigmoid_ranks():
    """At a small temperature the smoothed ranks are the true ranks: the loss is −NDCG; at
    temperature 1 it is smooth, with a finite non-zero gradient."""
    scores = jnp.asarray([[0.3, 2.0, -1.0, 0.8]])
    labels = jnp.asarray([[2.0, 0.0, 1.0, 3.0]])
    mask = jnp.asarray([[1, 1, 1, 0]], bool)
    sharp = objectives.approx_ndcg_loss(scores, labels, mask, temperature=1e-4)
    exact = rax.ndcg_metric(scores, labels, where=mask, reduce_fn=None)
    np.testing.assert_allclose(sharp, -exact, rtol=1e-5)
    grad = jax.grad(lambda s: objectives.approx_ndcg_loss(s, labels, mask).sum())(scores)
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad[0, :3]).sum()) > 0
    assert float(grad[0, 3]) == 0.0  # padding


def test_learned_baseline_is_fitted_without_moving_the_policy():
    """The value head's squared error trains the head only: the encoder's gradient is the same
    with the error weighted 1 or 0 (stop-gradient), the head's is not zero."""
    kw = dict(hidden_dim=8, objective="reinforce", reward="labels", baseline="learned")
    with_error = ranking_model.Seq2SlateModel(baseline_loss_weight=1.0, **kw)
    without = ranking_model.Seq2SlateModel(baseline_loss_weight=0.0, **kw)
    shapes = with_error.input_shapes(8, {"features": (4, 3)})
    params = with_error.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    batch = {"features": jax.random.normal(jax.random.PRNGKey(1), (8, 4, 3)),
             "item_mask": jnp.ones((8, 4)), "labels": jnp.tile(jnp.asarray([3.0, 0, 1, 0]),
                                                                (8, 1)),
             "clicks": jnp.zeros((8, 4))}
    weights, factor = with_error.loss_weights_and_factor(batch)

    def grads(m):  # one program, not op by op
        return jax.jit(jax.grad(lambda p: m.loss_fn(p, batch, jax.random.PRNGKey(2), weights,
                                                    factor)[0]))(params)

    g1, g0 = grads(with_error), grads(without)
    np.testing.assert_allclose(g1["item_embed"]["kernel"], g0["item_embed"]["kernel"],
                               rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g1["baseline_out"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g0["baseline_out"]["kernel"]).sum()) == 0
