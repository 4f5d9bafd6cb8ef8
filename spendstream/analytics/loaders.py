"""Plans into ClickHouse (tables ``plans`` and ``plan_windows`` of migration 004).

Each load is a full snapshot with a new ``version`` under a ``scenario``: ``current`` is the
catalog in force (what the P&L views price subscriptions with); other scenario ids hold
alternatives for dashboards. The views ``plans_latest`` / ``plan_windows_latest`` keep the
newest snapshot of every scenario.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from schemas.plans import (
    DowngradeAtCap,
    OverageAtCap,
    PlanCatalog,
    RollingWindow,
)
from sinks import Store
from spendstream.errors import ConfigError

CURRENT_SCENARIO = "current"
"""The scenario id of the plans in force; the P&L views read this one."""

_SCENARIO = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def check_scenario(scenario: str) -> str:
    """``scenario`` if it is a plain id (letters, digits, ``_.:-``), else :class:`ConfigError`."""
    if not _SCENARIO.match(scenario):
        raise ConfigError(f"scenario id {scenario!r} must match {_SCENARIO.pattern}")
    return scenario


def money_text(value: Decimal) -> str:
    """Fixed-point text of an exact amount (no exponent), as ClickHouse and Arrow parse it."""
    return format(value, "f")


def plan_rows(
    catalog: PlanCatalog, scenario: str, version: int, source: str
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The ``plans`` and ``plan_windows`` columns of one snapshot of ``catalog``."""
    now = datetime.now(UTC).isoformat()
    plans: dict[str, list[Any]] = {
        k: []
        for k in ("scenario", "version", "plan_id", "name", "monthly_price", "source", "loaded_at")
    }
    windows: dict[str, list[Any]] = {
        k: []
        for k in (
            "scenario",
            "version",
            "plan_id",
            "window",
            "kind",
            "unit",
            "allowance",
            "hours",
            "thresholds",
            "action",
            "downgrade_model",
            "overage_unit_price",
            "ceiling_usd",
            "exempt_models",
        )
    }
    for plan in catalog:
        for key, value in (
            ("scenario", scenario),
            ("version", version),
            ("plan_id", plan.id),
            ("name", plan.name or plan.id),
            ("monthly_price", money_text(plan.monthly_price)),
            ("source", source),
            ("loaded_at", now),
        ):
            plans[key].append(value)
        for window in plan.windows:
            cap = window.at_cap
            row: dict[str, Any] = {
                "scenario": scenario,
                "version": version,
                "plan_id": plan.id,
                "window": window.name,
                "kind": window.kind,
                "unit": window.unit,
                "allowance": money_text(window.allowance),
                "hours": window.hours if isinstance(window, RollingWindow) else 0,
                "thresholds": list(window.thresholds),
                "action": cap.action,
                "downgrade_model": cap.model if isinstance(cap, DowngradeAtCap) else "",
                "overage_unit_price": (
                    money_text(cap.unit_price) if isinstance(cap, OverageAtCap) else None
                ),
                "ceiling_usd": (
                    money_text(cap.ceiling_usd)
                    if isinstance(cap, OverageAtCap) and cap.ceiling_usd is not None
                    else None
                ),
                "exempt_models": sorted(window.exempt_models),
            }
            for key, value in row.items():
                windows[key].append(value)
    return plans, windows


def load_plans_into(
    store: Store,
    catalog: PlanCatalog,
    *,
    scenario: str = CURRENT_SCENARIO,
    source: str = "",
    version: int | None = None,
) -> int:
    """Insert ``catalog`` as a new snapshot of ``scenario``; return its version.

    The version defaults to the load time in microseconds, so the newest load wins. The insert
    dedup token carries scenario and version: a retried load of the same snapshot lands once.
    """
    check_scenario(scenario)
    version = version if version is not None else time.time_ns() // 1000
    plans, windows = plan_rows(catalog, scenario, version, source)
    # Windows first: readers pick the snapshot by the plans table's newest version, so the
    # snapshot becomes visible only once both tables hold it.
    store.insert("plan_windows", windows, f"plan_windows-{scenario}-{version}")
    store.insert("plans", plans, f"plans-{scenario}-{version}")
    return version


def load_current_plans(store: Store, plans_file: Path | None = None) -> int:
    """Load the plans in force (``plans_file``, default the sample catalog) as scenario
    ``current``; return the version. What the demo and ``clickhouse migrate`` users call."""
    from schemas.plans import SAMPLE_PLANS, load_plans

    path = plans_file or SAMPLE_PLANS
    return load_plans_into(store, load_plans(path), scenario=CURRENT_SCENARIO, source=str(path))


def current_plans_loaded(store: Store) -> bool:
    """True when scenario ``current`` has a plans snapshot (else revenue reads as 0)."""
    _, rows = store.query(
        f"SELECT count() FROM {store.database}.plans_latest WHERE scenario = {{s:String}}",
        {"s": CURRENT_SCENARIO},
    )
    return bool(rows and int(rows[0][0]) > 0)
