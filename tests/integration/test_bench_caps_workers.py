"""The caps latency section with two workers in one group, on the real broker."""

from __future__ import annotations

from spendstream.bench import caps_latency
from spendstream.settings import Settings


def test_two_workers_deliver_every_expected_alert_and_rollup(settings: Settings) -> None:
    figures = caps_latency(settings, rate=500, seconds=10.0, workers=2)
    assert figures["workers"] == 2
    # 100 users, 50 events each: every user crosses all five thresholds of the free plan once.
    assert figures["alerts_expected"] == 500
    assert figures["alerts"] == figures["alerts_expected"]
    assert 0 < figures["alert_p50_ms"] <= figures["alert_p95_ms"] <= figures["alert_p99_ms"]
    # Every event is counted by a rollup upsert, whichever worker priced it.
    assert figures["events_in_a_rollup"] == figures["events"] == 5_000
    assert 0 < figures["rollup_p50_ms"] <= figures["rollup_p95_ms"] <= figures["rollup_p99_ms"]
