"""The storage interface every ClickHouse backend implements, and what they share.

OpenMeter-style: one small protocol (:class:`Store`) with one batch insert, one parameterised
query, ``migrate`` and ``close``; two implementations (embedded chDB, a server over
clickhouse-connect) chosen by :func:`open_store`. Everything here is engine-neutral: SQL
migrations, ClickHouse-type -> Arrow-type mapping, JSON result decoding, the read-only check.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable
from zoneinfo import ZoneInfo

import pyarrow as pa

from spendstream.errors import StoreError

if TYPE_CHECKING:
    from spendstream.settings import Settings

Columns: TypeAlias = "Mapping[str, Sequence[Any]] | pa.Table"
"""A batch: column name -> values, or an Arrow table whose schema matches the target table."""

QueryResult: TypeAlias = tuple[list[str], list[tuple[Any, ...]]]
"""Column names and rows. Decimals come back as :class:`~decimal.Decimal`, never float."""

Parameters: TypeAlias = Mapping[str, Any]


@runtime_checkable
class Store(Protocol):
    """A ClickHouse database spendstream writes to and reads from (DESIGN §6)."""

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
            # ClickHouse reads a parameter in its escaped (TSV) form: a backslash would start
            # an escape sequence, so it is doubled to arrive byte-exact.
            out[key] = value.replace("\\", "\\\\")
        else:
            out[key] = str(value)
    return out


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


# --------------------------------------------------------------------------------------------
# read-only statements (the owner's query endpoint)

_READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC"})
_STRIP = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`|--[^\n]*|/\*.*?\*/", re.S)


def check_read_only(sql: str) -> str:
    """Return ``sql`` if it is one read-only statement; raise :class:`StoreError` otherwise.

    A lexical guard in front of a session opened with ``readonly=1`` (which the engine itself
    enforces): one statement, starting with SELECT / WITH / SHOW / DESCRIBE, no INTO OUTFILE.
    """
    bare = _STRIP.sub(" ", sql).strip()
    bare = bare.rstrip(";").strip()
    if not bare:
        raise StoreError("empty query")
    if ";" in bare:
        raise StoreError("one statement per query")
    first = bare.split(None, 1)[0].upper().lstrip("(")
    if first not in _READ_KEYWORDS:
        raise StoreError(f"only SELECT, WITH, SHOW and DESCRIBE are allowed here, not {first}")
    if re.search(r"\bOUTFILE\b", bare, re.I):
        raise StoreError("INTO OUTFILE is not allowed")
    return sql.strip().rstrip(";")


# --------------------------------------------------------------------------------------------


def open_store(settings: Settings, *, readonly: bool = False, command: str | None = None) -> Store:
    """The store the settings point at.

    ``SPENDSTREAM_CLICKHOUSE__URL`` set: a :class:`~sinks.ServerStore`. Otherwise embedded chDB
    at ``settings.chdb_path``: this process becomes its owner (:class:`~sinks.ChdbStore`), or,
    when another live process owns it, ``readonly=True`` returns a
    :class:`~sinks.RemoteChdbStore` that asks the owner, and a writer gets
    :class:`~spendstream.errors.StoreLockedError` at once.
    """
    if settings.clickhouse.url is not None:
        from sinks._server import ServerStore

        return ServerStore(settings.clickhouse)
    from sinks._chdb import open_embedded

    return open_embedded(
        settings.chdb_path,
        database=settings.clickhouse.database,
        readonly=readonly,
        command=command,
        ttl_days=settings.clickhouse.raw_ttl_days,
    )
