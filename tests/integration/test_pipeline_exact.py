"""End to end on the real broker and real ClickHouse (chDB): exact to the last decimal digit.

20,000 simulated gateway items with 2 % duplicates, 1 % malformed and 5 % out of order go
through the real worker (a child process) and the real sink; the raw and rollup totals per user
and per plan in ClickHouse must equal the sums the oracle computes from the unique valid events,
every alert must be there exactly once, and the dead-letter table must hold exactly the malformed
messages, with reasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pipeline_support import Oracle, Pipeline, produce

from spendstream.settings import Settings
from spendstream.simulate import Simulator

N_ITEMS = 20_000
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def pipeline(topics: Settings) -> Iterator[Pipeline]:
    pipe = Pipeline(topics)
    yield pipe
    pipe.close()


def test_raw_and_rollup_totals_are_exact_per_user(pipeline: Pipeline) -> None:
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
    pipeline.publish_subscriptions(sim.subscriptions())  # before the worker reads them
    pipeline.start_worker()
    pipeline.start_sink()
    oracle = Oracle(sim.subscriptions())
    items = [item.payload for _, item in zip(range(N_ITEMS), sim.stream(), strict=False)]
    produce(pipeline.settings, items, oracle)
    assert len(oracle.malformed) > 100 and len(oracle.events) > 18_000
    pipeline.drain()

    pipeline.reconcile(oracle)
    db = pipeline.settings.clickhouse.database
    _, rows = pipeline.store.query(f"SELECT sum(cost) FROM {db}.priced_events FINAL")
    assert isinstance(rows[0][0], Decimal)
    _, rows = pipeline.store.query(f"SELECT countIf(reason = '') FROM {db}.dead_letters FINAL")
    assert rows[0][0] == 0
