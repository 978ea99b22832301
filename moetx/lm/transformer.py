"""Transformer stacks: T5.1.1 encoder-decoder and decoder-only (causal and prefix LM), with
Primer and Llama-style options.

Parameter trees follow T5X / flaxformer names:

    EncoderDecoder                                          DecoderOnly
    token_embedder/embedding [vocab, embed]                 decoder/token_embedder/embedding
    encoder/relpos_bias/rel_embedding [heads, buckets]      decoder/relpos_bias/rel_embedding
    encoder/layers_{i}/pre_attention_layer_norm/scale       decoder/layers_{i}/...
    encoder/layers_{i}/attention/{query,key,value,out}/kernel
    encoder/layers_{i}/pre_mlp_layer_norm/scale, mlp/{wi_0,wi_1,wo}/kernel
    encoder/encoder_norm/scale
    decoder/layers_{i}/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                        encoder_decoder_attention, pre_mlp_layer_norm, mlp}
    decoder/decoder_norm/scale, decoder/relpos_bias/rel_embedding
    decoder/logits_dense/kernel [embed, vocab]  (untied logits only)

Primer adds `{query,key,value}_dconv/kernel [3, heads*d_kv]` to each self-attention; full Primer
(shared QK) has `query`, `query_dconv`, `q_solo_project [heads*d_kv, heads*d_kv]`, `value`,
`value_dconv` and no `key`.

With `decoder_program` set, every decoder block is a `programs.ProgramDecoderLayer` running that
block program (the language of the Primer-style search); its parameters are named as above.

`remat_policy` wraps every encoder and decoder layer in `nn.remat` (`jax.checkpoint`) under its
own name `layers_{i}`, so the parameter tree is the same with any policy.

`scan_layers` runs each stack under `flax.linen.scan` (one compiled layer, or one block of k
layers with MoE every k-th layer) instead of unrolling it: the stack's parameters become one
`layers` subtree with a leading layer axis (`moetx.lm.scan` has the layout and the conversions
to and from the `layers_{i}` trees above), and so do its decoding cache and sown MoE metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moetx.lm import attention, programs, scan
from moetx.nn import layers
from moetx.moe import layers as moe_layers

Array = jax.Array


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer stack.

    Attributes:
      vocab_size: number of token ids (including sentinels/extra ids).
      emb_dim: model width d_model.
      num_heads, head_dim: attention heads and per-head width d_kv.
      num_kv_heads: key/value heads of grouped-query attention (GQA; 1 is multi-query
        attention), a divisor of num_heads; None means num_heads (plain multi-head attention).
        Each group of num_heads/num_kv_heads query heads shares one K/V head and the decoding
        cache holds only num_kv_heads heads. One rule for every attention layer of the model:
        decoder self-attention, and in an encoder-decoder also the encoder's self-attention
        and the cross-attention. Not with primer_share_qk (its K is the query projection).
      mlp_dim: MLP hidden width d_ff.
      num_encoder_layers: encoder depth (encoder-decoder models only).
      num_decoder_layers: decoder depth.
      dropout_rate: dropout on residual branches, attention weights and the MLP hidden layer.
      mlp_activations: ('gelu', 'linear') is gated GELU (T5.1.1); ('relu',) is T5 1.0;
        ('squared_relu',) is Primer's; ('silu', 'linear') is SwiGLU (Llama).
      logits_via_embedding: tie the output projection to the token embedding, otherwise
        `logits_dense` (T5.1.1).
      tied_logits_rescale: with tied logits, divide by sqrt(d_model) first (T5 1.0 / HF T5);
        Llama does not.
      position_embedding: 'relative' (T5 bucketed bias) or 'rope' (rotary, Llama).
      relative_attention_num_buckets, relative_attention_max_distance: T5 relative position bias.
      rope_theta: rotary base frequency.
      scale_attention_logits: scale logits by 1/sqrt(d_kv) at run time (Llama) instead of in the
        query initializer (T5).
      primer_dconv: Primer's multi-dconv-head attention in every self-attention.
      primer_share_qk: full Primer's shared QK representation (with `q_solo_project`).
      norm_type: 'rms' (T5's RMSNorm) or 'primer' (Primer's mean-centred pseudo-variance norm
        with scale and bias).
      ffn_post_norm: full Primer's alternating pre/post normalisation: attention sublayers are
        pre-norm (x + attn(norm(x))), MLP sublayers normalise their output
        (x + norm(mlp(x)), parameter `post_mlp_layer_norm`).
      norm_epsilon: normalisation epsilon.
      moe: Mixture-of-Experts settings (`moetx.moe.layers.MoeConfig`); None for a dense model.
        Layer i's MLP is sparse iff i % moe.sparse_every == moe.sparse_every - 1, in the encoder
        and the decoder alike.
      encoder_moe: an encoder-only override of `moe` (e.g. experts-choose routing in the
        encoder with top-2 tokens-choose in the decoder, as flaxformer's experts_choose gins).
      dtype: activation dtype (float32 on CPU, bfloat16 on accelerators); params stay float32.
      decoder_program: a block program (`moetx.lm.programs`, e.g. `programs.SEED_PROGRAM`) that
        every decoder block runs instead of the built-in one (`ProgramDecoderLayer`): its q, k, v
        paths and ffn replace the projections' post-processing and the MLP (`mlp_activations` is
        then unused). Decoder-only, dense models only.
      remat_policy: what each encoder/decoder layer keeps for the backward pass (activation
        rematerialisation, `nn.remat` of every `layers_{i}`; the parameter tree does not
        change):
          'none'           keep everything (no remat; the default).
          'full'           keep only the layer inputs, recompute the rest
                           (`jax.checkpoint_policies.nothing_saveable`).
          'save_dots'      keep the outputs of matmuls without batch dimensions, i.e. the
                           projections and MLP matmuls, recompute attention scores and
                           elementwise ops (`dots_with_no_batch_dims_saveable`; alias
                           'dots_with_no_batch_dims').
          'save_all_dots'  keep every matmul output, attention's batched ones too
                           (`dots_saveable`; alias 'dots_saveable').
          'offload'        as 'save_dots', but the kept matmul outputs go to pinned host memory
                           (`offload_dot_with_no_batch_dims('device', 'pinned_host')`); needs
                           a backend with host offload (GPU/TPU): on CPU the model raises
                           ValueError when it is built (XLA drops the host placement there).
        Remat applies to training and teacher-forced forward passes; cached decoding
        (`decode=True`) is never differentiated and runs the plain layers.
      scan_layers: run each stack under `flax.linen.scan` over its layers (T5X / MaxText
        `scan_layers`): one layer is compiled instead of every one. Parameters, the decoding
        cache and the MoE metrics get a leading layer axis under `<stack>/layers`
        (`moetx.lm.scan`, logical axis `layers`, replicated); `moetx.lm.scan.unscan_params`
        gives the usual `layers_{i}` tree, and the converters do so on their own. With MoE
        every k-th layer a scan step is a block of k layers (k - 1 dense, 1 sparse), so the
        depth must be a multiple of k (ValueError otherwise). Dropout and router jitter draw
        different numbers in every layer; `remat_policy` applies inside the scan.
    """

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 0
    num_decoder_layers: int = 8
    dropout_rate: float = 0.0
    mlp_activations: Sequence[str] = ("gelu", "linear")
    logits_via_embedding: bool = False
    tied_logits_rescale: bool = True
    position_embedding: str = "relative"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rope_theta: float = 10000.0
    scale_attention_logits: bool = False
    primer_dconv: bool = False
    primer_share_qk: bool = False
    norm_type: str = "rms"
    ffn_post_norm: bool = False
    norm_epsilon: float = 1e-6
    moe: moe_layers.MoeConfig | None = None
    encoder_moe: moe_layers.MoeConfig | None = None
    dtype: str = "float32"
    decoder_program: str | None = None
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                     "num_encoder_layers", "num_decoder_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"TransformerConfig.{name} must be an int, got {value!r}.")
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                     "num_decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got "
                                 f"{getattr(self, name)}.")
        if self.num_kv_heads is not None and (
                not _is_int(self.num_kv_heads) or self.num_kv_heads <= 0
                or self.num_heads % self.num_kv_heads):
            raise ValueError(f"TransformerConfig.num_kv_heads must be a positive divisor of "
                             f"num_heads={self.num_heads} (or None), got {self.num_kv_heads!r}.")
        if self.primer_share_qk and self.num_kv_heads not in (None, self.num_heads):
            raise ValueError(f"primer_share_qk makes K the query projection ({self.num_heads} "
                             f"heads); it cannot have num_kv_heads={self.num_kv_heads}.")
        if self.num_encoder_layers < 0:
            raise ValueError(f"num_encoder_layers must be >= 0, got {self.num_encoder_layers}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if self.position_embedding not in ("relative", "rope"):
            raise ValueError(f"position_embedding must be 'relative' or 'rope', got "
                             f"{self.position_embedding!r}.")
        if self.norm_type not in ("rms", "primer"):
            raise ValueError(f"norm_type must be 'rms' or 'primer', got {self.norm_type!r}.")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"Rotary embeddings need an even head_dim, got {self.head_dim}.")
        if isinstance(self.mlp_activations, str):
            raise ValueError(f"TransformerConfig.mlp_activations must be a tuple of activation "
                             f"names, e.g. ('{self.mlp_activations}',) (note the comma), got the "
                             f"string {self.mlp_activations!r}.")
        for act in self.mlp_activations:
            layers.get_activation(act)
        _check_dtype(self.dtype)
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.decoder_program is not None:
            programs.check_config(self)
        object.__setattr__(self, "remat_policy", _canonical_remat_policy(self.remat_policy))
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"TransformerConfig.scan_layers must be True or False, got "
                             f"{self.scan_layers!r}.")
        if self.scan_layers:
            scan.check_scannable(self)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def rope(self) -> float:
        return self.rope_theta if self.position_embedding == "rope" else 0.0


