"""The sink's batching buffer: pure logic, no Kafka, no ClickHouse.

See docs/DESIGN.md, "Pure logic and thin I/O".

Records arrive as (topic, partition, offset, key, value). Each is decoded by the
:class:`TableSpec` registered for its topic and buffered per target table, keyed by
(topic, partition, offset) so that a redelivered offset is stored once. :meth:`SinkBuffer.drain`
turns the buffer into one Arrow batch per table, a deterministic insert-dedup token per table
(from the offset ranges it covers) and the offsets to commit once the inserts succeeded.

Values are converted column-wise by Arrow (money text -> ``decimal128(38, 24)``, which refuses
to round; RFC 3339 text -> ``timestamp[us, UTC]``); only when a column fails is the batch
re-checked row by row, and the bad rows become dead letters with the reason. Money never
passes through a float.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pa_json

from schemas import MONEY_SCALE
from spendstream.errors import BackpressureError

MONEY = pa.decimal128(38, MONEY_SCALE)
TIMESTAMP = pa.timestamp("us", "UTC")
DEAD_LETTERS_TABLE = "dead_letters"
SINK_STAGE = "sink"


class RecordError(ValueError):
    """A record on one of our own topics does not have the shape it must have."""


@dataclass(frozen=True)
class Column:
    """One target column: its name, Arrow type and whether nulls are allowed."""

    name: str
    type: pa.DataType
    nullable: bool = False
    default: Any = None
    """The value of a record that does not have the field (one written before it existed)."""

    def build(self, values: Sequence[Any]) -> pa.Array:
        """An Arrow array from decoded JSON values (text parsed by Arrow for money/time)."""
        if self.default is not None:
            values = [self.default if v is None else v for v in values]
        if pa.types.is_decimal(self.type) or pa.types.is_timestamp(self.type):
            # pa.string() refuses a JSON number: money sent as a float is rejected here.
            array = pa.array(values, pa.string()).cast(self.type)
        else:
            array = pa.array(values, self.type)
        if not self.nullable and array.null_count:
            raise RecordError(f"{self.name} is missing or null")
        return array


@dataclass(frozen=True)
class TableSpec:
    """How records of one topic become rows of one table."""

    table: str
    columns: tuple[Column, ...]
    decode: Callable[[bytes], dict[str, Any]]
    json_lines: bool = False
    """Records are flat JSON objects with these columns: convert a whole batch in Arrow's
    C++ JSON reader instead of decoding record by record in Python (the fast path)."""

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the batches handed to the store."""
        return pa.schema([pa.field(c.name, c.type, c.nullable) for c in self.columns])

    def to_arrow(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Column-wise conversion; raises on the first bad column."""
        arrays = [c.build([r.get(c.name) for r in rows]) for c in self.columns]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def from_json_lines(self, values: Sequence[bytes]) -> pa.Table:
        """A batch of wire JSON records straight to Arrow; raises if anything is off.

        The reader is strict (a number where text is expected fails, money included), so any
        failure sends the batch to the record-by-record path, which finds the bad records.
        """
        text_schema = pa.schema(
            [
                pa.field(c.name, pa.string() if _parsed_from_text(c.type) else c.type)
                for c in self.columns
                if not pa.types.is_map(c.type)
            ]
        )
        table = pa_json.read_json(
            pa.BufferReader(b"\n".join(values)),
            parse_options=pa_json.ParseOptions(
                explicit_schema=text_schema, unexpected_field_behavior="infer"
            ),
        )
        if table.num_rows != len(values):
            raise RecordError("a record is not exactly one JSON object")
        arrays = []
        for c in self.columns:
            if c.name not in table.column_names:
                if c.default is None:
                    raise RecordError(f"{c.name} is missing")
                arrays.append(c.build([c.default] * table.num_rows))
                continue
            column = table.column(c.name).combine_chunks()
            if c.default is not None and column.null_count:
                column = column.fill_null(pa.scalar(c.default, column.type))
            if pa.types.is_map(c.type):
                column = _struct_to_map(column)
            elif _parsed_from_text(c.type):
                column = column.cast(c.type)
            if not c.nullable and column.null_count:
                raise RecordError(f"{c.name} is missing or null")
            arrays.append(column)
        return pa.Table.from_arrays(arrays, schema=self.schema)


def warm_up() -> None:
    """Do the conversions' one-time work now rather than in the first batch.

    Arrow's first conversion of Python objects imports its pandas shim (about 0.4 s here),
    which would otherwise delay the first insert and count in a throughput figure.
    """
    pa.array([None], pa.string())


def _parsed_from_text(typ: pa.DataType) -> bool:
    return bool(pa.types.is_decimal(typ) or pa.types.is_timestamp(typ))


def _struct_to_map(column: pa.Array) -> pa.Array:
    """The reader infers a JSON object as a struct of every key seen; make it a map<str, str>."""
    if not pa.types.is_struct(column.type):
        raise RecordError("attributes must be an object of strings")
    if column.null_count:
        raise RecordError("attributes is null")
    n = len(column)
    children = column.flatten()
    if any(not pa.types.is_string(child.type) for child in children):
        raise RecordError("attribute values must be strings")
    names = [column.type.field(i).name for i in range(column.type.num_fields)]
    offsets = np.zeros(n + 1, dtype=np.int32)
    if not children:
        empty = pa.array([], pa.string())
        return pa.MapArray.from_arrays(pa.array(offsets), empty, empty)
    valid = np.stack(
        [np.asarray(child.is_valid().to_numpy(zero_copy_only=False)) for child in children],
        axis=1,
    )
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    rows, fields = np.nonzero(valid)  # row-major: each row's keys stay together, in order
    keys = pa.array(names, pa.string()).take(pa.array(fields))
    items = pa.concat_arrays(children).take(pa.array(fields * n + rows))
    return pa.MapArray.from_arrays(pa.array(offsets), keys, items)


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def decode_priced(value: bytes) -> dict[str, Any]:
    """A :class:`~schemas.PricedEvent` from its wire JSON (values checked column-wise)."""
    return _json_object(value)


def decode_rollup(value: bytes) -> dict[str, Any]:
    """A :class:`~schemas.Rollup` from its wire JSON."""
    return _json_object(value)


def _b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise RecordError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError(f"{name} is not valid base64: {exc}") from exc


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """A :class:`~schemas.DeadLetter`: the original bytes are restored from base64."""
    obj = _json_object(value)
    key = obj.get("key_b64")
    return {
        "source_topic": obj.get("source_topic"),
        "source_partition": obj.get("source_partition"),
        "source_offset": obj.get("source_offset"),
        "stage": obj.get("stage"),
        "key": None if key is None else _b64(key, "key_b64"),
        "payload": _b64(obj.get("payload_b64"), "payload_b64"),
        "reason": obj.get("reason"),
        "received_at": obj.get("received_at"),
    }


def _money(name: str) -> Column:
    return Column(name, MONEY)


PRICED_EVENTS = TableSpec(
    table="priced_events",
    columns=(
        Column("event_id", pa.string()),
        Column("occurred_at", TIMESTAMP),
        Column("org_id", pa.string()),
        Column("user_id", pa.string()),
        Column("api_key_id", pa.string(), nullable=True),
        Column("gateway", pa.string()),
        Column("request_id", pa.string(), nullable=True),
        Column("provider", pa.string(), nullable=True),
        Column("requested_model", pa.string()),
        Column("served_model", pa.string()),
        Column("input_tokens", pa.uint64()),
        Column("cached_input_tokens", pa.uint64()),
        Column("cache_write_tokens", pa.uint64()),
        Column("output_tokens", pa.uint64()),
        Column("reasoning_tokens", pa.uint64()),
        # Fields a worker from before the price model does not write: their defaults.
        Column("cache_write_1h_tokens", pa.uint64(), default=0),
        Column("input_audio_tokens", pa.uint64(), default=0),
        Column("input_image_tokens", pa.uint64(), default=0),
        Column("output_audio_tokens", pa.uint64(), default=0),
        Column("output_image_tokens", pa.uint64(), default=0),
        Column("service_tier", pa.string(), default="standard"),
        Column("web_search_requests", pa.uint32(), default=0),
        Column("search_context_size", pa.string(), nullable=True),
        Column("semantic_cache_hit", pa.bool_()),
        Column("status", pa.string()),
        Column("latency_ms", pa.uint32(), nullable=True),
        Column("feature", pa.string(), nullable=True),
        Column("attributes", pa.map_(pa.string(), pa.string())),
        Column("plan_id", pa.string()),
        _money("cost"),
        _money("list_value"),
        _money("saved_prompt_cache"),
        _money("saved_semantic_cache"),
        _money("saved_routing"),
        Column("saved_service_tier", MONEY, default="0"),
        Column("unknown_model", pa.bool_()),
        Column("price_approximated", pa.bool_(), default=False),
        Column("late", pa.bool_()),
        Column("window_start", TIMESTAMP),
        Column("processed_at", TIMESTAMP),
    ),
    decode=decode_priced,
    json_lines=True,
)

ROLLUPS = TableSpec(
    table="rollups",
    columns=(
        Column("user_id", pa.string()),
        Column("org_id", pa.string()),
        Column("plan_id", pa.string()),
        Column("served_model", pa.string()),
        Column("window_start", TIMESTAMP),
        Column("window_end", TIMESTAMP),
        Column("segment", pa.uint64()),
        Column("requests", pa.uint64()),
        Column("input_tokens", pa.uint64()),
        Column("cached_input_tokens", pa.uint64()),
        Column("cache_write_tokens", pa.uint64()),
        Column("output_tokens", pa.uint64()),
        Column("reasoning_tokens", pa.uint64()),
        Column("semantic_cache_hits", pa.uint64()),
        _money("cost"),
        _money("list_value"),
        Column("version", pa.uint64()),
        Column("updated_at", TIMESTAMP),
    ),
    decode=decode_rollup,
    json_lines=True,
)

DEAD_LETTERS = TableSpec(
    table=DEAD_LETTERS_TABLE,
    columns=(
        Column("source_topic", pa.string()),
        Column("source_partition", pa.int32()),
        Column("source_offset", pa.int64()),
        Column("stage", pa.string()),
        Column("key", pa.binary(), nullable=True),
        Column("payload", pa.binary()),
        Column("reason", pa.string()),
        Column("received_at", TIMESTAMP),
    ),
    decode=decode_dead_letter,
)


def decode_overage(value: bytes) -> dict[str, Any]:
    """An overage or a credit draw (the ``record`` field tells them apart) as one row shape."""
    obj = _json_object(value)
    kind = obj.get("record")
    if kind == "overage":
        obj["id"] = obj.get("overage_id")
    elif kind == "credit_draw":
        obj["id"] = obj.get("draw_id")
    else:
        raise RecordError(f"record must be 'overage' or 'credit_draw', got {kind!r}")
    return obj


ALERTS = TableSpec(
    table="alerts",
    columns=(
        Column("alert_id", pa.string()),
        Column("kind", pa.string()),
        Column("user_id", pa.string()),
        Column("org_id", pa.string()),
        Column("plan_id", pa.string()),
        Column("window", pa.string()),
        Column("window_id", pa.string()),
        Column("window_kind", pa.string()),
        Column("unit", pa.string()),
        Column("threshold", pa.uint16()),
        _money("usage"),
        _money("limit"),
        Column("window_start", TIMESTAMP),
        Column("window_end", TIMESTAMP),
        Column("event_id", pa.string()),
        Column("event_time", TIMESTAMP),
        Column("detected_at", TIMESTAMP),
    ),
    decode=_json_object,
)

ENFORCEMENT = TableSpec(
    table="enforcement_changes",
    columns=(
        Column("user_id", pa.string()),
        Column("org_id", pa.string()),
        Column("plan_id", pa.string()),
        Column("state", pa.string()),
        Column("reason", pa.string()),
        Column("window", pa.string(), nullable=True),
        Column("window_id", pa.string(), nullable=True),
        Column("unit", pa.string(), nullable=True),
        Column("usage", MONEY, nullable=True),
        Column("limit", MONEY, nullable=True),
        Column("remaining", MONEY, nullable=True),
        Column("until", TIMESTAMP, nullable=True),
        Column("downgrade_to", pa.string(), nullable=True),
        Column("as_of", TIMESTAMP),
        Column("version", pa.uint64()),
        Column("updated_at", TIMESTAMP),
    ),
    decode=_json_object,
)

OVERAGES = TableSpec(
    table="overages",
    columns=(
        Column("record", pa.string()),
        Column("id", pa.string()),
        Column("user_id", pa.string()),
        Column("org_id", pa.string()),
        Column("plan_id", pa.string()),
        Column("window", pa.string()),
        Column("window_id", pa.string()),
        Column("window_start", TIMESTAMP, nullable=True),
        Column("window_end", TIMESTAMP, nullable=True),
        Column("unit", pa.string()),
        Column("event_id", pa.string()),
        Column("event_time", TIMESTAMP),
        _money("quantity"),
        Column("unit_price", MONEY, nullable=True),
        Column("value", MONEY, nullable=True),
        _money("amount"),
        Column("ceiling_usd", MONEY, nullable=True),
        Column("balance_after", MONEY, nullable=True),
        Column("detected_at", TIMESTAMP),
    ),
    decode=decode_overage,
)

SINK_TABLES: dict[str, TableSpec] = {
    "priced": PRICED_EVENTS,
    "rollups": ROLLUPS,
    "dlq": DEAD_LETTERS,
    "alerts": ALERTS,
    "enforcement": ENFORCEMENT,
    "overages": OVERAGES,
}
"""Topic role (a field of :class:`~spendstream.settings.TopicSettings`) -> target table.

The registry of what the sink consumes: adding alerts or overages is one entry here (plus the
migration that creates the table)."""


def dead_letter_row(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
) -> dict[str, Any]:
    """A ``dead_letters`` row for a record the sink itself could not store."""
    return {
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "stage": SINK_STAGE,
        "key": key,
        "payload": value or b"",
        "reason": reason[:2000],
        "received_at": datetime.now(UTC).isoformat(),
    }


Source = tuple[str, int, int, bytes | None, bytes | None]
"""(topic, partition, offset, key, value) of a buffered record."""


@dataclass(frozen=True)
class Batch:
    """One table's share of a drain: rows as Arrow, and the token that makes a retry a no-op."""

    table: str
    data: pa.Table
    dedup_token: str
    sources: tuple[Source, ...] = ()
    """Where each row came from, in row order (empty for the dead-letter batch): what a row
    the store refuses becomes as a dead letter."""

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.data.num_rows)


