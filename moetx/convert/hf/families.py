"""The registry of Hugging Face families: one `Family` record per family moetx converts.

    T5 (t5)                                  encoder-decoder, dense
    SwitchTransformers (switch_transformers) encoder-decoder, MoE
    Llama (llama)                            decoder-only, dense
    Mixtral (mixtral)                        decoder-only, MoE

A Hugging Face checkpoint is read by the family its config's `model_type` names
(`BY_MODEL_TYPE`); a moetx model is written as the family whose `accepts` its config satisfies
(`for_config`). To add a family, write its module (layouts, config and weight converters, and a
`FAMILY` record, as `t5.py` does) and list its record in `FAMILIES`.
"""

from __future__ import annotations

import types
from typing import Mapping

from moetx.lm.transformer import TransformerConfig
from moetx.convert.hf import llama, mixtral, switch, t5
from moetx.convert.hf.common import Family

FAMILIES: tuple[Family, ...] = (t5.FAMILY, switch.FAMILY, llama.FAMILY, mixtral.FAMILY)
BY_MODEL_TYPE: Mapping[str, Family] = types.MappingProxyType(
    {f.model_type: f for f in FAMILIES})


def for_config(cfg: TransformerConfig) -> Family:
    """The family a moetx model of config `cfg` is written as (exactly one accepts any config:
    encoder-decoder or decoder-only, with or without MoE layers)."""
    matches = [f for f in FAMILIES if f.accepts(cfg)]
    if len(matches) != 1:
        raise ValueError(f"Expected exactly one Hugging Face family for this config, found "
                         f"{[f.model_type for f in matches]}; each family's `accepts` must "
                         "cover its own kind of model only.")
    return matches[0]


__all__ = ["BY_MODEL_TYPE", "FAMILIES", "for_config"]
