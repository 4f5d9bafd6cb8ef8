"""Every place the worker reaches into faust, mode or aiokafka internals, in one module.

faust-streaming has no public hooks for what the worker needs, so a few internals are replaced
or read. Each is listed here with why (the measured reasons are in the functions' docstrings).
They were written against, and tested on, the faust-streaming versions in
:data:`TESTED_FAUST`; :func:`require_tested_faust` refuses any other at start-up, since an
internal that moved would otherwise fail silently (a patch that no longer applies) or late.

=======================================  ===================================================
What is touched                          Why
=======================================  ===================================================
``App._new_consumer``                    :func:`patch_consumers`: patch each consumer faust
                                         creates (no hook for it)
``Consumer.perform_seek``,               :func:`rewinding_seek`: never skip unread input of a
``_read_offset``, ``_committed_offset``  partition without a commit
``Consumer.wait_first``                  :func:`use_fast_handover`: one step instead of four
                                         futures per fetched message
``Consumer.callback``,                   :func:`use_lane`: the input topic's records go to the
``_wait_next_records``,                  :class:`~stream_processors._lane.InputLane` a fetch at
``_buffered_partitions``, ``flow_active``  once, with faust's per-record checks per partition
``ConsumerThread._create_worker_consumer``  :func:`use_fetch_wait`: aiokafka's fetch wait
aiokafka ``_fetch_max_wait_ms``          (faust fixes 1500 ms)
``Consumer._seek``                       :func:`use_thread_seek`: seek on the consumer's own
                                         thread, not beside its fetch
``Consumer._commit``                     :func:`commit_offsets`: the worker commits its own
                                         offsets after its state is durable
``Producer.flush``                       :func:`chain_producer_flush`: faust's commit waits for
                                         the worker's own producer too
``Monitor`` per-message hooks            :class:`LeanMonitor`: no bookkeeping nothing reads
=======================================  ===================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any

import faust
from faust.sensors import Monitor
from faust.types import TP
from mode.services import WaitResults

from spendstream.errors import ConfigError
from stream_processors._lane import InputLane

log = logging.getLogger(__name__)

TESTED_FAUST = ((0, 15), (0, 16))
"""faust-streaming versions these patches were tested on: from 0.15 up to (not including) 0.16
(pyproject pins the same range)."""


def require_tested_faust(version: str | None = None) -> None:
    """Refuse a faust-streaming version the patches here were not tested on (ConfigError)."""
    found = version or faust.__version__
    try:
        major_minor = tuple(int(part) for part in found.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    low, high = TESTED_FAUST
    if not low <= major_minor < high:
        raise ConfigError(
            f"faust-streaming {found} is installed; the worker patches faust internals tested "
            f"on {low[0]}.{low[1]}.x only (see stream_processors/faust_patches.py): install "
            f"faust-streaming>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        )


# -- consumers ---------------------------------------------------------------------------------


def patch_consumers(app: faust.App, patch: Callable[[Any], None]) -> None:
    """Apply ``patch`` to every consumer ``app`` creates (faust has no hook for it)."""
    new_consumer = app._new_consumer

    def _new_consumer() -> Any:
        consumer: Any = new_consumer()
        patch(consumer)
        return consumer

    setattr(app, "_new_consumer", _new_consumer)  # noqa: B010 (mypy: no method assignment)


def use_fetch_wait(consumer: Any, fetch_max_wait_ms: int) -> None:
    """Make the aiokafka consumer that faust's ``consumer`` creates wait at most this long.

    faust creates it with ``fetch_max_wait_ms=1500`` and no setting to change it. aiokafka sends
    one fetch request per broker at a time, for the assigned partitions that have no fetched
    records waiting; when every input partition still had records waiting, that request named
    only partitions that get no data (faust's leader-election topic), and the broker held it
    for the full 1.5 s while the input piled up. Under load this showed as 1.2-1.4 s with no
    input at all, early in every 10k events/s benchmark run (see BENCHMARKS.md).
    """
    thread = consumer._thread
    create = thread._create_worker_consumer

    def create_worker_consumer(*args: Any, **kwargs: Any) -> Any:
        aio = create(*args, **kwargs)
        aio._fetch_max_wait_ms = fetch_max_wait_ms  # read when the consumer starts
        return aio

    thread._create_worker_consumer = create_worker_consumer


def patch_worker_consumer(
    app: faust.App,
    topics: frozenset[str],
    processed: Mapping[Any, int],
    lane: InputLane | None,
    fetch_max_wait_ms: int,
) -> None:
    """Give ``app`` the worker's consumer: its seeks never skip unread input (see
    :func:`rewinding_seek`), and its fetch loop hands messages over through
    :func:`fast_wait_first`, and the input topic's to ``lane`` when there is one; its fetches
    wait at most ``fetch_max_wait_ms`` (see :func:`use_fetch_wait`).
    """

    def patch(consumer: Any) -> None:
        consumer.perform_seek = rewinding_seek(consumer, topics, processed)
        use_thread_seek(consumer)
        use_fast_handover(consumer)
        if lane is not None:
            use_lane(consumer, lane)
        use_fetch_wait(consumer, fetch_max_wait_ms)

    patch_consumers(app, patch)


def use_thread_seek(consumer: Any) -> None:
    """Make ``consumer``'s seeks run on its consumer thread, as its other aiokafka calls do.

    faust's threaded consumer seeks by calling aiokafka's ``seek`` from the caller's thread,
    while the consumer thread's event loop may be inside aiokafka's ``fetched_records`` for the
    same partition. Both delete the partition's fetched records, and the fetcher then fails with
    a ``KeyError`` on the one already gone: faust's fetcher crashes and the worker exits (it
    happened in 2 of 6 worker benchmark runs of 300,000 events in batches of 20,000, when
    the input gate sought two partitions back). Queued on the consumer thread, a seek happens
    between two of its steps instead.
    """
    thread = consumer._thread

    async def _seek(partition: TP, offset: int) -> None:
        await thread.call_thread(thread.seek, partition, offset)

    consumer._seek = _seek


def rewinding_seek(
    consumer: Any, topics: frozenset[str], processed: Mapping[Any, int]
) -> Callable[[], Any]:
    """faust's ``perform_seek``, which also rewinds input partitions that have no commit.

    faust drops records fetched while its flow is stopped (during a rebalance or table
    recovery) and then seeks every partition back to its committed offset. aiokafka seeks only
    partitions whose committed offset is above 0, so a partition of a new consumer group kept
    the fetch position past the dropped records; faust then counted them as a gap and
    committed beyond them. The two-worker scale-out test lost runs of 70 to 500 events this
    way under CPU load. Here such a partition is sought to the offset after the last record
    this worker processed from it (``processed``: partition -> next offset), or to its earliest
    offset when it processed none. Never further back: the stream may already be flowing
    while faust seeks, and a seek behind records that are queued for processing made faust
    skip the re-read ones. Anything read twice is deduplicated by the processor's state.
    """

    async def perform_seek() -> None:
        committed = await consumer.seek_to_committed()
        fresh = [tp for tp, offset in committed.items() if tp.topic in topics and not offset]
        if fresh:
            unread = [tp for tp in fresh if (tp.topic, tp.partition) not in processed]
            earliest = await consumer.earliest_offsets(*unread) if unread else {}
            for tp in fresh:
                target = processed.get((tp.topic, tp.partition), earliest.get(tp))
                if target is None:
                    continue
                # faust's seek (no wait for the position: the fetcher resets it lazily, as
                # after faust's own seeks; waiting stalled recovery for seconds under load).
                await consumer.seek(tp, target)
            log.info("sought %d input partition(s) without a committed offset", len(fresh))
        # As faust's own perform_seek: read and committed offsets follow the commits.
        consumer._read_offset.update(
            {
                tp: offset if offset is not None and offset >= 0 else None
                for tp, offset in committed.items()
                if tp not in fresh
            }
        )
        consumer._committed_offset.update(
            {
                TP(tp.topic, tp.partition): offset or None
                for tp, offset in committed.items()
                if offset is not None
            }
        )

    return perform_seek


async def commit_offsets(consumer: Any, offsets: Mapping[Any, int]) -> None:
    """Commit ``offsets`` (faust TP -> next offset) through faust's consumer.

    faust's own commits were seen to stall for some partitions after a restart (its
    acked-offset gap check, ``Consumer._new_offset``), leaving consumer lag behind processing
    for good; the worker commits itself and tells faust what it committed, so that faust never
    commits anything lower after it.
    """
    if not offsets:
        return
    if await consumer._commit(dict(offsets)):
        known = consumer._committed_offset
        for tp, offset in offsets.items():
            if known[tp] is None or offset > known[tp]:
                known[tp] = offset


def chain_producer_flush(app: faust.App, after: Callable[[], Awaitable[None]]) -> None:
    """Make faust's producer flush (awaited before every offset commit faust makes) also
    await ``after``: the worker's own producer and state must be durable too."""
    faust_flush = app.producer.flush

    async def flush_both() -> None:
        await faust_flush()
        await after()

    app.producer.flush = flush_both  # type: ignore[method-assign]


