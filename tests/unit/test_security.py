"""Security: Kafka SASL/SSL reaches both clients, credentials only from settings, hostile input
to every command is refused or treated as data, oversized events go to the dead-letter topic.

No broker and no ClickHouse here: client configurations are checked as built, commands are
refused before they touch a store (the store folder is never even created), and the
dead-letter cases run through the pure :class:`~stream_processors.UsageProcessor`.
(tests/integration/test_security_store.py runs hostile values through the real engine.)
"""

from __future__ import annotations

import ast
import hmac
import json
import re
import socket
import ssl
import subprocess
import threading
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from typer.testing import CliRunner

from schemas._events import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_EVENT_BYTES,
)
from sinks._chdb import _make_handler, _private_folder
from sinks._store import TableFunctions, check_read_only, params_as_text, vet_read_only
from spendstream.cli import app
from spendstream.errors import ConfigError, StoreError
from spendstream.settings import load_settings
from stream_processors import DictState, InRecord, PriceCatalog, UsageProcessor
from stream_processors._app import broker_credentials

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
HOSTILE = "x'); DROP DATABASE spendstream; --"


# -- Kafka SASL / SSL ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA certificate and an encrypted client key (password ``keypass``)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "client.pem", d / "client.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1",
            "-subj", "/CN=spendstream-test", "-keyout", str(key), "-out", str(cert),
            "-passout", "pass:keypass",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"ca": cert, "cert": cert, "key": key}


def sasl_ssl_env(monkeypatch: pytest.MonkeyPatch, tls: dict[str, Path], mech: str) -> None:
    for name, value in {
        "SECURITY_PROTOCOL": "SASL_SSL",
        "SASL_MECHANISM": mech,
        "SASL_USERNAME": "metering",
        "SASL_PASSWORD": "s3cr3t-pw",
        "SSL_CAFILE": str(tls["ca"]),
        "SSL_CERTFILE": str(tls["cert"]),
        "SSL_KEYFILE": str(tls["key"]),
        "SSL_KEY_PASSWORD": "keypass",
        "BOOTSTRAP_SERVERS": "broker-1:9093,broker-2:9093",
    }.items():
        monkeypatch.setenv(f"SPENDSTREAM_KAFKA__{name}", value)


