"""Training prompts by row position, converted (keys, chat template, tokenizer) when first drawn.

A dataset converted up front costs a ``Sample`` per row in memory (10M rows: tens of GB) and tokenizing every
row before the first rollout. A ``PromptTable`` holds the row index instead (``row_table.py``: a few bytes per
row) and converts the rows a batch draws, through ``prompts.sample_from_row``, keeping at most ``cache_size``
converted samples (least recently drawn dropped first).

When the whole selection is converted at start: a selection of at most ``EAGER_MAX_ROWS`` rows is converted
when the table opens, as it always was: every row is checked before any GPU work starts, prompts over
--rollout-max-prompt-len are counted in the ``LoadReport``, and every sample stays cached, so nothing is read
or tokenized twice. A larger selection streams: its first row is checked at start (``check_first_row``), any
other row when a batch first draws it; a bad row then stops the run with an error naming the file (the shard),
line or row and key, and a prompt over --rollout-max-prompt-len is skipped when drawn.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

from sluice.config.sections import DataConfig
from sluice.data.prompt_checks import PromptLimit
from sluice.data.prompts import LoadReport, PromptChecks, PromptTokenizer, sample_from_row
from sluice.data.row_table import RowTable
from sluice.data.rows import DataError, LocatedRow
from sluice.types import Sample

EAGER_MAX_ROWS = 50_000  # at most this many rows: converted and checked whole at start (seconds), and kept


class PromptTable:
    def __init__(self, rows: RowTable, convert: Callable[[LocatedRow], Sample], checks: PromptChecks,
                 cache_size: int = EAGER_MAX_ROWS) -> None:
        if cache_size < 1:
            raise ValueError(f"PromptTable: cache_size must be >= 1, got {cache_size}")
        self.rows = rows
        self.checks = checks  # length and characters of each converted prompt (prompts.PromptChecks)
        self.cache_size = cache_size
        self.num_usable = rows.num_rows  # prompts within the length limit: exact once converted whole, else a bound
        self.num_converted = 0  # rows converted (tokenized) over the table's life
        self.num_dropped_too_long = 0  # conversions over --rollout-max-prompt-len, skipped
        self._convert = convert
        self._cache: OrderedDict[int, Sample | None] = OrderedDict()  # position -> sample; None: too long

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def samples_at(self, positions: Sequence[int]) -> list[Sample | None]:
        """The samples at ``positions``, None where a prompt is over the length limit. Cached objects, not
        copies: a caller that changes them copies first."""
        found = {p: self._cache[p] for p in positions if p in self._cache}
        for p in found:
            self._cache.move_to_end(p)
        missing = sorted({p for p in positions if p not in found})
        for p, located in zip(missing, self.rows.rows_at(missing)):
            found[p] = self._sample(located)
            self._cache[p] = found[p]
        while len(self._cache) > self.cache_size:  # evicted after the batch is complete, not during it
            self._cache.popitem(last=False)
        return [found[p] for p in positions]

    def _sample(self, located: LocatedRow) -> Sample | None:
        sample = self._convert(located)
        self.num_converted += 1
        if self.checks.keeps(located, sample):
            return sample
        self.num_dropped_too_long += 1
        return None

    def convert_all(self) -> LoadReport:
        """Convert, check and cache every row now; the report of what the checks keep (an error if nothing)."""
        self.cache_size = max(self.cache_size, self.num_rows)
        positions = range(self.num_rows)
        samples, report = self.checks.convert_all(self.rows.spec, self.rows.rows_at(positions), self._convert)
        self.num_converted += self.num_rows
        self.num_dropped_too_long += report.num_dropped_too_long
        self.num_usable = report.num_kept
        self._cache = OrderedDict(zip(positions, samples))  # None where a prompt is over the length limit
        self.rows.cache.clear()  # every sample is held now: no row is read again
        return report

    def no_usable_prompt_error(self) -> DataError:
        return DataError(f"{self.rows.spec}: a whole epoch of {self.num_rows} rows drawn, and every prompt was longer "
                         f"than --rollout-max-prompt-len={self.checks.max_prompt_len} tokens; raise the limit")


def load_prompt_table(spec: str, config: DataConfig, tokenizer: PromptTokenizer, *, text_reward: str | None = None,
                      context_limit: PromptLimit | None = None,
                      eager_max_rows: int = EAGER_MAX_ROWS) -> tuple[PromptTable, LoadReport | None]:
    """The training prompts of ``spec``, and the ``LoadReport`` when it was converted whole (at most
    ``eager_max_rows`` rows; None: it streams). ``text_reward``: as for ``prompts.check_first_row``;
    ``context_limit``: as for ``prompts.load_prompt_samples``."""
    checks = PromptChecks(config, tokenizer, context_limit)
    convert = partial(sample_from_row, config=config, tokenizer=tokenizer, text_reward=text_reward)
    table = PromptTable(RowTable(spec), convert, checks)
    return table, (table.convert_all() if table.num_rows <= eager_max_rows else None)
