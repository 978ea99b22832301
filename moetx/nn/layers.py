"""Neural-network building blocks with T5X parameter names and logical axis annotations, shared
by the language-model (`moetx.lm`) and mixture-of-experts (`moetx.moe`) stacks.

Every parameter is created through `nn.with_logical_partitioning`, so the variables returned by
`init` are `nn.LogicallyPartitioned` boxes carrying their logical axis names (`embed`, `mlp`,
`joined_kv`, `vocab`, `heads`, `relpos_buckets`, ...). `moetx.trainer.partitioning` maps those
names onto the mesh. Parameter names and shapes follow T5X / flaxformer (`query/kernel` is
[embed, heads * head_dim], `mlp/wi_0/kernel` [embed, mlp], and so on) so that T5X checkpoints map
one to one.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.util import platform as platform_lib

Array = jax.Array
Initializer = Callable[..., Array]

# T5X's default kernel initializer: variance scaling, fan-in, truncated normal.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Sharding constraint on an activation by logical axis names (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))


class DenseGeneral(nn.Module):
    """A bias-free dense layer over the last axis, kernel `[in, features]` with logical axes.

    Attributes:
      features: output width.
      kernel_axes: logical names of the kernel's two axes, e.g. `('embed', 'mlp')`.
      dtype: computation dtype of the activations (the kernel is stored in `param_dtype`).
    """

    features: int
    kernel_axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: <dtype>[..., in] -> <dtype>[..., features]."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        kernel = gathered(kernel, self.kernel_axes, self.dtype)
        return dense_contract(jnp.asarray(x, self.dtype), kernel)


def dense_contract(x: Array, kernel: Array, batch_dims: int = 0) -> Array:
    """x [*B, ..., in] · kernel [*B, in, out] -> [*B, ..., out]: the contraction of
    `DenseGeneral` (no batch axes) and of MoE's expert MLPs (`batch_dims=1`: one kernel per
    expert, x [experts, tokens, in]).

    The same function on every platform; on CPUs (`moetx.util.platform.traced_platform`) its
    kernel gradient is laid out for XLA's fast matmul path. XLA's CPU backend hands a dot to
    YNNPACK (multi-threaded, vectorised) only when the left operand contracts its last axis. The
    kernel gradient xᵀ·g contracts the token axis of both operands, so autodiff's dot runs on
    Eigen instead: at T5.1.1-small's shape each one took 2-3x its YNNPACK time and ran
    asynchronously, so `jax.profiler` showed the wait as 0.95 s of gaps between thunks in a 6.2 s
    step. `_cpu_dense`'s backward materialises xᵀ (an optimisation barrier keeps XLA from
    folding the transpose back into the dot's dimension numbers), which costs one copy of x and
    makes the gradient a plain matmul. Measured (benchmarks/encdec_throughput.py's model at
    T5.1.1-small's shape, Adafactor, 2 cores): 6.14 -> 5.55 s a step, losses equal to 1e-6.
    TPUs and GPUs read transposed operands natively, so they keep autodiff's einsum.
    """
    if x.ndim < batch_dims + 1 or kernel.ndim != batch_dims + 2:
        raise ValueError(f"dense_contract with {batch_dims} batch axes needs x [*B, ..., in] and "
                         f"kernel [*B, in, out]; got {x.shape} and {kernel.shape}")
    if platform_lib.traced_platform() == "cpu":
        return _cpu_dense(x, kernel, batch_dims)
    return _einsum_dense(x, kernel, batch_dims)


def _einsum_dense(x: Array, kernel: Array, batch_dims: int) -> Array:
    b = "abcdefgh"[:batch_dims]
    return jnp.einsum(f"{b}...i,{b}io->{b}...o", x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_dense(x: Array, kernel: Array, batch_dims: int) -> Array:
    return _einsum_dense(x, kernel, batch_dims)


def _cpu_dense_fwd(x: Array, kernel: Array, batch_dims: int):
    return _einsum_dense(x, kernel, batch_dims), (x, kernel)


def _cpu_dense_bwd(batch_dims: int, residuals, g: Array):
    x, kernel = residuals
    b = "abcdefgh"[:batch_dims]
    dx = jnp.einsum(f"{b}...o,{b}io->{b}...i", g, kernel).astype(x.dtype)
    lead = x.shape[:batch_dims]
    x_t = jax.lax.optimization_barrier(
        jnp.swapaxes(x.reshape(*lead, -1, x.shape[-1]), -1, -2))  # [*B, in, tokens]
    dkernel = jnp.matmul(x_t, g.reshape(*lead, -1, g.shape[-1])).astype(kernel.dtype)
    return dx, dkernel


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
    """`lax.dot_general`'s signature over `dense_contract`, for flax's `nn.Dense(dot_general=)`.

    Dense's contraction (lhs's last axis with rhs's first, no batch axes, default precision and
    result type) goes through `dense_contract`; any other call goes to `lax.dot_general`
    unchanged, so the result never depends on which path was taken.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
            and not lhs_batch and not rhs_batch and precision is None
            and preferred_element_type is None):
        return dense_contract(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


class Dense(nn.Dense):
    """flax's `nn.Dense` (same attributes, parameters and names) whose contraction is
    `dense_contract`, so its kernel gradient takes XLA's fast matmul path on CPUs too. For layers
    without logical axis names (the vision models); `DenseGeneral` is the language models'
    layer."""

    dot_general: Callable | None = dense_dot_general


#: The logical axis the trainer's FSDP rules shard parameters along (over the batch axes; see
#: `moetx.trainer.partitioning.standard_logical_axis_rules(fsdp=True)`).
FSDP_AXIS = "embed"


def gathered(param: Array, axes: Sequence[str | None], dtype) -> Array:
    """A parameter as a layer computes with it: in `dtype`, and all-gathered along its FSDP axis
    while its other axes keep their sharding (heads, mlp, vocab over `model`; experts over
    `expert`). Without FSDP (or outside a mesh) this is only the cast.

    Left to itself, XLA's sharding propagation meets a batch-sharded activation and a kernel
    sharded along `embed` over the same mesh axis by re-laying the activation out (all-gathering
    the whole batch and reducing partial sums of activation size, 10-100x the bytes of the
    kernel) instead of gathering the kernel; constraining the kernel to its gathered layout is
    FSDP's intended collective: one all-gather of the weights forward, one reduce-scatter of
    their gradient backward.
    """
    return constrain(jnp.asarray(param, dtype), tuple(None if a == FSDP_AXIS else a for a in axes))


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32. `axis` is
    the logical axis of the normalised (last) dimension."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = jnp.asarray(x, jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = jnp.asarray(x32 * jax.lax.rsqrt(var + self.epsilon), self.dtype)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
            (x.shape[-1],)
        )
        return y * gathered(scale, (self.axis,), self.dtype)


