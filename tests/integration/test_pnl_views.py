"""The P&L views and the what-if replay on the real engine (chDB), on a crafted month.

Every expected number below is computed by hand from the rows this test inserts (the
comments show the arithmetic); nothing is read back from the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from producers._subscriptions import encode_subscription
from schemas import CreditGrant, PlanPeriod, Subscription
from schemas.plans import parse_plans
from sinks import ChdbStore
from sinks._buffer import SUBSCRIPTIONS
from spendstream.analytics import build_report, load_plans_into
from spendstream.bench.sink import sample_priced_event
from spendstream.whatif import Scenario, run_whatif
from stream_processors import PriceCatalog, units_to_decimal

pytestmark = pytest.mark.integration

D = Decimal
NOV = date(2026, 11, 1)
MONTH_S = 30 * 86400

PLANS = {
    "plans": [
        {
            "id": "free",
            "monthly_price": "0",
            "windows": [
                {
                    "name": "daily",
                    "kind": "calendar_day",
                    "unit": "requests",
                    "allowance": "3",
                    "at_cap": {"action": "block"},
                }
            ],
        },
        {
            "id": "pro",
            "monthly_price": "20",
            "windows": [
                {
                    "name": "monthly",
                    "kind": "billing_month",
                    "unit": "usd",
                    "allowance": "1",
                    "at_cap": {"action": "downgrade", "model": "gpt-4o-mini"},
                    "exempt_models": ["gpt-4o-mini"],
                }
            ],
        },
        {
            "id": "team",
            "monthly_price": "30",
            "windows": [
                {
                    "name": "monthly",
                    "kind": "billing_month",
                    "unit": "usd",
                    "allowance": "2",
                    "at_cap": {"action": "overage", "unit_price": "1.5", "ceiling_usd": "1"},
                }
            ],
        },
    ]
}


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _sub(user: str, org: str, periods: list[tuple[str, str]]) -> Subscription:
    plans = [PlanPeriod(plan_id=p, effective_at=_t(at)) for p, at in periods]
    return Subscription(user_id=user, org_id=org, billing_anchor=plans[0].effective_at, plans=plans)


SUBS = [
    _sub("u1", "acme", [("free", "2026-11-01T00:00:00")]),
    _sub("u2", "acme", [("pro", "2026-11-01T00:00:00")]),
    # 15 days free, then 15 days pro (Nov has 30 days)
    _sub("u3", "acme", [("free", "2026-11-01T00:00:00"), ("pro", "2026-11-16T00:00:00")]),
    # team from Nov 11: 20 of 30 days; bought prepaid credit twice
    _sub("u4", "acme", [("team", "2026-11-11T00:00:00")])
    .with_credit(
        CreditGrant(credit_id="c-1", amount_usd=D("5"), granted_at=_t("2026-11-12T09:00:00"))
    )
    .with_credit(
        CreditGrant(
            credit_id="c-2",
            amount_usd=D("0.000000000000000000000001"),
            granted_at=_t("2026-11-20T00:00:00"),
        )
    ),
    # pro since October, no usage, another org
    _sub("u5", "beta", [("pro", "2026-10-01T00:00:00")]),
]


def _event(n: int, user: str, plan: str, at: str, cost: str, **extra: Any) -> dict[str, Any]:
    row = sample_priced_event(n)
    row.update(
        event_id=f"e{n}",
        user_id=user,
        org_id="beta" if user == "u5" else "acme",
        plan_id=plan,
        occurred_at=at + "+00:00",
        requested_model="gpt-4o",
        served_model="gpt-4o",
        cost=cost,
        list_value=extra.pop("list_value", cost),
        saved_prompt_cache="0",
        saved_semantic_cache="0",
        saved_routing="0",
    )
    row.update(extra)
    return row


EVENTS = [
    # u1 free: four calls on Nov 2, 0.01 each, list 0.03 (0.02 saved by the prompt cache)
    *[
        _event(
            i,
            "u1",
            "free",
            f"2026-11-02T10:00:0{i}",
            "0.01",
            list_value="0.03",
            saved_prompt_cache="0.02",
        )
        for i in range(4)
    ],
    _event(10, "u3", "free", "2026-11-05T12:00:00", "0.05"),
    _event(20, "u2", "pro", "2026-11-03T09:00:00", "0.5"),
    _event(21, "u2", "pro", "2026-11-04T09:00:00", "0.6"),
    # routed to the cheap model: cost 0.2 of a list value 0.6
    _event(
        22,
        "u2",
        "pro",
        "2026-11-05T09:00:00",
        "0.2",
        served_model="gpt-4o-mini",
        list_value="0.6",
        saved_routing="0.4",
    ),
    # semantic-cache hit: free, list value 0.3
    _event(
        23,
        "u2",
        "pro",
        "2026-11-06T09:00:00",
        "0",
        semantic_cache_hit=True,
        list_value="0.3",
        saved_semantic_cache="0.3",
    ),
    _event(30, "u3", "pro", "2026-11-20T10:00:00", "2.0"),
    _event(40, "u4", "team", "2026-11-12T10:00:00", "1.5"),
    _event(41, "u4", "team", "2026-11-13T10:00:00", "1.0"),
    _event(42, "u4", "team", "2026-11-14T10:00:00", "0.5"),
    # October usage of u5 must not leak into November
    _event(50, "u5", "pro", "2026-10-20T10:00:00", "7"),
]

_CAPS_COMMON = {"org_id": "acme", "detected_at": "2026-11-30T00:00:00+00:00"}
ALERTS = [
    {
        **_CAPS_COMMON,
        "alert_id": "a1",
        "kind": "threshold",
        "user_id": "u2",
        "plan_id": "pro",
        "window": "monthly",
        "window_id": "w1",
        "window_kind": "billing_month",
        "unit": "usd",
        "threshold": 100,
        "usage": "1.1",
        "limit": "1",
        "window_start": "2026-11-01T00:00:00+00:00",
        "window_end": "2026-12-01T00:00:00+00:00",
        "event_id": "e21",
        "event_time": "2026-11-04T09:00:00+00:00",
    }
]
ENFORCEMENT = [
    {
        "user_id": "u2",
        "org_id": "acme",
        "plan_id": "pro",
        "state": "downgrade",
        "reason": "cap",
        "window": "monthly",
        "window_id": "w1",
        "unit": "usd",
        "usage": "1.1",
        "limit": "1",
        "remaining": "0",
        "until": "2026-12-01T00:00:00+00:00",
        "downgrade_to": "gpt-4o-mini",
        "as_of": "2026-11-04T09:00:00+00:00",
        "version": 1,
        "updated_at": "2026-11-04T09:00:01+00:00",
    }
]


def _overage(record: str, ident: str, event: str, amount: str) -> dict[str, Any]:
    return {
        **_CAPS_COMMON,
        "record": record,
        "id": ident,
        "user_id": "u4",
        "plan_id": "team",
        "window": "monthly",
        "window_id": "w4",
        "window_start": "2026-11-11T00:00:00+00:00",
        "window_end": "2026-12-11T00:00:00+00:00",
        "unit": "usd",
        "event_id": event,
        "event_time": "2026-11-13T10:00:00+00:00",
        "quantity": "0.5",
        "unit_price": "1.5",
        "value": amount,
        "amount": amount,
        "ceiling_usd": "1",
        "balance_after": None,
    }


OVERAGES = [
    _overage("overage", "o1", "e41", "0.75"),
    _overage("overage", "o1", "e41", "0.75"),  # delivered twice: stored once (FINAL)
    _overage("credit_draw", "c1", "e42", "0.1"),
    _overage("overage", "o2", "e42", "0.15"),
]


def _insert(store: ChdbStore, table: str, rows: list[dict[str, Any]], token: str) -> None:
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    store.insert(table, columns, token)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbStore]:
    """One chDB store for the module (one data folder per process at a time)."""
    s = ChdbStore(tmp_path_factory.mktemp("pnl") / "chdb", serve=False)
    try:
        s.migrate()
        load_plans_into(s, parse_plans(PLANS), source="test")
        subs = SUBSCRIPTIONS.to_arrow([SUBSCRIPTIONS.decode(encode_subscription(x)) for x in SUBS])
        s.insert("subscriptions", subs, "subs-1")
        _insert(s, "priced_events", EVENTS, "events-1")
        _insert(s, "alerts", ALERTS, "alerts-1")
        _insert(s, "enforcement_changes", ENFORCEMENT, "enf-1")
        _insert(s, "overages", OVERAGES[:2], "ov-1")
        _insert(s, "overages", OVERAGES[1:], "ov-2")
        yield s
    finally:
        s.close()


def trunc(value: Decimal, places: int) -> Decimal:
    """ClickHouse decimal division truncates toward zero."""
    return value.quantize(D(1).scaleb(-places), rounding=ROUND_DOWN)


def nearest_rank(costs: list[Decimal], q: float) -> Decimal:
    """quantileExact: the element at index floor(q * n) of the sorted values."""
    ordered = sorted(costs)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def test_subscription_periods_are_flattened(store: ChdbStore) -> None:
    _, rows = store.query(
        "SELECT user_id, plan_id, period_start, period_end FROM spendstream.subscription_periods"
        " WHERE user_id = 'u3' ORDER BY period_start"
    )
    assert rows == [
        ("u3", "free", _t("2026-11-01T00:00:00"), _t("2026-11-16T00:00:00")),
        ("u3", "pro", _t("2026-11-16T00:00:00"), None),
    ]


def test_credit_grants_are_landed_exactly(store: ChdbStore) -> None:
    _, rows = store.query(
        "SELECT user_id, credit_id, amount, granted_at FROM spendstream.credit_grants "
        "ORDER BY user_id, granted_at"
    )
    assert rows == [
        ("u4", "c-1", D("5"), _t("2026-11-12T09:00:00")),
        ("u4", "c-2", D("0.000000000000000000000001"), _t("2026-11-20T00:00:00")),
    ]


def test_tier_pnl_by_hand(store: ChdbStore) -> None:
    report = build_report(store, month=NOV)
    assert [t["tier"] for t in report.tiers] == ["free", "pro", "team"]

    free = report.tier("free")
    # u1 (whole month) + u3 (15 of 30 days)
    assert free["users"] == 2
    assert free["active_subscribers"] == D("1.5")
    assert free["revenue"] == 0
    assert free["inference_cost"] == D("0.09")  # 4 x 0.01 + 0.05
    assert free["list_value"] == D("0.17")  # 4 x 0.03 + 0.05
    assert free["gross_margin"] == D("-0.09")
    assert free["margin_pct"] is None  # no revenue
    assert free["users_cost_over_pay"] == 2
    assert free["users_cost_over_pay_pct"] == 100
    assert free["cost_p50"] == nearest_rank([D("0.04"), D("0.05")], 0.5) == D("0.05")
    assert free["top1pct_cost_share_pct"] == trunc(D("0.05") * 100 / D("0.09"), 4)
    assert free["saved_prompt_cache"] == D("0.08")
    assert free["saved_total"] == D("0.08")

    pro = report.tier("pro")
    # u2 whole month, u3 15/30, u5 whole month (since October, no usage)
    assert pro["users"] == 3
    assert pro["active_subscribers"] == D("2.5")
    assert pro["subscription_revenue"] == D(20) + D(20) * 15 / 30 + D(20)  # 50
    assert pro["inference_cost"] == D("3.3")  # u2 0.5+0.6+0.2+0, u3 2.0
    assert pro["list_value"] == D("4.0")  # u2 0.5+0.6+0.6+0.3, u3 2.0
    assert pro["gross_margin"] == D("46.7")
    assert pro["margin_pct"] == D("93.4")  # 46.7 / 50
    assert pro["users_cost_over_pay"] == 0
    costs = [D("1.3"), D("2.0"), D(0)]
    assert pro["cost_p50"] == nearest_rank(costs, 0.5) == D("1.3")
    assert pro["cost_p90"] == nearest_rank(costs, 0.9) == D("2.0")
    assert pro["cost_p99"] == D("2.0")
    # top 1 % of 3 users = the costliest one: 2.0 of 3.3
    assert pro["top1pct_cost_share_pct"] == trunc(D("200") / D("3.3"), 4) == D("60.6060")
    assert (pro["saved_prompt_cache"], pro["saved_semantic_cache"], pro["saved_routing"]) == (
        0,
        D("0.3"),
        D("0.4"),
    )
    assert pro["saved_total"] == D("0.7")
    # cap outcomes: u2 alerted at 100 %, downgraded; one call served on the downgrade model
    assert (pro["users_alerted"], pro["users_capped"], pro["users_downgraded"]) == (1, 1, 1)
    assert pro["requests_downgraded"] == 1
    assert pro["users_blocked"] == 0

    team = report.tier("team")
    assert team["users"] == 1
    assert team["active_subscribers"] == trunc(D(20) / 30, 24)
    assert team["subscription_revenue"] == D(20)  # 30 x 20/30
    assert team["overage_revenue"] == D("0.9")  # 0.75 (stored once) + 0.15
    assert team["credit_revenue"] == D("0.1")
    assert team["revenue"] == D("21.0")
    assert team["inference_cost"] == D("3.0")
    assert team["margin_pct"] == trunc(D(18) * 100 / 21, 4) == D("85.7142")
    assert (team["users_overage"], team["overage_events"], team["users_capped"]) == (1, 2, 1)


def test_org_filter_is_a_parameter(store: ChdbStore) -> None:
    acme = build_report(store, month=NOV, org="acme")
    assert acme.tier("pro")["users"] == 2  # u5 is in beta
    assert acme.tier("pro")["subscription_revenue"] == D(30)
    beta = build_report(store, month=NOV, org="beta")
    assert [t["tier"] for t in beta.tiers] == ["pro"]
    nobody = build_report(store, month=NOV, org="x' OR '1'='1")
    assert nobody.tiers == []


def test_heavy_users_and_costs(store: ChdbStore) -> None:
    report = build_report(store, month=NOV, top=2)
    assert [(u["user_id"], u["cost"]) for u in report.heavy_users] == [
        ("u4", D("3.0")),
        ("u3", D("2.0")),
    ]
    assert sorted(report.user_costs["pro"]) == [D(0), D("1.3"), D("2.0")]


ALT = json.loads(json.dumps(PLANS))
ALT["plans"][1] = {
    "id": "pro",
    "monthly_price": "25",
    "windows": [
        {
            "name": "monthly",
            "kind": "billing_month",
            "unit": "usd",
            "allowance": "0.7",
            "at_cap": {"action": "block"},
        }
    ],
}


def test_whatif_one_changed_plan_by_hand(store: ChdbStore) -> None:
    catalog = PriceCatalog.load()
    result = run_whatif(
        store, Scenario(parse_plans(PLANS), catalog), Scenario(parse_plans(ALT), catalog), month=NOV
    )
    cur_free, alt_free = result.row("current", "free"), result.row("alternative", "free")
    # daily requests cap 3: u1's 4th call on Nov 2 is blocked in both
    for row in (cur_free, alt_free):
        assert row["requests"] == 4 and row["requests_blocked"] == 1
        assert row["inference_cost"] == D("0.08")  # 3 x 0.01 + 0.05
        assert row["users_blocked"] == 1 and row["margin_pct"] is None

    cur = result.row("current", "pro")
    # monthly 1 USD, downgrade, gpt-4o-mini exempt: u2 reaches 1.1 after e21; e22 is served by
    # the exempt model; e23 (semantic hit, free) comes after the cap: downgraded, still free.
    assert cur["subscription_revenue"] == D(50)
    assert cur["inference_cost"] == D("3.3")
    # a gateway downgrades every request while the state is downgrade: e22 (already on the
    # cheap model, its cost unchanged) and e23
    assert (cur["requests_blocked"], cur["requests_downgraded"], cur["users_downgraded"]) == (
        0,
        2,
        1,
    )
    assert cur["margin_pct"] == D("93.4")

    alt = result.row("alternative", "pro")
    # 25 USD, block at 0.7, no exemption: e20 (before 0) and e21 (before 0.5) pass, e22
    # (before 1.1) and e23 (before 1.3) are blocked; u3's 2.0 is its first pro usage.
    assert alt["subscribers"] == D("2.5")
    assert alt["subscription_revenue"] == D("62.5")  # 25 + 12.5 + 25
    assert alt["requests"] == 3 and alt["requests_blocked"] == 2
    assert alt["inference_cost"] == D("3.1")  # 0.5 + 0.6 + 2.0
    assert alt["gross_margin"] == D("59.4")
    assert alt["margin_pct"] == D("95.04")
    assert alt["users_blocked"] == 1 and alt["requests_downgraded"] == 0

    for side in ("current", "alternative"):
        team = result.row(side, "team")
        # 2 USD allowance from the Nov 11 anchor: 1.5, 2.5, 3.0 -> overage 0, 0.5, 1.0
        # x 1.5 = 0, 0.75, 1.5 -> values 0, 0.75, 0.75, all paid by the 5 USD of credit
        # granted on Nov 12 09:00 (before the first event), so nothing is billed
        assert (team["overage_revenue"], team["credits_drawn"]) == (0, D("1.5"))
        assert team["revenue"] == D("21.5")
        assert team["inference_cost"] == D("3.0")
        assert team["requests_blocked"] == 0


def test_cli_report_json_and_html(
    store: ChdbStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands on the same store (this process owns it: they query it in-process)."""
    from spendstream.cli import app

    class Borrowed:
        """The module's store, lent to the command: its close() must not close it."""

        database = store.database
        query = staticmethod(store.query)

        def close(self) -> None:
            """Leave the module's store open for the next test."""

    monkeypatch.setattr("spendstream.commands.report._open", lambda readonly: Borrowed())
    runner = CliRunner()
    out = runner.invoke(app, ["report", "--period", "2026-11", "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    pro = next(t for t in data["tiers"] if t["tier"] == "pro")
    assert pro["gross_margin"] == "46.7"
    page = tmp_path / "out.html"
    out = runner.invoke(app, ["report", "--period", "2026-11", "--html", str(page)])
    assert out.exit_code == 0, out.output
    text = page.read_text()
    assert text.count("plotly-graph-div") == 4 and "Margin per tier" in text
    assert "<script src=" not in text  # self-contained: plotly.js inlined
    alt = tmp_path / "alt.yaml"
    alt.write_text(json.dumps(ALT))
    cur = tmp_path / "cur.yaml"
    cur.write_text(json.dumps(PLANS))
    out = runner.invoke(
        app,
        ["whatif", "--plans", str(alt), "--current-plans", str(cur), "--period", "2026-11"],
    )
    assert out.exit_code == 0, out.output
    assert "62.50" in out.output and "tier pro" in out.output


def test_whatif_reprices_every_event_with_the_sheet(store: ChdbStore, tmp_path: Path) -> None:
    from schemas import event_from_obj

    sheet = tmp_path / "prices.json"
    sheet.write_text(
        '{"gpt-4o": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}}'
    )
    catalog = PriceCatalog.load()
    plans = parse_plans(PLANS)
    alt = catalog.with_overrides(sheet)
    result = run_whatif(
        store, Scenario(plans, catalog), Scenario(plans, alt, reprice_all=True), month=NOV
    )

    def repriced(n: int) -> Decimal:
        row = next(e for e in EVENTS if e["event_id"] == f"e{n}")
        return units_to_decimal(alt.quote(event_from_obj(row)).cost)

    # pro: e20, e21 and u3's e30 are gpt-4o (the sheet's price); e22 was served by gpt-4o-mini
    # (the configured catalog's price now, not the stored 0.2); e23 is a semantic-cache hit
    expected = repriced(20) + repriced(21) + repriced(22) + repriced(30)
    assert repriced(23) == 0
    assert result.row("current", "pro")["inference_cost"] == D("3.3")
    assert result.row("alternative", "pro")["inference_cost"] == expected
    assert result.row("alternative", "pro")["subscription_revenue"] == D(50)
