"""Ranking model wrappers: what the trainer calls for seq2slate and for the scoring baselines.

`SlateBatchMixin` implements the trainer's model protocol (`moetx.trainer.model.Model`) for
batches of slates (the features of `moetx.ranking.tasks`):

  count_unit = 'slates'                  one example is one slate (an impression)
  loss_weights_and_factor(batch)         1 per slate with at least one real item (padding rows
                                         of a final eval batch weigh 0) and their sum
  metric sums                            `<name>_sum` per metric (summed over real slates) and
                                         `count`; summarized as `<name>` = sum / count
  eval metrics                           NDCG@k, MAP and MRR (`rax`) of the model's order against
                                         the graded labels, and `base_ndcg@k` of the input (base
                                         ranker) order for comparison

`Seq2SlateModel` is the pointer network of `networks.Seq2SlateNetwork` trained with the weak
supervision loss or REINFORCE (`objectives`); it ranks by greedy decoding (or beam search).
`ScoringRankerModel` is an item scorer trained with a pointwise (sigmoid cross entropy), listwise
(softmax cross entropy) or ApproxNDCG loss from `rax`; it ranks by sorting its scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import rax

from moetx.ranking import decoding, networks, objectives
from moetx.trainer.model import BaseModel

Array = jax.Array
Batch = Mapping[str, Array]

FEATURES = ("features", "item_mask", "labels", "clicks")
OBJECTIVES = ("weak_supervision", "reinforce")
SUPERVISION_ORDERS = ("greedy", "clicks")
REWARDS = ("clicks", "labels")
BASELINES = ("moving_average", "learned", "none")
SCORER_LOSSES = ("pointwise", "softmax", "approx_ndcg")


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


class SlateBatchMixin(BaseModel):
    """The model protocol shared by the ranking wrappers (see the module docstring)."""

    ndcg_topns: Sequence[int]
    count_unit = "slates"

    @property
    def feature_converter(self):
        from moetx.ranking import tasks

        return tasks.SlateFeatureConverter(FEATURES)

    def input_shapes(self, batch_size: int, task_feature_lengths: Any
                     ) -> dict[str, tuple[int, ...]]:
        """{'features': (B, k, F), 'item_mask', 'labels', 'clicks': (B, k)} from
        TASK_FEATURE_LENGTHS = {'features': (k, F)}."""
        shape = task_feature_lengths.get("features") if isinstance(task_feature_lengths,
                                                                  Mapping) else None
        if not isinstance(shape, (tuple, list)) or len(shape) != 2 or int(shape[0]) < 2:
            raise ValueError(f"Ranking models need TASK_FEATURE_LENGTHS = {{'features': (k, F)}} "
                             f"(slate size k >= 2, F features per item), got "
                             f"{task_feature_lengths!r}.")
        k, f = int(shape[0]), int(shape[1])
        return {"features": (batch_size, k, f), "item_mask": (batch_size, k),
                "labels": (batch_size, k), "clicks": (batch_size, k)}

    def check_task(self, task: Any, task_feature_lengths: Mapping[str, Any] | None = None
                   ) -> None:
        features = set(getattr(task, "output_features", {}) or {})
        missing = [f for f in FEATURES if f not in features]
        if missing:
            raise ValueError(f"Task {getattr(task, 'name', task)!r} has features "
                             f"{sorted(features)}; a ranking model needs {list(FEATURES)} "
                             f"(missing {missing}). Use a task of moetx.ranking.tasks.")

    def loss_weights_and_factor(self, batch: Batch) -> tuple[Array, Array]:
        """1 per slate with a real item, and the number of such slates (at least 1)."""
        weights = (batch["item_mask"] > 0).any(-1).astype(jnp.float32)
        return weights, jnp.maximum(weights.sum(), 1.0)

    def _metric_sums(self, scores: Array, batch: Batch, weights: Array) -> dict[str, Array]:
        """Sums over real slates of the model's metrics (`scores` order) and of the base
        ranker's (input order)."""
        mask = batch["item_mask"] > 0
        n = mask.shape[-1]
        sums = {f"{k}_sum": jnp.sum(weights * v) for k, v in objectives.ranking_metrics(
            scores, batch["labels"], mask, self.ndcg_topns).items()}
        input_order = jnp.broadcast_to((n - jnp.arange(n)).astype(jnp.float32), mask.shape)
        base = objectives.ranking_metrics(input_order, batch["labels"], mask, self.ndcg_topns)
        sums.update({f"base_{k}_sum": jnp.sum(weights * base[k])
                     for k in (f"ndcg@{t}" for t in self.ndcg_topns)})
        sums["count"] = weights.sum()
        return sums

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Each `<name>_sum` as the mean `<name>` over the real slates, and their number under
        'slates'."""
        n = float(sums.get("count", 0.0))
        out = {k[:-len("_sum")]: float(v) / max(n, 1.0) for k, v in sums.items()
               if k.endswith("_sum")}
        out.update({k: float(v) for k, v in sums.items() if not k.endswith("_sum")
                    and k != "count"})
        out[self.count_unit] = n
        return out

    def headline(self, scalars: Mapping[str, float]) -> str:
        """`loss 0.4189 | ndcg@5 0.512 | ndcg@10 0.655 | map 0.601 | (344 slates)`."""
        parts = [f"loss {scalars[self.loss_metric]:.4f}"] if self.loss_metric in scalars else []
        parts += [f"{k} {scalars[k]:.3f}" for k in (*(f"ndcg@{t}" for t in self.ndcg_topns),
                                                    "map") if k in scalars]
        if self.count_unit in scalars:
            parts.append(f"({int(scalars[self.count_unit]):,} {self.count_unit})")
        return " | ".join(parts)

    def complete_batch(self, batch: Mapping[str, np.ndarray], input_shapes
                       ) -> dict[str, np.ndarray]:
        out = super().complete_batch(batch, input_shapes)
        return {k: v.astype(np.float32) for k, v in out.items()}


@gin.configurable
@dataclasses.dataclass
class Seq2SlateModel(SlateBatchMixin):
    """seq2slate on the trainer (Bello et al. 2018).

    Attributes:
      encoder, hidden_dim, num_layers, num_heads, mlp_dim, num_glimpses: the pointer network
        (`networks.Seq2SlateConfig`).
      objective: 'weak_supervision' (per-step cross entropy against the clicks) or
        'reinforce' (policy gradient on a slate reward); see `objectives`.
      supervision_order: weak supervision's order π: 'greedy' (the model's own) or 'clicks'.
      reward: REINFORCE's reward, the slate's NDCG against the logged 'clicks' or the graded
        'labels' (a simulator's oracle reward).
      reward_topn: NDCG cutoff of the reward (None: the whole slate).
      baseline: 'moving_average' (a bias-corrected exponential average of the batch's rewards,
        kept in the model state 'reinforce'), 'learned' (a value head on the stop-gradient
        encoder output, fitted by squared error) or 'none'.
      baseline_decay: decay of the moving average.
      baseline_loss_weight: weight of the learned baseline's squared error.
      num_samples: slates sampled per input slate per step (REINFORCE).
      decode: evaluation order: 'greedy' or 'beam' (beam search of `beam_size`).
      ndcg_topns: the NDCG cutoffs reported.
    """

    encoder: str = "lstm"
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_glimpses: int = 1
    objective: str = "weak_supervision"
    supervision_order: str = "greedy"
    reward: str = "clicks"
    reward_topn: int | None = None
    baseline: str = "moving_average"
    baseline_decay: float = 0.95
    baseline_loss_weight: float = 1.0
    num_samples: int = 1
    decode: str = "greedy"
    beam_size: int = 4
    ndcg_topns: Sequence[int] = (5, 10)

    def __post_init__(self):
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("supervision_order", self.supervision_order, SUPERVISION_ORDERS)
        _check_choice("reward", self.reward, REWARDS)
        _check_choice("baseline", self.baseline, BASELINES)
        _check_choice("decode", self.decode, ("greedy", "beam"))
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}.")
        if self.num_samples < 1 or self.beam_size < 1:
            raise ValueError(f"num_samples and beam_size must be >= 1, got {self.num_samples} "
                             f"and {self.beam_size}.")
        self.ndcg_topns = tuple(int(t) for t in self.ndcg_topns)
        self.config = networks.Seq2SlateConfig(
            encoder=self.encoder, hidden_dim=self.hidden_dim, num_layers=self.num_layers,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, num_glimpses=self.num_glimpses)
        self.network = networks.Seq2SlateNetwork(self.config)
        self.state_collections = (("reinforce",) if self.uses_moving_average else ())

    @property
    def uses_moving_average(self) -> bool:
        return self.objective == "reinforce" and self.baseline == "moving_average"

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        """{'params'} (plus {'reinforce': {'reward_mean', 'num_updates'}} with the moving-average
        baseline)."""
        _, k, f = input_shapes["features"]
        variables = dict(networks.init_params(self.network, rng, k, f))
        if self.uses_moving_average:
            variables["reinforce"] = {"reward_mean": jnp.zeros((), jnp.float32),
                                      "num_updates": jnp.zeros((), jnp.float32)}
        return variables

    # ---------------------------------------------------------------------------- decoding
    def rank(self, params, features: Array, item_mask: Array) -> Array:
        """The model's order of each slate: <int32>[B, n] (greedy or beam search)."""
        if self.decode == "beam":
            return decoding.beam_search(self.network, params, features, item_mask,
                                        self.beam_size).slates[:, 0]
        return decoding.greedy(self.network, params, features, item_mask).slate

    def _supervision_slate(self, params, batch: Batch) -> Array:
        mask = batch["item_mask"] > 0
        if self.supervision_order == "clicks":
            return objectives.click_order(batch["clicks"], mask)
        slate = decoding.greedy(self.network, params, batch["features"], mask).slate
        return jax.lax.stop_gradient(slate)

    def _weak_supervision(self, params, batch: Batch, greedy_slate: Array | None = None
                          ) -> tuple[Array, Array]:
        """(per-slate loss [B], steps with a target [B]); `greedy_slate`, when the caller has
        decoded it already, is reused as the 'greedy' supervision order."""
        mask = batch["item_mask"] > 0
        if greedy_slate is not None and self.supervision_order == "greedy":
            slate = greedy_slate
        else:
            slate = self._supervision_slate(params, batch)
        forced = decoding.teacher_forced(self.network, params, batch["features"], mask, slate)
        return objectives.weak_supervision_loss(forced.log_probs, slate, batch["clicks"], mask)

    def _relevance(self, batch: Batch) -> Array:
        return batch["clicks"] if self.reward == "clicks" else batch["labels"]

    # ------------------------------------------------------------------------------ losses
    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state=None):
        """The objective summed over the real slates and divided by their number in the full
        batch. Returns (loss, (metric sums, new model state))."""
        del num_microbatches
        model_state = model_state or {}
        if self.objective == "weak_supervision":
            per_slate, steps = self._weak_supervision(params, batch)
            sums = {"supervised_steps_sum": jnp.sum(weights * steps)}
        else:
            rng = dropout_rng if dropout_rng is not None else jax.random.PRNGKey(0)
            per_slate, sums, model_state = self._reinforce(params, batch, rng, weights,
                                                           model_state)
        total = jnp.sum(weights * per_slate)
        loss = total / factor if factor is not None else total
        sums.update({"loss_sum": total, "count": jnp.sum(weights)})
        return loss, (sums, model_state)

    def _reinforce(self, params, batch: Batch, rng: Array, weights: Array, model_state):
        """(per-slate surrogate [B], metric sums, new model state) of REINFORCE."""
        features, mask = batch["features"], batch["item_mask"] > 0
        relevance = self._relevance(batch)
        keys = jax.random.split(rng, self.num_samples)
        sampled = jax.vmap(lambda key: decoding.sample(self.network, params, features, mask,
                                                       key))(keys)
        # Shape: [num_samples, B].
        rewards = jax.vmap(lambda s: objectives.slate_ndcg(s, relevance, mask,
                                                           self.reward_topn))(sampled.slate)
        learnable = (jnp.where(mask, relevance, 0.0) > 0).any(-1) & (weights > 0)
        per_slate = jnp.zeros(weights.shape, jnp.float32)
        if self.baseline == "learned":
            value = self.network.apply(
                {"params": params}, features, mask,
                method=lambda m, f, k: m.baseline_value(m.encode(f, k), k))
            baseline = jax.lax.stop_gradient(value)
            per_slate += self.baseline_loss_weight * jnp.where(
                learnable, jnp.mean((value[None] - rewards) ** 2, axis=0), 0.0)
        elif self.baseline == "moving_average":
            state = model_state["reinforce"]
            t = state["num_updates"]
            average = jnp.where(t > 0, state["reward_mean"]
                                / (1.0 - self.baseline_decay ** jnp.maximum(t, 1.0)), 0.0)
            baseline = jnp.broadcast_to(average, weights.shape)
            n_learnable = learnable.sum()
            batch_mean = jnp.sum(jnp.where(learnable, rewards.mean(0), 0.0)) / jnp.maximum(
                n_learnable, 1)
            updated = {"reward_mean": self.baseline_decay * state["reward_mean"]
                       + (1.0 - self.baseline_decay) * batch_mean,
                       "num_updates": t + 1.0}
            # A batch without a learnable slate leaves the average as it was.
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(n_learnable > 0, a, b),
                                         updated, state)
            model_state = {**model_state, "reinforce": new}
        else:
            baseline = jnp.zeros(weights.shape, jnp.float32)
        # Shape: [num_samples, B].
        advantage = jnp.where(learnable[None], rewards - baseline[None], 0.0)
        per_slate += jnp.mean(objectives.reinforce_surrogate(sampled.slate_log_prob, advantage),
                              axis=0)
        sums = {"reward_sum": jnp.sum(weights * rewards.mean(0)),
                "baseline_sum": jnp.sum(weights * baseline)}
        return per_slate, sums, model_state

    def eval_fn(self, params, batch: Batch, model_state=None) -> dict[str, Array]:
        """Ranking metrics of the decoded order; `loss` is the training objective made
        deterministic: the weak-supervision loss along the greedy order, or for REINFORCE
        minus the reward of the decoded slate."""
        del model_state
        weights, _ = self.loss_weights_and_factor(batch)
        mask = batch["item_mask"] > 0
        slate = self.rank(params, batch["features"], mask)
        sums = self._metric_sums(decoding.ranking_scores(slate, mask), batch, weights)
        if self.objective == "weak_supervision":
            loss, _ = self._weak_supervision(params, batch,
                                             slate if self.decode == "greedy" else None)
        else:
            loss = -objectives.slate_ndcg(slate, self._relevance(batch), mask, self.reward_topn)
        sums["loss_sum"] = jnp.sum(weights * loss)
        return sums


