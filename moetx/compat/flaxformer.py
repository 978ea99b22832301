"""flaxformer's architecture configurables as records, and the moetx TransformerConfig they
describe.

flaxformer builds a model by dependency injection: `t5_architecture.EncoderDecoder` takes an
`encoder_factory` (a `moe_architecture.SparseEncoder`) whose `sparse_layer_factory` /
`layer_factory` make layers whose `attention`, `mlp` (a `dense.MlpBlock` or a
`moe_layers.MoeLayer` with an `expert` and a `router`) ... are themselves configured objects.
Here each of those names is a `Spec` that only records its arguments; `to_transformer_config`
walks the graph from the `EncoderDecoder` and reads off one `TransformerConfig` (with its
`MoeConfig`s), refusing in one line what moetx's stack cannot express.

Each spec lists the parameters moetx reads (`reads`), those it accepts without reading
(`free`: initialisers, logical axis names, dtypes of partitioning-only paths and other
settings with no effect on the computed function in moetx), and those it accepts only at one
value (`fixed`). Any other parameter name is refused.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from moetx.compat.errors import CompatError, refuse

_INITS = ("kernel_init", "bias_init", "embedding_init")


class Spec:
    """A flaxformer module's configuration, recorded (see the module docstring)."""

    reads: tuple[str, ...] = ()
    free: tuple[str, ...] = ()
    fixed: dict[str, Any] = {}
    defaults: dict[str, Any] = {}

    def __init__(self, **params):
        name = f"flaxformer's {type(self).__name__}"
        for key, value in params.items():
            if key in self.fixed and value != self.fixed[key]:
                raise refuse(f"{name}.{key} = {value!r}",
                             f"moetx's stack only has {key} = {self.fixed[key]!r}")
            if key not in self.reads and key not in self.free and key not in self.fixed:
                raise CompatError(f"{name} has no parameter {key!r} that moetx knows (it "
                                  f"reads {', '.join(self.reads)}).")
        self.params = {**self.defaults, **params}

    def get(self, key: str):
        return self.params.get(key)

    def require(self, key: str):
        if self.params.get(key) is None:
            raise CompatError(f"flaxformer's {type(self).__name__}.{key} is not set.")
        return self.params[key]


class LayerLayout(str, enum.Enum):
    """flaxformer's `moe_enums.LayerLayout`: where the sparse layers of a stack go."""

    BOTTOM = "bottom"
    MIDDLE = "middle"
    MIXED = "mixed"
    TOP = "top"


_LAYOUT_CONSTANTS_DONE = False


def register_layout_constants() -> None:
    """Registers `moe_enums.LayerLayout.MIXED` etc. as gin constants (what flaxformer's
    `gin.constants_from_enum` does), under flaxformer's module name."""
    global _LAYOUT_CONSTANTS_DONE
    if _LAYOUT_CONSTANTS_DONE:
        return
    import gin

    gin.constants_from_enum(LayerLayout, module="flaxformer.architectures.moe.moe_enums")
    _LAYOUT_CONSTANTS_DONE = True


def is_sparse_layer(layer: int, num_layers: int, num_sparse: int, layout) -> bool:
    """flaxformer's placement of the sparse layers of a stack."""
    layout = LayerLayout(layout)
    if layout is LayerLayout.BOTTOM:
        return layer < num_sparse
    if layout is LayerLayout.MIDDLE:
        return num_layers - num_sparse <= 2 * layer < num_layers + num_sparse
    if layout is LayerLayout.TOP:
        return layer >= num_layers - num_sparse
    if num_sparse == 0:
        return False
    if num_layers % num_sparse:
        raise CompatError(f"flaxformer's MIXED sparse layout needs the number of sparse layers "
                          f"({num_sparse}) to divide the number of layers ({num_layers}).")
    every = num_layers // num_sparse
    return layer % every == every - 1


