"""What-if replay: one month of stored usage re-run through the worker's own cap engine and pricer.

``spendstream whatif --plans ALT.yaml [--prices ALT.json] [--batch-share pro=0.3]
[--period 2026-11] [--org ORG]`` replays the stored events of a month twice, under the plans
and prices in force ("current") and under the alternative, and prints per tier subscription
revenue, overage revenue, credits drawn, inference cost, margin and cap outcomes side by side.

How it replays (docs/DESIGN.md, "Caps, alerts and enforcement"):

* **Read.** ``priced_events FINAL`` of the month, plus a warm-up of 32 days before it (so that
  every billing-month, week and day window open at the start of the month has the usage it had),
  streamed in ``(user_id, occurred_at, event_id)`` order in chunks of :data:`CHUNK_ROWS` rows
  (keyset pagination, parameters bound, read-only store). The subscriptions of each chunk's
  users come from the ``subscriptions`` table (time zone, billing anchor, plan schedule,
  credit grants). Only the usage of the month is counted; the warm-up only builds cap state.
* **Replay.** Each user's events go, in event-time order, through
  :class:`~stream_processors.caps.CapEngine` (one :meth:`~CapEngine.apply` per event) under the
  scenario's plans, like the worker. Before each event the replay asks what a gateway would
  (:class:`producers.CapGuard`'s rules: the user's latest enforcement record, released once its
  ``until`` has passed): a **blocked** request is not served (costs nothing, counts nowhere); a
  **downgraded** one is served by the downgrade model and re-priced with
  :class:`~stream_processors.PriceCatalog` (the requested model kept, so its list value stays).
  Credit grants are applied before the user's first event at or after their ``granted_at``.
* **Prices.** An event the scenario does not change keeps its stored cost, unless the scenario
  has its own price sheet (``--prices``: LiteLLM-format overrides on top of the configured
  catalog), which re-prices every event from its stored fields (all token classes, service
  tier, web searches, semantic cache hit). ``--batch-share TIER=FRACTION`` re-prices a stable
  share of a tier's events (a hash of ``event_id`` below the fraction) at the batch tier.
* **Revenue.** Subscription revenue prorated to the second over the UTC month as the P&L views
  do (SQL over ``subscription_months``, at the scenario's monthly prices), plus the overage
  billed and the credit drawn that the engine emits for the month's events.

What it cannot know: the store holds only the requests that were served under the current
caps. A request the current caps refused never reached the store, so an alternative with looser
caps cannot add it; and a user's reaction to other caps (sending less, buying credit) is not
modelled. A window that opened more than 32 days before the month (none of the fixed kinds do)
would miss usage, and a warm-up event's own block depends on windows it can see.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from schemas import MONEY_SCALE, CreditGrant, PlanPeriod, Subscription
from schemas._wire import DecodedEvent
from schemas.plans import PlanCatalog
from sinks import Store
from spendstream.errors import ConfigError
from stream_processors import PriceCatalog, units_to_decimal
from stream_processors.caps import CapEngine, CapEvent, Effects, UserCapState

__all__ = [
    "CHUNK_ROWS",
    "COMPARED",
    "EVENTS_SQL",
    "SUBSCRIPTION_REVENUE_SQL",
    "Replayer",
    "Scenario",
    "StoredEvent",
    "WhatIfResult",
    "batch_selected",
    "parse_batch_share",
    "render",
    "result_json",
    "run_whatif",
]

CHUNK_ROWS = 20_000
"""Rows per read: the replay holds one chunk and the state of one user at a time."""

WARM_UP = timedelta(days=32)
"""How far before the month the replay reads to rebuild the cap state at its start: a billing
month is at most 31 days long, plus the widest time-zone offset."""

HEAVIEST = 5
"""Heaviest users (by inference cost) listed per tier and scenario."""

LIMITS = (
    "A replay sees only requests that were served under the current caps: demand the current "
    "caps refused is not in the store, so looser alternative caps cannot add it back."
)

_EVENT_COLUMNS = """
    user_id, event_id, toUnixTimestamp64Micro(occurred_at) AS t_us, org_id, provider,
    toString(requested_model), toString(served_model), toString(plan_id), toString(cost),
    input_tokens, cached_input_tokens, cache_write_tokens, cache_write_1h_tokens,
    input_audio_tokens, input_image_tokens, output_tokens, reasoning_tokens,
    output_audio_tokens, output_image_tokens, toString(service_tier), web_search_requests,
    search_context_size, semantic_cache_hit"""

EVENTS_SQL = (
    "SELECT"
    + _EVENT_COLUMNS
    + """
