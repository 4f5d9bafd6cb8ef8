"""Event-to-alert and event-to-rollup latency: usage events at a fixed rate through a worker.

Needs a broker and a running ``spendstream worker`` with the same settings (``SPENDSTREAM_*``)
and the sample plans (the default). The benchmark subscribes ``--users`` fresh users to the
``free`` plan (0.10 USD per rolling 5 hours, 50 requests a day), then produces events round-robin
over them at ``--rate`` events/s for ``--duration`` s; each event costs 0.0025 USD (1,000 gpt-4o
input tokens), so every user crosses several thresholds during the run. For each alert, latency
is the time from just before its triggering event was handed to the producer until the alert
was read back from the alerts topic (one process, one monotonic clock). For each event, the
event-to-rollup latency runs until the first rollup of its (user, window) that counts it is read
back from the rollups topic: a user's events reach one partition in order, so the k-th event of
a window is in the first upsert whose ``requests`` is at least k::

    python -m spendstream.bench.caps --rate 10000 --duration 10 --users 2000
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from producers import UsageProducer, publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.kafka_fetch import fetch_ready
from spendstream.settings import Settings, load_settings
from stream_processors import to_micros

_TICK_S = 0.005


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def _latency_figures(name: str, ascending: list[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max (ms) of an ascending list, under ``name_``-prefixed keys."""
    figures: dict[str, float | None] = {
        f"{name}_p{q}_ms": round(_percentile(ascending, q), 1) for q in (50, 95, 99)
    }
    figures[f"{name}_max_ms"] = round(ascending[-1], 1) if ascending else None
    return figures


