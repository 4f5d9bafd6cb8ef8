"""The faust-streaming application, built by a factory: no module-level app, no import effects.

The agent is thin: it takes batches of events (from the :class:`~stream_processors._lane.InputLane`
in a worker, from ``take_events`` in ``agent.test_context()``), hands their raw bytes to the pure
:class:`~stream_processors.UsageProcessor`, the accepted (priced) events to the pure caps stage
(:class:`~stream_processors.caps.CapStage`), and publishes what they return. Outputs go to
the same partition number as their source message, so one user's data stays co-partitioned end
to end whatever hash function a producer used. The commit protocol is
:class:`~stream_processors._checkpoint.Checkpointer`'s; every faust internal the worker relies on
is in :mod:`stream_processors.faust_patches`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import ssl
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from faust.types.auth import SASLMechanism

from producers import CompactedTopicView
from schemas import REQUEST_PREFIX, Subscription
from schemas.plans import SAMPLE_PLANS, PlanCatalog, load_plans
from spendstream.settings import Settings
from stream_processors._checkpoint import Checkpointer
from stream_processors._gate import BrokerProbe, InputGate
from stream_processors._lane import InputLane
from stream_processors._output import FaustSends, OutputProducer
from stream_processors._pipeline import BatchPipeline
from stream_processors._pricing import PriceCatalog
from stream_processors._processor import InRecord, SourceRecord, UsageProcessor
from stream_processors._store import DurableState, LocalStore, Recovery, changelog_topics
from stream_processors.caps import CapEngine, CapOutputs, CapStage
from stream_processors.faust_patches import (
    LeanMonitor,
    chain_producer_flush,
    commit_offsets,
    patch_worker_consumer,
    require_tested_faust,
)

log = logging.getLogger(__name__)


def input_lane(settings: Settings) -> InputLane:
    """The worker's :class:`~stream_processors._lane.InputLane` for the input topic."""
    p = settings.processor
    return InputLane(
        settings.topics.events,
        max_buffered=max(4 * p.batch_size, 4096),
        urgent=_is_admission,
    )


