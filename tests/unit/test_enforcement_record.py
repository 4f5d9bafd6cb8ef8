"""Enforcement records read through their contract (schemas.decode_enforcement), no broker."""

from __future__ import annotations

from typing import Any, get_args

import orjson
import pytest

from producers import CapGuard
from schemas import (
    ENFORCEMENT_STATES,
    EnforcementRecord,
    EnforcementStateName,
    decode_enforcement,
)

pytestmark = pytest.mark.unit

RECORD: EnforcementRecord = {
    "user_id": "u1",
    "org_id": "o",
    "plan_id": "pro",
    "state": "downgrade",
    "reason": "cap",
    "window": "pro.monthly",
    "window_id": "pro.monthly@2026-11-01T00:00:00Z",
    "unit": "usd",
    "usage": "30",
    "limit": "30",
    "remaining": "0",
    "until": "2026-12-01T00:00:00Z",
    "downgrade_to": "gpt-4o-mini",
    "as_of": "2026-11-20T10:00:00Z",
    "version": 3,
    "updated_at": "2026-11-20T10:00:01Z",
}


def encoded(**changes: Any) -> bytes:
    return orjson.dumps({**RECORD, **changes})


def test_a_record_as_the_worker_writes_it_decodes_field_by_field() -> None:
    decoded = decode_enforcement(orjson.dumps(RECORD))
    assert (decoded.state, decoded.reason, decoded.until, decoded.window) == (
        "downgrade",
        "cap",
        "2026-12-01T00:00:00Z",
        "pro.monthly",
    )
    assert decoded.downgrade_to == "gpt-4o-mini"
    assert decoded.record == RECORD


def test_the_states_are_the_contracts() -> None:
    assert frozenset(get_args(EnforcementStateName)) == ENFORCEMENT_STATES


def test_a_record_without_a_reason_gives_its_state_as_the_reason() -> None:
    assert decode_enforcement(encoded(reason=None)).reason == "downgrade"
    record = dict(RECORD)
    del record["reason"]  # type: ignore[misc]
    assert decode_enforcement(orjson.dumps(record)).reason == "downgrade"


def test_a_reason_the_contract_does_not_list_yet_is_kept() -> None:
    assert decode_enforcement(encoded(reason="budget")).reason == "budget"


def test_fields_a_decision_does_not_need_may_be_missing() -> None:
    decoded = decode_enforcement(orjson.dumps({"state": "ok"}))
    assert (decoded.state, decoded.reason, decoded.until, decoded.window) == (
        "ok",
        "ok",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"not json", "line 1 column 1"),
        (b"[1, 2]", "must be a JSON object"),
        (encoded(state="exploded"), "unknown enforcement state 'exploded'"),
        (encoded(state=None), "unknown enforcement state None"),
        (encoded(until=1796083200), "until must be a string or null"),
        (encoded(window=["pro"]), "window must be a string or null"),
        (encoded(downgrade_to=7), "downgrade_to must be a string or null"),
        (encoded(reason={"r": 1}), "reason must be a string or null"),
    ],
    ids=["json", "array", "state", "no state", "until", "window", "model", "reason"],
)
def test_a_malformed_record_is_a_value_error(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_enforcement(value)


@pytest.mark.parametrize(
    "bad",
    [encoded(until=1796083200), encoded(until="not a time"), encoded(window=5)],
    ids=["until number", "until text", "window number"],
)
def test_the_guard_skips_and_counts_a_malformed_record(bad: bytes) -> None:
    guard = CapGuard(config={"bootstrap.servers": "127.0.0.1:1"}, topic="t", clock=lambda: 0.0)
    guard.apply("u1", encoded(state="blocked"))
    guard.apply("u1", bad)
    assert guard.rejected == 1
    assert guard.check("u1").action == "block"
