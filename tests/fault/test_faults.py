"""The fault suite: each scenario runs the real pipeline (broker, worker process, sink, chDB),
injects one fault, lets it recover, and reconciles ClickHouse against an oracle computed from
what the test produced: totals per user and per plan exact to the last digit, every valid event
once in the raw table, every alert exactly once, every malformed message in the dead letters.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import Oracle, Pipeline, produce

from sinks import Sink
from spendstream.settings import Settings
from spendstream.simulate import Simulator

START = datetime(2026, 11, 3, 8, 0, tzinfo=UTC)


FAST_FAILOVER = {"session_timeout_s": 6}
"""A killed worker's partitions are reassigned after 6 s instead of 30 (the test's patience)."""


def fault_settings(make_settings: Any, **processor: Any) -> Settings:
    from spendstream.kafka_admin import ensure_topics

    settings: Settings = make_settings(processor={**FAST_FAILOVER, **processor})
    ensure_topics(settings)
    return settings


@pytest.fixture
def pipeline(make_settings: Any) -> Iterator[Pipeline]:
    pipe = Pipeline(fault_settings(make_settings))
    yield pipe
    pipe.close()


def simulated(users: int, n: int, seed: int, **fractions: float) -> tuple[Simulator, list[Any]]:
    sim = Simulator(users, seed=seed, start=START, rate=500.0, rhythm=False, **fractions)
    items = []
    for i, item in enumerate(sim.stream()):
        if i >= n:
            break
        items.append(item.payload)
    return sim, items


def priced_count(pipe: Pipeline) -> int:
    from confluent_kafka import Consumer, TopicPartition

    conf = pipe.settings.kafka.confluent_config()
    consumer = Consumer({**conf, "group.id": "fault-probe"})
    try:
        topic = pipe.settings.topics.priced
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        )
    finally:
        consumer.close()


def wait_until(predicate: Any, timeout_s: float, why: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(why)
        time.sleep(0.05)


def test_worker_killed_mid_batch_then_restarted(pipeline: Pipeline) -> None:
    sim, items = simulated(300, 12_000, seed=11, duplicates=0.01)
    pipeline.publish_subscriptions(sim.subscriptions())
    oracle = Oracle(sim.subscriptions())
    produce(pipeline.settings, items, oracle)
    pipeline.start_sink()
    for threshold in (2_500, 7_000):  # two crashes, at different points of the stream
        worker = pipeline.start_worker()
        wait_until(
            lambda t=threshold: priced_count(pipeline) >= t, 180, "the worker made no progress"
        )
        worker.kill()  # SIGKILL: no flush, no commit
    pipeline.start_worker()
    pipeline.drain()
    pipeline.reconcile(oracle)


def test_broker_stopped_and_started_while_producers_and_workers_run(
    pipeline: Pipeline, kafka_broker: Any
) -> None:
    sim, items = simulated(300, 9_000, seed=12)
    pipeline.publish_subscriptions(sim.subscriptions())
    oracle = Oracle(sim.subscriptions())
    pipeline.start_worker()
    pipeline.start_sink()
    errors: list[BaseException] = []

    def gateway() -> None:
        try:
            for start in range(0, len(items), 500):
                produce(pipeline.settings, items[start : start + 500], oracle)
                time.sleep(0.2)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=gateway)
    thread.start()
    wait_until(lambda: priced_count(pipeline) >= 1_000, 180, "no progress before the outage")
    kafka_broker.stop()
    time.sleep(5)
    kafka_broker.start()
    thread.join(300)
    assert not errors, errors
    if pipeline.worker is not None and pipeline.worker.proc.poll() is not None:
        # The worker is allowed to give up during an outage (it exits without committing);
        # a supervisor restarts it, which is what recovery means here.
        pipeline.start_worker()
    pipeline.drain()
    pipeline.reconcile(oracle)


def test_sink_killed_between_insert_and_offset_commit(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, items = simulated(200, 6_000, seed=13)
    pipeline.publish_subscriptions(sim.subscriptions())
    oracle = Oracle(sim.subscriptions())
    produce(pipeline.settings, items, oracle)
    pipeline.start_worker()
    crashed = threading.Event()
    real_commit = Sink._commit

    def die_before_commit(self: Sink, drained: Any) -> None:
        # The inserts of this flush are done; the process "dies" before the commit.
        crashed.set()
        raise SystemExit("sink killed between insert and commit")

    monkeypatch.setattr(Sink, "_commit", die_before_commit)
    sink = Sink(pipeline.settings, pipeline.store)
    with pytest.raises(SystemExit):
        while not crashed.is_set():
            sink.poll(0.5)
            sink.flush()
    sink.abandon()  # gone without committing
    monkeypatch.setattr(Sink, "_commit", real_commit)
    pipeline.start_sink()  # a new member replays from the last commit
    pipeline.drain()
    pipeline.reconcile(oracle)


def test_duplicate_storm(pipeline: Pipeline) -> None:
    sim, items = simulated(200, 4_000, seed=14)
    pipeline.publish_subscriptions(sim.subscriptions())
    oracle = Oracle(sim.subscriptions())
    pipeline.start_worker()
    pipeline.start_sink()
    produce(pipeline.settings, items, oracle)  # first copies
    produce(pipeline.settings, items[::-1], oracle)  # second copies, reversed, right after
    pipeline.drain()
    assert pipeline.worker is not None
    pipeline.worker.stop()  # SIGTERM: a graceful restart between the copies
    pipeline.start_worker()  # third copies reach it, well after the first were landed
    produce(pipeline.settings, items, oracle)
    pipeline.drain()
    pipeline.reconcile(oracle)
    db = pipeline.settings.clickhouse.database
    _, rows = pipeline.store.query(f"SELECT count() FROM {db}.priced_events FINAL")
    assert rows[0][0] == len(oracle.events)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
fuzz = st.lists(
    st.one_of(st.binary(max_size=300), json_values.map(orjson.dumps)), min_size=150, max_size=150
)


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=fuzz)
def test_malformed_and_fuzzed_input_all_reach_the_dead_letters(
    make_settings: Any, garbage: list[bytes]
) -> None:
    pipe = Pipeline(fault_settings(make_settings))
    try:
        sim, items = simulated(100, 2_000, seed=15, malformed=0.02)
        pipe.publish_subscriptions(sim.subscriptions())
        oracle = Oracle(sim.subscriptions())
        mixed: list[Any] = []
        for i, item in enumerate(items):
            mixed.append(item)
            if i % 13 == 0 and garbage:
                mixed.append(garbage.pop())
        mixed.extend(garbage)
        mixed.append(b"x" * 20_000)  # oversized
        produce(pipe.settings, mixed, oracle)
        pipe.start_worker()
        pipe.start_sink()
        pipe.drain()
        assert pipe.worker is not None and pipe.worker.proc.poll() is None  # still up
        pipe.reconcile(oracle)
        db = pipe.settings.clickhouse.database
        _, rows = pipe.store.query(f"SELECT countIf(reason = '') FROM {db}.dead_letters FINAL")
        assert rows[0][0] == 0  # every dead letter says why
    finally:
        pipe.close()


def test_out_of_order_and_beyond_grace_late_events(make_settings: Any) -> None:
    pipe = Pipeline(fault_settings(make_settings, grace_s=30, window_s=60))
    try:
        sim, items = simulated(100, 3_000, seed=16, out_of_order=0.05)
        pipe.publish_subscriptions(sim.subscriptions())
        oracle = Oracle(sim.subscriptions())
        # Stragglers: copies of real events with new ids, dated 20 minutes before the stream's
        # start, sent last: far beyond the 30 s grace of their windows.
        late = []
        for i, item in enumerate(items[:200]):
            if isinstance(item, dict):
                straggler = dict(item)
                straggler["event_id"] = f"late-{i}"
                when = datetime.fromisoformat(item["occurred_at"]) - timedelta(minutes=20)
                straggler["occurred_at"] = when.isoformat()
                late.append(straggler)
        produce(pipe.settings, items + late, oracle)
        pipe.start_worker()
        pipe.start_sink()
        pipe.drain()
        # Alerts depend on which events each window still counted; only uniqueness is checked.
        pipe.reconcile(oracle, alerts=False)
        db = pipe.settings.clickhouse.database
        _, rows = pipe.store.query(f"SELECT countIf(late) FROM {db}.priced_events FINAL")
        assert rows[0][0] >= len(late)
        _, rows = pipe.store.query(f"SELECT count() FROM {db}.rollups FINAL WHERE segment != 0")
        assert rows[0][0] >= len(late)
        _, rows = pipe.store.query(f"SELECT count(), uniqExact(alert_id) FROM {db}.alerts FINAL")
        assert rows[0][0] == rows[0][1]
    finally:
        pipe.close()


def _raw_event(event_id: str, user: str, **fields: Any) -> bytes:
    """A contract-shaped event as raw bytes (UsageProducer would refuse most of these)."""
    base = {
        "event_id": event_id,
        "occurred_at": "2026-11-03T08:00:00Z",
        "org_id": "org-poison",
        "user_id": user,
        "gateway": "gw",
        "requested_model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 10,
    }
    return orjson.dumps({**base, **fields})


def test_poison_records_in_a_normal_stream(make_settings: Any) -> None:
    # Records that once stopped metering (a year-1 time crashed the agent for good) or moved a
    # partition's watermark 40 days ahead (every later event there went to the dead letters),
    # mixed into a normal stream: the totals are exact, the poison is in the dead letters with
    # its reason, and the worker is still up.
    from producers import UsageProducer

    pipe = Pipeline(fault_settings(make_settings))
    try:
        sim, items = simulated(100, 2_000, seed=17)
        pipe.publish_subscriptions(sim.subscriptions())
        # A subscription record that bypassed `subscriptions load`: a year-1 billing anchor.
        anchor_user = "poison-anchor-user"
        bad_subscription = orjson.dumps(
            {
                "user_id": anchor_user,
                "org_id": "org-poison",
                "timezone": "Pacific/Kiritimati",
                "billing_anchor": "0001-01-01T00:00:00+01:00",
                "plans": [{"plan_id": "pro", "effective_at": "0001-01-01T00:00:00Z"}],
            }
        )
        with UsageProducer(pipe.settings, topic=pipe.settings.topics.subscriptions) as subs:
            subs.send_raw(anchor_user, bad_subscription)
        oracle = Oracle(sim.subscriptions())
        # The worker skips it (the user is priced without a plan); the sink, which lands
        # subscriptions, dead-letters it.
        oracle.malformed.append(bad_subscription)
        future = (datetime.now(UTC) + timedelta(days=40)).isoformat()
        users = sorted({item["user_id"] for item in items if isinstance(item, dict)})
        poison: list[Any] = [
            _raw_event("p-year-1", users[0], occurred_at="0001-01-01T00:00:00+01:00"),
            _raw_event("p-year-9999", users[1], occurred_at="9999-12-31T23:30:00-01:00"),
            _raw_event("p-future", users[2], occurred_at=future),
            _raw_event("p-tokens", users[3], input_tokens=10**12),
            _raw_event("p-latency", users[4], latency_ms=10**12),
            # Valid and counted: the largest event the contract takes, and a user whose only
            # subscription record is unreadable (priced without a plan).
            {
                "event_id": "max-event",
                "occurred_at": "2026-11-03T08:00:30Z",
                "org_id": "org-poison",
                "user_id": users[5],
                "gateway": "gw",
                "requested_model": "o1-pro",
                "input_tokens": 10**8,
                "output_tokens": 10**8,
                "latency_ms": 7 * 86_400_000,
            },
            *(
                {
                    "event_id": f"anchor-{i}",
                    "occurred_at": f"2026-11-03T08:0{i}:00Z",
                    "org_id": "org-poison",
                    "user_id": anchor_user,
                    "gateway": "gw",
                    "requested_model": "gpt-4o",
                    "input_tokens": 100,
                }
                for i in range(3)
            ),
        ]
        mixed: list[Any] = []
        for i, item in enumerate(items):
            mixed.append(item)
            if i % 200 == 100 and poison:
                mixed.append(poison.pop(0))
        mixed.extend(poison)
        produce(pipe.settings, mixed, oracle)
        pipe.start_worker()
        pipe.start_sink()
        pipe.drain()
        assert pipe.worker is not None and pipe.worker.proc.poll() is None  # still up
        pipe.reconcile(oracle)
        db = pipe.settings.clickhouse.database
        _, rows = pipe.store.query(
            f"SELECT JSONExtractString(payload, 'event_id'), stage, reason "
            f"FROM {db}.dead_letters FINAL ORDER BY 1"
        )
        letters = {r[0]: (r[1], r[2]) for r in rows}
        assert set(letters) == {
            "",  # the subscription record
            "p-year-1",
            "p-year-9999",
            "p-future",
            "p-tokens",
            "p-latency",
        }
        assert letters["p-future"][0] == "event_time"
        assert "2000-01-01" in letters["p-year-1"][1]
        assert "input_tokens" in letters["p-tokens"][1]
        _, rows = pipe.store.query(
            f"SELECT cost FROM {db}.priced_events FINAL WHERE event_id = 'max-event'"
        )
        assert rows == [(Decimal("75000"),)]  # 10^8 * 0.00015 + 10^8 * 0.0006 (o1-pro)
    finally:
        pipe.close()


def _restored_records(log: Any) -> int:
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(int(n) for n in re.findall(r"restored: (\d+) changelog records", text))


def test_restart_on_a_large_state_same_folder_then_a_fresh_one(
    pipeline: Pipeline, record_property: Any
) -> None:
    # A day's dedupe index and every window must survive a restart exactly: the same folder
    # reopens and reads only what the changelog gained since; a fresh folder restores it all.
    # Resent copies of already-counted events check that the restored index still knows them.
    sim, items = simulated(300, 20_000, seed=17, duplicates=0.01)
    pipeline.publish_subscriptions(sim.subscriptions())
    oracle = Oracle(sim.subscriptions())
    first, second = items[:16_000], items[16_000:]
    produce(pipeline.settings, first, oracle)
    pipeline.start_sink()
    pipeline.start_worker()
    pipeline.drain()
    assert pipeline.worker is not None
    pipeline.worker.stop()  # SIGTERM
    built = priced_count(pipeline)
    store = pipeline.settings.state_dir / "store"
    assert any(store.rglob("CURRENT")), "no local state was written"

    resent = [i for i in first[:3_000] if isinstance(i, dict)]
    produce(pipeline.settings, resent + second[:2_000], oracle)
    t0 = time.monotonic()
    worker = pipeline.start_worker()
    wait_until(lambda: priced_count(pipeline) > built, 120, "nothing priced after the restart")
    blind_same = time.monotonic() - t0
    same_read = _restored_records(worker.log_path)
    pipeline.drain()
    worker.kill()  # SIGKILL, then the folder is lost too: a new machine
    shutil.rmtree(store)

    produce(pipeline.settings, resent[:500] + second[2_000:], oracle)
    t0 = time.monotonic()
    worker = pipeline.start_worker()
    wait_until(
        lambda: priced_count(pipeline) > built + 2_000, 180, "nothing priced on a new folder"
    )
    blind_fresh = time.monotonic() - t0
    fresh_read = _restored_records(worker.log_path)
    pipeline.drain()
    pipeline.reconcile(oracle)
    record_property("blind_s_same_folder", round(blind_same, 2))
    record_property("blind_s_fresh_folder", round(blind_fresh, 2))
    print(f"blind after restart: same folder {blind_same:.2f} s, fresh folder {blind_fresh:.2f} s")
    # The same folder read (at most) the last writes it had not stored; the fresh one all of it.
    assert fresh_read >= 16_000
    assert same_read < fresh_read / 20, (same_read, fresh_read)