def _is_admission(message: Any) -> bool:
    """An admission request: its gateway waits for the answer (docs/DESIGN.md, "Admission")."""
    value = message.value
    return value is not None and value.startswith(REQUEST_PREFIX)


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
    store: LocalStore
    """The local state (one RocksDB per input partition)."""
    recovery: Recovery | None = None
    """Restores assigned partitions (``None`` in-process: nothing to restore from)."""


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
        # The worker's state is not in faust tables (stream_processors._store): faust keeps
        # only its own metadata here, and has no tables to restore or stand by for.
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
    require_tested_faust()
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

    # Durable local state (stream_processors._store): one RocksDB per input partition holding
    # every table, backed by faust-format changelog topics. In-process tests have no
    # changelog: their partitions open on first use.
    if in_process:
        # No changelog to restore from: a state kept past the process would be wrong.
        root = Path(tempfile.mkdtemp(prefix="spendstream-state-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    else:
        root = settings.state_dir / "store" / p.app_id
    store = LocalStore(root, auto_open=in_process, memory_mib=p.state_memory_mib)
    changelogs = changelog_topics(p.app_id)

    def table(name: str, *, hour_index: bool = False) -> DurableState:
        return DurableState(store, name, changelogs[name], hour_index=hour_index)

    seen_s, windows_s, marks_s = table("seen", hour_index=True), table("windows"), table("marks")
    # One value per user: orjson of UserCapState.to_dict() (see stream_processors.caps.stage).
    caps_s = table("caps")
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
        CapEngine(plans, grace_s=p.grace_s, reservation_ttl_s=settings.admission.reservation_ttl_s),
        subscriptions,
        caps_s,
        events_topic=t.events,
        estimator=catalog.estimate,
        pool_zone=settings.admission.pool_zone,
        reply_partitions=t.partitions,
    )
    stats = WorkerStats()
    pipeline = BatchPipeline(processor, caps, (seen_s, windows_s, marks_s, caps_s))

    # A worker takes its input from the lane, and commits its offsets itself: faust neither
    # tracks nor commits them (acks=False). In-process tests feed the agent's stream instead.
    lane = None if in_process else input_lane(settings)
    recovery = (
        None
        if in_process
        else Recovery(
            store,
            [seen_s, windows_s, marks_s, caps_s],
            settings.kafka.confluent_config(),
            changelogs,
            partitions=t.partitions,
            replication=t.replication_factor,
        )
    )
    events = app.topic(t.events, key_serializer="raw", value_serializer="raw", acks=lane is None)
    # Each input partition's records in offset order, none skipped (see stream_processors._gate).
    # In-process tests have no broker to ask and no faust fetcher to race with.
    probe = None if in_process else BrokerProbe(settings.kafka.confluent_config(), p.app_id)
    gate = None if probe is None else InputGate(probe)
    # Partition -> the offset after the last record this worker processed from it.
    processed_upto: dict[Any, int] = {} if gate is None else gate.next
    patch_worker_consumer(app, frozenset({t.events}), processed_upto, lane, p.fetch_max_wait_ms)
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
        if recovery is not None:
            # Processing waits for the restore (see _process_batches).
            recovery.assign({p for topic, p in assigned if topic == t.events})

    async def commit(offsets: Mapping[Any, int]) -> None:
        await commit_offsets(app.consumer, offsets)

    checkpoint = Checkpointer(
        (seen_s, windows_s, caps_s), marks_s, commit, interval_s=p.commit_interval_s
    )

    if lane is not None:

        @app.on_partitions_revoked.connect
        async def _on_revoked(sender: Any, /, *args: Any, **kwargs: Any) -> None:
            # faust has stopped the flow: nothing more reaches the lane until the new
            # assignment. As faust waits for in-flight events before a rebalance, wait for the
            # batch in progress and drop what was fetched and not taken (another worker may own
            # it next); the checkpointer makes the last batch's state durable.
            async with lane.busy:
                dropped = lane.clear()
                if dropped:
                    stats.counters["input_dropped_at_rebalance"] += dropped
                await checkpoint.revoke()
                if recovery is not None:
                    # Durable and stored locally: the files stay for a later owner here.
                    await recovery.revoke(set(store.partitions()))

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _commit_idle() -> None:
        await checkpoint.idle()

    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
    async def _seek_stalled_inputs() -> None:
        # A lost record is seen as a gap when a later one arrives; this covers the last one.
        if gate is None or checkpoint.output is None or app.rebalancing:
            return
        consumer: Any = app.consumer
        highwaters = {}
        for tp in consumer.assignment():
            if tp.topic == t.events and (end := consumer.highwater(tp)) is not None:
                highwaters[(tp.topic, tp.partition)] = end
        for (topic, partition), offset in (await gate.stalled(highwaters)).items():
            await consumer.seek(TP(topic, partition), offset)
            stats.counters["input_stall_seeks"] += 1

    def publish_caps(sink: OutputProducer | FaustSends, capped: CapOutputs) -> None:
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
        for gateway, answer, partition in capped.answers:
            sink.produce(t.admissions, gateway.encode(), answer, partition)

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _apply_credits() -> None:
        out = checkpoint.output
        restoring = recovery is not None and recovery.restoring
        if not changed_users or out is None or app.rebalancing or restoring:
            return
        users: set[str] = set()
        while changed_users:
            users.add(changed_users.popleft())
        async with checkpoint.lock:
            capped = caps.apply_credits(sorted(users), datetime.now(UTC))
            if not capped.counters["caps_credit_grants"]:
                return
            publish_caps(out, capped)
            # Outputs before the state that says they were produced, as for a batch.
            await checkpoint.flush()
            caps_s.flush_changelog(out)
            await checkpoint.flush()
        stats.counters.update(capped.counters)
        if on_caps is not None:
            on_caps(capped)

    @app.agent(events, name="price-and-rollup")
    async def price_and_rollup(stream: Any) -> None:
        # A worker publishes through librdkafka; in-process tests (agent.test_context(), no
        # broker) pass in_process=True and faust's own sends stand in.
        output = None if in_process else OutputProducer(settings)
        log.info("worker outputs through %s", "faust" if output is None else "librdkafka")
        sink: OutputProducer | FaustSends = output or FaustSends(app)
        if output is not None:
            checkpoint.output = output
            # faust awaits its producer's flush before any offset commit of its own.
            chain_producer_flush(app, checkpoint.make_durable)
        try:
            await _process_batches(stream, sink)
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

    async def _process_batches(stream: Any, sink: OutputProducer | FaustSends) -> None:
        if lane is None:
            async for taken in stream.take_events(p.batch_size, within=p.batch_within_s):
                batch = [_from_faust(e.message) for e in taken]
                await checkpoint.commit_due(await _process(batch, sink))
            return
        while True:
            messages, generation = await lane.take(p.batch_size, p.batch_within_s)
            if recovery is not None:
                # Returns at once when no restore runs; re-raises a failed restore's error
                # (the worker then exits: it cannot price without its state).
                await recovery.wait()
            async with lane.busy:
                if lane.generation != generation:
                    # A rebalance took the lock first and cleared the lane: these are from
                    # before it, and their partitions may belong to another worker now.
                    stats.counters["input_dropped_at_rebalance"] += len(messages)
                    continue
                ready = await _process(messages, sink)
            # Outside the lock: a commit can wait on a rebalance, which waits on the lock.
            await checkpoint.commit_due(ready)

    async def _process(messages: list[Any], sink: OutputProducer | FaustSends) -> dict[Any, int]:
        """Process one batch of input messages; the offsets it made committable."""
        # aiokafka's records from the lane, faust's messages under test: both have the
        # fields of a SourceRecord, so they are processed as they are.
        records: list[SourceRecord] = messages
        gated: Counter[str] = Counter()
        if recovery is not None and any(not store.is_open(r.partition) for r in records):
            # Fetched before a rebalance that took the partition away: its new owner reads it.
            kept = [r for r in records if store.is_open(r.partition)]
            stats.counters["input_dropped_at_rebalance"] += len(records) - len(kept)
            records = kept
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
        async with checkpoint.lock:
            # Pricing, then caps, in the same batch (the processor already deduplicated, so
            # each event counts once toward the user's windows); a record whose processing
            # raises becomes a dead letter and the rest of the batch goes on.
            batch = pipeline.run(records)
            result, capped = batch.result, batch.capped
            result.counters.update(+gated)
            # The cap stage's few records first: alerts and enforcement are what users and
            # gateways wait for, and queued last they waited for the produce() calls of the
            # batch's thousands of priced events and rollups. The order across topics changes
            # nothing else: every output is acknowledged before any offset is committed.
            publish_caps(sink, capped)
            partition_of = batch.partition_of
            for topic_name, out in ((t.priced, result.priced), (t.rollups, result.rollups)):
                for key, value in out:
                    sink.produce(topic_name, key.encode(), value, partition_of[key])
            for rec_key, value, partition in result.dead:
                sink.produce(t.dlq, rec_key, value, partition)
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
            # Outputs acknowledged, then states, then watermarks; offsets after (see
            # stream_processors._checkpoint).
            ready = await checkpoint.batch_done(batch_offsets)
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
        checkpoint.rebalanced()
        processor.reset_caches()
        caps.reset_caches()
        if view is not None:
            # States restored here may have credit grants not applied yet.
            changed_users.extend(u for u, sub in view.snapshot().items() if sub.credits)

    # The caller starts the subscriptions view (and waits until it has read the topic) before
    # the worker consumes: pricing with an unknown plan would be wrong, not just late.
    return WorkerApp(app, processor, stats, view, caps, store, recovery)
