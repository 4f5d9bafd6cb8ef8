"""Admitter: reserve budget before a model call, so a hard cap holds under concurrency.

See docs/DESIGN.md, "Admission (reservations)". :class:`~producers.CapGuard` knows only what the
workers published about *finished* calls, so fifty concurrent requests all pass it while a user
has budget for two. An :class:`Admitter` asks the worker that owns the user's partition instead:
its request goes to the usage-events topic keyed by the user, so that worker decides it in
offset order with the user's usage against the same state, holds the estimate, and answers on
the admissions topic. The usage event sent after the call carries the reservation id
(``UsageEvent.reservation_id``) and settles the hold; a hold nobody settles expires after
``admission.reservation_ttl_s``.

Two paths, per user and model:

* **strict** (a network round trip): every request of a user near a cap, and the first of every
  ``pool + 1`` far from one. Each is decided by the single authority for the user.
* **local** (no network call, a deque pop): along with a strict request the worker may grant up
  to ``admission.pool`` more reservations of the same shape (model and token maxima), only while
  the user stays far from every cap after them. They are held in the worker's state like any
  other, so a locally admitted call was reserved there already: the local path cannot overshoot
  a cap either. Near a cap the worker grants none, and every request is strict again.

Pooled reservations this process will not hand out are given back (a :class:`ReleaseRequest
<schemas.ReleaseRequest>`): all of them at :meth:`Admitter.close`, and those past their
usable half-life when met, so that they stop holding the user's budget before their TTL. Only a
crash leaves a pool held until it expires.

A request that gets no answer within ``admission.timeout_s`` is sent again with the same id (the
worker answers a replay with its first answer); after ``admission.deadline_s``
:class:`AdmissionTimeout` is raised and the gateway chooses (CapGuard's view is a fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from producers._config import producer_config
from schemas import (
    MAX_RELEASE,
    AdmissionAnswer,
    AdmissionRequest,
    ReleaseRequest,
    decode_answer,
    encode_request,
    reply_partition,
)
from spendstream.errors import InvalidEventError, KafkaError, SpendstreamError
from spendstream.settings import Settings

__all__ = ["AdmissionTimeout", "Admitter", "Ticket"]

log = logging.getLogger(__name__)


class AdmissionTimeout(SpendstreamError):
    """No answer to an admission request within ``admission.deadline_s``."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """The answer to :meth:`Admitter.admit`: what to do, and the id the usage event carries."""

    action: Literal["allow", "downgrade", "block"]
    reason: str
    """``ok``, ``overage``, ``credit``, ``cap``, ``ceiling``, ``downgrade_without_estimate``,
    ``no_plan`` (caps do not apply to the user; nothing is held), ``settled`` (a repeat of an
    id whose usage already arrived; nothing more is held), ``wrong_org`` (blocked: the request
    named an org other than the user's subscription's; nothing is held)."""
    model: str | None
    """The model to serve (the requested one, or the downgrade model); ``None`` when blocked."""
    reservation_id: str
    """Put it in the call's usage event (``reservation_id``): that settles the hold."""
    local: bool = False
    """Decided from this process's pool, without a network call."""
    retry_after: int | None = None
    """For a block: epoch seconds when the user has room again (``None``: not for this
    estimate)."""
    window: str | None = None
    cost: Decimal = Decimal(0)
    """USD held for the call."""

    @property
    def allowed(self) -> bool:
        """True unless blocked (a downgraded request is served, on :attr:`model`)."""
        return self.action != "block"


_PoolKey = tuple[str, str, int, int]
"""(user, model, input tokens, output tokens): what a pooled reservation was priced for."""


class _Waiter:
    __slots__ = ("answer", "event", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.answer: AdmissionAnswer | None = None
        self.event = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[AdmissionAnswer] | None = (
            loop.create_future() if loop is not None else None
        )

    def resolve(self, answer: AdmissionAnswer) -> None:
        self.answer = answer
        self.event.set()
        if self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_set_result, self.future, answer)


