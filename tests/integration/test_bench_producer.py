"""The producer section of the benchmark, small, on the real broker."""

from __future__ import annotations

import pytest

from spendstream.bench.producer import run_producer_bench
from spendstream.kafka_admin import topic_partitions
from spendstream.settings import Settings

pytestmark = pytest.mark.integration


def test_both_runs_deliver_every_event_and_clean_up(settings: Settings) -> None:
    figures = run_producer_bench(settings, n=3_000, warm_up=1_000)
    assert figures["events"] == 3_000
    assert figures["delivered"] == 3_000  # the validated run: every send acknowledged
    assert figures["validated_per_s"] > 0 and figures["raw_per_s"] > 0
    assert figures["ratio"] == round(figures["validated_per_s"] / figures["raw_per_s"], 3)
    assert figures["broker_warm_up_messages"] == 1_000
    assert figures["mean_event_bytes"] > 100
    conf = settings.kafka.confluent_config()
    assert not [t for t in topic_partitions(conf) if t.startswith("bench.")]
