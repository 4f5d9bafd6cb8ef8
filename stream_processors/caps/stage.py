"""The caps stage of the worker: priced events in, alerts / enforcement / overages out.

What the worker runs per batch (through :class:`~stream_processors._pipeline.BatchPipeline`). A
thin, pure adapter between :class:`~stream_processors.UsageProcessor` (which returns the batch's
accepted events as :class:`~stream_processors.PricedRecord`) and the
:class:`~stream_processors.caps.CapEngine`: it groups a batch by user, reads each user's
:class:`~stream_processors.caps.UserCapState` once, applies the user's events with
:meth:`CapEngine.apply_batch`, writes the state back once and encodes what the engine emitted.
No Kafka, no clock: the faust agent (``_app.py``) passes ``now`` and publishes the outputs.

State
-----
One key per user in the ``caps`` table: ``key = user_id``, value = ``orjson`` of
``{"o": last source offset applied, "p": partition, "s": UserCapState.to_dict()}``, written to
the changelog partition of that user's events in the batch (the partition their messages came
from, so a rebalance restores the state on the worker that owns the user's events). The
fired-threshold set is part of that value, which is what makes a restart (state restored from
the changelog) never fire an alert again. New credit grants on the user's subscription record
are applied before the user's next batch, or at once by :meth:`CapStage.apply_credits` (the
worker calls it when the record changes: a user blocked at the ceiling sends no events).

Wire decisions
--------------
* ``alerts`` (key = user_id): :class:`~schemas.AlertRecord` as JSON.
* ``enforcement`` (compacted, key = user_id): :class:`~schemas.EnforcementRecord`.
  Only the last record of a user per batch is published (the engine already emits at most one
  per :meth:`~CapEngine.apply_batch`): the topic is compacted, gateways only need the latest.
* ``overages`` (key = user_id) carries two kinds of records, told apart by the added
  ``"record"`` field: ``"overage"`` (:class:`~schemas.OverageRecord`, what billing
  sums) and ``"credit_draw"`` (:class:`~schemas.CreditDrawRecord`). One topic because
  billing nets them per window instance and must see both in the user's order; a consumer that
  only bills filters on ``record == "overage"``.
* Events the engine *rejects* (it could not apply them at all, e.g. money it cannot represent)
  go to the dead-letter topic with ``stage = "caps"``. The priced event already landed, so the
  dead letter is for operators, not for replay. Its source is the events topic and partition;
  the message offset is not known at this stage, so ``source_offset`` is the negative of the
  event's stable 63-bit id (:func:`~stream_processors.late_segment`): never a real offset, and a
  replayed rejection is stored once by the ``dead_letters`` table (keyed by source and offset).
* Events with no plan (``plan_id == ""``: no subscription), with a subscription that vanished,
  or on a plan missing from the plans catalog are counted (``caps_no_plan``,
  ``caps_no_subscription``, ``caps_unknown_plan``) and skipped: usage is still priced and
  landed, only caps do not apply. Events too late for some window are counted (``caps_late``).

Delivery is at least once, like the rest of the worker: after a crash between a state write and
the publication of its outputs, a replayed alert carries the same deterministic ``alert_id``
(``user|window_id|threshold``), so consumers drop the copy.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any, Literal

import orjson

from schemas import (
    MONEY_SCALE,
    AdmissionAnswer,
    AdmissionRequest,
    DeadLetter,
    ReleaseRequest,
    Subscription,
    encode_answer,
    encode_event,
    pool_ids,
    reply_partition,
)
from schemas.wire import to_model
from spendstream.errors import ConfigError
from stream_processors._money import units_to_str
from stream_processors._processor import NO_PLAN, AdmissionItem, PricedRecord, late_segment
from stream_processors._state import PartitionedState
from stream_processors._time import micros_to_iso, to_micros
from stream_processors.caps.effects import CapEvent, Effects
from stream_processors.caps.engine import CapEngine
from stream_processors.caps.reservations import Admission, Estimate
from stream_processors.caps.state import UserCapState

__all__ = ["CapOutputs", "CapStage", "Estimator", "SubscriptionLookup", "cap_event"]

log = logging.getLogger(__name__)

Estimator = Callable[[str, int, int, datetime], int]
"""(model, input tokens, output tokens, time) -> the call's cost at most, in USD units."""
SubscriptionLookup = Callable[[str], Subscription | None]
"""user_id -> the user's subscription (plan schedule), or ``None`` when unknown."""


