"""gMLP for images (Liu et al. 2021, "Pay Attention to MLPs"), NHWC, Flax Linen.

A gMLP block is a channel MLP whose hidden activations pass through a *spatial gating unit*
(SGU) before the output projection:

    z = GELU(LN(x) W_in)                 # [B, N, F], F = ffn_ratio * width
    u, v = split(z)                      # two halves of F/2 channels
    v = LN(v)                            # the gate half only
    v = W_s v + b_s                      # a linear map over the N tokens, shared across channels
    x = x + (u * v) W_out

W_s is initialised near zero (normal, std 1e-6) and b_s to one, so at init u * v == u and each
block starts as a plain feed-forward layer; the token mixing is learned from there. For causal
(language-model) use the token map must not look ahead: `causal=True` keeps only the entries of
W_s that read token n into token m with n <= m.

Variants follow the paper's Table 1 (patch 16, 30 blocks, d_ffn = 6 d) and timm's
`gmlp_{ti16,s16,b16}_224`, whose parameter counts they reproduce exactly (5,867,328 /
19,422,656 / 73,075,392 at 224x224, 1000 classes). Stochastic-depth rates are the paper's
survival probabilities 1.0 / 0.95 / 0.8 (drop 0 / 0.05 / 0.2 at the last block, linear in depth).
`from_timm` converts a timm `gmlp_*` state dict into these variables.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moetx.nn.layers import Dense, dense_contract, gelu_exact
from moetx.vision.models import common

Array = jax.Array

# Paper Table 1 (and timm's gmlp_*16_224): width d, 30 blocks, d_ffn = 6 d, patch 16.
VARIANTS: dict[str, dict[str, Any]] = {
    "ti": dict(width=128, depth=30, ffn_ratio=6, patch_size=16, stochastic_depth=0.0),
    "s": dict(width=256, depth=30, ffn_ratio=6, patch_size=16, stochastic_depth=0.05),
    "b": dict(width=512, depth=30, ffn_ratio=6, patch_size=16, stochastic_depth=0.2),
    # A smoke-test size; not from the paper.
    "tiny": dict(width=32, depth=2, ffn_ratio=4, patch_size=4, stochastic_depth=0.0),
}

# timm's epsilons: 1e-6 for the block and final norms, torch's default 1e-5 inside the SGU.
_BLOCK_LN_EPS = 1e-6
_GATE_LN_EPS = 1e-5


class SpatialGatingUnit(nn.Module):
    """u * (W_s LN(v) + b_s) over the token axis, with (u, v) the two channel halves of z.

    Attributes:
      causal: mask W_s so that output token m reads only input tokens n <= m.
      init_std: std of the normal init of W_s (near zero: the unit starts as the identity on u).
    """

    causal: bool = False
    init_std: float = 1e-6

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """z: <float>[B, N, F] with F even -> <float>[B, N, F/2]."""
        if z.shape[-1] % 2:
            raise ValueError(
                f"SpatialGatingUnit splits channels in two halves; got {z.shape[-1]} channels. "
                "Use an even d_ffn."
            )
        n = z.shape[1]
        u, v = jnp.split(z, 2, axis=-1)
        v = nn.LayerNorm(epsilon=_GATE_LN_EPS, name="norm")(v)
        # kernel[n, m]: weight from input token n to output token m (the [in, out] Dense layout;
        # the causal mask keeps its upper triangle = a lower-triangular W in [out, in] layout).
        kernel = self.param("kernel", nn.initializers.normal(self.init_std), (n, n))
        bias = self.param("bias", nn.initializers.ones, (n,))
        if self.causal:
            kernel = kernel * jnp.triu(jnp.ones((n, n), kernel.dtype))  # keep n <= m
        # Over the token axis as a [.., N] x [N, M] contraction (tokens last), so that all three
        # of its matmuls, forward and backward, take XLA's fast path on CPUs (see
        # `dense_contract`); the same function as einsum('bnc,nm->bmc'). Tokens first instead
        # ([N, B*C], the kernel on the left, its gradient written out so that all three
        # matmuls stay on YNNPACK) ran gMLP-S's step 0.7-3.6% faster in three A/Bs
        # (2026-12-08), within this machine's spread; not kept.
        v = jnp.swapaxes(dense_contract(jnp.swapaxes(v, 1, 2), kernel), 1, 2)
        v = v + bias[None, :, None]
        return u * v


class GmlpBlock(nn.Module):
    """x + DropPath(W_out SGU(GELU(W_in LN(x)))).

    Attributes:
      ffn_dim: hidden width F before the SGU halves it.
      causal: passed to the SGU.
      drop_path_rate: stochastic-depth rate of this block.
    """

    ffn_dim: int
    causal: bool = False
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: <float>[B, N, D] -> <float>[B, N, D]."""
        y = nn.LayerNorm(epsilon=_BLOCK_LN_EPS, name="norm")(x)
        y = Dense(self.ffn_dim, name="fc1")(y)
        y = gelu_exact(y)
        y = SpatialGatingUnit(causal=self.causal, name="gate")(y)
        y = Dense(x.shape[-1], name="fc2")(y)
        return x + common.DropPath(self.drop_path_rate)(y, train=train)


