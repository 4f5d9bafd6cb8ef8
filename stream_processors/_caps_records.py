"""Wire shapes of what the cap engine emits (JSON via orjson, Kafka key = user_id).

Money and metered quantities travel as decimal strings (``"0.000123"``, ``"15000"``), never as
JSON numbers; times are RFC 3339 UTC strings. Every record carries a deterministic id built from
the user, the window instance and the threshold or event, so a sink that sees a record twice
(at-least-once delivery, a replay after a restart) can drop the copy.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypedDict

EnforcementStateName = Literal["ok", "warn", "downgrade", "blocked"]
EnforcementReason = Literal["ok", "threshold", "cap", "overage", "ceiling"]


class AlertRecord(TypedDict):
    """A threshold crossing or a break-even (topic ``usage.alerts``).

    ``alert_id = f"{user_id}|{window_id}|{threshold}"``: once per (user, window instance,
    threshold). ``window_id = f"{window}@{instance start}"``; for a rolling window the instance is
    the epoch-aligned block of ``hours`` hours the crossing was detected in, and
    ``window_start``/``window_end`` are the bounds of the rolling sum that crossed. A break-even
    alert has ``kind = "break_even"``, ``window = "<plan>.break_even"``, ``threshold = 100``, the
    billing month's inference cost as ``usage`` and the plan's monthly price as ``limit``.
    """

    alert_id: str
    kind: Literal["threshold", "break_even"]
    user_id: str
    org_id: str
    plan_id: str
    window: str
    window_id: str
    window_kind: str
    unit: str
    threshold: int
    usage: str
    limit: str
    window_start: str
    window_end: str
    event_id: str
    event_time: str
    detected_at: str


class EnforcementRecord(TypedDict):
    """The latest enforcement state of a user (topic ``usage.enforcement``, compacted).

    ``state`` is the most severe over the windows of the user's current plan (ties: the one that
    lasts longest); ``window``, ``usage``, ``limit``, ``remaining`` (allowance left, never
    negative) and ``until`` describe the window that decided it. ``until`` is the window
    instance's end, or for a rolling window the first moment its usage drops back below the
    level that triggered the state (assuming no further usage); ``None`` when ``ok``.
    ``version`` increases by one with every record of the user, for last-write-wins stores.
    """

    user_id: str
    org_id: str
    plan_id: str
    state: EnforcementStateName
    reason: EnforcementReason
    window: str | None
    window_id: str | None
    unit: str | None
    usage: str | None
    limit: str | None
    remaining: str | None
    until: str | None
    downgrade_to: str | None
    as_of: str
    version: int
    updated_at: str


class OverageRecord(TypedDict):
    """Billable usage beyond an allowance, per event (topic ``usage.overages``).

    ``overage_id = f"{event_id}|{window_id}"``. ``quantity`` is the part of the event beyond the
    allowance that credits did not cover, in ``unit``; ``value`` is its price before the ceiling
    and ``amount`` what is billed (``value`` less whatever the ceiling waived). Billing sums
    ``amount``. Prices are exact: ``value`` is the increase of ``floor(cumulative overage *
    unit_price)`` at MONEY_SCALE, so per-event values add up to the exact price of the sum.
    """

    overage_id: str
    user_id: str
    org_id: str
    plan_id: str
    window: str
    window_id: str
    window_start: str
    window_end: str
    unit: str
    event_id: str
    event_time: str
    quantity: str
    unit_price: str
    value: str
    amount: str
    ceiling_usd: str | None
    detected_at: str


class CreditDrawRecord(TypedDict):
    """Prepaid credit drawn to cover overage, per event (topic ``usage.overages``).

    ``draw_id = f"{event_id}|{window_id}|credit"``. ``quantity`` (in ``unit``) is the part of the
    event's overage the credits covered, ``amount`` the USD drawn, ``balance_after`` the wallet
    after the draw. Per window instance, the sum of credit ``quantity`` plus overage ``quantity``
    equals the usage beyond the allowance, exactly.
    """

    draw_id: str
    user_id: str
    org_id: str
    plan_id: str
    window: str
    window_id: str
    unit: str
    event_id: str
    event_time: str
    quantity: str
    amount: str
    balance_after: str
    detected_at: str


class LateUsage(NamedTuple):
    """An event that arrived after one of its windows closed (plus grace): not counted there."""

    event_id: str
    window: str
    occurred_at: str


class RejectedEvent(NamedTuple):
    """An event the cap engine could not apply (unknown plan, bad money...), with the reason."""

    event_id: str
    reason: str
