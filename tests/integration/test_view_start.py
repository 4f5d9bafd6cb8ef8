"""A compacted-topic view whose first start fails keeps trying (real broker).

Before, a view started before its topic existed (or while the broker was not up yet) logged one
error and its thread ended: the view stayed empty for good while the process looked fine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from producers import CompactedTopicView

pytestmark = pytest.mark.integration


def test_a_view_started_before_its_topic_exists_reads_it_once_it_does(make_settings: Any) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    settings = make_settings()
    conf = settings.kafka.confluent_config()
    topic = f"view-{uuid.uuid4().hex[:8]}"
    view: CompactedTopicView[bytes] = CompactedTopicView(conf, topic, lambda raw: raw)
    view.start(wait_s=None)
    try:
        time.sleep(1.5)  # the first start has failed: the topic does not exist
        assert view.get("k") is None
        admin = AdminClient(conf)
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[
            topic
        ].result(30)
        producer = Producer(conf)
        producer.produce(topic, b"v1", b"k")
        assert producer.flush(30) == 0
        assert view.wait_caught_up(60)
        deadline = time.monotonic() + 30
        while view.get("k") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert view.get("k") == b"v1"
    finally:
        view.close()


def test_a_change_is_seen_without_waiting_out_the_poll_interval(make_settings: Any) -> None:
    """A record is applied when it arrives, not when the poll interval ends.

    With ``consume(1000, timeout)`` the thread held every change until 1,000 records or the
    interval: here 5 s against the 2 s allowed.
    """
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    settings = make_settings()
    conf = settings.kafka.confluent_config()
    topic = f"view-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    view: CompactedTopicView[bytes] = CompactedTopicView(
        conf, topic, lambda raw: raw, poll_interval_s=5.0
    )
    producer = Producer({**conf, "linger.ms": 0})
    try:
        view.start(wait_s=60)
        for n in range(3):
            value = b"v%d" % n
            producer.produce(topic, value, b"k")
            assert producer.flush(30) == 0
            sent = time.monotonic()
            while view.get("k") != value and time.monotonic() - sent < 10:
                time.sleep(0.005)
            assert view.get("k") == value
            assert time.monotonic() - sent < 2.0, (
                f"change {n} seen after {time.monotonic() - sent:.2f} s"
            )
    finally:
        view.close()
        admin.delete_topics([topic])
