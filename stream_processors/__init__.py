"""Stream processing: validate, dedupe, price, roll up (and, with plans, cap) usage events.

The domain logic here is pure Python, importable without Kafka or ClickHouse; the faust app
(:func:`build_app`) is a thin shell over it and is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas import AlertRecord, CreditDrawRecord, EnforcementRecord, OverageRecord
from schemas.plans import SAMPLE_PLANS, Plan, PlanCatalog, load_plans, parse_plans
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
from stream_processors._time import to_micros
from stream_processors.caps import (
    DEFAULT_GRACE_S,
    CapEngine,
    CapEvent,
    Effects,
    LateUsage,
    RejectedEvent,
    UserCapState,
    WindowUsage,
)

if TYPE_CHECKING:
    from stream_processors._app import build_app, faust_app, input_lane

__all__ = [
    "DEFAULT_GRACE_S",
    "NO_PLAN",
    "SAMPLE_PLANS",
    "VENDORED_CATALOG",
    "AlertRecord",
    "BatchResult",
    "CapEngine",
    "CapEvent",
    "CreditDrawRecord",
    "DictState",
    "Effects",
    "EnforcementRecord",
    "InRecord",
    "LateUsage",
    "ModelPrice",
    "OverageRecord",
    "PartitionedState",
    "Plan",
    "PlanCatalog",
    "PriceCatalog",
    "PricedRecord",
    "Quote",
    "RejectedEvent",
    "UsageProcessor",
    "UserCapState",
    "WindowUsage",
    "build_app",
    "faust_app",
    "input_lane",
    "late_segment",
    "load_plans",
    "parse_plans",
    "to_micros",
    "to_units",
    "units_to_decimal",
    "units_to_str",
]


def __getattr__(name: str) -> Any:
    # faust is heavy and patches the event loop policy on import: load it only when asked.
    if name in ("build_app", "faust_app", "input_lane"):
        from stream_processors import _app

        return getattr(_app, name)
    raise AttributeError(name)
