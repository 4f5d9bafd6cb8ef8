"""Producer throughput: validated events through ``UsageProducer.send`` vs raw ``produce``.

Both runs use the same producer configuration, the same events and a fresh topic each; each is
timed from the first send until everything is acknowledged (flushed). The broker is warmed up
first with unmeasured messages. Run it with::

    python -m spendstream.bench.producer --n 200000
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Producer

from producers import UsageProducer, encode_for_send, producer_config
from spendstream.errors import DeliveryError
from spendstream.settings import Settings, load_settings
from spendstream.simulate import Simulator

WARM_UP_EVENTS = 400_000
"""Messages produced, unmeasured, before the raw run (the inputs, repeated as needed)."""


def _events(n: int) -> list[dict[str, Any]]:
    sim = Simulator(users=1000, seed=7)
    return [e for _, e in zip(range(n), sim.events(), strict=False)]


def _produce_all(producer: Producer, topic: str, items: Iterable[tuple[str, bytes]]) -> None:
    """``produce()`` each (key, value); on a full local queue, poll once and produce again."""
    produce = producer.produce
    for key, value in items:
        try:
            produce(topic, value, key)
        except BufferError:
            producer.poll(0.05)
            produce(topic, value, key)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def run_producer_bench(
    settings: Settings, n: int = 200_000, warm_up: int = WARM_UP_EVENTS
) -> dict[str, Any]:
    """Measure validated events/s (validate + encode + produce) against raw produce of bytes.

    Returns ``validated_per_s``, ``raw_per_s``, ``ratio`` (validated / raw), the seconds of
    each run and the mean encoded size. Raises :class:`DeliveryError` if a run lost messages.
    """
    events = _events(n)
    # The raw run produces exactly the bytes the validated run will: same sizes, same work
    # for librdkafka and the broker, so the ratio is the cost of validating and encoding.
    encoded = [encode_for_send(e) for e in events]
    run_id = uuid.uuid4().hex[:8]
    # The inputs are held for the whole run; without freezing them every full collection
    # triggered by the objects a send creates would rescan 2 x n containers, which a gateway
    # (one request, one event) never pays.
    gc.collect()
    gc.freeze()
    try:
        return _measure(settings, n, events, encoded, run_id, warm_up)
    finally:
        gc.unfreeze()


def _measure(
    settings: Settings,
    n: int,
    events: list[dict[str, Any]],
    encoded: list[tuple[str, bytes]],
    run_id: str,
    warm_up: int,
) -> dict[str, Any]:

    raw_topic = f"bench.raw.{run_id}"
    validated_topic = f"bench.validated.{run_id}"
    from spendstream.kafka_admin import create_topics

    # The broker does not auto-create topics: make the benchmark's own, like the events topic.
    create_topics(
        settings.kafka.confluent_config(),
        [raw_topic, validated_topic],
        settings.topics.partitions,
        settings.topics.replication_factor,
    )
    try:
        return _measure_on(settings, n, events, encoded, raw_topic, validated_topic, warm_up)
    finally:
        from spendstream.kafka_admin import delete_topics

        delete_topics(settings.kafka.confluent_config(), [raw_topic, validated_topic])


def _measure_on(
    settings: Settings,
    n: int,
    events: list[dict[str, Any]],
    encoded: list[tuple[str, bytes]],
    raw_topic: str,
    validated_topic: str,
    warm_up: int,
) -> dict[str, Any]:
    conf = producer_config(settings)
    conf["delivery.report.only.error"] = True
    raw = Producer(conf)
    raw.list_topics(raw_topic, timeout=15)  # warm-up: metadata, connection, producer id
    # Warm the broker too (unmeasured). On a broker the benchmark had just started, the raw
    # run (measured first) gave 150k-167k/s without this, 164k-217k/s after 100,000 warm-up
    # messages and 276k-283k/s after 400,000, against 448k-574k/s on a broker that had run
    # for an hour: a cold JVM made the ratio look better than it is.
    _produce_all(raw, raw_topic, (encoded[i % len(encoded)] for i in range(warm_up)))
    raw.flush(120)
    t0 = time.perf_counter()
    _produce_all(raw, raw_topic, encoded)
    left = raw.flush(120)
    raw_s = time.perf_counter() - t0
    if left:
        raise DeliveryError(f"raw run: {left} messages undelivered")

    producer = UsageProducer(settings, topic=validated_topic)
    producer._producer.list_topics(validated_topic, timeout=15)
    send = producer.send
    t0 = time.perf_counter()
    for event in events:
        send(event)
    producer.flush(120)
    validated_s = time.perf_counter() - t0
    stats = producer.close()

    validated_rate = _rate(n, validated_s)
    raw_rate = _rate(n, raw_s)
    return {
        "events": n,
        "validated_per_s": validated_rate,
        "raw_per_s": raw_rate,
        "ratio": round(validated_rate / raw_rate, 3),
        "validated_s": round(validated_s, 3),
        "raw_s": round(raw_s, 3),
        "mean_event_bytes": round(sum(len(v) for _, v in encoded) / n, 1),
        "delivered": stats.delivered,
        "compression": conf.get("compression.type"),
        "broker_warm_up_messages": warm_up,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m spendstream.bench.producer --n 200000``: print the figures as JSON."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="events per run")
    args = parser.parse_args(argv)
    print(json.dumps(run_producer_bench(load_settings(), args.n), indent=2))


if __name__ == "__main__":
    main()
