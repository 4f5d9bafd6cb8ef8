"""Run the real pipeline in tests and reconcile ClickHouse against an oracle.

The oracle is computed from what a test produced: every unique valid event (first occurrence
of its event_id), priced with the catalog, summed per user and per plan; the alerts it must see
come from running the cap engine over the same unique events in a single pass.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from producers import UsageProducer, publish_subscriptions
from schemas import Subscription, event_from_obj
from sinks import Sink, open_store
from spendstream.lag import group_lag
from spendstream.runner import WorkerProcess, wait_for_lag_zero
from spendstream.settings import Settings
from stream_processors import (
    SAMPLE_PLANS,
    CapEngine,
    CapEvent,
    PriceCatalog,
    load_plans,
    units_to_decimal,
)


@dataclass
class Totals:
    """Sums that must match exactly."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = field(default_factory=Decimal)
    list_value: Decimal = field(default_factory=Decimal)


class Oracle:
    """What ClickHouse must hold, from what the test produced."""

    def __init__(self, subscriptions: Iterable[Subscription]) -> None:
        self.catalog = PriceCatalog.load()
        self.subs = {s.user_id: s for s in subscriptions}
        self.events: dict[str, Any] = {}
        self.per_user: dict[str, Totals] = defaultdict(Totals)
        self.per_plan: dict[str, Totals] = defaultdict(Totals)
        self.malformed: list[bytes] = []

    def add(self, payload: dict[str, Any] | bytes) -> None:
        """Account for one produced item (a dict event or malformed bytes)."""
        if isinstance(payload, bytes):
            self.malformed.append(payload)
            return
        event = event_from_obj(payload)
        if event.event_id in self.events:
            return
        self.events[event.event_id] = event
        quote = self.catalog.quote(event)
        sub = self.subs.get(event.user_id)
        plan = sub.plan_at(event.occurred_at) if sub else ""
        for totals in (self.per_user[event.user_id], self.per_plan[plan]):
            totals.requests += 1
            totals.input_tokens += event.input_tokens
            totals.output_tokens += event.output_tokens
            totals.cost += units_to_decimal(quote.cost)
            totals.list_value += units_to_decimal(quote.list_value)

    def alert_ids(self) -> set[str]:
        """Alert ids a single, crash-free pass of the cap engine fires over the unique events."""
        engine = CapEngine(load_plans(SAMPLE_PLANS))
        states: dict[str, Any] = {}
        fired: set[str] = set()
        ordered = sorted(self.events.values(), key=lambda e: (e.occurred_at, e.event_id))
        now = datetime.now(UTC)
        for event in ordered:
            sub = self.subs.get(event.user_id)
            if sub is None or sub.plan_at(event.occurred_at) not in engine.catalog:
                continue
            state = states.setdefault(event.user_id, engine.new_state(event.user_id, sub.org_id))
            quote = self.catalog.quote(event)
            cap = CapEvent(
                event_id=event.event_id,
                user_id=event.user_id,
                occurred_at=event.occurred_at,
                cost=units_to_decimal(quote.cost),
                tokens=event.input_tokens + event.output_tokens,
                served_model=event.served_model or event.requested_model,
            )
            effects = engine.apply(state, sub, cap, now)
            fired.update(a["alert_id"] for a in effects.alerts)
        return fired


def produce(settings: Settings, items: Iterable[dict[str, Any] | bytes], oracle: Oracle) -> int:
    """Produce items (dict events validated by the SDK, bytes as they are); feed the oracle."""
    sent = 0
    with UsageProducer(settings) as producer:
        for payload in items:
            oracle.add(payload)
            if isinstance(payload, bytes):
                producer.send_raw(b"malformed", payload)
            else:
                producer.send(payload)
            sent += 1
    return sent


def _spans(offsets: list[int]) -> list[str]:
    """Sorted offsets as compact ranges: [1, 2, 3, 7] -> ['1-3', '7']."""
    out: list[str] = []
    for o in sorted(offsets):
        if out and int(out[-1].split("-")[-1]) == o - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{o}"
        else:
            out.append(str(o))
    return out


def read_topic_all(
    settings: Settings, topic: str
) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every message of ``topic`` now, as (partition, offset, key, value) (diagnostics)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {**settings.kafka.confluent_config(), "group.id": "diag", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in meta.partitions
        }
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, hi) in ends.items() if hi > lo])
        remaining = {p for p, (lo, hi) in ends.items() if hi > lo}
        out: list[tuple[int, int, bytes | None, bytes | None]] = []
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            part, offset = msg.partition() or 0, msg.offset() or 0
            out.append((part, offset, msg.key(), msg.value()))
            if offset + 1 >= ends[part][1]:
                remaining.discard(part)
        return sorted(out, key=lambda m: (m[0], m[1]))
    finally:
        consumer.close()


def read_topic_keyed(
    settings: Settings, topic: str, needle: str
) -> list[tuple[int, int, bytes | None]]:
    """Messages of ``topic`` whose key contains ``needle``, as (partition, offset, value)."""
    return [
        (p, o, v)
        for p, o, k, v in read_topic_all(settings, topic)
        if k is not None and needle in k.decode(errors="replace")
    ]