@gin.configurable
@dataclasses.dataclass
class ScoringRankerModel(SlateBatchMixin):
    """A pointwise item scorer (`networks.ItemScorer`) ranked by sorting: the baselines.

    Attributes:
      hidden_dim, num_layers: the scorer MLP.
      loss: 'pointwise' (`rax.pointwise_sigmoid_loss`, summed over items), 'softmax'
        (`rax.softmax_loss`, listwise) or 'approx_ndcg' (`objectives.approx_ndcg_loss`).
      targets: what the loss fits, 'clicks' or the graded 'labels' (scaled to [0, 1] for the
        pointwise loss).
      max_label: the top grade, for that scaling.
      ndcg_topns: the NDCG cutoffs reported.
    """

    hidden_dim: int = 64
    num_layers: int = 2
    loss: str = "softmax"
    targets: str = "clicks"
    max_label: float = 4.0
    ndcg_topns: Sequence[int] = (5, 10)

    def __post_init__(self):
        _check_choice("loss", self.loss, SCORER_LOSSES)
        _check_choice("targets", self.targets, REWARDS)
        self.ndcg_topns = tuple(int(t) for t in self.ndcg_topns)
        self.network = networks.ItemScorer(self.hidden_dim, self.num_layers)

    def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        _, k, f = input_shapes["features"]
        return dict(networks.init_params(self.network, rng, k, f))

    def scores(self, params, features: Array) -> Array:
        """<float32>[B, n] item scores."""
        return self.network.apply({"params": params}, features)

    def _per_slate_loss(self, scores: Array, batch: Batch) -> Array:
        mask = batch["item_mask"] > 0
        y = batch["clicks"] if self.targets == "clicks" else batch["labels"]
        if self.loss == "pointwise":
            y = y if self.targets == "clicks" else y / self.max_label
            per_item = rax.pointwise_sigmoid_loss(scores, y, where=mask, reduce_fn=None)
            return jnp.where(mask, per_item, 0.0).sum(-1)
        if self.loss == "softmax":
            return rax.softmax_loss(scores, y, where=mask, reduce_fn=None)
        return objectives.approx_ndcg_loss(scores, y, mask)

    def loss_fn(self, params, batch: Batch, dropout_rng: Array | None, weights: Array,
                factor: Array | None, num_microbatches: int = 1, model_state=None):
        del dropout_rng, num_microbatches
        per_slate = self._per_slate_loss(self.scores(params, batch["features"]), batch)
        total = jnp.sum(weights * per_slate)
        loss = total / factor if factor is not None else total
        return loss, ({"loss_sum": total, "count": jnp.sum(weights)}, model_state or {})

    def eval_fn(self, params, batch: Batch, model_state=None) -> dict[str, Array]:
        del model_state
        weights, _ = self.loss_weights_and_factor(batch)
        scores = self.scores(params, batch["features"])
        sums = self._metric_sums(scores, batch, weights)
        sums["loss_sum"] = jnp.sum(weights * self._per_slate_loss(scores, batch))
        return sums
