"""``spendstream report``: the tier P&L of one month read from the ClickHouse views.

Every number comes from SQL over the views of migration 005 (``tier_pnl(org)`` and
``user_month_pnl``); values reach SQL as query parameters. Money stays :class:`~decimal.Decimal`
(JSON carries it as strings); only the plots convert to float, to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from sinks import Store
from spendstream.commands._safe import safe_text
from spendstream.errors import ConfigError

TIER_ORDER = ("free", "pro", "team", "enterprise")

TIER_PNL_SQL = """
SELECT *
FROM {db}.tier_pnl(org = {{org:String}})
WHERE month = {{month:Date}}
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], tier) = 0, indexOf(['free', 'pro', 'team',
    'enterprise'], tier), tier
"""

HEAVY_USERS_SQL = """
SELECT user_id, org_id, plan_id AS tier, requests, cost, revenue, margin, list_value,
    capped, blocked, downgraded
FROM {db}.user_month_pnl
WHERE month = {{month:Date}} AND ({{org:String}} = '' OR org_id = {{org:String}})
ORDER BY cost DESC, user_id
LIMIT {{limit:UInt32}}
"""

USER_COSTS_SQL = """
SELECT plan_id AS tier, cost
FROM {db}.user_month_pnl
WHERE month = {{month:Date}} AND ({{org:String}} = '' OR org_id = {{org:String}})
ORDER BY tier, cost
"""

LATEST_MONTH_SQL = """
SELECT toString(toStartOfMonth(max(occurred_at))) AS month, count() AS events
FROM {db}.priced_events
WHERE {{org:String}} = '' OR org_id = {{org:String}}
"""


def parse_period(text: str) -> date:
    """``2026-11`` -> 2026-11-01; :class:`ConfigError` for anything else."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m").date()
    except ValueError:
        raise ConfigError(f"--period must be a month such as 2026-11, got {text!r}") from None


def latest_month(store: Store, org: str = "") -> date:
    """The month of the newest priced event (of ``org``), or the current month if none."""
    _, rows = store.query(LATEST_MONTH_SQL.format(db=store.database), {"org": org})
    if rows and int(rows[0][1]) > 0:
        return date.fromisoformat(str(rows[0][0]))
    today = datetime.now(UTC).date()
    return today.replace(day=1)


@dataclass
class PnlReport:
    """One month's tier P&L, heaviest users and per-user costs (for the plots)."""

    month: date
    org: str
    tiers: list[dict[str, Any]]
    heavy_users: list[dict[str, Any]]
    user_costs: dict[str, list[Decimal]] = field(default_factory=dict)

    def tier(self, name: str) -> dict[str, Any]:
        """The P&L row of tier ``name`` (KeyError if the month has none)."""
        for row in self.tiers:
            if row["tier"] == name:
                return row
        raise KeyError(name)


def _dicts(result: tuple[list[str], list[tuple[Any, ...]]]) -> list[dict[str, Any]]:
    names, rows = result
    return [dict(zip(names, row, strict=True)) for row in rows]


def build_report(
    store: Store, *, month: date | None = None, org: str = "", top: int = 10
) -> PnlReport:
    """Read the P&L of ``month`` (default: the newest month with usage) for ``org`` (all)."""
    month = month or latest_month(store, org)
    db = store.database
    params: dict[str, Any] = {"month": month.isoformat(), "org": org}
    tiers = _dicts(store.query(TIER_PNL_SQL.format(db=db), params))
    heavy = _dicts(store.query(HEAVY_USERS_SQL.format(db=db), {**params, "limit": top}))
    costs: dict[str, list[Decimal]] = {}
    for tier, cost in store.query(USER_COSTS_SQL.format(db=db), params)[1]:
        costs.setdefault(str(tier), []).append(cost)
    return PnlReport(month=month, org=org, tiers=tiers, heavy_users=heavy, user_costs=costs)


# -- output -----------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    if isinstance(value, date | datetime):
        return value.isoformat()
    return value


def report_json(report: PnlReport) -> dict[str, Any]:
    """Plain data for ``--format json``: money as exact decimal strings, never floats."""
    return {
        "month": report.month.isoformat()[:7],
        "org": report.org or None,
        "tiers": [{k: _json_value(v) for k, v in row.items()} for row in report.tiers],
        "heavy_users": [{k: _json_value(v) for k, v in row.items()} for row in report.heavy_users],
    }


