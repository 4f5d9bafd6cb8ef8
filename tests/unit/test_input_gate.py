"""The input gate: each partition's records reach the processor once, in order, with no gaps.

Cases as a table, then a property: whatever a faulty consumer drops, repeats or skips, the
records the gate lets through are exactly the partition's log, in order, once each, provided
the consumer honours the gate's seeks. The broker is a fake here (pure logic); the real broker
path is the fault suite's SIGKILL scenario.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors._gate import InputGate, Part
from stream_processors._processor import InRecord

TOPIC = "usage.events"


class FakeProbe:
    """A broker holding ``logs`` (partition -> its offsets) and the group's commits."""

    def __init__(self, logs: dict[int, list[int]], committed: dict[int, int] | None = None):
        self.logs = logs
        self.committed = committed or {}
        self.first_offset_calls = 0

    async def start_offsets(self, parts: Sequence[Part]) -> dict[Part, int]:
        return {
            part: self.committed.get(part[1], self.logs[part[1]][0] if self.logs[part[1]] else 0)
            for part in parts
        }

    async def first_offset(self, part: Part, offset: int) -> int | None:
        self.first_offset_calls += 1
        return next((o for o in self.logs[part[1]] if o >= offset), None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rec(offset: int, partition: int = 0) -> InRecord:
    return InRecord(TOPIC, partition, offset, b"k", b"v")


def admit(
    gate: InputGate, offsets: list[int], partition: int = 0
) -> tuple[list[int], dict[Part, int]]:
    batch = [rec(o, partition) for o in offsets]
    got = asyncio.run(gate.admit(batch))
    assert sorted(got.kept + got.dropped) == list(range(len(batch)))
    return [batch[i].offset for i in got.kept], got.seeks


@pytest.mark.parametrize(
    ("log", "committed", "batches", "kept", "seeks"),
    [
        # In order from the commit: everything through.
        (range(10), {0: 0}, [[0, 1, 2], [3, 4]], [0, 1, 2, 3, 4], {}),
        # Starting before the commit: those were processed by an earlier worker.
        (range(10), {0: 3}, [[1, 2, 3, 4]], [3, 4], {}),
        # A repeat of what this worker processed (a seek back to the commit): dropped.
        (range(10), {0: 0}, [[0, 1, 2, 3], [2, 3, 4]], [0, 1, 2, 3, 4], {}),
        # Record 4 never arrived but the broker has it: held back, seek to 4.
        (range(10), {0: 0}, [[0, 1, 2, 3, 5, 6]], [0, 1, 2, 3], {(TOPIC, 0): 4}),
        # The missing record at the very start (first batch after the commit).
        (range(10), {0: 2}, [[3, 4]], [], {(TOPIC, 0): 2}),
        # The log has nothing at 4 (a transaction marker): a real gap, moved over.
        ([0, 1, 2, 3, 5, 6], {0: 0}, [[0, 1, 2, 3, 5, 6]], [0, 1, 2, 3, 5, 6], {}),
        # Nothing committed and retention removed the head: start at the earliest offset.
        (range(100, 110), {}, [[100, 101]], [100, 101], {}),
        # Committed below what retention kept: the gap up to the earliest offset is real.
        (range(100, 110), {0: 7}, [[100, 101]], [100, 101], {}),
    ],
)
def test_admission_table(
    log: Sequence[int],
    committed: dict[int, int],
    batches: list[list[int]],
    kept: list[int],
    seeks: dict[Part, int],
) -> None:
    gate = InputGate(FakeProbe({0: list(log)}, committed))
    got_kept: list[int] = []
    got_seeks: dict[Part, int] = {}
    for batch in batches:
        k, s = admit(gate, batch)
        got_kept += k
        got_seeks.update(s)
    assert got_kept == kept
    assert got_seeks == seeks


def test_a_partition_sought_back_is_not_sought_again_until_the_wait_is_over() -> None:
    clock = Clock()
    probe = FakeProbe({0: list(range(20))}, {0: 0})
    gate = InputGate(probe, reseek_after_s=5.0, clock=clock)
    assert admit(gate, [0, 1, 3, 4]) == ([0, 1], {(TOPIC, 0): 2})
    # Records queued before the seek still arrive: held back, no new probe, no new seek.
    assert admit(gate, [5, 6, 7]) == ([], {})
    assert probe.first_offset_calls == 1
    # The re-read never came (dropped again): after the wait, the gate seeks once more.
    clock.now = 6.0
    assert admit(gate, [8]) == ([], {(TOPIC, 0): 2})
    assert admit(gate, [2, 3, 4]) == ([2, 3, 4], {})


def test_partitions_are_independent_and_a_gap_holds_back_only_its_own() -> None:
    gate = InputGate(FakeProbe({0: list(range(10)), 1: list(range(10))}, {0: 0, 1: 0}))
    batch = [rec(0, 0), rec(0, 1), rec(2, 0), rec(1, 1), rec(3, 0), rec(2, 1)]
    got = asyncio.run(gate.admit(batch))
    assert [(batch[i].partition, batch[i].offset) for i in got.kept] == [
        (0, 0),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert got.seeks == {(TOPIC, 0): 1}
    assert (got.redelivered, got.held_back) == (0, 2)


def test_a_lost_last_record_is_sought_back_by_the_stall_check() -> None:
    clock = Clock()
    gate = InputGate(FakeProbe({0: list(range(5))}, {0: 0}), reseek_after_s=5.0, clock=clock)
    assert admit(gate, [0, 1, 2, 3]) == ([0, 1, 2, 3], {})  # 4 was lost, nothing follows it
    assert (
        asyncio.run(gate.stalled({(TOPIC, 0): 5})) == {}
    )  # not yet: the partition just made progress
    clock.now = 6.0
    assert asyncio.run(gate.stalled({(TOPIC, 0): 5})) == {(TOPIC, 0): 4}
    assert asyncio.run(gate.stalled({(TOPIC, 0): 5})) == {}  # sought: wait for the re-read
    assert admit(gate, [4]) == ([4], {})
    clock.now = 20.0
    assert asyncio.run(gate.stalled({(TOPIC, 0): 5})) == {}  # caught up: nothing to read


def test_keep_only_forgets_other_partitions_which_then_start_from_their_commit() -> None:
    probe = FakeProbe({0: list(range(50)), 1: list(range(50))}, {0: 0, 1: 0})
    gate = InputGate(probe)
    admit(gate, [0, 1, 2], partition=0)
    admit(gate, [0, 1, 2], partition=1)
    probe.committed = {0: 30, 1: 40}  # another worker held them meanwhile
    gate.keep_only([(TOPIC, 0)])
    assert gate.next == {(TOPIC, 0): 3}
    assert admit(gate, [40, 41], partition=1)[0] == [40, 41]


# One fault of a faulty consumer, applied before a batch is taken.
faults = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 5)),  # lose the n-th queued record
    st.tuples(st.just("rewind"), st.integers(1, 30)),  # read again from n records back
    st.tuples(st.just("skip"), st.integers(1, 30)),  # the fetch position jumps ahead by n
    st.tuples(st.just("duplicate"), st.integers(0, 5)),  # one queued record delivered twice
)


