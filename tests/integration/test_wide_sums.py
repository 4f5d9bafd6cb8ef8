"""The usage and P&L views sum money without wrapping, on the real engine (chDB).

``sum()`` over a ``Decimal(38, 24)`` column returns ``Decimal(38, 24)`` and wraps silently past
its range (about 1.7 * 10^14), and so does a product such as ``monthly_price * active_s``. The
rows below are at the top of what one stored value may hold, in numbers that make every sum
(and the proration product of a plan at the largest price a plan file accepts) leave that range;
the expected values are computed here with Python decimals at ample precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import ROUND_DOWN, Decimal, DefaultContext, localcontext
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import sinks._store
from producers._subscriptions import encode_subscription
from schemas import PlanPeriod, Subscription
from schemas.plans import MAX_PLAN_AMOUNT, parse_plans
from sinks import ChdbStore, load_migrations
from sinks._buffer import SUBSCRIPTIONS
from sinks._store import apply_migrations
from spendstream.analytics import build_report, load_plans_into, report_json
from spendstream.analytics.html import render_html
from spendstream.analytics.report import render
from spendstream.bench.sink import sample_priced_event

pytestmark = pytest.mark.integration

D = Decimal
NOV = date(2026, 11, 1)
MONTH_S = 30 * 86400
MAX = D("99999999999999.999999999999999999999999")  # the largest Decimal(38, 24)
TINY = D("0.000000000000000000000001")  # the smallest positive one
N = 20  # rows of MAX: every sum of them is about 2 * 10^15
MONEY = ("cost", "list_value", "saved_prompt_cache", "saved_semantic_cache", "saved_routing")
# per-column values of the big rows (each sum leaves Decimal(38, 24))
BIG = {
    "cost": MAX,
    "list_value": MAX,
    "saved_prompt_cache": D("99999999999999"),
    "saved_semantic_cache": D("50000000000000.000000000000000000000001"),
    "saved_routing": D("88888888888888.888888888888888888888888"),
}
WIDE = (
    "subscription_revenue",
    "overage_revenue",
    "credit_revenue",
    "revenue",
    "margin",
    "inference_cost",
    "gross_margin",
    "saved_total",
    "cost_p50",
    "cost_p90",
    "cost_p99",
)
TOKENS = 10**8  # the contract's largest token count of one call

WINDOWS = [  # caps are not what this tests: a window no row reaches
    {
        "name": "daily",
        "kind": "calendar_day",
        "unit": "requests",
        "allowance": "1000000",
        "at_cap": {"action": "block"},
    }
]
PLANS = {
    "plans": [
        {"id": "whale", "monthly_price": str(MAX_PLAN_AMOUNT), "windows": WINDOWS},
        {"id": "tiny", "monthly_price": format(TINY, "f"), "windows": WINDOWS},
    ]
}


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _sub(user: str, plan: str, since: str) -> Subscription:
    period = PlanPeriod(plan_id=plan, effective_at=_t(since))
    return Subscription(
        user_id=user, org_id="acme", billing_anchor=period.effective_at, plans=[period]
    )


SUBS = [
    _sub("w1", "whale", "2026-11-16T00:00:00"),  # 15 of the 30 days of November
    _sub("w2", "whale", "2026-11-01T00:00:00"),
    _sub("t1", "tiny", "2026-11-01T00:00:00"),
]


def _event(n: int, user: str, plan: str, money: dict[str, Decimal], tokens: int) -> dict[str, Any]:
    row = sample_priced_event(n)
    row.update(
        event_id=f"e{n}",
        user_id=user,
        org_id="acme",
        plan_id=plan,
        occurred_at=f"2026-11-20T10:{n // 60:02d}:{n % 60:02d}+00:00",
        requested_model="gpt-4o",
        served_model="gpt-4o",
        input_tokens=tokens,
        cached_input_tokens=tokens,
        cache_write_tokens=tokens,
        output_tokens=tokens,
        reasoning_tokens=tokens,
        **{k: str(v) for k, v in money.items()},
    )
    return row


SMALL = {"cost": D(1), "list_value": D(1)} | {k: D(0) for k in MONEY[2:]}
EVENTS = [
    *[_event(i, "w1", "whale", BIG, TOKENS) for i in range(N)],
    _event(100, "w2", "whale", SMALL, 10),
    *[
        _event(200 + i, "t1", "tiny", {k: MAX if k == "cost" else D(0) for k in MONEY}, 1)
        for i in range(N)
    ],
]


def _overage(record: str, ident: str) -> dict[str, Any]:
    return {
        "record": record,
        "id": ident,
        "user_id": "w1",
        "org_id": "acme",
        "plan_id": "whale",
        "window": "monthly",
        "window_id": "w",
        "window_start": "2026-11-16T00:00:00+00:00",
        "window_end": "2026-12-16T00:00:00+00:00",
        "unit": "usd",
        "event_id": "e0",
        "event_time": "2026-11-20T10:00:00+00:00",
        "quantity": "1",
        "unit_price": str(MAX),
        "value": str(MAX),
        "amount": str(MAX),
        "ceiling_usd": None,
        "balance_after": None,
        "detected_at": "2026-11-20T10:00:01+00:00",
    }


OVERAGES = [_overage("overage", f"o{i}") for i in range(N)] + [
    _overage("credit_draw", f"c{i}") for i in range(N)
]


def _insert(store: ChdbStore, table: str, rows: list[dict[str, Any]], token: str) -> None:
    store.insert(table, {k: [r.get(k) for r in rows] for k in rows[0]}, token)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbStore]:
    s = ChdbStore(tmp_path_factory.mktemp("wide") / "chdb", serve=False)
    try:
        s.migrate()
        load_plans_into(s, parse_plans(PLANS), source="test")
        subs = SUBSCRIPTIONS.to_arrow([SUBSCRIPTIONS.decode(encode_subscription(x)) for x in SUBS])
        s.insert("subscriptions", subs, "subs-1")
        _insert(s, "priced_events", EVENTS, "events-1")
        _insert(s, "overages", OVERAGES, "ov-1")
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _exact() -> Iterator[None]:
    """Python's default 28 significant digits would round the expected sums themselves."""
    with localcontext() as ctx:
        ctx.prec = 120
        yield


