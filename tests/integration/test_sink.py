"""The Sink on the real broker and real chDB: lands records, upserts rollups, survives replays."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from sinks import ChdbStore, Sink
from sinks._store import Columns
from spendstream.bench.sink import sample_priced_event
from spendstream.errors import StoreError
from spendstream.kafka_admin import ensure_topics
from spendstream.settings import Settings

pytestmark = pytest.mark.integration

COST = Decimal("0.000000546875") * 123457


@pytest.fixture
def settings(kafka_broker: Any, make_settings: Callable[..., Settings]) -> Settings:
    s = make_settings(
        sink={
            "group_id": f"sink-{uuid.uuid4().hex[:8]}",
            "batch_rows": 200,
            "batch_age_s": 0.3,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.2,
        }
    )
    ensure_topics(s)
    return s


@pytest.fixture
def store(settings: Settings) -> Iterator[ChdbStore]:
    s = ChdbStore(settings.chdb_path, database=settings.clickhouse.database, serve=False)
    s.migrate()
    yield s
    s.close()


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({**settings.kafka.confluent_config(), "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def priced(i: int, **changes: Any) -> tuple[bytes, bytes]:
    event = {**sample_priced_event(i), "cost": str(COST), **changes}
    return event["user_id"].encode(), orjson.dumps(event)


def rollup(version: int, cost: str) -> tuple[bytes, bytes]:
    record = {
        "user_id": "user-1",
        "org_id": "org-1",
        "plan_id": "pro",
        "served_model": "gpt-4o-mini",
        "window_start": "2024-05-01T12:00:00+00:00",
        "window_end": "2024-05-01T12:01:00+00:00",
        "segment": 0,
        "requests": version,
        "input_tokens": 100 * version,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 10,
        "reasoning_tokens": 0,
        "semantic_cache_hits": 0,
        "cost": cost,
        "list_value": cost,
        "version": version,
        "updated_at": f"2024-05-01T12:0{version}:00+00:00",
    }
    return b"user-1", orjson.dumps(record)


def dead_letter(offset: int) -> tuple[bytes, bytes]:
    record = {
        "source_topic": "usage.events",
        "source_partition": 0,
        "source_offset": offset,
        "key_b64": base64.b64encode(b"user-9").decode(),
        "payload_b64": base64.b64encode(b'{"event_id": oops').decode(),
        "reason": "invalid JSON",
        "stage": "validate",
        "received_at": "2024-05-01T12:00:00+00:00",
    }
    return b"user-9", orjson.dumps(record)


def one(store: ChdbStore, sql: str) -> tuple[Any, ...]:
    _, rows = store.query(sql.replace("DB.", f"{store.database}."))
    return rows[0]


def test_sink_lands_priced_rollups_and_dead_letters(settings: Settings, store: ChdbStore) -> None:
    n = 1000
    produce(settings, settings.topics.priced, [priced(i) for i in range(n)])
    produce(settings, settings.topics.priced, [(b"user-x", b"{broken"), priced(5, cost=0.5)])
    produce(settings, settings.topics.rollups, [rollup(1, "0.25"), rollup(2, "0.40")])
    produce(settings, settings.topics.dlq, [dead_letter(7), dead_letter(8)])

    sink = Sink(settings, store)
    try:
        assert sink.run_until_drained(timeout_s=90)
        assert all(v == 0 for v in sink.lag().values()) and sink.lag()
    finally:
        sink.close()

    assert one(store, "SELECT count(), sum(cost) FROM DB.priced_events FINAL") == (n, COST * n)
    assert one(store, "SELECT sum(cost), sum(requests) FROM DB.usage_hourly") == (COST * n, n)
    # The re-emitted window replaced the first one (FINAL keeps the highest version).
    assert one(store, "SELECT count(), any(version), any(cost) FROM DB.rollups FINAL") == (
        1,
        2,
        Decimal("0.4"),
    )
    # Dead letters: the two from the DLQ topic with their original bytes, and the two
    # malformed priced records the sink refused, with the reason.
    _, rows = store.query(
        f"SELECT source_topic, stage, payload, reason FROM {store.database}.dead_letters FINAL "
        "ORDER BY source_topic, source_offset"
    )
    stages = sorted((r[0], r[1]) for r in rows)
    assert stages == sorted(
        [("usage.events", "validate")] * 2 + [(settings.topics.priced, "sink")] * 2
    )
    sink_rows = [r for r in rows if r[1] == "sink"]
    assert any(r[2] == "{broken" and "not JSON" in r[3] for r in sink_rows)
    assert sink.counters.dead_lettered == 2
    assert sink.counters.rows_inserted >= n + 2 + 2


def test_replay_after_crash_between_insert_and_commit(settings: Settings, store: ChdbStore) -> None:
    n = 600
    produce(settings, settings.topics.priced, [priced(i) for i in range(n)])

    first = Sink(settings, store)
    try:
        attempts = 0
        while len(first.buffer) < n and attempts < 600:
            # Only read: keep the whole topic in the buffer (no size/age flush yet).
            first.buffer.batch_rows = 10**9
            first.buffer.batch_age_s = 10**9
            first.poll(0.2)
            attempts += 1
        assert len(first.buffer) == n
        assert first.flush(commit=False) == n  # stored ...
    finally:
        first.abandon()  # ... and the process dies before the commit

    assert one(store, "SELECT count() FROM DB.priced_events") == (n,)
    second = Sink(settings, store)  # restart: the same group re-reads everything
    try:
        assert second.run_until_drained(timeout_s=90)
        assert second.counters.rows_in == n
    finally:
        second.close()
    assert one(store, "SELECT count(), sum(cost) FROM DB.priced_events FINAL") == (n, COST * n)
    assert one(store, "SELECT sum(requests), sum(cost) FROM DB.usage_daily") == (n, COST * n)


class FlakyStore:
    """The real chDB store whose first ``failures`` inserts fail (a fault, not a mock)."""

    def __init__(self, inner: ChdbStore, failures: int) -> None:
        self.inner = inner
        self.database = inner.database
        self.failures = failures

    def migrate(self) -> list[str]:
        return self.inner.migrate()

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("ClickHouse unavailable (injected)")
        return self.inner.insert(table, columns, dedup_token)

    def query(self, sql: str, parameters: Any = None) -> Any:
        return self.inner.query(sql, parameters)

    def close(self) -> None:
        self.inner.close()


def test_store_outage_is_retried_never_dropped(settings: Settings, store: ChdbStore) -> None:
    n = 300
    produce(settings, settings.topics.priced, [priced(i) for i in range(n)])
    sink = Sink(settings, FlakyStore(store, failures=3))
    try:
        assert sink.run_until_drained(timeout_s=90)
    finally:
        sink.close()
    assert sink.counters.retries == 3
    assert one(store, "SELECT count(), sum(cost) FROM DB.priced_events FINAL") == (n, COST * n)


class RefusingStore:
    """The real store, which also refuses (as ClickHouse refuses a value it cannot take) any
    priced-events insert holding one poisoned event id."""

    def __init__(self, store: ChdbStore, poisoned: str) -> None:
        self.store, self.poisoned = store, poisoned

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        if table == "priced_events" and self.poisoned in columns.column("event_id").to_pylist():
            raise StoreError(
                "ClickHouse (chDB) refused the statement: Code: 469. DB::Exception: "
                "Constraint `c` is violated (VIOLATED_CONSTRAINT)"
            )
        return self.store.insert(table, columns, dedup_token)


def test_a_row_the_store_refuses_is_a_dead_letter_and_the_sink_goes_on(
    settings: Settings, store: ChdbStore
) -> None:
    # Before, the sink retried the batch holding it forever: nothing more was stored.
    events = [priced(i) for i in range(300)]
    produce(settings, settings.topics.priced, events)
    poisoned = orjson.loads(events[123][1])["event_id"]
    sink = Sink(settings, RefusingStore(store, poisoned))  # type: ignore[arg-type]
    try:
        assert sink.run_until_drained(timeout_s=90)
    finally:
        sink.close()
    assert one(store, "SELECT count() FROM DB.priced_events FINAL") == (299,)
    stage, reason, payload = one(store, "SELECT stage, reason, payload FROM DB.dead_letters FINAL")
    assert (stage, orjson.loads(payload)["event_id"]) == ("sink", poisoned)
    assert "VIOLATED_CONSTRAINT" in reason
    assert sink.counters.dead_lettered == 1
