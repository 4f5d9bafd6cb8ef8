"""spendstream.metrics: families fed by real batch results, scrape-time collectors, the endpoint."""

from __future__ import annotations

import gc
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from producers import DiskSpool, SpoolFullError
from sinks import SinkCounters
from spendstream import metrics
from stream_processors import DictState, InRecord, PriceCatalog, UsageProcessor

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def event(i: int, model: str = "gpt-4o") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"m{i}",
            "occurred_at": NOW.isoformat(),
            "org_id": "o",
            "user_id": "u1",
            "gateway": "gw",
            "requested_model": model,
            "input_tokens": 10,
            "output_tokens": 5,
        }
    )


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def test_worker_counters_from_a_real_batch_result() -> None:
    processor = UsageProcessor(
        PriceCatalog.load(),
        lambda _user: None,
        seen=DictState(),
        windows=DictState(),
        marks=DictState(),
    )
    values = [event(1), event(1), event(2, model="no-such-model-anywhere"), b"{not json"]
    records = [InRecord("usage.events", 0, i, b"u1", v) for i, v in enumerate(values)]
    result = processor.process(records, NOW)

    names = (
        "spendstream_worker_events_in_total",
        "spendstream_worker_events_out_total",
        "spendstream_worker_duplicates_total",
        "spendstream_worker_dead_letters_total",
        "spendstream_worker_unknown_model_total",
        "spendstream_worker_batches_total",
        "spendstream_worker_batch_size_count",
        "spendstream_worker_batch_size_sum",
    )
    before = {n: metrics.value(n) for n in names}
    dup_before = metrics.value("spendstream_worker_counter_total", {"counter": "duplicates"})
    metrics.observe_worker_batch(result.counters, size=len(records))
    delta = {n: metrics.value(n) - before[n] for n in names}
    assert delta == {
        "spendstream_worker_events_in_total": 4,
        "spendstream_worker_events_out_total": 2,
        "spendstream_worker_duplicates_total": 1,
        "spendstream_worker_dead_letters_total": 1,
        "spendstream_worker_unknown_model_total": 1,
        "spendstream_worker_batches_total": 1,
        "spendstream_worker_batch_size_count": 1,
        "spendstream_worker_batch_size_sum": 4,
    }
    dup_after = metrics.value("spendstream_worker_counter_total", {"counter": "duplicates"})
    assert dup_after - dup_before == 1

    # Caps counters go to the labelled family only and do not count a second batch.
    metrics.observe_worker_batch({"caps_alerts": 2})
    assert metrics.value("spendstream_worker_counter_total", {"counter": "caps_alerts"}) >= 2
    assert metrics.value("spendstream_worker_batches_total") - before[names[5]] == 1


def test_sink_counters_and_insert_latency() -> None:
    counters = SinkCounters(rows_in=7, rows_inserted=5, retries=1, per_table={"rollups": 5})
    metrics.watch_sink(counters)
    metrics.observe_insert("rollups", 5, 0.02)
    assert metrics.value("spendstream_sink_rows_in_total") >= 7
    assert metrics.value("spendstream_sink_rows_inserted_by_table_total", {"table": "rollups"}) >= 5
    assert metrics.value("spendstream_sink_insert_seconds_count", {"table": "rollups"}) >= 1
    assert metrics.value("spendstream_sink_batch_rows_sum", {"table": "rollups"}) >= 5
    before = metrics.value("spendstream_sink_rows_in_total")
    counters.rows_in += 3  # read at scrape time: no call needed
    assert metrics.value("spendstream_sink_rows_in_total") == before + 3
    del counters
    gc.collect()
    assert metrics.value("spendstream_sink_rows_in_total") == before - 7  # gone with its sink


def test_spool_depth_and_policy_counters(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=4096, full_policy="reject")
    metrics.watch_spool(spool)
    labels = {"spool": str(tmp_path)}
    for _ in range(3):
        spool.append("t", "u", b"x" * 100)
    assert metrics.value("spendstream_producer_spool_records", labels) == 3
    assert metrics.value("spendstream_producer_spool_bytes", labels) == spool.stats().bytes
    with pytest.raises(SpoolFullError):
        for _ in range(100):
            spool.append("t", "u", b"x" * 100)
    assert metrics.value("spendstream_producer_spool_rejected_total", labels) == 1
    assert b"spendstream_producer_spool_bytes{" in metrics.render()
    assert metrics.value("spendstream_producer_spool_lost_records_total", labels) == 0
    write_errors = {**labels, "op": "write"}
    assert metrics.value("spendstream_producer_spool_io_errors_total", write_errors) == 0
    spool.close()


