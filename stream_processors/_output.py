"""Where the worker's outputs and changelog writes go: librdkafka, or faust under test."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust

from spendstream.settings import Settings

log = logging.getLogger(__name__)


class OutputProducer:
    """The worker's outputs and changelog writes through librdkafka (confluent-kafka).

    faust's own producer moves every message through a Python future, a buffer task and
    aiokafka's accumulator; at several messages per event that was most of a worker's time.
    Here a message is one ``produce()`` call into librdkafka, and :meth:`flush` waits (in a
    thread, off the event loop) until the broker acknowledged everything. A message that
    cannot be delivered stops the process without committing: the replay after a restart is
    exact by design, a commit past a lost message would not be.
    """

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(
            {
                **settings.kafka.confluent_config(),
                "client.id": f"{settings.kafka.client_id}-worker",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "batch.size": 1_000_000,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 1_000_000,
                # Delivery reports reach Python for failures only: the binding skips the
                # callback (and the Message it would build) for each of the several
                # messages per event that were delivered, and still frees their state.
                "delivery.report.only.error": True,
            }
        )
        self._failures: list[str] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        """Queue one message for ``partition`` of ``topic``."""
        while True:
            try:
                self._producer.produce(
                    topic, value, key, partition=partition, on_delivery=self._delivered
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    async def flush(self) -> None:
        """Wait until every queued message is acknowledged; exit the process if one failed."""
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self._producer.flush, 120.0)
        if left or self._failures:
            log.critical(
                "could not deliver %d message(s) (%s); stopping without committing offsets",
                left,
                "; ".join(self._failures[:5]),
            )
            os._exit(70)

    def close(self) -> None:
        """Deliver what is queued (on a clean stop)."""
        self._producer.flush(30.0)


class FaustSends:
    """``produce()`` through faust's own producer (used where no librdkafka producer runs)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        """Queue one message through faust."""
        self._app.topic(topic, key_serializer="raw", value_serializer="raw").send_soon(
            key=key, value=value, partition=partition
        )
