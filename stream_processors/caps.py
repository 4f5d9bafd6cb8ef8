"""Caps: per-user window usage, threshold alerts, enforcement state, overage and credits.

Pure domain logic (docs/DESIGN.md, "Caps, alerts and enforcement"): no Kafka, no clock, no I/O.
A stream worker keeps one :class:`UserCapState` per user (a faust Table value, serialized with
:meth:`UserCapState.to_dict`) and feeds each priced event through :meth:`CapEngine.apply` (or a batch through
:meth:`CapEngine.apply_batch`); the returned :class:`Effects` are the records to produce.

Semantics
---------
*Time.* Event time only. A user's watermark is the largest event time seen; it is "now" for
enforcement and eviction. Event times are floored to the second, which loses nothing because
every window boundary is a whole second.

*Windows.* ``billing_month`` instances start at the subscription's ``billing_anchor`` local wall
time in its timezone, every month on the anchor's day clamped to the month's length (anchor Jan 31
-> Feb 28/29 -> Mar 31); ``calendar_day`` at local midnight; ``week`` on local Monday 00:00 (ISO).
A rolling window of ``N`` hours with sub-buckets of ``B`` seconds (``M = N*3600/B`` buckets) puts an
event at ``t`` in bucket ``t // B``; the rolling usage at time ``t`` is the exact sum of all events
in buckets ``t//B - M + 1 .. t//B``, i.e. over ``((t//B + 1)*B - N, (t//B + 1)*B)``: the window
``(t - N, t]`` with both ends rounded up to a bucket edge. "Exact" means exactly this sum over
the events, with no approximation beyond that rounding of the edges - a brute force over the
events with the same bucketing gives the same number.

*Lateness.* An event counts toward a fixed window instance ``[start, end)`` if it arrives while
``watermark < end + grace``; toward a rolling window if its bucket is at least
``(watermark - N - grace) // B`` (it still belongs to the current window, plus grace). Too-late
events are reported in :attr:`Effects.late`, never silently dropped. State older than that is
evicted, so memory per user is bounded.

*Alerts.* For a fixed window, threshold ``p`` fires once per (user, instance, ``p``) when the
instance's usage reaches ``p`` % of the allowance (``usage * 100 >= p * allowance``). For a rolling
window, it fires once per (user, block, ``p``) where blocks are the epoch-aligned spans of ``N``
hours: it fires for block ``b`` if, at the bucket of some event in ``b``, the rolling usage over
*all* events counted reaches ``p`` %. Both definitions depend only on the set of events counted,
never on their order or batching (late events re-check the buckets they raise), and the fired set
is part of the state, so a restart never fires again. Break-even: once per billing month when the
user's inference cost in it exceeds the monthly price of the plan in force (plans priced 0 have
no break-even).

*Enforcement.* Evaluated over the windows of the plan in force at the watermark, after each
:meth:`CapEngine.apply` / at the end of each batch, and by :meth:`CapEngine.tick`. Per window:
at or over the allowance -> ``blocked`` (block), ``downgrade`` (downgrade), ``warn`` reason
``overage`` (overage; ``blocked`` reason ``ceiling`` once the ceiling is billed and no credit
is left); otherwise ``warn`` once any threshold below 100 % is reached; else ``ok``. The user's
state is the most severe, ties to the one lasting longest. A record is emitted only when the
state, reason, deciding window, ``until``, downgrade model or plan changes.

*Overage and credits.* In the plan's overage window, the part of an event beyond the allowance
is priced as the increase of ``floor(cumulative_overage * unit_price)`` at MONEY_SCALE (exact,
and the per-event values add up to the price of the total). Credits (the user's wallet) pay
that value first; what they cannot cover is billed, up to ``ceiling_usd`` per instance. When
credits run out in the middle of an event, its quantity is split in proportion to the money
(floored); credit quantity + billed quantity always equals the quantity beyond the allowance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from schemas import Subscription
from spendstream.errors import ConfigError
from stream_processors._caps_records import (
    AlertRecord,
    CreditDrawRecord,
    EnforcementReason,
    EnforcementRecord,
    EnforcementStateName,
    LateUsage,
    OverageRecord,
    RejectedEvent,
)
from stream_processors._caps_state import (
    MAX_TOPUP_IDS,
    NEVER,
    FixedState,
    Instance,
    RollingState,
    UserCapState,
)
from stream_processors._caps_util import (
    EPOCH,
    SCALE,
    SECOND,
    billing_month_bounds,
    day_bounds,
    epoch_s,
    ratio,
    rfc3339,
    rfc3339_dt,
    to_units,
    week_bounds,
)
from stream_processors._money import units_to_str as units_str
from stream_processors.plans import OverageAtCap, Plan, PlanCatalog, RollingWindow

__all__ = [
    "DEFAULT_GRACE_S",
    "AlertRecord",
    "CapEngine",
    "CapEvent",
    "CreditDrawRecord",
    "Effects",
    "EnforcementRecord",
    "LateUsage",
    "OverageRecord",
    "RejectedEvent",
    "UserCapState",
    "WindowUsage",
]

DEFAULT_GRACE_S = 300
"""Default grace period (seconds) a window stays open for late events after it ends."""

_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "downgrade": 2, "blocked": 3}
_UNIT_INDEX = {"usd": 0, "tokens": 1, "requests": 2}


@dataclass(frozen=True, slots=True)
class CapEvent:
    """What the cap engine needs of one priced usage event."""

    event_id: str
    user_id: str
    occurred_at: datetime
    """Event time, timezone-aware."""
    cost: Decimal
    """Inference cost in USD, exact (at most MONEY_SCALE decimal places)."""
    tokens: int
    """Input + output tokens."""
    served_model: str
    requests: int = 1
    cost_units: int | None = None
    """``cost`` in units of 10**-MONEY_SCALE USD, when the caller has it already (the worker's
    pricer does): saves the Decimal conversion. It must equal ``cost``."""
    plan_id: str | None = None
    """The plan in force at ``occurred_at``, when the caller resolved it already."""

    @classmethod
    def from_priced(cls, record: Mapping[str, Any]) -> CapEvent:
        """From a ``usage.priced`` record (:class:`schemas.PricedEvent`)."""
        return cls(
            event_id=record["event_id"],
            user_id=record["user_id"],
            occurred_at=datetime.fromisoformat(record["occurred_at"]),
            cost=Decimal(record["cost"]),
            tokens=int(record["input_tokens"]) + int(record["output_tokens"]),
            served_model=record["served_model"],
        )


@dataclass(slots=True)
class Effects:
    """Records produced by the engine, one list per destination, in emission order."""

    alerts: list[AlertRecord] = field(default_factory=list)
    """To ``usage.alerts``."""
    enforcement: list[EnforcementRecord] = field(default_factory=list)
    """To ``usage.enforcement`` (compacted, key = user_id)."""
    overages: list[OverageRecord] = field(default_factory=list)
    """To ``usage.overages``."""
    credit_draws: list[CreditDrawRecord] = field(default_factory=list)
    """To ``usage.overages`` as well (billing nets them), or a credits topic."""
    late: list[LateUsage] = field(default_factory=list)
    """Events too late for some window: count them (a metric), do not retry."""
    rejected: list[RejectedEvent] = field(default_factory=list)
    """Events the engine could not apply at all: send to the dead-letter topic."""

    def __bool__(self) -> bool:
        return bool(
            self.alerts
            or self.enforcement
            or self.overages
            or self.credit_draws
            or self.late
            or self.rejected
        )


class WindowUsage(NamedTuple):
    """Usage of one window of the user's plan at a given time (a read-only view)."""

    window: str
    window_id: str
    kind: str
    unit: str
    usage: Decimal
    """In the window's unit (USD for ``usd``)."""
    limit: Decimal
    start: str
    end: str