def _set_result(future: asyncio.Future[AdmissionAnswer], answer: AdmissionAnswer) -> None:
    if not future.done():
        future.set_result(answer)


class Admitter:
    """Asks before each model call whether a user may make it, and reserves its cost.

    ``Admitter(settings)`` uses the settings' Kafka config, topics and ``admission`` group;
    ``gateway`` names this replica (default: host, pid and a random suffix; every replica
    needs its own). Start it (:meth:`start`, or use it as a context manager) before
    :meth:`admit`. Thread-safe; :meth:`aadmit` is the asyncio form.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        gateway: str | None = None,
        config: Mapping[str, Any] | None = None,
        pool: int | None = None,
    ) -> None:
        self.settings = settings or Settings()
        s = self.settings
        self.gateway = gateway or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not 1 <= len(self.gateway) <= 128:
            raise ValueError("gateway names are 1 to 128 characters")
        self.pool = s.admission.pool if pool is None else pool
        if not 0 <= self.pool <= 64:
            raise ValueError("pool is 0 to 64")
        self.timeout_s = s.admission.timeout_s
        self.deadline_s = s.admission.deadline_s
        # A pooled reservation is handed out only in the first half of its life: the call and
        # its usage event must still reach the worker before the hold expires.
        self._pool_life_s = s.admission.reservation_ttl_s / 2
        self._events_topic = s.topics.events
        self._answers_topic = s.topics.admissions
        self._partition = reply_partition(self.gateway, s.topics.partitions)
        self._conf = dict(config) if config is not None else s.kafka.confluent_config()
        self._producer: Any = None
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._pools: dict[_PoolKey, deque[tuple[str, float, Decimal, str]]] = {}
        """Pooled reservations by shape: (id, usable until, cost, the org asked for)."""
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:12]
        self.local_decisions = 0
        self.strict_decisions = 0
        self.resent = 0
        self.released = 0
        """Pooled reservations given back unused (at close, or past their usable life)."""

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, *, wait_s: float = 30.0) -> Admitter:
        """Connect: the request producer and the answers reader (from the topic's end)."""
        if self._thread is not None:
            return self
        from confluent_kafka import Producer

        self._producer = Producer(
            producer_config(
                self.settings,
                {
                    **self._conf,
                    # A gateway waits on every strict answer: send at once.
                    "linger.ms": 0,
                    "client.id": f"{self.settings.kafka.client_id}-admit",
                },
            )
        )
        self._thread = threading.Thread(target=self._read, name="admit-answers", daemon=True)
        self._thread.start()
        if not self._ready.wait(wait_s):
            self.close()
            raise KafkaError(
                f"could not read the admissions topic {self._answers_topic!r} within "
                f"{wait_s:.0f} s" + (f": {self._error}" if self._error else "")
            )
        if self._error is not None:
            raise KafkaError(f"admissions topic: {self._error}") from self._error
        return self

    def close(self) -> None:
        """Stop reading answers; give back the unused pooled reservations; deliver what is
        queued (within 10 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._producer is not None:
            with self._lock:
                pools, self._pools = self._pools, {}
            unused: dict[tuple[str, str], list[str]] = {}
            for (user_id, *_), queue in pools.items():
                for rid, _, _, org_id in queue:
                    unused.setdefault((user_id, org_id), []).append(rid)
            for (user_id, org_id), rids in unused.items():
                self._release(user_id, org_id, rids)
            remaining = self._producer.flush(10)
            if remaining:
                log.warning(
                    "admission: %d requests or releases were not delivered at close", remaining
                )
            self._producer = None

    def __enter__(self) -> Admitter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Admitter:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- the decision ---------------------------------------------------------------------------
    def admit(
        self,
        user_id: str,
        org_id: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        reservation_id: str | None = None,
    ) -> Ticket:
        """Decide one call of at most these tokens; reserve its estimate if admitted.

        Local (a pooled reservation) when this process holds one of the same shape; else a
        request to the user's worker, waited for (resent every ``timeout_s``, the same id).
        ``reservation_id`` (default: a new one) makes a retried call idempotent.
        """
        ticket = self._local(user_id, model, input_tokens, output_tokens)
        if ticket is not None:
            return ticket
        request, waiter = self._ask(
            user_id, org_id, model, input_tokens, output_tokens, reservation_id, None
        )
        started = time.monotonic()
        try:
            while True:
                if waiter.event.wait(self.timeout_s):
                    assert waiter.answer is not None
                    return self._ticket(request, waiter.answer)
                self._resend(request, started)
        finally:
            self._forget(request.reservation_id)

    async def aadmit(
        self,
        user_id: str,
        org_id: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        reservation_id: str | None = None,
    ) -> Ticket:
        """:meth:`admit` for asyncio: the wait does not block the event loop."""
        ticket = self._local(user_id, model, input_tokens, output_tokens)
        if ticket is not None:
            return ticket
        loop = asyncio.get_running_loop()
        request, waiter = self._ask(
            user_id, org_id, model, input_tokens, output_tokens, reservation_id, loop
        )
        assert waiter.future is not None
        started = time.monotonic()
        try:
            while True:
                try:
                    answer = await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout_s)
                    return self._ticket(request, answer)
                except TimeoutError:
                    self._resend(request, started)
        finally:
            self._forget(request.reservation_id)

    def pooled(self, user_id: str, model: str, input_tokens: int, output_tokens: int) -> int:
        """How many pooled reservations of this shape this process holds."""
        return len(self._pools.get((user_id, model, input_tokens, output_tokens), ()))

    # -- internals ----------------------------------------------------------------------------
    def _local(
        self, user_id: str, model: str, input_tokens: int, output_tokens: int
    ) -> Ticket | None:
        key = (user_id, model, input_tokens, output_tokens)
        if key not in self._pools:
            return None
        now = time.monotonic()
        stale: dict[str, list[str]] = {}
        ticket = None
        with self._lock:
            queue = self._pools.get(key)
            while queue:
                rid, usable_until, cost, org_id = queue.popleft()
                if now < usable_until:
                    if not queue:
                        del self._pools[key]
                    self.local_decisions += 1
                    ticket = Ticket("allow", "ok", model, rid, local=True, cost=cost)
                    break
                stale.setdefault(org_id, []).append(rid)
            else:
                self._pools.pop(key, None)
        for org_id, rids in stale.items():
            self._release(user_id, org_id, rids)
        return ticket

    def _release(self, user_id: str, org_id: str, rids: list[str]) -> None:
        """Give back pooled reservations no call will be made under (not answered)."""
        if self._producer is None:
            return
        for i in range(0, len(rids), MAX_RELEASE):
            chunk = rids[i : i + MAX_RELEASE]
            self._send(
                ReleaseRequest(
                    org_id=org_id, user_id=user_id, gateway=self.gateway, reservation_ids=chunk
                )
            )
            self.released += len(chunk)

    def _ask(
        self,
        user_id: str,
        org_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        reservation_id: str | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> tuple[AdmissionRequest, _Waiter]:
        if self._producer is None:
            raise KafkaError("the Admitter is not started (call start() or use it in a with)")
        rid = reservation_id or f"{self._prefix}-{next(self._ids)}"
        request = AdmissionRequest(
            org_id=org_id,
            user_id=user_id,
            reservation_id=rid,
            gateway=self.gateway,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            pool=self.pool,
        )
        if self._error is not None:
            raise KafkaError(f"the admissions reader stopped: {self._error}") from self._error
        waiter = _Waiter(loop)
        with self._lock:
            self._waiters[rid] = waiter
            self.strict_decisions += 1
        self._send(request)
        return request, waiter

    def _send(self, request: AdmissionRequest | ReleaseRequest) -> None:
        value = encode_request(request)
        while True:
            try:
                self._producer.produce(
                    self._events_topic, value, request.user_id.encode(), on_delivery=_delivered
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def _resend(self, request: AdmissionRequest, started: float) -> None:
        if time.monotonic() - started >= self.deadline_s:
            raise AdmissionTimeout(
                f"no answer to admission {request.reservation_id!r} of user "
                f"{request.user_id!r} within {self.deadline_s:g} s"
            )
        self.resent += 1
        log.info("no answer to admission %s yet; asking again", request.reservation_id)
        self._send(request)

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def _ticket(self, request: AdmissionRequest, answer: AdmissionAnswer) -> Ticket:
        cost = Decimal(answer.cost)
        if answer.pooled:
            key = (request.user_id, request.model, request.input_tokens, request.output_tokens)
            until = time.monotonic() + self._pool_life_s
            with self._lock:
                # Pooled ones are granted only as plain admissions of the same estimate.
                pool = self._pools.setdefault(key, deque())
                pool.extend((p, until, cost, request.org_id) for p in answer.pooled)
        return Ticket(
            answer.action,
            answer.reason,
            answer.model,
            request.reservation_id,
            local=False,
            retry_after=answer.retry_after,
            window=answer.window,
            cost=cost,
        )

    def _read(self) -> None:
        from confluent_kafka import Consumer, TopicPartition
        from confluent_kafka import KafkaException as CKafkaException

        try:
            consumer = Consumer(
                {
                    **self._conf,
                    "group.id": f"spendstream-admit-{self.gateway}",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 5,
                    "fetch.min.bytes": 1,
                }
            )
            # From the end as it is now: answers to this process's requests come after.
            high = self._end_offset(consumer, TopicPartition(self._answers_topic, self._partition))
            consumer.assign([TopicPartition(self._answers_topic, self._partition, high)])
        except CKafkaException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        gateway = self.gateway.encode()
        try:
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                if msg is None or msg.error() is not None or msg.key() != gateway:
                    continue
                try:
                    answer = decode_answer(msg.value() or b"")
                except InvalidEventError as exc:
                    log.warning("unreadable admission answer skipped: %s", exc)
                    continue
                with self._lock:
                    waiter = self._waiters.get(answer.reservation_id)
                if waiter is not None and waiter.answer is None:
                    # RuntimeError: the asking event loop was closed; nobody waits any more.
                    with contextlib.suppress(RuntimeError):
                        waiter.resolve(answer)
        except BaseException as exc:
            # Said, not swallowed: every later admit() raises instead of timing out.
            self._error = exc
            log.exception("the admissions reader stopped")
            raise
        finally:
            consumer.close()

    def _end_offset(self, consumer: Any, tp: Any) -> int:
        """The partition's end offset; asked again while the broker answers transiently.

        A topic created a moment ago has no leader known to every broker yet ("not leader for
        partition"); that passes within a second or two. Anything else, or the stop, ends it.
        """
        from confluent_kafka import KafkaError as CKafkaError
        from confluent_kafka import KafkaException as CKafkaException

        transient = {
            CKafkaError.NOT_LEADER_FOR_PARTITION,
            CKafkaError.LEADER_NOT_AVAILABLE,
            CKafkaError.UNKNOWN_TOPIC_OR_PART,
            CKafkaError._TRANSPORT,
            CKafkaError._TIMED_OUT,
        }
        deadline = time.monotonic() + 30.0
        while True:
            try:
                _, high = consumer.get_watermark_offsets(tp, timeout=10)
                return int(high)
            except CKafkaException as exc:
                err = exc.args[0] if exc.args else None
                code = err.code() if isinstance(err, CKafkaError) else None
                if code not in transient or time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(0.2)


def _delivered(err: Any, msg: Any) -> None:
    if err is not None:
        log.error("admission request not delivered: %s", err)