@pytest.mark.parametrize("mech", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_settings_reach_confluent_kafka_and_faust(
    monkeypatch: pytest.MonkeyPatch, tls_files: dict[str, Path], mech: str
) -> None:
    sasl_ssl_env(monkeypatch, tls_files, mech)
    settings = load_settings()

    conf = settings.kafka.confluent_config()
    assert conf == {
        "bootstrap.servers": "broker-1:9093,broker-2:9093",
        "security.protocol": "SASL_SSL",
        "client.id": "spendstream",
        "sasl.mechanism": mech,
        "sasl.username": "metering",
        "sasl.password": "s3cr3t-pw",
        "ssl.ca.location": str(tls_files["ca"]),
        "ssl.certificate.location": str(tls_files["cert"]),
        "ssl.key.location": str(tls_files["key"]),
        "ssl.key.password": "keypass",
    }

    # faust hands these to aiokafka: what the worker's consumer and producer are built with.
    aio = credentials_to_aiokafka_auth(broker_credentials(settings))
    assert aio["security_protocol"] == "SASL_SSL"
    assert aio["sasl_mechanism"] == mech
    assert aio["sasl_plain_username"] == "metering"
    assert aio["sasl_plain_password"] == "s3cr3t-pw"
    context = aio["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "spendstream-test"),),)
    ]

    # Secrets never show in the printable forms of the settings.
    shown = repr(settings) + str(settings.masked()) + repr(settings.kafka)
    assert "s3cr3t-pw" not in shown and "keypass" not in shown


def test_ssl_only_and_sasl_plaintext_and_plaintext(
    monkeypatch: pytest.MonkeyPatch, tls_files: dict[str, Path]
) -> None:
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SSL_CAFILE", str(tls_files["ca"]))
    settings = load_settings()
    assert settings.kafka.confluent_config()["security.protocol"] == "SSL"
    aio = credentials_to_aiokafka_auth(broker_credentials(settings))
    assert aio["security_protocol"] == "SSL" and isinstance(aio["ssl_context"], ssl.SSLContext)

    monkeypatch.setenv("SPENDSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SASL_PASSWORD", "p")
    settings = load_settings()
    aio = credentials_to_aiokafka_auth(broker_credentials(settings))
    assert (aio["security_protocol"], aio["sasl_mechanism"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-256")
    assert settings.kafka.confluent_config()["sasl.password"] == "p"

    monkeypatch.setenv("SPENDSTREAM_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT")
    assert broker_credentials(load_settings()) is None
    assert credentials_to_aiokafka_auth(None)["security_protocol"] == "PLAINTEXT"


def test_a_wrong_key_password_fails_at_start_not_at_first_connect(
    monkeypatch: pytest.MonkeyPatch, tls_files: dict[str, Path]
) -> None:
    sasl_ssl_env(monkeypatch, tls_files, "PLAIN")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SSL_KEY_PASSWORD", "wrong")
    with pytest.raises(ssl.SSLError):
        broker_credentials(load_settings())


def test_sasl_without_credentials_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__SASL_MECHANISM", "PLAIN")
    with pytest.raises(ConfigError, match="sasl_username, sasl_password"):
        load_settings()


# -- ClickHouse credentials -------------------------------------------------------------------


def test_clickhouse_credentials_come_from_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import clickhouse_connect

    from sinks._server import ServerStore

    seen: dict[str, Any] = {}

    def fake_get_client(**kwargs: Any) -> Any:  # the client's inputs are the unit under test
        seen.update(kwargs)
        return object()

    monkeypatch.setattr(clickhouse_connect, "get_client", fake_get_client)
    # Variables a ClickHouse client might read on its own must not matter.
    monkeypatch.setenv("CLICKHOUSE_USER", "intruder")
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "intruder")
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__URL", "https://ch.internal:8443")
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__USERNAME", "metering")
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__PASSWORD", "ch-s3cret")
    settings = load_settings()
    ServerStore(settings.clickhouse)
    assert seen == {
        "host": "ch.internal",
        "port": 8443,
        "secure": True,
        "username": "metering",
        "password": "ch-s3cret",
    }
    assert "ch-s3cret" not in str(settings.masked())


def test_credentials_in_the_clickhouse_url_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__URL", "http://admin:s3cret@ch:8123")
    with pytest.raises(ConfigError):
        load_settings()


# -- hostile values on the command line -------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CliRunner, Path]:
    """A runner with an isolated state folder and no reachable broker."""
    monkeypatch.setenv("SPENDSTREAM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    return CliRunner(), tmp_path / "state"


def no_store_touched(state: Path) -> bool:
    return not (state / "chdb").exists()


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("DROP DATABASE spendstream", "only SELECT"),
        ("SELECT 1; DROP DATABASE spendstream", "one statement"),
        ("SELECT ';' ; DROP TABLE spendstream.priced_events", "one statement"),
        ("SELECT 1 -- hidden\n; DROP TABLE spendstream.rollups", "one statement"),
        ("/* SELECT */ ALTER TABLE spendstream.rollups DELETE WHERE 1", "only SELECT"),
        ("INSERT INTO spendstream.rollups SELECT * FROM spendstream.rollups", "only SELECT"),
        ("SELECT * FROM spendstream.priced_events INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("TRUNCATE TABLE spendstream.priced_events", "only SELECT"),
        ("SYSTEM SHUTDOWN", "only SELECT"),
        ("SET readonly = 0", "only SELECT"),
        ("OPTIMIZE TABLE spendstream.rollups FINAL", "only SELECT"),
        ("KILL QUERY WHERE 1", "only SELECT"),
        ("   ", "empty"),
        # ClickHouse's own comment and string forms hide nothing from the first check:
        ("SELECT 1 # '\n; DROP TABLE spendstream.schema_migrations; SELECT 1 # '", "one statement"),
        ("SELECT 1 #! '\n; DROP TABLE spendstream.rollups", "one statement"),
        ("SELECT $$ $$ INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("SELECT $t$'$t$ INTO OUTFILE '/tmp/x' --'", "OUTFILE"),
    ],
)
def test_query_refuses_anything_but_one_read_statement(
    cli: tuple[CliRunner, Path], sql: str, why: str
) -> None:
    runner, state = cli
    result = runner.invoke(app, ["query", sql])
    assert result.exit_code == 1, result.output
    assert why in result.output and "Traceback" not in result.output
    assert no_store_touched(state), "refused before any store was opened"
    with pytest.raises(StoreError):
        check_read_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT '#;' AS h, $$;$$ AS s, `a;b` FROM t # trailing; comment",
        "SELECT 'it\\'s; fine' -- done;",
        "WITH $q$ INTO OUTFILE $q$ AS s SELECT s",
        "DESC spendstream.rollups;",
    ],
)
def test_the_first_check_reads_clickhouse_lexemes_as_clickhouse_does(sql: str) -> None:
    assert check_read_only(sql) == sql.strip().rstrip(";")


@pytest.mark.parametrize("param", ["novalue", "=v", " =v"])
def test_query_rejects_malformed_params(cli: tuple[CliRunner, Path], param: str) -> None:
    runner, state = cli
    result = runner.invoke(app, ["query", "SELECT {x:String}", "--param", param])
    assert result.exit_code == 2 and "name=value" in result.output
    assert no_store_touched(state)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLICKHOUSE__DATABASE", "spendstream; DROP DATABASE system"),
        ("CLICKHOUSE__DATABASE", "a'b"),
        ("CLICKHOUSE__DATABASE", "a`b"),
        ("CLICKHOUSE__DATABASE", 'a"b'),
        ("CLICKHOUSE__DATABASE", "db.other"),
        ("CLICKHOUSE__DATABASE", "1db"),
        ("CLICKHOUSE__DATABASE", ""),
        ("CLICKHOUSE__URL", "http://ch:8123/?query=DROP"),
        ("CLICKHOUSE__URL", "http://ch:8123'; DROP"),
        ("PROCESSOR__APP_ID", "app id; rm -rf"),
        ("CLICKHOUSE__RAW_TTL_DAYS", "1) DELETE WHERE (1"),
    ],
)
@pytest.mark.parametrize(
    "command", [["query", "SELECT 1"], ["clickhouse", "migrate"], ["sink"], ["config", "show"]]
)
def test_hostile_settings_are_refused_by_every_command(
    cli: tuple[CliRunner, Path],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    command: list[str],
) -> None:
    runner, state = cli
    monkeypatch.setenv(f"SPENDSTREAM_{variable}", value)
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert f"SPENDSTREAM_{variable}" in result.output
    assert no_store_touched(state)


