"""Event-to-alert latency: usage events at a fixed rate through a running worker to ``alerts``.

Needs a broker and a running ``spendstream worker`` with the same settings (``SPENDSTREAM_*``)
and the sample plans (the default). The benchmark subscribes ``--users`` fresh users to the
``free`` plan (0.10 USD per rolling 5 hours, 50 requests a day), then produces events round-robin
over them at ``--rate`` events/s for ``--duration`` s; each event costs 0.0025 USD (1,000 gpt-4o
input tokens), so every user crosses several thresholds during the run. For each alert, latency
is the time from just before its triggering event was handed to the producer until the alert
was read back from the alerts topic (one process, one monotonic clock)::

    python -m spendstream.bench_caps --rate 10000 --duration 10 --users 2000
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from producers import UsageProducer, publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.settings import Settings, load_settings

_TICK_S = 0.005


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class _AlertReader(threading.Thread):
    """Reads the alerts topic from its current end and stamps each alert on arrival."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        super().__init__(name="bench-alerts", daemon=True)
        conf = settings.kafka.confluent_config()
        conf.update({"group.id": f"bench-caps-{uuid.uuid4().hex}", "enable.auto.commit": False})
        self.consumer = Consumer(conf)
        topic = settings.topics.alerts
        meta = self.consumer.list_topics(topic, timeout=30).topics[topic]
        parts = []
        for p in meta.partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            parts.append(TopicPartition(topic, p, high))
        self.consumer.assign(parts)
        self.prefix = prefix
        self.arrivals: list[tuple[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(1000, 0.05):
                now = time.monotonic()
                value = msg.value()
                if msg.error() is None and value is not None:
                    alert = orjson.loads(value)
                    if alert["user_id"].startswith(self.prefix):
                        self.arrivals.append((alert["event_id"], now))
        self.consumer.close()


def _warm_up(settings: Settings, reader: _AlertReader, probe: str, now: datetime) -> None:
    """Wait until the worker is live: a probe user's 50 % alert comes back (it also proves the
    worker sees the new subscriptions, so no measured event is priced without a plan)."""
    deadline = time.monotonic() + 180.0
    with UsageProducer(settings) as producer:
        while time.monotonic() < deadline:
            for i in range(20):  # 20 x 0.0025 = 0.05 USD: 50 % of the free plan's 5 h window
                producer.send(
                    {
                        "event_id": f"{probe}-{uuid.uuid4().hex}-{i}",
                        "occurred_at": now.isoformat(),
                        "org_id": "bench",
                        "user_id": probe,
                        "gateway": "bench",
                        "requested_model": "gpt-4o",
                        "input_tokens": 1000,
                    }
                )
            producer.flush()
            wait_until = time.monotonic() + 10.0
            while time.monotonic() < wait_until:
                if any(True for _ in reader.arrivals):
                    reader.arrivals.clear()
                    return
                time.sleep(0.05)
    raise TimeoutError("no alert from the worker within 180 s: is `spendstream worker` running?")


def run_caps_bench(
    settings: Settings, rate: int = 10_000, duration_s: float = 10.0, users: int = 2000
) -> dict[str, Any]:
    """Produce ``rate`` events/s for ``duration_s`` and measure event-to-alert latency (ms)."""
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench-{tag}-"
    names = [f"{prefix}{i}" for i in range(users)]
    probe = f"{prefix}probe"
    now = datetime.now(UTC)
    publish_subscriptions(
        settings,
        [
            Subscription(
                user_id=u,
                org_id="bench",
                billing_anchor=now - timedelta(days=1),
                plans=[PlanPeriod(plan_id="free", effective_at=now - timedelta(days=1))],
            )
            for u in [probe, *names]
        ],
    )

    total = int(rate * duration_s)
    t0 = now
    encoded: list[tuple[str, str, bytes]] = []
    for i in range(total):
        user = names[i % users]
        event_id = f"{tag}-{i}"
        occurred = (t0 + timedelta(microseconds=i * 1_000_000 // rate)).isoformat()
        encoded.append(
            (
                event_id,
                user,
                orjson.dumps(
                    {
                        "event_id": event_id,
                        "occurred_at": occurred,
                        "org_id": "bench",
                        "user_id": user,
                        "gateway": "bench",
                        "requested_model": "gpt-4o",
                        "input_tokens": 1000,
                    }
                ),
            )
        )

    reader = _AlertReader(settings, prefix)
    reader.start()
    _warm_up(settings, reader, probe, now)
    sent_at: dict[str, float] = {}
    producer = UsageProducer(settings)
    per_tick = max(1, round(rate * _TICK_S))
    start = time.monotonic()
    try:
        for n in range(0, total, per_tick):
            # Fixed rate: event n is due at start + n / rate; sleep whenever ahead.
            due = start + n / rate
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            for event_id, user, value in encoded[n : n + per_tick]:
                sent_at[event_id] = time.monotonic()
                producer.send_raw(user, value)
        send_s = time.monotonic() - start
        producer.flush()
    finally:
        producer.close()
    expected = users * 5 if total >= users * 50 else None
    # A worker slower than the rate works through a backlog after the last send: wait for it
    # (the latencies then show the backlog, which is the point), but not forever.
    deadline = time.monotonic() + 180.0
    last_count, quiet_since = 0, time.monotonic()
    while time.monotonic() < deadline:
        count = len(reader.arrivals)
        if expected is not None and count >= expected:
            break
        if count != last_count:
            last_count, quiet_since = count, time.monotonic()
        elif count and time.monotonic() - quiet_since > 10.0:
            break
        time.sleep(0.1)
    reader.stop.set()
    reader.join(10)

    latencies = sorted(
        (arrived - sent_at[event_id]) * 1000
        for event_id, arrived in reader.arrivals
        if event_id in sent_at
    )
    return {
        "rate_target": rate,
        "rate_achieved": round(total / send_s, 1) if send_s > 0 else None,
        "duration_s": duration_s,
        "events": total,
        "users": users,
        "alerts": len(latencies),
        "alerts_expected": expected,
        "p50_ms": round(_percentile(latencies, 50), 1),
        "p90_ms": round(_percentile(latencies, 90), 1),
        "p99_ms": round(_percentile(latencies, 99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else None,
        # This process's settings: the worker's match only if it was started with the same.
        "settings_batch_size": settings.processor.batch_size,
        "settings_batch_within_s": settings.processor.batch_within_s,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m spendstream.bench_caps``: print the figures as JSON."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000, help="events per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--users", type=int, default=2000, help="distinct users")
    args = parser.parse_args(argv)
    result = run_caps_bench(load_settings(), args.rate, args.duration, args.users)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
