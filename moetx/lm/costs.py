"""The activation side of a moetx Transformer's train step, analytic: the collectives its
activations need on a mesh and the activation memory its backward pass keeps.

`moetx.trainer.step_plan` derives the parameter collectives (data-parallel gradient reduction,
FSDP gathers and reduce-scatters) from the shardings alone; what moves activations depends on
the stack, so it is written here for `moetx.lm` models (T5.1.1 / ST-MoE encoder-decoders and
decoder-only LMs) from their `TransformerConfig`, the batch shapes and the mesh, following the
logical axis rules of `moetx.trainer.partitioning` (Megatron-style tensor parallelism over
`model`, expert parallelism over `expert`):

* Tensor-parallel all-reduces over `model`, one per matmul whose contracting dimension is
  sharded there, of its [local rows, d_model] result: forward, the token embedding lookup (a
  vocab-sharded table), each attention output projection and each MLP `wo`; backward, the
  input gradient of each projection whose output is sharded (query, key, value, the MLP `wi`
  kernels, the logits). XLA reduces each such partial gradient on its own (it does not add
  the query/key/value ones before reducing), so each counts.
* The expert all-to-all: each sparse layer re-lays its dispatch buffer <dtype>[G, E, C, d]
  from group-sharded to expert-sharded and back, in the forward and the backward pass (4 per
  layer), each moving the device's [G / batch shards, E, C, d] buffer; inside the experts, the
  tensor-parallel all-reduces of `wo` (forward) and the `wi` kernels (backward) on that buffer.
* Activation memory without rematerialisation: per layer and local row, the inputs each
  backward matmul and nonlinearity needs (residual and norm outputs, Q/K/V, attention
  probabilities in float32, MLP hidden states), the attention biases per stack, the float32
  logits; MoE layers add router probabilities, the masked dispatch/combine tensors and the
  expert buffers. With `remat_policy='full'` only each layer's input is kept, plus one layer
  recomputed. This is an estimate (about +-30% of XLA's temp bytes, which also hold the
  gradients and optimizer temporaries); XLA's own figure comes from compiling the step.

What is not modelled: small reductions (softmax statistics over a vocab-sharded logits, norm
statistics, optimizer scalars), Primer's shared-QK projection, `dropless` dispatch, and any
re-layout XLA chooses beyond the rules (it may move activations instead of gathering a weight
when the weight is the larger of the two).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from moetx.moe import layers as moe_layers, routing
from moetx.trainer import step_plan

Collective = step_plan.Collective


@dataclasses.dataclass
class ActivationCosts:
    """The analytic activation side of one train step (per device).

    Attributes:
      collectives: tensor-parallel all-reduces and expert all-to-alls (`Collective`s).
      activation_bytes: activation memory the backward pass keeps, estimated.
      notes: what the estimate leaves out for this configuration.
    """

    collectives: list[Collective]
    activation_bytes: float
    notes: list[str]


def _mesh_size(mesh_shape: Mapping[str, int], rules, logical: str) -> tuple[tuple[str, ...], int]:
    """The mesh axes logical axis `logical` maps to, and their size."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = tuple(spec) if isinstance(spec, tuple) else (spec,) if spec else ()
    return axes, math.prod(mesh_shape[a] for a in axes)


class _Ledger:
    """Collects collectives by (kind, op, axes, note)."""

    def __init__(self, mesh_shape: Mapping[str, int]):
        self.mesh_shape = mesh_shape
        self.entries: dict[tuple, Collective] = {}

    def add(self, kind: str, op: str, axes: tuple[str, ...], nbytes: float, count: int,
            note: str) -> None:
        size = math.prod(self.mesh_shape[a] for a in axes)
        if size <= 1 or count <= 0 or nbytes <= 0:
            return
        key = (kind, op, axes, note)
        if key not in self.entries:
            self.entries[key] = Collective(kind, op, axes, size, 0.0, 0, note)
        self.entries[key].operand_bytes += nbytes * count
        self.entries[key].count += count