def _is_int(value) -> bool:
    """An int (Python's or NumPy's), not a bool or a float."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_dtype(dtype: str) -> None:
    """The activation dtype must name a floating-point dtype ('float32', 'bfloat16', ...)."""
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"TransformerConfig.dtype (ACTIVATION_DTYPE) must be a floating-point "
                         f"dtype such as 'float32' or 'bfloat16', got {dtype!r}.")


# ------------------------------------------------------------------ rematerialisation
REMAT_POLICIES = ("none", "full", "save_dots", "save_all_dots", "offload")
_REMAT_ALIASES = {"dots_with_no_batch_dims": "save_dots",
                  "dots_with_no_batch_dims_saveable": "save_dots",
                  "dots_saveable": "save_all_dots",
                  "offload_dot_with_no_batch_dims": "offload"}


def _canonical_remat_policy(name) -> str:
    if isinstance(name, str) and name in REMAT_POLICIES:
        return name
    if isinstance(name, str) and name in _REMAT_ALIASES:
        return _REMAT_ALIASES[name]
    raise ValueError(f"TransformerConfig.remat_policy must be one of "
                     f"{', '.join(repr(p) for p in REMAT_POLICIES)} (or the JAX names "
                     f"{', '.join(repr(a) for a in _REMAT_ALIASES)}), got {name!r}.")


def host_offload_supported() -> bool:
    """Whether the default backend can offload remat residuals to pinned host memory. The CPU
    backend lists a 'pinned_host' memory but XLA drops the placement there (nothing moves), so
    it counts as unsupported."""
    try:
        device = jax.devices()[0]
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - an old or unusual backend: no offload
        return False
    return device.platform != "cpu" and "pinned_host" in kinds


def remat_checkpoint_policy(name: str):
    """The `jax.checkpoint` policy of a (canonical) `remat_policy` other than 'none'."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "save_all_dots":
        return policies.dots_saveable
    if name == "offload":
        if not host_offload_supported():
            supported = ", ".join(repr(p) for p in REMAT_POLICIES if p != "offload")
            raise ValueError(f"TransformerConfig.remat_policy 'offload' needs host-memory "
                             f"offload, which the {jax.default_backend()} backend does not "
                             f"have; use one of {supported}.")
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"No checkpoint policy for remat_policy {name!r}.")