class _Win:
    """A plan window compiled to integers for the hot path."""

    __slots__ = (
        "action",
        "bucket_s",
        "ceiling",
        "downgrade_to",
        "exempt",
        "first_level",
        "key",
        "kind",
        "levels",
        "limit",
        "m",
        "name",
        "plan_id",
        "price_den",
        "price_num",
        "rolling",
        "span",
        "unit",
        "unit_idx",
        "unit_price",
        "usd",
        "warn_level",
    )

    def __init__(self, plan: Plan, window: Any) -> None:
        self.plan_id = plan.id
        self.name: str = window.name
        self.key = f"{plan.id}.{window.name}"
        self.kind: str = window.kind
        self.unit: str = window.unit
        self.unit_idx = _UNIT_INDEX[window.unit]
        self.usd = window.unit == "usd"
        self.limit = to_units(window.allowance) if self.usd else int(window.allowance)
        # Level of p %: the least integer usage with usage * 100 >= p * limit.
        self.levels: tuple[tuple[int, int], ...] = tuple(
            (p, -((-p * self.limit) // 100)) for p in window.thresholds
        )
        self.first_level = self.levels[0][1]
        below = [lvl for p, lvl in self.levels if p < 100]
        self.warn_level: int | None = below[0] if below else None
        self.exempt: frozenset[str] = window.exempt_models
        at_cap = window.at_cap
        self.action: str = at_cap.action
        self.downgrade_to: str | None = getattr(at_cap, "model", None)
        self.unit_price: Decimal | None = None
        self.price_num = self.price_den = 1
        self.ceiling: int | None = None
        if isinstance(at_cap, OverageAtCap):
            self.unit_price = at_cap.unit_price
            num, den = ratio(at_cap.unit_price)
            # value in USD units = quantity * num / den; a token or request quantity is a count,
            # a USD quantity is already in units.
            self.price_num = num if self.usd else num * SCALE
            self.price_den = den
            if at_cap.ceiling_usd is not None:
                self.ceiling = to_units(at_cap.ceiling_usd)
        self.rolling = isinstance(window, RollingWindow)
        if isinstance(window, RollingWindow):
            self.span = window.hours * 3600
            self.bucket_s = window.bucket_minutes * 60
            self.m = self.span // self.bucket_s
        else:
            self.span = self.bucket_s = self.m = 0


class _Plan:
    __slots__ = ("id", "price", "windows")

    def __init__(self, plan: Plan) -> None:
        self.id = plan.id
        self.price = to_units(plan.monthly_price)
        self.windows = tuple(_Win(plan, w) for w in plan.windows)


class _Verdict(NamedTuple):
    severity: int
    until: int
    state: EnforcementStateName
    reason: EnforcementReason
    win: _Win
    start: int
    usage: int


class CapEngine:
    """Applies priced events to per-user cap state and says what to emit.

    One engine per worker (it holds the compiled catalog); one :class:`UserCapState` per user.
    ``grace_s`` is how long a window stays open for late events after it ends.
    """

    def __init__(self, catalog: PlanCatalog, *, grace_s: int = DEFAULT_GRACE_S) -> None:
        if grace_s < 0:
            raise ConfigError("grace_s must be >= 0")
        self.catalog = catalog
        self.grace_s = grace_s
        self._plans = {p.id: _Plan(p) for p in catalog}
        self._spans = {w.key: (w.usd, w.m) for plan in self._plans.values() for w in plan.windows}
        self._wins = {w.key: w for plan in self._plans.values() for w in plan.windows}
        self._zones: dict[str, ZoneInfo] = {}

    # ----------------------------------------------------------------------------- state

    def new_state(self, user_id: str, org_id: str = "") -> UserCapState:
        """An empty state for a user seen for the first time."""
        return UserCapState(user_id, org_id)

    def restore(self, obj: dict[str, Any]) -> UserCapState:
        """A state from :meth:`UserCapState.to_dict` output (e.g. a faust Table changelog)."""
        return UserCapState.from_dict(obj, self._spans)

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
        if state.watermark != NEVER:
            self._enforce(state, sub, state.watermark, detected, out)
        return out

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
        if credit_id in state.topups:
            return out
        state.wallet += to_units(amount)
        state.topups.append(credit_id)
        del state.topups[:-MAX_TOPUP_IDS]
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
        for w in plan.windows:
            ws = state.windows.get(w.key)
            if w.rolling:
                k = t // w.bucket_s
                used = 0
                if isinstance(ws, RollingState):
                    used = ws.sum_at(k, w.m) if k >= ws.cur else _sum_range(ws, k, w.m)
                start, end = (k - w.m + 1) * w.bucket_s, (k + 1) * w.bucket_s
            else:
                start, end = self._bounds(w, t, sub, zone)
                inst = ws.find(t) if isinstance(ws, FixedState) else None
                used = inst.usage if inst is not None else 0
            result.append(
                WindowUsage(
                    w.key,
                    f"{w.key}@{rfc3339(start)}",
                    w.kind,
                    w.unit,
                    _as_decimal(used, w.usd),
                    _as_decimal(w.limit, w.usd),
                    rfc3339(start),
                    rfc3339(end),
                )
            )
        return result

    # ----------------------------------------------------------------------------- internals

    def _plan(self, plan_id: str) -> _Plan:
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

    def _bounds(self, w: _Win, t: int, sub: Subscription, zone: ZoneInfo) -> tuple[int, int]:
        if w.kind == "calendar_day":
            return day_bounds(t, zone)
        if w.kind == "week":
            return week_bounds(t, zone)
        return billing_month_bounds(t, sub.billing_anchor, zone)

    def _apply_one(
        self, state: UserCapState, sub: Subscription, ev: CapEvent, detected: str, out: Effects
    ) -> None:
        # Validate everything before touching the state: a rejected event changes nothing.
        try:
            if ev.user_id != state.user_id:
                raise ValueError(f"event of user {ev.user_id!r} applied to {state.user_id!r}")
            t = epoch_s(ev.occurred_at)
            plan = self._plan(ev.plan_id if ev.plan_id is not None else sub.plan_at(ev.occurred_at))
            cost = ev.cost_units if ev.cost_units is not None else to_units(ev.cost)
            if cost < 0 or ev.tokens < 0 or ev.requests < 0:
                raise ValueError("cost, tokens and requests must not be negative")
        except (ValueError, ConfigError, InvalidOperation, TypeError) as exc:
            out.rejected.append(RejectedEvent(ev.event_id, str(exc)))
            return
        if t > state.watermark:
            state.watermark = t
        amounts = (cost, ev.tokens, ev.requests)
        zone: ZoneInfo | None = None
        if plan.price > 0 and cost > 0:
            zone = self._zone(sub.timezone)
            self._break_even(state, sub, plan, ev, t, cost, zone, detected, out)
        for w in plan.windows:
            amount = amounts[w.unit_idx]
            if amount <= 0 or ev.served_model in w.exempt:
                continue
            ws = state.windows.get(w.key)
            if w.rolling:
                if not isinstance(ws, RollingState):
                    ws = state.windows[w.key] = RollingState(w.usd, state.watermark // w.bucket_s)
                self._rolling_add(state, ws, w, ev, t, amount, detected, out)
            else:
                if not isinstance(ws, FixedState):
                    ws = state.windows[w.key] = FixedState(w.usd)
                if zone is None:
                    zone = self._zone(sub.timezone)
                self._fixed_add(state, sub, ws, w, ev, t, amount, zone, detected, out)
        if len(state.windows) > len(plan.windows):
            self._sweep(state, plan)

    def _sweep(self, state: UserCapState, plan: _Plan) -> None:
        # Windows of a plan the user left: evicted by the same rules, dropped once empty.
        current = {w.key for w in plan.windows}
        for key in [k for k in state.windows if k not in current]:
            ws = state.windows[key]
            if isinstance(ws, FixedState):
                ws.evict(state.watermark - self.grace_s)
            elif key in self._wins:
                self._rolling_evict(state, ws, self._wins[key])
            if ws.empty():
                del state.windows[key]

    def _fixed_add(
        self,
        state: UserCapState,
        sub: Subscription,
        ws: FixedState,
        w: _Win,
        ev: CapEvent,
        t: int,
        amount: int,
        zone: ZoneInfo,
        detected: str,
        out: Effects,
    ) -> None:
        horizon = state.watermark - self.grace_s
        ws.evict(horizon)
        inst = ws.find(t)
        if inst is None:
            start, end = self._bounds(w, t, sub, zone)
            if end <= horizon:
                out.late.append(LateUsage(ev.event_id, w.key, rfc3339_dt(ev.occurred_at)))
                return
            inst = Instance(start, end)
            ws.add(inst)
        before = inst.usage
        after = inst.usage = before + amount
        if after >= w.first_level:
            fired = inst.fired
            for pct, level in w.levels:
                if after < level:
                    break
                if not fired >> pct & 1:
                    fired |= 1 << pct
                    out.alerts.append(
                        self._alert(
                            state, w, inst.start, inst.start, inst.end, pct, after, ev, detected
                        )
                    )
            inst.fired = fired
        if w.unit_price is not None and after > w.limit:
            self._overage(state, w, inst, before, after, ev, detected, out)

    def _overage(
        self,
        state: UserCapState,
        w: _Win,
        inst: Instance,
        before: int,
        after: int,
        ev: CapEvent,
        detected: str,
        out: Effects,
    ) -> None:
        over_before = max(0, before - w.limit)
        over_after = after - w.limit
        quantity = over_after - over_before
        num, den = w.price_num, w.price_den
        value = over_after * num // den - over_before * num // den
        drawn = credited = 0
        if state.wallet > 0 and value > 0:
            drawn = min(state.wallet, value)
            credited = quantity if drawn == value else quantity * drawn // value
            state.wallet -= drawn
        billed_qty = quantity - credited
        billed_value = value - drawn
        amount = billed_value
        if w.ceiling is not None:
            amount = max(0, min(billed_value, w.ceiling - inst.billed))
        inst.billed += amount
        window_id = f"{w.key}@{rfc3339(inst.start)}"
        event_time = rfc3339_dt(ev.occurred_at)
        if credited or drawn:
            out.credit_draws.append(
                CreditDrawRecord(
                    draw_id=f"{ev.event_id}|{window_id}|credit",
                    user_id=state.user_id,
                    org_id=state.org_id,
                    plan_id=w.plan_id,
                    window=w.key,
                    window_id=window_id,
                    unit=w.unit,
                    event_id=ev.event_id,
                    event_time=event_time,
                    quantity=_qty_str(credited, w.usd),
                    amount=units_str(drawn),
                    balance_after=units_str(state.wallet),
                    detected_at=detected,
                )
            )
        if billed_qty:
            out.overages.append(
                OverageRecord(
                    overage_id=f"{ev.event_id}|{window_id}",
                    user_id=state.user_id,
                    org_id=state.org_id,
                    plan_id=w.plan_id,
                    window=w.key,
                    window_id=window_id,
                    window_start=rfc3339(inst.start),
                    window_end=rfc3339(inst.end),
                    unit=w.unit,
                    event_id=ev.event_id,
                    event_time=event_time,
                    quantity=_qty_str(billed_qty, w.usd),
                    unit_price=format(w.unit_price, "f") if w.unit_price is not None else "0",
                    value=units_str(billed_value),
                    amount=units_str(amount),
                    ceiling_usd=units_str(w.ceiling) if w.ceiling is not None else None,
                    detected_at=detected,
                )
            )

    def _rolling_evict(self, state: UserCapState, ws: RollingState, w: _Win) -> None:
        jmin = (state.watermark - w.span - self.grace_s) // w.bucket_s
        ws.evict(jmin - w.m + 1, jmin * w.bucket_s // w.span)

    def _rolling_add(
        self,
        state: UserCapState,
        ws: RollingState,
        w: _Win,
        ev: CapEvent,
        t: int,
        amount: int,
        detected: str,
        out: Effects,
    ) -> None:
        b, m = w.bucket_s, w.m
        j = t // b
        k_now = state.watermark // b
        if k_now > ws.cur:
            ws.advance(k_now, m)
            self._rolling_evict(state, ws, w)
        if j < (state.watermark - w.span - self.grace_s) // b:
            out.late.append(LateUsage(ev.event_id, w.key, rfc3339_dt(ev.occurred_at)))
            return
        buckets = ws.buckets
        buckets[j] = buckets.get(j, 0) + amount
        cur = ws.cur
        if j > cur - m:
            ws.cur_sum += amount
        if j == cur:
            if ws.cur_sum >= w.first_level:
                self._rolling_check(state, ws, w, cur, ws.cur_sum, ev, detected, out)
            return
        # A late event raises the rolling sum at every bucket in [j, j + m): re-check those that
        # hold events, so the fired set is the same as if the events had come in order.
        end = min(j + m - 1, cur)
        total = _sum_range(ws, j, m)
        get = buckets.get
        for k in range(j, end + 1):
            if k > j:
                total += get(k, 0) - get(k - m, 0)
            if total >= w.first_level and k in buckets:
                self._rolling_check(state, ws, w, k, total, ev, detected, out)

    def _rolling_check(
        self,
        state: UserCapState,
        ws: RollingState,
        w: _Win,
        k: int,
        total: int,
        ev: CapEvent,
        detected: str,
        out: Effects,
    ) -> None:
        block = k * w.bucket_s // w.span
        fired = ws.fired.get(block, 0)
        new = fired
        for pct, level in w.levels:
            if total < level:
                break
            if not new >> pct & 1:
                new |= 1 << pct
                out.alerts.append(
                    self._alert(
                        state,
                        w,
                        block * w.span,
                        (k - w.m + 1) * w.bucket_s,
                        (k + 1) * w.bucket_s,
                        pct,
                        total,
                        ev,
                        detected,
                    )
                )
        if new != fired:
            ws.fired[block] = new

    def _alert(
        self,
        state: UserCapState,
        w: _Win,
        instance: int,
        start: int,
        end: int,
        pct: int,
        usage: int,
        ev: CapEvent,
        detected: str,
    ) -> AlertRecord:
        window_id = f"{w.key}@{rfc3339(instance)}"
        return AlertRecord(
            alert_id=f"{state.user_id}|{window_id}|{pct}",
            kind="threshold",
            user_id=state.user_id,
            org_id=state.org_id,
            plan_id=w.plan_id,
            window=w.key,
            window_id=window_id,
            window_kind=w.kind,
            unit=w.unit,
            threshold=pct,
            usage=_qty_str(usage, w.usd),
            limit=_qty_str(w.limit, w.usd),
            window_start=rfc3339(start),
            window_end=rfc3339(end),
            event_id=ev.event_id,
            event_time=rfc3339_dt(ev.occurred_at),
            detected_at=detected,
        )

    def _break_even(
        self,
        state: UserCapState,
        sub: Subscription,
        plan: _Plan,
        ev: CapEvent,
        t: int,
        cost: int,
        zone: ZoneInfo,
        detected: str,
        out: Effects,
    ) -> None:
        months = state.months
        horizon = state.watermark - self.grace_s
        months.evict(horizon)
        inst = months.find(t)
        if inst is None:
            start, end = billing_month_bounds(t, sub.billing_anchor, zone)
            if end <= horizon:
                out.late.append(LateUsage(ev.event_id, "break_even", rfc3339_dt(ev.occurred_at)))
                return
            inst = Instance(start, end)
            months.add(inst)
        inst.usage += cost
        if inst.usage > plan.price and not inst.fired:
            inst.fired = 1 << 100
            window = f"{plan.id}.break_even"
            window_id = f"{window}@{rfc3339(inst.start)}"
            out.alerts.append(
                AlertRecord(
                    alert_id=f"{state.user_id}|{window_id}|100",
                    kind="break_even",
                    user_id=state.user_id,
                    org_id=state.org_id,
                    plan_id=plan.id,
                    window=window,
                    window_id=window_id,
                    window_kind="billing_month",
                    unit="usd",
                    threshold=100,
                    usage=units_str(inst.usage),
                    limit=units_str(plan.price),
                    window_start=rfc3339(inst.start),
                    window_end=rfc3339(inst.end),
                    event_id=ev.event_id,
                    event_time=rfc3339_dt(ev.occurred_at),
                    detected_at=detected,
                )
            )

    def _verdict(self, state: UserCapState, w: _Win, at: int, ws: Any) -> _Verdict | None:
        inst: Instance | None = None
        if w.rolling:
            if not isinstance(ws, RollingState):
                return None
            k = at // w.bucket_s
            if at == state.watermark and k > ws.cur:
                ws.advance(k, w.m)
            used = ws.sum_at(k, w.m)
            start = (k - w.m + 1) * w.bucket_s
            end = 0
        else:
            inst = ws.find(at) if isinstance(ws, FixedState) else None
            if inst is None:
                return None
            used, start, end = inst.usage, inst.start, inst.end
        state_name: EnforcementStateName
        reason: EnforcementReason
        if used >= w.limit:
            level = w.limit
            if w.action == "block":
                state_name, reason = "blocked", "cap"
            elif w.action == "downgrade":
                state_name, reason = "downgrade", "cap"
            elif (
                w.ceiling is not None
                and inst is not None
                and inst.billed >= w.ceiling
                and state.wallet == 0
            ):
                state_name, reason = "blocked", "ceiling"
            else:
                state_name, reason = "warn", "overage"
        elif w.warn_level is not None and used >= w.warn_level:
            level = w.warn_level
            state_name, reason = "warn", "threshold"
        else:
            return None
        if w.rolling:
            assert isinstance(ws, RollingState)
            end = _rolling_until(ws, w, at // w.bucket_s, used, level)
        return _Verdict(_SEVERITY[state_name], end, state_name, reason, w, start, used)

    def _enforce(
        self, state: UserCapState, sub: Subscription, at: int, detected: str, out: Effects
    ) -> None:
        when = EPOCH + at * SECOND
        try:
            plan = self._plan(sub.plan_at(when))
        except ConfigError:
            return  # every event of this plan was rejected already; nothing to enforce
        best: _Verdict | None = None
        for w in plan.windows:
            verdict = self._verdict(state, w, at, state.windows.get(w.key))
            if verdict is not None and (
                best is None or (verdict.severity, verdict.until) > (best.severity, best.until)
            ):
                best = verdict
        if best is None:
            key: tuple[Any, ...] = ("ok", "ok", None, None, None, plan.id)
        else:
            bw = best.win
            downgrade = bw.downgrade_to if best.state == "downgrade" else None
            key = (best.state, best.reason, bw.key, best.until, downgrade, plan.id)
        if key == state.enf:
            return
        state.enf = key
        state.version += 1
        if best is None:
            record = EnforcementRecord(
                user_id=state.user_id,
                org_id=state.org_id,
                plan_id=plan.id,
                state="ok",
                reason="ok",
                window=None,
                window_id=None,
                unit=None,
                usage=None,
                limit=None,
                remaining=None,
                until=None,
                downgrade_to=None,
                as_of=rfc3339(at),
                version=state.version,
                updated_at=detected,
            )
        else:
            bw = best.win
            record = EnforcementRecord(
                user_id=state.user_id,
                org_id=state.org_id,
                plan_id=plan.id,
                state=best.state,
                reason=best.reason,
                window=bw.key,
                window_id=f"{bw.key}@{rfc3339(best.start)}",
                unit=bw.unit,
                usage=_qty_str(best.usage, bw.usd),
                limit=_qty_str(bw.limit, bw.usd),
                remaining=_qty_str(max(0, bw.limit - best.usage), bw.usd),
                until=rfc3339(best.until),
                downgrade_to=key[4],
                as_of=rfc3339(at),
                version=state.version,
                updated_at=detected,
            )
        out.enforcement.append(record)


def _sum_range(ws: RollingState, k: int, m: int) -> int:
    """Sum of buckets ``(k - m, k]``, by whichever is shorter: the range or the map."""
    buckets = ws.buckets
    if len(buckets) <= m:
        lo = k - m
        return sum(v for j, v in buckets.items() if lo < j <= k)
    get = buckets.get
    return sum(get(j, 0) for j in range(k - m + 1, k + 1))


def _rolling_until(ws: RollingState, w: _Win, k: int, used: int, level: int) -> int:
    """First bucket edge after which the rolling sum, with no new usage, is below ``level``."""
    lo = k - w.m
    remaining = used
    for j in sorted(j for j in ws.buckets if lo < j <= k):
        remaining -= ws.buckets[j]
        if remaining < level:
            return (j + w.m) * w.bucket_s
    return (k + 1) * w.bucket_s  # unreachable when used >= level > 0


def _qty_str(value: int, usd: bool) -> str:
    return units_str(value) if usd else str(value)


def _as_decimal(value: int, usd: bool) -> Decimal:
    return Decimal(units_str(value)) if usd else Decimal(value)