FROM {db}.priced_events FINAL
WHERE occurred_at >= fromUnixTimestamp64Micro({since_us:Int64}, 'UTC')
    AND occurred_at < addMonths(toDateTime64({month:Date}, 6, 'UTC'), 1)
    AND ({org:String} = '' OR org_id = {org:String})
    AND (user_id, toUnixTimestamp64Micro(occurred_at), event_id)
        > ({after_user:String}, {after_us:Int64}, {after_event:String})
ORDER BY user_id, occurred_at, event_id
LIMIT {limit:UInt32}
"""
)
"""One chunk of the stored events, after the key ``(user, time, event)`` of the last one read.
``{db}`` is the validated database name; everything else is a bound parameter."""

SUBSCRIPTIONS_SQL = """
SELECT user_id, toString(org_id), toString(timezone), toUnixTimestamp64Micro(billing_anchor),
    plan_ids, arrayMap(x -> toUnixTimestamp64Micro(x), effective_ats), credit_ids,
    arrayMap(x -> toString(x), credit_amounts),
    arrayMap(x -> toUnixTimestamp64Micro(x), credit_granted_ats)
FROM {db}.subscriptions FINAL
WHERE user_id IN {users:Array(String)}
"""

SUBSCRIPTION_REVENUE_SQL = """
SELECT
    s.plan_id AS tier,
    sum(toDecimal128(s.active_s, 24) / s.month_s) AS subscribers,
    sum(toDecimal256(pl.monthly_price, 24) * s.active_s / s.month_s) AS subscription_revenue
FROM {db}.subscription_months AS s
LEFT JOIN (
    SELECT t.1 AS plan_id, toDecimal128(t.2, 24) AS monthly_price
    FROM (SELECT arrayJoin(arrayZip({p_id:Array(String)}, {p_price:Array(String)})) AS t)
) AS pl ON pl.plan_id = s.plan_id
WHERE s.month = {month:Date} AND ({org:String} = '' OR s.org_id = {org:String})
GROUP BY tier
"""
"""Subscription revenue per tier, prorated as the P&L views do, at a scenario's prices."""

