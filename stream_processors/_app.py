"""The faust-streaming application, built by a factory: no module-level app, no import effects.

The agent is thin: it takes batches of events (from the :class:`~stream_processors._lane.InputLane`
in a worker, from ``take_events`` in ``agent.test_context()``), hands their raw bytes to the pure
:class:`~stream_processors.UsageProcessor`, the accepted (priced) events to the pure caps stage
(:class:`~stream_processors.caps.CapStage`), and publishes what they return. Outputs go to
the same partition number as their source message, so one user's data stays co-partitioned end
to end whatever hash function a producer used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from faust.sensors import Monitor
from faust.types import TP
from faust.types.auth import SASLMechanism

from producers import CompactedTopicView
from schemas import Subscription
from schemas.plans import SAMPLE_PLANS, PlanCatalog, load_plans
from spendstream.settings import Settings
from stream_processors._fastpath import use_fast_handover
from stream_processors._gate import BrokerProbe, InputGate
from stream_processors._lane import InputLane, use_lane
from stream_processors._pipeline import BatchPipeline
from stream_processors._pricing import PriceCatalog
from stream_processors._processor import InRecord, SourceRecord, UsageProcessor
from stream_processors.caps import CapEngine, CapOutputs, CapStage

log = logging.getLogger(__name__)


def _skip_hook(self: Any, *args: Any, **kwargs: Any) -> None:
    """A monitor hook that records nothing."""


class LeanMonitor(Monitor):
    """faust's monitor without its per-message and per-table-access bookkeeping.

    Those hooks time and count every message (a dict per event, weak-key lookups), about 3 %
    of the worker's event loop, for statistics nothing here reads: the worker's own counters
    and ``/metrics`` report throughput. Commit, send, rebalance and assignment hooks stay.
    """

    on_message_in = _skip_hook
    on_stream_event_in = _skip_hook
    on_stream_event_out = _skip_hook
    on_message_out = _skip_hook
    on_table_get = _skip_hook
    on_table_set = _skip_hook
    on_table_del = _skip_hook


class OutputProducer:
    """The worker's outputs and changelog writes through librdkafka (confluent-kafka).

    faust's own producer moves every message through a Python future, a buffer task and
    aiokafka's accumulator; at several messages per event that was most of a worker's time.
    Here a message is one ``produce()`` call into librdkafka, and :meth:`flush` waits (in a
    thread, off the event loop) until the broker acknowledged everything. A message that
    cannot be delivered stops the process without committing: the replay after a restart is
    exact by design, a commit past a lost message would not be.
    """

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(
            {
                **settings.kafka.confluent_config(),
                "client.id": f"{settings.kafka.client_id}-worker",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "batch.size": 1_000_000,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 1_000_000,
                # Delivery reports reach Python for failures only: the binding skips the
                # callback (and the Message it would build) for each of the several
                # messages per event that were delivered, and still frees their state.
                "delivery.report.only.error": True,
            }
        )
        self._failures: list[str] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        """Queue one message for ``partition`` of ``topic``."""
        while True:
            try:
                self._producer.produce(
                    topic, value, key, partition=partition, on_delivery=self._delivered
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    async def flush(self) -> None:
        """Wait until every queued message is acknowledged; exit the process if one failed."""
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self._producer.flush, 120.0)
        if left or self._failures:
            log.critical(
                "could not deliver %d message(s) (%s); stopping without committing offsets",
                left,
                "; ".join(self._failures[:5]),
            )
            os._exit(70)

    def close(self) -> None:
        """Deliver what is queued (on a clean stop)."""
        self._producer.flush(30.0)


class _FaustSends:
    """``produce()`` through faust's own producer (used where no librdkafka producer runs)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        """Queue one message through faust."""
        self._app.topic(topic, key_serializer="raw", value_serializer="raw").send_soon(
            key=key, value=value, partition=partition
        )


