"""The storage interface every ClickHouse backend implements, and what they share.

OpenMeter-style: one small protocol (:class:`Store`) with one batch insert, one parameterised
query, ``migrate`` and ``close``; two implementations (embedded chDB, a server over
clickhouse-connect) chosen by :func:`open_store`. Everything here is engine-neutral: SQL
migrations, ClickHouse-type -> Arrow-type mapping, JSON result decoding, the read-only check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable
from zoneinfo import ZoneInfo

import pyarrow as pa

from spendstream.errors import ReadOnlyQueryError, StoreError

if TYPE_CHECKING:
    from spendstream.settings import Settings

Columns: TypeAlias = "Mapping[str, Sequence[Any]] | pa.Table"
"""A batch: column name -> values, or an Arrow table whose schema matches the target table."""

QueryResult: TypeAlias = tuple[list[str], list[tuple[Any, ...]]]
"""Column names and rows. Decimals come back as :class:`~decimal.Decimal`, never float."""

Parameters: TypeAlias = Mapping[str, Any]


@runtime_checkable
class Store(Protocol):
    """A ClickHouse database spendstream writes to and reads from (docs/DESIGN.md, "Storage")."""

    database: str

    def migrate(self) -> list[str]:
        """Apply the pending numbered migrations in order; return the names applied now."""
        ...

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        """Insert one batch into ``database.table``; return the rows sent.

        ``dedup_token`` is passed as ``insert_deduplication_token``: the same token twice on the
        same table stores the batch once, so a retried batch never double counts.
        """
        ...

    def query(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement; ``{name:Type}`` placeholders are bound from ``parameters``."""
        ...

    def query_readonly(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement a user typed, read-only as enforced by the engine.

        The statement runs with ClickHouse's ``readonly=1`` and only after the engine's own
        parser has shown it to be one read statement with no INTO OUTFILE and no table
        function that touches files or the network (:func:`vet_read_only`).
        """
        ...

    def close(self) -> None:
        """Release the connection (and, for the embedded owner, the folder lock)."""
        ...


# --------------------------------------------------------------------------------------------
# migrations


@dataclass(frozen=True)
class Migration:
    """One numbered ``NNN_name.sql`` file of :mod:`sinks.migrations`."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file text, recorded so that an edited, applied file is noticed."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, database: str) -> list[str]:
        """The file's statements with ``${db}`` replaced (the name is validated by settings)."""
        text = self.sql.replace("${db}", database)
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";").strip()]