# -- the fetch loop's hand-over ----------------------------------------------------------------


class Resumed:
    """An awaitable that continues a coroutine which has already run up to its first yield.

    ``yielded`` is what the coroutine yielded (the future it waits on); awaiting this object
    re-yields it to the task that now drives it, then forwards every send and throw.
    """

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # forwarded into the coroutine, which decides
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def fast_wait_first(
    original: Callable[..., Awaitable[WaitResults]], suspended: Callable[[], bool]
) -> Callable[..., Awaitable[WaitResults]]:
    """``Service.wait_first`` with a fast path for a delivery that does not suspend.

    faust's fetch loop delivers every message with
    ``await self.wait_first(callback(message), self.suspend_flow.wait())``: four futures and an
    ``asyncio.wait`` per message, so that a delivery blocked on a full stream buffer can be
    abandoned when a rebalance suspends the flow. In a profile of a loaded worker that was 13 %
    of the event loop's time. Almost every delivery completes without ever suspending, so the
    delivery is first run one step by hand. If it finished, the result is returned at once; if
    it suspended, the started coroutine is handed, through :class:`Resumed`, to faust's own
    ``wait_first``, which then behaves as before.

    Only the fetch loop's shape takes the fast path: two coroutines, no timeout, the flow not
    suspended (``suspended()`` false). The second coroutine (the wait for a suspension) is then
    never started when the first completes in one step.
    """

    async def wait_first(*coros: Any, timeout: Any = None) -> WaitResults:
        if (
            len(coros) != 2
            or timeout is not None
            or suspended()
            or not asyncio.iscoroutine(coros[0])
        ):
            return await original(*coros, timeout=timeout)
        first, second = coros
        try:
            yielded = first.send(None)
        except StopIteration as stop:
            if asyncio.iscoroutine(second):
                second.close()
            return WaitResults([first], [stop.value], False)
        return await original(Resumed(first, yielded), second)

    return wait_first


