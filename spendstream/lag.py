"""Consumer-group lag: how far a group's committed offsets are behind the end of its topics."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from spendstream.errors import KafkaError


def group_lag(
    conf: Mapping[str, Any], group_id: str, topics: Iterable[str], timeout_s: float = 10.0
) -> dict[tuple[str, int], int]:
    """(topic, partition) -> messages not yet committed by ``group_id`` (end - committed)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            **conf,
            "group.id": group_id,
            "enable.auto.commit": False,
            "client.id": f"lag-probe-{uuid.uuid4().hex[:8]}",
        }
    )
    try:
        parts: list[Any] = []
        meta = consumer.list_topics(timeout=timeout_s)
        for topic in topics:
            tmeta = meta.topics.get(topic)
            if tmeta is None or tmeta.error is not None:
                raise KafkaError(f"topic {topic!r} does not exist")
            parts.extend(TopicPartition(topic, p) for p in sorted(tmeta.partitions))
        committed = consumer.committed(parts, timeout=timeout_s)
        lag: dict[tuple[str, int], int] = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            done = tp.offset if tp.offset >= 0 else low
            lag[(tp.topic, tp.partition)] = max(high - done, 0)
        return lag
    except KafkaException as exc:
        raise KafkaError(f"cannot read the lag of group {group_id!r}: {exc}") from exc
    finally:
        consumer.close()
