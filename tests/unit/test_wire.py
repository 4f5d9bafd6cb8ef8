"""The msgspec fast paths (producer encode, worker decode) accept only what the contract accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import UsageEvent, decode_event, encode_event, event_from_obj
from schemas._wire import FIELDS, WireEvent, decode_dict, decode_usage, encode_dict, to_model
from spendstream.errors import InvalidEventError
from tests.unit.test_contract import BASE, event_dicts

pytestmark = pytest.mark.unit

_SCHEMA_NOISE = {"title", "description"}


def _norm(node: Any) -> Any:
    """A JSON Schema node without titles and descriptions, enums as sets."""
    if isinstance(node, list):
        return [_norm(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _norm(v) for k, v in node.items() if k not in _SCHEMA_NOISE}
    if "enum" in out:
        out["enum"] = sorted(out["enum"])
        out.pop("type", None)  # pydantic adds "type": "string" to a string enum
    return out


def test_wire_struct_has_the_models_fields_and_rules() -> None:
    ours = msgspec.json.schema(WireEvent)["$defs"]["WireEvent"]
    model = UsageEvent.model_json_schema()
    assert list(ours["properties"]) == list(model["properties"])  # same fields, same order
    assert ours["required"] == model["required"]
    for name, spec in model["properties"].items():
        assert _norm(ours["properties"][name]) == _norm(spec), name


def test_a_valid_event_takes_the_fast_path() -> None:
    fast = encode_dict(dict(BASE))
    assert fast is not None
    key, wire = fast
    assert key == BASE["user_id"]
    assert decode_event(wire) == event_from_obj(BASE)
    assert b'"schema_version"' not in wire  # defaults are left out


@settings(max_examples=300, deadline=None)
@given(event_dicts())
def test_every_valid_event_takes_the_fast_path(obj: dict[str, Any]) -> None:
    fast = encode_dict(obj)
    assert fast is not None, "the fast path refused a valid event"
    assert decode_event(fast[1]) == event_from_obj(obj)


_FIELDS = list(UsageEvent.model_fields)
_HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 5.0, 1.5, 10**12, 10**12 + 1, 2**64, -(2**63), float("nan"),
    "", " ", "x", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 256, "x" * 257, "é" * 128,
    "é" * 129, "\ud800", "\x00", "ok", "OK", "error", "1", "true", b"bytes", [], ["x"], {},
    {"k": "v"}, {"": "v"}, {"k": 1}, {1: "v"}, {"k": None}, {"k" * 65: "v"},
    {f"k{i}": "v" for i in range(33)}, {"k": "v" * 257},
    "2025-06-02T10:00:00+02:00", "2025-06-02T10:00:00Z", "2025-06-02T10:00:00z",
    "2025-06-02t10:00:00Z", "2025-06-02 10:00:00+02:00", "2025-06-02T10:00:00",
    "2025-06-02", "2025-06-02T10:00Z", "2025-06-02T10:00:00.1234567Z", "2025-06-02T23:59:60Z",
    "2025-06-02T10:00:00+24:00", "2025-06-02T10:00:00-00:00", "2025-06-02T10:00:00+0200",
    "20250602T100000Z", "2025-13-01T00:00:00Z", "0000-01-01T00:00:00Z", "1700000000",
    1_700_000_000, datetime(2025, 6, 2, 10, 0), datetime(2025, 6, 2, 10, 0, tzinfo=UTC),
    datetime(2025, 6, 2, 10, 0, tzinfo=timezone(timedelta(hours=-3))),
]  # fmt: skip


@st.composite
def broken_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with one to three fields replaced, dropped, or an unknown one added."""
    obj = draw(event_dicts())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*_FIELDS, "unknown_field"]))
        if draw(st.integers(0, 5)) == 0:
            obj.pop(name, None)
        else:
            obj[name] = draw(st.sampled_from(_HOSTILE))
    return obj


def _model_verdict(obj: dict[str, Any]) -> UsageEvent | None:
    try:
        return event_from_obj(obj)
    except InvalidEventError:
        return None


