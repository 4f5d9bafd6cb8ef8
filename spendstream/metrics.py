"""Prometheus metrics and the ``/metrics`` + ``/health`` endpoint of every deployable.

One :class:`~prometheus_client.CollectorRegistry` per process (:data:`REGISTRY`), metric
families named ``spendstream_*``. Two kinds of sources:

* pushed from the hot path where a distribution is needed: :func:`observe_worker_batch` (batch
  sizes, the worker's counters), :func:`observe_insert` (insert latency and rows per batch);
* read at scrape time from objects that already count (no cost per event): the sink's
  :class:`~sinks.SinkCounters` (:func:`watch_sink`) and the producer spools
  (:func:`watch_spool`). They are held by weak reference, so a watched object that goes away
  simply stops being reported.

Families (``_total`` is added to counters by the exposition format):

========================================  =========  ======================================
spendstream_worker_events_in               counter    events read by the worker
spendstream_worker_events_out              counter    events priced and published
spendstream_worker_dead_letters            counter    events sent to the dead-letter topic
spendstream_worker_duplicates              counter    events dropped as duplicates (event_id)
spendstream_worker_late_events             counter    events for an already closed window
spendstream_worker_unknown_model           counter    events priced by the fallback price
spendstream_worker_counter{counter}        counter    every key of BatchResult / CapOutputs
spendstream_worker_batches                 counter    batches processed
spendstream_worker_batch_size              histogram  events per batch
spendstream_sink_rows_in ... _commits      counter    the fields of SinkCounters
spendstream_sink_rows_inserted_by_table    counter    rows inserted, label ``table``
spendstream_sink_insert_seconds{table}     histogram  latency of one batch insert
spendstream_sink_batch_rows{table}         histogram  rows per inserted batch
spendstream_consumer_lag{group,topic,partition}  gauge  end offset - committed offset
spendstream_producer_spool_records{spool}  gauge      spooled events not yet acknowledged
spendstream_producer_spool_bytes{spool}    gauge      their bytes (bounded by spool_max_bytes)
spendstream_producer_spool_rejected{spool} counter    sends refused because the spool was full
spendstream_producer_spool_blocked{spool}  counter    sends that had to wait for room
========================================  =========  ======================================
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class DiskSpool(Protocol):
    """What the metrics read of a producer's spool (``producers.DiskSpool``): the core does
    not import the packages above it."""

    @property
    def path(self) -> Path: ...

    def stats(self) -> Any: ...


log = logging.getLogger(__name__)

# ``*_created`` timestamps double the exposition and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
"""The registry of this process: every spendstream metric and nothing else."""

# -- the worker ---------------------------------------------------------------------------------

_NAMED_WORKER_COUNTERS: Mapping[str, tuple[str, str]] = {
    "in": ("spendstream_worker_events_in", "Usage events read by the worker."),
    "priced": ("spendstream_worker_events_out", "Usage events priced and published."),
    "dead_letters": (
        "spendstream_worker_dead_letters",
        "Events sent to the dead-letter topic (any reason).",
    ),
    "duplicates": ("spendstream_worker_duplicates", "Events dropped as duplicates by event_id."),
    "late": ("spendstream_worker_late_events", "Events for a window already closed (late)."),
    "unknown_model": (
        "spendstream_worker_unknown_model",
        "Events whose model had no price (priced by the fallback).",
    ),
}
WORKER_NAMED = {
    key: Counter(name, doc, registry=REGISTRY)
    for key, (name, doc) in _NAMED_WORKER_COUNTERS.items()
}
WORKER_COUNTER = Counter(
    "spendstream_worker_counter",
    "Every counter of the worker's stages (BatchResult.counters and CapOutputs.counters).",
    ["counter"],
    registry=REGISTRY,
)
WORKER_BATCHES = Counter(
    "spendstream_worker_batches", "Batches processed by the worker.", registry=REGISTRY
)
WORKER_BATCH_SIZE = Histogram(
    "spendstream_worker_batch_size",
    "Events per worker batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 50_000),
    registry=REGISTRY,
)

# -- the sink -----------------------------------------------------------------------------------

SINK_INSERT_SECONDS = Histogram(
    "spendstream_sink_insert_seconds",
    "Latency of one batch insert into ClickHouse.",
    ["table"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
SINK_BATCH_ROWS = Histogram(
    "spendstream_sink_batch_rows",
    "Rows per batch inserted into ClickHouse.",
    ["table"],
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10_000, 50_000, 100_000, 500_000),
    registry=REGISTRY,
)

# -- consumers ----------------------------------------------------------------------------------

CONSUMER_LAG = Gauge(
    "spendstream_consumer_lag",
    "Messages between a consumer group's committed offset and the end of the partition.",
    ["group", "topic", "partition"],
    registry=REGISTRY,
)


def observe_worker_batch(counters: Mapping[str, int], *, size: int | None = None) -> None:
    """Add one batch's counters (``BatchResult.counters``, ``CapOutputs.counters``).

    ``size`` (events in the batch) feeds the batch-size histogram and the batch counter; pass
    it once per batch (with the processor's counters), not again with the caps counters.
    """
    for key, value in counters.items():
        if value:
            WORKER_COUNTER.labels(key).inc(value)
            named = WORKER_NAMED.get(key)
            if named is not None:
                named.inc(value)
    if size is not None:
        WORKER_BATCHES.inc()
        WORKER_BATCH_SIZE.observe(size)


def observe_insert(table: str, rows: int, seconds: float) -> None:
    """One successful batch insert of ``rows`` rows into ``table`` that took ``seconds``."""
    SINK_INSERT_SECONDS.labels(table).observe(seconds)
    SINK_BATCH_ROWS.labels(table).observe(rows)


def set_lag(group: str, lag: Mapping[tuple[str, int], int]) -> int:
    """Publish a group's lag per partition; return the total."""
    for (topic, partition), value in lag.items():
        CONSUMER_LAG.labels(group, topic, str(partition)).set(value)
    return sum(lag.values())


# -- scrape-time collectors -------------------------------------------------------------------

_SINK_FIELDS: Mapping[str, str] = {
    "rows_in": "Records read by the sink and buffered.",
    "duplicates": "Records the sink's buffer dropped as already held.",
    "rows_inserted": "Rows inserted into ClickHouse.",
    "dead_lettered": "Records the sink could not decode, stored as dead letters.",
    "batches": "Batch inserts done.",
    "retries": "Failed inserts retried.",
    "commits": "Offset commits after a stored batch.",
}


class _Watched(Collector):
    """Reads counters from live objects at scrape time (weak references)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: list[weakref.ref[Any]] = []
        self._spools: list[weakref.ref[DiskSpool]] = []
        self._restores: list[weakref.ref[Any]] = []

    def add_restore(self, progress: Any) -> None:
        with self._lock:
            self._restores.append(weakref.ref(progress))

    def add_sink(self, counters: Any) -> None:
        with self._lock:
            self._sinks.append(weakref.ref(counters))

    def add_spool(self, spool: DiskSpool) -> None:
        with self._lock:
            self._spools.append(weakref.ref(spool))

    def _live(self, refs: list[weakref.ref[Any]]) -> list[Any]:
        with self._lock:
            alive = [(r, r()) for r in refs]
            refs[:] = [r for r, obj in alive if obj is not None]
            return [obj for _, obj in alive if obj is not None]

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with what is watched; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_sinks(self._live(self._sinks))
        yield from self._collect_spools(self._live(self._spools))
        yield from self._collect_restores(self._live(self._restores))

    @staticmethod
    def _collect_restores(restores: list[Any]) -> Iterator[Metric]:
        if not restores:
            return
        recovering = GaugeMetricFamily(
            "spendstream_worker_recovering",
            "1 while the worker restores state from its changelogs (it prices nothing then).",
        )
        left = GaugeMetricFamily(
            "spendstream_worker_restore_records_left",
            "Changelog records the running restore has still to read, per table.",
            labels=["table"],
        )
        restored = GaugeMetricFamily(
            "spendstream_worker_restore_records",
            "Changelog records read by the last or running restore.",
        )
        seconds = GaugeMetricFamily(
            "spendstream_worker_restore_seconds",
            "Duration of the last or running restore.",
        )
        snaps = [r.snapshot() for r in restores]
        recovering.add_metric([], float(any(s["recovering"] for s in snaps)))
        totals: dict[str, int] = {}
        for snap in snaps:
            for table, n in snap["records_left"].items():
                totals[table] = totals.get(table, 0) + n
        for table, n in sorted(totals.items()):
            left.add_metric([table], float(n))
        restored.add_metric([], float(sum(s["records_restored"] for s in snaps)))
        seconds.add_metric([], max(float(s["seconds"]) for s in snaps))
        yield from (recovering, left, restored, seconds)

    @staticmethod
    def _collect_sinks(sinks: list[Any]) -> Iterator[Metric]:
        if not sinks:
            return
        for name, doc in _SINK_FIELDS.items():
            fam = CounterMetricFamily(f"spendstream_sink_{name}", doc)
            fam.add_metric([], float(sum(getattr(c, name) for c in sinks)))
            yield fam
        per_table = CounterMetricFamily(
            "spendstream_sink_rows_inserted_by_table", "Rows inserted, per table.", labels=["table"]
        )
        totals: dict[str, int] = {}
        for c in sinks:
            for table, rows in dict(c.per_table).items():
                totals[table] = totals.get(table, 0) + rows
        for table, rows in sorted(totals.items()):
            per_table.add_metric([table], float(rows))
        yield per_table

    @staticmethod
    def _collect_spools(spools: list[DiskSpool]) -> Iterator[Metric]:
        if not spools:
            return
        records = GaugeMetricFamily(
            "spendstream_producer_spool_records",
            "Spooled usage events not yet acknowledged by Kafka.",
            labels=["spool"],
        )
        size = GaugeMetricFamily(
            "spendstream_producer_spool_bytes",
            "Bytes of spooled events not yet acknowledged (bounded by spool_max_bytes).",
            labels=["spool"],
        )
        rejected = CounterMetricFamily(
            "spendstream_producer_spool_rejected",
            "Sends refused because the spool was full (reject policy, or block timed out).",
            labels=["spool"],
        )
        blocked = CounterMetricFamily(
            "spendstream_producer_spool_blocked",
            "Sends that waited for room in a full spool (block policy).",
            labels=["spool"],
        )
        drain_alive = GaugeMetricFamily(
            "spendstream_producer_spool_drain_alive",
            "1 while the thread that hands spooled events to Kafka runs (0: events stay on "
            "disk; restart the producer).",
            labels=["spool"],
        )
        io_errors = CounterMetricFamily(
            "spendstream_producer_spool_io_errors",
            "Disk errors of the spool by operation (write: the send failed; read: retried).",
            labels=["spool", "op"],
        )
        lost = CounterMetricFamily(
            "spendstream_producer_spool_lost_records",
            "Damaged spooled records skipped when read (their bytes failed the checksum).",
            labels=["spool"],
        )
        corrupt = CounterMetricFamily(
            "spendstream_producer_spool_corrupt_bytes",
            "Bytes of damaged spool data skipped to the next valid record.",
            labels=["spool"],
        )
        for spool in spools:
            stats = spool.stats()
            label = [str(spool.path)]
            records.add_metric(label, stats.records)
            size.add_metric(label, stats.bytes)
            rejected.add_metric(label, stats.rejected)
            blocked.add_metric(label, stats.blocked)
            if stats.drain_alive is not None:
                drain_alive.add_metric(label, 1 if stats.drain_alive else 0)
            for op, count in (
                ("write", stats.write_errors),
                ("read", stats.read_errors),
                ("sync", stats.sync_errors),
            ):
                io_errors.add_metric([*label, op], count)
            lost.add_metric(label, stats.lost_records)
            corrupt.add_metric(label, stats.corrupt_bytes)
        yield from (records, size, rejected, blocked, drain_alive, io_errors, lost, corrupt)


_WATCHED = _Watched()
REGISTRY.register(_WATCHED)


def watch_sink(counters: Any) -> None:
    """Report a :class:`~sinks.SinkCounters` (summed over live sinks) at every scrape."""
    _WATCHED.add_sink(counters)


def watch_restore(progress: Any) -> None:
    """Publish a worker's restore progress (a ``RestoreProgress``) while it lives."""
    _WATCHED.add_restore(progress)


def watch_spool(spool: DiskSpool) -> None:
    """Report a producer spool's depth and rejected/blocked counts at every scrape."""
    _WATCHED.add_spool(spool)


def render() -> bytes:
    """The Prometheus text exposition of :data:`REGISTRY`."""
    return generate_latest(REGISTRY)


def value(name: str, labels: Mapping[str, str] | None = None) -> float:
    """The current value of one sample (0.0 when absent): for tests and ``--json`` output."""
    got = REGISTRY.get_sample_value(name, dict(labels or {}))
    return 0.0 if got is None else float(got)


# -- the endpoint -------------------------------------------------------------------------------

HealthCheck = Callable[[], Mapping[str, Any]]
"""Returns ``{"ok": bool, ...details}``; ``ok`` false (or an exception) answers 503."""


@dataclass
class MetricsServer:
    """A running ``/metrics`` + ``/health`` endpoint; :meth:`close` stops it."""

    host: str
    port: int
    _server: ThreadingHTTPServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def health_response(health: HealthCheck) -> tuple[int, dict[str, Any]]:
    """Status code and JSON body of ``/health``: 200 when ``ok``, else 503."""
    try:
        report = dict(health())
    except Exception as exc:  # a failing check is an unhealthy process, not a crash
        log.warning("health check failed: %s", exc)
        return 503, {"ok": False, "details": {"error": f"{type(exc).__name__}: {exc}"}}
    ok = bool(report.pop("ok", False))
    details = report.pop("details", report)
    return (200 if ok else 503), {"ok": ok, "details": details}


def _handler(health: HealthCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "spendstream-metrics"

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would flood the log

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, render(), CONTENT_TYPE_LATEST)
            elif path in ("/health", "/healthz"):
                status, body = health_response(health)
                self._send(status, json.dumps(body, default=str).encode(), "application/json")
            else:
                self._send(404, b'{"error": "GET /metrics or /health"}', "application/json")

    return Handler


def serve(port: int, health: HealthCheck, *, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``/metrics`` and ``/health`` on ``host:port`` from a daemon thread.

    ``port=0`` picks a free port (tests); the settings' ``metrics_port`` of 0 means "do not
    call this at all". Binds every interface by default so that Prometheus can scrape it; the
    endpoint exposes counts only, never event data or settings.
    """
    server = ThreadingHTTPServer((host, port), _handler(health))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="spendstream-metrics", daemon=True)
    thread.start()
    actual = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics, health on /health", host, actual)
    return MetricsServer(host, actual, server, thread)


# -- consumer lag probe -------------------------------------------------------------------------


class LagProbe:
    """A daemon thread that reads a consumer group's lag every ``interval_s`` seconds.

    Uses its own short-lived consumer (:func:`spendstream.lag.group_lag`), so the consuming
    client is never called from another thread. :meth:`ok` feeds health checks: one failed
    probe (a coordinator moving, a broker restarting) is not yet unhealthy; failing for longer
    than ``tolerance_s`` is.
    """

    def __init__(
        self,
        conf: Mapping[str, Any],
        group: str,
        topics: Iterable[str],
        *,
        interval_s: float = 15.0,
        tolerance_s: float | None = None,
    ) -> None:
        """Start probing at once."""
        self.conf = dict(conf)
        self.group = group
        self.topics = list(topics)
        self.interval_s = interval_s
        self.tolerance_s = 2 * interval_s + 10 if tolerance_s is None else tolerance_s
        self.total: int | None = None
        self.error: str | None = None
        self._good_at = time.monotonic()  # start counts as good: give the group time to form
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spendstream-lag", daemon=True)
        self._thread.start()

    def probe(self) -> int:
        """Read the lag now, publish it and return the total."""
        from spendstream.lag import group_lag

        lag = group_lag(self.conf, self.group, self.topics, timeout_s=min(self.interval_s, 10))
        return set_lag(self.group, lag)

    def ok(self) -> bool:
        """False once probes have failed for longer than ``tolerance_s``."""
        return self.error is None or time.monotonic() - self._good_at < self.tolerance_s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.total = self.probe()
                self.error = None
                self._good_at = time.monotonic()
            except Exception as exc:  # the broker is away: unhealthy in a while, not dead
                self.error = str(exc)
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._thread.join(timeout=15)
