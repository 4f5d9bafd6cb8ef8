"""The batching ClickHouse sink: Kafka (confluent-kafka) -> SinkBuffer -> Store.

At-least-once into idempotent tables: a batch is inserted, THEN its offsets are committed
(synchronously). A crash between the two re-reads the batch; ReplacingMergeTree keys and the
deterministic insert-dedup tokens make the replay count once. A store failure pauses the
partitions and retries the same batch with exponential backoff: nothing is dropped, nothing is
committed before it is stored.

A batch the store refuses for what is *in* it (a value it cannot take, more partitions than one
insert may touch) is not retried as it is, which would stall the sink for good: it is split in
halves, each inserted alone, down to the rows the store refuses on their own, which become dead
letters with the store's reason (:func:`insert_isolating`). A store that refuses everything
(down, full, unreachable) is not blamed on rows: that batch is retried with back-off.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sinks._buffer import (
    SINK_TABLES,
    Batch,
    Drained,
    SinkBuffer,
    TableSpec,
    dead_letters_batch,
    warm_up,
)
from sinks._store import Store
from spendstream import metrics
from spendstream.errors import BackpressureError, KafkaError, StoreError
from spendstream.settings import Settings

log = logging.getLogger("spendstream.sink")

# ClickHouse error codes that name a value or shape of the inserted data, never the server's
# state: CANNOT_PARSE_TEXT, CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE,
# CANNOT_PARSE_DATETIME, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE,
# CANNOT_PARSE_NUMBER, INCORRECT_DATA, TOO_LARGE_STRING_SIZE,
# VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, DECIMAL_OVERFLOW, VIOLATED_CONSTRAINT.
_ROW_ERROR_CODES = frozenset({6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 407, 469})
_CODE = re.compile(r"Code: (\d+)")
# TOO_MANY_PARTS (252) is also the transient "merges are slower than inserts"; only this
# message is about the batch: it spans more partitions (months) than one insert may.
_TOO_MANY_PARTITIONS = "partitions for single INSERT block"


def blames_rows(exc: StoreError) -> bool:
    """Whether the store refused an insert for its data (splitting it can help)."""
    text = str(exc)
    if _TOO_MANY_PARTITIONS in text:
        return True
    match = _CODE.search(text)
    return match is not None and int(match.group(1)) in _ROW_ERROR_CODES


def insert_isolating(store: Store, batch: Batch) -> list[tuple[int, str]]:
    """Insert ``batch``; (row index, reason) of the rows the store refuses on their own.

    The whole batch goes first (the common case: one insert). Refused for its data, it is
    split in halves, each with a token derived from the batch's and the rows it covers (a
    retry after a crash repeats the same inserts, which the store then drops), and so on down
    to single rows. Raises :class:`StoreError` when the store refuses something while nothing
    shows it works (the first insert failing for a reason that is not the data's): the
    caller retries the whole batch later.
    """
    bad: list[tuple[int, str]] = []
    worked = False
    todo = [(0, batch.rows)]
    while todo:
        start, end = todo.pop()
        whole = (start, end) == (0, batch.rows)
        token = batch.dedup_token if whole else f"{batch.dedup_token}-{start}-{end}"
        try:
            store.insert(batch.table, batch.data.slice(start, end - start), token)
            worked = True
            continue
        except StoreError as exc:
            if not worked and not blames_rows(exc):
                raise
            if end - start == 1:
                bad.append((start, str(exc)))
                continue
            log.warning(
                "insert of %d rows into %s refused (%s); splitting it",
                end - start,
                batch.table,
                exc,
            )
        mid = (start + end) // 2
        todo += [(mid, end), (start, mid)]
    return sorted(bad)


@dataclass
class SinkCounters:
    """What the sink has done since it started."""

    rows_in: int = 0
    duplicates: int = 0
    rows_inserted: int = 0
    dead_lettered: int = 0
    batches: int = 0
    retries: int = 0
    commits: int = 0
    insert_seconds: float = 0.0
    last_insert_ms: float = 0.0
    max_insert_ms: float = 0.0
    per_table: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for logs and ``--json`` output."""
        return asdict(self)


def sink_topics(settings: Settings) -> dict[str, TableSpec]:
    """Topic name -> table spec, from the :data:`~sinks._buffer.SINK_TABLES` registry."""
    return {getattr(settings.topics, role): spec for role, spec in SINK_TABLES.items()}


class Sink:
    """A consumer-group member that stores our topics in ClickHouse in batches."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        topics: Mapping[str, TableSpec] | None = None,
        consumer_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        from confluent_kafka import Consumer

        self.settings = settings
        self.store = store
        self.topics = dict(topics or sink_topics(settings))
        self.counters = SinkCounters()
        metrics.watch_sink(self.counters)  # read at scrape time: no cost per record
        self.last_poll = time.monotonic()
        self.store_failing = False
        cfg = settings.sink
        warm_up()
        self.buffer = SinkBuffer(
            self.topics,
            batch_rows=cfg.batch_rows,
            batch_age_s=cfg.batch_age_s,
            max_buffer_rows=cfg.max_buffer_rows,
        )
        conf: dict[str, Any] = {
            **settings.kafka.confluent_config(),
            "group.id": cfg.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "client.id": f"{settings.kafka.client_id}-sink",
        }
        conf.update(consumer_overrides or {})
        try:
            self._consumer = Consumer(conf)
            self._consumer.subscribe(
                list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
        except Exception as exc:
            raise KafkaError(f"cannot start the sink consumer: {exc}") from exc
        self._assigned: set[tuple[str, int]] = set()
        self._admin: Any = None  # made by the first lag() (the demo and tests only)
        self._closed = False
        self._stop = threading.Event()

    # -- the loop --------------------------------------------------------------------------

    def poll(self, timeout_s: float = 0.2) -> int:
        """Read what is there (up to a batch), buffer it, flush if due; return records read."""
        from confluent_kafka import KafkaError as CKafkaError

        self.last_poll = time.monotonic()
        try:
            messages = self._consumer.consume(
                num_messages=min(self.settings.sink.batch_rows, 5000), timeout=timeout_s
            )
        except Exception as exc:
            raise KafkaError(f"sink consume failed: {exc}") from exc
        read = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != CKafkaError._PARTITION_EOF:
                    log.warning("sink consumer error: %s", err)
                continue
            self._accept(msg)
            read += 1
        if self.buffer.ready():
            self.flush()
        return read

    def _accept(self, msg: Any) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        while True:
            try:
                added = self.buffer.add(topic, partition, offset, msg.value(), msg.key())
                break
            except BackpressureError:
                self.flush()  # full: store what we have, then take this record
        if added:
            self.counters.rows_in += 1
        else:
            self.counters.duplicates += 1

    def flush(self, *, commit: bool = True) -> int:
        """Insert everything buffered (retrying until stored or stopped), then commit.

        ``commit=False`` exists for tests that simulate a crash between insert and commit.
        Returns the rows inserted.
        """
        if len(self.buffer) == 0:
            return 0
        drained = self.buffer.drain()
        if not self._store_with_retry(drained):
            return 0
        if commit:
            self._commit(drained)
        return drained.rows

    def _store_with_retry(self, drained: Drained) -> bool:
        cfg = self.settings.sink
        delay = cfg.retry_initial_s
        paused = False
        try:
            for batch in drained.batches:
                while True:
                    started = time.perf_counter()
                    try:
                        refused = insert_isolating(self.store, batch)
                        if refused:
                            self._dead_letter_refused(batch, refused)
                    except StoreError as exc:
                        self.store_failing = True
                        self.counters.retries += 1
                        log.warning(
                            "insert into %s failed (%s); retrying in %.1fs", batch.table, exc, delay
                        )
                        if not paused:
                            self._pause()
                            paused = True
                        if self._wait(delay):
                            # Stopping: the batch stays uncommitted and is re-read on restart.
                            return False
                        delay = min(delay * 2, cfg.retry_max_s)
                        continue
                    elapsed = time.perf_counter() - started
                    self.store_failing = False
                    metrics.observe_insert(batch.table, batch.rows, elapsed)
                    self.counters.insert_seconds += elapsed
                    self.counters.last_insert_ms = elapsed * 1000
                    self.counters.max_insert_ms = max(self.counters.max_insert_ms, elapsed * 1000)
                    self.counters.batches += 1
                    stored = batch.rows - len(refused)
                    self.counters.rows_inserted += stored
                    self.counters.dead_lettered += len(refused)
                    self.counters.per_table[batch.table] = (
                        self.counters.per_table.get(batch.table, 0) + stored
                    )
                    break
            self.counters.dead_lettered += drained.dead_lettered
            return True
        finally:
            if paused:
                self._resume()

    def _dead_letter_refused(self, batch: Batch, refused: list[tuple[int, str]]) -> None:
        """Store the rows the store refused as dead letters (raises StoreError to retry)."""
        if not batch.sources:
            # Dead letters themselves: nothing left to turn them into. Logged, never silent.
            log.error("the store refused %d dead letter(s): %s", len(refused), refused[:3])
            return
        log.error(
            "the store refused %d row(s) of %s; they go to the dead letters (first: %s)",
            len(refused),
            batch.table,
            refused[0][1],
        )
        letters = dead_letters_batch(
            [
                (batch.sources[i], f"{batch.table}: the store refused the row: {reason}")
                for i, reason in refused
            ],
            f"{batch.dedup_token}-refused",
        )
        self.store.insert(letters.table, letters.data, letters.dedup_token)

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` while keeping group membership; True when asked to stop."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return True
            # Partitions are paused, so this returns nothing; it serves callbacks and keeps
            # max.poll.interval.ms from expiring during a long store outage.
            for msg in self._consumer.consume(num_messages=1, timeout=0):
                if msg.error() is None:
                    self._rewind(msg)
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return self._stop.is_set()

    def _rewind(self, msg: Any) -> None:
        from confluent_kafka import TopicPartition

        # A prefetched message slipped through the pause: read it again after the resume.
        self._consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _commit(self, drained: Drained) -> None:
        from confluent_kafka import TopicPartition

        if not drained.offsets:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(drained.offsets.items())]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
            self.counters.commits += 1
        except Exception as exc:
            # Stored but not committed: the rows are re-read and deduplicated, never lost.
            log.warning("offset commit failed (%s); the batch will be re-read", exc)

    def _pause(self) -> None:
        from confluent_kafka import TopicPartition

        parts = [TopicPartition(t, p) for t, p in self._assigned]
        if parts:
            self._consumer.pause(parts)

    def _resume(self) -> None:
        from confluent_kafka import TopicPartition

        parts = [TopicPartition(t, p) for t, p in self._assigned]
        if parts:
            self._consumer.resume(parts)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        # Store and commit what we hold before another member takes the partitions.
        try:
            self.flush()
        except StoreError:
            self.buffer.forget(revoked)
        self._assigned.difference_update(revoked)

    # -- running ---------------------------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Consume and store until ``stop_event`` is set; then flush, commit and close."""
        stop = stop_event or self._stop
        self._stop = stop
        try:
            while not stop.is_set():
                self.poll(0.2)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread-safe)."""
        self._stop.set()

    def health(self, stall_s: float = 60.0) -> dict[str, Any]:
        """``{"ok": ..., "details": ...}`` for ``/health`` (thread-safe: reads fields only).

        Unhealthy while inserts fail (the batch is being retried), after the sink stopped, or
        when the consume loop has not run for ``stall_s`` seconds.
        """
        since_poll = time.monotonic() - self.last_poll
        ok = not self._closed and not self.store_failing and since_poll < stall_s
        return {
            "ok": ok,
            "details": {
                "store_failing": self.store_failing,
                "closed": self._closed,
                "seconds_since_poll": round(since_poll, 3),
                "buffered_rows": len(self.buffer),
                "assigned_partitions": len(self._assigned),
                **self.counters.as_dict(),
            },
        }

    def lag(self) -> dict[tuple[str, int], int]:
        """Committed-offset lag of every assigned partition (end offset - committed)."""
        from confluent_kafka import TopicPartition

        from spendstream.lag import admin_client, lag_of

        parts = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not parts:
            return {}
        try:
            if self._admin is None:
                self._admin = admin_client(self.settings.kafka.confluent_config())
            committed = self._consumer.committed(parts, timeout=10)
            return lag_of(self._admin, committed, 10.0)
        except Exception as exc:
            raise KafkaError(f"cannot read the sink's lag: {exc}") from exc

    def run_until_drained(self, timeout_s: float = 60.0, idle_s: float = 0.5) -> bool:
        """Poll and flush until every assigned partition has lag 0; False on timeout.

        For the demo and tests: waits for the assignment first, then drains. ``idle_s`` is how
        long the topics must stay drained before returning.
        """
        deadline = time.monotonic() + timeout_s
        drained_since: float | None = None
        while time.monotonic() < deadline:
            read = self.poll(0.2)
            if read == 0 and len(self.buffer):
                self.flush()
            if read or len(self.buffer) or not self._assigned:
                drained_since = None
                continue
            if all(v == 0 for v in self.lag().values()):
                drained_since = drained_since or time.monotonic()
                if time.monotonic() - drained_since >= idle_s:
                    return True
            else:
                drained_since = None
        return False

    def close(self) -> None:
        """Graceful stop: flush and commit what is buffered, leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            if len(self.buffer):
                self.flush()
        finally:
            self._admin = None  # the lag probe's client goes with its last reference
            try:
                self._consumer.close()
            except Exception as exc:
                log.warning("sink consumer close failed: %s", exc)

    def abandon(self) -> None:
        """Leave without flushing or committing (tests: a crash after an uncommitted insert)."""
        self._closed = True
        self._consumer.close()