def test_produce_reports_hostile_lines_and_sends_nothing(
    cli: tuple[CliRunner, Path], tmp_path: Path
) -> None:
    runner, state = cli
    good = {
        "event_id": "e1",
        "occurred_at": "2026-11-27T10:00:00Z",
        "org_id": "o",
        "user_id": "u",
        "gateway": "g",
        "requested_model": "gpt-4o",
    }
    lines = [
        b"'; DROP TABLE spendstream.priced_events; --",
        orjson.dumps({**good, "feature": "x" * (MAX_EVENT_BYTES + 1)}),
        orjson.dumps({**good, "attributes": {f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}}),
        orjson.dumps({**good, "input_tokens": "1; DROP"}),
        orjson.dumps({**good, "occurred_at": "2026-11-27 10:00:00"}),
        b"\xff\xfe not utf-8",
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["produce", str(path)])
    assert result.exit_code == 1, result.output
    for number in range(1, len(lines) + 1):
        assert f"line {number}:" in result.output
    assert "sent 0 events" in result.output and "6 invalid lines" in result.output
    assert "Traceback" not in result.output
    assert no_store_touched(state)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--start", "2026-01-01'; DROP TABLE x; --"], 1),
        (["--start", "$(rm -rf /)"], 1),
        (["--start", "2026-01-01T00:00:00"], 1),  # no offset
        (["--users", "0"], 2),
        (["--users", "1; DROP"], 2),
        (["--rate", "-5"], 2),
        (["--duration", "nan; DROP"], 2),
        (["--malformed", "2"], 2),
        (["--duplicates", "-0.1"], 2),
        (["--seed", "0 OR 1=1"], 2),
    ],
)
def test_simulate_refuses_hostile_options(
    cli: tuple[CliRunner, Path], tmp_path: Path, args: list[str], code: int
) -> None:
    runner, _ = cli
    out = tmp_path / "sim.jsonl"
    result = runner.invoke(app, ["simulate", "--dry-run", str(out), "--duration", "1", *args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing generated from a refused option"


def test_consume_takes_a_hostile_topic_name_as_a_name(cli: tuple[CliRunner, Path]) -> None:
    runner, state = cli
    result = runner.invoke(app, ["consume", HOSTILE, "--timeout", "0.5"])
    # No broker answers here: the name only ever reaches the Kafka client's subscribe call.
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    assert no_store_touched(state)


# -- no SQL assembled from user strings -------------------------------------------------------

_SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|CREATE|DROP|ALTER|DELETE|FROM|INTO|WHERE|TABLE|DATABASE)\b"
)
# Every expression allowed inside SQL text, and why it is safe:
_ALLOWED = {
    "database": "validated identifier (settings regex)",
    "self.database": "validated identifier (settings regex)",
    "store.database": "validated identifier (settings regex)",
    "db": "validated identifier (settings regex)",
    "table": "a table name from the SINK_TABLES registry / our migrations",
    "self.database}.{table": "both of the above",
    "names": "column names checked against system.columns before the insert",
    "token": "internal dedup token (topic/partition/offsets), quote-escaped",
    "want": "built from int(ttl_days)",
    "int(ttl_days)": "an int",
    "first": "only in an error message",
    "kind": "only in an error message",
    "_IDENT": "a regular expression for identifiers (DESCRIBE TABLE t), not SQL text",
}