def activation_costs(model: Any, mesh_shape: Mapping[str, int], rules,
                     input_shapes: Mapping[str, tuple[int, ...]],
                     num_microbatches: int = 1, platform: str | None = None
                     ) -> ActivationCosts:
    """The activation collectives and memory of `model`'s train step on a mesh of
    `mesh_shape` under `rules`, for a batch of `input_shapes`, on `platform` ('cpu', 'gpu',
    'tpu'; None: JAX's default backend), which decides what MoE's `dispatch='auto'` runs.

    Raises ValueError for a model that is not a moetx Transformer LM (no `TransformerConfig`).
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "emb_dim") or not hasattr(model, "is_encoder_decoder"):
        raise ValueError(f"{type(model).__name__} is not a moetx Transformer LM: its activation "
                         f"collectives and memory have no analytic model (compile the step).")
    notes: list[str] = []
    act = np.dtype(cfg.dtype).itemsize
    d, f, heads, dk = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads, cfg.head_dim
    kv_heads = cfg.num_kv_heads or heads
    _, dp = _mesh_size(mesh_shape, rules, "batch")
    tp_axes, tp = _mesh_size(mesh_shape, rules, "heads")
    attn_tp = tp if heads % tp == 0 else 1
    mlp_tp = tp if f % tp == 0 else 1
    vocab_tp = tp if cfg.vocab_size % tp == 0 else 1
    if tp > 1 and 1 in (attn_tp, mlp_tp, vocab_tp):
        notes.append("a dimension not divisible by the model axis is replicated (no TP there)")
    ledger = _Ledger(mesh_shape)
    tp_all_reduce = lambda rows, width, count, note, split: ledger.add(  # noqa: E731
        step_plan.MODEL_PARALLEL_ALL_REDUCE, "all-reduce", tp_axes,
        rows * width * act, count if split > 1 else 0, note)

    b = next(iter(input_shapes.values()))[0]
    if model.is_encoder_decoder:
        enc_len = input_shapes["encoder_input_tokens"][1]
        dec_len = input_shapes["decoder_input_tokens"][1]
    else:
        enc_len, dec_len = 0, input_shapes["decoder_input_tokens"][1]
    rows_enc, rows_dec = b * enc_len / dp, b * dec_len / dp  # local rows per step

    # Memory is held per microbatch; collectives add up over the step.
    m = max(int(num_microbatches), 1)
    memory = 0.0
    q_width = heads * dk / attn_tp
    kv_width = (kv_heads * dk / attn_tp) if kv_heads == heads else kv_heads * dk
    n_wi = len(cfg.mlp_activations)
    mlp_hidden = (n_wi + 1 + (1 if n_wi > 1 else 0)) * f / mlp_tp
    attn_probs = 4.0 * heads / attn_tp  # float32 probabilities per key position

    def attention_block(rows, keys, cross_rows=None):
        """Collectives and kept bytes per row of one attention block (self or cross)."""
        kv_rows = rows if cross_rows is None else cross_rows
        tp_all_reduce(rows, d, 1, "attention out projection (fwd)", attn_tp)
        if kv_heads == heads:
            tp_all_reduce(rows, d, 1, "attention query input grad (bwd)", attn_tp)
            tp_all_reduce(kv_rows, d, 2, "attention key/value input grad (bwd)", attn_tp)
        else:
            tp_all_reduce(rows, d, 1, "attention query input grad (bwd)", attn_tp)
            tp_all_reduce(kv_rows, kv_heads * dk, 2, "grouped K/V grad (bwd)", attn_tp)
        kept = rows * (2 * d * act + 2 * q_width * act + keys * attn_probs)
        kept += kv_rows * 2 * kv_width * act
        return kept

    def dense_mlp(rows, note="MLP"):
        tp_all_reduce(rows, d, 1, f"{note} wo (fwd)", mlp_tp)
        tp_all_reduce(rows, d, n_wi, f"{note} wi input grad (bwd)", mlp_tp)
        return rows * (2 * d * act + mlp_hidden * act)

    def sparse_mlp(moe, length):
        """A MoE layer over the whole batch's `b * length` rows."""
        dispatch = moe_layers.resolve_dispatch(moe, platform)
        if dispatch == "dropless":
            notes.append("dropless dispatch: expert traffic not modelled")
            return rows_of(length) * 2 * d * act
        groups, per_group = moe_layers.num_groups(b * length, moe.group_size, dp, moe.grouping)
        capacity = routing.expert_capacity(per_group, moe.num_experts,
                                           moe.train_capacity_factor, moe.min_expert_capacity)
        e = moe.num_experts
        local_groups = groups / dp
        slots = local_groups * e * capacity  # expert buffer rows on this device
        ex_axes, ex = _mesh_size(mesh_shape, rules, "expert")
        ledger.add(step_plan.ALL_TO_ALL, "all-to-all", ex_axes, slots * d * act, 4 if ex > 1 else 0,
                   "expert dispatch + combine (fwd + bwd)")
        ex_tp = tp if f % tp == 0 else 1
        tp_all_reduce(slots, d, 1, "expert wo (fwd)", ex_tp)
        tp_all_reduce(slots, d, n_wi, "expert wi input grad (bwd)", ex_tp)
        rows = rows_of(length)
        kept = rows * (2 * d * act + 2 * e * 4.0)  # input, norm; router logits + probs
        if dispatch == "masked":
            kept += local_groups * per_group * e * capacity * 2 * act  # dispatch, combine
        kept += slots * (4 * d * act + (n_wi + 1 + (1 if n_wi > 1 else 0)) * f / ex_tp * act)
        return kept

    def rows_of(length):
        return b * length / dp

    def stack(n_layers, length, moe, keys_self, cross_len=0):
        kept_layers = []
        for i in range(n_layers):
            rows = rows_of(length)
            kept = attention_block(rows, keys_self)
            if cross_len:
                kept += attention_block(rows, cross_len, cross_rows=rows_of(cross_len))
            if moe is not None and moe.is_sparse(i):
                kept += sparse_mlp(moe, length)
                if moe.extra_mlp:
                    kept += dense_mlp(rows, "extra MLP")
            else:
                kept += dense_mlp(rows)
            kept_layers.append(kept)
        return kept_layers

    batch_axes, _ = _mesh_size(mesh_shape, rules, "batch")

    def position_bias(length):
        """The relative position bias of a stack: kept per local row, and its gradient: XLA
        sums the bias gradient <float32>[heads, length, length] over the batch replicas before
        scattering it into the buckets."""
        if cfg.position_embedding == "relative":
            ledger.add(step_plan.DATA_PARALLEL_REDUCE, "all-reduce",
                       tuple(a for a in batch_axes if mesh_shape[a] > 1),
                       heads / attn_tp * length * length * 4.0, m,
                       "relative position bias gradient")
        return (b / dp) * heads / attn_tp * length * length * 4.0

    layers_kept = []
    if model.is_encoder_decoder:
        enc_moe = cfg.encoder_moe if cfg.encoder_moe is not None else cfg.moe
        tp_all_reduce(rows_enc, d, 1, "embedding lookup (fwd)", vocab_tp)
        layers_kept += stack(cfg.num_encoder_layers, enc_len, enc_moe, enc_len)
        memory += position_bias(enc_len)
    tp_all_reduce(rows_dec, d, 1, "embedding lookup (fwd)", vocab_tp)
    layers_kept += stack(cfg.num_decoder_layers, dec_len, cfg.moe, dec_len, enc_len)
    memory += position_bias(dec_len)
    if enc_len:
        memory += (b / dp) * dec_len * enc_len * 4.0  # cross-attention mask bias
    tp_all_reduce(rows_dec, d, 1, "logits input grad (bwd)", vocab_tp)
    # XLA reduces the gradient of a shared embedding once per use before adding them up.
    uses = (2 if model.is_encoder_decoder else 1) + (1 if cfg.logits_via_embedding else 0)
    _, embed_shards = _mesh_size(mesh_shape, rules, "embed")
    if uses > 1 and embed_shards == 1:
        ledger.add(step_plan.DATA_PARALLEL_REDUCE, "all-reduce",
                   tuple(a for a in batch_axes if mesh_shape[a] > 1),
                   cfg.vocab_size / vocab_tp * d * 4.0, (uses - 1) * m,
                   "shared embedding gradient, per extra use")
    memory += rows_dec * (2.0 * cfg.vocab_size / vocab_tp * 4.0 + 3 * d * act)

    remat = cfg.remat_policy
    if remat == "full":
        n_enc = cfg.num_encoder_layers if model.is_encoder_decoder else 0
        inputs = (n_enc * rows_enc + cfg.num_decoder_layers * rows_dec) * d * act
        memory += inputs + max(layers_kept, default=0.0)
    else:
        if remat != "none":
            notes.append(f"remat_policy {remat!r} counted as 'none' (an upper bound)")
        memory += sum(layers_kept)
    if cfg.primer_share_qk:
        notes.append("Primer shared-QK projection counted as plain attention")
    return ActivationCosts(list(ledger.entries.values()), memory / m, notes)
