"""What-if replay: the stored usage of one month re-run under alternative plans and/or prices.

``spendstream whatif --plans ALT.yaml [--prices ALT.json] [--period 2026-11] [--org ORG]``
computes, per tier and in ClickHouse SQL (:data:`WHATIF_SQL`), subscription revenue, overage
revenue, inference cost, margin and cap outcomes twice: with the plans and prices in force
("current") and with the alternative, and prints them side by side. Plans and prices reach SQL
as array query parameters, never as SQL text, so the replay is read-only and runs through the
owner of the embedded store while a sink or the demo holds it.

The replay model (what it can and cannot know):

* Revenue: each subscription period prorated to the second over the month at the scenario's
  monthly price (as in the P&L views), plus the overage the scenario would bill.
* Cost: the stored cost of each event, or, for served models the ``--prices`` sheet lists, the
  same tokens re-priced with it (docs/DESIGN.md, "Exact money"; a semantic-cache hit stays free).
* Caps: every fixed window (billing_month, calendar_day, week) of the event's plan is replayed
  per user and window instance in event-time order: an event whose window usage *before* it is
  at or over the allowance is blocked (cost 0) or downgraded (its tokens priced at the
  downgrade model, when a price for it is known, else its cost stays). Usage served by a
  window's exempt models does not count there. Then the overage window bills, per event, the
  increase of ``floor(overage so far x unit_price)`` up to the ceiling (as the caps stage
  does); events after the ceiling is billed are blocked. Credits are not replayed: overage
  revenue is the gross overage value (credits drawn plus overage billed).
* Limits: windows are computed in UTC (billing months from the billing anchor instant);
  rolling-hour windows are not replayed; a window only sees the month and the month before it
  (enough for any billing month that overlaps the period); a replay sees only requests that
  were served, so it cannot add the demand that a stricter current cap refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas.plans import DowngradeAtCap, OverageAtCap, PlanCatalog
from sinks import Store
from spendstream.errors import ConfigError
from stream_processors import PriceCatalog, units_to_decimal

_COST = """(
    toDecimal128({p}.in_price * (toInt64({e}.input_tokens) - toInt64({e}.cached_input_tokens)
        - toInt64({e}.cache_write_tokens)), 24)
    + {p}.cr_price * {e}.cached_input_tokens
    + {p}.cw_price * {e}.cache_write_tokens
    + toDecimal128({p}.out_price * (toInt64({e}.output_tokens)
        - toInt64({e}.reasoning_tokens)), 24)
    + {p}.rs_price * {e}.reasoning_tokens)"""


def _price_cte(prefix: str) -> str:
    return f"""(
    SELECT t.1 AS model, toDecimal128(t.2, 24) AS in_price, toDecimal128(t.3, 24) AS cr_price,
        toDecimal128(t.4, 24) AS cw_price, toDecimal128(t.5, 24) AS out_price,
        toDecimal128(t.6, 24) AS rs_price
    FROM (SELECT arrayJoin(arrayZip({{{prefix}_model:Array(String)}}, {{{prefix}_in:Array(String)}},
        {{{prefix}_cr:Array(String)}}, {{{prefix}_cw:Array(String)}},
        {{{prefix}_out:Array(String)}}, {{{prefix}_rs:Array(String)}})) AS t)
)"""


WHATIF_SQL = (
    """
WITH
plans_p AS (
    SELECT t.1 AS plan_id, toDecimal128(t.2, 24) AS monthly_price
    FROM (SELECT arrayJoin(arrayZip({p_id:Array(String)}, {p_price:Array(String)})) AS t)
),
windows_p AS (
    SELECT t.1 AS plan_id, t.2 AS window, t.3 AS kind, t.4 AS unit,
        toDecimal128(t.5, 24) AS allowance, t.6 AS action, t.7 AS dg_model,
        toDecimal128OrZero(t.8, 24) AS unit_price,
        if(t.9 = '', NULL, toDecimal128OrZero(t.9, 24)) AS ceiling,
        arrayFilter(m -> m != '', splitByChar('|', t.10)) AS exempt
    FROM (SELECT arrayJoin(arrayZip({w_plan:Array(String)}, {w_name:Array(String)},
        {w_kind:Array(String)}, {w_unit:Array(String)}, {w_allowance:Array(String)},
        {w_action:Array(String)}, {w_model:Array(String)}, {w_unit_price:Array(String)},
        {w_ceiling:Array(String)}, {w_exempt:Array(String)})) AS t)
    WHERE t.3 != 'rolling_hours'
),
rp AS """
    + _price_cte("r")
    + """,
