"""Hostile values through the real engine: query parameters and event strings stay data.

``spendstream query --param`` values are bound as ClickHouse query parameters, and event fields
travel Kafka -> sink -> chDB as Arrow columns: neither ever becomes SQL text. Each hostile value
must come back byte for byte, and every table must still be there afterwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from sinks import ChdbStore, Sink
from spendstream.bench_sink import sample_priced_event
from spendstream.cli import app
from spendstream.kafka_admin import ensure_topics
from spendstream.settings import Settings

pytestmark = pytest.mark.integration

HOSTILE = [
    "x'); DROP DATABASE spendstream; --",
    "{x:String}",
    "' OR 1=1 --",
    "`; SYSTEM SHUTDOWN; `",
    "\u2019; DROP TABLE rollups; \u2018",
    'a"b; DROP TABLE dead_letters',
]
BACKSLASHED = ["\\'; DROP TABLE spendstream.priced_events; --", "a\\\\b\\nc"]


def tables(store: ChdbStore) -> set[str]:
    _, rows = store.query(
        "SELECT name FROM system.tables WHERE database = {d:String}", {"d": store.database}
    )
    return {str(r[0]) for r in rows}


@pytest.fixture
def migrated(make_settings: Any) -> Settings:
    settings: Settings = make_settings(broker=False)
    store = ChdbStore(settings.chdb_path, database=settings.clickhouse.database, serve=False)
    store.migrate()
    store.close()
    return settings


def query_param(value: str) -> Any:
    result = CliRunner().invoke(
        app, ["query", "SELECT {v:String} AS v", "--param", f"v={value}", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_query_params_are_bound_as_data(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in migrated.to_env().items():
        monkeypatch.setenv(name, value)
    for value in HOSTILE:
        assert query_param(value) == [{"v": value}]
    for value in BACKSLASHED:
        (row,) = query_param(value)  # one row of data, nothing executed
        assert set(row) == {"v"}
    store = ChdbStore(migrated.chdb_path, database=migrated.clickhouse.database, serve=False)
    try:
        assert {"priced_events", "rollups", "dead_letters"} <= tables(store)
    finally:
        store.close()


def test_backslashes_in_query_params_survive(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in migrated.to_env().items():
        monkeypatch.setenv(name, value)
    for value in BACKSLASHED:
        assert query_param(value) == [{"v": value}]


def test_hostile_event_strings_land_verbatim_through_kafka_and_the_sink(
    kafka_broker: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings: Settings = make_settings(sink={"batch_rows": 100, "batch_age_s": 0.2})
    ensure_topics(settings)
    producer = Producer(settings.kafka.confluent_config())
    expected = {}
    for i, value in enumerate(HOSTILE + BACKSLASHED):
        event = {
            **sample_priced_event(i),
            "event_id": f"{value}#{i}",
            "user_id": value,
            "feature": value,
            "attributes": {value: value},
        }
        expected[event["event_id"]] = event
        producer.produce(settings.topics.priced, key=value.encode(), value=orjson.dumps(event))
    assert producer.flush(30) == 0

    store = ChdbStore(settings.chdb_path, database=settings.clickhouse.database, serve=False)
    try:
        store.migrate()
        sink = Sink(settings, store)
        try:
            deadline = time.monotonic() + 60
            while sink.counters.rows_in < len(expected) and time.monotonic() < deadline:
                sink.poll(0.2)
            sink.flush()
        finally:
            sink.close()
        _, rows = store.query(
            f"SELECT event_id, user_id, feature, attributes FROM {store.database}.priced_events "
            "FINAL"
        )
        got = {str(r[0]): (r[1], r[2], dict(r[3])) for r in rows}
        assert got == {
            k: (e["user_id"], e["feature"], e["attributes"]) for k, e in expected.items()
        }
        assert {"priced_events", "rollups", "dead_letters"} <= tables(store)
    finally:
        store.close()