def _sql_fstring_fields(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        if not _SQL_WORDS.search(text):
            continue
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                found.append((node.lineno, ast.unparse(value.value)))
    return found


def _format_calls_on_sql(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id.endswith("_SQL")
        ):
            found.extend((node.lineno, kw.arg or "**") for kw in node.keywords)
    return found


def test_sql_text_interpolates_only_validated_identifiers() -> None:
    sources = [
        p
        for pkg in ("sinks", "spendstream", "stream_processors", "producers", "schemas")
        for p in (ROOT / pkg).rglob("*.py")
    ]
    offenders = []
    for path in sources:
        for line, expr in _sql_fstring_fields(path):
            if expr not in _ALLOWED:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: f-string field {{{expr}}}")
        for line, kw in _format_calls_on_sql(path):
            if kw != "db":
                offenders.append(f"{path.relative_to(ROOT)}:{line}: *_SQL.format({kw}=...)")
    assert not offenders, "values must be query parameters, not SQL text:\n" + "\n".join(offenders)


def test_the_guard_notices_an_interpolated_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('user = "x"\nsql = f"SELECT * FROM t WHERE user_id = \'{user}\'"\n')
    assert _sql_fstring_fields(bad) == [(2, "user")]


# -- oversized events and attribute maps go to the dead-letter topic --------------------------


def _processor() -> UsageProcessor:
    return UsageProcessor(
        PriceCatalog.load(),
        lambda _u: None,
        seen=DictState(),
        windows=DictState(),
        marks=DictState(),
    )


def _event(**changes: Any) -> bytes:
    return orjson.dumps(
        {
            "event_id": "big-1",
            "occurred_at": NOW.isoformat(),
            "org_id": "o",
            "user_id": "u",
            "gateway": "g",
            "requested_model": "gpt-4o",
            "input_tokens": 1,
            **changes,
        }
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_event(padding="x" * MAX_EVENT_BYTES), f"over the {MAX_EVENT_BYTES}"),
        (_event(attributes={f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}), "attributes"),
        (_event(attributes={"k" * (MAX_ATTRIBUTE_KEY_CHARS + 1): "v"}), "attributes"),
        (_event(attributes={"k": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)}), "attributes"),
        (_event(attributes={"k": {"nested": "map"}}), "attributes"),
    ],
    ids=["oversized", "too-many-attributes", "long-key", "long-value", "nested"],
)
def test_oversized_events_and_attribute_maps_are_dead_lettered_with_a_reason(
    value: bytes, reason: str
) -> None:
    processor = _processor()
    ok = _event(event_id="fine-1")
    result = processor.process(
        [InRecord("usage.events", 0, 0, b"u", value), InRecord("usage.events", 0, 1, b"u", ok)],
        NOW,
    )
    assert len(result.dead) == 1 and len(result.priced) == 1
    key, letter_bytes = result.dead[0][:2]  # (key, letter[, partition])
    letter = orjson.loads(letter_bytes)
    assert key == b"u" and letter["stage"] == "validate" and letter["source_offset"] == 0
    assert reason in letter["reason"], letter["reason"]
    assert result.counters["dead_letters"] == 1 and result.counters["priced"] == 1


