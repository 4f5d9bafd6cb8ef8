"""What goes into the cap engine and what comes out of it.

A :class:`CapEvent` goes in; :class:`Effects` come out: the records to publish (their shapes are
part of the contract, in :mod:`schemas`: alerts, enforcement, overages, credit draws), plus the
events that were too late for a window or could not be applied at all. :class:`WindowUsage` is
the engine's read-only view of a window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from schemas import AlertRecord, CreditDrawRecord, EnforcementRecord, OverageRecord

__all__ = ["CapEvent", "Effects", "LateUsage", "RejectedEvent", "WindowUsage"]


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
    reservation_id: str | None = None
    """The admission reservation this event's call was admitted under, if any: applying the
    event settles it (releases its hold; the event's own cost counts instead)."""

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


class LateUsage(NamedTuple):
    """An event that arrived after one of its windows closed (plus grace): not counted there."""

    event_id: str
    window: str
    occurred_at: str


class RejectedEvent(NamedTuple):
    """An event the cap engine could not apply (unknown plan, bad money...), with the reason."""

    event_id: str
    reason: str


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
