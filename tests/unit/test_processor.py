"""The pure batch processor: validation to DLQ, dedupe, windows, lateness, pre-aggregation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import PlanPeriod, Subscription, event_from_obj
from stream_processors import DictState, InRecord, PriceCatalog, UsageProcessor, units_to_decimal

CATALOG = PriceCatalog.load()
T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def sub(user: str, plan: str = "pro") -> Subscription:
    return Subscription(
        user_id=user,
        org_id="o",
        billing_anchor=T0 - timedelta(days=3),
        plans=[PlanPeriod(plan_id=plan, effective_at=T0 - timedelta(days=3))],
    )


SUBS = {"u1": sub("u1"), "u2": sub("u2", "free")}


def make(**kw: Any) -> UsageProcessor:
    return UsageProcessor(
        CATALOG,
        SUBS.get,
        seen=DictState(),
        windows=DictState(),
        marks=DictState(),
        window_s=kw.pop("window_s", 60),
        grace_s=kw.pop("grace_s", 120),
        dedupe_horizon_s=kw.pop("dedupe_horizon_s", 3600),
        future_skew_s=kw.pop("future_skew_s", 120),
    )


def ev(i: int | str, at: datetime, user: str = "u1", **kw: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "occurred_at": at.isoformat(),
        "org_id": "o",
        "user_id": user,
        "gateway": "gw",
        "requested_model": kw.pop("model", "gpt-4o"),
        "input_tokens": kw.pop("input_tokens", 1000),
        "output_tokens": kw.pop("output_tokens", 100),
        **kw,
    }


_offset = iter(range(10**9))


def rec(
    obj: dict[str, Any] | bytes, partition: int = 0, arrived: datetime | None = None
) -> InRecord:
    value = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    ts = None if arrived is None else int(arrived.timestamp() * 1000)
    return InRecord("usage.events", partition, next(_offset), b"k", value, ts)


def rollups(result_rollups: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(v) for _, v in result_rollups]


def test_invalid_messages_become_dead_letters_with_reason_and_source() -> None:
    p = make()
    bad = [b"not json", orjson.dumps({"event_id": "x"}), orjson.dumps(ev(1, T0, input_tokens=-1))]
    r = p.process([rec(b) for b in bad])
    assert len(r.dead) == 3 and not r.priced
    letters = [orjson.loads(v) for _, v, _ in r.dead]
    assert base64.b64decode(letters[0]["payload_b64"]) == b"not json"
    assert "not JSON" in letters[0]["reason"]
    assert "occurred_at" in letters[1]["reason"]
    assert "input_tokens" in letters[2]["reason"]
    assert {lt["source_topic"] for lt in letters} == {"usage.events"}
    assert r.counters["dead_letters"] == 3


def test_a_message_without_a_value_is_a_dead_letter() -> None:
    # A null (tombstone) record on the events topic: a dead letter, and the batch goes on.
    p = make()
    r = p.process([InRecord("usage.events", 0, next(_offset), b"k", None), rec(ev(1, T0))])
    assert len(r.dead) == 1 and len(r.priced) == 1
    letter = orjson.loads(r.dead[0][1])
    assert "no value" in letter["reason"] and letter["payload_b64"] == ""


def test_duplicates_within_and_across_batches_count_once() -> None:
    p = make()
    r1 = p.process([rec(ev(1, T0)), rec(ev(1, T0)), rec(ev(2, T0))])
    r2 = p.process([rec(ev(2, T0)), rec(ev(3, T0))])
    assert (len(r1.priced), len(r2.priced)) == (2, 1)
    assert r1.counters["duplicates"] == 1 and r2.counters["duplicates"] == 1


@pytest.mark.parametrize(
    ("seconds", "window_start"),
    [
        (0, "2026-11-27T10:00:00Z"),
        (59.999999, "2026-11-27T10:00:00Z"),
        (60, "2026-11-27T10:01:00Z"),
        (-0.000001, "2026-11-27T09:59:00Z"),
    ],
)
def test_window_assignment(seconds: float, window_start: str) -> None:
    p = make()
    r = p.process([rec(ev(1, T0 + timedelta(seconds=seconds)))])
    assert orjson.loads(r.priced[0][1])["window_start"] == window_start
    assert rollups(r.rollups)[0]["window_start"] == window_start


def test_batch_pre_aggregation_writes_state_once_per_window() -> None:
    p = make()
    batch = [rec(ev(i, T0 + timedelta(seconds=i))) for i in range(50)]
    r = p.process(batch)
    assert len(r.priced) == 50
    assert len(r.rollups) == 1
    assert isinstance(p.windows, DictState)
    assert len([w for w in p.windows.writes if w[2] is not None]) == 1
    roll = rollups(r.rollups)[0]
    # The version is the last source offset applied + 1: it only grows, even across a replay.
    assert roll["requests"] == 50 and roll["version"] == batch[-1].offset + 1
    assert roll["plan_id"] == "pro"
    late = rec(ev(99, T0 + timedelta(seconds=5)))
    r2 = p.process([late])
    roll2 = rollups(r2.rollups)[0]
    assert roll2["requests"] == 51 and roll2["version"] == late.offset + 1 > roll["version"]


def test_out_of_order_within_grace_corrects_its_window() -> None:
    p = make(grace_s=120)
    p.process([rec(ev(1, T0)), rec(ev(2, T0 + timedelta(seconds=150)))])
    straggler = rec(ev(3, T0 + timedelta(seconds=10)))  # window 10:00 closes at 10:03
    r = p.process([straggler])
    roll = rollups(r.rollups)[0]
    assert roll["window_start"] == "2026-11-27T10:00:00Z"
    assert (roll["requests"], roll["version"], roll["segment"]) == (2, straggler.offset + 1, 0)
    assert r.counters["late"] == 0


def test_beyond_grace_is_priced_flagged_and_emitted_as_its_own_segment() -> None:
    p = make(grace_s=60)
    p.process([rec(ev(1, T0))])
    r = p.process([rec(ev(2, T0 + timedelta(minutes=10)))])
    assert r.counters["evicted_windows"] == 1
    late = p.process([rec(ev(3, T0 + timedelta(seconds=5)))])
    assert late.counters["late"] == 1
    assert orjson.loads(late.priced[0][1])["late"] is True
    roll = rollups(late.rollups)[0]
    assert roll["segment"] != 0 and roll["requests"] == 1 and roll["version"] == 1


def test_older_than_dedupe_horizon_goes_to_dlq() -> None:
    p = make(dedupe_horizon_s=3600)
    p.process([rec(ev(1, T0))])
    r = p.process([rec(ev(2, T0 - timedelta(hours=2)))])
    assert not r.priced and r.counters["beyond_dedupe_horizon"] == 1
    assert "dedupe horizon" in orjson.loads(r.dead[0][1])["reason"]


# (event time - arrival, arrival - worker clock, accepted): arrival is the record's Kafka
# timestamp, read as never later than the worker's clock.
FUTURE_CASES = [
    (timedelta(0), timedelta(0), True),
    (timedelta(seconds=120), timedelta(0), True),
    (timedelta(seconds=121), timedelta(0), False),
    (timedelta(days=40), timedelta(0), False),
    # replayed a day later: judged against when it reached Kafka, not against now
    (timedelta(seconds=60), -timedelta(days=1), True),
    (timedelta(seconds=180), -timedelta(days=1), False),
    # a producer's CreateTime dated ahead is no licence: the worker's clock bounds it
    (timedelta(seconds=60), timedelta(hours=1), False),
    (timedelta(seconds=-3540), timedelta(hours=1), True),
]


@pytest.mark.parametrize(("ahead", "arrival_offset", "accepted"), FUTURE_CASES)
def test_events_dated_after_they_reached_kafka(
    ahead: timedelta, arrival_offset: timedelta, accepted: bool
) -> None:
    now = T0 + timedelta(hours=5)
    arrived = now + arrival_offset
    p = make()
    r = p.process([rec(ev(1, arrived + ahead), arrived=arrived)], now=now)
    assert (len(r.priced), len(r.dead)) == ((1, 0) if accepted else (0, 1))
    if not accepted:
        letter = orjson.loads(r.dead[0][1])
        assert letter["stage"] == "event_time"
        assert "after the record reached Kafka" in letter["reason"]
        assert r.counters["future_event"] == 1
        assert p.marks.get("wm:0") is None  # the watermark did not move


def test_a_future_dated_event_does_not_poison_its_partition() -> None:
    # Before the event-time check, one valid event dated 40 days ahead moved its partition's
    # watermark, and every later event there went to the dead-letter topic as "older than
    # the dedupe horizon".
    p = make(dedupe_horizon_s=3600)
    now = T0 + timedelta(minutes=1)
    first = p.process([rec(ev(0, T0 + timedelta(days=40)), arrived=now)], now=now)
    assert first.counters["future_event"] == 1
    normal = [rec(ev(i, T0 + timedelta(seconds=i)), arrived=now) for i in range(1, 51)]
    r = p.process(normal, now=now)
    assert len(r.priced) == 50 and not r.dead and r.counters["late"] == 0


def test_a_watermark_stored_far_ahead_is_read_as_the_clock_plus_skew() -> None:
    # State written before the check may hold a watermark 40 days ahead: it no longer sends
    # current events to the dead-letter topic. (Events of windows that closed before the
    # clock plus skew are flagged late, and still count, as their own rollup segments.)
    p = make(dedupe_horizon_s=3600, grace_s=300)
    p.marks.put(0, "wm:0", b"%d" % int((T0 + timedelta(days=40)).timestamp() * 1_000_000))
    now = T0 + timedelta(minutes=1)
    events = [rec(ev(i, T0 + timedelta(seconds=i)), arrived=now) for i in range(10)]
    r = p.process(events, now=now)
    assert len(r.priced) == 10 and not r.dead and r.counters["late"] == 0


def test_seen_ids_expire_after_the_horizon() -> None:
    p = make(dedupe_horizon_s=3600)
    p.process([rec(ev(1, T0))])
    r = p.process([rec(ev(2, T0 + timedelta(hours=3)))])
    assert r.counters["evicted_ids"] == 1
    assert p.seen.get("e1") is None and p.seen.get("e2") is not None


def test_unknown_user_and_model_are_counted_not_dropped() -> None:
    p = make()
    r = p.process([rec(ev(1, T0, user="nobody", model="mystery-model"))])
    assert len(r.priced) == 1
    priced = orjson.loads(r.priced[0][1])
    assert priced["plan_id"] == "" and priced["unknown_model"] is True
    assert r.counters["no_subscription"] == 1 and r.counters["unknown_model"] == 1


def test_an_event_naming_another_org_still_counts_on_its_user_and_is_counted() -> None:
    p = make()
    r = p.process([rec(ev(1, T0, org_id="other")), rec(ev(2, T0))])
    priced = [orjson.loads(v) for _, v in r.priced]
    # Billed on the user's plan (the call was made), labelled with the org it named.
    assert [(e["org_id"], e["plan_id"]) for e in priced] == [("other", "pro"), ("o", "pro")]
    assert r.counters["org_mismatch"] == 1
    assert len(r.accepted) == 2


def test_plan_follows_the_subscription_schedule_at_event_time() -> None:
    schedule = Subscription(
        user_id="u9",
        org_id="o",
        billing_anchor=T0 - timedelta(days=3),
        plans=[
            PlanPeriod(plan_id="free", effective_at=T0 - timedelta(days=3)),
            PlanPeriod(plan_id="pro", effective_at=T0),
        ],
    )
    p = UsageProcessor(
        CATALOG, {"u9": schedule}.get, seen=DictState(), windows=DictState(), marks=DictState()
    )
    r = p.process([rec(ev(1, T0 - timedelta(seconds=1), user="u9")), rec(ev(2, T0, user="u9"))])
    assert [orjson.loads(v)["plan_id"] for _, v in r.priced] == ["free", "pro"]


def test_state_survives_a_restart_through_the_tables() -> None:
    p = make()
    p.process([rec(ev(1, T0)), rec(ev(2, T0))])
    # A new processor over the same (restored) tables: as after a worker restart.
    q = UsageProcessor(
        CATALOG,
        SUBS.get,
        seen=p.seen,
        windows=p.windows,
        marks=p.marks,
        window_s=60,
        grace_s=120,
        dedupe_horizon_s=3600,
    )
    r = q.process([rec(ev(2, T0)), rec(ev(3, T0))])
    assert r.counters["duplicates"] == 1
    assert rollups(r.rollups)[0]["requests"] == 3


# -- whole-stream exactness as a property ------------------------------------------------------

event_st = st.builds(
    lambda i, sec, user, model, inp, cached, out, hit: ev(
        i,
        T0 + timedelta(seconds=sec),
        user=user,
        model=model,
        input_tokens=inp,
        cached_input_tokens=min(cached, inp),
        output_tokens=out,
        semantic_cache_hit=hit,
    ),
    st.integers(0, 60),
    st.integers(-30, 1500),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "unknown-x"]),
    st.integers(0, 50_000),
    st.integers(0, 50_000),
    st.integers(0, 5_000),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_st, max_size=80), st.lists(st.integers(1, 15), min_size=1, max_size=10))
def test_rollups_sum_exactly_to_unique_events_whatever_order_and_batching(
    events: list[dict[str, Any]], cuts: list[int]
) -> None:
    p = make(grace_s=120)
    records = [rec(e) for e in events]
    final: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    i = 0
    k = 0
    while i < len(records):
        size = cuts[k % len(cuts)]
        r = p.process(records[i : i + size])
        for roll in rollups(r.rollups):
            key = (roll["user_id"], roll["served_model"], roll["window_start"], roll["segment"])
            if key not in final or final[key]["version"] < roll["version"]:
                final[key] = roll
        i += size
        k += 1
    unique: dict[str, dict[str, Any]] = {}
    for e in events:
        unique.setdefault(e["event_id"], e)
    expected_cost = sum(
        (units_to_decimal(CATALOG.quote(event_from_obj(e)).cost) for e in unique.values()),
        Decimal(0),
    )
    assert sum(r["requests"] for r in final.values()) == len(unique)
    assert sum((Decimal(r["cost"]) for r in final.values()), Decimal(0)) == expected_cost
    assert sum(r["input_tokens"] for r in final.values()) == sum(
        e["input_tokens"] for e in unique.values()
    )


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2999, 12, 31), timezones=st.just(UTC)
    )
)
def test_iso_formatting_round_trips(when: datetime) -> None:
    from stream_processors._time import micros_to_iso, to_micros

    text = micros_to_iso(to_micros(when))
    assert datetime.fromisoformat(text) == when
    assert text.endswith("Z") and ("." in text) == bool(when.microsecond)


# -- crash consistency: a worker killed between its state writes and its offset commit ---------


def _fold(final: dict[tuple[Any, ...], dict[str, Any]], rolls: list[tuple[str, bytes]]) -> None:
    for roll in rollups(rolls):
        key = (roll["user_id"], roll["served_model"], roll["window_start"], roll["segment"])
        if key not in final or final[key]["version"] <= roll["version"]:
            final[key] = roll


@settings(max_examples=150, deadline=None)
@given(
    st.lists(event_st, min_size=1, max_size=60),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 8),
    st.integers(0, 4),
    st.booleans(),
    st.booleans(),
)
def test_replay_after_a_crash_counts_every_event_once(
    events: list[dict[str, Any]],
    size: int,
    replay_size: int,
    committed: int,
    lost: int,
    seen_kept: bool,
    windows_kept: bool,
) -> None:
    """A worker commits offsets up to batch ``committed``, processes ``lost`` more batches
    whose outputs were acked (the worker writes outputs, then state, then watermarks), and dies;
    of the last batch's state writes any subset may have survived. The restarted worker replays
    everything after the commit in batches of another size. Every window must count each event
    exactly once, reading rollups as ClickHouse does (highest version wins; on a tie, the last
    one written)."""
    records = [InRecord("usage.events", 0, i, b"k", orjson.dumps(e)) for i, e in enumerate(events)]
    p = make(grace_s=120)
    assert isinstance(p.seen, DictState) and isinstance(p.windows, DictState)
    assert isinstance(p.marks, DictState)
    final: dict[tuple[Any, ...], dict[str, Any]] = {}
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    committed = min(committed, len(batches))
    lost = min(lost, len(batches) - committed)
    for batch in batches[:committed]:
        _fold(final, p.process(batch).rollups)
    for n, batch in enumerate(batches[committed : committed + lost]):
        before = {name: dict(getattr(p, name).data) for name in ("seen", "windows", "marks")}
        _fold(final, p.process(batch).rollups)  # outputs acked
        if n == lost - 1:  # the crash: the last batch's state writes may be lost
            if not seen_kept:
                p.seen.data = before["seen"]
            if not windows_kept:
                p.windows.data = before["windows"]
            if not (seen_kept and windows_kept):  # marks are written last
                p.marks.data = before["marks"]
    restarted = UsageProcessor(
        CATALOG,
        SUBS.get,
        seen=p.seen,
        windows=p.windows,
        marks=p.marks,
        window_s=60,
        grace_s=120,
        dedupe_horizon_s=3600,
    )
    rest = records[committed * size :]
    for i in range(0, len(rest), replay_size):
        _fold(final, restarted.process(rest[i : i + replay_size]).rollups)
    unique: dict[str, dict[str, Any]] = {}
    for e in events:
        unique.setdefault(e["event_id"], e)
    assert sum(r["requests"] for r in final.values()) == len(unique)
    assert sum(r["input_tokens"] for r in final.values()) == sum(
        e["input_tokens"] for e in unique.values()
    )


def test_the_priced_wire_struct_has_the_priced_event_fields_in_order() -> None:
    from typing import get_type_hints

    from schemas import PricedEvent
    from stream_processors._processor import PricedWire

    assert PricedWire.__struct_fields__ == tuple(PricedEvent.__annotations__)
    wire_types = get_type_hints(PricedWire)
    assert {k: wire_types[k] for k in PricedWire.__struct_fields__} == get_type_hints(PricedEvent)


_text = st.text(st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(_text, min_size=15, max_size=15),
    optional=st.lists(st.none() | _text, min_size=5, max_size=5),
    numbers=st.lists(st.integers(0, 2**63 - 1), min_size=11, max_size=11),
    latency=st.none() | st.integers(0, 2**31),
    flags=st.lists(st.booleans(), min_size=4, max_size=4),
    attributes=st.dictionaries(_text, _text, max_size=3),
)
def test_the_priced_wire_json_reads_back_as_the_priced_event_dict(
    texts: list[str],
    optional: list[str | None],
    numbers: list[int],
    latency: int | None,
    flags: list[bool],
    attributes: dict[str, str],
) -> None:
    from schemas import PricedEvent
    from stream_processors._processor import PricedWire, _encode_wire

    t, o = texts, optional
    n = numbers
    values: list[Any] = [
        t[0], t[1], t[2], t[3], o[0], t[4], o[1], o[2], t[5], t[6], *n[:10], t[13], n[10],
        o[4], flags[0], t[7], latency, o[3], attributes, t[8], t[9], t[10], t[11], t[12], "0",
        t[14], flags[1], flags[3], flags[2], "2026-11-27T00:00:00Z", "2026-11-27T00:00:01Z",
    ]  # fmt: skip
    expected = dict(zip(PricedEvent.__annotations__, values, strict=True))
    encoded = _encode_wire(PricedWire(*values))
    assert orjson.loads(encoded) == expected
    assert encoded == orjson.dumps(expected)


def test_the_rollup_wire_struct_has_the_rollup_fields_in_order() -> None:
    from typing import get_type_hints

    from schemas import Rollup
    from stream_processors._processor import RollupWire

    assert RollupWire.__struct_fields__ == tuple(Rollup.__annotations__)
    wire_types = get_type_hints(RollupWire)
    assert {k: wire_types[k] for k in RollupWire.__struct_fields__} == get_type_hints(Rollup)
