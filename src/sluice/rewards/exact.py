"""Exact string match: the simplest verifiable reward, for tasks whose answers have one spelling."""

from __future__ import annotations

from typing import Any


def normalize_answer(value: Any) -> str:
    """The comparison form of an answer: ``str(value)`` with leading/trailing whitespace stripped.

    Only outer whitespace is removed because models routinely emit a trailing newline or a leading space
    after a prompt's colon; inner spacing, case and number formatting are kept, since for an exact-match task
    they are part of the answer ("0.50" is not "0.5" here; use the ``math`` reward for that).
    Labels are stringified so that an int label read from JSON (``42``) matches the text ``"42"``.

    >>> normalize_answer(" 42\\n"), normalize_answer(42)
    ('42', '42')
    """
    return str(value).strip()


def exact_match(response: str, label: Any) -> float:
    """1.0 if the whole response, normalised, equals the label, normalised; else 0.0.

    The whole response is the final answer here; to score only a ``\\boxed{...}`` answer inside a longer
    response use ``boxed_exact``. A missing label raises rather than scoring 0.0, because it means the data
    has no reference answer (``--label-key`` unset) and a silent zero would train on noise.

    >>> exact_match("  42\\n", 42), exact_match("0.50", "0.5")
    (1.0, 0.0)
    """
    if label is None:
        raise ValueError("exact_match needs a label, got None (is --label-key set?)")
    return 1.0 if normalize_answer(response) == normalize_answer(label) else 0.0
