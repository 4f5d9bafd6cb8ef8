"""Grafana dashboards as code (grafana-foundation-sdk), for the ClickHouse datasource plugin.

Three dashboards, generated into ``deploy/grafana/dashboards/*.json`` by
``spendstream analytics grafana``: "Tier profitability" (the P&L views), "Caps and alerts (real
time)" and "Pipeline health" (throughput, lag, dead letters, lateness). Every panel is a
:class:`PanelSpec` (title, SQL, the columns the panel reads); the panel-SQL test expands the
plugin's macros with :func:`expand_macros` and runs each query on the embedded engine.

The SDK ships no query type for grafana-clickhouse-datasource, so :class:`ClickHouseQuery` is
that target (the plugin's v4 JSON shape: ``editorType: sql``, ``rawSql``, ``format``,
``pluginVersion``).

The ``$org`` text variable reaches SQL only through :data:`ORG_VALUE` (percent-encoded by
Grafana, decoded by ClickHouse): a value typed in the box or put in the dashboard URL is data,
never SQL. Every panel sets its visualisation options (``options`` is never null).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self
from urllib.parse import quote

from grafana_foundation_sdk.builders import (
    barchart,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

DATASOURCE_TYPE = "grafana-clickhouse-datasource"
DATASOURCE_UID = "spendstream-clickhouse"
"""The datasource provisioned by deploy/grafana/provisioning/datasources/clickhouse.yaml."""
DATASOURCE = models.DataSourceRef(type_val=DATASOURCE_TYPE, uid=DATASOURCE_UID)
QUERY_PLUGIN_VERSION = "4.0.0"
"""The plugin version whose query JSON the targets follow. A target without ``pluginVersion``
(or older than 4.0.0) is taken by the plugin for a v3 query and migrated when loaded."""

Kind = Literal["timeseries", "table", "barchart", "stat"]


class ClickHouseQuery(cogvariants.Dataquery):
    """One SQL target of the ClickHouse plugin."""

    def __init__(self, ref_id: str, sql: str, fmt: Literal["table", "time_series"]) -> None:
        self.ref_id = ref_id
        self.sql = sql
        self.fmt = fmt

    def to_json(self) -> dict[str, object]:
        """The plugin's target JSON (format 1 = table, 0 = time series)."""
        return {
            "refId": self.ref_id,
            "datasource": DATASOURCE.to_json(),
            "editorType": "sql",
            "queryType": "timeseries" if self.fmt == "time_series" else "table",
            "format": 0 if self.fmt == "time_series" else 1,
            "rawSql": self.sql,
            "pluginVersion": QUERY_PLUGIN_VERSION,
        }


class ClickHouseQueryBuilder(cogbuilder.Builder[cogvariants.Dataquery]):
    """Builder of :class:`ClickHouseQuery` for the SDK's ``with_target``."""

    def __init__(self, sql: str, fmt: Literal["table", "time_series"], ref_id: str = "A") -> None:
        self._query = ClickHouseQuery(ref_id, sql, fmt)

    def ref_id(self, ref_id: str) -> Self:
        """Set the target's refId."""
        self._query.ref_id = ref_id
        return self

    def build(self) -> ClickHouseQuery:
        """The target."""
        return self._query


@dataclass(frozen=True)
class PanelSpec:
    """A panel: its visualisation, SQL (``{db}`` = database) and the columns it reads."""

    title: str
    kind: Kind
    sql: str
    columns: tuple[str, ...]
    unit: str = ""
    width: int = 12
    height: int = 8
    description: str = ""

    def query(self, database: str) -> str:
        """The SQL with the database name filled in (Grafana macros left for the plugin)."""
        return self.sql.replace("{db}", database).strip()


@dataclass(frozen=True)
class DashboardSpec:
    """A dashboard: uid, title, panels; ``org_variable`` adds the ``$org`` filter."""

    uid: str
    title: str
    panels: tuple[PanelSpec, ...]
    time_from: str = "now-30d"
    refresh: str = ""
    org_variable: bool = True
    tags: tuple[str, ...] = ("spendstream",)


