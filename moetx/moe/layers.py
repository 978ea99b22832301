"""The sparse MLP: token grouping, routing, dispatch to experts, expert MLPs, combine.

Parameter tree (flaxformer `MoeLayer` names, so T5X MoE checkpoints map one to one):

    mlp/router/router_weights/w/kernel   [embed, num_experts]            ('embed', 'unmodeled')
    mlp/expert/{wi_0, wi_1 | wi}/kernel  [num_experts, embed, d_ff]      ('expert', 'embed', 'expert_mlp')
    mlp/expert/wo/kernel                 [num_experts, d_ff, embed]      ('expert', 'expert_mlp', 'embed')

Three dispatch paths compute the same function (tests check outputs and gradients agree):

* `masked`: one-hot dispatch/combine einsums (TPU-friendly; O(G·T·E·C) memory).
* `scatter`: the router's indices scatter tokens into expert buffers and gather them back
  (same capacity and drops; on XLA's CPU backend 5-9% faster a step than `masked`, whose
  einsums run there as real matmuls).
* `dropless`: no capacity at all: tokens sorted by expert and multiplied with grouped matmuls
  (`jax.lax.ragged_dot`); nothing is dropped.

The default, `auto`, is not a fourth path: it picks `scatter` when the step is traced for CPUs
and `masked` otherwise (TPUs, GPUs, where only `masked` was measured) and for experts-choose
routing, which has only the masked path (`resolve_dispatch`). The plan tool traces for the
device it plans (`moetx.util.platform.trace_for`), not for the CPU it runs on.

Expert parallelism: expert inputs `[G, E, C, d]` are laid out with the group axis over the batch
axes, then transposed to `[E, G, C, d]` with the expert axis over the mesh's `expert` axis and the
group axis over `data` only (`expert_replicas`); GSPMD turns that change of layout into the
all-to-all. No gradient rescaling is needed under `jax.jit`: the loss is an ordinary mean and
GSPMD's gradients are exact (T5X's `num_expert_partitions` factor compensated for pjit's implicit
averaging of partitioned parameter gradients; tests/moe check expert-parallel gradients equal the
single-device ones).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moetx.nn.layers import constrain, default_kernel_init, dense_contract, get_activation
from moetx.moe import routing
from moetx.util import platform as platform_lib

Array = jax.Array

# Dtypes the router's logits may be computed in (`MoeConfig.router_dtype`).
ROUTER_DTYPES = ("float32", "bfloat16")

# `MoeConfig.dispatch` values; 'auto' resolves to one of the others (`resolve_dispatch`).
DISPATCHES = ("auto", "masked", "scatter", "dropless")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Sparse-layer hyperparameters (defaults: ST-MoE / flaxformer gins).

    Attributes:
      num_experts: E.
      num_selected_experts: k of tokens-choose top-k routing.
      router_type: 'tokens_choose' or 'experts_choose' (encoders only).
      dispatch: 'auto' (default: 'scatter' on CPUs, 'masked' elsewhere and for experts-choose
        routing), 'masked', 'scatter' or 'dropless' (the last two tokens-choose only).
      train_capacity_factor, eval_capacity_factor: CF used with and without dropout (training /
        evaluation), capacity = max(round(CF * tokens_per_group / E), min_expert_capacity).
      min_expert_capacity: the capacity floor (4).
      group_size: maximum tokens per routing group.
      grouping: how the tokens of a batch are cut into routing groups (see `num_groups`).
        'mesh' (default): the group count is a multiple of the mesh's batch shards, so the same
        batch is routed in different groups on different meshes (on 8 devices, a (1, 4, 2) mesh
        routes 512 tokens as 4 x 128, an (8, 1, 1) mesh as 8 x 64, and capacity, drops and the
        router losses follow). 'fixed': groups of exactly min(group_size, tokens) consecutive
        tokens, the last one padded, plus empty groups up to a multiple of the shards; the
        function computed is then the same on every mesh (tested to float tolerance).
      batch_prioritized_routing: BPR (refused in causal decoders: it uses future tokens).
      jitter_noise: multiplicative router-input jitter in training (rng stream 'jitter').
      renormalize_top_k_gates, second_expert_policy, second_expert_threshold: Mesh-TF top-2.
      aux_loss_factor: load-balancing loss weight (1e-2).
      router_z_loss_factor: router z-loss weight (1e-3, ST-MoE-32B).
      router_dtype: 'float32' (default) or 'bfloat16': the dtype of the router's logits
        computation (its input and kernel are cast to it); the softmax and the router losses
        stay in float32 either way. 'bfloat16' is the ST-MoE paper's "bfloat16 router"
        ablation, which it found unstable.
      sparse_every: layer i is sparse iff i % sparse_every == sparse_every - 1 (0: no MoE).
      extra_mlp: ST-MoE's extra dense FFN after each sparse FFN.
    """

    num_experts: int = 8
    num_selected_experts: int = 2
    router_type: str = "tokens_choose"
    dispatch: str = "auto"
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_expert_capacity: int = 4
    group_size: int = 4096
    grouping: str = "mesh"
    batch_prioritized_routing: bool = False
    jitter_noise: float = 0.0
    renormalize_top_k_gates: bool = False
    second_expert_policy: str = "all"
    second_expert_threshold: float = 0.2
    aux_loss_factor: float = 1e-2
    router_z_loss_factor: float = 1e-3
    router_dtype: str = "float32"
    sparse_every: int = 4
    extra_mlp: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
        if not 1 <= self.num_selected_experts <= self.num_experts:
            raise ValueError(f"num_selected_experts must be in [1, {self.num_experts}], got "
                             f"{self.num_selected_experts}.")
        if self.router_type not in ("tokens_choose", "experts_choose"):
            raise ValueError(f"router_type must be 'tokens_choose' or 'experts_choose', got "
                             f"{self.router_type!r}.")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {', '.join(map(repr, DISPATCHES))}, got "
                             f"{self.dispatch!r}.")
        if self.router_type == "experts_choose" and self.dispatch not in ("auto", "masked"):
            raise ValueError("experts_choose routing has only the masked dispatch path.")
        if self.grouping not in ("mesh", "fixed"):
            raise ValueError(f"grouping must be 'mesh' or 'fixed', got {self.grouping!r}.")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be one of {', '.join(ROUTER_DTYPES)}, got "
                             f"{self.router_dtype!r}.")
        if self.sparse_every < 0 or self.group_size < 1:
            raise ValueError("sparse_every must be >= 0 and group_size >= 1.")

    def is_sparse(self, layer: int) -> bool:
        """Flaxformer's MIXED layout: layer i is sparse iff i % k == k - 1."""
        k = self.sparse_every
        return k > 0 and layer % k == k - 1


