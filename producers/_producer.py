"""The synchronous, thread-safe usage-event producer: gateway -> usage.events.

See docs/DESIGN.md, "Data flow".
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Producer
from pydantic import ValidationError

from producers._config import producer_config
from producers._spool import DiskSpool, SpoolRecord, SpoolStats
from schemas import MAX_EVENT_BYTES, UsageEvent, event_from_obj, topics
from schemas.wire import encode_dict
from spendstream.errors import BackpressureError, DeliveryError, InvalidEventError, KafkaError
from spendstream.settings import Settings

log = logging.getLogger(__name__)

_validate = UsageEvent.__pydantic_validator__.validate_python
_serialize = UsageEvent.__pydantic_serializer__.to_json


def fast_encode(event: UsageEvent) -> bytes:
    """Byte-for-byte :func:`schemas.encode_event`, without the intermediate dict.

    pydantic-core writes the JSON directly (UTC datetimes as ``...Z``, fields in declaration
    order, unset optional fields left out), which halves the encoding cost of the hot path.
    ``tests/unit/test_contract.py`` proves the equality on generated events.
    """
    return _serialize(event, exclude_none=True)


def encode_for_send(obj: UsageEvent | dict[str, Any]) -> tuple[str, bytes]:
    """Validate ``obj`` and return (key, wire bytes); raise ``InvalidEventError``.

    A dict goes through msgspec (:mod:`schemas._wire`), about a third of the CPU of the
    pydantic model (measured in BENCHMARKS.md). Anything that path refuses is re-checked through
    the model, so the error is the contract's, word for word.
    """
    if type(obj) is dict:
        fast = encode_dict(obj)
        if fast is not None:
            return _within_size(fast)
    event = validate_event(obj)
    return _within_size((event.user_id, fast_encode(event)))


def _within_size(sent: tuple[str, bytes]) -> tuple[str, bytes]:
    # Every field may be within its bound while the whole is not (32 attributes of long
    # non-ASCII text encode to about 30 KB): the worker would dead-letter it, so refuse it here.
    if len(sent[1]) > MAX_EVENT_BYTES:
        raise InvalidEventError(
            f"event is {len(sent[1])} bytes encoded, over the {MAX_EVENT_BYTES} limit"
        )
    return sent


def validate_event(obj: UsageEvent | dict[str, Any]) -> UsageEvent:
    """Validate a JSON-ready dict (or pass an event through); raise ``InvalidEventError``."""
    if type(obj) is UsageEvent:
        return obj
    if type(obj) is dict:
        try:
            return _validate(obj)  # type: ignore[no-any-return]
        except ValidationError:
            pass  # fall through: event_from_obj raises with the contract's wording
    return event_from_obj(obj)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """The outcome of one produced message, as handed to ``on_delivery`` callbacks."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    error: str | None = None
    retriable: bool = False

    @property
    def ok(self) -> bool:
        """True when the broker acknowledged the message (``acks=all``)."""
        return self.error is None


DeliveryCallback = Callable[[DeliveryReport], None]


@dataclass(frozen=True, slots=True)
class ProducerStats:
    """Counters of one producer. ``delivered`` is exact once the producer has been flushed."""

    sent: int
    delivered: int
    failed: int
    in_flight: int
    queue_full_waits: int
    last_error: str | None


def kafka_reason(exc: KafkaException) -> str:
    """The librdkafka error text inside a ``KafkaException``."""
    inner = exc.args[0] if exc.args else exc
    return str(inner.str()) if hasattr(inner, "str") else str(inner)


def _report(err: Any, msg: Any) -> DeliveryReport:
    if err is None:
        return DeliveryReport(msg.topic(), msg.partition(), msg.offset(), msg.key())
    return DeliveryReport(
        msg.topic() or "",
        msg.partition() if msg.partition() is not None else -1,
        msg.offset() if msg.offset() is not None else -1,
        msg.key(),
        error=err.str(),
        retriable=bool(err.retriable()),
    )


class _HeldRecord(Exception):
    """A drain pass failed while it held ``record``, which must be handed over again."""

    def __init__(self, record: SpoolRecord) -> None:
        super().__init__(f"spooled record {record.seq} not handed over")
        self.record = record