# ----------------------------------------------------------------------------- components
class MlpBlock(Spec):
    reads = ("intermediate_dim", "activations", "intermediate_dropout_rate")
    free = _INITS + ("dtype", "input_axis_name", "intermediate_axis_name", "output_axis_name",
                     "data_sharding_constraints", "activation_partitioning_dims", "precision",
                     "intermediate_conv", "out_dim")
    fixed = {"use_bias": False, "final_dropout_rate": 0, "fuse_kernels": False}
    defaults = {"intermediate_dim": 2048, "activations": ("relu",),
                "intermediate_dropout_rate": 0.1}


class DenseGeneral(Spec):
    reads = ("features",)
    free = _INITS + ("dtype", "kernel_axis_names", "precision", "axis")
    fixed = {"use_bias": False}


class MultiHeadDotProductAttention(Spec):
    reads = ("num_heads", "head_dim", "dropout_rate")
    free = _INITS + ("dtype", "broadcast_dropout", "float32_logits", "precision",
                     "split_head_kernel", "kernels_to_fuse", "use_rotary_embedding")
    fixed = {"use_bias": False, "qkv_features": None, "out_features": None,
             "use_extra_logit": False, "rescale_logits": False}
    defaults = {"dropout_rate": 0.0}


class Embed(Spec):
    reads = ("num_embeddings", "features")
    free = _INITS + ("cast_input_dtype", "dtype", "attend_dtype", "one_hot", "name",
                     "axes")


class T5LayerNorm(Spec):
    reads = ("epsilon",)
    free = ("dtype", "scale_init")
    fixed = {"use_scale": True, "center_scale_at_zero": False}
    defaults = {"epsilon": 1e-6}


class RelativePositionBiases(Spec):
    reads = ("num_buckets", "max_distance", "num_heads")
    free = _INITS + ("dtype",)
    fixed = {"on_device_computation": False}


# ----------------------------------------------------------------------------------- MoE
class RouterWeights(Spec):
    free = _INITS + ("dtype", "axis", "kernel_axis_names", "reshape_kernel", "precision")
    fixed = {"use_bias": False}


class _Router(Spec):
    reads = ("num_selected_experts", "jitter_noise", "batch_prioritized_routing")
    free = ("router_weights", "dtype")
    fixed = {"ignore_padding_tokens": False}
    defaults = {"num_selected_experts": 1, "jitter_noise": 0.0,
                "batch_prioritized_routing": False}
    router_type, dispatch = "tokens_choose", "masked"


class TokensChooseMaskedRouter(_Router):
    pass


class TokensChooseScatterRouter(_Router):
    dispatch = "scatter"


class ExpertsChooseMaskedRouter(_Router):
    reads = ("jitter_noise",)
    router_type = "experts_choose"


class MoeLayer(Spec):
    reads = ("num_experts", "max_group_size", "train_capacity_factor", "eval_capacity_factor",
             "expert", "router", "min_expert_capacity")
    # flaxformer documents MoeLayer.dropout_rate but never applies it.
    free = ("num_expert_partitions", "num_model_partitions", "dtype", "dropout_rate",
            "input_hidden_dims_axes", "output_hidden_dims_axes", "split_params", "precision",
            "optimize_model_parallel_communications")
    fixed = {"strict_group_size": False}
    defaults = {"min_expert_capacity": 4}


# -------------------------------------------------------------------------- architectures
_LAYER_FREE = ("activation_partitioning_dims", "sow_intermediates", "name")
_LAYER_FIXED = {"scanned": False, "parallel": False, "relative_position_bias_factory": None}


class EncoderLayer(Spec):
    reads = ("attention", "mlp", "dropout_factory", "layer_norm_factory")
    free = _LAYER_FREE
    fixed = _LAYER_FIXED


class SparseEncoderLayer(EncoderLayer):
    reads = EncoderLayer.reads + ("extra_mlp",)