@dataclass(slots=True)
class CapOutputs:
    """Messages to publish per output topic, as ``(key, value)`` with ``key = user_id``."""

    alerts: list[tuple[str, bytes]] = field(default_factory=list)
    """To ``topics.alerts``."""
    enforcement: list[tuple[str, bytes]] = field(default_factory=list)
    """To ``topics.enforcement`` (compacted)."""
    overages: list[tuple[str, bytes]] = field(default_factory=list)
    """To ``topics.overages``: overage and credit-draw records (field ``record``)."""
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    """To ``topics.dlq``: events the cap engine rejected (``stage = "caps"``)."""
    partitions: dict[str, int] = field(default_factory=dict)
    """user_id -> the partition the user's events came from (where outputs go)."""
    counters: Counter[str] = field(default_factory=Counter)
    """``caps_*`` counters of this batch."""
    answers: list[tuple[str, bytes, int]] = field(default_factory=list)
    """To ``topics.admissions``: (gateway, :class:`~schemas.AdmissionAnswer`, partition)."""

    def __bool__(self) -> bool:
        return bool(self.alerts or self.enforcement or self.overages or self.dead or self.answers)


_EXACT = Context(prec=120, traps=[Inexact, InvalidOperation, Overflow])


def cap_event(rec: PricedRecord) -> CapEvent:
    """What the cap engine needs of a priced record (cost exact: integer units -> Decimal).

    The engine counts ``cost_units`` and the plan the processor resolved; ``cost`` is the same
    amount as a Decimal (``scaleb`` in a wide context is exact, and cheaper than via text).
    """
    ev = rec.event
    units = rec.quote.cost
    return CapEvent(
        ev.event_id,
        ev.user_id,
        ev.occurred_at,
        Decimal(units).scaleb(-MONEY_SCALE, _EXACT),
        ev.input_tokens + ev.output_tokens,
        ev.served_model or ev.requested_model,
        1,
        units,
        rec.plan_id,
        reservation_id=ev.reservation_id,
    )


