"""Token F1 between a response and a reference answer (SQuAD-style), for short free-text answers.

Partial credit: a response that names part of the answer, or adds a few words to it, scores between 0 and 1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation or articles.

    >>> answer_tokens("The Eiffel Tower, in Paris!")
    ['eiffel', 'tower', 'in', 'paris']
    """
    return _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION)).split()


def _f1(predicted: list[str], reference: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 1.0 if not predicted and not reference else 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(response: str, label: Any) -> float:
    """Harmonic mean of word precision and recall; a list label scores against its best-matching answer.

    >>> token_f1("the Eiffel Tower", "Eiffel Tower")
    1.0
    >>> round(token_f1("Tower in Paris", "Eiffel Tower"), 3)
    0.4
    >>> token_f1("Paris", ["London", "paris."])
    1.0
    >>> token_f1("Rome", "Paris")
    0.0
    """
    if label is None:
        raise ValueError("token_f1 needs a label, got None (is --label-key set?)")
    references = label if isinstance(label, (list, tuple)) else [label]
    predicted = answer_tokens(response)
    return max(_f1(predicted, answer_tokens(ref)) for ref in references)
