"""Overage billing and prepaid credits (docs/DESIGN.md, "Overage and credits").

In the plan's overage window, the part of an event beyond the allowance is priced as the increase
of ``floor(cumulative_overage * unit_price)`` at MONEY_SCALE (exact, and the per-event values add
up to the price of the total). Credits (the user's wallet) pay that value first; what they cannot
cover is billed, up to ``ceiling_usd`` per instance. When credits run out in the middle of an
event, its quantity is split in proportion to the money (floored); credit quantity + billed
quantity always equals the quantity beyond the allowance.
"""

from __future__ import annotations

from decimal import Decimal

from schemas import CreditDrawRecord, OverageRecord
from stream_processors._money import decimal_to_units, units_to_str
from stream_processors._time import rfc3339, rfc3339_dt
from stream_processors.caps.effects import CapEvent, Effects
from stream_processors.caps.rules import WindowRule, amount_text
from stream_processors.caps.state import MAX_TOPUP_IDS, UserCapState, WindowInstance

__all__ = ["add_credit", "bill_overage"]


def add_credit(state: UserCapState, credit_id: str, amount: Decimal) -> bool:
    """Add ``amount`` USD to the user's wallet once per ``credit_id``; False if already added."""
    if credit_id in state.topups:
        return False
    state.wallet += decimal_to_units(amount)
    state.topups.append(credit_id)
    del state.topups[:-MAX_TOPUP_IDS]
    return True


def bill_overage(
    state: UserCapState,
    rule: WindowRule,
    inst: WindowInstance,
    before: int,
    after: int,
    event: CapEvent,
    detected: str,
    out: Effects,
) -> None:
    """Price the part of an event that took the instance's usage from ``before`` to ``after``
    beyond the allowance: draw credit first, bill the rest up to the ceiling."""
    over_before = max(0, before - rule.allowance)
    over_after = after - rule.allowance
    quantity = over_after - over_before
    num, den = rule.price_numerator, rule.price_denominator
    value = over_after * num // den - over_before * num // den
    drawn = credited = 0
    if state.wallet > 0 and value > 0:
        drawn = min(state.wallet, value)
        credited = quantity if drawn == value else quantity * drawn // value
        state.wallet -= drawn
    billed_quantity = quantity - credited
    billed_value = value - drawn
    amount = billed_value
    if rule.ceiling is not None:
        amount = max(0, min(billed_value, rule.ceiling - inst.billed))
    inst.billed += amount
    window_id = f"{rule.key}@{rfc3339(inst.start)}"
    event_time = rfc3339_dt(event.occurred_at)
    if credited or drawn:
        out.credit_draws.append(
            CreditDrawRecord(
                draw_id=f"{event.event_id}|{window_id}|credit",
                user_id=state.user_id,
                org_id=state.org_id,
                plan_id=rule.plan_id,
                window=rule.key,
                window_id=window_id,
                unit=rule.unit,
                event_id=event.event_id,
                event_time=event_time,
                quantity=amount_text(credited, rule.in_usd),
                amount=units_to_str(drawn),
                balance_after=units_to_str(state.wallet),
                detected_at=detected,
            )
        )
    if billed_quantity:
        out.overages.append(
            OverageRecord(
                overage_id=f"{event.event_id}|{window_id}",
                user_id=state.user_id,
                org_id=state.org_id,
                plan_id=rule.plan_id,
                window=rule.key,
                window_id=window_id,
                window_start=rfc3339(inst.start),
                window_end=rfc3339(inst.end),
                unit=rule.unit,
                event_id=event.event_id,
                event_time=event_time,
                quantity=amount_text(billed_quantity, rule.in_usd),
                unit_price=format(rule.unit_price, "f") if rule.unit_price is not None else "0",
                value=units_to_str(billed_value),
                amount=units_to_str(amount),
                ceiling_usd=units_to_str(rule.ceiling) if rule.ceiling is not None else None,
                detected_at=detected,
            )
        )
