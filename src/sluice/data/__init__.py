"""Prompt data: reading files, building prompt samples, and the resumable prompt cursor used by rollouts."""

from sluice.data.files import DataError, count_rows, read_rows
from sluice.data.prompt_table import EAGER_MAX_ROWS, PromptTable, load_prompt_table
from sluice.data.prompts import LoadReport, check_first_row, load_prompt_samples
from sluice.data.source import PromptSource

__all__ = ["DataError", "read_rows", "count_rows", "load_prompt_samples", "check_first_row", "LoadReport",
           "PromptSource", "PromptTable", "load_prompt_table", "EAGER_MAX_ROWS"]