def trunc(value: Decimal, places: int) -> Decimal:
    """ClickHouse decimal division truncates toward zero."""
    return value.quantize(D(1).scaleb(-places), rounding=ROUND_DOWN)


def _columns(store: ChdbStore, source: str) -> dict[str, str]:
    """Name -> ClickHouse type of what ``SELECT *`` from ``source`` returns, in order."""
    _, rows = store.query(f"DESCRIBE (SELECT * FROM {source})")
    return {str(r[0]): str(r[1]) for r in rows}


def test_the_sums_leave_decimal_38_24() -> None:
    # the point of the data: Decimal(38, 24) wraps at 2^127 units of 10^-24 USD
    limit = D(2**127).scaleb(-24)
    assert limit < N * MAX
    assert limit < MAX_PLAN_AMOUNT * MONTH_S
    assert all(limit < N * v for v in BIG.values())


@pytest.mark.parametrize("view", ["usage_hourly", "usage_daily"])
def test_usage_views_sum_exactly(store: ChdbStore, view: str) -> None:
    _, rows = store.query(
        f"SELECT plan_id, requests, users, input_tokens, cached_input_tokens, cache_write_tokens,"
        f" output_tokens, reasoning_tokens, {', '.join(MONEY)} FROM spendstream.{view}"
        " ORDER BY plan_id"
    )
    tiny = (
        "tiny",
        N,
        1,
        *[N] * 5,
        N * MAX,
        *[D(0)] * 4,
    )
    whale = (
        "whale",
        N + 1,
        2,
        *[N * TOKENS + 10] * 5,
        *[N * BIG[k] + SMALL[k] for k in MONEY],
    )
    assert rows == [tiny, whale]
    assert all(type(v) is Decimal for v in rows[1][8:])


