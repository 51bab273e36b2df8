"""The numeric entries of a metrics dict, as the trackers (TensorBoard, W&B) take them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def scalar_items(metrics: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, float) for every number or 0-d tensor/array; NaN and inf are kept (a diverging loss should show).

    Lists, strings and None are left out: these trackers chart scalars.
    """
    for key, value in metrics.items():
        if key == "step" or isinstance(value, (bool, str)) or value is None:
            continue
        if isinstance(value, (int, float)):
            yield key, float(value)
        elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # torch / numpy scalars
            yield key, float(value.item())
