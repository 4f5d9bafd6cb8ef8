"""What the cap engine reports besides its records: late and rejected events.

The records it emits (alerts, enforcement, overages, credit draws) are part of the contract:
their shapes are in :mod:`schemas` (``schemas/_records.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from schemas import (
    AlertRecord,
    CreditDrawRecord,
    EnforcementReason,
    EnforcementRecord,
    EnforcementStateName,
    OverageRecord,
)

__all__ = [
    "AlertRecord",
    "CreditDrawRecord",
    "EnforcementReason",
    "EnforcementRecord",
    "EnforcementStateName",
    "LateUsage",
    "OverageRecord",
    "RejectedEvent",
]


class LateUsage(NamedTuple):
    """An event that arrived after one of its windows closed (plus grace): not counted there."""

    event_id: str
    window: str
    occurred_at: str


class RejectedEvent(NamedTuple):
    """An event the cap engine could not apply (unknown plan, bad money...), with the reason."""

    event_id: str
    reason: str