class _OutputReader(threading.Thread):
    """Reads the alerts and rollups topics from their current end, stamping each arrival.

    The thread only stamps and keeps the raw values; :meth:`parse_new` decodes them in the
    caller's thread, so the reader does little work while the load is being sent.
    """

    def __init__(self, settings: Settings, prefix: str, ignore: str) -> None:
        super().__init__(name="bench-outputs", daemon=True)
        conf = settings.kafka.confluent_config()
        conf.update({"group.id": f"bench-caps-{uuid.uuid4().hex}", "enable.auto.commit": False})
        self.consumer = Consumer(conf)
        self.alerts_topic = settings.topics.alerts
        parts = []
        for topic in (settings.topics.alerts, settings.topics.rollups):
            meta = self.consumer.list_topics(topic, timeout=30).topics[topic]
            for p in meta.partitions:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                parts.append(TopicPartition(topic, p, high))
        self.consumer.assign(parts)
        self.prefix = prefix
        self.ignore = ignore
        self._raw: list[tuple[bool, bytes, float]] = []
        self._parsed = 0
        self.arrivals: list[tuple[str, float]] = []
        """(triggering event id, arrival) per alert, as of the last :meth:`parse_new`."""
        self.rollups: list[tuple[str, int, int, float]] = []
        """(user, window start in epoch µs, requests, arrival) per on-time rollup upsert."""
        self.counted = 0
        """Events counted by the rollups parsed so far (the highest ``requests`` per window)."""
        self._highest: dict[tuple[str, int], int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = fetch_ready(self.consumer, 0.05)
            if not batch:
                continue
            now = time.monotonic()  # one stamp per fetch: when these messages arrived
            for msg in batch:
                value = msg.value()
                if msg.error() is None and value is not None:
                    self._raw.append((msg.topic() == self.alerts_topic, value, now))
        self.consumer.close()

    def parse_new(self) -> None:
        """Decode what arrived since the last call into ``arrivals``, ``rollups``, ``counted``."""
        end = len(self._raw)
        for is_alert, value, arrived in self._raw[self._parsed : end]:
            record = orjson.loads(value)
            user = record["user_id"]
            if not user.startswith(self.prefix):
                continue
            if is_alert:
                self.arrivals.append((record["event_id"], arrived))
            elif record["segment"] == 0 and user != self.ignore:  # no late events here
                start = to_micros(datetime.fromisoformat(record["window_start"]))
                requests = record["requests"]
                self.rollups.append((user, start, requests, arrived))
                before = self._highest.get((user, start), 0)
                if requests > before:
                    self._highest[(user, start)] = requests
                    self.counted += requests - before
        self._parsed = end


def rollup_matches(
    sent: Sequence[tuple[str, int, float]], rollups: Sequence[tuple[str, int, int, float]]
) -> list[tuple[float, float]]:
    """(send time, seconds to the first rollup upsert that counts it) per sent event.

    ``sent`` holds (user, window start, send time) in send order; ``rollups`` holds (user,
    window start, requests, arrival) in arrival order. The k-th event of a (user, window) is
    counted by the first upsert of that window with ``requests >= k`` (a user's events are in
    one partition, in order). Events no upsert has counted yet are left out.
    """
    arrivals: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for user, start, requests, arrived in rollups:
        arrivals.setdefault((user, start), []).append((requests, arrived))
    ordinal: dict[tuple[str, int], int] = {}
    cursor: dict[tuple[str, int], int] = {}
    out: list[tuple[float, float]] = []
    for user, start, sent_at in sent:
        key = (user, start)
        k = ordinal[key] = ordinal.get(key, 0) + 1
        seen = arrivals.get(key, [])
        i = cursor.get(key, 0)
        # The ordinal only grows within a window, so the search resumes where it stopped.
        while i < len(seen) and seen[i][0] < k:
            i += 1
        cursor[key] = i
        if i < len(seen):
            out.append((sent_at, seen[i][1] - sent_at))
    return out


def rollup_latencies(
    sent: Sequence[tuple[str, int, float]], rollups: Sequence[tuple[str, int, int, float]]
) -> list[float]:
    """The latencies of :func:`rollup_matches`, ascending."""
    return sorted(latency for _, latency in rollup_matches(sent, rollups))


def max_by_second(start: float, pairs: Sequence[tuple[float, float]]) -> list[float]:
    """The largest latency (ms) among the events sent in each second after ``start``.

    Shows when in a run the tail happened (a stall at the start, a steady backlog, ...).
    """
    worst: dict[int, float] = {}
    for sent_at, latency in pairs:
        second = int(sent_at - start)
        worst[second] = max(worst.get(second, 0.0), latency)
    return [round(worst.get(i, 0.0) * 1000, 1) for i in range(max(worst, default=-1) + 1)]


def _warm_up(producer: UsageProducer, reader: _OutputReader, probe: str, now: datetime) -> None:
    """Wait until the worker is live: a probe user's 50 % alert comes back (it also proves the
    worker sees the new subscriptions, so no measured event is priced without a plan).

    The probe goes through the producer the measurement then uses, so that its connection,
    metadata and idempotent producer id are in place before the first measured event. With a
    producer made after the warm-up, the first measured events waited in its queue: at 2k/s the
    event-to-rollup p99 (which samples the first seconds; alerts do not) was 0.56-2.0 s, and
    0.30-0.37 s with this warm-up.
    """
    deadline = time.monotonic() + 180.0
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
            reader.parse_new()
            if reader.arrivals:
                reader.arrivals.clear()
                return
            time.sleep(0.05)
    raise TimeoutError("no alert from the worker within 180 s: is `spendstream worker` running?")


def run_caps_bench(
    settings: Settings, rate: int = 10_000, duration_s: float = 10.0, users: int = 2000
) -> dict[str, Any]:
    """Produce ``rate`` events/s for ``duration_s``; event-to-alert and event-to-rollup latency."""
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
    window_us = settings.processor.window_s * 1_000_000
    encoded: list[tuple[str, str, int, bytes]] = []
    for i in range(total):
        user = names[i % users]
        event_id = f"{tag}-{i}"
        occurred_at = t0 + timedelta(microseconds=i * 1_000_000 // rate)
        occurred = occurred_at.isoformat()
        t_us = to_micros(occurred_at)
        encoded.append(
            (
                event_id,
                user,
                t_us - t_us % window_us,
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

    reader = _OutputReader(settings, prefix, ignore=probe)
    reader.start()
    producer = UsageProducer(settings)
    try:
        _warm_up(producer, reader, probe, now)
    except BaseException:
        producer.close()
        raise
    sent_at: dict[str, float] = {}
    sent: list[tuple[str, int, float]] = []
    per_tick = max(1, round(rate * _TICK_S))
    start = time.monotonic()
    try:
        for n in range(0, total, per_tick):
            # Fixed rate: event n is due at start + n / rate; sleep whenever ahead.
            due = start + n / rate
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            for event_id, user, window, value in encoded[n : n + per_tick]:
                sent_at[event_id] = at = time.monotonic()
                sent.append((user, window, at))
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
        reader.parse_new()
        count = len(reader.arrivals) + reader.counted
        if expected is not None and len(reader.arrivals) >= expected and reader.counted >= total:
            break
        if count != last_count:
            last_count, quiet_since = count, time.monotonic()
        elif count and time.monotonic() - quiet_since > 10.0:
            break
        time.sleep(0.1)
    reader.stop.set()
    reader.join(10)
    reader.parse_new()

    alert_pairs = [
        (sent_at[event_id], arrived - sent_at[event_id])
        for event_id, arrived in reader.arrivals
        if event_id in sent_at
    ]
    latencies = sorted(latency * 1000 for _, latency in alert_pairs)
    rollup_pairs = rollup_matches(sent, reader.rollups)
    to_rollup = sorted(latency * 1000 for _, latency in rollup_pairs)
    return {
        "rate_target": rate,
        "rate_achieved": round(total / send_s, 1) if send_s > 0 else None,
        "duration_s": duration_s,
        "events": total,
        "users": users,
        "alerts": len(latencies),
        "alerts_expected": expected,
        **_latency_figures("alert", latencies),
        "events_in_a_rollup": len(to_rollup),
        **_latency_figures("rollup", to_rollup),
        # In the JSON output only: the worst latency of the events sent in each second.
        "alert_max_ms_by_second": max_by_second(start, alert_pairs),
        "rollup_max_ms_by_second": max_by_second(start, rollup_pairs),
        # This process's settings: the worker's match only if it was started with the same.
        "settings_batch_size": settings.processor.batch_size,
        "settings_batch_within_s": settings.processor.batch_within_s,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m spendstream.bench.caps``: print the figures as JSON."""
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
