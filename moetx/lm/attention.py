"""Multi-head dot-product attention with T5X parameter names, masks, a KV cache, rotary position
embeddings, Primer's multi-dconv-head attention, and grouped-query / multi-query attention.

T5 does not scale attention logits by 1/sqrt(d_kv) at run time: the scaling is folded into the
initializer of the query kernel (as T5X and Hugging Face T5 do), so converted checkpoints give
identical logits. Llama-style models (`scale_logits=True`) scale at run time, as HF Llama does.

Grouped-query attention (GQA, Ainslie et al. 2023) projects K and V to `num_kv_heads` heads, fewer
than the `num_heads` query heads; query head h attends with K/V head h // (num_heads /
num_kv_heads), HF Llama's `repeat_kv` order. Multi-query attention (Shazeer 2019) is
`num_kv_heads=1`. The KV cache then holds `num_kv_heads` heads: the memory saving is the point.
Grouped K/V carry their own logical axes, `joined_kv_heads` (projection kernels) and `kv_heads`
(activations and cache), which the standard rules leave replicated over the model axis: they are
num_heads / num_kv_heads times smaller than Q, and a head count below the model axis size could
not be split by head anyway. With `num_kv_heads == num_heads` nothing changes: the same
parameters, the same logical axes (`joined_kv`, `heads`) and the same computation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.nn.layers import DenseGeneral, constrain, gathered

Array = jax.Array

# Large negative bias for masked positions; finite so that fully masked rows (padding) stay NaN-free.
NEG_INF = -1e10
# Primer's causal depthwise convolution: kernel 3 taps, initialised to 0.5, 0.5/3, 0.5/3.
DCONV_TAPS = 3
# The variable collection holding each cross-attention's projected encoder K/V while decoding.
CROSS_KV = "cross_kv"


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
    """Self-attention mask of a decoder, `<bool>[batch, 1, length, length]`.

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


def make_padding_mask(query_tokens: Array, key_tokens: Array, query_segment_ids: Array | None,
                      key_segment_ids: Array | None) -> Array:
    """Bidirectional (encoder or cross-attention) mask `<bool>[batch, 1, q, k]`: both positions
    real and, when packed, in the same segment."""
    same = None
    if query_segment_ids is not None and key_segment_ids is not None:
        same = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    return make_attention_mask(query_tokens > 0, key_tokens > 0, same)


def mask_to_bias(mask: Array, dtype: jnp.dtype = jnp.float32) -> Array:
    return jnp.where(mask, 0.0, NEG_INF).astype(dtype)


