"""Window kinds and their bounds in the subscriber's time zone; rolling-window buckets.

See docs/DESIGN.md, "Plans". Times are whole seconds since the Unix epoch (UTC). Every window
boundary is a whole second (local midnights, the billing anchor truncated to the second, bucket
edges), so an event at ``t`` (sub-second precision) lies in ``[start, end)`` exactly when
``floor(t)`` does: flooring event times to the second loses nothing.

*Fixed windows.* ``billing_month`` instances start at the subscription's ``billing_anchor`` local
wall time in its time zone, every month on the anchor's day clamped to the month's length (anchor
Jan 31 -> Feb 28/29 -> Mar 31); ``calendar_day`` at local midnight; ``week`` on local Monday 00:00
(ISO).

*Rolling windows.* A rolling window of ``N`` hours with buckets of ``B`` seconds (``M = N*3600/B``
buckets) puts an event at ``t`` in bucket ``t // B``; the rolling usage at time ``t`` is the exact
sum of all events in buckets ``t//B - M + 1 .. t//B``, i.e. over ``((t//B + 1)*B - N, (t//B +
1)*B)``: the window ``(t - N, t]`` with both ends rounded up to a bucket edge. "Exact" means
exactly this sum over the events, with no approximation beyond that rounding of the edges - a
brute force over the events with the same bucketing gives the same number.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas import Subscription
from stream_processors._time import EPOCH, SECOND
from stream_processors.caps.state import RollingState

__all__ = [
    "billing_month_bounds",
    "day_bounds",
    "instance_bounds",
    "rolling_sum",
    "week_bounds",
]


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


def _shift_month(year: int, month: int, delta: int) -> tuple[int, int]:
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
        year, month = _shift_month(year, month, -1)
        start = _month_start(year, month, anchor_day, anchor_tod, zone)
    next_year, next_month = _shift_month(year, month, 1)
    return start, _month_start(next_year, next_month, anchor_day, anchor_tod, zone)


def instance_bounds(kind: str, seconds: int, sub: Subscription, zone: ZoneInfo) -> tuple[int, int]:
    """The instance ``[start, end)`` of a fixed window of ``kind`` that contains ``seconds``."""
    if kind == "calendar_day":
        return day_bounds(seconds, zone)
    if kind == "week":
        return week_bounds(seconds, zone)
    return billing_month_bounds(seconds, sub.billing_anchor, zone)


def rolling_sum(window: RollingState, bucket: int, bucket_count: int) -> int:
    """Sum of buckets ``(bucket - bucket_count, bucket]``, by whichever is shorter: the range or
    the map of held buckets."""
    buckets = window.buckets
    if len(buckets) <= bucket_count:
        lo = bucket - bucket_count
        return sum(v for j, v in buckets.items() if lo < j <= bucket)
    get = buckets.get
    return sum(get(j, 0) for j in range(bucket - bucket_count + 1, bucket + 1))
