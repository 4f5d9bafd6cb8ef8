"""The producer spool on the real broker: outages, a process restart, the bound and its metrics,
a spool damaged on disk.

The broker is really stopped (``kafka_broker.stop()``): nothing is mocked. A "process restart"
is a second producer object over the same spool folder after the first one was closed with the
broker still away, which is what a gateway restart during an outage looks like on disk.
"""

from __future__ import annotations

import itertools
import struct
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from producers import DiskSpool, SpoolFullError, UsageProducer
from producers._producer import encode_for_send
from producers._spool import encode_record
from spendstream import metrics
from spendstream.kafka_admin import ensure_topics, wait_for_broker
from spendstream.settings import Settings
from spendstream.simulate import Simulator

pytestmark = pytest.mark.integration


def read_all(settings: Settings, expected: int, timeout_s: float = 60.0) -> list[Any]:
    """Every message of the events topic, until ``expected`` arrived and 1 s of quiet."""
    topic = settings.topics.events
    conf = settings.kafka.confluent_config()
    conf.update({"group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False})
    consumer = Consumer(conf)
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.5)
            for msg in batch:
                assert msg.error() is None, msg.error()
                out.append(msg)
            if batch:
                quiet_since = None
            elif len(out) >= expected:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:
                    break
        return out
    finally:
        consumer.close()


def events(n: int, seed: int) -> list[dict[str, Any]]:
    return list(itertools.islice(Simulator(40, seed=seed).events(), n))


@pytest.fixture
def spool_settings(kafka_broker: Any, make_settings: Any, tmp_path: Path) -> Settings:
    settings: Settings = make_settings(
        producer={
            "spool_enabled": True,
            "spool_dir": tmp_path / "spool",
            "spool_max_bytes": 16 * 1024 * 1024,
            "fsync": "batch",
        }
    )
    ensure_topics(settings)
    return settings


def _restart_broker(kafka_broker: Any, settings: Settings) -> None:
    kafka_broker.start()
    wait_for_broker(settings.kafka.confluent_config(), timeout=60)


def test_outage_and_restart_lose_nothing_and_keep_each_users_order(
    kafka_broker: Any, spool_settings: Settings
) -> None:
    settings = spool_settings
    spool_dir = settings.producer.spool_dir
    assert spool_dir is not None
    before, during, after = events(300, 1), events(3000, 2), events(700, 3)

    first = UsageProducer(settings)
    for event in before:
        first.send(event)
    assert first.flush(60) == 0, "the broker is up: everything is acknowledged"

    kafka_broker.stop()
    try:
        for event in during:
            first.send(event)  # returns once on disk: the gateway is not held up
        time.sleep(0.5)
        depth = first.spool_stats()
        assert depth is not None and depth.records == len(during)
        assert metrics.value("spendstream_producer_spool_records", {"spool": str(spool_dir)}) == (
            len(during)
        )
        stats = first.close(timeout_s=1.0)  # the process goes away during the outage
        assert stats.failed == 0
        assert list(spool_dir.glob("*.seg")), "the undelivered events are on disk"

        # The restarted process opens the same spool, finds the backlog, and keeps producing.
        second = UsageProducer(settings)
        spool_stats = second.spool_stats()
        assert spool_stats is not None and spool_stats.replayed == len(during)
        for event in after:
            second.send(event)
    finally:
        _restart_broker(kafka_broker, settings)
    assert second.flush(90) == 0
    second.close()
    assert not list(spool_dir.glob("*.seg")), "acknowledged segments are deleted"

    sent = before + during + after
    messages = read_all(settings, len(sent))
    ids = Counter(orjson.loads(m.value())["event_id"] for m in messages)
    assert sum(ids.values()) == len(sent)
    assert set(ids) == {e["event_id"] for e in sent}
    assert max(ids.values()) == 1, "every event arrives exactly once"

    # Per user, the topic holds the events in the order they were sent.
    rank = {e["event_id"]: i for i, e in enumerate(sent)}
    per_user: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for m in messages:
        per_user[m.key().decode()].append(
            (m.partition(), m.offset(), rank[orjson.loads(m.value())["event_id"]])
        )
    for user, rows in per_user.items():
        assert len({p for p, _, _ in rows}) == 1, f"{user} spans partitions"
        in_log_order = [r for _, _, r in sorted(rows)]
        assert in_log_order == sorted(in_log_order), f"{user}'s events are out of order"


def test_full_spool_rejects_or_blocks_with_a_clear_error_and_metrics(
    kafka_broker: Any, make_settings: Any, tmp_path: Path
) -> None:
    bound = 64 * 1024
    common = {"spool_enabled": True, "spool_max_bytes": bound, "fsync": "never"}
    reject_dir, block_dir = tmp_path / "reject", tmp_path / "block"
    settings: Settings = make_settings(producer={**common, "spool_dir": reject_dir})
    ensure_topics(settings)
    block_settings = settings.model_copy(
        update={
            "producer": settings.producer.model_copy(
                update={"spool_dir": block_dir, "full_policy": "block"}
            )
        }
    )
    reject_settings = settings.model_copy(
        update={"producer": settings.producer.model_copy(update={"full_policy": "reject"})}
    )
    stream = iter(events(5000, 7))
    accepted: list[str] = []
    kafka_broker.stop()
    try:
        rejecting = UsageProducer(reject_settings)
        with pytest.raises(SpoolFullError) as refused:
            for event in stream:
                rejecting.send(event)
                accepted.append(event["event_id"])
        message = str(refused.value)
        assert str(reject_dir) in message and "full" in message and str(bound) in message
        labels = {"spool": str(reject_dir)}
        assert metrics.value("spendstream_producer_spool_rejected_total", labels) == 1
        assert 0 < metrics.value("spendstream_producer_spool_bytes", labels) <= bound
        assert metrics.value("spendstream_producer_spool_records", labels) == len(accepted)

        blocking = UsageProducer(block_settings, queue_full_timeout_s=0.5)
        blocked_ids: list[str] = []
        started = time.monotonic()
        with pytest.raises(SpoolFullError, match=r"waited 0\.5s"):
            for event in stream:
                blocking.send(event)
                blocked_ids.append(event["event_id"])
        assert time.monotonic() - started >= 0.5, "block waits for room before giving up"
        labels = {"spool": str(block_dir)}
        assert metrics.value("spendstream_producer_spool_blocked_total", labels) == 1
        assert metrics.value("spendstream_producer_spool_rejected_total", labels) == 1
    finally:
        _restart_broker(kafka_broker, settings)
    rejecting.close(timeout_s=60)
    blocking.close(timeout_s=60)
    # What was accepted before the bound arrives; what was refused was never sent.
    messages = read_all(settings, len(accepted) + len(blocked_ids))
    got = Counter(orjson.loads(m.value())["event_id"] for m in messages)
    assert got == Counter(accepted + blocked_ids)


def test_a_damaged_spool_loses_only_the_damaged_record_on_restart(
    kafka_broker: Any, spool_settings: Settings
) -> None:
    """A spool left by a process that died (a record damaged on disk mid-segment, a write torn
    at the end): the next producer sends everything else, each user's events in order."""
    settings = spool_settings
    spool_dir = settings.producer.spool_dir
    assert spool_dir is not None
    sent = events(400, 11)
    # What the dead process had spooled and not delivered, written as its producer writes it.
    dead = DiskSpool(spool_dir, max_bytes=settings.producer.spool_max_bytes, segment_bytes=32_768)
    for event in sent:
        dead.append(settings.topics.events, *encode_for_send(event))
    dead.close()
    segments = sorted(spool_dir.glob("*.seg"))
    assert len(segments) > 2
    middle = segments[1]
    data = bytearray(middle.read_bytes())
    (length,) = struct.unpack_from("<I", data, 0)
    offset = 16 + length  # the second record of the second segment
    _, _, victim_seq = struct.unpack_from("<IIQ", data, offset)
    data[offset + 30] ^= 0x55
    middle.write_bytes(bytes(data))
    with segments[-1].open("ab") as f:
        f.write(encode_record(len(sent), settings.topics.events, b"u", b"torn")[:25])

    producer = UsageProducer(settings)
    stats = producer.spool_stats()
    assert stats is not None and stats.lost_records == 1 and stats.truncated_bytes == 25
    assert stats.replayed == len(sent) - 1
    assert producer.flush(60) == 0
    producer.close()

    lost = sent[victim_seq]["event_id"]
    expected = [e for e in sent if e["event_id"] != lost]
    messages = read_all(settings, len(expected))
    got = [orjson.loads(m.value())["event_id"] for m in messages]
    assert Counter(got) == Counter(e["event_id"] for e in expected)
    rank = {e["event_id"]: i for i, e in enumerate(sent)}
    per_user: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for m in messages:
        per_user[m.key().decode()].append((m.offset(), rank[orjson.loads(m.value())["event_id"]]))
    for user, rows in per_user.items():
        in_log_order = [r for _, r in sorted(rows)]
        assert in_log_order == sorted(in_log_order), f"{user}'s events are out of order"
