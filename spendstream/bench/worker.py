"""Worker throughput: events/s for one faust worker doing validate + dedupe + price + roll-up
(+ caps), on the real broker, next to the same pure processing in-process without Kafka.

The worker runs as a child process (``spendstream worker``) over a topic pre-filled with
simulated events; its rate is measured from its committed offsets between its first commit and
the moment it has committed everything, so start-up and group join are not counted.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from spendstream.settings import Settings, TopicSettings
from spendstream.worker import gc_tuned

BENCH_START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def isolated(settings: Settings, prefix: str, state_dir: Path) -> Settings:
    """``settings`` with topics, app id, sink group and state folder of their own."""
    topics = TopicSettings(
        **{
            **settings.topics.model_dump(),
            **{role: f"{prefix}.{name}" for role, name in settings.topics.names().items()},
        }
    )
    return settings.model_copy(
        update={
            "topics": topics,
            "processor": settings.processor.model_copy(update={"app_id": f"{prefix}-worker"}),
            "sink": settings.sink.model_copy(update={"group_id": f"{prefix}-sink"}),
            "state_dir": state_dir,
        }
    )


def _payloads(events: int, users: int) -> tuple[list[tuple[str, bytes]], list[Any]]:
    from spendstream.simulate import Simulator

    sim = Simulator(users, seed=7, start=BENCH_START, rate=5_000.0, rhythm=False)
    out: list[tuple[str, bytes]] = []
    for item in sim.stream():
        if len(out) >= events:
            break
        if isinstance(item.payload, dict):
            out.append((item.payload["user_id"], orjson.dumps(item.payload)))
    return out, sim.subscriptions()


def run_pure(
    settings: Settings,
    lookup: Callable[[str], Any],
    records: list[Any],
    states: tuple[Any, Any, Any, Any],
) -> float:
    """Run the worker's pure pipeline over ``records`` in the worker's batch size; seconds taken.

    ``states`` are the (seen, windows, marks, caps) states; ``lookup`` finds a subscription.
    This is the code the faust agent runs per batch: validate, dedupe, price, roll up, caps.
    """
    from stream_processors import SAMPLE_PLANS, CapEngine, PriceCatalog, UsageProcessor, load_plans
    from stream_processors.caps import CapStage

    p = settings.processor
    seen, windows, marks, caps_state = states
    processor = UsageProcessor(
        PriceCatalog.load(p.price_catalog, p.price_overrides),
        lookup,
        seen=seen,
        windows=windows,
        marks=marks,
        window_s=p.window_s,
        grace_s=p.grace_s,
        dedupe_horizon_s=p.dedupe_horizon_s,
        future_skew_s=p.future_skew_s,
    )
    engine = CapEngine(load_plans(settings.plans_file or SAMPLE_PLANS), grace_s=p.grace_s)
    caps = CapStage(engine, lookup, caps_state)
    size = p.batch_size
    with gc_tuned():  # as in the worker process
        start = time.perf_counter()
        for i in range(0, len(records), size):
            result = processor.process(records[i : i + size])
            caps.process(result.accepted, datetime.now(UTC))
        return time.perf_counter() - start


def pure_rate(settings: Settings, payloads: list[tuple[str, bytes]], subs: list[Any]) -> float:
    """Events/s of the worker's pure pipeline (validate, dedupe, price, roll up, caps) alone."""
    from stream_processors import DictState, InRecord

    by_user = {s.user_id: s for s in subs}
    records = [
        InRecord("bench", hash(key) % 6, i, key.encode(), value)
        for i, (key, value) in enumerate(payloads)
    ]
    states = (DictState(), DictState(), DictState(), DictState())
    return len(records) / run_pure(settings, by_user.get, records, states)


def _wait_committed(conf: dict[str, Any], s: Settings, t0: float) -> float:
    """Seconds from ``t0`` until the worker committed every input offset."""
    from spendstream.lag import group_lag

    while sum(group_lag(conf, s.processor.app_id, [s.topics.events]).values()):
        if time.monotonic() - t0 > 900:
            raise TimeoutError("the worker did not commit within 15 minutes")
        time.sleep(0.1)
    return time.monotonic() - t0