class UsageProducer:
    """Sends validated usage events to the events topic, keyed by ``user_id``.

    One instance serves every thread of a process (share it; producers are heavy). Messages
    are batched and compressed by librdkafka in the background; an idempotent producer with
    ``acks=all`` means a broker restart neither loses nor duplicates an acknowledged event.
    Failures are never silent: they are counted, logged, and passed to ``on_delivery``.

    With a spool (``spool=True`` or ``SPENDSTREAM_PRODUCER__SPOOL_ENABLED=true``) every event is
    first appended to a bounded on-disk log (:class:`~producers._spool.DiskSpool`) and
    :meth:`send` returns once it is there; a drain thread hands the log to librdkafka in order and
    an event leaves the log when the broker acknowledged it. A broker outage then fills the
    spool instead of memory, and a process restart replays what was not acknowledged
    (a replayed duplicate is dropped downstream by ``event_id``). librdkafka never times a
    spooled message out (``message.timeout.ms=0``): the spool bound, not a timer, decides
    when to push back, with ``SPENDSTREAM_PRODUCER__FULL_POLICY`` (``block`` waits up to
    ``queue_full_timeout_s``, ``reject`` raises :class:`~producers._spool.SpoolFullError` at
    once). One producer per spool folder: a second one is refused with a clear error.

    Example::

        with UsageProducer(settings) as producer:
            producer.send({"event_id": "...", "occurred_at": "...", ...})
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        topic: str | None = None,
        on_delivery: DeliveryCallback | None = None,
        poll_interval_s: float = 0.1,
        queue_full_timeout_s: float | None = 60.0,
        report_successes: bool | None = None,
        spool: bool | Path | None = None,
    ) -> None:
        """Connect lazily to the cluster of ``settings`` (or ``config``).

        ``topic`` defaults to ``settings.topics.events``. ``on_delivery`` is called from the
        background poll thread for every delivered or failed message. ``queue_full_timeout_s``
        bounds how long :meth:`send` waits for room in a full local queue (or a full spool
        under the ``block`` policy) before raising :class:`BackpressureError` (``None``: wait
        as long as it takes). ``spool``: ``None`` follows ``settings.producer.spool_enabled``,
        ``True``/``False`` force it, a path enables it in that folder.
        """
        if settings is None and config is None:
            settings = Settings()
        self.topic: str = topic or (settings.topics.events if settings else topics.EVENTS)
        self._on_delivery = on_delivery
        self._queue_full_timeout_s = queue_full_timeout_s
        self._closed = False
        self._lock = threading.Lock()
        self._sent = 0
        self._failed = 0
        self._queue_full_waits = 0
        self._reported_ok = 0
        self._last_error: str | None = None
        # Per-message success reports cost a Python call each; without a listener only
        # failures are reported and ``delivered`` is derived from the queue length.
        self._report_successes = (
            on_delivery is not None if report_successes is None else report_successes
        )
        self._spool: DiskSpool | None = _open_spool(settings, spool)
        self._spool_in_flight = 0
        self._rewind = False
        self._closing = False
        self._waiters: dict[int, Callable[[DeliveryReport], None]] = {}
        conf = producer_config(settings, config)
        if self._spool is not None:
            # Acks are what empties the spool; a spooled message never expires in memory.
            self._report_successes = True
            if config is None or "message.timeout.ms" not in config:
                conf["message.timeout.ms"] = 0
        conf["delivery.report.only.error"] = not self._report_successes
        conf["on_delivery"] = self._on_report
        conf["error_cb"] = self._on_client_error
        try:
            self._producer = Producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            if self._spool is not None:
                self._spool.close()
            if isinstance(exc, KafkaException):
                raise KafkaError(f"cannot create a Kafka producer: {kafka_reason(exc)}") from exc
            raise KafkaError(f"invalid producer configuration: {exc}") from exc
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_loop, args=(poll_interval_s,), name="usage-producer-poll", daemon=True
        )
        self._poller.start()
        self._drain_stop = threading.Event()
        self._drainer: threading.Thread | None = None
        if self._spool is not None:
            from spendstream import metrics

            metrics.watch_spool(self._spool)
            self._drainer = threading.Thread(
                target=self._drain_loop, name="usage-producer-spool", daemon=True
            )
            self._drainer.start()

    # -- delivery reports -------------------------------------------------------------------

    def _on_report(self, err: Any, msg: Any) -> None:
        if err is None:
            with self._lock:
                self._reported_ok += 1
        else:
            with self._lock:
                self._failed += 1
                self._last_error = err.str()
                failed = self._failed
            if failed == 1 or failed % 1000 == 0:
                log.warning("usage event not delivered (%d so far): %s", failed, err.str())
        if self._on_delivery is not None:
            try:
                self._on_delivery(_report(err, msg))
            except Exception:  # a listener's bug must not stop delivery reporting
                log.exception("on_delivery callback raised")

    def _on_client_error(self, err: Any) -> None:
        with self._lock:
            self._last_error = err.str()
        if err.fatal():
            log.error("fatal Kafka producer error: %s", err.str())
        else:
            log.warning("Kafka producer: %s", err.str())

    def _poll_loop(self, interval: float) -> None:
        poll = self._producer.poll
        while not self._stop.is_set():
            poll(interval)

    # -- the spool --------------------------------------------------------------------------

    @property
    def spool(self) -> DiskSpool | None:
        """The on-disk spool, when this producer has one."""
        return self._spool

    def spool_stats(self) -> SpoolStats | None:
        """Depth (records, bytes) and rejected/blocked counts of the spool, if any."""
        return None if self._spool is None else self._spool.stats()

    def _drain_loop(self) -> None:
        """Hand spooled records to librdkafka in spool order (one thread: order is kept).

        The thread outlives any error of one pass: a dead drain would leave every later event
        on disk while sends kept succeeding. An unexpected error is logged, the pass is tried
        again after a pause, and the record it held is kept.
        """
        held: SpoolRecord | None = None
        failures = 0
        while not self._drain_stop.is_set():
            try:
                held = self._drain_pass(held)
                failures = 0
            except Exception as exc:
                if isinstance(exc, _HeldRecord):
                    held = exc.record
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.exception("spool drain pass failed (%d in a row); retrying", failures)
                self._drain_stop.wait(min(0.05 * 2 ** min(failures, 7), 5.0))

    def _drain_pass(self, held: SpoolRecord | None) -> SpoolRecord | None:
        """One step of :meth:`_drain_loop`: hand over ``held`` or the next spooled record.

        Returns the record to try again (refused by a full librdkafka queue or a Kafka
        error). A record read here is never dropped: if handing it over raises anything
        else, it is raised inside :class:`_HeldRecord` so the loop keeps it.
        """
        spool = self._spool
        assert spool is not None
        if spool.fsync == "batch":
            spool.sync()
        if self._rewind:
            # Re-send from the oldest unacknowledged record, once every report of what is in
            # flight is in: sending earlier would overtake records still retrying.
            if self._spool_in_flight:
                time.sleep(0.01)
                return held
            spool.rewind()
            held, self._rewind = None, False
        rec = held or spool.read(timeout_s=0.05)
        if rec is None:
            return None
        report = functools.partial(self._on_spool_report, rec.seq, rec.size)
        with self._lock:
            self._spool_in_flight += 1
        try:
            self._producer.produce(rec.topic, rec.value, rec.key, on_delivery=report)
            return None
        except BufferError:
            with self._lock:
                self._spool_in_flight -= 1
                self._queue_full_waits += 1
            self._drain_stop.wait(0.01)  # the broker is slow or away: the spool holds it
            return rec
        except KafkaException as exc:
            with self._lock:
                self._spool_in_flight -= 1
                self._last_error = kafka_reason(exc)
            log.warning("cannot hand a spooled event to Kafka (%s); retrying", exc)
            self._drain_stop.wait(0.5)
            return rec
        except Exception as exc:
            with self._lock:
                self._spool_in_flight -= 1
            raise _HeldRecord(rec) from exc

    def _on_spool_report(self, seq: int, size: int, err: Any, msg: Any) -> None:
        spool = self._spool
        assert spool is not None
        with self._lock:
            self._spool_in_flight -= 1
        if err is None:
            spool.ack(seq, size)
        elif self._closing and err.code() in (
            RdKafkaError._PURGE_QUEUE,
            RdKafkaError._PURGE_INFLIGHT,
        ):
            return  # purged at close: it stays spooled for the next producer
        elif err.retriable() and not err.fatal():
            with self._lock:
                self._last_error = err.str()
            log.warning("spooled event %d not delivered yet (%s); will resend", seq, err.str())
            self._rewind = True
            return
        else:
            # Permanent (the broker refuses it for good): it would block the spool forever.
            spool.ack(seq, size)
        self._on_report(err, msg)
        with self._lock:
            waiter = self._waiters.pop(seq, None)
        if waiter is not None:
            waiter(_report(err, msg))

    def _spool_send(
        self,
        key: str | bytes,
        value: bytes,
        timeout_s: float | None,
        waiter: Callable[[DeliveryReport], None] | None = None,
    ) -> int:
        """Append to the spool (raising ``SpoolFullError`` per policy); return the seq."""
        spool = self._spool
        assert spool is not None

        def attach(seq: int) -> None:
            if waiter is not None:
                with self._lock:
                    self._waiters[seq] = waiter

        seq = spool.append(self.topic, key, value, timeout_s, on_seq=attach)
        with self._lock:
            self._sent += 1
        return seq

    # -- producing --------------------------------------------------------------------------

    def send(self, event: UsageEvent | dict[str, Any]) -> None:
        """Validate ``event`` (a :class:`UsageEvent` or its JSON dict) and queue it.

        Raises :class:`InvalidEventError` for an event that breaks the contract (nothing is
        sent, an event over the size limit included), :class:`BackpressureError` if the
        local queue stays full (with a spool: :class:`SpoolFullError` when the spool or its
        disk is full and the policy does not wait), and :class:`DeliveryError` if the client
        refuses the message, the spool's disk fails (:class:`SpoolIOError`) or the producer
        is closed.
        """
        self.send_raw(*encode_for_send(event))

    def send_raw(self, key: str | bytes, value: bytes) -> None:
        """Queue an already encoded message with ``key`` (the user id), unvalidated."""
        if self._closed:
            raise DeliveryError(f"cannot send to {self.topic}: the producer is closed")
        if self._spool is not None:
            self._spool_send(key, value, self._queue_full_timeout_s)
            return
        try:
            self._producer.produce(self.topic, value, key)
        except BufferError:
            self._produce_when_room(key, value, None)
        except KafkaException as exc:
            raise DeliveryError(f"cannot produce to {self.topic}: {kafka_reason(exc)}") from exc
        with self._lock:
            self._sent += 1

    def _try_produce(
        self, key: str | bytes, value: bytes, on_delivery: Callable[[Any, Any], None] | None
    ) -> bool:
        """Produce once; False if the local queue is full. Counts the message when queued."""
        try:
            if on_delivery is None:
                self._producer.produce(self.topic, value, key)
            else:
                self._producer.produce(self.topic, value, key, on_delivery=on_delivery)
        except BufferError:
            with self._lock:
                self._queue_full_waits += 1
            return False
        except KafkaException as exc:
            raise DeliveryError(f"cannot produce to {self.topic}: {kafka_reason(exc)}") from exc
        with self._lock:
            self._sent += 1
        return True

    def _produce_when_room(
        self, key: str | bytes, value: bytes, on_delivery: Callable[[Any, Any], None] | None
    ) -> None:
        with self._lock:
            self._queue_full_waits += 1
        deadline = (
            None
            if self._queue_full_timeout_s is None
            else time.monotonic() + self._queue_full_timeout_s
        )
        while True:
            # Serving reports frees queue slots; it also waits a little for the broker.
            self._producer.poll(0.05)
            try:
                if on_delivery is None:
                    self._producer.produce(self.topic, value, key)
                else:
                    self._producer.produce(self.topic, value, key, on_delivery=on_delivery)
                return
            except BufferError:
                if deadline is not None and time.monotonic() > deadline:
                    raise BackpressureError(
                        f"local producer queue for {self.topic} still full after "
                        f"{self._queue_full_timeout_s}s ({len(self._producer)} messages waiting)",
                        retry_after=1.0,
                    ) from None
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {self.topic}: {kafka_reason(exc)}") from exc

    # -- lifecycle --------------------------------------------------------------------------

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every queued message is delivered or failed; return how many remain.

        With a spool: until every spooled event is acknowledged (remaining ones stay spooled).
        """
        if self._spool is not None:
            self._spool.wait_empty(timeout_s)
            return len(self._spool)
        if self._closed:
            return 0
        return int(self._producer.flush(timeout_s))

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery reports now (the background thread does this anyway)."""
        return 0 if self._closed else int(self._producer.poll(timeout_s))

    def stats(self) -> ProducerStats:
        """A consistent snapshot of the counters.

        With a spool ``in_flight`` is the spool's depth, and ``delivered`` also counts events
        replayed from an earlier run's spool.
        """
        if self._spool is not None:
            in_flight = self._spool.stats().records
        else:
            in_flight = 0 if self._closed else len(self._producer)
        with self._lock:
            sent, failed, ok = self._sent, self._failed, self._reported_ok
            waits, last = self._queue_full_waits, self._last_error
        delivered = ok if self._report_successes else max(0, sent - failed - in_flight)
        return ProducerStats(sent, delivered, failed, in_flight, waits, last)

    def close(self, timeout_s: float = 30.0) -> ProducerStats:
        """Flush, stop the poll thread, close the Kafka client and return the final counters.

        Later sends raise :class:`DeliveryError`; closing again returns the same counters.

        Raises :class:`DeliveryError` if messages are still undelivered after ``timeout_s``
        (they are counted as failed) or if any message failed during the producer's life.
        """
        if self._closed:
            return self.stats()
        if self._spool is not None:
            return self._close_spooled(timeout_s)
        remaining = self.flush(timeout_s)
        self._stop.set()
        self._poller.join()
        self._closed = True
        if remaining:
            with self._lock:
                self._failed += remaining
                self._last_error = f"{remaining} messages still queued at close"
        else:
            self._release()
        final = self.stats()
        if final.failed:
            raise DeliveryError(
                f"{final.failed} of {final.sent} usage events were not delivered to "
                f"{self.topic} (last error: {final.last_error})"
            )
        return final

    def _release(self) -> None:
        # The poll thread and the client's callbacks refer back to this object, so without
        # this the client's threads and broker connections would live on until the cyclic
        # garbage collector finds it. Called with nothing left to deliver: closing flushes.
        try:
            self._producer.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("closing the Kafka producer: %s", exc)

    def _close_spooled(self, timeout_s: float) -> ProducerStats:
        spool = self._spool
        assert spool is not None
        remaining = self.flush(timeout_s)
        self._drain_stop.set()
        if self._drainer is not None:
            self._drainer.join()
        self._closing = True
        if remaining:
            # What librdkafka still holds is in the spool too: drop the memory copy (a
            # message the broker did take is replayed and deduplicated by event_id).
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.poll(0)
        self._stop.set()
        self._poller.join()
        self._closed = True
        self._release()
        spool.close()
        if remaining:
            log.warning(
                "%d usage events stay in the spool %s; the next producer on it sends them",
                remaining,
                spool.path,
            )
        final = self.stats()
        if final.failed:
            raise DeliveryError(
                f"{final.failed} of {final.sent} usage events were refused by Kafka for good "
                f"(last error: {final.last_error})"
            )
        return final

    def __enter__(self) -> UsageProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except DeliveryError:
            log.exception("while closing the producer after an error")

    def __len__(self) -> int:
        """Messages queued or in flight (with a spool: not yet acknowledged)."""
        if self._spool is not None:
            return len(self._spool)
        return 0 if self._closed else len(self._producer)


def _open_spool(settings: Settings | None, spool: bool | Path | None) -> DiskSpool | None:
    """The spool ``spool`` asks for (``None``: as the settings say)."""
    if spool is False:
        return None
    resolved = settings if settings is not None else Settings()
    p = resolved.producer
    if spool is None and not p.spool_enabled:
        return None
    path = spool if isinstance(spool, Path) else p.spool_dir or resolved.state_dir / "spool"
    return DiskSpool(path, max_bytes=p.spool_max_bytes, full_policy=p.full_policy, fsync=p.fsync)