def use_fast_handover(consumer: Any) -> None:
    """Make a faust consumer's fetch loop deliver through :func:`fast_wait_first`."""
    consumer.wait_first = fast_wait_first(consumer.wait_first, consumer.suspend_flow.is_set)


def use_lane(consumer: Any, lane: InputLane) -> None:
    """Make ``consumer``'s fetch loop hand ``lane.topic``'s records to ``lane``, a fetch at once.

    Must run before the consumer's fetcher starts (faust reads ``callback`` once, when its
    fetch loop starts); :func:`patch_consumers` does. Records of other topics go through
    faust's own path; an input message that still reaches the callback (none should) is put on
    the lane too.
    """
    original: Callable[[Any], Coroutine[Any, Any, None]] = consumer.callback
    topic, put = lane.topic, lane.put

    def callback(message: Any) -> Coroutine[Any, Any, None]:
        return put(message) if message.topic == topic else original(message)

    consumer.callback = callback
    consumer._wait_next_records = _routing_fetch(consumer, lane)


def _routing_fetch(
    consumer: Any, lane: InputLane
) -> Callable[[float], Coroutine[Any, Any, tuple[Any, Any]]]:
    """``consumer._wait_next_records`` that moves the input topic's records to ``lane``.

    What faust's ``getmany`` and fetch loop check per record is checked per partition here
    (see stream_processors._lane); the records of every other topic are returned to faust.
    """
    fetch = consumer._wait_next_records
    topic = lane.topic

    def stopped() -> bool:
        return not consumer.flow_active

    async def wait_next_records(timeout: float) -> tuple[Any, Any]:
        records, active = await fetch(timeout)
        if not records or not consumer.flow_active or consumer.should_stop:
            return records, active  # faust seeks back when the flow is stopped
        mine = [tp for tp in records if tp.topic == topic]
        if not mine:
            return records, active
        app = consumer.app
        generation = app.consumer_generation_id
        buffered = consumer._buffered_partitions
        read_offset = consumer._read_offset
        for tp in mine:
            batch = records.pop(tp)
            if not batch or (active is not None and tp not in active and tp not in buffered):
                continue
            if app.consumer_generation_id != generation or not consumer.flow_active:
                continue  # fetched before a rebalance: dropped, as faust's getmany does
            after = read_offset[tp]
            if after is not None and batch[0].offset < after:
                batch = [r for r in batch if r.offset >= after]
                if not batch:
                    continue
            if await lane.put_many(batch, stopped):
                read_offset[tp] = batch[-1].offset
        return records, active

    return wait_next_records


# -- the monitor -------------------------------------------------------------------------------


def _skip_hook(self: Any, *args: Any, **kwargs: Any) -> None:
    """A monitor hook that records nothing."""


class LeanMonitor(Monitor):
    """faust's monitor without its per-message and per-table-access bookkeeping.

    Those hooks time and count every message (a dict per event, weak-key lookups), about 3 %
    of the worker's event loop, for statistics nothing here reads: the worker's own counters
    and ``/metrics`` report throughput. Commit, send, rebalance and assignment hooks stay.
    """

    on_message_in = _skip_hook
    on_stream_event_in = _skip_hook
    on_stream_event_out = _skip_hook
    on_message_out = _skip_hook
    on_table_get = _skip_hook
    on_table_set = _skip_hook
    on_table_del = _skip_hook
