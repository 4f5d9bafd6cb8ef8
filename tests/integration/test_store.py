"""The stores on the real engines: chDB in a temporary folder (and a server when configured)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from sinks import ChdbStore, RemoteChdbStore, ServerStore, Store, load_migrations, open_store
from sinks._buffer import PRICED_EVENTS
from sinks._chdb import owner_file, read_owner
from spendstream.bench.sink import sample_priced_event
from spendstream.errors import StoreError, StoreLockedError
from spendstream.settings import Settings

pytestmark = pytest.mark.integration

PRICE = Decimal("0.000000546875")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChdbStore]:
    s = ChdbStore(tmp_path / "chdb", serve=False)
    s.migrate()
    yield s
    s.close()


def test_migrations_are_numbered_and_idempotent(tmp_path: Path) -> None:
    names = [m.name for m in load_migrations()]
    assert names[:2] == ["001_core_tables.sql", "002_usage_views.sql"]
    s = ChdbStore(tmp_path / "chdb", serve=False)
    try:
        assert s.migrate() == names
        assert s.migrate() == []
        _, rows = s.query("SELECT name FROM spendstream.schema_migrations FINAL ORDER BY version")
        assert [r[0] for r in rows] == names
        _, tables = s.query("SHOW TABLES FROM spendstream")
        assert {t[0] for t in tables} >= {
            "priced_events",
            "rollups",
            "dead_letters",
            "usage_hourly",
            "usage_daily",
        }
    finally:
        s.close()
    # Re-opened later (a new process start), still nothing to apply.
    again = ChdbStore(tmp_path / "chdb", serve=False)
    try:
        assert again.migrate() == []
    finally:
        again.close()


def test_buffer_schemas_match_the_tables(store: ChdbStore) -> None:
    from sinks._buffer import SINK_TABLES

    for spec in SINK_TABLES.values():
        _, rows = store.query(
            "SELECT name FROM system.columns WHERE database = 'spendstream' AND table = {t:String}"
            " ORDER BY position",
            {"t": spec.table},
        )
        assert [r[0] for r in rows] == [c.name for c in spec.columns]


def test_same_token_twice_lands_once(store: ChdbStore) -> None:
    table = PRICED_EVENTS.to_arrow([sample_priced_event(i) for i in range(500)])
    assert store.insert("priced_events", table, "batch-1") == 500
    store.insert("priced_events", table, "batch-1")  # a retried batch
    _, rows = store.query("SELECT count() FROM spendstream.priced_events")
    assert rows == [(500,)]
    store.insert("priced_events", table, "batch-2")  # a new token is a new insert ...
    _, rows = store.query("SELECT count() FROM spendstream.priced_events")
    assert rows == [(1000,)]
    _, rows = store.query("SELECT count() FROM spendstream.priced_events FINAL")
    assert rows == [(500,)]  # ... and the ReplacingMergeTree key still counts each event once


def test_dict_columns_insert_with_dedup(store: ChdbStore) -> None:
    cols = {
        "source_topic": ["t"] * 3,
        "source_partition": [0] * 3,
        "source_offset": [1, 2, 3],
        "stage": ["sink"] * 3,
        "key": [None, b"k", None],
        "payload": [b"\xff", b"x", b""],
        "reason": ["r"] * 3,
        "received_at": ["2024-05-01T12:00:00+00:00"] * 3,
    }
    store.insert("dead_letters", cols, "dl-1")
    store.insert("dead_letters", cols, "dl-1")
    _, rows = store.query("SELECT count(), hex(any(payload)) FROM spendstream.dead_letters")
    assert rows[0][0] == 3


def test_exact_decimal_sums(store: ChdbStore) -> None:
    n = 20_000
    cost = PRICE * 123457  # 0.067515546875
    tiny = Decimal("0.000000000000000000000001")
    events = [
        {**sample_priced_event(i), "cost": str(cost), "list_value": str(tiny)} for i in range(n)
    ]
    store.insert("priced_events", PRICED_EVENTS.to_arrow(events), "sum-1")
    _, rows = store.query(
        "SELECT sum(cost), sum(list_value), toTypeName(sum(cost)) FROM spendstream.priced_events"
    )
    total, tiny_total, typ = rows[0]
    assert isinstance(total, Decimal)
    assert total == cost * n == Decimal("1350.31093750")
    assert tiny_total == tiny * n
    assert typ == "Decimal(38, 24)"
    _, view = store.query("SELECT sum(cost) FROM spendstream.usage_daily")
    assert view[0][0] == cost * n


def test_float_money_is_refused(store: ChdbStore) -> None:
    with pytest.raises(StoreError, match="float"):
        store.insert("rollups", {"cost": [0.1]}, "f")


def test_query_parameters_are_bound_not_formatted(store: ChdbStore) -> None:
    evil = "x' OR 1=1 --"
    _, rows = store.query(
        "SELECT {s:String} AS s, {d:Decimal(38, 24)} * 2 AS d", {"s": evil, "d": PRICE}
    )
    assert rows == [(evil, PRICE * 2)]


def test_third_party_errors_become_store_errors(store: ChdbStore) -> None:
    with pytest.raises(StoreError, match="refused"):
        store.query("SELECT * FROM spendstream.no_such_table")
    with pytest.raises(StoreError, match="no table"):
        store.insert("no_such_table", {"a": [1]}, "t")


# -- one owner per chDB folder, two real processes -----------------------------------------

OWNER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sinks import ChdbStore
    from sinks._buffer import PRICED_EVENTS
    from spendstream.bench.sink import sample_priced_event
    store = ChdbStore(Path(sys.argv[1]), command="test-owner")
    store.migrate()
    store.insert("priced_events", PRICED_EVENTS.to_arrow(
        [{**sample_priced_event(i), "cost": "0.067515546875"} for i in range(100)]), "o-1")
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def owner_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = tmp_path / "chdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _settings(path: Path) -> Settings:
    return Settings(state_dir=path.parent, clickhouse={"embedded_path": path})


def test_reader_goes_through_the_owner_and_writer_fails_fast(
    owner_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = owner_process
    owner = read_owner(path)
    assert owner is not None and owner.pid == proc.pid and owner.command == "test-owner"
    assert owner.endpoint.startswith("http://127.0.0.1:")
    assert oct(owner_file(path).stat().st_mode & 0o777) == "0o600"

    reader = open_store(_settings(path), readonly=True)
    assert isinstance(reader, RemoteChdbStore)
    _, rows = reader.query(
        "SELECT count(), sum(cost) FROM spendstream.priced_events WHERE cost > {c:Decimal(38,24)}",
        {"c": "0"},
    )
    assert rows == [(100, Decimal("6.7515546875"))]
    # The endpoint answers reads only: guarded lexically and by a readonly=1 session.
    for sql in (
        "DROP TABLE spendstream.priced_events",
        "INSERT INTO spendstream.rollups SELECT * FROM spendstream.rollups",
        "SELECT 1; DROP TABLE spendstream.rollups",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
    ):
        with pytest.raises(StoreError):
            reader.query(sql)
    with pytest.raises(StoreError, match=r"(?i)readonly"):
        reader.query("SELECT * FROM file('/etc/hostname', 'LineAsString')")

    started = time.monotonic()
    with pytest.raises(StoreLockedError) as info:
        open_store(_settings(path), command="second writer")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"pid {proc.pid}" in message and "test-owner" in message
    assert "SPENDSTREAM_CLICKHOUSE__URL" in message
    with pytest.raises(StoreLockedError):
        reader.insert("priced_events", {}, "t")


def test_cli_reads_through_the_owner_and_refuses_to_migrate(
    owner_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = owner_process
    env = {
        **os.environ,
        "SPENDSTREAM_STATE_DIR": str(path.parent),
        "SPENDSTREAM_CLICKHOUSE__EMBEDDED_PATH": str(path),
    }
    cli = [sys.executable, "-m", "spendstream.cli"]
    out = subprocess.run(
        [
            *cli,
            "query",
            "SELECT count() AS n, sum(cost) AS c FROM spendstream.priced_events",
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 100, "c": "6.7515546875"}]
    out = subprocess.run(
        [*cli, "clickhouse", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert f"pid {proc.pid}" in out.stderr and "Traceback" not in out.stderr


def test_stale_owner_file_is_cleaned(
    owner_process: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = owner_process
    proc.send_signal(signal.SIGKILL)  # a crash: the owner file stays behind
    proc.wait(timeout=30)
    assert owner_file(path).exists()
    store = open_store(_settings(path), command="after the crash")
    try:
        assert isinstance(store, ChdbStore)
        owner = read_owner(path)
        assert owner is not None and owner.pid == os.getpid()
        _, rows = store.query("SELECT count() FROM spendstream.priced_events")
        assert rows == [(100,)]
    finally:
        store.close()
    assert not owner_file(path).exists()


# -- a ClickHouse server, when one is configured -------------------------------------------

SERVER_URL = os.environ.get("SPENDSTREAM_TEST_CLICKHOUSE_URL")


@pytest.mark.skipif(
    not SERVER_URL,
    reason="no ClickHouse server here: set SPENDSTREAM_TEST_CLICKHOUSE_URL=http://host:8123",
)
def test_server_store_same_contract() -> None:
    settings = Settings(clickhouse={"url": SERVER_URL, "database": f"sstest_{os.getpid()}"})
    store: Store = open_store(settings)
    assert isinstance(store, ServerStore)
    try:
        store.migrate()
        assert store.migrate() == []
        table = PRICED_EVENTS.to_arrow(
            [{**sample_priced_event(i), "cost": str(PRICE * 123457)} for i in range(1000)]
        )
        store.insert("priced_events", table, "s-1")
        store.insert("priced_events", table, "s-1")
        _, rows = store.query(f"SELECT count(), sum(cost) FROM {store.database}.priced_events")
        assert rows == [(1000, PRICE * 123457 * 1000)]
    finally:
        store.query(f"DROP DATABASE IF EXISTS {store.database}")
        store.close()