class DecoderLayer(Spec):
    reads = ("self_attention", "encoder_decoder_attention", "mlp", "dropout_factory",
             "layer_norm_factory")
    free = _LAYER_FREE
    fixed = _LAYER_FIXED


class SparseDecoderLayer(DecoderLayer):
    reads = DecoderLayer.reads + ("extra_mlp",)


_STACK_READS = ("num_layers", "num_sparse_layers", "sparse_layout", "sparse_layer_factory",
                "layer_factory", "layer_norm_factory", "shared_relative_position_bias_factory")
_STACK_FREE = ("dtype", "input_dropout_factory", "output_dropout_factory", "dropout_factory",
               "name")
_STACK_FIXED = {"position_embedder_factory": None, "scan_layers": False}


class SparseEncoder(Spec):
    reads = _STACK_READS
    free = _STACK_FREE + ("shared_token_embedder", "token_embedder_factory")
    fixed = _STACK_FIXED
    defaults = {"sparse_layout": LayerLayout.MIXED}


class SparseDecoder(Spec):
    reads = _STACK_READS + ("output_logits_factory",)
    free = _STACK_FREE + ("shared_token_embedder", "token_embedder_factory")
    fixed = _STACK_FIXED
    defaults = {"sparse_layout": LayerLayout.MIXED}


class EncoderDecoder(Spec):
    reads = ("encoder_factory", "decoder_factory", "shared_token_embedder_factory", "dtype")
    free = ("name",)
    fixed = {"scan_layers": False}
    defaults = {"dtype": "float32"}


# ------------------------------------------------------------------------------ to moetx
def _build(factory: Callable | Spec | None, what: str):
    """A factory (an un-called gin reference) called, or an already built spec."""
    if factory is None or isinstance(factory, Spec):
        return factory
    if not callable(factory):
        raise CompatError(f"flaxformer's {what} must be a configurable, got {factory!r}.")
    return factory()


def _expect(kind: type, value, what: str):
    if not isinstance(value, kind):
        raise refuse(f"{what} = {type(value).__name__}",
                     f"moetx's compatibility layer reads {kind.__name__} there")
    return value


def _same(values: dict[str, Any], setting: str, moetx_name: str):
    """The one value all places give a setting moetx has once; else a CompatError."""
    distinct = {repr(v): v for v in values.values()}
    if len(distinct) != 1:
        where = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise refuse(f"different {setting} across the model ({where})",
                     f"moetx has one {moetx_name}")
    return next(iter(distinct.values()))


def _dropout_rate(factory, what: str) -> float:
    """The rate of a dropout factory (flax's `linen.Dropout` configured by gin)."""
    if factory is None:
        return 0.0
    module = factory() if not hasattr(factory, "rate") else factory
    return float(getattr(module, "rate", 0.0))


class _Stack:
    """What one encoder or decoder stack says, read from its spec."""

    def __init__(self, spec: Spec, kind: str):
        self.kind = kind
        self.num_layers = int(spec.require("num_layers"))
        num_sparse = spec.get("num_sparse_layers")
        self.num_sparse = self.num_layers if num_sparse is None else int(num_sparse)
        layout = spec.get("sparse_layout") or LayerLayout.MIXED
        self.sparse = [is_sparse_layer(i, self.num_layers, self.num_sparse, layout)
                       for i in range(self.num_layers)]
        self.dense_layer = _build(spec.get("layer_factory"), f"{kind} layer_factory") \
            if not all(self.sparse) else None
        self.sparse_layer = _build(spec.get("sparse_layer_factory"),
                                   f"{kind} sparse_layer_factory") if any(self.sparse) else None
        norm = _build(spec.get("layer_norm_factory"), f"{kind} layer_norm_factory")
        self.epsilon = norm.get("epsilon") if norm is not None else 1e-6
        self.relpos = _build(spec.get("shared_relative_position_bias_factory"),
                             f"{kind} relative position biases")
        self.output_logits = spec.get("output_logits_factory")
        self.dropout = {f"{kind} {k}": _dropout_rate(spec.get(k), k)
                        for k in ("input_dropout_factory", "output_dropout_factory",
                                  "dropout_factory") if spec.get(k) is not None}

    def layers(self):
        return [layer for layer in (self.dense_layer, self.sparse_layer) if layer is not None]


