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
