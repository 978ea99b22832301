"""Decoding permutations with a `Seq2SlateNetwork`: teacher forcing (per-step and per-slate
log-probabilities of a given order), greedy decoding, sampling and beam search.

Which items are available at step i (`available_items`):

  * while real items remain unplaced, exactly those: an item already placed, or a padding item,
    gets logit -inf and so probability 0;
  * once every real item is placed, the remaining padding items, and the step is a *padding
    step*: its pick is fixed (the first remaining padding item, by index) and its
    log-probability is 0.

So every decoded `slate` is a permutation of 0..n-1 whose first `num_real` entries are the real
items and whose tail is the padding items in index order; the slate's probability is the product
of its real steps' probabilities, and the probabilities of all orders of the real items sum to 1.
Given orders (teacher forcing) must follow the same convention.
"""

from __future__ import annotations

import itertools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from moetx.ranking.networks import Seq2SlateNetwork

Array = jax.Array


@flax.struct.dataclass
class Decoded:
    """A decoded (or teacher-forced) batch of slates.

    Attributes:
      slate: <int32>[B, n] item index placed at each position (a permutation of 0..n-1).
      step_log_probs: <float32>[B, n] log p(slate_i | slate_<i); 0 at padding steps.
      log_probs: <float32>[B, n, n] the full distribution of every step (-inf on unavailable
        items), kept by `teacher_forced` only (None otherwise).
    """

    slate: Array
    step_log_probs: Array
    log_probs: Array | None = None

    @property
    def slate_log_prob(self) -> Array:
        """<float32>[B] log-probability of each whole slate: the sum of its steps'."""
        return self.step_log_probs.sum(-1)


def available_items(placed: Array, item_mask: Array) -> Array:
    """<bool>[B, n]: the unplaced real items, or, when none is left, the unplaced padding."""
    remaining_real = item_mask & ~placed
    any_real = remaining_real.any(-1, keepdims=True)
    return jnp.where(any_real, remaining_real, ~item_mask & ~placed)


def _first(mask: Array) -> Array:
    """Index of the first True of each row: <bool>[B, n] -> <int32>[B]."""
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _run(network: Seq2SlateNetwork, params, features: Array, item_mask: Array,
         choose: Callable[[Array, Array], Array] | None, rng: Array | None = None,
         forced: Array | None = None, keep_distributions: bool = False) -> Decoded:
    """The decoder loop shared by teacher forcing, greedy decoding and sampling: `choose(log
    probs [B, n], key) -> picks [B]` at real steps, or the `forced` <int32>[B, n] order."""
    mask = item_mask.astype(bool)
    b, n = mask.shape
    variables = {"params": params}
    encoded = network.apply(variables, features, mask, method="encode")
    go = network.apply(variables, b, method="go_input")
    keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0), n)
    forced_steps = (jnp.zeros((n, b), jnp.int32) if forced is None
                    else jnp.swapaxes(forced.astype(jnp.int32), 0, 1))

    def body(state, xs):
        carry, placed, decoder_input = state
        key, forced_pick = xs
        available = available_items(placed, mask)
        real = (mask & ~placed).any(-1)
        carry, logits = network.apply(variables, encoded, carry, decoder_input, available,
                                      method="decode_step")
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = forced_pick if forced is not None else choose(log_probs, key)
        pick = jnp.where(real, chosen, _first(available))
        step = jnp.take_along_axis(log_probs, pick[:, None], axis=-1)[:, 0]
        step = jnp.where(real, step, 0.0)
        placed = placed | jax.nn.one_hot(pick, n, dtype=bool)
        decoder_input = jnp.take_along_axis(encoded.item_inputs, pick[:, None, None], axis=1)[:, 0]
        out = (pick, step, log_probs if keep_distributions else jnp.zeros((), jnp.float32))
        return (carry, placed, decoder_input), out

    state = (encoded.carry, jnp.zeros((b, n), bool), go)
    _, (picks, steps, dists) = jax.lax.scan(body, state, (keys, forced_steps))
    return Decoded(slate=jnp.swapaxes(picks, 0, 1), step_log_probs=jnp.swapaxes(steps, 0, 1),
                   log_probs=jnp.swapaxes(dists, 0, 1) if keep_distributions else None)


def teacher_forced(network: Seq2SlateNetwork, params, features: Array, item_mask: Array,
                   slate: Array) -> Decoded:
    """Log-probabilities of the given orders (per step, and every step's full distribution).

    Args:
      features: <float32>[B, n, F]; item_mask: <bool or float>[B, n] (1 = real item).
      slate: <int32>[B, n] orders following the module's convention (real items first).
    """
    return _run(network, params, features, item_mask, None, forced=slate,
                keep_distributions=True)


