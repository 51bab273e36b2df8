"""Build the model from an HF config, and copy HF-named weights into its fused parameters.

Weights arrive under HF names (from a safetensors directory, or from the trainer, whose model is the HF
class). ``q_proj``/``k_proj``/``v_proj`` land in row blocks of ``qkv_proj``, ``gate_proj``/``up_proj`` in
``gate_up_proj``. Every name and shape is checked before the first copy, so a bad update leaves the model as it
was; the version bump that follows a copy can therefore never describe half-applied weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from transformers import AutoConfig, PretrainedConfig

from sluice.models.decoder import DecoderLM
from sluice.models.hf_layout import split_sizes, to_hf
from sluice.weights.safetensors_files import iter_safetensors, safetensors_shapes


@dataclass(frozen=True)
class ArchitectureSwitches:
    qk_norm: bool  # RMSNorm on each q and k head before rotary (Qwen3)
    qkv_bias: bool | None  # None: read config.attention_bias
    o_bias: bool | None


ARCHITECTURES = {
    "Qwen2ForCausalLM": ArchitectureSwitches(qk_norm=False, qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": ArchitectureSwitches(qk_norm=True, qkv_bias=None, o_bias=None),
    "LlamaForCausalLM": ArchitectureSwitches(qk_norm=False, qkv_bias=None, o_bias=None),
}

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def build_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> DecoderLM:
    """A model with uninitialised weights, for ``config``'s architecture; its runner sets ``model.ops``."""
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    switches = ARCHITECTURES.get(architecture)
    if switches is None:
        raise ValueError(
            f"architecture {architecture!r} is not supported by the engine; supported: {', '.join(ARCHITECTURES)}"
        )
    attention_bias = bool(getattr(config, "attention_bias", False))
    with torch.device(device):
        model = DecoderLM(
            config,
            qk_norm=switches.qk_norm,
            qkv_bias=attention_bias if switches.qkv_bias is None else switches.qkv_bias,
            o_bias=attention_bias if switches.o_bias is None else switches.o_bias,
            max_positions=int(config.max_position_embeddings),
        )
    # The rotary tables stay float32; everything that is a parameter takes the engine dtype. No parameter needs
    # a gradient: autograd would otherwise keep every activation of a captured CUDA graph alive.
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
        parameter.requires_grad_(False)
    return model.eval()


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> DecoderLM:
    """Build the model of an HF checkpoint directory and load its safetensors; every parameter must be covered."""
    config = AutoConfig.from_pretrained(path)
    model = build_model(config, device, dtype)
    covered = load_hf_weights(model, str(path))
    missing = sorted(set(_required_names(model)) - covered)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    return model


@torch.no_grad()
def load_hf_weights(model: DecoderLM, weights: Mapping[str, torch.Tensor] | str | Path) -> set[str]:
    """Copy HF-named tensors (a mapping or a checkpoint directory) into the model; returns the HF names copied."""
    if isinstance(weights, Mapping):
        shapes = {name: tuple(tensor.shape) for name, tensor in weights.items()}
        items: Iterator = iter(weights.items())
    else:
        shapes = safetensors_shapes(weights)
        items = iter_safetensors(weights)
    named = _hf_targets(model)
    unknown = [name for name in shapes if name not in named and not _IGNORED.match(name)]
    if unknown:
        raise KeyError(f"weight {unknown[0]!r} does not exist in the engine's model")
    targets = {name: named[name] for name in shapes if name in named}
    for name, target in targets.items():
        if tuple(target.shape) != shapes[name]:
            raise ValueError(f"weight {name!r}: shape {shapes[name]} does not match the engine's {tuple(target.shape)}")
    for name, tensor in items:
        if name in targets:
            targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))
    return set(targets)


def hf_named_tensors(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (views into the fused parameters): for checks and checksums."""
    return to_hf(dict(model.named_parameters()), split_sizes(model), tied=model.lm_head is None)


def _hf_targets(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Every HF name a weight may arrive under -> the tensor (a view for fused projections) it is copied into.
    A tied model also takes ``lm_head.weight`` (some checkpoints of tied models carry it) into the embedding."""
    targets = {name: tensor.detach() for name, tensor in hf_named_tensors(model).items()}
    if model.lm_head is None:
        targets["lm_head.weight"] = targets["model.embed_tokens.weight"]
    return targets


def _required_names(model: DecoderLM) -> list[str]:
    """HF names that together cover every parameter of the model."""
    return list(hf_named_tensors(model))
