"""Wire shapes of the records the pipeline itself produces (JSON via orjson, key = user_id).

Money travels as decimal strings (``"0.000123"``), never as JSON numbers, so no consumer can
read it as a float by accident. Timestamps are RFC 3339 UTC strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypedDict, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

from schemas._events import BoundedTime

MONEY_SCALE = 24
"""Decimal places kept for money everywhere (ClickHouse ``Decimal(38, 24)``).

The LiteLLM price map has per-token prices with up to 24 decimal places (float artefacts such as
``2.9999900000000002e-06`` are kept exactly as written); token counts are integers, so every cost,
list value and sum stays exact at this scale."""


class PricedEvent(TypedDict):
    """A validated, deduplicated, priced usage event (topic ``usage.priced``)."""

    event_id: str
    occurred_at: str
    org_id: str
    user_id: str
    api_key_id: str | None
    gateway: str
    request_id: str | None
    provider: str | None
    requested_model: str
    served_model: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cache_write_1h_tokens: int
    input_audio_tokens: int
    input_image_tokens: int
    output_audio_tokens: int
    output_image_tokens: int
    service_tier: str
    web_search_requests: int
    search_context_size: str | None
    semantic_cache_hit: bool
    status: str
    latency_ms: int | None
    feature: str | None
    attributes: dict[str, str]
    plan_id: str
    cost: str
    list_value: str
    saved_prompt_cache: str
    saved_semantic_cache: str
    saved_routing: str
    saved_service_tier: str
    unknown_model: bool
    price_approximated: bool
    late: bool
    window_start: str
    processed_at: str


class Rollup(TypedDict):
    """One (user, served model, tumbling window) aggregate (topic ``usage.rollups``).

    Re-emitted in full with a higher ``version`` whenever a late event changes it; stores keep
    the highest version (ReplacingMergeTree), so a correction replaces, never adds.

    ``segment`` is 0 for the window's main aggregate. An event that arrives after its window
    closed (window end + grace passed) and whose state was already evicted is emitted as its own
    segment (a stable hash of its event_id, version 1): the window's value is the sum of its
    segments, each kept at its highest version, so late events still count exactly once.
    """

    user_id: str
    org_id: str
    plan_id: str
    served_model: str
    window_start: str
    window_end: str
    segment: int
    requests: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    semantic_cache_hits: int
    cost: str
    list_value: str
    version: int
    updated_at: str


class DeadLetter(TypedDict):
    """A message that could not be processed, with why and where it came from (``usage.dlq``)."""

    source_topic: str
    source_partition: int
    source_offset: int
    key_b64: str | None
    payload_b64: str
    reason: str
    stage: str
    received_at: str


# What the cap engine emits (docs/DESIGN.md, "Caps, alerts and enforcement"). Alerts, overages
# and credit draws carry a deterministic id built from the user, the window instance and the
# threshold or event, so a store that sees a record twice (at-least-once delivery, a replay)
# keeps one; an enforcement record is the user's latest state, versioned.

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


ENFORCEMENT_STATES: frozenset[str] = frozenset(get_args(EnforcementStateName))


@dataclass(frozen=True, slots=True)
class DecodedEnforcement:
    """What a gateway reads of an :class:`EnforcementRecord`, checked field by field.

    Only the fields a decision needs are read (see :func:`decode_enforcement`); ``record`` is
    the whole record as published.
    """

    state: EnforcementStateName
    reason: str
    """The record's ``reason``; its ``state`` when the record gives none."""
    until: str | None
    window: str | None
    downgrade_to: str | None
    record: Mapping[str, Any]


def decode_enforcement(value: bytes) -> DecodedEnforcement:
    """Decode one message of the enforcement topic; ``ValueError`` for anything unusable.

    A reason the contract does not list yet is kept as written, so a gateway older than its
    workers still reads their records.
    """
    record = orjson.loads(value)
    if not isinstance(record, dict):
        raise ValueError("an enforcement record must be a JSON object")
    state = record.get("state")
    if state not in ENFORCEMENT_STATES:
        raise ValueError(f"unknown enforcement state {state!r}")
    reason, until, window, downgrade_to = (
        _optional_text(record, name) for name in ("reason", "until", "window", "downgrade_to")
    )
    return DecodedEnforcement(state, reason or state, until, window, downgrade_to, record)


def _optional_text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"bad enforcement record: {name} must be a string or null, got {value!r}")
    return value


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


PlanId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PlanPeriod(BaseModel):
    """From ``effective_at`` (event time) on, the user is on ``plan_id``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: PlanId
    effective_at: BoundedTime


MAX_CREDIT_GRANTS = 10_000
"""Grants one subscription record may list (the record is the user's whole credit history)."""


class CreditGrant(BaseModel):
    """Prepaid credit bought by (or granted to) a user: drawn before overage is billed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    credit_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="Unique per user; a grant is applied once, however often it is re-published."
    )
    amount_usd: Decimal = Field(
        gt=0,
        le=Decimal(10) ** 12,
        decimal_places=MONEY_SCALE,
        description="USD added to the wallet; a decimal string on the wire.",
    )
    granted_at: BoundedTime = Field(description="When it was bought (for accounting).")

    @field_serializer("amount_usd")
    def _money_as_string(self, value: Decimal) -> str:
        return format(value, "f")


class Subscription(BaseModel):
    """Which plan a user is on, since when (topic ``usage.subscriptions``, compacted, key = user).

    The record carries the user's whole plan schedule so that compaction, which keeps only the
    latest record per user, never loses the plan an older (late) event must be charged under.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    org_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    timezone: str = Field(default="UTC", description="IANA zone of the billing anchor.")
    billing_anchor: BoundedTime = Field(
        description="Subscription start: anchors billing months (from 2000 up to 2100)."
    )
    plans: list[PlanPeriod] = Field(min_length=1, max_length=100)
    credits: list[CreditGrant] = Field(
        default_factory=list,
        max_length=MAX_CREDIT_GRANTS,
        description="Prepaid credit grants, append-only: the worker applies each new one once.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _sorted(self) -> Subscription:
        times = [p.effective_at for p in self.plans]
        if times != sorted(times):
            raise ValueError("plans must be ordered by effective_at")
        ids = [c.credit_id for c in self.credits]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"credit_id {dup!r} is listed twice")
        return self

    def with_credit(self, grant: CreditGrant) -> Subscription:
        """This record with ``grant`` appended (unchanged if its ``credit_id`` is listed)."""
        if any(c.credit_id == grant.credit_id for c in self.credits):
            return self
        return Subscription.model_validate({**self.model_dump(), "credits": [*self.credits, grant]})

    def plan_at(self, when: datetime) -> str:
        """The plan in force at event time ``when`` (the first plan before the schedule starts)."""
        plans = self.plans
        if len(plans) == 1:  # most users: no schedule to search (this runs once per event)
            return plans[0].plan_id
        current = plans[0].plan_id
        for period in plans:
            if period.effective_at <= when:
                current = period.plan_id
            else:
                break
        return current