_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def load_migrations() -> list[Migration]:
    """Every migration file, ordered by number; adding a file is the only step to add one."""
    found: list[Migration] = []
    for entry in resources.files("sinks.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"two migration files share a number: {[m.name for m in found]}")
    return found


MIGRATIONS_TABLE_DDL = """CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC')
) ENGINE = ReplacingMergeTree ORDER BY version"""


def apply_migrations(
    database: str,
    execute: Callable[[str], None],
    query: Callable[[str, Parameters | None], QueryResult],
    ttl_days: int | None = None,
) -> list[str]:
    """Create the database, apply pending migrations in order, and record each one.

    Every statement in a migration is written to be idempotent (``IF NOT EXISTS``), so a run
    interrupted between a statement and its record is safely re-applied next time.
    """
    execute(f"CREATE DATABASE IF NOT EXISTS {database}")
    execute(MIGRATIONS_TABLE_DDL.format(db=database))
    _, rows = query(f"SELECT version, checksum FROM {database}.schema_migrations FINAL", None)
    applied = {int(r[0]): str(r[1]) for r in rows}
    done: list[str] = []
    for migration in load_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                # Applied files are immutable: a change must be a new numbered file.
                raise StoreError(
                    f"migration {migration.name} changed after it was applied; "
                    "add a new numbered migration instead of editing it"
                )
            continue
        for statement in migration.statements(database):
            execute(statement)
        query(
            f"INSERT INTO {database}.schema_migrations (version, name, checksum) "
            "VALUES ({v:UInt32}, {n:String}, {c:String})",
            {"v": migration.version, "n": migration.name, "c": migration.checksum},
        )
        done.append(migration.name)
    _apply_ttl(database, execute, query, ttl_days)
    return done


def _apply_ttl(
    database: str,
    execute: Callable[[str], None],
    query: Callable[[str, Parameters | None], QueryResult],
    ttl_days: int | None,
) -> None:
    # The raw-event TTL is a setting, not a migration: re-applied on every migrate so that
    # changing SPENDSTREAM_CLICKHOUSE__RAW_TTL_DAYS takes effect without a new file.
    _, rows = query(
        "SELECT create_table_query FROM system.tables "
        "WHERE database = {d:String} AND name = 'priced_events'",
        {"d": database},
    )
    if not rows:
        return
    has_ttl = " TTL " in str(rows[0][0])
    table = f"{database}.priced_events"
    if ttl_days is not None:
        want = f"toDateTime(occurred_at) + toIntervalDay({int(ttl_days)})"
        if want not in str(rows[0][0]):
            execute(f"ALTER TABLE {table} MODIFY TTL {want}")
    elif has_ttl:
        execute(f"ALTER TABLE {table} REMOVE TTL")


# --------------------------------------------------------------------------------------------
# ClickHouse types <-> Arrow / Python


def _split_args(inner: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in inner:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _unwrap(ch_type: str) -> tuple[str, list[str]]:
    """``Map(String, String)`` -> ``("Map", ["String", "String"])``."""
    ch_type = ch_type.strip()
    if "(" not in ch_type:
        return ch_type, []
    head, _, rest = ch_type.partition("(")
    return head, _split_args(rest[: rest.rindex(")")])


_SIMPLE_ARROW: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Bool": pa.bool_(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Date": pa.date32(),
    "Date32": pa.date32(),
    "UUID": pa.string(),
}


def arrow_type(ch_type: str) -> pa.DataType:
    """The Arrow type a column of ClickHouse type ``ch_type`` is inserted from."""
    head, args = _unwrap(ch_type)
    if head in ("Nullable", "LowCardinality"):
        return arrow_type(args[0])
    if head in _SIMPLE_ARROW:
        return _SIMPLE_ARROW[head]
    if head == "Decimal":
        return pa.decimal128(int(args[0]), int(args[1]))
    if head == "DateTime64":
        precision = int(args[0])
        unit = {0: "s", 3: "ms", 6: "us", 9: "ns"}.get(precision, "us")
        tz = args[1].strip("'") if len(args) > 1 else "UTC"
        return pa.timestamp(unit, tz)
    if head == "DateTime":
        return pa.timestamp("s", args[0].strip("'") if args else "UTC")
    if head == "Map":
        return pa.map_(arrow_type(args[0]), arrow_type(args[1]))
    if head == "Array":
        return pa.list_(arrow_type(args[0]))
    if head == "FixedString":
        return pa.binary()
    raise StoreError(f"no Arrow mapping for ClickHouse type {ch_type}")


def to_arrow_array(values: Sequence[Any], typ: pa.DataType) -> pa.Array:
    """Build an Arrow column exactly: decimal and timestamp text is parsed by Arrow casts.

    Arrow's string -> decimal128 cast refuses to lose digits (ClickHouse's own String ->
    Decimal conversion silently truncates past the scale), and no value ever passes
    through a float.
    """
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.cast(typ) if values.type != typ else values
    sample = next((v for v in values if v is not None), None)
    try:
        if isinstance(sample, str) and (
            pa.types.is_decimal(typ) or pa.types.is_timestamp(typ) or pa.types.is_date(typ)
        ):
            return pa.array(values, pa.string()).cast(typ)
        if isinstance(sample, bytes) and pa.types.is_string(typ):
            return pa.array(values, pa.binary())  # ClickHouse String holds any bytes
        if isinstance(sample, float) and pa.types.is_decimal(typ):
            raise StoreError("money must not be a float: pass Decimal or a decimal string")
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"cannot convert a column to {typ}: {exc}") from exc