@functools.lru_cache(maxsize=None)
def _remat_class(layer_cls: type, policy_name: str, static_argnums: tuple[int, ...],
                 prevent_cse: bool = True) -> type:
    return nn.remat(layer_cls, policy=remat_checkpoint_policy(policy_name),
                    static_argnums=static_argnums, prevent_cse=prevent_cse)


def _layer_class(cfg: TransformerConfig, layer_cls: type, static_argnums: tuple[int, ...],
                 decode: bool = False) -> type:
    """`layer_cls`, or its `nn.remat` under `cfg.remat_policy` (not when decoding: cached steps
    are never differentiated). `static_argnums` count `self` as 0 and name the Python-valued
    (bool) call arguments. Instances keep the name they are given (`layers_{i}`), so the
    parameter tree is the same."""
    if cfg.remat_policy == "none" or decode:
        return layer_cls
    if cfg.remat_policy == "offload":
        remat_checkpoint_policy("offload")  # checked on every build: the backend may differ
    # Inside a scan the loop already keeps XLA from merging the recomputation with the forward
    # pass, so remat's CSE barrier is not needed there (JAX's advice for remat under scan).
    return _remat_class(layer_cls, cfg.remat_policy, static_argnums,
                        prevent_cse=not cfg.scan_layers)


# ------------------------------------------------------------------------------- layer stacks
class _LayerBlock(nn.Module):
    """`block_size` consecutive layers, one step of a scanned stack whose layers are not all
    alike (MoE every k-th layer); layer j is `make_layer(j, 'sublayer_{j}')`."""

    make_layer: Callable[[int, str], nn.Module]
    block_size: int

    @nn.compact
    def __call__(self, x: Array, *args) -> Array:
        for j in range(self.block_size):
            x = self.make_layer(j, scan.sublayer_name(j))(x, *args)
        return x


