"""Threshold and break-even alerts (docs/DESIGN.md, "Alerts").

For a fixed window, threshold ``p`` fires once per (user, instance, ``p``) when the instance's
usage reaches ``p`` % of the allowance (``usage * 100 >= p * allowance``). For a rolling window,
it fires once per (user, block, ``p``) where blocks are the epoch-aligned spans of ``N`` hours: it
fires for block ``b`` if, at the bucket of some event in ``b``, the rolling usage over *all*
events counted reaches ``p`` %. Both definitions depend only on the set of events counted, never
on their order or batching (the engine re-checks the buckets a late event raises), and the fired
set is part of the state, so a restart never fires again. Break-even: once per billing month
when the user's inference cost in it exceeds the monthly price of the plan in force (plans
priced 0 have no break-even).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from schemas import AlertRecord, Subscription
from stream_processors._money import units_to_str
from stream_processors._time import rfc3339, rfc3339_dt
from stream_processors.caps.effects import CapEvent, Effects, LateUsage
from stream_processors.caps.rules import PlanRules, WindowRule, amount_text
from stream_processors.caps.state import RollingState, UserCapState, WindowInstance
from stream_processors.caps.windows import billing_month_bounds

__all__ = [
    "BREAK_EVEN_BIT",
    "count_break_even",
    "fire_instance_thresholds",
    "fire_rolling_thresholds",
    "threshold_alert",
]

BREAK_EVEN_BIT = 1 << 100
"""The fired mask of a billing month whose break-even alert fired (bit 100: 100 %)."""


def fire_instance_thresholds(
    state: UserCapState,
    rule: WindowRule,
    inst: WindowInstance,
    usage: int,
    event: CapEvent,
    detected: str,
    out: Effects,
) -> None:
    """Fire the thresholds of a fixed window's instance that ``usage`` reaches, once each."""
    fired = inst.fired
    for percent, level in rule.threshold_levels:
        if usage < level:
            break
        if not fired >> percent & 1:
            fired |= 1 << percent
            out.alerts.append(
                threshold_alert(
                    state, rule, inst.start, inst.start, inst.end, percent, usage, event, detected
                )
            )
    inst.fired = fired


def fire_rolling_thresholds(
    state: UserCapState,
    window: RollingState,
    rule: WindowRule,
    bucket: int,
    total: int,
    event: CapEvent,
    detected: str,
    out: Effects,
) -> None:
    """Fire the thresholds the rolling usage ``total`` at ``bucket`` reaches, once per block."""
    block = bucket * rule.bucket_s // rule.span_s
    fired = window.fired.get(block, 0)
    new = fired
    for percent, level in rule.threshold_levels:
        if total < level:
            break
        if not new >> percent & 1:
            new |= 1 << percent
            out.alerts.append(
                threshold_alert(
                    state,
                    rule,
                    block * rule.span_s,
                    (bucket - rule.bucket_count + 1) * rule.bucket_s,
                    (bucket + 1) * rule.bucket_s,
                    percent,
                    total,
                    event,
                    detected,
                )
            )
    if new != fired:
        window.fired[block] = new


def threshold_alert(
    state: UserCapState,
    rule: WindowRule,
    instance_start: int,
    start: int,
    end: int,
    percent: int,
    usage: int,
    event: CapEvent,
    detected: str,
) -> AlertRecord:
    """The alert record of a threshold crossing.

    ``instance_start`` names the window instance (a rolling window's block); ``start`` and
    ``end`` bound the usage that crossed.
    """
    window_id = f"{rule.key}@{rfc3339(instance_start)}"
    return AlertRecord(
        alert_id=f"{state.user_id}|{window_id}|{percent}",
        kind="threshold",
        user_id=state.user_id,
        org_id=state.org_id,
        plan_id=rule.plan_id,
        window=rule.key,
        window_id=window_id,
        window_kind=rule.kind,
        unit=rule.unit,
        threshold=percent,
        usage=amount_text(usage, rule.in_usd),
        limit=amount_text(rule.allowance, rule.in_usd),
        window_start=rfc3339(start),
        window_end=rfc3339(end),
        event_id=event.event_id,
        event_time=rfc3339_dt(event.occurred_at),
        detected_at=detected,
    )


def count_break_even(
    state: UserCapState,
    sub: Subscription,
    plan: PlanRules,
    event: CapEvent,
    t: int,
    cost: int,
    zone: ZoneInfo,
    grace_s: int,
    detected: str,
    out: Effects,
) -> None:
    """Add ``cost`` to the billing month at ``t``; alert once when it exceeds the plan's price."""
    months = state.months
    horizon = state.watermark - grace_s
    months.evict(horizon)
    inst = months.find(t)
    if inst is None:
        start, end = billing_month_bounds(t, sub.billing_anchor, zone)
        if end <= horizon:
            out.late.append(LateUsage(event.event_id, "break_even", rfc3339_dt(event.occurred_at)))
            return
        inst = WindowInstance(start, end)
        months.add(inst)
    inst.usage += cost
    if inst.usage > plan.monthly_price and not inst.fired:
        inst.fired = BREAK_EVEN_BIT
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
                usage=units_to_str(inst.usage),
                limit=units_to_str(plan.monthly_price),
                window_start=rfc3339(inst.start),
                window_end=rfc3339(inst.end),
                event_id=event.event_id,
                event_time=rfc3339_dt(event.occurred_at),
                detected_at=detected,
            )
        )
