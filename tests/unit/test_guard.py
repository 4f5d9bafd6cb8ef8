"""CapGuard decisions from enforcement records, fed through its apply path (no broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from producers import CapGuard, Decision

pytestmark = pytest.mark.unit

UNTIL = "2026-12-01T00:00:00Z"
UNTIL_S = 1_796_083_200.0  # 2026-12-01T00:00:00Z
BEFORE, AFTER = UNTIL_S - 1, UNTIL_S


def record(state: str, reason: str, until: str | None = UNTIL, **kw: Any) -> bytes:
    base: dict[str, Any] = {
        "user_id": "u1",
        "org_id": "o",
        "plan_id": "pro",
        "state": state,
        "reason": reason,
        "window": None if state == "ok" else "pro.monthly",
        "window_id": None,
        "unit": "usd",
        "usage": "30",
        "limit": "30",
        "remaining": "0",
        "until": until,
        "downgrade_to": None,
        "as_of": "2026-11-20T10:00:00Z",
        "version": 3,
        "updated_at": "2026-11-20T10:00:01Z",
    }
    return orjson.dumps({**base, **kw})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def guard(now: float = BEFORE) -> tuple[CapGuard, Clock]:
    clock = Clock(now)
    return CapGuard(config={"bootstrap.servers": "127.0.0.1:1"}, topic="t", clock=clock), clock


# (name, record bytes, clock, expected action, reason, model)
CASES = [
    ("ok", record("ok", "ok", until=None), BEFORE, "allow", "ok", None),
    ("warn at a threshold", record("warn", "threshold"), BEFORE, "allow", "threshold", None),
    ("warn in overage", record("warn", "overage"), BEFORE, "allow", "overage", None),
    (
        "downgrade",
        record("downgrade", "cap", downgrade_to="gpt-4o-mini"),
        BEFORE,
        "downgrade",
        "cap",
        "gpt-4o-mini",
    ),
    ("blocked at the cap", record("blocked", "cap"), BEFORE, "block", "cap", None),
    ("blocked at the ceiling", record("blocked", "ceiling"), BEFORE, "block", "ceiling", None),
    ("blocked, until passed", record("blocked", "cap"), AFTER, "allow", "expired", None),
    (
        "downgrade, until passed",
        record("downgrade", "cap", downgrade_to="m"),
        AFTER + 3600,
        "allow",
        "expired",
        None,
    ),
    ("blocked without until", record("blocked", "cap", until=None), AFTER, "block", "cap", None),
    (
        "downgrade without a model blocks",
        record("downgrade", "cap"),
        BEFORE,
        "block",
        "downgrade_without_model",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "now", "action", "reason", "model"), CASES, ids=[c[0] for c in CASES]
)
def test_decisions(
    name: str, value: bytes, now: float, action: str, reason: str, model: str | None
) -> None:
    g, _ = guard(now)
    g.apply("u1", value)
    decision = g.check("u1")
    assert (decision.action, decision.reason, decision.model) == (action, reason, model)
    assert decision.record is not None and decision.record["user_id"] == "u1"
    assert decision.allowed == (action != "block")


def test_unknown_user_is_allowed() -> None:
    g, _ = guard()
    assert g.check("nobody") == Decision("allow", "unknown")
    assert g.record("nobody") is None


def test_until_is_parsed_exactly_and_expiry_follows_the_clock() -> None:
    g, clock = guard(BEFORE)
    g.apply("u1", record("blocked", "cap"))
    d = g.check("u1")
    assert d.until == UNTIL_S and d.window == "pro.monthly" and d.state == "blocked"
    clock.now = AFTER
    assert g.check("u1").action == "allow"


def test_latest_record_wins_and_tombstone_forgets() -> None:
    g, _ = guard()
    g.apply("u1", record("blocked", "cap"))
    g.apply("u1", record("ok", "ok", until=None, version=4))
    assert g.check("u1").action == "allow"
    assert g.record("u1") is not None and g.record("u1")["version"] == 4  # type: ignore[index]
    g.apply("u1", None)
    assert g.check("u1").reason == "unknown" and len(g) == 0


@pytest.mark.parametrize(
    "bad", [b"not json", b"[1, 2]", record("exploded", "cap")], ids=["json", "array", "state"]
)
def test_undecodable_records_are_counted_and_keep_the_previous_state(bad: bytes) -> None:
    g, _ = guard()
    g.apply("u1", record("blocked", "cap"))
    g.apply("u1", bad)
    assert g.rejected == 1
    assert g.check("u1").action == "block"


def test_check_takes_microseconds() -> None:
    g, _ = guard()
    for i in range(10_000):
        g.apply(f"u{i}", record("blocked" if i % 2 else "ok", "cap", user_id=f"u{i}"))
    check = g.check
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        check("u1234")
    per_call = (time.perf_counter() - start) / n
    assert per_call < 20e-6, f"{per_call * 1e6:.2f} µs per check"


def test_needs_settings_or_config_and_topic() -> None:
    with pytest.raises(ValueError, match="settings"):
        CapGuard(config={"bootstrap.servers": "x"})


def test_staleness_is_unknown_before_the_first_poll() -> None:
    g, _ = guard()
    assert g.staleness_s() is None and g.last_update_age_s() is None
    g.apply("u1", record("ok", "ok", until=None))
    age = g.last_update_age_s()
    assert age is not None and age >= 0


def test_works_from_async_code() -> None:
    async def main() -> str:
        g, _ = guard()
        g.apply("u1", record("blocked", "cap"))
        return g.check("u1").action  # a plain call: no await, no I/O

    assert asyncio.run(main()) == "block"
