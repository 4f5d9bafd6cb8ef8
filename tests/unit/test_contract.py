"""The usage-event contract as a table of good and bad events (docs/DESIGN.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from producers import validate_event
from producers._producer import encode_for_send, fast_encode
from schemas import (
    MAX_ATTRIBUTES,
    MAX_EVENT_BYTES,
    MAX_LATENCY_MS,
    MAX_TOKENS,
    UsageEvent,
    decode_event,
    encode_event,
    event_from_obj,
)
from spendstream.errors import InvalidEventError

pytestmark = pytest.mark.unit

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "usage_event.schema.json"

BASE: dict[str, Any] = {
    "event_id": "evt-1",
    "occurred_at": "2025-06-02T10:00:00+02:00",
    "org_id": "org-1",
    "user_id": "user-1",
    "gateway": "gw-eu-1",
    "requested_model": "gpt-4o",
    "input_tokens": 1000,
    "cached_input_tokens": 200,
    "cache_write_tokens": 100,
    "output_tokens": 300,
    "reasoning_tokens": 50,
}


def _with(**changes: Any) -> dict[str, Any]:
    event = dict(BASE)
    for key, value in changes.items():
        if value is _DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return event


_DROP = object()

GOOD: list[tuple[str, dict[str, Any]]] = [
    ("minimal with offset", _with()),
    ("Z suffix", _with(occurred_at="2025-06-02T08:00:00Z")),
    ("negative offset", _with(occurred_at="2025-06-02T03:00:00-05:00")),
    ("fractional seconds", _with(occurred_at="2025-06-02T08:00:00.123456+00:00")),
    ("token fields default to zero", _with(**dict.fromkeys(
        ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
         "reasoning_tokens"), _DROP))),
    ("cached + write == input", _with(cached_input_tokens=900, cache_write_tokens=100)),
    ("reasoning == output", _with(reasoning_tokens=300)),
    ("unknown top-level fields ignored", _with(future_field={"x": 1}, another=3)),
    ("all optional fields", _with(api_key_id="k", request_id="r", provider="openai",
                                  served_model="gpt-4o-mini", semantic_cache_hit=True,
                                  status="error", latency_ms=0, feature="chat",
                                  attributes={"region": "eu"}, schema_version=1)),
    ("attributes at the bound", _with(attributes={f"k{i}": "v" for i in range(MAX_ATTRIBUTES)})),
    ("zero tokens", _with(input_tokens=0, cached_input_tokens=0, cache_write_tokens=0,
                          output_tokens=0, reasoning_tokens=0)),
    ("earliest time", _with(occurred_at="2000-01-01T00:00:00Z")),
    ("earliest time in another offset", _with(occurred_at="1999-12-31T23:00:00-01:00")),
    ("last instant", _with(occurred_at="2099-12-31T23:59:59.999999Z")),
    ("last instant in another offset", _with(occurred_at="2100-01-01T00:59:59+01:00")),
    ("tokens at the bound", _with(input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS)),
    ("latency at the bound", _with(latency_ms=MAX_LATENCY_MS)),
    ("every token class at its share", _with(
        input_tokens=1000, cached_input_tokens=200, cache_write_tokens=100,
        cache_write_1h_tokens=100, input_audio_tokens=300, input_image_tokens=400,
        output_tokens=300, reasoning_tokens=50, output_audio_tokens=150, output_image_tokens=100)),
    ("batch tier with web searches", _with(service_tier="batch", web_search_requests=3,
                                           search_context_size="high")),
    ("with a reservation id", _with(request_id="r", reservation_id="res_01J9Z3")),
    ("reservation id at the bound", _with(reservation_id="r" * 256)),
    ("reservation id null", _with(reservation_id=None)),
]  # fmt: skip

BAD: list[tuple[str, dict[str, Any] | Any, str]] = [
    ("missing event_id", _with(event_id=_DROP), "event_id"),
    ("missing occurred_at", _with(occurred_at=_DROP), "occurred_at"),
    ("missing org_id", _with(org_id=_DROP), "org_id"),
    ("missing user_id", _with(user_id=_DROP), "user_id"),
    ("missing gateway", _with(gateway=_DROP), "gateway"),
    ("missing requested_model", _with(requested_model=_DROP), "requested_model"),
    ("empty user_id", _with(user_id=""), "user_id"),
    ("timestamp without offset", _with(occurred_at="2025-06-02T10:00:00"), "occurred_at"),
    ("date only", _with(occurred_at="2025-06-02"), "occurred_at"),
    ("unix number timestamp", _with(occurred_at=1748851200), "occurred_at"),
    ("unix number as a string", _with(occurred_at="1748851200"), "occurred_at"),
    ("small number as a string", _with(occurred_at="1"), "occurred_at"),
    ("garbage timestamp", _with(occurred_at="yesterday"), "occurred_at"),
    ("year 1 with an offset", _with(occurred_at="0001-01-01T00:00:00+01:00"), "2000-01-01"),
    ("late on 9999-12-31", _with(occurred_at="9999-12-31T23:30:00-01:00"), "2000-01-01"),
    ("just before 2000", _with(occurred_at="1999-12-31T23:59:59.999999Z"), "2000-01-01"),
    ("before 2000 in another offset", _with(occurred_at="2000-01-01T00:30:00+01:00"),
     "2000-01-01"),
    ("2100", _with(occurred_at="2100-01-01T00:00:00Z"), "2100-01-01"),
    ("2100 in another offset", _with(occurred_at="2099-12-31T23:00:00-01:00"), "2100-01-01"),
    ("tokens over the bound", _with(output_tokens=MAX_TOKENS + 1, reasoning_tokens=0),
     "output_tokens"),
    ("latency over the bound", _with(latency_ms=MAX_LATENCY_MS + 1), "latency_ms"),
    ("input classes over input", _with(input_audio_tokens=401, input_image_tokens=300),
     "input_audio_tokens"),
    ("1h writes over writes", _with(cache_write_1h_tokens=101), "cache_write_1h_tokens"),
    ("output classes over output", _with(output_audio_tokens=200, output_image_tokens=51),
     "output_audio_tokens"),
    ("unknown service tier", _with(service_tier="express"), "service_tier"),
    ("too many web searches", _with(web_search_requests=1001), "web_search_requests"),
    ("web searches as a string", _with(web_search_requests="3"), "web_search_requests"),
    ("unknown context size", _with(search_context_size="huge"), "search_context_size"),
    ("negative input", _with(input_tokens=-1), "input_tokens"),
    ("negative output", _with(output_tokens=-5), "output_tokens"),
    ("negative cached", _with(cached_input_tokens=-1), "cached_input_tokens"),
    ("negative latency", _with(latency_ms=-1), "latency_ms"),
    ("float tokens", _with(input_tokens=10.0), "input_tokens"),
    ("string tokens", _with(input_tokens="10"), "input_tokens"),
    ("bool tokens", _with(output_tokens=True), "output_tokens"),
    ("cached + write > input", _with(cached_input_tokens=901, cache_write_tokens=100),
     "cached_input_tokens + cache_write_tokens"),
    ("cached > input", _with(cached_input_tokens=1001, cache_write_tokens=0),
     "cached_input_tokens + cache_write_tokens"),
    ("reasoning > output", _with(reasoning_tokens=301), "reasoning_tokens"),
    ("semantic_cache_hit as string", _with(semantic_cache_hit="true"), "semantic_cache_hit"),
    ("semantic_cache_hit as int", _with(semantic_cache_hit=1), "semantic_cache_hit"),
    ("status outside enum", _with(status="timeout"), "status"),
    ("schema_version 2", _with(schema_version=2), "schema_version"),
    ("schema_version as string", _with(schema_version="1"), "schema_version"),
    ("too many attributes", _with(attributes={f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}),
     "attributes"),
    ("attribute value not a string", _with(attributes={"n": 1}), "attributes"),
    ("attribute value too long", _with(attributes={"k": "v" * 257}), "attributes"),
    ("empty reservation id", _with(reservation_id=""), "reservation_id"),
    ("reservation id too long", _with(reservation_id="r" * 257), "reservation_id"),
    ("reservation id as a number", _with(reservation_id=42), "reservation_id"),
    ("reservation id as an object", _with(reservation_id={"id": "r"}), "reservation_id"),
    ("not an object", ["event"], "JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "obj"), GOOD, ids=[c for c, _ in GOOD])
def test_good_events_validate_and_roundtrip(case: str, obj: dict[str, Any]) -> None:
    event = event_from_obj(obj)
    assert decode_event(encode_event(event)) == event
    assert validate_event(obj) == event
    key, wire = encode_for_send(obj)
    assert (key, decode_event(wire)) == (event.user_id, event)


@pytest.mark.parametrize(("case", "obj", "reason"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_events_rejected_with_reason(case: str, obj: Any, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason.replace("+", r"\+")):
        event_from_obj(obj)
    # the producer's fast path rejects exactly the same events, with the same message
    with pytest.raises(InvalidEventError, match=reason.replace("+", r"\+")):
        validate_event(obj)
    with pytest.raises(InvalidEventError, match=reason.replace("+", r"\+")):
        encode_for_send(obj)


def test_stored_as_utc() -> None:
    event = event_from_obj(_with(occurred_at="2025-06-02T10:00:00+02:00"))
    assert event.occurred_at == datetime(2025, 6, 2, 8, 0, tzinfo=UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert orjson.loads(encode_event(event))["occurred_at"] == "2025-06-02T08:00:00Z"


def test_unknown_fields_dropped_from_wire() -> None:
    wire = orjson.loads(encode_event(event_from_obj(_with(future_field=1))))
    assert "future_field" not in wire


def test_reservation_id_is_optional_and_kept_on_the_wire() -> None:
    assert event_from_obj(_with()).reservation_id is None
    assert b"reservation_id" not in encode_event(event_from_obj(_with()))  # absent when unset
    event = event_from_obj(_with(reservation_id="res-1"))
    assert event.reservation_id == "res-1"
    assert orjson.loads(encode_event(event))["reservation_id"] == "res-1"
    assert decode_event(encode_event(event)).reservation_id == "res-1"
    assert decode_event(encode_for_send(_with(reservation_id="res-1"))[1]) == event


def test_served_model_defaults_to_requested() -> None:
    assert event_from_obj(_with()).model == "gpt-4o"
    assert event_from_obj(_with(served_model="gpt-4o-mini")).model == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"null", "JSON object"),
        (orjson.dumps(_with(feature="x" * MAX_EVENT_BYTES)), "limit"),
    ],
    ids=["not json", "not utf-8", "null", "oversize"],
)
def test_bad_wire_bytes_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        decode_event(data)


def test_committed_json_schema_matches_export() -> None:
    from spendstream.cli import app

    result = CliRunner().invoke(app, ["schema", "export"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
_tokens = st.integers(min_value=0, max_value=MAX_TOKENS)


_DEFAULTED = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "status")


@st.composite
def event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events as a gateway hands them over: any offset, optional fields None or absent,
    some defaulted fields left out."""
    inp = draw(_tokens)
    cached = draw(st.integers(0, inp))
    write = draw(st.integers(0, inp - cached))
    out = draw(_tokens)
    offset = draw(st.integers(-14 * 60, 14 * 60))
    # Any instant of the accepted range (its edges included), written in any offset.
    when = (
        draw(
            st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=datetime(2099, 12, 31, 23, 59, 59, 999_999),
            )
        )
        .replace(tzinfo=UTC)
        .astimezone(timezone(timedelta(minutes=offset)))
    )
    obj: dict[str, Any] = {
        "event_id": draw(_ids),
        "occurred_at": when.isoformat(),
        "org_id": draw(_ids),
        "user_id": draw(_ids),
        "gateway": draw(_ids),
        "requested_model": draw(_ids),
        "served_model": draw(st.none() | _ids),
        "reservation_id": draw(st.none() | _ids),
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "cache_write_tokens": write,
        "output_tokens": out,
        "reasoning_tokens": (reasoning := draw(st.integers(0, out))),
        "cache_write_1h_tokens": draw(st.integers(0, write)),
        "input_audio_tokens": (audio_in := draw(st.integers(0, inp - cached - write))),
        "input_image_tokens": draw(st.integers(0, inp - cached - write - audio_in)),
        "output_audio_tokens": (audio_out := draw(st.integers(0, out - reasoning))),
        "output_image_tokens": draw(st.integers(0, out - reasoning - audio_out)),
        "service_tier": draw(st.sampled_from(["standard", "batch", "flex", "priority"])),
        "web_search_requests": draw(st.integers(0, 1000)),
        "search_context_size": draw(st.none() | st.sampled_from(["low", "medium", "high"])),
        "semantic_cache_hit": draw(st.booleans()),
        "status": draw(st.sampled_from(["ok", "error"])),
        "latency_ms": draw(st.none() | st.integers(0, MAX_LATENCY_MS)),
        "attributes": draw(
            st.none() | st.dictionaries(_ids, st.text(max_size=20), max_size=MAX_ATTRIBUTES)
        ),
    }
    obj = {k: v for k, v in obj.items() if v is not None or draw(st.booleans())}
    if obj["reasoning_tokens"] == obj["cached_input_tokens"] == obj["cache_write_1h_tokens"] == 0:
        for name in _DEFAULTED:
            if draw(st.booleans()):
                obj.pop(name, None)
    return obj