def read_topic(settings: Settings, topic: str) -> list[tuple[int, int, bytes | None]]:
    """Every message of ``topic`` now, as (partition, offset, value) (diagnostics)."""
    return [(p, o, v) for p, o, _, v in read_topic_all(settings, topic)]


class Pipeline:
    """A worker child process and an in-process sink over one chDB store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings, command="pytest")
        self.store.migrate()
        self.worker: WorkerProcess | None = None
        self.sink: Sink | None = None
        self._sink_thread: threading.Thread | None = None
        self._sink_stop = threading.Event()
        self._worker_runs = 0

    def publish_subscriptions(self, subs: Iterable[Subscription]) -> None:
        """Put the plan schedules on their compacted topic."""
        publish_subscriptions(self.settings, list(subs))

    def start_worker(self) -> WorkerProcess:
        """Start (or restart) the worker process."""
        self._worker_runs += 1
        log = self.settings.state_dir / f"worker-{self._worker_runs}.log"
        self.worker = WorkerProcess(self.settings, log)
        return self.worker

    def start_sink(self) -> Sink:
        """Start a sink (a new consumer-group member) in a thread."""
        self.sink = Sink(self.settings, self.store)
        self._sink_stop = threading.Event()
        self._sink_thread = threading.Thread(
            target=self.sink.run, args=(self._sink_stop,), daemon=True
        )
        self._sink_thread.start()
        return self.sink

    def stop_sink(self) -> None:
        """Graceful stop: flush, insert, commit."""
        if self.sink is not None and self._sink_thread is not None:
            self._sink_stop.set()
            self._sink_thread.join(60)
            self.sink.close()
        self.sink = None

    def drain(self, timeout_s: float = 300.0) -> None:
        """Wait until the worker and then the sink have committed everything."""
        s = self.settings
        worker = self.worker
        check = worker.check_alive if worker is not None else (lambda: None)
        wait_for_lag_zero(s, s.processor.app_id, [s.topics.events], timeout_s, check=check)
        sink_topics = [
            s.topics.priced,
            s.topics.rollups,
            s.topics.dlq,
            s.topics.alerts,
            s.topics.enforcement,
            s.topics.overages,
        ]
        wait_for_lag_zero(s, s.sink.group_id, sink_topics, timeout_s)

    def close(self) -> None:
        """Stop everything this pipeline started."""
        if self.worker is not None:
            self.worker.stop()
        self.stop_sink()
        self.store.close()

    def _history(self, user: str) -> str:
        """The user's events (offset, id, model) and every changelog write of their windows
        and seen entries, in order (diagnostics for a state that lost an event)."""
        s = self.settings
        lines = ["\nevents of the user (partition, offset, event_id, model):"]
        ids: set[str] = set()
        for part, offset, value in read_topic_keyed(s, s.topics.events, user):
            try:
                obj = orjson.loads(value or b"")
            except orjson.JSONDecodeError:
                continue
            ids.add(obj.get("event_id", ""))
            model = obj.get("served_model") or obj.get("requested_model")
            lines.append(f"  {part} {offset} {obj.get('event_id')} {model}")
        app = s.processor.app_id
        lines.append("windows changelog writes:")
        for part, offset, value in read_topic_keyed(s, f"{app}-windows-changelog", user):
            lines.append(f"  {part} {offset} {value!r}")
        lines.append("seen changelog writes:")
        for part, offset, key, value in read_topic_all(s, f"{app}-seen-changelog"):
            if key is not None and any(i and i in key.decode(errors="replace") for i in ids):
                lines.append(f"  {part} {offset} {key!r} {value!r}")
        lines.append(f"worker lag: {group_lag(s.kafka.confluent_config(), app, [s.topics.events])}")
        return "\n".join(lines)

    def _windows(self, user: str) -> str:
        """Per-window raw counts next to every stored rollup row of ``user`` (diagnostics)."""
        db = self.settings.clickhouse.database
        _, raw = self.store.query(
            f"SELECT window_start, served_model, late, count() FROM {db}.priced_events FINAL "
            "WHERE user_id = {u:String} GROUP BY window_start, served_model, late ORDER BY 1, 2",
            {"u": user},
        )
        _, rolls = self.store.query(
            f"SELECT window_start, served_model, segment, version, requests, updated_at "
            f"FROM {db}.rollups WHERE user_id = {{u:String}} ORDER BY 1, 2, 3, 4",
            {"u": user},
        )
        return "raw:\n" + "\n".join(map(str, raw)) + "\nrollups:\n" + "\n".join(map(str, rolls))

    def _counts(self) -> str:
        """Rows per table and the committed offsets of the worker and sink groups (diagnostics)."""
        s, db = self.settings, self.settings.clickhouse.database
        lines = []
        for table in ("priced_events", "rollups", "dead_letters", "alerts"):
            _, rows = self.store.query(f"SELECT count() FROM {db}.{table}")
            lines.append(f"{table}: {rows[0][0]} rows")
        conf = s.kafka.confluent_config()
        lines.append(f"worker lag: {group_lag(conf, s.processor.app_id, [s.topics.events])}")
        lines.append(f"sink lag: {group_lag(conf, s.sink.group_id, [s.topics.priced])}")
        priced = read_topic(s, s.topics.priced)
        ids = {orjson.loads(v)["event_id"] for _, _, v in priced if v}
        lines.append(f"priced topic: {len(priced)} messages, {len(ids)} distinct event ids")
        events = read_topic(s, s.topics.events)
        missing: dict[int, list[int]] = defaultdict(list)
        for part, offset, value in events:
            try:
                event_id = orjson.loads(value or b"")["event_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if event_id not in ids:
                missing[part].append(offset)
        spans = {p: _spans(offsets) for p, offsets in sorted(missing.items())}
        lines.append(f"events topic: {len(events)} messages; offsets never priced: {spans}")
        return "\n".join(lines)

    # -- reconciliation ----------------------------------------------------------------------
    def reconcile(self, oracle: Oracle, *, alerts: bool = True) -> None:
        """Assert ClickHouse equals the oracle exactly (raises AssertionError with the diff)."""
        db = self.settings.clickhouse.database
        _, rows = self.store.query(
            f"SELECT user_id, count(), uniqExact(event_id), sum(input_tokens), "
            f"sum(output_tokens), sum(cost), sum(list_value) "
            f"FROM {db}.priced_events FINAL GROUP BY user_id"
        )
        raw = {r[0]: r[1:] for r in rows}
        if set(raw) != set(oracle.per_user):
            missing = sorted(set(oracle.per_user) - set(raw))
            extra = sorted(set(raw) - set(oracle.per_user))
            raise AssertionError(
                f"users differ: {len(missing)} missing from priced_events {missing[:10]}, "
                f"{len(extra)} unexpected {extra[:10]}\n" + self._counts()
            )
        for user, (count, unique, tin, tout, cost, list_value) in raw.items():
            want = oracle.per_user[user]
            assert count == unique == want.requests, (user, count, unique, want.requests)
            assert (tin, tout) == (want.input_tokens, want.output_tokens), user
            assert cost == want.cost, (user, cost, want.cost)
            assert list_value == want.list_value, user

        _, rows = self.store.query(
            f"SELECT plan_id, count(), sum(cost) FROM {db}.priced_events FINAL GROUP BY plan_id"
        )
        per_plan = {r[0]: (r[1], r[2]) for r in rows}
        assert per_plan == {p: (t.requests, t.cost) for p, t in oracle.per_plan.items()}

        _, rows = self.store.query(
            f"SELECT user_id, sum(requests), sum(input_tokens), sum(cost) "
            f"FROM {db}.rollups FINAL GROUP BY user_id"
        )
        rolled = {r[0]: r[1:] for r in rows}
        assert set(rolled) == set(oracle.per_user)
        for user, (requests, tin, cost) in rolled.items():
            want = oracle.per_user[user]
            if (requests, tin, cost) != (want.requests, want.input_tokens, want.cost):
                raise AssertionError(
                    f"rollups of {user}: {(requests, tin, cost)} != "
                    f"{(want.requests, want.input_tokens, want.cost)}\n"
                    + self._windows(user)
                    + self._history(user)
                )

        _, rows = self.store.query(
            f"SELECT hex(payload), stage, reason FROM {db}.dead_letters FINAL"
        )
        stored = sorted(bytes.fromhex(r[0]) for r in rows)
        if stored != sorted(oracle.malformed):
            why = {bytes.fromhex(r[0]): (r[1], r[2]) for r in rows}
            missing = [m for m in oracle.malformed if m not in why]
            extra = [(p, why[p]) for p in stored if p not in oracle.malformed]
            raise AssertionError(
                f"dead letters differ: {len(missing)} missing {missing[:5]}, "
                f"{len(extra)} unexpected {extra[:5]}"
            )

        if alerts:
            _, rows = self.store.query(
                f"SELECT alert_id, count() FROM {db}.alerts GROUP BY alert_id"
            )
            stored = {r[0] for r in rows}
            expected = oracle.alert_ids()
            if stored != expected:
                odd = sorted(expected ^ stored)
                user = odd[0].split("|")[0]
                caps = read_topic_keyed(
                    self.settings, f"{self.settings.processor.app_id}-caps-changelog", user
                )
                raise AssertionError(
                    f"alerts differ: missing {sorted(expected - stored)[:10]}, "
                    f"unexpected {sorted(stored - expected)[:10]}"
                    + self._history(user)
                    + "\ncaps changelog writes:\n"
                    + "\n".join(f"  {p} {o} {v!r}" for p, o, v in caps)
                )
            _, rows = self.store.query(
                f"SELECT count(), uniqExact(alert_id) FROM {db}.alerts FINAL"
            )
            assert rows[0][0] == rows[0][1]