def test_user_month_pnl_sums_exactly(store: ChdbStore) -> None:
    names, rows = store.query(
        "SELECT * FROM spendstream.user_month_pnl WHERE month = '2026-11-01' ORDER BY user_id"
    )
    by_user = {r[names.index("user_id")]: dict(zip(names, r, strict=True)) for r in rows}
    assert sorted(by_user) == ["t1", "w1", "w2"]

    w1 = by_user["w1"]
    sub = MAX_PLAN_AMOUNT * (15 * 86400) / MONTH_S  # 5 * 10^11, prorated to the second
    assert w1["subscription_revenue"] == sub
    assert w1["overage_revenue"] == N * MAX
    assert w1["credit_revenue"] == N * MAX
    assert w1["revenue"] == sub + 2 * N * MAX
    assert w1["requests"] == N
    for k in MONEY:
        assert w1[k] == N * BIG[k], k
    assert w1["margin"] == sub + 2 * N * MAX - N * MAX
    assert w1["overage_events"] == N

    w2 = by_user["w2"]
    assert w2["subscription_revenue"] == MAX_PLAN_AMOUNT  # a whole month at the largest price
    assert (w2["revenue"], w2["cost"], w2["margin"]) == (
        MAX_PLAN_AMOUNT,
        D(1),
        MAX_PLAN_AMOUNT - 1,
    )

    t1 = by_user["t1"]
    assert (t1["revenue"], t1["cost"], t1["margin"]) == (TINY, N * MAX, TINY - N * MAX)


def test_tier_pnl_sums_exactly(store: ChdbStore) -> None:
    names, rows = store.query(
        "SELECT * FROM spendstream.tier_pnl(org = '') WHERE month = '2026-11-01' ORDER BY tier"
    )
    tiers = {r[names.index("tier")]: dict(zip(names, r, strict=True)) for r in rows}
    assert sorted(tiers) == ["tiny", "whale"]

    whale = tiers["whale"]
    sub = MAX_PLAN_AMOUNT / 2 + MAX_PLAN_AMOUNT
    revenue = sub + 2 * N * MAX
    cost = N * MAX + 1
    assert whale["users"] == 2
    assert whale["active_subscribers"] == D("1.5")
    assert whale["subscription_revenue"] == sub
    assert (whale["overage_revenue"], whale["credit_revenue"]) == (N * MAX, N * MAX)
    assert whale["revenue"] == revenue
    assert whale["requests"] == N + 1
    assert whale["inference_cost"] == cost
    assert whale["list_value"] == N * MAX + 1
    assert whale["gross_margin"] == revenue - cost
    assert whale["margin_pct"] == trunc((revenue - cost) * 100 / revenue, 4)
    assert whale["users_cost_over_pay"] == 0
    assert (whale["cost_p50"], whale["cost_p90"], whale["cost_p99"]) == (N * MAX,) * 3
    # the costliest 1 % of 2 users is w1
    assert whale["top1pct_cost_share_pct"] == trunc(N * MAX * 100 / cost, 4) == D("99.9999")
    for k in MONEY[2:]:
        assert whale[k] == N * BIG[k], k
    assert whale["saved_total"] == 0
    assert whale["overage_events"] == N

    # a tier earning 10^-24 USD against 2 * 10^15 of cost: the margin % has 45 digits
    tiny = tiers["tiny"]
    assert tiny["revenue"] == TINY
    assert tiny["inference_cost"] == N * MAX
    assert tiny["gross_margin"] == TINY - N * MAX
    assert tiny["margin_pct"] == trunc((TINY - N * MAX) * 100 / TINY, 4)
    assert tiny["users_cost_over_pay_pct"] == 100
    assert tiny["top1pct_cost_share_pct"] == 100


