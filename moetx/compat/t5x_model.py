"""T5X's model-file names: `network.T5Config` / `network.Transformer` (t5x/examples/t5),
`models.EncoderDecoderModel`, `contrib.moe.models.MoeEncoderDecoderModel` and
`adafactor.Adafactor`, mapped onto moetx's TransformerConfig, model wrappers and Adafactor.

A T5X model carries its optimizer (`optimizer_def`) and vocabularies; moetx's model wrappers
do not, so `EncoderDecoderModel` here returns a `T5XModel`: the moetx model with those two
beside it, which the T5X script functions (`scripts`) unpack.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

from moetx.compat.errors import CompatError, refuse


# ------------------------------------------------------------------------------- network
@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5X's `t5x.examples.t5.network.T5Config` (same fields and defaults).

    The example network is T5.1.1's: relative position biases of 32 buckets up to distance
    128, RMS layer norms with epsilon 1e-6, tied logits divided by sqrt(emb_dim), which is
    what moetx's `TransformerConfig` does with those settings. moetx computes attention
    softmax in float32 whatever `float32_attention_logits` says.
    """

    vocab_size: int = 32128
    dtype: Any = "float32"
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: Sequence[str] = ("relu",)
    dropout_rate: float = 0.1
    logits_via_embedding: bool = False
    float32_attention_logits: bool = False

    def to_moetx(self):
        """The `moetx.lm.transformer.TransformerConfig` of this network."""
        from moetx.lm.transformer import TransformerConfig

        return TransformerConfig(
            vocab_size=self.vocab_size, emb_dim=self.emb_dim, num_heads=self.num_heads,
            head_dim=self.head_dim, mlp_dim=self.mlp_dim,
            num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers, dropout_rate=self.dropout_rate,
            mlp_activations=tuple(self.mlp_activations),
            logits_via_embedding=self.logits_via_embedding, tied_logits_rescale=True,
            position_embedding="relative", relative_attention_num_buckets=32,
            relative_attention_max_distance=128, norm_epsilon=1e-6,
            dtype=dtype_name(self.dtype))


def dtype_name(dtype) -> str:
    """'bfloat16' for 'bfloat16', jnp.bfloat16 or numpy's dtype."""
    if isinstance(dtype, str):
        return dtype
    import numpy as np

    return np.dtype(dtype).name


class Transformer:
    """T5X's `network.Transformer(config)`: here, the moetx stack configuration."""

    def __init__(self, config: T5Config):
        if not isinstance(config, T5Config):
            raise CompatError(f"network.Transformer.config must be a network.T5Config, got "
                              f"{type(config).__name__}.")
        self.config = config

    def to_moetx(self, aux_loss_factor: float = 0.0, router_z_loss_factor: float = 0.0):
        del aux_loss_factor, router_z_loss_factor  # a dense network
        return self.config.to_moetx()


# --------------------------------------------------------------------------------- models
class T5XModel(NamedTuple):
    """A T5X model as moetx runs it: the moetx wrapper, T5X's optimizer definition and the
    model's output vocabulary (used only to check it against the task's)."""

    model: Any
    optimizer: Any
    vocabulary: Any


def _stack_config(module, aux_loss_factor: float, router_z_loss_factor: float):
    from moetx.compat import flaxformer

    if isinstance(module, Transformer):
        return module.to_moetx()
    if isinstance(module, flaxformer.Spec):
        return flaxformer.to_transformer_config(module, aux_loss_factor, router_z_loss_factor)
    raise refuse(f"a T5X model whose module is {type(module).__module__}."
                 f"{type(module).__name__} (a real T5X / flaxformer class; moetx serves those "
                 f"names only where no real t5x / flaxformer is installed)",
                 "uninstall them to run T5X gin files with moetx, or use moetx's own gin "
                 "files (e.g. models/t5_1_1_small.gin)")


def _model(module, input_vocabulary, output_vocabulary, optimizer_def, decode_fn,
           feature_converter_cls, label_smoothing, z_loss, loss_normalizing_factor,
           aux_loss_factor=0.0, router_z_loss_factor=0.0, **unsupported) -> T5XModel:
    from moetx.lm import models

    for name, value in unsupported.items():
        if value is not None:
            raise refuse(f"models.EncoderDecoderModel.{name}",
                         "moetx's EncoderDecoderModel decodes with its own decoding.py "
                         "(greedy, sampling or beam search set in the infer run)")
    if decode_fn is not None or feature_converter_cls is not None:
        which = "decode_fn" if decode_fn is not None else "feature_converter_cls"
        raise refuse(f"models.EncoderDecoderModel.{which}",
                     "moetx's EncoderDecoderModel uses seqio.EncDecFeatureConverter and its "
                     "own decoding (moetx.lm.infer.infer's num_beams / temperature)")
    if input_vocabulary is not None and output_vocabulary is not None \
            and vocab_key(input_vocabulary) != vocab_key(output_vocabulary):
        raise refuse("different input and output vocabularies",
                      "moetx's encoder-decoder shares one embedding")
    config = _stack_config(module, aux_loss_factor, router_z_loss_factor)
    model = models.EncoderDecoderModel(
        config=config, z_loss=z_loss, label_smoothing=label_smoothing,
        loss_normalizing_factor=_loss_normalizing_factor(loss_normalizing_factor))
    return T5XModel(model, optimizer_def, output_vocabulary)


def _loss_normalizing_factor(value):
    """T5X's factor: None, a number, a `SpecialLossNormalizingFactor` name (as a string)."""
    name = getattr(value, "name", None)
    return name if isinstance(name, str) and not isinstance(value, str) else value


