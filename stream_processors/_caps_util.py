"""Exact money units and window-instance arithmetic for the cap engine (pure, no I/O).

Times are whole seconds since the Unix epoch (UTC). Every window boundary is a whole second
(local midnights, the billing anchor truncated to the second, bucket edges), so an event at
``t`` (sub-second precision) lies in ``[start, end)`` exactly when ``floor(t)`` does: flooring
event times to the second loses nothing.

USD amounts are integers of ``10**-MONEY_SCALE`` USD ("units"), tokens and requests plain
integers, so every sum and comparison is exact integer arithmetic with no decimal context to get
wrong (Python's default context keeps 28 significant digits; a sum of 24-place costs exceeds it).
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from stream_processors._money import SCALE, as_fraction, units_from_str
from stream_processors._money import decimal_to_units as to_units
from stream_processors._time import EPOCH, SECOND, epoch_s, rfc3339, rfc3339_dt

__all__ = [
    "EPOCH",
    "SCALE",
    "SECOND",
    "billing_month_bounds",
    "day_bounds",
    "epoch_s",
    "ratio",
    "rfc3339",
    "rfc3339_dt",
    "to_units",
    "units_from_str",
    "week_bounds",
]

ratio = as_fraction


def _local_epoch(day: date, seconds_of_day: int, zone: ZoneInfo) -> int:
    # fold=0: a wall time skipped by a DST jump maps to the instant the jump happens at, an
    # ambiguous one to its first occurrence (PEP 495) - deterministic either way.
    hours, rest = divmod(seconds_of_day, 3600)
    local = datetime(day.year, day.month, day.day, hours, rest // 60, rest % 60, tzinfo=zone)
    return (local - EPOCH) // SECOND


def _local_date(seconds: int, zone: ZoneInfo) -> date:
    return (EPOCH + timedelta(seconds=seconds)).astimezone(zone).date()


def day_bounds(seconds: int, zone: ZoneInfo) -> tuple[int, int]:
    """The local calendar day containing ``seconds``: ``[midnight, next midnight)``."""
    day = _local_date(seconds, zone)
    return _local_epoch(day, 0, zone), _local_epoch(day + timedelta(days=1), 0, zone)


def week_bounds(seconds: int, zone: ZoneInfo) -> tuple[int, int]:
    """The local ISO week containing ``seconds``: Monday 00:00 to the next Monday 00:00."""
    day = _local_date(seconds, zone)
    monday = day - timedelta(days=day.weekday())
    return _local_epoch(monday, 0, zone), _local_epoch(monday + timedelta(days=7), 0, zone)


def _month_start(year: int, month: int, anchor_day: int, anchor_tod: int, zone: ZoneInfo) -> int:
    # Clamp to the month's last day: an anchor on the 31st starts February's period on the
    # 28th (29th in leap years) and March's on the 31st again (the anchor day is not lost).
    last = calendar.monthrange(year, month)[1]
    return _local_epoch(date(year, month, min(anchor_day, last)), anchor_tod, zone)


def _shift(year: int, month: int, delta: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + delta
    return index // 12, index % 12 + 1


def billing_month_bounds(seconds: int, anchor: datetime, zone: ZoneInfo) -> tuple[int, int]:
    """The billing month containing ``seconds``.

    Periods start every month on the anchor's local day at the anchor's local wall time
    (truncated to the second), the day clamped to the month's length.
    """
    local_anchor = anchor.astimezone(zone)
    anchor_day = local_anchor.day
    anchor_tod = local_anchor.hour * 3600 + local_anchor.minute * 60 + local_anchor.second
    day = _local_date(seconds, zone)
    year, month = day.year, day.month
    start = _month_start(year, month, anchor_day, anchor_tod, zone)
    if seconds < start:
        year, month = _shift(year, month, -1)
        start = _month_start(year, month, anchor_day, anchor_tod, zone)
    next_year, next_month = _shift(year, month, 1)
    return start, _month_start(next_year, next_month, anchor_day, anchor_tod, zone)