COMPARED = (
    "subscribers",
    "subscription_revenue",
    "overage_revenue",
    "credits_drawn",
    "revenue",
    "requests",
    "inference_cost",
    "gross_margin",
    "margin_pct",
    "users_alerted",
    "users_blocked",
    "users_downgraded",
    "users_overage",
    "requests_blocked",
    "requests_downgraded",
    "alerts",
    "enforcement_changes",
)
"""The columns printed current vs alternative."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EXACT = Context(prec=120, traps=[Inexact, InvalidOperation, Overflow])
_TIER_ORDER = ("free", "pro", "team", "enterprise")


class StoredEvent(NamedTuple):
    """One stored priced event, as the replay reads it (``cost`` in units of 10^-24 USD)."""

    user_id: str
    event_id: str
    t_us: int
    org_id: str
    provider: str | None
    requested_model: str
    served_model: str
    plan_id: str
    cost: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    input_audio_tokens: int
    input_image_tokens: int
    output_tokens: int
    reasoning_tokens: int
    output_audio_tokens: int
    output_image_tokens: int
    service_tier: str
    web_search_requests: int
    search_context_size: str | None
    semantic_cache_hit: bool


def _units(text: str) -> int:
    """Decimal text with at most 24 places -> integer units, without a decimal context."""
    whole, _, frac = text.partition(".")
    if len(frac) > MONEY_SCALE:
        raise ValueError(f"{text} has more than {MONEY_SCALE} decimal places")
    sign = -1 if whole.startswith("-") else 1
    scale: int = 10**MONEY_SCALE
    return sign * (abs(int(whole or "0")) * scale + int(frac.ljust(MONEY_SCALE, "0")))


def _stored(row: Sequence[Any]) -> StoredEvent:
    values = list(row)
    values[8] = _units(str(values[8]))
    for i in (2, *range(9, 19), 20):
        values[i] = int(values[i])
    values[22] = values[22] in (True, 1, "true", "1")
    return StoredEvent(*values)


def parse_batch_share(items: Iterable[str]) -> dict[str, Decimal]:
    """``["pro=0.3", ...]`` -> ``{"pro": Decimal("0.3")}``; a fraction outside [0, 1] is refused."""
    out: dict[str, Decimal] = {}
    for item in items:
        tier, sep, text = item.partition("=")
        try:
            share = Decimal(text.strip())
        except InvalidOperation:
            share = Decimal(-1)
        if not sep or not tier.strip() or not share.is_finite() or not 0 <= share <= 1:
            raise ConfigError(
                f"--batch-share takes TIER=FRACTION with 0 <= FRACTION <= 1: {item!r}"
            )
        out[tier.strip()] = share
    return out


def batch_selected(event_id: str, share: Decimal) -> bool:
    """Whether ``event_id`` is in the ``share`` of its tier moved to the batch tier.

    A stable 64-bit hash of the id compared with the share, in integers: the same events are
    chosen on every run and machine, and a larger share keeps every event a smaller one chose.
    """
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")
    num, den = share.as_integer_ratio()
    return h * den < num * 2**64


@dataclass(frozen=True)
class Scenario:
    """What a replay runs under: plans, and optionally its own prices and batch shares.

    ``prices`` re-prices events the scenario changes (downgrades, batch shares);
    ``reprice_all`` re-prices every event with it instead of keeping the stored cost.
    """

    plans: PlanCatalog
    prices: PriceCatalog
    reprice_all: bool = False
    batch_share: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass
class TierTotals:
    """One tier's replayed figures (money in units of 10^-24 USD)."""

    requests: int = 0
    requests_blocked: int = 0
    requests_downgraded: int = 0
    inference_cost: int = 0
    overage_revenue: int = 0
    credits_drawn: int = 0
    alerts: int = 0
    enforcement_changes: int = 0
    users_alerted: set[str] = field(default_factory=set)
    users_blocked: set[str] = field(default_factory=set)
    users_downgraded: set[str] = field(default_factory=set)
    users_overage: set[str] = field(default_factory=set)
    heaviest: list[tuple[int, str]] = field(default_factory=list)
    """A min-heap of (cost, user) of the heaviest users."""


