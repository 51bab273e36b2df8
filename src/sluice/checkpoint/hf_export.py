"""Export the actor as a Hugging Face model directory: safetensors weights, config.json, tokenizer files.

The directory is complete on its own: ``transformers.AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer``,
the engine (``LocalEngine``) and ``sluice serve --model`` load it. Weights are written in the trainer's dtype,
byte for byte, so a load gives back exactly the trained tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sluice.checkpoint.atomic import move_into_place
from sluice.models.decoder import DecoderLM
from sluice.models.hf_layout import to_hf, split_sizes


def hf_export_path(template: str, rollout_id: int) -> Path:
    """``--save-hf`` with ``{rollout_id}`` replaced, as slime spells it."""
    return Path(template.format(rollout_id=rollout_id))


def export_hf(model: torch.nn.Module, tokenizer, path: str | Path, atomic: bool = True) -> Path:
    """Write ``model`` (a ``PreTrainedModel``, or sluice's ``DecoderLM`` under HF names) and ``tokenizer`` (or
    none) to ``path``; returns ``path``.

    ``atomic``: write to a hidden sibling and rename it into place, so a crash mid-export never leaves a
    directory that looks complete; an existing export at ``path`` is replaced.
    """
    path = Path(path)
    target = path.parent / f".{path.name}.tmp" if atomic else path
    if atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
    if isinstance(model, DecoderLM):
        weights = to_hf(model.state_dict(), split_sizes(model), model.tie_word_embeddings)
        write_hf_weights(model.config, weights, target)
    else:
        model.save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    if atomic:
        move_into_place(target, path)
    return path


def write_hf_weights(config, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """``config.json`` and ``model.safetensors`` of HF-named ``weights`` (in their dtype) into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