def greedy(network: Seq2SlateNetwork, params, features: Array, item_mask: Array) -> Decoded:
    """The most probable item at every step (ties: the lowest index)."""
    return _run(network, params, features, item_mask,
                lambda log_probs, key: jnp.argmax(log_probs, -1).astype(jnp.int32))


def sample(network: Seq2SlateNetwork, params, features: Array, item_mask: Array,
           rng: Array) -> Decoded:
    """Slates drawn from the policy, one per row, with their step log-probabilities
    (differentiable with respect to `params`; the draws themselves are not)."""
    return _run(network, params, features, item_mask,
                lambda log_probs, key: jax.random.categorical(key, log_probs).astype(jnp.int32),
                rng=rng)


@flax.struct.dataclass
class Beams:
    """The `beam_size` best slates found, best first.

    Attributes:
      slates: <int32>[B, W, n]; log_probs: <float32>[B, W] their slate log-probabilities (-inf
        for beams that never came alive, when W exceeds the number of orders).
    """

    slates: Array
    log_probs: Array


def beam_search(network: Seq2SlateNetwork, params, features: Array, item_mask: Array,
                beam_size: int) -> Beams:
    """Beam search over permutations: at each step every beam is extended by every available
    item and the `beam_size` most probable prefixes are kept. `beam_size=1` is greedy
    decoding; `beam_size >= n!` (with n! prefixes at most per step) is exact."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
    mask = item_mask.astype(bool)
    b, n = mask.shape
    w = beam_size
    variables = {"params": params}
    encoded = network.apply(variables, features, mask, method="encode")
    # Shape: every array [B, ...] -> [B * W, ...], beams of a slate adjacent.
    encoded = jax.tree_util.tree_map(lambda x: jnp.repeat(x, w, axis=0), encoded)
    mask_w = jnp.repeat(mask, w, axis=0)
    go = network.apply(variables, b * w, method="go_input")
    scores = jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)  # [B, W]
    rows = jnp.arange(b * w)

    def body(state, i):
        carry, placed, decoder_input, scores, seqs = state
        available = available_items(placed, mask_w)
        real = (mask_w & ~placed).any(-1, keepdims=True)
        carry, logits = network.apply(variables, encoded, carry, decoder_input, available,
                                      method="decode_step")
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        forced = jax.nn.one_hot(_first(available), n, dtype=bool)
        log_probs = jnp.where(real, log_probs, jnp.where(forced, 0.0, -jnp.inf))
        # Shape: [B * W, n] -> [B, W * n] candidates (prefix score + next item's log-prob).
        candidates = (scores.reshape(b * w, 1) + log_probs).reshape(b, w * n)
        scores, index = jax.lax.top_k(candidates, w)
        parent, item = index // n, (index % n).astype(jnp.int32)
        flat_parent = (jnp.arange(b)[:, None] * w + parent).reshape(-1)
        carry = jax.tree_util.tree_map(lambda x: x[flat_parent], carry)
        item_flat = item.reshape(-1)
        placed = placed[flat_parent] | jax.nn.one_hot(item_flat, n, dtype=bool)
        decoder_input = encoded.item_inputs[rows, item_flat]
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(item)
        return (carry, placed, decoder_input, scores, seqs), None

    state = (encoded.carry, jnp.zeros((b * w, n), bool), go, scores,
             jnp.zeros((b, w, n), jnp.int32))
    (_, _, _, scores, seqs), _ = jax.lax.scan(body, state, jnp.arange(n))
    return Beams(slates=seqs, log_probs=scores)


def all_permutations(n: int) -> np.ndarray:
    """Every order of n items, <int32>[n!, n] (lexicographic); n is kept small (<= 8)."""
    if not 1 <= n <= 8:
        raise ValueError(f"Enumerating permutations is meant for n <= 8 items, got {n}.")
    return np.asarray(list(itertools.permutations(range(n))), np.int32)


def ranking_scores(slate: Array, item_mask: Array) -> Array:
    """Scores that sort items in slate order, for `rax` metrics: n - position for real items,
    -inf for padding. slate: <int32>[B, n], item_mask: [B, n] -> <float32>[B, n]."""
    n = slate.shape[-1]
    position = jnp.argsort(slate, axis=-1)  # the inverse permutation
    return jnp.where(item_mask.astype(bool), (n - position).astype(jnp.float32), -jnp.inf)
