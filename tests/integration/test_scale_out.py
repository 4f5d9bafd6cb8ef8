"""Scale-out: two workers in one consumer group give exactly what one worker gives.

The same 6,000 simulated items (duplicates, out-of-order and a few malformed events, 6
partitions) go through the real pipeline twice, each run on topics, consumer groups and a chDB
database of its own (one chDB folder: chDB opens one folder per process):

(a) one worker process;
(b) two worker processes with the same settings (the same ``processor.app_id``, so one consumer
    group sharing the partitions).

Each run is reconciled against the oracle (per-user and per-plan totals to the last digit, every
alert once, every malformed message in the dead letters), and the two runs must then be equal
to each other: per-user totals of ``priced_events FINAL`` and ``rollups FINAL``, every priced
event's window and lateness, every rollup window and segment, and the set of alert ids. Both
workers of (b) must own partitions of the input topic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from pipeline_support import Oracle, Pipeline, produce

from spendstream.bench.worker import isolated
from spendstream.kafka_admin import ensure_topics
from spendstream.runner import WorkerProcess, wait_for_lag_zero
from spendstream.settings import Settings
from spendstream.simulate import Simulator

START = datetime(2026, 11, 3, 8, 0, tzinfo=UTC)
N_ITEMS = 6_000
FAST_FAILOVER = {"session_timeout_s": 6}
"""As in the fault suite: a member that leaves is noticed within 6 s, not 30."""


@dataclass
class Outcome:
    """What one run left in ClickHouse, and how it went."""

    priced_per_user: list[tuple[Any, ...]]
    rollups_per_user: list[tuple[Any, ...]]
    priced_events: list[tuple[Any, ...]]
    rollup_windows: list[tuple[Any, ...]]
    alert_ids: set[str]
    assignment: dict[str, list[int]]
    drain_s: float


def assignment(settings: Settings) -> dict[str, list[int]]:
    """Member id -> input partitions it owns in the workers' consumer group."""
    from confluent_kafka.admin import AdminClient

    group, topic = settings.processor.app_id, settings.topics.events
    admin = AdminClient(settings.kafka.confluent_config())
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return {
        m.member_id: sorted(
            tp.partition for tp in m.assignment.topic_partitions if tp.topic == topic
        )
        for m in desc.members
    }


def wait_assigned(settings: Settings, members: int, workers: list[WorkerProcess]) -> None:
    """Until ``members`` members own every input partition, each at least one."""
    deadline = time.monotonic() + 90
    while True:
        for w in workers:
            w.check_alive()
        try:
            owned = assignment(settings)
        except KafkaException:  # the group is new: its coordinator may not be known yet
            owned = {}
        parts = [p for ps in owned.values() for p in ps]
        if (
            len(owned) == members
            and all(owned.values())
            and sorted(parts) == list(range(settings.topics.partitions))
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the group never settled on {members} member(s): {owned}")
        time.sleep(0.2)


def run(settings: Settings, items: list[Any], sim: Simulator, workers: int) -> Outcome:
    """Start ``workers`` workers, let them settle, produce ``items``, drain, reconcile."""
    pipe = Pipeline(settings)
    procs: list[WorkerProcess] = []
    try:
        pipe.publish_subscriptions(sim.subscriptions())
        pipe.start_sink()
        procs = [
            WorkerProcess(settings, settings.state_dir / f"worker-{i}.log") for i in range(workers)
        ]
        wait_assigned(settings, workers, procs)
        oracle = Oracle(sim.subscriptions())
        produce(settings, items, oracle)
        t0 = time.monotonic()

        def alive() -> None:
            for w in procs:
                w.check_alive()

        s = settings
        wait_for_lag_zero(s, s.processor.app_id, [s.topics.events], 120, check=alive)
        drain_s = time.monotonic() - t0
        owned = assignment(settings)  # after the work: still both members, no rebalance
        pipe.drain()
        pipe.reconcile(oracle)
        return snapshot(pipe, owned, drain_s)
    finally:
        for w in procs:
            w.stop()
        pipe.close()


def snapshot(pipe: Pipeline, owned: dict[str, list[int]], drain_s: float) -> Outcome:
    db = pipe.settings.clickhouse.database
    q = pipe.store.query
    priced_per_user = q(
        "SELECT user_id, count(), sum(input_tokens), sum(output_tokens), sum(cost), "
        f"sum(list_value) FROM {db}.priced_events FINAL GROUP BY user_id ORDER BY user_id"
    )[1]
    rollups_per_user = q(
        "SELECT user_id, sum(requests), sum(input_tokens), sum(output_tokens), sum(cost), "
        f"sum(list_value) FROM {db}.rollups FINAL GROUP BY user_id ORDER BY user_id"
    )[1]
    priced_events = q(
        "SELECT event_id, user_id, served_model, window_start, late, cost, list_value "
        f"FROM {db}.priced_events FINAL ORDER BY event_id"
    )[1]
    rollup_windows = q(
        "SELECT user_id, served_model, window_start, segment, requests, input_tokens, "
        f"output_tokens, cost, list_value FROM {db}.rollups FINAL "
        "ORDER BY user_id, served_model, window_start, segment"
    )[1]
    alert_ids = {r[0] for r in q(f"SELECT DISTINCT alert_id FROM {db}.alerts")[1]}
    return Outcome(
        [tuple(r) for r in priced_per_user],
        [tuple(r) for r in rollups_per_user],
        [tuple(r) for r in priced_events],
        [tuple(r) for r in rollup_windows],
        alert_ids,
        owned,
        drain_s,
    )


def run_settings(make_settings: Any, tmp_path: Path, name: str) -> Settings:
    """Topics, groups and state of the run ``name``; its own database in the shared chDB."""
    base: Settings = make_settings(
        processor=FAST_FAILOVER,
        clickhouse={"embedded_path": tmp_path / "chdb", "database": f"scale_{name}"},
    )
    settings = isolated(base, f"{make_settings.prefix}-{name}", tmp_path / name)
    ensure_topics(settings)
    return settings


def test_two_workers_in_one_group_equal_one_worker_and_the_oracle(
    make_settings: Any, tmp_path: Path
) -> None:
    sim = Simulator(
        400, seed=23, start=START, rate=50.0, rhythm=False,
        duplicates=0.03, out_of_order=0.05, malformed=0.005,
    )  # fmt: skip
    items = [item.payload for _, item in zip(range(N_ITEMS), sim.stream(), strict=False)]

    one = run(run_settings(make_settings, tmp_path, "one"), items, sim, workers=1)
    two = run(run_settings(make_settings, tmp_path, "two"), items, sim, workers=2)

    assert len(one.assignment) == 1
    assert len(two.assignment) == 2, two.assignment
    assert all(two.assignment.values()), f"a worker owned no partition: {two.assignment}"
    print(
        f"\nscale-out: one worker drained in {one.drain_s:.1f} s {one.assignment}; "
        f"two workers in {two.drain_s:.1f} s {two.assignment}"
    )
    assert len(one.priced_events) == len({e[0] for e in one.priced_events}) > 5_000
    assert one.alert_ids, "the traffic fired no alert: the alert comparison would be empty"
    assert two.priced_per_user == one.priced_per_user
    assert two.rollups_per_user == one.rollups_per_user
    assert two.priced_events == one.priced_events
    assert two.rollup_windows == one.rollup_windows
    assert two.alert_ids == one.alert_ids
