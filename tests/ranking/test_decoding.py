"""The pointer network's permutation distribution: probabilities of all n! orders sum to 1,
placed and padding items get no mass, a slate's log-probability is the sum of its steps', and
greedy decoding, sampling and beam search agree with exact enumeration."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moetx.ranking import decoding, networks, objectives

F = 3

# Jitted once per shape (an eager `lax.scan` would be traced and compiled on every call).
teacher_forced = jax.jit(decoding.teacher_forced, static_argnums=0)
greedy = jax.jit(decoding.greedy, static_argnums=0)
sample = jax.jit(decoding.sample, static_argnums=0)
beam_search = jax.jit(decoding.beam_search, static_argnums=(0, 4))


@functools.lru_cache(maxsize=None)
def _network(encoder: str, num_glimpses: int = 1, n: int = 4):
    """The network and its parameters, built once per configuration for the whole module (the
    tests only read them)."""
    cfg = networks.Seq2SlateConfig(encoder=encoder, hidden_dim=8, num_layers=1, num_heads=2,
                                   mlp_dim=16, num_glimpses=num_glimpses)
    net = networks.Seq2SlateNetwork(cfg)
    params = networks.init_params(net, jax.random.PRNGKey(0), n, F)["params"]
    # Larger weights than at init, so that the distribution is far from uniform.
    params = jax.tree_util.tree_map(lambda p: 3.0 * p, params)
    return net, params


def _features(batch: int, n: int, seed: int = 1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, n, F))


def _enumerated_log_probs(net, params, features, item_mask):
    """log p(π) of every order of one slate's real items (padding last, in index order):
    (orders [P, n], log-probs [P]). features: [n, F], item_mask: [n]."""
    n = features.shape[0]
    real = np.flatnonzero(np.asarray(item_mask))
    padding = [j for j in range(n) if j not in set(real)]
    orders = np.asarray([list(p) + padding for p in itertools.permutations(real)], np.int32)
    tiled = jnp.repeat(features[None], len(orders), 0)
    mask = jnp.repeat(jnp.asarray(item_mask, bool)[None], len(orders), 0)
    out = teacher_forced(net, params, tiled, mask, jnp.asarray(orders))
    return orders, np.asarray(out.slate_log_prob)


@pytest.mark.parametrize("encoder,num_glimpses", [("lstm", 1), ("lstm", 0), ("transformer", 1)])
@pytest.mark.parametrize("n", [3, 4])
def test_probabilities_of_all_orders_sum_to_one(encoder, num_glimpses, n):
    net, params = _network(encoder, num_glimpses, n)
    x = _features(1, n)[0]
    _, log_probs = _enumerated_log_probs(net, params, x, np.ones(n, bool))
    assert len(log_probs) == {3: 6, 4: 24}[n]
    np.testing.assert_allclose(np.exp(log_probs).sum(), 1.0, atol=1e-5)
    assert np.exp(log_probs).max() > 1.3 / len(log_probs)  # not the uniform distribution


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_padding_gets_no_probability_and_never_leads_the_output(encoder):
    """With the last item padding, the 3! orders of the 3 real items carry all the mass, and
    every decoder places the real items first."""
    net, params = _network(encoder, n=4)
    x = _features(2, 4)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    _, log_probs = _enumerated_log_probs(net, params, x[0], mask[0])
    np.testing.assert_allclose(np.exp(log_probs).sum(), 1.0, atol=1e-5)
    decoded = [greedy(net, params, x, mask).slate,
               beam_search(net, params, x, mask, 3).slates[:, 0],
               *(sample(net, params, x, mask, jax.random.PRNGKey(s)).slate
                 for s in range(5))]
    for slate in map(np.asarray, decoded):
        assert sorted(slate[0, :3]) == [0, 1, 2] and slate[0, 3] == 3
        assert sorted(slate[1]) == [0, 1, 2, 3]
    # Padding steps have log-probability 0; a slate of padding only has probability 1.
    forced = teacher_forced(net, params, x, mask, jnp.asarray(decoded[0]))
    assert float(forced.step_log_probs[0, 3]) == 0.0
    empty = greedy(net, params, x, np.zeros((2, 4), bool))
    np.testing.assert_array_equal(empty.slate, [[0, 1, 2, 3]] * 2)
    np.testing.assert_array_equal(empty.slate_log_prob, [0.0, 0.0])


def test_padding_anywhere_is_masked_by_the_lstm_encoder():
    """The LSTM's state skips padding items wherever they sit: padding in the middle of the
    slate gives the same distribution as the real items alone."""
    net, params = _network("lstm", n=3)
    x = _features(1, 3)
    gap = jnp.concatenate([x[:, :1], jnp.full((1, 1, F), 7.0), x[:, 1:]], axis=1)
    compact = teacher_forced(net, params, x, np.ones((1, 3), bool),
                                      jnp.asarray([[2, 0, 1]]))
    gapped = teacher_forced(net, params, gap, np.array([[1, 0, 1, 1]], bool),
                                     jnp.asarray([[3, 0, 2, 1]]))
    np.testing.assert_allclose(gapped.step_log_probs[0, :3], compact.step_log_probs[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_slate_log_prob_is_the_sum_of_step_log_probs(encoder):
    """Teacher forcing against a hand-run decoder loop (the network's own `decode_step` called
    step by step): same step log-probabilities, their sum is the slate's."""
    net, params = _network(encoder, n=4)
    x = _features(3, 4)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    slate = jnp.asarray([[3, 1, 0, 2], [2, 0, 1, 3], [0, 1, 2, 3]])
    forced = teacher_forced(net, params, x, mask, slate)
    np.testing.assert_allclose(forced.slate_log_prob, forced.step_log_probs.sum(-1), rtol=1e-6)

    v = {"params": params}
    encoded = net.apply(v, x, mask, method="encode")
    carry, inp = encoded.carry, net.apply(v, 3, method="go_input")
    placed = np.zeros((3, 4), bool)
    expected = np.zeros((3, 4))
    for i in range(4):
        available = np.where(((mask & ~placed).any(-1, keepdims=True)), mask & ~placed,
                             ~mask & ~placed)
        carry, logits = net.apply(v, encoded, carry, inp, jnp.asarray(available),
                                  method="decode_step")
        logits = np.asarray(logits, np.float64)
        for b in range(3):
            pick = int(slate[b, i])
            if mask[b].sum() > i:  # a real step
                finite = logits[b][available[b]]
                expected[b, i] = logits[b, pick] - np.log(np.exp(finite - finite.max()).sum()) \
                    - finite.max()
            placed[b, pick] = True
        inp = encoded.item_inputs[jnp.arange(3), slate[:, i]]
    np.testing.assert_allclose(forced.step_log_probs, expected, rtol=1e-4, atol=1e-5)


