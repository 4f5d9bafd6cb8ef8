"""Hostile values through the real engine: query parameters and event strings stay data.

``spendstream query --param`` values are bound as ClickHouse query parameters, and event fields
travel Kafka -> sink -> chDB as Arrow columns: neither ever becomes SQL text. Each hostile value
must come back byte for byte, and every table must still be there afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from sinks import ChdbStore, RemoteChdbStore, Sink
from sinks._chdb import owner_file, read_owner
from spendstream.bench.sink import sample_priced_event
from spendstream.cli import app
from spendstream.errors import StoreError
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


# -- `spendstream query` and the owner's endpoint are read-only by the engine ------------------
#
# Each attack ran on main: the first dropped a table, the INTO OUTFILE ones wrote a file, the
# file()/url() ones read a file or reached the network. Each must be refused with one line,
# exit 1, and change nothing: with the lexical first check on, and with it switched off (so the
# refusal provably comes from the engine: its parser and its readonly=1 session).

ROOT = Path(__file__).resolve().parents[2]
OUT = "{out}"  # replaced by a file in the test's tmp folder


def _noop_check(sql: str) -> str:
    return sql.strip().rstrip(";")


ATTACKS: list[tuple[str, str]] = [
    # (statement, what the engine says with the lexical check off)
    (
        "SELECT 1 # '\n; DROP TABLE spendstream.schema_migrations; SELECT 1 # '",
        "Multi-statements are not allowed",
    ),
    ("SELECT 1; DROP TABLE spendstream.schema_migrations", "Multi-statements are not allowed"),
    ("DROP TABLE spendstream.schema_migrations", "not DropQuery"),
    ("SELECT 1 INTO OUTFILE '{out}'", "INTO OUTFILE is not allowed"),
    ("SELECT 1 # '\n INTO OUTFILE '{out}' --'", "INTO OUTFILE is not allowed"),
    ("SELECT $$'$$ INTO OUTFILE '{out}' --'", "INTO OUTFILE is not allowed"),
    ("SELECT * FROM numbers(3) INTO OUTFILE '{out}' AND STDOUT", "INTO OUTFILE is not allowed"),
    ("DESCRIBE TABLE spendstream.rollups INTO OUTFILE '{out}'", "only SELECT, SHOW TABLES"),
    ("INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1", "not InsertQuery"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file()"),
    ("SELECT file('/etc/passwd')", "function file()"),
    ("SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')", "table function url()"),
    ("SELECT 1 WHERE 1 IN url('http://127.0.0.1:9/x', 'CSV', 'a UInt8')", "table function url()"),
    (
        "SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv', 'CSV', 'a String')",
        "table function s3()",
    ),
    ("SELECT * FROM remote('127.0.0.1:9', system.one)", "table function remote()"),
    ("SELECT * FROM executable('id', 'TSV', 'x String')", "table function executable()"),
    ("SELECT * FROM Python(store)", "table function Python()"),
    ("SELECT getSetting('readonly') SETTINGS readonly = 0", "in readonly mode"),
    ("SELECT * FROM numbers(1) FORMAT TSV", "FORMAT clause"),
]
ATTACK_IDS = [f"{i}" for i in range(len(ATTACKS))]


def _intact(tables_in_store: set[str], out: Path) -> None:
    assert "schema_migrations" in tables_in_store and "rollups" in tables_in_store
    assert not out.exists(), "INTO OUTFILE wrote a file"


def _refused_by_cli(sql: str) -> str:
    result = CliRunner().invoke(app, ["query", sql])
    assert result.exit_code == 1, result.output
    output = result.output.strip()
    assert output.startswith("error:") and len(output.splitlines()) == 1, output
    assert "Traceback" not in output and "root:" not in output  # no /etc/passwd line either
    return output


@pytest.mark.parametrize("guard", ["on", "off"])
@pytest.mark.parametrize(("attack", "why"), ATTACKS, ids=ATTACK_IDS)
def test_query_without_an_owner_is_read_only_by_the_engine(
    migrated: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    attack: str,
    why: str,
    guard: str,
) -> None:
    for name, value in migrated.to_env().items():
        monkeypatch.setenv(name, value)
    if guard == "off":
        monkeypatch.setattr("sinks.check_read_only", _noop_check)
        monkeypatch.setattr("sinks._store.check_read_only", _noop_check)
        monkeypatch.setattr("sinks._chdb.check_read_only", _noop_check)
    out = tmp_path / "out.csv"
    message = _refused_by_cli(attack.replace(OUT, str(out)))
    if guard == "off":
        assert why in message
    store = ChdbStore(migrated.chdb_path, database=migrated.clickhouse.database, serve=False)
    try:
        _intact(tables(store), out)
    finally:
        store.close()


OWNER = """
import sys, time
from pathlib import Path
if sys.argv[2] == "off":
    import sinks._chdb, sinks._store
    sinks._store.check_read_only = sinks._chdb.check_read_only = lambda s: s.strip().rstrip(";")
