"""Prompt data: reading files, building prompt samples, and the resumable prompt cursor used by rollouts."""

from sluice.data.files import DataError, read_rows
from sluice.data.prompts import LoadReport, load_prompt_samples
from sluice.data.source import PromptSource

__all__ = ["DataError", "read_rows", "load_prompt_samples", "LoadReport", "PromptSource"]
