"""The local KRaft broker and topic administration, on real brokers (no mocks)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]
from typer.testing import CliRunner

from spendstream.cli import app
from spendstream.errors import KafkaError, LocalKafkaError
from spendstream.kafka_admin import delete_topics, ensure_topics, topic_partitions
from spendstream.localkafka import LocalKafka
from spendstream.settings import Settings


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").exists() and bool(Path(f"/proc/{pid}/cmdline").read_bytes())


def _produce(bootstrap: str, topic: str, n: int, tag: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(n):
        producer.produce(topic, key=f"user-{i % 7}", value=f"{tag}-{i}")
    assert producer.flush(30) == 0


def _consume(bootstrap: str, topic: str, n: int, timeout_s: float = 60) -> list[tuple[str, str]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            key, value = msg.key(), msg.value()
            assert isinstance(key, bytes) and isinstance(value, bytes)
            got.append((key.decode(), value.decode()))
    finally:
        consumer.close()
    return got


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test only (for lifecycle tests that must not disturb the session's)."""
    port, controller_port = _free_ports(2)
    kafka = LocalKafka(port=port, controller_port=controller_port, data_dir=tmp_path / "kafka")
    try:
        yield kafka
    finally:
        kafka.down()


def test_up_twice_is_idempotent_and_down_leaves_no_process(own_broker: LocalKafka) -> None:
    own_broker.up()
    pid = own_broker.status().pid
    assert pid is not None and _alive(pid)

    started = time.monotonic()
    own_broker.up()  # already running: returns as soon as it answers
    assert time.monotonic() - started < 10
    st = own_broker.status()
    assert (st.running, st.answering, st.pid) == (True, True, pid)
    assert own_broker.log_path.is_file() and own_broker.log_path.stat().st_size > 0

    # A second handle on the same data folder (another process in real life) finds it too.
    other = LocalKafka(
        port=own_broker.port,
        controller_port=own_broker.controller_port,
        data_dir=own_broker.data_dir,
    )
    assert other.status().pid == pid

    assert other.down() is True
    assert not _alive(pid)
    assert not own_broker.pid_path.exists()
    assert own_broker.status().running is False
    assert own_broker.down() is False  # nothing to stop


def test_port_taken_by_someone_else_is_one_clear_sentence(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        kafka = LocalKafka(port=port, controller_port=_free_ports(1)[0], data_dir=tmp_path)
        with pytest.raises(LocalKafkaError) as info:
            kafka.up()
    message = str(info.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port}" in message and "already in use" in message
    assert message.endswith(".")
    assert not kafka.pid_path.exists()


def test_missing_java_is_one_clear_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(LocalKafkaError, match=r"^Java 17\+ is needed") as info:
        LocalKafka(data_dir=tmp_path).up()
    assert "\n" not in str(info.value)


def test_broker_that_cannot_start_reports_the_log_tail(tmp_path: Path) -> None:
    port, controller_port = _free_ports(2)
    kafka = LocalKafka(port=port, controller_port=controller_port, data_dir=tmp_path, heap="2m")
    with pytest.raises(LocalKafkaError) as info:
        kafka.up()
    first, _, tail = str(info.value).partition("\n")
    assert first.startswith("the local Kafka broker exited during start-up")
    assert "heap" in tail.lower()  # the JVM's own words, from kafka.log
    assert not kafka.pid_path.exists()


def test_produce_consume_roundtrip(topics: Settings) -> None:
    bootstrap = topics.kafka.bootstrap_servers
    _produce(bootstrap, topics.topics.events, 100, "roundtrip")
    got = _consume(bootstrap, topics.topics.events, 100)
    assert sorted(v for _, v in got) == sorted(f"roundtrip-{i}" for i in range(100))
    assert {k for k, _ in got} == {f"user-{i}" for i in range(7)}


def test_ensure_topics_creates_compacted_topics_with_partition_counts(
    make_settings: Any,
) -> None:
    settings = make_settings(topics={"partitions": 3})

    first = ensure_topics(settings)
    again = ensure_topics(settings)

    names = settings.topics.names()
    assert {t.name for t in first} == set(names.values())
    assert all(t.created for t in first)
    assert not any(t.created for t in again)
    on_cluster = topic_partitions(settings.kafka.confluent_config())
    assert {name: on_cluster[name] for name in names.values()} == dict.fromkeys(names.values(), 3)

    admin = AdminClient(settings.kafka.confluent_config())
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names.values()]
    policies = {
        str(res.name): fut.result(timeout=30)["cleanup.policy"].value
        for res, fut in admin.describe_configs(resources).items()
    }
    compacted = settings.topics.compacted()
    assert compacted == {settings.topics.enforcement, settings.topics.subscriptions}
    assert {n for n, p in policies.items() if p == "compact"} == compacted
    assert {n for n, p in policies.items() if p == "delete"} == set(names.values()) - compacted