def _mlp_settings(mlp: Spec, where: str, out: dict) -> None:
    out.setdefault("mlp_dim", {})[where] = mlp.get("intermediate_dim")
    out.setdefault("activations", {})[where] = tuple(mlp.get("activations"))
    out.setdefault("dropout", {})[f"{where} intermediate_dropout_rate"] = float(
        mlp.get("intermediate_dropout_rate"))


def _moe_config(layer: Spec, stack: _Stack, where: str, settings: dict, aux_loss_factor: float,
                router_z_loss_factor: float):
    from moetx.moe.layers import MoeConfig

    moe = _expect(MoeLayer, layer.get("mlp"), f"flaxformer's {where} sparse layer mlp")
    expert = _expect(MlpBlock, moe.require("expert"), f"flaxformer's {where} MoeLayer.expert")
    _mlp_settings(expert, f"{where} experts", settings)
    router = _expect(_Router, moe.require("router"), f"flaxformer's {where} MoeLayer.router")
    extra = layer.get("extra_mlp")
    if extra is not None:
        _mlp_settings(_expect(MlpBlock, extra, f"{where} extra_mlp"), f"{where} extra_mlp",
                      settings)
    every = stack.num_layers // max(stack.num_sparse, 1)
    pattern = [every > 0 and i % every == every - 1 for i in range(stack.num_layers)]
    if pattern != stack.sparse:
        raise refuse(f"flaxformer's {where} sparse layers at "
                     f"{[i for i, s in enumerate(stack.sparse) if s]}",
                     "moetx makes every k-th layer sparse (layers k-1, 2k-1, ...; "
                     "MoeConfig.sparse_every)")
    return MoeConfig(
        num_experts=int(moe.require("num_experts")),
        num_selected_experts=int(router.get("num_selected_experts") or 1),
        router_type=router.router_type, dispatch=router.dispatch,
        train_capacity_factor=float(moe.require("train_capacity_factor")),
        eval_capacity_factor=float(moe.require("eval_capacity_factor")),
        min_expert_capacity=int(moe.get("min_expert_capacity")),
        group_size=int(moe.require("max_group_size")),
        batch_prioritized_routing=bool(router.get("batch_prioritized_routing")),
        jitter_noise=float(router.get("jitter_noise") or 0.0),
        aux_loss_factor=float(aux_loss_factor),
        router_z_loss_factor=float(router_z_loss_factor),
        sparse_every=every, extra_mlp=extra is not None)


