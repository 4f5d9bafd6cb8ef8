"""The faust ceiling benchmark job, on the real broker: it consumes every input event once."""

from __future__ import annotations

from spendstream.bench_faust import faust_ceiling_rate
from spendstream.bench_worker import bench_input
from spendstream.settings import Settings


def test_faust_ceiling_counts_every_event_once(settings: Settings) -> None:
    with bench_input(settings, 3_000, 50, name="t-ceiling") as data:
        figures = faust_ceiling_rate(data)
    # Batches are cut by size and time; every event is counted exactly once in total.
    assert figures["events"] == 3_000
    assert figures["batches"] >= 2  # 3,000 events in batches of at most batch_size (2,000)
    assert figures["events_per_s"] > 0
