"""The fetch loop's fast hand-over (stream_processors.faust_patches) against mode's wait_first.

A delivery that completes in one step must return at once without starting the suspension
wait; one that suspends must behave exactly as under faust's own ``wait_first``: it finishes
when its future does, and a suspension of the flow abandons it (its ``finally`` runs).
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

from mode import Service

from stream_processors.faust_patches import Resumed, fast_wait_first


class Loop(Service):
    """A bare mode service: its ``wait_first`` is the one faust's consumer inherits."""


def patched(flow_suspended: asyncio.Event) -> tuple[Any, list[tuple[Any, ...]]]:
    service = Loop()
    calls: list[tuple[Any, ...]] = []
    original = service.wait_first

    async def spy(*coros: Any, timeout: Any = None) -> Any:
        calls.append(coros)
        return await original(*coros, timeout=timeout)

    return fast_wait_first(spy, flow_suspended.is_set), calls


def test_a_delivery_that_does_not_suspend_returns_at_once() -> None:
    async def main() -> None:
        suspend = asyncio.Event()
        wait_first, calls = patched(suspend)
        delivered: list[int] = []

        async def deliver(n: int) -> int:
            delivered.append(n)
            return n * 2

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail
            result = await wait_first(deliver(21), suspend.wait())
        assert delivered == [21]
        assert result.results == [42] and not result.stopped
        assert calls == []  # mode's wait_first (four futures) was not needed

    asyncio.run(main())


def test_a_delivery_that_suspends_finishes_through_modes_wait_first() -> None:
    async def main() -> None:
        suspend = asyncio.Event()
        wait_first, calls = patched(suspend)
        room = asyncio.get_running_loop().create_future()
        delivered: list[str] = []

        async def deliver() -> str:
            delivered.append("start")
            await room  # a full stream buffer
            delivered.append("done")
            return "ok"

        task = asyncio.ensure_future(wait_first(deliver(), suspend.wait()))
        await asyncio.sleep(0.01)
        assert delivered == ["start"] and not task.done()
        room.set_result(None)
        result = await asyncio.wait_for(task, 1)
        assert delivered == ["start", "done"]
        assert "ok" in result.results
        assert len(calls) == 1 and isinstance(calls[0][0], Resumed)

    asyncio.run(main())


def test_a_suspended_flow_abandons_a_blocked_delivery_as_before() -> None:
    async def main() -> None:
        suspend = asyncio.Event()
        wait_first, _ = patched(suspend)
        never = asyncio.get_running_loop().create_future()
        cleaned: list[bool] = []

        async def deliver() -> None:
            try:
                await never
            finally:
                cleaned.append(True)

        task = asyncio.ensure_future(wait_first(deliver(), suspend.wait()))
        await asyncio.sleep(0.01)
        suspend.set()  # a rebalance
        await asyncio.wait_for(task, 1)
        await asyncio.sleep(0.01)
        assert cleaned == [True]  # the delivery was cancelled and its finally ran

    asyncio.run(main())


def test_when_the_flow_is_suspended_mode_decides_from_the_start() -> None:
    async def main() -> None:
        suspend = asyncio.Event()
        suspend.set()
        wait_first, calls = patched(suspend)

        async def deliver() -> int:
            return 1

        await wait_first(deliver(), suspend.wait())
        assert len(calls) == 1 and not isinstance(calls[0][0], Resumed)

    asyncio.run(main())


def test_an_error_in_a_resumed_delivery_reaches_the_caller() -> None:
    async def main() -> None:
        suspend = asyncio.Event()
        wait_first, _ = patched(suspend)
        gate = asyncio.get_running_loop().create_future()

        async def deliver() -> None:
            await gate
            raise ValueError("bad message")

        task = asyncio.ensure_future(wait_first(deliver(), suspend.wait()))
        await asyncio.sleep(0.01)
        gate.set_result(None)
        try:
            await asyncio.wait_for(task, 1)
        except ValueError as exc:
            assert str(exc) == "bad message"
        else:
            raise AssertionError("the error was swallowed")

    asyncio.run(main())