def resolve_dispatch(cfg: MoeConfig, platform: str | None = None) -> str:
    """The dispatch path `cfg` runs: its `dispatch`, or for 'auto' 'masked' under experts-choose
    routing and else 'scatter' on CPUs and 'masked' on other platforms. `platform` defaults to
    the one being traced for (`moetx.util.platform.traced_platform`)."""
    if cfg.dispatch != "auto":
        return cfg.dispatch
    if cfg.router_type == "experts_choose":
        return "masked"
    platform = platform or platform_lib.traced_platform()
    return "scatter" if platform == "cpu" else "masked"


def _batch_shards() -> int:
    """Number of shards of the batch axes in the current mesh context (1 outside a mesh)."""
    from jax.interpreters import pxla

    mesh = pxla.thread_resources.env.physical_mesh
    if mesh.empty:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in ("data", "expert"))


def num_groups(num_tokens: int, group_size: int, shards: int = 1,
               grouping: str = "mesh") -> tuple[int, int]:
    """Routing groups for `num_tokens`: returns (num_groups, tokens_per_group).

    The group count is always a multiple of the batch shards (every group lives on one shard);
    tokens are padded up to num_groups * tokens_per_group when needed (the padding takes no
    expert capacity and is left out of the router losses).

    'mesh': at least ceil(num_tokens / group_size) groups; the smallest such count that divides
    the tokens is used unless that would shrink groups below half of `group_size`, otherwise
    the smallest count with padding. Because the count depends on `shards`, the grouping (and
    so capacity, drops and the router losses) depends on the mesh. flaxformer's `_num_groups`
    depends on the mesh too, in another way: the smallest count >= max(tokens // group_size,
    experts x expert replicas) that divides the tokens and is a multiple of experts x replicas,
    where replicas = devices / (expert x model partitions); it pads only when there are fewer
    tokens than experts, and fails when no count divides.

    'fixed': groups of exactly min(group_size, num_tokens) consecutive tokens, the last one
    padded, and wholly padded groups appended up to a multiple of `shards`. Every real token
    meets the same neighbours on every mesh.
    """
    if grouping == "fixed":
        t = min(group_size, num_tokens)
        real = -(-num_tokens // t)
        return -(-real // shards) * shards, t
    n_min = max(-(-num_tokens // group_size), shards)
    n_min = -(-n_min // shards) * shards
    n = n_min
    while n <= num_tokens and num_tokens // n >= max(group_size // 2, 1):
        if num_tokens % n == 0:
            return n, num_tokens // n
        n += shards
    return n_min, -(-num_tokens // n_min)


class _StackedKernel(nn.Module):
    """One stacked expert kernel, stored as `<name>/kernel` like flaxformer's vmapped Dense."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @nn.compact
    def __call__(self) -> Array:
        # Fan-in scaling per expert: the initializer is vmapped over the expert axis.
        per_expert = jax.vmap(lambda key: default_kernel_init(key, self.shape[1:], jnp.float32))
        return self.param("kernel", nn.with_logical_partitioning(
            lambda key, s: per_expert(jax.random.split(key, s[0])), self.axes), self.shape)


class ExpertsMlp(nn.Module):
    """E independent MLPs with stacked kernels `[E, ...]` (flaxformer's vmapped expert MLP)."""

    num_experts: int
    embed_dim: int
    intermediate_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        e, d, f = self.num_experts, self.embed_dim, self.intermediate_dim
        names = ["wi"] if len(self.activations) == 1 else [
            f"wi_{i}" for i in range(len(self.activations))]
        self.wi = [_StackedKernel((e, d, f), ("expert", "embed", "expert_mlp"), name=n)
                   for n in names]
        self.wo = _StackedKernel((e, f, d), ("expert", "expert_mlp", "embed"), name="wo")

    def __call__(self, x: Array) -> Array:
        """x: <dtype>[E, n, embed] (n tokens per expert) -> <dtype>[E, n, embed]."""
        hs = [get_activation(act)(dense_contract(x, jnp.asarray(w(), self.dtype), batch_dims=1))
              for act, w in zip(self.activations, self.wi)]
        h = functools.reduce(lambda a, b: a * b, hs)
        return dense_contract(h, jnp.asarray(self.wo(), self.dtype), batch_dims=1)

    def ragged(self, x: Array, group_sizes: Array) -> Array:
        """Dropless form: x <dtype>[M, embed] sorted by expert, `group_sizes` <int32>[E] tokens
        per expert -> <dtype>[M, embed], with grouped matmuls (`jax.lax.ragged_dot`)."""
        hs = [get_activation(act)(jax.lax.ragged_dot(x, jnp.asarray(w(), self.dtype),
                                                     group_sizes))
              for act, w in zip(self.activations, self.wi)]
        h = functools.reduce(lambda a, b: a * b, hs)
        return jax.lax.ragged_dot(h, jnp.asarray(self.wo(), self.dtype), group_sizes)


class MoeLayer(nn.Module):
    """A sparse MLP replacing the dense `mlp` of a Transformer layer.

    The router's losses and metrics are sown into the `intermediates` collection
    (`moe_aux_loss`, `moe_router_z_loss`, `moe_expert_usage`, `moe_fraction_dropped`,
    `moe_router_confidence`); the model wrapper weighs and adds the losses.
    """

    moe: MoeConfig
    embed_dim: int
    intermediate_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    dtype: jnp.dtype = jnp.float32
    causal: bool = True

    def setup(self):
        cfg = self.moe
        routing.check_router_allowed(cfg.router_type, causal=self.causal)
        if self.causal and cfg.batch_prioritized_routing:
            raise ValueError("batch_prioritized_routing sorts tokens by confidence, which lets "
                             "later tokens take capacity from earlier ones: not allowed in a "
                             "causal decoder. Set MoeConfig.batch_prioritized_routing=False.")
        common = dict(num_experts=cfg.num_experts, jitter_noise=cfg.jitter_noise,
                      logits_dtype=jnp.dtype(cfg.router_dtype))
        self.dispatch = resolve_dispatch(cfg)  # the path this trace runs ('auto' resolved)
        if cfg.router_type == "experts_choose":
            self.router = routing.ExpertsChooseMaskedRouter(**common)
        else:
            cls = (routing.TokensChooseMaskedRouter if self.dispatch == "masked"
                   else routing.TokensChooseScatterRouter)
            self.router = cls(
                **common, num_selected_experts=cfg.num_selected_experts,
                batch_prioritized_routing=cfg.batch_prioritized_routing,
                renormalize_top_k_gates=cfg.renormalize_top_k_gates,
                second_expert_policy=cfg.second_expert_policy,
                second_expert_threshold=cfg.second_expert_threshold)
        self.expert = ExpertsMlp(cfg.num_experts, self.embed_dim, self.intermediate_dim,
                                 tuple(self.activations), self.dtype)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """x: <dtype>[batch, length, embed] -> <dtype>[batch, length, embed]."""
        cfg = self.moe
        b, length, d = x.shape
        n_tokens = b * length
        g, t = num_groups(n_tokens, cfg.group_size, _batch_shards(), cfg.grouping)
        pad = g * t - n_tokens
        flat = x.reshape(n_tokens, d)
        padding_mask = None
        if pad:
            flat = jnp.concatenate([flat, jnp.zeros((pad, d), x.dtype)])
            padding_mask = (jnp.arange(g * t) < n_tokens).astype(jnp.float32).reshape(g, t)
        # Shape: [batch * length (+ pad), d] -> [G, T, d]
        tokens = constrain(flat.reshape(g, t, d), ("batch", None, "embed"))
        cf = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
        capacity = routing.expert_capacity(t, cfg.num_experts, cf, cfg.min_expert_capacity)
        if self.dispatch == "dropless":
            out = self._dropless(tokens, deterministic, padding_mask, n_tokens)
        else:
            routed = self.router(tokens, capacity, deterministic, padding_mask=padding_mask)
            self._sow(self._per_real_group(routed.auxiliary_loss, n_tokens, g, t),
                      routed.router_z_loss, routed.metrics)
            if isinstance(routed, routing.RouterMask):
                out = self._masked(tokens, routed)
            else:
                out = self._scatter(tokens, routed, capacity)
        # Shape: [G, T, d] -> [batch, length, d]
        out = out.reshape(g * t, d)[:n_tokens]
        return constrain(out.reshape(b, length, d), ("batch", "length", "embed"))

    def _per_real_group(self, aux: Array, n_tokens: int, g: int, t: int) -> Array:
        """The load-balancing loss is a mean over groups, and a wholly padded group adds 0 to it:
        under 'fixed' grouping it is averaged over the groups that hold real tokens, so the
        empty groups a mesh needs do not scale it."""
        if self.moe.grouping != "fixed":
            return aux
        return aux * (g / -(-n_tokens // t))

    def _sow(self, aux, z, metrics) -> None:
        self.sow("intermediates", "moe_aux_loss", aux)
        self.sow("intermediates", "moe_router_z_loss", z)
        self.sow("intermediates", "moe_expert_usage", metrics.expert_usage)
        self.sow("intermediates", "moe_fraction_dropped", metrics.fraction_tokens_left_behind)
        self.sow("intermediates", "moe_router_confidence", metrics.router_confidence)

    def _experts(self, expert_inputs: Array) -> Array:
        """Expert-parallel MLP on buffers <dtype>[G, E, C, d] -> same shape."""
        g, e, c, d = expert_inputs.shape
        expert_inputs = constrain(expert_inputs, ("batch", None, None, "embed"))
        # Shape: [G, E, C, d] -> [E, G, C, d]; the re-layout is the all-to-all.
        x = constrain(expert_inputs.transpose(1, 0, 2, 3),
                      ("expert", "expert_replicas", None, "embed"))
        y = self.expert(x.reshape(e, g * c, d)).reshape(e, g, c, d)
        y = constrain(y, ("expert", "expert_replicas", None, "embed"))
        return constrain(y.transpose(1, 0, 2, 3), ("batch", None, None, "embed"))

    def _masked(self, tokens: Array, routed: routing.RouterMask) -> Array:
        dispatch = routed.dispatch_mask.astype(self.dtype)
        expert_inputs = jnp.einsum("gtd,gtec->gecd", tokens, dispatch)
        expert_outputs = self._experts(expert_inputs)
        return jnp.einsum("gecd,gtec->gtd", expert_outputs, routed.combine_array.astype(
            self.dtype))

    def _scatter(self, tokens: Array, routed: routing.RouterIndices, capacity: int) -> Array:
        g, t, d = tokens.shape
        e, k = self.moe.num_experts, routed.expert_index.shape[-1]
        gi = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, t, k))
        src = jnp.broadcast_to(tokens[:, :, None, :], (g, t, k, d))
        # Dropped choices have buffer_position == capacity: out of bounds, so mode='drop'.
        buffers = jnp.zeros((g, e, capacity, d), tokens.dtype).at[
            gi, routed.expert_index, routed.buffer_position].set(src, mode="drop")
        outputs = self._experts(buffers)
        gathered = outputs.at[gi, routed.expert_index, routed.buffer_position].get(
            mode="fill", fill_value=0)
        return jnp.einsum("gtkd,gtk->gtd", gathered, routed.combine_weights.astype(self.dtype))

    def _dropless(self, tokens: Array, deterministic: bool,
                  padding_mask: Array | None = None, n_tokens: int | None = None) -> Array:
        """Every chosen (token, expert) pair is computed: grouped matmuls over expert-sorted
        tokens. Capacity is infinite, so the aux/z losses come from the router alone."""
        cfg = self.moe
        g, t, d = tokens.shape
        logits, probs = self.router.logits_and_probs(tokens, deterministic)
        k = cfg.num_selected_experts
        gates, experts = jax.lax.top_k(probs, k)  # Shape: [G, T, k]
        if cfg.renormalize_top_k_gates:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        mask = jnp.max(jax.nn.one_hot(experts, cfg.num_experts), axis=-2)
        aux = self._per_real_group(routing.load_balancing_loss(probs, mask, padding_mask),
                                   n_tokens or g * t, g, t)
        z = routing.router_z_loss(logits, padding_mask)
        # Mean gate mass of a real token's k choices (padding slots left out).
        real = jnp.ones((g, t)) if padding_mask is None else padding_mask
        conf = jnp.sum(jnp.sum(gates, axis=-1) * real) / jnp.maximum(jnp.sum(real), 1.0) / k
        self._sow(aux, z, routing.RouterMetrics(jnp.float32(1.0), jnp.float32(0.0), conf))
        flat_tokens = tokens.reshape(g * t, d)
        order, group_sizes = routing.sort_tokens_by_expert(experts.reshape(g * t, k),
                                                           cfg.num_experts)
        # `order` indexes the flattened (token, choice) pairs: pair p is token p // k.
        x_sorted = flat_tokens[order // k]
        y_sorted = self.expert.ragged(x_sorted, group_sizes)
        y = jnp.zeros((g * t * k, d), y_sorted.dtype).at[order].set(y_sorted)
        y = y.reshape(g, t, k, d)
        return jnp.einsum("gtkd,gtk->gtd", y, gates.astype(self.dtype))
