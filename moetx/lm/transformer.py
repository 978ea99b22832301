"""Transformer stacks: the T5.1.1-style decoder-only model (causal and prefix LM).

Parameter tree (T5X / flaxformer `DecoderOnly` names):

    decoder/token_embedder/embedding                        [vocab, embed]
    decoder/relpos_bias/rel_embedding                       [heads, relpos_buckets]  (shared)
    decoder/layers_{i}/pre_self_attention_layer_norm/scale  [embed]
    decoder/layers_{i}/self_attention/{query,key,value}/kernel  [embed, heads*d_kv]
    decoder/layers_{i}/self_attention/out/kernel            [heads*d_kv, embed]
    decoder/layers_{i}/pre_mlp_layer_norm/scale             [embed]
    decoder/layers_{i}/mlp/{wi_0,wi_1}/kernel               [embed, mlp]
    decoder/layers_{i}/mlp/wo/kernel                        [mlp, embed]
    decoder/decoder_norm/scale                              [embed]
    decoder/logits_dense/kernel                             [embed, vocab]  (untied logits only)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moetx.lm import attention, layers

Array = jax.Array


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer stack.

    Attributes:
      vocab_size: number of token ids (including sentinels/extra ids).
      emb_dim: model width d_model.
      num_heads, head_dim: attention heads and per-head width d_kv.
      mlp_dim: MLP hidden width d_ff.
      num_decoder_layers: decoder depth.
      dropout_rate: dropout on residual branches, attention weights and the MLP hidden layer.
      mlp_activations: ('gelu', 'linear') is gated GELU (T5.1.1); ('relu',) is T5 1.0.
      logits_via_embedding: tie the output projection to the token embedding (T5 1.0 style),
        otherwise `logits_dense` (T5.1.1).
      relative_attention_num_buckets, relative_attention_max_distance: T5 relative position bias.
      dtype: activation dtype (float32 on CPU, bfloat16 on accelerators); params stay float32.
    """

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1024
    num_decoder_layers: int = 8
    dropout_rate: float = 0.0
    mlp_activations: Sequence[str] = ("gelu", "linear")
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                     "num_decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got "
                                 f"{getattr(self, name)}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        for act in self.mlp_activations:
            layers.get_activation(act)
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm self-attention + MLP block with residuals and dropout."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool, decode: bool) -> Array:
        """x: [batch, length, embed]; bias: additive [batch|1, heads|1, q, k]."""
        cfg = self.config
        dt = cfg.jnp_dtype
        h = layers.RMSNorm(dtype=dt, name="pre_self_attention_layer_norm")(x)
        h = attention.MultiHeadDotProductAttention(
            cfg.num_heads, cfg.head_dim, cfg.dropout_rate, dt, name="self_attention"
        )(h, h, bias, deterministic=deterministic, decode=decode)
        h = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
        x = x + h
        h = layers.RMSNorm(dtype=dt, name="pre_mlp_layer_norm")(x)
        h = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, dt, name="mlp")(
            h, deterministic=deterministic
        )
        h = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
        return layers.constrain(x + h, ("batch", "length", "embed"))


class Decoder(nn.Module):
    """The decoder stack of a decoder-only model: embeddings, layers, final norm, logits."""

    config: TransformerConfig

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
        Returns:
          <float32>[batch, length, vocab] logits.
        """
        cfg = self.config
        dt = cfg.jnp_dtype
        deterministic = not enable_dropout
        embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dt, name="token_embedder")
        relpos = layers.RelativePositionBiases(
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
            cfg.num_heads, dt, name="relpos_bias",
        )
        x = embedder(decoder_input_tokens)
        x = layers.constrain(x, ("batch", "length", "embed"))
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)

        if decode and self.is_initializing():
            # Initialising the cache: the inputs carry the full max length; no masking needed.
            length = decoder_input_tokens.shape[1]
            pos = jnp.arange(length)
            bias = relpos(pos, pos, bidirectional=False)
        elif decode:
            if decoder_input_tokens.shape[1] != 1 or decode_position is None:
                raise ValueError("decode=True takes [batch, 1] tokens and a decode_position.")
            max_length = self.variables["cache"]["layers_0"]["self_attention"][
                "cached_key"].shape[1]
            keys = jnp.arange(max_length)
            bias = relpos(jnp.reshape(decode_position, (1,)), keys, bidirectional=False)
            bias = bias + attention.mask_to_bias(keys <= decode_position)[None, None, None, :]
        else:
            if decoder_target_tokens is None:
                raise ValueError("decoder_target_tokens is required outside decode mode.")
            length = decoder_input_tokens.shape[1]
            pos = jnp.arange(length)
            bidirectional = decoder_causal_attention is not None
            # Causal positions never look ahead, so one-sided buckets suffice; the prefix LM
            # attends forward over its inputs and needs the bidirectional buckets.
            bias = relpos(pos, pos, bidirectional=bidirectional)
            mask = attention.make_decoder_mask(
                decoder_target_tokens, decoder_segment_ids, decoder_causal_attention
            )
            bias = bias + attention.mask_to_bias(mask)

        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic, decode)
        x = layers.RMSNorm(dtype=dt, name="decoder_norm")(x)
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # Tied logits are rescaled by 1/sqrt(d) as in T5 1.0 / Mesh TF.
            logits = embedder.attend(x) / jnp.sqrt(jnp.asarray(cfg.emb_dim, dt))
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
                 decode: bool = False, decode_position: Array | None = None) -> Array:
        return self.decoder(decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
                            decoder_causal_attention, enable_dropout, decode, decode_position)