class CapStage:
    """Applies each batch's accepted events to per-user cap state and encodes the effects.

    ``subscriptions`` looks up a user's plan schedule (the same lookup the processor prices
    with); ``state`` holds one :class:`UserCapState` per user (a faust Table in the worker, a
    :class:`~stream_processors.DictState` in tests); ``events_topic`` names the source topic in
    dead letters.
    """

    def __init__(
        self,
        engine: CapEngine,
        subscriptions: SubscriptionLookup,
        state: PartitionedState,
        *,
        events_topic: str = "usage.events",
        max_cached: int = 200_000,
        estimator: Estimator | None = None,
        pool_zone: int = 20,
        reply_partitions: int = 6,
    ) -> None:
        self.engine = engine
        self.estimator = estimator
        """Prices an admission's estimate: (model, input tokens, output tokens, time) ->
        USD units (the worker's :meth:`PriceCatalog.estimate
        <stream_processors.PriceCatalog.estimate>`)."""
        self.pool_zone = pool_zone
        self.reply_partitions = reply_partitions
        self._subscriptions = subscriptions
        self.state = state
        self.events_topic = events_topic
        self.max_cached = max_cached
        # user -> (the bytes this stage last wrote, the live state they encode). Decoding and
        # restoring a state costs more than applying a batch to it; the cached object is used
        # only while the table still holds the very bytes object written with it (an identity
        # test), so a value restored from the changelog after a rebalance is always decoded.
        self._cache: dict[str, tuple[bytes, UserCapState, int]] = {}

    def reset_caches(self) -> None:
        """Forget decoded states (after a rebalance; correctness does not depend on it)."""
        self._cache.clear()

    def process(
        self,
        accepted: Sequence[PricedRecord],
        now: datetime,
        admissions: Sequence[AdmissionItem] = (),
    ) -> CapOutputs:
        """Apply one batch; one state read and one state write per user. Never raises on data.

        ``now`` (aware) is stamped on the records as ``detected_at``/``updated_at``.
        ``admissions`` (the batch's admission requests) are decided in offset order with the
        user's usage, against the same state; their answers are in :attr:`CapOutputs.answers`.
        """
        out = CapOutputs()
        counters = out.counters
        catalog = self.engine.catalog
        by_user: dict[str, list[PricedRecord | AdmissionItem]] = {}
        for rec in accepted:
            counters["caps_in"] += 1
            if rec.plan_id == NO_PLAN:
                counters["caps_no_plan"] += 1
            elif rec.plan_id not in catalog:
                counters["caps_unknown_plan"] += 1
            else:
                by_user.setdefault(rec.event.user_id, []).append(rec)
        if admissions:
            for item in admissions:
                by_user.setdefault(item.request.user_id, []).append(item)
            for items in by_user.values():
                # Usage and requests of one user come from one partition: offsets order them.
                items.sort(key=lambda r: r.offset)

        for user_id, items in by_user.items():
            sub = self._subscriptions(user_id)
            if sub is None:
                # Deleted between pricing and now (a tombstone): nothing to cap against.
                usage_n = sum(1 for r in items if isinstance(r, PricedRecord))
                counters["caps_no_subscription"] += usage_n
                self._answer_uncapped(items, now, out)
                continue
            if admissions:
                items = self._refuse_other_orgs(sub, items, now, out)
                if not items:
                    continue
            # The batch is in partition order, so the user's last record names the partition
            # their state and outputs belong to (all of a user's events share one anyway).
            partition = items[-1].partition
            if not isinstance(items[-1], PricedRecord) and not self._capped(sub, items):
                self._answer_uncapped(items, now, out)
                continue
            state, applied = self._load(user_id, sub, counters, partition)
            # Offsets the stored state already applied come again only after a crash before
            # the offset commit: their effects were published before the state was written.
            fresh = [r for r in items if r.offset > applied]
            if len(fresh) < len(items):
                for r in items:
                    if r.offset <= applied and isinstance(r, AdmissionItem):
                        self._answer_again(state, r, now, out)
                counters["caps_replayed"] += len(items) - len(fresh)
                items = fresh
                if not items:
                    continue
            effects = Effects()
            # Credits bought since the user's last event pay for this batch's overage.
            counters["caps_credit_grants"] += self.engine.apply_grants(state, sub, now, effects)
            recs: list[PricedRecord] = []
            run: list[PricedRecord] = []
            for entry in items:
                if isinstance(entry, PricedRecord):
                    run.append(entry)
                    continue
                if run:
                    self.engine.apply_batch(state, sub, [cap_event(r) for r in run], now, effects)
                    recs += run
                    run = []
                if isinstance(entry.request, ReleaseRequest):
                    self._release(state, entry.request, out)
                else:
                    self._admit(state, sub, entry, now, out)
            if run:
                self.engine.apply_batch(state, sub, [cap_event(r) for r in run], now, effects)
                recs += run
            self._store(user_id, partition, state, items[-1].offset)
            counters["caps_users"] += 1
            counters["caps_applied"] += len(recs)
            out.partitions[user_id] = partition
            self._encode(user_id, partition, recs, effects, now, out)
        return out

    # -- admission ----------------------------------------------------------------------------
    def _capped(self, sub: Subscription, items: Sequence[PricedRecord | AdmissionItem]) -> bool:
        """Whether caps apply to the user at the time of any of these items."""
        for item in items:
            plan_id = (
                item.plan_id
                if isinstance(item, PricedRecord)
                else sub.plan_at(_at(item.arrived_ms))
            )
            if plan_id != NO_PLAN and plan_id in self.engine.catalog:
                return True
        return False

    def _refuse_other_orgs(
        self,
        sub: Subscription,
        items: list[PricedRecord | AdmissionItem],
        now: datetime,
        out: CapOutputs,
    ) -> list[PricedRecord | AdmissionItem]:
        """Block the requests that name an org other than the subscription's; the rest.

        A gateway reserves on behalf of its own tenant: a request for another org's user would
        hold (and could exhaust) that user's budget. It is answered ``block``, reason
        ``wrong_org``, and nothing is held or remembered; the same request gets the same answer
        on a replay, since the subscription decides it.
        """
        kept: list[PricedRecord | AdmissionItem] = []
        for item in items:
            if isinstance(item, AdmissionItem) and item.request.org_id != sub.org_id:
                req = item.request
                if isinstance(req, ReleaseRequest):
                    out.counters["release_wrong_org"] += 1  # not answered; releases nothing
                    continue
                self._answer_holding_nothing(req, "block", "wrong_org", None, now, out)
            else:
                kept.append(item)
        return kept

    def _answer_uncapped(
        self, items: Sequence[PricedRecord | AdmissionItem], now: datetime, out: CapOutputs
    ) -> None:
        """Answer the requests of a user caps do not apply to: admitted, nothing held.

        A release for such a user has nothing to release (and is not answered)."""
        for item in items:
            if isinstance(item, AdmissionItem):
                req = item.request
                if isinstance(req, ReleaseRequest):
                    out.counters["release_no_plan"] += 1
                    continue
                self._answer_holding_nothing(req, "allow", "no_plan", req.model, now, out)

    def _answer_holding_nothing(
        self,
        req: AdmissionRequest,
        action: Literal["allow", "block"],
        reason: str,
        model: str | None,
        now: datetime,
        out: CapOutputs,
    ) -> None:
        """Answer a request that neither holds nor remembers anything; count it by reason."""
        answer = AdmissionAnswer(
            reservation_id=req.reservation_id,
            gateway=req.gateway,
            user_id=req.user_id,
            action=action,
            reason=reason,
            model=model,
            answered_at=micros_to_iso(to_micros(now)),
        )
        self._reply(req, answer, out)
        out.counters[f"admission_{reason}"] += 1

    def _estimate(self, req: AdmissionRequest, model: str, at: datetime) -> Estimate:
        if self.estimator is None:
            raise ConfigError("this cap stage has no price estimator: it cannot admit")
        cost = self.estimator(model, req.input_tokens, req.output_tokens, at)
        return Estimate(cost, req.input_tokens + req.output_tokens, 1)

    def _admit(
        self,
        state: UserCapState,
        sub: Subscription,
        item: AdmissionItem,
        now: datetime,
        out: CapOutputs,
    ) -> None:
        """Decide one request (and its pool) on the user's state; queue the answer."""
        req = item.request
        if not isinstance(req, AdmissionRequest):
            return
        at = _at(item.arrived_ms)
        counters = out.counters
        plan_id = sub.plan_at(at)
        if plan_id == NO_PLAN or plan_id not in self.engine.catalog:
            self._answer_uncapped([item], now, out)
            return
        estimate = self._estimate(req, req.model, at)
        decision = self.engine.admit(
            state,
            sub,
            req.reservation_id,
            req.model,
            estimate,
            at,
            downgrade_estimate=lambda model: self._estimate(req, model, at),
        )
        counters[f"admission_{decision.action}"] += 1
        pooled: list[str] = []
        if req.pool and decision.action == "allow" and decision.reason == "ok":
            # Far from every cap, or no pool: each pooled reservation must leave room for
            # pool_zone more estimates, so a gateway's pool never stands between a user and
            # the last of their budget (near a cap every request asks the worker).
            n = self.pool_zone + 1  # the pooled one itself, then pool_zone more
            far = Estimate(estimate.cost * n, estimate.tokens * n, estimate.requests * n)
            for pid in pool_ids(req.reservation_id, req.pool):
                if state.reservation(pid) is None:
                    probe = self.engine.probe(state, sub, req.model, far, at)
                    if probe.action != "allow" or probe.reason != "ok":
                        break
                got = self.engine.admit(state, sub, pid, req.model, estimate, at)
                if got.action != "allow":
                    break
                pooled.append(pid)
            counters["admission_pooled"] += len(pooled)
        self._reply(req, self._answer(req, decision, pooled, now), out)

    def _release(self, state: UserCapState, req: ReleaseRequest, out: CapOutputs) -> None:
        """End the holds of the listed reservations (docs/DESIGN.md, "Admission")."""
        released = sum(self.engine.settle(state, rid) for rid in req.reservation_ids)
        out.counters["release_released"] += released
        out.counters["release_not_held"] += len(req.reservation_ids) - released

    def _answer_again(
        self, state: UserCapState, item: AdmissionItem, now: datetime, out: CapOutputs
    ) -> None:
        """A replayed request the state already decided: the remembered answer, again."""
        req = item.request
        if not isinstance(req, AdmissionRequest):
            return  # a release is not answered; replayed, it was applied already
        known = state.reservation(req.reservation_id)
        if known is None:
            return  # expired or forgotten: the gateway asks again and is decided afresh
        pooled = [
            pid
            for pid in pool_ids(req.reservation_id, req.pool)
            if (r := state.reservation(pid)) is not None and r.admission.action == "allow"
        ]
        self._reply(req, self._answer(req, known.admission, pooled, now), out)
        out.counters["admission_replayed"] += 1

    @staticmethod
    def _answer(
        req: AdmissionRequest, decision: Admission, pooled: list[str], now: datetime
    ) -> AdmissionAnswer:
        return AdmissionAnswer(
            reservation_id=req.reservation_id,
            gateway=req.gateway,
            user_id=req.user_id,
            action=decision.action,
            reason=decision.reason,
            model=decision.model,
            window=decision.window,
            retry_after=decision.retry_after,
            cost=units_to_str(decision.reserved.cost),
            pooled=pooled,
            answered_at=micros_to_iso(to_micros(now)),
        )

    def _reply(self, req: AdmissionRequest, answer: AdmissionAnswer, out: CapOutputs) -> None:
        partition = reply_partition(req.gateway, self.reply_partitions)
        out.answers.append((req.gateway, encode_answer(answer), partition))

    def apply_credits(self, users: Iterable[str], now: datetime) -> CapOutputs:
        """Apply new credit grants of ``users`` whose cap state this worker holds.

        For a user who sends no events, typically one blocked at the overage ceiling: the
        top-up must unblock them without waiting for a request the gateway refuses. Users
        with no state here (never capped, or owned by another worker) are left to the lazy
        path in :meth:`process`. The state keeps the offset it had, so a replay of the
        user's events is still recognized.
        """
        out = CapOutputs()
        counters = out.counters
        for user_id in users:
            sub = self._subscriptions(user_id)
            raw = self.state.get(user_id)
            if sub is None or len(sub.credits) == 0 or raw is None:
                continue
            try:
                partition = int(orjson.loads(raw)["p"])
            except (ValueError, KeyError, TypeError):
                counters["caps_credit_deferred"] += 1  # a state written before "p" existed
                continue
            state, applied = self._load(user_id, sub, counters, partition)
            effects = Effects()
            granted = self.engine.apply_grants(state, sub, now, effects)
            if not granted:
                self._cache[user_id] = (raw, state, applied)  # unchanged: keep it decoded
                continue
            self._store(user_id, partition, state, applied)
            counters["caps_credit_grants"] += granted
            out.partitions[user_id] = partition
            self._encode(user_id, partition, (), effects, now, out)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _store(self, user_id: str, partition: int, state: UserCapState, last: int) -> None:
        # A copy of its own size: orjson's result sits in a 4 KiB buffer, and the cache keeps
        # one per user.
        raw = memoryview(orjson.dumps({"o": last, "p": partition, "s": state.to_dict()})).tobytes()
        self.state.put(partition, user_id, raw)
        if len(self._cache) >= self.max_cached:
            self._cache.clear()  # crude but bounded; rebuilt from the table on demand
        self._cache[user_id] = (raw, state, last)

    def _load(
        self, user_id: str, sub: Subscription, counters: Counter[str], partition: int
    ) -> tuple[UserCapState, int]:
        """The user's state and the last source offset it applied (-1: none)."""
        raw = self.state.get(user_id, partition)
        # Popped, not read: if applying the batch failed half-way, a stale object must not stay.
        cached = self._cache.pop(user_id, None)
        if raw is None:
            return self.engine.new_state(user_id, sub.org_id), -1
        # Equal, not identical: a durable state returns a new bytes object per read.
        if cached is not None and cached[0] == raw:
            return cached[1], cached[2]
        try:
            obj: Any = orjson.loads(raw)
            return self.engine.restore(obj["s"]), int(obj["o"])
        except (ValueError, KeyError, TypeError) as exc:
            # A value this code cannot read (corrupt, or a future format): starting afresh may
            # fire alerts again (consumers dedupe on alert_id); crashing would stop every user.
            counters["caps_bad_state"] += 1
            log.error("unreadable cap state of %r, starting afresh: %s", user_id, exc)
            return self.engine.new_state(user_id, sub.org_id), -1

    def _encode(
        self,
        user_id: str,
        partition: int,
        recs: Sequence[PricedRecord],
        effects: Effects,
        now: datetime,
        out: CapOutputs,
    ) -> None:
        counters = out.counters
        dumps = orjson.dumps
        for alert in effects.alerts:
            out.alerts.append((user_id, dumps(alert)))
        if effects.enforcement:
            out.enforcement.append((user_id, dumps(effects.enforcement[-1])))
        if effects.credit_draws:
            # Keep the user's event order on the shared topic (per event: the draw, then the
            # billed rest, as the engine computes them).
            position = {r.event.event_id: i for i, r in enumerate(recs)}
            money: list[tuple[int, int, dict[str, Any]]] = [
                (position.get(d["event_id"], 0), 0, {"record": "credit_draw", **d})
                for d in effects.credit_draws
            ]
            money += [
                (position.get(o["event_id"], 0), 1, {"record": "overage", **o})
                for o in effects.overages
            ]
            money.sort(key=lambda m: (m[0], m[1]))
            out.overages.extend((user_id, dumps(m[2])) for m in money)
        else:
            for overage in effects.overages:
                out.overages.append((user_id, dumps({"record": "overage", **overage})))
        counters["caps_alerts"] += len(effects.alerts)
        counters["caps_enforcement"] += len(effects.enforcement)
        counters["caps_overages"] += len(effects.overages)
        counters["caps_credit_draws"] += len(effects.credit_draws)
        counters["caps_late"] += len(effects.late)
        if effects.rejected:
            counters["caps_rejected"] += len(effects.rejected)
            by_id = {r.event.event_id: r for r in recs}
            for rejected in effects.rejected:
                rec = by_id.get(rejected.event_id)
                if rec is not None:
                    out.dead.append((user_id, self._dead_letter(rec, rejected.reason, now)))

    def _dead_letter(self, rec: PricedRecord, reason: str, now: datetime) -> bytes:
        letter: DeadLetter = {
            "source_topic": self.events_topic,
            "source_partition": rec.partition,
            # Unknown here (see the module docstring): a stable negative id per event instead.
            "source_offset": -late_segment(rec.event.event_id),
            "key_b64": base64.b64encode(rec.event.user_id.encode()).decode(),
            "payload_b64": base64.b64encode(encode_event(to_model(rec.event))).decode(),
            "reason": f"cap engine: {reason}"[:2000],
            "stage": "caps",
            "received_at": micros_to_iso(to_micros(now)),
        }
        return orjson.dumps(letter)


def _at(arrived_ms: int) -> datetime:
    return datetime.fromtimestamp(arrived_ms / 1000, UTC)
