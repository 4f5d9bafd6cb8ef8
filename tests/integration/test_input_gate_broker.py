"""The input gate's broker probe on the real broker: where a partition resumes, what the log holds.

The gate trusts these two answers to tell a lost record from a real hole in the log, so they
are checked against records this test wrote and offsets it committed itself.
"""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from spendstream.settings import Settings
from stream_processors._gate import BrokerProbe, InputGate
from stream_processors._processor import InRecord

pytestmark = pytest.mark.integration


def write(settings: Settings, partition: int, n: int) -> None:
    producer = Producer(settings.kafka.confluent_config())
    for i in range(n):
        producer.produce(settings.topics.events, b"v%d" % i, b"k", partition=partition)
    assert producer.flush(30) == 0


def commit(settings: Settings, group: str, partition: int, offset: int) -> None:
    consumer = Consumer({**settings.kafka.confluent_config(), "group.id": group})
    try:
        consumer.commit(
            offsets=[TopicPartition(settings.topics.events, partition, offset)], asynchronous=False
        )
    finally:
        consumer.close()


def test_start_offsets_are_the_commit_else_the_earliest(topics: Settings) -> None:
    events = topics.topics.events
    write(topics, 0, 20)
    write(topics, 1, 5)
    group = f"{topics.processor.app_id}-probe"
    commit(topics, group, 0, 12)
    probe = BrokerProbe(topics.kafka.confluent_config(), group)
    try:
        got = asyncio.run(probe.start_offsets([(events, 0), (events, 1)]))
    finally:
        probe.close()
    assert got == {(events, 0): 12, (events, 1): 0}


def test_first_offset_reads_the_log(topics: Settings) -> None:
    events = topics.topics.events
    write(topics, 2, 10)
    probe = BrokerProbe(topics.kafka.confluent_config(), "probe-first", timeout_s=5.0)
    try:
        assert asyncio.run(probe.first_offset((events, 2), 4)) == 4
        assert asyncio.run(probe.first_offset((events, 2), 0)) == 0
        assert asyncio.run(probe.first_offset((events, 2), 10)) is None  # the end: nothing yet
    finally:
        probe.close()


def test_the_gate_on_the_broker_holds_back_a_gap_and_seeks_to_the_missing_record(
    topics: Settings,
) -> None:
    events = topics.topics.events
    write(topics, 3, 8)
    probe = BrokerProbe(topics.kafka.confluent_config(), "probe-gate", timeout_s=5.0)
    gate = InputGate(probe)

    def batch(*offsets: int) -> list[InRecord]:
        return [InRecord(events, 3, o, b"k", b"v") for o in offsets]

    async def run() -> None:
        first = await gate.admit(batch(0, 1, 2, 4, 5))  # 3 lost on the way
        assert first.kept == [0, 1, 2]
        assert first.seeks == {(events, 3): 3}
        again = await gate.admit(batch(3, 4, 5, 6, 7))  # the re-read
        assert again.kept == [0, 1, 2, 3, 4]

    try:
        asyncio.run(run())
    finally:
        probe.close()
