"""The worker's seek after a rebalance: input partitions without a commit go back to the start.

faust drops records fetched while its flow is stopped and relies on a seek to the committed
offset to read them again; aiokafka does not move a partition that has no committed offset.
These cases pin down which partitions the worker's own seek rewinds, on a fake consumer that
records the calls (the real broker path is tests/integration/test_scale_out.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, NamedTuple

import pytest

from stream_processors.faust_patches import rewinding_seek as _rewinding_seek

EVENTS = "usage.events"


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class FakeConsumer:
    """The few faust consumer members the seek uses; positions move only by ``seek``."""

    def __init__(self, committed: dict[TopicPartition, int | None], earliest: int) -> None:
        self.committed = committed
        self.earliest = earliest
        self.sought: dict[TopicPartition, int] = {}
        self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)
        self._committed_offset: dict[Any, int | None] = defaultdict(lambda: None)

    async def seek_to_committed(self) -> dict[TopicPartition, int | None]:
        return dict(self.committed)

    async def earliest_offsets(self, *tps: TopicPartition) -> dict[TopicPartition, int]:
        return {tp: self.earliest for tp in tps}

    async def seek(self, partition: TopicPartition, offset: int) -> None:
        self.sought[partition] = offset


@pytest.mark.parametrize(
    ("committed", "earliest", "rewound"),
    [
        # A new group: nothing committed, every input partition goes to its earliest offset.
        ({0: None, 1: None}, 0, {0: 0, 1: 0}),
        # Retention removed the head of the log: earliest is what is left.
        ({0: None}, 1_200, {0: 1_200}),
        # Committed at 0 is "nothing read yet" for aiokafka too: rewound.
        ({0: 0, 1: 57}, 0, {0: 0}),
        # Every partition committed: aiokafka's own seek suffices, nothing more.
        ({0: 12, 1: 57}, 0, {}),
    ],
)
def test_input_partitions_without_a_commit_are_rewound(
    committed: dict[int, int | None], earliest: int, rewound: dict[int, int]
) -> None:
    consumer = FakeConsumer({TopicPartition(EVENTS, p): o for p, o in committed.items()}, earliest)
    asyncio.run(_rewinding_seek(consumer, frozenset({EVENTS}), {})())
    assert consumer.sought == {TopicPartition(EVENTS, p): o for p, o in rewound.items()}


def test_a_partition_this_worker_read_goes_back_only_to_after_what_it_processed() -> None:
    # The stream may already flow while faust seeks: going further back than what was
    # processed would race with records queued for processing.
    consumer = FakeConsumer(
        {
            TopicPartition(EVENTS, 0): None,
            TopicPartition(EVENTS, 1): None,
            TopicPartition(EVENTS, 2): 7,
        },
        0,
    )
    processed = {(EVENTS, 0): 420, (EVENTS, 2): 9}
    asyncio.run(_rewinding_seek(consumer, frozenset({EVENTS}), processed)())
    assert consumer.sought == {TopicPartition(EVENTS, 0): 420, TopicPartition(EVENTS, 1): 0}


def test_other_topics_are_left_to_faust() -> None:
    # Changelog partitions are read by faust's recovery from positions it sets itself.
    changelog = TopicPartition("worker-seen-changelog", 0)
    consumer = FakeConsumer({changelog: None, TopicPartition(EVENTS, 0): 40}, 0)
    asyncio.run(_rewinding_seek(consumer, frozenset({EVENTS}), {})())
    assert consumer.sought == {}


def test_read_and_committed_offsets_follow_the_commits() -> None:
    committed = {TopicPartition(EVENTS, 0): 40, TopicPartition(EVENTS, 1): None}
    consumer = FakeConsumer(committed, 0)
    asyncio.run(_rewinding_seek(consumer, frozenset({EVENTS}), {})())
    assert consumer._read_offset[TopicPartition(EVENTS, 0)] == 40
    assert consumer._read_offset[TopicPartition(EVENTS, 1)] is None
    assert consumer._committed_offset[TopicPartition(EVENTS, 0)] == 40
    assert consumer._committed_offset[TopicPartition(EVENTS, 1)] is None
