"""Model code of the engine: one dense decoder for the architectures listed in ``ARCHITECTURES``."""

from sluice.engine.model.loading import ARCHITECTURES, build_model, load_model

__all__ = ["ARCHITECTURES", "build_model", "load_model"]
