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
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


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
    targets = {name: _target(model, name) for name in shapes if not _IGNORED.match(name)}
    for name, target in targets.items():
        if tuple(target.shape) != shapes[name]:
            raise ValueError(f"weight {name!r}: shape {shapes[name]} does not match the engine's {tuple(target.shape)}")
    for name, tensor in items:
        if name in targets:
            targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))
    return set(targets)


def hf_named_tensors(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (views into the fused parameters): for checks and checksums."""
    return {name: _target(model, name) for name in _required_names(model)}


def _target(model: DecoderLM, hf_name: str) -> torch.Tensor:
    """The tensor (a view for fused projections) that an HF-named weight is copied into."""
    if hf_name == "model.embed_tokens.weight":
        return model.embed_tokens.weight
    if hf_name == "model.norm.weight":
        return model.norm.weight
    if hf_name == "lm_head.weight":
        return model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    match = _LAYER.match(hf_name)
    if match is None or int(match.group(1)) >= len(model.layers):
        raise KeyError(f"weight {hf_name!r} does not exist in the engine's model")
    layer, rest = model.layers[int(match.group(1))], match.group(2)
    attention = layer.self_attn
    q, kv = attention.q_size, attention.kv_size
    blocks = {
        "self_attn.q_proj": (attention.qkv_proj, 0, q),
        "self_attn.k_proj": (attention.qkv_proj, q, q + kv),
        "self_attn.v_proj": (attention.qkv_proj, q + kv, q + 2 * kv),
        "mlp.gate_proj": (layer.mlp.gate_up_proj, 0, layer.mlp.down_proj.in_features),
        "mlp.up_proj": (layer.mlp.gate_up_proj, layer.mlp.down_proj.in_features, 2 * layer.mlp.down_proj.in_features),
    }
    module_name, _, kind = rest.rpartition(".")
    if module_name in blocks:
        module, start, stop = blocks[module_name]
        tensor = getattr(module, kind, None)
        if tensor is not None:
            return tensor[start:stop]
    else:
        tensor = _plain(layer, rest)
        if tensor is not None:
            return tensor
    raise KeyError(f"weight {hf_name!r} does not exist in the engine's model")


def _plain(module: torch.nn.Module, dotted: str) -> torch.Tensor | None:
    try:
        tensor = module.get_parameter(dotted)
    except AttributeError:
        return None
    return tensor


def _required_names(model: DecoderLM) -> list[str]:
    """HF names that together cover every parameter of the model."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if model.lm_head is not None:
        names.append("lm_head.weight")
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(f"{prefix}self_attn.{proj}.weight")
            if layer.self_attn.qkv_proj.bias is not None:
                names.append(f"{prefix}self_attn.{proj}.bias")
        names.append(f"{prefix}self_attn.o_proj.weight")
        if layer.self_attn.o_proj.bias is not None:
            names.append(f"{prefix}self_attn.o_proj.bias")
        if layer.self_attn.q_norm is not None:
            names += [f"{prefix}self_attn.q_norm.weight", f"{prefix}self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"{prefix}mlp.{proj}.weight")
            if layer.mlp.down_proj.bias is not None:
                names.append(f"{prefix}mlp.{proj}.bias")
        names += [f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"]
    return names