@settings(max_examples=1500, deadline=None)
@given(broken_events())
def test_the_fast_path_accepts_nothing_the_contract_refuses(obj: dict[str, Any]) -> None:
    fast = encode_dict(obj)
    if fast is None:
        return  # refused: the producer asks the model, whose verdict stands
    model = _model_verdict(obj)
    assert model is not None, f"fast path accepted what the contract refuses: {obj!r}"
    assert fast[0] == model.user_id
    assert decode_event(fast[1]) == model


def _values(event: Any) -> dict[str, Any]:
    return {name: getattr(event, name) for name in FIELDS}


def _same_dict_verdict(obj: dict[str, Any]) -> None:
    model = _model_verdict(obj)
    try:
        ours = decode_dict(obj)
    except InvalidEventError:
        assert model is None, f"decode_dict refused what the contract accepts: {obj!r}"
        return
    assert model is not None, f"decode_dict accepted what the contract refuses: {obj!r}"
    assert _values(ours) == _values(model)
    assert ours.occurred_at.tzinfo is UTC


@settings(max_examples=1500, deadline=None)
@given(broken_events())
def test_decoding_a_dict_gets_the_contracts_verdict(obj: dict[str, Any]) -> None:
    _same_dict_verdict(obj)


@pytest.mark.parametrize("field", _FIELDS)
def test_each_hostile_value_in_each_field(field: str) -> None:
    # The table behind the property above, exhaustively: every hostile value in this field.
    wrong = []
    for value in _HOSTILE:
        obj = {**BASE, field: value}
        fast = encode_dict(obj)
        if fast is not None and (
            (model := _model_verdict(obj)) is None or decode_event(fast[1]) != model
        ):
            wrong.append(value)
    assert not wrong, f"fast path disagrees with the contract on {field} = {wrong!r}"
    for value in _HOSTILE:
        _same_dict_verdict({**BASE, field: value})


# -- the worker's decode path ------------------------------------------------------------------


def _model_decode(data: bytes | None) -> UsageEvent | str:
    try:
        return decode_event(data)
    except InvalidEventError as exc:
        return str(exc)


def _same_verdict(data: bytes | None) -> None:
    model = _model_decode(data)
    try:
        ours = decode_usage(data)
    except InvalidEventError as exc:
        assert str(exc) == model, "refused with another reason than the contract's"
        return
    assert isinstance(model, UsageEvent), (
        f"decode_usage accepted what the contract refuses: {data!r}"
    )
    assert _values(ours) == _values(model)
    assert ours.occurred_at.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(event_dicts())
def test_valid_wire_events_decode_to_the_models_values(obj: dict[str, Any]) -> None:
    model = event_from_obj(obj)
    for wire in (orjson.dumps(obj), encode_event(model), encode_dict(obj)[1]):  # type: ignore[index]
        event = decode_usage(wire)
        assert _values(event) == _values(model)
        assert event.occurred_at.tzinfo is UTC
        assert to_model(event) == model


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError


@settings(max_examples=1500, deadline=None)
@given(broken_events())
def test_broken_events_as_bytes_get_the_contracts_verdict(obj: dict[str, Any]) -> None:
    try:
        wire = orjson.dumps(obj, default=_json_default)
    except (orjson.JSONEncodeError, TypeError):
        return  # not representable as JSON (a lone surrogate, a 2**64 key...)
    _same_verdict(wire)


