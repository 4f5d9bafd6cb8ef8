"""The worker's output producer on the real broker: delivered messages arrive, a failed one
stops the process without a commit (delivery reports reach Python for failures only)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
from confluent_kafka import Consumer, TopicPartition

from spendstream.settings import Settings
from stream_processors._output import OutputProducer

pytestmark = pytest.mark.integration


def test_delivered_messages_arrive_on_the_partition_named(topics: Settings) -> None:
    out = OutputProducer(topics)
    topic = topics.topics.priced
    for i in range(200):
        out.produce(topic, b"user-%d" % i, b"value-%d" % i, i % 3)
    asyncio.run(out.flush())
    out.close()
    consumer = Consumer(
        {**topics.kafka.confluent_config(), "group.id": "output-test", "enable.auto.commit": False}
    )
    got: dict[int, list[bytes]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        while sum(map(len, got.values())) < 200:
            msg = consumer.poll(10.0)
            assert msg is not None, f"only {sum(map(len, got.values()))} of 200 arrived"
            assert msg.error() is None
            got.setdefault(msg.partition(), []).append(msg.value())
    finally:
        consumer.close()
    assert {p: len(v) for p, v in got.items()} == {0: 67, 1: 67, 2: 66}
    assert got[1][:2] == [b"value-1", b"value-4"]


def test_a_message_that_cannot_be_delivered_stops_the_process(topics: Settings) -> None:
    # Partition 99 does not exist: librdkafka fails that message once it has the metadata.
    script = textwrap.dedent(
        f"""
        import asyncio, logging
        logging.basicConfig()
        from spendstream.settings import load_settings
        from stream_processors._output import OutputProducer
        out = OutputProducer(load_settings())
        out.produce({topics.topics.priced!r}, b"k", b"fine", 0)
        out.produce({topics.topics.priced!r}, b"k", b"lost", 99)
        asyncio.run(out.flush())
        print("flushed")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **topics.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 70, proc.stdout + proc.stderr
    assert "flushed" not in proc.stdout
    assert "could not deliver" in proc.stderr and "[99]" in proc.stderr