class Replayer:
    """Replays users' stored events under one scenario and accumulates per-tier totals.

    Feed it user by user (:meth:`replay_user`); it keeps nothing of a user after their turn
    but the totals.
    """

    def __init__(self, scenario: Scenario, month: date, *, grace_s: int = 300) -> None:
        self.scenario = scenario
        self.engine = CapEngine(scenario.plans, grace_s=grace_s)
        start = datetime(month.year, month.month, 1, tzinfo=UTC)
        end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        self.start_us = (start - _EPOCH) // timedelta(microseconds=1)
        self.end_us = (end - _EPOCH) // timedelta(microseconds=1)
        self.tiers: dict[str, TierTotals] = {}
        self.events = 0
        self._detected = start

    def _tier(self, plan_id: str) -> TierTotals:
        totals = self.tiers.get(plan_id)
        if totals is None:
            totals = self.tiers[plan_id] = TierTotals()
        return totals

    def replay_user(self, sub: Subscription | None, events: Iterable[StoredEvent]) -> None:
        """Replay one user's events (in event-time order) through the engine."""
        scenario, engine, catalog = self.scenario, self.engine, self.scenario.plans
        state: UserCapState | None = None
        grants = list(sub.credits) if sub is not None else []
        applied_grants = 0
        gateway = _Gateway()
        user_cost: dict[str, int] = {}
        user_id = ""
        for ev in events:
            self.events += 1
            user_id, t_us, tier = ev.user_id, ev.t_us, ev.plan_id
            totals = self._tier(tier) if self.start_us <= t_us < self.end_us else None
            capped = sub is not None and tier in catalog
            when = _EPOCH + timedelta(microseconds=t_us)
            effects = Effects()
            if capped and sub is not None:
                if state is None:
                    state = engine.new_state(user_id, sub.org_id)
                # A grant bought by now was applied when its record arrived, before this request.
                while applied_grants < len(grants) and grants[applied_grants].granted_at <= when:
                    grant = grants[applied_grants]
                    engine.top_up(state, sub, grant.credit_id, grant.amount_usd, when, effects)
                    applied_grants += 1
                gateway.update(effects)
            decision = gateway.decide(t_us // 1_000_000) if capped else "allow"
            if decision == "block":
                if totals is not None:
                    totals.requests_blocked += 1
                    totals.users_blocked.add(user_id)
                    self._account(effects, totals)
                continue
            served = ev.served_model or ev.requested_model
            provider = ev.provider
            changed = False
            if decision == "downgrade" and gateway.downgrade_to is not None:
                changed = served != gateway.downgrade_to
                served, provider = gateway.downgrade_to, None
                if totals is not None:
                    totals.requests_downgraded += 1
                    totals.users_downgraded.add(user_id)
            service_tier = ev.service_tier
            share = scenario.batch_share.get(tier)
            if share and service_tier != "batch" and batch_selected(ev.event_id, share):
                service_tier, changed = "batch", True
            cost = ev.cost
            if changed or scenario.reprice_all:
                cost = scenario.prices.quote(_usage(ev, served, provider, service_tier)).cost
            if totals is not None:
                totals.requests += 1
                totals.inference_cost += cost
                user_cost[tier] = user_cost.get(tier, 0) + cost
            if state is not None and sub is not None:
                cap = CapEvent(
                    ev.event_id,
                    user_id,
                    when,
                    Decimal(cost).scaleb(-MONEY_SCALE, _EXACT),
                    ev.input_tokens + ev.output_tokens,
                    served,
                    1,
                    cost,
                    tier,
                )
                engine.apply(state, sub, cap, self._detected, effects)
                gateway.update(effects)
            if totals is not None:
                self._account(effects, totals)
        for tier, cost in user_cost.items():
            heap = self._tier(tier).heaviest
            if len(heap) < HEAVIEST:
                heapq.heappush(heap, (cost, user_id))
            elif (cost, user_id) > heap[0]:
                heapq.heapreplace(heap, (cost, user_id))

    @staticmethod
    def _account(effects: Effects, totals: TierTotals) -> None:
        """What the engine emitted for one of the month's events, to that event's tier."""
        for alert in effects.alerts:
            totals.alerts += 1
            totals.users_alerted.add(alert["user_id"])
        for overage in effects.overages:
            totals.overage_revenue += _units(overage["amount"])
            totals.users_overage.add(overage["user_id"])
        for draw in effects.credit_draws:
            totals.credits_drawn += _units(draw["amount"])
        totals.enforcement_changes += len(effects.enforcement)


class _Gateway:
    """What a gateway decides from the user's latest enforcement record (CapGuard's rules)."""

    __slots__ = ("action", "downgrade_to", "until_s")

    def __init__(self) -> None:
        self.action = "allow"
        self.until_s: int | None = None
        self.downgrade_to: str | None = None

    def update(self, effects: Effects) -> None:
        if not effects.enforcement:
            return
        record = effects.enforcement[-1]
        state, self.downgrade_to = record["state"], record["downgrade_to"]
        if state == "blocked" or (state == "downgrade" and not self.downgrade_to):
            self.action = "block"
        elif state == "downgrade":
            self.action = "downgrade"
        else:
            self.action = "allow"
        until = record["until"]
        self.until_s = None if until is None else _epoch_s(until)

    def decide(self, t_s: int) -> str:
        # Released once the deciding window's end has passed, as CapGuard does.
        return self.action if self.until_s is None or t_s < self.until_s else "allow"


def _epoch_s(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (when - _EPOCH) // timedelta(seconds=1)


def _usage(ev: StoredEvent, served: str, provider: str | None, service_tier: str) -> DecodedEvent:
    """The stored fields as the event the pricer takes (only what prices a call is needed)."""
    return DecodedEvent(
        event_id=ev.event_id,
        occurred_at=_EPOCH + timedelta(microseconds=ev.t_us),
        org_id=ev.org_id or "-",
        user_id=ev.user_id,
        gateway="whatif",
        provider=provider,
        requested_model=ev.requested_model,
        served_model=served,
        input_tokens=ev.input_tokens,
        cached_input_tokens=ev.cached_input_tokens,
        cache_write_tokens=ev.cache_write_tokens,
        cache_write_1h_tokens=ev.cache_write_1h_tokens,
        input_audio_tokens=ev.input_audio_tokens,
        input_image_tokens=ev.input_image_tokens,
        output_tokens=ev.output_tokens,
        reasoning_tokens=ev.reasoning_tokens,
        output_audio_tokens=ev.output_audio_tokens,
        output_image_tokens=ev.output_image_tokens,
        service_tier=service_tier,  # type: ignore[arg-type]
        web_search_requests=ev.web_search_requests,
        search_context_size=ev.search_context_size,  # type: ignore[arg-type]
        semantic_cache_hit=ev.semantic_cache_hit,
    )


def _subscription(row: Sequence[Any]) -> Subscription:
    def at(us: Any) -> datetime:
        return _EPOCH + timedelta(microseconds=int(us))

    user, org, zone, anchor, plan_ids, effective, credit_ids, amounts, granted = row
    return Subscription(
        user_id=user,
        org_id=org,
        timezone=zone,
        billing_anchor=at(anchor),
        plans=[
            PlanPeriod(plan_id=p, effective_at=at(e))
            for p, e in zip(plan_ids, effective, strict=True)
        ],
        credits=[
            CreditGrant(credit_id=c, amount_usd=Decimal(a), granted_at=at(g))
            for c, a, g in zip(credit_ids, amounts, granted, strict=True)
        ],
    )


def stored_events(
    store: Store, month: date, org: str = "", chunk: int = CHUNK_ROWS
) -> Iterator[list[StoredEvent]]:
    """The month's events and the warm-up before it, chunk by chunk in (user, time, id) order."""
    sql = EVENTS_SQL.replace("{db}", store.database)
    since = datetime(month.year, month.month, 1, tzinfo=UTC) - WARM_UP
    params: dict[str, Any] = {
        "since_us": (since - _EPOCH) // timedelta(microseconds=1),
        "month": month.isoformat(),
        "org": org,
        "after_user": "",
        "after_us": -(2**62),
        "after_event": "",
        "limit": chunk,
    }
    while True:
        _, rows = store.query(sql, params)
        if not rows:
            return
        events = [_stored(r) for r in rows]
        yield events
        if len(rows) < chunk:
            return
        last = events[-1]
        params.update(after_user=last.user_id, after_us=last.t_us, after_event=last.event_id)


def _subscriptions(store: Store, users: Sequence[str]) -> dict[str, Subscription]:
    _, rows = store.query(SUBSCRIPTIONS_SQL.replace("{db}", store.database), {"users": list(users)})
    return {str(r[0]): _subscription(r) for r in rows}


def replay(
    store: Store,
    replayers: Sequence[Replayer],
    month: date,
    org: str = "",
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream the stored events once and replay each user under every scenario."""
    pending: list[StoredEvent] = []
    for chunk in stored_events(store, month, org):
        users = sorted({e.user_id for e in chunk})
        subs = _subscriptions(store, users)
        # The last user of a chunk may continue in the next one: keep them for it.
        rows = pending + chunk
        tail_user = chunk[-1].user_id
        cut = len(rows)
        while cut > 0 and rows[cut - 1].user_id == tail_user:
            cut -= 1
        pending = rows[cut:]
        if len(chunk) < CHUNK_ROWS:
            cut, pending = len(rows), []
        _replay_rows(rows[:cut], subs, replayers, store, progress)
    if pending:
        _replay_rows(pending, {}, replayers, store, progress)


def _replay_rows(
    rows: Sequence[StoredEvent],
    subs: dict[str, Subscription],
    replayers: Sequence[Replayer],
    store: Store,
    progress: Callable[[int], None] | None,
) -> None:
    start = 0
    while start < len(rows):
        user = rows[start].user_id
        end = start
        while end < len(rows) and rows[end].user_id == user:
            end += 1
        if user not in subs:
            subs.update(_subscriptions(store, [user]))
        for replayer in replayers:
            replayer.replay_user(subs.get(user), rows[start:end])
        if progress is not None:
            progress(end - start)
        start = end


@dataclass
class WhatIfResult:
    """Per tier, the replay under the current and under the alternative scenario."""

    month: date
    org: str
    current: list[dict[str, Any]]
    alternative: list[dict[str, Any]]
    events: int = 0
    limits: str = LIMITS

    def tiers(self) -> list[str]:
        """Tiers in either scenario, current order first."""
        names = [r["tier"] for r in self.current]
        return names + [r["tier"] for r in self.alternative if r["tier"] not in names]

    def row(self, side: str, tier: str) -> dict[str, Any]:
        """The row of ``tier`` in ``side`` ('current' or 'alternative'), {} if absent."""
        rows = self.current if side == "current" else self.alternative
        return next((r for r in rows if r["tier"] == tier), {})


def _margin_pct(margin: int, revenue: int) -> Decimal | None:
    """``margin * 100 / revenue`` truncated toward zero to 4 places, as the P&L views do."""
    if revenue == 0:
        return None
    q = abs(margin) * 100 * 10**4 // abs(revenue)
    sign = -1 if (margin < 0) != (revenue < 0) else 1
    return Decimal(sign * q).scaleb(-4)


def tier_rows(
    replayer: Replayer, subscription: Mapping[str, tuple[Decimal, Decimal]]
) -> list[dict[str, Any]]:
    """Per-tier result rows of a replay, with subscription revenue per tier (subscribers, USD)."""
    names = set(replayer.tiers) | set(subscription)
    rows = []
    for tier in sorted(names, key=lambda t: (t not in _TIER_ORDER, _order(t), t)):
        totals = replayer.tiers.get(tier, TierTotals())
        subscribers, sub_revenue = subscription.get(tier, (Decimal(0), Decimal(0)))
        sub_units = int(sub_revenue.scaleb(MONEY_SCALE))
        revenue = sub_units + totals.overage_revenue + totals.credits_drawn
        margin = revenue - totals.inference_cost
        rows.append(
            {
                "tier": tier,
                "subscribers": subscribers,
                "subscription_revenue": sub_revenue,
                "overage_revenue": units_to_decimal(totals.overage_revenue),
                "credits_drawn": units_to_decimal(totals.credits_drawn),
                "revenue": units_to_decimal(revenue),
                "requests": totals.requests,
                "inference_cost": units_to_decimal(totals.inference_cost),
                "gross_margin": units_to_decimal(margin),
                "margin_pct": _margin_pct(margin, revenue),
                "users_alerted": len(totals.users_alerted),
                "users_blocked": len(totals.users_blocked),
                "users_downgraded": len(totals.users_downgraded),
                "users_overage": len(totals.users_overage),
                "requests_blocked": totals.requests_blocked,
                "requests_downgraded": totals.requests_downgraded,
                "alerts": totals.alerts,
                "enforcement_changes": totals.enforcement_changes,
                "heaviest_users": [
                    {"user_id": u, "inference_cost": units_to_decimal(c)}
                    for c, u in sorted(totals.heaviest, reverse=True)
                ],
            }
        )
    return rows


def _order(tier: str) -> int:
    return _TIER_ORDER.index(tier) if tier in _TIER_ORDER else len(_TIER_ORDER)


def subscription_revenue(
    store: Store, plans: PlanCatalog, month: date, org: str = ""
) -> dict[str, tuple[Decimal, Decimal]]:
    """Tier -> (prorated subscribers, subscription revenue) at ``plans``' monthly prices."""
    _, rows = store.query(
        SUBSCRIPTION_REVENUE_SQL.replace("{db}", store.database),
        {
            "month": month.isoformat(),
            "org": org,
            "p_id": [p.id for p in plans],
            "p_price": [format(p.monthly_price, "f") for p in plans],
        },
    )
    return {str(r[0]): (Decimal(r[1]), Decimal(r[2])) for r in rows}


def run_whatif(
    store: Store,
    current: Scenario,
    alternative: Scenario,
    *,
    month: date,
    org: str = "",
    progress: Callable[[int], None] | None = None,
) -> WhatIfResult:
    """Replay ``month`` (of ``org``) once, under both scenarios; ``progress`` gets event counts."""
    replayers = [Replayer(current, month), Replayer(alternative, month)]
    replay(store, replayers, month, org, progress)
    return WhatIfResult(
        month,
        org,
        tier_rows(replayers[0], subscription_revenue(store, current.plans, month, org)),
        tier_rows(replayers[1], subscription_revenue(store, alternative.plans, month, org)),
        events=replayers[0].events,
    )


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "margin_pct":
        return f"{Decimal(value):,.1f} %"
    if column == "subscribers":
        return f"{Decimal(value):,.2f}"
    if isinstance(value, Decimal):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _delta(column: str, a: Any, b: Any) -> str:
    if a is None or b is None:
        return ""
    diff = Decimal(b) - Decimal(a)
    if not diff:
        return "="
    sign = "+" if diff > 0 else ""
    if column == "margin_pct":
        return f"{sign}{diff:,.1f} pt"
    if isinstance(a, int) and isinstance(b, int):
        return f"{sign}{int(diff):,}"
    return f"{sign}{diff:,.2f}"


def render(result: WhatIfResult, console: Console) -> None:
    """One table per tier: metric, current, alternative, change (stored text printed literally)."""
    from spendstream.commands._safe import safe_text

    when = result.month.strftime("%Y-%m")
    who = f" - org {result.org}" if result.org else ""
    for tier in result.tiers():
        cur, alt = result.row("current", tier), result.row("alternative", tier)
        table = Table(
            title=safe_text(f"What-if {when}{who}: tier {tier or '(no plan)'}"),
            title_justify="left",
        )
        for name in ("metric", "current", "alternative", "change"):
            table.add_column(name, justify="left" if name == "metric" else "right")
        for col in COMPARED:
            a, b = cur.get(col), alt.get(col)
            table.add_row(col.replace("_", " "), _fmt(col, a), _fmt(col, b), _delta(col, a, b))
        heavy = [
            ", ".join(
                f"{h['user_id']} {h['inference_cost']:,.2f}" for h in r.get("heaviest_users", [])
            )
            for r in (cur, alt)
        ]
        table.add_row("heaviest users", safe_text(heavy[0]), safe_text(heavy[1]), "")
        console.print(table)
    console.print(safe_text(f"{result.events:,} stored events replayed. {result.limits}"))


def result_json(result: WhatIfResult) -> dict[str, Any]:
    """Plain data for ``--format json`` (money as decimal strings)."""

    def value(v: Any) -> Any:
        if isinstance(v, Decimal):
            return format(v.normalize(), "f") if v else "0"
        if isinstance(v, list):
            return [{k: value(x) for k, x in item.items()} for item in v]
        return v

    return {
        "month": result.month.isoformat()[:7],
        "org": result.org or None,
        "events_replayed": result.events,
        "limits": result.limits,
        "tiers": [
            {
                "tier": tier,
                "current": {k: value(v) for k, v in result.row("current", tier).items()},
                "alternative": {k: value(v) for k, v in result.row("alternative", tier).items()},
            }
            for tier in result.tiers()
        ],
    }
