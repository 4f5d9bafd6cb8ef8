"""Time formatting helpers of the cap engine: the cached paths give what the formatter gives."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from stream_processors import _time as _caps_util
from stream_processors._time import rfc3339, rfc3339_dt

_instants = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(st.lists(st.integers(0, 7_000_000_000), max_size=20))
def test_rfc3339_cached_or_not_is_strftime(seconds: list[int]) -> None:
    for s in seconds + seconds:  # the second pass reads the cache
        assert rfc3339(s) == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s))


def test_rfc3339_cache_is_bounded() -> None:
    _caps_util._RFC3339.clear()
    for s in range(_caps_util._RFC3339_MAX + 10):
        rfc3339(s)
    assert len(_caps_util._RFC3339) <= _caps_util._RFC3339_MAX
    assert rfc3339(0) == "1970-01-01T00:00:00Z"


@given(st.lists(_instants, min_size=1, max_size=10), st.integers(-12, 12))
def test_rfc3339_dt_of_each_instant_whatever_came_before(
    instants: list[datetime], hours: int
) -> None:
    zone = timezone(timedelta(hours=hours))
    for when in instants:
        local = when.astimezone(zone)  # the same instant, another object and offset
        expected = when.isoformat().removesuffix("+00:00") + "Z"
        assert rfc3339_dt(when) == expected
        assert rfc3339_dt(when) == expected  # the remembered one
        assert rfc3339_dt(local) == expected
        later = when + timedelta(microseconds=1)
        assert rfc3339_dt(later) == later.isoformat().removesuffix("+00:00") + "Z"
