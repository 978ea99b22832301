"""The re-ranking protocol of seq2slate (Bello et al. 2018, §5.1) on host-side numpy: a base
ranker proposes an order, a simulated user clicks on its top-k slate, and the slates become
fixed-size, padded training examples.

  FeatureTransform   sign(x)·log1p(|x|), then z-scored with the training split's statistics
                     (LETOR features span many orders of magnitude)
  BaseRanker         a pointwise ridge regression of the graded label on the features, fitted
                     in closed form on the training split: the "initial order" of the protocol
  ClickModel         the paper's two simulated users (see `ClickModel`): position bias, and
                     position bias plus a preference for diverse slates
  make_slates        padded arrays from variable-length slates, with the input checks
  build_slates       queries -> impressions (a candidate pool, its base-ranked top-k slate and
                     the simulated clicks on it)

Padding: a slate shorter than `slate_size` is padded at the end with all-zero items whose
`item_mask` is 0; every model and metric of `moetx.ranking` masks them.

Bad input raises ValueError: an empty slate, a slate longer than `slate_size`, ragged feature
widths, labels and features of different lengths, NaN or infinite features. A query with a
single document is *dropped* by `build_slates` (one document has one order: there is nothing to
re-rank, and it would only add a constant to every metric); the number dropped is returned.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = [
    "CLICK_MODELS",
    "BaseRanker",
    "ClickModel",
    "FeatureTransform",
    "build_slates",
    "make_slates",
]

CLICK_MODELS = ("position", "diversity")


# ------------------------------------------------------------------------------- features
@dataclasses.dataclass(frozen=True)
class FeatureTransform:
    """x -> (sign(x)·log1p(|x|) - mean) / std, per feature.

    Attributes:
      mean, std: <float32>[F] statistics of the log-compressed training features (std of a
        constant feature is taken as 1).
    """

    mean: np.ndarray
    std: np.ndarray

    @staticmethod
    def compress(x: np.ndarray) -> np.ndarray:
        return np.sign(x) * np.log1p(np.abs(x))

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureTransform":
        """Statistics of <float32>[N, F] training features."""
        z = cls.compress(np.asarray(features, np.float64))
        std = z.std(0)
        return cls(z.mean(0).astype(np.float32),
                   np.where(std > 1e-8, std, 1.0).astype(np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """<float32>[..., F] -> <float32>[..., F]."""
        return ((self.compress(np.asarray(features, np.float32)) - self.mean) / self.std
                ).astype(np.float32)


# ----------------------------------------------------------------------------- base ranker
@dataclasses.dataclass(frozen=True)
class BaseRanker:
    """Pointwise linear scorer s(x) = w·x + b, the ridge regression of the graded label.

    Attributes:
      weights: <float32>[F]; bias: the intercept.
    """

    weights: np.ndarray
    bias: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, l2: float = 1.0) -> "BaseRanker":
        """Closed-form ridge regression on <float32>[N, F] (transformed) features and <N>
        labels; the intercept is not penalised."""
        x = np.asarray(features, np.float64)
        y = np.asarray(labels, np.float64)
        x_mean, y_mean = x.mean(0), y.mean()
        xc = x - x_mean
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - y_mean))
        return cls(w.astype(np.float32), float(y_mean - x_mean @ w))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """<float32>[..., F] -> scores <float32>[...]."""
        return (np.asarray(features, np.float32) @ self.weights + self.bias).astype(np.float32)


# ---------------------------------------------------------------------------- click models
@dataclasses.dataclass(frozen=True)
class ClickModel:
    """A simulated user who scans a slate top to bottom (seq2slate §5.1, our reading).

    `position`: rank r (1-based) is examined with probability (1/r)^eta; an examined item of
      graded label y is clicked with probability
          attraction(y) = noise + (1 - noise) * y / max_label,
      so an irrelevant item (y = 0) gets a click with probability `noise` and a perfect one
      (y = max_label) always when examined. (The steeper (2^y - 1) / (2^max_label - 1) leaves
      two thirds of the MSLR sample's slates without a click: too little signal for 43
      queries.)
    `diversity`: as `position`, but an item that would be clicked is skipped when it is too
      similar to an item already clicked above it: the cosine similarity of their (transformed)
      feature vectors is at least `similarity_threshold`. Slates of near-duplicates therefore
      collect fewer clicks, which rewards a re-ranker that spreads relevant, dissimilar items.

    Attributes:
      kind: 'position' or 'diversity'.
      eta: severity of the position bias.
      noise: click probability of an examined irrelevant item.
      max_label: the top relevance grade (4 for MSLR).
      similarity_threshold: the cosine similarity from which a later item counts as a
        near-duplicate of a clicked one (`diversity` only).
    """

    kind: str = "position"
    eta: float = 1.0
    noise: float = 0.1
    max_label: int = 4
    similarity_threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in CLICK_MODELS:
            raise ValueError(f"ClickModel.kind must be one of {CLICK_MODELS}, got {self.kind!r}.")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"ClickModel.noise must be a probability, got {self.noise}.")
        if self.eta < 0:
            raise ValueError(f"ClickModel.eta must be >= 0, got {self.eta}.")

    def attraction(self, labels: np.ndarray) -> np.ndarray:
        """P(click | examined) of <int>[n] graded labels -> <float64>[n]."""
        y = np.clip(np.asarray(labels, np.float64), 0, self.max_label)
        return self.noise + (1 - self.noise) * y / self.max_label

    def examination(self, n: int) -> np.ndarray:
        """P(rank r is examined), r = 1..n -> <float64>[n]."""
        return (1.0 / np.arange(1, n + 1)) ** self.eta

    def simulate(self, labels: np.ndarray, features: np.ndarray, rng: np.random.RandomState
                 ) -> np.ndarray:
        """Clicks <float32>[n] (0/1) on a slate shown in the given order.

        Args:
          labels: <int>[n] graded labels of the slate, top first.
          features: <float32>[n, F] the items' (transformed) features, for `diversity`.
          rng: the source of the clicks' randomness.
        """
        n = len(labels)
        p = self.examination(n) * self.attraction(labels)
        clicks = rng.uniform(size=n) < p
        if self.kind == "diversity":
            f = np.asarray(features, np.float64)
            unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            similarity = unit @ unit.T
            clicked: list[int] = []
            for i in range(n):
                if clicks[i] and any(similarity[i, j] >= self.similarity_threshold
                                     for j in clicked):
                    clicks[i] = False
                if clicks[i]:
                    clicked.append(i)
        return clicks.astype(np.float32)


# ------------------------------------------------------------------------------ slates
def make_slates(features: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                slate_size: int, clicks: Sequence[np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
    """Variable-length slates -> fixed-size arrays padded at the end.

    Args:
      features: per slate <float>[n_i, F] in display (input) order.
      labels: per slate <number>[n_i] graded labels.
      slate_size: k, the padded length (every n_i must be 1..k).
      clicks: per slate <number>[n_i] clicks (default: zeros).

    Returns:
      {'features': <float32>[S, k, F], 'item_mask': <float32>[S, k] (1 real, 0 padding),
       'labels': <float32>[S, k], 'clicks': <float32>[S, k]}; padding items are all zero.

    Raises:
      ValueError: no slate, an empty slate, one longer than `slate_size`, ragged feature widths,
        lengths that disagree, or NaN / infinite features.
    """
    if not len(features):
        raise ValueError("No slates: make_slates needs at least one.")
    if len(labels) != len(features) or (clicks is not None and len(clicks) != len(features)):
        raise ValueError(f"make_slates got {len(features)} feature arrays, {len(labels)} label "
                         f"arrays and {None if clicks is None else len(clicks)} click arrays; "
                         "they must match one to one.")
    width = None
    for i, f in enumerate(features):
        f = np.asarray(f)
        if f.ndim != 2 or not len(f):
            raise ValueError(f"Slate {i} has features of shape {f.shape}; expected [n, F] with "
                             "n >= 1 (an empty slate cannot be ranked: drop it).")
        width = f.shape[1] if width is None else width
        if f.shape[1] != width:
            raise ValueError(f"Slate {i} has {f.shape[1]} features per item, slate 0 has {width}: "
                             "ragged feature widths.")
        if len(f) > slate_size:
            raise ValueError(f"Slate {i} has {len(f)} items, more than slate_size={slate_size}; "
                             "cut it to its top slate_size items first.")
        if len(labels[i]) != len(f) or (clicks is not None and len(clicks[i]) != len(f)):
            raise ValueError(f"Slate {i} has {len(f)} items but {len(labels[i])} labels"
                             + ("" if clicks is None else f" and {len(clicks[i])} clicks") + ".")
        if not np.all(np.isfinite(f)):
            bad = np.argwhere(~np.isfinite(f))[0]
            raise ValueError(f"Slate {i}, item {bad[0]}, feature {bad[1]} is {f[tuple(bad)]}; "
                             "features must be finite (impute or drop the item).")
    s = len(features)
    out = {"features": np.zeros((s, slate_size, width), np.float32),
           "item_mask": np.zeros((s, slate_size), np.float32),
           "labels": np.zeros((s, slate_size), np.float32),
           "clicks": np.zeros((s, slate_size), np.float32)}
    for i, f in enumerate(features):
        n = len(f)
        out["features"][i, :n] = f
        out["item_mask"][i, :n] = 1.0
        out["labels"][i, :n] = labels[i]
        if clicks is not None:
            out["clicks"][i, :n] = clicks[i]
    return out


def build_slates(queries, transform: FeatureTransform, ranker: BaseRanker,
                 click_model: ClickModel, slate_size: int = 10, pool_size: int | None = None,
                 sessions_per_query: int = 1, seed: int = 0
                 ) -> tuple[dict[str, np.ndarray], int]:
    """Impressions of `queries` (a `moetx.datasets.mslr.LetorQueries`): for each query and
    session, a candidate pool, its top `slate_size` by the base ranker, and simulated clicks.

    Session 0 of a query pools all its documents; later sessions draw `pool_size` of them
    without replacement (all when `pool_size` is None or the query is smaller), which gives
    more, different slates per query. Everything is seeded by (seed, query, session).

    Returns (arrays as `make_slates` plus 'base_scores' <float32>[S, k] (the base ranker's
    scores, -inf on padding) and 'query_index' <int32>[S], the number of single-document
    queries dropped).
    """
    if slate_size < 2:
        raise ValueError(f"slate_size must be >= 2 to have an order to learn, got {slate_size}.")
    feats, labs, clks, scores, qidx = [], [], [], [], []
    dropped = 0
    for q in range(queries.num_queries):
        raw, labels = queries.query(q)
        if len(labels) < 2:
            dropped += 1
            continue
        x = transform(raw)
        s = ranker(x)
        for session in range(sessions_per_query):
            rng = np.random.RandomState([seed, q, session])
            if session == 0 or pool_size is None or pool_size >= len(labels):
                pool = np.arange(len(labels))
            else:
                pool = np.sort(rng.choice(len(labels), pool_size, replace=False))
            # Stable sort: ties keep document order.
            order = pool[np.argsort(-s[pool], kind="stable")][:slate_size]
            feats.append(x[order])
            labs.append(labels[order])
            clks.append(click_model.simulate(labels[order], x[order], rng))
            scores.append(s[order])
            qidx.append(q)
    if not feats:
        raise ValueError("Every query has fewer than 2 documents: nothing to re-rank.")
    out = make_slates(feats, labs, slate_size, clks)
    base = np.full((len(feats), slate_size), -np.inf, np.float32)
    for i, sc in enumerate(scores):
        base[i, :len(sc)] = sc
    out["base_scores"] = base
    out["query_index"] = np.asarray(qidx, np.int32)
    return out, dropped