from sinks import ChdbStore
store = ChdbStore(Path(sys.argv[1]), command="spendstream sink")
store.migrate()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module", params=["on", "off"])
def owner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A process owning the store as a sink does, its lexical first check on or off."""
    path = tmp_path_factory.mktemp("owner") / "chdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(path), request.param],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield path, request.param
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _remote(path: Path) -> RemoteChdbStore:
    info = read_owner(path)
    assert info is not None
    return RemoteChdbStore(info, database="spendstream")


@pytest.mark.parametrize(("attack", "why"), ATTACKS, ids=ATTACK_IDS)
def test_query_through_the_owner_is_read_only_by_the_engine(
    owner: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    attack: str,
    why: str,
) -> None:
    path, guard = owner
    monkeypatch.setenv("SPENDSTREAM_STATE_DIR", str(path.parent))
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__EMBEDDED_PATH", str(path))
    if guard == "off":
        monkeypatch.setattr("sinks.check_read_only", _noop_check)
        monkeypatch.setattr("sinks._store.check_read_only", _noop_check)
        monkeypatch.setattr("sinks._chdb.check_read_only", _noop_check)
    out = tmp_path / "out.csv"
    message = _refused_by_cli(attack.replace(OUT, str(out)))
    if guard == "off":
        assert why in message
    _, rows = _remote(path).query(
        "SELECT name FROM system.tables WHERE database = {d:String}", {"d": "spendstream"}
    )
    _intact({str(r[0]) for r in rows}, out)


def test_the_read_only_session_refuses_on_its_own(tmp_path: Path) -> None:
    """Under the parser's check, readonly=1 itself refuses writes, settings, table functions."""
    store = ChdbStore(tmp_path / "chdb", serve=False)
    try:
        store.migrate()
        session = store._readonly_session()
        out = tmp_path / "out.csv"
        for sql in (
            "DROP TABLE spendstream.schema_migrations",
            "SELECT 1; DROP TABLE spendstream.schema_migrations",
            "INSERT INTO spendstream.schema_migrations (version) VALUES (99)",
            f"INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1",
            "SELECT * FROM file('/etc/passwd', 'LineAsString')",
            "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
            "SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv', 'CSV', 'a String')",
            "SELECT * FROM executable('id', 'TSV', 'x String')",
            "SET readonly = 0",
            "SELECT 1 SETTINGS readonly = 0",
            "CREATE TEMPORARY TABLE t (a UInt8)",
            "SYSTEM DROP MARK CACHE",
            "SELECT * FROM Python(store)",
            "SELECT addressToSymbol(1)",
        ):
            with pytest.raises(StoreError, match=r"READONLY|readonly mode|FUNCTION_NOT_ALLOWED"):
                store._run_text(sql, {}, "JSONCompact", session)
        _intact(tables(store), out)
        assert store.query_readonly("SELECT getSetting('readonly') AS r") == (["r"], [(1,)])
    finally:
        store.close()


def test_reads_through_the_owner_stay_exact(owner: tuple[Path, str]) -> None:
    path, _ = owner
    remote = _remote(path)
    for value in [*HOSTILE, *BACKSLASHED, "tab\there\nnew line\r\x00"]:
        assert remote.query("SELECT {v:String} AS v", {"v": value}) == (["v"], [(value,)])
    # Money comes back as an exact decimal string from the read-only session too.
    _, rows = remote.query("SELECT toDecimal128('123456789.123456789012345678901234', 24) AS d")
    assert rows == [(Decimal("123456789.123456789012345678901234"),)]
    # The reads the commands make: parameterized views, DESCRIBE, SHOW.
    _, rows = remote.query(
        "SELECT count() FROM spendstream.tier_pnl(org = {org:String}) WHERE month = {month:Date}",
        {"org": "", "month": "2026-11-01"},
    )
    assert rows == [(0,)]
    names, rows = remote.query("DESCRIBE TABLE spendstream.schema_migrations")
    assert names[:2] == ["name", "type"] and rows[0][:2] == ("version", "UInt32")
    _, rows = remote.query("SHOW TABLES FROM spendstream")
    assert ("schema_migrations",) in rows


def test_the_store_and_its_owner_file_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "chdb"
    store = ChdbStore(path)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o700"
        assert oct(owner_file(path).stat().st_mode & 0o777) == "0o600"
    finally:
        store.close()
    path.chmod(0o755)  # a folder made by an earlier version
    store = ChdbStore(path, serve=False)
    store.close()
    assert oct(path.stat().st_mode & 0o777) == "0o700"


def test_a_failed_statement_leaves_nothing_for_the_next_one(tmp_path: Path) -> None:
    # chDB hands the rows a failed statement had produced to the next statement's result;
    # on the endpoint's shared session that would be another client's answer.
    failing = "SELECT throwIf(number = 300000) FROM numbers(1000000)"
    store = ChdbStore(tmp_path / "chdb", serve=False)
    try:
        with pytest.raises(StoreError, match="throwIf"):
            store.query_readonly(failing)
        assert store.query_readonly("SELECT 2 AS two") == (["two"], [(2,)])
        with pytest.raises(StoreError, match="throwIf"):
            store.query(failing)
        assert store.query("SELECT 3 AS three") == (["three"], [(3,)])
    finally:
        store.close()


def test_a_store_opened_read_only_cannot_write(migrated: Settings) -> None:
    from sinks import open_store

    store = open_store(migrated, readonly=True)
    try:
        for write in (store.migrate, lambda: store.insert("rollups", {}, "t")):
            with pytest.raises(StoreError, match="read-only"):
                write()
        with pytest.raises(StoreError, match="only SELECT"):
            store.query("TRUNCATE TABLE spendstream.rollups")
        assert store.query("SELECT getSetting('readonly') AS r") == (["r"], [(1,)])
    finally:
        store.close()