@settings(max_examples=1000, deadline=None)
@given(event_dicts(), st.data())
def test_mangled_bytes_get_the_contracts_verdict(obj: dict[str, Any], data: st.DataObject) -> None:
    wire = bytearray(orjson.dumps(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(
            st.sampled_from([b'"', b"\\", b"\\ud800", b",", b":", b"{", b"}", b"[", b"]", b" ",
                             b"0", b"9", b".5", b"e9", b"-", b"null", b"NaN", b"\xff", b"\x00",
                             b"\u00e9", b"Z", b"T", b"+"])
            | st.binary(min_size=1, max_size=3)
        )  # fmt: skip
        if action == "insert":
            wire[at:at] = chunk
        elif action == "delete":
            del wire[at : at + len(chunk)]
        else:
            wire[at : at + len(chunk)] = chunk
    _same_verdict(bytes(wire))


_CRAFTED: list[bytes] = [
    # duplicate keys: the last one wins in both parsers
    b'{"event_id":"a","event_id":"b","occurred_at":"2025-06-02T10:00:00Z","org_id":"o",'
    b'"user_id":"u","gateway":"g","requested_model":"m"}',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00Z","occurred_at":"2025-06-02T11:00:00Z",'
    b'"org_id":"o","user_id":"u","gateway":"g","requested_model":"m"}',
    # a lone surrogate, escaped
    b'{"event_id":"\\ud800","occurred_at":"2025-06-02T10:00:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m"}',
    # deep nesting in an unknown field
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    # seven fractional digits, spaced-out JSON, no seconds, a key named occurred_at inside
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00.9999999Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m"}',
    b'{ "event_id" : "a", "occurred_at" : "2025-06-02T10:00:00.9999999+01:00", "org_id" : "o",'
    b' "user_id" : "u", "gateway" : "g", "requested_model" : "m" }',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m"}',
    b'{"attributes":{"occurred_at":"2025-06-02T10:00:00Z"},"event_id":"a",'
    b'"occurred_at":"2025-06-02T10:00:00.1234567Z","org_id":"o","user_id":"u","gateway":"g",'
    b'"requested_model":"m"}',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00-00:00","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m"}',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m","input_tokens":1e3}',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m","input_tokens":NaN}',
    b'{"event_id":"a","occurred_at":"2025-06-02T10:00:00Z","org_id":"o","user_id":"u",'
    b'"gateway":"g","requested_model":"m"} trailing',
    b"\xef\xbb\xbf" + orjson.dumps(BASE),  # a UTF-8 byte-order mark
    b"[]",
    b"null",
    b"",
    b" " * 20_000,
    orjson.dumps({**BASE, "attributes": {"k": "v" * 16_000}}),  # over the size limit
]


@pytest.mark.parametrize("data", [*_CRAFTED, None], ids=lambda d: repr(d)[:48])
def test_crafted_messages_get_the_contracts_verdict(data: bytes | None) -> None:
    _same_verdict(data)


def test_a_null_message_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidEventError, match="no value"):
        decode_usage(None)


# -- reservation_id: the same rules in both decoders -----------------------------------------

_RESERVATION_OK: list[Any] = [None, "r", "res_01J9Z3", "r" * 256, "é" * 256]
_RESERVATION_BAD: list[Any] = ["", "r" * 257, "é" * 257, 42, 1.5, True, ["r"], {"id": "r"}]


@pytest.mark.parametrize("value", _RESERVATION_OK, ids=repr)
def test_a_valid_reservation_id_is_accepted_by_every_path(value: Any) -> None:
    obj = {**BASE, "reservation_id": value}
    model = event_from_obj(obj)
    assert model.reservation_id == value
    fast = encode_dict(obj)
    assert fast is not None, "the fast path refused a valid reservation_id"
    assert decode_event(fast[1]) == model
    for ours in (decode_dict(obj), decode_usage(orjson.dumps(obj)), decode_usage(fast[1])):
        assert ours.reservation_id == value
        assert _values(ours) == _values(model)
        assert to_model(ours) == model


@pytest.mark.parametrize("value", _RESERVATION_BAD, ids=repr)
def test_an_invalid_reservation_id_is_refused_by_every_path(value: Any) -> None:
    obj = {**BASE, "reservation_id": value}
    with pytest.raises(InvalidEventError, match="reservation_id"):
        event_from_obj(obj)
    assert encode_dict(obj) is None  # the producer then asks the model, which refuses
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(obj, WireEvent)  # refused by the mirror itself, not only by the model
    with pytest.raises(InvalidEventError, match="reservation_id"):
        decode_dict(obj)
    _same_verdict(orjson.dumps(obj))
    with pytest.raises(InvalidEventError, match="reservation_id"):
        decode_usage(orjson.dumps(obj))