@pytest.fixture
def endpoint() -> Iterator[tuple[metrics.MetricsServer, dict[str, Any]]]:
    state: dict[str, Any] = {"ok": True, "raise": False}

    def health() -> Mapping[str, Any]:
        if state["raise"]:
            raise RuntimeError("broker unreachable")
        return {"ok": state["ok"], "details": {"lag": 3}}

    server = metrics.serve(0, health, host="127.0.0.1")
    try:
        yield server, state
    finally:
        server.close()


def test_endpoint_serves_metrics_and_health(
    endpoint: tuple[metrics.MetricsServer, dict[str, Any]],
) -> None:
    server, state = endpoint
    metrics.observe_worker_batch({"in": 1}, size=1)
    status, body, ctype = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    assert "# TYPE spendstream_worker_events_in_total counter" in text
    assert "spendstream_worker_batch_size_bucket" in text
    assert "_created" not in text

    status, body, ctype = get(server.url + "/health")
    assert (status, json.loads(body), ctype) == (
        200,
        {"ok": True, "details": {"lag": 3}},
        "application/json",
    )
    state["ok"] = False
    status, body, _ = get(server.url + "/health")
    assert status == 503 and json.loads(body)["ok"] is False
    state["raise"] = True
    status, body, _ = get(server.url + "/health")
    assert status == 503
    assert json.loads(body) == {
        "ok": False,
        "details": {"error": "RuntimeError: broker unreachable"},
    }
    assert get(server.url + "/nope")[0] == 404


def test_health_response_without_details_key() -> None:
    assert metrics.health_response(lambda: {"ok": True, "lag": 0}) == (
        200,
        {"ok": True, "details": {"lag": 0}},
    )
    assert metrics.health_response(lambda: {})[0] == 503  # no "ok": not healthy


class _FlakyProbe(metrics.LagProbe):
    """A probe whose reads fail while ``failing`` is set (no broker involved)."""

    failing = True

    def probe(self) -> int:
        if self.failing:
            raise RuntimeError("coordinator moving")
        return metrics.set_lag(self.group, {("t", 0): 4})


def test_lag_probe_tolerates_a_transient_failure_then_turns_unhealthy() -> None:
    probe = _FlakyProbe({}, "g-probe", ["t"], interval_s=0.05, tolerance_s=0.5)
    try:
        time.sleep(0.2)
        assert probe.error == "coordinator moving" and probe.ok(), "tolerated at first"
        time.sleep(0.6)
        assert not probe.ok(), "failing for longer than the tolerance"
        probe.failing = False
        time.sleep(0.3)
        assert probe.ok() and probe.error is None and probe.total == 4
        labels = {"group": "g-probe", "topic": "t", "partition": "0"}
        assert metrics.value("spendstream_consumer_lag", labels) == 4
    finally:
        probe.close()


@pytest.mark.parametrize(
    ("lag", "idle_s", "stalled"),
    [
        (0, 10_000.0, False),  # idle, nothing to do
        (None, 10_000.0, False),  # lag unknown: the lag probe reports the broker
        (5, 119.0, False),
        (5, 121.0, True),  # input waiting, no batch for longer than stall_after_s
    ],
)
def test_a_worker_with_lag_and_no_batch_is_stalled(
    lag: int | None, idle_s: float, stalled: bool
) -> None:
    from spendstream.worker import worker_stalled

    assert worker_stalled(lag, idle_s, 120.0) is stalled


def test_a_restore_in_progress_is_published_then_cleared() -> None:
    from stream_processors._store import RestoreProgress

    progress = RestoreProgress(left={"seen": 1200, "windows": 30}, partitions=[0, 3])
    progress.started = time.monotonic()
    metrics.watch_restore(progress)
    assert metrics.value("spendstream_worker_recovering", {}) == 1
    assert metrics.value("spendstream_worker_restore_records_left", {"table": "seen"}) == 1200
    snap = progress.snapshot()
    assert snap["recovering"] and snap["records_left"] == {"seen": 1200, "windows": 30}
    progress.left = {"seen": 0, "windows": 0}
    progress.restored = 1230
    progress.finished = time.monotonic()
    assert metrics.value("spendstream_worker_recovering", {}) == 0
    assert metrics.value("spendstream_worker_restore_records", {}) == 1230
    assert not progress.snapshot()["recovering"]
