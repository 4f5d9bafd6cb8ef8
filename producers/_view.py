"""A compacted topic held in memory: read from the start, then followed live.

Used by gateways (the enforcement state, :class:`~producers.CapGuard`) and by the stream workers
(the subscriptions). A background thread runs a group-less confluent-kafka consumer over every
partition, so each process sees every key without a network call per lookup.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from spendstream.errors import KafkaError
from spendstream.kafka_fetch import fetch_ready

V = TypeVar("V")
log = logging.getLogger(__name__)


class CompactedTopicView(Generic[V]):
    """Latest value per key of a compacted topic, kept current by a background thread.

    ``decode`` turns a message value into ``V``; a value it rejects (raises ``ValueError``) is
    counted in :attr:`rejected` and skipped, a tombstone (``None``) removes the key.
    ``on_update`` is called with the key after each change, from the view's thread.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str,
        decode: Callable[[bytes], V],
        *,
        poll_interval_s: float = 0.2,
        on_update: Callable[[str], None] | None = None,
    ) -> None:
        self._config = dict(config)
        self._on_update = on_update
        self.topic = topic
        self._decode = decode
        self._poll_interval_s = poll_interval_s
        self._data: dict[str, V] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.rejected = 0
        self.last_update_monotonic: float | None = None
        self.last_poll_monotonic: float | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, *, wait_s: float | None = 30.0) -> CompactedTopicView[V]:
        """Start following; with ``wait_s``, block until the topic's current end was read."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"view:{self.topic}", daemon=True
            )
            self._thread.start()
        if wait_s is not None and not self.wait_caught_up(wait_s):
            raise KafkaError(
                f"could not read topic {self.topic!r} to its end within {wait_s:.0f} s"
                + (f": {self._error}" if self._error else "")
            )
        return self

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once everything present at start-up has been read."""
        return self._caught_up.wait(timeout_s)

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> CompactedTopicView[V]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ------------------------------------------------------------------------------
    def get(self, key: str) -> V | None:
        """The latest value of ``key`` (a plain dict read: no lock, no I/O)."""
        return self._data.get(key)

    def snapshot(self) -> dict[str, V]:
        """A copy of every key and value."""
        with self._lock:
            return dict(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def staleness_s(self) -> float | None:
        """Seconds since the view last heard from the broker (``None`` before the first poll)."""
        if self.last_poll_monotonic is None:
            return None
        return time.monotonic() - self.last_poll_monotonic

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        from confluent_kafka import KafkaException as CKafkaException

        conf = {
            **self._config,
            "group.id": f"spendstream-view-{id(self)}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
        # The start is retried until it works or the view is closed: a broker that is not up
        # yet (or a topic not created yet) must not leave the view empty for good, with
        # nobody reading the topic while the process looks fine.
        attempt = 0
        while True:
            consumer = None
            try:
                consumer = Consumer(conf)
                meta = consumer.list_topics(self.topic, timeout=10)
                tmeta = meta.topics.get(self.topic)
                if tmeta is None or tmeta.error is not None:
                    raise KafkaError(f"topic {self.topic!r} does not exist")
                parts = sorted(tmeta.partitions)
                consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
                self._error = None
                break
            except (CKafkaException, KafkaError) as exc:
                self._error = exc
                if consumer is not None:
                    consumer.close()
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.error("view of %s cannot start (%s); retrying", self.topic, exc)
                if self._stop.wait(min(0.5 * attempt, 5.0)):
                    return
        pending_eof = set(parts)
        try:
            while not self._stop.is_set():
                batch = fetch_ready(consumer, self._poll_interval_s)
                self.last_poll_monotonic = time.monotonic()
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        if err.code() == err._PARTITION_EOF:
                            pending_eof.discard(msg.partition())
                            if not pending_eof:
                                self._caught_up.set()
                        continue
                    self._apply(msg.key(), msg.value())
        finally:
            consumer.close()

    def _apply(self, raw_key: bytes | None, raw_value: bytes | None) -> None:
        if raw_key is None:
            self.rejected += 1
            return
        key = raw_key.decode("utf-8", "replace")
        if raw_value is None:
            with self._lock:
                self._data.pop(key, None)
        else:
            try:
                value = self._decode(raw_value)
            except ValueError as exc:
                self.rejected += 1
                log.warning("skipping undecodable record %r on %s: %s", key, self.topic, exc)
                return
            with self._lock:
                self._data[key] = value
        self.last_update_monotonic = time.monotonic()
        if self._on_update is not None:
            self._on_update(key)