def _run_stack(cfg: TransformerConfig, stack: str, make_layer: Callable[[int, str], nn.Module],
               x: Array, *args) -> Array:
    """Runs the layers of `stack` ('encoder' or 'decoder') over `x`.

    Call it inside the stack's compact method. `make_layer(i, name)` builds layer i (its index
    decides whether its MLP is sparse) under `name`; `args` are the layer call's arguments after
    `x`, the same for every layer. Unrolled, layer i is `layers_{i}`; with `cfg.scan_layers`,
    `flax.linen.scan` runs `num_layers / k` steps of a block of k layers (`scan.block_size`)
    named `layers`, every variable collection stacked on a leading axis (`moetx.lm.scan`).

    Args:
      x: <dtype>[batch, length, embed].
    Returns:
      <dtype>[batch, length, embed].
    """
    depth = scan.num_layers(cfg, stack)
    if not cfg.scan_layers:
        for i in range(depth):
            x = make_layer(i, f"layers_{i}")(x, *args)
        return x
    k = scan.block_size(cfg, stack)
    # Block layer j is layer b * k + j, as sparse as layer j since sparsity repeats every k.
    step = (make_layer(0, scan.SCANNED) if k == 1
            else _LayerBlock(make_layer, k, name=scan.SCANNED))

    def body(module: nn.Module, carry: Array, _) -> tuple[Array, None]:
        return module(carry, *args), None

    scanned = nn.scan(
        body,
        variable_axes={"params": 0, "cache": 0, attention.CROSS_KV: 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True, "jitter": True},
        length=depth // k,
        metadata_params={nn.PARTITION_NAME: scan.LAYER_AXIS})
    x, _ = scanned(step, x, None)
    return x


