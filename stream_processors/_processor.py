"""The pure heart of the worker: validate, dedupe, price and roll up a batch of messages.

No Kafka, no faust: a batch of raw records goes in with three pieces of partitioned state, and
the messages to publish come out. The faust agent (``_app.py``) only moves bytes in and out.

Event time and lateness. Each partition keeps a watermark: the largest event time seen on it.
A tumbling window is *closed* once ``window_end + grace <= watermark``. Events for open windows
are pre-aggregated per (user, served model, window) within the batch and applied to the window's
state once, which is then re-emitted in full with the next version (an upsert). Closed windows are
evicted. An event for a closed window is still priced and landed raw, flagged ``late``, and its
correction is emitted as a separate rollup segment, so it still counts exactly once. Events older
than the dedupe horizon cannot be checked for duplicates any more and go to the dead-letter topic
with that reason instead of risking a double count.

What the watermark follows. Only events that pass the event-time check move it: an event dated
more than ``future_skew_s`` after the time its record reached Kafka goes to the dead-letter
topic (stage ``event_time``) instead. That time is the record's broker timestamp, and never
later than the worker's clock (a producer sets CreateTime timestamps and could date them ahead
too). So one record can move a partition's watermark at most ``future_skew_s`` past real time,
and a watermark stored further ahead (written before this check existed) is read as that
bound. See docs/DESIGN.md, "Event time and lateness".
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, get_type_hints

import msgspec
import orjson

from schemas import (
    REQUEST_PREFIX,
    AdmissionRequest,
    DeadLetter,
    PricedEvent,
    ReleaseRequest,
    Rollup,
    Subscription,
    decode_request,
)
from schemas.wire import DecodedEvent, decode_usage
from spendstream.errors import InvalidEventError
from stream_processors._money import units_to_str
from stream_processors._pricing import PriceCatalog, Quote
from stream_processors._state import PartitionedState, SeenIndex, seen_value
from stream_processors._time import micros_to_iso, to_micros

_US = 1_000_000
_HOUR_US = 3600 * _US
_EVICTED_LEN = 2
"""Length of an evicted window's marker: [partition, last offset applied]."""
_MARKER_RETENTION_US = _HOUR_US
"""How long an evicted window's marker outlives its close: longer than any offset stays
uncommitted, so every replay of its events meets it."""
_Stored = tuple[int, bool, str, list[Any] | None]
NO_PLAN = ""
"""plan_id of events whose user has no known subscription (counted as ``no_subscription``)."""


class SourceRecord(Protocol):
    """What the processor reads of a consumed message.

    :class:`InRecord` is one; so are aiokafka's records (which the worker's input lane holds)
    and faust's messages (under ``agent.test_context()``).
    """

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None:
        """The record's Kafka timestamp in epoch milliseconds (``None``: unknown)."""


@dataclass(frozen=True, slots=True)
class InRecord:
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None


@dataclass(slots=True)
class PricedRecord:
    """A priced event together with the parsed fields later stages (caps) need."""

    event: DecodedEvent
    quote: Quote
    plan_id: str
    partition: int
    late: bool
    offset: int


@dataclass(slots=True)
class AdmissionItem:
    """An admission (or release) request read from the events topic, where it was in the log,
    and when.

    ``arrived_ms`` is the record's timestamp (never later than the worker's clock; with
    CreateTime, the gateway's clock at the send, which also dates its usage events): the
    request's time, at which its estimate is held (docs/DESIGN.md, "Admission (reservations)").
    """

    request: AdmissionRequest | ReleaseRequest
    partition: int
    offset: int
    arrived_ms: int


@dataclass(slots=True)
class BatchResult:
    """Messages to publish (key, value) per output topic, plus counters for this batch."""

    priced: list[tuple[str, bytes]] = field(default_factory=list)
    rollups: list[tuple[str, bytes]] = field(default_factory=list)
    dead: list[tuple[bytes | None, bytes, int]] = field(default_factory=list)
    """(key, dead letter, source partition)."""
    accepted: list[PricedRecord] = field(default_factory=list)
    admissions: list[AdmissionItem] = field(default_factory=list)
    """Admission requests of the batch, in its order (decided by the caps stage)."""
    counters: Counter[str] = field(default_factory=Counter)


def _same_message(seen_value: bytes, record: SourceRecord) -> bool:
    """Whether a ``seen`` entry (``partition:hour:offset:late``) was written for this message."""
    partition, _, offset, _ = seen_value.split(b":")
    return int(partition) == record.partition and int(offset) == record.offset