def wait_for_group(
    conf: dict[str, Any], group_id: str, members: int, procs: list[Any], timeout_s: float = 180.0
) -> None:
    """Block until ``group_id`` is stable with ``members`` members (faust's assignor encodes
    assignments in its own format, so the members' partitions are not read here)."""
    from confluent_kafka import ConsumerGroupState, KafkaException

    from spendstream.kafka_admin import admin_client

    admin = admin_client(conf, quiet=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        try:
            group = admin.describe_consumer_groups([group_id])[group_id].result(timeout=10)
        except (KafkaException, TimeoutError):  # no group yet, or its coordinator is loading
            group = None
        if (
            group is not None
            and group.state == ConsumerGroupState.STABLE
            and len(group.members) == members
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"group {group_id!r} did not settle with {members} members in time")


@dataclass
class BenchInput:
    """Simulated events pre-produced on a topic of their own, shared by the measurements."""

    settings: Settings
    """Isolated settings: the input is ``settings.topics.events``."""
    prefix: str
    """Prefix of every topic (and group) created for this input."""
    workdir: Path
    payloads: list[tuple[str, bytes]]
    subscriptions: list[Any]
    users: int
    filled: bool = False
    """Whether the events are on the input topic yet (:meth:`fill`)."""

    @property
    def conf(self) -> dict[str, Any]:
        """librdkafka configuration of the broker."""
        return self.settings.kafka.confluent_config()

    def fill(self) -> None:
        """Produce the events to the input topic (once)."""
        from producers import UsageProducer

        if self.filled:
            return
        with UsageProducer(self.settings) as producer:
            for key, value in self.payloads:
                producer.send_raw(key.encode(), value)
        self.filled = True


@contextmanager
def bench_input(
    settings: Settings, events: int, users: int, *, name: str = "bench", fill: bool = True
) -> Iterator[BenchInput]:
    """Produce ``events`` simulated events (seed 7) to fresh topics; delete them afterwards.

    The plan schedules go to the subscriptions topic first. The data are the same for the same
    ``events`` and ``users``, so figures measured on different inputs stay comparable. With
    ``fill=False`` the events are produced only by :meth:`BenchInput.fill`.
    """
    from producers import publish_subscriptions
    from spendstream.kafka_admin import delete_topics, ensure_topics, topic_partitions

    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"spendstream-{name}-"))
    s = isolated(settings, prefix, workdir)
    payloads, subs = _payloads(events, users)
    data = BenchInput(s, prefix, workdir, payloads, subs, users)
    conf = data.conf
    try:
        ensure_topics(s)
        publish_subscriptions(s, subs)
        if fill:
            data.fill()
        yield data
    finally:
        # Ours and whatever the measured processes created under the prefix (changelogs).
        delete_topics(conf, [t for t in topic_partitions(conf) if prefix in t])
        shutil.rmtree(workdir, ignore_errors=True)


def run_worker_bench(
    settings: Settings, events: int = 100_000, users: int = 2_000, *, processes: int = 1
) -> dict[str, Any]:
    """Measure ``processes`` workers (one group) on the broker ``settings`` point at."""
    with bench_input(settings, events, users, fill=processes == 1) as data:
        return measure_worker(data, processes)


def progress_rates(
    samples: Sequence[tuple[float, int]], total: int | None = None
) -> tuple[float, float, float]:
    """From (monotonic seconds, events done) samples: when progress was first seen, events/s
    from then to the last sample, and the steady rate from 10 % to 90 % of ``total``.

    Start-up (group join, first fetch) is not counted: the rate starts at the first progress.
    The steady rate leaves out the warm-up and the tail as well. (Progress shows in bursts, a
    batch at a time, so the rate of single sampling steps says little.) ``total`` defaults to
    the last sample's count; without two distinct samples in that span it is the overall rate.
    """
    at = next((i for i, (_, n) in enumerate(samples) if n > 0), None)
    if at is None:
        raise ValueError("no progress in the samples: nothing was processed")
    first, last = samples[at], samples[-1]
    if last[1] == first[1] and at > 0:
        # Everything showed in one sampling step (a small run, or one batch per worker): the
        # rate over that step, a lower bound, rather than 0 events/s.
        before = samples[at - 1]
        step = (first[1] - before[1]) / max(first[0] - before[0], 1e-9)
        return first[0], step, step
    rate = (last[1] - first[1]) / max(last[0] - first[0], 1e-9)
    total = last[1] if total is None else total
    low = next(((t, n) for t, n in samples if n >= 0.1 * total), None)
    high = next(((t, n) for t, n in samples if n >= 0.9 * total), None)
    if low is None or high is None or high[0] <= low[0]:
        return first[0], rate, rate
    return first[0], rate, (high[1] - low[1]) / (high[0] - low[0])