dp AS """
    + _price_cte("d")
    + """,
ev AS (
    SELECT
        e.event_id AS event_id, e.user_id AS user_id, toString(e.plan_id) AS plan_id,
        e.occurred_at AS occurred_at, toString(e.served_model) AS served_model,
        e.input_tokens AS input_tokens, e.cached_input_tokens AS cached_input_tokens,
        e.cache_write_tokens AS cache_write_tokens, e.output_tokens AS output_tokens,
        e.reasoning_tokens AS reasoning_tokens, e.semantic_cache_hit AS hit,
        if(hit OR rp.model = '', e.cost, """
    + _COST.format(p="rp", e="e")
    + """) AS cost0,
        s.billing_anchor AS anchor
    FROM (
        SELECT * FROM {db}.priced_events FINAL
        WHERE occurred_at >= addMonths(toDateTime64({month:Date}, 6, 'UTC'), -1)
            AND occurred_at < addMonths(toDateTime64({month:Date}, 6, 'UTC'), 1)
            AND ({org:String} = '' OR org_id = {org:String})
    ) AS e
    LEFT JOIN rp ON rp.model = toString(e.served_model)
    LEFT JOIN (SELECT user_id, billing_anchor FROM {db}.subscriptions FINAL) AS s
        ON s.user_id = e.user_id
),
ev_w AS (
    SELECT
        ev.*, w.window AS window, w.kind AS kind, w.unit AS unit, w.allowance AS allowance,
        w.action AS action, w.dg_model AS dg_model, w.unit_price AS unit_price,
        w.ceiling AS ceiling, has(w.exempt, ev.served_model) AS exempt,
        multiIf(
            kind = 'calendar_day', toDateTime64(toStartOfDay(occurred_at), 6, 'UTC'),
            kind = 'week', toDateTime64(toMonday(occurred_at), 6, 'UTC'),
            addMonths(anchor, dateDiff('month', anchor, occurred_at)
                - (addMonths(anchor, dateDiff('month', anchor, occurred_at)) > occurred_at))
        ) AS instance
    FROM ev INNER JOIN windows_p AS w ON w.plan_id = ev.plan_id
),
capped AS (
    SELECT
        event_id, user_id,
        max(NOT exempt AND action = 'block' AND used_before >= allowance) AS blocked,
        argMinIf(dg_model, window,
            NOT exempt AND action = 'downgrade' AND used_before >= allowance) AS dg_to
    FROM (
        SELECT *, running - usage AS used_before
        FROM (
            SELECT event_id, user_id, window, action, dg_model, allowance, exempt,
                if(exempt, toDecimal128(0, 24), multiIf(unit = 'usd', cost0,
                    unit = 'tokens', toDecimal128(input_tokens + output_tokens, 24),
                    toDecimal128(1, 24))) AS usage,
                sum(usage) OVER (PARTITION BY user_id, window, instance
                    ORDER BY occurred_at, event_id
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running
            FROM ev_w WHERE action != 'overage'
        )
    )
    GROUP BY event_id, user_id
),
ev2 AS (
    SELECT
        ev.event_id AS event_id, ev.user_id AS user_id, ev.plan_id AS plan_id,
        ev.occurred_at AS occurred_at, c.blocked AS blocked,
        c.dg_to != '' AND NOT c.blocked AS downgraded,
        multiIf(c.blocked, toDecimal128(0, 24),
            downgraded AND NOT ev.hit AND dp.model != '', """
    + _COST.format(p="dp", e="ev")
    + """,
            ev.cost0) AS cost1
    FROM ev
    LEFT JOIN capped AS c ON c.event_id = ev.event_id AND c.user_id = ev.user_id
    LEFT JOIN dp ON dp.model = c.dg_to
),
ov AS (
    SELECT
        event_id, user_id,
        toDecimal128(multiplyDecimal(greatest(running - allowance, toDecimal128(0, 24)),
            unit_price, 24), 24) AS v_after,
        toDecimal128(multiplyDecimal(greatest(running - usage - allowance, toDecimal128(0, 24)),
            unit_price, 24), 24) AS v_before,
        ceiling IS NOT NULL AND v_before >= assumeNotNull(ceiling) AS over_ceiling,
        if(ceiling IS NULL, v_after, least(v_after, assumeNotNull(ceiling)))
            - if(ceiling IS NULL, v_before, least(v_before, assumeNotNull(ceiling))) AS amount,
        running > allowance AS over
    FROM (
        SELECT ew.event_id AS event_id, ew.user_id AS user_id, ew.allowance AS allowance,
            ew.unit_price AS unit_price, ew.ceiling AS ceiling,
            if(ew.exempt, toDecimal128(0, 24), multiIf(ew.unit = 'usd', e2.cost1,
                ew.unit = 'tokens', toDecimal128(ew.input_tokens + ew.output_tokens, 24),
                toDecimal128(1, 24))) AS usage,
            sum(usage) OVER (PARTITION BY ew.user_id, ew.window, ew.instance
                ORDER BY ew.occurred_at, ew.event_id
                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running
        FROM ev_w AS ew
        INNER JOIN ev2 AS e2 ON e2.event_id = ew.event_id AND e2.user_id = ew.user_id
        WHERE ew.action = 'overage' AND NOT e2.blocked
    )
),
fe AS (
    SELECT
        ev2.plan_id AS plan_id, ev2.user_id AS user_id,
        ev2.blocked OR ov.over_ceiling AS blocked,
        ev2.downgraded AND NOT ov.over_ceiling AS downgraded,
        if(ov.over_ceiling, toDecimal128(0, 24), ev2.cost1) AS cost,
        ov.amount AS overage, ov.over AS over
    FROM ev2
    LEFT JOIN ov ON ov.event_id = ev2.event_id AND ov.user_id = ev2.user_id
    WHERE ev2.occurred_at >= toDateTime64({month:Date}, 6, 'UTC')
),
usage_t AS (
    SELECT
        plan_id,
        countIf(NOT blocked) AS requests,
        sum(toDecimal256(cost, 24)) AS inference_cost,
        sum(toDecimal256(overage, 24)) AS overage_revenue,
        countIf(blocked) AS requests_blocked,
        countIf(downgraded) AS requests_downgraded,
        uniqExactIf(user_id, blocked OR downgraded OR over) AS users_capped,
        uniqExactIf(user_id, overage > 0) AS users_overage
    FROM fe
    GROUP BY plan_id
),
subs_t AS (
    SELECT
        s.plan_id AS plan_id,
        sum(toDecimal128(s.active_s, 24) / s.month_s) AS subscribers,
        sum(toDecimal256(pl.monthly_price, 24) * s.active_s / s.month_s)
            AS subscription_revenue
    FROM {db}.subscription_months AS s
    LEFT JOIN plans_p AS pl ON pl.plan_id = s.plan_id
    WHERE s.month = {month:Date} AND ({org:String} = '' OR s.org_id = {org:String})
    GROUP BY plan_id
)
SELECT
    plan_id AS tier,
    subscribers,
    subscription_revenue,
    overage_revenue,
    subscription_revenue + overage_revenue AS revenue,
    requests,
    inference_cost,
    revenue - inference_cost AS gross_margin,
    if(revenue = 0, NULL,
        divideDecimal(gross_margin * 100, revenue, 4)) AS margin_pct,
    users_capped,
    requests_blocked,
    requests_downgraded,
    users_overage
FROM subs_t
FULL OUTER JOIN usage_t USING (plan_id)
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], tier) = 0,
    indexOf(['free', 'pro', 'team', 'enterprise'], tier), tier