PRICE_MODEL_COLUMNS = {"saved_service_tier", "batch_requests", "approximated_requests"}


def test_money_columns_are_wide_and_names_unchanged(store: ChdbStore) -> None:
    """Same columns, in the same order, as the views of 002 and 005; money in Decimal(76, 24)."""
    # the views as 002 and 005 define them, in a second database, for their column names
    store.query("CREATE DATABASE IF NOT EXISTS narrow")
    for migration in load_migrations():
        if migration.version <= 6:
            for statement in migration.statements("narrow"):
                store.query(statement)
    views = {
        "usage_hourly": "{db}.usage_hourly",
        "usage_daily": "{db}.usage_daily",
        "user_month_pnl": "{db}.user_month_pnl",
        "tier_pnl": "{db}.tier_pnl(org = '')",
    }
    for view, source in views.items():
        wide = _columns(store, source.format(db="spendstream"))
        narrow = _columns(store, source.format(db="narrow"))
        # the same columns in the same order; 007 adds the price model's, named here
        assert [c for c in wide if c in narrow] == list(narrow), view
        assert set(wide) - set(narrow) <= PRICE_MODEL_COLUMNS, view
        for name in (*MONEY, *WIDE, "saved_service_tier"):
            if name in wide:
                assert wide[name] == "Decimal(76, 24)", (view, name)


def test_a_store_migrated_before_gets_the_wide_views(
    store: ChdbStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def execute(sql: str) -> None:
        store.query(sql)

    older = [m for m in load_migrations() if m.version <= 6]
    monkeypatch.setattr(sinks._store, "load_migrations", lambda: older)
    assert apply_migrations("upgraded", execute, store.query) == [m.name for m in older]
    columns = ", ".join(_columns(store, "upgraded.priced_events"))
    store.query(
        f"INSERT INTO upgraded.priced_events ({columns}) "
        f"SELECT {columns} FROM spendstream.priced_events"
    )
    sql = "SELECT plan_id, cost, toTypeName(cost) FROM upgraded.usage_daily ORDER BY plan_id"
    _, rows = store.query(sql)
    assert rows[0][0] == "tiny" and rows[0][2] == "Decimal(38, 24)"
    assert rows[0][1] != N * MAX  # wrapped

    monkeypatch.undo()
    assert apply_migrations("upgraded", execute, store.query) == [
        "007_price_model_and_wide_sums.sql",
    ]
    _, rows = store.query(sql)
    assert rows == [
        ("tiny", N * MAX, "Decimal(76, 24)"),
        ("whale", N * MAX + 1, "Decimal(76, 24)"),
    ]
    assert apply_migrations("upgraded", execute, store.query) == []


def test_report_reads_the_wide_views(store: ChdbStore, tmp_path: Path) -> None:
    report = build_report(store, month=NOV)
    assert [t["tier"] for t in report.tiers] == ["tiny", "whale"]
    whale = report.tier("whale")
    assert whale["inference_cost"] == N * MAX + 1
    assert [(u["user_id"], u["cost"]) for u in report.heavy_users[:2]] == [
        ("t1", N * MAX),
        ("w1", N * MAX),
    ]
    assert sorted(report.user_costs["whale"]) == [D(1), N * MAX]

    data = report_json(report)
    row = next(t for t in data["tiers"] if t["tier"] == "whale")
    assert D(row["inference_cost"]) == N * MAX + 1  # exact decimal text, not a float
    assert D(row["revenue"]) == MAX_PLAN_AMOUNT * D("1.5") + 2 * N * MAX

    expected = f"{N * MAX + 1:,.2f}"
    console = Console(record=True, width=400)
    with localcontext(DefaultContext):  # the printing code runs at the default precision
        render(report, console)
        page = render_html(report)
    assert expected in console.export_text()
    assert "whale" in page and "<table" in page
