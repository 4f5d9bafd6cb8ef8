"""Consumer-group lag on the real broker: per partition, from committed and end offsets."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from sinks import Sink
from spendstream.errors import KafkaError
from spendstream.kafka_admin import create_topics, ensure_topics
from spendstream.lag import group_lag
from spendstream.settings import Settings


def _fill(conf: dict[str, str], topic: str, per_partition: dict[int, int]) -> None:
    producer = Producer(conf)
    for partition, n in per_partition.items():
        for i in range(n):
            producer.produce(topic, b"x%d" % i, partition=partition)
    assert producer.flush(30) == 0


def test_group_lag_counts_from_the_committed_offset_or_the_start(settings: Settings) -> None:
    conf = settings.kafka.confluent_config()
    topic = settings.topics.priced
    create_topics(conf, [topic], 3)
    _fill(conf, topic, {0: 5, 1: 3})
    group = f"{settings.processor.app_id}-lag"
    consumer = Consumer({**conf, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    finally:
        consumer.close()

    # Partition 0 committed at 2 of 5; partition 1 never committed (counts from its start);
    # partition 2 is empty.
    assert group_lag(conf, group, [topic]) == {(topic, 0): 3, (topic, 1): 3, (topic, 2): 0}


def test_group_lag_of_a_missing_topic_is_an_error(settings: Settings) -> None:
    with pytest.raises(KafkaError, match="does not exist"):
        group_lag(settings.kafka.confluent_config(), "nobody", [f"{settings.topics.priced}.none"])


def test_sink_lag_is_what_its_group_has_not_committed(make_settings: Any) -> None:
    """Read but not yet inserted (so not committed) counts as lag; drained, none is left."""
    from sinks import ChdbStore

    s = make_settings(sink={"batch_age_s": 600})  # nothing flushes until run_until_drained
    ensure_topics(s)
    _fill(s.kafka.confluent_config(), s.topics.dlq, {0: 4})
    store = ChdbStore(s.chdb_path, database=s.clickhouse.database, serve=False)
    store.migrate()
    sink = Sink(s, store)
    try:
        read = 0
        for _ in range(100):
            read += sink.poll(0.2)
            if read == 4:
                break
        assert read == 4 and len(sink.buffer) == 4
        lag = sink.lag()
        assert lag[(s.topics.dlq, 0)] == 4
        assert sum(lag.values()) == 4
        assert sink.run_until_drained(timeout_s=60)
        assert sink.lag() and not any(sink.lag().values())
    finally:
        sink.close()
        store.close()
