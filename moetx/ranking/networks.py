"""The seq2slate pointer network (Bello et al. 2018, §3) and the item scorer of the baselines.

seq2slate reads a slate of n items (feature vectors, in the order the base ranker proposed)
with an encoder, then decodes a permutation with a pointer network (Vinyals et al. 2015): at
step i an LSTM decoder, fed the embedding of the item placed at step i-1 (a learned `go` vector
at step 0), produces a query d_i, and the distribution over the items is

    u_ij = v · tanh(W_ref m_j + W_q d_i)       (pointer attention over the encoder memory m)
    p_i  = softmax(u_i  with -inf on unavailable items)

optionally after `num_glimpses` glimpses (Bello et al. 2017: d_i is replaced by an
attention-weighted sum of the memory before the pointer). Two encoders:

  'lstm'         the paper's: an LSTM over the items in input order; its final state starts the
                 decoder. Padding items leave the state unchanged (they may sit anywhere).
  'transformer'  a bidirectional pre-norm Transformer encoder (moetx's RMSNorm and gated-GELU
                 MLP) with a learned embedding of the input position (the base ranker's rank);
                 the decoder starts from a projection of the masked mean of its outputs.

The network only maps (encoder output, decoder state, previous item, availability) to logits;
`moetx.ranking.decoding` runs the decoder (teacher forcing, greedy, sampling, beam search) and
owns the rules of which items are available at each step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moetx.nn import layers

Array = jax.Array
Carry = tuple[Array, Array]

ENCODERS = ("lstm", "transformer")


@dataclasses.dataclass(frozen=True)
class Seq2SlateConfig:
    """Sizes of the pointer network.

    Attributes:
      encoder: 'lstm' (the paper's) or 'transformer'.
      hidden_dim: width of the item embeddings, the LSTM states and the attention.
      num_layers, num_heads, mlp_dim: the Transformer encoder's depth, heads and MLP width.
      num_glimpses: attention glimpses before the pointer (0: point with the decoder state).
      max_slate_size: size of the Transformer's input-position table (slates may be shorter).
    """

    encoder: str = "lstm"
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_glimpses: int = 1
    max_slate_size: int = 64

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"Seq2SlateConfig.encoder must be one of {ENCODERS}, got "
                             f"{self.encoder!r}.")
        if self.hidden_dim < 1 or self.num_glimpses < 0:
            raise ValueError(f"hidden_dim must be >= 1 and num_glimpses >= 0, got "
                             f"{self.hidden_dim} and {self.num_glimpses}.")
        if self.encoder == "transformer" and self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads "
                             f"{self.num_heads}.")


@flax.struct.dataclass
class Encoded:
    """What the decoder needs from the encoder, computed once per slate.

    Attributes:
      item_inputs: <float32>[B, n, H] item embeddings: the decoder's input after an item is
        placed.
      memory: <float32>[B, n, H] encoder outputs (zero on padding items).
      pointer_keys: <float32>[B, n, H] W_ref · memory of the pointer.
      glimpse_keys: <float32>[B, n, H] W_ref · memory of the glimpse (unused without glimpses).
      carry: the decoder's initial LSTM state (c, h), each <float32>[B, H].
    """

    item_inputs: Array
    memory: Array
    pointer_keys: Array
    glimpse_keys: Array
    carry: Carry


class LSTMCell(nn.Module):
    """A standard LSTM cell with one fused gate kernel [in + H, 4H] over concat(x, h) and a
    forget-gate bias of +1 at init.

    (flax's `nn.LSTMCell` / `OptimizedLSTMCell` keep eight separate [., H] kernels; with the XLA
    CPU flag `--xla_cpu_experimental_ynn_fusion_type=+eltwise` on jaxlib 0.10.2, which moetx
    set until 2026-12-06, XLA rejects their fused program at run time: "Instruction with
    unsupported layout in YNN fusion".)
    """

    features: int

    @nn.compact
    def __call__(self, carry: Carry, x: Array) -> tuple[Carry, Array]:
        """carry (c, h) <float32>[B, H] each, x <float32>[B, in] -> (new carry, h)."""
        c, h = carry
        z = nn.Dense(4 * self.features, name="gates")(jnp.concatenate([x, h], axis=-1))
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    def initialize_carry(self, batch_size: int) -> Carry:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros


class MaskedLSTM(nn.Module):
    """An LSTM over axis 1 whose state skips padding steps: `(final carry, outputs)`."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> tuple[Carry, Array]:
        """x: <float32>[B, n, H], mask: <bool>[B, n] -> ((c, h) [B, H] each, outputs [B, n, H]
        (zero on padding))."""

        def body(cell, carry, inputs):
            x_t, m_t = inputs
            new_carry, y = cell(carry, x_t)
            keep = m_t[:, None]
            carry = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new_carry, carry)
            return carry, jnp.where(keep, y, 0.0)

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)
        cell = LSTMCell(self.hidden_dim, name="cell")
        carry = cell.initialize_carry(x.shape[0])
        return scan(cell, carry, (x, mask))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention and gated-GELU MLP, each with a residual."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """x: <float32>[B, n, H], mask: <bool>[B, n] -> [B, n, H]. Padding items are keys for
        no one."""
        attention_mask = mask[:, None, None, :]  # Shape: [B, heads=1, q=1, k].
        h = layers.RMSNorm(name="pre_attention_norm")(x)
        x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(
            h, h, mask=attention_mask, deterministic=True)
        h = layers.RMSNorm(name="pre_mlp_norm")(x)
        return x + layers.MlpBlock(self.mlp_dim, name="mlp")(h)


class Seq2SlateNetwork(nn.Module):
    """The pointer network; see the module docstring. `__call__` (used for init) runs every
    part once; the decoders call `encode`, `decode_step` and `baseline_value`."""

    config: Seq2SlateConfig

    def setup(self):
        cfg = self.config
        h = cfg.hidden_dim
        self.item_embed = nn.Dense(h, name="item_embed")
        if cfg.encoder == "lstm":
            self.encoder = MaskedLSTM(h, name="encoder")
        else:
            self.position_embed = nn.Embed(cfg.max_slate_size, h, name="position_embed")
            self.encoder_layers = [TransformerEncoderLayer(cfg.num_heads, cfg.mlp_dim,
                                                           name=f"encoder_layer_{i}")
                                   for i in range(cfg.num_layers)]
            self.encoder_norm = layers.RMSNorm(name="encoder_norm")
            self.initial_state = nn.Dense(2 * h, name="initial_state")
        self.decoder_cell = LSTMCell(h, name="decoder_cell")
        self.go = self.param("go", nn.initializers.normal(1.0), (h,))
        self.pointer_ref = nn.Dense(h, use_bias=False, name="pointer_ref")
        self.pointer_query = nn.Dense(h, use_bias=False, name="pointer_query")
        self.pointer_v = self.param("pointer_v", nn.initializers.normal(h ** -0.5), (h,))
        if cfg.num_glimpses:
            self.glimpse_ref = nn.Dense(h, use_bias=False, name="glimpse_ref")
            self.glimpse_query = nn.Dense(h, use_bias=False, name="glimpse_query")
            self.glimpse_v = self.param("glimpse_v", nn.initializers.normal(h ** -0.5), (h,))
        self.baseline_hidden = nn.Dense(h, name="baseline_hidden")
        self.baseline_out = nn.Dense(1, name="baseline_out")

    def __call__(self, features: Array, item_mask: Array) -> tuple[Array, Array]:
        """Init path: (step-0 logits [B, n], baseline value [B])."""
        encoded = self.encode(features, item_mask)
        go = self.go_input(features.shape[0])
        _, logits = self.decode_step(encoded, encoded.carry, go, item_mask.astype(bool))
        return logits, self.baseline_value(encoded, item_mask)

    def encode(self, features: Array, item_mask: Array) -> Encoded:
        """features: <float32>[B, n, F], item_mask: <bool>[B, n] -> `Encoded`."""
        cfg = self.config
        mask = item_mask.astype(bool)
        x = self.item_embed(features.astype(jnp.float32))
        if cfg.encoder == "lstm":
            carry, memory = self.encoder(x, mask)
        else:
            n = x.shape[1]
            if n > cfg.max_slate_size:
                raise ValueError(f"A slate of {n} items exceeds max_slate_size="
                                 f"{cfg.max_slate_size} of the Transformer encoder.")
            h = x + self.position_embed(jnp.arange(n))[None]
            for layer in self.encoder_layers:
                h = layer(h, mask)
            memory = jnp.where(mask[..., None], self.encoder_norm(h), 0.0)
            count = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
            pooled = memory.sum(1) / count
            c, hidden = jnp.split(jnp.tanh(self.initial_state(pooled)), 2, axis=-1)
            carry = (c, hidden)
        glimpse_keys = self.glimpse_ref(memory) if cfg.num_glimpses else memory
        return Encoded(item_inputs=x, memory=memory, pointer_keys=self.pointer_ref(memory),
                       glimpse_keys=glimpse_keys, carry=carry)

    def go_input(self, batch_size: int) -> Array:
        """The decoder's input at step 0: <float32>[B, H]."""
        return jnp.broadcast_to(self.go, (batch_size, self.config.hidden_dim))

    def decode_step(self, encoded: Encoded, carry: Carry, decoder_input: Array,
                    available: Array) -> tuple[Carry, Array]:
        """One pointer step.

        Args:
          encoded: the slate's `Encoded`.
          carry: decoder state (c, h), <float32>[B, H] each.
          decoder_input: <float32>[B, H] embedding of the item placed last (or `go`).
          available: <bool>[B, n] items that may be placed now.

        Returns:
          (new carry, logits <float32>[B, n] with -inf on unavailable items).
        """
        carry, query = self.decoder_cell(carry, decoder_input)
        for _ in range(self.config.num_glimpses):
            g = _additive_scores(encoded.glimpse_keys, self.glimpse_query(query), self.glimpse_v)
            weights = jax.nn.softmax(jnp.where(available, g, -jnp.inf), axis=-1)
            query = jnp.einsum("bn,bnh->bh", weights, encoded.memory)
        u = _additive_scores(encoded.pointer_keys, self.pointer_query(query), self.pointer_v)
        return carry, jnp.where(available, u, -jnp.inf)

    def baseline_value(self, encoded: Encoded, item_mask: Array) -> Array:
        """The learned REINFORCE baseline b(slate): <float32>[B]. It reads the encoder's
        memory through a stop-gradient, so fitting it never moves the policy."""
        mask = item_mask.astype(bool)[..., None]
        count = jnp.maximum(mask.sum(1), 1).astype(jnp.float32)
        pooled = jax.lax.stop_gradient(jnp.where(mask, encoded.memory, 0.0).sum(1) / count)
        return self.baseline_out(nn.relu(self.baseline_hidden(pooled)))[..., 0]


