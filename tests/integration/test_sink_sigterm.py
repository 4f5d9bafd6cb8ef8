"""``spendstream sink`` as a real process on the real broker: SIGTERM mid-stream is graceful.

The sink buffers with a batch age far beyond the test's length, so at the signal everything it
read sits in memory, not yet inserted. SIGTERM must then flush that buffer into chDB, commit
exactly those offsets and exit 0, while a producer is still writing to the topic.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from sinks import ChdbStore
from spendstream.bench.sink import sample_priced_event
from spendstream.kafka_admin import ensure_topics
from spendstream.settings import Settings

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Feeder(threading.Thread):
    """Produces priced events to the topic until stopped (the stream the signal lands in)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        producer = Producer({**self.settings.kafka.confluent_config(), "linger.ms": 5})
        topic = self.settings.topics.priced
        while not self.stop.is_set():
            for _ in range(50):
                event = sample_priced_event(self.sent)
                producer.produce(topic, key=event["user_id"].encode(), value=orjson.dumps(event))
                self.sent += 1
            producer.poll(0)
            time.sleep(0.01)
        assert producer.flush(30) == 0


def topic_ids_below(settings: Settings, committed: dict[int, int]) -> list[str]:
    """event_ids of the priced topic's messages below each partition's committed offset."""
    conf = {**settings.kafka.confluent_config(), "group.id": f"check-{uuid.uuid4().hex}"}
    consumer = Consumer({**conf, "enable.auto.commit": False})
    topic = settings.topics.priced
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in committed])
        ids: list[str] = []
        left = {p: o for p, o in committed.items() if o > 0}
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                assert msg.error() is None
                p = msg.partition()
                if p in left and msg.offset() < left[p]:
                    ids.append(orjson.loads(msg.value())["event_id"])
                    if msg.offset() == left[p] - 1:
                        del left[p]
        assert not left, f"could not read up to the committed offsets: {left}"
        return ids
    finally:
        consumer.close()


def committed_offsets(settings: Settings) -> dict[int, int]:
    topic = settings.topics.priced
    conf = {**settings.kafka.confluent_config(), "group.id": settings.sink.group_id}
    consumer = Consumer({**conf, "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        got = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in got}
    finally:
        consumer.close()


def test_sigterm_mid_stream_flushes_inserts_commits_and_exits_0(
    kafka_broker: Any, make_settings: Any
) -> None:
    port = free_port()
    settings: Settings = make_settings(
        sink={
            "batch_rows": 1_000_000,
            "batch_age_s": 600,  # nothing is flushed by age during the test: only by SIGTERM
            "max_buffer_rows": 1_000_000,
            "metrics_port": port,
        }
    )
    ensure_topics(settings)
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream", "sink"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    feeder = Feeder(settings)
    feeder.start()
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            try:
                status, text = scrape(port, "/metrics")
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
                continue
            if sample(text, "spendstream_sink_rows_in_total") >= 2000:
                break
            time.sleep(0.2)
        read_before = sample(text, "spendstream_sink_rows_in_total")
        assert read_before >= 2000, "the sink did not consume in time"
        assert sample(text, "spendstream_sink_rows_inserted_total") == 0, "held in the buffer"
        status, body = scrape(port, "/health")
        assert status == 200, body
        health = json.loads(body)
        assert health["ok"] is True and health["details"]["buffered_rows"] > 0

        proc.send_signal(signal.SIGTERM)  # while the feeder keeps producing
        output, _ = proc.communicate(timeout=60)
    finally:
        feeder.stop.set()
        feeder.join(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = output.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert feeder.sent > read_before, "the signal landed mid-stream"

    committed = committed_offsets(settings)
    total_committed = sum(committed.values())
    assert total_committed >= read_before, "everything read before the signal was committed"
    expected_ids = topic_ids_below(settings, committed)

    store = ChdbStore(settings.chdb_path, database=settings.clickhouse.database, serve=False)
    try:
        _, rows = store.query(f"SELECT event_id FROM {store.database}.priced_events FINAL")
    finally:
        store.close()
    stored = sorted(str(r[0]) for r in rows)
    # Stored rows and committed offsets describe the same messages: nothing lost, nothing extra.
    assert len(stored) == total_committed
    assert stored == sorted(expected_ids)
