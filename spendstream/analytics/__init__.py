"""Tier profitability on ClickHouse: plans as data, P&L reports with plots, Grafana dashboards.

The P&L itself is SQL (``sinks/migrations/004_*`` and ``005_*``: views ``user_month_pnl`` and
``tier_pnl(org)``); this package loads plans into ClickHouse, reads those views for the
``spendstream report`` command (terminal, JSON, HTML with plots) and generates the Grafana
dashboards. The what-if replay lives in :mod:`spendstream.whatif`.
"""

from spendstream.analytics.loaders import (
    CURRENT_SCENARIO,
    current_plans_loaded,
    load_current_plans,
    load_plans_into,
    plan_rows,
)
from spendstream.analytics.report import PnlReport, build_report, report_json

__all__ = [
    "CURRENT_SCENARIO",
    "PnlReport",
    "build_report",
    "current_plans_loaded",
    "load_current_plans",
    "load_plans_into",
    "plan_rows",
    "report_json",
]
