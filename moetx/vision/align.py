"""ALIGN-style image-text dual encoder (Jia et al. 2021) on the shared trainer.

Image tower: any `moetx.vision.models` network whose head (width `embed_dim`) is the
projection. Text tower: a small pre-LN Transformer encoder over word ids, mean-pooled over the
non-padding tokens and projected to `embed_dim`. Both embeddings are L2-normalised; the logits
are `zimg @ ztxt^T * exp(t)` with a learnable log-scale `t` (big_vision's `two_towers`; ALIGN's
learnable temperature is exp(-t)). The loss is the symmetric in-batch softmax cross entropy with
label smoothing, each direction weighted 1/2 (HF `AlignModel` and big_vision):

  L = 1/2 mean_i CE(logits[i, :], y_i) + 1/2 mean_j CE(logits[:, j], y_j),
  y_i = (1 - ls) onehot(i) + ls / B.

Inside the trainer's jitted step the batch is a global array sharded over the data axis, and
XLA gathers the negatives itself, so the loss is the same however the batch is sharded.
`sharded_contrastive_loss` spells out the big_vision formulation (each device scores its own
rows against all-gathered embeddings) with `shard_map`, and the tests check both against the
single-device value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moetx.nn.layers import Dense
from moetx.vision import augment as augment_lib
from moetx.vision import models
from moetx.vision.model import ImageBatchMixin, softmax_cross_entropy

Array = jax.Array


# ------------------------------------------------------------------------------- losses
def contrastive_logits(zimg: Array, ztxt: Array, log_scale: Array) -> Array:
    return jnp.einsum("id,jd->ij", zimg, ztxt) * jnp.exp(log_scale)


def contrastive_loss(zimg: Array, ztxt: Array, log_scale: Array, label_smoothing: float = 0.1,
                     mask: Array | None = None) -> tuple[Array, Array, Array]:
    """Symmetric in-batch softmax loss.

    Args:
      zimg, ztxt: [B, D] (normalised) embeddings; row i of each is a matching pair.
      log_scale: the logits' log scale t (logits = cos * exp(t)).
      label_smoothing: target mass spread over the valid in-batch candidates.
      mask: [B] 1 for real pairs, 0 for padding (excluded as queries and as negatives).
    Returns:
      (loss = mean over real rows of (i2t + t2i) / 2, i2t [B], t2i [B] per-row losses).
    """
    b = zimg.shape[0]
    mask = jnp.ones((b,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    logits = contrastive_logits(zimg, ztxt, log_scale).astype(jnp.float32)
    valid = (mask[:, None] * mask[None, :]) > 0
    targets = (jnp.eye(b) * (1.0 - label_smoothing) + label_smoothing / n) * mask[None, :]
    neg = jnp.finfo(jnp.float32).min / 2
    i2t = softmax_cross_entropy(jnp.where(valid, logits, neg), targets) * mask
    t2i = softmax_cross_entropy(jnp.where(valid, logits.T, neg), targets) * mask
    return 0.5 * jnp.sum(i2t + t2i) / n, i2t, t2i


def sharded_contrastive_loss(zimg: Array, ztxt: Array, log_scale: Array, mesh: Mesh,
                             axis: str = "data", label_smoothing: float = 0.1) -> Array:
    """The same loss computed per device: each shard scores its rows against the all-gathered
    embeddings of the other tower (targets offset by the shard's position), then the per-shard
    sums are added across devices."""
    def local(zi, zt, t):
        all_i = jax.lax.all_gather(zi, axis, tiled=True)
        all_t = jax.lax.all_gather(zt, axis, tiled=True)
        b, n_local = all_t.shape[0], zi.shape[0]
        rows = jax.lax.axis_index(axis) * n_local + jnp.arange(n_local)
        targets = jax.nn.one_hot(rows, b) * (1.0 - label_smoothing) + label_smoothing / b
        i2t = softmax_cross_entropy(contrastive_logits(zi, all_t, t), targets)
        t2i = softmax_cross_entropy(contrastive_logits(zt, all_i, t), targets)
        return jax.lax.psum(jnp.sum(i2t + t2i), axis) * 0.5 / b

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=P(),
                         check_vma=False)(zimg, ztxt, log_scale)


# ------------------------------------------------------------------------------- towers
class TextEncoder(nn.Module):
    """Pre-LN Transformer encoder over word ids (0 = padding) -> [B, embed_dim]."""

    vocab_size: int
    embed_dim: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    max_length: int = 64

    @nn.compact
    def __call__(self, tokens: Array, *, train: bool = False) -> Array:
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"Text of {tokens.shape[1]} tokens exceeds max_length "
                             f"{self.max_length}.")
        valid = tokens > 0
        x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (self.max_length, self.width))
        x = x + pos[None, :tokens.shape[1]]
        attn_mask = nn.make_attention_mask(valid, valid)
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"block{i}_ln1")(x)
            x = x + nn.MultiHeadDotProductAttention(
                self.num_heads, name=f"block{i}_attn")(y, y, mask=attn_mask)
            y = nn.LayerNorm(name=f"block{i}_ln2")(x)
            y = Dense(self.mlp_dim, name=f"block{i}_mlp_in")(y)
            x = x + Dense(self.width, name=f"block{i}_mlp_out")(nn.gelu(y))
        x = nn.LayerNorm(name="final_ln")(x)
        w = valid[..., None].astype(x.dtype)
        pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return Dense(self.embed_dim, name="projection")(pooled)


class DualEncoder(nn.Module):
    """Image and text towers, L2-normalised embeddings and the learnable log-scale `t`."""

    image_model: nn.Module
    text_model: TextEncoder
    temperature_init: float = 0.1

    @nn.compact
    def __call__(self, images: Array, text: Array, *, train: bool = False):
        zimg, _ = self.image_model(images, train=train)
        ztxt = self.text_model(text, train=train)
        t = self.param("t", nn.initializers.constant(math.log(1.0 / self.temperature_init)),
                       ())
        normalize = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)  # noqa
        return normalize(zimg), normalize(ztxt), t


# ------------------------------------------------------------------------------ wrapper
@gin.configurable
@dataclasses.dataclass
class DualEncoderModel(ImageBatchMixin):
    """The trainer-facing wrapper (batch: `image`, `text` word ids, `mask`).

    Attributes:
      image_model_name: registry name of the image tower (its head is the projection).
      vocab_size: text vocabulary size (id 0 = padding).
      embed_dim: shared embedding width (ALIGN: 640).
      text_width, text_depth, text_heads: text tower size.
      temperature_init: initial temperature (exp(-t)).
      label_smoothing: of the contrastive targets (ALIGN: 0.1).
      image_size, augment, mean, std: image preprocessing, as for classification.
      retrieval_by_label: the batch also carries `label`, and image->text retrieval counts as
        correct when the retrieved caption has the query's label (otherwise: the same text).

    Metrics: `loss` (mean contrastive loss per pair), `accuracy` (top-1 image->text retrieval)
    and the number of `pairs`.
    """

    image_model_name: str = "tiny/s"
    vocab_size: int = 32
    embed_dim: int = 32
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    temperature_init: float = 0.1
    label_smoothing: float = 0.1
    image_size: int | None = None
    augment: augment_lib.Augment | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    image_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    retrieval_by_label: bool = False

    count_unit = "pairs"

    def __post_init__(self):
        self.module = DualEncoder(
            models.create(self.image_model_name, self.embed_dim, **dict(self.image_overrides)),
            TextEncoder(self.vocab_size, self.embed_dim, self.text_width, self.text_depth,
                        self.text_heads, 2 * self.text_width),
            self.temperature_init)

    @property
    def feature_converter(self):
        from moetx.vision import tasks

        return tasks.VisionFeatureConverter(
            ("image", "text", "label") if self.retrieval_by_label else ("image", "text"))

    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, Any]):
        image = task_feature_lengths.get("image")
        text = task_feature_lengths.get("text")
        if not isinstance(image, (tuple, list)) or not isinstance(text, int):
            raise ValueError(f"The dual encoder needs TASK_FEATURE_LENGTHS = {{'image': (H, W, "
                             f"C), 'text': L}}, got {task_feature_lengths!r}.")
        shapes = {"image": (batch_size,) + tuple(image), "text": (batch_size, text),
                  "mask": (batch_size,)}
        if self.retrieval_by_label:
            shapes["label"] = (batch_size,)
        return shapes

    def get_initial_variables(self, rng, input_shapes):
        images = self.preprocess(jnp.zeros((1,) + tuple(input_shapes["image"][1:]), jnp.uint8))
        text = jnp.ones((1,) + tuple(input_shapes["text"][1:]), jnp.int32)
        variables = dict(self.module.init({"params": rng, "dropout": rng}, images, text))
        variables.setdefault("batch_stats", {})
        return variables

    def embed(self, params, model_state, batch, train: bool, rng=None):
        """(zimg, ztxt, t, new model state)."""
        k_aug, k_drop = jax.random.split(rng) if rng is not None else (None, None)
        images = self.preprocess(batch["image"], k_aug, train)
        variables = {"params": params, **(model_state or {"batch_stats": {}})}
        if not train:
            return (*self.module.apply(variables, images, batch["text"]), model_state)
        rngs = {"dropout": k_drop if k_drop is not None else jax.random.PRNGKey(0)}
        out, mutated = self.module.apply(variables, images, batch["text"], train=True,
                                         rngs=rngs, mutable=list(self.state_collections))
        return (*out, {c: mutated.get(c, {}) for c in self.state_collections})

    def _sums(self, zimg, ztxt, t, batch, label_smoothing, factor):
        mask = batch["mask"].astype(jnp.float32)
        _, i2t, t2i = contrastive_loss(zimg, ztxt, t, label_smoothing, mask)
        total = 0.5 * jnp.sum(i2t + t2i)
        # Top-1 image->text retrieval is correct when the retrieved caption is the pair's own
        # text or an identical one (or, with labels, one with the same label).
        logits = jnp.where(mask[None, :] > 0, contrastive_logits(zimg, ztxt, t), -jnp.inf)
        best = jnp.argmax(logits, axis=1)
        if self.retrieval_by_label:
            hit = batch["label"][best] == batch["label"]
        else:
            hit = jnp.all(batch["text"][best] == batch["text"], axis=1)
        return total / factor, {"loss_sum": total, "correct": jnp.sum(hit * mask),
                                "count": jnp.sum(mask)}

    def loss_fn(self, params, batch, dropout_rng, weights, factor, num_microbatches=1,
                model_state=None):
        """The symmetric contrastive loss over the (micro)batch's pairs, divided by the full
        batch's pair count; (loss, (metric sums, new model state))."""
        del weights, num_microbatches  # The mask is the weight.
        zimg, ztxt, t, new_state = self.embed(params, model_state, batch, True, dropout_rng)
        loss, sums = self._sums(zimg, ztxt, t, batch, self.label_smoothing, factor)
        sums["loss"] = loss
        return loss, (sums, new_state)

    def eval_fn(self, params, batch, model_state=None):
        """Contrastive loss (no smoothing) and top-1 image->text retrieval over the real pairs:
        `accuracy` is the retrieval accuracy."""
        zimg, ztxt, t, _ = self.embed(params, model_state, batch, False)
        _, sums = self._sums(zimg, ztxt, t, batch, 0.0, 1.0)
        return sums