@dataclass(frozen=True)
class Drained:
    """What :meth:`SinkBuffer.drain` hands out: insert every batch, then commit ``offsets``."""

    batches: tuple[Batch, ...]
    offsets: Mapping[tuple[str, int], int]
    """(topic, partition) -> next offset to consume (highest buffered offset + 1)."""
    dead_lettered: int = 0
    """Records the sink itself turned into dead letters (malformed on our own topics)."""

    @property
    def rows(self) -> int:
        """Rows over all batches."""
        return sum(b.rows for b in self.batches)


@dataclass
class _Pending:
    keys: list[tuple[str, int, int]] = field(default_factory=list)
    rows: list[dict[str, Any] | None] = field(default_factory=list)
    raw: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)


class SinkBuffer:
    """Rows buffered per table until a batch is due (by size or by age)."""

    def __init__(
        self,
        topics: Mapping[str, TableSpec],
        *,
        batch_rows: int,
        batch_age_s: float,
        max_buffer_rows: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._specs = dict(topics)
        self._tables = {spec.table: spec for spec in self._specs.values()}
        self._tables.setdefault(DEAD_LETTERS_TABLE, DEAD_LETTERS)
        self.batch_rows = batch_rows
        self.batch_age_s = batch_age_s
        self.max_buffer_rows = max(max_buffer_rows, 1)
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._seen: set[tuple[str, int, int]] = set()
        self._drained: dict[tuple[str, int], int] = {}
        self._commit: dict[tuple[str, int], int] = {}
        self._rows = 0
        self._dead = 0
        self._oldest: float | None = None

    def __len__(self) -> int:
        return self._rows

    def add(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        key: bytes | None = None,
    ) -> bool:
        """Buffer one record; False when this offset is already buffered or drained.

        A record that cannot be decoded is buffered as a dead letter (never dropped). Raises
        :class:`~spendstream.errors.BackpressureError` when the buffer is full: flush first.
        """
        spec = self._specs.get(topic)
        if spec is None:
            raise ValueError(f"no table registered for topic {topic!r}")
        tp = (topic, partition)
        if offset < self._drained.get(tp, -1):
            return False
        ident = (topic, partition, offset)
        if ident in self._seen:
            return False
        if self._rows >= self.max_buffer_rows:
            raise BackpressureError(
                f"sink buffer full ({self._rows} rows): flush before adding",
                retry_after=min(self.batch_age_s, 1.0),
            )
        if value is None:
            table = DEAD_LETTERS_TABLE
            row = dead_letter_row(topic, partition, offset, key, value, "empty value (tombstone)")
            self._dead += 1
        elif spec.json_lines:
            table, row = spec.table, None  # decoded with its whole batch at drain time
        else:
            try:
                table, row = spec.table, spec.decode(value)
            except RecordError as exc:
                table = DEAD_LETTERS_TABLE
                row = dead_letter_row(topic, partition, offset, key, value, str(exc))
                self._dead += 1
        pending = self._pending.get(table)
        if pending is None:
            pending = self._pending[table] = _Pending()
        pending.keys.append(ident)
        pending.rows.append(row)
        pending.raw.append((key, value))
        span = pending.ranges.get(tp)
        if span is None:
            pending.ranges[tp] = [offset, offset, 1]
        else:
            if offset < span[0]:
                span[0] = offset
            if offset > span[1]:
                span[1] = offset
            span[2] += 1
        self._seen.add(ident)
        if offset + 1 > self._commit.get(tp, -1):
            self._commit[tp] = offset + 1
        self._rows += 1
        if self._oldest is None:
            self._oldest = self._clock()
        return True

    def ready(self) -> bool:
        """True when a batch is due: ``batch_rows`` buffered, or the oldest is ``batch_age_s``."""
        if self._rows == 0:
            return False
        if self._rows >= self.batch_rows:
            return True
        return self._oldest is not None and self._clock() - self._oldest >= self.batch_age_s

    def forget(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Drop buffered rows and watermarks of revoked partitions (they will be re-read)."""
        lost = set(partitions)
        for pending in self._pending.values():
            keep = [i for i, k in enumerate(pending.keys) if (k[0], k[1]) not in lost]
            pending.keys = [pending.keys[i] for i in keep]
            pending.rows = [pending.rows[i] for i in keep]
            pending.raw = [pending.raw[i] for i in keep]
            for tp in lost:
                pending.ranges.pop(tp, None)
        self._seen = {k for k in self._seen if (k[0], k[1]) not in lost}
        for tp in lost:
            self._drained.pop(tp, None)
            self._commit.pop(tp, None)
        self._rows = sum(len(p.keys) for p in self._pending.values())
        if self._rows == 0:
            self._oldest = None

    def drain(self) -> Drained:
        """Everything buffered, as per-table Arrow batches with dedup tokens and offsets."""
        pending, self._pending = self._pending, {}
        offsets, self._commit = self._commit, {}
        self._drained.update(offsets)
        self._seen = set()
        self._rows = 0
        self._oldest = None
        dead_lettered, self._dead = self._dead, 0

        batches: list[Batch] = []
        dead = pending.pop(DEAD_LETTERS_TABLE, None) or _Pending()
        for table in sorted(pending):
            part = pending[table]
            spec = self._tables[table]
            data, bad = _convert(spec, part)
            for i, reason in bad:
                topic, partition, offset = part.keys[i]
                key, value = part.raw[i]
                dead.keys.append(part.keys[i])
                dead.rows.append(dead_letter_row(topic, partition, offset, key, value, reason))
            dead_lettered += len(bad)
            if data.num_rows:
                refused = {i for i, _ in bad}
                sources = tuple(
                    (*part.keys[i], *part.raw[i]) for i in range(len(part.keys)) if i not in refused
                )
                batches.append(Batch(table, data, dedup_token(table, part.ranges), sources))
        if dead.keys:
            # Dead letters always convert (the sink built them); its token covers the ranges
            # of every table in the drain, since any of them may contribute a bad row.
            ranges: dict[tuple[str, int], list[int]] = {}
            for key3 in dead.keys:
                span = ranges.setdefault((key3[0], key3[1]), [key3[2], key3[2], 0])
                span[0] = min(span[0], key3[2])
                span[1] = max(span[1], key3[2])
                span[2] += 1
            data, bad = _convert(DEAD_LETTERS, dead)
            if bad:
                # A dead letter from the DLQ topic that is itself malformed: keep its bytes.
                for i, reason in bad:
                    topic, partition, offset = dead.keys[i]
                    key, value = dead.raw[i] if i < len(dead.raw) else (None, None)
                    dead.rows[i] = dead_letter_row(topic, partition, offset, key, value, reason)
                data, _ = _convert(DEAD_LETTERS, dead)
            batches.append(Batch(DEAD_LETTERS_TABLE, data, dedup_token(DEAD_LETTERS_TABLE, ranges)))
        return Drained(tuple(batches), dict(offsets), dead_lettered)


def dead_letters_batch(sources: Sequence[tuple[Source, str]], token: str) -> Batch:
    """A ``dead_letters`` batch for records the store refused, each with its reason."""
    part = _Pending()
    for (topic, partition, offset, key, value), reason in sources:
        part.keys.append((topic, partition, offset))
        part.rows.append(dead_letter_row(topic, partition, offset, key, value, reason))
        part.raw.append((key, value))
    data, _ = _convert(DEAD_LETTERS, part)
    return Batch(DEAD_LETTERS_TABLE, data, token)


def _convert(spec: TableSpec, part: _Pending) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Arrow table of the good rows, and (index, reason) of the bad ones."""
    errors = (RecordError, pa.ArrowException, TypeError, ValueError, OverflowError)
    if spec.json_lines and all(r is None for r in part.rows):
        try:
            return spec.from_json_lines([raw[1] or b"" for raw in part.raw]), []
        except errors:
            pass
    # Record by record: decode what is not decoded yet, then convert column-wise.
    bad: list[tuple[int, str]] = []
    rows: list[tuple[int, dict[str, Any]]] = []
    for i, row in enumerate(part.rows):
        if row is None:
            try:
                row = spec.decode(part.raw[i][1] or b"")
            except RecordError as exc:
                bad.append((i, f"{spec.table}: {exc}"))
                continue
        rows.append((i, row))
    try:
        return spec.to_arrow([r for _, r in rows]), bad
    except errors:
        pass
    # Slow path, only for a batch with a bad value: find which rows fail, and why.
    good: list[dict[str, Any]] = []
    for i, row in rows:
        try:
            spec.to_arrow([row])
        except errors as exc:
            bad.append((i, f"{spec.table}: {exc}"))
        else:
            good.append(row)
    bad.sort()
    return spec.to_arrow(good), bad


def dedup_token(table: str, ranges: Mapping[tuple[str, int], Sequence[int]]) -> str:
    """Deterministic insert-dedup token: the table and the offset ranges its rows came from."""
    parts = [table] + [
        f"{topic}:{partition}:{span[0]}-{span[1]}:{span[2]}"
        for (topic, partition), span in sorted(ranges.items())
    ]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]
    return f"{table}-{digest}"


def decode_subscription(value: bytes) -> dict[str, Any]:
    """A :class:`~schemas.Subscription` as one ``subscriptions`` row: the plan schedule and the
    credit grants as parallel arrays, flattened by views (periods, ``credit_grants``)."""
    from pydantic import ValidationError

    from schemas import Subscription

    try:
        sub = Subscription.model_validate_json(value)
    except ValidationError as exc:
        raise RecordError(f"not a subscription: {exc.errors(include_url=False)[:3]}") from exc
    return {
        "user_id": sub.user_id,
        "org_id": sub.org_id,
        "timezone": sub.timezone,
        "billing_anchor": sub.billing_anchor.astimezone(UTC).isoformat(),
        "plan_ids": [p.plan_id for p in sub.plans],
        # list<timestamp> is built from datetimes (Column.build parses text only at top level)
        "effective_ats": [p.effective_at.astimezone(UTC) for p in sub.plans],
        "credit_ids": [c.credit_id for c in sub.credits],
        "credit_amounts": [c.amount_usd for c in sub.credits],
        "credit_granted_ats": [c.granted_at.astimezone(UTC) for c in sub.credits],
        # version of the ReplacingMergeTree: records are decoded in offset order
        "received_at": datetime.now(UTC).isoformat(),
    }


SUBSCRIPTIONS = TableSpec(
    table="subscriptions",
    columns=(
        Column("user_id", pa.string()),
        Column("org_id", pa.string()),
        Column("timezone", pa.string()),
        Column("billing_anchor", TIMESTAMP),
        Column("plan_ids", pa.list_(pa.string())),
        Column("effective_ats", pa.list_(TIMESTAMP)),
        Column("credit_ids", pa.list_(pa.string())),
        Column("credit_amounts", pa.list_(MONEY)),
        Column("credit_granted_ats", pa.list_(TIMESTAMP)),
        Column("received_at", TIMESTAMP),
    ),
    decode=decode_subscription,
)
SINK_TABLES["subscriptions"] = SUBSCRIPTIONS
