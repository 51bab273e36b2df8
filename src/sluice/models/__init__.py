"""Model definitions, one per family, and loading them from HF checkpoints (weights and tokenizer).

Today one dense decoder serves the architectures listed in ``ARCHITECTURES``; parameters go in and out under HF
names. The attention backend and the elementwise ops are passed in by whoever runs the model, so nothing here
imports the engine (the engine imports this package, never the reverse).
"""

from sluice.models.loading import ARCHITECTURES, build_model, load_model

__all__ = ["ARCHITECTURES", "build_model", "load_model"]