class PrimerNorm(nn.Module):
    """Primer's normalisation (So et al. 2021): mean-centred, divided by the square root of the
    "pseudo-variance" mean(x * (x - mean)), then scale and bias; statistics in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = jnp.asarray(x, jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        pseudo_var = jnp.mean(x32 * centred, axis=-1, keepdims=True)
        y = jnp.asarray(centred * jax.lax.rsqrt(pseudo_var + self.epsilon), self.dtype)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],)
        )
        return (y * gathered(scale, ("embed",), self.dtype)
                + gathered(bias, ("embed",), self.dtype))


class Embed(nn.Module):
    """Token embedding `embedding [vocab, embed]`; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids: Array) -> Array:
        """ids: <int32>[batch, length] -> <dtype>[batch, length, embed]."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer token ids, got dtype {ids.dtype}.")
        return jnp.take(gathered(self.embedding, ("vocab", "embed"), self.dtype), ids, axis=0)

    def attend(self, x: Array) -> Array:
        """x: [batch, length, embed] -> logits [batch, length, vocab] with the shared matrix."""
        return jnp.einsum("...d,vd->...v", x,
                          gathered(self.embedding, ("vocab", "embed"), self.dtype))


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucketing of `memory_position - query_position` into `num_buckets` ids.

    Half the buckets (all of them when unidirectional) hold exact small distances, the rest
    grow logarithmically up to `max_distance`; larger distances share the last bucket. For a
    unidirectional (causal) model, positive offsets (the future) all map to bucket 0.
    """
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Guard log(0); the value is unused where is_small holds.
    val_if_large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / np.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """Shared relative position bias `rel_embedding [heads, relpos_buckets]` (T5.1.1).

    `one_hot`: look the table up by a one-hot contraction (T5X / flaxformer; gather-free, the
    fast form on TPU) or by a gather, whose gradient is a scatter-add of the q*k values into
    the [heads, buckets] table. None chooses the gather when traced for CPUs
    (`moetx.util.platform.traced_platform`), where it is faster: the gradient's contraction
    over q*k = 262144 positions with a [q, k, buckets] one-hot is a skinny dot XLA CPU runs
    slowly (512 x 512, 6 heads: fwd + bwd 13.4 -> 1.8 ms alone).
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    one_hot: bool | None = None

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool) -> Array:
        """query_positions: <int32>[q], key_positions: <int32>[k] -> bias [1, heads, q, k]."""
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, bidirectional, self.num_buckets, self.max_distance)
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                ("heads", "relpos_buckets"),
            ),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        one_hot = (self.one_hot if self.one_hot is not None
                   else platform_lib.traced_platform() != "cpu")
        if one_hot:
            # Shape: [heads, q, k] via a one-hot contraction (gather-free, shards over heads).
            onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
            bias = jnp.einsum("hb,qkb->hqk", jnp.asarray(table, self.dtype), onehot)
        else:
            # Shape: [heads, q, k]; the same values (a one-hot sum adds only zeros).
            bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)
        return bias[None]


def gelu_exact(x: Array) -> Array:
    """GELU without the tanh approximation, x Φ(x) = x (1 + erf(x / √2)) / 2 (torch's and timm's
    `nn.GELU()`). `jax.nn.gelu(approximate=False)` computes the same through erfc, which XLA's
    CPU backend runs 5.6x slower than erf (a [16, 32, 32, 256] float32 forward and backward:
    29.9 against 5.3 ms; the two agree to 5e-7)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": gelu_exact,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
    "linear": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class MlpBlock(nn.Module):
    """T5 MLP: `wi` (one activation) or gated `wi_0, wi_1` (product of two), then `wo`.

    `activations=('gelu', 'linear')` is T5.1.1's gated GELU; `('relu',)` is T5 1.0.
    """

    intermediate_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    intermediate_dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """x: [batch, length, embed] -> [batch, length, embed]."""
        outs = []
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = DenseGeneral(self.intermediate_dim, ("embed", "mlp"), self.dtype, name=name)(x)
            outs.append(get_activation(act)(h))
        h = functools.reduce(lambda a, b: a * b, outs)
        h = constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
            h, deterministic=deterministic
        )
        out = DenseGeneral(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(h)
        return constrain(out, ("batch", "length", "embed"))
