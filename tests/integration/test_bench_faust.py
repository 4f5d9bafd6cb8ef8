"""The faust ceiling benchmark job, on the real broker: it consumes every input event once."""

from __future__ import annotations

import pytest

from spendstream.bench.faust_ceiling import PATHS, faust_ceiling_rate
from spendstream.bench.worker import BenchInput, bench_input
from spendstream.settings import Settings


@pytest.mark.parametrize("path", PATHS)
def test_faust_ceiling_counts_every_event_once(settings: Settings, path: str) -> None:
    settings = settings.model_copy(
        update={"processor": settings.processor.model_copy(update={"batch_size": 1_000})}
    )
    with bench_input(settings, 3_000, 50, name=f"t-ceiling-{path}") as data:
        figures = faust_ceiling_rate(data, path)
    # Batches are cut by size and time; every event is counted exactly once in total.
    assert figures["path"] == path
    assert figures["events"] == 3_000
    assert figures["batches"] >= 3  # 3,000 events in batches of at most batch_size (1,000)
    assert figures["events_per_s"] > 0


def test_faust_ceiling_refuses_an_unknown_path(settings: Settings) -> None:
    data = BenchInput(settings, "p", settings.state_dir, [], [], 0)
    with pytest.raises(ValueError, match="lane, stream"):
        faust_ceiling_rate(data, "bogus")