def vocab_key(vocabulary) -> tuple:
    """A cheap identity of a SeqIO vocabulary that reads no file (gs:// paths stay unread)."""
    path = getattr(vocabulary, "sentencepiece_model_file", None) \
        or getattr(vocabulary, "_sentencepiece_model_file", None)
    return (type(vocabulary).__name__, path, getattr(vocabulary, "extra_ids", None))


def EncoderDecoderModel(module=None, input_vocabulary=None, output_vocabulary=None,  # noqa: N802
                        optimizer_def=None, decode_fn=None, feature_converter_cls=None,
                        label_smoothing: float = 0.0, z_loss: float = 0.0,
                        loss_normalizing_factor=None, default_decoder_params=None) -> T5XModel:
    """T5X's `models.EncoderDecoderModel` -> `moetx.lm.models.EncoderDecoderModel`."""
    return _model(module, input_vocabulary, output_vocabulary, optimizer_def, decode_fn,
                  feature_converter_cls, label_smoothing, z_loss, loss_normalizing_factor,
                  default_decoder_params=default_decoder_params)


def MoeEncoderDecoderModel(module=None, input_vocabulary=None,  # noqa: N802
                           output_vocabulary=None, optimizer_def=None, decode_fn=None,
                           feature_converter_cls=None, label_smoothing: float = 0.0,
                           z_loss: float = 0.0, loss_normalizing_factor=None,
                           aux_loss_factor: float = 0.0,
                           router_z_loss_factor: float = 0.0) -> T5XModel:
    """T5X's `contrib.moe.models.MoeEncoderDecoderModel` -> moetx's EncoderDecoderModel with
    the MoeConfig the flaxformer architecture describes (these loss factors in it)."""
    return _model(module, input_vocabulary, output_vocabulary, optimizer_def, decode_fn,
                  feature_converter_cls, label_smoothing, z_loss, loss_normalizing_factor,
                  aux_loss_factor, router_z_loss_factor)


# ------------------------------------------------------------------------------ Adafactor
_STANDARD_FACTOR_RULES = "t5x.adafactor.standard_logical_factor_rules()"
_MOE_FACTOR_RULES = "t5x.contrib.moe.adafactor_utils.logical_factor_rules()"


def standard_logical_factor_rules() -> str:
    """T5X's standard factor rules: moetx's Adafactor applies the same (its FACTOR_RULES)."""
    return _STANDARD_FACTOR_RULES


def logical_factor_rules() -> str:
    """T5X's MoE factor rules (experts a batch axis, expert_mlp a column): moetx's
    FACTOR_RULES include them."""
    return _MOE_FACTOR_RULES


@dataclasses.dataclass(frozen=True)
class Adafactor:
    """T5X's `adafactor.Adafactor` -> `moetx.trainer.optimizers.adafactor` (same algorithm and
    defaults). The learning rate comes from the trainer's `learning_rate_fn`, as in T5X."""

    learning_rate: float | None = None
    factored: bool = True
    multiply_by_parameter_scale: Any = True
    beta1: float | None = None
    decay_rate: float = 0.8
    step_offset: int = 0
    clipping_threshold: float | None = 1.0
    weight_decay_rate: float | None = None
    min_dim_size_to_factor: int = 128
    epsilon1: float = 1e-30
    epsilon2: float = 1e-3
    dtype_momentum: Any = "float32"
    factor_map: Any = None
    logical_factor_rules: Any = None
    weight_decay_rate_lr_exponent: float | None = None
    global_norm_clip_threshold: float | None = None
    max_parameter_scale: float | None = None
    skip_nan_updates: bool = False

    def __post_init__(self):
        fixes = {
            "beta1": (None, "moetx's Adafactor keeps no momentum; for momentum use "
                            "make_optimizer.optimizer_fn = @adamw"),
            "step_offset": (0, "moetx's Adafactor counts decay steps from 0"),
            "weight_decay_rate": (None, "moetx's adafactor.weight_decay_rate scales by the "
                                        "learning rate, T5X's does not"),
            "weight_decay_rate_lr_exponent": (None, "no such setting in moetx's Adafactor"),
            "global_norm_clip_threshold": (None, "moetx's Adafactor clips by update RMS "
                                                 "(clipping_threshold)"),
            "max_parameter_scale": (None, "no such setting in moetx's Adafactor"),
            "factor_map": (None, "moetx's Adafactor factors by logical axes (FACTOR_RULES)"),
            "skip_nan_updates": (False, "use train.divergence_policy = 'skip'"),
        }
        for name, (ok, fix) in fixes.items():
            if getattr(self, name) != ok:
                raise refuse(f"adafactor.Adafactor.{name} = {getattr(self, name)!r}", fix)
        if not isinstance(self.multiply_by_parameter_scale, bool):
            raise refuse("a per-parameter adafactor.Adafactor.multiply_by_parameter_scale",
                          "moetx's adafactor.multiply_by_parameter_scale is one bool")
        if self.logical_factor_rules not in (None, _STANDARD_FACTOR_RULES, _MOE_FACTOR_RULES):
            raise refuse("custom adafactor.Adafactor.logical_factor_rules",
                         "moetx's Adafactor uses moetx.trainer.optimizers.FACTOR_RULES")

    def optimizer_fn(self):
        """`moetx.trainer.optimizers.adafactor` with these settings (schedule, param_axes
        left to `make_optimizer`)."""
        from moetx.trainer import optimizers

        return functools.partial(
            optimizers.adafactor, decay_rate=self.decay_rate,
            clipping_threshold=self.clipping_threshold, epsilon1=self.epsilon1,
            epsilon2=self.epsilon2,
            multiply_by_parameter_scale=self.multiply_by_parameter_scale,
            min_dim_size_to_factor=self.min_dim_size_to_factor, factored=self.factored)
