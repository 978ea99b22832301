"""Hugging Face checkpoint directories: `save_hf` writes config.json (with the weights' `dtype`),
generation_config.json and safetensors (sharded like `save_pretrained` above a size), `load_hf`
reads them back (or a legacy `pytorch_model.bin`) as numpy, offline. The tokenizer files are
`moetx.convert.hf.tokenizer`'s.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from moetx.util import torch_env
from moetx.convert.hf import families
from moetx.convert.hf import common
from moetx.convert.hf.common import StateDict, to_numpy

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _weight_files(directory: str) -> list[str]:
    """The weight files (and their indices) in `directory`, sorted."""
    names = [n for n in os.listdir(directory)
             if re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)", n)
             or n in (SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json")]
    return sorted(names)


def weights_dtype(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The name of the one floating-point dtype of `tensors` ('float32', 'bfloat16', ...), which
    config.json records as `dtype`; None when they mix several."""
    names = {np.dtype(t.dtype).name for t in tensors.values()
             if np.issubdtype(t.dtype, np.floating) or np.dtype(t.dtype).name == "bfloat16"}
    return names.pop() if len(names) == 1 else None


def save_hf(state_dict: Mapping[str, Any], hf_config, out_dir: str,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[str]:
    """Writes a checkpoint `from_pretrained(out_dir)` loads: config.json (its `dtype` the
    weights'), generation_config.json (the config's pad / EOS / BOS / decoder-start ids) and
    safetensors.

    One `model.safetensors` when the weights fit in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, as
    `save_pretrained` writes them.

    Args:
      state_dict: {HF key: array} (from moetx_to_hf_t5 / moetx_to_hf_llama).
      hf_config: the matching transformers config (`architectures` is filled in when unset so
        that Auto classes pick the right head).
      out_dir: created if needed.
      max_shard_bytes: largest shard size.
      overwrite: replace weight files already in `out_dir` (otherwise refuse, so that stale
        shards never mix with new ones).
    Returns:
      The paths written.
    """
    save_file = common.import_safetensors_numpy().save_file
    transformers = common.import_transformers()

    os.makedirs(out_dir, exist_ok=True)
    stale = _weight_files(out_dir)
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds weights {stale}; pass overwrite=True to "
                              "replace them or choose an empty directory.")
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    cfg = copy.deepcopy(hf_config)
    family = families.BY_MODEL_TYPE.get(cfg.model_type)
    if not getattr(cfg, "architectures", None) and family is not None:
        cfg.architectures = [family.architecture]
    tensors = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
    dtype = weights_dtype(tensors)
    if dtype is not None:
        cfg.dtype = dtype  # what `from_pretrained` loads the weights as
    cfg.save_pretrained(out_dir)
    transformers.GenerationConfig.from_model_config(cfg).save_pretrained(out_dir)
    written = [os.path.join(out_dir, "config.json"),
               os.path.join(out_dir, "generation_config.json")]

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        path = os.path.join(out_dir, SAFE_WEIGHTS_NAME)
        save_file(shards[0], path, metadata=metadata)
        return written + [path]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        written.append(os.path.join(out_dir, name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    path = os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME)
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return written + [path]


def load_hf(in_dir: str) -> tuple[StateDict, Any]:
    """Reads a local Hugging Face checkpoint directory: (state dict of numpy arrays, config).

    Reads `model.safetensors`, a sharded safetensors index, or (with torch installed) a legacy
    `pytorch_model.bin`. Never touches the network.
    """
    transformers = common.import_transformers()

    config = transformers.AutoConfig.from_pretrained(in_dir, local_files_only=True)
    load_file = common.import_safetensors_numpy().load_file

    single = os.path.join(in_dir, SAFE_WEIGHTS_NAME)
    index = os.path.join(in_dir, SAFE_WEIGHTS_INDEX_NAME)
    legacy = os.path.join(in_dir, "pytorch_model.bin")
    if os.path.exists(single):
        return dict(load_file(single)), config
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: StateDict = {}
        for name in files:
            state.update(load_file(os.path.join(in_dir, name)))
        return state, config
    if os.path.exists(legacy):
        torch = torch_env.import_torch()

        raw = torch.load(legacy, map_location="cpu", weights_only=True)
        return {k: to_numpy(v) for k, v in raw.items()}, config
    raise FileNotFoundError(f"No weights in {in_dir}: expected {SAFE_WEIGHTS_NAME}, "
                            f"{SAFE_WEIGHTS_INDEX_NAME} or pytorch_model.bin; found "
                            f"{sorted(os.listdir(in_dir))}.")


__all__ = ["SAFE_WEIGHTS_INDEX_NAME", "SAFE_WEIGHTS_NAME", "load_hf", "save_hf", "weights_dtype"]
