"""The worker section with two worker processes in one group, on the real broker."""

from __future__ import annotations

import pytest

from spendstream.bench.worker import run_worker_bench
from spendstream.settings import Settings

pytestmark = pytest.mark.integration


def test_two_worker_processes_price_every_event_and_share_the_partitions(
    settings: Settings,
) -> None:
    figures = run_worker_bench(settings, events=6_000, users=60, processes=2)
    assert figures["processes"] == 2 and figures["events"] == 6_000
    # The section waits until every event is priced; a worker that exited fails it.
    assert figures["worker_events_per_s"] > 0 and figures["worker_steady_events_per_s"] > 0
    opened = [int(n) for n in figures["partitions_opened"].split(" / ")]
    assert len(opened) == 2 and all(n >= 1 for n in opened), opened
    assert sum(opened) >= settings.topics.partitions
    # The events were produced once the group was stable with both workers in it.
    assert figures["group_settle_s"] > 0
