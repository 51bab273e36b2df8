"""Telling a Megatron ``torch_dist`` checkpoint directory apart, so that --load / --ref-load pointing at one (as
slime's scripts do) fails at once with the way out, instead of as a missing config.json or trainer file.

Megatron's distributed checkpoint layout: ``ROOT/latest_checkpointed_iteration.txt`` and ``ROOT/iter_NNNNNNN/``
holding ``*.distcp`` shards, ``common.pt`` and ``metadata.json``. Either the root or one ``iter_*`` directory may
be given.
"""

from __future__ import annotations

from pathlib import Path

_ITERATION_FILE = "latest_checkpointed_iteration.txt"
_SHARD_FILES = ("common.pt", ".metadata", "metadata.json")


def _is_iteration_dir(path: Path) -> bool:
    return path.name.startswith("iter_") and path.is_dir() and (
        any(path.glob("*.distcp")) or any((path / name).is_file() for name in _SHARD_FILES))


def is_torch_dist_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Megatron torch_dist checkpoint root or one of its ``iter_*`` directories."""
    root = Path(path)
    if not root.is_dir():
        return False
    if (root / _ITERATION_FILE).is_file() or _is_iteration_dir(root):
        return True
    return any(_is_iteration_dir(child) for child in root.glob("iter_*"))


def torch_dist_refusal(flag: str, path: str) -> str:
    """What to do instead of pointing ``flag`` at a Megatron torch_dist checkpoint."""
    convert = (f"or convert it with slime's tools/convert_torch_dist_to_hf.py --input-dir {path}/iter_NNNNNNN "
               "--output-dir HF_DIR --origin-hf-dir <the model's HF directory> (PYTHONPATH=Megatron-LM)")
    if flag == "--load":
        instead = ("--load resumes from a sluice --save directory: drop --load for a first run (the actor starts "
                   "from --hf-checkpoint), or give --hf-checkpoint a converted checkpoint, ")
    else:
        instead = f"point {flag} at the HF model the torch_dist one was converted from (usually --hf-checkpoint), "
    return (f"{flag} {path} is a Megatron torch_dist checkpoint ({_ITERATION_FILE} / iter_*/*.distcp); sluice "
            f"loads Hugging Face checkpoints: {instead}{convert}")