def rotary_embedding(x: Array, positions: Array, theta: float = 10000.0) -> Array:
    """Rotary position embedding (RoFormer / HF Llama "rotate half" layout).

    Args:
      x: <dtype>[batch, length, heads, d_kv].
      positions: <int32>[batch, length] position of each token (within its packed segment).
    Returns:
      x rotated pairwise: channel i pairs with channel i + d_kv/2, at angle pos * theta^(-2i/d).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"Rotary embeddings need an even head_dim, got {d}.")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # Shape: [b, l, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Primer's causal depthwise convolution over length, one filter of `taps` taps per channel.

    y_t = w0 * x_t + w1 * x_{t-1} + ... + w_{taps-1} * x_{t-taps+1}, with zero fill: a shift
    never wraps and never reads across a packed-segment boundary. Kernel `[taps, channels]`
    (logical `conv_window` and `channel_axis`), initialised as Primer's: w0 = 0.5 and every other
    tap 0.5 / taps (Primer's width 3: 0.5, 0.5/3, 0.5/3).

    In decode mode the last `taps - 1` *pre-conv* inputs are kept in the `cache` collection
    (`prev [batch, taps - 1, channels]`, most recent first), so one-token steps give exactly the
    teacher-forced outputs.
    """

    dtype: jnp.dtype = jnp.float32
    taps: int = DCONV_TAPS
    channel_axis: str = "joined_kv"

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None = None,
                 decode: bool = False) -> Array:
        """x: <dtype>[batch, length, channels] -> same shape."""
        if self.taps < 1:
            raise ValueError(f"DepthwiseConv needs at least one tap, got {self.taps}.")
        channels = x.shape[-1]
        taps = self.taps

        def init(key, shape, dtype=jnp.float32):
            del key
            first = jnp.array([0.5] + [0.5 / taps] * (taps - 1), dtype)
            return jnp.broadcast_to(first[:, None], shape)

        kernel = self.param("kernel", nn.with_logical_partitioning(
            init, ("conv_window", self.channel_axis)), (taps, channels), jnp.float32)
        kernel = gathered(kernel, ("conv_window", self.channel_axis), self.dtype)
        if decode:
            is_initialized = self.has_variable("cache", "prev")
            prev = self.variable("cache", "prev", jnp.zeros,
                                 (x.shape[0], taps - 1, channels), x.dtype)
            if is_initialized:
                # Shape: [batch, 1, channels] at position t; prev holds t-1, t-2, ...
                window = jnp.concatenate([x, prev.value], axis=1)  # [x_t, x_{t-1}, ...]
                y = jnp.einsum("bsc,sc->bc", window, kernel)[:, None]
                prev.value = window[:, :taps - 1]
                return y
        y = x * kernel[0]
        for s in range(1, min(taps, x.shape[1])):  # a shift past the length reads only zeros
            shifted = jnp.pad(x, ((0, 0), (s, 0), (0, 0)))[:, :-s]
            if segment_ids is not None:
                seg_shifted = jnp.pad(segment_ids, ((0, 0), (s, 0)))[:, :-s]
                shifted = shifted * (seg_shifted == segment_ids)[..., None].astype(x.dtype)
            y = y + shifted * kernel[s]
        return y


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention: `query/key/value/kernel [embed, heads*d_kv]`, `out/kernel [heads*d_kv, embed]`.

    Options: Primer multi-dconv-head attention (`dconv`: a causal depthwise conv after each of
    the Q, K, V projections, parameters `{query,key,value}_dconv/kernel`); full Primer's shared
    QK representation (`share_qk`: K is the conv'd `query` projection and Q a further square
    projection `q_solo_project` of it, so there is no `key` kernel); rotary embeddings
    (`rope_theta` > 0, with `positions`), run-time 1/sqrt(d_kv) scaling (`scale_logits`), and
    grouped-query attention (`num_kv_heads` < `num_heads`: `key/value/kernel
    [embed, kv_heads*d_kv]`, each group of num_heads/num_kv_heads query heads sharing one K/V
    head; not with `share_qk`, whose K is the query projection).

    In decode mode (self-attention only) the module keeps `cached_key`/`cached_value`
    `[batch, kv_heads, max_length, d_kv]` and `cache_index` in the `cache` collection; each call
    takes one position (`[batch, 1, embed]`) and attends to every cached position up to and
    including it.
    Cross-attention (`is_cross=True`) in decode mode projects the encoder output to K/V once: a
    call with the `CROSS_KV` collection mutable stores them as `key`/`value`
    `[batch, kv_heads, enc_length, d_kv]`, heads-major, the layout the attention matmuls read
    without a transpose; later calls given that collection (immutable) read them and skip the
    projection. Without it, each call projects `inputs_kv` again: inside a decode loop XLA hoists
    those matmuls out of the loop but still transposes their [batch, enc_length, ...] output on
    every step, which was most of a greedy decoding step at T5.1.1-small's shape.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    dconv: bool = False
    share_qk: bool = False
    rope_theta: float = 0.0
    scale_logits: bool = False
    is_cross: bool = False
    num_kv_heads: int | None = None

    @property
    def kv_heads(self) -> int:
        """The number of K/V heads (`num_kv_heads`, or `num_heads` when None), checked."""
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if kv_heads <= 0 or self.num_heads % kv_heads:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads="
                             f"{self.num_heads}, got {self.num_kv_heads}.")
        return kv_heads

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        bias: Array | None,
        deterministic: bool = True,
        decode: bool = False,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        """Attention of `inputs_q` over `inputs_kv`.

        Args:
          inputs_q: <dtype>[batch, q, embed].
          inputs_kv: <dtype>[batch, k, embed].
          bias: additive <float>[batch or 1, heads or 1, q, k] (mask and position bias, per query
            head); in decode mode `[batch or 1, heads or 1, 1, max_length]` for the current
            position.
          deterministic: disables dropout.
          decode: single-step decoding with the KV cache.
          segment_ids: <int32>[batch, q] packed segments (keeps the dconv inside a segment).
          positions: <int32>[batch, q] token positions (rotary embeddings).
        Returns:
          <dtype>[batch, q, embed].
        """
        joined = self.num_heads * self.head_dim
        kv_heads = self.kv_heads
        groups = self.num_heads // kv_heads
        # Grouped K/V get their own logical axes (replicated over the model axis, see above).
        kv_joined_axis, kv_head_axis = (("joined_kv", "heads") if groups == 1
                                        else ("joined_kv_heads", "kv_heads"))
        # T5 folds the 1/sqrt(d_kv) logit scaling into the query initializer.
        query_init = nn.initializers.variance_scaling(
            1.0 if self.scale_logits else 1.0 / self.head_dim, "fan_in", "truncated_normal")
        if (self.dconv or self.share_qk or self.rope_theta) and self.is_cross:
            raise ValueError("Primer dconv / shared QK and rotary embeddings apply to "
                             "self-attention only.")
        if self.share_qk and groups != 1:
            raise ValueError(f"Primer's shared QK makes K the query projection ({self.num_heads} "
                             f"heads); it cannot have num_kv_heads={kv_heads}.")
        conv = lambda name, x: DepthwiseConv(self.dtype, name=name)(  # noqa: E731
            x, segment_ids, decode)
        q = DenseGeneral(joined, ("embed", "joined_kv"), self.dtype, kernel_init=query_init,
                         name="query")(inputs_q)
        # The K/V layout: [batch, length, kv_heads, d_kv], or heads-major for stored cross K/V.
        kv_layout = "bkhd"
        if (decode and self.is_cross and self.has_variable(CROSS_KV, "key")
                and not self.is_mutable_collection(CROSS_KV)):
            k = constrain(self.get_variable(CROSS_KV, "key"),
                          ("batch", kv_head_axis, "length", "kv"))
            v = constrain(self.get_variable(CROSS_KV, "value"),
                          ("batch", kv_head_axis, "length", "kv"))
            kv_layout = "bhkd"
        else:
            v = DenseGeneral(kv_heads * self.head_dim, ("embed", kv_joined_axis), self.dtype,
                             name="value")(inputs_kv)
            if self.share_qk:
                # Full Primer: one projection (and conv) serves as K, and Q is projected from it.
                k = conv("query_dconv", q) if self.dconv else q
                q = DenseGeneral(joined, ("unmodeled", "joined_kv"), self.dtype,
                                 name="q_solo_project")(k)
                if self.dconv:
                    v = conv("value_dconv", v)
            else:
                k = DenseGeneral(kv_heads * self.head_dim, ("embed", kv_joined_axis),
                                 self.dtype, name="key")(inputs_kv)
                q, k, v = self.transform_projections(q, k, v, segment_ids, decode)
            lk = k.shape[1]
            # Shape: [batch, length, kv_heads, d_kv]
            k = constrain(k.reshape(k.shape[0], lk, kv_heads, self.head_dim),
                          ("batch", "length", kv_head_axis, "kv"))
            v = constrain(v.reshape(v.shape[0], lk, kv_heads, self.head_dim),
                          ("batch", "length", kv_head_axis, "kv"))
        b, lq = q.shape[:2]
        # Shape: [batch, length, heads, d_kv]
        q = constrain(q.reshape(b, lq, self.num_heads, self.head_dim),
                      ("batch", "length", "heads", "kv"))
        if self.rope_theta:
            if positions is None:
                raise ValueError("Rotary embeddings need token positions.")
            q = rotary_embedding(q, positions, self.rope_theta)
            k = rotary_embedding(k, positions, self.rope_theta)
        if self.scale_logits:
            q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)  # after the conv, as in Primer

        if decode and not self.is_cross:
            k, v, kv_layout = self._update_cache(k, v)
        if decode and self.is_cross and self.is_mutable_collection(CROSS_KV):
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            self.put_variable(CROSS_KV, "key", k)
            self.put_variable(CROSS_KV, "value", v)
            kv_layout = "bhkd"

        if groups == 1:
            out = self._attend(q, k, v, bias, deterministic, kv_layout)
        else:
            out = self._attend_grouped(q, k, v, bias, deterministic, groups, kv_layout)
        out = out.reshape(b, lq, joined)
        out = DenseGeneral(inputs_q.shape[-1], ("joined_kv", "embed"), self.dtype, name="out")(out)
        return constrain(out, ("batch", "length", "embed"))

    def _attend(self, q: Array, k: Array, v: Array, bias: Array | None,
                deterministic: bool, kv_layout: str = "bkhd") -> Array:
        """Softmax attention with one K/V head per query head.

        Args:
          q: <dtype>[batch, q, heads, d_kv]; k, v: <dtype>[batch, k, heads, d_kv], or
            [batch, heads, k, d_kv] with `kv_layout="bhkd"`.
          bias: <float>[batch or 1, heads or 1, q, k] or None.
        Returns:
          <dtype>[batch, q, heads, d_kv].
        """
        # Logits in float32 for a stable softmax whatever the activation dtype.
        logits = jnp.einsum(f"bqhd,{kv_layout}->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        return jnp.einsum(f"bhqk,{kv_layout}->bqhd", weights, v)

    def _attend_grouped(self, q: Array, k: Array, v: Array, bias: Array | None,
                        deterministic: bool, groups: int, kv_layout: str = "bkhd") -> Array:
        """Softmax attention where each group of `groups` consecutive query heads shares a K/V
        head, without materialising the repeated K/V (the cache stays `kv_heads` wide).

        Args:
          q: <dtype>[batch, q, kv_heads * groups, d_kv]; k, v: <dtype>[batch, k, kv_heads, d_kv],
            or [batch, kv_heads, k, d_kv] with `kv_layout="bhkd"`.
          bias: <float>[batch or 1, heads or 1, q, k] or None (per query head).
        Returns:
          <dtype>[batch, q, kv_heads * groups, d_kv].
        """
        b, lq, heads, d = q.shape
        kv_heads = k.shape[kv_layout.index("h")]
        # Shape: [batch, q, kv_heads, groups, d_kv]; query head h = kv_head * groups + g.
        q = q.reshape(b, lq, kv_heads, groups, d)
        logits = jnp.einsum(f"bqhgd,{kv_layout}->bhgqk", q, k,
                            preferred_element_type=jnp.float32)
        if bias is not None:
            bias = bias.astype(jnp.float32)
            # Shape: [batch or 1, kv_heads or 1, groups or 1, q, k]
            if bias.shape[1] == heads:
                bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
            else:
                bias = bias[:, :, None]
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum(f"bhgqk,{kv_layout}->bqhgd", weights, v)
        return out.reshape(b, lq, heads, d)

    def transform_projections(self, q: Array, k: Array, v: Array, segment_ids: Array | None,
                              decode: bool) -> tuple[Array, Array, Array]:
        """What happens to the projected Q `<dtype>[batch, length, heads*d_kv]` and K, V
        `<dtype>[batch, length, kv_heads*d_kv]` before the head split (not with `share_qk`):
        Primer's convs with `dconv`, else nothing. Subclasses override it (e.g.
        `moetx.lm.programs`); submodules made here belong to this module."""
        if not self.dconv:
            return q, k, v
        kv_axis = "joined_kv" if self.kv_heads == self.num_heads else "joined_kv_heads"
        conv = lambda name, x, axis: DepthwiseConv(  # noqa: E731
            self.dtype, channel_axis=axis, name=name)(x, segment_ids, decode)
        return (conv("query_dconv", q, "joined_kv"), conv("key_dconv", k, kv_axis),
                conv("value_dconv", v, kv_axis))

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array, str]:
        """Writes one step's key/value `[batch, 1, kv_heads, d_kv]` into the cache; returns the
        cache `[batch, kv_heads, max_length, d_kv]` and its layout for `_attend`, "bhkd".

        The cache is heads-major, the layout the attention matmuls read without a transpose (a
        `[batch, max_length, ...]` cache was transposed whole on every step). On the
        initialisation call (`is_initialized` false) `k` and `v` carry the full `max_length`
        shape, which sizes the cache, and are returned as they are ("bkhd").
        """
        is_initialized = self.has_variable("cache", "cached_key")
        # Shape: [batch, kv_heads, length, d_kv]
        k_heads, v_heads = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k_heads.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v_heads.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:
            return k, v, "bkhd"
        if k.shape[1] != 1:
            raise ValueError(
                f"Decode mode takes one position per call; got a query of length {k.shape[1]}."
            )
        i = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_heads, (0, 0, i, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_heads,
                                                          (0, 0, i, 0))
        cache_index.value = i + 1
        return cached_key.value, cached_value.value, "bhkd"