def _cache_length(cache: Mapping[str, Any]) -> int:
    """The max_length of a decoder's self-attention cache (`cached_key`
    <T>[(layers,) batch, kv_heads, max_length, d_kv], scanned or not)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if getattr(path[-1], "key", None) == "cached_key":
            return leaf.shape[-2]
    raise ValueError("decode=True found no self-attention cache: initialise it first "
                     "(the model's init_cache).")


def _attention(cfg: TransformerConfig, name: str, causal: bool, is_cross: bool = False):
    return attention.MultiHeadDotProductAttention(
        cfg.num_heads, cfg.head_dim, cfg.dropout_rate, cfg.jnp_dtype,
        dconv=cfg.primer_dconv and causal and not is_cross,
        share_qk=cfg.primer_share_qk and causal and not is_cross,
        rope_theta=0.0 if is_cross else cfg.rope, scale_logits=cfg.scale_attention_logits,
        is_cross=is_cross, num_kv_heads=cfg.num_kv_heads, name=name)


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
    if cfg.norm_type == "primer":
        return layers.PrimerNorm(cfg.norm_epsilon, cfg.jnp_dtype, name=name)
    return layers.RMSNorm(cfg.norm_epsilon, cfg.jnp_dtype, name=name)


def _mlp_sublayer(cfg: TransformerConfig, x: Array, deterministic: bool, layer_index: int,
                  causal: bool) -> Array:
    """The residual MLP sublayer(s): dense, or sparse (MoE) on sparse layers followed, with
    ST-MoE's `extra_mlp`, by a dense one; pre-norm, or Primer's output norm (`ffn_post_norm`)."""
    moe = cfg.encoder_moe if (not causal and cfg.encoder_moe is not None) else cfg.moe
    sparse = moe is not None and moe.is_sparse(layer_index)
    if sparse:
        mlp = moe_layers.MoeLayer(moe, cfg.emb_dim, cfg.mlp_dim, cfg.mlp_activations,
                                  cfg.jnp_dtype, causal, name="mlp")
    else:
        mlp = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.jnp_dtype,
                              name="mlp")
    x = _residual_mlp(cfg, x, mlp, deterministic, "mlp")
    if sparse and moe.extra_mlp:
        extra = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate,
                                cfg.jnp_dtype, name="extra_mlp")
        x = _residual_mlp(cfg, x, extra, deterministic, "extra_mlp")
    return x


def _residual_mlp(cfg: TransformerConfig, x: Array, mlp: nn.Module, deterministic: bool,
                  name: str) -> Array:
    if cfg.ffn_post_norm:
        h = _norm(cfg, f"post_{name}_layer_norm")(mlp(x, deterministic=deterministic))
    else:
        h = mlp(_norm(cfg, f"pre_{name}_layer_norm")(x), deterministic=deterministic)
    return layers.constrain(x + _dropout(cfg, h, deterministic), ("batch", "length", "embed"))


def _dropout(cfg: TransformerConfig, x: Array, deterministic: bool) -> Array:
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention + MLP."""

    config: TransformerConfig
    layer_index: int = 0

    @nn.compact
    def __call__(self, x, bias, deterministic, segment_ids=None, positions=None):
        cfg = self.config
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = _attention(cfg, "attention", causal=False)(
            h, h, bias, deterministic, segment_ids=segment_ids, positions=positions)
        x = x + _dropout(cfg, h, deterministic)
        return _mlp_sublayer(cfg, x, deterministic, self.layer_index, causal=False)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, optional cross-attention, then MLP."""

    config: TransformerConfig
    cross_attention: bool = False
    layer_index: int = 0

    @nn.compact
    def __call__(self, x, bias, deterministic, decode, encoded=None, cross_bias=None,
                 segment_ids=None, positions=None):
        cfg = self.config
        h = _norm(cfg, "pre_self_attention_layer_norm")(x)
        h = _attention(cfg, "self_attention", causal=True)(
            h, h, bias, deterministic, decode, segment_ids=segment_ids, positions=positions)
        x = x + _dropout(cfg, h, deterministic)
        if self.cross_attention:
            h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
            h = _attention(cfg, "encoder_decoder_attention", causal=False, is_cross=True)(
                h, encoded, cross_bias, deterministic, decode)
            x = x + _dropout(cfg, h, deterministic)
        return _mlp_sublayer(cfg, x, deterministic, self.layer_index, causal=True)


def _relpos(cfg: TransformerConfig) -> layers.RelativePositionBiases | None:
    if cfg.position_embedding != "relative":
        return None
    return layers.RelativePositionBiases(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        cfg.jnp_dtype, name="relpos_bias")


def _default_positions(tokens: Array, positions: Array | None) -> Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class Encoder(nn.Module):
    """The encoder stack; the token embedding is shared with the decoder (`shared_embedding`)."""

    config: TransformerConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
                 encoder_positions: Array | None = None, enable_dropout: bool = False) -> Array:
        """encoder_input_tokens: <int32>[batch, length] -> <dtype>[batch, length, embed]."""
        cfg = self.config
        deterministic = not enable_dropout
        x = self.shared_embedding(encoder_input_tokens)
        x = _dropout(cfg, layers.constrain(x, ("batch", "length", "embed")), deterministic)
        length = encoder_input_tokens.shape[1]
        mask = attention.make_padding_mask(encoder_input_tokens, encoder_input_tokens,
                                           encoder_segment_ids, encoder_segment_ids)
        bias = attention.mask_to_bias(mask)
        relpos = _relpos(cfg)
        if relpos is not None:
            pos = jnp.arange(length)
            bias = bias + relpos(pos, pos, bidirectional=True)
        positions = _default_positions(encoder_input_tokens, encoder_positions)
        # __call__(self, x, bias, deterministic, ...): `deterministic` is a Python bool.
        layer_cls = _layer_class(cfg, EncoderLayer, static_argnums=(3,))
        x = _run_stack(cfg, "encoder", lambda i, name: layer_cls(cfg, i, name=name),
                       x, bias, deterministic, encoder_segment_ids, positions)
        x = _norm(cfg, "encoder_norm")(x)
        return _dropout(cfg, x, deterministic)


class Decoder(nn.Module):
    """The decoder stack: embeddings (own, or shared with an encoder), layers, norm, logits."""

    config: TransformerConfig
    shared_embedding: nn.Module | None = None

    @nn.compact
    def __call__(
        self,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_causal_attention: Array | None = None,
        enable_dropout: bool = False,
        decode: bool = False,
        decode_position: Array | None = None,
        encoded: Array | None = None,
        encoder_input_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
    ) -> Array:
        """Logits of the next token at every position.

        Args:
          decoder_input_tokens: <int32>[batch, length], targets shifted right (0 = BOS/pad).
          decoder_target_tokens: <int32>[batch, length]; its zeros mark padding (required
            outside decode mode).
          decoder_segment_ids: <int32>[batch, length] packing segment ids, or None.
          decoder_causal_attention: <int32>[batch, length], 1 on prefix positions (prefix LM).
          enable_dropout: training-mode dropout.
          decode: one-position step with the KV cache (`decoder_input_tokens` is [batch, 1]).
          decode_position: <int32>[] the position being decoded (decode mode only).
          encoded: <dtype>[batch, enc_length, embed] encoder output (encoder-decoder only).
          encoder_input_tokens, encoder_segment_ids: <int32>[batch, enc_length] for the
            cross-attention mask.
          decoder_positions: <int32>[batch, length] positions within packed segments (rotary).
        Returns:
          <float32>[batch, length, vocab] logits.
        """
        cfg = self.config
        dt = cfg.jnp_dtype
        deterministic = not enable_dropout
        cross = encoded is not None
        embedder = self.shared_embedding
        if embedder is None:
            embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dt, name="token_embedder")
        relpos = _relpos(cfg)
        x = embedder(decoder_input_tokens)
        x = _dropout(cfg, layers.constrain(x, ("batch", "length", "embed")), deterministic)

        cross_bias = None
        if decode and self.is_initializing():
            # Initialising the cache: the inputs carry the full max length; no masking needed.
            length = decoder_input_tokens.shape[1]
            pos = jnp.arange(length)
            bias = relpos(pos, pos, bidirectional=False) if relpos is not None else None
            positions = _default_positions(decoder_input_tokens, None)
        elif decode:
            if decoder_input_tokens.shape[1] != 1 or decode_position is None:
                raise ValueError("decode=True takes [batch, 1] tokens and a decode_position.")
            max_length = _cache_length(self.variables["cache"])
            keys = jnp.arange(max_length)
            bias = attention.mask_to_bias(keys <= decode_position)[None, None, None, :]
            if relpos is not None:
                bias = bias + relpos(jnp.reshape(decode_position, (1,)), keys,
                                     bidirectional=False)
            positions = jnp.full(decoder_input_tokens.shape, decode_position, jnp.int32)
        else:
            if decoder_target_tokens is None:
                raise ValueError("decoder_target_tokens is required outside decode mode.")
            length = decoder_input_tokens.shape[1]
            pos = jnp.arange(length)
            mask = attention.make_decoder_mask(
                decoder_target_tokens, decoder_segment_ids, decoder_causal_attention)
            bias = attention.mask_to_bias(mask)
            if relpos is not None:
                # Causal positions never look ahead, so one-sided buckets suffice; the prefix LM
                # attends forward over its inputs and needs the bidirectional buckets.
                bias = bias + relpos(pos, pos,
                                     bidirectional=decoder_causal_attention is not None)
            positions = _default_positions(decoder_input_tokens, decoder_positions)
        if cross:
            query_tokens = (jnp.ones_like(decoder_input_tokens) if decode
                            else decoder_target_tokens)
            query_segments = None if decode else decoder_segment_ids
            cross_bias = attention.mask_to_bias(attention.make_padding_mask(
                query_tokens, encoder_input_tokens, query_segments,
                encoder_segment_ids if query_segments is not None else None))

        layer_cls = DecoderLayer if cfg.decoder_program is None else programs.ProgramDecoderLayer
        # __call__(self, x, bias, deterministic, decode, ...): the two Python bools are static.
        layer_cls = _layer_class(cfg, layer_cls, static_argnums=(3, 4), decode=decode)
        x = _run_stack(cfg, "decoder", lambda i, name: layer_cls(cfg, cross, i, name=name),
                       x, bias, deterministic, decode, encoded, cross_bias,
                       None if decode else decoder_segment_ids, positions)
        x = _norm(cfg, "decoder_norm")(x)
        x = _dropout(cfg, x, deterministic)
        if cfg.logits_via_embedding:
            if cfg.tied_logits_rescale:
                # Tied logits are rescaled by 1/sqrt(d) as in T5 1.0 / Mesh TF / HF T5.
                x = x / jnp.sqrt(jnp.asarray(cfg.emb_dim, dt))
            logits = embedder.attend(x)
        else:
            logits = layers.DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dt,
                                         name="logits_dense")(x)
        logits = layers.constrain(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class DecoderOnly(nn.Module):
    """Decoder-only Transformer (causal LM, or prefix LM with `decoder_causal_attention`)."""

    config: TransformerConfig

    def setup(self):
        self.decoder = Decoder(self.config)

    def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 decoder_causal_attention: Array | None = None, enable_dropout: bool = False,
                 decode: bool = False, decode_position: Array | None = None,
                 decoder_positions: Array | None = None) -> Array:
        return self.decoder(decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
                            decoder_causal_attention, enable_dropout, decode, decode_position,
                            decoder_positions=decoder_positions)


class EncoderDecoder(nn.Module):
    """T5-style encoder-decoder with a shared top-level `token_embedder`."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.num_encoder_layers <= 0:
            raise ValueError("An EncoderDecoder needs num_encoder_layers > 0.")
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.jnp_dtype,
                                           name="token_embedder")
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
               enable_dropout=False):
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            enable_dropout)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens=None, encoder_segment_ids=None, decoder_segment_ids=None,
               decoder_positions=None, enable_dropout=False, decode=False, decode_position=None):
        return self.decoder(decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
                            None, enable_dropout, decode, decode_position, encoded,
                            encoder_input_tokens, encoder_segment_ids, decoder_positions)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, enable_dropout=False):
        """Teacher-forced logits <float32>[batch, dec_length, vocab]."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                           decoder_positions, enable_dropout)