class Gmlp(nn.Module):
    """gMLP image classifier: patch embedding, `depth` gMLP blocks, LN, mean pool, linear head.

    Attributes:
      num_classes: classifier width (0: no head, logits are the pooled features).
      width: token width d.
      depth: number of blocks.
      ffn_ratio: d_ffn / d.
      patch_size: side of the square, non-overlapping patches.
      stochastic_depth: drop rate of the last block; block i uses rate * i / (depth - 1).
      causal: causal spatial gating (for sequence models; images use False).
    """

    num_classes: int
    width: int
    depth: int
    ffn_ratio: int
    patch_size: int
    stochastic_depth: float = 0.0
    causal: bool = False

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """images: <float32>[B, H, W, C], H and W multiples of `patch_size`.

        Returns (logits <float32>[B, num_classes], out) with out['stem'] <[B, H/p, W/p, d]>,
        out['blocks'] <[B, N, d]> (after the final LN) and out['pre_logits'] <[B, d]>.
        """
        h, w = images.shape[1:3]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"gMLP needs image sides divisible by patch_size={p}; got {h}x{w}. "
                "Resize or crop the images."
            )
        out: dict[str, Array] = {}
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="stem")(images)
        out["stem"] = x
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # Shape: [B, N, D], tokens in row-major order.
        for i in range(self.depth):
            rate = self.stochastic_depth * i / max(self.depth - 1, 1)
            x = GmlpBlock(
                self.ffn_ratio * self.width, self.causal, rate, name=f"blocks_{i}"
            )(x, train=train)
        x = nn.LayerNorm(epsilon=_BLOCK_LN_EPS, name="norm")(x)
        out["blocks"] = x
        x = out["pre_logits"] = jnp.mean(x, axis=1)
        if self.num_classes:
            x = Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
        out["logits"] = x
        return x, out


def create(variant: str, num_classes: int, **overrides: Any) -> Gmlp:
    """The named gMLP variant ('ti', 's', 'b', 'tiny'); `overrides` replace its fields."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown gMLP variant {variant!r}; known: {sorted(VARIANTS)}.")
    return Gmlp(num_classes=num_classes, **{**VARIANTS[variant], **overrides})


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables {'params': ...} from a timm `gmlp_*` state dict (torch tensors or arrays).

    timm stores Linear weights as [out, in] (transposed here to Flax's [in, out]), the patch
    embedding as [D, C, p, p] (to [p, p, C, D]) and the SGU token map `gate.proj.weight` as
    [m_out, n_in] (to the [n_in, m_out] kernel used above).
    """

    def arr(key: str) -> np.ndarray:
        if key not in state_dict:
            raise KeyError(f"timm gMLP state dict lacks {key!r}; is this a timm gmlp_* model?")
        t = state_dict[key]
        t = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        return t.astype(np.float32)

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": arr(f"{prefix}.weight").T, "bias": arr(f"{prefix}.bias")}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": arr(f"{prefix}.weight"), "bias": arr(f"{prefix}.bias")}

    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    params: dict[str, Any] = {
        "stem": {
            "kernel": arr("stem.proj.weight").transpose(2, 3, 1, 0),
            "bias": arr("stem.proj.bias"),
        },
        "norm": norm("norm"),
    }
    for i in range(depth):
        pre = f"blocks.{i}"
        params[f"blocks_{i}"] = {
            "norm": norm(f"{pre}.norm"),
            "fc1": dense(f"{pre}.mlp_channels.fc1"),
            "gate": {
                "norm": norm(f"{pre}.mlp_channels.gate.norm"),
                "kernel": arr(f"{pre}.mlp_channels.gate.proj.weight").T,
                "bias": arr(f"{pre}.mlp_channels.gate.proj.bias"),
            },
            "fc2": dense(f"{pre}.mlp_channels.fc2"),
        }
    if "head.weight" in state_dict:
        params["head"] = dense("head")
    return {"params": jax.tree.map(jnp.asarray, params)}