ORG_VALUE = "decodeURLComponent('${org:percentencode}')"
"""The ``$org`` variable as a SQL string expression.

Grafana's ``percentencode`` formatter leaves only letters, digits, ``-_.~`` and ``%XX`` in the
literal, so no value can close it; ClickHouse decodes it back to the exact text. (Grafana's
``sqlstring`` formatter is not enough here: it doubles ``'`` but keeps ``\\``, and ClickHouse
reads ``\\'`` as an escaped quote, so ``\\' = '' ) OR 1=1 --`` would end the literal.)
"""


def org_filter(column: str = "org_id") -> str:
    """SQL condition: ``column`` is the ``$org`` organisation, or ``$org`` is empty (all)."""
    return f"({ORG_VALUE} = '' OR {column} = {ORG_VALUE})"


ORG = org_filter()
MONTHS = "month >= toStartOfMonth($__fromTime) AND month <= toStartOfMonth($__toTime)"

TIER_PNL = DashboardSpec(
    uid="spendstream-tier-pnl",
    title="Tier profitability",
    panels=(
        PanelSpec(
            "Tier P&L per month",
            "table",
            """
SELECT month, tier, active_subscribers, subscription_revenue, overage_revenue, credit_revenue,
    revenue, inference_cost, gross_margin, margin_pct, users_cost_over_pay_pct,
    cost_p50, cost_p90, cost_p99, top1pct_cost_share_pct
FROM {db}.tier_pnl(org = """
            + ORG_VALUE
            + """)
WHERE """
            + MONTHS
            + """
ORDER BY month DESC, tier""",
            (
                "month",
                "tier",
                "active_subscribers",
                "revenue",
                "inference_cost",
                "gross_margin",
                "margin_pct",
                "users_cost_over_pay_pct",
                "cost_p50",
                "cost_p90",
                "cost_p99",
                "top1pct_cost_share_pct",
            ),
            width=24,
        ),
        PanelSpec(
            "Revenue, cost and margin per tier",
            "barchart",
            """
SELECT tier, sum(revenue) AS revenue, sum(inference_cost) AS inference_cost,
    sum(gross_margin) AS gross_margin
FROM {db}.tier_pnl(org = """
            + ORG_VALUE
            + """)
WHERE """
            + MONTHS
            + """
GROUP BY tier ORDER BY tier""",
            ("tier", "revenue", "inference_cost", "gross_margin"),
            unit="currencyUSD",
        ),
        PanelSpec(
            "Gross margin % per tier and month",
            "timeseries",
            """
SELECT toDateTime(month) AS time, tier, margin_pct
FROM {db}.tier_pnl(org = """
            + ORG_VALUE
            + """)
WHERE """
            + MONTHS
            + """ AND margin_pct IS NOT NULL
ORDER BY time""",
            ("time", "tier", "margin_pct"),
            unit="percent",
        ),
        PanelSpec(
            "Savings by cause (list value - cost)",
            "barchart",
            """
SELECT tier, sum(saved_prompt_cache) AS prompt_cache, sum(saved_semantic_cache) AS semantic_cache,
    sum(saved_routing) AS routing, sum(saved_service_tier) AS service_tier
FROM {db}.tier_pnl(org = """
            + ORG_VALUE
            + """)
WHERE """
            + MONTHS
            + """
GROUP BY tier ORDER BY tier""",
            ("tier", "prompt_cache", "semantic_cache", "routing", "service_tier"),
            unit="currencyUSD",
        ),
        PanelSpec(
            "Inference cost per tier",
            "timeseries",
            """
SELECT $__timeInterval(occurred_at) AS time, toString(plan_id) AS tier,
    sum(toDecimal256(cost, 24)) AS cost
FROM {db}.priced_events FINAL
WHERE $__timeFilter(occurred_at) AND """
            + ORG
            + """
GROUP BY time, tier ORDER BY time""",
            ("time", "tier", "cost"),
            unit="currencyUSD",
        ),
        PanelSpec(
            "Heaviest users",
            "table",
            """
SELECT month, user_id, org_id, plan_id AS tier, requests, cost, revenue, margin, capped
FROM {db}.user_month_pnl
WHERE """
            + MONTHS
            + " AND "
            + ORG
            + """
ORDER BY cost DESC LIMIT 50""",
            ("month", "user_id", "tier", "requests", "cost", "revenue", "margin"),
        ),
        PanelSpec(
            "Cap outcomes per tier",
            "table",
            """
SELECT tier, sum(users_alerted) AS users_alerted, sum(users_capped) AS users_capped,
    sum(users_blocked) AS users_blocked, sum(users_downgraded) AS users_downgraded,
    sum(requests_downgraded) AS requests_downgraded, sum(users_overage) AS users_overage,
    sum(overage_revenue) AS overage_billed
FROM {db}.tier_pnl(org = """
            + ORG_VALUE
            + """)
WHERE """
            + MONTHS
            + """
GROUP BY tier ORDER BY tier""",
            ("tier", "users_alerted", "users_capped", "requests_downgraded", "overage_billed"),
        ),
    ),
)