# -- read-only by the engine: what the engine's parse must show ---------------------------------


def _select(**top: Any) -> dict[str, Any]:
    """A parseQueryToJSON tree of ``SELECT ...`` (trimmed to what the check reads)."""
    return {
        "type": "SelectWithUnionQuery",
        "list_of_selects": {"type": "ExpressionList", "children": [top.pop("select", {})]},
        **top,
    }


def _from(name: str, *, compound: bool = False) -> dict[str, Any]:
    call: dict[str, Any] = {"type": "Function", "name": name, "arguments": {"children": []}}
    if compound:
        call["is_compound_name"] = True
    table = {"type": "TableExpression", "table_function": call}
    return {"type": "SelectQuery", "tables": {"children": [{"table_expression": table}]}}


def _call(name: str) -> dict[str, Any]:
    return {"type": "SelectQuery", "where": {"type": "Function", "name": name}}


class FakeEngine:
    """Answers the two questions vet_read_only asks, with a canned parse."""

    def __init__(self, ast: Any) -> None:
        self.ast = ast
        self.asked: list[tuple[str, Any]] = []

    def __call__(self, sql: str, parameters: Any) -> Any:
        self.asked.append((sql, parameters))
        if "parseQueryToJSON" in sql:
            return ["ast"], [(json.dumps(self.ast),)]
        raise AssertionError(sql)

    @staticmethod
    def table_functions() -> TableFunctions:
        return TableFunctions(
            names=frozenset({"file", "url", "s3", "numbers", "format", "python", "merge"}),
            table_only=frozenset({"url", "s3", "numbers", "python", "merge"}),
        )


@pytest.mark.parametrize(
    ("ast", "why"),
    [
        (_select(out_file={"type": "Literal"}), "INTO OUTFILE"),
        (_select(is_into_outfile_with_stdout=True), "INTO OUTFILE"),
        (_select(format_ast={"type": "Identifier", "name": "TSV"}), "FORMAT"),
        (_select(select=_from("file")), "file()"),
        (_select(select=_from("URL")), "URL()"),
        (_select(select=_from("python")), "python()"),
        (_select(select=_call("url")), "url()"),  # 1 IN url(...)
        (_select(select=_call("file")), "file()"),  # the ordinary function reads any file
        (_select(select=_call("aiGenerate")), "aiGenerate()"),
        ({"type": "DropQuery"}, "not DropQuery"),
        ({"type": "InsertQuery"}, "not InsertQuery"),
        ({"type": "SystemQuery"}, "not SystemQuery"),
        ([1], "not None"),
    ],
)
def test_vet_refuses_what_the_engines_parse_shows(ast: Any, why: str) -> None:
    engine = FakeEngine(ast)
    with pytest.raises(StoreError, match=re.escape(why)):
        vet_read_only("SELECT 1", engine, engine.table_functions, parser_required=True)