def to_arrow_table(columns: Columns, column_types: Mapping[str, str]) -> pa.Table:
    """A batch as an Arrow table in the target table's column order and types."""
    if isinstance(columns, pa.Table):
        names = columns.column_names
        unknown = [n for n in names if n not in column_types]
        if unknown:
            raise StoreError(f"unknown columns {unknown}")
        return columns
    unknown = [n for n in columns if n not in column_types]
    if unknown:
        raise StoreError(f"unknown columns {unknown}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise StoreError(f"columns of unequal length: {sorted(lengths)}")
    arrays = {
        name: to_arrow_array(values, arrow_type(column_types[name]))
        for name, values in columns.items()
    }
    return pa.table(arrays)


def _converter(ch_type: str) -> Callable[[Any], Any] | None:
    head, args = _unwrap(ch_type)
    if head in ("Nullable", "LowCardinality"):
        inner = _converter(args[0])
        if inner is None:
            return None
        return lambda v: None if v is None else inner(v)
    if head.startswith("Decimal"):
        return lambda v: Decimal(str(v))
    if head.startswith(("Int", "UInt")):
        return int
    if head == "DateTime64" or head == "DateTime":
        tz = ZoneInfo(args[-1].strip("'")) if args and "'" in args[-1] else ZoneInfo("UTC")
        return lambda v: datetime.fromisoformat(v).replace(tzinfo=tz)
    if head in ("Date", "Date32"):
        return date.fromisoformat
    return None


def decode_json_compact(payload: Mapping[str, Any]) -> QueryResult:
    """Rows of a ClickHouse ``JSONCompact`` result typed by its ``meta`` (decimals exact)."""
    meta = payload.get("meta", [])
    names = [str(m["name"]) for m in meta]
    converters = [_converter(str(m["type"])) for m in meta]
    rows: list[tuple[Any, ...]] = []
    for raw in payload.get("data", []):
        pairs = zip(converters, raw, strict=True)
        rows.append(tuple(v if c is None or v is None else c(v) for c, v in pairs))
    return names, rows


def params_as_text(parameters: Parameters | None) -> dict[str, str]:
    """Query parameters as the text ClickHouse parses by the placeholder's type."""
    out: dict[str, str] = {}
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, datetime):
            out[key] = value.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%d %H:%M:%S.%f")
        elif isinstance(value, list | tuple):
            out[key] = "[" + ",".join(_literal(v) for v in value) + "]"
        elif isinstance(value, str):
            out[key] = escape_param(value)
        else:
            out[key] = str(value)
    return out


_PARAM_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"})


def escape_param(value: str) -> str:
    """A string query parameter in the escaped (TSV) form ClickHouse reads it in.

    A backslash would start an escape sequence and a raw tab or newline ends the value, so
    those are escaped to arrive byte-exact.
    """
    return value.translate(_PARAM_ESCAPES)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


# --------------------------------------------------------------------------------------------
# read-only statements (`spendstream query` and the owner's query endpoint)

_READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC"})
_STRIP = re.compile(
    r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`"
    r"|(?<![\w$])\$([A-Za-z_]\w*|)\$.*?\$\1\$"  # heredoc string: $$...$$ or $tag$...$tag$
    r"|--[^\n]*|#[ !][^\n]*|/\*.*?\*/",
    re.S,
)


def check_read_only(sql: str) -> str:
    """Return ``sql`` if it looks like one read-only statement; raise :class:`StoreError` if not.

    A lexical first check that gives a friendly error before any store is opened: one
    statement, starting with SELECT / WITH / SHOW / DESCRIBE, no INTO OUTFILE. It is not the
    security boundary: :func:`vet_read_only` (the engine's parser) and the engine's
    ``readonly=1`` are.
    """
    bare = _STRIP.sub(" ", sql).strip()
    bare = bare.rstrip(";").strip()
    if not bare:
        raise ReadOnlyQueryError("empty query")
    if ";" in bare:
        raise ReadOnlyQueryError("one statement per query")
    first = bare.split(None, 1)[0].upper().lstrip("(")
    if first not in _READ_KEYWORDS:
        raise ReadOnlyQueryError(
            f"only SELECT, WITH, SHOW and DESCRIBE are allowed here, not {first}"
        )
    if re.search(r"\bOUTFILE\b", bare, re.I):
        raise ReadOnlyQueryError("INTO OUTFILE is not allowed")
    return sql.strip().rstrip(";")


READONLY_SETTINGS: Mapping[str, int] = {"readonly": 1}
"""Per-query settings of a user's statement on a ClickHouse server.

``readonly=1``, not 2: it also forbids changing any setting (a ``SETTINGS`` clause cannot lift
it) and it refuses every table function the engine does not mark ``allow_readonly`` (file,
url, s3, remote, mysql, executable ...); ``readonly=2`` lets those run.
"""

_READ_STATEMENTS = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "ShowTablesQuery",
        "ShowColumnsQuery",
        "ShowIndexesQuery",
    }
)
# Table functions a user's statement may call: generators and views over the store's own
# tables. Every one of them is also marked allow_readonly by the engine.
_SAFE_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "generate_series",
        "generateseries",
        "primes",
        "values",
        "view",
        "merge",
        "null",
        "generaterandom",
    }
)
# Ordinary functions that reach outside the store: ``file`` reads any local file in embedded
# ClickHouse even under readonly=1, and the ai* functions call a network service.
_UNSAFE_FUNCTIONS = frozenset({"file"})
_AI_FUNCTION = re.compile(r"^(?:ai|AI)[A-Z]")
# Statements the JSON AST cannot carry, accepted only in their canonical form naming one table.
_IDENT = r"(?:[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)+`)"
_DESCRIBE = re.compile(
    rf"(?:DESCRIBE TABLE|SHOW CREATE (?:TABLE|VIEW|DICTIONARY)) {_IDENT}(?:\.{_IDENT})?"
)

