"""UsageProducer, AsyncUsageProducer, publish_subscriptions and ``produce`` on the real broker."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from typer.testing import CliRunner

from producers import AsyncUsageProducer, UsageProducer, publish_subscriptions
from producers._producer import encode_for_send
from schemas import Subscription, decode_event, event_from_obj
from spendstream.errors import DeliveryError
from spendstream.settings import Settings
from spendstream.simulate import Simulator, malformed_payloads

pytestmark = pytest.mark.integration


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float = 90.0) -> list[Any]:
    """Every message of ``topic`` from the start, until ``expected`` arrived and 1 s of quiet."""
    conf = settings.kafka.confluent_config()
    conf.update(
        {
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            # Only acknowledged, committed-to-the-log records: what a downstream reader sees.
            "isolation.level": "read_committed",
        }
    )
    consumer = Consumer(conf)
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        quiet_until = None
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.5)
            for msg in batch:
                assert msg.error() is None, msg.error()
                out.append(msg)
            if len(out) >= expected:
                if not batch and quiet_until is not None and time.monotonic() > quiet_until:
                    break
                if batch or quiet_until is None:
                    quiet_until = time.monotonic() + 1.0
        return out
    finally:
        consumer.close()


def sim_events(n: int, users: int = 200, seed: int = 1) -> list[dict[str, Any]]:
    return list(itertools.islice(Simulator(users, seed=seed).events(), n))


def make_topics(make_settings: Any) -> Settings:
    """Isolated settings with their topics created (the broker does not auto-create)."""
    from spendstream.kafka_admin import ensure_topics

    settings: Settings = make_settings()
    ensure_topics(settings)
    return settings


def test_10k_events_roundtrip_byte_exact_and_partitioned_by_user(make_settings: Any) -> None:
    settings = make_topics(make_settings)
    events = sim_events(10_000)
    with UsageProducer(settings) as producer:
        for event in events:
            producer.send(event)
    stats = producer.stats()
    assert (stats.sent, stats.delivered, stats.failed) == (10_000, 10_000, 0)

    messages = read_topic(settings, settings.topics.events, 10_000)
    assert len(messages) == 10_000
    # The bytes the producer encodes (its msgspec wire form), which decode to the contract's
    # event: consumed back byte for byte.
    expected = {e["event_id"]: encode_for_send(e)[1] for e in events}
    assert all(decode_event(expected[e["event_id"]]) == event_from_obj(e) for e in events)
    partitions: dict[str, set[int]] = defaultdict(set)
    order: dict[str, list[str]] = defaultdict(list)
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        value = orjson.loads(msg.value())
        assert msg.value() == expected[value["event_id"]]  # byte-exact wire form
        assert msg.key() == value["user_id"].encode()
        partitions[value["user_id"]].add(msg.partition())
        order[value["user_id"]].append(value["event_id"])
    assert all(len(p) == 1 for p in partitions.values())  # one user, one partition
    assert len({p for ps in partitions.values() for p in ps}) > 1  # spread over partitions
    sent_order: dict[str, list[str]] = defaultdict(list)
    for e in events:
        sent_order[e["user_id"]].append(e["event_id"])
    assert order == sent_order  # per-user order preserved


def test_broker_restart_while_producing_loses_and_duplicates_nothing(
    kafka_broker: Any, make_settings: Any
) -> None:
    settings = make_topics(make_settings)
    events = sim_events(20_000, seed=2)
    failures: list[str] = []
    progress = {"sent": 0}

    def record(report: Any) -> None:
        if not report.ok:
            failures.append(report.error)

    def gateway() -> None:
        with UsageProducer(settings, on_delivery=record) as p:
            for i, event in enumerate(events):
                p.send(event)
                progress["sent"] = i + 1
                if i % 100 == 0:
                    time.sleep(0.01)  # ~10k/s, so the restart lands mid-stream

    thread = threading.Thread(target=gateway)
    thread.start()
    while progress["sent"] < 3_000:
        time.sleep(0.01)
    kafka_broker.stop()
    time.sleep(2)
    kafka_broker.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert failures == []

    messages = read_topic(settings, settings.topics.events, len(events), timeout_s=120)
    counts = Counter(orjson.loads(m.value())["event_id"] for m in messages)
    assert len(counts) == len(events)  # nothing lost
    assert max(counts.values()) == 1  # nothing duplicated
    assert set(counts) == {e["event_id"] for e in events}


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_close_releases_the_client_threads_and_refuses_later_sends(make_settings: Any) -> None:
    # close() must end librdkafka's threads and connections itself: the poll thread and the
    # callbacks refer back to the producer, so dropping it would leave them to the cyclic GC.
    settings = make_topics(make_settings)
    gc.collect()
    before = _os_threads()
    producer = UsageProducer(settings)
    for event in sim_events(10):
        producer.send(event)
    assert _os_threads() > before  # librdkafka's and the poll thread
    stats = producer.close()
    assert (stats.sent, stats.delivered, stats.failed) == (10, 10, 0)
    deadline = time.monotonic() + 10
    while _os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _os_threads() <= before, "the Kafka client's threads outlived close()"
    assert len(producer) == 0 and producer.flush(0) == 0 and producer.poll(0) == 0
    with pytest.raises(DeliveryError, match="closed"):
        producer.send(sim_events(1)[0])


def test_async_producer_waits_for_delivery(make_settings: Any) -> None:
    settings = make_topics(make_settings)
    events = sim_events(200, seed=3)

    async def run() -> list[Any]:
        async with AsyncUsageProducer(settings) as producer:
            reports = await asyncio.gather(*(producer.send(e) for e in events[:100]))
            for e in events[100:]:
                assert await producer.send(e, wait=False) is None
            await producer.flush()
            assert producer.stats().delivered == 200
            return list(reports)

    reports = asyncio.run(run())
    assert all(r.ok and r.offset >= 0 for r in reports)
    assert {r.key for r in reports} == {e["user_id"].encode() for e in events[:100]}
    assert len(read_topic(settings, settings.topics.events, 200)) == 200


def test_publish_subscriptions(make_settings: Any) -> None:
    settings = make_topics(make_settings)
    subs = Simulator(50, seed=4).subscriptions()
    assert publish_subscriptions(settings, subs) == 50
    messages = read_topic(settings, settings.topics.subscriptions, 50)
    by_user = {m.key().decode(): Subscription.model_validate_json(m.value()) for m in messages}
    assert by_user == {s.user_id: s for s in subs}


def _cli_settings(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Topics of their own, and the environment that points the CLI at them."""
    settings = make_topics(make_settings)
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("SPENDSTREAM_TOPICS__EVENTS", settings.topics.events)
    return settings


