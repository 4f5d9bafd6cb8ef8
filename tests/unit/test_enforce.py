"""CapStage as tables of cases over a DictState: thresholds, writes, skips, restart."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import PlanPeriod, Subscription, UsageEvent
from stream_processors import (
    CapEngine,
    DictState,
    PricedRecord,
    Quote,
    parse_plans,
    to_units,
)
from stream_processors.caps import CapStage, cap_event

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 12, 0, 5, tzinfo=UTC)
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
                        "thresholds": [50, 80, 100],
                        "at_cap": {"action": "block"},
                    }
                ],
            },
            {
                "id": "metered",
                "monthly_price": "0",
                "windows": [
                    {
                        "name": "monthly",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "1.00",
                        "at_cap": {"action": "overage", "unit_price": "1.10"},
                    }
                ],
            },
            {
                "id": "light",
                "monthly_price": "0",
                "windows": [
                    {
                        "name": "daily",
                        "kind": "calendar_day",
                        "unit": "requests",
                        "allowance": "4",
                        "thresholds": [50, 100],
                        "at_cap": {"action": "downgrade", "model": "small"},
                    }
                ],
            },
        ]
    }
)


def sub(user: str, plan: str) -> Subscription:
    return Subscription(
        user_id=user,
        org_id="org",
        billing_anchor=datetime(2026, 11, 1, tzinfo=UTC),
        plans=[PlanPeriod(plan_id=plan, effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
    )


SUBS = {
    "u-cap": sub("u-cap", "capped"),
    "u-over": sub("u-over", "metered"),
    "u-light": sub("u-light", "light"),
    "u-ghost": sub("u-ghost", "no-such-plan"),
}

_seq = iter(range(10**9))


def rec(user: str, cost: str, *, plan: str | None = None, partition: int = 0, s: int = 0) -> Any:
    """A PricedRecord of ``user`` costing ``cost`` USD, ``s`` seconds after T0."""
    i = next(_seq)
    event = UsageEvent(
        event_id=f"{user}-e{i}",
        occurred_at=T0 + timedelta(seconds=s or i),
        org_id="org",
        user_id=user,
        gateway="g",
        requested_model="m",
        input_tokens=10,
        output_tokens=5,
    )
    units = to_units(Decimal(cost))
    quote = Quote(units, units, 0, 0, 0, False)
    if plan is None:
        found = SUBS.get(user)
        plan = found.plans[0].plan_id if found else ""
    return PricedRecord(event, quote, plan, partition, False, i)


def stage(state: DictState | None = None) -> CapStage:
    return CapStage(
        CapEngine(PLANS, grace_s=60), SUBS.get, state if state is not None else DictState()
    )


def alerts(outs: Sequence[Any]) -> list[tuple[str, int]]:
    return [
        (a["user_id"], a["threshold"])
        for o in outs
        for a in (orjson.loads(v) for _, v in o.alerts)
        if a["kind"] == "threshold"
    ]


# (name, batches of (user, cost), expected threshold alerts, expected last enforcement state)
THRESHOLD_CASES = [
    ("below 50: first state ok", [[("u-cap", "0.49")]], [], "ok"),
    ("exactly 50: warn", [[("u-cap", "0.50")]], [50], "warn"),
    ("one event over everything", [[("u-cap", "1.20")]], [50, 80, 100], "blocked"),
    (
        "three batches",
        [[("u-cap", "0.30"), ("u-cap", "0.25")], [("u-cap", "0.30")], [("u-cap", "0.20")]],
        [50, 80, 100],
        "blocked",
    ),
    ("no refire past 100", [[("u-cap", "1.00")], [("u-cap", "0.50")]], [50, 80, 100], None),
    ("requests window, downgrade", [[("u-light", "0")] * 4], [50, 100], "downgrade"),
]


@pytest.mark.parametrize(
    ("name", "batches", "expected", "last_state"),
    THRESHOLD_CASES,
    ids=[c[0] for c in THRESHOLD_CASES],
)
def test_thresholds(
    name: str, batches: list[list[tuple[str, str]]], expected: list[int], last_state: str | None
) -> None:
    st = stage()
    outs = [st.process([rec(u, c) for u, c in batch], NOW) for batch in batches]
    assert [t for _, t in alerts(outs)] == expected
    enforcement = [orjson.loads(v) for o in outs for _, v in o.enforcement]
    if last_state is None:
        # Either nothing was ever emitted or the last batch changed nothing.
        assert not outs[-1].enforcement
    else:
        assert enforcement[-1]["state"] == last_state
    if last_state == "downgrade":
        assert enforcement[-1]["downgrade_to"] == "small"


def test_enforcement_record_fields_when_blocked() -> None:
    out = stage().process([rec("u-cap", "0.40"), rec("u-cap", "0.70")], NOW)
    [(key, value)] = out.enforcement
    record = orjson.loads(value)
    assert key == "u-cap"
    assert record["state"] == "blocked" and record["reason"] == "cap"
    assert record["window"] == "capped.monthly"
    assert record["remaining"] == "0" and record["usage"] == "1.1" and record["limit"] == "1"
    assert record["until"] == "2026-12-01T00:00:00Z"
    assert record["updated_at"] == "2026-11-02T12:00:05Z"


def test_one_read_and_one_write_per_user_per_batch_on_its_partition() -> None:
    state = DictState()
    reads: list[str] = []
    where: list[int | None] = []
    get = state.get

    def counting_get(key: str, partition: int | None = None) -> bytes | None:
        reads.append(key)
        where.append(partition)
        return get(key, partition)

    state.get = counting_get  # type: ignore[method-assign]
    batch = [rec("u-cap", "0.1", partition=2) for _ in range(5)]
    batch += [rec("u-light", "0", partition=1) for _ in range(3)]
    out = stage(state).process(batch, NOW)
    assert sorted(reads) == ["u-cap", "u-light"]
    assert sorted(where) == [1, 2]  # each read names the user's partition: no search
    assert sorted((p, k) for p, k, _ in state.writes) == [(1, "u-light"), (2, "u-cap")]
    assert out.partitions == {"u-cap": 2, "u-light": 1}
    assert out.counters["caps_users"] == 2 and out.counters["caps_applied"] == 8
    # The stored value is the engine's own serialization, restorable as is.
    stored = orjson.loads(state.data["u-cap"])
    restored = CapEngine(PLANS).restore(stored["s"])
    assert stored["o"] == batch[4].offset  # the last source offset applied
    assert restored.user_id == "u-cap" and restored.org_id == "org"


SKIP_CASES = [
    # (name, record, counter)
    ("no subscription", lambda: rec("nobody", "1", plan=""), "caps_no_plan"),
    ("plan not in catalog", lambda: rec("u-ghost", "1"), "caps_unknown_plan"),
    ("subscription vanished", lambda: rec("gone", "1", plan="capped"), "caps_no_subscription"),
]


@pytest.mark.parametrize(("name", "make", "counter"), SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_events_without_a_usable_plan_are_counted_and_skipped(
    name: str, make: Any, counter: str
) -> None:
    state = DictState()
    out = stage(state).process([make(), rec("u-cap", "0.6")], NOW)
    assert out.counters[counter] == 1
    assert out.counters["caps_applied"] == 1
    assert [k for _, k, _ in state.writes] == ["u-cap"]
    assert alerts([out]) == [("u-cap", 50)]


def test_restart_from_the_same_state_does_not_refire() -> None:
    state = DictState()
    first = stage(state).process([rec("u-cap", "0.55")], NOW)
    assert alerts([first]) == [("u-cap", 50)]
    # A new stage (a restarted worker) over the same state: the fired set was persisted.
    again = stage(state)
    outs = [again.process([rec("u-cap", "0.10")], NOW), again.process([rec("u-cap", "0.40")], NOW)]
    assert alerts(outs) == [("u-cap", 80), ("u-cap", 100)]
    assert stage(state).process([rec("u-cap", "5")], NOW).alerts == []


def test_overage_and_credit_draws_share_the_overages_topic() -> None:
    state = DictState()
    st = stage(state)
    engine = st.engine
    # Give the user 0.11 USD of prepaid credit first (the engine's top-up, stored the same way).
    user_state = engine.new_state("u-over", "org")
    engine.top_up(user_state, SUBS["u-over"], "gift", Decimal("0.11"), NOW)
    state.put(0, "u-over", orjson.dumps({"o": -1, "s": user_state.to_dict()}))

    out = st.process([rec("u-over", "0.90"), rec("u-over", "0.30")], NOW)
    records = [orjson.loads(v) for _, v in out.overages]
    assert [r["record"] for r in records] == ["credit_draw", "overage"]
    draw, overage = records
    # 0.20 beyond the allowance priced at 1.10 = 0.22; 0.11 paid by credit, 0.11 billed.
    assert draw["amount"] == "0.11" and overage["amount"] == "0.11"
    assert Decimal(draw["quantity"]) + Decimal(overage["quantity"]) == Decimal("0.20")
    assert out.counters["caps_overages"] == 1 and out.counters["caps_credit_draws"] == 1


def test_corrupt_state_is_counted_and_replaced() -> None:
    state = DictState()
    state.data["u-cap"] = b"not json"
    out = stage(state).process([rec("u-cap", "0.5")], NOW)
    assert out.counters["caps_bad_state"] == 1
    assert alerts([out]) == [("u-cap", 50)]


def test_late_events_are_counted() -> None:
    st = stage()
    st.process([rec("u-light", "0", s=3 * 86_400)], NOW)
    out = st.process([rec("u-light", "0", s=1)], NOW)  # two days behind, grace 60 s
    assert out.counters["caps_late"] == 1


def test_cap_event_keeps_money_exact() -> None:
    r = rec("u-cap", "0.000000000000000000000123")
    assert cap_event(r).cost == Decimal("0.000000000000000000000123")
    assert cap_event(r).tokens == 15


def test_a_state_replaced_in_the_table_is_decoded_not_taken_from_the_cache() -> None:
    state = DictState()
    st = stage(state)
    st.process([rec("u-cap", "0.60")], NOW)  # 50 % fired, cached
    # Another worker (or a changelog restore) put an older value: an empty state.
    fresh = st.engine.new_state("u-cap", "org")
    state.data["u-cap"] = orjson.dumps({"o": -1, "s": fresh.to_dict()})
    out = st.process([rec("u-cap", "0.60")], NOW)
    assert alerts([out]) == [("u-cap", 50)]  # decoded from the table, not the cached object


def test_a_replayed_batch_after_a_crash_applies_only_what_the_state_lacks() -> None:
    state = DictState()
    first = [rec("u-cap", "0.30") for _ in range(3)]  # 0.90: 50 % and 80 % fire
    out = stage(state).process(first, NOW)
    assert alerts([out]) == [("u-cap", 50), ("u-cap", 80)]
    # The worker died before committing its offsets: a new stage over the restored table gets
    # the same messages again, then one more event.
    replay = stage(state).process([*first, rec("u-cap", "0.30")], NOW)
    assert replay.counters["caps_replayed"] == 3
    assert alerts([replay]) == [("u-cap", 100)]  # 1.20 in all: no refire, no double count
