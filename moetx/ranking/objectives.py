"""seq2slate's training objectives (Bello et al. 2018, §4) and the ranking metrics, as pure
functions of step log-probabilities, slates and labels.

Weak supervision from clicks (§4.2), the exact form used here. For a slate with clicks c
(<float>[n], 0/1 or graded, >= 0) decoded in the order π, let R_i be the real items not placed
before step i (R_0 = every real item) and p_i the model's distribution at step i given π_<i.
Then

    target_i(j) = c_j / Σ_{k ∈ R_i} c_k   for j ∈ R_i   (the clicks among the remaining items,
                                                          normalised over them)
    loss(π)     = Σ_{i : Σ_{k ∈ R_i} c_k > 0}  − Σ_{j ∈ R_i} target_i(j) · log p_i(j)

Steps after the last clicked item has been placed have no target and add nothing. The order π
that defines R_i is the model's own greedy decoding (the paper feeds the decoder its own
predictions), or, optionally, the clicks' order (clicked items first, each group in input
order). No gradient flows through the choice of π. At step 0 this is the listwise softmax
cross entropy of ListNet; `rax.softmax_loss` with normalised labels computes each step's term.

REINFORCE (§4.1), on-policy: slates π ~ p(·|x) are sampled and

    surrogate = − (r(π) − b) · log p(π|x),     ∇ surrogate is an unbiased estimate of −∇ E_π[r]

for any baseline b that does not depend on π. The reward r is the NDCG of the slate against
the logged clicks or the graded labels (`slate_ndcg`). A slate whose relevance is all zero has
the same reward, 0, under every order, so its exact gradient is 0; its advantage is set to 0
rather than adding the baseline's noise.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import rax

from moetx.ranking import decoding

Array = jax.Array


def click_order(clicks: Array, item_mask: Array) -> Array:
    """The order that places clicked items first, then the other real items, then padding,
    each group in input order: <float>[B, n], [B, n] -> <int32>[B, n]."""
    n = clicks.shape[-1]
    mask = item_mask.astype(bool)
    group = jnp.where(mask, jnp.where(clicks > 0, 0, 1), 2)
    # A stable sort by (group, index).
    return jnp.argsort(group * n + jnp.arange(n), axis=-1).astype(jnp.int32)


def weak_supervision_loss(log_probs: Array, slate: Array, clicks: Array, item_mask: Array
                          ) -> tuple[Array, Array]:
    """The per-step click cross entropy of the module docstring.

    Args:
      log_probs: <float32>[B, n, n] step i's log-distribution over the items given slate_<i
        (`decoding.teacher_forced(...).log_probs`; -inf on unavailable items).
      slate: <int32>[B, n] the order π the log-probabilities were computed along.
      clicks: <float32>[B, n] clicks per item (>= 0).
      item_mask: [B, n] 1 for real items.

    Returns:
      (loss <float32>[B] summed over steps, number of steps with a target <float32>[B]).
    """
    n = slate.shape[-1]
    mask = item_mask.astype(bool)
    placed = jax.nn.one_hot(slate, n, dtype=jnp.int32)  # [B, step, item]
    placed_before = jnp.cumsum(placed, axis=1) - placed
    remaining = mask[:, None, :] & (placed_before == 0)
    c = jnp.where(remaining, clicks[:, None, :].astype(jnp.float32), 0.0)
    total = c.sum(-1)
    has_target = total > 0
    target = c / jnp.where(has_target, total, 1.0)[..., None]
    safe_log_probs = jnp.where(remaining, log_probs, 0.0)
    cross_entropy = -(target * safe_log_probs).sum(-1)
    loss = jnp.where(has_target, cross_entropy, 0.0).sum(-1)
    return loss, has_target.sum(-1).astype(jnp.float32)


def reinforce_surrogate(slate_log_prob: Array, advantage: Array) -> Array:
    """−stop_gradient(advantage) · log p(π): <float32>[...] each -> [...]. Its gradient is the
    REINFORCE estimate of −∇E[reward] when advantage = reward − baseline."""
    return -jax.lax.stop_gradient(advantage) * slate_log_prob


def slate_ndcg(slate: Array, relevance: Array, item_mask: Array, topn: int | None = None
               ) -> Array:
    """NDCG(@topn) of slates against graded relevance, by `rax.ndcg_metric` (gain 2^y − 1,
    discount 1/log2(1 + rank)); 0 for a slate without relevant items.
    slate: <int32>[B, n], relevance [B, n], item_mask [B, n] -> <float32>[B]."""
    scores = decoding.ranking_scores(slate, item_mask)
    return rax.ndcg_metric(scores, relevance, where=item_mask.astype(bool), topn=topn,
                           reduce_fn=None)


def approx_ndcg_loss(scores: Array, labels: Array, item_mask: Array, temperature: float = 1.0
                     ) -> Array:
    """ApproxNDCG (Qin et al. 2010): minus NDCG with ranks and the cutoff smoothed by a sigmoid
    of score differences, per slate: <float32>[B, n] each -> [B].

    This is what `rax.approx_t12n(rax.ndcg_metric)` computes; that wrapper is built with
    `jax.util.wraps`, which jax 0.10 no longer has, so the same rax pieces (`rax.ndcg_metric` with
    `rax.utils.approx_ranks` and `approx_cutoff`) are assembled here."""
    step_fn = lambda x: jax.nn.sigmoid(x / temperature)  # noqa: E731
    return -rax.ndcg_metric(
        scores, labels, where=item_mask.astype(bool), reduce_fn=None,
        rank_fn=functools.partial(rax.utils.approx_ranks, step_fn=step_fn),
        cutoff_fn=functools.partial(rax.utils.approx_cutoff, step_fn=step_fn))


def ranking_metrics(scores: Array, labels: Array, item_mask: Array,
                    ndcg_topns: Sequence[int] = (5, 10)) -> dict[str, Array]:
    """Per-slate `rax` metrics of item scores against graded labels: 'ndcg@k' for each k, 'map'
    (average precision) and 'mrr' (labels >= 1 are relevant for these two).

    scores: <float32>[B, n] (higher ranks first), labels [B, n], item_mask [B, n] ->
    {name: <float32>[B]}."""
    where = item_mask.astype(bool)
    scores = jnp.where(where, scores, -jnp.inf)
    out = {f"ndcg@{k}": rax.ndcg_metric(scores, labels, where=where, topn=k, reduce_fn=None)
           for k in ndcg_topns}
    out["map"] = rax.ap_metric(scores, labels, where=where, reduce_fn=None)
    out["mrr"] = rax.mrr_metric(scores, labels, where=where, reduce_fn=None)
    return out
