"""The notify service: the alerts and enforcement topics to HTTP endpoints, at least once.

*One consumer group per endpoint* (``<notify.group_id>.<endpoint>``), each with its own
consumer, queue, delivery tasks and committed offsets, in one process. An endpoint that is down
holds back only its own offsets and its own queue: the others read, deliver and commit on, and
a restart re-sends to an endpoint only what that endpoint had not acknowledged. (With one group
for all endpoints, a record would stay uncommitted until its slowest endpoint answered, and a
restart would re-send it to endpoints that had long acknowledged it.)

*Commit protocol.* An endpoint's consumer reads a record, builds its notification and, when a
route sends it there, queues it; the record's offset stays pending until the notification is
acknowledged (2xx) or its dead letter is acknowledged by Kafka. Records without a notification
for the endpoint are done when read. The committed offset of a partition is its lowest pending
offset (or one past the last read when none is), committed every ``commit_interval_s``, when
partitions are revoked and at the stop. So a crash loses nothing: everything after the
committed offset is read again, and only notifications not yet acknowledged, or acknowledged
since the last commit, are sent again, with the same ``webhook-id``.

*Flow.* Each endpoint has ``concurrency`` delivery tasks (1: in publication order per
partition). At ``max_pending`` notifications read but not done, its consumer pauses its
partitions (and keeps polling, so it stays in the group) until deliveries catch up.

*Revocation and stop.* Deliveries of revoked partitions (and, at a stop, all of them) get
``shutdown_grace_s`` to finish; then they are abandoned without a dead letter (a wait between
retries ends at once), the offsets done are committed, and the new owner (or the next start)
sends the rest again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from spendstream.errors import KafkaError, SpendstreamError
from spendstream.notify import metrics as m
from spendstream.notify.delivery import Attempt, RetryPolicy, attempt
from spendstream.notify.records import Notification, NotifyDeadLetter, notification
from spendstream.notify.routing import Endpoint, RouteTable, load_routes
from spendstream.settings import KafkaSettings, Settings

log = logging.getLogger("spendstream.notify")

TP = tuple[str, int]
Role = Literal["alerts", "enforcement"]


def aiokafka_security(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka client arguments from the settings confluent-kafka uses (secrets revealed)."""
    conf: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
        if kafka.ssl_certfile:
            context.load_cert_chain(
                str(kafka.ssl_certfile),
                str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None,
            )
        conf["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL_"):
        assert kafka.sasl_password is not None  # the settings refuse SASL without it
        conf["sasl_mechanism"] = kafka.sasl_mechanism
        conf["sasl_plain_username"] = kafka.sasl_username
        conf["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return conf


# -- offsets ------------------------------------------------------------------------------------


@dataclass
class _Partition:
    pending: dict[int, None] = field(default_factory=dict)  # insertion order = offset order
    next: int | None = None
    committed: int | None = None


class OffsetTracker:
    """Which offsets of each partition are read but not done, and what may be committed.

    Offsets are read in increasing order per partition (gaps allowed: compaction, transaction
    markers); ``done`` may come in any order. The committable offset of a partition is its
    lowest pending offset, or one past the last offset read when nothing is pending.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}

    def read(self, tp: TP, offset: int, *, pending: bool) -> None:
        """Record ``offset`` of ``tp`` as read; ``pending`` until :meth:`done` if True."""
        part = self._parts.setdefault(tp, _Partition())
        if pending:
            part.pending[offset] = None
        part.next = offset + 1

    def done(self, tp: TP, offset: int) -> None:
        """The notification of ``offset`` was delivered or dead-lettered."""
        part = self._parts.get(tp)
        if part is not None:
            part.pending.pop(offset, None)

    def pending(self, tps: Iterable[TP] | None = None) -> int:
        """Offsets read and not done (of ``tps``, default all)."""
        keys = self._parts if tps is None else [tp for tp in tps if tp in self._parts]
        return sum(len(self._parts[tp].pending) for tp in keys)

    def committable(self, tps: Iterable[TP] | None = None) -> dict[TP, int]:
        """Offsets to commit now: per partition, where it advanced past its last commit."""
        out: dict[TP, int] = {}
        for tp in self._parts if tps is None else tps:
            part = self._parts.get(tp)
            if part is None or part.next is None:
                continue
            offset = next(iter(part.pending)) if part.pending else part.next
            if part.committed is None or offset > part.committed:
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TP, int]) -> None:
        """Record a successful commit of ``offsets``."""
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = offset

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop what is known of ``tps`` (revoked, or assigned afresh)."""
        for tp in tps:
            self._parts.pop(tp, None)


# -- leases -------------------------------------------------------------------------------------


class Lease:
    """Ownership of one partition by one endpoint runner, from assignment to revocation."""

    def __init__(self) -> None:
        self._revoked = asyncio.Event()

    @property
    def revoked(self) -> bool:
        """True once the partition is revoked or the runner stops for good."""
        return self._revoked.is_set()

    def revoke(self) -> None:
        """End the lease: deliveries of its records stop retrying and are not marked done."""
        self._revoked.set()

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True (at once) if the lease is revoked meanwhile."""
        try:
            await asyncio.wait_for(self._revoked.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Job:
    notification: Notification
    tp: TP
    offset: int
    key: bytes | None
    published_ms: int
    lease: Lease


# -- dead letters -------------------------------------------------------------------------------


class DeadLetterWriter:
    """Produces dead letters to ``topics.notify_dlq`` and waits for Kafka's acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.notify_dlq
        self._settings = settings
        self._producer: Any = None

    async def start(self) -> None:
        """Connect (:class:`KafkaError` if the cluster cannot be reached)."""
        self._producer = AIOKafkaProducer(
            **aiokafka_security(self._settings.kafka),
            client_id=f"{self._settings.kafka.client_id}-notify-dlq",
            acks="all",
            enable_idempotence=True,
        )
        try:
            await self._producer.start()
        except Exception as exc:
            await self._producer.stop()
            raise KafkaError(f"cannot start the notify dead-letter producer: {exc}") from exc

    async def send(self, key: bytes | None, letter: NotifyDeadLetter) -> None:
        """Publish one dead letter; :class:`KafkaError` unless Kafka acknowledged it."""
        try:
            await self._producer.send_and_wait(self.topic, orjson.dumps(letter), key=key)
        except Exception as exc:
            raise KafkaError(f"cannot publish a notify dead letter to {self.topic}: {exc}") from exc

    async def stop(self) -> None:
        """Flush and disconnect."""
        if self._producer is not None:
            await self._producer.stop()


# -- one endpoint -------------------------------------------------------------------------------


@dataclass
class EndpointStats:
    """What one endpoint's runner has done (read by ``/health`` from another thread)."""

    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    commits: int = 0
    pending: int = 0
    assigned: int = 0
    running: bool = False
    last_poll: float = field(default_factory=time.monotonic)
    failing_since: float | None = None
    """Wall-clock time of the first failed attempt since the last success, if any."""
    last_error: str | None = None


class EndpointRunner:
    """One endpoint: its consumer group, queue, delivery tasks and commits."""

    def __init__(
        self,
        settings: Settings,
        endpoint: Endpoint,
        table: RouteTable,
        dead_letters: DeadLetterWriter,
        *,
        rng: random.Random | None = None,
    ) -> None:
        cfg = settings.notify
        self.settings = settings
        self.endpoint = endpoint
        self.table = table
        self.group_id = f"{cfg.group_id}.{endpoint.name}"
        kinds = table.kinds_for(endpoint.name)
        self.topics: dict[str, Role] = {}
        if kinds & {"threshold", "break_even"}:
            self.topics[settings.topics.alerts] = "alerts"
        if "enforcement" in kinds:
            self.topics[settings.topics.enforcement] = "enforcement"
        self.policy = RetryPolicy(cfg.max_attempts, cfg.retry_initial_s, cfg.retry_max_s)
        self.stats = EndpointStats()
        self._dead_letters = dead_letters
        self._rng = rng or random.Random()
        self._tracker = OffsetTracker()
        self._leases: dict[TP, Lease] = {}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._consumer: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._last_commit = 0.0
        self._paused = False
        self._failure: BaseException | None = None

    # -- running --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and deliver until ``stop`` is set; then drain (bounded), commit and leave.

        A delivery task that fails (a bug: attempts catch the receiver's errors) stops the
        runner, which raises it after the same bounded drain.
        """
        cfg = self.settings.notify
        session_ms = int(cfg.session_timeout_s * 1000)
        self._consumer = AIOKafkaConsumer(
            **aiokafka_security(self.settings.kafka),
            client_id=f"{self.settings.kafka.client_id}-notify-{self.endpoint.name}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.start_from,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(1000, session_ms // 3),
        )
        self._consumer.subscribe(list(self.topics), listener=_Listener(self))
        try:
            await self._consumer.start()
        except Exception as exc:
            await self._consumer.stop()
            raise KafkaError(
                f"notify endpoint {self.endpoint.name}: cannot start its consumer: {exc}"
            ) from exc
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.endpoint.concurrency)
        )
        workers = [
            asyncio.create_task(self._deliver_loop(), name=f"notify-{self.endpoint.name}-{i}")
            for i in range(self.endpoint.concurrency)
        ]
        for task in workers:
            task.add_done_callback(self._on_worker_done)
        self.stats.running = True
        try:
            await self._consume(stop)
        finally:
            self.stats.running = False
            await self._finish(workers)

    async def _consume(self, stop: asyncio.Event) -> None:
        cfg = self.settings.notify
        while not stop.is_set():
            if self._failure is not None:
                raise self._failure
            self.stats.last_poll = time.monotonic()
            self._flow()
            batches = await self._consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    self._accept((tp.topic, tp.partition), record)
            self.stats.pending = self._tracker.pending()
            m.PENDING.labels(self.endpoint.name).set(self.stats.pending)
            if time.monotonic() - self._last_commit >= cfg.commit_interval_s:
                await self._commit()

    def _flow(self) -> None:
        """Pause the partitions at ``max_pending`` notifications in progress, resume below."""
        full = self._tracker.pending() >= self.settings.notify.max_pending
        if full != self._paused:
            parts = list(self._consumer.assignment())
            if full:
                self._consumer.pause(*parts)
            else:
                self._consumer.resume(*parts)
            self._paused = full

    def _accept(self, tp: TP, record: Any) -> None:
        lease = self._leases.get(tp)
        if lease is None or lease.revoked:
            return  # fetched before a revocation: the new owner reads it again
        pending = False
        if record.value is None:
            self._skip("tombstone")
        else:
            try:
                made = notification(self.topics[tp[0]], record.value)
            except ValueError as exc:
                log.warning(
                    "skipping record %s[%d]@%d, which has no notification: %s",
                    tp[0], tp[1], record.offset, exc,
                )  # fmt: skip
                self._skip("undecodable")
            else:
                if self.table.wants(self.endpoint.name, made):
                    pending = True
                    self._queue.put_nowait(
                        _Job(made, tp, record.offset, record.key, record.timestamp, lease)
                    )
        self._tracker.read(tp, record.offset, pending=pending)

    def _skip(self, reason: str) -> None:
        self.stats.skipped += 1
        m.SKIPPED.labels(reason).inc()

    def _on_worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    async def _commit(self, tps: Iterable[TP] | None = None) -> None:
        self._last_commit = time.monotonic()
        owned = [tp for tp in (self._leases if tps is None else tps) if tp in self._leases]
        offsets = self._tracker.committable(owned)
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {TopicPartition(t, p): offset for (t, p), offset in offsets.items()}
            )
        except Exception as exc:
            # Not committed: those records are read again after a restart or a rebalance,
            # and their notifications (same webhook-id) sent again. Nothing is lost.
            log.warning("notify endpoint %s: offset commit failed: %s", self.endpoint.name, exc)
            return
        self._tracker.committed(offsets)
        self.stats.commits += 1

    async def _settle(self, tps: list[TP]) -> None:
        """Give deliveries of ``tps`` up to the grace period, end their leases, commit."""
        deadline = time.monotonic() + self.settings.notify.shutdown_grace_s
        while self._tracker.pending(tps) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self._tracker.pending(tps)
        if left:
            log.warning(
                "notify endpoint %s: %d notification(s) not delivered in time are left to the "
                "next owner of their partitions",
                self.endpoint.name,
                left,
            )
        await self._commit(tps)
        for tp in tps:
            lease = self._leases.pop(tp, None)
            if lease is not None:
                lease.revoke()
        self._tracker.forget(tps)
        self.stats.pending = self._tracker.pending()
        self.stats.assigned = len(self._leases)

    async def _finish(self, workers: list[asyncio.Task[None]]) -> None:
        try:
            await self._settle(list(self._leases))
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._session is not None:
                await self._session.close()
            await self._consumer.stop()

    # -- rebalance (called by the consumer's coordinator) -----------------------------------

    async def on_revoked(self, revoked: Iterable[Any]) -> None:
        """Finish (within the grace period) and commit what the partitions hold."""
        await self._settle([(tp.topic, tp.partition) for tp in revoked])

    def on_assigned(self, assigned: Iterable[Any]) -> None:
        """Start a fresh lease per partition: reading resumes from the committed offset."""
        for tp in assigned:
            key = (tp.topic, tp.partition)
            self._tracker.forget([key])
            old = self._leases.get(key)
            if old is not None:
                old.revoke()
            self._leases[key] = Lease()
        self._paused = False
        self.stats.assigned = len(self._leases)

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            job = await self._queue.get()
            if not job.lease.revoked:
                await self._deliver(job)

    async def _deliver(self, job: _Job) -> None:
        assert self._session is not None
        name, kind = self.endpoint.name, job.notification.kind
        first_at = datetime.now(UTC)
        failed = 0
        while True:
            result = await attempt(self._session, self.endpoint, job.notification)
            m.REQUEST_SECONDS.labels(name).observe(result.seconds)
            if result.verdict == "delivered":
                if job.lease.revoked:
                    return  # acknowledged, but the partition moved on: the owner decides
                self._tracker.done(job.tp, job.offset)
                self.stats.delivered += 1
                self.stats.failing_since = None
                m.DELIVERED.labels(name, kind).inc()
                m.DELIVERY_SECONDS.labels(name).observe(
                    max(0.0, time.time() - job.published_ms / 1000)
                )
                return
            failed += 1
            self.stats.last_error = result.detail
            if self.stats.failing_since is None:
                self.stats.failing_since = time.time()
            if result.verdict == "reject":
                await self._dead_letter(job, result, failed, first_at, "rejected")
                return
            if failed >= self.policy.max_attempts:
                await self._dead_letter(job, result, failed, first_at, "exhausted")
                return
            self.stats.retried += 1
            m.RETRIED.labels(name, kind).inc()
            if await job.lease.sleep(self.policy.delay(failed, self._rng, result.retry_after)):
                return  # revoked or stopping: left to the next owner, not dead-lettered

    async def _dead_letter(
        self, job: _Job, result: Attempt, attempts: int, first_at: datetime, why: str
    ) -> None:
        n = job.notification
        if why == "rejected":
            reason = f"{result.detail}: refused by the endpoint, not retried"
        else:
            reason = f"retries exhausted after {attempts} attempts; last: {result.detail}"
        letter = NotifyDeadLetter(
            webhook_id=n.webhook_id,
            type=n.type,
            endpoint=self.endpoint.name,
            reason=reason,
            status=result.status,
            attempts=attempts,
            source_topic=job.tp[0],
            source_partition=job.tp[1],
            source_offset=job.offset,
            payload=orjson.loads(n.body),
            first_attempt_at=first_at.isoformat().replace("+00:00", "Z"),
            dead_lettered_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        )
        failures = 0
        while True:
            try:
                await self._dead_letters.send(job.key, letter)
                break
            except KafkaError as exc:
                failures += 1
                log.warning("notify endpoint %s: %s; retrying", self.endpoint.name, exc)
                if await job.lease.sleep(min(30.0, 0.5 * 2 ** min(failures, 6))):
                    return  # not dead-lettered and not done: sent again by the next owner
        log.warning(
            "notify endpoint %s: %s dead-lettered: %s", self.endpoint.name, n.webhook_id, reason
        )
        if not job.lease.revoked:
            self._tracker.done(job.tp, job.offset)
        self.stats.dead_lettered += 1
        m.FAILED.labels(self.endpoint.name, n.kind, why).inc()

    def health(self, stall_s: float) -> dict[str, Any]:
        """This endpoint's part of ``/health`` (reads fields only: thread-safe enough)."""
        s = self.stats
        since_poll = time.monotonic() - s.last_poll
        return {
            "ok": s.running and since_poll < stall_s,
            "group": self.group_id,
            "seconds_since_poll": round(since_poll, 3),
            "pending": s.pending,
            "assigned_partitions": s.assigned,
            "delivered": s.delivered,
            "retried": s.retried,
            "dead_lettered": s.dead_lettered,
            "skipped": s.skipped,
            "commits": s.commits,
            "failing_since": s.failing_since,
            "last_error": s.last_error,
        }


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks of one runner's consumer (aiokafka awaits them)."""

    def __init__(self, runner: EndpointRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._runner.on_assigned(assigned)


# -- the service --------------------------------------------------------------------------------


class NotifyService:
    """Every endpoint's runner in one process, with the shared dead-letter producer."""

    def __init__(
        self,
        settings: Settings,
        table: RouteTable | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """Check the routes (:class:`ConfigError` listing every problem) and the topics."""
        self.settings = settings
        self.table = table if table is not None else load_routes(settings)
        # The dead-letter topic is one of TopicSettings' roles: settings refuse it at start-up
        # when it names the topic of another role.
        self.dead_letters = DeadLetterWriter(settings)
        rng = rng or random.Random()
        self.runners = {
            name: EndpointRunner(
                settings, endpoint, self.table, self.dead_letters, rng=random.Random(rng.random())
            )
            for name, endpoint in self.table.endpoints.items()
        }
        self.started = threading.Event()
        self.closed = False

    def ensure_topics(self) -> None:
        """Create the pipeline's topics and the notify dead-letter topic where missing."""
        from spendstream.kafka_admin import create_topics, ensure_topics

        ensure_topics(self.settings)
        t = self.settings.topics
        create_topics(
            self.settings.kafka.confluent_config(),
            [t.notify_dlq],
            t.partitions,
            t.replication_factor,
        )

    async def serve(self, stop: asyncio.Event) -> None:
        """Run every endpoint until ``stop`` is set (or one fails: then all stop, and it raises)."""
        await asyncio.to_thread(self.ensure_topics)
        await self.dead_letters.start()
        inner = asyncio.Event()
        tasks = [
            asyncio.create_task(runner.run(inner), name=f"notify-{name}")
            for name, runner in self.runners.items()
        ]
        self.started.set()
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            inner.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stopper.cancel()
            await self.dead_letters.stop()
            self.closed = True
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise SpendstreamError(f"notify stopped: {errors[0]}") from errors[0]

    def run(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` (a thread-safe event) is set: the blocking entry point."""
        stop = stop or threading.Event()

        async def main() -> None:
            done = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.1)
                done.set()

            watcher = asyncio.create_task(watch())
            try:
                await self.serve(done)
            finally:
                watcher.cancel()

        asyncio.run(main())

    def health(self, stall_s: float = 60.0) -> dict[str, Any]:
        """``{"ok": ..., "details": ...}`` for ``/health``: ok while every endpoint's consumer
        runs and polls. An endpoint whose receiver fails stays ok (its notifications are
        retried, then dead-lettered); ``failing_since`` and ``last_error`` say so."""
        per = {name: r.health(stall_s) for name, r in self.runners.items()}
        ok = self.started.is_set() and not self.closed and all(p["ok"] for p in per.values())
        return {"ok": ok, "details": {"endpoints": per}}
