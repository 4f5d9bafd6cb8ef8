"""The caps latency section with two workers in one group, on the real broker."""

from __future__ import annotations

from spendstream.bench import caps_latency
from spendstream.settings import Settings


def test_two_workers_deliver_every_expected_alert(settings: Settings) -> None:
    figures = caps_latency(settings, rate=500, seconds=10.0, workers=2)
    assert figures["workers"] == 2
    # 100 users, 50 events each: every user crosses all five thresholds of the free plan once.
    assert figures["alerts_expected"] == 500
    assert figures["alerts"] == figures["alerts_expected"]
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