def test_ensure_topics_refuses_topics_with_fewer_partitions(
    make_settings: Any,
) -> None:
    ensure_topics(make_settings(topics={"partitions": 2}))
    wanting_more = make_settings(topics={"partitions": 4})

    with pytest.raises(KafkaError) as info:
        ensure_topics(wanting_more)

    message = str(info.value)
    assert f"topic {wanting_more.topics.events} has 2 partitions but 4 are configured" in message
    assert message.count("has 2 partitions") == len(wanting_more.topics.names())


def test_delete_topics_ignores_missing_ones(make_settings: Any) -> None:
    settings = make_settings(topics={"partitions": 1})
    ensure_topics(settings)
    conf = settings.kafka.confluent_config()
    delete_topics(conf, [settings.topics.dlq, f"{make_settings.prefix}.never-existed"])
    deadline = time.monotonic() + 30
    while settings.topics.dlq in topic_partitions(conf) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert settings.topics.dlq not in topic_partitions(conf)
    assert settings.topics.events in topic_partitions(conf)


def test_broker_stop_and_start_keeps_the_data(kafka_broker: Any, topics: Settings) -> None:
    bootstrap = kafka_broker.bootstrap
    _produce(bootstrap, topics.topics.events, 500, "before")

    kafka_broker.stop()
    with pytest.raises(KafkaError):
        from spendstream.kafka_admin import wait_for_broker

        wait_for_broker({"bootstrap.servers": bootstrap}, timeout=2)
    kafka_broker.start()

    assert kafka_broker.bootstrap == bootstrap  # same port after the restart
    _produce(bootstrap, topics.topics.events, 10, "after")
    got = [v for _, v in _consume(bootstrap, topics.topics.events, 510)]
    assert sorted(got) == sorted(
        [f"before-{i}" for i in range(500)] + [f"after-{i}" for i in range(10)]
    )
    assert len(ensure_topics(topics)) == len(topics.topics.names())  # topics survived too


def test_cli_up_status_topics_down(tmp_path: Path) -> None:
    port, controller_port = _free_ports(2)
    env = {
        "SPENDSTREAM_STATE_DIR": str(tmp_path),
        "SPENDSTREAM_KAFKA__LOCAL__PORT": str(port),
        "SPENDSTREAM_KAFKA__LOCAL__CONTROLLER_PORT": str(controller_port),
        "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        "SPENDSTREAM_TOPICS__PARTITIONS": "2",
    }
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["kafka", "up"], env=env)
        assert up.exit_code == 0, up.output
        assert f"bootstrap: 127.0.0.1:{port}" in up.output
        assert str(tmp_path / "kafka" / "kafka.log") in up.output.replace("\n", "")

        again = runner.invoke(app, ["kafka", "up"], env=env)
        assert again.exit_code == 0 and "already running" in again.output

        status = runner.invoke(app, ["kafka", "status"], env=env)
        assert status.exit_code == 0 and "answering" in status.output

        listed = runner.invoke(app, ["kafka", "topics"], env=env)
        assert listed.exit_code == 0, listed.output
        assert "usage.enforcement" in listed.output and "compact" in listed.output
        conf = {"bootstrap.servers": f"127.0.0.1:{port}"}
        assert topic_partitions(conf)["usage.events"] == 2
    finally:
        down = runner.invoke(app, ["kafka", "down"], env=env)
    assert down.exit_code == 0 and "stopped" in down.output
    stopped = runner.invoke(app, ["kafka", "status"], env=env)
    assert stopped.exit_code == 3 and "not running" in stopped.output