@pytest.mark.parametrize(
    "ast",
    [
        _select(select=_from("numbers")),
        _select(select=_from("spendstream.tier_pnl", compound=True)),  # a parameterized view
        _select(select=_from("spendstream.file", compound=True)),  # a view, never file()
        _select(select=_from("tier_pnl")),  # not a table function: a view of the current db
        _select(select=_call("format")),  # format('{} {}', a, b) is an ordinary function
        {"type": "ShowTablesQuery"},
    ],
)
def test_vet_lets_reads_through(ast: Any) -> None:
    engine = FakeEngine(ast)
    sql = "SELECT {x:String} -- anything"
    assert vet_read_only(sql, engine, engine.table_functions, parser_required=True) == sql
    # The statement reaches the engine's parser as a parameter value, never as SQL text.
    assert engine.asked == [("SELECT parseQueryToJSON({q:String})", {"q": sql})]


def test_vet_without_a_parser_fails_closed_unless_the_engine_refuses_outfile() -> None:
    def old_server(sql: str, parameters: Any) -> Any:
        raise StoreError("Code: 46. DB::Exception: Unknown function parseQueryToJSON")

    tables = FakeEngine.table_functions
    assert vet_read_only("SELECT 1", old_server, tables, parser_required=False) == "SELECT 1"
    with pytest.raises(StoreError, match="not one statement ClickHouse can parse"):
        vet_read_only("SELECT 1", old_server, tables, parser_required=True)


def test_string_parameters_are_escaped_for_clickhouse() -> None:
    value = "a\\b\nc\td\re\0f'"
    assert params_as_text({"v": value}) == {"v": "a\\\\b\\nc\\td\\re\\0f'"}


def test_server_store_runs_a_users_statement_with_readonly_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import clickhouse_connect

    from sinks._server import ServerStore

    calls: list[dict[str, Any]] = []

    class Result:
        def __init__(self, names: list[str], rows: list[tuple[Any, ...]]) -> None:
            self.column_names, self.result_rows = names, rows

    class Client:
        """What the server answers: the parse below, and the ``v`` parameter back."""

        ast: dict[str, Any] = _select()

        def query(self, sql: str, parameters: Any = None, settings: Any = None) -> Result:
            calls.append({"sql": sql, "parameters": parameters, "settings": settings})
            if "parseQueryToJSON" in sql:
                return Result(["ast"], [(json.dumps(self.ast),)])
            return Result(["v"], [(parameters["v"],)])

    monkeypatch.setattr(clickhouse_connect, "get_client", lambda **kw: Client())
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__URL", "http://ch:8123")
    store = ServerStore(load_settings().clickhouse)

    _, rows = store.query_readonly("SELECT {v:String} AS v", {"v": "a\\b"})
    assert [c["settings"] for c in calls] == [{"readonly": 1}, {"readonly": 1}]
    # clickhouse-connect escapes a string parameter itself: it must get the value as it is.
    assert calls[-1]["parameters"] == {"v": "a\\b"} and rows == [("a\\b",)]

    calls.clear()
    Client.ast = _select(out_file={"type": "Literal"})
    with pytest.raises(StoreError, match="INTO OUTFILE"):
        store.query_readonly("SELECT 1")
    assert len(calls) == 1, "a refused statement never runs"


# -- the owner's query endpoint ----------------------------------------------------------------

TOKEN = "s3cret-token"