def test_produce_command_reports_bad_lines_and_sends_the_rest(
    make_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spendstream.cli import app

    settings = _cli_settings(make_settings, monkeypatch)
    good_events = sim_events(997, seed=5)
    good = iter(good_events)
    bad = iter(payload for _, payload in malformed_payloads(3, seed=5))
    bad_lines = {17, 500, 1000}
    lines = [next(bad) if n in bad_lines else orjson.dumps(next(good)) for n in range(1, 1001)]
    # Valid lines in other spellings than the canonical encoding: spaces, another key order.
    lines[1] = json.dumps(good_events[1]).encode()
    lines[2] = orjson.dumps(dict(reversed(list(good_events[2].items()))))
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = CliRunner().invoke(app, ["produce", str(path)])
    assert result.exit_code == 1, result.output
    reported = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [int(line.split()[1].rstrip(":")) for line in reported] == sorted(bad_lines)
    assert "sent 997 events" in result.stdout
    # Each valid line went out as it is, keyed by its user.
    got = sorted((m.key(), m.value()) for m in read_topic(settings, settings.topics.events, 997))
    want = sorted(
        (orjson.loads(line)["user_id"].encode(), line)
        for n, line in enumerate(lines, start=1)
        if n not in bad_lines
    )
    assert got == want


def test_produce_command_shows_progress_on_a_terminal_and_reports_above_it(
    make_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    from spendstream.cli import app
    from spendstream.commands import traffic

    _cli_settings(make_settings, monkeypatch)
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100, emoji=False)
    monkeypatch.setattr(traffic, "err_console", terminal)
    lines = [orjson.dumps(e) for e in sim_events(300, seed=6)]
    lines[41] = orjson.dumps({"event_id": "e"})  # five fields missing: a long reason
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = CliRunner().invoke(app, ["produce", str(path)])
    assert result.exit_code == 1, result.output
    assert "sent 299 events" in result.stdout
    shown = screen.getvalue()
    report = [line for line in shown.splitlines() if "line 42:" in line]
    # Wider than the terminal and still one line, whole.
    assert len(report) == 1 and len(report[0]) > 100, shown
    assert report[0].endswith("requested_model: Field required"), shown
    # The bar's last state: every byte and line of the file read.
    size = path.stat().st_size
    assert "300 lines" in shown and f"{size / 1000:.1f}/{size / 1000:.1f} kB" in shown, shown
    assert "line 42:" not in result.stderr  # reported through the terminal, not twice
