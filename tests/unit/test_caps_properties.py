"""Properties of the cap engine over arbitrary event sets, orders, batchings and restarts."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Subscription
from schemas.plans import parse_plans
from stream_processors._money import SCALE
from stream_processors._money import units_to_str as units_str
from stream_processors._time import epoch_s, rfc3339
from stream_processors.caps import CapEngine, CapEvent, Effects
from stream_processors.caps.state import RollingState

pytestmark = pytest.mark.unit

T0 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
DETECTED = datetime(2030, 1, 1, tzinfo=UTC)
BUCKET = 300
M = 12  # 1 hour of 5-minute buckets
ROLL_LIMIT = 100  # cents = 1 USD
DAY_LIMIT = 7  # requests
MONTH_LIMIT = 300  # cents = 3 USD
PRICE = Decimal("1.3")

CATALOG = parse_plans(
    {
        "plans": [
            {
                "id": "p",
                "monthly_price": "2",
                "windows": [
                    {
                        "name": "1h",
                        "kind": "rolling_hours",
                        "hours": 1,
                        "unit": "usd",
                        "allowance": "1",
                        "thresholds": [25, 50, 80, 100],
                        "at_cap": {"action": "block"},
                    },
                    {
                        "name": "day",
                        "kind": "calendar_day",
                        "unit": "requests",
                        "allowance": str(DAY_LIMIT),
                        "at_cap": {"action": "downgrade", "model": "mini"},
                    },
                    {
                        "name": "month",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "3",
                        "at_cap": {"action": "overage", "unit_price": str(PRICE)},
                    },
                ],
            }
        ]
    }
)
SUB = Subscription(
    user_id="u",
    org_id="o",
    timezone="America/New_York",
    billing_anchor=datetime(2025, 1, 31, 15, 0, tzinfo=UTC),
    plans=[{"plan_id": "p", "effective_at": datetime(2024, 1, 1, tzinfo=UTC)}],
)
# No event is ever too late: properties (a)-(d) are about order, not about the grace period.
GRACE = 90 * 24 * 3600


def _cents(value: int) -> Decimal:
    return Decimal(value) / 100


# An event: (seconds after T0 within ~3 days, cost in cents); distinct ids by position.
# Either spread over days (day and month boundaries) or dense within hours (rolling overlaps).
raw_events = st.one_of(
    st.lists(st.tuples(st.integers(0, 3 * 24 * 3600), st.integers(0, 40)), min_size=1, max_size=60),
    st.lists(st.tuples(st.integers(0, 3 * 3600), st.integers(0, 12)), min_size=1, max_size=60),
)


def _events(raw: list[tuple[int, int]]) -> list[CapEvent]:
    return [
        CapEvent(f"e{i}", "u", T0 + timedelta(seconds=s), _cents(c), 10, "big")
        for i, (s, c) in enumerate(raw)
    ]


def _engine(grace_s: int = GRACE) -> CapEngine:
    return CapEngine(CATALOG, grace_s=grace_s)


def _batches(events: list[CapEvent], cuts: list[int]) -> list[list[CapEvent]]:
    points = sorted({c % (len(events) + 1) for c in cuts} | {0, len(events)})
    return [events[a:b] for a, b in pairwise(points)]


def _rolling_brute_force(raw: list[tuple[int, int]], at: int) -> int:
    """Sum in cents of events whose bucket is one of the M buckets ending at ``at``'s bucket."""
    t0 = epoch_s(T0)
    k = at // BUCKET
    return sum(c for s, c in raw if k - M < (t0 + s) // BUCKET <= k)


@settings(max_examples=200, deadline=None)
@given(
    raw=raw_events,
    order=st.randoms(use_true_random=False),
    probes=st.lists(st.integers(0, 4 * 24 * 3600), max_size=10),
)
def test_rolling_sum_equals_brute_force(
    raw: list[tuple[int, int]], order: Any, probes: list[int]
) -> None:
    """(a) Rolling usage at any time equals a brute-force sum with the same bucketing."""
    events = _events(raw)
    order.shuffle(events)
    engine = _engine()
    state = engine.new_state("u")
    for ev in events:
        engine.apply(state, SUB, ev, DETECTED)
    t0 = epoch_s(T0)
    times = [t0 + s for s, _ in raw] + [t0 + p for p in probes] + [state.watermark]
    for at in times:
        usage = engine.usage(state, SUB, datetime.fromtimestamp(at, UTC))
        rolling = next(u for u in usage if u.window == "p.1h")
        assert rolling.usage == _cents(_rolling_brute_force(raw, at)), at
    # the running sum used for enforcement, at the watermark
    roll = state.windows.get("p.1h")
    if roll is not None:
        assert isinstance(roll, RollingState)
        assert roll.cur == state.watermark // BUCKET
        assert roll.cur_sum * 100 == _rolling_brute_force(raw, state.watermark) * SCALE


def _expected_alerts(raw: list[tuple[int, int]]) -> set[str]:
    """Brute force: which (window instance, threshold) alerts the final event set implies."""
    t0 = epoch_s(T0)
    out: set[str] = set()
    positions = {(t0 + s) // BUCKET for s, c in raw if c > 0}
    for k in positions:
        total = _rolling_brute_force(raw, k * BUCKET)
        block = k * BUCKET // 3600 * 3600
        for pct in (25, 50, 80, 100):
            if total * 100 >= pct * ROLL_LIMIT:
                out.add(f"u|p.1h@{rfc3339(block)}|{pct}")
    engine = _engine()
    zone = engine._zone(SUB.timezone)
    per_day: dict[int, int] = defaultdict(int)
    per_month: dict[int, int] = defaultdict(int)
    for s, c in raw:
        day = engine._bounds(engine._plans["p"].windows[1], t0 + s, SUB, zone)[0]
        month = engine._bounds(engine._plans["p"].windows[2], t0 + s, SUB, zone)[0]
        per_day[day] += 1
        per_month[month] += c
    for day, count in per_day.items():
        for pct in (50, 80, 100):
            if count * 100 >= pct * DAY_LIMIT:
                out.add(f"u|p.day@{rfc3339(day)}|{pct}")
    for month, cents in per_month.items():
        for pct in (50, 80, 100):
            if cents * 100 >= pct * MONTH_LIMIT:
                out.add(f"u|p.month@{rfc3339(month)}|{pct}")
        if cents > 200:
            out.add(f"u|p.break_even@{rfc3339(month)}|100")
    return out


@settings(max_examples=200, deadline=None)
@given(
    raw=raw_events,
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(0, 100), max_size=8),
)
def test_each_threshold_fires_exactly_once(
    raw: list[tuple[int, int]], order: Any, cuts: list[int]
) -> None:
    """(b) The same alerts, each once, whatever the order and the batch boundaries."""
    in_order = sorted(_events(raw), key=lambda e: e.occurred_at)
    shuffled = _events(raw)
    order.shuffle(shuffled)
    results = []
    for events, batch_cuts in ((in_order, []), (shuffled, cuts)):
        engine = _engine()
        state = engine.new_state("u")
        out = Effects()
        for batch in _batches(events, batch_cuts):
            engine.apply_batch(state, SUB, batch, DETECTED, out)
        ids = [a["alert_id"] for a in out.alerts]
        assert len(ids) == len(set(ids)), "an alert fired twice"
        assert not out.late and not out.rejected
        results.append(set(ids))
    assert results[0] == results[1] == _expected_alerts(raw)


@settings(max_examples=200, deadline=None)
@given(
    raw=raw_events,
    topups=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 300)), max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_credits_plus_overage_is_usage_beyond_allowance(
    raw: list[tuple[int, int]], topups: list[tuple[int, int]], order: Any
) -> None:
    """(c) Per billing month: credit quantity + overage quantity == usage beyond the allowance,
    credits drawn == top-ups - balance, and money drawn + billed == the price of the excess."""
    events = _events(raw)
    order.shuffle(events)
    engine = _engine()
    state = engine.new_state("u")
    out = Effects()
    pending = sorted(topups)
    for i, ev in enumerate(events):
        while pending and pending[0][0] <= i:
            at, cents = pending.pop(0)
            engine.top_up(state, SUB, f"c{at}-{cents}-{len(pending)}", _cents(cents), DETECTED, out)
        engine.apply(state, SUB, ev, DETECTED, out)
    topped = sum(_cents(c) for at, c in topups if at < len(events))
    zone = engine._zone(SUB.timezone)
    month_window = engine._plans["p"].windows[2]
    usage: dict[str, int] = defaultdict(int)
    for ev in events:
        start = engine._bounds(month_window, epoch_s(ev.occurred_at), SUB, zone)[0]
        usage[f"p.month@{rfc3339(start)}"] += int(ev.cost * 100)
    credit_qty: dict[str, Decimal] = defaultdict(Decimal)
    overage_qty: dict[str, Decimal] = defaultdict(Decimal)
    money: dict[str, Decimal] = defaultdict(Decimal)
    for c in out.credit_draws:
        credit_qty[c["window_id"]] += Decimal(c["quantity"])
        money[c["window_id"]] += Decimal(c["amount"])
    for o in out.overages:
        overage_qty[o["window_id"]] += Decimal(o["quantity"])
        money[o["window_id"]] += Decimal(o["amount"])
        assert o["amount"] == o["value"]  # no ceiling in this plan
    for window_id, cents in usage.items():
        beyond = max(Decimal(0), _cents(cents) - 3)
        assert credit_qty[window_id] + overage_qty[window_id] == beyond
        assert money[window_id] == beyond * PRICE  # cents * 1.3 fits the scale: no rounding
    drawn = sum((Decimal(c["amount"]) for c in out.credit_draws), Decimal(0))
    assert drawn == topped - Decimal(units_str(state.wallet))