Ask: TypeAlias = Callable[[str, Parameters | None], QueryResult]
"""Run one statement of ours (not the user's) on the store's read-only connection."""


@dataclass(frozen=True)
class TableFunctions:
    """What the engine says about its table functions, to tell them from parameterized views."""

    names: frozenset[str]
    """Every table function name, lower case."""
    table_only: frozenset[str]
    """Those that are not also an ordinary function (``file`` and ``format`` are both)."""

    @classmethod
    def of(cls, ask: Ask) -> TableFunctions:
        """Read them from the engine's ``system.table_functions`` and ``system.functions``."""
        _, rows = ask(
            "SELECT lower(name), lower(name) IN (SELECT lower(name) FROM system.functions) "
            "FROM system.table_functions",
            None,
        )
        if not rows:
            raise StoreError("the engine lists no table functions; cannot check the query")
        names = frozenset(str(r[0]) for r in rows)
        return cls(names, frozenset(str(r[0]) for r in rows if not r[1]))


def vet_read_only(
    sql: str, ask: Ask, table_functions: Callable[[], TableFunctions], *, parser_required: bool
) -> str:
    """The statement to run for ``sql``, once the engine's own parser shows it is safe to read.

    ``sql`` goes to ``parseQueryToJSON`` as a query parameter (data, never SQL text) on the
    read-only connection; the AST that comes back must be one SELECT / SHOW statement with no
    INTO OUTFILE, no FORMAT clause, no table function other than generators, views and the
    store's parameterized views, and no ``file()`` or ai* function. Embedded ClickHouse writes
    INTO OUTFILE on the client side even under ``readonly=1``, which is why this check exists
    on top of the engine's read-only mode. DESCRIBE and SHOW CREATE, which the JSON AST cannot
    carry, are accepted in the engine's canonical form naming one table, and that canonical
    text is what runs.

    ``parser_required=False`` (a server older than ``parseQueryToJSON``) returns ``sql``
    unchecked: a server refuses INTO OUTFILE over HTTP and ``readonly=1`` does the rest.
    """
    check_read_only(sql)
    try:
        _, rows = ask("SELECT parseQueryToJSON({q:String})", {"q": sql})
    except StoreError as exc:
        text = str(exc)
        if "does not support JSON serialization" in text:
            return _vet_canonical(sql, ask)
        if not parser_required and ("UNKNOWN_FUNCTION" in text or "Unknown function" in text):
            return sql
        raise ReadOnlyQueryError(
            f"not one statement ClickHouse can parse: {_engine_reason(text)}"
        ) from exc
    try:
        ast = json.loads(str(rows[0][0]))
    except (IndexError, ValueError) as exc:
        raise ReadOnlyQueryError("the engine returned no readable parse of the query") from exc
    if not isinstance(ast, dict) or ast.get("type") not in _READ_STATEMENTS:
        kind = ast.get("type") if isinstance(ast, dict) else None
        raise ReadOnlyQueryError(
            f"only SELECT, SHOW and DESCRIBE statements are allowed here, not {kind}"
        )
    _check_ast(ast, table_functions)
    return sql