def events() -> st.SearchStrategy[UsageEvent]:
    return event_dicts().map(event_from_obj)


@settings(max_examples=300, deadline=None)
@given(events())
def test_roundtrip_encode_decode(event: UsageEvent) -> None:
    wire = encode_event(event)
    assert decode_event(wire) == event
    assert encode_event(decode_event(wire)) == wire


@settings(max_examples=300, deadline=None)
@given(events())
def test_producer_fast_encoding_is_the_wire_form(event: UsageEvent) -> None:
    # UsageProducer encodes with pydantic-core directly; it must be byte-identical.
    assert fast_encode(event) == encode_event(event)


@settings(max_examples=300, deadline=None)
@given(event_dicts())
def test_producer_dict_path_sends_the_same_event(obj: dict[str, Any]) -> None:
    # send(dict) validates and encodes with msgspec, not the model: the bytes may differ
    # (defaults left out, the offset kept) but must decode to the model's event.
    event = event_from_obj(obj)
    key, wire = encode_for_send(obj)
    assert (key, decode_event(wire)) == (event.user_id, event)


def test_the_producer_refuses_an_event_over_the_size_limit() -> None:
    # Every field within its bound, the whole over 16 KiB: the worker would dead-letter it.
    big = _with(attributes={f"k{i}": "é" * 256 for i in range(MAX_ATTRIBUTES)})
    assert event_from_obj(big)  # valid field by field
    for obj in (big, event_from_obj(big)):
        with pytest.raises(InvalidEventError, match="over the 16384 limit"):
            encode_for_send(obj)


@given(
    st.datetimes(
        min_value=datetime(1998, 1, 1),
        max_value=datetime(2102, 1, 1),
        timezones=st.sampled_from(
            [timezone(timedelta(minutes=m)) for m in (-1439, -600, -1, 0, 1, 330, 1439)]
        ),
    )
    | st.sampled_from(
        [
            datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2000, 1, 1, tzinfo=UTC),
            datetime(2000, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
            datetime(2001, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))),
            datetime(2098, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
            datetime(2099, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
            datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2100, 1, 1, tzinfo=UTC),
        ]
    )
)
def test_time_in_range_is_the_plain_comparison(when: datetime) -> None:
    from schemas._events import EARLIEST_TIME, LATEST_TIME, time_in_range

    assert time_in_range(when) == (EARLIEST_TIME <= when < LATEST_TIME)
