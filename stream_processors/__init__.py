"""Stream processing: validate, dedupe, price, roll up (and, with plans, cap) usage events.

The domain logic here is pure Python, importable without Kafka or ClickHouse; the faust app
(:func:`build_app`) is a thin shell over it and is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream_processors._money import to_units, units_to_decimal, units_to_str
from stream_processors._pricing import VENDORED_CATALOG, ModelPrice, PriceCatalog, Quote
from stream_processors._processor import (
    NO_PLAN,
    BatchResult,
    InRecord,
    PricedRecord,
    UsageProcessor,
    late_segment,
)
from stream_processors._state import DictState, PartitionedState

if TYPE_CHECKING:
    from stream_processors._app import build_app

__all__ = [
    "NO_PLAN",
    "VENDORED_CATALOG",
    "BatchResult",
    "DictState",
    "InRecord",
    "ModelPrice",
    "PartitionedState",
    "PriceCatalog",
    "PricedRecord",
    "Quote",
    "UsageProcessor",
    "build_app",
    "late_segment",
    "to_units",
    "units_to_decimal",
    "units_to_str",
]


def __getattr__(name: str) -> Any:
    # faust is heavy and patches the event loop policy on import: load it only when asked.
    if name == "build_app":
        from stream_processors._app import build_app

        return build_app
    raise AttributeError(name)
