"""Whole state dicts between the decoder's own layout and Hugging Face's names and shapes.

The decoder fuses ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj`` and ``gate_proj``/``up_proj`` into
``gate_up_proj`` (row blocks, in that order) and has no ``model.`` prefix. Everything that leaves a trainer
(checkpoints, HF exports, weight sync to engines) uses HF's layout, so a checkpoint does not depend on which
model code trained it. Splitting gives views, no copies; joining concatenates.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_PARTS = {part: (fused, index) for fused, parts in _FUSED.items() for index, part in enumerate(parts)}


def split_sizes(model) -> dict[str, list[int]]:
    """Rows of each part of a fused projection: ``qkv_proj`` -> [q, kv, kv], ``gate_up_proj`` -> [ffn, ffn]."""
    attention = model.layers[0].self_attn
    intermediate = model.layers[0].mlp.down_proj.in_features
    return {"self_attn.qkv_proj": [attention.q_size, attention.kv_size, attention.kv_size],
            "mlp.gate_up_proj": [intermediate, intermediate]}


def to_hf(state: Mapping[str, Tensor], sizes: dict[str, list[int]], tied: bool) -> dict[str, Tensor]:
    """The decoder's state dict -> HF names (views into the fused tensors). A tied model gets no
    ``lm_head.weight``: HF's checkpoints of tied models leave it out too."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match is None:
            if not (tied and name == "lm_head.weight"):
                out[name if name == "lm_head.weight" else f"model.{name}"] = tensor
            continue
        index, rest = match.groups()
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            for part, piece in zip(_FUSED[module], tensor.split(sizes[module], dim=0)):
                out[f"model.layers.{index}.{part}.{kind}"] = piece
        else:
            out[f"model.{name}"] = tensor
    return out


def from_hf(state: Mapping[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """HF-named tensors -> the decoder's state dict (fused projections concatenated). Raises KeyError naming the
    first part a fused projection lacks. ``lm_head.weight`` of a tied model is dropped (it is the embedding)."""
    out: dict[str, Tensor] = {}
    pending: dict[tuple[str, str, str], dict[int, Tensor]] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if not tied:
                out[name] = tensor
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            out[name.removeprefix("model.")] = tensor
            continue
        index, rest = match.groups()
        module, _, kind = rest.rpartition(".")
        if module in _PARTS:
            fused, position = _PARTS[module]
            pending.setdefault((index, fused, kind), {})[position] = tensor
        else:
            out[f"layers.{index}.{rest}"] = tensor
    for (index, fused, kind), pieces in pending.items():
        parts = _FUSED[fused]
        missing = [parts[i] for i in range(len(parts)) if i not in pieces]
        if missing:
            raise KeyError(f"model.layers.{index}.{missing[0]}.{kind} is missing (needed for the fused {fused})")
        out[f"layers.{index}.{fused}.{kind}"] = torch.cat([pieces[i] for i in range(len(parts))], dim=0)
    return out