CAPS = DashboardSpec(
    uid="spendstream-caps",
    title="Caps and alerts (real time)",
    time_from="now-1h",
    refresh="10s",
    panels=(
        PanelSpec(
            "Alerts by threshold",
            "timeseries",
            """
SELECT $__timeInterval(detected_at) AS time,
    concat(toString(kind), ' ', toString(threshold), '%') AS alert, count() AS alerts
FROM {db}.alerts FINAL
WHERE $__timeFilter(detected_at) AND """
            + ORG
            + """
GROUP BY time, alert ORDER BY time""",
            ("time", "alert", "alerts"),
        ),
        PanelSpec(
            "Users by enforcement state (latest)",
            "barchart",
            """
SELECT current_state AS state, count() AS users
FROM (
    SELECT user_id, argMax(state, version) AS current_state, argMax(org_id, version) AS org
    FROM {db}.enforcement_changes FINAL
    GROUP BY user_id
)
WHERE """
            + org_filter("org")
            + """
GROUP BY state ORDER BY state""",
            ("state", "users"),
        ),
        PanelSpec(
            "Users capped now",
            "table",
            """
SELECT user_id, org, plan, current_state AS state, why, capped_window, downgrade_model,
    until_time AS until, as_of_time AS as_of
FROM (
    SELECT user_id, argMax(org_id, version) AS org, argMax(plan_id, version) AS plan,
        argMax(state, version) AS current_state, argMax(reason, version) AS why,
        argMax(window, version) AS capped_window, argMax(downgrade_to, version) AS downgrade_model,
        argMax(until, version) AS until_time, max(as_of) AS as_of_time
    FROM {db}.enforcement_changes FINAL
    GROUP BY user_id
)
WHERE current_state IN ('blocked', 'downgrade', 'warn') AND """
            + org_filter("org")
            + """
ORDER BY as_of DESC LIMIT 100""",
            ("user_id", "org", "plan", "state", "why", "until"),
            width=24,
        ),
        PanelSpec(
            "Enforcement changes by state",
            "timeseries",
            """
SELECT $__timeInterval(updated_at) AS time, toString(state) AS state, count() AS changes
FROM {db}.enforcement_changes FINAL
WHERE $__timeFilter(updated_at) AND """
            + ORG
            + """
GROUP BY time, state ORDER BY time""",
            ("time", "state", "changes"),
        ),
        PanelSpec(
            "Overage billed and credits drawn",
            "timeseries",
            """
SELECT $__timeInterval(detected_at) AS time,
    sumIf(toDecimal256(amount, 24), record = 'overage') AS overage,
    sumIf(toDecimal256(amount, 24), record = 'credit_draw') AS credits
FROM {db}.overages FINAL
WHERE $__timeFilter(detected_at) AND """
            + ORG
            + """
GROUP BY time ORDER BY time""",
            ("time", "overage", "credits"),
            unit="currencyUSD",
        ),
    ),
)