"""
)
"""The replay, one row per tier. ``{db}`` is the validated database name; everything else is a
query parameter (see :func:`scenario_parameters`)."""

MODELS_SQL = """
SELECT DISTINCT toString(served_model)
FROM {db}.priced_events
WHERE occurred_at >= addMonths(toDateTime64({{month:Date}}, 6, 'UTC'), -1)
    AND occurred_at < addMonths(toDateTime64({{month:Date}}, 6, 'UTC'), 1)
"""

COMPARED = (
    "subscribers",
    "subscription_revenue",
    "overage_revenue",
    "revenue",
    "inference_cost",
    "gross_margin",
    "margin_pct",
    "users_capped",
    "requests_blocked",
    "requests_downgraded",
    "users_overage",
)
"""The columns printed current vs alternative."""


def _text(value: Decimal) -> str:
    return format(value, "f")


def _price_params(prefix: str, prices: Mapping[str, Any]) -> dict[str, list[str]]:
    """Parallel arrays of a price sheet (``prices``: model -> ModelPrice in 1e-24 units)."""
    out: dict[str, list[str]] = {
        f"{prefix}_{k}": [] for k in ("model", "in", "cr", "cw", "out", "rs")
    }
    for model in sorted(prices):
        p = prices[model]
        out[f"{prefix}_model"].append(model)
        for key, units in (
            ("in", p.input),
            ("cr", p.cache_read),
            ("cw", p.cache_write),
            ("out", p.output),
            ("rs", p.reasoning),
        ):
            out[f"{prefix}_{key}"].append(_text(units_to_decimal(units)))
    return out


def downgrade_models(plans: PlanCatalog) -> set[str]:
    """Every downgrade target of ``plans``."""
    return {
        w.at_cap.model for p in plans for w in p.windows if isinstance(w.at_cap, DowngradeAtCap)
    }


def scenario_parameters(
    plans: PlanCatalog,
    *,
    month: date,
    org: str = "",
    reprice: Mapping[str, Any] | None = None,
    downgrade_prices: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Query parameters of :data:`WHATIF_SQL` for one scenario.

    ``reprice``: served model -> ModelPrice of the models whose stored cost is replaced;
    ``downgrade_prices``: model -> ModelPrice of downgrade targets.
    """
    params: dict[str, Any] = {
        "month": month.isoformat(),
        "org": org,
        "p_id": [p.id for p in plans],
        "p_price": [_text(p.monthly_price) for p in plans],
    }
    cols: dict[str, list[str]] = {
        k: []
        for k in (
            "w_plan",
            "w_name",
            "w_kind",
            "w_unit",
            "w_allowance",
            "w_action",
            "w_model",
            "w_unit_price",
            "w_ceiling",
            "w_exempt",
        )
    }
    for plan in plans:
        for w in plan.windows:
            cap = w.at_cap
            if any("|" in m for m in w.exempt_models):
                raise ConfigError(f"plan {plan.id} window {w.name}: a model name contains '|'")
            cols["w_plan"].append(plan.id)
            cols["w_name"].append(w.name)
            cols["w_kind"].append(w.kind)
            cols["w_unit"].append(w.unit)
            cols["w_allowance"].append(_text(w.allowance))
            cols["w_action"].append(cap.action)
            cols["w_model"].append(cap.model if isinstance(cap, DowngradeAtCap) else "")
            over = isinstance(cap, OverageAtCap)
            cols["w_unit_price"].append(_text(cap.unit_price) if over else "")  # type: ignore[union-attr]
            ceiling = cap.ceiling_usd if isinstance(cap, OverageAtCap) else None
            cols["w_ceiling"].append("" if ceiling is None else _text(ceiling))
            cols["w_exempt"].append("|".join(sorted(w.exempt_models)))
    params.update(cols)
    params.update(_price_params("r", reprice or {}))
    params.update(_price_params("d", downgrade_prices or {}))
    return params


