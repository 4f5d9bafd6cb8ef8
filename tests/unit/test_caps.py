"""Cap windows and decisions as tables of cases (pure logic, no Kafka, no ClickHouse)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from schemas import Subscription
from schemas.plans import PlanCatalog, load_plans, parse_plans
from stream_processors._money import decimal_to_units as to_units
from stream_processors._money import units_to_str as units_str
from stream_processors._time import epoch_s, rfc3339
from stream_processors.caps import CapEngine, CapEvent, Effects, UserCapState
from stream_processors.caps.state import RollingState
from stream_processors.caps.windows import billing_month_bounds, day_bounds, week_bounds

pytestmark = pytest.mark.unit

T0 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)  # a Monday
DETECTED = datetime(2030, 1, 1, tzinfo=UTC)


def _s(text: str) -> int:
    return epoch_s(datetime.fromisoformat(text))


# ------------------------------------------------------------------------------------ windows

MONTH_CASES = [
    # (anchor, zone, event time, expected start, expected end)
    (
        "2025-01-31T10:00:00+00:00",
        "UTC",
        "2025-02-15T00:00:00+00:00",
        "2025-01-31T10:00:00Z",
        "2025-02-28T10:00:00Z",
    ),
    (
        "2025-01-31T10:00:00+00:00",
        "UTC",
        "2025-02-28T09:59:59+00:00",
        "2025-01-31T10:00:00Z",
        "2025-02-28T10:00:00Z",
    ),
    (
        "2025-01-31T10:00:00+00:00",
        "UTC",
        "2025-02-28T10:00:00+00:00",
        "2025-02-28T10:00:00Z",
        "2025-03-31T10:00:00Z",
    ),
    (
        "2024-01-31T10:00:00+00:00",
        "UTC",
        "2024-03-01T00:00:00+00:00",
        "2024-02-29T10:00:00Z",
        "2024-03-31T10:00:00Z",
    ),
    (
        "2025-01-30T00:00:00+00:00",
        "UTC",
        "2025-03-29T23:00:00+00:00",
        "2025-02-28T00:00:00Z",
        "2025-03-30T00:00:00Z",
    ),
    # before the anchor: the same rule backwards
    (
        "2025-05-15T08:00:00+00:00",
        "UTC",
        "2025-04-20T00:00:00+00:00",
        "2025-04-15T08:00:00Z",
        "2025-05-15T08:00:00Z",
    ),
    # local wall time kept across a DST change (Paris: UTC+1 in winter, UTC+2 in summer)
    (
        "2025-01-31T10:00:00+01:00",
        "Europe/Paris",
        "2025-03-31T10:00:00+02:00",
        "2025-03-31T08:00:00Z",
        "2025-04-30T08:00:00Z",
    ),
    (
        "2025-01-31T10:00:00+01:00",
        "Europe/Paris",
        "2025-03-31T07:59:59+00:00",
        "2025-02-28T09:00:00Z",
        "2025-03-31T08:00:00Z",
    ),
    # anchor wall time 02:30 skipped on 2025-03-09 in New York: the period starts at the jump
    (
        "2025-01-09T02:30:00-05:00",
        "America/New_York",
        "2025-03-10T00:00:00-04:00",
        "2025-03-09T07:30:00Z",
        "2025-04-09T06:30:00Z",
    ),
    # sub-second anchor: truncated to the second
    (
        "2025-01-15T00:00:00.750000+00:00",
        "UTC",
        "2025-01-20T00:00:00+00:00",
        "2025-01-15T00:00:00Z",
        "2025-02-15T00:00:00Z",
    ),
]


@pytest.mark.parametrize(("anchor", "zone", "at", "start", "end"), MONTH_CASES)
def test_billing_month_bounds(anchor: str, zone: str, at: str, start: str, end: str) -> None:
    got = billing_month_bounds(_s(at), datetime.fromisoformat(anchor), ZoneInfo(zone))
    assert (rfc3339(got[0]), rfc3339(got[1])) == (start, end)


DAY_CASES = [
    ("UTC", "2025-03-03T23:59:59+00:00", "2025-03-03T00:00:00Z", "2025-03-04T00:00:00Z"),
    ("Asia/Kolkata", "2025-03-03T20:00:00+00:00", "2025-03-03T18:30:00Z", "2025-03-04T18:30:00Z"),
    # Paris springs forward on 2025-03-30: a 23-hour day
    ("Europe/Paris", "2025-03-30T12:00:00+00:00", "2025-03-29T23:00:00Z", "2025-03-30T22:00:00Z"),
    # and falls back on 2025-10-26: a 25-hour day
    ("Europe/Paris", "2025-10-26T12:00:00+00:00", "2025-10-25T22:00:00Z", "2025-10-26T23:00:00Z"),
]


@pytest.mark.parametrize(("zone", "at", "start", "end"), DAY_CASES)
def test_calendar_day_bounds(zone: str, at: str, start: str, end: str) -> None:
    got = day_bounds(_s(at), ZoneInfo(zone))
    assert (rfc3339(got[0]), rfc3339(got[1])) == (start, end)


WEEK_CASES = [
    ("UTC", "2025-03-03T00:00:00+00:00", "2025-03-03T00:00:00Z", "2025-03-10T00:00:00Z"),
    ("UTC", "2025-03-09T23:59:59+00:00", "2025-03-03T00:00:00Z", "2025-03-10T00:00:00Z"),
    # ISO week 1 of 2026 starts on Monday 2025-12-29
    ("UTC", "2026-01-01T12:00:00+00:00", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z"),
    # Sunday evening in Los Angeles is Monday in UTC: still the local week
    (
        "America/Los_Angeles",
        "2025-03-10T05:00:00+00:00",
        "2025-03-03T08:00:00Z",
        "2025-03-10T07:00:00Z",
    ),
]


@pytest.mark.parametrize(("zone", "at", "start", "end"), WEEK_CASES)
def test_week_bounds(zone: str, at: str, start: str, end: str) -> None:
    got = week_bounds(_s(at), ZoneInfo(zone))
    assert (rfc3339(got[0]), rfc3339(got[1])) == (start, end)


@pytest.mark.parametrize(
    ("text", "units", "back"),
    [
        ("0.01", 10**22, "0.01"),
        ("5.46875e-07", 546875 * 10**12, "0.000000546875"),
        ("0.000000000000000000000001", 1, "0.000000000000000000000001"),
        ("12345678901234.000000000000000000000000", 12345678901234 * 10**24, "12345678901234"),
    ],
)
def test_money_units_are_exact(text: str, units: int, back: str) -> None:
    assert to_units(Decimal(text)) == units
    assert units_str(units) == back


def test_money_beyond_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 24 decimal places"):
        to_units(Decimal("1e-25"))


# ------------------------------------------------------------------------------------ caps

PLANS: dict[str, Any] = {
    "plans": [
        {
            "id": "daily3",
            "monthly_price": "0",
            "windows": [
                {
                    "name": "day",
                    "kind": "calendar_day",
                    "unit": "requests",
                    "allowance": "3",
                    "thresholds": [50, 100],
                    "at_cap": {"action": "block"},
                },
            ],
        },
        {
            "id": "roll",
            "monthly_price": "0",
            "windows": [
                {
                    "name": "5h",
                    "kind": "rolling_hours",
                    "hours": 5,
                    "unit": "usd",
                    "allowance": "2",
                    "at_cap": {"action": "downgrade", "model": "mini"},
                    "exempt_models": ["mini"],
                },
            ],
        },
        {
            "id": "over",
            "monthly_price": "10",
            "windows": [
                {
                    "name": "month",
                    "kind": "billing_month",
                    "unit": "usd",
                    "allowance": "10",
                    "thresholds": [100],
                    "at_cap": {"action": "overage", "unit_price": "1.5", "ceiling_usd": "6"},
                },
            ],
        },
        {
            "id": "tok",
            "monthly_price": "0",
            "windows": [
                {
                    "name": "week",
                    "kind": "week",
                    "unit": "tokens",
                    "allowance": "1000",
                    "at_cap": {"action": "overage", "unit_price": "0.001"},
                },
            ],
        },
    ]
}


@pytest.fixture(scope="module")
def catalog() -> PlanCatalog:
    return parse_plans(PLANS)


def _sub(plan: str | list[tuple[str, datetime]], zone: str = "UTC") -> Subscription:
    periods = [(plan, T0 - timedelta(days=400))] if isinstance(plan, str) else plan
    return Subscription(
        user_id="u",
        org_id="o",
        timezone=zone,
        billing_anchor=datetime(2025, 1, 1, tzinfo=UTC),
        plans=[{"plan_id": p, "effective_at": at} for p, at in periods],
    )


def _ev(i: int, minutes: float, cost: str = "0", tokens: int = 0, model: str = "big") -> CapEvent:
    return CapEvent(f"e{i}", "u", T0 + timedelta(minutes=minutes), Decimal(cost), tokens, model)


def _run(engine: CapEngine, sub: Subscription, events: list[CapEvent]) -> tuple[Effects, Any]:
    state = engine.new_state("u")
    out = Effects()
    for ev in events:
        engine.apply(state, sub, ev, DETECTED, out)
    return out, state


CAP_CASES: list[tuple[str, str, list[CapEvent], str, str | None, list[str]]] = [
    # (case, plan, events, final state, until, alert ids)
    ("under the first threshold", "daily3", [_ev(0, 0)], "ok", None, []),
    (
        "threshold below 100 warns",
        "daily3",
        [_ev(0, 0), _ev(1, 1)],
        "warn",
        "2025-03-04T00:00:00Z",
        ["u|daily3.day@2025-03-03T00:00:00Z|50"],
    ),
    (
        "block at the cap until the day ends",
        "daily3",
        [_ev(i, i) for i in range(4)],
        "blocked",
        "2025-03-04T00:00:00Z",
        ["u|daily3.day@2025-03-03T00:00:00Z|50", "u|daily3.day@2025-03-03T00:00:00Z|100"],
    ),
    (
        "a new day starts fresh",
        "daily3",
        [*(_ev(i, i) for i in range(3)), _ev(9, 13 * 60)],
        "ok",
        None,
        ["u|daily3.day@2025-03-03T00:00:00Z|50", "u|daily3.day@2025-03-03T00:00:00Z|100"],
    ),
    (
        "rolling downgrade until the sum drops below the cap",
        "roll",
        [_ev(0, 0, "1"), _ev(1, 60, "0.5"), _ev(2, 120, "0.5")],
        "downgrade",
        # the 12:00 bucket leaves the window at 17:00, leaving 1 < 2
        "2025-03-03T17:00:00Z",
        [
            "u|roll.5h@2025-03-03T10:00:00Z|50",
            "u|roll.5h@2025-03-03T10:00:00Z|80",
            "u|roll.5h@2025-03-03T10:00:00Z|100",
        ],
    ),
    (
        "exempt model does not count",
        "roll",
        [_ev(0, 0, "1.5"), _ev(1, 1, "5", model="mini")],
        "warn",
        "2025-03-03T17:00:00Z",
        ["u|roll.5h@2025-03-03T10:00:00Z|50"],
    ),
    (
        "rolling usage expires",
        "roll",
        [_ev(0, 0, "2"), _ev(1, 301, "0.1")],
        "ok",
        None,
        [
            "u|roll.5h@2025-03-03T10:00:00Z|50",
            "u|roll.5h@2025-03-03T10:00:00Z|80",
            "u|roll.5h@2025-03-03T10:00:00Z|100",
        ],
    ),
    (
        "overage keeps serving",
        "over",
        [_ev(0, 0, "11")],
        "warn",
        "2025-04-01T00:00:00Z",
        ["u|over.month@2025-03-01T00:00:00Z|100", "u|over.break_even@2025-03-01T00:00:00Z|100"],
    ),
    (
        "ceiling reached blocks",
        "over",
        [_ev(0, 0, "11"), _ev(1, 1, "4")],
        "blocked",
        "2025-04-01T00:00:00Z",
        ["u|over.month@2025-03-01T00:00:00Z|100", "u|over.break_even@2025-03-01T00:00:00Z|100"],
    ),
]


@pytest.mark.parametrize(
    ("plan", "events", "state", "until", "alerts"),
    [c[1:] for c in CAP_CASES],
    ids=[c[0] for c in CAP_CASES],
)
def test_cap_decisions(
    catalog: PlanCatalog,
    plan: str,
    events: list[CapEvent],
    state: str,
    until: str | None,
    alerts: list[str],
) -> None:
    engine = CapEngine(catalog)
    out, _ = _run(engine, _sub(plan), events)
    last = out.enforcement[-1]
    assert (last["state"], last["until"]) == (state, until)
    assert sorted(a["alert_id"] for a in out.alerts) == sorted(alerts)
    assert len({a["alert_id"] for a in out.alerts}) == len(out.alerts)


@pytest.mark.parametrize(
    ("costs", "wallet", "credit_qty", "overage_qty", "billed"),
    [
        # allowance 10, unit price 1.5, ceiling 6 per month
        (["9", "2"], "0", "0", "1", "1.5"),
        (["9", "2"], "10", "1", "0", "0"),
        (["9", "2"], "0.75", "0.5", "0.5", "0.75"),
        (["12", "3"], "0", "0", "5", "6"),  # 7.5 capped at the 6 ceiling
        (
            ["10", "0.000000000000000000000001"],
            "0",
            "0",
            "0.000000000000000000000001",
            "0.000000000000000000000001",
        ),
    ],
)
def test_overage_and_credits(
    catalog: PlanCatalog,
    costs: list[str],
    wallet: str,
    credit_qty: str,
    overage_qty: str,
    billed: str,
) -> None:
    engine = CapEngine(catalog)
    sub = _sub("over")
    state = engine.new_state("u")
    engine.top_up(state, sub, "c1", Decimal(wallet), DETECTED)
    out = Effects()
    for i, cost in enumerate(costs):
        engine.apply(state, sub, _ev(i, i, cost), DETECTED, out)
    assert sum(Decimal(c["quantity"]) for c in out.credit_draws) == Decimal(credit_qty)
    assert sum(Decimal(o["quantity"]) for o in out.overages) == Decimal(overage_qty)
    assert sum(Decimal(o["amount"]) for o in out.overages) == Decimal(billed)
    for o in out.overages:
        assert o["overage_id"] == f"{o['event_id']}|over.month@2025-03-01T00:00:00Z"


def test_token_overage_is_priced_per_token(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    out, _ = _run(engine, _sub("tok"), [_ev(0, 0, tokens=900), _ev(1, 1, tokens=250)])
    assert [(o["quantity"], o["value"], o["unit"]) for o in out.overages] == [
        ("150", "0.15", "tokens")
    ]


def test_top_up_lifts_a_ceiling_block_and_is_idempotent(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    sub = _sub("over")
    out, state = _run(engine, sub, [_ev(0, 0, "11"), _ev(1, 1, "4")])
    assert out.enforcement[-1]["reason"] == "ceiling"
    lifted = engine.top_up(state, sub, "c9", Decimal("5"), DETECTED)
    assert [(e["state"], e["reason"]) for e in lifted.enforcement] == [("warn", "overage")]
    assert not engine.top_up(state, sub, "c9", Decimal("5"), DETECTED)
    assert state.wallet == to_units(Decimal("5"))


def test_tick_releases_a_block_when_the_window_ends(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    sub = _sub("daily3")
    out, state = _run(engine, sub, [_ev(i, i) for i in range(3)])
    assert out.enforcement[-1]["state"] == "blocked"
    assert not engine.tick(state, sub, T0 + timedelta(hours=1), DETECTED)
    released = engine.tick(state, sub, T0 + timedelta(hours=12), DETECTED)
    assert [e["state"] for e in released.enforcement] == ["ok"]


def test_enforcement_is_emitted_only_on_change(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    out, _ = _run(engine, _sub("daily3"), [_ev(i, i) for i in range(6)])
    assert [e["state"] for e in out.enforcement] == ["ok", "warn", "blocked"]
    assert [e["version"] for e in out.enforcement] == [1, 2, 3]
    blocked = out.enforcement[-1]
    assert blocked["remaining"] == "0" and blocked["usage"] == "3"
    assert blocked["window_id"] == "daily3.day@2025-03-03T00:00:00Z"


def test_late_events(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog, grace_s=600)
    sub = _sub("daily3")
    # the next day starts at midnight; 5 minutes later the previous day is still within grace
    events = [_ev(0, 12 * 60 + 5), _ev(1, 11 * 60 + 50), _ev(2, 12 * 60 + 20), _ev(3, 11 * 60)]
    out, state = _run(engine, sub, events)
    assert [(late.event_id, late.window) for late in out.late] == [("e3", "daily3.day")]
    assert [i.usage for i in state.windows["daily3.day"].insts] == [2]


def test_late_event_in_rolling_window_fires_later_buckets(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog, grace_s=3600)
    # 1 at 12:00 and 1 at 14:00 reach 100 % at 14:00 only if the 12:00 event counts: send it last
    out, _ = _run(engine, _sub("roll"), [_ev(1, 120, "1"), _ev(0, 0, "1")])
    by_id = {a["alert_id"]: a for a in out.alerts}
    crossed = by_id["u|roll.5h@2025-03-03T10:00:00Z|100"]
    assert crossed["event_id"] == "e0"
    assert (crossed["window_start"], crossed["window_end"]) == (
        "2025-03-03T09:05:00Z",
        "2025-03-03T14:05:00Z",
    )


def test_break_even_once_per_billing_month(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    events = [_ev(i, i * 60 * 24 * 10, "6") for i in range(8)]  # 6 USD every 10 days
    out, _ = _run(engine, _sub("over"), events)
    break_even = [a for a in out.alerts if a["kind"] == "break_even"]
    assert [a["window_id"] for a in break_even] == [
        "over.break_even@2025-03-01T00:00:00Z",
        "over.break_even@2025-04-01T00:00:00Z",
        "over.break_even@2025-05-01T00:00:00Z",
    ]
    assert break_even[0]["usage"] == "12" and break_even[0]["limit"] == "10"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (CapEvent("x", "u", T0, Decimal("1e-30"), 0, "m"), "more than 24 decimal places"),
        (CapEvent("x", "other", T0, Decimal("1"), 0, "m"), "event of user 'other'"),
        (CapEvent("x", "u", T0.replace(tzinfo=None), Decimal("1"), 0, "m"), "timezone-aware"),
        (CapEvent("x", "u", T0, Decimal("-1"), 0, "m"), "must not be negative"),
    ],
)
def test_rejected_events_change_nothing(catalog: PlanCatalog, event: CapEvent, reason: str) -> None:
    engine = CapEngine(catalog)
    state = engine.new_state("u")
    out = engine.apply(state, _sub("over"), event, DETECTED)
    assert [r.event_id for r in out.rejected] == ["x"]
    assert reason in out.rejected[0].reason
    assert not state.windows and not state.months.insts


def test_unknown_plan_is_rejected(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    out = engine.apply(engine.new_state("u"), _sub("gold"), _ev(0, 0, "1"), DETECTED)
    assert "unknown plan 'gold'" in out.rejected[0].reason


def test_plan_change_meters_the_new_plan(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    sub = _sub([("daily3", T0 - timedelta(days=30)), ("over", T0 + timedelta(minutes=10))])
    out, state = _run(engine, sub, [_ev(i, i * 5) for i in range(4)])
    assert out.enforcement[-1]["plan_id"] == "over"
    assert state.windows["daily3.day"].insts[0].usage == 2  # events at 0 and 5 min


def test_state_roundtrip_is_json_and_small(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    sub = _sub("roll")
    _, state = _run(engine, sub, [_ev(i, i * 3, "0.0123") for i in range(100)])
    data = state.to_dict()
    text = json.dumps(data, separators=(",", ":"))
    restored = engine.restore(json.loads(text))
    assert restored.to_dict() == data
    assert isinstance(restored, UserCapState)
    assert len(text) < 1024, text


def test_from_priced_record() -> None:
    record = {
        "event_id": "e1",
        "user_id": "u",
        "occurred_at": "2025-03-03T12:00:00.5Z",
        "cost": "0.000546875",
        "input_tokens": 1000,
        "output_tokens": 200,
        "served_model": "gpt-4o",
    }
    ev = CapEvent.from_priced(record)
    assert ev.tokens == 1200 and ev.cost == Decimal("0.000546875") and ev.requests == 1
    assert ev.occurred_at == datetime(2025, 3, 3, 12, 0, 0, 500000, tzinfo=UTC)


def test_sample_catalog_compiles() -> None:
    engine = CapEngine(load_plans())
    sub = _sub("pro")
    state = engine.new_state("u")
    out = engine.apply(state, sub, _ev(0, 0, "3.5", tokens=10), DETECTED)
    assert out.enforcement[-1]["state"] == "downgrade"
    assert out.enforcement[-1]["downgrade_to"] == "gpt-4o-mini"
    assert [u.window for u in engine.usage(state, sub, T0)] == [
        "pro.monthly",
        "pro.5h",
        "pro.weekly",
    ]


def test_state_roundtrip_keeps_awkward_money_exact(catalog: PlanCatalog) -> None:
    engine = CapEngine(catalog)
    events = [_ev(0, 0, "123456789012.000000000000000001"), _ev(1, 7, "0.5")]
    _, state = _run(engine, _sub("roll"), events)
    data = json.loads(json.dumps(state.to_dict()))
    restored = engine.restore(data)
    before, after = state.windows["roll.5h"], restored.windows["roll.5h"]
    assert isinstance(before, RollingState) and isinstance(after, RollingState)
    assert after.buckets == before.buckets
    assert after.cur_sum == before.cur_sum == to_units(Decimal("123456789012.500000000000000001"))
