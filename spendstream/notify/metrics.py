"""Prometheus metrics of ``spendstream notify``, on the process registry
(:data:`spendstream.metrics.REGISTRY`, served by :func:`spendstream.metrics.serve`).

Families (``_total`` is added to counters by the exposition format):

* ``spendstream_notify_delivered{endpoint,kind}``, counter: notifications acknowledged (2xx);
* ``spendstream_notify_retried{endpoint,kind}``, counter: failed attempts that were retried;
* ``spendstream_notify_failed{endpoint,kind,reason}``, counter: dead-lettered notifications
  (``rejected``: a 4xx other than 408/429; ``exhausted``: every attempt failed);
* ``spendstream_notify_skipped{reason}``, counter: records that gave no notification
  (``undecodable``, ``tombstone``), counted by each endpoint's consumer that read them;
* ``spendstream_notify_delivery_seconds{endpoint}``, histogram: from the record's publication
  (its Kafka timestamp) to the endpoint's acknowledgement, retries included;
* ``spendstream_notify_request_seconds{endpoint}``, histogram: one POST, any outcome;
* ``spendstream_notify_pending{endpoint}``, gauge: read, not yet delivered or dead-lettered.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from spendstream.metrics import REGISTRY

DELIVERED = Counter(
    "spendstream_notify_delivered",
    "Notifications an endpoint acknowledged (2xx).",
    ["endpoint", "kind"],
    registry=REGISTRY,
)
RETRIED = Counter(
    "spendstream_notify_retried",
    "Delivery attempts that failed and were retried.",
    ["endpoint", "kind"],
    registry=REGISTRY,
)
FAILED = Counter(
    "spendstream_notify_failed",
    "Notifications sent to the notify dead-letter topic (rejected: a 4xx; exhausted: retries).",
    ["endpoint", "kind", "reason"],
    registry=REGISTRY,
)
SKIPPED = Counter(
    "spendstream_notify_skipped",
    "Records of the alerts or enforcement topics that gave no notification.",
    ["reason"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "spendstream_notify_delivery_seconds",
    "From the record's publication (its Kafka timestamp) to the endpoint's acknowledgement.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "spendstream_notify_request_seconds",
    "Duration of one POST to an endpoint (any outcome).",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PENDING = Gauge(
    "spendstream_notify_pending",
    "Notifications read from Kafka and not yet delivered or dead-lettered.",
    ["endpoint"],
    registry=REGISTRY,
)
