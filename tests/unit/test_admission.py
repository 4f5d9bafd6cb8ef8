"""Admission (reservations) as tables of cases, plus a property (pure logic, no Kafka).

A request reserves its estimate before the model call; the usage event carrying the reservation
id settles it; unsettled reservations expire. See docs/DESIGN.md, "Admission (reservations)".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import PlanPeriod, Subscription
from schemas.plans import parse_plans
from stream_processors._money import decimal_to_units
from stream_processors._time import epoch_s
from stream_processors.caps import Admission, CapEngine, CapEvent, Effects, Estimate, UserCapState
from stream_processors.caps.state import FixedState, RollingState

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)  # a Monday, on a 5-minute bucket edge
DETECTED = datetime(2030, 1, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 12, 1, tzinfo=UTC)  # billing anchor on the 1st, UTC
TTL = 600


def U(text: str) -> int:
    """USD text as exact units."""
    return decimal_to_units(Decimal(text))


def E(cost: str, tokens: int = 0) -> Estimate:
    return Estimate(U(cost), tokens)


def _window(name: str, kind: str, unit: str, allowance: str, at_cap: Any, **extra: Any) -> Any:
    return {
        "name": name,
        "kind": kind,
        "unit": unit,
        "allowance": allowance,
        "at_cap": at_cap,
        **extra,
    }


BLOCK = {"action": "block"}
PLANS = parse_plans(
    {
        "plans": [
            {
                "id": plan_id,
                "monthly_price": "0",
                "windows": windows,
            }
            for plan_id, windows in {
                "month": [_window("m", "billing_month", "usd", "1.00", BLOCK)],
                "roll": [_window("h", "rolling_hours", "usd", "1.00", BLOCK, hours=1)],
                "day": [_window("d", "calendar_day", "requests", "3", BLOCK)],
                "week": [_window("w", "week", "tokens", "1000", BLOCK)],
                "down": [
                    _window(
                        "m",
                        "billing_month",
                        "usd",
                        "1.00",
                        {"action": "downgrade", "model": "mini"},
                        exempt_models=["mini"],
                    ),
                    _window("h", "rolling_hours", "usd", "2.00", BLOCK, hours=1),
                ],
                "meter": [
                    _window(
                        "m",
                        "billing_month",
                        "usd",
                        "1.00",
                        {"action": "overage", "unit_price": "1", "ceiling_usd": "0.50"},
                    )
                ],
                "open": [
                    _window(
                        "m",
                        "billing_month",
                        "usd",
                        "1.00",
                        {"action": "overage", "unit_price": "1.5"},
                    )
                ],
            }.items()
        ]
    }
)
ENGINE = CapEngine(PLANS, reservation_ttl_s=TTL)


def sub(plan_id: str) -> Subscription:
    return Subscription(
        user_id="u",
        org_id="org",
        billing_anchor=datetime(2026, 1, 1, tzinfo=UTC),
        plans=[PlanPeriod(plan_id=plan_id, effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
    )


_ids = iter(range(10**9))


def spend(
    state: UserCapState,
    plan_id: str,
    cost: str,
    at: datetime = T0,
    *,
    tokens: int = 0,
    model: str = "big",
    reservation_id: str | None = None,
) -> Effects:
    event = CapEvent(
        f"e{next(_ids)}",
        "u",
        at,
        Decimal(cost),
        tokens,
        model,
        reservation_id=reservation_id,
    )
    return ENGINE.apply(state, sub(plan_id), event, DETECTED)


def admit(
    state: UserCapState,
    plan_id: str,
    estimate: Estimate,
    at: datetime = T0,
    *,
    rid: str | None = None,
    model: str = "big",
    downgrade: Any = None,
) -> Admission:
    return ENGINE.admit(
        state,
        sub(plan_id),
        rid if rid is not None else f"r{next(_ids)}",
        model,
        estimate,
        at,
        downgrade_estimate=downgrade,
    )


def fresh(plan_id: str, settled: str = "0", tokens: int = 0, requests: int = 0) -> UserCapState:
    state = UserCapState("u", "org")
    if settled != "0" or tokens:
        spend(state, plan_id, settled, tokens=tokens)
    for _ in range(requests):
        spend(state, plan_id, "0")
    return state


# ------------------------------------------------------------------------------- block windows


@dataclass(frozen=True)
class Case:
    plan: str
    settled: str
    estimate: Estimate
    action: str
    reason: str
    retry_after: datetime | None = None
    settled_tokens: int = 0
    settled_requests: int = 0


ONE_UNIT = "0.000000000000000000000001"
BLOCK_CASES = {
    "month: room": Case("month", "0.50", E("0.10"), "allow", "ok"),
    "month: exactly the remaining budget": Case("month", "0.90", E("0.10"), "allow", "ok"),
    "month: one unit over": Case(
        "month", "0.90", E("0.100000000000000000000001"), "block", "cap", MONTH_END
    ),
    "month: full, zero estimate": Case("month", "1.00", E("0"), "block", "cap", MONTH_END),
    "month: larger than the allowance": Case("month", "0", E("1.01"), "block", "cap", None),
    "roll: exactly the remaining budget": Case("roll", "0.95", E("0.05"), "allow", "ok"),
    "roll: one unit over, room when the spend rolls out": Case(
        "roll", "0.95", E("0.050000000000000000000001"), "block", "cap", T0 + timedelta(hours=1)
    ),
    "day: third request": Case("day", "0", E("0"), "allow", "ok", settled_requests=2),
    "day: fourth request": Case(
        "day", "0", E("0"), "block", "cap", datetime(2026, 11, 3, tzinfo=UTC), settled_requests=3
    ),
    "week: tokens exactly fit": Case("week", "0", E("0", 400), "allow", "ok", settled_tokens=600),
    "week: one token over": Case(
        "week",
        "0",
        E("0", 401),
        "block",
        "cap",
        datetime(2026, 11, 9, tzinfo=UTC),
        settled_tokens=600,
    ),
}


@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_block_windows(case: Case) -> None:
    state = fresh(case.plan, case.settled, case.settled_tokens, case.settled_requests)
    got = admit(state, case.plan, case.estimate, T0 + timedelta(minutes=10))
    assert (got.action, got.reason) == (case.action, case.reason)
    expected = None if case.retry_after is None else epoch_s(case.retry_after)
    assert got.retry_after == expected
    if got.allowed:
        assert got.reserved == case.estimate and got.model == "big"
    else:
        assert got.reserved == Estimate(0, 0, 0) and got.model is None


# ------------------------------------------------------------------------------- downgrade


def test_downgrade_reserves_the_downgrade_estimate() -> None:
    state = fresh("down", "1.00")
    got = admit(state, "down", E("0.02"), downgrade=E("0.002"))
    assert (got.action, got.reason, got.model, got.window) == ("downgrade", "cap", "mini", "down.m")
    assert got.reserved == E("0.002")
    # The hold counts in the rolling window (mini is exempt only from the monthly one).
    assert admit(state, "down", E("0.998"), model="mini").action == "allow"
    assert admit(state, "down", E(ONE_UNIT), model="mini").action == "block"


def test_downgrade_estimate_computed_by_the_caller() -> None:
    asked: list[str] = []

    def estimate_for(model: str) -> Estimate:
        asked.append(model)
        return E("0.003")

    got = admit(fresh("down", "1.00"), "down", E("0.02"), downgrade=estimate_for)
    assert asked == ["mini"]
    assert (got.action, got.model, got.reserved) == ("downgrade", "mini", E("0.003"))


def test_downgrade_within_the_cap_is_not_needed() -> None:
    got = admit(fresh("down", "0.98"), "down", E("0.02"), downgrade=E("0.002"))
    assert (got.action, got.model, got.reserved) == ("allow", "big", E("0.02"))


def test_downgrade_without_an_estimate_blocks() -> None:
    got = admit(fresh("down", "1.00"), "down", E("0.02"))
    assert (got.action, got.reason, got.retry_after) == (
        "block",
        "downgrade_without_estimate",
        None,
    )


def test_downgraded_request_still_meets_block_windows() -> None:
    state = fresh("down", "1.00")  # the rolling window (2.00) has 1.00 left
    assert admit(state, "down", E("0.02"), downgrade=E("1.00")).action == "downgrade"
    got = admit(state, "down", E("0.02"), downgrade=E(ONE_UNIT))
    assert (got.action, got.reason, got.window) == ("block", "cap", "down.h")
    assert got.retry_after == epoch_s(T0 + timedelta(hours=1))


# ------------------------------------------------------------------------------- overage, credits


OVERAGE_CASES = {
    # (plan, settled, credit top-up, estimate) -> (action, reason, credit, billed)
    "within the allowance": ("meter", "0.40", "0", "0.60", ("allow", "ok", "0", "0")),
    "billed up to exactly the ceiling": (
        "meter",
        "1.00",
        "0",
        "0.50",
        ("allow", "overage", "0", "0.50"),
    ),
    "one unit beyond the ceiling": (
        "meter",
        "1.00",
        "0",
        "0.500000000000000000000001",
        ("block", "ceiling", "0", "0"),
    ),
    "part billed already": ("meter", "1.30", "0", "0.20", ("allow", "overage", "0", "0.20")),
    "part billed already, one unit over": (
        "meter",
        "1.30",
        "0",
        "0.200000000000000000000001",
        ("block", "ceiling", "0", "0"),
    ),
    "credit first, the rest billed": (
        "meter",
        "1.00",
        "0.10",
        "0.60",
        ("allow", "overage", "0.10", "0.50"),
    ),
    "credit covers it all": ("meter", "1.00", "0.10", "0.05", ("allow", "credit", "0.05", "0")),
    "credit lifts the ceiling": ("meter", "1.50", "0.10", "0.10", ("allow", "credit", "0.10", "0")),
    "credit lifts the ceiling, one unit over": (
        "meter",
        "1.50",
        "0.10",
        "0.100000000000000000000001",
        ("block", "ceiling", "0", "0"),
    ),
    "ceiling reached, no credit": ("meter", "1.50", "0", ONE_UNIT, ("block", "ceiling", "0", "0")),
    "no ceiling": ("open", "5.00", "0", "100", ("allow", "overage", "0", "150")),
}


@pytest.mark.parametrize(
    ("plan", "settled", "credit", "estimate", "expected"),
    OVERAGE_CASES.values(),
    ids=OVERAGE_CASES.keys(),
)
def test_overage_and_credits(
    plan: str, settled: str, credit: str, estimate: str, expected: tuple[str, str, str, str]
) -> None:
    state = UserCapState("u", "org")
    spend(state, plan, settled)
    if credit != "0":  # after the settled usage: credit pays for what comes next
        ENGINE.top_up(state, sub(plan), "c1", Decimal(credit), DETECTED)
    got = admit(state, plan, E(estimate))
    action, reason, credit_part, billed_part = expected
    assert (got.action, got.reason, got.credit, got.billed) == (
        action,
        reason,
        U(credit_part),
        U(billed_part),
    )
    if action == "block":
        assert got.retry_after == epoch_s(MONTH_END)


def test_overage_settled_as_projected() -> None:
    # What was projected is what the engine bills when the usage arrives: never clamped.
    state = fresh("meter", "1.00")
    got = admit(state, "meter", E("0.50"), rid="r")
    effects = spend(state, "meter", "0.50", reservation_id="r")
    assert [(o["value"], o["amount"]) for o in effects.overages] == [("0.5", "0.5")]
    assert got.billed == U("0.50")
    assert admit(state, "meter", E(ONE_UNIT)).reason == "ceiling"


def test_credit_held_by_earlier_reservations_is_not_spent_twice() -> None:
    state = fresh("meter", "1.00")
    ENGINE.top_up(state, sub("meter"), "c", Decimal("0.10"), DETECTED)
    first = admit(state, "meter", E("0.06"))
    second = admit(state, "meter", E("0.06"))
    assert (first.reason, first.credit, first.billed) == ("credit", U("0.06"), 0)
    assert (second.reason, second.credit, second.billed) == ("overage", U("0.04"), U("0.02"))
    # 0.50 of ceiling - 0.02 projected billed = 0.48 left to bill.
    assert admit(state, "meter", E("0.480000000000000000000001")).reason == "ceiling"
    assert admit(state, "meter", E("0.48")).reason == "overage"


# ------------------------------------------------------------------------------- idempotence


def test_same_id_returns_the_stored_decision_and_reserves_once() -> None:
    state = fresh("month", "0.50")
    first = admit(state, "month", E("0.30"), rid="same")
    again = admit(state, "month", E("0.40"), rid="same", at=T0 + timedelta(seconds=5))
    assert again == first
    assert len(state.reservations) == 1
    # One hold of 0.30: 0.20 is left, not 0.
    assert admit(state, "month", E("0.20")).action == "allow"


def test_a_replayed_blocked_request_stays_blocked() -> None:
    state = fresh("month", "0.90")
    blocked = admit(state, "month", E("0.20"), rid="b")
    assert blocked.action == "block"
    state.windows["month.m"] = FixedState(True)  # whatever happened since, the answer stands
    assert admit(state, "month", E("0.20"), rid="b") == blocked


def test_a_replay_after_restart_gets_the_same_answer() -> None:
    state = fresh("month", "0.50")
    first = admit(state, "month", E("0.30"), rid="x")
    restored = ENGINE.restore(orjson.loads(orjson.dumps(state.to_dict())))
    assert admit(restored, "month", E("0.30"), rid="x") == first
    assert admit(restored, "month", E("0.200000000000000000000001")).action == "block"


# ------------------------------------------------------------------------------- settle, expire


def test_settle_with_actual_below_estimate_releases_the_difference() -> None:
    state = fresh("month", "0.40")
    assert admit(state, "month", E("0.50"), rid="r").action == "allow"
    assert admit(state, "month", E("0.100000000000000000000001")).action == "block"
    spend(state, "month", "0.30", reservation_id="r")  # settles r: 0.70 spent, 0.30 left
    assert not state.reservation("r").held
    assert admit(state, "month", E("0.300000000000000000000001")).action == "block"
    assert admit(state, "month", E("0.30")).action == "allow"


def test_a_settled_reservation_is_forgotten_sooner_than_a_held_one() -> None:
    from stream_processors.caps.admission import SETTLED_MEMORY_S

    assert SETTLED_MEMORY_S < TTL
    state = fresh("month")
    admit(state, "month", E("0.10"), rid="done")
    admit(state, "month", E("0.10"), rid="open")
    spend(state, "month", "0.05", reservation_id="done")
    # Within its memory a repeat gets the first answer and holds nothing more.
    again = admit(
        state, "month", E("0.10"), T0 + timedelta(seconds=SETTLED_MEMORY_S - 1), rid="done"
    )
    assert again.action == "allow" and not state.reservation("done").held
    ENGINE.expire_reservations(state, T0 + timedelta(seconds=SETTLED_MEMORY_S))
    assert state.reservation("done") is None  # settled: forgotten
    assert state.reservation("open").held  # still holding until its TTL
    restored = ENGINE.restore(orjson.loads(orjson.dumps(state.to_dict())))
    assert set(restored.reservations) == {"open"} and not restored.settled


def test_a_settled_reservation_is_remembered_as_its_id_action_and_model() -> None:
    from stream_processors.caps.reservations import NOTHING, SETTLED, Reservation

    state = fresh("month")
    first = admit(state, "month", E("0.10"), rid="done")
    spend(state, "month", "0.05", reservation_id="done")
    kept = state.reservation("done")
    assert kept.to_row() == ["done", kept.expires, first.action, first.model]
    # A repeat is answered with the first action and model, holds nothing, spends nothing.
    again = admit(state, "month", E("0.10"), rid="done")
    assert (again.action, again.model, again.reason, again.reserved) == (
        first.action, first.model, SETTLED, NOTHING
    )  # fmt: skip
    assert admit(state, "month", E("0.95")).action == "allow"  # 0.05 spent of 1.00, no hold
    # Rows as written before the compact form still restore, as the compact form.
    old_row = ["done", 7, 99, "month", first.action, first.reason, first.model, "0.1", 0, 1,
               None, None, "0", "0", 1]  # fmt: skip
    restored = Reservation.from_row(old_row)
    assert restored.to_row() == ["done", 99, first.action, first.model] and not restored.held
    with pytest.raises(ValueError, match="4 or 15 fields"):
        Reservation.from_row(["done", 99, "allow"])
    with pytest.raises(ValueError, match="unknown admission action"):
        Reservation.from_row(["done", 99, "maybe", None])


def test_settled_reservations_expire_in_the_order_they_were_settled() -> None:
    from stream_processors.caps.admission import SETTLED_MEMORY_S
    from stream_processors.caps.reservations import SETTLED

    state = fresh("month")
    admit(state, "month", E("0.10"), T0, rid="a")
    admit(state, "month", E("0.10"), T0 + timedelta(seconds=50), rid="b")
    ENGINE.settle(state, "b")  # remembered until T0 + 50 + SETTLED_MEMORY_S
    ENGINE.settle(state, "a")  # until T0 + SETTLED_MEMORY_S, but settled after b
    assert list(state.settled) == ["b", "a"] and not state.reservations
    ENGINE.expire_reservations(state, T0 + timedelta(seconds=SETTLED_MEMORY_S))
    # a's time is up, but b, settled before it, is not: a stays (holding nothing) until b goes.
    assert list(state.settled) == ["b", "a"]
    late = admit(state, "month", E("0.10"), T0 + timedelta(seconds=SETTLED_MEMORY_S), rid="a")
    assert late.reason == SETTLED and late.reserved.cost == 0 and not state.reservations
    ENGINE.expire_reservations(state, T0 + timedelta(seconds=50 + SETTLED_MEMORY_S))
    assert not state.settled


def test_settle_unknown_twice_or_expired_is_a_no_op() -> None:
    state = fresh("month")
    assert not ENGINE.settle(state, "nope")
    admit(state, "month", E("0.50"), rid="r")
    assert ENGINE.settle(state, "r")
    assert not ENGINE.settle(state, "r")
    admit(state, "month", E("0.50"), rid="s")
    ENGINE.expire_reservations(state, T0 + timedelta(seconds=TTL))
    assert state.reservation("s") is None and not ENGINE.settle(state, "s")
    # The late usage still counts as usage.
    spend(state, "month", "0.50", T0 + timedelta(seconds=TTL), reservation_id="s")
    window = state.windows["month.m"]
    assert isinstance(window, FixedState) and window.insts[0].usage == U("0.50")


def test_unsettled_reservations_expire_at_their_time() -> None:
    state = fresh("month", "0.50")
    admit(state, "month", E("0.50"), rid="r")
    just_before = T0 + timedelta(seconds=TTL - 1)
    assert admit(state, "month", E(ONE_UNIT), just_before).action == "block"
    assert admit(state, "month", E("0.50"), T0 + timedelta(seconds=TTL)).action == "allow"
    assert "r" not in state.reservations


def test_usage_events_expire_reservations_by_event_time() -> None:
    state = fresh("month")
    admit(state, "month", E("0.50"), rid="r")
    spend(state, "month", "0.01", T0 + timedelta(seconds=TTL - 1))
    assert "r" in state.reservations
    spend(state, "month", "0.01", T0 + timedelta(seconds=TTL))
    assert "r" not in state.reservations


# ------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(
    ("plan", "settled"),
    [("month", "0.90"), ("roll", "0.90"), ("meter", "1.40"), ("down", "1.90")],
)
def test_twenty_concurrent_requests_admit_exactly_three(plan: str, settled: str) -> None:
    # 0.10 USD left (of the cap, of the overage ceiling, of the rolling window behind a
    # downgrade): 3 * 0.026 = 0.078 fits, 4 * 0.026 = 0.104 does not.
    state = fresh(plan, settled)
    if plan == "down":  # the monthly window is full: requests are downgraded, 0.026 each
        answers = [admit(state, plan, E("0.05"), downgrade=E("0.026")) for _ in range(20)]
        assert [a.action for a in answers] == ["downgrade"] * 3 + ["block"] * 17
    else:
        answers = [admit(state, plan, E("0.026")) for _ in range(20)]
        assert [a.action for a in answers] == ["allow"] * 3 + ["block"] * 17

    def ask(estimate: Estimate) -> Admission:
        if plan == "down":
            return admit(state, plan, E("0.05"), downgrade=estimate)
        return admit(state, plan, estimate)

    # No overshoot by one unit, no needless block: what is left (0.022) fits exactly.
    assert not ask(E("0.022000000000000000000001")).allowed
    assert ask(E("0.022")).allowed
    assert not ask(E(ONE_UNIT)).allowed


def test_rolling_window_respects_holds_at_later_times() -> None:
    # A gateway whose clock is behind asks at an earlier time: the later hold still counts in
    # every bucket this request would count in.
    state = fresh("roll")
    assert admit(state, "roll", E("0.80"), T0 + timedelta(minutes=30)).action == "allow"
    got = admit(state, "roll", E("0.30"), T0)
    # Room at T0 + 90 min: a request then no longer shares a window with the 0.80.
    assert (got.action, got.retry_after) == ("block", epoch_s(T0 + timedelta(minutes=90)))
    assert admit(state, "roll", E("0.20"), T0).action == "allow"


# ------------------------------------------------------------------------------- serialization


def test_reservations_round_trip_and_old_states_restore() -> None:
    state = fresh("meter", "1.00")
    ENGINE.top_up(state, sub("meter"), "c", Decimal("0.05"), DETECTED)
    admit(state, "meter", E("0.20"), rid="a")
    admit(state, "meter", E("0.40"), rid="b")
    ENGINE.settle(state, "a")
    obj = orjson.loads(orjson.dumps(state.to_dict()))
    restored = ENGINE.restore(obj)
    assert restored.to_dict() == obj
    assert {
        k: (r.admission, r.at, r.expires, r.plan_id, r.settled)
        for k, r in restored.reservations.items()
    } == {
        k: (r.admission, r.at, r.expires, r.plan_id, r.settled)
        for k, r in state.reservations.items()
    }
    # A worker of the version before the compact settled rows reads only "r", rows of 15.
    assert [len(row) for row in obj["r"]] == [15] and [len(row) for row in obj["d"]] == [4]
    old = {key: value for key, value in obj.items() if key not in ("r", "d")}
    assert ENGINE.restore(old).reservations == {}
    assert "r" not in fresh("month", "0.10").to_dict()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        Estimate(-1)
    with pytest.raises(TypeError):
        Estimate(0.5)  # type: ignore[arg-type]
    other = UserCapState("someone-else")
    with pytest.raises(ValueError):
        admit(other, "month", E("0.1"))


# ------------------------------------------------------------------------------- property

PROP = parse_plans(
    {
        "plans": [
            {
                "id": "p",
                "monthly_price": "0",
                "windows": [
                    _window("1h", "rolling_hours", "usd", "0.60", BLOCK, hours=1),
                    _window("day", "calendar_day", "requests", "5", BLOCK),
                    _window(
                        "month",
                        "billing_month",
                        "usd",
                        "0.30",
                        {"action": "overage", "unit_price": "1.3", "ceiling_usd": "0.10"},
                    ),
                    _window(
                        "tok",
                        "week",
                        "tokens",
                        "2000",
                        {"action": "downgrade", "model": "mini"},
                        exempt_models=["mini"],
                    ),
                ],
            }
        ]
    }
)
PROP_TTL = 1800
PROP_ENGINE = CapEngine(PROP, reservation_ttl_s=PROP_TTL)
PROP_SUB = Subscription(
    user_id="u",
    org_id="org",
    billing_anchor=datetime(2026, 1, 1, tzinfo=UTC),
    plans=[PlanPeriod(plan_id="p", effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
)
CENT = U("0.01")

op = st.one_of(
    st.tuples(
        st.just("admit"),
        st.integers(0, 30),  # estimate, cents
        st.integers(0, 900),  # tokens
        st.integers(0, 300),  # seconds since the previous operation
        st.integers(0, 900),  # how far behind the clock this gateway is
    ),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 100), st.just(0), st.just(0)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.just(100), st.just(0), st.just(0)),
    st.tuples(st.just("top_up"), st.integers(1, 20), st.just(0), st.just(0), st.just(0)),
)


def _check_caps(state: UserCapState, effects: Effects) -> None:
    rolling = state.windows.get("p.1h")
    if isinstance(rolling, RollingState):
        for k in rolling.buckets:
            for end in range(k, k + 12):
                total = sum(v for j, v in rolling.buckets.items() if end - 12 < j <= end)
                assert total <= U("0.60")
    day = state.windows.get("p.day")
    if isinstance(day, FixedState):
        assert all(inst.usage <= 5 for inst in day.insts)
    month = state.windows.get("p.month")
    if isinstance(month, FixedState):
        assert all(inst.billed <= U("0.10") for inst in month.insts)
    # The engine never had to clamp overage at the ceiling (usage served unbilled).
    assert all(o["amount"] == o["value"] for o in effects.overages)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, min_size=10, max_size=80))
def test_settled_spend_never_exceeds_the_hard_caps(
    ops: list[tuple[str, int, int, int, int]],
) -> None:
    state = UserCapState("u", "org")
    now = T0
    admitted: list[tuple[str, Admission, datetime]] = []
    for n, (kind, a, b, dt, behind) in enumerate(ops):
        if kind == "admit":
            now += timedelta(seconds=dt)
            at = now - timedelta(seconds=behind)
            estimate = Estimate(a * CENT, b)
            mini = Estimate(a * CENT // 10, b)
            got = PROP_ENGINE.admit(
                state, PROP_SUB, f"r{n}", "big", estimate, at, downgrade_estimate=mini
            )
            if got.allowed:
                admitted.append((f"r{n}", got, at))
        elif kind == "settle":
            open_ = [
                (rid, adm, at)
                for rid, adm, at in admitted
                if rid in state.reservations
                and state.reservations[rid].held
                and state.reservations[rid].expires > epoch_s(now)
            ]
            if not open_:
                continue
            rid, adm, at = open_[a % len(open_)]
            # Actual <= estimate, in every unit.
            cost = adm.reserved.cost * b // 100
            tokens = adm.reserved.tokens * b // 100
            event = CapEvent(
                f"e{n}",
                "u",
                at,
                Decimal(cost).scaleb(-24),
                tokens,
                adm.model or "",
                cost_units=cost,
                reservation_id=rid,
            )
            effects = PROP_ENGINE.apply(state, PROP_SUB, event, DETECTED)
            assert not effects.rejected
            _check_caps(state, effects)
        else:
            PROP_ENGINE.top_up(state, PROP_SUB, f"c{n}", Decimal(a) / 100, DETECTED)
    _check_caps(state, Effects())