def usd(value: Any, places: int = 2) -> str:
    """Money for display: ``1,234.57`` (rounded for the eye; the data stays exact)."""
    if value is None:
        return "-"
    return f"{Decimal(value):,.{places}f}"


def tier_pnl_cells(r: dict[str, Any], label: str) -> list[str]:
    """One tier's P&L row as display text (shared by the terminal and the HTML report)."""
    return [
        label,
        f"{Decimal(r['active_subscribers']):,.2f}",
        usd(r["revenue"]),
        usd(r["inference_cost"]),
        usd(r["gross_margin"]),
        pct(r["margin_pct"]),
        pct(r["users_cost_over_pay_pct"]),
        usd(r["cost_p50"], 4),
        usd(r["cost_p90"], 4),
        usd(r["cost_p99"], 4),
        pct(r["top1pct_cost_share_pct"]),
    ]


def pct(value: Any) -> str:
    """A percentage column (``12.5 %``), ``-`` when undefined."""
    return "-" if value is None else f"{Decimal(value):,.1f} %"


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    # Tiers, user ids and org ids are stored data: literal text, control characters escaped.
    table = Table(title=safe_text(title, "table.title"), title_justify="left")
    for i, name in enumerate(headers):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(safe_text(str(cell)) for cell in row))
    return table


def render(report: PnlReport, console: Console) -> None:
    """Rich tables: tier P&L, cap outcomes, savings, heaviest users."""
    who = f" - org {report.org}" if report.org else ""
    when = report.month.strftime("%Y-%m")
    if not report.tiers:
        console.print(safe_text(f"no usage or subscriptions in {when}{who}"))
        return
    t = report.tiers
    console.print(
        _table(
            f"Tier P&L {when}{who} (USD)",
            [
                "tier",
                "subscribers",
                "revenue",
                "inference cost",
                "gross margin",
                "margin",
                "cost > pay",
                "p50 cost",
                "p90 cost",
                "p99 cost",
                "top 1 % share",
            ],
            [tier_pnl_cells(r, r["tier"] or "(no plan)") for r in t],
        )
    )
    console.print(
        _table(
            f"Cap outcomes {when}",
            [
                "tier",
                "users",
                "alerted",
                "capped",
                "blocked",
                "downgraded",
                "requests downgraded",
                "overage users",
                "overage billed",
                "credits drawn",
            ],
            [
                [
                    r["tier"] or "(no plan)",
                    f"{r['users']:,}",
                    f"{r['users_alerted']:,}",
                    f"{r['users_capped']:,}",
                    f"{r['users_blocked']:,}",
                    f"{r['users_downgraded']:,}",
                    f"{r['requests_downgraded']:,}",
                    f"{r['users_overage']:,}",
                    usd(r["overage_revenue"]),
                    usd(r["credit_revenue"]),
                ]
                for r in t
            ],
        )
    )
    console.print(
        _table(
            f"Savings {when}: list value - cost, by cause (USD)",
            [
                "tier",
                "list value",
                "cost",
                "prompt cache",
                "semantic cache",
                "routing",
                "service tier",
                "saved",
            ],
            [
                [
                    r["tier"] or "(no plan)",
                    usd(r["list_value"]),
                    usd(r["inference_cost"]),
                    usd(r["saved_prompt_cache"]),
                    usd(r["saved_semantic_cache"]),
                    usd(r["saved_routing"]),
                    usd(r["saved_service_tier"]),
                    usd(r["saved_total"]),
                ]
                for r in t
            ],
        )
    )
    if report.heavy_users:
        console.print(
            _table(
                f"Heaviest users {when} (by inference cost, USD)",
                ["user", "org", "tier", "requests", "cost", "pays", "margin", "capped"],
                [
                    [
                        u["user_id"],
                        str(u["org_id"]),
                        u["tier"],
                        f"{u['requests']:,}",
                        usd(u["cost"]),
                        usd(u["revenue"]),
                        usd(u["margin"]),
                        "yes" if u["capped"] else "",
                    ]
                    for u in report.heavy_users
                ],
            )
        )