def _record_key(out: Effects) -> dict[str, Any]:
    return {
        "alerts": [a["alert_id"] for a in out.alerts],
        "alert_bodies": out.alerts,
        "overages": out.overages,
        "credits": out.credit_draws,
        "enforcement": [
            (e["state"], e["reason"], e["window"], e["until"], e["version"])
            for e in out.enforcement
        ],
    }


@settings(max_examples=200, deadline=None)
@given(
    raw=raw_events,
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(0, 100), max_size=6),
    restarts=st.lists(st.booleans(), max_size=7),
    grace_s=st.sampled_from([0, 600, GRACE]),
)
def test_restore_mid_stream_changes_nothing(
    raw: list[tuple[int, int]], order: Any, cuts: list[int], restarts: list[bool], grace_s: int
) -> None:
    """(d) Serializing and restoring between batches gives the same records and final state
    (with short grace periods too, so eviction and late events are part of the run)."""
    events = _events(raw)
    order.shuffle(events)
    batches = _batches(events, cuts)
    runs = []
    for restart in (False, True):
        engine = _engine(grace_s)
        state = engine.new_state("u")
        engine.top_up(state, SUB, "c0", Decimal("0.5"), DETECTED)
        out = Effects()
        for index, batch in enumerate(batches):
            if restart and (index >= len(restarts) or restarts[index]):
                text = json.dumps(state.to_dict(), separators=(",", ":"))
                engine = _engine(grace_s)  # a new worker with the same catalog
                state = engine.restore(json.loads(text))
            engine.apply_batch(state, SUB, batch, DETECTED, out)
        runs.append((_record_key(out), [late.event_id for late in out.late], state.to_dict()))
    assert runs[0] == runs[1]