def late_segment(event_id: str) -> int:
    """Stable non-zero 63-bit segment id for a beyond-grace late event."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def dead_letter(record: SourceRecord, reason: str, stage: str, now: datetime) -> bytes:
    """Encode a dead letter that keeps the original bytes and where they came from."""
    letter: DeadLetter = {
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "key_b64": base64.b64encode(record.key).decode() if record.key is not None else None,
        "payload_b64": base64.b64encode(record.value or b"").decode(),
        "reason": reason[:2000],
        "stage": stage,
        "received_at": micros_to_iso(to_micros(now)),
    }
    return orjson.dumps(letter)


class _WindowAgg:
    """Sums of one (user, served model, window) within a batch, then merged into its state."""

    __slots__ = (
        "cached",
        "cost",
        "inp",
        "last_offset",
        "list_value",
        "org_id",
        "out",
        "plan_id",
        "reasoning",
        "requests",
        "semantic",
        "written",
    )

    def __init__(self, org_id: str, plan_id: str) -> None:
        self.org_id = org_id
        self.plan_id = plan_id
        self.requests = self.inp = self.cached = self.written = 0
        self.out = self.reasoning = self.semantic = self.cost = self.list_value = 0
        self.last_offset = -1

    def add(self, event: DecodedEvent, quote: Quote) -> None:
        self.requests += 1
        self.inp += event.input_tokens
        self.cached += event.cached_input_tokens
        self.written += event.cache_write_tokens
        self.out += event.output_tokens
        self.reasoning += event.reasoning_tokens
        self.semantic += event.semantic_cache_hit
        self.cost += quote.cost
        self.list_value += quote.list_value

    def merge_state(self, st: list[Any] | None) -> int:
        """Fold the stored (decoded) state into this aggregate; return the stored version."""
        if st is None:
            return 0
        # [partition, org, plan, requests, in, cached, written, out, reasoning, semantic,
        #  cost, list_value, version, last_offset]; money as strings: it exceeds 64 bits.
        self.requests += st[3]
        self.inp += st[4]
        self.cached += st[5]
        self.written += st[6]
        self.out += st[7]
        self.reasoning += st[8]
        self.semantic += st[9]
        self.cost += int(st[10])
        self.list_value += int(st[11])
        return int(st[12])

    def counts(self) -> tuple[int, int, int, int, int, int, int]:
        """Requests, then each token class, then semantic cache hits: the order of both the
        stored state and the rollup."""
        return (
            self.requests,
            self.inp,
            self.cached,
            self.written,
            self.out,
            self.reasoning,
            self.semantic,
        )

    def encode_state(self, partition: int, version: int) -> bytes:
        return orjson.dumps(
            [
                partition,
                self.org_id,
                self.plan_id,
                *self.counts(),
                str(self.cost),
                str(self.list_value),
                version,
                self.last_offset,
            ]
        )

    def rollup(
        self,
        user_id: str,
        model: str,
        start_us: int,
        window_us: int,
        segment: int,
        version: int,
        now_iso: str,
    ) -> bytes:
        """The wire JSON of this aggregate as a :class:`schemas.Rollup`."""
        return _encode_wire(
            RollupWire(
                user_id,
                self.org_id,
                self.plan_id,
                model,
                micros_to_iso(start_us),
                micros_to_iso(start_us + window_us),
                segment,
                *self.counts(),
                units_to_str(self.cost),
                units_to_str(self.list_value),
                version,
                now_iso,
            )
        )


def _wire_struct(name: str, record: Any) -> Any:
    """A msgspec Struct with the fields of the TypedDict ``record``, in its order.

    Filled positionally and encoded by msgspec, it writes the same JSON as the TypedDict would
    with orjson, in half the time of building the dict (once per output record).
    """
    return msgspec.defstruct(name, list(get_type_hints(record).items()))


PricedWire = _wire_struct("PricedWire", PricedEvent)
"""A :class:`schemas.PricedEvent` as the worker encodes it."""
RollupWire = _wire_struct("RollupWire", Rollup)
"""A :class:`schemas.Rollup` as the worker encodes it."""
_encode_wire = msgspec.json.Encoder().encode


class UsageProcessor:
    """Validate, dedupe, price and roll up batches of usage messages (pure; state injected).

    ``seen`` maps event_id -> the event's hour, for deduplication; ``windows`` holds open
    window aggregates; ``marks`` the per-partition watermarks. All three are written with the
    partition of the message that caused the write.
    """

    def __init__(
        self,
        catalog: PriceCatalog,
        subscriptions: Callable[[str], Subscription | None],
        *,
        seen: SeenIndex,
        windows: PartitionedState,
        marks: PartitionedState,
        window_s: int = 60,
        grace_s: int = 300,
        dedupe_horizon_s: int = 86_400,
        future_skew_s: int = 120,
    ) -> None:
        self.catalog = catalog
        self._subscriptions = subscriptions
        self.seen = seen
        self.windows = windows
        self.marks = marks
        self.window_us = window_s * _US
        self.grace_us = grace_s * _US
        self.horizon_us = dedupe_horizon_s * _US
        self.skew_us = future_skew_s * _US
        self._marks: dict[int, int] = {}
        self._open: dict[int, dict[int, set[str]]] | None = None
        self._closed: dict[int, dict[int, set[str]]] | None = None
        self._evicting = False

    # -- watermarks -------------------------------------------------------------------------
    def watermark(self, partition: int) -> int:
        """Largest event time (epoch µs) seen on ``partition``; 0 before any event."""
        mark = self._marks.get(partition)
        if mark is None:
            raw = self.marks.get(f"wm:{partition}", partition)
            mark = int(raw) if raw is not None else 0
            self._marks[partition] = mark
        return mark

    def reset_caches(self) -> None:
        """Forget in-memory caches after a rebalance; they are rebuilt from the tables."""
        self._marks.clear()
        self._open = None
        self._closed = None
        self._evicting = False

    def rolled_back(self) -> None:
        """The tables were rolled back to before a :meth:`process` call that raised.

        Up to eviction, a batch only *adds* to the in-memory indexes: an id or window that is
        listed but absent from the table again costs at most a no-op tombstone or a marker
        later, so the indexes stay (rebuilding them reads the whole state). A failure during
        eviction, which moves entries between them, rebuilds them.
        """
        if self._evicting:
            self.reset_caches()
        else:
            self._marks.clear()

    # -- the batch --------------------------------------------------------------------------
    def process(self, batch: Sequence[SourceRecord], now: datetime | None = None) -> BatchResult:
        """Process one batch in order; return what to publish. Never raises on bad input."""
        now = now or datetime.now(UTC)
        now_us = to_micros(now)
        now_iso = micros_to_iso(now_us)
        skew_us = self.skew_us
        # No watermark is read as further ahead than any accepted event can be.
        ceiling = now_us + skew_us
        result = BatchResult()
        counters = result.counters
        aggs: dict[tuple[str, str, int], _WindowAgg] = {}
        agg_partition: dict[tuple[str, str, int], int] = {}
        batch_ids: set[str] = set()
        # (user, model, window start) -> what its stored state says: the last offset applied,
        # evicted or not, its table key, the decoded state (read once per window and batch).
        applied_up_to: dict[tuple[str, str, int], _Stored] = {}
        moved: dict[int, int] = {}
        window_us, grace_us = self.window_us, self.grace_us
        open_windows = self._index()

        priced_n = 0
        for rec in batch:
            value = rec.value
            if value is not None and value.startswith(REQUEST_PREFIX):
                self._admission(rec, value, now, now_us, result)
                continue
            try:
                event = decode_usage(value)
            except InvalidEventError as exc:
                counters["dead_letters"] += 1
                result.dead.append(
                    (rec.key, dead_letter(rec, str(exc), "validate", now), rec.partition)
                )
                continue
            event_id = event.event_id
            prior = self.seen.get(event_id, rec.partition)
            if event_id in batch_ids or (prior is not None and not _same_message(prior, rec)):
                counters["duplicates"] += 1
                continue
            t_us = to_micros(event.occurred_at)
            arrived_ms = rec.timestamp
            arrived_us = now_us if arrived_ms is None else min(arrived_ms * 1000, now_us)
            if t_us > arrived_us + skew_us:
                counters["dead_letters"] += 1
                counters["future_event"] += 1
                reason = (
                    f"occurred_at is {(t_us - arrived_us) // _US} s after the record reached "
                    f"Kafka (at most {skew_us // _US} s are accepted): a clock ahead, or a "
                    "wrong date"
                )
                result.dead.append(
                    (rec.key, dead_letter(rec, reason, "event_time", now), rec.partition)
                )
                continue
            mark = moved.get(rec.partition)
            if mark is None:
                mark = min(self.watermark(rec.partition), ceiling)
            if t_us < mark - self.horizon_us:
                counters["dead_letters"] += 1
                counters["beyond_dedupe_horizon"] += 1
                reason = (
                    "event is older than the dedupe horizon "
                    f"({self.horizon_us // _US} s behind the partition's event time): "
                    "it cannot be checked for duplicates"
                )
                result.dead.append(
                    (rec.key, dead_letter(rec, reason, "dedupe", now), rec.partition)
                )
                continue
            batch_ids.add(event_id)
            start_us = t_us - t_us % window_us
            if prior is None:
                late = start_us + window_us + grace_us <= mark
                hour = t_us // _HOUR_US
                self.seen.put(
                    rec.partition, event_id, seen_value(rec.partition, hour, rec.offset, late)
                )
            else:
                # The same message again: the worker died before committing its offset. The
                # watermark may have moved on since, so the lateness decided the first time is
                # kept; each state below knows the last offset it applied: nothing counts twice.
                counters["replayed"] += 1
                late = prior.endswith(b":1")
            sub = self._subscriptions(event.user_id)
            if sub is None:
                plan_id = NO_PLAN
                counters["no_subscription"] += 1
            else:
                plan_id = sub.plan_at(event.occurred_at)
                if sub.org_id != event.org_id:
                    counters["org_mismatch"] += 1
            quote = self.catalog.quote(event)
            if quote.unknown_model:
                counters["unknown_model"] += 1
            model = event.served_model or event.requested_model
            result.priced.append(
                (
                    event.user_id,
                    self._priced(event, quote, plan_id, late, t_us, start_us, now_iso),
                )
            )
            result.accepted.append(
                PricedRecord(event, quote, plan_id, rec.partition, late, rec.offset)
            )
            priced_n += 1

            if late:
                counters["late"] += 1
                solo = _WindowAgg(event.org_id, plan_id)
                solo.add(event, quote)
                roll = solo.rollup(
                    event.user_id, model, start_us, window_us, late_segment(event_id), 1, now_iso
                )
                result.rollups.append((event.user_id, roll))
            else:
                key = (event.user_id, model, start_us)
                applied = applied_up_to.get(key)
                if applied is None:
                    applied = applied_up_to[key] = self._stored_window(key, rec.partition)
                if rec.offset <= applied[0]:
                    counters["replayed_in_window"] += 1
                elif applied[1]:
                    # Its window was evicted, yet the event was on time when first seen: can
                    # only follow lost state. Count it alone rather than overwrite the window.
                    counters["late_after_eviction"] += 1
                    solo = _WindowAgg(event.org_id, plan_id)
                    solo.add(event, quote)
                    segment = late_segment(event_id)
                    roll = solo.rollup(
                        event.user_id, model, start_us, window_us, segment, 1, now_iso
                    )
                    result.rollups.append((event.user_id, roll))
                else:
                    agg = aggs.get(key)
                    if agg is None:
                        agg = aggs[key] = _WindowAgg(event.org_id, plan_id)
                        agg_partition[key] = rec.partition
                    agg.add(event, quote)
                    agg.last_offset = rec.offset
            if t_us > mark:
                moved[rec.partition] = t_us
        # Per-event counts are kept in locals: a Counter update per event cost more than pricing.
        counters["in"] += len(batch)
        counters["priced"] += priced_n

        for key, agg in aggs.items():
            user_id, model, start_us = key
            _, _, skey, stored = applied_up_to[key]
            agg.merge_state(stored)
            # The version is the last source offset applied (+1), not a counter: a replay after
            # a crash may cut batches differently, and a counter would let the lost run's
            # higher versions outrank the replay's complete ones. Same offset, same content.
            version = agg.last_offset + 1
            partition = agg_partition[key]
            self.windows.put(partition, skey, agg.encode_state(partition, version))
            open_windows.setdefault(partition, {}).setdefault(start_us, set()).add(skey)
            roll = agg.rollup(user_id, model, start_us, window_us, 0, version, now_iso)
            result.rollups.append((user_id, roll))

        self._evicting = True
        for partition, mark in moved.items():
            self._marks[partition] = mark
            self.marks.put(partition, f"wm:{partition}", b"%d" % mark)
            evicted_windows, evicted_ids = self._evict(partition, mark)
            counters["evicted_windows"] += evicted_windows
            counters["evicted_ids"] += evicted_ids
        self._evicting = False
        return result

    @staticmethod
    def _admission(
        rec: SourceRecord, value: bytes, now: datetime, now_us: int, result: BatchResult
    ) -> None:
        """Queue an admission request for the caps stage (a dead letter if it is not one).

        It neither moves a watermark nor enters the dedupe index: the caps state remembers
        each reservation id, which is what makes a replayed request get the same answer.
        """
        try:
            request = decode_request(value)
        except InvalidEventError as exc:
            result.counters["dead_letters"] += 1
            result.dead.append(
                (rec.key, dead_letter(rec, str(exc), "admission", now), rec.partition)
            )
            return
        arrived_ms = rec.timestamp
        now_ms = now_us // 1000
        at_ms = now_ms if arrived_ms is None or arrived_ms <= 0 else min(arrived_ms, now_ms)
        result.admissions.append(AdmissionItem(request, rec.partition, rec.offset, at_ms))
        if isinstance(request, ReleaseRequest):
            result.counters["release_requests"] += 1
        else:
            result.counters["admission_requests"] += 1

    # -- eviction -----------------------------------------------------------------------------
    def _index(self) -> dict[int, dict[int, set[str]]]:
        """In-memory index of open windows by partition and start.

        Built once from the restored state (a worker restart or rebalance), then maintained on
        every write, so eviction never scans. Windows are bounded by active users, not by
        events; the dedupe ids are expired by the seen state's own hour index.
        """
        if self._open is None or self._closed is None:
            self._open, self._closed = {}, {}
            for skey, raw in self.windows.items():
                st = orjson.loads(raw)
                start_us = orjson.loads(skey)[2]
                index = self._closed if len(st) == _EVICTED_LEN else self._open
                index.setdefault(st[0], {}).setdefault(start_us, set()).add(skey)
        return self._open

    def _evict(self, partition: int, mark: int) -> tuple[int, int]:
        """Drop closed windows and ids past the dedupe horizon of ``partition``."""
        open_windows = self._index()
        assert self._closed is not None
        closed_before = mark - self.grace_us - self.window_us
        evicted_windows = 0
        starts = open_windows.get(partition, {})
        closed = self._closed.setdefault(partition, {})
        for start_us in [s for s in starts if s <= closed_before]:
            for skey in starts.pop(start_us):
                # A small marker with the last offset applied stays for a while, so that a
                # replay of already-applied events (a crash before the offset commit) is
                # recognised instead of starting the window afresh.
                raw = self.windows.get(skey, partition)
                last = int(orjson.loads(raw)[13]) if raw is not None else -1
                self.windows.put(partition, skey, orjson.dumps([partition, last]))
                closed.setdefault(start_us, set()).add(skey)
                evicted_windows += 1
        forget_before = closed_before - _MARKER_RETENTION_US
        for start_us in [s for s in closed if s <= forget_before]:
            for skey in closed.pop(start_us):
                self.windows.delete(partition, skey)
        horizon_hour = (mark - self.horizon_us) // _HOUR_US - 1
        evicted_ids = self.seen.expire(partition, horizon_hour)
        return evicted_windows, evicted_ids

    def _stored_window(self, key: tuple[str, str, int], partition: int) -> _Stored:
        """The last source offset the stored window applied (-1: none), if it was evicted, its
        table key and its decoded state (``None``: none stored)."""
        skey = orjson.dumps(key).decode()
        raw = self.windows.get(skey, partition)
        if raw is None:
            return -1, False, skey, None
        st = orjson.loads(raw)
        if len(st) == _EVICTED_LEN:
            return int(st[1]), True, skey, st
        return int(st[13]), False, skey, st

    @staticmethod
    def _priced(
        event: DecodedEvent,
        quote: Quote,
        plan_id: str,
        late: bool,
        t_us: int,
        start_us: int,
        now_iso: str,
    ) -> bytes:
        return _encode_wire(
            PricedWire(
                event.event_id,
                micros_to_iso(t_us),
                event.org_id,
                event.user_id,
                event.api_key_id,
                event.gateway,
                event.request_id,
                event.provider,
                event.requested_model,
                event.served_model or event.requested_model,
                event.input_tokens,
                event.cached_input_tokens,
                event.cache_write_tokens,
                event.output_tokens,
                event.reasoning_tokens,
                event.cache_write_1h_tokens,
                event.input_audio_tokens,
                event.input_image_tokens,
                event.output_audio_tokens,
                event.output_image_tokens,
                event.service_tier,
                event.web_search_requests,
                event.search_context_size,
                event.semantic_cache_hit,
                event.status,
                event.latency_ms,
                event.feature,
                event.attributes or {},
                plan_id,
                units_to_str(quote.cost),
                units_to_str(quote.list_value),
                units_to_str(quote.saved_prompt_cache),
                units_to_str(quote.saved_semantic_cache),
                units_to_str(quote.saved_routing),
                units_to_str(quote.saved_service_tier),
                quote.unknown_model,
                quote.approximated,
                late,
                micros_to_iso(start_us),
                now_iso,
            )
        )
