"""The worker's seeks run on the consumer's own thread, where aiokafka's fetcher runs.

faust's threaded consumer calls aiokafka's ``seek`` from the caller's thread; with the fetcher
between two steps on the consumer thread, both removed the partition's fetched records and
the fetcher crashed with a KeyError. These tests run a real mode ``QueueServiceThread`` (what
faust's consumer thread is) and record on which thread the seek lands.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from faust.transport.consumer import ThreadDelegateConsumer
from faust.types import TP
from mode.threads import QueueServiceThread

from stream_processors.faust_patches import use_thread_seek


class RecordingThread(QueueServiceThread):
    """A consumer thread whose ``seek`` records where it ran."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sought: list[tuple[TP, int, int]] = []
        self.ident: int | None = None

    async def on_thread_started(self) -> None:
        self.ident = threading.get_ident()
        await super().on_thread_started()  # starts the method queue, as faust's thread does

    def seek(self, partition: TP, offset: int) -> None:
        self.sought.append((partition, offset, threading.get_ident()))


class FakeConsumer:
    """The faust consumer members a seek uses: its thread, and faust's own ``_seek``."""

    def __init__(self, thread: RecordingThread) -> None:
        self._thread = thread

    async def _seek(self, partition: TP, offset: int) -> None:
        await ThreadDelegateConsumer._seek(self, partition, offset)  # type: ignore[arg-type]


async def _seek_through(patched: bool) -> tuple[RecordingThread, int]:
    thread = RecordingThread()
    await thread.start()
    try:
        consumer = FakeConsumer(thread)
        if patched:
            use_thread_seek(consumer)
        await consumer._seek(TP("usage.events", 2), 5663)
        return thread, threading.get_ident()
    finally:
        await thread.stop()


pytestmark = pytest.mark.timeout(60)


def test_faust_seeks_from_the_callers_thread() -> None:
    # What the patch is for: unpatched, the seek lands beside the consumer thread's fetch.
    thread, caller = asyncio.run(_seek_through(patched=False))
    assert [ident for *_, ident in thread.sought] == [caller]


def test_the_worker_seeks_on_the_consumer_thread() -> None:
    thread, caller = asyncio.run(_seek_through(patched=True))
    assert thread.ident is not None and thread.ident != caller
    assert thread.sought == [(TP("usage.events", 2), 5663, thread.ident)]
