"""A usage event carrying a ``reservation_id`` settles that admission in the worker's cap state.

The pure engine settles a reservation when a :class:`~stream_processors.caps.CapEvent` carries
its id (``tests/unit/test_admission.py``); these cases check that the id travels there from the
event contract: through :func:`~stream_processors.caps.cap_event` in the caps stage, and from the
raw message bytes through the whole batch pipeline (decode, price, caps).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import PlanPeriod, Subscription
from schemas.wire import decode_usage
from stream_processors import (
    CapEngine,
    DictState,
    InRecord,
    PriceCatalog,
    PricedRecord,
    Quote,
    UsageProcessor,
    parse_plans,
    to_units,
)
from stream_processors._pipeline import BatchPipeline
from stream_processors.caps import CapStage, Estimate, UserCapState, cap_event

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=1)
PARTITION = 3
PLANS = parse_plans(
    {
        "plans": [
            {
                "id": "capped",
                "monthly_price": "0",
                "windows": [
                    {
                        "name": "monthly",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "1.00",
                        "at_cap": {"action": "block"},
                    }
                ],
            }
        ]
    }
)
SUB = Subscription(
    user_id="u",
    org_id="org",
    billing_anchor=datetime(2026, 11, 1, tzinfo=UTC),
    plans=[PlanPeriod(plan_id="capped", effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
)


def subs(user_id: str) -> Subscription | None:
    return SUB if user_id == "u" else None


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "occurred_at": (T0 + timedelta(seconds=30 + i)).isoformat(),
        "org_id": "org",
        "user_id": "u",
        "gateway": "g",
        "requested_model": "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 20,
        **extra,
    }


def priced(i: int, cost: str, **extra: Any) -> PricedRecord:
    units = to_units(Decimal(cost))
    return PricedRecord(
        decode_usage(orjson.dumps(event(i, **extra))),
        Quote(units, units, 0, 0, 0, False),
        "capped",
        PARTITION,
        False,
        i,
    )


def admitted(engine: CapEngine, caps: DictState, *ids: str, cost: str = "0.40") -> None:
    """Admit a request per id (as the gateway's admission does) into the stored cap state."""
    state = engine.new_state("u", "org")
    for rid in ids:
        admission = engine.admit(state, SUB, rid, "gpt-4o", Estimate(to_units(Decimal(cost))), T0)
        assert admission.allowed and state.reservations[rid].held
    caps.put(PARTITION, "u", orjson.dumps({"o": -1, "p": PARTITION, "s": state.to_dict()}))


def stored(engine: CapEngine, caps: DictState) -> UserCapState:
    """The user's cap state as the table holds it (what a restarted worker would restore)."""
    raw = caps.get("u")
    assert raw is not None
    return engine.restore(orjson.loads(raw)["s"])


def test_cap_event_carries_the_reservation_id() -> None:
    assert cap_event(priced(0, "0.10", reservation_id="res-1")).reservation_id == "res-1"
    assert cap_event(priced(1, "0.10")).reservation_id is None


def test_the_caps_stage_settles_the_reservation_an_event_carries() -> None:
    engine = CapEngine(PLANS)
    caps = DictState()
    admitted(engine, caps, "res-1", "res-2")
    stage = CapStage(engine, subs, caps)

    out = stage.process([priced(0, "0.10", reservation_id="res-1"), priced(1, "0.05")], NOW)

    assert out.counters["caps_applied"] == 2
    state = stored(engine, caps)
    assert not state.reservation("res-1").held  # settled by its usage event
    assert state.reservation("res-1").settled
    assert state.reservation("res-2").held  # no event named it: still held
    assert not state.reservation("res-2").settled


def test_a_settled_hold_frees_its_budget_for_the_next_admission() -> None:
    # 1.00 allowed: 0.80 held by res-1; once its 0.10 call is counted and the hold released,
    # a 0.50 request fits (0.10 + 0.50), which it would not while the 0.80 were still held.
    engine = CapEngine(PLANS)
    caps = DictState()
    admitted(engine, caps, "res-1", cost="0.80")
    stage = CapStage(engine, subs, caps)
    stage.process([priced(0, "0.10", reservation_id="res-1")], NOW)

    state = stored(engine, caps)
    nxt = engine.admit(state, SUB, "res-2", "gpt-4o", Estimate(to_units(Decimal("0.50"))), NOW)
    assert nxt.allowed, nxt


def test_an_unknown_reservation_id_changes_nothing() -> None:
    engine = CapEngine(PLANS)
    caps = DictState()
    admitted(engine, caps, "res-1")
    stage = CapStage(engine, subs, caps)

    out = stage.process([priced(0, "0.10", reservation_id="res-other")], NOW)

    assert out.counters["caps_applied"] == 1
    state = stored(engine, caps)
    assert state.reservation("res-1").held
    assert state.reservation("res-other") is None


def test_the_worker_pipeline_settles_a_reservation_from_the_message_bytes() -> None:
    engine = CapEngine(PLANS)
    states = [DictState() for _ in range(4)]
    admitted(engine, states[3], "res-1", "res-2")
    processor = UsageProcessor(
        PriceCatalog.load(),
        subs,
        seen=states[0],
        windows=states[1],
        marks=states[2],
        window_s=60,
        grace_s=300,
        dedupe_horizon_s=86_400,
    )
    pipeline = BatchPipeline(processor, CapStage(engine, subs, states[3]), states)
    records = [
        InRecord("usage.events", PARTITION, i, b"u", orjson.dumps(payload))
        for i, payload in enumerate([event(0, reservation_id="res-1"), event(1)])
    ]

    out = pipeline.run(records, NOW)

    assert not out.poison and not out.result.dead
    assert out.capped.counters["caps_applied"] == 2
    state = stored(engine, states[3])
    assert state.reservation("res-1").settled and not state.reservation("res-1").held
    assert state.reservation("res-2").held
    # The priced output does not carry the field (its schema is unchanged).
    for _, value in out.result.priced:
        assert b"reservation_id" not in value