def test_placed_items_never_get_mass():
    net, params = _network("lstm", n=4)
    x = _features(2, 4)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    slate = jnp.asarray([[1, 3, 0, 2], [2, 0, 1, 3]])
    dists = np.exp(np.asarray(teacher_forced(net, params, x, mask, slate).log_probs))
    for b in range(2):
        for i in range(int(mask[b].sum())):
            placed = np.asarray(slate[b, :i])
            assert np.all(dists[b, i, placed] == 0.0)
            assert np.all(dists[b, i, ~mask[b]] == 0.0)  # padding, at real steps
            np.testing.assert_allclose(dists[b, i].sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_greedy_and_beam_search_against_enumeration(encoder):
    """Greedy output is a permutation; beam search of width 1 is greedy; width n! finds the
    most probable order; the beams' scores are their teacher-forced log-probabilities."""
    net, params = _network(encoder, n=3)
    x = _features(4, 3, seed=5)
    mask = np.ones((4, 3), bool)
    best_first = greedy(net, params, x, mask)
    for row in np.asarray(best_first.slate):
        assert sorted(row) == [0, 1, 2]
    beam1 = beam_search(net, params, x, mask, 1)
    np.testing.assert_array_equal(beam1.slates[:, 0], best_first.slate)
    np.testing.assert_allclose(beam1.log_probs[:, 0], best_first.slate_log_prob, rtol=1e-5)
    exact = beam_search(net, params, x, mask, 6)
    for b in range(4):
        orders, log_probs = _enumerated_log_probs(net, params, x[b], mask[b])
        np.testing.assert_array_equal(exact.slates[b, 0], orders[np.argmax(log_probs)])
        np.testing.assert_allclose(np.sort(np.asarray(exact.log_probs[b]))[::-1],
                                   np.sort(log_probs)[::-1], rtol=1e-4)


def test_sampling_follows_the_permutation_distribution():
    """Frequencies of 6,000 sampled orders of 3 items match their exact probabilities."""
    net, params = _network("lstm", n=3)
    x = _features(1, 3)
    orders, log_probs = _enumerated_log_probs(net, params, x[0], np.ones(3, bool))
    draws = 6000
    sampled = sample(net, params, jnp.repeat(x, draws, 0), np.ones((draws, 3), bool),
                              jax.random.PRNGKey(0))
    index = {tuple(o): i for i, o in enumerate(orders.tolist())}
    freq = np.bincount([index[tuple(s)] for s in np.asarray(sampled.slate).tolist()],
                       minlength=6) / draws
    np.testing.assert_allclose(freq, np.exp(log_probs), atol=0.025)
    # The sampled slates' log-probabilities are the teacher-forced ones.
    np.testing.assert_allclose(sampled.slate_log_prob[:6],
                               log_probs[[index[tuple(s)] for s in
                                          np.asarray(sampled.slate[:6]).tolist()]], rtol=1e-5)


def test_ranking_scores_put_the_slate_order_into_rax():
    slate = jnp.asarray([[2, 0, 1, 3]])
    mask = np.array([[1, 1, 1, 0]], bool)
    scores = decoding.ranking_scores(slate, mask)
    np.testing.assert_array_equal(scores, [[3.0, 2.0, 4.0, -np.inf]])
    labels = jnp.asarray([[1.0, 0.0, 2.0, 4.0]])
    assert float(objectives.slate_ndcg(slate, labels, mask)[0]) == pytest.approx(1.0)
    assert float(objectives.slate_ndcg(jnp.asarray([[1, 0, 2, 3]]), labels, mask)[0]) < 0.7