PIPELINE = DashboardSpec(
    uid="spendstream-pipeline",
    title="Pipeline health",
    time_from="now-1h",
    refresh="10s",
    org_variable=False,
    panels=(
        PanelSpec(
            "Priced events per interval (throughput)",
            "timeseries",
            """
SELECT $__timeInterval(processed_at) AS time, count() AS events
FROM {db}.priced_events
WHERE $__timeFilter(processed_at)
GROUP BY time ORDER BY time""",
            ("time", "events"),
        ),
        PanelSpec(
            "Lag: event time to priced (seconds)",
            "timeseries",
            """
SELECT $__timeInterval(processed_at) AS time,
    quantile(0.5)(dateDiff('millisecond', occurred_at, processed_at)) / 1000 AS p50_s,
    quantile(0.99)(dateDiff('millisecond', occurred_at, processed_at)) / 1000 AS p99_s
FROM {db}.priced_events
WHERE $__timeFilter(processed_at)
GROUP BY time ORDER BY time""",
            ("time", "p50_s", "p99_s"),
            unit="s",
        ),
        PanelSpec(
            "Dead letters by stage",
            "timeseries",
            """
SELECT $__timeInterval(received_at) AS time, toString(stage) AS stage, count() AS dead_letters
FROM {db}.dead_letters FINAL
WHERE $__timeFilter(received_at)
GROUP BY time, stage ORDER BY time""",
            ("time", "stage", "dead_letters"),
        ),
        PanelSpec(
            "Dead-letter reasons",
            "table",
            """
SELECT toString(stage) AS stage, substring(reason, 1, 120) AS short_reason, count() AS messages
FROM {db}.dead_letters FINAL
WHERE $__timeFilter(received_at)
GROUP BY stage, short_reason ORDER BY messages DESC LIMIT 20""",
            ("stage", "short_reason", "messages"),
        ),
        PanelSpec(
            "Late and unknown-model events",
            "timeseries",
            """
SELECT $__timeInterval(processed_at) AS time, countIf(late) AS late_events,
    countIf(unknown_model) AS unknown_model_events, count() AS events
FROM {db}.priced_events
WHERE $__timeFilter(processed_at)
GROUP BY time ORDER BY time""",
            ("time", "late_events", "unknown_model_events", "events"),
        ),
        PanelSpec(
            "Lateness of events (arrival after event time)",
            "barchart",
            """
SELECT multiIf(d < 1, '1: < 1 s', d < 10, '2: 1-10 s', d < 60, '3: 10-60 s',
    d < 300, '4: 1-5 min', '5: > 5 min') AS lateness, count() AS events
FROM (
    SELECT dateDiff('second', occurred_at, processed_at) AS d
    FROM {db}.priced_events
    WHERE $__timeFilter(processed_at)
)
GROUP BY lateness ORDER BY lateness""",
            ("lateness", "events"),
        ),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (TIER_PNL, CAPS, PIPELINE)


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def _tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.NONE)
    )


def _panel(spec: PanelSpec, database: str, x: int, y: int) -> cogbuilder.Builder[models.Panel]:
    fmt: Literal["table", "time_series"] = "time_series" if spec.kind == "timeseries" else "table"
    target = ClickHouseQueryBuilder(spec.query(database), fmt)
    # Each kind sets its options explicitly: the SDK leaves ``options`` null until one is set.
    panel: timeseries.Panel | table.Panel | barchart.Panel | stat.Panel
    if spec.kind == "timeseries":
        panel = timeseries.Panel().legend(_legend()).tooltip(_tooltip())
    elif spec.kind == "table":
        panel = table.Panel().show_header(True)
    elif spec.kind == "barchart":
        panel = barchart.Panel().x_field(spec.columns[0]).legend(_legend()).tooltip(_tooltip())
    else:
        panel = stat.Panel().reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"])
        )
    panel = (
        panel.title(spec.title)
        .datasource(DATASOURCE)
        .with_target(target)
        .grid_pos(models.GridPos(h=spec.height, w=spec.width, x=x, y=y))
    )
    if spec.unit:
        panel = panel.unit(spec.unit)
    if spec.description:
        panel = panel.description(spec.description)
    return panel