class FakeOwner:
    """Stands in for :class:`ChdbStore` behind the real endpoint handler."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.fail: Exception | None = None

    def readonly_json(self, sql: str, params_text: dict[str, str]) -> bytes:
        self.seen.append((sql, params_text))
        if self.fail is not None:
            raise self.fail
        return b'{"meta": [], "data": []}'


@pytest.fixture
def endpoint() -> Any:
    owner = FakeOwner()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(owner, TOKEN))  # type: ignore[arg-type]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield owner, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, Any]:
    """Send one request as bytes and keep the socket open (no EOF) while reading the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, orjson.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    match = re.search(rb"(?i)content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(match[1]) if match else 0


def post(port: int, body: bytes, token: str = TOKEN) -> tuple[int, Any]:
    head = (
        f"POST /query HTTP/1.1\r\nHost: x\r\nX-Spendstream-Token: {token}\r\n"
        f"Content-Length: {len(body)}"
    )
    return raw_request(port, head, body)


def test_endpoint_compares_the_token_in_constant_time(
    endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, port = endpoint
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("sinks._chdb.hmac.compare_digest", spy)
    body = orjson.dumps({"sql": "SELECT 1"})
    assert post(port, body, token="s3cret-tokeX")[0] == 403
    assert post(port, body, token="\u00e9\u00e8")[0] == 403  # not ASCII: refused, no crash
    status, _ = raw_request(port, f"POST /query HTTP/1.1\r\nContent-Length: {len(body)}", body)
    assert status == 403
    assert owner.seen == []
    assert post(port, body)[0] == 200
    assert len(compared) == 4 and compared[-1] == (TOKEN.encode(), TOKEN.encode())


@pytest.mark.parametrize("length", ["-1", "-100", "abc", None])
def test_endpoint_refuses_a_bad_content_length_without_waiting_for_eof(
    endpoint: Any, length: str | None
) -> None:
    owner, port = endpoint
    head = f"POST /query HTTP/1.1\r\nHost: x\r\nX-Spendstream-Token: {TOKEN}"
    if length is not None:
        head += f"\r\nContent-Length: {length}"
    # The socket stays open: a server that reads "to EOF" would hang here until the timeout.
    status, answer = raw_request(port, head, b'{"sql": "SELECT 1"}', timeout=5)
    assert status == 400 and "Content-Length" in answer["error"]
    assert owner.seen == []


def test_endpoint_caps_the_body_size(endpoint: Any) -> None:
    owner, port = endpoint
    head = f"POST /query HTTP/1.1\r\nX-Spendstream-Token: {TOKEN}\r\nContent-Length: {2 << 20}"
    status, answer = raw_request(port, head, b"{", timeout=5)  # the rest never comes
    assert status == 413 and "over" in answer["error"]
    assert owner.seen == []


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"SELECT 1"',
        b"42",
        b"null",
        b"{",
        b"",
        b'{"sql": 1}',
        b'{"query": "SELECT 1"}',
        b'{"sql": "SELECT 1", "parameters": []}',
        b'{"sql": "SELECT 1", "parameters": {"a": 1}}',
        b'{"sql": "DROP TABLE spendstream.rollups"}',
    ],
)
def test_endpoint_answers_a_malformed_request_with_400_and_no_traceback(
    endpoint: Any, body: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    owner, port = endpoint
    status, answer = post(port, body)
    assert status == 400 and isinstance(answer["error"], str) and answer["error"]
    assert owner.seen == []
    assert "Traceback" not in capfd.readouterr().err


def test_endpoint_passes_parameters_through_and_hides_owner_failures(
    endpoint: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    owner, port = endpoint
    body = orjson.dumps({"sql": "SELECT {v:String}", "parameters": {"v": "a\\\\b"}})
    assert post(port, body)[0] == 200
    assert owner.seen == [("SELECT {v:String}", {"v": "a\\\\b"})]  # not escaped a second time
    owner.fail = RuntimeError("boom")
    status, answer = post(port, body)
    assert status == 500 and "boom" in answer["error"]
    assert "Traceback" not in capfd.readouterr().err


def test_the_store_folder_is_private(tmp_path: Path) -> None:
    fresh = tmp_path / "state" / "chdb"
    _private_folder(fresh)
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    _private_folder(old)
    assert oct(old.stat().st_mode & 0o777) == "0o700"


def test_read_only_refusals_are_their_own_error() -> None:
    from sinks._store import check_read_only
    from spendstream import ReadOnlyQueryError, StoreError

    with pytest.raises(ReadOnlyQueryError) as info:
        check_read_only("DROP TABLE spendstream.schema_migrations")
    assert isinstance(info.value, StoreError)  # callers catching StoreError still do