def _additive_scores(keys: Array, query: Array, v: Array) -> Array:
    """v · tanh(keys_j + query): keys <float32>[B, n, H], query [B, H], v [H] -> [B, n]."""
    return jnp.einsum("bnh,h->bn", jnp.tanh(keys + query[:, None, :]), v)


class ItemScorer(nn.Module):
    """A pointwise MLP score per item, for the pointwise and listwise baselines.

    Attributes:
      hidden_dim: width of the hidden layers; num_layers: how many (ReLU).
    """

    hidden_dim: int = 64
    num_layers: int = 2

    @nn.compact
    def __call__(self, features: Array) -> Array:
        """features: <float32>[B, n, F] -> scores <float32>[B, n]."""
        x = features.astype(jnp.float32)
        for i in range(self.num_layers):
            x = nn.relu(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(x))
        return nn.Dense(1, name="score")(x)[..., 0]


def init_params(module: nn.Module, rng: Array, slate_size: int, num_features: int) -> Any:
    """Variables of `module` from a one-slate dummy batch (all items real)."""
    features = jnp.zeros((1, slate_size, num_features), jnp.float32)
    if isinstance(module, Seq2SlateNetwork):
        return module.init(rng, features, jnp.ones((1, slate_size), bool))
    return module.init(rng, features)
