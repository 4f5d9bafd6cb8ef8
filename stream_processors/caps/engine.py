"""The cap engine: counts a user's events in the windows of their plan and says what to emit.

Pure domain logic (docs/DESIGN.md, "Caps, alerts and enforcement"): no Kafka, no clock, no I/O.
A stream worker keeps one :class:`~stream_processors.caps.UserCapState` per user (serialized
with :meth:`~stream_processors.caps.UserCapState.to_dict`) and feeds each priced event through
:meth:`CapEngine.apply` (or a batch through :meth:`CapEngine.apply_batch`); the returned
:class:`~stream_processors.caps.Effects` are the records to produce.

*Time.* Event time only. A user's watermark is the largest event time seen; it is "now" for
enforcement and eviction. Event times are floored to the second, which loses nothing because
every window boundary is a whole second (:mod:`stream_processors.caps.windows`).

*Lateness.* An event counts toward a fixed window instance ``[start, end)`` if it arrives while
``watermark < end + grace``; toward a rolling window if its bucket is at least
``(watermark - N - grace) // B`` (it still belongs to the current window, plus grace). Too-late
events are reported in :attr:`Effects.late <stream_processors.caps.Effects.late>`, never
silently dropped. State older than that is evicted, so memory per user is bounded.

Alerts, enforcement, overage and credits are decided in their own modules (``thresholds``,
``enforcement``, ``overage``); this one routes each event's amounts to them.

*Admission.* :meth:`CapEngine.admit` decides a request before its model call and reserves its
estimate (:mod:`~stream_processors.caps.admission`); an event carrying the reservation id settles
it, and reservations expire ``reservation_ttl_s`` after their request's time. Reservations do
not change what usage events emit.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from schemas import Subscription
from schemas.plans import PlanCatalog
from spendstream.errors import ConfigError
from stream_processors._money import decimal_to_units
from stream_processors._time import EPOCH, SECOND, epoch_s, rfc3339, rfc3339_dt
from stream_processors.caps import admission
from stream_processors.caps.admission import DowngradeEstimate
from stream_processors.caps.effects import CapEvent, Effects, LateUsage, RejectedEvent, WindowUsage
from stream_processors.caps.enforcement import enforce
from stream_processors.caps.overage import add_credit, bill_overage
from stream_processors.caps.reservations import Admission, Estimate, Reservation
from stream_processors.caps.rules import PlanRules, WindowRule, amount_decimal
from stream_processors.caps.state import (
    NEVER,
    FixedState,
    RollingState,
    UserCapState,
    WindowInstance,
)
from stream_processors.caps.thresholds import (
    count_break_even,
    fire_instance_thresholds,
    fire_rolling_thresholds,
)
from stream_processors.caps.windows import instance_bounds, rolling_sum

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_RESERVATION_TTL_S", "CapEngine"]

DEFAULT_GRACE_S = 300
"""Default grace period (seconds) a window stays open for late events after it ends."""
DEFAULT_RESERVATION_TTL_S = 900
"""Default lifetime (seconds from the request's time) of an admission reservation: it must
outlast the longest model call plus the time its usage event takes to reach the worker."""


class CapEngine:
    """Applies priced events to per-user cap state and says what to emit.

    One engine per worker (it holds the compiled catalog); one :class:`UserCapState` per user.
    ``grace_s`` is how long a window stays open for late events after it ends;
    ``reservation_ttl_s`` how long an admission reservation holds budget when no usage event
    settles it.
    """

    def __init__(
        self,
        catalog: PlanCatalog,
        *,
        grace_s: int = DEFAULT_GRACE_S,
        reservation_ttl_s: int = DEFAULT_RESERVATION_TTL_S,
    ) -> None:
        if grace_s < 0:
            raise ConfigError("grace_s must be >= 0")
        if reservation_ttl_s <= 0:
            raise ConfigError("reservation_ttl_s must be > 0")
        self.catalog = catalog
        self.grace_s = grace_s
        self.reservation_ttl_s = reservation_ttl_s
        self._plans = {p.id: PlanRules(p) for p in catalog}
        self._rules = {rule.key: rule for plan in self._plans.values() for rule in plan.windows}
        self._window_shapes = {
            key: (rule.in_usd, rule.bucket_count) for key, rule in self._rules.items()
        }
        self._zones: dict[str, ZoneInfo] = {}

    # ----------------------------------------------------------------------------- state

    def new_state(self, user_id: str, org_id: str = "") -> UserCapState:
        """An empty state for a user seen for the first time."""
        return UserCapState(user_id, org_id)

    def restore(self, obj: dict[str, Any]) -> UserCapState:
        """A state from :meth:`UserCapState.to_dict` output (e.g. a faust Table changelog)."""
        return UserCapState.from_dict(obj, self._window_shapes)

    # ----------------------------------------------------------------------------- events

    def apply(
        self,
        state: UserCapState,
        sub: Subscription,
        event: CapEvent,
        detected_at: datetime,
        out: Effects | None = None,
    ) -> Effects:
        """Count one event and return what to emit (appended to ``out`` when given)."""
        return self.apply_batch(state, sub, (event,), detected_at, out)

    def apply_batch(
        self,
        state: UserCapState,
        sub: Subscription,
        events: Iterable[CapEvent],
        detected_at: datetime,
        out: Effects | None = None,
    ) -> Effects:
        """Count events of one user in order; enforcement is evaluated once, at the end.

        Alerts, overages and credit draws are the same whatever the batching; enforcement
        records of intermediate states inside a batch are not emitted (the topic is compacted,
        only the latest state matters). ``detected_at`` is the processing time stamped on the
        records (the engine never reads a clock).
        """
        out = out if out is not None else Effects()
        detected = rfc3339_dt(detected_at)
        if sub.user_id != state.user_id:
            raise ValueError(f"subscription of {sub.user_id!r} applied to {state.user_id!r}")
        state.org_id = sub.org_id
        for event in events:
            self._apply_one(state, sub, event, detected, out)
        if (state.reservations or state.settled) and state.watermark != NEVER:
            admission.expire(state, state.watermark)
        if state.watermark != NEVER:
            self._enforce(state, sub, state.watermark, detected, out)
        return out

    # ----------------------------------------------------------------------------- admission

    def admit(
        self,
        state: UserCapState,
        sub: Subscription,
        reservation_id: str,
        model: str,
        estimate: Estimate,
        at: datetime,
        *,
        downgrade_estimate: DowngradeEstimate = None,
    ) -> Admission:
        """Decide a request before its model call and reserve its estimate if admitted.

        ``at`` is the request's time (aware; it also expires older reservations, never the
        wall clock); ``model`` the requested model; ``downgrade_estimate`` the estimate on the
        plan's downgrade model (or a callable from the model's name), needed only when a
        downgrade is due. Idempotent on ``reservation_id``: while it is remembered, the same
        id returns the stored answer and reserves nothing more (once settled: its action and
        model, reason ``settled``). Raises ``ValueError`` for a
        subscription of another user, :class:`ConfigError` for a plan the catalog lacks.
        """
        if sub.user_id != state.user_id:
            raise ValueError(f"subscription of {sub.user_id!r} applied to {state.user_id!r}")
        t = epoch_s(at)
        if state.reservations or state.settled:
            admission.expire(state, t)
            known = state.reservation(reservation_id)
            if known is not None:
                return known.admission
        plan = self._plan(sub.plan_at(at))
        zone = self._zone(sub.timezone)

        def bounds(rule: WindowRule, seconds: int) -> tuple[int, int]:
            return self._bounds(rule, seconds, sub, zone)

        decision = admission.decide(
            state, plan, reservation_id, model, estimate, t, bounds, downgrade_estimate
        )
        state.org_id = sub.org_id
        admission.remember(state, Reservation(decision, t, t + self.reservation_ttl_s, plan.id))
        return decision

    def probe(
        self, state: UserCapState, sub: Subscription, model: str, estimate: Estimate, at: datetime
    ) -> Admission:
        """What :meth:`admit` would answer now for a new id, without reserving or remembering.

        Used to tell whether a user is far from every cap (a pooled reservation is granted
        only if a probe of many estimates is still plainly admitted).
        """
        if sub.user_id != state.user_id:
            raise ValueError(f"subscription of {sub.user_id!r} applied to {state.user_id!r}")
        t = epoch_s(at)
        plan = self._plan(sub.plan_at(at))
        zone = self._zone(sub.timezone)

        def bounds(rule: WindowRule, seconds: int) -> tuple[int, int]:
            return self._bounds(rule, seconds, sub, zone)

        return admission.decide(state, plan, "probe", model, estimate, t, bounds, None)

    def settle(self, state: UserCapState, reservation_id: str) -> bool:
        """Release a reservation's hold (its usage event arrived); False if nothing was held.

        Applying a :class:`CapEvent` with ``reservation_id`` does this; the event's cost counts
        as usage either way. Unknown, expired or already settled ids are a no-op.
        """
        return admission.settle(state, reservation_id)

    def expire_reservations(self, state: UserCapState, at: datetime) -> int:
        """Drop the reservations expired at ``at`` (a record's time, not the wall clock)."""
        return admission.expire(state, epoch_s(at))

    def top_up(
        self,
        state: UserCapState,
        sub: Subscription,
        credit_id: str,
        amount: Decimal,
        detected_at: datetime,
        out: Effects | None = None,
    ) -> Effects:
        """Add prepaid credit to the user's wallet (idempotent on ``credit_id``).

        Credits pay for overage from the next event on; past overage is not refunded. The
        enforcement state is re-evaluated (a user blocked at the ceiling is unblocked).
        """
        out = out if out is not None else Effects()
        if amount < 0:
            raise ValueError(f"a top-up must not be negative, got {amount}")
        if not add_credit(state, credit_id, amount):
            return out
        state.org_id = sub.org_id
        if state.watermark != NEVER:
            self._enforce(state, sub, state.watermark, rfc3339_dt(detected_at), out)
        return out

    def apply_grants(
        self,
        state: UserCapState,
        sub: Subscription,
        detected_at: datetime,
        out: Effects | None = None,
    ) -> int:
        """Top up the wallet with the subscription's credit grants not applied yet.

        Grants are append-only on the subscription record; ``state.granted`` counts those
        applied, so each is applied once however often the record is re-published. Returns
        how many were applied now (0 also when the list got shorter than what was applied:
        a rewritten history is never applied twice, nor refunded).
        """
        grants = sub.credits
        if len(grants) <= state.granted:
            return 0
        applied = 0
        for grant in grants[state.granted :]:
            self.top_up(state, sub, grant.credit_id, grant.amount_usd, detected_at, out)
            applied += 1
        state.granted = len(grants)
        return applied

    def tick(
        self, state: UserCapState, sub: Subscription, now: datetime, detected_at: datetime
    ) -> Effects:
        """Re-evaluate enforcement at ``now`` (e.g. from a timer) so a window that ended or a
        rolling sum that dropped releases the user without waiting for their next event.

        The watermark is not moved (event time stays event time), so nothing is evicted.
        """
        out = Effects()
        if state.watermark != NEVER:
            at = max(state.watermark, epoch_s(now))
            self._enforce(state, sub, at, rfc3339_dt(detected_at), out)
        return out

    def usage(self, state: UserCapState, sub: Subscription, at: datetime) -> list[WindowUsage]:
        """The usage of every window of the plan in force at ``at``, at ``at``."""
        t = epoch_s(at)
        plan = self._plan(sub.plan_at(at))
        zone = self._zone(sub.timezone)
        result = []
        for rule in plan.windows:
            window = state.windows.get(rule.key)
            if rule.rolling:
                bucket = t // rule.bucket_s
                used = 0
                if isinstance(window, RollingState):
                    used = (
                        window.sum_at(bucket, rule.bucket_count)
                        if bucket >= window.cur
                        else rolling_sum(window, bucket, rule.bucket_count)
                    )
                start = (bucket - rule.bucket_count + 1) * rule.bucket_s
                end = (bucket + 1) * rule.bucket_s
            else:
                start, end = self._bounds(rule, t, sub, zone)
                inst = window.find(t) if isinstance(window, FixedState) else None
                used = inst.usage if inst is not None else 0
            result.append(
                WindowUsage(
                    rule.key,
                    f"{rule.key}@{rfc3339(start)}",
                    rule.kind,
                    rule.unit,
                    amount_decimal(used, rule.in_usd),
                    amount_decimal(rule.allowance, rule.in_usd),
                    rfc3339(start),
                    rfc3339(end),
                )
            )
        return result

    # ----------------------------------------------------------------------------- internals

    def _plan(self, plan_id: str) -> PlanRules:
        try:
            return self._plans[plan_id]
        except KeyError:
            raise ConfigError(
                f"unknown plan {plan_id!r}; the plans file defines {sorted(self._plans)}"
            ) from None

    def _zone(self, name: str) -> ZoneInfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = ZoneInfo(name)
        return zone

    def _bounds(
        self, rule: WindowRule, t: int, sub: Subscription, zone: ZoneInfo
    ) -> tuple[int, int]:
        return instance_bounds(rule.kind, t, sub, zone)

    def _apply_one(
        self, state: UserCapState, sub: Subscription, ev: CapEvent, detected: str, out: Effects
    ) -> None:
        # Validate everything before touching the state: a rejected event changes nothing.
        try:
            if ev.user_id != state.user_id:
                raise ValueError(f"event of user {ev.user_id!r} applied to {state.user_id!r}")
            t = epoch_s(ev.occurred_at)
            plan = self._plan(ev.plan_id if ev.plan_id is not None else sub.plan_at(ev.occurred_at))
            cost = ev.cost_units if ev.cost_units is not None else decimal_to_units(ev.cost)
            if cost < 0 or ev.tokens < 0 or ev.requests < 0:
                raise ValueError("cost, tokens and requests must not be negative")
        except (ValueError, ConfigError, InvalidOperation, TypeError) as exc:
            out.rejected.append(RejectedEvent(ev.event_id, str(exc)))
            return
        if t > state.watermark:
            state.watermark = t
        amounts = (cost, ev.tokens, ev.requests)
        zone: ZoneInfo | None = None
        if plan.monthly_price > 0 and cost > 0:
            zone = self._zone(sub.timezone)
            count_break_even(state, sub, plan, ev, t, cost, zone, self.grace_s, detected, out)
        for rule in plan.windows:
            amount = amounts[rule.amount_index]
            if amount <= 0 or ev.served_model in rule.exempt_models:
                continue
            window = state.windows.get(rule.key)
            if rule.rolling:
                if not isinstance(window, RollingState):
                    window = state.windows[rule.key] = RollingState(
                        rule.in_usd, state.watermark // rule.bucket_s
                    )
                self._rolling_add(state, window, rule, ev, t, amount, detected, out)
            else:
                if not isinstance(window, FixedState):
                    window = state.windows[rule.key] = FixedState(rule.in_usd)
                if zone is None:
                    zone = self._zone(sub.timezone)
                self._fixed_add(state, sub, window, rule, ev, t, amount, zone, detected, out)
        if len(state.windows) > len(plan.windows):
            self._sweep(state, plan)
        if ev.reservation_id is not None:
            admission.settle(state, ev.reservation_id)

    def _sweep(self, state: UserCapState, plan: PlanRules) -> None:
        # Windows of a plan the user left: evicted by the same rules, dropped once empty.
        current = {rule.key for rule in plan.windows}
        for key in [k for k in state.windows if k not in current]:
            window = state.windows[key]
            if isinstance(window, FixedState):
                window.evict(state.watermark - self.grace_s)
            elif key in self._rules:
                self._rolling_evict(state, window, self._rules[key])
            if window.empty():
                del state.windows[key]

    def _fixed_add(
        self,
        state: UserCapState,
        sub: Subscription,
        window: FixedState,
        rule: WindowRule,
        ev: CapEvent,
        t: int,
        amount: int,
        zone: ZoneInfo,
        detected: str,
        out: Effects,
    ) -> None:
        horizon = state.watermark - self.grace_s
        window.evict(horizon)
        inst = window.find(t)
        if inst is None:
            start, end = self._bounds(rule, t, sub, zone)
            if end <= horizon:
                out.late.append(LateUsage(ev.event_id, rule.key, rfc3339_dt(ev.occurred_at)))
                return
            inst = WindowInstance(start, end)
            window.add(inst)
        before = inst.usage
        after = inst.usage = before + amount
        if after >= rule.lowest_level:
            fire_instance_thresholds(state, rule, inst, after, ev, detected, out)
        if rule.unit_price is not None and after > rule.allowance:
            bill_overage(state, rule, inst, before, after, ev, detected, out)

    def _rolling_evict(self, state: UserCapState, window: RollingState, rule: WindowRule) -> None:
        oldest = (state.watermark - rule.span_s - self.grace_s) // rule.bucket_s
        window.evict(oldest - rule.bucket_count + 1, oldest * rule.bucket_s // rule.span_s)

    def _rolling_add(
        self,
        state: UserCapState,
        window: RollingState,
        rule: WindowRule,
        ev: CapEvent,
        t: int,
        amount: int,
        detected: str,
        out: Effects,
    ) -> None:
        bucket_s, bucket_count = rule.bucket_s, rule.bucket_count
        bucket = t // bucket_s
        now_bucket = state.watermark // bucket_s
        if now_bucket > window.cur:
            window.advance(now_bucket, bucket_count)
            self._rolling_evict(state, window, rule)
        if bucket < (state.watermark - rule.span_s - self.grace_s) // bucket_s:
            out.late.append(LateUsage(ev.event_id, rule.key, rfc3339_dt(ev.occurred_at)))
            return
        buckets = window.buckets
        buckets[bucket] = buckets.get(bucket, 0) + amount
        cur = window.cur
        if bucket > cur - bucket_count:
            window.cur_sum += amount
        if bucket == cur:
            if window.cur_sum >= rule.lowest_level:
                fire_rolling_thresholds(state, window, rule, cur, window.cur_sum, ev, detected, out)
            return
        # A late event raises the rolling sum at every bucket in [bucket, bucket + count):
        # re-check those that hold events, so the fired set is the same as if the events had
        # come in order.
        last = min(bucket + bucket_count - 1, cur)
        total = rolling_sum(window, bucket, bucket_count)
        get = buckets.get
        for k in range(bucket, last + 1):
            if k > bucket:
                total += get(k, 0) - get(k - bucket_count, 0)
            if total >= rule.lowest_level and k in buckets:
                fire_rolling_thresholds(state, window, rule, k, total, ev, detected, out)

    def _enforce(
        self, state: UserCapState, sub: Subscription, at: int, detected: str, out: Effects
    ) -> None:
        when = EPOCH + at * SECOND
        try:
            plan = self._plan(sub.plan_at(when))
        except ConfigError:
            return  # every event of this plan was rejected already; nothing to enforce
        enforce(state, plan, at, detected, out)
