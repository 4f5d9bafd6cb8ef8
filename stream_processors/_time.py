"""Event-time arithmetic and RFC 3339 formatting, shared by the processor and the cap engine.

Pure and exact: instants are integers (seconds or microseconds since the Unix epoch, UTC)
computed from ``datetime`` arithmetic, never from a float timestamp. See docs/DESIGN.md, "Event
time and lateness".
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MICROS_PER_SECOND = 1_000_000


def epoch_s(when: datetime) -> int:
    """Whole seconds since the epoch (floored), exact integer arithmetic (no float timestamp)."""
    if when.tzinfo is None:
        raise ValueError(f"event time must be timezone-aware, got {when!r}")
    return (when - EPOCH) // SECOND


def to_micros(when: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact, no float)."""
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds


# One cache of whole-second stamps for both formatters: window bounds, "as of" times and the
# batch's clock repeat across the users and events of a batch and between batches, and the
# formatting was a fifth of the processor's time before it was cached.
_RFC3339: dict[int, str] = {}
_RFC3339_MAX = 65_536


def rfc3339(seconds: int) -> str:
    """RFC 3339 UTC of whole epoch seconds, e.g. ``2025-01-31T09:00:00Z``."""
    text = _RFC3339.get(seconds)
    if text is None:
        if len(_RFC3339) >= _RFC3339_MAX:
            _RFC3339.clear()
        text = _RFC3339[seconds] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    return text


def micros_to_iso(micros: int) -> str:
    """RFC 3339 UTC of epoch microseconds; the fraction is written only when not zero."""
    seconds, us = divmod(micros, MICROS_PER_SECOND)
    stamp = rfc3339(seconds)
    return f"{stamp[:-1]}.{us:06d}Z" if us else stamp


_last_dt: list[tuple[datetime, str]] = []


def rfc3339_dt(when: datetime) -> str:
    """RFC 3339 UTC of an aware datetime, microseconds kept when present."""
    # The batch's detection time is formatted for every user of the batch: remember the last.
    last = _last_dt[0] if _last_dt else None
    if last is not None and last[0] is when:
        return last[1]
    text = when.astimezone(UTC).isoformat().removesuffix("+00:00") + "Z"
    _last_dt[:] = [(when, text)]
    return text
