"""The input topic's messages, handed from faust's fetch loop to the worker in whole batches.

faust delivers every fetched message on its own: a lock and two flow-control awaits in the
conductor, an Event with its key and value deserialized, a put on the agent's queue, a step of
the stream iterator, a step of ``take_events`` and an ack. In the faust-ceiling benchmark that
path bounded a faust agent that does nothing at about 17k events/s on the development machine.

:class:`InputLane` replaces it for the worker's input topic only.
:func:`stream_processors.faust_patches.use_lane` makes a
consumer's fetch loop hand the input topic's messages straight to the lane (one list append),
and the agent takes them in batches with :meth:`InputLane.take`: whatever arrived while the
previous batch was processed goes at once (up to the batch size); on an idle lane, the first
message is followed by up to ``within`` seconds for a full batch, as with ``take_events``, unless
an *urgent* message arrives (an admission request, whose gateway waits for the answer): the
batch then goes at once. Every
other topic (changelogs during recovery, for example) still goes through faust's conductor.

The hand-over is per fetch, not per message: ``use_lane`` wraps the consumer's
``_wait_next_records`` (which returns the records aiokafka fetched, per partition) so that the
input topic's records go to the lane as whole lists, straight from the fetch, before faust's
``getmany`` makes a ``Message`` of each and its fetch loop delivers each through two
coroutines. Those per-message steps were about 12 % of a loaded worker's event loop (a py-spy
profile, see BENCHMARKS.md). The lane holds aiokafka's records then, which have the same
``topic``, ``partition``, ``offset``, ``key`` and ``value`` as faust's messages.

What faust's stream gave the worker for free is kept explicitly:

* backpressure: :meth:`InputLane.put_many` waits while ``max_buffered`` messages are waiting,
  and gives up (dropping the records, which are read again from the committed offsets) when
  the lane is cleared or the consumer's flow stops meanwhile, as faust abandons a blocked
  delivery when a rebalance suspends the flow;
* faust's checks per fetched record: partitions that are not active are skipped, records
  below the read offset (fetched before a seek) are dropped, a fetch that outlived a
  rebalance (the consumer generation changed) delivers nothing more, and the read offset
  follows what was handed over;
* a rebalance drops what was fetched and not taken (:meth:`InputLane.clear`, as faust clears its
  stream queues), and waits for the batch in progress (:attr:`InputLane.busy`), as faust waits
  for in-flight events to be acked;
* the input topic is declared with ``acks=False``: faust neither tracks nor commits its offsets.
  The worker commits them itself once a batch's outputs and state are durable (as it already
  did).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

__all__ = ["InputLane"]


class InputLane:
    """A bounded buffer of fetched messages, taken in batches.

    Single consumer (the agent), single producer (the fetch loop), one event loop.
    """

    def __init__(
        self, topic: str, *, max_buffered: int, urgent: Callable[[Any], bool] | None = None
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.topic = topic
        self.max_buffered = max_buffered
        self._urgent = urgent
        """A message someone waits for (an admission request): while the taker waits for a
        fuller batch, one such message ends the wait at once."""
        self._hurry = False
        self.busy = asyncio.Lock()
        """Held by the agent while it processes a batch; a rebalance waits for it."""
        self._items: list[Any] = []
        self._want = 1  # put() wakes the taker once this many messages are waiting
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.dropped = 0
        """Messages fetched but dropped by :meth:`clear` (a rebalance), in total."""
        self.generation = 0
        """How many times the lane was cleared; a batch taken before a clear is stale."""

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, message: Any) -> None:
        """Append one message; wait while the lane is full."""
        items = self._items
        while len(items) >= self.max_buffered:
            self._space.clear()
            await self._space.wait()
        items.append(message)
        if len(items) >= self._want or self._is_urgent((message,)):
            self._wake.set()

    async def put_many(self, messages: list[Any], abandon: Callable[[], bool]) -> bool:
        """Append ``messages`` (in order) once the lane has room; False if they were dropped.

        Waits while ``max_buffered`` messages are waiting (the lane may then go over the bound
        by one fetch). Gives up, appending nothing, when :meth:`clear` ran during the wait or
        ``abandon()`` became true (the consumer's flow stopped for a rebalance).
        """
        items = self._items
        generation = self.generation
        while len(items) >= self.max_buffered:
            self._space.clear()
            await self._space.wait()
            if self.generation != generation or abandon():
                return False
        items.extend(messages)
        if len(items) >= self._want or self._is_urgent(messages):
            self._wake.set()
        return True

    def _is_urgent(self, messages: Any) -> bool:
        """Whether the taker, waiting for a full batch, should stop waiting for these.

        Checked only while it waits (``_want > 1``): under load every batch goes at once
        anyway, and the check then costs nothing per message.
        """
        if self._urgent is None or self._want <= 1:
            return False
        if any(self._urgent(m) for m in messages):
            self._hurry = True
        return self._hurry

    async def take(self, size: int, within: float) -> tuple[list[Any], int]:
        """The next batch, at most ``size`` messages in fetch order, and the lane's generation.

        Messages already waiting are returned at once: they waited while the previous batch
        was processed, and waiting ``within`` more would only add to their latency. On an empty
        lane, waits for the first message without limit, then at most ``within`` seconds for
        ``size`` messages in all. The batch is stale if :attr:`generation` has changed by the
        time the caller holds :attr:`busy` (a rebalance cleared the lane in between).
        """
        items = self._items
        urgent = self._urgent
        while not items:  # again if a clear() emptied the lane during the waits
            await self._wait_for(1, None)
            if len(items) < size and not (urgent is not None and any(map(urgent, items))):
                await self._wait_for(size, within)
        batch = items[:size]
        del items[:size]
        if len(items) < self.max_buffered:
            self._space.set()
        return batch, self.generation

    async def _wait_for(self, count: int, timeout: float | None) -> None:
        self._want = count
        try:
            # asyncio.timeout(None) never expires; a timeout ends the wait, not the take.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while len(self._items) < count and not self._hurry:
                        self._wake.clear()
                        await self._wake.wait()
        finally:
            self._want = 1
            self._hurry = False

    def clear(self) -> int:
        """Drop every waiting message (their partitions are being revoked); how many."""
        n = len(self._items)
        self._items.clear()
        self.dropped += n
        self.generation += 1
        self._space.set()
        return n
