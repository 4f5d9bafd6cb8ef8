"""The plans format, kept importable here for compatibility: it lives in :mod:`schemas.plans`.

Plans are data that producers (subscriptions files), the stream workers (caps) and the analytics
all read, so the format sits at the bottom of the import graph, with the rest of the contract.
"""

from __future__ import annotations

from schemas.plans import (
    DEFAULT_THRESHOLDS,
    MAX_OVERAGE_UNIT_PRICE,
    MAX_PLAN_AMOUNT,
    SAMPLE_PLANS,
    BlockAtCap,
    CapAction,
    DowngradeAtCap,
    FixedWindow,
    OverageAtCap,
    Plan,
    PlanCatalog,
    PlanWindow,
    RollingWindow,
    Unit,
    WindowKind,
    exact_yaml,
    load_plans,
    parse_plans,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MAX_OVERAGE_UNIT_PRICE",
    "MAX_PLAN_AMOUNT",
    "SAMPLE_PLANS",
    "BlockAtCap",
    "CapAction",
    "DowngradeAtCap",
    "FixedWindow",
    "OverageAtCap",
    "Plan",
    "PlanCatalog",
    "PlanWindow",
    "RollingWindow",
    "Unit",
    "WindowKind",
    "exact_yaml",
    "load_plans",
    "parse_plans",
]
