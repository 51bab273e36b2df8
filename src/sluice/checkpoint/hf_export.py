"""Export the actor as a Hugging Face model directory: safetensors weights, config.json, tokenizer files.

The directory is complete on its own: ``transformers.AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer``,
the engine (``LocalEngine``) and ``sluice serve --model`` load it. Weights are written in the trainer's dtype,
byte for byte, so a load gives back exactly the trained tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sluice.checkpoint.atomic import move_into_place


def hf_export_path(template: str, rollout_id: int) -> Path:
    """``--save-hf`` with ``{rollout_id}`` replaced, as slime spells it."""
    return Path(template.format(rollout_id=rollout_id))


def export_hf(model: torch.nn.Module, tokenizer, path: str | Path, atomic: bool = True) -> Path:
    """Write ``model`` (a ``PreTrainedModel``) and ``tokenizer`` (or none) to ``path``; returns ``path``.

    ``atomic``: write to a hidden sibling and rename it into place, so a crash mid-export never leaves a
    directory that looks complete; an existing export at ``path`` is replaced.
    """
    path = Path(path)
    target = path.parent / f".{path.name}.tmp" if atomic else path
    if atomic:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    if atomic:
        move_into_place(target, path)
    return path
