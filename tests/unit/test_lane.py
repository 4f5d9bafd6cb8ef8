"""The input lane: batches taken at once or within a time, backpressure, clear on rebalance."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from stream_processors._lane import InputLane, use_lane


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


def test_use_lane_routes_only_the_input_topic() -> None:
    routed: list[str] = []

    async def original(message: Any) -> None:
        routed.append(message.topic)

    async def main() -> tuple[list[Any], list[str]]:
        lane = InputLane("events", max_buffered=10)
        consumer = SimpleNamespace(callback=original)
        use_lane(consumer, lane)
        for topic in ("events", "changelog", "events"):
            await consumer.callback(SimpleNamespace(topic=topic))
        batch, _ = await lane.take(10, within=0.0)
        return batch, routed

    batch, other = run(main())
    assert [m.topic for m in batch] == ["events", "events"]
    assert other == ["changelog"]


def test_max_buffered_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_buffered"):
        InputLane("in", max_buffered=0)