class TopicSize:
    """Messages written to a topic so far (sum of its partitions' high watermarks).

    One client for all samples: a client per sample cost a connection and a metadata request
    each time, on the cores the measured process runs on, and made a 100 ms sampling step
    about 165 ms.
    """

    def __init__(self, conf: dict[str, Any], topic: str) -> None:
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        self._consumer = Consumer({**conf, "group.id": "bench-size-probe"})
        self.topic = topic
        self._parts: list[Any] = []
        for attempt in range(20):
            try:
                meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
                self._parts = [TopicPartition(topic, p) for p in meta.partitions]
            except KafkaException:
                self._parts = []  # a fresh topic's leaders can still be moving: ask again
            if self._parts:
                return
            time.sleep(0.1 * (attempt + 1))
        self._consumer.close()
        raise TimeoutError(f"cannot read the partitions of topic {topic!r}")

    def __call__(self) -> int:
        from confluent_kafka import KafkaException

        for attempt in range(20):
            try:
                return sum(
                    self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                    for tp in self._parts
                )
            except KafkaException:
                time.sleep(0.1 * (attempt + 1))
        raise TimeoutError(f"cannot read the size of topic {self.topic!r}")

    def close(self) -> None:
        """Close the client."""
        self._consumer.close()


def _partitions_opened(state_dir: Path, s: Settings) -> int:
    """Input partitions whose state a worker opened (its store folders) during the run; the
    section reports them per worker, e.g. ``"3 / 3"``."""
    folder = state_dir / "store" / s.processor.app_id
    return sum(1 for p in folder.glob("p*") if p.is_dir()) if folder.is_dir() else 0


def measure_worker(data: BenchInput, processes: int = 1) -> dict[str, Any]:
    """Run ``processes`` workers in one group over ``data`` (its app id has not consumed it
    yet); return the figures.

    Each worker has a state folder of its own, as on machines of their own. With more than
    one, the events are produced only once the group is stable with every worker in it (if
    ``data`` is not filled yet), so that no rebalance falls into the run; ``group_settle_s``
    is how long that took.
    """
    from spendstream.runner import WorkerProcess

    s, conf, payloads = data.settings, data.conf, data.payloads
    pure = pure_rate(s, payloads, data.subscriptions)
    folders = (
        [data.workdir] if processes == 1 else [data.workdir / f"w{i}" for i in range(processes)]
    )
    workers = [
        WorkerProcess(
            s if processes == 1 else s.model_copy(update={"state_dir": folder}),
            data.workdir / ("worker.log" if processes == 1 else f"worker-{i}.log"),
        )
        for i, folder in enumerate(folders)
    ]
    # Progress is read on the output side (priced events written) rather than from
    # committed offsets, which move only every commit interval.
    samples: list[tuple[float, int]] = []
    size = TopicSize(conf, s.topics.priced)
    settle_s = 0.0
    try:
        if not data.filled:
            started = time.monotonic()
            wait_for_group(conf, s.processor.app_id, processes, workers)
            settle_s = time.monotonic() - started
            data.fill()
        t0 = time.monotonic()
        while True:
            for worker in workers:
                worker.check_alive()
            done = size()
            now = time.monotonic()
            samples.append((now, done))
            if done >= len(payloads):
                break
            if now - t0 > 900:
                raise TimeoutError("the worker did not finish within 15 minutes")
            time.sleep(0.1)
        lag_zero = _wait_committed(conf, s, t0)
    finally:
        for worker in workers:
            worker.stop()
        size.close()
    opened = [_partitions_opened(folder, s) for folder in folders]
    first, rate, steady = progress_rates(samples, len(payloads))
    return {
        "events": len(payloads),
        "users": data.users,
        "processes": processes,
        "partitions_opened": " / ".join(map(str, opened)),
        "group_settle_s": settle_s,
        "worker_events_per_s": rate,
        "worker_steady_events_per_s": steady,
        "pure_events_per_s": pure,
        "startup_s": first - t0,
        "all_committed_s": lag_zero,
        "batch_size": s.processor.batch_size,
        "partitions": s.topics.partitions,
    }