def _engine_reason(text: str) -> str:
    # "ClickHouse (chDB) refused the statement: Code: 62. DB::Exception: Syntax error ..."
    reason = text.split("DB::Exception: ", 1)[-1]
    return reason.split(": In scope SELECT parseQueryToJSON", 1)[0]


def _check_ast(ast: dict[str, Any], table_functions: Callable[[], TableFunctions]) -> None:
    known: TableFunctions | None = None
    stack: list[Any] = [ast]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if "out_file" in node or node.get("is_into_outfile_with_stdout"):
            raise ReadOnlyQueryError("INTO OUTFILE is not allowed")
        if "format_ast" in node:
            raise ReadOnlyQueryError("a FORMAT clause is not allowed here: use --format")
        if node.get("type") == "TableExpression" and isinstance(node.get("table_function"), dict):
            call = node["table_function"]
            name = str(call.get("name", ""))
            if not call.get("is_compound_name") and name.lower() not in _SAFE_TABLE_FUNCTIONS:
                known = known or table_functions()
                if name.lower() in known.names:
                    raise ReadOnlyQueryError(
                        f"table function {name}() is not allowed in readonly mode"
                    )
        elif node.get("type") == "Function":
            name = str(node.get("name", ""))
            lower = name.lower()
            if lower in _UNSAFE_FUNCTIONS or _AI_FUNCTION.match(name):
                raise ReadOnlyQueryError(f"function {name}() is not allowed in readonly mode")
            if lower not in _SAFE_TABLE_FUNCTIONS:
                # A table function can also stand in an expression: x IN url(...).
                known = known or table_functions()
                if lower in known.table_only:
                    raise ReadOnlyQueryError(
                        f"table function {name}() is not allowed in readonly mode"
                    )
        stack.extend(node.values())


def _vet_canonical(sql: str, ask: Ask) -> str:
    _, rows = ask("SELECT formatQuerySingleLine({q:String})", {"q": sql})
    canonical = str(rows[0][0]) if rows else ""
    if not _DESCRIBE.fullmatch(canonical):
        raise ReadOnlyQueryError(
            "only SELECT, SHOW TABLES / COLUMNS, DESCRIBE TABLE t and SHOW CREATE TABLE t "
            "are allowed here"
        )
    return canonical


class ReadOnlyStore:
    """A store opened for reading: every :meth:`query` is its :meth:`Store.query_readonly`."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.database = inner.database

    def migrate(self) -> list[str]:
        """Not possible: raises :class:`StoreError`."""
        raise ReadOnlyQueryError("this store was opened read-only: migrations need a writer")

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        """Not possible: raises :class:`StoreError`."""
        raise ReadOnlyQueryError("this store was opened read-only: inserts need a writer")

    def query(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement read-only (see :meth:`Store.query_readonly`)."""
        return self.inner.query_readonly(sql, parameters)

    def query_readonly(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement read-only (see :meth:`Store.query_readonly`)."""
        return self.inner.query_readonly(sql, parameters)

    def close(self) -> None:
        """Close the store underneath."""
        self.inner.close()


# --------------------------------------------------------------------------------------------


def open_store(settings: Settings, *, readonly: bool = False, command: str | None = None) -> Store:
    """The store the settings point at.

    ``SPENDSTREAM_CLICKHOUSE__URL`` set: a :class:`~sinks.ServerStore`. Otherwise embedded chDB
    at ``settings.chdb_path``: this process becomes its owner (:class:`~sinks.ChdbStore`), or,
    when another live process owns it, ``readonly=True`` returns a
    :class:`~sinks.RemoteChdbStore` that asks the owner, and a writer gets
    :class:`~spendstream.errors.StoreLockedError` at once.

    ``readonly=True`` always gives a store whose queries the engine runs read-only: the owner's
    endpoint, or a :class:`ReadOnlyStore` over the server or the folder this process opened.
    """
    if settings.clickhouse.url is not None:
        from sinks._server import ServerStore

        server = ServerStore(settings.clickhouse)
        return ReadOnlyStore(server) if readonly else server
    from sinks._chdb import ChdbStore, open_embedded

    store = open_embedded(
        settings.chdb_path,
        database=settings.clickhouse.database,
        readonly=readonly,
        command=command,
        ttl_days=settings.clickhouse.raw_ttl_days,
    )
    return ReadOnlyStore(store) if readonly and isinstance(store, ChdbStore) else store