class TableState:
    """:class:`~stream_processors.PartitionedState` over a faust Table, partition explicit.

    The in-memory value changes at once; the changelog message is written by
    :meth:`flush_changelog`, so the agent decides the order in which a batch's state and
    outputs become durable (see the agent in :func:`build_app`). Keys are encoded as faust's
    ``json`` key serializer does and values raw, so faust restores the table from the changelog
    as if it had written it.
    """

    def __init__(self, table: Any) -> None:
        self._table = table
        self._store: dict[str, bytes] = table.data.data  # the memory store's dict: fast reads
        self._pending: list[tuple[int, str, bytes | None]] = []
        self._held: list[tuple[int, str, bytes | None]] = []
        # (key, value before, its partition before) of each change since the savepoint.
        self._undo: list[tuple[str, bytes | None, int | None]] = []
        self._pending_at_savepoint = 0

    def savepoint(self) -> None:
        """Start recording changes for :meth:`rollback` (see stream_processors._isolation)."""
        self._undo.clear()
        self._pending_at_savepoint = len(self._pending)

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`, their changelog writes too."""
        store = self._table.data
        for key, old, partition in reversed(self._undo):
            if old is None:
                store.data.pop(key, None)
                store._key_partition.pop(key, None)
            else:
                store.data[key] = old
                if partition is not None:
                    store._key_partition[key] = partition
        self._undo.clear()
        del self._pending[self._pending_at_savepoint :]

    def hold(self) -> None:
        """Keep the pending changes for the next ``flush_changelog(previous=True)``."""
        self._held.extend(self._pending)
        self._pending = []

    def flush_changelog(self, out: OutputProducer | None, *, previous: bool = False) -> int:
        """Write pending changes (with ``previous``: the held ones) to the changelog.

        Without an :class:`OutputProducer` (under ``agent.test_context()``) faust's sends it.
        """
        if previous:
            pending, self._held = self._held, []
        else:
            pending, self._pending = self._pending, []
        if out is None:
            for partition, key, value in pending:
                self._table.send_changelog(partition, key, value, value_serializer="raw")
        else:
            topic = self._table.changelog_topic.get_topic_name()
            for partition, key, value in pending:
                out.produce(topic, orjson.dumps(key), value, partition)
        return len(pending)

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``."""
        return self._store.get(key)

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set and send the change to ``partition`` of the changelog."""
        store = self._table.data
        self._undo.append((key, self._store.get(key), store._key_partition.get(key)))
        store[key] = value
        # The memory store uses this to drop keys of partitions assigned elsewhere.
        store._key_partition[key] = partition
        self._pending.append((partition, key, value))

    def delete(self, partition: int, key: str) -> None:
        """Remove and send a tombstone to ``partition`` of the changelog."""
        store = self._table.data
        self._undo.append((key, store.data.pop(key, None), store._key_partition.pop(key, None)))
        self._pending.append((partition, key, None))

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value held by this worker."""
        return iter([(k, v) for k, v in self._table.data.items() if v is not None])

    def __len__(self) -> int:
        return len(self._table.data)


def patch_consumers(app: faust.App, patch: Callable[[Any], None]) -> None:
    """Apply ``patch`` to every consumer ``app`` creates (faust has no hook for it)."""
    new_consumer = app._new_consumer

    def _new_consumer() -> Any:
        consumer: Any = new_consumer()
        patch(consumer)
        return consumer

    setattr(app, "_new_consumer", _new_consumer)  # noqa: B010 (mypy: no method assignment)


def input_lane(settings: Settings) -> InputLane:
    """The worker's :class:`~stream_processors._lane.InputLane` for the input topic."""
    p = settings.processor
    return InputLane(settings.topics.events, max_buffered=max(4 * p.batch_size, 4096))


def use_fetch_wait(consumer: Any, fetch_max_wait_ms: int) -> None:
    """Make the aiokafka consumer that faust's ``consumer`` creates wait at most this long.

    faust creates it with ``fetch_max_wait_ms=1500`` and no setting to change it. aiokafka sends
    one fetch request per broker at a time, for the assigned partitions that have no fetched
    records waiting; when every input partition still had records waiting, that request named
    only partitions that get no data (faust's leader-election topic), and the broker held it
    for the full 1.5 s while the input piled up. Under load this showed as 1.2-1.4 s with no
    input at all, early in every 10k events/s benchmark run (see BENCHMARKS.md).
    """
    thread = consumer._thread
    create = thread._create_worker_consumer

    def create_worker_consumer(*args: Any, **kwargs: Any) -> Any:
        aio = create(*args, **kwargs)
        aio._fetch_max_wait_ms = fetch_max_wait_ms  # read when the consumer starts
        return aio

    thread._create_worker_consumer = create_worker_consumer


def _patch_worker_consumer(
    app: faust.App,
    topics: frozenset[str],
    processed: Mapping[Any, int],
    lane: InputLane | None,
    fetch_max_wait_ms: int,
) -> None:
    """Give ``app`` the worker's consumer: its seeks never skip unread input (see
    :func:`_rewinding_seek`), and its fetch loop hands messages over through
    :func:`~stream_processors._fastpath.fast_wait_first`, and the input topic's to ``lane``
    when there is one; its fetches wait at most ``fetch_max_wait_ms`` (see
    :func:`use_fetch_wait`).
    """

    def patch(consumer: Any) -> None:
        consumer.perform_seek = _rewinding_seek(consumer, topics, processed)
        use_fast_handover(consumer)
        if lane is not None:
            use_lane(consumer, lane)
        use_fetch_wait(consumer, fetch_max_wait_ms)

    patch_consumers(app, patch)


def _rewinding_seek(
    consumer: Any, topics: frozenset[str], processed: Mapping[Any, int]
) -> Callable[[], Any]:
    """faust's ``perform_seek``, which also rewinds input partitions that have no commit.

    faust drops records fetched while its flow is stopped (during a rebalance or table
    recovery) and then seeks every partition back to its committed offset. aiokafka seeks only
    partitions whose committed offset is above 0, so a partition of a new consumer group kept
    the fetch position past the dropped records; faust then counted them as a gap and
    committed beyond them. The two-worker scale-out test lost runs of 70 to 500 events this
    way under CPU load. Here such a partition is sought to the offset after the last record
    this worker processed from it (``processed``: partition -> next offset), or to its earliest
    offset when it processed none. Never further back: the stream may already be flowing
    while faust seeks, and a seek behind records that are queued for processing made faust
    skip the re-read ones. Anything read twice is deduplicated by the processor's state.
    """

    async def perform_seek() -> None:
        committed = await consumer.seek_to_committed()
        fresh = [tp for tp, offset in committed.items() if tp.topic in topics and not offset]
        if fresh:
            unread = [tp for tp in fresh if (tp.topic, tp.partition) not in processed]
            earliest = await consumer.earliest_offsets(*unread) if unread else {}
            for tp in fresh:
                target = processed.get((tp.topic, tp.partition), earliest.get(tp))
                if target is None:
                    continue
                # faust's seek (no wait for the position: the fetcher resets it lazily, as
                # after faust's own seeks; waiting stalled recovery for seconds under load).
                await consumer.seek(tp, target)
            log.info("sought %d input partition(s) without a committed offset", len(fresh))
        # As faust's own perform_seek: read and committed offsets follow the commits.
        consumer._read_offset.update(
            {
                tp: offset if offset is not None and offset >= 0 else None
                for tp, offset in committed.items()
                if tp not in fresh
            }
        )
        consumer._committed_offset.update(
            {
                TP(tp.topic, tp.partition): offset or None
                for tp, offset in committed.items()
                if offset is not None
            }
        )

    return perform_seek


def _from_faust(message: Any) -> InRecord:
    """A faust Message (``agent.test_context()``) as a record: its timestamp is in seconds."""
    ts = message.timestamp
    return InRecord(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        None if ts is None else round(ts * 1000),
    )


@dataclass
class WorkerStats:
    """Counters of a worker since start (exposed as metrics and in logs)."""

    counters: Counter[str] = field(default_factory=Counter)
    batches: int = 0


@dataclass
class WorkerApp:
    """The faust app with the pieces a runner, a test or a benchmark needs to reach."""

    app: faust.App
    processor: UsageProcessor
    stats: WorkerStats
    subscriptions: CompactedTopicView[Subscription] | None
    caps: CapStage
    """The caps stage (its ``state`` is the ``caps`` table, its ``engine`` the plans)."""


def broker_credentials(settings: Settings) -> Any:
    """faust/aiokafka credentials from the same settings confluent-kafka uses."""
    k = settings.kafka
    context: ssl.SSLContext | None = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            context.load_cert_chain(
                str(k.ssl_certfile),
                str(k.ssl_keyfile) if k.ssl_keyfile else None,
                k.ssl_key_password.get_secret_value() if k.ssl_key_password else None,
            )
    if k.security_protocol.startswith("SASL_"):
        assert k.sasl_username is not None and k.sasl_password is not None
        password = k.sasl_password.get_secret_value()
        if k.sasl_mechanism == "PLAIN":
            return faust.SASLCredentials(
                username=k.sasl_username, password=password, ssl_context=context
            )
        mechanism = SASLMechanism(k.sasl_mechanism)
        return faust.SASLCredentials(
            username=k.sasl_username, password=password, ssl_context=context, mechanism=mechanism
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_app(settings: Settings, app_id: str | None = None) -> faust.App:
    """The faust App the worker runs, configured from ``settings`` (no agents or tables yet).

    ``app_id`` (the consumer group) defaults to ``processor.app_id``; the benchmark's faust
    ceiling uses the same configuration under another id.
    """
    p, t = settings.processor, settings.topics
    bootstrap = ",".join(
        f"kafka://{h.strip()}" for h in settings.kafka.bootstrap_servers.split(",")
    )
    # faust creates only the last level of its datadir when it starts.
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id or p.app_id,
        broker=bootstrap,
        broker_credentials=broker_credentials(settings),
        store="memory://",
        # faust's own folder (table metadata); by default it lands in the current directory.
        datadir=str(settings.state_dir / "faust"),
        topic_partitions=t.partitions,
        topic_replication_factor=t.replication_factor,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        web_port=p.web_port,
        producer_linger_ms=5,
        producer_max_batch_size=256 * 1024,
        stream_buffer_maxsize=max(4 * p.batch_size, 4096),
        broker_commit_every=max(p.batch_size, 1000),
        table_cleanup_interval=3600.0,
        # Standby replicas buy faster fail-over with several workers; the memory store keeps
        # them in the same dict as the active state, and a standby promoted to active has
        # been seen to miss recent changelog writes (a lost window after a SIGKILL in the
        # fault suite). A promoted partition is recovered from its changelog instead.
        table_standby_replicas=0,
        broker_session_timeout=p.session_timeout_s,
        broker_heartbeat_interval=max(p.session_timeout_s / 10, 0.5),
        autodiscover=False,
        loghandlers=[],
        Monitor=LeanMonitor,
    )


def build_app(
    settings: Settings,
    *,
    catalog: PriceCatalog | None = None,
    subscriptions: Callable[[str], Subscription | None] | None = None,
    plans: PlanCatalog | None = None,
    on_batch: Callable[[Any], None] | None = None,
    on_caps: Callable[[Any], None] | None = None,
    in_process: bool = False,
) -> WorkerApp:
    """Build the worker's faust App from settings.

    ``subscriptions`` looks up a user's plan schedule; by default a
    :class:`~producers.CompactedTopicView` over the subscriptions topic, started with the app.
    ``plans`` is the plans catalog; by default ``settings.plans_file`` or the sample plans.
    ``on_batch`` (tests, benchmarks) sees every :class:`~stream_processors.BatchResult` and
    ``on_caps`` every :class:`~stream_processors.caps.CapOutputs`. ``in_process`` is for
    ``agent.test_context()``: no librdkafka producer, faust's in-memory sends instead.
    """
    p = settings.processor
    t = settings.topics
    app = faust_app(settings)
    catalog = catalog or PriceCatalog.load(
        p.price_catalog,
        p.price_overrides,
        fallback_input=p.fallback_input_cost_per_token,
        fallback_output=p.fallback_output_cost_per_token,
    )

    view = None
    # Users whose subscription record changed (from the view's thread): their new credit
    # grants are applied by a timer, since a user blocked at the ceiling sends no events.
    changed_users: deque[str] = deque()
    if subscriptions is None:
        view = CompactedTopicView(
            settings.kafka.confluent_config(),
            t.subscriptions,
            Subscription.model_validate_json,
            on_update=changed_users.append,
        )
        subscriptions = view.get

    def table(name: str) -> Any:
        # key_type=str -> JSON-encoded keys restored as str; value_type=bytes -> raw values.
        return app.Table(name, partitions=t.partitions, key_type=str, value_type=bytes)

    seen_t, windows_t, marks_t = table("seen"), table("windows"), table("marks")
    seen_s, windows_s, marks_s = TableState(seen_t), TableState(windows_t), TableState(marks_t)
    # One value per user: orjson of UserCapState.to_dict() (see stream_processors.caps.stage).
    caps_t = table("caps")
    processor = UsageProcessor(
        catalog,
        subscriptions,
        seen=seen_s,
        windows=windows_s,
        marks=marks_s,
        window_s=p.window_s,
        grace_s=p.grace_s,
        dedupe_horizon_s=p.dedupe_horizon_s,
        future_skew_s=p.future_skew_s,
    )
    plans = plans or load_plans(settings.plans_file or SAMPLE_PLANS)
    caps = CapStage(
        CapEngine(plans, grace_s=p.grace_s),
        subscriptions,
        caps_s := TableState(caps_t),
        events_topic=t.events,
    )
    stats = WorkerStats()
    pipeline = BatchPipeline(processor, caps, (seen_s, windows_s, marks_s, caps_s))

    # A worker takes its input from the lane, and commits its offsets itself: faust neither
    # tracks nor commits them (acks=False). In-process tests feed the agent's stream instead.
    lane = None if in_process else input_lane(settings)
    events = app.topic(t.events, key_serializer="raw", value_serializer="raw", acks=lane is None)
    # Each input partition's records in offset order, none skipped (see stream_processors._gate).
    # In-process tests have no broker to ask and no faust fetcher to race with.
    probe = None if in_process else BrokerProbe(settings.kafka.confluent_config(), p.app_id)
    gate = None if probe is None else InputGate(probe)
    # Partition -> the offset after the last record this worker processed from it.
    processed_upto: dict[Any, int] = {} if gate is None else gate.next
    _patch_worker_consumer(app, frozenset({t.events}), processed_upto, lane, p.fetch_max_wait_ms)
    held: set[tuple[str, int]] = set()

    @app.on_partitions_assigned.connect
    async def _on_assigned(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        # Only a partition held before and after a rebalance keeps its expected offset: no
        # other worker can have read it in between. Any other starts from its commit.
        assigned = {(tp.topic, tp.partition) for tp in (args[0] if args else set())}
        if gate is not None:
            gate.keep_only(held & assigned)  # processed_upto is its ``next``
        else:
            for part in [part for part in processed_upto if part not in held & assigned]:
                del processed_upto[part]
        held.clear()
        held.update(assigned)

    # Offsets (next to read, per faust TP) of processed batches whose state is queued but not yet
    # known durable; committed by the worker itself once a flush made that state durable.
    # faust's own commits were seen to stall for some partitions after a restart (its
    # acked-offset gap check), leaving consumer lag behind processing for good.
    commit_lock = asyncio.Lock()
    pending_offsets: dict[Any, int] = {}
    outputs: list[OutputProducer] = []

    async def make_state_durable(out: OutputProducer) -> None:
        # The queued states, then (flushed on the next call) the held watermarks.
        await out.flush()
        marks_s.flush_changelog(out, previous=True)
        await out.flush()

    if lane is not None:

        @app.on_partitions_revoked.connect
        async def _on_revoked(sender: Any, /, *args: Any, **kwargs: Any) -> None:
            # faust has stopped the flow: nothing more reaches the lane until the new
            # assignment. As faust waits for in-flight events before a rebalance, wait for the
            # batch in progress, drop what was fetched and not taken (another worker may own
            # it next), and make the last batch's state durable before its owner changes.
            async with lane.busy:
                dropped = lane.clear()
                if dropped:
                    stats.counters["input_dropped_at_rebalance"] += dropped
                if outputs:
                    async with commit_lock:
                        await make_state_durable(outputs[0])

    # Offsets whose batches' state is durable, not committed yet: committed together at most
    # every processor.commit_interval_s (by the batch loop, or by the idle timer).
    committable: dict[Any, int] = {}
    last_commit = [0.0]

    async def commit_due(ready: dict[Any, int], *, now: bool = False) -> None:
        for tp, offset in ready.items():
            if offset > committable.get(tp, -1):
                committable[tp] = offset
        if committable and (now or time.monotonic() - last_commit[0] >= p.commit_interval_s):
            offsets = dict(committable)
            committable.clear()
            last_commit[0] = time.monotonic()
            await commit_offsets(offsets)

    async def commit_offsets(offsets: dict[Any, int]) -> None:
        if not offsets:
            return
        consumer: Any = app.consumer
        if await consumer._commit(offsets):
            known = consumer._committed_offset
            for tp, offset in offsets.items():
                if known[tp] is None or offset > known[tp]:
                    known[tp] = offset  # faust must not commit anything lower after us

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _commit_idle() -> None:
        # The last batch before a pause: make its state durable, then commit its offsets
        # (with any the batch loop has not committed yet).
        if not outputs or not (pending_offsets or committable):
            return
        async with commit_lock:
            await make_state_durable(outputs[0])
            ready = dict(pending_offsets)
            pending_offsets.clear()
        await commit_due(ready, now=True)

    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
    async def _seek_stalled_inputs() -> None:
        # A lost record is seen as a gap when a later one arrives; this covers the last one.
        if gate is None or not outputs or app.rebalancing:
            return
        consumer: Any = app.consumer
        highwaters = {}
        for tp in consumer.assignment():
            if tp.topic == t.events and (end := consumer.highwater(tp)) is not None:
                highwaters[(tp.topic, tp.partition)] = end
        for (topic, partition), offset in (await gate.stalled(highwaters)).items():
            await consumer.seek(TP(topic, partition), offset)
            stats.counters["input_stall_seeks"] += 1

    def publish_caps(sink: OutputProducer | _FaustSends, capped: CapOutputs) -> None:
        """Queue the cap stage's outputs, each on the partition of its user's state."""
        where = capped.partitions
        for topic_name, messages in (
            (t.alerts, capped.alerts),
            (t.enforcement, capped.enforcement),
            (t.overages, capped.overages),
            (t.dlq, capped.dead),
        ):
            for key, value in messages:
                sink.produce(topic_name, key.encode(), value, where[key])

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _apply_credits() -> None:
        if not changed_users or not outputs or app.rebalancing:
            return
        users: set[str] = set()
        while changed_users:
            users.add(changed_users.popleft())
        async with commit_lock:
            capped = caps.apply_credits(sorted(users), datetime.now(UTC))
            if not capped.counters["caps_credit_grants"]:
                return
            out = outputs[0]
            publish_caps(out, capped)
            # Outputs before the state that says they were produced, as for a batch.
            await out.flush()
            caps_s.flush_changelog(out)
            await out.flush()
        stats.counters.update(capped.counters)
        if on_caps is not None:
            on_caps(capped)

    @app.agent(events, name="price-and-rollup")
    async def price_and_rollup(stream: Any) -> None:
        # A worker publishes through librdkafka; in-process tests (agent.test_context(), no
        # broker) pass in_process=True and faust's own sends stand in.
        output = None if in_process else OutputProducer(settings)
        log.info("worker outputs through %s", "faust" if output is None else "librdkafka")
        sink: OutputProducer | _FaustSends = output or _FaustSends(app)
        if output is not None:
            outputs[:] = [output]
            faust_flush = app.producer.flush

            async def flush_both() -> None:
                # faust awaits this before every offset commit: ours must be durable too.
                await faust_flush()
                await make_state_durable(output)

            app.producer.flush = flush_both  # type: ignore[method-assign]
        try:
            await _process_batches(stream, sink, output)
        except Exception:
            # Not a record's error (those become dead letters in the pipeline): the worker
            # cannot go on. faust would restart the agent inside a process that then
            # processed nothing more while it looked alive; exit, so a supervisor restarts
            # the process and it replays from the last committed offsets.
            log.critical("the worker cannot go on; exiting with status 70", exc_info=True)
            logging.shutdown()
            os._exit(70)
        finally:
            if output is not None:
                output.close()
            if probe is not None:
                probe.close()

    async def _process_batches(
        stream: Any, sink: OutputProducer | _FaustSends, output: OutputProducer | None
    ) -> None:
        if lane is None:
            async for taken in stream.take_events(p.batch_size, within=p.batch_within_s):
                batch = [_from_faust(e.message) for e in taken]
                await commit_offsets(await _process(batch, sink, output))
            return
        while True:
            messages, generation = await lane.take(p.batch_size, p.batch_within_s)
            async with lane.busy:
                if lane.generation != generation:
                    # A rebalance took the lock first and cleared the lane: these are from
                    # before it, and their partitions may belong to another worker now.
                    stats.counters["input_dropped_at_rebalance"] += len(messages)
                    continue
                ready = await _process(messages, sink, output)
            # Outside the lock: a commit can wait on a rebalance, which waits on the lock.
            await commit_due(ready)

    async def _process(
        messages: list[Any], sink: OutputProducer | _FaustSends, output: OutputProducer | None
    ) -> dict[Any, int]:
        """Process one batch of input messages; the offsets made committable by it.

        Those are the previous batches' offsets, whose state this batch's flush made durable.
        """
        # aiokafka's records from the lane, faust's messages under test: both have the
        # fields of a SourceRecord, so they are processed as they are.
        records: list[SourceRecord] = messages
        gated: Counter[str] = Counter()
        if gate is not None:
            admitted = await gate.admit(records)
            if admitted.dropped:
                # The input topic has no acks (the lane): dropped records need no un-acking.
                records = [records[i] for i in admitted.kept]
            for (topic, partition), offset in admitted.seeks.items():
                await app.consumer.seek(TP(topic, partition), offset)
            gated.update(
                input_redelivered=admitted.redelivered,
                input_held_back=admitted.held_back,
                input_gaps_skipped=admitted.gaps_skipped,
                input_seeks=len(admitted.seeks),
            )
        # Under the lock from the batch's first state change on: the credits timer, which
        # writes the cap state's pending changes, must not write this batch's ahead of
        # its outputs.
        async with commit_lock:
            # Pricing, then caps, in the same batch (the processor already deduplicated, so
            # each event counts once toward the user's windows); a record whose processing
            # raises becomes a dead letter and the rest of the batch goes on.
            batch = pipeline.run(records)
            result, capped = batch.result, batch.capped
            result.counters.update(+gated)
            partition_of = batch.partition_of
            for topic_name, out in ((t.priced, result.priced), (t.rollups, result.rollups)):
                for key, value in out:
                    sink.produce(topic_name, key.encode(), value, partition_of[key])
            publish_caps(sink, capped)
            for rec_key, value, partition in result.dead:
                sink.produce(t.dlq, rec_key, value, partition)
            # Durability order, so that a crash anywhere before the offset commit replays
            # into exactly-once state (each state also records the last offset it applied):
            # outputs are acked before the states that say they were produced are written,
            # and states before the watermarks, whose advance would otherwise change how a
            # replay classifies lateness. The flush here makes this batch's outputs and the
            # previous batch's states durable; then the previous batch's watermarks and this
            # batch's states are queued. Before committing offsets faust flushes its producer,
            # which flushes ours too (see below), so no offset is committed ahead of state.
            upto: dict[tuple[str, int], int] = {}
            for r in records:
                part, after = (r.topic, r.partition), r.offset + 1
                if after > upto.get(part, 0):
                    upto[part] = after
            batch_offsets: dict[Any, int] = {TP(*part): offset for part, offset in upto.items()}
            if gate is None:  # otherwise the gate advanced its ``next`` (processed_upto)
                for tp, offset in batch_offsets.items():
                    part = (tp.topic, tp.partition)
                    processed_upto[part] = max(processed_upto.get(part, 0), offset)
            if output is not None:
                await output.flush()
            marks_s.flush_changelog(output, previous=True)
            ready = dict(pending_offsets)  # the previous batches' state is durable now
            pending_offsets.clear()
            for state in (seen_s, windows_s, caps_s):
                state.flush_changelog(output)
            marks_s.hold()
            if output is not None:
                for tp, offset in batch_offsets.items():
                    pending_offsets[tp] = max(pending_offsets.get(tp, 0), offset)
        stats.batches += 1
        stats.counters.update(result.counters)
        stats.counters.update(capped.counters)
        if on_batch is not None:
            on_batch(result)
        if on_caps is not None:
            on_caps(capped)
        return ready

    @app.on_rebalance_complete.connect
    async def _on_rebalance(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        # A revoked partition's offsets are no longer ours to commit (its new owner replays
        # from the last commit; the states count each event once).
        pending_offsets.clear()
        committable.clear()
        processor.reset_caches()
        caps.reset_caches()
        if view is not None:
            # States restored here may have credit grants not applied yet.
            changed_users.extend(u for u, sub in view.snapshot().items() if sub.credits)

    # The caller starts the subscriptions view (and waits until it has read the topic) before
    # the worker consumes: pricing with an unknown plan would be wrong, not just late.
    return WorkerApp(app, processor, stats, view, caps)