@settings(max_examples=300, deadline=None)
@given(
    log=st.lists(st.integers(1, 3), min_size=1, max_size=120).map(
        lambda steps: [sum(steps[: i + 1]) for i in range(len(steps))]
    ),
    start=st.integers(0, 5),
    plan=st.lists(st.tuples(faults, st.integers(1, 12)), max_size=25),
)
def test_whatever_the_consumer_does_the_gate_passes_the_log_once_in_order(
    log: list[int], start: int, plan: list[tuple[tuple[str, int], int]]
) -> None:
    """``log`` has real gaps (steps of 2 or 3); ``plan`` is (fault, batch size) per batch."""
    committed = log[min(start, len(log) - 1)]
    expected_log = [o for o in log if o >= committed]
    clock = Clock()
    gate = InputGate(FakeProbe({0: log}, {0: committed}), clock=clock)
    queue: deque[int] = deque()  # fetched, not yet delivered (a seek does not clear it)
    position = 0  # fetch position, an index into log (from the start: repeats come first)
    kept: list[int] = []
    plan_left = deque(plan)
    for _ in range(2_000):
        fault, size = plan_left.popleft() if plan_left else (("none", 0), 50)
        kind, n = fault
        if kind == "rewind":
            position = max(0, position - n)
        elif kind == "skip":
            position = min(len(log), position + n)
        while len(queue) < size and position < len(log):
            queue.append(log[position])
            position += 1
        if kind == "drop" and n < len(queue):
            del queue[n]
        elif kind == "duplicate" and n < len(queue):
            queue.insert(n, queue[n])
        batch = [queue.popleft() for _ in range(min(size, len(queue)))]
        got_kept, seeks = admit(gate, batch)
        kept += got_kept
        for _, offset in seeks.items():
            position = next(i for i, o in enumerate(log) if o >= offset)
        clock.now += 1.0
        if not plan_left and not queue and position >= len(log):
            if kept == expected_log:
                break
            # Nothing more arrives: the last record was lost, only the stall check sees it.
            for _, offset in asyncio.run(gate.stalled({(TOPIC, 0): log[-1] + 1})).items():
                position = next(i for i, o in enumerate(log) if o >= offset)
    assert kept == expected_log
