"""End to end on the real broker and real ClickHouse (chDB): exact to the last decimal digit.

20,000 simulated gateway items with 2 % duplicates, 1 % malformed and 5 % out of order go
through the real worker (a child process) and the real sink; the raw and rollup totals per user
in ClickHouse must equal the sums this test computes itself from the unique valid events, and the
dead-letter table must hold exactly the malformed messages, with reasons.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from producers import UsageProducer, publish_subscriptions
from schemas import event_from_obj
from sinks import Sink, open_store
from spendstream.runner import WorkerProcess, wait_for_lag_zero
from spendstream.settings import Settings
from spendstream.simulate import Simulator
from stream_processors import PriceCatalog, units_to_decimal

N_ITEMS = 20_000
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class Oracle:
    """What ClickHouse must hold, computed from what the test produced."""

    def __init__(self) -> None:
        self.catalog = PriceCatalog.load()
        self.seen: set[str] = set()
        self.requests: dict[str, int] = defaultdict(int)
        self.input_tokens: dict[str, int] = defaultdict(int)
        self.output_tokens: dict[str, int] = defaultdict(int)
        self.cost: dict[str, Decimal] = defaultdict(Decimal)
        self.list_value: dict[str, Decimal] = defaultdict(Decimal)
        self.malformed: list[bytes] = []

    def add(self, payload: dict[str, Any] | bytes) -> None:
        if isinstance(payload, bytes):
            self.malformed.append(payload)
            return
        event = event_from_obj(payload)
        if event.event_id in self.seen:
            return
        self.seen.add(event.event_id)
        quote = self.catalog.quote(event)
        user = event.user_id
        self.requests[user] += 1
        self.input_tokens[user] += event.input_tokens
        self.output_tokens[user] += event.output_tokens
        self.cost[user] += units_to_decimal(quote.cost)
        self.list_value[user] += units_to_decimal(quote.list_value)


def produce_traffic(settings: Settings, sim: Simulator, n: int) -> Oracle:
    oracle = Oracle()
    publish_subscriptions(settings, sim.subscriptions())
    with UsageProducer(settings) as producer:
        for i, item in enumerate(sim.stream()):
            if i >= n:
                break
            oracle.add(item.payload)
            if isinstance(item.payload, bytes):
                producer.send_raw(b"malformed", item.payload)
            else:
                producer.send(item.payload)
    return oracle


@pytest.fixture
def pipeline(topics: Settings) -> Iterator[Callable[[], tuple[Settings, Any, WorkerProcess]]]:
    """Starts a worker process and an in-process sink over chDB; stops them afterwards."""
    started: list[Any] = []

    def start() -> tuple[Settings, Any, WorkerProcess]:
        settings = topics
        store = open_store(settings, command="pytest")
        store.migrate()
        worker = WorkerProcess(settings, settings.state_dir / "worker.log")
        sink = Sink(settings, store)
        stop = threading.Event()
        thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
        thread.start()
        started.append((worker, sink, stop, thread, store))
        return settings, store, worker

    yield start
    for worker, sink, stop, thread, store in started:
        worker.stop()
        stop.set()
        thread.join(30)
        sink.close()
        store.close()


def drain(settings: Settings, worker: WorkerProcess) -> None:
    wait_for_lag_zero(
        settings, settings.processor.app_id, [settings.topics.events], 300, check=worker.check_alive
    )
    wait_for_lag_zero(
        settings,
        settings.sink.group_id,
        [settings.topics.priced, settings.topics.rollups, settings.topics.dlq],
        300,
    )


def test_raw_and_rollup_totals_are_exact_per_user(
    pipeline: Callable[[], tuple[Settings, Any, WorkerProcess]],
) -> None:
    settings, store, worker = pipeline()
    sim = Simulator(
        400,
        seed=20261127,
        start=START,
        rate=400.0,
        rhythm=False,
        duplicates=0.02,
        malformed=0.01,
        out_of_order=0.05,
    )
    oracle = produce_traffic(settings, sim, N_ITEMS)
    assert len(oracle.malformed) > 100 and len(oracle.seen) > 18_000
    drain(settings, worker)

    db = settings.clickhouse.database
    _, rows = store.query(
        f"SELECT user_id, count(), sum(input_tokens), sum(output_tokens), sum(cost), "
        f"sum(list_value), uniqExact(event_id) FROM {db}.priced_events FINAL GROUP BY user_id"
    )
    raw = {r[0]: r[1:] for r in rows}
    assert set(raw) == set(oracle.requests)
    for user, (count, tin, tout, cost, list_value, unique) in raw.items():
        assert count == unique == oracle.requests[user], user
        assert (tin, tout) == (oracle.input_tokens[user], oracle.output_tokens[user]), user
        assert cost == oracle.cost[user], user
        assert list_value == oracle.list_value[user], user
    assert isinstance(next(iter(raw.values()))[3], Decimal)

    _, rows = store.query(
        f"SELECT user_id, sum(requests), sum(input_tokens), sum(cost), sum(list_value) "
        f"FROM {db}.rollups FINAL GROUP BY user_id"
    )
    rolled = {r[0]: r[1:] for r in rows}
    assert set(rolled) == set(oracle.requests)
    for user, (requests, tin, cost, list_value) in rolled.items():
        assert requests == oracle.requests[user], user
        assert tin == oracle.input_tokens[user], user
        assert cost == oracle.cost[user], user
        assert list_value == oracle.list_value[user], user

    # hex(): the original bytes, some of them not UTF-8, compared without a text decoding step.
    _, rows = store.query(f"SELECT hex(payload), reason FROM {db}.dead_letters FINAL")
    assert sorted(bytes.fromhex(r[0]) for r in rows) == sorted(oracle.malformed)
    assert all(r[1] for r in rows)