@dataclass
class WhatIfResult:
    """Per tier, the replay under the current and under the alternative scenario."""

    month: date
    org: str
    current: list[dict[str, Any]]
    alternative: list[dict[str, Any]]

    def tiers(self) -> list[str]:
        """Tiers in either scenario, current order first."""
        names = [r["tier"] for r in self.current]
        return names + [r["tier"] for r in self.alternative if r["tier"] not in names]

    def row(self, side: str, tier: str) -> dict[str, Any]:
        """The row of ``tier`` in ``side`` ('current' or 'alternative'), {} if absent."""
        rows = self.current if side == "current" else self.alternative
        return next((r for r in rows if r["tier"] == tier), {})


def _lookup(catalogs: Iterable[PriceCatalog | None], models: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        for catalog in catalogs:
            price = catalog.lookup(model) if catalog is not None else None
            if price is not None:
                out[model] = price
                break
    return out


def run_whatif(
    store: Store,
    current_plans: PlanCatalog,
    alt_plans: PlanCatalog | None,
    *,
    month: date,
    org: str = "",
    current_prices: PriceCatalog | None = None,
    alt_prices: PriceCatalog | None = None,
) -> WhatIfResult:
    """Replay ``month`` under the current scenario and the alternative one.

    The alternative is ``alt_plans`` (default: the current plans) with ``alt_prices`` (a
    price sheet; models it lists are re-priced, others keep their stored cost). Downgrade
    targets are priced from ``alt_prices`` then ``current_prices`` (the current scenario
    from ``current_prices`` only).
    """
    sql = WHATIF_SQL.replace("{db}", store.database)
    alt_plans = alt_plans or current_plans
    current = store.query(
        sql,
        scenario_parameters(
            current_plans,
            month=month,
            org=org,
            downgrade_prices=_lookup([current_prices], downgrade_models(current_plans)),
        ),
    )
    reprice: dict[str, Any] = {}
    if alt_prices is not None:
        _, rows = store.query(MODELS_SQL.format(db=store.database), {"month": month.isoformat()})
        reprice = _lookup([alt_prices], [str(r[0]) for r in rows])
    alternative = store.query(
        sql,
        scenario_parameters(
            alt_plans,
            month=month,
            org=org,
            reprice=reprice,
            downgrade_prices=_lookup([alt_prices, current_prices], downgrade_models(alt_plans)),
        ),
    )

    def dicts(result: tuple[list[str], list[tuple[Any, ...]]]) -> list[dict[str, Any]]:
        return [dict(zip(result[0], r, strict=True)) for r in result[1]]

    return WhatIfResult(month, org, dicts(current), dicts(alternative))


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "margin_pct":
        return f"{Decimal(value):,.1f} %"
    if column == "subscribers":
        return f"{Decimal(value):,.2f}"
    if isinstance(value, Decimal):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _delta(column: str, a: Any, b: Any) -> str:
    if a is None or b is None:
        return ""
    diff = Decimal(b) - Decimal(a)
    if not diff:
        return "="
    sign = "+" if diff > 0 else ""
    if column == "margin_pct":
        return f"{sign}{diff:,.1f} pt"
    if isinstance(a, int) and isinstance(b, int):
        return f"{sign}{int(diff):,}"
    return f"{sign}{diff:,.2f}"


def render(result: WhatIfResult, console: Console) -> None:
    """One table per tier: metric, current, alternative, change (stored text printed literally)."""
    from spendstream.commands._safe import safe_text

    when = result.month.strftime("%Y-%m")
    who = f" - org {result.org}" if result.org else ""
    for tier in result.tiers():
        cur, alt = result.row("current", tier), result.row("alternative", tier)
        table = Table(
            title=safe_text(f"What-if {when}{who}: tier {tier or '(no plan)'}"),
            title_justify="left",
        )
        for name in ("metric", "current", "alternative", "change"):
            table.add_column(name, justify="left" if name == "metric" else "right")
        for col in COMPARED:
            a, b = cur.get(col), alt.get(col)
            table.add_row(col.replace("_", " "), _fmt(col, a), _fmt(col, b), _delta(col, a, b))
        console.print(table)


def result_json(result: WhatIfResult) -> dict[str, Any]:
    """Plain data for ``--format json`` (money as decimal strings)."""

    def value(v: Any) -> Any:
        if isinstance(v, Decimal):
            return format(v.normalize(), "f") if v else "0"
        return v

    return {
        "month": result.month.isoformat()[:7],
        "org": result.org or None,
        "tiers": [
            {
                "tier": tier,
                "current": {k: value(v) for k, v in result.row("current", tier).items()},
                "alternative": {k: value(v) for k, v in result.row("alternative", tier).items()},
            }
            for tier in result.tiers()
        ],
    }
