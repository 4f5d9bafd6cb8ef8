"""The asyncio face of :class:`UsageProducer`, for async gateways (FastAPI, aiohttp, ...)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from producers._producer import (
    DeliveryReport,
    ProducerStats,
    UsageProducer,
    _report,
    encode_for_send,
)
from schemas import UsageEvent
from spendstream.errors import BackpressureError, DeliveryError
from spendstream.settings import Settings

log = logging.getLogger(__name__)


def _settle(fut: asyncio.Future[DeliveryReport], report: DeliveryReport) -> None:
    if fut.done():  # the awaiting task was cancelled
        return
    if report.error is None:
        fut.set_result(report)
    else:
        fut.set_exception(
            DeliveryError(f"usage event not delivered to {report.topic}: {report.error}")
        )


class AsyncUsageProducer:
    """Send usage events from coroutines without blocking the event loop.

    ``await producer.send(event)`` returns the :class:`DeliveryReport` once the broker has
    acknowledged the event (``acks=all``) or raises :class:`DeliveryError`;
    ``await producer.send(event, wait=False)`` returns as soon as the event is queued
    (fire and forget: failures still reach the counters, the log and ``on_delivery``).
    Delivery reports arrive on librdkafka's poll thread and are handed to the loop with
    ``loop.call_soon_threadsafe``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        topic: str | None = None,
        queue_full_timeout_s: float | None = 60.0,
        spool: bool | Path | None = None,
    ) -> None:
        """Same arguments as :class:`UsageProducer`; create it inside or outside a loop.

        With a spool, ``await send(event, wait=False)`` returns once the event is on disk,
        and ``wait=True`` once the broker acknowledged it.
        """
        self._sync = UsageProducer(
            settings,
            config=config,
            topic=topic,
            queue_full_timeout_s=queue_full_timeout_s,
            report_successes=True,
            poll_interval_s=0.05,
            spool=spool,
        )
        self._queue_full_timeout_s = queue_full_timeout_s

    @property
    def topic(self) -> str:
        """The topic events go to."""
        return self._sync.topic

    async def send(
        self, event: UsageEvent | dict[str, Any], *, wait: bool = True
    ) -> DeliveryReport | None:
        """Validate and produce ``event``; with ``wait`` return once it is delivered."""
        key, value = encode_for_send(event)
        return await self.send_raw(key, value, wait=wait)

    async def send_raw(
        self, key: str | bytes, value: bytes, *, wait: bool = True
    ) -> DeliveryReport | None:
        """Produce pre-encoded ``value`` under ``key``; with ``wait`` return once delivered."""
        loop = asyncio.get_running_loop()
        if self._sync.spool is not None:
            return await self._send_spooled(loop, key, value, wait)
        fut: asyncio.Future[DeliveryReport] | None = None
        callback = None
        if wait:
            fut = loop.create_future()
            sync = self._sync
            settle = functools.partial(_settle, fut)

            def callback(err: Any, msg: Any) -> None:
                sync._on_report(err, msg)
                loop.call_soon_threadsafe(settle, _report(err, msg))

        deadline = (
            None if self._queue_full_timeout_s is None else loop.time() + self._queue_full_timeout_s
        )
        while not self._sync._try_produce(key, value, callback):
            # The local queue is full: yield to the loop instead of blocking it.
            if deadline is not None and loop.time() > deadline:
                raise BackpressureError(
                    f"local producer queue for {self.topic} still full after "
                    f"{self._queue_full_timeout_s}s",
                    retry_after=1.0,
                )
            await asyncio.sleep(0.005)
        if fut is None:
            return None
        return await fut

    async def _send_spooled(
        self, loop: asyncio.AbstractEventLoop, key: str | bytes, value: bytes, wait: bool
    ) -> DeliveryReport | None:
        spool = self._sync.spool
        assert spool is not None
        fut: asyncio.Future[DeliveryReport] | None = loop.create_future() if wait else None
        waiter = None
        if fut is not None:
            settle = functools.partial(_settle, fut)

            def waiter(report: DeliveryReport) -> None:
                loop.call_soon_threadsafe(settle, report)

        send = self._sync._spool_send
        timeout = self._queue_full_timeout_s
        if spool.full_policy == "reject" or spool.has_room(len(value) + 1024):
            # Room now (or the reject policy): appending does not wait, stay on the loop.
            send(key, value, timeout, waiter)
        else:
            # A full spool under the block policy: wait for room off the event loop.
            await asyncio.to_thread(send, key, value, timeout, waiter)
        return None if fut is None else await fut

    async def flush(self, timeout_s: float = 30.0) -> int:
        """Wait (in a worker thread) until the queue is empty; return how many remain."""
        return await asyncio.to_thread(self._sync.flush, timeout_s)

    def stats(self) -> ProducerStats:
        """A snapshot of the counters."""
        return self._sync.stats()

    async def close(self, timeout_s: float = 30.0) -> ProducerStats:
        """Flush and stop; raise :class:`DeliveryError` if anything was not delivered."""
        return await asyncio.to_thread(self._sync.close, timeout_s)

    async def __aenter__(self) -> AsyncUsageProducer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            try:
                await self.close()
            except DeliveryError:
                log.exception("while closing the producer after an error")