def build_dashboard(spec: DashboardSpec, database: str = "spendstream") -> dict[str, object]:
    """The dashboard JSON model of ``spec``."""
    board = (
        dash.Dashboard(spec.title)
        .uid(spec.uid)
        .tags(list(spec.tags))
        .time(spec.time_from, "now")
        .timezone("utc")
        .editable()
    )
    if spec.refresh:
        board = board.refresh(spec.refresh)
    if spec.org_variable:
        board = board.with_variable(
            dash.TextBoxVariable("org")
            .label("Organisation (empty = all)")
            .default_value("")
            .current(models.VariableOption(selected=True, text="", value=""))
        )
    x = y = 0
    row_height = 0
    for panel in spec.panels:
        if x + panel.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        board = board.with_panel(_panel(panel, database, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    model = board.build()
    data: dict[str, object] = json.loads(json.dumps(model, cls=JSONEncoder))
    return data


def dashboard_file(spec: DashboardSpec) -> str:
    """File name of a dashboard: its uid without the prefix."""
    return spec.uid.removeprefix("spendstream-") + ".json"


def render_dashboards(database: str = "spendstream") -> dict[str, str]:
    """File name -> JSON text of every dashboard (stable: sorted keys, trailing newline)."""
    return {
        dashboard_file(spec): json.dumps(build_dashboard(spec, database), indent=2, sort_keys=True)
        + "\n"
        for spec in DASHBOARDS
    }


def write_dashboards(folder: Path, database: str = "spendstream") -> list[Path]:
    """Write every dashboard into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_dashboards(database).items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# -- macro expansion (what the plugin does before sending a query) --------------------------

_TIME_FILTER = re.compile(r"\$__timeFilter\(([^)]+)\)")
_TIME_INTERVAL = re.compile(r"\$__timeInterval\(([^)]+)\)")
# Grafana's variable syntaxes: ${name}, ${name:format}, [[name]], [[name:format]], $name.
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")


def format_variable(value: str, fmt: str | None = None) -> str:
    """``value`` written as Grafana's variable formatter ``fmt`` writes a single value.

    ``None`` (no format given) and ``raw``: the value as is (the ClickHouse plugin's default
    for one value); ``percentencode``: RFC 3986 percent-encoding of the UTF-8 bytes, leaving
    only letters, digits and ``-_.~``; ``sqlstring``: quoted, ``'`` doubled and ``"`` escaped.
    """
    if fmt is None or fmt == "raw":
        return value
    if fmt == "percentencode":
        return quote(value, safe="")
    if fmt == "sqlstring":
        return "'" + value.replace("'", "''").replace('"', '\\"') + "'"
    raise ValueError(f"variable format {fmt!r} is not modelled here")


def expand_macros(
    sql: str,
    *,
    from_s: int,
    to_s: int,
    interval_s: int = 60,
    variables: dict[str, str] | None = None,
) -> str:
    """Expand the ClickHouse plugin's macros and ``${var}`` as Grafana would for a range.

    ``$__timeFilter(c)`` -> ``c >= toDateTime(from) AND c <= toDateTime(to)``,
    ``$__timeInterval(c)`` -> ``toStartOfInterval(toDateTime(c), INTERVAL n second)``,
    ``$__fromTime`` / ``$__toTime`` -> ``toDateTime(epoch)`` (the plugin's v4 expansions).
    A variable in ``variables`` is written through its format (:func:`format_variable`); any
    other ``$name`` is left in place.
    """
    out = _TIME_FILTER.sub(
        lambda m: f"{m[1]} >= toDateTime({from_s}) AND {m[1]} <= toDateTime({to_s})", sql
    )
    out = _TIME_INTERVAL.sub(
        lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)", out
    )
    out = out.replace("$__fromTime", f"toDateTime({from_s})")
    out = out.replace("$__toTime", f"toDateTime({to_s})")
    out = out.replace("$__interval_s", str(interval_s))
    values = variables or {}

    def substitute(m: re.Match[str]) -> str:
        name = m[1] or m[3] or m[5]
        if name not in values:
            return m[0]
        return format_variable(values[name], m[2] or m[4])

    return _VARIABLE.sub(substitute, out)


def panel_specs() -> Sequence[tuple[DashboardSpec, PanelSpec]]:
    """Every (dashboard, panel) pair, for tests and docs."""
    return [(d, p) for d in DASHBOARDS for p in d.panels]
