"""The input lane: batches taken at once or within a time, backpressure, clear on rebalance."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from stream_processors._lane import InputLane
from stream_processors.faust_patches import use_lane


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_take_returns_a_full_batch_without_waiting_for_within() -> None:
    async def main() -> tuple[list[int], int, float]:
        lane = InputLane("in", max_buffered=100)
        for i in range(7):
            await lane.put(i)
        t0 = time.monotonic()
        batch, _ = await lane.take(5, within=10.0)
        return batch, len(lane), time.monotonic() - t0

    batch, left, took = run(main())
    assert batch == [0, 1, 2, 3, 4]
    assert left == 2
    assert took < 1.0


def test_messages_already_waiting_are_taken_at_once() -> None:
    async def main() -> tuple[list[str], float]:
        lane = InputLane("in", max_buffered=100)
        await lane.put("a")
        await lane.put("b")
        t0 = time.monotonic()
        batch, _ = await lane.take(5, within=10.0)
        return batch, time.monotonic() - t0

    batch, took = run(main())
    assert batch == ["a", "b"]
    assert took < 1.0  # not the 10 s of ``within``


def test_on_an_empty_lane_take_waits_within_for_more_after_the_first() -> None:
    async def main() -> tuple[list[str], float]:
        lane = InputLane("in", max_buffered=100)

        async def feed() -> None:
            await asyncio.sleep(0.01)
            await lane.put("a")
            await asyncio.sleep(0.05)
            await lane.put("b")  # within the 0.3 s after the first

        feeder = asyncio.create_task(feed())
        t0 = time.monotonic()
        batch, _ = await lane.take(5, within=0.3)
        await feeder
        return batch, time.monotonic() - t0

    batch, took = run(main())
    assert batch == ["a", "b"]
    assert 0.25 <= took < 2.0  # the first message, then the whole ``within`` for a full batch


def test_take_waits_for_a_first_message_then_completes_when_the_batch_fills() -> None:
    async def main() -> list[int]:
        lane = InputLane("in", max_buffered=100)

        async def feed() -> None:
            for i in range(3):
                await asyncio.sleep(0.01)
                await lane.put(i)

        feeder = asyncio.create_task(feed())
        batch, _ = await asyncio.wait_for(lane.take(3, within=30.0), 5.0)
        await feeder
        return batch

    assert run(main()) == [0, 1, 2]


def test_put_waits_while_the_lane_is_full() -> None:
    async def main() -> tuple[bool, bool, list[int]]:
        lane = InputLane("in", max_buffered=2)
        await lane.put(1)
        await lane.put(2)
        blocked = asyncio.create_task(lane.put(3))
        await asyncio.sleep(0.05)
        was_blocked = not blocked.done()
        first, _ = await lane.take(1, within=0.0)
        await asyncio.wait_for(blocked, 1.0)
        rest, _ = await lane.take(10, within=0.0)
        return was_blocked, blocked.done(), first + rest

    was_blocked, done, order = run(main())
    assert was_blocked and done
    assert order == [1, 2, 3]


def test_clear_drops_waiting_messages_and_marks_taken_batches_stale() -> None:
    async def main() -> tuple[int, int, int, list[str], int]:
        lane = InputLane("in", max_buffered=100)
        await lane.put("old1")
        await lane.put("old2")
        _, before = await lane.take(1, within=0.0)
        dropped = lane.clear()
        await lane.put("new")
        batch, after = await lane.take(5, within=0.0)
        return dropped, before, lane.dropped, batch, after

    dropped, before, total, batch, after = run(main())
    assert dropped == 1 and total == 1
    assert batch == ["new"]
    assert after == before + 1


def test_a_clear_during_the_wait_for_more_is_not_returned_as_an_empty_batch() -> None:
    async def main() -> list[str]:
        lane = InputLane("in", max_buffered=100)
        taker = asyncio.create_task(lane.take(5, within=0.1))
        await asyncio.sleep(0.01)
        await lane.put("revoked")  # the first message: the taker now waits for more
        await asyncio.sleep(0.02)
        lane.clear()
        await asyncio.sleep(0.2)  # the within window ends on an empty lane
        assert not taker.done()
        await lane.put("fresh")
        batch, _ = await asyncio.wait_for(taker, 2.0)
        return batch

    assert run(main()) == ["fresh"]


def test_clear_releases_a_blocked_put() -> None:
    async def main() -> bool:
        lane = InputLane("in", max_buffered=1)
        await lane.put(1)
        blocked = asyncio.create_task(lane.put(2))
        await asyncio.sleep(0.02)
        lane.clear()
        await asyncio.wait_for(blocked, 1.0)
        return len(lane) == 1

    assert run(main())


class FakeConsumer:
    """What use_lane touches of a faust consumer: its callback, its fetch, its flow state."""

    def __init__(self, *fetches: dict[TP, list[Any]]) -> None:
        self.fetches = list(fetches)
        self.flow_active = True
        self.should_stop = False
        self.app = SimpleNamespace(consumer_generation_id=1)
        self._buffered_partitions: set[TP] = set()
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self.active: set[TP] | None = None
        self.routed: list[str] = []

    async def callback(self, message: Any) -> None:
        self.routed.append(message.topic)

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Any]], Any]:
        return self.fetches.pop(0), self.active


def rec(topic: str, partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=partition, offset=offset)


def where(batch: list[Any]) -> list[tuple[str, int, int]]:
    return [(r.topic, r.partition, r.offset) for r in batch]


E0, E1, C0 = TP("events", 0), TP("events", 1), TP("changelog", 0)


def test_the_input_topics_records_go_to_the_lane_a_fetch_at_once() -> None:
    async def main() -> tuple[list[Any], dict[TP, list[Any]], FakeConsumer]:
        lane = InputLane("events", max_buffered=10)
        consumer = FakeConsumer(
            {
                E0: [rec("events", 0, 5), rec("events", 0, 6)],
                C0: [rec("changelog", 0, 9)],
                E1: [rec("events", 1, 0)],
            }
        )
        use_lane(consumer, lane)
        left, _ = await consumer._wait_next_records(1.0)
        batch, _ = await lane.take(10, within=0.0)
        return batch, left, consumer

    batch, left, consumer = run(main())
    assert where(batch) == [("events", 0, 5), ("events", 0, 6), ("events", 1, 0)]
    assert list(left) == [C0]  # faust delivers the other topics as before
    assert consumer._read_offset[E0] == 6 and consumer._read_offset[E1] == 0


def test_a_message_that_reaches_the_callback_goes_by_topic() -> None:
    async def main() -> tuple[list[Any], list[str]]:
        lane = InputLane("events", max_buffered=10)
        consumer = FakeConsumer()
        use_lane(consumer, lane)
        for topic in ("events", "changelog", "events"):
            await consumer.callback(SimpleNamespace(topic=topic))
        batch, _ = await lane.take(10, within=0.0)
        return batch, consumer.routed

    batch, other = run(main())
    assert [m.topic for m in batch] == ["events", "events"]
    assert other == ["changelog"]


def test_routing_keeps_fausts_checks_per_record() -> None:
    async def main() -> tuple[list[Any], FakeConsumer]:
        lane = InputLane("events", max_buffered=10)
        consumer = FakeConsumer(
            # Below the read offset (fetched before a seek back to 7): dropped.
            {E0: [rec("events", 0, 5), rec("events", 0, 7), rec("events", 0, 8)]},
            # Not an active partition: skipped.
            {E1: [rec("events", 1, 0)]},
        )
        consumer._read_offset[E0] = 7
        use_lane(consumer, lane)
        await consumer._wait_next_records(1.0)
        consumer.active = {E0}
        await consumer._wait_next_records(1.0)
        batch, _ = await lane.take(10, within=0.0)
        return batch, consumer

    batch, consumer = run(main())
    assert where(batch) == [("events", 0, 7), ("events", 0, 8)]
    assert consumer._read_offset[E0] == 8 and consumer._read_offset[E1] is None


def test_a_fetch_is_given_back_to_faust_when_the_flow_stopped_during_it() -> None:
    async def main() -> tuple[int, dict[TP, list[Any]]]:
        lane = InputLane("events", max_buffered=10)
        consumer = FakeConsumer({E0: [rec("events", 0, 0)]})
        fetch = consumer._wait_next_records

        async def fetch_then_stop(timeout: float) -> tuple[dict[TP, list[Any]], Any]:
            records = await fetch(timeout)
            consumer.flow_active = False  # a rebalance began while the fetch was out
            return records

        consumer._wait_next_records = fetch_then_stop  # type: ignore[method-assign]
        use_lane(consumer, lane)
        left, _ = await consumer._wait_next_records(1.0)
        return len(lane), left

    waiting, left = run(main())
    assert waiting == 0
    assert list(left) == [E0]  # faust's getmany then seeks back to the committed offsets


def test_after_a_generation_change_the_rest_of_the_fetch_is_dropped() -> None:
    async def main() -> list[Any]:
        lane = InputLane("events", max_buffered=1)
        await lane.put("before")
        consumer = FakeConsumer({E0: [rec("events", 0, 0)], E1: [rec("events", 1, 0)]})
        use_lane(consumer, lane)
        routing = asyncio.create_task(consumer._wait_next_records(1.0))
        await asyncio.sleep(0.02)  # blocked on the full lane with partition 0's records
        consumer.app.consumer_generation_id += 1  # a rebalance completed meanwhile
        await lane.take(1, within=0.0)
        await asyncio.wait_for(routing, 1.0)
        batch, _ = await lane.take(10, within=0.0)
        return batch

    # The records it was blocked with go in (as faust completes a started delivery); the
    # next partition's, fetched before the rebalance, do not.
    assert where(run(main())) == [("events", 0, 0)]


def test_put_many_waits_for_room_and_gives_up_when_the_lane_is_cleared() -> None:
    async def main() -> tuple[bool, bool, bool, list[int]]:
        lane = InputLane("in", max_buffered=2)
        await lane.put_many([1, 2], lambda: False)
        blocked = asyncio.create_task(lane.put_many([3, 4], lambda: False))
        await asyncio.sleep(0.02)
        was_blocked = not blocked.done()
        first, _ = await lane.take(1, within=0.0)  # room again: the whole fetch goes in
        delivered = await asyncio.wait_for(blocked, 1.0)
        stale = asyncio.create_task(lane.put_many([5], lambda: False))
        await asyncio.sleep(0.02)
        lane.clear()
        dropped = not await asyncio.wait_for(stale, 1.0)
        await lane.put_many([6], lambda: False)
        rest, _ = await lane.take(10, within=0.0)
        return was_blocked, delivered, dropped, first + rest

    was_blocked, delivered, dropped, order = run(main())
    assert was_blocked and delivered and dropped
    assert order == [1, 6]  # 2, 3, 4 were cleared; 5 was given up


def test_put_many_gives_up_when_the_flow_stops_during_the_wait() -> None:
    async def main() -> tuple[bool, int]:
        lane = InputLane("in", max_buffered=1)
        stopped = False
        await lane.put_many([1], lambda: stopped)
        blocked = asyncio.create_task(lane.put_many([2], lambda: stopped))
        await asyncio.sleep(0.02)
        stopped = True
        await lane.take(1, within=0.0)
        return await asyncio.wait_for(blocked, 1.0), len(lane)

    delivered, waiting = run(main())
    assert not delivered and waiting == 0


def test_max_buffered_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_buffered"):
        InputLane("in", max_buffered=0)


def test_an_urgent_message_ends_the_wait_for_a_fuller_batch() -> None:
    def urgent(message: Any) -> bool:
        return str(message).startswith("!")

    async def main() -> list[tuple[list[str], float]]:
        lane = InputLane("in", max_buffered=100, urgent=urgent)
        out = []
        for first, later in ((["a"], ["!b"]), (["!c"], [])):
            t0 = time.monotonic()
            taker = asyncio.create_task(lane.take(50, within=5.0))
            await asyncio.sleep(0.01)  # the taker waits on an empty lane
            await lane.put_many(first, lambda: False)
            await asyncio.sleep(0.05)
            if later:
                await lane.put_many(later, lambda: False)
            batch, _ = await taker
            out.append((batch, time.monotonic() - t0))
        # Without an urgent message the wait runs its course (here cut short by a full batch).
        plain = InputLane("in", max_buffered=100)
        t0 = time.monotonic()
        taker = asyncio.create_task(plain.take(3, within=0.3))
        await asyncio.sleep(0.01)
        await plain.put_many(["x"], lambda: False)
        batch, _ = await taker
        out.append((batch, time.monotonic() - t0))
        return out

    (first, t1), (second, t2), (plain, t3) = run(main())
    assert first == ["a", "!b"] and t1 < 1.0  # woken by the urgent one, not by within=5
    assert second == ["!c"] and t2 < 1.0  # urgent from the start: no wait at all
    assert plain == ["x"] and t3 >= 0.25
