"""SinkBuffer as tables of cases: dedup, readiness, commit offsets, tokens, backpressure."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest

from sinks._buffer import DEAD_LETTERS, PRICED_EVENTS, ROLLUPS, SinkBuffer, dedup_token
from spendstream.bench.sink import sample_priced_event
from spendstream.errors import BackpressureError

pytestmark = pytest.mark.unit

TOPICS = {"p": PRICED_EVENTS, "r": ROLLUPS, "d": DEAD_LETTERS}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(batch_rows: int = 100, age: float = 1.0, max_rows: int = 1000) -> tuple[SinkBuffer, Clock]:
    clock = Clock()
    buf = SinkBuffer(
        TOPICS, batch_rows=batch_rows, batch_age_s=age, max_buffer_rows=max_rows, clock=clock
    )
    return buf, clock


def priced(i: int, **changes: Any) -> bytes:
    return orjson.dumps({**sample_priced_event(i), **changes})


def rollup(version: int = 1, cost: str = "0.5") -> bytes:
    return orjson.dumps(
        {
            "user_id": "u1",
            "org_id": "o1",
            "plan_id": "pro",
            "served_model": "m",
            "window_start": "2024-05-01T12:00:00+00:00",
            "window_end": "2024-05-01T12:01:00+00:00",
            "segment": 0,
            "requests": 3,
            "input_tokens": 10,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "output_tokens": 5,
            "reasoning_tokens": 0,
            "semantic_cache_hits": 0,
            "cost": cost,
            "list_value": cost,
            "version": version,
            "updated_at": "2024-05-01T12:02:00+00:00",
        }
    )


@pytest.mark.parametrize(
    ("records", "expected_rows", "expected_added"),
    [
        pytest.param([("p", 0, 5)], 1, [True], id="one"),
        pytest.param([("p", 0, 5), ("p", 0, 5)], 1, [True, False], id="same-offset-twice"),
        pytest.param([("p", 0, 5), ("p", 1, 5)], 2, [True, True], id="same-offset-other-part"),
        pytest.param(
            [("p", 0, 5), ("p", 0, 6), ("p", 0, 5)], 2, [True, True, False], id="redeliver"
        ),
    ],
)
def test_same_offset_is_buffered_once(
    records: list[tuple[str, int, int]], expected_rows: int, expected_added: list[bool]
) -> None:
    buf, _ = make()
    added = [buf.add(t, p, o, priced(o)) for t, p, o in records]
    assert added == expected_added
    assert len(buf) == expected_rows
    assert buf.drain().rows == expected_rows


def test_offsets_already_drained_are_skipped() -> None:
    buf, _ = make()
    buf.add("p", 0, 7, priced(7))
    buf.drain()
    assert buf.add("p", 0, 7, priced(7)) is False  # redelivered after the drain
    assert buf.add("p", 0, 6, priced(6)) is False
    assert buf.add("p", 0, 8, priced(8)) is True


@pytest.mark.parametrize(
    ("rows", "elapsed", "ready"),
    [
        (0, 0.0, False),
        (0, 99.0, False),
        (1, 0.0, False),
        (1, 0.99, False),
        (1, 1.0, True),
        (9, 0.5, False),
        (10, 0.0, True),
        (11, 0.0, True),
    ],
)
def test_ready_by_size_or_age(rows: int, elapsed: float, ready: bool) -> None:
    buf, clock = make(batch_rows=10, age=1.0)
    for i in range(rows):
        buf.add("p", 0, i, priced(i))
    clock.now += elapsed
    assert buf.ready() is ready


def test_age_counts_from_oldest_row_and_resets_on_drain() -> None:
    buf, clock = make(batch_rows=10, age=1.0)
    buf.add("p", 0, 0, priced(0))
    clock.now = 0.6
    buf.add("p", 0, 1, priced(1))
    clock.now = 1.0
    assert buf.ready()
    buf.drain()
    assert not buf.ready()
    buf.add("p", 0, 2, priced(2))
    assert not buf.ready()


@pytest.mark.parametrize(
    ("records", "offsets"),
    [
        ([("p", 0, 3)], {("p", 0): 4}),
        ([("p", 0, 3), ("p", 0, 9), ("p", 0, 5)], {("p", 0): 10}),
        ([("p", 0, 3), ("p", 1, 0), ("r", 2, 41)], {("p", 0): 4, ("p", 1): 1, ("r", 2): 42}),
    ],
)
def test_commit_offsets_are_max_plus_one(
    records: list[tuple[str, int, int]], offsets: dict[tuple[str, int], int]
) -> None:
    buf, _ = make()
    for t, p, o in records:
        buf.add(t, p, o, priced(o) if t == "p" else rollup())
    assert dict(buf.drain().offsets) == offsets


def test_malformed_record_becomes_dead_letter_and_still_commits() -> None:
    buf, _ = make()
    buf.add("p", 0, 0, priced(0))
    buf.add("p", 0, 1, b"{not json", key=b"u1")
    buf.add("p", 0, 2, priced(2, cost=0.1))  # money as a JSON float is refused
    buf.add("p", 0, 3, priced(3, input_tokens=-5))
    buf.add("p", 0, 4, None)
    drained = buf.drain()
    tables = {b.table: b for b in drained.batches}
    assert tables["priced_events"].rows == 1
    dead = tables["dead_letters"].data.to_pylist()
    assert sorted(d["source_offset"] for d in dead) == [1, 2, 3, 4]
    assert all(d["stage"] == "sink" and d["source_topic"] == "p" for d in dead)
    by_offset = {d["source_offset"]: d for d in dead}
    assert by_offset[1]["payload"] == b"{not json" and by_offset[1]["key"] == b"u1"
    assert "not JSON" in by_offset[1]["reason"]
    assert drained.dead_lettered == 4
    assert dict(drained.offsets) == {("p", 0): 5}


def test_money_is_exact_decimal_never_float() -> None:
    buf, _ = make()
    cost = Decimal("0.000000546875") * 123457
    buf.add("p", 0, 0, priced(0, cost=str(cost), list_value="0.000000000000000000000001"))
    data = buf.drain().batches[0].data
    assert data.schema.field("cost").type == pa.decimal128(38, 24)
    row = data.to_pylist()[0]
    assert row["cost"] == cost
    assert row["list_value"] == Decimal("1E-24")


def test_more_digits_than_the_scale_is_refused_not_rounded() -> None:
    buf, _ = make()
    buf.add("p", 0, 0, priced(0, cost="0.0000000000000000000000001"))
    drained = buf.drain()
    assert [b.table for b in drained.batches] == ["dead_letters"]


def test_dead_letter_topic_restores_original_bytes() -> None:
    buf, _ = make()
    record = {
        "source_topic": "usage.events",
        "source_partition": 3,
        "source_offset": 17,
        "key_b64": base64.b64encode(b"user-1").decode(),
        "payload_b64": base64.b64encode(b"\xff\x00raw").decode(),
        "reason": "bad json",
        "stage": "validate",
        "received_at": "2024-05-01T12:00:00+00:00",
    }
    buf.add("d", 0, 0, orjson.dumps(record))
    (batch,) = buf.drain().batches
    row = batch.data.to_pylist()[0]
    assert row["payload"] == b"\xff\x00raw" and row["key"] == b"user-1"
    assert (row["source_topic"], row["source_offset"], row["stage"]) == (
        "usage.events",
        17,
        "validate",
    )


def _tokens(order: list[tuple[str, int, int]]) -> dict[str, str]:
    buf, _ = make()
    for t, p, o in order:
        buf.add(t, p, o, priced(o) if t == "p" else rollup())
    return {b.table: b.dedup_token for b in buf.drain().batches}


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ([("p", 0, 1), ("p", 0, 2)], [("p", 0, 1), ("p", 0, 2)], True),
        ([("p", 0, 1), ("p", 1, 2)], [("p", 1, 2), ("p", 0, 1)], True),
        ([("p", 0, 1), ("p", 0, 2)], [("p", 0, 1), ("p", 0, 3)], False),
        ([("p", 0, 1)], [("p", 1, 1)], False),
        ([("p", 0, 1), ("p", 0, 3)], [("p", 0, 1), ("p", 0, 2), ("p", 0, 3)], False),
    ],
)
def test_tokens_are_deterministic(
    first: list[tuple[str, int, int]], second: list[tuple[str, int, int]], same: bool
) -> None:
    assert (_tokens(first) == _tokens(second)) is same


def test_token_differs_per_table() -> None:
    ranges = {("t", 0): [0, 9, 10]}
    assert dedup_token("rollups", ranges) != dedup_token("priced_events", ranges)


@pytest.mark.parametrize(("max_rows", "accepted"), [(1, 1), (3, 3), (5, 5)])
def test_backpressure_when_full(max_rows: int, accepted: int) -> None:
    buf, _ = make(max_rows=max_rows)
    for i in range(accepted):
        buf.add("p", 0, i, priced(i))
    with pytest.raises(BackpressureError) as info:
        buf.add("p", 0, accepted, priced(accepted))
    assert info.value.retry_after > 0
    assert buf.add("p", 0, 0, priced(0)) is False  # a duplicate is not refused
    buf.drain()
    assert buf.add("p", 0, accepted, priced(accepted)) is True


def test_forget_drops_revoked_partitions() -> None:
    buf, _ = make()
    buf.add("p", 0, 1, priced(1))
    buf.add("p", 1, 1, priced(1))
    buf.forget([("p", 1)])
    drained = buf.drain()
    assert drained.rows == 1 and dict(drained.offsets) == {("p", 0): 2}


def test_unknown_topic_is_a_programming_error() -> None:
    buf, _ = make()
    with pytest.raises(ValueError, match="no table registered"):
        buf.add("elsewhere", 0, 0, b"{}")


@pytest.mark.parametrize(
    "attributes",
    [
        [{}, {}, {}],
        [{"a": "1"}, {}, {"b": "2", "a": "3"}],
        [{"region": "eu", "team": "x"}, {"team": "y"}, {"z": ""}],
    ],
)
def test_json_lines_fast_path_equals_record_path(attributes: list[dict[str, str]]) -> None:
    events = [{**sample_priced_event(i), "attributes": a} for i, a in enumerate(attributes)]
    fast = PRICED_EVENTS.from_json_lines([orjson.dumps(e) for e in events])
    slow = PRICED_EVENTS.to_arrow([orjson.loads(orjson.dumps(e)) for e in events])
    assert fast.schema == slow.schema
    assert fast.drop_columns(["attributes"]).equals(slow.drop_columns(["attributes"]))
    # Same pairs; key order inside one map may differ (first-seen order across the batch).
    assert [dict(r["attributes"]) for r in fast.to_pylist()] == attributes


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"attributes": {"n": 1}}, id="attribute-not-text"),
        pytest.param({"attributes": None}, id="attributes-null"),
        pytest.param({"cost": 1.5}, id="money-float"),
        pytest.param({"user_id": None}, id="required-null"),
        pytest.param({"occurred_at": "yesterday"}, id="bad-timestamp"),
    ],
)
def test_one_bad_record_in_a_fast_batch_is_isolated(bad: dict[str, Any]) -> None:
    buf, _ = make()
    for i in range(5):
        buf.add("p", 0, i, priced(i, **bad) if i == 2 else priced(i))
    tables = {b.table: b for b in buf.drain().batches}
    assert tables["priced_events"].rows == 4
    (dead,) = tables["dead_letters"].data.to_pylist()
    assert dead["source_offset"] == 2 and dead["reason"].startswith("priced_events: ")


PRICE_MODEL_FIELDS = {
    "cache_write_1h_tokens": 0,
    "input_audio_tokens": 0,
    "input_image_tokens": 0,
    "output_audio_tokens": 0,
    "output_image_tokens": 0,
    "service_tier": "standard",
    "web_search_requests": 0,
    "search_context_size": None,
    "saved_service_tier": Decimal(0),
    "price_approximated": False,
}


@pytest.mark.parametrize("mixed", [False, True], ids=["all old", "old and new in one batch"])
def test_priced_events_of_an_older_worker_land_with_the_defaults(mixed: bool) -> None:
    # A worker from before the price model writes none of its fields; during an upgrade both
    # shapes are on the topic. Neither may become a dead letter.
    buf, _ = make()
    old = {k: v for k, v in sample_priced_event(1).items() if k not in PRICE_MODEL_FIELDS}
    buf.add("p", 0, 0, orjson.dumps(old))
    new = {**sample_priced_event(2), "service_tier": "batch", "saved_service_tier": "0.5",
           "price_approximated": True, "input_audio_tokens": 7}  # fmt: skip
    if mixed:
        buf.add("p", 0, 1, orjson.dumps(new))
    drained = buf.drain()
    assert drained.dead_lettered == 0
    rows = drained.batches[0].data.to_pylist()
    assert {k: rows[0][k] for k in PRICE_MODEL_FIELDS} == PRICE_MODEL_FIELDS
    if mixed:
        assert (rows[1]["service_tier"], rows[1]["saved_service_tier"]) == ("batch", Decimal("0.5"))
        assert rows[1]["price_approximated"] is True and rows[1]["input_audio_tokens"] == 7