def to_transformer_config(architecture: Spec, aux_loss_factor: float = 0.0,
                          router_z_loss_factor: float = 0.0):
    """The `moetx.lm.transformer.TransformerConfig` a flaxformer `EncoderDecoder` describes
    (the loss factors come from T5X's MoE model). Raises CompatError for what moetx's stack
    cannot express."""
    from moetx.lm.transformer import TransformerConfig

    arch = _expect(EncoderDecoder, architecture, "the model's module")
    embed = _expect(Embed, _build(arch.require("shared_token_embedder_factory"),
                                  "shared_token_embedder_factory"), "the token embedder")
    encoder = _Stack(_expect(SparseEncoder, _build(arch.require("encoder_factory"),
                                                   "encoder_factory"), "the encoder"), "encoder")
    decoder = _Stack(_expect(SparseDecoder, _build(arch.require("decoder_factory"),
                                                   "decoder_factory"), "the decoder"), "decoder")
    settings: dict[str, dict] = {"dropout": {**encoder.dropout, **decoder.dropout}}
    heads, head_dims, relpos = {}, {}, {}
    moe_configs = {}
    for stack in (encoder, decoder):
        for layer in stack.layers():
            sparse = layer is stack.sparse_layer
            where = f"{stack.kind} {'sparse' if sparse else 'dense'} layers"
            attentions = ({"attention": layer.get("attention")} if stack.kind == "encoder" else
                          {"self_attention": layer.get("self_attention"),
                           "encoder_decoder_attention": layer.get("encoder_decoder_attention")})
            for name, att in attentions.items():
                att = _expect(MultiHeadDotProductAttention, att, f"{where} {name}")
                heads[f"{where} {name}"] = att.require("num_heads")
                head_dims[f"{where} {name}"] = att.require("head_dim")
                settings["dropout"][f"{where} {name} dropout_rate"] = float(
                    att.get("dropout_rate"))
            settings["dropout"][f"{where} residual dropout"] = _dropout_rate(
                layer.get("dropout_factory"), "dropout_factory")
            if sparse:
                moe_configs[stack.kind] = _moe_config(layer, stack, stack.kind, settings,
                                                      aux_loss_factor, router_z_loss_factor)
            else:
                _mlp_settings(_expect(MlpBlock, layer.get("mlp"), f"{where} mlp"), where,
                              settings)
        if stack.relpos is not None:
            relpos[stack.kind] = (stack.relpos.get("num_buckets"),
                                  stack.relpos.get("max_distance"))
    logits = decoder.output_logits
    if logits is not None:
        dense = _expect(DenseGeneral, _build(logits, "output_logits_factory"),
                        "the decoder's output_logits_factory")
        if dense.get("features") != embed.get("num_embeddings"):
            raise CompatError(f"flaxformer's output logits have {dense.get('features')} "
                              f"features but the vocabulary {embed.get('num_embeddings')}.")
    if not relpos:
        raise refuse("a flaxformer model without relative position biases",
                      "moetx's encoder-decoder uses T5's (TransformerConfig.position_embedding)")
    buckets, max_distance = _same(relpos, "relative position bias settings",
                                  "relative_attention_num_buckets / _max_distance")
    encoder_moe, decoder_moe = moe_configs.get("encoder"), moe_configs.get("decoder")
    if decoder_moe is None and encoder_moe is not None:
        import dataclasses

        decoder_moe = dataclasses.replace(encoder_moe, sparse_every=0)
    if encoder_moe is None and decoder_moe is not None:
        import dataclasses

        encoder_moe = dataclasses.replace(decoder_moe, sparse_every=0,
                                          batch_prioritized_routing=False)
    return TransformerConfig(
        vocab_size=int(embed.require("num_embeddings")),
        emb_dim=int(embed.require("features")),
        num_heads=int(_same(heads, "numbers of attention heads", "num_heads")),
        head_dim=int(_same(head_dims, "attention head sizes", "head_dim")),
        mlp_dim=int(_same(settings["mlp_dim"], "MLP widths (MLP_DIM, EXPERT_MLP_DIM)",
                          "mlp_dim for dense MLPs and experts")),
        num_encoder_layers=encoder.num_layers,
        num_decoder_layers=decoder.num_layers,
        dropout_rate=float(_same(settings["dropout"], "dropout rates",
                                 "dropout_rate (TransformerConfig.dropout_rate)")),
        mlp_activations=tuple(_same(settings["activations"], "MLP activations",
                                    "mlp_activations")),
        logits_via_embedding=logits is None,
        position_embedding="relative",
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=int(max_distance),
        norm_epsilon=float(_same({"encoder": encoder.epsilon, "decoder": decoder.epsilon},
                                 "layer norm epsilons", "norm_epsilon")),
        moe=decoder_moe,
        encoder_moe=encoder_moe if encoder_moe != decoder_moe else None,
        dtype=str(arch.get("dtype")),
    )
