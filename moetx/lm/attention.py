"""Multi-head dot-product attention with T5X parameter names, masks and a KV cache.

T5 does not scale attention logits by 1/sqrt(d_kv) at run time: the scaling is folded into the
initializer of the query kernel (as T5X and Hugging Face T5 do), so converted checkpoints give
identical logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.lm.layers import DenseGeneral, constrain

Array = jax.Array

# Large negative bias for masked positions; finite so that fully masked rows (padding) stay NaN-free.
NEG_INF = -1e10


def make_attention_mask(
    query_ok: Array, key_ok: Array, pairwise: Array | None = None
) -> Array:
    """Boolean mask `[batch, 1, q, k]` from per-position validity and an optional pairwise mask."""
    mask = query_ok[:, :, None] & key_ok[:, None, :]
    if pairwise is not None:
        mask = mask & pairwise
    return mask[:, None]


def make_decoder_mask(
    decoder_target_tokens: Array,
    decoder_segment_ids: Array | None = None,
    decoder_causal_attention: Array | None = None,
) -> Array:
    """Self-attention mask of a decoder-only model, `<bool>[batch, 1, length, length]`.

    A query attends to key positions that are (a) not padding, (b) in the same packed segment,
    and (c) not in its future, except that positions flagged by `decoder_causal_attention`
    (the inputs part of a prefix LM) attend to each other bidirectionally.

    Args:
      decoder_target_tokens: <int32>[batch, length]; 0 marks padding.
      decoder_segment_ids: <int32>[batch, length] packed segment ids, or None (one example a row).
      decoder_causal_attention: <int32|bool>[batch, length], 1 on the prefix (inputs) positions.
    """
    length = decoder_target_tokens.shape[1]
    valid = decoder_target_tokens > 0
    idx = jnp.arange(length)
    causal = (idx[None, :] <= idx[:, None])[None]  # Shape: [1, q, k]
    if decoder_causal_attention is not None:
        prefix = decoder_causal_attention.astype(bool)
        causal = causal | (prefix[:, :, None] & prefix[:, None, :])
    if decoder_segment_ids is not None:
        same = decoder_segment_ids[:, :, None] == decoder_segment_ids[:, None, :]
        causal = causal & same
    return make_attention_mask(valid, valid, causal)


def mask_to_bias(mask: Array, dtype: jnp.dtype = jnp.float32) -> Array:
    return jnp.where(mask, 0.0, NEG_INF).astype(dtype)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention: `query/key/value/kernel [embed, heads*d_kv]`, `out/kernel [heads*d_kv, embed]`.

    In decode mode the module keeps `cached_key`/`cached_value` `[batch, max_length, heads, d_kv]`
    and `cache_index` in the `cache` collection; each call then takes one position
    (`[batch, 1, embed]`) and attends to every cached position up to and including it.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        bias: Array | None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Attention of `inputs_q` over `inputs_kv`.

        Args:
          inputs_q: <dtype>[batch, q, embed].
          inputs_kv: <dtype>[batch, k, embed].
          bias: additive <float>[batch or 1, heads or 1, q, k] (mask and position bias); in decode
            mode `[batch or 1, heads or 1, 1, max_length]` for the current position.
          deterministic: disables dropout.
          decode: single-step decoding with the KV cache.
        Returns:
          <dtype>[batch, q, embed].
        """
        joined = self.num_heads * self.head_dim
        # T5 folds the 1/sqrt(d_kv) logit scaling into the query initializer.
        query_init = nn.initializers.variance_scaling(
            1.0 / self.head_dim, "fan_in", "truncated_normal"
        )
        q = DenseGeneral(joined, ("embed", "joined_kv"), self.dtype, kernel_init=query_init,
                         name="query")(inputs_q)
        k = DenseGeneral(joined, ("embed", "joined_kv"), self.dtype, name="key")(inputs_kv)
        v = DenseGeneral(joined, ("embed", "joined_kv"), self.dtype, name="value")(inputs_kv)
        b, lq = q.shape[:2]
        lk = k.shape[1]
        # Shape: [batch, length, heads, d_kv]
        q = constrain(q.reshape(b, lq, self.num_heads, self.head_dim),
                      ("batch", "length", "heads", "kv"))
        k = constrain(k.reshape(b, lk, self.num_heads, self.head_dim),
                      ("batch", "length", "heads", "kv"))
        v = constrain(v.reshape(b, lk, self.num_heads, self.head_dim),
                      ("batch", "length", "heads", "kv"))

        if decode:
            k, v = self._update_cache(k, v)

        # Logits in float32 for a stable softmax whatever the activation dtype.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape(b, lq, joined)
        out = DenseGeneral(inputs_q.shape[-1], ("joined_kv", "embed"), self.dtype, name="out")(out)
        return constrain(out, ("batch", "length", "embed"))

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array]:
        """Writes one step's key/value `[batch, 1, heads, d_kv]` into the cache; returns the cache.

        On the initialisation call (`is_initialized` false) `k` and `v` carry the full
        `max_length` shape, which sizes the cache.
        """
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:
            return k, v
        if k.shape[1] != 1:
            raise ValueError(
                f"Decode mode takes one position per call; got a query of length {k.shape[1]}."
            )
        i = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, i, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, i, 0, 0))
        cache_index.value = i + 1
        return cached_key.value, cached_value.value
