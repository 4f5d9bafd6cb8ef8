"""``spendstream report --html FILE``: one self-contained HTML page with the P&L and its plots.

Plots are plotly figures (the plotly.js bundle is inlined once, so the file opens offline):
margin per tier, per-user cost distribution per tier, the cumulative cost share of users
(a Lorenz-style curve: how much of the cost the heaviest x % of users carry), savings by cause.
Money is converted to float here and only here, to draw; the tables print the exact values.
"""

from __future__ import annotations

import html
from decimal import Decimal
from pathlib import Path
from typing import Any

import plotly.graph_objects as go  # type: ignore[import-untyped]  # ships no stubs

from spendstream.analytics.report import PnlReport, pct, tier_pnl_cells, usd
from spendstream.commands._safe import printable

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
.note { color: #666; font-size: 0.85em; }
"""


def _f(value: Any) -> float:
    """Float for drawing only."""
    return float(Decimal(value)) if value is not None else 0.0


def _label(tier: str) -> str:
    return tier or "(no plan)"


def margin_figure(report: PnlReport) -> go.Figure:
    """Revenue and inference cost per tier (bars) with the gross margin % on top."""
    tiers = [_label(r["tier"]) for r in report.tiers]
    fig = go.Figure()
    fig.add_bar(name="revenue", x=tiers, y=[_f(r["revenue"]) for r in report.tiers])
    fig.add_bar(name="inference cost", x=tiers, y=[_f(r["inference_cost"]) for r in report.tiers])
    fig.add_bar(
        name="gross margin",
        x=tiers,
        y=[_f(r["gross_margin"]) for r in report.tiers],
        text=[pct(r["margin_pct"]) for r in report.tiers],
        textposition="outside",
    )
    fig.update_layout(title="Margin per tier (USD)", barmode="group", yaxis_title="USD")
    return fig


def cost_distribution_figure(report: PnlReport) -> go.Figure:
    """Per-user inference cost per tier (box plots with every user as a point)."""
    fig = go.Figure()
    for tier, costs in _ordered_costs(report):
        fig.add_box(name=_label(tier), y=[_f(c) for c in costs], boxpoints="suspectedoutliers")
    fig.update_layout(
        title="Cost per user, by tier (USD, log scale)", yaxis_type="log", yaxis_title="USD"
    )
    return fig


def cumulative_share_figure(report: PnlReport) -> go.Figure:
    """Share of a tier's cost carried by its heaviest x % of users."""
    fig = go.Figure()
    for tier, costs in _ordered_costs(report):
        total = sum(costs, Decimal(0))
        if not costs or total <= 0:
            continue
        heavy_first = sorted(costs, reverse=True)
        running = Decimal(0)
        xs, ys = [0.0], [0.0]
        for i, cost in enumerate(heavy_first, start=1):
            running += cost
            xs.append(100.0 * i / len(heavy_first))
            ys.append(_f(running * 100 / total))
        fig.add_scatter(name=_label(tier), x=xs, y=ys, mode="lines")
    fig.add_scatter(name="equal use", x=[0, 100], y=[0, 100], mode="lines", line={"dash": "dot"})
    fig.update_layout(
        title="Cumulative cost share of users (heaviest first)",
        xaxis_title="% of users",
        yaxis_title="% of the tier's inference cost",
    )
    return fig


def savings_figure(report: PnlReport) -> go.Figure:
    """List value minus cost per tier, stacked by cause."""
    tiers = [_label(r["tier"]) for r in report.tiers]
    fig = go.Figure()
    for column, name in (
        ("saved_prompt_cache", "prompt cache"),
        ("saved_semantic_cache", "semantic cache"),
        ("saved_routing", "routing"),
        ("saved_service_tier", "service tier (batch, flex)"),
    ):
        fig.add_bar(name=name, x=tiers, y=[_f(r[column]) for r in report.tiers])
    fig.update_layout(title="Savings by cause (USD)", barmode="stack", yaxis_title="USD")
    return fig


def _ordered_costs(report: PnlReport) -> list[tuple[str, list[Decimal]]]:
    order = [r["tier"] for r in report.tiers]
    rest = sorted(t for t in report.user_costs if t not in order)
    return [(t, report.user_costs[t]) for t in order + rest if t in report.user_costs]


def _text(value: str) -> str:
    """Stored text for the page: control and bidi characters shown escaped, then HTML-escaped."""
    return html.escape(printable(value))


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: PnlReport) -> str:
    """The whole page as text."""
    when = report.month.strftime("%Y-%m")
    who = f" - org {report.org}" if report.org else ""
    figures = [
        margin_figure(report),
        cost_distribution_figure(report),
        cumulative_share_figure(report),
        savings_figure(report),
    ]
    plots = [
        # The first figure inlines plotly.js (no network needed to open the file).
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
        for i, fig in enumerate(figures)
    ]
    pnl = _html_table(
        [
            "tier",
            "subscribers",
            "revenue",
            "inference cost",
            "gross margin",
            "margin",
            "cost > pay",
            "p50",
            "p90",
            "p99",
            "top 1 % share",
        ],
        [tier_pnl_cells(r, _label(r["tier"])) for r in report.tiers],
    )
    heavy = _html_table(
        ["user", "org", "tier", "requests", "cost", "pays", "margin"],
        [
            [
                str(u["user_id"]),
                str(u["org_id"]),
                _label(u["tier"]),
                f"{u['requests']:,}",
                usd(u["cost"]),
                usd(u["revenue"]),
                usd(u["margin"]),
            ]
            for u in report.heavy_users
        ],
    )
    title = _text(f"spendstream tier P&L {when}{who}")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1>"
        "<p class='note'>From ClickHouse views tier_pnl and user_month_pnl. Revenue = "
        "prorated subscriptions + overage billed + prepaid credits drawn.</p>"
        f"<h2>Tier P&amp;L (USD)</h2>{pnl}"
        + "".join(f"<div class='plot'>{p}</div>" for p in plots)
        + f"<h2>Heaviest users</h2>{heavy}</body></html>\n"
    )


def write_html(report: PnlReport, path: Path) -> Path:
    """Write :func:`render_html` to ``path``; return it."""
    path.write_text(render_html(report), encoding="utf-8")
    return path
